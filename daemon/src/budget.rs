//! Per-account budgets (issue 11: F3, F9, F10): token buckets keyed by account, so every
//! connection of an account on this node draws from one allowance, and, when the node is one
//! of a cluster, every node too — without a Redis round trip per request.
//!
//! Owns the buckets and their eviction; never decides what a request costs (the handlers do)
//! and never talks to Redis itself (a [`SharedBudgets`] does, see `cluster::budgets`).
//!
//! - **Alone**, a key's bucket lives here: `rate` tokens a second up to `burst`.
//! - **Clustered**, the bucket lives in Redis and this node holds a short *lease* of tokens
//!   taken from it in chunks (about a tenth of a second of the rate). Requests spend the lease
//!   locally; only when it runs out does one Redis call refill it. Every token a node spends
//!   was granted by Redis, so all nodes together admit at most `burst + rate × elapsed` (plus
//!   at most one unspent chunk per node whose lease outlived a refill to the cap). A lease
//!   expires after [`LEASE_TTL`]; what was left of it is simply not spent.
//! - **Redis unreachable**: the node falls back to its own bucket (the single-node limit),
//!   so a Redis outage never refuses a user who is within their budget.
//! - **Costs**: a request may cost more than one token (a group send costs one per inbox it
//!   fills). Admission needs `min(cost, burst)` tokens, then the whole cost is taken, so a
//!   request bigger than the burst is possible once the allowance is unused, and the debt is
//!   waited off afterwards. [`Limiter::record`] charges a cost known only after the work
//!   (the fan-out of a stored message) and may leave the bucket in debt.
//! - **Memory**: a bucket that has refilled (and holds no lease or debt) is the same as no
//!   bucket, so idle keys are swept when a shard has doubled since its last sweep.

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

const SHARDS: usize = 16;
/// A shard is swept for idle buckets when it reaches this many, or twice its size after the
/// last sweep, so sweeping costs O(1) per insert amortized.
const SWEEP_MIN: usize = 1024;
/// How long tokens leased from the cluster stay spendable here. The bound on what a node can
/// overspend does not depend on it (it is the unspent lease, at most one chunk): it only lets
/// an idle key's entry go, while a slow but steady sender still spends a whole chunk per call.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// A lease covers this share of a second of the rate.
const LEASE_SECONDS: f64 = 0.1;

/// How fast a budget refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Allowance {
    /// Tokens added per second.
    pub rate: f64,
    /// Most tokens held (and the allowance of an account first seen).
    pub burst: f64,
}

impl Allowance {
    pub fn per_second(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
        }
    }

    /// `n` at once, refilled over a minute.
    pub fn per_minute(n: u32) -> Self {
        Self {
            rate: f64::from(n.max(1)) / 60.0,
            burst: f64::from(n.max(1)),
        }
    }

    /// `n` at once, refilled over an hour.
    pub fn per_hour(n: u32) -> Self {
        Self {
            rate: f64::from(n.max(1)) / 3600.0,
            burst: f64::from(n.max(1)),
        }
    }

    fn wait_for(&self, missing: f64) -> Duration {
        Duration::from_secs_f64((missing.max(0.0) / self.rate).min(86_400.0))
    }

    /// Tokens leased from the cluster at a time beyond what a request needs.
    fn chunk(&self) -> u64 {
        (self.rate * LEASE_SECONDS)
            .min(self.burst / 4.0)
            .floor()
            .max(0.0) as u64
    }
}

/// A request to the cluster-wide bucket of one key: pay `pay` tokens of debt, then grant
/// between `need` and `want` tokens, or nothing and how long until `need` would be there.
#[derive(Debug, Clone)]
pub struct LeaseRequest<'a> {
    pub budget: &'static str,
    pub key: &'a str,
    pub allowance: Allowance,
    pub pay: u64,
    pub need: u64,
    pub want: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub granted: u64,
    /// When nothing was granted: how long until `need` tokens are there.
    pub wait: Duration,
}

/// Where the buckets of a cluster live (Redis); see `cluster::budgets`.
#[async_trait]
pub trait SharedBudgets: Send + Sync + 'static {
    async fn lease(&self, request: LeaseRequest<'_>) -> Result<Grant, String>;
}

#[derive(Debug)]
struct Entry {
    /// This node's own bucket: the budget alone, the fallback when the cluster is unreachable.
    tokens: f64,
    at: Instant,
    /// Tokens leased from the cluster and not spent yet; negative is debt (costs charged after
    /// the fact) owed to the cluster's bucket.
    lease: f64,
    lease_until: Instant,
}

impl Entry {
    fn new(allowance: &Allowance, now: Instant) -> Self {
        Self {
            tokens: allowance.burst,
            at: now,
            lease: 0.0,
            lease_until: now,
        }
    }

    fn refill(&mut self, allowance: &Allowance, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * allowance.rate).min(allowance.burst);
        self.at = now;
        if self.lease > 0.0 && now >= self.lease_until {
            self.lease = 0.0;
        }
    }

    /// Indistinguishable from a fresh entry: full, no lease, and any debt old enough that the
    /// cluster's bucket has refilled past it.
    fn idle(&mut self, allowance: &Allowance, now: Instant) -> bool {
        self.refill(allowance, now);
        let debt_paid = self.lease >= 0.0
            || now.saturating_duration_since(self.lease_until) >= allowance.wait_for(-self.lease);
        self.tokens >= allowance.burst && self.lease <= 0.0 && debt_paid
    }

    /// Local admission: `need` tokens must be there; `take` are taken.
    fn admit_local(&mut self, allowance: &Allowance, need: f64, take: f64) -> Result<(), Duration> {
        if self.tokens + 1e-9 >= need {
            self.tokens -= take;
            Ok(())
        } else {
            Err(allowance.wait_for(need - self.tokens))
        }
    }
}

struct Shard<K> {
    entries: HashMap<K, Entry>,
    sweep_at: usize,
}

/// One budget (sends, reads, ...) for every key (account). The API mirrors
/// `limits::WindowLimiter` (`check` / `record` / `hit` / `clear`, refusals carry the wait),
/// with costs.
pub struct Limiter<K> {
    name: &'static str,
    allowance: Allowance,
    shards: Vec<Mutex<Shard<K>>>,
    shared: Option<Arc<dyn SharedBudgets>>,
}

impl<K: Hash + Eq + Clone + Display> Limiter<K> {
    /// `name` names the budget in Redis keys, metrics and logs.
    pub fn new(name: &'static str, allowance: Allowance) -> Self {
        Self {
            name,
            allowance,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: HashMap::new(),
                        sweep_at: SWEEP_MIN,
                    })
                })
                .collect(),
            shared: None,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn allowance(&self) -> Allowance {
        self.allowance
    }

    /// From now on the budget is the cluster's, leased from `shared`.
    pub fn share_through(&mut self, shared: Arc<dyn SharedBudgets>) {
        self.shared = Some(shared);
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K>> {
        // DefaultHasher::new() is keyed with zeros: stable within the process, which is all
        // shard selection needs.
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        let idx = (std::hash::Hasher::finish(&hasher) as usize) % SHARDS;
        // A panic while holding the lock leaves at worst one stale bucket.
        self.shards[idx]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the key's entry (created full if missing, sweeping idle ones first when
    /// the shard has grown).
    fn with_entry<T>(&self, key: &K, f: impl FnOnce(&mut Entry, Instant) -> T) -> T {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if !shard.entries.contains_key(key) && shard.entries.len() >= shard.sweep_at {
            let allowance = self.allowance;
            shard.entries.retain(|_, e| !e.idle(&allowance, now));
            shard.sweep_at = (shard.entries.len() * 2).max(SWEEP_MIN);
        }
        let entry = shard
            .entries
            .entry(key.clone())
            .or_insert_with(|| Entry::new(&self.allowance, now));
        entry.refill(&self.allowance, now);
        f(entry, now)
    }

    /// Fails with the wait when a request costing `cost` would be refused now; takes nothing.
    pub async fn check_cost(&self, key: &K, cost: u32) -> Result<(), Duration> {
        self.admit(key, cost, 0).await
    }

    /// Takes `cost` tokens, or fails with the wait and takes nothing.
    pub async fn take(&self, key: &K, cost: u32) -> Result<(), Duration> {
        self.admit(key, cost, cost).await
    }

    /// Charges `cost` tokens after the fact (may leave the budget in debt, which refuses the
    /// key's next requests until it is paid off).
    pub fn record_cost(&self, key: &K, cost: u32) {
        let cost = f64::from(cost);
        let clustered = self.shared.is_some();
        self.with_entry(key, |e, now| {
            if clustered {
                e.lease -= cost;
                e.lease_until = e.lease_until.max(now);
            } else {
                e.tokens -= cost;
            }
        });
    }

    pub async fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_cost(key, 1).await
    }

    pub fn record(&self, key: &K) {
        self.record_cost(key, 1);
    }

    /// `check` then `record`, as one step.
    pub async fn hit(&self, key: &K) -> Result<(), Duration> {
        self.take(key, 1).await
    }

    /// Forgets the key's bucket on this node (a fresh allowance here; a cluster's bucket
    /// refills on its own).
    pub fn clear(&self, key: &K) {
        self.shard(key).entries.remove(key);
    }

    /// Buckets held on this node (idle ones until the next sweep).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entries
                    .len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    async fn admit(&self, key: &K, cost: u32, take: u32) -> Result<(), Duration> {
        let allowance = self.allowance;
        let need = f64::from(cost).min(allowance.burst);
        let take = f64::from(take);
        let Some(shared) = &self.shared else {
            return self.with_entry(key, |e, _| e.admit_local(&allowance, need, take));
        };
        // Spend the lease if it covers the request; otherwise hand any debt to the cluster
        // and ask for what is missing plus a chunk.
        let ask = self.with_entry(key, |e, _| {
            if e.lease + 1e-9 >= need {
                e.lease -= take;
                return None;
            }
            let pay = (-e.lease).max(0.0).ceil() as u64;
            e.lease = e.lease.max(0.0);
            let missing = (need - e.lease).ceil().max(1.0) as u64;
            Some((pay, missing))
        });
        let Some((pay, missing)) = ask else {
            return Ok(());
        };
        let key_text = key.to_string();
        let request = LeaseRequest {
            budget: self.name,
            key: &key_text,
            allowance,
            pay,
            need: missing,
            want: missing.saturating_add(allowance.chunk()),
        };
        match shared.lease(request).await {
            Ok(grant) => self.with_entry(key, |e, now| {
                if grant.granted > 0 {
                    e.lease += grant.granted as f64;
                    e.lease_until = now + LEASE_TTL;
                }
                if e.lease + 1e-9 >= need {
                    e.lease -= take;
                    Ok(())
                } else {
                    // Another request of this key spent the grant meanwhile.
                    Err(grant.wait.max(Duration::from_millis(1)))
                }
            }),
            Err(error) => {
                crate::metrics::budget_fallback(self.name);
                tracing::debug!(budget = self.name, %error, "cluster budget unreachable; using this node's");
                self.with_entry(key, |e, _| e.admit_local(&allowance, need, take))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn limiter(rate: u32, burst: u32) -> Limiter<u64> {
        Limiter::new("test", Allowance::per_second(rate, burst))
    }

    #[tokio::test]
    async fn the_burst_is_shared_by_every_caller_of_one_key() {
        let l = limiter(1, 3);
        for _ in 0..3 {
            assert!(l.hit(&7).await.is_ok());
        }
        let wait = l.hit(&7).await.expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(l.hit(&8).await.is_ok(), "another key has its own");
        l.clear(&7);
        assert!(l.hit(&7).await.is_ok());
    }

    #[tokio::test]
    async fn a_cost_is_admitted_up_to_the_burst_and_its_debt_waited_off() {
        let l = limiter(10, 100);
        assert!(l.take(&1, 30).await.is_ok());
        // Bigger than the burst: admitted while the allowance is (nearly) unused... here 70
        // are left, so a 500-cost request waits for 30 more.
        assert!(l.take(&1, 500).await.is_err());
        let l = limiter(10, 100);
        assert!(
            l.take(&1, 500).await.is_ok(),
            "an unused allowance admits it"
        );
        let wait = l.check(&1).await.expect_err("in debt");
        assert!(wait >= Duration::from_secs(39), "{wait:?}");
    }

    #[tokio::test]
    async fn a_charge_after_the_fact_refuses_the_next_request() {
        let l = limiter(100, 1000);
        assert!(l.check(&1).await.is_ok());
        l.record_cost(&1, 5000);
        let wait = l.check(&1).await.expect_err("in debt");
        assert!(wait >= Duration::from_secs(39), "{wait:?}");
    }

    #[tokio::test]
    async fn idle_buckets_are_swept() {
        let l = Limiter::new("test", Allowance::per_second(1_000_000, 1));
        for key in 0..(SHARDS * SWEEP_MIN * 4) as u64 {
            l.hit(&key).await.expect("fresh key");
        }
        // Each shard swept whenever it doubled: far fewer than were inserted remain.
        assert!(l.len() < SHARDS * SWEEP_MIN * 3, "{}", l.len());
    }

    /// A cluster bucket in memory, counting calls.
    struct FakeCluster {
        tokens: Mutex<f64>,
        calls: AtomicU64,
    }

    #[async_trait]
    impl SharedBudgets for FakeCluster {
        async fn lease(&self, r: LeaseRequest<'_>) -> Result<Grant, String> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut tokens = self.tokens.lock().map_err(|e| e.to_string())?;
            *tokens -= r.pay as f64;
            if *tokens >= r.need as f64 {
                let granted = (r.want as f64).min(tokens.floor()) as u64;
                *tokens -= granted as f64;
                Ok(Grant {
                    granted,
                    wait: Duration::ZERO,
                })
            } else {
                Ok(Grant {
                    granted: 0,
                    wait: Duration::from_millis(5),
                })
            }
        }
    }

    #[tokio::test]
    async fn two_nodes_together_spend_only_what_the_cluster_grants_in_few_calls() {
        let cluster = Arc::new(FakeCluster {
            tokens: Mutex::new(100.0),
            calls: AtomicU64::new(0),
        });
        let mut a = limiter(1000, 100);
        let mut b = limiter(1000, 100);
        a.share_through(cluster.clone());
        b.share_through(cluster.clone());
        let mut admitted = 0;
        for i in 0..400 {
            let node = if i % 2 == 0 { &a } else { &b };
            if node.hit(&1).await.is_ok() {
                admitted += 1;
            }
        }
        assert!(admitted <= 100, "{admitted} admitted from 100 tokens");
        assert!(admitted >= 90, "{admitted}");
        let calls = cluster.calls.load(Ordering::Relaxed);
        assert!(calls < 400, "a call per request: {calls}");
    }

    struct Down;

    #[async_trait]
    impl SharedBudgets for Down {
        async fn lease(&self, _: LeaseRequest<'_>) -> Result<Grant, String> {
            Err("redis down".into())
        }
    }

    #[tokio::test]
    async fn an_unreachable_cluster_falls_back_to_the_nodes_own_bucket() {
        let mut l = limiter(1, 3);
        l.share_through(Arc::new(Down));
        for _ in 0..3 {
            assert!(l.hit(&1).await.is_ok());
        }
        assert!(l.hit(&1).await.is_err());
    }
}
