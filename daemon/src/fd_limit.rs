//! The process's open-file budget. Every client connection, admin connection, store file or
//! connection, Redis connection and listener is a descriptor, all drawn from one
//! `RLIMIT_NOFILE`. This module raises the soft limit to the hard limit and derives how many
//! client connections fit below it with room to spare, so the client port refuses connections
//! itself (with a reason) long before `accept()` fails with `EMFILE` and takes `/healthz`, the
//! store and Redis down with it.

use std::io;

use crate::config::{Config, StoreBackend};

/// Descriptors nobody counts individually: stdio, the runtime's epoll and event fds, the
/// certificate and CA files read at start and on SIGHUP, DNS lookups, a connection being
/// accepted only to be closed at once.
pub const MARGIN: u64 = 64;
/// The client and admin listeners.
pub const LISTENERS: u64 = 2;
/// The embedded store: a writer and its readers, each with the database, its WAL and the
/// shared-memory index open, plus SQLite's occasional temporary files.
pub const SQLITE_FILES: u64 = 32;
/// PostgreSQL connections besides the pool (migrations at start, a fresh connection while
/// a broken one is replaced).
pub const POSTGRES_EXTRA: u64 = 4;
/// Redis in a cluster: the shared connection, the subscription, the node-id claim, a
/// reconnect in flight.
pub const REDIS_CONNECTIONS: u64 = 8;
/// Connections over the client cap that are still answered with a typed `UNAVAILABLE` error
/// at once (TLS needs a descriptor while it runs); any more are closed before TLS.
pub const REFUSAL_SLOTS: usize = 32;
/// The cap when the limit cannot be read and `limits.max_connections` is 0 (auto). Every
/// Unix lets a process have at least this many files.
pub const FALLBACK_CAP: usize = 1024 - 256;
/// A cap above this could not be represented by the connection semaphore (and no process
/// gets this many descriptors anyway).
pub const MAX_CAP: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// How many client connections this process serves, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionBudget {
    /// The soft `RLIMIT_NOFILE` after raising it; `None` when it could not be read.
    pub open_files: Option<u64>,
    /// Descriptors kept back for everything but client connections.
    pub headroom: u64,
    /// `limits.max_connections` as configured (0 = derive from the limit).
    pub configured: usize,
    /// The client connections actually allowed at once.
    pub cap: usize,
}

impl ConnectionBudget {
    /// Reads the open-file limit (after raising it) and sizes the cap for `config`.
    pub fn for_config(config: &Config) -> Self {
        let open_files = match raise_open_file_limit() {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the open files limit");
                soft_open_file_limit().ok()
            }
        };
        Self::compute(config.limits.max_connections, open_files, headroom(config))
    }

    /// The pure arithmetic: `configured` (0 = auto), clamped to `open_files - headroom`.
    pub fn compute(configured: usize, open_files: Option<u64>, headroom: u64) -> Self {
        let by_descriptors = open_files.map(|n| {
            usize::try_from(n.saturating_sub(headroom))
                .unwrap_or(usize::MAX)
                .min(MAX_CAP)
        });
        let cap = match (configured, by_descriptors) {
            (0, Some(n)) => n,
            (0, None) => FALLBACK_CAP,
            (c, Some(n)) => c.min(n),
            (c, None) => c.min(MAX_CAP),
        };
        Self {
            open_files,
            headroom,
            configured,
            cap,
        }
    }

    /// True when the configured cap is above what the descriptors allow (and was lowered).
    pub fn clamped(&self) -> bool {
        self.configured != 0 && self.cap < self.configured
    }
}

/// Descriptors this configuration needs besides client connections.
pub fn headroom(config: &Config) -> u64 {
    let store = match config.store.backend {
        StoreBackend::Sqlite => SQLITE_FILES,
        StoreBackend::Postgres => u64::from(config.store.postgres_pool_size) + POSTGRES_EXTRA,
    };
    let redis = if config.cluster.redis_url.is_some() {
        REDIS_CONNECTIONS
    } else {
        0
    };
    let admin = u64::try_from(config.admin.max_connections).unwrap_or(u64::MAX);
    MARGIN
        .saturating_add(LISTENERS)
        .saturating_add(store)
        .saturating_add(redis)
        .saturating_add(admin)
        .saturating_add(REFUSAL_SLOTS as u64)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the new soft limit.
pub fn raise_open_file_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// The current soft `RLIMIT_NOFILE`.
pub fn soft_open_file_limit() -> io::Result<u64> {
    rlimit::Resource::NOFILE.get().map(|(soft, _hard)| soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_everything_the_limit_leaves_after_headroom() {
        let b = ConnectionBudget::compute(0, Some(20_000), 500);
        assert_eq!(b.cap, 19_500);
        assert!(!b.clamped());
    }

    #[test]
    fn a_configured_cap_above_the_limit_is_clamped() {
        // The audit's case: 200,000 configured, 20,000 descriptors.
        let b = ConnectionBudget::compute(200_000, Some(20_000), 500);
        assert_eq!(b.cap, 19_500);
        assert!(b.clamped());
    }

    #[test]
    fn a_configured_cap_below_the_limit_is_kept() {
        let b = ConnectionBudget::compute(1_000, Some(20_000), 500);
        assert_eq!(b.cap, 1_000);
        assert!(!b.clamped());
    }

    #[test]
    fn a_limit_below_the_headroom_leaves_no_client_connections() {
        let b = ConnectionBudget::compute(0, Some(100), 500);
        assert_eq!(b.cap, 0);
        let b = ConnectionBudget::compute(10, Some(100), 500);
        assert_eq!(b.cap, 0);
        assert!(b.clamped());
    }

    #[test]
    fn an_unreadable_or_infinite_limit_stays_representable() {
        assert_eq!(ConnectionBudget::compute(0, None, 500).cap, FALLBACK_CAP);
        assert_eq!(ConnectionBudget::compute(7, None, 500).cap, 7);
        assert_eq!(
            ConnectionBudget::compute(0, Some(u64::MAX), 500).cap,
            MAX_CAP
        );
        assert_eq!(
            ConnectionBudget::compute(usize::MAX, None, 500).cap,
            MAX_CAP
        );
    }

    #[test]
    fn headroom_counts_the_store_redis_and_admin_cap() {
        let mut c = Config::default();
        let sqlite = headroom(&c);
        assert_eq!(
            sqlite,
            MARGIN
                + LISTENERS
                + SQLITE_FILES
                + c.admin.max_connections as u64
                + REFUSAL_SLOTS as u64
        );
        c.store.backend = StoreBackend::Postgres;
        c.store.postgres_pool_size = 100;
        c.cluster.redis_url = Some("redis://127.0.0.1/".into());
        c.admin.max_connections = 10;
        assert_eq!(
            headroom(&c),
            MARGIN
                + LISTENERS
                + 100
                + POSTGRES_EXTRA
                + REDIS_CONNECTIONS
                + 10
                + REFUSAL_SLOTS as u64
        );
    }
}
