//! Test harness: the real daemon in-process on 127.0.0.1:0 with real TLS (its generated
//! development CA), spoken to only through the SDK.
#![allow(dead_code)]

use std::time::Duration;

use messenger_daemon::{Config, RunningServer};
use messenger_protocol::client::{Client, ConnectOptions, Trust};
use messenger_protocol::pb;

pub const PASSWORD: &str = "correct horse battery";
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    server: Option<RunningServer>,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

/// A configuration for tests: ephemeral ports, a temp data dir, cheap argon2 (the hashing
/// itself is tested with production parameters in the unit tests) and generous rate limits.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.passwords.argon2_memory_kib = 1024;
    c.passwords.argon2_iterations = 1;
    c.limits.messages_per_second = 100_000;
    c.limits.message_burst = 100_000;
    c.limits.recipients_per_second = 100_000;
    c.limits.send_bytes_per_second = u32::MAX;
    c.limits.send_bytes_burst = u32::MAX;
    c.limits.recipient_burst = 100_000;
    c.limits.reads_per_second = 100_000;
    c.limits.read_burst = 100_000;
    c.limits.lookups_per_minute = 100_000;
    c.limits.groups_created_per_hour = 100_000;
    c.limits.group_members_added_per_minute = 100_000;
    c.limits.auth_attempts_per_ip = 100_000;
    c.limits.invalid_resumes_per_ip = 100_000;
    c.limits.resumes_per_device_per_minute = 100_000;
    c.limits.resume_burst_per_device = 100_000;
    c.passwords.hash_queue = 100_000;
    c.timeouts.shutdown_drain_secs = 3;
    // Graceful restarts keep data without fsync; the SIGTERM test runs the binary with it on.
    c.store.sqlite_sync_full = false;
    c
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let server = RunningServer::start(config.clone())
            .await
            .expect("server starts");
        Self {
            server: Some(server),
            config,
            dir,
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().expect("server running")
    }

    pub fn options(&self) -> ConnectOptions {
        let server = self.server();
        let ca = server.dev_ca.clone().expect("development CA");
        let mut o = ConnectOptions::new(server.addr.to_string(), Trust::CaFile(ca));
        o.request_timeout = WAIT;
        o
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.options()).await.expect("connect")
    }

    /// Registers `name` and returns a logged-in client for it.
    pub async fn user(&self, name: &str) -> (Client, pb::User) {
        let mut c = self.client().await;
        let user = c
            .register(name, PASSWORD, &format!("{name} display"))
            .await
            .expect("register");
        c.login(name, PASSWORD, "test-device").await.expect("login");
        (c, user)
    }

    /// Like `user`, for tests about groups rather than consent: the account accepts group
    /// additions from anyone (the default is contacts only).
    pub async fn open_user(&self, name: &str) -> (Client, pb::User) {
        let (c, user) = self.user(name).await;
        c.conn()
            .set_group_add_policy(pb::GroupAddPolicy::Anyone)
            .await
            .expect("accept group additions from anyone");
        (c, user)
    }

    /// Another logged-in device of an existing user.
    pub async fn device(&self, name: &str, device: &str) -> Client {
        let mut c = self.client().await;
        c.login(name, PASSWORD, device).await.expect("login");
        c
    }

    /// Graceful shutdown then a fresh start on the same data directory (new ports).
    pub async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
        let server = RunningServer::start(self.config.clone())
            .await
            .expect("server restarts");
        self.server = Some(server);
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }

    pub async fn metrics(&self) -> String {
        http_get(self.server().admin_addr, "/metrics").await
    }
}

/// The value of an unlabelled metric in a Prometheus text exposition (0 when absent).
pub fn metrics_value(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.split_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.0 GET against the admin port.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The text of a delivered message.
pub fn text(d: &pb::Delivery) -> String {
    String::from_utf8_lossy(&d.message.as_ref().expect("message").body).into_owned()
}

/// Reads deliveries until `n` arrived, failing on timeout.
pub async fn deliveries(c: &mut Client, n: usize) -> Vec<pb::Delivery> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match c.next_delivery(WAIT).await {
            Ok(d) => out.push(d),
            Err(e) => panic!("after {} of {n} deliveries: {e}", out.len()),
        }
    }
    out
}

/// Asserts no delivery arrives within a short grace period.
pub async fn assert_quiet(c: &mut Client) {
    match c.next_delivery(Duration::from_millis(300)).await {
        Err(messenger_protocol::client::ClientError::Timeout) => {}
        Ok(d) => panic!("unexpected delivery: {d:?}"),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

pub fn code(e: &messenger_protocol::client::ClientError) -> Option<messenger_protocol::ErrorCode> {
    e.wire_code()
}

/// Points a test configuration at PostgreSQL (`url` names a database the test owns). A short
/// pool timeout, so a request during an outage fails `unavailable` well inside `WAIT`.
pub fn use_postgres(c: &mut Config, url: &str) {
    c.store.backend = messenger_daemon::config::StoreBackend::Postgres;
    c.store.postgres_url = Some(url.to_owned());
    c.store.postgres_pool_size = 4;
    c.store.postgres_timeout_secs = 2;
}

/// Kills a daemon child process even when an assertion fails first.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
