//! Node ids are claimed, not assumed: two processes under one id would share one channel and
//! one presence entry, and each would close the other's clients. The claim is the heartbeat key
//! itself (`Keyspace::node`), holding a random token of this process: taken with `SET NX PX`,
//! refreshed (with the load) only while it still holds that token, deleted on a clean shutdown
//! only if it does.
//!
//! A node restarted under the same id right after a crash finds its previous run's claim,
//! which nobody refreshes any more: it waits (bounded) for it to expire. A claim that keeps
//! being refreshed, or changes hands, belongs to a live process: start fails.

use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tracing::warn;

use super::ClusterError;
use super::keyspace::Keyspace;

/// `KEYS[1]` node key, `KEYS[2]` load key; `ARGV[1]` our token, `ARGV[2]` TTL in ms,
/// `ARGV[3]` the load. Returns 1 when refreshed, 2 when the key had expired (Redis lost its
/// data, or this node was slow) and is ours again, 0 when another process holds it.
const REFRESH_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
if holder then
  return 1
end
return 2
";

/// `KEYS[1]` node key, `KEYS[2]` load key, `KEYS[3]` the node set; `ARGV[1]` our token,
/// `ARGV[2]` the node id. Leaves only if the claim is still ours.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[3], ARGV[2])
  return 1
end
return 0
";

/// How a heartbeat's refresh went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    Held,
    /// The claim had expired and was taken again.
    Retaken,
    /// Another process holds this node id now.
    Lost,
}

/// A random token naming this process in its claim.
pub fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Takes the claim on `node`, waiting up to `wait` for a previous holder's claim to expire.
/// Fails at once when the holder is seen to be alive (its claim was refreshed or changed hands
/// while we watched), and after `wait` in any case.
pub async fn take(
    redis: &ConnectionManager,
    keys: &Keyspace,
    node: &str,
    token: &str,
    ttl: Duration,
    wait: Duration,
) -> Result<(), ClusterError> {
    let mut redis = redis.clone();
    let key = keys.node(node);
    let ttl_ms = millis(ttl);
    let started = Instant::now();
    let deadline = started + wait;
    let taken_error = |waited: Duration| ClusterError::NodeIdTaken {
        node: node.to_owned(),
        cluster: keys.cluster_id().to_owned(),
        ttl_secs: ttl.as_secs(),
        waited_secs: waited.as_secs(),
    };
    let mut seen: Option<(String, i64)> = None;
    loop {
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut redis)
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;
        if set.is_some() {
            if seen.is_some() {
                warn!(node, "the previous claim on this node id expired; taken");
            }
            return Ok(());
        }
        let (holder, left): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .map_err(|e| ClusterError::Connect(e.to_string()))?;
        let Some(holder) = holder else {
            // Expired between the two calls: try again at once.
            continue;
        };
        if let Some((before, before_left)) = &seen {
            // Time only runs a claim down; up (or a new holder) means someone refreshes it.
            if *before != holder || left > *before_left {
                return Err(taken_error(started.elapsed()));
            }
        } else {
            warn!(
                node,
                cluster = keys.cluster_id(),
                expires_in_ms = left,
                wait_secs = wait.as_secs(),
                "this node id is claimed by another process (a previous run that was killed?); \
                 waiting for the claim to expire"
            );
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(taken_error(started.elapsed()));
        }
        seen = Some((holder, left));
        // Poll well within a heartbeat, so a live holder's refresh is seen after one beat.
        let poll = Duration::from_millis(200);
        // A claim without expiry (PTTL -1, set by hand) is polled like any other.
        let until_expiry = u64::try_from(left).map_or(poll, |ms| Duration::from_millis(ms + 5));
        tokio::time::sleep(poll.min(until_expiry).min(deadline - now)).await;
    }
}

/// Refreshes the claim and publishes `load` with it.
pub async fn refresh(
    redis: &mut ConnectionManager,
    keys: &Keyspace,
    node: &str,
    token: &str,
    ttl: Duration,
    load: &str,
) -> redis::RedisResult<Refresh> {
    let outcome: i64 = redis::cmd("EVAL")
        .arg(REFRESH_SCRIPT)
        .arg(2)
        .arg(keys.node(node))
        .arg(keys.load(node))
        .arg(token)
        .arg(millis(ttl))
        .arg(load)
        .query_async(redis)
        .await?;
    Ok(match outcome {
        1 => Refresh::Held,
        2 => Refresh::Retaken,
        _ => Refresh::Lost,
    })
}

/// Gives the claim up (clean shutdown); a claim another process holds is left alone.
pub async fn release(
    redis: &mut ConnectionManager,
    keys: &Keyspace,
    node: &str,
    token: &str,
) -> redis::RedisResult<()> {
    let _released: i64 = redis::cmd("EVAL")
        .arg(RELEASE_SCRIPT)
        .arg(3)
        .arg(keys.node(node))
        .arg(keys.load(node))
        .arg(keys.nodes())
        .arg(token)
        .arg(node)
        .query_async(redis)
        .await?;
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
