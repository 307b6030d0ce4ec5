//! The password-hashing threads and the two bounded queues in front of them.
//!
//! A login flood must not make legitimate logins wait seconds behind it (audit F9): a check
//! that would have to queue behind more than `hash_queue` others is refused at once with a
//! retry hint instead. Known devices (a valid login cookie, a signed-in user) get a small
//! reserved queue that the threads serve first, so an owner still gets in during a flood.
//! This module knows nothing about passwords; it runs boxed jobs and never blocks an async
//! worker (submitting only takes a short lock).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Which queue a job waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Anyone: logins without a valid cookie, registrations.
    Normal,
    /// Known devices; served first, and when full they fall back to `Normal`.
    Reserved,
}

/// The queues are full; try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub retry_after: Duration,
}

/// A unit of work; returns whether it did any (a job whose requester left skips the hash and
/// must not pull the time estimate down).
pub type Job = Box<dyn FnOnce() -> bool + Send>;

/// Shortest and longest retry hint given to a refused request.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub struct HashPool {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    ready: Condvar,
    threads: usize,
    normal_cap: usize,
    reserved_cap: usize,
    /// Moving average of one job's duration, in microseconds, for retry hints.
    avg_micros: AtomicU64,
}

#[derive(Default)]
struct State {
    normal: VecDeque<Job>,
    reserved: VecDeque<Job>,
    /// Threads waiting for a job: a job submitted now starts at once, so it does not count
    /// against the queue bound.
    idle: usize,
    /// Test hook: threads take no job while held (see [`HashPool::hold`]).
    held: bool,
    closed: bool,
}

impl HashPool {
    /// Starts `threads` hashing threads. `initial_estimate` seeds the duration average.
    pub fn start(
        threads: usize,
        normal_cap: usize,
        reserved_cap: usize,
        initial_estimate: Duration,
    ) -> Result<Self, String> {
        let threads = threads.max(1);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            threads,
            normal_cap,
            reserved_cap,
            avg_micros: AtomicU64::new(micros(initial_estimate)),
        });
        for i in 0..threads {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || inner.work())
                .map_err(|e| format!("starting a hashing thread: {e}"))?;
        }
        Ok(Self { inner })
    }

    /// Queues `job`, or refuses it at once when its queue (and, for `Reserved`, the normal
    /// one too) is full.
    pub fn submit(&self, lane: Lane, job: Job) -> Result<(), Busy> {
        let mut state = self.inner.lock();
        // Held threads take nothing, so they do not count as idle (keeps tests exact).
        let idle = if state.held { 0 } else { state.idle };
        if lane == Lane::Reserved && state.reserved.len() < self.inner.reserved_cap + idle {
            state.reserved.push_back(job);
        } else if state.normal.len() < self.inner.normal_cap + idle {
            state.normal.push_back(job);
        } else {
            let waiting = state.normal.len() + state.reserved.len();
            drop(state);
            return Err(Busy {
                retry_after: self.inner.estimate(waiting),
            });
        }
        drop(state);
        self.inner.ready.notify_one();
        Ok(())
    }

    /// Jobs queued and not yet taken by a thread.
    pub fn waiting(&self) -> usize {
        let state = self.inner.lock();
        state.normal.len() + state.reserved.len()
    }

    /// Test hook: no thread takes a new job until the returned guard is dropped, so a test
    /// can fill the queues deterministically.
    #[doc(hidden)]
    pub fn hold(&self) -> Hold {
        self.inner.lock().held = true;
        Hold {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl Drop for HashPool {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.ready.notify_all();
    }
}

/// Releases the threads held by [`HashPool::hold`] on drop.
pub struct Hold {
    inner: Arc<Inner>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.inner.lock().held = false;
        self.inner.ready.notify_all();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under the lock, so a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One hashing thread: reserved jobs first, then normal ones, until the pool is dropped.
    fn work(&self) {
        loop {
            let job = {
                let mut state = self.lock();
                loop {
                    if state.closed {
                        return;
                    }
                    if !state.held
                        && let Some(job) = state
                            .reserved
                            .pop_front()
                            .or_else(|| state.normal.pop_front())
                    {
                        break job;
                    }
                    state.idle += 1;
                    state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
                    state.idle -= 1;
                }
            };
            let start = Instant::now();
            if job() {
                self.observe(start.elapsed());
            }
        }
    }

    fn observe(&self, took: Duration) {
        // An exponential moving average (weight 1/8): one racing update lost is harmless.
        let old = self.avg_micros.load(Ordering::Relaxed);
        let new = (old.saturating_mul(7).saturating_add(micros(took))) / 8;
        self.avg_micros.store(new, Ordering::Relaxed);
    }

    /// How long until `waiting` queued jobs are through, roughly.
    fn estimate(&self, waiting: usize) -> Duration {
        let rounds = u64::try_from(waiting.div_ceil(self.threads) + 1).unwrap_or(u64::MAX);
        Duration::from_micros(
            self.avg_micros
                .load(Ordering::Relaxed)
                .saturating_mul(rounds),
        )
        .clamp(RETRY_MIN, RETRY_MAX)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn job(tx: &mpsc::Sender<u32>, n: u32) -> Job {
        let tx = tx.clone();
        Box::new(move || {
            let _ = tx.send(n);
            true
        })
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_reserved_jobs_run_first() {
        let pool = HashPool::start(1, 1, 1, Duration::from_millis(50)).expect("pool");
        let hold = pool.hold();
        let (tx, rx) = mpsc::channel();
        // One queue slot per lane (held threads take nothing).
        assert!(pool.submit(Lane::Normal, job(&tx, 1)).is_ok());
        let busy = pool
            .submit(Lane::Normal, job(&tx, 2))
            .expect_err("normal lane full");
        assert!(busy.retry_after >= RETRY_MIN);
        assert!(pool.submit(Lane::Reserved, job(&tx, 3)).is_ok());
        assert!(
            pool.submit(Lane::Reserved, job(&tx, 4)).is_err(),
            "both lanes full"
        );
        assert_eq!(pool.waiting(), 2);
        drop(hold);
        let order: Vec<u32> = (0..2)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("ran"))
            .collect();
        assert_eq!(order, vec![3, 1]);
    }
}
