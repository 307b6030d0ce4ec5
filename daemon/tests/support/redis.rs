//! A throwaway `redis-server` per test (so a test can stop and restart it), on a free port in
//! a temp dir; fails (never skips) when Redis is not installed. The server itself is the chaos
//! soak's (`messenger_loadtest::chaos::cluster::Redis`): one place starts a Redis of our own.
#![allow(dead_code)]

use messenger_loadtest::chaos::cluster::Redis;

/// A `redis-server` on a free port in a temp dir, killed on drop.
pub struct TestRedis {
    redis: Redis,
    _dir: tempfile::TempDir,
}

impl TestRedis {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let redis = Redis::start(dir.path().join("redis"))
            .expect("redis-server runs (apt-get install -y redis-server)");
        Self { redis, _dir: dir }
    }

    /// Starts it again on the same port, empty (it keeps nothing on disk).
    pub fn spawn(&mut self) {
        self.redis.start_again().expect("redis-server starts again");
    }

    pub fn url(&self) -> String {
        self.redis.url()
    }

    /// Kills it: connections are cut at once, as when the host dies.
    pub fn stop(&mut self) {
        self.redis.stop();
    }
}
