//! Test support shared by the unit tests, the integration tests and the tools: a PostgreSQL
//! server for the tests that need one, and a database of their own on it. Not used by the
//! daemon itself.
//!
//! Which server: `MESSENGER_TEST_POSTGRES_URL` when set; else the usual one on
//! 127.0.0.1:5432 when it answers; else a throwaway server started once per test process from
//! the installed PostgreSQL binaries (and stopped by a watchdog when the process exits); else
//! the test fails with the command that installs PostgreSQL. Never a silent skip.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin URL (a database where the user may `CREATE DATABASE`) of the test server.
pub fn postgres_admin_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("MESSENGER_TEST_POSTGRES_URL") {
            return url;
        }
        let usual = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
        if std::net::TcpStream::connect_timeout(&usual, Duration::from_secs(1)).is_ok() {
            return DEFAULT_POSTGRES_URL.to_owned();
        }
        let server = ThrowawayPostgres::start();
        let url = server.url();
        server.stop_when_process_exits();
        url
    })
    .clone()
}

/// The newest installed PostgreSQL server binaries (Debian keeps them off PATH).
pub fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is neither reachable on 127.0.0.1:5432 nor installed. Install it \
             (apt-get install -y postgresql), start it, or set MESSENGER_TEST_POSTGRES_URL \
             (script/test does all of this)"
        )
    })
}

/// A PostgreSQL server in a temporary directory (trust auth, fsync off, a free port), so a
/// test can stop and start it. Stopped on drop.
pub struct ThrowawayPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_root: bool,
}

impl ThrowawayPostgres {
    pub fn start() -> ThrowawayPostgres {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        // initdb refuses to run as root: as root the server runs as `postgres`, which must own
        // the directory.
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if as_root {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let pg = ThrowawayPostgres {
            dir,
            bin,
            port,
            as_root,
        };
        run(pg.command("initdb").arg("-D").arg(pg.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]));
        pg.start_again();
        pg
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let tool = self.bin.join(tool);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(tool);
            c
        } else {
            Command::new(tool)
        }
    }

    /// Starts the server (again, after `stop`) on the same port and data.
    pub fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-w", "-o", &options, "start"]));
    }

    /// Fast shutdown: open connections are cut, as in a crash or failover from the daemon's
    /// point of view.
    pub fn stop(&self) {
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "fast", "stop"]));
    }

    /// Leaves the server running for the rest of this process and has a small watchdog stop
    /// it and remove its directory once the process is gone (tests have no exit hook).
    fn stop_when_process_exits(self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let runner = if self.as_root {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let dir = self.dir.path().to_path_buf();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             {runner}{pg_ctl} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            pid = std::process::id(),
            pg_ctl = pg_ctl.display(),
            data = dir.join("data").display(),
            dir = dir.display(),
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        // Neither stop the server nor delete its directory now: the watchdog owns both.
        std::mem::forget(self);
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        // Already stopped is fine; the directory goes with the TempDir.
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}

fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A database of its own on the test server, dropped (connections and all) at the end, even
/// when the test panicked.
pub struct TestDatabase {
    admin_url: String,
    pub name: String,
    /// URL of the new database.
    pub url: String,
}

impl TestDatabase {
    pub async fn create(prefix: &str) -> TestDatabase {
        let admin_url = postgres_admin_url();
        let name = format!("{prefix}_{:016x}", rand::random::<u64>());
        let client = admin_client(&admin_url).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE for the test");
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) if server.contains("://") => format!("{server}/{name}"),
            _ => panic!("the test PostgreSQL URL must end in /<database>: {admin_url}"),
        };
        TestDatabase {
            admin_url,
            name,
            url,
        }
    }
}

async fn admin_client(url: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("bad test PostgreSQL URL {url}: {e}"));
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is not reachable at {url}: {e}. Start it with `pg_ctlcluster \
             --skip-systemctl-redirect $(ls /etc/postgresql) main start` (or run script/test), \
             or set MESSENGER_TEST_POSTGRES_URL"
            )
        });
    tokio::spawn(connection);
    client
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop cannot await, and the test's runtime may be the one running this: a runtime
        // of its own on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                let client = admin_client(&url).await;
                client.batch_execute(&sql).await.ok()
            })
        })
        .join();
    }
}
