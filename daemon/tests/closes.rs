//! Clean closes: when the server ends a connection, its last frame (`Error` or `GoAway`)
//! reaches the client whole, even while the client is still sending and has not read a thing
//! yet; and a session whose token expires ends on its own.
//!
//! The lost-frame case needs a close with unread input at the server (the kernel answers that
//! with RST, discarding whatever the server had sent but the client had not yet received). A
//! client with a tiny receive buffer that writes everything before reading anything makes the
//! server hold most of its answers unsent at the moment it closes, every time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use common::{PASSWORD, TestServer};
use messenger_protocol::client::{Trust, client_config};
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use messenger_protocol::{ErrorCode, PROTOCOL_VERSION};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A hang guard only: every read here ends long before it on a healthy server.
const HANG: Duration = Duration::from_secs(60);
/// Pings sent before the oversized frame: their answers are what the server still holds
/// unsent (the client's receive window is far smaller) when it closes.
const PINGS: u64 = 300;
/// Bytes the client keeps sending after the oversized frame's header.
const TRAILING_BYTES: usize = 64 * 1024;

/// TLS over a socket whose receive buffer is as small as the kernel allows.
async fn small_window_tls(ts: &TestServer) -> TlsStream<TcpStream> {
    let server = ts.server();
    let trust = Trust::CaFile(server.dev_ca.clone().expect("dev CA"));
    let config = client_config(&trust).expect("tls config");
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(1024).expect("SO_RCVBUF");
    let tcp = socket.connect(server.addr).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("tls")
}

fn put_frame(out: &mut BytesMut, request_id: u64, kind: Req) {
    let body = pb::ClientFrame {
        request_id,
        kind: Some(kind),
    }
    .encode_to_vec();
    out.put_u32(u32::try_from(body.len()).expect("small frame"));
    out.extend_from_slice(&body);
}

/// Hello, `PINGS` pings, the header of a frame over the limit, then more bytes.
fn abusive_stream(max_frame_bytes: usize) -> BytesMut {
    let mut out = BytesMut::new();
    put_frame(
        &mut out,
        1,
        Req::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "closes-test".into(),
        }),
    );
    for i in 0..PINGS {
        put_frame(&mut out, 2 + i, Req::Ping(pb::Ping {}));
    }
    out.put_u32(u32::try_from(max_frame_bytes + 1).expect("limit fits"));
    out.extend_from_slice(&vec![0x5a; TRAILING_BYTES]);
    out
}

/// Everything the server sent until EOF or a reset, and the read error if any.
async fn read_all(stream: &mut TlsStream<TcpStream>) -> (Vec<u8>, Option<std::io::Error>) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(HANG, stream.read(&mut chunk)).await {
            Err(_) => panic!("the server neither sent nor closed"),
            Ok(Ok(0)) => return (got, None),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return (got, Some(e)),
        }
    }
}

/// Splits length-prefixed frames; the second value counts bytes of a cut-off last frame.
fn frames(mut bytes: &[u8]) -> (Vec<pb::ServerFrame>, usize) {
    let mut out = Vec::new();
    while bytes.len() >= 4 {
        let len = (&bytes[..4]).get_u32() as usize;
        if bytes.len() < 4 + len {
            break;
        }
        out.push(pb::ServerFrame::decode(&bytes[4..4 + len]).expect("a ServerFrame"));
        bytes = &bytes[4 + len..];
    }
    (out, bytes.len())
}

/// One connection: what went wrong with its close, if anything.
async fn one_close(ts: &TestServer, max_frame_bytes: usize) -> Result<(), String> {
    let mut stream = small_window_tls(ts).await;
    // The server may close (and, before the fix, reset) while this is still being written.
    let _ = stream.write_all(&abusive_stream(max_frame_bytes)).await;
    let _ = stream.flush().await;
    let _ = stream.shutdown().await;
    let (bytes, error) = read_all(&mut stream).await;
    let (got, cut) = frames(&bytes);
    let last = got.last().and_then(|f| match &f.kind {
        Some(Resp::Error(e)) => Some((f.request_id, ErrorCode::try_from(e.code))),
        _ => None,
    });
    if last == Some((0, Ok(ErrorCode::TooLarge))) && cut == 0 {
        return Ok(());
    }
    Err(format!(
        "{} frames, {cut} bytes of a cut-off frame, read error {error:?}, last {:?}",
        got.len(),
        got.last()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_closing_error_frame_arrives_whole_while_the_client_is_still_sending() {
    const CONNECTIONS: usize = 300;
    const AT_ONCE: usize = 20;
    let ts = Arc::new(TestServer::start().await);
    let max = ts.config.limits.max_frame_bytes;
    let mut failures = Vec::new();
    for _ in 0..CONNECTIONS / AT_ONCE {
        let batch: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                let ts = Arc::clone(&ts);
                tokio::spawn(async move { one_close(&ts, max).await })
            })
            .collect();
        for task in batch {
            if let Err(e) = task.await.expect("client task") {
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} closes lost their Error frame; first: {}",
        failures.len(),
        failures[0]
    );
    if let Ok(ts) = Arc::try_unwrap(ts) {
        ts.stop().await;
    }
}

#[tokio::test]
async fn a_live_session_ends_when_its_token_expires() {
    let ts = TestServer::start_with(|c| c.sessions.ttl_secs = 2).await;
    let server = ts.server();
    let trust = Trust::CaFile(server.dev_ca.clone().expect("dev CA"));
    let tcp = TcpStream::connect(server.addr).await.expect("tcp");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = TlsConnector::from(client_config(&trust).expect("tls config"))
        .connect(name, tcp)
        .await
        .expect("tls");
    let mut out = BytesMut::new();
    put_frame(
        &mut out,
        1,
        Req::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "closes-test".into(),
        }),
    );
    put_frame(
        &mut out,
        2,
        Req::Register(pb::Register {
            username: "expiring".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        }),
    );
    put_frame(
        &mut out,
        3,
        Req::Login(pb::Login {
            username: "expiring".into(),
            password: PASSWORD.into(),
            device_name: "phone".into(),
            ..Default::default()
        }),
    );
    stream.write_all(&out).await.expect("write");
    stream.flush().await.expect("flush");
    // Nothing is sent from here on: the server alone decides the session is over.
    let (bytes, _) = read_all(&mut stream).await;
    let (got, cut) = frames(&bytes);
    assert_eq!(cut, 0, "a cut-off frame");
    assert!(
        got.iter()
            .any(|f| f.request_id == 3 && matches!(f.kind, Some(Resp::Authenticated(_)))),
        "{got:?}"
    );
    match got.last().and_then(|f| f.kind.clone()) {
        Some(Resp::Error(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthenticated as i32, "{e:?}");
            assert!(e.message.contains("expired"), "{e:?}");
        }
        other => panic!("expected an expiry error last, got {other:?}"),
    }
    ts.stop().await;
}
