//! Abuse limits: a token bucket per session for messages, fixed one-minute windows for
//! authentication attempts (per IP and per account), and a per-IP connection count.
//! All in memory and per node; each refusal carries how long to wait.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Messages per second with a burst allowance, for one session.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(per_second.max(1)),
            burst,
            tokens: burst,
            last: Instant::now(),
        }
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

/// Open connections per client IP; a permit decrements on drop.
#[derive(Clone)]
pub struct ConnectionsPerIp {
    max: usize,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

pub struct IpPermit {
    ip: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl ConnectionsPerIp {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            counts: Arc::default(),
        }
    }

    pub fn acquire(&self, ip: IpAddr) -> Option<IpPermit> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            ip,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
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
}
