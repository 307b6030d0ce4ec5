//! The admin endpoint as a balancer and a scraper see it: `/readyz` tells the truth about the
//! store and always answers, `/metrics` shows every metric with its help text from the start.

mod common;

use std::time::Duration;

use common::{TestServer, http_get, use_postgres};
use messenger_daemon::metrics::{ALL, Kind};
use messenger_daemon::testing::ThrowawayPostgres;

/// Only the failure condition of "it must answer": far above the readiness bound, never a
/// speed assertion.
const MUST_ANSWER: Duration = Duration::from_secs(3);

async fn readyz(ts: &TestServer) -> String {
    let addr = ts.server().admin_addr;
    tokio::time::timeout(MUST_ANSWER, http_get(addr, "/readyz"))
        .await
        .expect("/readyz must answer even while the store is down")
}

/// Polls until `/readyz` gives `status`; each answer must come back.
async fn readyz_until(ts: &TestServer, status: &str) -> String {
    let mut last = String::new();
    for _ in 0..200 {
        last = readyz(ts).await;
        if last.starts_with(&format!("HTTP/1.0 {status}"))
            || last.starts_with(&format!("HTTP/1.1 {status}"))
        {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {status}; last answer:\n{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_not_ready_while_postgres_is_down_and_ready_once_it_is_back() {
    let pg = tokio::task::spawn_blocking(ThrowawayPostgres::start)
        .await
        .expect("start PostgreSQL");
    let url = pg.url();
    // A pool timeout far above the readiness bound: the answer must not wait for it.
    let ts = TestServer::start_with(|c| {
        use_postgres(c, &url);
        c.store.postgres_timeout_secs = 30;
    })
    .await;
    let ready = readyz_until(&ts, "200").await;
    assert!(ready.contains("store: ok"), "{ready}");

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .expect("stop PostgreSQL");
    let down = readyz_until(&ts, "503").await;
    assert!(down.contains("store: "), "{down}");
    assert!(!down.contains("store: ok"), "{down}");
    // Every answer while it stays down says so, and comes back (no request waits on the pool).
    for _ in 0..5 {
        let again = readyz(&ts).await;
        assert!(again.contains(" 503 "), "{again}");
        assert!(
            again.contains("store: ") && !again.contains("store: ok"),
            "{again}"
        );
    }

    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .expect("restart PostgreSQL");
    let back = readyz_until(&ts, "200").await;
    assert!(back.contains("store: ok"), "{back}");
    ts.stop().await;
    drop(pg);
}

#[tokio::test]
async fn a_client_that_never_sends_its_headers_does_not_block_readyz() {
    use tokio::io::AsyncWriteExt;
    let ts = TestServer::start().await;
    let addr = ts.server().admin_addr;
    // Half a request, then silence.
    let mut stuck = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stuck
        .write_all(b"GET /readyz HTTP/1.1\r\n")
        .await
        .expect("write");
    let ready = readyz(&ts).await;
    assert!(
        ready.contains(" 200 ") && ready.contains("store: ok"),
        "{ready}"
    );
    // The stuck client is dropped by the header timeout: its read ends.
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stuck.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the stuck admin connection was never closed");
    drop(stuck);
    ts.stop().await;
}

#[tokio::test]
async fn every_metric_is_exported_with_help_before_its_first_event() {
    let ts = TestServer::start().await;
    let scraped = ts.metrics().await;
    for m in ALL.iter().filter(|m| !m.cluster_only) {
        assert!(
            scraped.contains(&format!("# HELP {} ", m.name)),
            "no HELP for {}:\n{scraped}",
            m.name
        );
        let sample = scraped.lines().any(|l| {
            l.strip_prefix(m.name).is_some_and(|rest| {
                rest.starts_with(' ') || rest.starts_with('{') || rest.starts_with('_')
            })
        });
        assert!(sample, "no sample for {}:\n{scraped}", m.name);
        if let (Kind::Counter, Some((key, values))) = (m.kind, m.label) {
            for v in values {
                let series = format!("{}{{{key}=\"{v}\"}}", m.name);
                assert!(scraped.contains(&series), "no series {series}:\n{scraped}");
            }
        }
    }
    // A counter nothing has touched in this fresh process reads zero.
    assert!(
        scraped
            .lines()
            .any(|l| l == "messenger_cluster_cut_off_total 0"),
        "{scraped}"
    );
    ts.stop().await;
}
