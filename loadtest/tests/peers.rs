//! The comparison peers: the no-op TLS relay and Mosquitto run the `direct` workload cleanly,
//! and the checker reports loss when the relay drops frames it acknowledged.
//!
//! The modules are included by path so these tests build without the rest of the binary.

#[allow(dead_code)]
#[path = "../src/checker.rs"]
mod checker;
#[allow(dead_code)]
#[path = "../src/ledger.rs"]
mod ledger;
#[allow(dead_code)]
#[path = "../src/payload.rs"]
mod payload;
#[allow(dead_code)]
#[path = "../src/peers/mod.rs"]
mod peers;
#[allow(dead_code)]
#[path = "../src/stats.rs"]
mod stats;

use std::path::Path;
use std::time::Duration;

use peers::{PeerParams, PeerResult, mosquitto, relay};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn workload(pairs: usize, rate: f64, duration: Duration, warmup: Duration) -> PeerParams {
    PeerParams {
        pairs,
        rate: Some(rate),
        duration,
        warmup,
        body_size: 100,
        drain: Duration::from_secs(3),
    }
}

fn show(r: &PeerResult) {
    eprintln!(
        "{}: accepted {} ({:.0}/s), delivered {} ({:.0}/s), latency {}, harness CPU {:.0}%, peer CPU {:?}%, \
         peer RSS {:?} MiB\n  check {:?}\n  errors {:?}",
        r.name,
        r.accepted,
        r.accepted_per_s,
        r.delivered,
        r.delivered_per_s,
        r.latency.human(),
        r.harness_cpu_percent,
        r.peer_cpu_percent.map(|c| c.round()),
        r.peer_rss_mib.map(|m| (m * 10.0).round() / 10.0),
        r.check,
        r.errors,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_workload_is_clean_and_measured() {
    let params = workload(
        20,
        2000.0,
        Duration::from_secs(2),
        Duration::from_millis(500),
    );
    let r = relay::run(&params).await.expect("relay run");
    show(&r);
    assert!(r.check.clean(), "{:?}", r.check);
    assert!(r.delivered > 0);
    assert!(r.latency.count > 0);
    assert_eq!(r.check.failed_sends, 0, "{:?}", r.errors);
    // How many were accepted depends on how busy the machine is; that the measured window's
    // count is part of the checked total does not.
    assert!(r.check.accepted_messages > 0, "{:?}", r.check);
    assert!(r.accepted <= r.check.accepted_messages, "{r:?}");
    assert_eq!(r.check.delivered, r.check.accepted_messages);
    assert!(r.peer_cpu_percent.is_some());
    assert!(r.peer_rss_mib.is_none(), "the relay runs in-process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_reports_loss_when_the_relay_drops_frames() {
    let params = PeerParams {
        drain: Duration::from_secs(1),
        ..workload(
            20,
            2000.0,
            Duration::from_secs(2),
            Duration::from_millis(500),
        )
    };
    let r = relay::run_with(&params, Some(50)).await.expect("relay run");
    show(&r);
    assert!(r.check.lost > 0, "{:?}", r.check);
    assert!(!r.check.clean());
    // Every 50th forwarded frame was dropped yet acknowledged: about 2% of the accepted ones.
    let expected = r.check.accepted_messages / 50;
    assert!(
        r.check.lost + 1 >= expected && r.check.lost <= expected + 1,
        "lost {} of {}",
        r.check.lost,
        r.check.accepted_messages
    );
    assert_eq!(
        r.check.duplicates + r.check.misdelivered,
        0,
        "{:?}",
        r.check
    );
}

/// A raw client of the relay, trusting it through `Relay::ca_pem` only.
async fn raw_client(
    relay: &relay::Relay,
    me: u32,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&relay.ca_pem) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![relay::ALPN.to_vec()];
    let tcp = tokio::net::TcpStream::connect(relay.addr)
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("TLS");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(relay::ALPN));
    tls.write_all(&me.to_be_bytes()).await.expect("register");
    let mut ack = [0u8; 8];
    tls.read_exact(&mut ack).await.expect("registration ack");
    assert_eq!(ack, [0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF]);
    tls
}

#[tokio::test]
async fn the_relay_forwards_frames_acks_them_and_drops_only_when_told() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = relay::Relay::start(Some(2)).expect("relay");
    let mut a = raw_client(&relay, 7).await;
    let mut b = raw_client(&relay, 8).await;
    let frame = |to: u32, payload: &[u8]| {
        let mut f = ((4 + payload.len()) as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&to.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    // The first frame is forwarded as [length][source][payload] and acknowledged; the second
    // is dropped (drop_every = 2) yet acknowledged all the same; the third is forwarded.
    for payload in [&b"one"[..], b"two", b"three"] {
        a.write_all(&frame(8, payload)).await.expect("send");
        let mut ack = [0u8; 8];
        a.read_exact(&mut ack).await.expect("ack");
        assert_eq!(ack, [0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
    for payload in [&b"one"[..], b"three"] {
        let mut got = vec![0u8; 8 + payload.len()];
        b.read_exact(&mut got).await.expect("forwarded");
        assert_eq!(got, frame(7, payload));
    }
    // A frame to nobody is refused (and not counted towards drop_every).
    a.write_all(&frame(99, b"x")).await.expect("send");
    let mut nack = [0u8; 8];
    a.read_exact(&mut nack).await.expect("nack");
    assert_eq!(nack, [0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFE]);
    assert_eq!(relay.dropped(), 1);
    assert_eq!(relay.forwarded(), 3);
    tokio::task::spawn_blocking(move || relay.stop())
        .await
        .expect("stop");
    assert!(relay::Relay::start(Some(0)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_qos1_workload_is_clean() {
    assert!(
        Path::new(MOSQUITTO).exists(),
        "Mosquitto is required for this test but {MOSQUITTO} is missing: install the `mosquitto` package"
    );
    let params = workload(
        20,
        1000.0,
        Duration::from_secs(2),
        Duration::from_millis(500),
    );
    let r = mosquitto::run(&params, Path::new(MOSQUITTO))
        .await
        .expect("mosquitto run");
    show(&r);
    assert!(r.check.clean(), "{:?}", r.check);
    assert!(r.delivered > 0);
    assert!(r.latency.count > 0);
    assert_eq!(r.check.failed_sends, 0, "{:?}", r.errors);
    assert_eq!(r.check.delivered, r.check.accepted_messages);
    assert!(r.peer_cpu_percent.is_some() && r.peer_rss_mib.is_some());
}

#[tokio::test]
async fn a_missing_mosquitto_binary_is_a_clear_error() {
    let params = workload(1, 10.0, Duration::from_secs(1), Duration::ZERO);
    let e = mosquitto::run(&params, Path::new("/nonexistent/mosquitto"))
        .await
        .expect_err("no broker");
    assert!(e.to_string().contains("not found"), "{e:#}");
}
