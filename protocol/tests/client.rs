//! The client SDK against a tiny in-process fake server (tokio-rustls, rcgen certificate,
//! ALPN messenger/1) that plays scripted conversations.
#![cfg(feature = "client")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use messenger_protocol::client::{
    Client, ClientError, ConnectOptions, Connection, Event, Recipient, Trust,
    certificate_fingerprint,
};
use messenger_protocol::codec::ServerCodec;
use messenger_protocol::pb::{self, client_frame, server_frame};
use messenger_protocol::{ALPN, ErrorCode, PROTOCOL_VERSION};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

type ServerConn = Framed<tokio_rustls::server::TlsStream<TcpStream>, ServerCodec>;

const WAIT: Duration = Duration::from_secs(5);

struct Identity {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_der: Vec<u8>,
}

fn self_signed(name: &str) -> Identity {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("rcgen");
    Identity {
        cert_der: ck.cert.der().clone(),
        cert_pem: ck.cert.pem(),
        key_der: ck.signing_key.serialize_der(),
    }
}

/// A CA and a leaf for `name` signed by it: (CA PEM, leaf identity).
fn ca_and_leaf(name: &str) -> (String, Identity) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Messenger test CA");
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_params = CertificateParams::new(vec![name.to_string()]).expect("params");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf");
    (
        ca_cert.pem(),
        Identity {
            cert_der: leaf.der().clone(),
            cert_pem: leaf.pem(),
            key_der: leaf_key.serialize_der(),
        },
    )
}

fn acceptor(id: &Identity) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![id.cert_der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der.clone())),
        )
        .expect("server config");
    config.alpn_protocols = vec![ALPN.to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

/// Listens on 127.0.0.1 and runs `script` on the server side of each of `n` connections,
/// one after the other. The returned handle yields the script's panics, if any.
async fn serve<F, Fut>(id: &Identity, n: usize, mut script: F) -> (SocketAddr, JoinHandle<()>)
where
    F: FnMut(usize, ServerConn) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = acceptor(id);
    let task = tokio::spawn(async move {
        for i in 0..n {
            let (tcp, _) = listener.accept().await.expect("accept");
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue; // a refused handshake is part of some tests
            };
            script(i, Framed::new(tls, ServerCodec::new(64 * 1024))).await;
        }
    });
    (addr, task)
}

async fn recv(conn: &mut ServerConn) -> pb::ClientFrame {
    tokio::time::timeout(WAIT, conn.next())
        .await
        .expect("client frame in time")
        .expect("client frame")
        .expect("decodable client frame")
}

async fn send(conn: &mut ServerConn, request_id: u64, kind: server_frame::Kind) {
    conn.send(pb::ServerFrame {
        request_id,
        kind: Some(kind),
    })
    .await
    .expect("server send");
}

fn limits() -> pb::Limits {
    pb::Limits {
        max_frame_bytes: 4096,
        max_body_bytes: 2048,
        max_group_members: 100,
        max_history_page: 50,
        idle_timeout_ms: 60_000,
        max_conversation_page: 20,
    }
}

/// Reads Hello and answers HelloOk.
async fn hello(conn: &mut ServerConn) {
    let frame = recv(conn).await;
    match frame.kind {
        Some(client_frame::Kind::Hello(h)) => {
            assert_eq!(h.protocol_version, PROTOCOL_VERSION);
            assert!(!h.client.is_empty());
        }
        other => panic!("expected Hello, got {other:?}"),
    }
    assert_ne!(frame.request_id, 0);
    let ok = pb::HelloOk {
        protocol_version: PROTOCOL_VERSION,
        server: "fake-messengerd/0".into(),
        limits: Some(limits()),
        node: "fake-node-2".into(),
    };
    send(conn, frame.request_id, server_frame::Kind::HelloOk(ok)).await;
}

fn delivery(seq: u64) -> server_frame::Kind {
    server_frame::Kind::Delivery(pb::Delivery {
        seq,
        message: Some(pb::Message {
            message_id: 100 + seq,
            sender: Some(pb::User {
                user_id: 2,
                username: "bob".into(),
                display_name: "Bob".into(),
            }),
            to: Some(pb::message::To::UserId(1)),
            client_msg_id: format!("m{seq}"),
            body: Bytes::from(format!("hello {seq}")),
            content_type: "text/plain".into(),
            server_time_ms: 1_700_000_000_000,
        }),
    })
}

fn authenticated(token: &[u8], acked_seq: u64) -> server_frame::Kind {
    server_frame::Kind::Authenticated(pb::Authenticated {
        user: Some(pb::User {
            user_id: 1,
            username: "alice".into(),
            display_name: "Alice".into(),
        }),
        session_token: Bytes::copy_from_slice(token),
        device_id: 7,
        expires_at_ms: i64::MAX,
        acked_seq,
        login_cookie: Bytes::new(),
        settings: None,
    })
}

fn options(addr: SocketAddr, trust: Trust) -> ConnectOptions {
    let mut opts = ConnectOptions::new(addr.to_string(), trust);
    opts.server_name = Some("localhost".into());
    opts.connect_timeout = WAIT;
    opts.request_timeout = WAIT;
    opts.ping_interval = Duration::ZERO;
    opts
}

fn seq_of(event: Option<Event>) -> u64 {
    match event {
        Some(Event::Delivery(d)) => d.seq,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_ping_and_a_repeated_seq_is_returned_once() {
    let id = self_signed("localhost");
    let (addr, server) = serve(&id, 1, |_, mut conn| async move {
        hello(&mut conn).await;
        let ping = recv(&mut conn).await;
        assert!(matches!(ping.kind, Some(client_frame::Kind::Ping(_))));
        send(
            &mut conn,
            ping.request_id,
            server_frame::Kind::Pong(pb::Pong {}),
        )
        .await;
        send(&mut conn, 0, delivery(1)).await;
        send(&mut conn, 0, delivery(1)).await;
        send(&mut conn, 0, delivery(2)).await;
        let go_away = pb::GoAway {
            reason: "restarting".into(),
            reconnect_after_ms: 250,
            code: 0,
        };
        send(&mut conn, 0, server_frame::Kind::GoAway(go_away)).await;
        let _ = SinkExt::<pb::ServerFrame>::close(&mut conn).await;
    })
    .await;

    let mut client = Client::connect(options(addr, Trust::CaPem(id.cert_pem.into_bytes())))
        .await
        .expect("connect");
    assert_eq!(client.conn().limits(), &limits());
    assert_eq!(client.conn().server(), "fake-messengerd/0");
    assert_eq!(client.conn().server_node(), "fake-node-2");
    client.conn().ping().await.expect("ping");

    assert_eq!(seq_of(client.next_event().await), 1);
    assert_eq!(
        seq_of(client.next_event().await),
        2,
        "the repeated seq 1 is dropped"
    );
    assert_eq!(client.last_seen_seq(), 2);
    match client.next_event().await {
        Some(Event::GoAway(g)) => assert_eq!(g.reconnect_after_ms, 250),
        other => panic!("expected GoAway, got {other:?}"),
    }
    assert_eq!(
        client.last_go_away().map(|g| g.reason.as_str()),
        Some("restarting")
    );
    match client.next_event().await {
        Some(Event::Closed { reason }) => assert!(reason.contains("restarting"), "{reason}"),
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(client.next_event().await.is_none());
    assert!(matches!(
        client.conn().ping().await,
        Err(ClientError::Closed(_))
    ));
    server.await.expect("server script");
}

#[tokio::test]
async fn a_wrong_pinned_fingerprint_fails_the_handshake() {
    let id = self_signed("localhost");
    let mut wrong = certificate_fingerprint(&id.cert_der);
    wrong[0] ^= 1;
    let (addr, server) = serve(&id, 1, |_, _conn| async move {
        panic!("the handshake must not succeed");
    })
    .await;
    match Connection::connect(&options(addr, Trust::Fingerprint(wrong))).await {
        Err(ClientError::Tls(msg)) => assert!(msg.contains("fingerprint"), "{msg}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    server.await.expect("server");
}

#[tokio::test]
async fn the_right_pinned_fingerprint_connects_whatever_the_name() {
    let id = self_signed("localhost");
    let pin = certificate_fingerprint(&id.cert_der);
    let (addr, server) = serve(&id, 1, |_, mut conn| async move {
        hello(&mut conn).await;
        let _ = recv_until_eof(&mut conn).await;
    })
    .await;
    let mut opts = options(addr, Trust::Fingerprint(pin));
    opts.server_name = None; // an IP address the certificate does not name
    let (conn, _events) = Connection::connect(&opts).await.expect("connect");
    conn.close().await;
    server.await.expect("server");
}

async fn recv_until_eof(conn: &mut ServerConn) -> Vec<pb::ClientFrame> {
    let mut frames = Vec::new();
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT, conn.next()).await {
        frames.push(frame);
    }
    frames
}

#[tokio::test]
async fn a_ca_verifies_the_chain_and_the_name() {
    let (ca_pem, leaf) = ca_and_leaf("localhost");
    let (addr, server) = serve(&leaf, 3, |i, mut conn| async move {
        assert_eq!(i, 0, "only the first client may complete the handshake");
        hello(&mut conn).await;
        let _ = recv_until_eof(&mut conn).await;
    })
    .await;

    let trust = Trust::CaPem(ca_pem.into_bytes());
    let (conn, _events) = Connection::connect(&options(addr, trust.clone()))
        .await
        .expect("a leaf signed by the CA, for the right name");
    conn.close().await;

    let mut wrong_name = options(addr, trust);
    wrong_name.server_name = Some("elsewhere.example".into());
    assert!(matches!(
        Connection::connect(&wrong_name).await,
        Err(ClientError::Tls(_))
    ));

    let other_ca = self_signed("localhost");
    assert!(matches!(
        Connection::connect(&options(addr, Trust::CaPem(other_ca.cert_pem.into_bytes()))).await,
        Err(ClientError::Tls(_))
    ));
    server.await.expect("server");
}

#[tokio::test]
async fn errors_unexpected_answers_timeouts_and_size_limits() {
    let id = self_signed("localhost");
    let (addr, server) = serve(&id, 1, |_, mut conn| async move {
        hello(&mut conn).await;
        // LookupUser → Error
        let f = recv(&mut conn).await;
        let err = pb::Error {
            code: ErrorCode::NotFound as i32,
            message: "no such user".into(),
            retry_after_ms: 0,
        };
        send(&mut conn, f.request_id, server_frame::Kind::Error(err)).await;
        // GetGroup → Pong (wrong variant)
        let f = recv(&mut conn).await;
        send(
            &mut conn,
            f.request_id,
            server_frame::Kind::Pong(pb::Pong {}),
        )
        .await;
        // ListGroups → no answer (times out); then an Ack, then a Ping that waits for EOF.
        let f = recv(&mut conn).await;
        assert!(matches!(f.kind, Some(client_frame::Kind::ListGroups(_))));
        let f = recv(&mut conn).await;
        assert_eq!(f.request_id, 0);
        assert!(matches!(
            f.kind,
            Some(client_frame::Kind::Ack(pb::Ack { up_to_seq: 42 }))
        ));
        let f = recv(&mut conn).await;
        assert!(matches!(f.kind, Some(client_frame::Kind::Ping(_))));
        // Close without answering: the waiting ping fails with Closed.
    })
    .await;

    let mut opts = options(addr, Trust::CaPem(id.cert_pem.into_bytes()));
    opts.request_timeout = Duration::from_millis(300);
    let (conn, mut events) = Connection::connect(&opts).await.expect("connect");

    match conn.lookup_user_by_name("nobody").await {
        Err(ClientError::Wire(e)) => {
            assert_eq!(e.code, ErrorCode::NotFound);
            assert_eq!(e.message, "no such user");
        }
        other => panic!("expected a wire error, got {other:?}"),
    }
    assert!(matches!(
        conn.get_group(5).await,
        Err(ClientError::Protocol(_))
    ));
    assert!(matches!(
        conn.list_groups().await,
        Err(ClientError::Timeout)
    ));
    // Above the server's max_frame_bytes (4096): refused before anything is sent.
    let big = Bytes::from(vec![b'x'; 5000]);
    assert!(matches!(
        conn.send_message(Recipient::User(2), "big", big, "text/plain")
            .await,
        Err(ClientError::Codec(
            messenger_protocol::CodecError::TooLarge { .. }
        ))
    ));
    conn.ack(42).await.expect("ack");
    match conn.ping().await {
        Err(ClientError::Closed(reason)) => assert!(reason.contains("closed"), "{reason}"),
        other => panic!("expected Closed, got {other:?}"),
    }
    match tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event")
    {
        Some(Event::Closed { .. }) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(events.recv().await.is_none());
    assert!(conn.is_closed());
    server.await.expect("server");
}

#[tokio::test]
async fn an_error_instead_of_hello_ok_is_a_wire_error() {
    let id = self_signed("localhost");
    let (addr, server) = serve(&id, 1, |_, mut conn| async move {
        let f = recv(&mut conn).await;
        let err = pb::Error {
            code: ErrorCode::UnsupportedVersion as i32,
            message: "speak version 2".into(),
            retry_after_ms: 0,
        };
        send(&mut conn, f.request_id, server_frame::Kind::Error(err)).await;
    })
    .await;
    match Connection::connect(&options(addr, Trust::CaPem(id.cert_pem.into_bytes()))).await {
        Err(ClientError::Wire(e)) => assert_eq!(e.code, ErrorCode::UnsupportedVersion),
        other => panic!("expected a wire error, got {other:?}"),
    }
    server.await.expect("server");
}

#[tokio::test]
async fn reconnect_resumes_and_the_replay_is_deduplicated() {
    let id = self_signed("localhost");
    let (addr, server) = serve(&id, 2, |i, mut conn| async move {
        hello(&mut conn).await;
        let f = recv(&mut conn).await;
        if i == 0 {
            match f.kind {
                Some(client_frame::Kind::Login(l)) => {
                    assert_eq!(
                        (l.username.as_str(), l.device_name.as_str()),
                        ("alice", "laptop")
                    );
                }
                other => panic!("expected Login, got {other:?}"),
            }
            send(&mut conn, f.request_id, authenticated(b"token-1", 0)).await;
            send(&mut conn, 0, delivery(1)).await;
            send(&mut conn, 0, delivery(2)).await;
            // Drop the connection without a goodbye.
        } else {
            match f.kind {
                Some(client_frame::Kind::Resume(r)) => assert_eq!(&r.session_token[..], b"token-1"),
                other => panic!("expected Resume, got {other:?}"),
            }
            // Nothing was acked: the server replays from the cursor, then a new entry.
            send(&mut conn, f.request_id, authenticated(b"token-2", 0)).await;
            for seq in 1..=3 {
                send(&mut conn, 0, delivery(seq)).await;
            }
            let ack = recv(&mut conn).await;
            assert_eq!(ack.request_id, 0);
            assert!(matches!(
                ack.kind,
                Some(client_frame::Kind::Ack(pb::Ack { up_to_seq: 3 }))
            ));
            let _ = recv_until_eof(&mut conn).await;
        }
    })
    .await;

    let mut client = Client::connect(options(addr, Trust::CaPem(id.cert_pem.into_bytes())))
        .await
        .expect("connect");
    assert!(client.session().is_none());
    let auth = client.login("alice", "pw", "laptop").await.expect("login");
    assert_eq!(auth.device_id, 7);
    assert_eq!(client.user().map(|u| u.user_id), Some(1));
    assert_eq!(seq_of(client.next_event().await), 1);
    assert_eq!(seq_of(client.next_event().await), 2);
    assert!(matches!(
        client.next_event().await,
        Some(Event::Closed { .. })
    ));

    client.reconnect_with_backoff(3).await.expect("reconnect");
    assert_eq!(
        client.session().map(|s| &s.session_token[..]),
        Some(&b"token-2"[..])
    );
    let d = client.next_delivery(WAIT).await.expect("delivery");
    assert_eq!(
        d.seq, 3,
        "seqs 1 and 2 were already returned before the reconnect"
    );
    assert_eq!(client.last_seen_seq(), 3);
    client.ack_seen().await.expect("ack");
    client.close().await;
    assert!(matches!(
        client.next_delivery(WAIT).await,
        Err(ClientError::Closed(_))
    ));
    server.await.expect("server");
}

#[tokio::test]
async fn frames_split_across_reads_and_larger_than_a_tls_record_arrive_whole() {
    let id = self_signed("localhost");
    let (addr, server) = serve(&id, 1, |_, mut conn| async move {
        use tokio::io::AsyncWriteExt;
        use tokio_util::codec::Encoder;
        hello(&mut conn).await;
        let mut bytes = bytes::BytesMut::new();
        let mut codec = ServerCodec::new(64 * 1024);
        let mut big = delivery(1);
        if let server_frame::Kind::Delivery(d) = &mut big
            && let Some(m) = d.message.as_mut()
        {
            m.body = Bytes::from(vec![b'z'; 40_000]);
        }
        for kind in [delivery(1), big, delivery(2)] {
            let frame = pb::ServerFrame {
                request_id: 0,
                kind: Some(kind),
            };
            codec.encode(frame, &mut bytes).expect("encode");
        }
        // The first frame a few bytes per TLS record, the rest in one write.
        let io = conn.get_mut();
        let first_len = 20;
        for chunk in bytes[..first_len].chunks(3) {
            io.write_all(chunk).await.expect("write");
            io.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        io.write_all(&bytes[first_len..]).await.expect("write");
        io.flush().await.expect("flush");
        let _ = recv_until_eof(&mut conn).await;
    })
    .await;
    let mut client = Client::connect(options(addr, Trust::CaPem(id.cert_pem.into_bytes())))
        .await
        .expect("connect");
    assert_eq!(seq_of(client.next_event().await), 1);
    // The 40 kB frame repeats seq 1: it must decode, and then be dropped as a duplicate.
    let d = client.next_delivery(WAIT).await.expect("delivery");
    assert_eq!(d.seq, 2);
    client.close().await;
    server.await.expect("server");
}

#[tokio::test]
async fn a_silent_server_is_detected_by_the_pinger() {
    let id = self_signed("localhost");
    let (addr, server) = serve(&id, 1, |_, mut conn| async move {
        hello(&mut conn).await;
        // Read (and ignore) pings without ever answering, until the client gives up.
        let frames = recv_until_eof(&mut conn).await;
        assert!(
            frames
                .iter()
                .any(|f| matches!(f.kind, Some(client_frame::Kind::Ping(_))))
        );
    })
    .await;
    let mut opts = options(addr, Trust::CaPem(id.cert_pem.into_bytes()));
    opts.ping_interval = Duration::from_millis(100);
    opts.request_timeout = Duration::from_millis(300);
    let (_conn, mut events) = Connection::connect(&opts).await.expect("connect");
    match tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("event")
    {
        Some(Event::Closed { reason }) => assert!(reason.contains("ping"), "{reason}"),
        other => panic!("expected Closed, got {other:?}"),
    }
    server.await.expect("server");
}

#[tokio::test]
async fn an_answering_server_keeps_the_connection_and_drop_closes_it() {
    let id = self_signed("localhost");
    // The server says when it has answered three pings: the client is judged after a count of
    // pings, not after a sleep, so a busy machine cannot make the test pass or fail early.
    let (answered, mut three_answered) = tokio::sync::mpsc::channel::<()>(1);
    let (addr, server) = serve(&id, 1, move |_, mut conn| {
        let answered = answered.clone();
        async move {
            hello(&mut conn).await;
            let mut pings = 0;
            // Answer pings until the client goes away (every handle dropped → graceful close).
            loop {
                let next = tokio::time::timeout(WAIT, conn.next())
                    .await
                    .expect("the client's goodbye in time");
                let Some(Ok(f)) = next else { break };
                if matches!(f.kind, Some(client_frame::Kind::Ping(_))) {
                    pings += 1;
                    send(
                        &mut conn,
                        f.request_id,
                        server_frame::Kind::Pong(pb::Pong {}),
                    )
                    .await;
                    if pings == 3 {
                        let _ = answered.send(()).await;
                    }
                }
            }
            assert!(pings >= 3, "only {pings} pings");
        }
    })
    .await;
    let mut opts = options(addr, Trust::CaPem(id.cert_pem.into_bytes()));
    opts.ping_interval = Duration::from_millis(50);
    opts.request_timeout = Duration::from_secs(5);
    let (conn, events) = Connection::connect(&opts).await.expect("connect");
    tokio::time::timeout(WAIT, three_answered.recv())
        .await
        .expect("three pings answered in time");
    assert!(!conn.is_closed(), "{:?}", conn.closed_reason());
    drop(conn);
    drop(events);
    server.await.expect("server");
}

fn direct_summary(user_id: u64) -> pb::ConversationSummary {
    pb::ConversationSummary {
        with: Some(pb::conversation_summary::With::User(pb::User {
            user_id,
            username: format!("u{user_id}"),
            display_name: format!("U{user_id}"),
        })),
        last_message: None,
    }
}

#[tokio::test]
async fn list_conversations_follows_the_cursor_to_the_last_page() {
    let id = self_signed("localhost");
    let (addr, server) = serve(&id, 1, |_, mut conn| async move {
        hello(&mut conn).await;
        // Three pages; the third repeats a conversation (merged by the SDK), the fourth
        // request hands back a cursor that did not move (the SDK stops instead of looping).
        let pages: [(&[u64], &[u8]); 4] = [
            (&[1, 2], b"c1"),
            (&[3], b"c2"),
            (&[2, 4], b"c3"),
            (&[], b"c3"),
        ];
        let mut expected_cursor: &[u8] = b"";
        for (users, next) in pages {
            let frame = recv(&mut conn).await;
            let Some(client_frame::Kind::ListConversations(r)) = frame.kind else {
                panic!("expected ListConversations, got {frame:?}");
            };
            assert_eq!(r.limit, 7);
            assert_eq!(&r.cursor[..], expected_cursor);
            expected_cursor = next;
            let list = pb::ConversationList {
                conversations: users.iter().map(|&u| direct_summary(u)).collect(),
                next_cursor: Bytes::from_static(next),
            };
            send(
                &mut conn,
                frame.request_id,
                server_frame::Kind::ConversationList(list),
            )
            .await;
        }
        let _ = recv_until_eof(&mut conn).await;
    })
    .await;

    let client = Client::connect(options(addr, Trust::CaPem(id.cert_pem.into_bytes())))
        .await
        .expect("connect");
    let all = client
        .conn()
        .list_conversations(7)
        .await
        .expect("all pages");
    let users: Vec<u64> = all
        .iter()
        .map(|c| match &c.with {
            Some(pb::conversation_summary::With::User(u)) => u.user_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(users, [1, 2, 3, 4]);
    client.close().await;
    drop(client);
    server.await.expect("server script");
}
