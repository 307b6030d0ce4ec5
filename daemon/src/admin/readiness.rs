//! The store's health as `/readyz` reports it. A background task probes the store at most
//! every [`PROBE_EVERY`], each probe bounded by [`PROBE_TIMEOUT`]; a readiness request answers
//! at once from the last result. Awaiting the store inside the request would hold the answer
//! for the pool's checkout timeout (seconds) exactly when PostgreSQL is down, and a balancer's
//! check would time out instead of reading "not ready".

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Well under a second, so even the first request (which waits for the first probe) answers
/// within one.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// A result this old means the prober itself is not getting through (a starved runtime, a
/// probe that never returns): report that rather than a stale "ok".
pub const STALE_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
struct Probe {
    at: Instant,
    outcome: Result<(), String>,
}

/// The last probe's result; cloning shares it.
#[derive(Debug, Clone)]
pub struct StoreHealth {
    last: watch::Receiver<Option<Probe>>,
}

impl StoreHealth {
    /// Starts probing `store` until `shutdown`; one prober however many requests ask. The
    /// task ends promptly on `shutdown`, even mid-probe, so the store can be closed after it.
    pub fn spawn(store: Arc<dyn Store>, shutdown: CancellationToken) -> (Self, JoinHandle<()>) {
        let (tx, last) = watch::channel(None);
        let prober = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let probe = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    probe = tokio::time::timeout(PROBE_TIMEOUT, store.health()) => probe,
                };
                let outcome = match probe {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {} ms", PROBE_TIMEOUT.as_millis())),
                };
                let probe = Probe {
                    at: Instant::now(),
                    outcome,
                };
                if tx.send(Some(probe)).is_err() {
                    return;
                }
            }
        });
        (Self { last }, prober)
    }

    /// `Ok`, or why the store is not ready. Waits only before the very first probe finished,
    /// and no longer than that probe may take.
    pub async fn status(&self) -> Result<(), String> {
        let mut last = self.last.clone();
        if last.borrow().is_none() {
            let first = last.wait_for(Option::is_some);
            let _ = tokio::time::timeout(PROBE_TIMEOUT + Duration::from_millis(100), first).await;
        }
        let probe = last.borrow().clone();
        match probe {
            None => Err("not checked yet".into()),
            Some(p) if p.at.elapsed() > STALE_AFTER => Err(format!(
                "no health result for {} ms (the check is stuck)",
                p.at.elapsed().as_millis()
            )),
            Some(p) => p.outcome,
        }
    }
}
