//! A launcher for local deployments made of real processes: a cluster of `messengerd` nodes on
//! PostgreSQL (a fresh database, on a throwaway server by default) and a `redis-server` of its
//! own, behind HAProxy started from `deploy/haproxy.cfg`; or one `messengerd` on its embedded
//! SQLite store. It owns every process it starts (killed on drop) and the operations faults
//! are made of: signals, restarts, readiness, stopping and starting Redis and PostgreSQL.

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// How long a process gets to become ready (or to stop) before the launcher gives up.
pub const WAIT: Duration = Duration::from_secs(60);

/// The admin URL of the usual local PostgreSQL server.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Where the cluster's PostgreSQL comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostgresChoice {
    /// A server of the launcher's own (initdb in the state dir), so it can be stopped.
    Throwaway,
    /// An existing server; `admin_url` names a database where the user may CREATE DATABASE.
    Server { admin_url: String },
}

impl std::str::FromStr for PostgresChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "throwaway" => Ok(Self::Throwaway),
            "server" => Ok(Self::Server {
                admin_url: DEFAULT_POSTGRES_URL.into(),
            }),
            url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Self::Server {
                    admin_url: url.into(),
                })
            }
            other => Err(format!(
                "{other:?}: give `throwaway`, `server` ({DEFAULT_POSTGRES_URL}) or a postgres:// admin URL"
            )),
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub messengerd: PathBuf,
    pub haproxy_cfg: PathBuf,
    /// `deploy/haproxy.cfg` names three servers, so a cluster has three nodes.
    pub nodes: usize,
    pub postgres: PostgresChoice,
    /// Keep the state dir (logs, node data) and the database when done.
    pub keep: bool,
    /// HAProxy's health-check interval (`CHECK_INTER`).
    pub check_inter: Duration,
    /// `--shutdown-drain` seconds of every node.
    pub shutdown_drain_secs: u64,
    /// `RUST_LOG` of the nodes.
    pub node_log: String,
}

impl LaunchOptions {
    pub fn new(messengerd: PathBuf, haproxy_cfg: PathBuf) -> Self {
        Self {
            messengerd,
            haproxy_cfg,
            nodes: 3,
            postgres: PostgresChoice::Throwaway,
            keep: false,
            check_inter: Duration::from_millis(300),
            shutdown_drain_secs: 1,
            node_log: "warn,messenger_daemon::cluster=info".into(),
        }
    }
}

/// `messengerd` next to the running executable (both are built into the same target dir).
pub fn default_messengerd() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()
        .context("locating the running executable")?
        .with_file_name("messengerd"))
}

pub fn free_addr() -> anyhow::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port")
}

/// A directory for logs and data, removed on drop unless kept.
struct StateDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl StateDir {
    fn new(prefix: &str, keep: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("creating a state dir")?;
        // A throwaway PostgreSQL runs as `postgres` when we are root: it must reach its subdir.
        set_mode(dir.path(), 0o755)?;
        let path = dir.path().to_path_buf();
        Ok(Self {
            dir: if keep {
                let _ = dir.keep();
                None
            } else {
                Some(dir)
            },
            path,
        })
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        // Dropping the TempDir removes it; a kept one was detached already.
        self.dir.take();
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Sends a signal by name (`KILL`, `STOP`, `CONT`, `TERM`) to a pid.
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .context("running kill")?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// One `messengerd` process, restartable with the same arguments and data dir.
pub struct Node {
    pub index: usize,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    args: Vec<String>,
    binary: PathBuf,
    log_filter: String,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl Node {
    fn new(
        index: usize,
        dir: PathBuf,
        binary: &Path,
        log_filter: &str,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let listen = free_addr()?;
        let admin = free_addr()?;
        let mut args: Vec<String> = [
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            &admin.to_string(),
            "--data-dir",
            &dir.display().to_string(),
            // Set-up is not what is measured: cheap password hashing, limits out of the way.
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
            "--login-failures-per-account",
            "1000000",
            "--login-failures-per-cookie",
            "1000000",
            "--invalid-resumes-per-ip",
            "1000000",
            "--resumes-per-device-per-minute",
            "1000000",
            "--resume-burst-per-device",
            "1000000",
            "--hash-queue",
            "1000000",
            "--max-connections-per-ip",
            "100000",
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(extra.iter().cloned());
        Ok(Self {
            index,
            listen,
            admin,
            dir,
            args,
            binary: binary.to_path_buf(),
            log_filter: log_filter.into(),
            child: None,
            starts: 0,
        })
    }

    /// Its cluster node id (`--node-id`), as `HelloOk.node` and fence reasons name it.
    pub fn id(&self) -> String {
        format!("node{}", self.index)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("messengerd.log")
    }

    /// Starts the process (its log is appended to, so restarts keep the history).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        ensure!(
            self.binary.exists(),
            "{} not found: build it first (cargo build --release -p messenger-daemon) or pass --messengerd PATH",
            self.binary.display()
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env("RUST_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn signal(&self, name: &str) -> anyhow::Result<()> {
        let pid = self
            .pid()
            .with_context(|| format!("node {} is not running", self.index))?;
        signal(pid, name)
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A frozen process dies only once resumed.
            let _ = signal(child.id(), "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn freeze(&self) -> anyhow::Result<()> {
        self.signal("STOP")
    }

    pub fn thaw(&self) -> anyhow::Result<()> {
        self.signal("CONT")
    }

    /// SIGTERM, then waits for the drain and a clean exit.
    pub async fn terminate(&mut self) -> anyhow::Result<()> {
        self.signal("TERM")?;
        let mut child = self.child.take().context("not running")?;
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for messengerd")? {
                ensure!(
                    status.success(),
                    "node {} exited with {status} after SIGTERM; see {}",
                    self.index,
                    self.log_path().display()
                );
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "node {} did not stop within {WAIT:?} of SIGTERM",
                    self.index
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True when `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        http_get(self.admin, "/readyz")
            .await
            .lines()
            .next()
            .is_some_and(|l| l.contains(" 200 "))
    }

    /// Waits for `/readyz` 200; fails at once if the process exited.
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.is_ready().await {
                return Ok(());
            }
            ensure!(
                self.is_running(),
                "node {} exited; see {}",
                self.index,
                self.log_path().display()
            );
            ensure!(
                Instant::now() < deadline,
                "node {} not ready within {WAIT:?}; see {}",
                self.index,
                self.log_path().display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts it again (killing what is left of it) and waits until ready. A node that exits
    /// before it is ready is started again until [`WAIT`] passes: after a SIGKILL its old
    /// registration may outlive it for a heartbeat TTL.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let deadline = Instant::now() + WAIT;
        loop {
            self.spawn()?;
            match self.ready().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline && !self.is_running() => {
                    tracing::info!(node = self.index, error = %e, "restart failed; retrying");
                    self.kill();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The sum of a counter's series on `/metrics` (0 when absent or unreachable).
    pub async fn metric(&self, name: &str) -> f64 {
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
        self.kill();
    }
}

/// A `redis-server` on a free port in its own dir, without persistence (a restart starts
/// empty, as a cache node replaced by a new one does).
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub fn start(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut redis = Self {
            port: free_addr()?.port(),
            dir,
            child: None,
        };
        redis.start_again()?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it (again) on the same port.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "redis is running");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install -y redis-server)")?;
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            ensure!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills it: connections are cut at once, as when the host dies.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL server in a directory of its own (trust auth, fsync off, a free port), run
/// from the newest installed server binaries; as root it runs as `postgres`.
pub struct ThrowawayPostgres {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_root: bool,
    running: bool,
}

impl ThrowawayPostgres {
    pub fn start(dir: PathBuf) -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_root {
            // initdb refuses to run as root.
            run(Command::new("chown").arg("postgres:postgres").arg(&dir))?;
        }
        let mut pg = Self {
            dir,
            bin,
            port: free_addr()?.port(),
            as_root,
            running: false,
        };
        run(pg.command("initdb").arg("-D").arg(pg.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]))?;
        pg.start_again()?;
        Ok(pg)
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        let mut c = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        };
        c.stdin(Stdio::null());
        c
    }

    /// Starts the server (again, after `stop`) on the same port and data.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=300",
            self.port,
            self.dir.display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-o", &options, "start"]))?;
        self.running = true;
        Ok(())
    }

    /// Fast shutdown: open connections are cut, as in a crash or failover.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "fast", "stop"]))?;
        self.running = false;
        Ok(())
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-m", "immediate", "stop"])
                .output();
        }
    }
}

/// The newest installed PostgreSQL server binaries (Debian keeps them off PATH).
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((version, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install -y postgresql), \
         or pass --postgres server / --postgres postgres://... to use a running server",
    )
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A database of the cluster's own, dropped at the end unless kept.
pub struct Database {
    admin_url: String,
    pub name: String,
    pub url: String,
    keep: bool,
}

impl Database {
    pub async fn create(admin_url: &str, keep: bool) -> anyhow::Result<Self> {
        let name = format!("messenger_chaos_{:016x}", rand::random::<u64>());
        let client = admin_client(admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("CREATE DATABASE {name} on {admin_url}"))?;
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) if server.contains("://") => format!("{server}/{name}"),
            _ => bail!("the PostgreSQL admin URL must end in /<database>: {admin_url}"),
        };
        Ok(Self {
            admin_url: admin_url.into(),
            name,
            url,
            keep,
        })
    }
}

async fn admin_client(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut config: tokio_postgres::Config = url
        .parse()
        .with_context(|| format!("bad PostgreSQL URL {url}"))?;
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL is not reachable at {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

impl Drop for Database {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop cannot await and may run on the runtime's own thread: a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                admin_client(&url)
                    .await
                    .ok()?
                    .batch_execute(&sql)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// HAProxy in front of the nodes.
struct Balancer {
    child: Child,
    stats: SocketAddr,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PostgreSQL as the cluster uses it.
enum Postgres {
    Throwaway(ThrowawayPostgres),
    Server,
}

/// Three `messengerd` nodes on PostgreSQL and Redis behind HAProxy. Fields drop in order:
/// balancer, nodes, Redis, database, PostgreSQL, state dir.
pub struct Cluster {
    balancer: Balancer,
    pub nodes: Vec<Node>,
    redis: Redis,
    database: Database,
    postgres: Postgres,
    state: StateDir,
    /// Where clients connect: the balancer.
    pub address: SocketAddr,
    /// The CA every node's certificate chains to.
    pub ca: PathBuf,
}

impl Cluster {
    pub async fn start(opts: &LaunchOptions) -> anyhow::Result<Self> {
        ensure!(
            opts.nodes == 3,
            "{} names three servers: a cluster has 3 nodes, not {}",
            opts.haproxy_cfg.display(),
            opts.nodes
        );
        ensure!(
            opts.haproxy_cfg.exists(),
            "{} not found: run from the repository root or pass --haproxy-cfg PATH",
            opts.haproxy_cfg.display()
        );
        let state = StateDir::new("messenger-chaos-cluster-", opts.keep)?;
        let postgres = match &opts.postgres {
            PostgresChoice::Throwaway => {
                Postgres::Throwaway(ThrowawayPostgres::start(state.path.join("postgres"))?)
            }
            PostgresChoice::Server { .. } => Postgres::Server,
        };
        let admin_url = match (&postgres, &opts.postgres) {
            (Postgres::Throwaway(pg), _) => pg.admin_url(),
            (_, PostgresChoice::Server { admin_url }) => admin_url.clone(),
            (Postgres::Server, PostgresChoice::Throwaway) => bail!("no PostgreSQL server"),
        };
        let database = Database::create(&admin_url, opts.keep).await?;
        let redis = Redis::start(state.path.join("redis"))?;
        let mut nodes: Vec<Node> = Vec::new();
        for index in 1..=opts.nodes {
            let mut extra: Vec<String> = [
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
                "--shutdown-drain",
                &opts.shutdown_drain_secs.to_string(),
            ]
            .iter()
            .map(ToString::to_string)
            .collect();
            // One certificate for every node, as behind a balancer: the first node's.
            if let Some(first) = nodes.first() {
                let tls = first.dir.join("tls");
                extra.extend([
                    "--tls-cert".into(),
                    tls.join("cert.pem").display().to_string(),
                    "--tls-key".into(),
                    tls.join("key.pem").display().to_string(),
                ]);
            }
            let mut node = Node::new(
                index,
                state.path.join(format!("node{index}")),
                &opts.messengerd,
                &opts.node_log,
                &extra,
            )?;
            node.spawn()?;
            // The first node writes the certificate the others use: one at a time.
            node.ready().await?;
            nodes.push(node);
        }
        let ca = nodes[0].dir.join("tls").join("dev-ca.pem");
        let address = free_addr()?;
        let stats = free_addr()?;
        let log = std::fs::File::create(state.path.join("haproxy.log"))
            .context("creating haproxy.log")?;
        let mut haproxy = Command::new("haproxy");
        haproxy
            .args(["-db", "-f"])
            .arg(&opts.haproxy_cfg)
            .env("HAPROXY_BIND", address.to_string())
            .env("HAPROXY_STATS_BIND", stats.to_string())
            .env(
                "CHECK_INTER",
                format!("{}ms", opts.check_inter.as_millis().max(1)),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null());
        for node in &nodes {
            haproxy
                .env(format!("NODE{}_ADDR", node.index), node.listen.to_string())
                .env(
                    format!("NODE{}_CHECK_PORT", node.index),
                    node.admin.port().to_string(),
                );
        }
        let child = haproxy
            .spawn()
            .context("starting haproxy (apt-get install -y haproxy)")?;
        let cluster = Self {
            balancer: Balancer { child, stats },
            nodes,
            redis,
            database,
            postgres,
            state,
            address,
            ca,
        };
        cluster.balanced().await?;
        Ok(cluster)
    }

    /// Logs and node data live here.
    pub fn dir(&self) -> &Path {
        &self.state.path
    }

    pub fn database(&self) -> &str {
        &self.database.name
    }

    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    pub fn stop_redis(&mut self) {
        self.redis.stop();
    }

    pub fn start_redis(&mut self) -> anyhow::Result<()> {
        self.redis.start_again()
    }

    /// Only a throwaway server can be stopped: the launcher never stops the machine's own.
    pub fn stop_postgres(&mut self) -> anyhow::Result<()> {
        match &mut self.postgres {
            Postgres::Throwaway(pg) => pg.stop(),
            Postgres::Server => bail!("PostgreSQL faults need --postgres throwaway"),
        }
    }

    pub fn start_postgres(&mut self) -> anyhow::Result<()> {
        match &mut self.postgres {
            Postgres::Throwaway(pg) => pg.start_again(),
            Postgres::Server => bail!("PostgreSQL faults need --postgres throwaway"),
        }
    }

    pub fn can_stop_postgres(&self) -> bool {
        matches!(self.postgres, Postgres::Throwaway(_))
    }

    /// How many nodes HAProxy has up (from its stats CSV).
    pub async fn balancer_up(&self) -> usize {
        http_get(self.balancer.stats, "/;csv")
            .await
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split(',').collect();
                f.len() > 17
                    && f[0] == "messengerd"
                    && f[1].starts_with("node")
                    && !f[1].ends_with("-degraded")
                    && f[17] == "UP"
            })
            .count()
    }

    /// Waits until every node is ready and HAProxy routes to all of them.
    pub async fn balanced(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut ready = 0;
            for node in &self.nodes {
                if node.is_ready().await {
                    ready += 1;
                }
            }
            let up = self.balancer_up().await;
            if ready == self.nodes.len() && up == self.nodes.len() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "cluster not healthy within {WAIT:?}: {ready} nodes ready, {up} up in HAProxy; see {}",
                self.state.path.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node that is not running is restarted, then waits for `balanced`.
    pub async fn heal(&mut self) -> anyhow::Result<()> {
        for node in &mut self.nodes {
            if !node.is_running() {
                node.restart().await?;
            }
        }
        self.balanced().await
    }
}

/// One `messengerd` on its embedded SQLite store, clients connecting to it directly.
pub struct SingleNode {
    pub node: Node,
    state: StateDir,
    pub ca: PathBuf,
}

impl SingleNode {
    pub async fn start(opts: &LaunchOptions) -> anyhow::Result<Self> {
        let state = StateDir::new("messenger-chaos-single-", opts.keep)?;
        let mut node = Node::new(
            1,
            state.path.join("node"),
            &opts.messengerd,
            &opts.node_log,
            &[
                "--shutdown-drain".into(),
                opts.shutdown_drain_secs.to_string(),
            ],
        )?;
        node.spawn()?;
        node.ready().await?;
        let ca = node.dir.join("tls").join("dev-ca.pem");
        Ok(Self { node, state, ca })
    }

    pub fn address(&self) -> SocketAddr {
        self.node.listen
    }

    pub fn dir(&self) -> &Path {
        &self.state.path
    }
}

/// A plain HTTP/1.0 GET; empty on any failure (the caller polls).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
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
