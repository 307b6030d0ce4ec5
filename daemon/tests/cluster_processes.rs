//! The cluster as it runs in production: three `messengerd` processes on a real PostgreSQL
//! (a fresh database per test) and a real Redis, behind a real HAProxy started from
//! `deploy/haproxy.cfg` with PROXY protocol v2. Traffic comes from the load-test harness
//! (`messenger_loadtest`) through the balancer, and its checker decides: every accepted
//! message reached its recipient exactly once, in order, while a node is killed, frozen or
//! restarted. Clients behave as real ones do: ping to notice a dead connection, reconnect
//! through the balancer, resume, retry unanswered sends with the same `client_msg_id`.
//!
//! Traffic is bounded by message count and each fault is injected after a number of accepted
//! messages, never after a number of seconds, so the tests hold however busy the machine is.
//! The tests run one at a time (they share two cores with three daemons each).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use messenger_loadtest::chaos::cluster::{Cluster, LaunchOptions, PostgresChoice};
use messenger_loadtest::fleet::FleetOptions;
use messenger_loadtest::scenarios::{self, Outcome, Params};
use messenger_protocol::client::{ConnectOptions, Connection, Trust};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);
/// Users in pairs, each sending to its partner: 120 senders.
const PAIRS: u32 = 60;
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The chaos soak's launcher (one place starts a cluster of processes, for the soak and for
/// these tests): this build's `messengerd`, a fresh database on the test PostgreSQL, a Redis
/// of its own, HAProxy from `deploy/haproxy.cfg`.
async fn start_cluster() -> Cluster {
    let mut opts = LaunchOptions::new(
        env!("CARGO_BIN_EXE_messengerd").into(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg"),
    );
    opts.postgres = PostgresChoice::Server {
        admin_url: messenger_daemon::testing::postgres_admin_url(),
    };
    opts.shutdown_drain_secs = 3;
    Cluster::start(&opts).await.expect("the cluster starts")
}

/// `messages` per sender, counted in `accepted` as they are accepted.
fn params(cluster: &Cluster, prefix: &str, messages: u64, accepted: &Arc<AtomicU64>) -> Params {
    Params {
        fleet: FleetOptions {
            targets: vec![cluster.address.to_string()],
            trust: Trust::CaFile(cluster.ca.clone()),
            prefix: prefix.into(),
            source_ips: Vec::new(),
            connect_concurrency: 32,
            ramp_gap: Duration::ZERO,
            token_cache: None,
            // Real clients notice a dead peer by its missing Pong.
            ping_interval: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            event_buffer: 1024,
        },
        rate: Some(1500.0),
        // Only a safety limit: the run ends when every sender sent its messages.
        duration: Duration::from_secs(600),
        messages_per_sender: Some(messages),
        accepted: Some(accepted.clone()),
        // A fresh database: any other run's message reaching these users crossed over.
        foreign_since_unix_ms: Some(0),
        warmup: Duration::from_secs(1),
        // Also only a limit: the drain ends as soon as every owed pair arrived.
        drain: Duration::from_secs(60),
        body_size: 100,
        daemon_pid: None,
        progress: false,
    }
}

type Traffic = JoinHandle<anyhow::Result<Outcome>>;

/// Starts count-bounded direct traffic through the balancer.
fn traffic(cluster: &Cluster, prefix: &str, messages: u64) -> (Traffic, Arc<AtomicU64>) {
    let accepted = Arc::new(AtomicU64::new(0));
    let params = params(cluster, prefix, messages, &accepted);
    let task = tokio::spawn(async move { scenarios::direct::run(&params, PAIRS).await });
    (task, accepted)
}

/// Waits until `k` messages were accepted: the moment to inject a fault, by progress rather
/// than by time. False if the traffic ended first.
async fn after_accepted(accepted: &AtomicU64, k: u64, traffic: &Traffic) -> bool {
    while accepted.load(Ordering::Relaxed) < k {
        if traffic.is_finished() {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The checker's verdict, with everything needed to understand a failure (the named pairs:
/// sender, recipient, client_msg_id, seq, the node each side was on); and proof that the fault
/// really hit clients (some had to reconnect), so a clean check means something.
fn assert_clean(outcome: &Outcome, senders_messages: u64) {
    let c = &outcome.check;
    eprintln!("check: {c}errors: {:?}", outcome.errors);
    let reconnects: u64 = outcome
        .errors
        .iter()
        .filter(|(k, _)| k.starts_with("receive: connection closed"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        reconnects > 0,
        "no client lost its connection: {:?}",
        outcome.errors
    );
    assert!(
        c.clean(),
        "delivery check failed: {c}errors: {:?}",
        outcome.errors
    );
    // Direct messages: one delivery owed per accepted message, and all of them arrived.
    assert_eq!(c.expected_deliveries, c.accepted_messages, "{c}");
    assert_eq!(c.delivered, c.expected_deliveries, "{c}");
    // Every message of every sender was either accepted or counted as a failed send.
    assert_eq!(
        c.accepted_messages + c.failed_sends,
        u64::from(PAIRS) * 2 * senders_messages,
        "{c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_traffic_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster().await;
    // Each node says who it is in HelloOk, so a named pair can tell where each side was.
    let opts = ConnectOptions::new(
        cluster.address.to_string(),
        Trust::CaFile(cluster.ca.clone()),
    );
    let (conn, _events) = Connection::connect(&opts).await.expect("connects");
    assert!(
        ["node1", "node2", "node3"].contains(&conn.server_node()),
        "HelloOk.node {:?}",
        conn.server_node()
    );
    conn.close().await;
    // 4,800 messages; the node dies after 1,500 were accepted.
    let (traffic, accepted) = traffic(&cluster, "kill", 40);
    assert!(
        after_accepted(&accepted, 1_500, &traffic).await,
        "traffic ended early"
    );
    cluster.nodes[1].kill();
    let outcome = traffic.await.expect("traffic task").expect("traffic runs");
    assert_clean(&outcome, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_routed_around_and_rejoins_without_delivering_anything_stale() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster().await;
    // 6,000 messages; the node freezes after 1,500 were accepted.
    let (traffic, accepted) = traffic(&cluster, "freeze", 50);
    assert!(
        after_accepted(&accepted, 1_500, &traffic).await,
        "traffic ended early"
    );
    cluster.nodes[1].freeze().expect("SIGSTOP");
    // Longer than the node TTL (5 s): the others drop it, its clients move.
    tokio::time::sleep(Duration::from_secs(7)).await;
    cluster.nodes[1].thaw().expect("SIGCONT");
    let outcome = traffic.await.expect("traffic task").expect("traffic runs");
    assert_clean(&outcome, 50);
    // On waking it notices it had been cut off and closes what it still holds (the traffic
    // may have ended before it got the CPU to notice: wait for it, bounded).
    let deadline = tokio::time::Instant::now() + WAIT;
    while cluster.nodes[1]
        .metric("messenger_cluster_cut_off_total")
        .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the frozen node never noticed it had been cut off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing it read from its sockets after waking (sign-ins whose clients had already moved
    // on) displaced a live connection elsewhere: no connection was fenced by a sign-in on the
    // frozen node. (Fences by the other nodes can happen on a saturated machine, where a
    // client's Resume times out on a slow live node and is retried elsewhere; they lose
    // nothing, and the reason names the node that took over.)
    let frozen = format!(
        "resumed on a newer connection (on node {})",
        cluster.nodes[1].id()
    );
    let fenced: Vec<_> = outcome
        .errors
        .keys()
        .filter(|k| k.starts_with("receive:") && k.contains(&frozen))
        .collect();
    assert!(
        fenced.is_empty(),
        "live connections were fenced: {fenced:?}"
    );
    cluster.nodes[1]
        .ready()
        .await
        .expect("the woken node is ready again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_traffic_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = start_cluster().await;
    // 18,000 messages; node i restarts once (i + 1) * 1,500 were accepted (at once if the
    // traffic is already further than that when the previous node is back). The first restart
    // lands mid-traffic whatever the machine's speed; the later ones do as long as sending
    // outlasts the restarts, and the check holds either way.
    let (traffic, accepted) = traffic(&cluster, "rolling", 150);
    for i in 0..cluster.nodes.len() {
        let mid_traffic = after_accepted(&accepted, (i as u64 + 1) * 1_500, &traffic).await;
        assert!(mid_traffic || i > 0, "traffic ended early");
        cluster.nodes[i].terminate().await.expect("a clean stop");
        cluster.nodes[i].spawn().expect("the node starts again");
        cluster.nodes[i]
            .ready()
            .await
            .expect("the node is ready again");
        // Let the balancer see it up again before the next one goes.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let outcome = traffic.await.expect("traffic task").expect("traffic runs");
    assert_clean(&outcome, 150);
}
