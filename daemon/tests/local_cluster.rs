//! `deploy/local-cluster` as a new user runs it: start (PostgreSQL, Redis, three nodes,
//! HAProxy), two clients chatting through the balancer, status, stop. Run on ports and a
//! database of its own so it never meets a cluster someone started by hand.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{PASSWORD, deliveries, text};
use messenger_protocol::client::{Client, ConnectOptions, Recipient, Trust};

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster")
}

/// A base port whose neighbours the script uses (base, +8..+10, +38..+40, +47) are all free.
fn free_port_base() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + rand::random::<u16>() % 30_000;
        let ports = [0, 8, 9, 10, 38, 39, 40, 47].map(|o| base + o);
        if ports
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            return base;
        }
    }
    panic!("no free port range found");
}

/// Where and how this test's cluster runs.
#[derive(Clone)]
struct Settings {
    state: std::path::PathBuf,
    port: u16,
    database: String,
}

fn run(settings: &Settings, command: &str) -> Output {
    Command::new(script())
        .arg(command)
        .env("MESSENGER_CLUSTER_STATE", &settings.state)
        .env("MESSENGER_CLUSTER_PORT", settings.port.to_string())
        .env("MESSENGER_CLUSTER_DB", &settings.database)
        .env("MESSENGERD", env!("CARGO_BIN_EXE_messengerd"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("local-cluster runs")
}

/// Stops the cluster and drops its database however the test ends.
struct Cleanup(Settings);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = run(&self.0, "stop");
        let _ = Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.0.database
            ))
            .output();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_cluster_starts_serves_clients_through_haproxy_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = Settings {
        state: dir.path().to_path_buf(),
        port: free_port_base(),
        database: format!("msglocal_{:016x}", rand::random::<u64>()),
    };
    let _cleanup = Cleanup(settings.clone());
    let started = tokio::task::spawn_blocking({
        let settings = settings.clone();
        move || run(&settings, "start")
    })
    .await
    .expect("start task");
    assert!(started.status.success(), "{}", explain(&started));
    let banner = String::from_utf8_lossy(&started.stdout).into_owned()
        + &String::from_utf8_lossy(&started.stderr);
    assert!(banner.contains("Messenger cluster is up"), "{banner}");

    let address = format!("127.0.0.1:{}", settings.port);
    let ca = settings.state.join("node1/tls/dev-ca.pem");
    let options = || {
        let mut o = ConnectOptions::new(address.clone(), Trust::CaFile(ca.clone()));
        o.request_timeout = Duration::from_secs(10);
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

    let status = run(&settings, "status");
    let status_text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert_eq!(
        status_text.matches("/readyz: ready").count(),
        3,
        "{}",
        explain(&status)
    );
    assert!(status_text.contains("listening"), "{}", explain(&status));

    let stopped = run(&settings, "stop");
    assert!(stopped.status.success(), "{}", explain(&stopped));
    let after = run(&settings, "status");
    let after_text = String::from_utf8_lossy(&after.stdout).into_owned();
    assert_eq!(
        after_text.matches("not running").count(),
        4,
        "{}",
        explain(&after)
    );
}
