//! A tiny chaos soak end to end with the real binaries: the single SQLite node killed under
//! load, then a cluster node killed behind HAProxy. Every accepted message must arrive once
//! and in order, and each fault must really have hit the clients.
//!
//! It lives with the daemon's tests so that Cargo builds this workspace's `messengerd` for it
//! (`CARGO_BIN_EXE_messengerd`): never stale, and no nested `cargo build`.

use std::path::Path;

use messenger_loadtest::chaos::cluster::{LaunchOptions, PostgresChoice};
use messenger_loadtest::chaos::faults::Fault;
use messenger_loadtest::chaos::{self, SoakOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_single_node_and_a_killed_cluster_node_lose_and_duplicate_nothing() {
    let haproxy_cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg");
    let mut launch = LaunchOptions::new(env!("CARGO_BIN_EXE_messengerd").into(), haproxy_cfg);
    // The tests' PostgreSQL (neither fault here stops it): the one every other test uses.
    launch.postgres = PostgresChoice::Server {
        admin_url: messenger_daemon::testing::postgres_admin_url(),
    };
    let mut opts = SoakOptions::new(launch);
    opts.rounds = 2;
    opts.faults = vec![Fault::SingleKill, Fault::Kill];
    opts.pairs = 10;
    opts.rate = 200.0;
    let mut rounds = Vec::new();
    chaos::soak(&opts, &mut rounds)
        .await
        .expect("the soak runs");
    eprintln!("{}", chaos::table(&rounds));
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert!(r.error.is_none(), "round failed: {r:?}");
        assert_eq!(r.lost, 0, "{r:?}");
        assert_eq!(r.duplicated, 0, "{r:?}");
        assert_eq!(r.reordered, 0, "{r:?}");
        assert_eq!(r.misdelivered, 0, "{r:?}");
        assert!(r.accepted > 0, "nothing was accepted: {r:?}");
        assert_eq!(r.delivered, r.accepted, "{r:?}");
        // The fault hit: the killed node was started again and clients had to reconnect.
        assert!(r.node_starts >= 1, "no node restarted: {r:?}");
        assert!(r.reconnects > 0, "no client lost its connection: {r:?}");
        assert!(r.served_again_ms.is_some(), "never served again: {r:?}");
        assert!(r.clean(), "{r:?}");
    }
    assert_eq!(rounds[0].fault, Fault::SingleKill);
    assert_eq!(rounds[1].fault, Fault::Kill);
}
