//! The cluster's side of per-account budgets (`crate::budget`): each budget's bucket per
//! account lives in one Redis hash, and nodes lease tokens from it in chunks with one atomic
//! script call, so the whole cluster admits an account's requests against one allowance while
//! a node pays a Redis round trip only every chunk, not every request.
//!
//! Never decides what is admitted locally: it only grants tokens. The bucket's clock is
//! Redis's own (`TIME`), so nodes with skewed clocks still refill it at one rate.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;

use super::Keyspace;
use crate::budget::{Grant, LeaseRequest, SharedBudgets};

/// Refill, pay the caller's debt, then grant between `need` and `want` whole tokens, or
/// nothing and the milliseconds until `need` would be there. KEYS[1]: the bucket (`t`
/// tokens, `at` milliseconds); ARGV: rate per second, burst, pay, need, want. The key expires
/// once it would have refilled, so idle accounts leave nothing behind.
const LEASE_SCRIPT: &str = r"
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000 + math.floor(tonumber(now_t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local pay = tonumber(ARGV[3])
local need = tonumber(ARGV[4])
local want = tonumber(ARGV[5])
local b = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(b[1]) or burst
local at = tonumber(b[2]) or now
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate / 1000)
end
tokens = tokens - pay
local granted = 0
local wait = 0
if tokens >= need then
  granted = math.min(want, math.floor(tokens))
  tokens = tokens - granted
else
  wait = math.ceil((need - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) * 1000 / rate) + 1000)
return {granted, wait}
";

pub struct RedisBudgets {
    redis: ConnectionManager,
    keys: Keyspace,
    script: redis::Script,
}

impl RedisBudgets {
    pub fn new(redis: ConnectionManager, keys: Keyspace) -> Self {
        Self {
            redis,
            keys,
            script: redis::Script::new(LEASE_SCRIPT),
        }
    }
}

#[async_trait]
impl SharedBudgets for RedisBudgets {
    async fn lease(&self, r: LeaseRequest<'_>) -> Result<Grant, String> {
        let mut redis = self.redis.clone();
        let mut call = self.script.key(self.keys.budget(r.budget, r.key));
        call.arg(r.allowance.rate)
            .arg(r.allowance.burst)
            .arg(r.pay)
            .arg(r.need)
            .arg(r.want);
        let (granted, wait_ms): (i64, i64) = call
            .invoke_async(&mut redis)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Grant {
            granted: u64::try_from(granted).unwrap_or(0),
            wait: Duration::from_millis(u64::try_from(wait_ms).unwrap_or(0)),
        })
    }
}
