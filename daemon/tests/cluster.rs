//! Several nodes in one process, sharing one PostgreSQL database and a real Redis (a throwaway
//! `redis-server` per test, so a test can restart it): live delivery across nodes, device
//! fencing, kicks across nodes, a Redis restart that loses nothing, two clusters sharing one
//! Redis, node id claims, and connections handed back to a node that joined late. The
//! multi-process failures (SIGKILL, SIGSTOP, PostgreSQL, rolling restarts) are in
//! `cluster_processes.rs`.

mod common;
#[path = "support/redis.rs"]
mod redis_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PASSWORD, WAIT, deliveries, test_config, text};
use messenger_daemon::cluster::wire;
use messenger_daemon::hub::Hub;
use messenger_daemon::testing::TestDatabase;
use messenger_daemon::{Config, RunningServer};
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, ConnectOptions, Connection, Event, Recipient, Trust};
use messenger_protocol::pb;
use redis_support::TestRedis;

/// Nodes sharing one PostgreSQL database (a fresh one per cluster) and one Redis, each with
/// its own store pool, hub and Redis connections, as separate processes would have.
struct Nodes {
    nodes: Vec<RunningServer>,
    redis_url: String,
    database: TestDatabase,
    dir: tempfile::TempDir,
}

impl Nodes {
    async fn start(count: usize, redis: &TestRedis) -> Self {
        Self::start_with(count, redis, |_| {}).await
    }

    /// `count` nodes named node0, node1, …; `adjust` changes each one's configuration.
    async fn start_with(count: usize, redis: &TestRedis, adjust: fn(&mut Config)) -> Self {
        let mut nodes = Self {
            nodes: Vec::new(),
            redis_url: redis.url(),
            database: TestDatabase::create("msgnodes").await,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        for _ in 0..count {
            nodes.add(adjust).await;
        }
        nodes
    }

    /// The configuration of one more node of this cluster, under `node_id`.
    fn config(&self, node_id: &str) -> Config {
        let node_dir = self
            .dir
            .path()
            .join(format!("{node_id}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&node_dir).expect("node dir");
        let mut config = test_config(&node_dir);
        common::use_postgres(&mut config, &self.database.url);
        config.cluster.redis_url = Some(self.redis_url.clone());
        config.cluster.node_id = Some(node_id.to_owned());
        // The first node's development certificate serves every node, as behind a balancer.
        if let Some(first) = self.nodes.first() {
            config.tls.cert = Some(first.cert_path.clone());
            config.tls.key = Some(first.cert_path.with_file_name("key.pem"));
        }
        config
    }

    /// Starts the next node (`node{len}`).
    async fn add(&mut self, adjust: fn(&mut Config)) {
        let mut config = self.config(&format!("node{}", self.nodes.len()));
        adjust(&mut config);
        let server = RunningServer::start(config).await.expect("node starts");
        self.nodes.push(server);
    }

    fn cluster_id(&self) -> String {
        let cluster = self.nodes[0].shared.cluster.as_ref().expect("clustered");
        cluster.cluster_id().to_owned()
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

    /// Waits until `node` has been through a few healthy heartbeats since now.
    async fn until_healthy_beats(&self, node: usize) {
        let cluster = self.nodes[node].shared.cluster.as_ref().expect("clustered");
        for _ in 0..3 {
            tokio::time::sleep(cluster_heartbeat()).await;
            assert!(cluster.is_healthy() && !cluster.has_lost_claim());
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

fn cluster_heartbeat() -> Duration {
    Config::default().cluster.heartbeat()
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

    // Bob wrote to alice, so he accepts her; carol opens up, on another node than alice's:
    // the setting lives in the shared database.
    carol
        .conn()
        .set_group_add_policy(pb::GroupAddPolicy::Anyone)
        .await
        .expect("carol accepts anyone");
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
    // They came through Redis, not through some store poll: Redis never failed here. (The
    // metrics are process-wide, shared with the Redis-restart test running beside this one,
    // so the nodes' own view is what tells.)
    let metrics = common::http_get(nodes.nodes[2].admin_addr, "/metrics").await;
    assert!(metrics.contains("messenger_cluster_deliveries_received_total"));
    for node in &nodes.nodes {
        assert!(node.shared.cluster.as_ref().is_some_and(|c| c.is_healthy()));
    }
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

/// A raw Redis connection to the test's server, to look at and tamper with the keyspace.
async fn redis_conn(redis: &TestRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

/// Two clusters (two databases) on ONE Redis, with the same node names, the same usernames
/// and therefore the same user and device ids: each client gets exactly its own cluster's
/// messages, none of the other's, and no connection of one is closed by the other's sign-ins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clusters_on_one_redis_deliver_only_their_own_messages() {
    const USERS: usize = 6;
    const PER_USER: usize = 20;
    let redis = TestRedis::start();
    let clusters = [Nodes::start(3, &redis).await, Nodes::start(3, &redis).await];
    let ids = [clusters[0].cluster_id(), clusters[1].cluster_id()];
    assert_ne!(ids[0], ids[1], "two databases, two clusters");
    let tags = ["A", "B"];

    // clients[c][i]: user u{i} of cluster c, connected to node i % 3.
    let mut clients: Vec<Vec<(Client, pb::User)>> = Vec::new();
    for nodes in &clusters {
        let mut users = Vec::new();
        for i in 0..USERS {
            users.push(nodes.user(i % 3, &format!("user{i}")).await);
        }
        clients.push(users);
    }
    for (a, b) in clients[0].iter().zip(&clients[1]) {
        // The same ids on both sides: without a namespace these would collide in Redis.
        assert_eq!(a.1.user_id, b.1.user_id);
    }
    for nodes in &clusters {
        for n in 0..3 {
            nodes.until_registered(n, "presence registered").await;
        }
    }

    // Each user sends PER_USER messages to the next one, both clusters interleaved.
    for k in 0..PER_USER {
        for c in 0..2 {
            for i in 0..USERS {
                let to = clients[c][(i + 1) % USERS].1.user_id;
                let body = format!("{} u{i}->u{} #{k}", tags[c], (i + 1) % USERS);
                send(&clients[c][i].0, Recipient::User(to), &body).await;
            }
        }
    }

    for (c, users) in clients.iter_mut().enumerate() {
        for (i, (client, user)) in users.iter_mut().enumerate() {
            let from = (i + USERS - 1) % USERS;
            let got = deliveries(client, 2 * PER_USER).await;
            let bodies: Vec<String> = got.iter().map(text).collect();
            assert!(
                bodies.iter().all(|b| b.starts_with(tags[c])),
                "cluster {} user u{i} got another cluster's message: {bodies:?}",
                tags[c]
            );
            let theirs: Vec<String> = got
                .iter()
                .filter(|d| {
                    d.message
                        .as_ref()
                        .and_then(|m| m.sender.as_ref())
                        .is_some_and(|s| s.user_id != user.user_id)
                })
                .map(text)
                .collect();
            let expected: Vec<String> = (0..PER_USER)
                .map(|k| format!("{} u{from}->u{i} #{k}", tags[c]))
                .collect();
            assert_eq!(theirs, expected, "cluster {} user u{i}", tags[c]);
            common::assert_quiet(client).await;
            assert!(
                !client.conn().is_closed() && client.last_go_away().is_none(),
                "cluster {} user u{i} was closed: {:?}",
                tags[c],
                client.conn().closed_reason()
            );
        }
    }

    // Defence in depth: an envelope of cluster B published on a channel of cluster A (which
    // the keyspace alone would never do) is dropped, not delivered.
    let victim = &clients[0][0];
    let forged = wire::Envelope {
        from_node: "node1".into(),
        cluster: ids[1].clone(),
        messages: vec![pb::Message {
            message_id: 1_000_000,
            sender: Some(clients[1][5].1.clone()),
            to: Some(pb::message::To::UserId(victim.1.user_id)),
            client_msg_id: "forged".into(),
            body: bytes::Bytes::from_static(b"B forged"),
            content_type: "text/plain".into(),
            ..pb::Message::default()
        }],
        deliveries: vec![wire::RemoteDelivery {
            user: victim.1.user_id,
            // The next seq of the victim's inbox: taken, it would be delivered at once.
            seq: (2 * PER_USER + 1) as u64,
            message: 0,
        }],
        ..wire::Envelope::default()
    };
    let channel = clusters[0].nodes[0]
        .shared
        .cluster
        .as_ref()
        .expect("clustered")
        .keyspace()
        .to_node("node0");
    let mut conn = redis_conn(&redis).await;
    let receivers: u64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(forged.to_bytes())
        .query_async(&mut conn)
        .await
        .expect("publish");
    assert_eq!(receivers, 1, "only node0 of cluster A listens on {channel}");
    common::assert_quiet(&mut clients[0][0].0).await;
    until_contains(
        clusters[0].nodes[0].admin_addr,
        "messenger_cluster_foreign_envelopes_total",
    )
    .await;

    for nodes in clusters {
        nodes.stop().await;
    }
}

/// Polls `/metrics` until it names `metric`.
async fn until_contains(admin: std::net::SocketAddr, metric: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = common::http_get(admin, "/metrics").await;
        if metrics.contains(metric) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{metric} never appeared: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node id is claimed: a second live node under the same id in the same cluster refuses to
/// start with a clear error, while a claim nobody refreshes (a run killed with SIGKILL) is
/// waited out, and a clean shutdown frees the id at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_id_in_use_refuses_a_second_node_and_is_free_after_its_holder_goes() {
    let redis = TestRedis::start();
    let mut nodes = Nodes::start(1, &redis).await;
    let cluster_id = nodes.cluster_id();
    let keys = nodes.nodes[0]
        .shared
        .cluster
        .as_ref()
        .expect("clustered")
        .keyspace()
        .clone();

    let mut twin = nodes.config("node0");
    twin.cluster.node_claim_wait_secs = Some(20);
    let refused = match RunningServer::start(twin).await {
        Ok(_) => panic!("a second node0 started"),
        Err(e) => e.to_string(),
    };
    assert!(
        refused.contains(&format!(
            "node id node0 is already in use in cluster {cluster_id}"
        )),
        "{refused}"
    );
    // The refused twin took nothing over: node0 keeps its claim and serves.
    nodes.until_healthy_beats(0).await;
    let (_alice, _) = nodes.user(0, "alice").await;

    // A previous run killed without leaving: its claim sits there until it expires.
    let mut conn = redis_conn(&redis).await;
    let _: () = redis::cmd("SET")
        .arg(keys.node("node1"))
        .arg("token-of-a-killed-process")
        .arg("PX")
        .arg(1500)
        .query_async(&mut conn)
        .await
        .expect("stale claim");
    nodes
        .add(|c| c.cluster.node_claim_wait_secs = Some(30))
        .await;
    let holder: Option<String> = redis::cmd("GET")
        .arg(keys.node("node1"))
        .query_async(&mut conn)
        .await
        .expect("get");
    assert!(
        holder.is_some_and(|h| h != "token-of-a-killed-process"),
        "node1 did not take its id back"
    );

    // A clean shutdown releases the claim: the same id starts again without waiting.
    let node1 = nodes.nodes.pop().expect("node1");
    node1.shutdown().await;
    nodes
        .add(|c| c.cluster.node_claim_wait_secs = Some(0))
        .await;
    nodes.stop().await;
}

/// A node frozen past the TTL whose id another process claimed meanwhile must not serve
/// under it: it closes its connections, refuses sign-ins, reports not ready and says it
/// failed; on shutdown it leaves the other process's claim alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_id_was_taken_over_stops_serving() {
    let redis = TestRedis::start();
    let nodes = Nodes::start(1, &redis).await;
    let (mut alice, _) = nodes.user(0, "alice").await;
    nodes.until_registered(0, "alice registered").await;
    let keys = nodes.nodes[0]
        .shared
        .cluster
        .as_ref()
        .expect("clustered")
        .keyspace()
        .clone();
    let mut conn = redis_conn(&redis).await;
    let _: () = redis::cmd("SET")
        .arg(keys.node("node0"))
        .arg("the-new-holder")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .expect("take over");
    let reason = tokio::time::timeout(WAIT, nodes.nodes[0].failed())
        .await
        .expect("the node noticed within a few heartbeats");
    assert!(reason.contains("taken over"), "{reason}");
    match alice.next_event().await {
        Some(Event::GoAway(g)) => {
            assert_eq!(g.code, ErrorCode::Unavailable as i32);
            assert!(g.reason.contains("taken over"), "{}", g.reason);
        }
        other => panic!("expected a GoAway, got {other:?}"),
    }
    let ready = common::http_get(nodes.nodes[0].admin_addr, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.0 503") || ready.contains(" 503 "),
        "{ready}"
    );
    let mut again = Client::connect(nodes.options(0)).await.expect("connect");
    let refused = again
        .login("alice", PASSWORD, "another")
        .await
        .expect_err("sign-in refused");
    assert_eq!(common::code(&refused), Some(ErrorCode::Unavailable));
    nodes.stop().await;
    let holder: Option<String> = redis::cmd("GET")
        .arg(keys.node("node0"))
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(holder.as_deref(), Some("the-new-holder"));
}

/// Connections of one client task: follows rebalancing GoAways to the emptiest node (as the
/// balancer's `leastconn` would), resuming the same session there.
async fn follow_go_aways(
    mut conn: Connection,
    mut events: messenger_protocol::client::Events,
    token: bytes::Bytes,
    places: Arc<Vec<(ConnectOptions, Arc<Hub>)>>,
    moves: Arc<Mutex<Vec<String>>>,
) {
    loop {
        match events.recv().await {
            Some(Event::GoAway(g)) => {
                moves
                    .lock()
                    .expect("moves")
                    .push(format!("{} {} {}", g.code, g.reconnect_after_ms, g.reason));
                tokio::time::sleep(Duration::from_millis(u64::from(g.reconnect_after_ms))).await;
                let (options, _) = places
                    .iter()
                    .min_by_key(|(_, hub)| hub.connection_count())
                    .expect("nodes");
                let (new_conn, new_events) = Connection::connect(options).await.expect("reconnect");
                new_conn.resume(&token).await.expect("resume");
                drop(conn);
                conn = new_conn;
                events = new_events;
            }
            Some(Event::Delivery(_)) => {}
            Some(Event::Closed { reason }) => {
                moves
                    .lock()
                    .expect("moves")
                    .push(format!("closed: {reason}"));
                return;
            }
            None => return,
        }
    }
}

/// A node that joins (or restarts) late starts empty; the busy nodes hand connections back
/// with a jittered rebalancing GoAway until every node is within ~20% of the mean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_joins_late_gets_its_share_of_connections() {
    const PER_NODE: usize = 30;
    let redis = TestRedis::start();
    let quiet = |c: &mut Config| c.timeouts.idle_secs = 3600;
    let mut nodes = Nodes::start_with(2, &redis, quiet).await;
    let mut sessions = Vec::new();
    for i in 0..2 * PER_NODE {
        let node = i % 2;
        let name = format!("rebalanced{i}");
        let (conn, events) = Connection::connect(&nodes.options(node))
            .await
            .expect("connect");
        conn.register(&name, PASSWORD, &name)
            .await
            .expect("register");
        let auth = conn.login(&name, PASSWORD, "phone").await.expect("login");
        sessions.push((conn, events, auth.session_token));
    }
    // Balanced two ways: nothing moves yet. Then the third node arrives empty.
    nodes.add(quiet).await;
    let places: Arc<Vec<(ConnectOptions, Arc<Hub>)>> = Arc::new(
        (0..3)
            .map(|n| (nodes.options(n), Arc::clone(&nodes.nodes[n].shared.hub)))
            .collect(),
    );
    let moves = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|(conn, events, token)| {
            tokio::spawn(follow_go_aways(
                conn,
                events,
                token,
                Arc::clone(&places),
                Arc::clone(&moves),
            ))
        })
        .collect();

    let total = 2 * PER_NODE;
    let mean = total / 3;
    let (low, high) = (mean * 8 / 10, mean * 12 / 10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let counts = loop {
        let counts: Vec<usize> = places.iter().map(|(_, h)| h.connection_count()).collect();
        if counts.iter().sum::<usize>() == total && counts.iter().all(|c| (low..=high).contains(c))
        {
            break counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections never spread: {counts:?}, moves: {:?}",
            moves.lock().expect("moves")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let moves = moves.lock().expect("moves").clone();
    assert!(
        moves.len() >= counts[2],
        "the third node got {} connections from {} GoAways",
        counts[2],
        moves.len()
    );
    let unavailable = ErrorCode::Unavailable as i32;
    for m in &moves {
        let mut parts = m.splitn(3, ' ');
        let code: i32 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(-1);
        let delay: u32 = parts.next().and_then(|d| d.parse().ok()).unwrap_or(0);
        let reason = parts.next().unwrap_or("");
        assert_eq!(code, unavailable, "{m}");
        assert!((500..3000).contains(&delay), "a jittered delay: {m}");
        assert!(reason.starts_with("rebalancing"), "{m}");
    }
    until_contains(
        nodes.nodes[0].admin_addr,
        "messenger_cluster_rebalanced_total",
    )
    .await;
    for task in tasks {
        task.abort();
    }
    nodes.stop().await;
}
