//! The hub: which connections are live for which user, and the live push to them.
//!
//! A sharded map `UserId -> connections`. A push locks one shard only long enough to clone the
//! user's few handles, then offers the entry to each connection's bounded live queue without
//! holding any lock. A connection whose queue is full is marked lagging and gets no more live
//! pushes; its delivery pump catches up from the store and clears the mark when level (see
//! `delivery`). The hub therefore never blocks, never grows without bound, and never drops a
//! message: the store is the truth, the hub only shortens the path.
//!
//! Each shard is a `std::sync::Mutex`, not an async one: it is never held across an `.await`,
//! and the critical sections are a hash lookup and a small `Vec` clone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use messenger_protocol::WireError;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::model::{DeviceId, InboxEntry, UserId};

/// One live, authenticated connection as the hub sees it.
#[derive(Debug)]
pub struct ConnHandle {
    pub conn_id: u64,
    pub user: UserId,
    pub device: DeviceId,
    live: mpsc::Sender<InboxEntry>,
    /// Message bytes in the live queue, bounded by the hub's `live_queue_bytes`. The bodies
    /// are shared with every other recipient's entry, but a connection must not be the one
    /// keeping many of them alive.
    live_bytes: AtomicUsize,
    live_bytes_max: usize,
    lagging: AtomicBool,
    /// Cancelled when the connection must close (session revoked, account deleted).
    kicked: CancellationToken,
    kick_reason: Mutex<Option<WireError>>,
    /// Cluster-wide connect epoch of this device's connection (0 until assigned, and when
    /// running alone): a node seeing a newer epoch for the device elsewhere closes this one.
    epoch: AtomicU64,
    /// Wakes the pump to read the store even though no live push arrived (pushes from other
    /// nodes may have been lost while Redis was unreachable).
    catch_up: Notify,
}

impl ConnHandle {
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn set_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }

    /// Resolves when someone asked this connection to catch up from the store.
    pub async fn catch_up_requested(&self) {
        self.catch_up.notified().await;
    }

    pub fn request_catch_up(&self) {
        // notify_one keeps a permit when the pump is busy, so the request is never lost.
        self.catch_up.notify_one();
    }

    /// True while the connection catches up from the store instead of taking live pushes.
    pub fn is_lagging(&self) -> bool {
        self.lagging.load(Ordering::Acquire)
    }

    /// Called by the connection's pump when it is level with the store again.
    pub fn clear_lagging(&self) {
        self.lagging.store(false, Ordering::Release);
    }

    pub fn kicked(&self) -> &CancellationToken {
        &self.kicked
    }

    /// Why the connection was kicked, once `kicked()` fired.
    pub fn kick_reason(&self) -> Option<WireError> {
        self.kick_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn kick(&self, reason: WireError) {
        *self.kick_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.kicked.cancel();
    }

    fn offer(&self, entry: &InboxEntry) {
        if self.is_lagging() {
            return;
        }
        let bytes = entry.message.body.len();
        let before = self.live_bytes.fetch_add(bytes, Ordering::AcqRel);
        // One entry always fits, however large: a queue must be able to hold something.
        if before > 0 && before.saturating_add(bytes) > self.live_bytes_max {
            self.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.fall_behind();
            return;
        }
        match self.live.try_send(entry.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
                self.fall_behind();
            }
            // The connection is going away; its device resumes from its cursor.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.live_bytes.fetch_sub(bytes, Ordering::AcqRel);
            }
        }
    }

    /// Leaves live delivery; the pump notices and pulls from the store.
    fn fall_behind(&self) {
        self.lagging.store(true, Ordering::Release);
        metrics::queue_full();
    }
}

/// A connection's live queue, as its delivery pump reads it.
pub struct LiveQueue {
    rx: mpsc::Receiver<InboxEntry>,
    handle: Arc<ConnHandle>,
}

impl LiveQueue {
    pub async fn recv(&mut self) -> Option<InboxEntry> {
        let entry = self.rx.recv().await?;
        self.taken(&entry);
        Some(entry)
    }

    pub fn try_recv(&mut self) -> Result<InboxEntry, mpsc::error::TryRecvError> {
        let entry = self.rx.try_recv()?;
        self.taken(&entry);
        Ok(entry)
    }

    fn taken(&self, entry: &InboxEntry) {
        self.handle
            .live_bytes
            .fetch_sub(entry.message.body.len(), Ordering::AcqRel);
    }
}

type Shard = Mutex<HashMap<UserId, Vec<Arc<ConnHandle>>>>;

/// What the cluster layer needs to hear about, in the order it happened per user (events are
/// sent while the user's shard is locked).
#[derive(Debug)]
pub enum HubEvent {
    /// A connection signed in.
    Connected { handle: Arc<ConnHandle> },
    /// The user's last live connection here went away.
    Gone { user: UserId },
    /// A request asked to close connections of `user` (all devices when `devices` is `None`),
    /// wherever they are.
    Kick {
        user: UserId,
        devices: Option<Vec<DeviceId>>,
        reason: WireError,
    },
}

pub struct Hub {
    shards: Box<[Shard]>,
    mask: usize,
    next_conn_id: AtomicU64,
    live_queue: usize,
    live_queue_bytes: usize,
    observer: OnceLock<mpsc::UnboundedSender<HubEvent>>,
}

impl Hub {
    /// `live_queue` is each connection's live queue capacity in entries, `live_queue_bytes`
    /// in message bytes.
    pub fn new(live_queue: usize, live_queue_bytes: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = (cores * 16).next_power_of_two();
        Self {
            shards: (0..count).map(|_| Mutex::new(HashMap::new())).collect(),
            mask: count - 1,
            next_conn_id: AtomicU64::new(1),
            live_queue,
            live_queue_bytes,
            observer: OnceLock::new(),
        }
    }

    /// Starts reporting `HubEvent`s (once; the cluster layer calls it before serving).
    pub fn observe(&self) -> Option<mpsc::UnboundedReceiver<HubEvent>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.observer.set(tx).ok().map(|()| rx)
    }

    fn report(&self, event: HubEvent) {
        if let Some(observer) = self.observer.get() {
            // Closed only while shutting down, when nobody needs the event any more.
            let _ = observer.send(event);
        }
    }

    fn shard(&self, user: UserId) -> &Shard {
        // Ids are sequential, so the low bits spread users evenly.
        &self.shards[(user.0 as usize) & self.mask]
    }

    fn lock(
        &self,
        user: UserId,
    ) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<Arc<ConnHandle>>>> {
        self.shard(user).lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a connection for live pushes; the receiver is its live queue. A device has
    /// one delivering connection: an older connection of the same device (typically a
    /// half-open one the client already gave up on) is kicked, so the newest one wins.
    pub fn register(&self, user: UserId, device: DeviceId) -> (Arc<ConnHandle>, LiveQueue) {
        let (tx, rx) = mpsc::channel(self.live_queue);
        let handle = Arc::new(ConnHandle {
            conn_id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
            user,
            device,
            live: tx,
            live_bytes: AtomicUsize::new(0),
            live_bytes_max: self.live_queue_bytes,
            lagging: AtomicBool::new(false),
            kicked: CancellationToken::new(),
            kick_reason: Mutex::new(None),
            epoch: AtomicU64::new(0),
            catch_up: Notify::new(),
        });
        let replaced: Vec<Arc<ConnHandle>> = {
            let mut shard = self.lock(user);
            let conns = shard.entry(user).or_default();
            let (old, keep): (Vec<_>, Vec<_>) = conns.drain(..).partition(|c| c.device == device);
            *conns = keep;
            conns.push(handle.clone());
            self.report(HubEvent::Connected {
                handle: handle.clone(),
            });
            old
        };
        for old in replaced {
            old.kick(WireError::new(
                messenger_protocol::ErrorCode::Unauthenticated,
                "this device's session was resumed on a newer connection",
            ));
        }
        let live = LiveQueue {
            rx,
            handle: Arc::clone(&handle),
        };
        (handle, live)
    }

    pub fn unregister(&self, handle: &ConnHandle) {
        let mut shard = self.lock(handle.user);
        if let Some(conns) = shard.get_mut(&handle.user) {
            let before = conns.len();
            conns.retain(|c| c.conn_id != handle.conn_id);
            if conns.is_empty() {
                shard.remove(&handle.user);
                if before > 0 {
                    self.report(HubEvent::Gone { user: handle.user });
                }
            }
        }
    }

    fn connections_of(&self, user: UserId) -> Vec<Arc<ConnHandle>> {
        self.lock(user).get(&user).cloned().unwrap_or_default()
    }

    /// Offers an inbox entry to every live connection of `user`.
    pub fn push(&self, user: UserId, entry: &InboxEntry) {
        for conn in self.connections_of(user) {
            conn.offer(entry);
        }
    }

    /// Closes the connections of `user` whose device is in `devices` (all when `None`), here
    /// and, through the cluster layer, on every other node.
    pub fn kick(&self, user: UserId, devices: Option<&[DeviceId]>, reason: &WireError) {
        self.kick_local(user, devices, reason);
        self.report(HubEvent::Kick {
            user,
            devices: devices.map(<[DeviceId]>::to_vec),
            reason: reason.clone(),
        });
    }

    /// As `kick`, on this node only (a kick that came from another node).
    pub fn kick_local(&self, user: UserId, devices: Option<&[DeviceId]>, reason: &WireError) {
        for conn in self.connections_of(user) {
            if devices.is_none_or(|d| d.contains(&conn.device)) {
                conn.kick(reason.clone());
            }
        }
    }

    /// Closes this node's connection of `device` if a newer one (higher epoch) exists
    /// elsewhere. Connections whose epoch is not known yet are left alone: when it arrives it
    /// is the newer one.
    pub fn fence(&self, user: UserId, device: DeviceId, epoch: u64, by_node: &str) -> usize {
        let mut closed = 0;
        for conn in self.connections_of(user) {
            let mine = conn.epoch();
            if conn.device == device && mine != 0 && mine < epoch {
                // The node that now serves the device, so a client (and an operator reading its
                // logs) can tell which sign-in displaced this connection.
                conn.kick(WireError::new(
                    messenger_protocol::ErrorCode::Unauthenticated,
                    format!(
                        "this device's session was resumed on a newer connection (on node {by_node})"
                    ),
                ));
                closed += 1;
            }
        }
        closed
    }

    /// Every live connection on this node.
    pub fn connections(&self) -> Vec<Arc<ConnHandle>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .flatten()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Asks every connection here to read its inbox from the store: pushes may have been lost
    /// on their way from other nodes.
    pub fn catch_up_all(&self) -> usize {
        let conns = self.connections();
        for conn in &conns {
            conn.request_catch_up();
        }
        conns.len()
    }

    /// Closes every connection here with `reason` (a node that was cut off from the cluster).
    pub fn kick_all(&self, reason: &WireError) -> usize {
        let conns = self.connections();
        for conn in &conns {
            conn.kick(reason.clone());
        }
        conns.len()
    }

    /// Number of live connections here, without copying them.
    pub fn connection_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .map(Vec::len)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Closes up to `count` connections here, picked at random among those fully registered
    /// in the cluster (with an epoch) and not already closing, with `reason`. Returns how
    /// many it closed. Rebalancing: the clients reconnect through the balancer.
    pub fn hand_back(&self, count: usize, reason: &WireError) -> usize {
        use rand::seq::IndexedRandom;
        let candidates: Vec<Arc<ConnHandle>> = self
            .connections()
            .into_iter()
            .filter(|c| c.epoch() != 0 && !c.kicked().is_cancelled())
            .collect();
        let chosen: Vec<&Arc<ConnHandle>> = candidates
            .choose_multiple(&mut rand::rng(), count)
            .collect();
        for conn in &chosen {
            conn.kick(reason.clone());
        }
        chosen.len()
    }

    /// Number of users with at least one live connection.
    pub fn online_users(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{MessageId, Recipient, Seq, StoredMessage, User};

    fn entry(seq: u64) -> InboxEntry {
        InboxEntry {
            seq: Seq(seq),
            message: Arc::new(StoredMessage {
                id: MessageId(seq),
                sender: User {
                    id: UserId(1),
                    username: "a".into(),
                    display_name: "A".into(),
                },
                to: Recipient::User(UserId(2)),
                client_msg_id: format!("m{seq}"),
                body: bytes::Bytes::from_static(b"hi"),
                content_type: "text/plain".into(),
                server_time: 0,
            }),
        }
    }

    #[test]
    fn push_reaches_every_device_of_the_user_and_no_one_else() {
        let hub = Hub::new(8, usize::MAX);
        let (_a1, mut rx1) = hub.register(UserId(2), DeviceId(1));
        let (_a2, mut rx2) = hub.register(UserId(2), DeviceId(2));
        let (_b, mut rx3) = hub.register(UserId(3), DeviceId(3));
        hub.push(UserId(2), &entry(1));
        assert_eq!(rx1.try_recv().map(|e| e.seq), Ok(Seq(1)));
        assert_eq!(rx2.try_recv().map(|e| e.seq), Ok(Seq(1)));
        assert!(rx3.try_recv().is_err());
    }

    #[test]
    fn a_full_queue_marks_the_connection_lagging_instead_of_blocking() {
        let hub = Hub::new(2, usize::MAX);
        let (handle, mut rx) = hub.register(UserId(2), DeviceId(1));
        for seq in 1..=5 {
            hub.push(UserId(2), &entry(seq));
        }
        assert!(handle.is_lagging());
        assert_eq!(rx.try_recv().map(|e| e.seq), Ok(Seq(1)));
        assert_eq!(rx.try_recv().map(|e| e.seq), Ok(Seq(2)));
        assert!(rx.try_recv().is_err(), "nothing beyond capacity is queued");
        handle.clear_lagging();
        hub.push(UserId(2), &entry(6));
        assert_eq!(rx.try_recv().map(|e| e.seq), Ok(Seq(6)));
    }

    #[test]
    fn unregister_and_kick_affect_only_the_named_connections() {
        let hub = Hub::new(2, usize::MAX);
        let (h1, _rx1) = hub.register(UserId(2), DeviceId(1));
        let (h2, _rx2) = hub.register(UserId(2), DeviceId(2));
        hub.kick(
            UserId(2),
            Some(&[DeviceId(2)]),
            &WireError::new(messenger_protocol::ErrorCode::Unauthenticated, "revoked"),
        );
        assert!(!h1.kicked().is_cancelled());
        assert!(h2.kicked().is_cancelled());
        hub.unregister(&h1);
        hub.unregister(&h2);
        assert_eq!(hub.online_users(), 0);
    }

    #[test]
    fn hand_back_closes_only_registered_connections_and_at_most_the_count() {
        let hub = Hub::new(2, usize::MAX);
        let handles: Vec<_> = (1..=5)
            .map(|u| hub.register(UserId(u), DeviceId(u)))
            .collect();
        for (h, _) in &handles[..4] {
            h.set_epoch(7);
        }
        assert_eq!(hub.connection_count(), 5);
        let reason = WireError::new(messenger_protocol::ErrorCode::Unavailable, "rebalancing");
        assert_eq!(hub.hand_back(3, &reason), 3);
        assert!(!handles[4].0.kicked().is_cancelled(), "no epoch yet");
        // Only one registered connection is left that is not already closing.
        assert_eq!(hub.hand_back(3, &reason), 1);
        assert_eq!(hub.hand_back(3, &reason), 0);
        let kicked = handles
            .iter()
            .filter(|(h, _)| h.kicked().is_cancelled())
            .count();
        assert_eq!(kicked, 4);
        assert_eq!(
            handles[0].0.kick_reason().map(|r| r.message),
            Some("rebalancing".into())
        );
    }

    #[test]
    fn a_newer_connection_of_the_same_device_replaces_the_older_one() {
        let hub = Hub::new(2, usize::MAX);
        let (old, _rx1) = hub.register(UserId(2), DeviceId(1));
        let (other_device, _rx2) = hub.register(UserId(2), DeviceId(2));
        let (new, mut rx3) = hub.register(UserId(2), DeviceId(1));
        assert!(old.kicked().is_cancelled());
        assert!(!other_device.kicked().is_cancelled());
        assert!(!new.kicked().is_cancelled());
        hub.push(UserId(2), &entry(1));
        assert_eq!(rx3.try_recv().map(|e| e.seq), Ok(Seq(1)));
        // The replaced connection unregistering later must not remove the new one.
        hub.unregister(&old);
        hub.push(UserId(2), &entry(2));
        assert_eq!(rx3.try_recv().map(|e| e.seq), Ok(Seq(2)));
    }
}
