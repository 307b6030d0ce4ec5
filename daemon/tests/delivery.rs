//! The delivery guarantees under stress: resume seams, slow consumers, restarts, shutdown.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{TestServer, deliveries, text};
use messenger_protocol::client::{Client, ConnectOptions, Connection, Event, Recipient};
use messenger_protocol::pb;

/// Reads raw events (no SDK de-duplication) from one connection.
async fn raw_delivery(
    events: &mut messenger_protocol::client::Events,
    wait: Duration,
) -> Option<pb::Delivery> {
    match tokio::time::timeout(wait, events.recv()).await {
        Ok(Some(Event::Delivery(d))) => Some(d),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_while_a_client_resumes_arrive_with_no_gap_and_no_duplicate() {
    const MESSAGES: usize = 600;
    let ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (bob, bob_user) = ts.user("bob").await;
    let token = bob.session().expect("session").session_token.clone();
    bob.close().await;
    drop(bob);

    // Alice sends continuously while Bob keeps dropping and resuming.
    let sender = drain_events(alice);
    let send_task = tokio::spawn(async move {
        for i in 0..MESSAGES {
            sender
                .send_text(Recipient::User(bob_user.user_id), &format!("{i}"))
                .await
                .expect("send");
            if i.is_multiple_of(50) {
                tokio::task::yield_now().await;
            }
        }
    });

    let mut processed: Vec<String> = Vec::new();
    let mut last_processed = 0u64;
    let mut iteration = 0u64;
    while processed.len() < MESSAGES {
        iteration += 1;
        assert!(iteration < 10_000, "no progress");
        let (conn, mut events) = Connection::connect(&ts.options()).await.expect("connect");
        let auth = conn.resume(&token).await.expect("resume");
        // Read a pseudo-random number of deliveries on this connection, then drop it.
        let budget = 1 + (iteration * 7919 % 37) as usize;
        let mut prev_on_conn: Option<u64> = None;
        for _ in 0..budget {
            let Some(d) = raw_delivery(&mut events, Duration::from_millis(200)).await else {
                break;
            };
            // Within one connection: strictly consecutive, starting right after the cursor.
            match prev_on_conn {
                None => assert_eq!(d.seq, auth.acked_seq + 1, "replay starts after the cursor"),
                Some(p) => assert_eq!(d.seq, p + 1, "gap or duplicate within a connection"),
            }
            prev_on_conn = Some(d.seq);
            if d.seq > last_processed {
                assert_eq!(
                    d.seq,
                    last_processed + 1,
                    "a seq was skipped across the seam"
                );
                last_processed = d.seq;
                // The sender's own copies are in alice's inbox, so every entry is alice's.
                processed.push(text(&d));
            }
        }
        // Acknowledge only sometimes, so some resumes replay what was already seen.
        if !iteration.is_multiple_of(3) && last_processed > 0 {
            conn.ack(last_processed).await.expect("ack");
            conn.ping()
                .await
                .expect("ack applied before the next resume");
        }
        conn.close().await;
    }
    send_task.await.expect("sender");
    let want: Vec<String> = (0..MESSAGES).map(|i| i.to_string()).collect();
    assert_eq!(processed, want, "every message exactly once, in order");
    ts.stop().await;
}

/// Consumes a client's pushes (its own sent copies) in the background, so its connection's
/// responses are never stuck behind unread deliveries; returns the connection to send on.
fn drain_events(mut client: Client) -> Connection {
    let conn = client.conn().clone();
    tokio::spawn(async move { while client.next_event().await.is_some() {} });
    conn
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        // Anonymous memory only: the store's file-backed pages (mmap) are not buffering.
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_neither_grows_memory_nor_loses_messages() {
    const MESSAGES: usize = 3000;
    const BODY: usize = 16 * 1024;
    let ts = TestServer::start_with(|c| c.limits.outbound_queue = 32).await;
    let (alice, _) = ts.user("alice").await;
    let alice = drain_events(alice);
    let (_, bob_user) = ts.user("bob").await;
    // Bob's device buffers almost nothing on the client side, so the backlog must stay in
    // the server's store, not in memory anywhere.
    let mut opts: ConnectOptions = ts.options();
    opts.event_buffer = 4;
    let mut bob = Client::connect(opts).await.expect("connect");
    bob.login("bob", common::PASSWORD, "slow")
        .await
        .expect("login");

    let before = rss_bytes();
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    for i in 0..MESSAGES {
        alice
            .send_message(
                Recipient::User(bob_user.user_id),
                &format!("m{i}"),
                body.clone(),
                "application/octet-stream",
            )
            .await
            .expect("send");
    }
    let grown = rss_bytes().saturating_sub(before);
    let backlog = (MESSAGES * BODY) as u64;
    assert!(
        grown < backlog / 2,
        "memory grew by {grown} bytes for a {backlog}-byte backlog: something buffers it"
    );
    let metrics = ts.metrics().await;
    let queue_full = metrics
        .lines()
        .find(|l| l.starts_with("messenger_outbound_queue_full_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        queue_full >= 1.0,
        "the slow connection left live delivery:\n{metrics}"
    );

    // Reading again: everything arrives, in order, once.
    let got = deliveries(&mut bob, MESSAGES).await;
    let ids: Vec<String> = got
        .iter()
        .map(|d| {
            d.message
                .as_ref()
                .map(|m| m.client_msg_id.clone())
                .unwrap_or_default()
        })
        .collect();
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, want);
    assert!(got.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    common::assert_quiet(&mut bob).await;
    ts.stop().await;
}

#[tokio::test]
async fn messages_accepted_before_a_restart_are_delivered_after_it() {
    let mut ts = TestServer::start().await;
    let (alice, _) = ts.user("alice").await;
    let (bob, bob_user) = ts.user("bob").await;
    let token = bob.session().expect("session").session_token.clone();
    bob.close().await;
    let mut sent = BTreeMap::new();
    for i in 0..10 {
        let s = alice
            .conn()
            .send_text(
                Recipient::User(bob_user.user_id),
                &format!("before restart {i}"),
            )
            .await
            .expect("send");
        sent.insert(s.message_id, i);
    }
    drop(alice);
    ts.restart().await;
    let mut bob = ts.client().await;
    bob.resume(&token)
        .await
        .expect("the session survives the restart");
    let got = deliveries(&mut bob, 10).await;
    for (i, d) in got.iter().enumerate() {
        assert_eq!(text(d), format!("before restart {i}"));
    }
    common::assert_quiet(&mut bob).await;
    ts.stop().await;
}

#[tokio::test]
async fn shutdown_sends_go_away_with_a_jittered_reconnect_delay() {
    let ts = TestServer::start().await;
    let (mut alice, _) = ts.user("alice").await;
    let stop = tokio::spawn(ts.stop());
    let go_away = loop {
        match tokio::time::timeout(common::WAIT, alice.next_event()).await {
            Ok(Some(Event::GoAway(g))) => break g,
            Ok(Some(Event::Delivery(_))) => continue,
            other => panic!("expected GoAway, got {other:?}"),
        }
    };
    assert!(
        (1_000..5_000).contains(&go_away.reconnect_after_ms),
        "{go_away:?}"
    );
    assert_eq!(
        go_away.code,
        messenger_protocol::ErrorCode::Unavailable as i32
    );
    stop.await.expect("stopped");
}

#[tokio::test]
async fn sigterm_sends_go_away_and_a_restarted_daemon_keeps_every_message() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let spawn = || {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_messengerd"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn messengerd");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).expect("listening line");
        let addr = first
            .split_whitespace()
            .nth(3)
            .expect("address in the first line")
            .to_string();
        std::thread::spawn(move || for _ in lines {});
        (child, addr)
    };
    let options = |addr: &str| {
        let ca = dir.path().join("tls").join("dev-ca.pem");
        ConnectOptions::new(addr, messenger_protocol::client::Trust::CaFile(ca))
    };

    let (child, addr) = spawn();
    let guard = KillOnDrop(Some(child));
    let mut alice = Client::connect(options(&addr)).await.expect("connect");
    alice
        .register("alice", common::PASSWORD, "")
        .await
        .expect("register");
    alice
        .login("alice", common::PASSWORD, "d")
        .await
        .expect("login");
    let bob_reg = alice
        .conn()
        .register("bob", common::PASSWORD, "")
        .await
        .expect("register bob");
    for i in 0..5 {
        alice
            .conn()
            .send_text(Recipient::User(bob_reg.user_id), &format!("{i}"))
            .await
            .expect("send");
    }
    let pid = guard.0.as_ref().map(|c| c.id()).expect("child");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let go_away = loop {
        match tokio::time::timeout(common::WAIT, alice.next_event()).await {
            Ok(Some(Event::GoAway(g))) => break g,
            Ok(Some(Event::Delivery(_))) => continue,
            other => panic!("expected GoAway, got {other:?}"),
        }
    };
    assert!(go_away.reconnect_after_ms >= 1_000);
    let mut guard = guard;
    let mut child = guard.0.take().expect("child");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");

    let (child, addr) = spawn();
    let _guard = KillOnDrop(Some(child));
    let mut bob = Client::connect(options(&addr)).await.expect("connect");
    bob.login("bob", common::PASSWORD, "d")
        .await
        .expect("login");
    let got = deliveries(&mut bob, 5).await;
    let texts: Vec<String> = got.iter().map(text).collect();
    assert_eq!(texts, ["0", "1", "2", "3", "4"]);
}

/// Kills the daemon child even when an assertion fails first.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
