//! Abuse limits: token buckets per key (resumes per device), fixed one-minute windows for
//! authentication attempts (per IP, per account, per login cookie), and a per-IP connection
//! count. All in memory and per node; each refusal carries how long to wait. Per-account budgets shared across connections and nodes (sends, reads,
//! group changes) are `budget` and `account_budgets`.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Events per second (or per minute) with a burst allowance, for one key.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self::with_rate(f64::from(per_second.max(1)), burst)
    }

    /// A bucket refilled with `per_minute` tokens a minute (for rare events such as resumes).
    pub fn per_minute(per_minute: u32, burst: u32) -> Self {
        Self::with_rate(f64::from(per_minute.max(1)) / 60.0, burst)
    }

    fn with_rate(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Whether the bucket has refilled completely, i.e. forgetting it changes nothing.
    fn is_full(&self, now: Instant) -> bool {
        self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate >= self.burst
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

const WINDOW: Duration = Duration::from_secs(60);
const SHARDS: usize = 16;

/// Counts events per key in fixed one-minute windows; sharded to keep lock hold times short.
pub struct WindowLimiter<K> {
    limit: u32,
    shards: Vec<Mutex<HashMap<K, (Instant, u32)>>>,
}

impl<K: Hash + Eq + Clone> WindowLimiter<K> {
    pub fn new(limit_per_minute: u32) -> Self {
        Self {
            limit: limit_per_minute,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &K) -> std::sync::MutexGuard<'_, HashMap<K, (Instant, u32)>> {
        // DefaultHasher::new() is keyed with zeros: stable within the process, which is all
        // shard selection needs.
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        let idx = (std::hash::Hasher::finish(&hasher) as usize) % SHARDS;
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails with the time left in the window when `key` reached the limit.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let shard = self.shard(key);
        match shard.get(key) {
            Some((start, count)) if now.duration_since(*start) < WINDOW && *count >= self.limit => {
                Err(WINDOW.saturating_sub(now.duration_since(*start)))
            }
            _ => Ok(()),
        }
    }

    /// Records one event for `key`.
    pub fn record(&self, key: &K) {
        let now = Instant::now();
        let mut shard = self.shard(key);
        if shard.len() > 100_000 {
            shard.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let slot = shard.entry(key.clone()).or_insert((now, 0));
        if now.duration_since(slot.0) >= WINDOW {
            *slot = (now, 0);
        }
        slot.1 = slot.1.saturating_add(1);
    }

    /// `check` then `record`: for attempts that count whether or not they succeed.
    pub fn hit(&self, key: &K) -> Result<(), Duration> {
        self.check(key)?;
        self.record(key);
        Ok(())
    }

    pub fn clear(&self, key: &K) {
        self.shard(key).remove(key);
    }
}

/// A [`TokenBucket`] per key (e.g. resumes per device), sharded like [`WindowLimiter`]. Full
/// buckets are forgotten when a shard grows large, so idle keys cost nothing.
pub struct BucketLimiter<K> {
    per_minute: u32,
    burst: u32,
    shards: Vec<Mutex<HashMap<K, TokenBucket>>>,
}

impl<K: Hash + Eq + Clone> BucketLimiter<K> {
    pub fn per_minute(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute,
            burst,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token of `key`'s bucket, or says how long until one is available.
    pub fn try_take(&self, key: &K) -> Result<(), Duration> {
        let mut hasher = std::hash::DefaultHasher::new();
        key.hash(&mut hasher);
        let idx = (std::hash::Hasher::finish(&hasher) as usize) % SHARDS;
        let mut shard = self.shards[idx].lock().unwrap_or_else(|p| p.into_inner());
        if shard.len() > 100_000 {
            let now = Instant::now();
            shard.retain(|_, bucket| !bucket.is_full(now));
        }
        shard
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::per_minute(self.per_minute, self.burst))
            .try_take()
    }
}

/// The key of every per-address limit: an IPv4 address, or the /64 an IPv6 address is in. One
/// IPv6 host is usually given a whole /64, so limiting single IPv6 addresses would let one
/// client take 2^64 keys. IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressGroup(IpAddr);

impl AddressGroup {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for AddressGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Open connections per client address group ([`AddressGroup`]); a permit decrements on drop.
#[derive(Clone)]
pub struct ConnectionsPerIp {
    max: usize,
    counts: Arc<Mutex<HashMap<AddressGroup, usize>>>,
}

pub struct IpPermit {
    group: AddressGroup,
    counts: Arc<Mutex<HashMap<AddressGroup, usize>>>,
}

impl ConnectionsPerIp {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: Arc::default(),
        }
    }

    pub fn acquire(&self, ip: IpAddr) -> Option<IpPermit> {
        let group = AddressGroup::of(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(group).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            group,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_the_burst_then_refuses_with_a_wait() {
        let mut b = TokenBucket::new(1, 3);
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_ok());
        assert!(b.try_take().is_ok());
        let wait = b.try_take().expect_err("over the burst");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
    }

    #[test]
    fn keyed_buckets_refuse_one_key_past_its_burst_and_not_the_others() {
        let l = BucketLimiter::per_minute(6, 2);
        assert!(l.try_take(&1).is_ok());
        assert!(l.try_take(&1).is_ok());
        let wait = l.try_take(&1).expect_err("over the burst");
        // One token every 10 s at 6 a minute.
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(10));
        assert!(l.try_take(&2).is_ok());
    }

    #[test]
    fn the_window_limits_each_key_separately() {
        let l = WindowLimiter::new(2);
        assert!(l.hit(&"a").is_ok());
        assert!(l.hit(&"a").is_ok());
        assert!(l.hit(&"a").is_err());
        assert!(l.hit(&"b").is_ok());
        l.clear(&"a");
        assert!(l.hit(&"a").is_ok());
    }

    #[test]
    fn ip_permits_are_counted_and_released() {
        let c = ConnectionsPerIp::new(1);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let p = c.acquire(ip).expect("first");
        assert!(c.acquire(ip).is_none());
        drop(p);
        assert!(c.acquire(ip).is_some());
    }

    #[test]
    fn an_ipv6_64_is_one_address_group_and_mapped_ipv4_is_its_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("v6");
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().expect("v6");
        let other: IpAddr = "2001:db8:1:3::1".parse().expect("v6");
        assert_eq!(AddressGroup::of(a), AddressGroup::of(b));
        assert_ne!(AddressGroup::of(a), AddressGroup::of(other));
        assert_eq!(AddressGroup::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("mapped");
        let v4: IpAddr = [192, 0, 2, 7].into();
        assert_eq!(AddressGroup::of(mapped), AddressGroup::of(v4));
        assert_ne!(
            AddressGroup::of(v4),
            AddressGroup::of([192, 0, 2, 8].into())
        );
    }

    #[test]
    fn connections_from_one_ipv6_64_share_one_allowance() {
        let limit = ConnectionsPerIp::new(2);
        let first = limit.acquire("2001:db8::1".parse().expect("v6"));
        let second = limit.acquire("2001:db8::2".parse().expect("v6"));
        assert!(first.is_some() && second.is_some());
        assert!(limit.acquire("2001:db8::3".parse().expect("v6")).is_none());
        assert!(
            limit
                .acquire("2001:db8:0:1::1".parse().expect("v6"))
                .is_some()
        );
        drop(first);
        assert!(limit.acquire("2001:db8::4".parse().expect("v6")).is_some());
    }
}
