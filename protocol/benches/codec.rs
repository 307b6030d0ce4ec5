//! Frame codec throughput: typical frames encoded into, and decoded out of, a `BytesMut`
//! with `ServerCodec` / `ClientCodec`, in batches; reported as frames per second.
//!
//! Run: `cargo bench -p messenger-protocol --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use messenger_protocol::DEFAULT_MAX_FRAME_BYTES;
use messenger_protocol::codec::FrameCodec;
use messenger_protocol::pb::{self, client_frame, server_frame};
use prost::Message;
use tokio_util::codec::{Decoder, Encoder};

/// Frames per iteration.
const BATCH: usize = 1000;

fn delivery(seq: u64) -> pb::ServerFrame {
    pb::ServerFrame {
        request_id: 0,
        kind: Some(server_frame::Kind::Delivery(pb::Delivery {
            seq,
            message: Some(pb::Message {
                message_id: 1_000_000 + seq,
                sender: Some(pb::User {
                    user_id: 42,
                    username: "alice".into(),
                    display_name: "Alice Liddell".into(),
                }),
                to: Some(pb::message::To::GroupId(7)),
                client_msg_id: "0123456789abcdef0123456789abcdef".into(),
                body: Bytes::from(vec![b'x'; 100]),
                content_type: "text/plain".into(),
                server_time_ms: 1_764_000_000_000,
            }),
        })),
    }
}

fn send_message(request_id: u64) -> pb::ClientFrame {
    pb::ClientFrame {
        request_id,
        kind: Some(client_frame::Kind::Send(pb::SendMessage {
            to: Some(pb::send_message::To::UserId(43)),
            client_msg_id: "0123456789abcdef0123456789abcdef".into(),
            body: Bytes::from(vec![b'y'; 100]),
            content_type: "text/plain".into(),
        })),
    }
}

/// Benchmarks one direction of the wire: `Out` frames encoded by `FrameCodec<In, Out>` and
/// decoded by the peer's `FrameCodec<Out, In>`.
fn bench_direction<In, Out>(c: &mut Criterion, name: &str, frames: Vec<Out>, enc: &str, dec: &str)
where
    In: Message + Default,
    Out: Message + Default,
{
    let codec_out = || FrameCodec::<In, Out>::new(DEFAULT_MAX_FRAME_BYTES);
    let codec_in = || FrameCodec::<Out, In>::new(DEFAULT_MAX_FRAME_BYTES);
    let mut encoded = BytesMut::new();
    let mut encoder = codec_out();
    for f in &frames {
        encoder.encode(f, &mut encoded).expect("encode");
    }
    let frame_len = encoded.len() / BATCH;

    let mut group = c.benchmark_group(format!("{name} ({frame_len} B/frame)"));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(format!("encode ({enc})"), |b| {
        let mut codec = codec_out();
        let mut buf = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            buf.clear();
            for f in &frames {
                codec.encode(f, &mut buf).expect("encode");
            }
            black_box(buf.len());
        })
    });
    group.bench_function(format!("decode ({dec})"), |b| {
        let mut codec = codec_in();
        b.iter_batched_ref(
            || encoded.clone(),
            |buf| {
                let mut n = 0;
                while let Some(f) = codec.decode(buf).expect("decode") {
                    black_box(&f);
                    n += 1;
                }
                assert_eq!(n, BATCH);
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("encode+decode", |b| {
        let mut encoder = codec_out();
        let mut decoder = codec_in();
        let mut buf = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            for f in &frames {
                encoder.encode(f, &mut buf).expect("encode");
            }
            let mut n = 0;
            while let Some(f) = decoder.decode(&mut buf).expect("decode") {
                black_box(&f);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });
    group.finish();
}

fn bench_delivery(c: &mut Criterion) {
    let frames = (1..=BATCH as u64).map(delivery).collect();
    bench_direction::<pb::ClientFrame, pb::ServerFrame>(
        c,
        "delivery_100B_body",
        frames,
        "ServerCodec",
        "ClientCodec",
    );
}

fn bench_send(c: &mut Criterion) {
    let frames = (1..=BATCH as u64).map(send_message).collect();
    bench_direction::<pb::ServerFrame, pb::ClientFrame>(
        c,
        "send_message_100B_body",
        frames,
        "ClientCodec",
        "ServerCodec",
    );
}

criterion_group!(benches, bench_delivery, bench_send);
criterion_main!(benches);
