//! The two loops every messaging scenario is made of: a sender that sends stamped messages on
//! a schedule (open loop) or back to back (closed loop), and a receiver that logs every stamp
//! it gets, measures latency from the intended send time, and acknowledges in batches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use messenger_protocol::client::{Client, Connection, Event, Recipient};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::checker::{ReceiverLog, SenderLog, Target, new_histogram};
use crate::payload::Stamp;

/// State shared by every loop of one run.
pub struct Run {
    pub id: u64,
    pub epoch: Instant,
    /// Latency of messages meant to be sent before this is not recorded.
    pub measure_from_ns: u64,
    pub body_size: usize,
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    /// Deliveries owed to recipients by accepted messages (excluding senders' own copies).
    pub owed: AtomicU64,
    pub delivered: AtomicU64,
    pub errors: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Per-second buckets of latency, for the progress line and the plot.
    pub timeline: std::sync::Mutex<Vec<Histogram<u64>>>,
    /// Set when senders must stop.
    pub stop_sending: CancellationToken,
    /// Set when receivers must stop (after the drain).
    pub stop_receiving: CancellationToken,
}

impl Run {
    pub fn new(body_size: usize, warmup: Duration) -> Arc<Self> {
        Arc::new(Self {
            id: rand::random(),
            epoch: Instant::now(),
            measure_from_ns: warmup.as_nanos() as u64,
            body_size,
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            errors: std::sync::Mutex::new(BTreeMap::new()),
            timeline: std::sync::Mutex::new(Vec::new()),
            stop_sending: CancellationToken::new(),
            stop_receiving: CancellationToken::new(),
        })
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn error(&self, key: String) {
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *e.entry(key).or_insert(0) += 1;
    }

    fn record_timeline(&self, at_ns: u64, latency_us: u64) {
        let second = (at_ns / 1_000_000_000) as usize;
        let mut t = self.timeline.lock().unwrap_or_else(|p| p.into_inner());
        while t.len() <= second {
            t.push(new_histogram());
        }
        let _ = t[second].record(latency_us.max(1));
    }

    /// Waits until every owed delivery arrived, or `limit` passed.
    pub async fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.delivered.load(Ordering::Acquire) >= self.owed.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How a sender paces itself.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Messages per second for this sender, on a fixed schedule that does not slip.
    Open(f64),
    /// Back to back: the next send right after the previous one was accepted.
    Closed,
}

/// Sends stamped messages from user `me` to `to` until the run stops sending.
/// `recipients` is how many deliveries each accepted message owes (excluding the sender).
///
/// A send that fails because the connection went away (a node died, a GoAway) or the server
/// was briefly unavailable is retried with the same `client_msg_id` on the connection the
/// receiver reconnected, as a real client retries: the server's idempotency makes the retry
/// safe, and the checker then proves nothing was lost or doubled across the failure.
pub async fn send_loop(
    run: Arc<Run>,
    mut conn: watch::Receiver<Connection>,
    me: u32,
    target: Target,
    to: Recipient,
    recipients: u64,
    pace: Pace,
) -> SenderLog {
    let mut log = SenderLog {
        sender: me,
        ..SenderLog::default()
    };
    let interval = match pace {
        Pace::Open(rate) if rate > 0.0 => Some(Duration::from_secs_f64(1.0 / rate)),
        _ => None,
    };
    // A random phase spreads the senders' schedules over one interval.
    let mut next =
        run.epoch.elapsed() + interval.map_or(Duration::ZERO, |i| i.mul_f64(rand::random::<f64>()));
    let mut seq = 0u64;
    'sending: loop {
        if interval.is_some() {
            let at = run.epoch + next;
            tokio::select! {
                _ = run.stop_sending.cancelled() => break,
                _ = tokio::time::sleep_until(at.into()) => {}
            }
        } else if run.stop_sending.is_cancelled() {
            break;
        }
        seq += 1;
        let intended_ns = match interval {
            Some(_) => next.as_nanos() as u64,
            None => run.now_ns(),
        };
        if let Some(i) = interval {
            next += i;
        }
        let body = Stamp {
            run: run.id,
            sender: me,
            seq,
            intended_ns,
        }
        .encode(run.body_size);
        run.sent.fetch_add(1, Ordering::Relaxed);
        let client_msg_id = format!("{:x}-{me}-{seq}", run.id);
        loop {
            let current = conn.borrow_and_update().clone();
            let e = match current
                .send_message(to, &client_msg_id, body.clone(), "application/x-loadtest")
                .await
            {
                Ok(_) => {
                    log.accepted.push((seq, target));
                    run.owed.fetch_add(recipients, Ordering::AcqRel);
                    run.accepted.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => e,
            };
            let key = match e.wire_code() {
                Some(c) => format!("send: {}", messenger_protocol::error::code_name(c)),
                None => format!("send: {e}"),
            };
            run.error(key);
            let retry =
                (current.is_closed() || e.is_transient()) && !run.stop_sending.is_cancelled();
            if !retry {
                log.failed += 1;
                if current.is_closed() {
                    break 'sending;
                }
                break;
            }
            // Wait for the receiver's reconnect (or a moment, for a transient refusal).
            tokio::select! {
                _ = run.stop_sending.cancelled() => {
                    log.failed += 1;
                    break 'sending;
                }
                changed = conn.changed(), if current.is_closed() => if changed.is_err() {
                    log.failed += 1;
                    break 'sending;
                },
                _ = tokio::time::sleep(Duration::from_millis(100)), if !current.is_closed() => {}
            }
        }
    }
    log
}

/// Receives for user `me` until the run stops receiving; acks every 256 deliveries and when
/// idle, as a real client would.
pub async fn receive_loop(
    run: Arc<Run>,
    mut client: Client,
    me: u32,
    conn: watch::Sender<Connection>,
) -> (ReceiverLog, Client) {
    let mut log = ReceiverLog::new(me);
    let mut unacked = 0u32;
    loop {
        let event = tokio::select! {
            _ = run.stop_receiving.cancelled() => break,
            e = tokio::time::timeout(Duration::from_millis(500), client.next_event()) => e,
        };
        match event {
            Err(_) => {
                if unacked > 0 {
                    let _ = client.ack_seen().await;
                    unacked = 0;
                }
            }
            Ok(Some(Event::Delivery(d))) => {
                let now = run.now_ns();
                let Some(stamp) = d.message.as_ref().and_then(|m| Stamp::decode(&m.body)) else {
                    continue;
                };
                if stamp.run != run.id || stamp.sender == me {
                    continue;
                }
                let latency_us = now.saturating_sub(stamp.intended_ns) / 1000;
                if log.arrived(stamp.sender, stamp.seq, latency_us) {
                    run.delivered.fetch_add(1, Ordering::AcqRel);
                }
                // Late arrivals during the drain count too: dropping them would hide the tail.
                if stamp.intended_ns >= run.measure_from_ns {
                    run.record_timeline(now, latency_us);
                }
                unacked += 1;
                if unacked >= 256 {
                    let _ = client.ack_seen().await;
                    unacked = 0;
                }
            }
            Ok(Some(Event::GoAway(_))) => {}
            Ok(Some(Event::Closed { reason })) => {
                run.error(format!("receive: connection closed: {reason}"));
                // Keep receiving through a resume, as a real client would.
                if client.reconnect_with_backoff(10).await.is_err() {
                    break;
                }
                conn.send_replace(client.conn().clone());
            }
            Ok(None) => {
                if client.reconnect_with_backoff(10).await.is_err() {
                    break;
                }
                conn.send_replace(client.conn().clone());
            }
        }
    }
    let _ = client.ack_seen().await;
    (log, client)
}

/// Latency histogram of the measured window, merged from each receiver's log.
pub fn merged_latency(run: &Run) -> Histogram<u64> {
    let mut all = new_histogram();
    for h in run
        .timeline
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = all.add(h);
    }
    all
}
