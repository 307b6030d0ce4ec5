//! Running as one node of several (DESIGN §7): Redis carries presence and cross-node pushes;
//! PostgreSQL, shared by every node, stays the only truth about messages.
//!
//! - **Identity**: a cluster is its database. The id the schema was created with
//!   (`Store::cluster_id`) names every Redis key and channel (`keyspace`:
//!   `messenger:{cluster_id}:...`) and is stamped on every envelope; a node drops envelopes of
//!   another cluster. Clusters sharing one Redis, even with the same node names and the same
//!   user and device ids, never see each other's presence, pushes or fences.
//! - **Node ids are claimed** (`claim`): the heartbeat key holds a random token of the process
//!   that took it with `SET NX`; a second live process with the same id refuses to start, and a
//!   node that finds its id taken over (it was frozen past the TTL and another process claimed
//!   it) stops serving for good: it closes every connection, reports not ready, and
//!   `messengerd` exits non-zero (`Cluster::claim_lost`).
//! - **Presence**: `...:presence:{user}` is the set of nodes holding a connection of the
//!   user. Each node refreshes `...:node:{id}` (a heartbeat with a TTL); a node whose key
//!   expired counts as gone, and its presence entries are dropped when met.
//! - **Routing**: after a commit the accepting node pushes to its own hub, then a router task
//!   batches the entries of whatever was accepted meanwhile, looks up the recipients' nodes in
//!   one pipeline and publishes one `wire::Envelope` per node on `...:to:{id}`. Each
//!   node subscribes to its own channel (and `...:all`) and pushes what arrives from
//!   its hub; the delivery pump orders it and fills any gap from the store.
//! - **Rebalancing** (`rebalance`): each heartbeat publishes the node's connection count; a
//!   node holding clearly more than its share hands a few connections back with a jittered
//!   `GoAway`, so a restarted node gets its clients back.
//! - **Budgets** (`budgets`): each account's per-account budget buckets live in Redis
//!   (`...:budget:{budget}:{user}`); nodes lease tokens from them in chunks with one script
//!   call (`crate::budget`), so an account's limit holds across nodes without a Redis round
//!   trip per request. Redis unreachable: each node applies the budgets alone.
//! - **Fencing**: every sign-in takes a new epoch for its device (`...:epoch:{device}`,
//!   strictly increasing, and never below the current time in microseconds so a Redis that
//!   lost its data still hands out newer epochs than before). The node tells the user's other
//!   nodes, which close their connection of that device if its epoch is older.
//! - **Losing Redis loses no message**, only the shortcut: a publish that fails marks
//!   `missed`; while Redis is unreachable every node makes its connections poll the store;
//!   when it is back each node re-registers its presence and asks every node (itself
//!   included) to catch all connections up from the store. A re-established subscription
//!   does the same locally, since publishes to it may have been dropped meanwhile.
//! - **A node that was frozen or cut off** (its heartbeat timer fired later than the node TTL)
//!   may have been routed around: it closes every client connection with a reason, so each
//!   reconnects and resumes from its cursor, and rejoins with an empty hub.

pub mod budgets;
pub mod claim;
pub mod keyspace;
pub mod rebalance;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use messenger_protocol::{ErrorCode, WireError, pb};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::ClusterConfig;
use crate::hub::{ConnHandle, Hub, HubEvent};
use crate::metrics;
use crate::model::{Appended, DeviceId, UserId};
use claim::Refresh;
pub use keyspace::Keyspace;
use rebalance::Load;
/// Accepted messages waiting for the router; past this they are not published (the
/// recipients' nodes catch up from the store instead, see `missed`).
const ROUTE_QUEUE: usize = 65_536;
/// Most accepted messages routed in one Redis round trip.
const ROUTE_BATCH: usize = 512;
/// Longest wait for a Redis reply or connection before the call counts as failed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET`-and-raise of a device epoch: one more than the last, and at least `ARGV[1]` (the
/// caller's clock in microseconds). Kept a month: longer than any session stays connected.
const EPOCH_SCRIPT: &str = r"
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = math.max(last + 1, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], epoch, 'EX', 2592000)
return epoch
";

/// Least time between two warnings about envelopes of another cluster.
const FOREIGN_WARN_EVERY: Duration = Duration::from_secs(60);

/// A default node id: host name, process id and a random suffix, so two processes (even on
/// one host, even after a pid is reused) never share one.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad redis url: {0}")]
    Url(String),
    #[error("cannot reach redis at start: {0}")]
    Connect(String),
    #[error("{0}")]
    ClusterId(String),
    #[error(
        "node id {node} is already in use in cluster {cluster} (another messengerd holds it; \
         it expires {ttl_secs} s after that node stops; waited {waited_secs} s)"
    )]
    NodeIdTaken {
        node: String,
        cluster: String,
        ttl_secs: u64,
        waited_secs: u64,
    },
}

/// Accepted messages on their way to other nodes.
struct Route {
    appended: Appended,
}

pub struct Cluster {
    node: String,
    keys: Keyspace,
    /// This process's claim on `node` (`claim`).
    token: String,
    client: redis::Client,
    redis: ConnectionManager,
    hub: Arc<Hub>,
    routes: mpsc::Sender<Route>,
    /// Redis answered the last heartbeat.
    healthy: AtomicBool,
    /// Something for another node could not be published: they must catch up from the store.
    missed: AtomicBool,
    /// Nodes whose heartbeat is current (this one included).
    live_nodes: RwLock<HashSet<String>>,
    /// Set when this node found it had been cut off: until then it takes no sign-ins and
    /// reports not ready.
    rejoining_until: std::sync::Mutex<Option<Instant>>,
    /// When the heartbeat loop last ran: a process that was stopped wakes with this long
    /// past, before the loop itself has had a chance to notice.
    last_tick: std::sync::Mutex<Instant>,
    heartbeat: Duration,
    node_ttl: Duration,
    rebalance_tolerance_percent: u64,
    rebalance_batch: usize,
    /// Cancelled when another process took this node's id over: this one serves no more.
    claim_lost: CancellationToken,
    /// Envelopes of another cluster heard (on a channel of ours: a misconfiguration or a bug).
    foreign: AtomicU64,
    last_foreign_warning: std::sync::Mutex<Option<Instant>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("cluster", &self.keys.cluster_id())
            .field("healthy", &self.healthy.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects to Redis, claims the node id in the keyspace of `cluster_id` (what
    /// `Store::cluster_id` returns), joins the cluster and starts the presence, routing,
    /// subscription and heartbeat tasks. `hub` must not be observed by anyone else.
    pub async fn start(
        config: &ClusterConfig,
        url: &str,
        cluster_id: &str,
        hub: Arc<Hub>,
    ) -> Result<Arc<Self>, ClusterError> {
        let keys = Keyspace::new(cluster_id).map_err(ClusterError::ClusterId)?;
        let node = config.node_id.clone().unwrap_or_else(default_node_id);
        let client = redis::Client::open(url).map_err(|e| ClusterError::Url(e.to_string()))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let redis = client
            .get_connection_manager_with_config(manager_config)
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;
        let token = claim::new_token();
        claim::take(
            &redis,
            &keys,
            &node,
            &token,
            config.node_ttl(),
            config.node_claim_wait(),
        )
        .await?;
        let events = hub
            .observe()
            .ok_or_else(|| ClusterError::Connect("the hub is already observed".into()))?;
        let (routes, route_queue) = mpsc::channel(ROUTE_QUEUE);
        let cluster = Arc::new(Self {
            node,
            keys,
            token,
            client,
            redis,
            hub,
            routes,
            healthy: AtomicBool::new(true),
            missed: AtomicBool::new(false),
            live_nodes: RwLock::new(HashSet::new()),
            rejoining_until: std::sync::Mutex::new(None),
            last_tick: std::sync::Mutex::new(Instant::now()),
            heartbeat: config.heartbeat(),
            node_ttl: config.node_ttl(),
            rebalance_tolerance_percent: config.rebalance_tolerance_percent,
            rebalance_batch: config.rebalance_batch,
            claim_lost: CancellationToken::new(),
            foreign: AtomicU64::new(0),
            last_foreign_warning: std::sync::Mutex::new(None),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        // Be visible before the first client can connect, so nobody routes around this node.
        let first = cluster
            .beat()
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;
        if first.claim == Refresh::Lost {
            // Taken over between the claim and the first beat: as good as taken at start.
            return Err(ClusterError::NodeIdTaken {
                node: cluster.node.clone(),
                cluster: cluster.keys.cluster_id().to_owned(),
                ttl_secs: config.node_ttl_secs,
                waited_secs: 0,
            });
        }
        let subscribed = Arc::new(tokio::sync::Notify::new());
        cluster
            .tasks
            .spawn(Arc::clone(&cluster).subscribe_loop(Arc::clone(&subscribed)));
        cluster
            .tasks
            .spawn(Arc::clone(&cluster).presence_loop(events));
        cluster
            .tasks
            .spawn(Arc::clone(&cluster).route_loop(route_queue));
        cluster.tasks.spawn(Arc::clone(&cluster).heartbeat_loop());
        // Deliveries published to this node before it listens would be lost: wait (bounded)
        // for the subscription; if Redis is slow the catch-up after subscribing covers it.
        let _ = tokio::time::timeout(REDIS_TIMEOUT, subscribed.notified()).await;
        info!(
            node = %cluster.node,
            cluster = cluster.keys.cluster_id(),
            "joined the cluster"
        );
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// The id of the cluster (of its database) this node belongs to.
    pub fn cluster_id(&self) -> &str {
        self.keys.cluster_id()
    }

    /// The names of this cluster's Redis keys and channels.
    pub fn keyspace(&self) -> &Keyspace {
        &self.keys
    }

    /// Per-account budgets shared by every node, on this node's Redis connection.
    pub fn budgets(&self) -> budgets::RedisBudgets {
        budgets::RedisBudgets::new(self.redis.clone(), self.keys.clone())
    }

    /// Resolves, with the reason, once another process took this node's id over (this node
    /// was frozen or cut off past the TTL and a new process claimed the id). From then on
    /// this node serves nothing: it closed every connection, refuses sign-ins and reports not
    /// ready; `messengerd` exits non-zero.
    pub async fn claim_lost(&self) -> String {
        self.claim_lost.cancelled().await;
        self.claim_lost_reason()
    }

    /// True once another process took this node's id over (see `claim_lost`).
    pub fn has_lost_claim(&self) -> bool {
        self.claim_lost.is_cancelled()
    }

    fn claim_lost_reason(&self) -> String {
        format!(
            "node id {} in cluster {} was taken over by another process while this one was \
             cut off; this process no longer serves as that node",
            self.node,
            self.keys.cluster_id()
        )
    }

    /// Redis answered the last heartbeat, and the node is not rejoining after being cut off.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire) && !self.is_rejoining()
    }

    /// Redis answered the last heartbeat.
    pub fn redis_reachable(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// True for one node TTL after this node found it had been cut off (frozen, partitioned),
    /// and from the moment it wakes up, before its heartbeat loop has run.
    pub fn is_rejoining(&self) -> bool {
        if self.has_lost_claim() {
            return true;
        }
        let stalled = self
            .last_tick
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            > self.node_ttl;
        if stalled {
            return true;
        }
        let mut until = self
            .rejoining_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    /// Hands an accepted message to the router, for recipients connected to other nodes.
    /// Never waits: when the router is that far behind, the message is left to the store.
    pub fn route(&self, appended: &Appended) {
        if appended.duplicate {
            return;
        }
        if self
            .routes
            .try_send(Route {
                appended: appended.clone(),
            })
            .is_err()
        {
            self.missed.store(true, Ordering::Release);
            metrics::cluster_publish_failed("deliveries");
        }
    }

    /// Leaves the cluster: stops the tasks and removes this node's heartbeat, so the others
    /// stop routing here at once instead of after the TTL.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(REDIS_TIMEOUT, self.tasks.wait()).await;
        let mut redis = self.redis.clone();
        let release = claim::release(&mut redis, &self.keys, &self.node, &self.token);
        let left = tokio::time::timeout(REDIS_TIMEOUT, release)
            .await
            .unwrap_or(Ok(()));
        if let Err(e) = left {
            warn!(error = %e, "could not leave the cluster cleanly; the heartbeat will expire");
        }
    }

    fn set_healthy(&self, up: bool) {
        let was = self.healthy.swap(up, Ordering::AcqRel);
        metrics::cluster_redis_up(up);
        if was != up {
            if up {
                info!("redis reachable again");
            } else {
                warn!("redis unreachable: cross-node pushes fall back to store polling");
            }
        }
    }

    fn is_live(&self, node: &str) -> bool {
        self.live_nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(node)
    }

    // ----- heartbeat -----

    /// Refreshes this node's claim and load, and learns which nodes are alive and their loads.
    async fn beat(&self) -> redis::RedisResult<Beat> {
        let mut redis = self.redis.clone();
        let mine = self.hub.connection_count() as u64;
        let load = Load {
            connections: mine,
            ready: !self.is_rejoining(),
        };
        let claim = claim::refresh(
            &mut redis,
            &self.keys,
            &self.node,
            &self.token,
            self.node_ttl,
            &load.encode(),
        )
        .await?;
        if claim == Refresh::Lost {
            return Ok(Beat {
                claim,
                mine,
                loads: Vec::new(),
            });
        }
        let (nodes,): (Vec<String>,) = redis::pipe()
            .cmd("SADD")
            .arg(self.keys.nodes())
            .arg(&self.node)
            .ignore()
            .cmd("SMEMBERS")
            .arg(self.keys.nodes())
            .query_async(&mut redis)
            .await?;
        // Claims first, then loads, in one round trip.
        let keys: Vec<String> = nodes
            .iter()
            .map(|n| self.keys.node(n))
            .chain(nodes.iter().map(|n| self.keys.load(n)))
            .collect();
        let mut values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut redis)
            .await?;
        let loads_of = values.split_off(nodes.len().min(values.len()));
        let mut live = HashSet::new();
        let mut loads = Vec::new();
        let mut dead = Vec::new();
        for ((node, beat), load) in nodes.into_iter().zip(values).zip(loads_of) {
            if beat.is_some() {
                loads.push(load.as_deref().and_then(Load::decode));
                live.insert(node);
            } else {
                dead.push(node);
            }
        }
        if !dead.is_empty() {
            // Forget nodes whose heartbeat expired; a node that was only slow adds itself back.
            let _: () = redis::cmd("SREM")
                .arg(self.keys.nodes())
                .arg(&dead)
                .query_async(&mut redis)
                .await?;
        }
        metrics::cluster_live_nodes(live.len());
        *self.live_nodes.write().unwrap_or_else(|p| p.into_inner()) = live;
        Ok(Beat { claim, mine, loads })
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut last_tick = Instant::now();
        let mut ticks: u64 = 0;
        let mut last_rebalance: Option<Instant> = None;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(self.heartbeat) => {}
            }
            ticks += 1;
            let gap = last_tick.elapsed();
            last_tick = Instant::now();
            *self.last_tick.lock().unwrap_or_else(|p| p.into_inner()) = last_tick;
            if gap > self.node_ttl {
                // The process was stopped or starved past the TTL: other nodes took this one
                // for dead, its clients may have resumed elsewhere, routes skipped it.
                metrics::cluster_cut_off();
                // Connections that the kernel accepted while the process was stopped may carry
                // sign-ins their clients already abandoned: refuse sign-ins (and report not
                // ready) for one TTL, the time a client needs to give up and go elsewhere.
                *self
                    .rejoining_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + self.node_ttl);
                let closed = self.hub.kick_all(&WireError::new(
                    ErrorCode::Unavailable,
                    "this node was cut off from the cluster; reconnect",
                ));
                warn!(
                    gap_ms = gap.as_millis() as u64,
                    closed, "this node was cut off; closed every connection"
                );
            }
            let was_healthy = self.redis_reachable();
            match self.beat().await {
                Ok(beat) if beat.claim == Refresh::Lost => {
                    self.lose_claim();
                    return;
                }
                Ok(beat) => {
                    self.set_healthy(true);
                    if !was_healthy {
                        self.rejoin().await;
                    }
                    if self.missed.swap(false, Ordering::AcqRel) {
                        self.ask_everyone_to_catch_up().await;
                    }
                    self.rebalance(&beat, &mut last_rebalance);
                }
                Err(e) => {
                    debug!(error = %e, "heartbeat failed");
                    self.set_healthy(false);
                    self.missed.store(true, Ordering::Release);
                    // Without Redis nobody hears of other nodes' messages: poll the store,
                    // every other beat to bound the load it adds.
                    if ticks.is_multiple_of(2) {
                        metrics::cluster_catch_up_all("redis_down_poll");
                        self.hub.catch_up_all();
                    }
                }
            }
        }
    }

    /// Another process holds this node's id: everything this one would still do under it
    /// (presence removals, subscriptions, routes) would act on that process's clients. Stop
    /// all of it, then close every connection here so the clients resume elsewhere.
    fn lose_claim(&self) {
        metrics::cluster_claim_lost();
        self.claim_lost.cancel();
        self.stop.cancel();
        let closed = self.hub.kick_all(&WireError::new(
            ErrorCode::Unavailable,
            "this node's id was taken over by another process; reconnect",
        ));
        error!(closed, "{}", self.claim_lost_reason());
    }

    /// One rebalancing round when this node holds more than its share (see `rebalance`),
    /// at most once per `rebalance::SETTLE`, and only while this node is healthy.
    fn rebalance(&self, beat: &Beat, last_round: &mut Option<Instant>) {
        if !self.is_healthy() || last_round.is_some_and(|t| t.elapsed() < rebalance::SETTLE) {
            return;
        }
        let count = rebalance::hand_back(
            beat.mine,
            &beat.loads,
            self.rebalance_tolerance_percent,
            self.rebalance_batch,
        );
        if count == 0 {
            return;
        }
        let moved = self.hub.hand_back(
            count,
            &WireError::new(ErrorCode::Unavailable, rebalance::REASON),
        );
        *last_round = Some(Instant::now());
        metrics::cluster_rebalanced(moved as u64);
        info!(
            moved,
            connections = beat.mine,
            nodes = beat.loads.len(),
            "handed connections back to less busy nodes"
        );
    }

    /// After Redis came back (possibly empty): registers every local connection again, with
    /// an epoch for those that got none, and fences older copies of them elsewhere.
    async fn rejoin(&self) {
        let conns = self.hub.connections();
        let registered = self.register_connections(&conns).await;
        match registered {
            Ok(()) => info!(connections = conns.len(), "presence registered again"),
            Err(e) => {
                debug!(error = %e, "re-registering presence failed");
                self.missed.store(true, Ordering::Release);
            }
        }
    }

    /// Publishes a catch-up request to every node (this one hears it too).
    async fn ask_everyone_to_catch_up(&self) {
        let envelope = wire::Envelope {
            from_node: self.node.clone(),
            cluster: self.keys.cluster_id().to_owned(),
            catch_up_all: true,
            ..wire::Envelope::default()
        };
        let mut redis = self.redis.clone();
        let sent: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(self.keys.all())
            .arg(envelope.to_bytes())
            .query_async(&mut redis)
            .await;
        if let Err(e) = sent {
            debug!(error = %e, "catch-up broadcast failed");
            self.missed.store(true, Ordering::Release);
        }
        metrics::cluster_catch_up_all("redis_recovered");
        self.hub.catch_up_all();
    }

    // ----- presence and fencing -----

    async fn presence_loop(self: Arc<Self>, mut events: mpsc::UnboundedReceiver<HubEvent>) {
        let mut batch = Vec::new();
        loop {
            let first = tokio::select! {
                () = self.stop.cancelled() => return,
                event = events.recv() => match event {
                    Some(e) => e,
                    None => return,
                },
            };
            batch.push(first);
            while batch.len() < 1024 {
                match events.try_recv() {
                    Ok(e) => batch.push(e),
                    Err(_) => break,
                }
            }
            if self.stop.is_cancelled() {
                // Stopping (or this node's id was taken over): these events are no longer
                // ours to write.
                return;
            }
            if let Err(e) = self.apply_hub_events(&batch).await {
                // Presence is re-registered and everyone catches up once Redis answers again.
                debug!(error = %e, events = batch.len(), "presence update failed");
                self.missed.store(true, Ordering::Release);
                self.set_healthy(false);
            }
            batch.clear();
        }
    }

    async fn apply_hub_events(&self, events: &[HubEvent]) -> redis::RedisResult<()> {
        let mut connected = Vec::new();
        let mut pipe = redis::pipe();
        let mut removals = false;
        let mut kicks = Vec::new();
        for event in events {
            match event {
                HubEvent::Connected { handle } => connected.push(Arc::clone(handle)),
                HubEvent::Gone { user } => {
                    removals = true;
                    pipe.cmd("SREM")
                        .arg(self.keys.presence(*user))
                        .arg(&self.node)
                        .ignore();
                }
                HubEvent::Kick {
                    user,
                    devices,
                    reason,
                } => kicks.push(wire::Kick {
                    user: user.0,
                    devices: devices
                        .as_deref()
                        .unwrap_or_default()
                        .iter()
                        .map(|d| d.0)
                        .collect(),
                    all_devices: devices.is_none(),
                    code: reason.code as i32,
                    reason: reason.message.clone(),
                }),
            }
        }
        let mut redis = self.redis.clone();
        if removals {
            let _: () = pipe.query_async(&mut redis).await?;
        }
        // Connections are registered in order after the removals above: a user who left and
        // came back within one batch ends up present.
        if !connected.is_empty() {
            self.register_connections(&connected).await?;
        }
        let kicks = kicks.into_iter().map(|k| (UserId(k.user), k)).collect();
        self.tell_other_nodes(kicks, |envelope, kick| envelope.kicks.push(kick))
            .await
    }

    /// Sends each item to every other node holding a connection of its user, one envelope per
    /// node (`add` puts an item into an envelope).
    async fn tell_other_nodes<T: Clone>(
        &self,
        items: Vec<(UserId, T)>,
        add: fn(&mut wire::Envelope, T),
    ) -> redis::RedisResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let users: Vec<UserId> = items.iter().map(|(u, _)| *u).collect();
        let nodes_of = self.nodes_of(&users).await?;
        let mut envelopes: HashMap<String, wire::Envelope> = HashMap::new();
        for (user, item) in items {
            for node in nodes_of.get(&user).into_iter().flatten() {
                add(envelopes.entry(node.clone()).or_default(), item.clone());
            }
        }
        self.publish(envelopes, "control").await
    }

    /// Adds these connections' users to presence, gives each connection without one an
    /// epoch, and tells the users' other nodes to close older connections of those devices.
    async fn register_connections(&self, conns: &[Arc<ConnHandle>]) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        let now_micros = u64::try_from(crate::model::now_millis()).unwrap_or(0) * 1000;
        let mut pipe = redis::pipe();
        let mut fresh = Vec::new();
        for conn in conns {
            if conn.kicked().is_cancelled() {
                continue;
            }
            pipe.cmd("SADD")
                .arg(self.keys.presence(conn.user))
                .arg(&self.node)
                .ignore();
            if conn.epoch() == 0 {
                pipe.cmd("EVAL")
                    .arg(EPOCH_SCRIPT)
                    .arg(1)
                    .arg(self.keys.epoch(conn.device))
                    .arg(now_micros);
                fresh.push(Arc::clone(conn));
            }
        }
        if conns.iter().all(|c| c.kicked().is_cancelled()) {
            return Ok(());
        }
        let epochs: Vec<u64> = pipe.query_async(&mut redis).await?;
        for (conn, epoch) in fresh.iter().zip(&epochs) {
            conn.set_epoch(*epoch);
        }
        // A message committed elsewhere before this node was in the user's presence was not
        // published here, and may have been committed after the pump's first store read: one
        // more read, now that every later commit will be published here, closes that window.
        for conn in conns {
            conn.request_catch_up();
        }
        let fences = fresh
            .iter()
            .map(|conn| {
                let fence = wire::Fence {
                    user: conn.user.0,
                    device: conn.device.0,
                    epoch: conn.epoch(),
                };
                (conn.user, fence)
            })
            .collect();
        self.tell_other_nodes(fences, |envelope, fence| envelope.fences.push(fence))
            .await
    }

    /// The other live nodes holding a connection of each user. Entries of dead nodes are
    /// removed on the way.
    async fn nodes_of(&self, users: &[UserId]) -> redis::RedisResult<HashMap<UserId, Vec<String>>> {
        let mut distinct: Vec<UserId> = users.to_vec();
        distinct.sort_unstable_by_key(|u| u.0);
        distinct.dedup();
        let mut pipe = redis::pipe();
        for user in &distinct {
            pipe.cmd("SMEMBERS").arg(self.keys.presence(*user));
        }
        let mut redis = self.redis.clone();
        let members: Vec<Vec<String>> = pipe.query_async(&mut redis).await?;
        // A node missing from the cached live set may have joined since the last heartbeat:
        // ask for its heartbeat key before treating it as gone.
        let unknown: HashSet<&str> = members
            .iter()
            .flatten()
            .map(String::as_str)
            .filter(|n| *n != self.node && !self.is_live(n))
            .collect();
        let mut dead = HashSet::new();
        if !unknown.is_empty() {
            let unknown: Vec<&str> = unknown.into_iter().collect();
            let keys: Vec<String> = unknown.iter().map(|n| self.keys.node(n)).collect();
            let beats: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut redis)
                .await?;
            let mut live = self.live_nodes.write().unwrap_or_else(|p| p.into_inner());
            for (node, beat) in unknown.into_iter().zip(beats) {
                if beat.is_some() {
                    live.insert(node.to_owned());
                } else {
                    dead.insert(node.to_owned());
                }
            }
        }
        let mut out = HashMap::new();
        let mut stale = redis::pipe();
        for (user, nodes) in distinct.into_iter().zip(members) {
            let mut others = Vec::new();
            for node in nodes {
                if node == self.node {
                    continue;
                }
                if dead.contains(&node) {
                    stale
                        .cmd("SREM")
                        .arg(self.keys.presence(user))
                        .arg(node)
                        .ignore();
                } else {
                    others.push(node);
                }
            }
            if !others.is_empty() {
                out.insert(user, others);
            }
        }
        if !dead.is_empty() {
            // Best effort: a dead node is kept out of routes either way.
            let _: redis::RedisResult<()> = stale.query_async(&mut redis).await;
        }
        Ok(out)
    }

    async fn publish(
        &self,
        envelopes: HashMap<String, wire::Envelope>,
        what: &'static str,
    ) -> redis::RedisResult<()> {
        if envelopes.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (node, mut envelope) in envelopes {
            envelope.from_node.clone_from(&self.node);
            envelope.cluster = self.keys.cluster_id().to_owned();
            pipe.cmd("PUBLISH")
                .arg(self.keys.to_node(&node))
                .arg(envelope.to_bytes())
                .ignore();
        }
        let mut redis = self.redis.clone();
        let sent: redis::RedisResult<()> = pipe.query_async(&mut redis).await;
        if sent.is_err() {
            metrics::cluster_publish_failed(what);
        }
        sent
    }

    // ----- routing -----

    async fn route_loop(self: Arc<Self>, mut queue: mpsc::Receiver<Route>) {
        let mut batch = Vec::with_capacity(ROUTE_BATCH);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                n = queue.recv_many(&mut batch, ROUTE_BATCH) => if n == 0 { return },
            }
            if let Err(e) = self.route_batch(&batch).await {
                debug!(error = %e, messages = batch.len(), "publishing deliveries failed");
                self.missed.store(true, Ordering::Release);
            }
            batch.clear();
        }
    }

    async fn route_batch(&self, batch: &[Route]) -> redis::RedisResult<()> {
        let users: Vec<UserId> = batch
            .iter()
            .flat_map(|r| r.appended.entries.iter().map(|(u, _)| *u))
            .collect();
        let nodes_of = self.nodes_of(&users).await?;
        if nodes_of.is_empty() {
            return Ok(());
        }
        let mut envelopes: HashMap<String, wire::Envelope> = HashMap::new();
        let mut published = 0u64;
        for route in batch {
            // Index of this message in each node's envelope, added on first use.
            let mut index: HashMap<&str, u32> = HashMap::new();
            for (user, seq) in &route.appended.entries {
                for node in nodes_of.get(user).into_iter().flatten() {
                    let envelope = envelopes.entry(node.clone()).or_default();
                    let at = *index.entry(node.as_str()).or_insert_with(|| {
                        envelope
                            .messages
                            .push(pb::Message::from(&*route.appended.message));
                        u32::try_from(envelope.messages.len() - 1).unwrap_or(u32::MAX)
                    });
                    envelope.deliveries.push(wire::RemoteDelivery {
                        user: user.0,
                        seq: seq.0,
                        message: at,
                    });
                    published += 1;
                }
            }
        }
        self.publish(envelopes, "deliveries").await?;
        metrics::cluster_published(published);
        Ok(())
    }

    // ----- subscription -----

    async fn subscribe_loop(self: Arc<Self>, subscribed: Arc<tokio::sync::Notify>) {
        let channel = self.keys.to_node(&self.node);
        let mut first = true;
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected = tokio::select! {
                () = self.stop.cancelled() => return,
                c = tokio::time::timeout(REDIS_TIMEOUT, self.subscribe(&channel)) => c,
            };
            let stream = match connected {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!(error = %e, "subscribing failed");
                    self.sleep_or_stop(&mut backoff).await;
                    continue;
                }
                Err(_) => {
                    debug!("subscribing timed out");
                    self.sleep_or_stop(&mut backoff).await;
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            subscribed.notify_one();
            if !first {
                // Whatever was published here while unsubscribed is gone: read the store.
                metrics::cluster_catch_up_all("resubscribed");
                self.hub.catch_up_all();
            }
            first = false;
            let mut stream = stream;
            loop {
                let msg = tokio::select! {
                    () = self.stop.cancelled() => return,
                    m = stream.next() => m,
                };
                let Some(msg) = msg else { break };
                self.receive(msg.get_payload_bytes());
            }
            warn!("redis subscription lost; resubscribing");
            self.set_healthy(false);
        }
    }

    async fn subscribe(&self, channel: &str) -> redis::RedisResult<redis::aio::PubSubStream> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        pubsub.subscribe(self.keys.all()).await?;
        Ok(pubsub.into_on_message())
    }

    async fn sleep_or_stop(&self, backoff: &mut Duration) {
        tokio::select! {
            () = self.stop.cancelled() => {}
            () = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(2));
    }

    /// Applies what another node published. Nothing in it is trusted to be well-formed.
    fn receive(&self, payload: &[u8]) {
        let envelope = match wire::Envelope::from_bytes(payload) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "undecodable cluster message ignored");
                return;
            }
        };
        if envelope.cluster != self.keys.cluster_id() {
            self.foreign_envelope(&envelope);
            return;
        }
        let entries = envelope.entries();
        metrics::cluster_received(entries.len() as u64);
        for (user, entry) in &entries {
            self.hub.push(*user, entry);
        }
        for fence in &envelope.fences {
            let closed = self.hub.fence(
                UserId(fence.user),
                DeviceId(fence.device),
                fence.epoch,
                &envelope.from_node,
            );
            if closed > 0 {
                metrics::cluster_fenced(closed as u64);
                info!(
                    device = fence.device,
                    epoch = fence.epoch,
                    "closed a connection superseded on another node"
                );
            }
        }
        for kick in &envelope.kicks {
            let code = ErrorCode::try_from(kick.code).unwrap_or(ErrorCode::Unauthenticated);
            self.hub.kick_local(
                UserId(kick.user),
                kick.devices().as_deref(),
                &WireError::new(code, kick.reason.clone()),
            );
        }
        if envelope.catch_up_all {
            metrics::cluster_catch_up_all("peer_request");
            self.hub.catch_up_all();
        }
    }

    /// Drops an envelope of another cluster (the keyspace should make this impossible: this
    /// is the second line of defence), counting it and warning at most once a minute.
    fn foreign_envelope(&self, envelope: &wire::Envelope) {
        metrics::cluster_foreign_envelope();
        let dropped = self.foreign.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self
            .last_foreign_warning
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= FOREIGN_WARN_EVERY) {
            *last = Some(Instant::now());
            warn!(
                from_node = %envelope.from_node,
                from_cluster = %envelope.cluster,
                cluster = self.keys.cluster_id(),
                dropped,
                "dropped a cluster message of another cluster"
            );
        }
    }
}

/// What one heartbeat learned.
struct Beat {
    claim: Refresh,
    /// This node's connections, as published.
    mine: u64,
    /// The published load of every live node (this one included), `None` where unreadable.
    loads: Vec<Option<Load>>,
}
