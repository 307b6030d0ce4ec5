//! PROXY protocol v2 through the real server: the test stands in for HAProxy by writing the
//! header on a fresh TCP stream, then speaks TLS and frames through the SDK on that stream.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{PASSWORD, TestServer, WAIT};
use messenger_daemon::proxy_protocol::{encode_local, encode_proxy};
use messenger_protocol::client::{Client, ClientError, Recipient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxied_server(max_per_ip: usize) -> TestServer {
    TestServer::start_with(|c| {
        c.proxy_protocol = true;
        c.limits.max_connections_per_ip = max_per_ip;
    })
    .await
}

/// A TCP stream to the server with `header` already written, as a balancer would leave it.
async fn stream_with(server: &TestServer, header: &[u8]) -> TcpStream {
    let mut tcp = TcpStream::connect(server.server().addr)
        .await
        .expect("tcp connect");
    tcp.write_all(header).await.expect("write header");
    tcp
}

async fn connect_as(server: &TestServer, client: SocketAddr) -> Result<Client, ClientError> {
    let header = encode_proxy(client, server.server().addr).expect("header");
    let tcp = stream_with(server, &header).await;
    Client::connect_stream(server.options(), tcp).await
}

/// Waits for the server to close `tcp`, failing if it keeps it open.
async fn assert_closed_by_server(mut tcp: TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            // A TLS alert or error frame is fine as long as the close follows.
            Ok(Ok(_)) => continue,
            Err(_) => panic!("server kept the connection open"),
        }
    }
}

fn rejected_count(metrics: &str, reason: &str) -> u64 {
    let needle = format!("messenger_proxy_header_rejected_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_proxied_client_registers_sends_and_receives_end_to_end() {
    let server = proxied_server(256).await;
    let mut alice = connect_as(&server, "203.0.113.7:40000".parse().expect("addr"))
        .await
        .expect("alice connects through the header");
    let mut bob = connect_as(&server, "198.51.100.9:40001".parse().expect("addr"))
        .await
        .expect("bob connects through the header");
    alice
        .register("alice", PASSWORD, "Alice")
        .await
        .expect("register alice");
    alice
        .login("alice", PASSWORD, "laptop")
        .await
        .expect("login alice");
    let bob_user = bob
        .register("bob", PASSWORD, "Bob")
        .await
        .expect("register");
    bob.login("bob", PASSWORD, "phone")
        .await
        .expect("login bob");

    alice
        .conn()
        .send_text(Recipient::User(bob_user.user_id), "through the balancer")
        .await
        .expect("send");
    let got = common::deliveries(&mut bob, 1).await;
    assert_eq!(common::text(&got[0]), "through the balancer");
    server.stop().await;
}

#[tokio::test]
async fn the_per_ip_limit_applies_to_the_proxied_address_not_the_balancer() {
    let server = proxied_server(1).await;
    let first_ip: SocketAddr = "203.0.113.1:50000".parse().expect("addr");
    let first = connect_as(&server, first_ip)
        .await
        .expect("first client address accepted");
    // Same socket peer (127.0.0.1) as the first: only the proxied address tells them apart.
    let second = connect_as(&server, "203.0.113.2:50000".parse().expect("addr"))
        .await
        .expect("second client address accepted");
    first.conn().ping().await.expect("first still served");
    second.conn().ping().await.expect("second still served");

    let again = connect_as(&server, "203.0.113.1:50001".parse().expect("addr")).await;
    assert!(
        again.is_err(),
        "a second connection from the same proxied IP must be refused"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("messenger_connections_refused_total{reason=\"max_connections_per_ip\"}"),
        "refusal counted: {metrics}"
    );

    // Closing the first frees its address again.
    first.conn().close().await;
    drop(first);
    let mut reopened = None;
    for _ in 0..50 {
        if let Ok(c) = connect_as(&server, first_ip).await {
            reopened = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reopened.is_some(),
        "the address is usable once its connection closed"
    );
    server.stop().await;
}

#[tokio::test]
async fn connections_without_a_valid_header_are_closed_and_counted() {
    let server = proxied_server(256).await;

    // A client that bypasses the balancer: plain TLS, no header.
    let direct = Client::connect(server.options()).await;
    assert!(direct.is_err(), "TLS without a PROXY header must not work");

    // v1 text header.
    let v1 = stream_with(&server, b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 7443\r\n").await;
    assert_closed_by_server(v1).await;

    // Garbage shorter than the fixed part: refused at once, not at the deadline.
    let started = tokio::time::Instant::now();
    assert_closed_by_server(stream_with(&server, b"GET / HTTP/1.0\r\n").await).await;
    assert!(
        started.elapsed() < server.config.timeouts.handshake(),
        "garbage is refused without waiting for the handshake timeout"
    );

    // The right signature with an absurd announced length.
    let mut oversized = ppp::v2::PROTOCOL_PREFIX.to_vec();
    oversized.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    assert_closed_by_server(stream_with(&server, &oversized).await).await;

    // A header truncated by the peer closing its side.
    let header = encode_proxy(
        "203.0.113.7:40000".parse().expect("addr"),
        server.server().addr,
    )
    .expect("header");
    let mut truncated = stream_with(&server, &header[..20]).await;
    truncated.shutdown().await.expect("half-close");
    assert_closed_by_server(truncated).await;

    // The server is unharmed: a proper proxied client still gets through.
    let ok = connect_as(&server, "203.0.113.7:40000".parse().expect("addr"))
        .await
        .expect("a valid header still works");
    ok.conn().ping().await.expect("ping");

    let metrics = server.metrics().await;
    for reason in [
        "tls_without_header",
        "v1",
        "signature",
        "too_long",
        "closed",
    ] {
        assert!(
            rejected_count(&metrics, reason) >= 1,
            "rejection {reason:?} counted: {metrics}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_local_header_from_the_balancer_itself_is_served() {
    let server = proxied_server(256).await;
    let tcp = stream_with(&server, &encode_local().expect("header")).await;
    let c = Client::connect_stream(server.options(), tcp)
        .await
        .expect("LOCAL header accepted");
    c.register("carol", PASSWORD, "Carol")
        .await
        .expect("register over a LOCAL connection");
    server.stop().await;
}

#[tokio::test]
async fn with_the_option_off_a_header_breaks_the_tls_handshake() {
    let server = TestServer::start().await;
    assert!(!server.config.proxy_protocol, "off by default");
    let header = encode_proxy(
        "203.0.113.7:40000".parse().expect("addr"),
        server.server().addr,
    )
    .expect("header");
    let tcp = stream_with(&server, &header).await;
    let result = Client::connect_stream(server.options(), tcp).await;
    assert!(
        result.is_err(),
        "the header must reach TLS untouched (and fail it) when the option is off"
    );
    // And without a header the same server works: nothing was read ahead of TLS.
    server.client().await.conn().ping().await.expect("ping");
    server.stop().await;
}
