//! Arbitrary bytes through the frame codec of both ends (`ServerCodec` reading `ClientFrame`s,
//! `ClientCodec` reading `ServerFrame`s), with a small frame limit.
//!
//! Input: one byte choosing the limit (64 + 8·b bytes), one byte seeding how the stream is cut
//! into reads, then the stream itself (length-prefixed frames, as on the wire).
//!
//! Properties, beyond "never panics":
//! - a length prefix above the limit is `TooLarge` carrying that length and the limit, and
//!   nothing else is ever reported for it;
//! - `Ok(None)` only while the buffer really holds less than one whole frame;
//! - the stream cut into arbitrary reads decodes to exactly what it decodes to in one read;
//! - a decoded frame re-encodes (or is `TooLarge` by its encoded length), decodes back to the
//!   same value, and its encoding is canonical (encoding the copy gives the same bytes).
#![no_main]

use bytes::{Buf, BytesMut};
use libfuzzer_sys::fuzz_target;
use messenger_protocol::codec::{ClientCodec, FrameCodec, LENGTH_PREFIX_BYTES, ServerCodec};
use messenger_protocol::{CodecError, codec::encode_frame};
use prost::Message;
use tokio_util::codec::Decoder;

/// How a decode run ended.
#[derive(Debug, PartialEq)]
enum End {
    NeedMore,
    TooLarge { len: usize, max: usize },
    Malformed,
}

fuzz_target!(|data: &[u8]| {
    let [limit, cut_seed, stream @ ..] = data else {
        return;
    };
    let max = 64 + 8 * usize::from(*limit);
    check::<ServerCodec, _>(ServerCodec::new(max), stream, *cut_seed);
    check::<ClientCodec, _>(ClientCodec::new(max), stream, *cut_seed);
});

fn check<C, M>(codec: C, stream: &[u8], cut_seed: u8)
where
    C: Decoder<Item = M, Error = CodecError> + Clone + MaxFrame,
    M: Message + Default + PartialEq,
{
    let max = codec.max();
    let (whole, end) = decode_all(codec.clone(), stream, &[stream.len().max(1)], max);
    // The same bytes arriving in small reads of varying sizes.
    let cuts: Vec<usize> = (0..64)
        .map(|i| 1 + (usize::from(cut_seed).wrapping_mul(31).wrapping_add(i * 7) % 13))
        .collect();
    let (pieces, piece_end) = decode_all(codec, stream, &cuts, max);
    assert!(
        whole == pieces,
        "frames differ when the stream is cut into reads"
    );
    assert_eq!(end, piece_end, "the stream ends differently when cut");
    for frame in &whole {
        round_trip(frame, max);
    }
}

/// Feeds `stream` in reads of the sizes in `cuts` (cycled), decoding after each, until the
/// codec refuses or the stream is used up.
fn decode_all<C, M>(mut codec: C, stream: &[u8], cuts: &[usize], max: usize) -> (Vec<M>, End)
where
    C: Decoder<Item = M, Error = CodecError>,
    M: Message + Default,
{
    let mut frames = Vec::new();
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut cut = cuts.iter().cycle();
    loop {
        loop {
            let before = buf.len();
            let prefix = (before >= LENGTH_PREFIX_BYTES)
                .then(|| (&buf[..LENGTH_PREFIX_BYTES]).get_u32() as usize);
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    let len = prefix.expect("a frame needs a prefix");
                    assert!(len <= max, "a frame above the limit was decoded");
                    assert_eq!(buf.len(), before - LENGTH_PREFIX_BYTES - len);
                    frames.push(frame);
                }
                Ok(None) => {
                    if let Some(len) = prefix {
                        assert!(len <= max, "an oversized prefix was not refused");
                        assert!(before < LENGTH_PREFIX_BYTES + len, "a whole frame waits");
                    }
                    break;
                }
                Err(CodecError::TooLarge { len, max: m }) => {
                    assert_eq!(Some(len), prefix, "TooLarge names the prefix's length");
                    assert!(len > max && m == max, "TooLarge for {len} with limit {m}");
                    return (frames, End::TooLarge { len, max: m });
                }
                Err(CodecError::Decode(_)) => {
                    let len = prefix.expect("a malformed frame needs a prefix");
                    assert!(len <= max && before >= LENGTH_PREFIX_BYTES + len);
                    return (frames, End::Malformed);
                }
                Err(CodecError::Io(e)) => panic!("the decoder invented an i/o error: {e}"),
            }
        }
        if rest.is_empty() {
            return (frames, End::NeedMore);
        }
        let n = (*cut.next().expect("cycle")).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

/// Re-encoding a decoded frame: either it fits and comes back equal, or it is refused as too
/// large by exactly its encoded length (prost may re-encode a few bytes longer than it read,
/// e.g. a lone unpacked repeated field becomes packed).
fn round_trip<M: Message + Default + PartialEq>(frame: &M, max: usize) {
    let mut wire = BytesMut::new();
    match encode_frame(frame, max, &mut wire) {
        Ok(()) => {}
        Err(CodecError::TooLarge { len, max: m }) => {
            assert!(len == frame.encoded_len() && len > max && m == max);
            return;
        }
        Err(e) => panic!("encoding a decoded frame failed: {e}"),
    }
    assert_eq!(wire.len(), LENGTH_PREFIX_BYTES + frame.encoded_len());
    let mut codec = FrameCodec::<M, M>::new(max);
    let mut buf = wire.clone();
    let again = match codec.decode(&mut buf) {
        Ok(Some(again)) => again,
        other => panic!(
            "a re-encoded frame does not decode: {:?}",
            other.map(|_| ())
        ),
    };
    assert!(buf.is_empty(), "re-encoding left bytes behind");
    assert!(again == *frame, "a frame changed through encode and decode");
    let mut wire2 = BytesMut::new();
    encode_frame(&again, max, &mut wire2).expect("the same frame encodes again");
    assert_eq!(wire, wire2, "encoding is not canonical");
}

/// The limit a codec was built with (the codec types are aliases of one generic type).
trait MaxFrame {
    fn max(&self) -> usize;
}

impl<In, Out> MaxFrame for FrameCodec<In, Out> {
    fn max(&self) -> usize {
        self.max_frame_bytes()
    }
}
