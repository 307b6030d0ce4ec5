//! `messenger-loadtest attack` at small scale against a real daemon (in this process, real
//! TLS, the default limits): every attack of the audit runs while bystanders message each
//! other, and the test asserts what the bystanders are promised — every message delivered
//! once and in order, their own devices still log in — and that the attacks really ran into
//! the daemon's limits. Bounded by counts; never a timing or a latency.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use messenger_daemon::{Config, RunningServer};
use serde_json::Value;

const BUDGET: usize = 16 * 1024 * 1024;
const PAIRS: u64 = 4;
const PROBE_LOGINS: u64 = 4;

async fn daemon(dir: &Path) -> RunningServer {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.passwords.argon2_memory_kib = 1024;
    c.passwords.argon2_iterations = 1;
    c.memory.max_buffered_bytes = BUDGET;
    c.store.sqlite_sync_full = false;
    RunningServer::start(c).await.expect("daemon starts")
}

fn attack(server: &RunningServer, dir: &Path) -> Value {
    let json = dir.join("attack.json");
    let ca = server.dev_ca.clone().expect("dev CA");
    let out = Command::new(env!("CARGO_BIN_EXE_messenger-loadtest"))
        .args(["--target", &server.addr.to_string()])
        .args(["--admin", &server.admin_addr.to_string()])
        .arg("--ca")
        .arg(&ca)
        .arg("--token-cache")
        .arg(dir.join("tokens.json"))
        .arg("--json")
        .arg(&json)
        .args([
            "--no-progress",
            "--daemon-pid",
            &std::process::id().to_string(),
        ])
        .args([
            "--messages",
            "30",
            "--rate",
            "100",
            "--warmup",
            "1",
            "--drain",
            "60",
        ])
        .args(["attack", "--pairs", &PAIRS.to_string()])
        .args([
            "--attack-ips",
            "4",
            "--slow-readers",
            "4",
            "--flooders",
            "1",
        ])
        .args(["--half-frames", "20", "--connections", "20"])
        // Above the admin port's cap of 64: some must be refused.
        .args(["--admin-connections", "80"])
        .args(["--attack-rate", "50", "--probe-accounts", "2"])
        .args(["--probe-logins", &PROBE_LOGINS.to_string(), "--settle", "0"])
        .output()
        .expect("run messenger-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "messenger-loadtest attack failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json).expect("json report");
    serde_json::from_str(&text).expect("valid json")
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// F1, F2, F4, F5, F6, F9, F10 together: under every attack at once, the bystanders lose
/// nothing, get nothing twice or out of order, and their own devices (holding login cookies)
/// still log in while their accounts are locked for every other device; the daemon buffers no
/// more than its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bystanders_lose_nothing_and_still_log_in_while_every_attack_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = daemon(dir.path()).await;
    // The buffered bytes, watched from inside the daemon for the whole run.
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (peak, done, shared) = (peak.clone(), done.clone(), server.shared.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(shared.memory.in_use(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let d = dir.path().to_path_buf();
    let report = tokio::task::block_in_place(|| attack(&server, &d));
    done.store(true, Ordering::Relaxed);
    watcher.await.expect("watcher");

    let a = &report["outcome"]["attack"];
    for phase in ["baseline", "attacked"] {
        let check = &a[phase]["check"];
        for key in ["lost", "duplicates", "reordered", "misdelivered", "foreign"] {
            assert_eq!(check[key], 0, "{phase}: {key} in {check}");
        }
        let owed = count(&check["expected_deliveries"]);
        assert_eq!(
            owed,
            PAIRS * 2 * 30,
            "{phase}: every send accepted: {check}"
        );
        assert_eq!(count(&check["delivered"]), owed, "{phase}: {check}");
        let logins = &a[phase]["cookie_logins"];
        assert_eq!(
            count(&logins["attempted"]),
            PROBE_LOGINS,
            "{phase}: {logins}"
        );
        assert_eq!(
            count(&logins["succeeded"]),
            PROBE_LOGINS,
            "{phase}: a bystander's own device was refused: {logins}"
        );
    }
    let attackers = &a["attackers"];
    // The cookie logins above meant something: every bystander account was locked for
    // devices it does not know before phase B's logins were tried.
    assert_eq!(
        count(&attackers["lockout"]["accounts_locked_for_unknown_devices"]),
        PAIRS * 2,
        "{attackers}"
    );
    assert_eq!(
        count(&attackers["slow_readers"]["stalled_readers"]),
        4,
        "{attackers}"
    );
    assert!(
        count(&attackers["slow_readers"]["flood_messages_accepted"]) > 0,
        "{attackers}"
    );
    assert!(
        count(&attackers["admin"]["refused_at_capacity"]) > 0,
        "80 idle connections against a cap of 64: {attackers}"
    );
    assert!(
        count(&attackers["resume_storm"]["resumed"]) > 0,
        "{attackers}"
    );
    assert!(
        count(&attackers["half_frames"]["opened"]) > 0,
        "{attackers}"
    );
    assert!(
        count(&attackers["invalid_resumes"]["unauthenticated"]) > 0,
        "{attackers}"
    );
    let buffered = peak.load(Ordering::Relaxed);
    assert!(
        buffered <= BUDGET,
        "the daemon buffered {buffered} bytes, over its budget of {BUDGET}"
    );
    server.shutdown().await;
}
