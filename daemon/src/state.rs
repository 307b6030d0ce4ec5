//! What every connection shares: configuration, the store, the hub, the password hasher and
//! the abuse limits. One `Arc<Shared>` per server.

use std::sync::Arc;

use crate::account_budgets::AccountBudgets;
use crate::auth::PasswordHasher;
use crate::budget::{Allowance, Limiter, SharedBudgets};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::{AddressGroup, BucketLimiter, WindowLimiter};
use crate::memory::MemoryBudget;
use crate::model::DeviceId;
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
    pub auth_per_ip: Limiter<AddressGroup>,
    /// Failed logins per account (case-folded username) from devices without a valid login
    /// cookie: the account's shared "untrusted" budget.
    pub login_failures: Limiter<String>,
    /// Failed logins per login cookie (by its hash): each known device's own budget.
    pub cookie_failures: WindowLimiter<[u8; 32]>,
    /// Wrong current passwords (`ChangePassword`, `DeleteAccount`) per signed-in device.
    pub password_failures: WindowLimiter<DeviceId>,
    /// Resumes with an unknown, revoked or expired token per client IP.
    pub invalid_resumes: Limiter<AddressGroup>,
    /// Successful resumes per device.
    pub resumes: BucketLimiter<DeviceId>,
    /// Per-account budgets (sends, fan-out, reads, lookups, group changes), shared by all of
    /// an account's connections, and by every node once `share_through` the cluster.
    pub budgets: AccountBudgets,
}

impl Shared {
    /// From now on every budget that guards an account or an address is the cluster's: an
    /// attacker spreading over the nodes gets one allowance, not one per node.
    pub fn share_budgets_through(&mut self, shared: Arc<dyn SharedBudgets>) {
        self.budgets.share_through(Arc::clone(&shared));
        self.auth_per_ip.share_through(Arc::clone(&shared));
        self.login_failures.share_through(Arc::clone(&shared));
        self.invalid_resumes.share_through(shared);
    }

    pub fn new(config: Config, store: Arc<dyn Store>) -> Result<Self, String> {
        let l = &config.limits;
        Ok(Self {
            hub: Arc::new(Hub::new(l.outbound_queue, config.memory.live_queue_bytes)),
            cluster: None,
            passwords: PasswordHasher::new(&config.passwords)?,
            memory: MemoryBudget::new(&config.memory),
            auth_per_ip: Limiter::new(
                "auth_attempts",
                Allowance::per_minute(l.auth_attempts_per_ip),
            ),
            login_failures: Limiter::new(
                "login_failures",
                Allowance::per_minute(l.login_failures_per_account),
            ),
            cookie_failures: WindowLimiter::new(l.login_failures_per_cookie),
            password_failures: WindowLimiter::new(l.login_failures_per_cookie),
            invalid_resumes: Limiter::new(
                "invalid_resumes",
                Allowance::per_minute(l.invalid_resumes_per_ip),
            ),
            resumes: BucketLimiter::per_minute(
                l.resumes_per_device_per_minute,
                l.resume_burst_per_device,
            ),
            budgets: AccountBudgets::new(&config.limits),
            store,
            config,
        })
    }
}
