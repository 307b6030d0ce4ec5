//! The client-connection cap derived from the open-file limit, in a daemon process of its own
//! started under `ulimit -n` (lowering the limit of the test process would starve every other
//! test in it). Configured far above what its descriptors allow, the daemon says so, serves
//! exactly its effective cap, refuses the rest with the documented error instead of running
//! out of descriptors, and its admin port and accept loop stay alive through a burst.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use common::{code, http_get};
use messenger_daemon::config::{Config, StoreBackend};
use messenger_daemon::fd_limit;
use messenger_daemon::server::AT_CAPACITY;
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, ConnectOptions, Trust};

/// Small enough to exhaust from a test, large enough for the daemon's fixed needs.
const OPEN_FILES: u64 = 256;
const ADMIN_CAP: usize = 8;
/// Far above what OPEN_FILES allows: the audit's case of a cap above the descriptor limit.
const CONFIGURED: usize = 100_000;

struct Banner {
    addr: String,
    admin: std::net::SocketAddr,
    cap: usize,
    open_files: u64,
}

fn spawn(dir: &Path, log: &Path) -> (common::KillOnDrop, Banner) {
    let log_file = std::fs::File::create(log).expect("log file");
    // `ulimit -n` sets the soft and the hard limit: the daemon cannot raise it back.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {OPEN_FILES} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_messengerd"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
        .args(["--max-connections", &CONFIGURED.to_string()])
        .args(["--admin-max-connections", &ADMIN_CAP.to_string()])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(log_file)
        .spawn()
        .expect("spawn messengerd");
    let stdout = child.stdout.take().expect("stdout");
    let guard = common::KillOnDrop(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut addr = None;
    let mut admin = None;
    let mut budget = None;
    for line in lines.by_ref() {
        let line = line.expect("banner line");
        if let Some(rest) = line.strip_prefix("messengerd listening on ") {
            addr = rest.split_whitespace().next().map(str::to_string);
        } else if let Some(rest) = line.trim().strip_prefix("admin:") {
            admin = rest
                .trim()
                .strip_prefix("http://")
                .and_then(|r| r.split('/').next())
                .and_then(|a| a.parse().ok());
        } else if let Some(rest) = line.trim().strip_prefix("connections: at most ") {
            // "N clients (open-file limit L, H kept for ...)"
            let cap = rest.split_whitespace().next().and_then(|n| n.parse().ok());
            let limit = rest
                .split("open-file limit ")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse().ok());
            budget = cap.zip(limit);
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (cap, open_files) = budget.expect("the banner states the connection cap");
    let banner = Banner {
        addr: addr.expect("client address in the banner"),
        admin: admin.expect("admin address in the banner"),
        cap,
        open_files,
    };
    (guard, banner)
}

async fn healthz_ok(admin: std::net::SocketAddr) {
    let health = tokio::time::timeout(common::WAIT, http_get(admin, "/healthz"))
        .await
        .expect("/healthz answers");
    assert!(health.contains(" 200 "), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_low_open_file_limit_the_daemon_refuses_cleanly_instead_of_running_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("messengerd.log");
    let (_daemon, banner) = spawn(&dir.path().join("data"), &log);

    // The same arithmetic as the daemon's, for the same settings.
    let mut config = Config::default();
    config.store.backend = StoreBackend::Sqlite;
    config.limits.max_connections = CONFIGURED;
    config.admin.max_connections = ADMIN_CAP;
    let headroom = fd_limit::headroom(&config);
    assert_eq!(banner.open_files, OPEN_FILES);
    assert_eq!(banner.cap as u64, OPEN_FILES - headroom);
    assert!(banner.cap < CONFIGURED);

    let ca = dir.path().join("data").join("tls").join("dev-ca.pem");
    let mut options = ConnectOptions::new(banner.addr.clone(), Trust::CaFile(ca));
    options.request_timeout = common::WAIT;
    options.connect_timeout = common::WAIT;

    // Exactly the cap is served...
    let mut served = Vec::new();
    for i in 0..banner.cap {
        let c = Client::connect(options.clone())
            .await
            .unwrap_or_else(|e| panic!("connection {i} of {} refused: {e}", banner.cap));
        served.push(c);
    }
    // ...and every one over it is told why, while the daemon still has descriptors to spare.
    for _ in 0..10 {
        let Err(e) = Client::connect(options.clone()).await else {
            panic!("a connection over the cap was served");
        };
        assert_eq!(code(&e), Some(ErrorCode::Unavailable), "{e}");
        assert!(e.to_string().contains(AT_CAPACITY), "{e}");
    }
    healthz_ok(banner.admin).await;

    // A burst of bare TCP connections, more than the daemon answers with a TLS refusal at once:
    // the ones past that are closed unanswered, and the accept loop lives on.
    let mut burst = Vec::new();
    for _ in 0..(fd_limit::REFUSAL_SLOTS * 3) {
        if let Ok(s) = tokio::net::TcpStream::connect(&banner.addr).await {
            burst.push(s);
        }
    }
    healthz_ok(banner.admin).await;
    served[0]
        .conn()
        .ping()
        .await
        .expect("a served connection keeps working");
    drop(burst);

    // A freed slot goes to the next client (once the daemon saw the close; bounded retries).
    // Until the daemon has noticed the burst's closes too, its refusal slots may still be
    // taken, and an attempt is then closed before TLS: a transport error, not a wire one.
    let leaving = served.pop().expect("one served");
    leaving.close().await;
    drop(leaving);
    let mut back = None;
    for _ in 0..300 {
        match Client::connect(options.clone()).await {
            Ok(c) => {
                back = Some(c);
                break;
            }
            Err(e) => assert!(
                matches!(code(&e), None | Some(ErrorCode::Unavailable)),
                "{e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = back.expect("the accept loop never served again");
    back.conn().ping().await.expect("served");
    healthz_ok(banner.admin).await;

    let log = std::fs::read_to_string(&log).expect("daemon log");
    assert!(
        log.contains("is above what the open-file limit"),
        "no warning about the configured cap:\n{log}"
    );
    assert!(
        !log.contains("accept failed"),
        "the daemon ran out of descriptors:\n{log}"
    );
}
