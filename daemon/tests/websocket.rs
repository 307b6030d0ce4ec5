//! The WebSocket bridge on the client port: TLS with ALPN `http/1.1`, `GET /start` upgraded
//! to a WebSocket whose binary messages each carry one frame. The same session as native
//! clients: they chat with each other. Refusals: text messages, oversized messages, broken
//! WebSocket frames (close 1002/1007), foreign origins, and a peer that hangs up mid-frame
//! harms nothing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{PASSWORD, TestServer, deliveries, text};
use futures_util::{SinkExt, StreamExt};
use messenger_protocol::PROTOCOL_VERSION;
use messenger_protocol::client::{Recipient, Trust, client_config};
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

const WAIT: Duration = Duration::from_secs(10);

/// TLS to the daemon asking for HTTP, as a browser does.
async fn tls(ts: &TestServer) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let server = ts.server();
    let trust = Trust::CaFile(server.dev_ca.clone().expect("dev CA"));
    let mut config = (*client_config(&trust).expect("tls config")).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(server.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

type Ws = WebSocketStream<TlsStream<TcpStream>>;

async fn ws(ts: &TestServer, origin: Option<&str>) -> Result<Ws, tungstenite::Error> {
    let url = format!("wss://localhost:{}/start", ts.server().addr.port());
    let mut request = url.into_client_request()?;
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("origin header"));
    }
    let stream = tls(ts).await.expect("tls");
    let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    Ok(ws)
}

async fn send(ws: &mut Ws, request_id: u64, kind: Req) {
    let frame = pb::ClientFrame {
        request_id,
        kind: Some(kind),
    };
    ws.send(Message::Binary(frame.encode_to_vec().into()))
        .await
        .expect("send");
}

/// The next frame; panics on close or timeout.
async fn recv(ws: &mut Ws) -> pb::ServerFrame {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("connection open")
            .expect("no error");
        match message {
            Message::Binary(b) => return pb::ServerFrame::decode(b).expect("a ServerFrame"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

/// Reads until the server closes; returns its close code and reason.
async fn closed(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a close in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => {
                return (frame.code, frame.reason.to_string());
            }
            Some(Ok(Message::Close(None))) | None => return (CloseCode::Status, String::new()),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("error instead of a close frame: {e}"),
        }
    }
}

async fn hello(ws: &mut Ws) {
    send(
        ws,
        1,
        Req::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "websocket-test".into(),
        }),
    )
    .await;
    let f = recv(ws).await;
    assert!(matches!(f.kind, Some(Resp::HelloOk(_))), "{f:?}");
}

#[tokio::test]
async fn a_browser_session_chats_with_a_native_one_over_the_same_hub() {
    let ts = TestServer::start().await;
    let (mut native, native_user) = ts.user("nina").await;
    let mut ws = ws(&ts, None).await.expect("upgrade");
    hello(&mut ws).await;
    send(
        &mut ws,
        2,
        Req::Register(pb::Register {
            username: "wendy".into(),
            password: PASSWORD.into(),
            display_name: "Wendy".into(),
        }),
    )
    .await;
    let registered = recv(&mut ws).await;
    let wendy = match registered.kind {
        Some(Resp::Registered(r)) => r.user.expect("user").user_id,
        other => panic!("not registered: {other:?}"),
    };
    send(
        &mut ws,
        3,
        Req::Login(pb::Login {
            username: "wendy".into(),
            password: PASSWORD.into(),
            device_name: "browser".into(),
            ..Default::default()
        }),
    )
    .await;
    let f = recv(&mut ws).await;
    assert_eq!(f.request_id, 3);
    assert!(matches!(f.kind, Some(Resp::Authenticated(_))), "{f:?}");

    native
        .conn()
        .send_text(Recipient::User(wendy), "hi from the terminal")
        .await
        .expect("send");
    let delivery = recv(&mut ws).await;
    match delivery.kind {
        Some(Resp::Delivery(d)) => {
            let m = d.message.expect("message");
            assert_eq!(m.body, b"hi from the terminal".as_slice());
            assert_eq!(m.sender.expect("sender").username, "nina");
        }
        other => panic!("expected a delivery: {other:?}"),
    }
    send(
        &mut ws,
        4,
        Req::Send(pb::SendMessage {
            to: Some(pb::send_message::To::UserId(native_user.user_id)),
            client_msg_id: "w-1".into(),
            body: b"hi from the browser".to_vec().into(),
            content_type: "text/plain".into(),
        }),
    )
    .await;
    // The answer to the send, possibly after the sender's own copy of it.
    let mut sent = false;
    for _ in 0..2 {
        let f = recv(&mut ws).await;
        if f.request_id == 4 {
            assert!(matches!(f.kind, Some(Resp::Sent(_))), "{f:?}");
            sent = true;
        }
    }
    assert!(sent, "no Sent for the browser's message");
    let got = deliveries(&mut native, 2).await;
    assert!(got.iter().any(|d| text(d) == "hi from the browser"));
    ts.stop().await;
}

#[tokio::test]
async fn a_text_message_is_refused_with_a_clear_close_reason() {
    let ts = TestServer::start().await;
    let mut ws = ws(&ts, None).await.expect("upgrade");
    ws.send(Message::text("{\"hello\": 1}"))
        .await
        .expect("send");
    let (code, reason) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Unsupported);
    assert!(reason.contains("binary"), "{reason}");
    ts.stop().await;
}

#[tokio::test]
async fn an_oversized_message_is_refused_with_close_1009() {
    let ts = TestServer::start_with(|c| {
        c.limits.max_body_bytes = 1024;
        c.limits.max_frame_bytes = 8 * 1024;
    })
    .await;
    let mut ws = ws(&ts, None).await.expect("upgrade");
    hello(&mut ws).await;
    ws.send(Message::Binary(vec![0u8; 64 * 1024].into()))
        .await
        .expect("send");
    // The session says why in a frame first, as for native clients, then closes.
    let error = recv(&mut ws).await;
    match error.kind {
        Some(Resp::Error(e)) => assert_eq!(e.code, messenger_protocol::ErrorCode::TooLarge as i32),
        other => panic!("expected an error: {other:?}"),
    }
    let (code, _) = closed(&mut ws).await;
    assert_eq!(code, CloseCode::Size);
    ts.stop().await;
}

#[tokio::test]
async fn pages_from_a_foreign_origin_cannot_open_the_socket() {
    let ts = TestServer::start_with(|c| {
        c.web.allowed_origins = vec!["https://chat.example.com".into()];
    })
    .await;
    match ws(&ts, Some("https://evil.example")).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a foreign origin was let in"),
    }
    let own = format!("https://localhost:{}", ts.server().addr.port());
    let mut ws_own = ws(&ts, Some(&own)).await.expect("own origin");
    hello(&mut ws_own).await;
    let mut ws_listed = ws(&ts, Some("https://chat.example.com"))
        .await
        .expect("listed");
    hello(&mut ws_listed).await;
    ts.stop().await;
}

#[tokio::test]
async fn a_peer_hanging_up_mid_frame_harms_nothing() {
    let ts = TestServer::start().await;
    let mut stream = tls(&ts).await.expect("tls");
    let port = ts.server().addr.port();
    stream
        .write_all(
            format!(
                "GET /start HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, stream.read(&mut head))
        .await
        .expect("answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    // A masked binary frame announcing 100 bytes, of which 10 arrive before the hang-up.
    let mut partial = vec![0x82, 0x80 | 100, 1, 2, 3, 4];
    partial.extend_from_slice(&[0u8; 10]);
    stream.write_all(&partial).await.expect("write");
    drop(stream);
    // The server still serves everyone else.
    let mut ws = ws(&ts, None).await.expect("upgrade");
    hello(&mut ws).await;
    ts.stop().await;
}

/// A TLS connection upgraded to a WebSocket by hand, for sending frames no library would.
async fn raw_upgrade(ts: &TestServer) -> TlsStream<TcpStream> {
    let mut stream = tls(ts).await.expect("tls");
    let port = ts.server().addr.port();
    stream
        .write_all(
            format!(
                "GET /start HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    // The 101 answer has no body; read exactly its head so no WebSocket byte is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tokio::time::timeout(WAIT, stream.read_exact(&mut byte))
            .await
            .expect("answer in time")
            .expect("read");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// Sends `frame` raw after the upgrade; returns the server's close code and reason.
async fn close_after_raw(ts: &TestServer, frame: &[u8]) -> (CloseCode, String) {
    let mut stream = raw_upgrade(ts).await;
    stream.write_all(frame).await.expect("write");
    stream.flush().await.expect("flush");
    let mut ws =
        WebSocketStream::from_raw_socket(stream, tungstenite::protocol::Role::Client, None).await;
    closed(&mut ws).await
}

#[tokio::test]
async fn websocket_protocol_errors_close_with_1002_and_bad_utf8_with_1007() {
    let ts = TestServer::start().await;
    // Masked frames use the all-zero mask, so their payload bytes stay readable here.
    let cases: [(&str, &[u8], CloseCode); 5] = [
        // A client frame must be masked (RFC 6455 §5.1).
        ("unmasked", &[0x82, 0x02, 0xaa, 0xbb], CloseCode::Protocol),
        (
            "reserved opcode",
            &[0x83, 0x80, 0, 0, 0, 0],
            CloseCode::Protocol,
        ),
        (
            "continuation without a start",
            &[0x80, 0x80, 0, 0, 0, 0],
            CloseCode::Protocol,
        ),
        (
            "reserved bit",
            &[0xc2, 0x80, 0, 0, 0, 0],
            CloseCode::Protocol,
        ),
        (
            "close reason not UTF-8",
            &[0x88, 0x84, 0, 0, 0, 0, 0x03, 0xe8, 0xff, 0xfe],
            CloseCode::Invalid,
        ),
    ];
    for (what, frame, want) in cases {
        let (code, reason) = close_after_raw(&ts, frame).await;
        assert_eq!(code, want, "{what}: {reason}");
    }
    // Still serving everyone else.
    let mut ws = ws(&ts, None).await.expect("upgrade");
    hello(&mut ws).await;
    ts.stop().await;
}

/// A plain HTTPS request on the client port, answered in full.
async fn http(ts: &TestServer, request: &str) -> String {
    let mut stream = tls(ts).await.expect("tls");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http_answers_carry_a_strict_policy_and_refuse_what_they_should() {
    let ts = TestServer::start().await;
    let missing = http(
        &ts,
        "GET /no-such-file.js HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let lower = missing.to_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'none'"),
        "{missing}"
    );
    assert!(
        lower.contains("x-content-type-options: nosniff"),
        "{missing}"
    );
    assert!(
        lower.contains("strict-transport-security: max-age=31536000\r\n"),
        "{missing}"
    );
    let page = http(
        &ts,
        "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase()
            .contains("strict-transport-security: max-age=31536000\r\n"),
        "{page}"
    );
    let post = http(
        &ts,
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let not_upgraded = http(
        &ts,
        "GET /start HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(not_upgraded.starts_with("HTTP/1.1 426"), "{not_upgraded}");
    ts.stop().await;
}

#[tokio::test]
async fn with_the_bridge_turned_off_browsers_get_no_connection() {
    let ts = TestServer::start_with(|c| c.web.enabled = false).await;
    assert!(tls(&ts).await.is_err(), "http/1.1 was negotiated");
    // Native clients are unaffected.
    let (_c, _) = ts.user("native").await;
    ts.stop().await;
}
