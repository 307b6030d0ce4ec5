//! CI smoke runs of `messenger-loadtest` against a real daemon (in this process, real TLS):
//! a few hundred clients and a few thousand messages per scenario. They assert what the
//! harness checks — zero loss, zero duplicates, zero reordering, and that messages flowed —
//! never a timing. Messaging scenarios are bounded by count (`--messages`), not by seconds.

use std::path::Path;
use std::process::Command;

use messenger_daemon::{Config, RunningServer};

async fn daemon(dir: &Path) -> RunningServer {
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
    c.limits.auth_attempts_per_ip = 1_000_000;
    c.limits.invalid_resumes_per_ip = 1_000_000;
    c.limits.resumes_per_device_per_minute = 1_000_000;
    c.limits.resume_burst_per_device = 1_000_000;
    c.passwords.hash_queue = 1_000_000;
    c.limits.max_connections_per_ip = 100_000;
    c.store.sqlite_sync_full = false;
    RunningServer::start(c).await.expect("daemon starts")
}

/// Runs the harness binary; returns its JSON report.
fn loadtest(server: &RunningServer, dir: &Path, args: &[&str]) -> serde_json::Value {
    let json = dir.join(format!("report-{}.json", args[0]));
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
        .args(args)
        .output()
        .expect("run messenger-loadtest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "messenger-loadtest {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let text = std::fs::read_to_string(&json).expect("json report");
    serde_json::from_str(&text).expect("valid json")
}

fn assert_clean(report: &serde_json::Value) {
    let check = &report["outcome"]["check"];
    for key in ["lost", "duplicates", "reordered", "misdelivered", "foreign"] {
        assert_eq!(check[key], 0, "{key} in {check}");
    }
    let owed = check["expected_deliveries"].as_u64().expect("owed");
    assert!(owed > 0, "nothing was sent: {report}");
    assert_eq!(check["delivered"].as_u64(), Some(owed), "{check}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_harness_checks_every_scenario_end_to_end_with_zero_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = daemon(dir.path()).await;
    let d = dir.path().to_path_buf();
    let s = &server;
    let common = ["--duration", "3", "--warmup", "1", "--drain", "20"];
    // Each sender sends exactly this many; the duration is then only a safety limit.
    let counted = ["--messages", "30", "--warmup", "1", "--drain", "60"];
    let every_message_accounted_for = |report: &serde_json::Value, senders: u64| {
        let check = &report["outcome"]["check"];
        let accepted = check["accepted_messages"].as_u64().expect("accepted");
        let failed = check["failed_sends"].as_u64().expect("failed");
        assert_eq!(accepted + failed, senders * 30, "{check}");
    };

    let direct = tokio::task::block_in_place(|| {
        let mut a = vec!["direct", "--pairs", "100", "--rate", "2000"];
        a.extend(counted);
        loadtest(s, &d, &a)
    });
    assert_clean(&direct);
    every_message_accounted_for(&direct, 200);
    // The daemon's own counters agree with the harness.
    let accepted = direct["outcome"]["accepted"].as_f64();
    assert_eq!(
        direct["outcome"]["daemon_metrics"]["messenger_messages_accepted_total"].as_f64(),
        accepted,
        "{}",
        direct["outcome"]["daemon_metrics"]
    );

    let group = tokio::task::block_in_place(|| {
        let mut a = vec![
            "group",
            "--groups",
            "2",
            "--size",
            "50",
            "--senders",
            "5",
            "--rate",
            "100",
        ];
        a.extend(counted);
        loadtest(s, &d, &a)
    });
    assert_clean(&group);
    every_message_accounted_for(&group, 10);
    assert!(group["outcome"]["completion"]["count"].as_u64() > Some(0));

    let mixed = tokio::task::block_in_place(|| {
        let mut a = vec![
            "mixed", "--pairs", "20", "--groups", "2", "--size", "10", "--rate", "400",
        ];
        a.extend(counted);
        loadtest(s, &d, &a)
    });
    assert_clean(&mixed);
    every_message_accounted_for(&mixed, 60);

    let storm = tokio::task::block_in_place(|| {
        let mut a = vec!["storm", "--clients", "200", "--backlog", "10"];
        a.extend(common);
        loadtest(s, &d, &a)
    });
    assert_clean(&storm);
    assert_eq!(storm["outcome"]["check"]["expected_deliveries"], 2000);

    let idle = tokio::task::block_in_place(|| {
        loadtest(s, &d, &["idle", "--connections", "300", "--duration", "2"])
    });
    assert_eq!(idle["outcome"]["connections"], 300);
    assert_eq!(idle["outcome"]["extra"]["dropped_while_idle"], 0.0);

    server.shutdown().await;
}
