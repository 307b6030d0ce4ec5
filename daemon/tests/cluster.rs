//! Several nodes in one process, sharing one PostgreSQL database and a real Redis (a throwaway
//! `redis-server` per test, so a test can restart it): live delivery across nodes, device
//! fencing, kicks across nodes, and a Redis restart that loses nothing. The multi-process
//! failures (SIGKILL, SIGSTOP, PostgreSQL, rolling restarts) are in `cluster_processes.rs`.

mod common;
#[path = "support/redis.rs"]
mod redis_support;

use std::time::Duration;

use common::{PASSWORD, WAIT, deliveries, test_config, text};
use messenger_daemon::RunningServer;
use messenger_daemon::testing::TestDatabase;
use messenger_protocol::client::{Client, ConnectOptions, Recipient, Trust};
use messenger_protocol::pb;
use redis_support::TestRedis;

/// Nodes sharing one PostgreSQL database (a fresh one per test) and one Redis, each with its
/// own store pool, hub and Redis connections, as separate processes would have.
struct Nodes {
    nodes: Vec<RunningServer>,
    _database: TestDatabase,
    _dir: tempfile::TempDir,
}

impl Nodes {
    async fn start(count: usize, redis: &TestRedis) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let database = TestDatabase::create("msgnodes").await;
        let mut nodes: Vec<RunningServer> = Vec::new();
        for i in 0..count {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let mut config = test_config(&node_dir);
            common::use_postgres(&mut config, &database.url);
            config.cluster.redis_url = Some(redis.url());
            config.cluster.node_id = Some(format!("node{i}"));
            // The first node's development certificate serves every node, as behind a
            // balancer.
            if let Some(first) = nodes.first() {
                config.tls.cert = Some(first.cert_path.clone());
                config.tls.key = Some(first.cert_path.with_file_name("key.pem"));
            }
            let server = RunningServer::start(config).await.expect("node starts");
            nodes.push(server);
        }
        Self {
            nodes,
            _database: database,
            _dir: dir,
        }
    }

    fn options(&self, node: usize) -> ConnectOptions {
        let ca = self.nodes[0].dev_ca.clone().expect("development CA");
        let mut o = ConnectOptions::new(self.nodes[node].addr.to_string(), Trust::CaFile(ca));
        o.request_timeout = WAIT;
        o
    }

    async fn user(&self, node: usize, name: &str) -> (Client, pb::User) {
        let mut c = Client::connect(self.options(node)).await.expect("connect");
        let user = c
            .register(name, PASSWORD, &format!("{name} display"))
            .await
            .expect("register");
        c.login(name, PASSWORD, "test-device").await.expect("login");
        (c, user)
    }

    async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + WAIT * 2;
        loop {
            let all = self
                .nodes
                .iter()
                .all(|n| n.shared.cluster.as_ref().is_some_and(|c| c.is_healthy()));
            if all {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nodes did not see redis again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every connection on `node` has its cluster epoch (presence registered).
    async fn until_registered(&self, node: usize, what: &str) {
        let hub = &self.nodes[node].shared.hub;
        until(what, || hub.connections().iter().all(|c| c.epoch() > 0)).await;
    }

    /// Waits until `node` holds no connection of `user`.
    async fn until_gone(&self, node: usize, user: u64, what: &str) {
        let hub = &self.nodes[node].shared.hub;
        until(what, || !hub.connections().iter().any(|c| c.user.0 == user)).await;
    }

    async fn stop(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}

async fn send(c: &Client, to: Recipient, body: &str) {
    c.conn().send_text(to, body).await.expect("send accepted");
}

/// Reads `n` deliveries and returns the bodies of those not sent by `own`.
async fn bodies_from_others(c: &mut Client, n: usize, own: u64) -> Vec<String> {
    deliveries(c, n)
        .await
        .iter()
        .filter(|d| {
            d.message
                .as_ref()
                .and_then(|m| m.sender.as_ref())
                .is_some_and(|s| s.user_id != own)
        })
        .map(text)
        .collect()
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_on_different_nodes_chat_live_directly_and_in_a_group() {
    let redis = TestRedis::start();
    let nodes = Nodes::start(3, &redis).await;
    let (mut alice, a) = nodes.user(0, "alice").await;
    let (mut bob, b) = nodes.user(1, "bob").await;
    let (mut carol, c) = nodes.user(2, "carol").await;

    send(&alice, Recipient::User(b.user_id), "a->b 1").await;
    send(&bob, Recipient::User(a.user_id), "b->a 1").await;
    send(&alice, Recipient::User(b.user_id), "a->b 2").await;
    // alice: own copies of her two plus bob's one; bob: alice's two plus his own.
    assert_eq!(
        bodies_from_others(&mut bob, 3, b.user_id).await,
        ["a->b 1", "a->b 2"]
    );
    assert_eq!(
        bodies_from_others(&mut alice, 3, a.user_id).await,
        ["b->a 1"]
    );

    let group = alice
        .conn()
        .create_group("trio", &[b.user_id, c.user_id])
        .await
        .expect("group");
    let to = Recipient::Group(group.group_id);
    for (client, who) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        for i in 0..5 {
            send(client, to, &format!("{who} {i}")).await;
        }
    }
    let expect = |me: &str| -> Vec<String> {
        ["alice", "bob", "carol"]
            .iter()
            .filter(|w| **w != me)
            .flat_map(|w| (0..5).map(move |i| format!("{w} {i}")))
            .collect()
    };
    assert_eq!(
        bodies_from_others(&mut alice, 15, a.user_id).await,
        expect("alice")
    );
    assert_eq!(
        bodies_from_others(&mut bob, 15, b.user_id).await,
        expect("bob")
    );
    assert_eq!(
        bodies_from_others(&mut carol, 15, c.user_id).await,
        expect("carol")
    );
    // They came through Redis, not through some store poll: Redis never failed here.
    let metrics = common::http_get(nodes.nodes[2].admin_addr, "/metrics").await;
    assert!(metrics.contains("messenger_cluster_deliveries_received_total"));
    assert!(!metrics.contains("why=\"redis_down_poll\""), "{metrics}");
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_resumed_on_another_node_closes_its_older_connection_there() {
    let redis = TestRedis::start();
    let nodes = Nodes::start(2, &redis).await;
    let (mut alice, _) = nodes.user(0, "alice").await;
    let (bob_old, b) = nodes.user(0, "bob").await;
    let token = bob_old.session().expect("logged in").session_token.clone();
    nodes
        .until_registered(0, "bob's first connection is fenced-ready")
        .await;
    // The same device resumes through the other node (as after a half-open connection).
    let mut bob_new = Client::connect(nodes.options(1)).await.expect("connect");
    bob_new.resume(&token).await.expect("resume");
    nodes
        .until_gone(0, b.user_id, "node 0 closed bob's older connection")
        .await;
    // The new connection gets what is sent from now on, and alice still gets her own copy.
    send(&alice, Recipient::User(b.user_id), "to the new one").await;
    assert_eq!(
        bodies_from_others(&mut bob_new, 1, b.user_id).await,
        ["to the new one"]
    );
    assert_eq!(deliveries(&mut alice, 1).await.len(), 1);
    drop(bob_old);
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_an_account_closes_its_connections_on_every_node() {
    let redis = TestRedis::start();
    let nodes = Nodes::start(2, &redis).await;
    let (_bob_phone, b) = nodes.user(0, "bob").await;
    nodes
        .until_registered(0, "bob's presence is registered")
        .await;
    let mut laptop = Client::connect(nodes.options(1)).await.expect("connect");
    laptop
        .login("bob", PASSWORD, "laptop")
        .await
        .expect("login");
    laptop
        .conn()
        .delete_account(PASSWORD)
        .await
        .expect("delete");
    nodes
        .until_gone(
            0,
            b.user_id,
            "node 0 closed the deleted account's connection",
        )
        .await;
    nodes.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_loses_nothing_and_live_delivery_comes_back_by_itself() {
    let mut redis = TestRedis::start();
    let nodes = Nodes::start(2, &redis).await;
    let (alice, a) = nodes.user(0, "alice").await;
    let (mut bob, b) = nodes.user(1, "bob").await;
    let to_bob = Recipient::User(b.user_id);
    send(&alice, to_bob, "before 0").await;
    assert_eq!(
        bodies_from_others(&mut bob, 1, b.user_id).await,
        ["before 0"]
    );

    redis.stop();
    // Accepted while Redis is gone: stored, and bob (connected to the other node, not
    // reconnecting) still gets them, from the store poll.
    for i in 0..10 {
        send(&alice, to_bob, &format!("during {i}")).await;
    }
    let during: Vec<String> = (0..10).map(|i| format!("during {i}")).collect();
    assert_eq!(bodies_from_others(&mut bob, 10, b.user_id).await, during);
    let ready = common::http_get(nodes.nodes[1].admin_addr, "/readyz").await;
    assert!(ready.contains("redis: unreachable"), "{ready}");

    // Redis comes back empty; the nodes register again and live pushes resume.
    redis.spawn();
    nodes.wait_healthy().await;
    for i in 0..10 {
        send(&alice, to_bob, &format!("after {i}")).await;
    }
    let after: Vec<String> = (0..10).map(|i| format!("after {i}")).collect();
    assert_eq!(bodies_from_others(&mut bob, 10, b.user_id).await, after);
    common::assert_quiet(&mut bob).await;
    let ready = common::http_get(nodes.nodes[1].admin_addr, "/readyz").await;
    assert!(ready.contains("redis: ok"), "{ready}");
    let _ = a;
    nodes.stop().await;
}
