//! The memory budget: every byte a connection buffers on its way out, and every large frame
//! on its way in, is charged against two pools: the connection's own (so one slow reader
//! holds at most `connection_outbound_bytes`) and the process's (`max_buffered_bytes`, so
//! many of them together cannot grow the process).
//!
//! When the process pool runs dry, the connections that hold the most for the longest (the
//! slowest readers) are shed: closed at once, their queues dropped. Nothing is lost by it:
//! their devices resume from their acknowledged cursors and catch up from the store, which is
//! the truth; the queues only shortened the path. A sender that still cannot get bytes after
//! the shedding gives up on its own connection the same way.
//!
//! Accounting is by permits of a `tokio::sync::Semaphore`, one per byte: a charge is held by
//! the queued frame and released when the frame is written or dropped, so the books can never
//! drift from what is really buffered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::MemoryConfig;
use crate::metrics;

/// How long a sender waits for the process pool (while slow readers are shed) before it gives
/// up on its own connection.
const POOL_WAIT: Duration = Duration::from_secs(2);
/// Shedding runs at most this often: a closed connection needs a moment to drop its queue.
const SHED_INTERVAL: Duration = Duration::from_millis(100);
/// Registry shards (connections register and leave concurrently).
const SHARDS: usize = 16;

/// The process-wide pool and the registry of connections that can be shed.
pub struct MemoryBudget {
    pool: Arc<Semaphore>,
    total: usize,
    connection_bytes: usize,
    registry: Arc<Registry>,
    pressure: Notify,
    epoch: Instant,
}

#[derive(Default)]
struct Registry {
    next_id: AtomicU64,
    shards: [Mutex<HashMap<u64, Weak<ConnMemory>>>; SHARDS],
}

impl Registry {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<ConnMemory>>> {
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// What one connection has buffered, and the switch that sheds it.
pub struct ConnMemory {
    id: u64,
    own: Arc<Semaphore>,
    queued: AtomicUsize,
    /// Milliseconds since the budget's epoch of the connection's last completed write (or its
    /// start): the shedder drops the connections that have made no progress for longest.
    progress_ms: AtomicU64,
    /// Cancelled when the connection must drop everything it buffered and close now.
    discard: CancellationToken,
    budget: Arc<MemoryBudget>,
}

/// Bytes held for one buffered frame; released on drop.
pub struct Charge {
    _own: OwnedSemaphorePermit,
    _pool: OwnedSemaphorePermit,
    bytes: usize,
    conn: Arc<ConnMemory>,
}

/// Bytes of the process pool held for data read on a connection's behalf (a large inbound
/// frame, a catch-up page); released on drop. A connection reads one frame at a time, so its
/// own share needs no charge for it: the frame limit bounds it.
pub struct PoolCharge(OwnedSemaphorePermit);

impl PoolCharge {
    /// Gives back everything above `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        let excess = self.0.num_permits().saturating_sub(bytes);
        if excess > 0 {
            drop(self.0.split(excess));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The connection was shed (or discarded) while waiting.
    #[error("connection shed")]
    Shed,
    /// The process pool stayed exhausted for the whole wait.
    #[error("server is short of memory")]
    Exhausted,
}

impl MemoryBudget {
    pub fn new(config: &MemoryConfig) -> Arc<Self> {
        let total = config.max_buffered_bytes.min(Semaphore::MAX_PERMITS);
        Arc::new(Self {
            pool: Arc::new(Semaphore::new(total)),
            total,
            connection_bytes: config.connection_outbound_bytes.max(1),
            registry: Arc::default(),
            pressure: Notify::new(),
            epoch: Instant::now(),
        })
    }

    /// Bytes currently charged to the process pool.
    pub fn in_use(&self) -> usize {
        self.total.saturating_sub(self.pool.available_permits())
    }

    pub fn total(&self) -> usize {
        self.total
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A new connection's account; it leaves the registry when dropped.
    pub fn connection(self: &Arc<Self>) -> Arc<ConnMemory> {
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnMemory {
            id,
            own: Arc::new(Semaphore::new(self.connection_bytes)),
            queued: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(self.now_ms()),
            discard: CancellationToken::new(),
            budget: Arc::clone(self),
        });
        self.registry.shard(id).insert(id, Arc::downgrade(&conn));
        conn
    }

    /// Takes `bytes` for an inbound frame without waiting; `None` when the pool is dry (the
    /// reader then waits for it with `ConnMemory::charge_read`, not reading meanwhile).
    pub fn try_reserve_read(&self, bytes: usize) -> Option<PoolCharge> {
        let n = u32::try_from(bytes).ok()?;
        Arc::clone(&self.pool)
            .try_acquire_many_owned(n)
            .ok()
            .map(PoolCharge)
    }

    /// Runs until `stop`: whenever a sender found the pool dry, closes the connections that
    /// hold buffered bytes and have made no write progress for longest, until an eighth of the
    /// pool (at least) is being released.
    pub async fn shed_slow_readers(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.pressure.notified() => {}
            }
            self.shed_once();
            tokio::time::sleep(SHED_INTERVAL).await;
        }
    }

    fn shed_once(&self) {
        let mut holders: Vec<Arc<ConnMemory>> = Vec::new();
        for shard in &self.registry.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            holders.extend(
                shard
                    .values()
                    .filter_map(Weak::upgrade)
                    .filter(|c| c.queued() > 0 && !c.discard.is_cancelled()),
            );
        }
        // Oldest progress first; among equals, the biggest holder.
        holders.sort_by_key(|c| {
            (
                c.progress_ms.load(Ordering::Relaxed),
                std::cmp::Reverse(c.queued()),
            )
        });
        let target = (self.total / 8).max(1);
        let mut freed = 0usize;
        let mut shed = 0u64;
        for conn in holders {
            if freed >= target {
                break;
            }
            freed = freed.saturating_add(conn.queued());
            conn.discard.cancel();
            shed += 1;
        }
        if shed > 0 {
            metrics::connections_shed(shed);
            warn!(
                connections = shed,
                bytes = freed,
                "memory budget exhausted: shed the slowest readers (they resume from the store)"
            );
        }
    }
}

impl ConnMemory {
    /// Charges `bytes` for a frame about to be queued: waits for the connection's own share
    /// (back-pressure on this connection alone), then for the process pool, shedding slow
    /// readers if it is dry. A frame larger than the connection's share takes all of it.
    /// When the pool stays dry the connection is discarded (`Exhausted`).
    pub async fn charge(self: &Arc<Self>, bytes: usize) -> Result<Charge, BudgetError> {
        let own_n = u32::try_from(bytes.min(self.budget.connection_bytes)).unwrap_or(u32::MAX);
        let own = tokio::select! {
            biased;
            () = self.discard.cancelled() => return Err(BudgetError::Shed),
            permit = Arc::clone(&self.own).acquire_many_owned(own_n) => {
                permit.map_err(|_| BudgetError::Shed)?
            }
        };
        let pool = self.take_from_pool(bytes).await?;
        self.queued.fetch_add(bytes, Ordering::Relaxed);
        Ok(Charge {
            _own: own,
            _pool: pool,
            bytes,
            conn: Arc::clone(self),
        })
    }

    /// Charges up to `bytes` to the process pool alone, for data read on this connection's
    /// behalf (a catch-up page); `PoolCharge::shrink_to` gives back what was not needed.
    pub async fn charge_read(&self, bytes: usize) -> Result<PoolCharge, BudgetError> {
        Ok(PoolCharge(self.take_from_pool(bytes).await?))
    }

    async fn take_from_pool(&self, bytes: usize) -> Result<OwnedSemaphorePermit, BudgetError> {
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        match Arc::clone(&self.budget.pool).try_acquire_many_owned(n) {
            Ok(permit) => return Ok(permit),
            Err(TryAcquireError::Closed) => return Err(BudgetError::Shed),
            Err(TryAcquireError::NoPermits) => {}
        }
        self.budget.pressure.notify_one();
        tokio::select! {
            biased;
            () = self.discard.cancelled() => Err(BudgetError::Shed),
            permit = tokio::time::timeout(
                POOL_WAIT,
                Arc::clone(&self.budget.pool).acquire_many_owned(n),
            ) => match permit {
                Ok(Ok(permit)) => Ok(permit),
                Ok(Err(_)) => Err(BudgetError::Shed),
                Err(_) => {
                    debug!(bytes, "memory budget stayed exhausted; giving up this connection");
                    metrics::connections_shed(1);
                    self.discard.cancel();
                    Err(BudgetError::Exhausted)
                }
            },
        }
    }

    /// Bytes this connection has queued or in flight.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// A write completed: the connection is reading.
    pub fn progressed(&self) {
        self.progress_ms
            .store(self.budget.now_ms(), Ordering::Relaxed);
    }

    /// Cancelled when the connection must drop what it buffered and close now (shed by the
    /// budget, or kicked).
    pub fn discarded(&self) -> &CancellationToken {
        &self.discard
    }

    pub fn discard(&self) {
        self.discard.cancel();
    }
}

impl Drop for ConnMemory {
    fn drop(&mut self) {
        self.budget.registry.shard(self.id).remove(&self.id);
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.conn.queued.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: usize, per_conn: usize) -> Arc<MemoryBudget> {
        MemoryBudget::new(&MemoryConfig {
            max_buffered_bytes: total,
            connection_outbound_bytes: per_conn,
            ..MemoryConfig::default()
        })
    }

    #[tokio::test]
    async fn charges_are_released_when_dropped() {
        let b = budget(1000, 500);
        let c = b.connection();
        let one = c.charge(300).await.expect("charge");
        assert_eq!(b.in_use(), 300);
        assert_eq!(c.queued(), 300);
        drop(one);
        assert_eq!(b.in_use(), 0);
        assert_eq!(c.queued(), 0);
    }

    #[tokio::test]
    async fn a_connection_waits_for_its_own_share_only() {
        let b = budget(10_000, 500);
        let slow = b.connection();
        let held = slow.charge(400).await.expect("charge");
        let blocked = tokio::time::timeout(Duration::from_millis(50), slow.charge(200)).await;
        assert!(blocked.is_err(), "over its own share, the sender waits");
        let other = b.connection();
        assert!(other.charge(500).await.is_ok(), "others are not held up");
        drop(held);
        assert!(slow.charge(200).await.is_ok());
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_share_takes_all_of_it() {
        let b = budget(10_000, 500);
        let c = b.connection();
        let big = c.charge(2_000).await.expect("charge");
        assert_eq!(b.in_use(), 2_000);
        drop(big);
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn a_dry_pool_sheds_the_reader_that_stalled_longest() {
        let b = budget(1_000, 600);
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&b).shed_slow_readers(stop.clone()));
        let stalled = b.connection();
        let held = stalled.charge(600).await.expect("charge");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reading = b.connection();
        let also_held = reading.charge(300).await.expect("charge");
        reading.progressed();
        let newcomer = b.connection();
        let waiting = tokio::spawn(async move { newcomer.charge(400).await.is_ok() });
        tokio::time::timeout(Duration::from_secs(10), stalled.discarded().cancelled())
            .await
            .expect("the stalled connection is shed");
        assert!(!reading.discarded().is_cancelled());
        drop(held);
        assert!(
            waiting.await.expect("join"),
            "the waiting sender got its bytes"
        );
        drop(also_held);
        stop.cancel();
    }

    #[tokio::test]
    async fn read_reservations_fail_fast_when_the_pool_is_dry() {
        let b = budget(1_000, 500);
        let r = b.try_reserve_read(900).expect("reserve");
        assert!(b.try_reserve_read(200).is_none());
        drop(r);
        assert!(b.try_reserve_read(200).is_some());
    }
}
