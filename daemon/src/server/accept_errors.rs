//! What an accept loop does when `accept()` fails (`EMFILE`/`ENFILE` when descriptors run
//! out, `ENOBUFS`, an aborted connection): wait, doubling the wait up to a second, and log at
//! most once a second with a count of what was not logged. The loop neither spins nor floods
//! the log, and never exits: connections close, descriptors come back.

use std::io;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

const FIRST_WAIT: Duration = Duration::from_millis(5);
const LONGEST_WAIT: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(1);

/// One per accept loop.
#[derive(Debug)]
pub struct AcceptErrors {
    listener: &'static str,
    wait: Duration,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// `listener` names the port in the log ("client", "admin").
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            wait: FIRST_WAIT,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// An accept succeeded: the next failure starts with a short wait again.
    pub fn succeeded(&mut self) {
        self.wait = FIRST_WAIT;
    }

    /// An accept failed: log (at most once a second) and wait before the next try.
    pub async fn failed(&mut self, error: &io::Error) {
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            warn!(
                listener = self.listener,
                %error,
                failures_since_last_log = self.unlogged,
                "accept failed; backing off (at the open-file limit, raise LimitNOFILE or lower limits.max_connections)"
            );
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(self.wait).await;
        self.wait = (self.wait * 2).min(LONGEST_WAIT);
    }
}
