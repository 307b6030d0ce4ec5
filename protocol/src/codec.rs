//! Frame codec: a 4-byte big-endian length N, then N bytes of one protobuf message.
//!
//! The same type serves both ends: the server decodes `ClientFrame` and encodes `ServerFrame`,
//! the client the other way round. A length above the configured maximum is a typed
//! [`CodecError::TooLarge`] before any of the body is buffered, so a peer cannot make us
//! allocate more than the limit.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Decodes `In` frames and encodes `Out` frames, each at most `max_frame_bytes` long.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    inner: LengthDelimitedCodec,
    max_frame_bytes: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new(max_frame_bytes: usize) -> Self {
        let inner = LengthDelimitedCodec::builder()
            .length_field_length(LENGTH_PREFIX_BYTES)
            .big_endian()
            // We check the limit ourselves to return a typed error; this is a backstop.
            .max_frame_length(max_frame_bytes)
            .new_codec();
        Self {
            inner,
            max_frame_bytes,
            _types: PhantomData,
        }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }
}

impl<In, Out> Clone for FrameCodec<In, Out> {
    fn clone(&self) -> Self {
        Self::new(self.max_frame_bytes)
    }
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, CodecError> {
        let Some(prefix) = src.get(..LENGTH_PREFIX_BYTES) else {
            return Ok(None);
        };
        let len = (&prefix[..]).get_u32() as usize;
        if len > self.max_frame_bytes {
            return Err(CodecError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        // Hand the inner codec whole frames only: it consumes the header as soon as it has
        // read it, so a frame split across reads would otherwise leave body bytes at the front
        // of `src` for the length check above to misread.
        if src.len() < LENGTH_PREFIX_BYTES + len {
            src.reserve(LENGTH_PREFIX_BYTES + len - src.len());
            return Ok(None);
        }
        match self.inner.decode(src)? {
            Some(frame) => Ok(Some(In::decode(frame.freeze())?)),
            None => Ok(None),
        }
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(&item, self.max_frame_bytes, dst)
    }
}

impl<In, Out: Message> Encoder<&Out> for FrameCodec<In, Out> {
    type Error = CodecError;

    fn encode(&mut self, item: &Out, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(item, self.max_frame_bytes, dst)
    }
}

/// Appends one length-prefixed frame holding `msg` to `dst`.
pub fn encode_frame<M: Message>(
    msg: &M,
    max_frame_bytes: usize,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let len = msg.encoded_len();
    if len > max_frame_bytes {
        return Err(CodecError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    dst.reserve(LENGTH_PREFIX_BYTES + len);
    // `len` fits in u32: it is at most max_frame_bytes, which the caller keeps below 4 GiB.
    dst.put_u32(u32::try_from(len).map_err(|_| CodecError::TooLarge {
        len,
        max: u32::MAX as usize,
    })?);
    msg.encode(dst)
        .map_err(|e| CodecError::Io(std::io::Error::other(e)))?;
    Ok(())
}

/// Codec of the server side: reads `ClientFrame`, writes `ServerFrame`.
pub type ServerCodec = FrameCodec<crate::pb::ClientFrame, crate::pb::ServerFrame>;
/// Codec of the client side: reads `ServerFrame`, writes `ClientFrame`.
pub type ClientCodec = FrameCodec<crate::pb::ServerFrame, crate::pb::ClientFrame>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{self, client_frame::Kind};

    fn ping(id: u64) -> pb::ClientFrame {
        pb::ClientFrame {
            request_id: id,
            kind: Some(Kind::Ping(pb::Ping {})),
        }
    }

    #[test]
    fn a_frame_round_trips_and_leaves_the_next_one_in_the_buffer() {
        let mut client = ClientCodec::new(1024);
        let mut server = ServerCodec::new(1024);
        let mut buf = BytesMut::new();
        client.encode(ping(7), &mut buf).expect("encode");
        client.encode(ping(8), &mut buf).expect("encode");
        assert_eq!(server.decode(&mut buf).expect("decode"), Some(ping(7)));
        assert_eq!(server.decode(&mut buf).expect("decode"), Some(ping(8)));
        assert_eq!(server.decode(&mut buf).expect("decode"), None);
    }

    #[test]
    fn a_partial_frame_waits_for_more_bytes() {
        let mut client = ClientCodec::new(1024);
        let mut server = ServerCodec::new(1024);
        let mut full = BytesMut::new();
        client.encode(ping(300), &mut full).expect("encode");
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(
                server.decode(&mut part).expect("decode"),
                None,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_frame_fed_one_byte_at_a_time_decodes_once_complete() {
        let mut client = ClientCodec::new(1024);
        let mut server = ServerCodec::new(1024);
        let mut full = BytesMut::new();
        client.encode(ping(300), &mut full).expect("encode");
        client.encode(ping(301), &mut full).expect("encode");
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in full.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(f) = server.decode(&mut buf).expect("decode") {
                got.push(f);
            }
        }
        assert_eq!(got, vec![ping(300), ping(301)]);
    }

    #[test]
    fn an_oversized_length_is_refused_before_the_body_arrives() {
        let mut server = ServerCodec::new(16);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 17][..]);
        match server.decode(&mut buf) {
            Err(CodecError::TooLarge { len: 17, max: 16 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        let mut server = ServerCodec::new(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            server.decode(&mut buf),
            Err(CodecError::Decode(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut server = ServerCodec::new(256);
            let mut buf = BytesMut::from(&data[..]);
            // Decode until the codec needs more bytes or reports an error.
            while let Ok(Some(_)) = server.decode(&mut buf) {}
        }

        #[test]
        fn any_send_frame_round_trips(id in 1u64.., body in proptest::collection::vec(proptest::num::u8::ANY, 0..200), cmid in "[a-z0-9-]{1,40}") {
            let frame = pb::ClientFrame {
                request_id: id,
                kind: Some(Kind::Send(pb::SendMessage {
                    to: Some(pb::send_message::To::UserId(id / 2)),
                    client_msg_id: cmid,
                    body: body.into(),
                    content_type: "text/plain".into(),
                })),
            };
            let mut client = ClientCodec::new(1024);
            let mut server = ServerCodec::new(1024);
            let mut buf = BytesMut::new();
            client.encode(&frame, &mut buf).expect("encode");
            proptest::prop_assert_eq!(server.decode(&mut buf).expect("decode"), Some(frame));
        }
    }
}
