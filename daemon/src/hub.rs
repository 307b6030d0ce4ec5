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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use messenger_protocol::WireError;
use tokio::sync::mpsc;
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
    lagging: AtomicBool,
    /// Cancelled when the connection must close (session revoked, account deleted).
    kicked: CancellationToken,
    kick_reason: Mutex<Option<WireError>>,
}

impl ConnHandle {
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
        match self.live.try_send(entry.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Leave live delivery; the pump notices and pulls from the store.
                self.lagging.store(true, Ordering::Release);
                metrics::queue_full();
            }
            // The connection is going away; its device resumes from its cursor.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

type Shard = Mutex<HashMap<UserId, Vec<Arc<ConnHandle>>>>;

pub struct Hub {
    shards: Box<[Shard]>,
    mask: usize,
    next_conn_id: AtomicU64,
    live_queue: usize,
}

impl Hub {
    /// `live_queue` is each connection's live queue capacity.
    pub fn new(live_queue: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let count = (cores * 16).next_power_of_two();
        Self {
            shards: (0..count).map(|_| Mutex::new(HashMap::new())).collect(),
            mask: count - 1,
            next_conn_id: AtomicU64::new(1),
            live_queue,
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
    pub fn register(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> (Arc<ConnHandle>, mpsc::Receiver<InboxEntry>) {
        let (tx, rx) = mpsc::channel(self.live_queue);
        let handle = Arc::new(ConnHandle {
            conn_id: self.next_conn_id.fetch_add(1, Ordering::Relaxed),
            user,
            device,
            live: tx,
            lagging: AtomicBool::new(false),
            kicked: CancellationToken::new(),
            kick_reason: Mutex::new(None),
        });
        let replaced: Vec<Arc<ConnHandle>> = {
            let mut shard = self.lock(user);
            let conns = shard.entry(user).or_default();
            let (old, keep): (Vec<_>, Vec<_>) = conns.drain(..).partition(|c| c.device == device);
            *conns = keep;
            conns.push(handle.clone());
            old
        };
        for old in replaced {
            old.kick(WireError::new(
                messenger_protocol::ErrorCode::Unauthenticated,
                "this device's session was resumed on a newer connection",
            ));
        }
        (handle, rx)
    }

    pub fn unregister(&self, handle: &ConnHandle) {
        let mut shard = self.lock(handle.user);
        if let Some(conns) = shard.get_mut(&handle.user) {
            conns.retain(|c| c.conn_id != handle.conn_id);
            if conns.is_empty() {
                shard.remove(&handle.user);
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

    /// Closes the live connections of `user` whose device is in `devices` (all when `None`).
    pub fn kick(&self, user: UserId, devices: Option<&[DeviceId]>, reason: &WireError) {
        for conn in self.connections_of(user) {
            if devices.is_none_or(|d| d.contains(&conn.device)) {
                conn.kick(reason.clone());
            }
        }
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
        let hub = Hub::new(8);
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
        let hub = Hub::new(2);
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
        let hub = Hub::new(2);
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
    fn a_newer_connection_of_the_same_device_replaces_the_older_one() {
        let hub = Hub::new(2);
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
