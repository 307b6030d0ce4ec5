//! Bad input on the wire: oversized, malformed, truncated and out-of-order frames, unknown
//! fields, spoofing attempts. Each gets a clear error (and a close where the stream cannot be
//! trusted), never a crash, and never affects other users.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::{TestServer, code, deliveries, text};
use messenger_protocol::client::{Recipient, Trust, client_config};
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use messenger_protocol::{ErrorCode, PROTOCOL_VERSION};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A raw TLS connection speaking bytes, for sending what the SDK never would.
struct Raw {
    stream: TlsStream<TcpStream>,
    buf: BytesMut,
}

impl Raw {
    async fn connect_with(ts: &TestServer, alpn: Option<&[u8]>) -> Raw {
        let server = ts.server();
        let trust = Trust::CaFile(server.dev_ca.clone().expect("dev CA"));
        let mut config = (*client_config(&trust).expect("tls config")).clone();
        config.alpn_protocols = alpn.map(|a| vec![a.to_vec()]).unwrap_or_default();
        let tcp = TcpStream::connect(server.addr).await.expect("tcp");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("tls");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    async fn connect(ts: &TestServer) -> Raw {
        Self::connect_with(ts, Some(messenger_protocol::ALPN)).await
    }

    async fn write(&mut self, bytes: &[u8]) {
        // The server may already have closed; a failed write is then expected.
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    async fn send(&mut self, frame: &pb::ClientFrame) {
        let body = frame.encode_to_vec();
        let mut out = BytesMut::new();
        out.put_u32(body.len() as u32);
        out.extend_from_slice(&body);
        self.write(&out).await;
    }

    async fn hello(&mut self) {
        self.send(&frame(
            1,
            Req::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                client: "raw-test".into(),
            }),
        ))
        .await;
        match self.recv().await {
            Some(f) => assert!(matches!(f.kind, Some(Resp::HelloOk(_))), "{f:?}"),
            None => panic!("no HelloOk"),
        }
    }

    /// The next frame, or None at EOF / error / timeout.
    async fn recv(&mut self) -> Option<pb::ServerFrame> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if self.buf.len() >= 4 + len {
                    let _ = self.buf.split_to(4);
                    let body = self.buf.split_to(len);
                    return pb::ServerFrame::decode(body.freeze()).ok();
                }
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads until EOF; true if the server closed within the timeout.
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

fn frame(request_id: u64, kind: Req) -> pb::ClientFrame {
    pb::ClientFrame {
        request_id,
        kind: Some(kind),
    }
}

fn error_code(f: &pb::ServerFrame) -> Option<ErrorCode> {
    match &f.kind {
        Some(Resp::Error(e)) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

/// Users keep chatting while someone else misbehaves.
async fn others_still_chat(ts: &TestServer) {
    let (alice, _) = ts.user(&format!("a{}", rand_suffix())).await;
    let (mut bob, bob_user) = ts.user(&format!("b{}", rand_suffix())).await;
    alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "still fine")
        .await
        .expect("send");
    assert_eq!(text(&deliveries(&mut bob, 1).await[0]), "still fine");
}

fn rand_suffix() -> String {
    messenger_protocol::client::new_client_msg_id()[..8].to_string()
}

#[tokio::test]
async fn an_oversized_frame_gets_an_error_then_a_close() {
    let ts = TestServer::start().await;
    let mut raw = Raw::connect(&ts).await;
    raw.hello().await;
    let too_big = ts.config.limits.max_frame_bytes as u32 + 1;
    raw.write(&too_big.to_be_bytes()).await;
    let f = raw.recv().await.expect("error frame");
    assert_eq!(error_code(&f), Some(ErrorCode::TooLarge));
    assert_eq!(f.request_id, 0);
    assert!(raw.closed().await);
    others_still_chat(&ts).await;
    ts.stop().await;
}

#[tokio::test]
async fn random_bytes_are_refused_without_harm() {
    let ts = TestServer::start().await;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..20 {
        let mut raw = Raw::connect(&ts).await;
        if round % 2 == 1 {
            raw.hello().await;
        }
        let mut junk = vec![0u8; 1 + (round * 37) % 300];
        for b in junk.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        // A plausible small length so the junk is parsed as protobuf, not refused as too large.
        let mut framed = BytesMut::new();
        framed.put_u32(junk.len() as u32);
        framed.extend_from_slice(&junk);
        raw.write(&framed).await;
        if let Some(f) = raw.recv().await {
            // Junk may happen to decode as a valid frame; anything else must be a typed error.
            if let Some(code) = error_code(&f) {
                assert!(
                    matches!(
                        code,
                        ErrorCode::InvalidArgument | ErrorCode::Unauthenticated
                    ),
                    "{code:?}"
                );
            }
        }
    }
    others_still_chat(&ts).await;
    ts.stop().await;
}

#[tokio::test]
async fn a_truncated_frame_then_a_hang_up_leaves_the_server_serving() {
    let ts = TestServer::start().await;
    for cut in [1usize, 3, 4, 10] {
        let mut raw = Raw::connect(&ts).await;
        raw.hello().await;
        let body = frame(5, Req::Ping(pb::Ping {})).encode_to_vec();
        let mut full = BytesMut::new();
        full.put_u32(body.len() as u32 + 50); // promises more than it sends
        full.extend_from_slice(&body);
        raw.write(&full[..cut.min(full.len())]).await;
        drop(raw);
    }
    others_still_chat(&ts).await;
    ts.stop().await;
}

#[tokio::test]
async fn unknown_fields_are_ignored_and_cannot_spoof_the_sender() {
    let ts = TestServer::start().await;
    let (_alice, alice_user) = ts.user("alice").await;
    let (mut bob, bob_user) = ts.user("bob").await;
    let (mallory, mallory_user) = ts.user("mallory").await;
    let token = mallory.session().expect("session").session_token.clone();

    let mut raw = Raw::connect(&ts).await;
    raw.hello().await;
    raw.send(&frame(
        2,
        Req::Resume(pb::Resume {
            session_token: token,
        }),
    ))
    .await;
    assert!(matches!(
        raw.recv().await.and_then(|f| f.kind),
        Some(Resp::Authenticated(_))
    ));

    // A SendMessage followed by fields the schema does not have: field 99 (a User claiming to
    // be alice) inside SendMessage and field 500 in the frame itself.
    let send = pb::SendMessage {
        to: Some(pb::send_message::To::UserId(bob_user.user_id)),
        client_msg_id: "spoof-1".into(),
        body: bytes::Bytes::from_static(b"I am alice, honest"),
        content_type: String::new(),
    };
    let mut send_bytes = send.encode_to_vec();
    let fake_sender = pb::User {
        user_id: alice_user.user_id,
        username: "alice".into(),
        display_name: "alice display".into(),
    }
    .encode_to_vec();
    prost::encoding::encode_key(
        99,
        prost::encoding::WireType::LengthDelimited,
        &mut send_bytes,
    );
    prost::encoding::encode_varint(fake_sender.len() as u64, &mut send_bytes);
    send_bytes.extend_from_slice(&fake_sender);
    let mut frame_bytes = Vec::new();
    prost::encoding::uint64::encode(1, &3u64, &mut frame_bytes);
    prost::encoding::encode_key(
        11,
        prost::encoding::WireType::LengthDelimited,
        &mut frame_bytes,
    );
    prost::encoding::encode_varint(send_bytes.len() as u64, &mut frame_bytes);
    frame_bytes.extend_from_slice(&send_bytes);
    prost::encoding::uint64::encode(500, &12345u64, &mut frame_bytes);
    let mut wire = BytesMut::new();
    wire.put_u32(frame_bytes.len() as u32);
    wire.extend_from_slice(&frame_bytes);
    raw.write(&wire).await;
    loop {
        let f = raw.recv().await.expect("response");
        if f.request_id == 3 {
            assert!(matches!(f.kind, Some(Resp::Sent(_))), "{f:?}");
            break;
        }
    }
    let d = deliveries(&mut bob, 1).await;
    let sender = d[0]
        .message
        .as_ref()
        .and_then(|m| m.sender.clone())
        .expect("sender");
    assert_eq!(
        sender.user_id, mallory_user.user_id,
        "the server stamps the real sender"
    );
    assert_eq!(sender.username, "mallory");
    ts.stop().await;
}

#[tokio::test]
async fn the_first_frame_must_be_a_supported_hello() {
    let ts = TestServer::start().await;
    let mut raw = Raw::connect(&ts).await;
    raw.send(&frame(1, Req::Ping(pb::Ping {}))).await;
    let f = raw.recv().await.expect("error");
    assert_eq!(error_code(&f), Some(ErrorCode::InvalidArgument));
    assert!(raw.closed().await);

    let mut raw = Raw::connect(&ts).await;
    raw.send(&frame(
        1,
        Req::Hello(pb::Hello {
            protocol_version: 99,
            client: "future".into(),
        }),
    ))
    .await;
    let f = raw.recv().await.expect("error");
    assert_eq!(error_code(&f), Some(ErrorCode::UnsupportedVersion));
    assert_eq!(f.request_id, 1);
    assert!(raw.closed().await);
    ts.stop().await;
}

#[tokio::test]
async fn a_frame_without_a_request_is_an_error_but_the_connection_lives() {
    let ts = TestServer::start().await;
    let mut raw = Raw::connect(&ts).await;
    raw.hello().await;
    raw.send(&pb::ClientFrame {
        request_id: 7,
        kind: None,
    })
    .await;
    let f = raw.recv().await.expect("error");
    assert_eq!(f.request_id, 7);
    assert_eq!(error_code(&f), Some(ErrorCode::InvalidArgument));
    raw.send(&frame(8, Req::Ping(pb::Ping {}))).await;
    let f = raw.recv().await.expect("pong");
    assert!(matches!(f.kind, Some(Resp::Pong(_))));
    // Requests that need a session are refused, not crashed on.
    raw.send(&frame(9, Req::ListGroups(pb::ListGroups {})))
        .await;
    let f = raw.recv().await.expect("error");
    assert_eq!(error_code(&f), Some(ErrorCode::Unauthenticated));
    ts.stop().await;
}

#[tokio::test]
async fn a_connection_without_the_messenger_alpn_is_closed() {
    let ts = TestServer::start().await;
    let mut raw = Raw::connect_with(&ts, None).await;
    raw.send(&frame(
        1,
        Req::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "no-alpn".into(),
        }),
    ))
    .await;
    assert!(raw.recv().await.is_none(), "no HelloOk without ALPN");
    ts.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_a_silent_one_never_authenticates() {
    let ts = TestServer::start_with(|c| {
        c.timeouts.idle_secs = 1;
        c.timeouts.auth_secs = 1;
    })
    .await;
    let mut raw = Raw::connect(&ts).await;
    raw.hello().await;
    let f = raw.recv().await.expect("timeout error");
    assert_eq!(error_code(&f), Some(ErrorCode::Unauthenticated));
    assert!(raw.closed().await);
    // A client that does not know the SDK's pings: the SDK pings by itself.
    let err = ts.client().await.conn().ping().await;
    assert!(err.is_ok());
    let _ = code;
    ts.stop().await;
}
