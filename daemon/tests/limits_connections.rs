//! The client-connection cap as a client sees it: over the cap a connection is told
//! `UNAVAILABLE, "server at capacity; retry later"` (not just cut), while the connections
//! already open keep working, the admin port keeps answering, and a freed slot is taken again.
//! (The cap's derivation from the open-file limit runs in its own process: `limits_fd.rs`.)

mod common;

use std::time::Duration;

use common::{TestServer, code, http_get};
use messenger_daemon::server::AT_CAPACITY;
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, Trust, client_config};

const CAP: usize = 3;

/// Connects once; `Ok(None)` when refused at capacity.
async fn try_connect(ts: &TestServer) -> Option<Client> {
    match Client::connect(ts.options()).await {
        Ok(c) => Some(c),
        Err(e) => {
            assert_eq!(code(&e), Some(ErrorCode::Unavailable), "{e}");
            assert!(e.to_string().contains(AT_CAPACITY), "{e}");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_is_told_to_retry_and_nothing_else_suffers() {
    let ts = TestServer::start_with(|c| c.limits.max_connections = CAP).await;
    let budget = ts.server().connections;
    assert_eq!(budget.configured, CAP);
    assert_eq!(budget.cap, CAP, "{budget:?}");
    assert!(
        budget.open_files.is_some_and(|n| n > CAP as u64),
        "{budget:?}"
    );

    let (alice, _) = ts.user("alice").await;
    let mut others = Vec::new();
    for _ in 1..CAP {
        others.push(ts.client().await);
    }
    for _ in 0..5 {
        let refused = try_connect(&ts).await;
        assert!(refused.is_none(), "a connection over the cap was served");
    }

    let health = http_get(ts.server().admin_addr, "/healthz").await;
    assert!(health.contains(" 200 "), "{health}");
    alice
        .conn()
        .ping()
        .await
        .expect("a connection inside the cap keeps being served");

    // A slot freed by a client that leaves is taken by the next one (once the server has
    // seen the close: retried, bounded by count).
    let leaving = others.pop().expect("one other");
    leaving.close().await;
    drop(leaving);
    let mut back = None;
    for _ in 0..300 {
        back = try_connect(&ts).await;
        if back.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = back.expect("the freed slot was never given to a new connection");
    back.conn()
        .ping()
        .await
        .expect("the new connection is served");

    let metrics = ts.metrics().await;
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("messenger_connections_refused_total{reason=\"max_connections\"} ")
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the refusal counter is exported");
    assert!(refused >= 5.0, "{metrics}");
    assert!(metrics.contains("messenger_connection_cap "), "{metrics}");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_over_the_cap_gets_a_503_with_retry_after() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ts = TestServer::start_with(|c| c.limits.max_connections = 1).await;
    let _holder = ts.client().await;
    let trust = Trust::CaFile(ts.server().dev_ca.clone().expect("dev CA"));
    let mut tls = (*client_config(&trust).expect("tls config")).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(ts.server().addr)
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("the handshake completes even at capacity");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("retry-after: "), "{answer}");
    assert!(answer.contains(AT_CAPACITY), "{answer}");
    ts.stop().await;
}
