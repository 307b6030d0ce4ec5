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

#[path = "support/redis.rs"]
mod redis_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use messenger_daemon::testing::TestDatabase;
use messenger_loadtest::fleet::FleetOptions;
use messenger_loadtest::scenarios::{self, Outcome, Params};
use messenger_protocol::client::{ConnectOptions, Connection, Trust};
use redis_support::TestRedis;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(30);
/// Users in pairs, each sending to its partner: 120 senders.
const PAIRS: u32 = 60;
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// One `messengerd` process.
struct Node {
    index: usize,
    listen: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join(format!("node{}.log", self.index)))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_messengerd"))
            .args(&self.args)
            .env("RUST_LOG", "warn,messenger_daemon::cluster=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("messengerd starts");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the drain and exit.
    async fn terminate(&mut self) {
        self.signal("TERM");
        let mut child = self.child.take().expect("running");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(status.success(), "node {} exited with {status}", self.index);
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} did not stop",
                self.index
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let response = http_get(self.admin, "/readyz").await;
            if response.lines().next().is_some_and(|l| l.contains(" 200 ")) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {} not ready; see {}",
                self.index,
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        http_get(self.admin, "/metrics")
            .await
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen process cannot die until it is resumed.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

struct Cluster {
    nodes: Vec<Node>,
    balancer: Child,
    pub address: SocketAddr,
    ca: PathBuf,
    _redis: TestRedis,
    _database: TestDatabase,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let database = TestDatabase::create("msgcluster").await;
        let redis = TestRedis::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes: Vec<Node> = Vec::new();
        for index in 1..=3 {
            let node_dir = dir.path().join(format!("node{index}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let listen = free_addr();
            let admin = free_addr();
            let mut args: Vec<String> = [
                "--listen",
                &listen.to_string(),
                "--admin-listen",
                &admin.to_string(),
                "--data-dir",
                &node_dir.display().to_string(),
                "--store-backend",
                "postgres",
                "--postgres-url",
                &database.url,
                "--redis-url",
                &redis.url(),
                "--node-id",
                &format!("node{index}"),
                "--proxy-protocol",
                "true",
                "--argon2-memory-kib",
                "1024",
                "--argon2-iterations",
                "1",
                "--messages-per-second",
                "100000",
                "--message-burst",
                "100000",
                "--auth-attempts-per-ip",
                "1000000",
                "--max-connections-per-ip",
                "100000",
                "--shutdown-drain",
                "3",
            ]
            .iter()
            .map(ToString::to_string)
            .collect();
            // One certificate for every node, as behind a balancer: the first node's.
            if let Some(first) = nodes.first() {
                let tls = first.dir.join("tls");
                args.extend([
                    "--tls-cert".into(),
                    tls.join("cert.pem").display().to_string(),
                    "--tls-key".into(),
                    tls.join("key.pem").display().to_string(),
                ]);
            }
            let mut node = Node {
                index,
                listen,
                admin,
                dir: node_dir,
                args,
                child: None,
            };
            node.spawn();
            node.ready().await;
            nodes.push(node);
        }
        let ca = nodes[0].dir.join("tls").join("dev-ca.pem");
        let address = free_addr();
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
        let mut haproxy = Command::new("haproxy");
        haproxy
            .args(["-db", "-f"])
            .arg(&config)
            .env("HAPROXY_BIND", address.to_string())
            .env("HAPROXY_STATS_BIND", free_addr().to_string())
            .env("CHECK_INTER", "300ms")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for node in &nodes {
            haproxy
                .env(format!("NODE{}_ADDR", node.index), node.listen.to_string())
                .env(
                    format!("NODE{}_CHECK_PORT", node.index),
                    node.admin.port().to_string(),
                );
        }
        let balancer = haproxy
            .spawn()
            .expect("haproxy runs (apt-get install -y haproxy)");
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(address).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "haproxy did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Two passed checks (rise 2) per node before traffic.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        Self {
            nodes,
            balancer,
            address,
            ca,
            _redis: redis,
            _database: database,
            _dir: dir,
        }
    }

    /// `messages` per sender, counted in `accepted` as they are accepted.
    fn params(&self, prefix: &str, messages: u64, accepted: &Arc<AtomicU64>) -> Params {
        Params {
            fleet: FleetOptions {
                targets: vec![self.address.to_string()],
                trust: Trust::CaFile(self.ca.clone()),
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
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.balancer.kill();
        let _ = self.balancer.wait();
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
    else {
        return String::new();
    };
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await;
    out
}

type Traffic = JoinHandle<anyhow::Result<Outcome>>;

/// Starts count-bounded direct traffic through the balancer.
fn traffic(cluster: &Cluster, prefix: &str, messages: u64) -> (Traffic, Arc<AtomicU64>) {
    let accepted = Arc::new(AtomicU64::new(0));
    let params = cluster.params(prefix, messages, &accepted);
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
    let mut cluster = Cluster::start().await;
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
    let cluster = Cluster::start().await;
    // 6,000 messages; the node freezes after 1,500 were accepted.
    let (traffic, accepted) = traffic(&cluster, "freeze", 50);
    assert!(
        after_accepted(&accepted, 1_500, &traffic).await,
        "traffic ended early"
    );
    cluster.nodes[1].signal("STOP");
    // Longer than the node TTL (5 s): the others drop it, its clients move.
    tokio::time::sleep(Duration::from_secs(7)).await;
    cluster.nodes[1].signal("CONT");
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
    // on) displaced a live connection elsewhere.
    let fenced: Vec<_> = outcome
        .errors
        .keys()
        .filter(|k| k.starts_with("receive:") && k.contains("resumed on a newer connection"))
        .collect();
    assert!(
        fenced.is_empty(),
        "live connections were fenced: {fenced:?}"
    );
    cluster.nodes[1].ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_traffic_loses_and_duplicates_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start().await;
    // 18,000 messages; node i restarts once (i + 1) * 1,500 were accepted (at once if the
    // traffic is already further than that when the previous node is back). The first restart
    // lands mid-traffic whatever the machine's speed; the later ones do as long as sending
    // outlasts the restarts, and the check holds either way.
    let (traffic, accepted) = traffic(&cluster, "rolling", 150);
    for i in 0..cluster.nodes.len() {
        let mid_traffic = after_accepted(&accepted, (i as u64 + 1) * 1_500, &traffic).await;
        assert!(mid_traffic || i > 0, "traffic ended early");
        cluster.nodes[i].terminate().await;
        cluster.nodes[i].spawn();
        cluster.nodes[i].ready().await;
        // Let the balancer see it up again before the next one goes.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let outcome = traffic.await.expect("traffic task").expect("traffic runs");
    assert_clean(&outcome, 150);
}
