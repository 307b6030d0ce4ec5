//! What every connection shares: configuration, the store, the hub, the password hasher and
//! the abuse limits. One `Arc<Shared>` per server.

use std::sync::Arc;

use crate::account_budgets::AccountBudgets;
use crate::auth::PasswordHasher;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::{AddressGroup, WindowLimiter};
use crate::store::Store;

pub struct Shared {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    /// Set when running as one node of several (Redis routing).
    pub cluster: Option<Arc<Cluster>>,
    pub passwords: PasswordHasher,
    /// Login and register attempts per client IP.
    pub auth_per_ip: WindowLimiter<AddressGroup>,
    /// Failed logins per account (case-folded username).
    pub login_failures: WindowLimiter<String>,
    /// Per-account budgets (sends, fan-out, reads, lookups, group changes), shared by all of
    /// an account's connections, and by every node once `share_through` the cluster.
    pub budgets: AccountBudgets,
}

impl Shared {
    pub fn new(config: Config, store: Arc<dyn Store>) -> Result<Self, String> {
        Ok(Self {
            hub: Arc::new(Hub::new(config.limits.outbound_queue)),
            cluster: None,
            passwords: PasswordHasher::new(&config.passwords)?,
            auth_per_ip: WindowLimiter::new(config.limits.auth_attempts_per_ip),
            login_failures: WindowLimiter::new(config.limits.login_failures_per_account),
            budgets: AccountBudgets::new(&config.limits),
            store,
            config,
        })
    }
}
