//! What the operator reads about PostgreSQL outages: one line when the database stops
//! answering (with the cause: "connection refused", a SQLSTATE...), a reminder at most every
//! [`REPEAT_EVERY`] with how many operations failed meanwhile, and one "store back" line when
//! an operation succeeds again. Logging each failure would print a line per request (and per
//! pool reconnect attempt) for as long as the outage lasts.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const REPEAT_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Outage {
    /// Mirrors `state.is_some()`, so the success path (every checkout) takes no lock.
    down: AtomicBool,
    state: Mutex<Option<State>>,
}

#[derive(Debug)]
struct State {
    since: Instant,
    /// Store operations (checkouts, queries) that failed; reconnect attempts are not counted.
    failed_ops: u64,
    failed_connects: u64,
    last_logged: Instant,
    ops_since_logged: u64,
    last_cause: String,
}

/// Whether a failure was an operation a caller saw fail, or the pool's own reconnect attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Operation,
    Connect,
}

impl Outage {
    pub fn failed(&self, what: Failure, cause: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let op = u64::from(what == Failure::Operation);
        match state.as_mut() {
            None => {
                tracing::error!(
                    cause,
                    "PostgreSQL unavailable: requests fail until it answers again"
                );
                *state = Some(State {
                    since: now,
                    failed_ops: op,
                    failed_connects: 1 - op,
                    last_logged: now,
                    ops_since_logged: 0,
                    last_cause: cause.to_owned(),
                });
                self.down.store(true, Ordering::Release);
            }
            Some(s) => {
                s.failed_ops += op;
                s.failed_connects += 1 - op;
                s.ops_since_logged += op;
                s.last_cause.clear();
                s.last_cause.push_str(cause);
                if now.duration_since(s.last_logged) >= REPEAT_EVERY {
                    tracing::warn!(
                        cause,
                        down_ms = millis(now.duration_since(s.since)),
                        failed_ops = s.ops_since_logged,
                        "PostgreSQL still unavailable"
                    );
                    s.last_logged = now;
                    s.ops_since_logged = 0;
                }
            }
        }
    }

    /// The database answered: ends an outage if there was one.
    pub fn succeeded(&self) {
        if !self.down.load(Ordering::Acquire) {
            return;
        }
        let ended = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            self.down.store(false, Ordering::Release);
            state.take()
        };
        if let Some(s) = ended {
            tracing::info!(
                after_ms = millis(s.since.elapsed()),
                failed_ops = s.failed_ops,
                failed_connects = s.failed_connects,
                "store back"
            );
        }
    }

    /// The last failure's cause while the outage lasts, to explain a bare checkout timeout.
    pub fn last_cause(&self) -> Option<String> {
        if !self.down.load(Ordering::Acquire) {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.as_ref().map(|s| s.last_cause.clone())
    }

    #[cfg(test)]
    fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The error with its whole cause chain and SQLSTATE: the driver's own text names only the
/// kind ("error connecting to server", "db error").
pub fn cause(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    if let Some(code) = e.code() {
        out.push_str(" (SQLSTATE ");
        out.push_str(code.code());
        out.push(')');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_starts_once_counts_operations_and_ends_on_success() {
        let outage = Outage::default();
        assert!(!outage.is_down());
        outage.succeeded();
        assert!(
            !outage.is_down(),
            "success without an outage changes nothing"
        );
        outage.failed(Failure::Connect, "refused");
        outage.failed(Failure::Operation, "refused again");
        outage.failed(Failure::Operation, "still refused");
        assert!(outage.is_down());
        assert_eq!(outage.last_cause().as_deref(), Some("still refused"));
        {
            let state = outage.state.lock().expect("lock");
            let s = state.as_ref().expect("in an outage");
            assert_eq!((s.failed_ops, s.failed_connects), (2, 1));
        }
        outage.succeeded();
        assert!(!outage.is_down());
        assert_eq!(outage.last_cause(), None);
    }
}
