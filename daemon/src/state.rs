//! What every connection shares: configuration, the store, the hub, the password hasher and
//! the abuse limits. One `Arc<Shared>` per server.

use std::sync::Arc;

use crate::auth::PasswordHasher;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::{AddressGroup, WindowLimiter};
use crate::memory::MemoryBudget;
use crate::store::Store;

pub struct Shared {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// Set when running as one node of several (Redis routing).
    pub cluster: Option<Arc<Cluster>>,
    pub passwords: PasswordHasher,
    /// Bytes buffered by all connections (see `memory`).
    pub memory: Arc<MemoryBudget>,
    /// Login and register attempts per client IP.
    pub auth_per_ip: WindowLimiter<AddressGroup>,
    /// Failed logins per account (case-folded username).
    pub login_failures: WindowLimiter<String>,
}

impl Shared {
    pub fn new(config: Config, store: Arc<dyn Store>) -> Result<Self, String> {
        Ok(Self {
            hub: Arc::new(Hub::new(
                config.limits.outbound_queue,
                config.memory.live_queue_bytes,
            )),
            cluster: None,
            passwords: PasswordHasher::new(&config.passwords)?,
            memory: MemoryBudget::new(&config.memory),
            auth_per_ip: WindowLimiter::new(config.limits.auth_attempts_per_ip),
            login_failures: WindowLimiter::new(config.limits.login_failures_per_account),
            store,
            config,
        })
    }
}
