//! Frame codec throughput: typical frames encoded into, and decoded out of, a `BytesMut`
//! with `ServerCodec` / `ClientCodec`, in batches; reported as frames per second.
//!
//! Run: `cargo bench -p messenger-protocol --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use messenger_protocol::DEFAULT_MAX_FRAME_BYTES;
use messenger_protocol::codec::{ClientCodec, ServerCodec};
use messenger_protocol::pb::{self, client_frame, server_frame};
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

fn bench_delivery(c: &mut Criterion) {
    let frames: Vec<pb::ServerFrame> = (1..=BATCH as u64).map(delivery).collect();
    let mut encoded = BytesMut::new();
    let mut server = ServerCodec::new(DEFAULT_MAX_FRAME_BYTES);
    for f in &frames {
        server.encode(f, &mut encoded).expect("encode");
    }
    let frame_len = encoded.len() / BATCH;

    let mut group = c.benchmark_group(format!("delivery_100B_body ({frame_len} B/frame)"));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("encode (ServerCodec)", |b| {
        let mut codec = ServerCodec::new(DEFAULT_MAX_FRAME_BYTES);
        let mut buf = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            buf.clear();
            for f in &frames {
                codec.encode(f, &mut buf).expect("encode");
            }
            black_box(buf.len());
        })
    });
    group.bench_function("decode (ClientCodec)", |b| {
        let mut codec = ClientCodec::new(DEFAULT_MAX_FRAME_BYTES);
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
        let mut enc = ServerCodec::new(DEFAULT_MAX_FRAME_BYTES);
        let mut dec = ClientCodec::new(DEFAULT_MAX_FRAME_BYTES);
        let mut buf = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            for f in &frames {
                enc.encode(f, &mut buf).expect("encode");
            }
            let mut n = 0;
            while let Some(f) = dec.decode(&mut buf).expect("decode") {
                black_box(&f);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });
    group.finish();
}

fn bench_send(c: &mut Criterion) {
    let frames: Vec<pb::ClientFrame> = (1..=BATCH as u64).map(send_message).collect();
    let mut encoded = BytesMut::new();
    let mut client = ClientCodec::new(DEFAULT_MAX_FRAME_BYTES);
    for f in &frames {
        client.encode(f, &mut encoded).expect("encode");
    }
    let frame_len = encoded.len() / BATCH;

    let mut group = c.benchmark_group(format!("send_message_100B_body ({frame_len} B/frame)"));
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("encode (ClientCodec)", |b| {
        let mut codec = ClientCodec::new(DEFAULT_MAX_FRAME_BYTES);
        let mut buf = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            buf.clear();
            for f in &frames {
                codec.encode(f, &mut buf).expect("encode");
            }
            black_box(buf.len());
        })
    });
    group.bench_function("decode (ServerCodec)", |b| {
        let mut codec = ServerCodec::new(DEFAULT_MAX_FRAME_BYTES);
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
        let mut enc = ClientCodec::new(DEFAULT_MAX_FRAME_BYTES);
        let mut dec = ServerCodec::new(DEFAULT_MAX_FRAME_BYTES);
        let mut buf = BytesMut::with_capacity(encoded.len());
        b.iter(|| {
            for f in &frames {
                enc.encode(f, &mut buf).expect("encode");
            }
            let mut n = 0;
            while let Some(f) = dec.decode(&mut buf).expect("decode") {
                black_box(&f);
                n += 1;
            }
            assert_eq!(n, BATCH);
        })
    });
    group.finish();
}

criterion_group!(benches, bench_delivery, bench_send);
criterion_main!(benches);
