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

/// Reads until the server closes `s` (EOF or reset), or `WAIT_CLOSE` passes; true if it closed.
async fn closed_by_server(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    // Generous: only the failure condition of "it is closed at all", never a speed check.
    const WAIT_CLOSE: Duration = Duration::from_secs(60);
    let mut sink = Vec::new();
    tokio::time::timeout(WAIT_CLOSE, s.read_to_end(&mut sink))
        .await
        .is_ok()
}

/// `/healthz` over a fresh connection; `None` when the connection was refused or cut.
async fn try_healthz(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(MUST_ANSWER, s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_over_the_cap_are_closed_at_once_and_starve_nothing() {
    const CAP: usize = 4;
    // An idle timeout far beyond this test: only the cap can close the extra connections.
    let ts = TestServer::start_with(|c| {
        c.admin.max_connections = CAP;
        c.admin.idle_timeout_secs = 600;
    })
    .await;
    let addr = ts.server().admin_addr;
    let mut holders = Vec::new();
    for _ in 0..CAP {
        holders.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // Many more than the cap: every one is closed by the server (none lingers idle).
    let mut extra = Vec::new();
    for _ in 0..(CAP * 10) {
        extra.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    for (i, s) in extra.iter_mut().enumerate() {
        assert!(
            closed_by_server(s).await,
            "admin connection {i} over the cap was left open"
        );
    }
    // While the cap is held, a check is refused, not queued.
    let refused = try_healthz(addr).await;
    assert!(
        refused.as_deref().is_none_or(|r| r.contains(" 503 ")),
        "{refused:?}"
    );
    // The client port is untouched by the admin port's exhaustion.
    let client = ts.client().await;
    client.conn().ping().await.expect("client port serves");

    // Once the holders go, checks are answered again (bounded retries while the server
    // notices the closes).
    drop(holders);
    let mut answer = None;
    for _ in 0..100 {
        answer = try_healthz(addr).await;
        if answer.as_deref().is_some_and(|a| a.contains(" 200 ")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = answer.expect("/healthz never answered after the cap freed");
    assert!(answer.contains(" 200 "), "{answer}");

    let metrics = ts.metrics().await;
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("messenger_connections_refused_total{reason=\"admin_max_connections\"} ")
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the admin refusal counter is exported");
    assert!(refused >= (CAP * 10) as f64, "{metrics}");
    ts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_are_closed_by_the_idle_timeout_and_checks_resume() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CAP: usize = 4;
    let ts = TestServer::start_with(|c| {
        c.admin.max_connections = CAP;
        c.admin.idle_timeout_secs = 1;
    })
    .await;
    let addr = ts.server().admin_addr;
    // Idle from the start, and idle after a kept-alive request: both are closed.
    let mut idle = Vec::new();
    for _ in 0..(CAP - 1) {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let mut kept_alive = tokio::net::TcpStream::connect(addr).await.expect("connect");
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 12];
    kept_alive.read_exact(&mut first).await.expect("answer");
    assert_eq!(&first, b"HTTP/1.1 200");
    idle.push(kept_alive);
    for (i, s) in idle.iter_mut().enumerate() {
        assert!(
            closed_by_server(s).await,
            "idle admin connection {i} was never closed"
        );
    }
    let mut answer = None;
    for _ in 0..100 {
        answer = try_healthz(addr).await;
        if answer.as_deref().is_some_and(|a| a.contains(" 200 ")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = answer.expect("/healthz never answered after the idle connections closed");
    assert!(answer.contains(" 200 "), "{answer}");
    let client = ts.client().await;
    client.conn().ping().await.expect("client port serves");
    ts.stop().await;
}
