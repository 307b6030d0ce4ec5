//! `deploy/local-cluster` as an operator runs it (docs/OPERATIONS.md, "Local cluster"): start
//! on free ports (`MESSENGER_CLUSTER_PORT=auto`) with a Redis of its own, status, two clients
//! chatting through HAProxy, status failing when a node dies, start failing (and undoing
//! itself) when a port is taken or a node exits, and `stop --purge` removing the database and
//! the state dir. Each run has its own state dirs and database, so it never meets a cluster
//! someone started by hand.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{PASSWORD, deliveries, text};
use messenger_protocol::client::{Client, ConnectOptions, Recipient, Trust};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster")
}

/// Where and how one cluster of this test runs.
#[derive(Clone)]
struct Settings {
    state: PathBuf,
    database: String,
    /// Extra environment: MESSENGER_CLUSTER_PORT and whatever a case needs.
    env: Vec<(String, String)>,
}

impl Settings {
    fn new(state: PathBuf, port: &str) -> Self {
        Self {
            state,
            database: format!("msglocal_{:016x}", rand::random::<u64>()),
            env: vec![("MESSENGER_CLUSTER_PORT".into(), port.into())],
        }
    }
}

fn run(settings: &Settings, args: &[&str]) -> Output {
    let mut command = Command::new(script());
    command
        .args(args)
        .env("MESSENGER_CLUSTER_STATE", &settings.state)
        .env("MESSENGER_CLUSTER_DB", &settings.database)
        .env("MESSENGERD", env!("CARGO_BIN_EXE_messengerd"))
        .env("RUST_LOG", "warn")
        // Generous: the machine may be busy.
        .env("MESSENGER_CLUSTER_READY_SECS", "240");
    for (k, v) in &settings.env {
        command.env(k, v);
    }
    command.output().expect("local-cluster runs")
}

async fn run_async(settings: &Settings, args: &'static [&'static str]) -> Output {
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || run(&settings, args))
        .await
        .expect("local-cluster task")
}

fn psql(query: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtc",
        ])
        .arg(query)
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "psql {query}: {}", explain(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Stops the cluster and drops its database however the test ends.
struct Cleanup(Vec<Settings>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for settings in &self.0 {
            let _ = run(settings, &["stop", "--purge"]);
            let _ = Command::new("psql")
                .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
                .arg(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    settings.database
                ))
                .output();
        }
    }
}

fn explain(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn all_output(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A value `start` recorded in the state dir (cluster.env).
fn recorded(state: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(state.join("cluster.env")).expect("cluster.env");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("cluster.env lacks {key}:\n{text}"))
        .to_string()
}

fn pid_of(state: &Path, name: &str) -> Option<u32> {
    std::fs::read_to_string(state.join(format!("{name}.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Alive and not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false)
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// No process of this state dir is alive (pid files gone, or their pids dead).
fn nothing_running(state: &Path) -> Result<(), String> {
    for name in ["node1", "node2", "node3", "haproxy", "redis"] {
        if let Some(pid) = pid_of(state, name)
            && alive(pid)
        {
            return Err(format!("{name} (pid {pid}) still runs: {}", cmdline(pid)));
        }
    }
    Ok(())
}

/// Processes end a moment after the script returns (SIGKILL is asynchronous): wait a while.
async fn wait_nothing_running(state: &Path) {
    let mut last = Ok(());
    for _ in 0..300 {
        last = nothing_running(state);
        if last.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{}", last.unwrap_err());
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A base port whose derived ports (base, +8..+10, +38..+40, +47..+49) are all free.
fn free_port_base() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + rand::random::<u16>() % 12_000;
        if [0, 8, 9, 10, 38, 39, 40, 47, 48, 49]
            .iter()
            .all(|o| port_free(base + o))
        {
            return base;
        }
    }
    panic!("no free port range found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_runs_on_free_ports_with_its_own_redis_checks_itself_and_purges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = Settings::new(dir.path().join("main"), "auto");
    let mut failing = Settings::new(dir.path().join("failing"), "auto");
    // A setting messengerd refuses at start: node1 exits at once with a clear message.
    failing
        .env
        .push(("MESSENGER_IDLE_TIMEOUT".into(), "not-a-number".into()));
    let _cleanup = Cleanup(vec![main.clone(), failing.clone()]);

    // --- start on free ports, its own Redis -------------------------------------------------
    let started = run_async(&main, &["start"]).await;
    assert!(started.status.success(), "{}", explain(&started));
    let banner = all_output(&started);
    assert!(banner.contains("Messenger cluster is up"), "{banner}");
    let port: u16 = recorded(&main.state, "PORT").parse().expect("PORT");
    assert_ne!(port, 7443, "auto picks free ports");
    let redis_port: u16 = recorded(&main.state, "REDIS_PORT")
        .parse()
        .expect("REDIS_PORT");
    assert_ne!(redis_port, 6379);
    assert!(
        banner.contains(&format!("redis://127.0.0.1:{redis_port}/ (its own server")),
        "{banner}"
    );
    for node in ["node1", "node2", "node3"] {
        let pid = pid_of(&main.state, node).expect("node pid file");
        let line = cmdline(pid);
        assert!(
            line.contains(&format!("--redis-url redis://127.0.0.1:{redis_port}/")),
            "{node} uses the cluster's own Redis: {line}"
        );
        assert!(!line.contains(":6379"), "{node}: {line}");
    }
    let redis_pid = pid_of(&main.state, "redis").expect("redis pid file");
    assert!(cmdline(redis_pid).contains("redis-server"));
    // The printed commands carry what they need: the load test spreads its sources and goes
    // through HAProxy, stop names this state dir.
    assert!(
        banner.contains(&format!("--target 127.0.0.1:{port} ")) && banner.contains("--source-ips"),
        "{banner}"
    );
    assert!(
        banner.contains(&format!(
            "MESSENGER_CLUSTER_STATE={} ",
            main.state.display()
        )),
        "{banner}"
    );

    let status = run_async(&main, &["status"]).await;
    assert!(status.status.success(), "{}", explain(&status));
    let status_text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert_eq!(
        status_text.matches(" ok (").count(),
        6,
        "{}",
        explain(&status)
    );

    // --- two clients chat through HAProxy ---------------------------------------------------
    let address = format!("127.0.0.1:{port}");
    let ca = main.state.join("node1/tls/dev-ca.pem");
    let options = || {
        let mut o = ConnectOptions::new(address.clone(), Trust::CaFile(ca.clone()));
        o.request_timeout = Duration::from_secs(60);
        o.connect_timeout = Duration::from_secs(30);
        o
    };
    let mut alice = Client::connect(options())
        .await
        .expect("connect through haproxy");
    alice
        .register("alice", PASSWORD, "Alice")
        .await
        .expect("register");
    alice
        .login("alice", PASSWORD, "laptop")
        .await
        .expect("login");
    let mut bob = Client::connect(options())
        .await
        .expect("connect through haproxy");
    let b = bob
        .register("bob", PASSWORD, "Bob")
        .await
        .expect("register");
    bob.login("bob", PASSWORD, "phone").await.expect("login");
    alice
        .conn()
        .send_text(Recipient::User(b.user_id), "hello through the balancer")
        .await
        .expect("send");
    let got = deliveries(&mut bob, 1).await;
    assert_eq!(text(&got[0]), "hello through the balancer");
    drop(alice);
    drop(bob);

    // --- a port of another cluster is taken: start refuses before starting anything ---------
    // Chosen now, so `auto` above cannot have picked these ports.
    let taken_base = free_port_base();
    let taken = Settings::new(dir.path().join("taken"), &taken_base.to_string());
    let _cleanup_taken = Cleanup(vec![taken.clone()]);
    let blocker =
        std::net::TcpListener::bind(("127.0.0.1", taken_base + 8)).expect("hold node1's port");
    let refused = run_async(&taken, &["start"]).await;
    assert!(!refused.status.success(), "{}", explain(&refused));
    let message = all_output(&refused);
    assert!(
        message.contains(&format!("port {} ", taken_base + 8))
            && message.contains("MESSENGER_CLUSTER_PORT"),
        "names the port and the variable: {message}"
    );
    nothing_running(&taken.state).expect("a refused start leaves nothing running");
    for offset in [0, 9, 10, 38, 39, 40, 47, 48] {
        assert!(
            port_free(taken_base + offset),
            "port {} is free again",
            taken_base + offset
        );
    }
    drop(blocker);

    // --- a node exits during start: its log is shown, everything started is stopped ---------
    let failed = run_async(&failing, &["start"]).await;
    assert!(!failed.status.success(), "{}", explain(&failed));
    let message = all_output(&failed);
    assert!(
        message.contains("node1") && message.contains("exited during start"),
        "{message}"
    );
    assert!(
        message.contains("not-a-number"),
        "the node's log tail: {message}"
    );
    assert!(
        message.contains("stopping what it started: redis"),
        "{message}"
    );
    wait_nothing_running(&failing.state).await;

    // --- status notices a dead node ---------------------------------------------------------
    let node2 = pid_of(&main.state, "node2").expect("node2 pid");
    let killed = Command::new("kill")
        .args(["-KILL", &node2.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let mut down = None;
    for _ in 0..300 {
        let status = run_async(&main, &["status"]).await;
        if !status.status.success() {
            down = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let down = down.expect("status fails once node2 is gone");
    let down_text = String::from_utf8_lossy(&down.stdout).into_owned();
    assert!(
        down_text
            .lines()
            .any(|l| l.starts_with("node2") && l.contains("DOWN")),
        "{}",
        explain(&down)
    );
    assert_eq!(down_text.matches(" ok (").count(), 5, "{}", explain(&down));

    // --- stop --purge: processes, database and state dir gone -------------------------------
    let database_exists = || {
        psql(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{}'",
            main.database
        ))
    };
    assert_eq!(database_exists(), "1");
    let purged = run_async(&main, &["stop", "--purge"]).await;
    assert!(purged.status.success(), "{}", explain(&purged));
    assert_eq!(database_exists(), "0", "{}", explain(&purged));
    assert!(!main.state.exists(), "{}", explain(&purged));
    assert!(!alive(redis_pid), "its Redis is stopped");
    let status = run_async(&main, &["status"]).await;
    assert!(!status.status.success(), "{}", explain(&status));
}
