//! The two loops every messaging scenario is made of: a sender that sends stamped messages on
//! a schedule (open loop) or back to back (closed loop), for a while or a given number of
//! messages, and a receiver that logs every stamp it gets, measures latency from the intended
//! send time, and acknowledges in batches. Both keep the run's [`Ledger`] of owed pairs
//! current, so the drain knows exactly what is still on its way.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use messenger_protocol::client::{Client, Connection, Event, Recipient};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::checker::{Node, ReceiverLog, SenderLog, Target, new_histogram};
use crate::ledger::Ledger;
use crate::payload::{Stamp, client_msg_id};

/// One sender's part of a plan.
#[derive(Debug, Clone)]
pub struct Sender {
    pub sender: u32,
    pub target: Target,
    pub to: Recipient,
    /// The users each accepted message is owed to (recipients other than the sender).
    pub owed_to: Vec<u32>,
}

/// State shared by every loop of one run.
pub struct Run {
    pub id: u64,
    pub epoch: Instant,
    /// Latency of messages meant to be sent before this is not recorded.
    pub measure_from_ns: u64,
    pub body_size: usize,
    /// Wall-clock milliseconds since the Unix epoch (by default, when the run began): a
    /// stamp of another run that the server stored at or after this is no leftover of an
    /// earlier run but a cross-delivery.
    pub foreign_since_unix_ms: i64,
    /// When set, each sender stops after this many messages (accepted or failed).
    pub messages_per_sender: Option<u64>,
    pub sent: AtomicU64,
    /// Accepted messages; may be a caller's counter (see [`crate::scenarios::Params`]), so
    /// read it relative to its value when the run began.
    pub accepted: Arc<AtomicU64>,
    /// First arrivals of this run's messages (owed or not), for rates.
    pub delivered: AtomicU64,
    /// Every owed (message, recipient) pair not arrived yet.
    pub ledger: Ledger,
    pub errors: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Per-second buckets of latency, for the progress line and the plot.
    pub timeline: std::sync::Mutex<Vec<Histogram<u64>>>,
    /// Set when senders must stop.
    pub stop_sending: CancellationToken,
    /// Set when receivers must stop (after the drain).
    pub stop_receiving: CancellationToken,
}

impl Run {
    /// A run bounded by time, with its own counters; the methods below adjust it before it
    /// is shared.
    pub fn new(body_size: usize, warmup: Duration) -> Self {
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            id: rand::random(),
            epoch: Instant::now(),
            measure_from_ns: warmup.as_nanos() as u64,
            body_size,
            foreign_since_unix_ms: now_unix_ms,
            messages_per_sender: None,
            sent: AtomicU64::new(0),
            accepted: Arc::default(),
            delivered: AtomicU64::new(0),
            ledger: Ledger::new(),
            errors: std::sync::Mutex::new(BTreeMap::new()),
            timeline: std::sync::Mutex::new(Vec::new()),
            stop_sending: CancellationToken::new(),
            stop_receiving: CancellationToken::new(),
        }
    }

    /// Each sender stops after `n` messages (when `Some`).
    pub fn messages_per_sender(mut self, n: Option<u64>) -> Self {
        self.messages_per_sender = n;
        self
    }

    /// Counts accepted messages in a caller's counter too (e.g. to inject a fault after K).
    pub fn accepted_into(mut self, counter: Option<Arc<AtomicU64>>) -> Self {
        if let Some(c) = counter {
            self.accepted = c;
        }
        self
    }

    /// Treats other runs' stamps stored at or after `unix_ms` as cross-deliveries (default:
    /// from when the run began).
    pub fn foreign_since(mut self, unix_ms: Option<i64>) -> Self {
        if let Some(ms) = unix_ms {
            self.foreign_since_unix_ms = ms;
        }
        self
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

    /// Waits until no owed (message, recipient) pair is outstanding, or `limit` passed.
    /// Call it after every sender finished, so every `Sent` is in the ledger.
    pub async fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.ledger.outstanding() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether a stamp of another run, stored by the server at `server_time_ms`, crossed
    /// over (stored while this run went) rather than being left over from an earlier run.
    /// Assumes the harness's and the server's clocks agree to well within the time the run
    /// spent connecting before it began.
    pub fn stored_during(&self, server_time_ms: i64) -> bool {
        server_time_ms >= self.foreign_since_unix_ms
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

/// Sends `plan.sender`'s stamped messages to `plan.to` until the run stops sending or, when the
/// run has a message count, until this sender sent that many.
///
/// A send that fails because the connection went away (a node died, a GoAway) or the server
/// was briefly unavailable is retried with the same `client_msg_id` on the connection the
/// receiver reconnected, as a real client retries: the server's idempotency makes the retry
/// safe, and the checker then proves nothing was lost or doubled across the failure.
pub async fn send_loop(
    run: Arc<Run>,
    mut conn: watch::Receiver<Connection>,
    plan: Sender,
    pace: Pace,
) -> SenderLog {
    let Sender {
        sender: me,
        target,
        to,
        owed_to,
    } = plan;
    let mut node = Node::from("");
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
        if run.messages_per_sender.is_some_and(|n| seq >= n) {
            break;
        }
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
        let client_msg_id = client_msg_id(run.id, me, seq);
        loop {
            let current = conn.borrow_and_update().clone();
            let e = match current
                .send_message(to, &client_msg_id, body.clone(), "application/x-loadtest")
                .await
            {
                Ok(_) => {
                    if *node != *current.server_node() {
                        node = Node::from(current.server_node());
                    }
                    log.accepted(seq, target, &node);
                    run.ledger.sent(me, seq, &owed_to);
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
    let mut node = Node::from(client.conn().server_node());
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
                if let Some(m) = d.message.as_ref()
                    && let Some(stamp) = Stamp::decode(&m.body)
                {
                    if stamp.run != run.id {
                        let during = run.stored_during(m.server_time_ms);
                        log.other_run(stamp.sender, stamp.seq, &m.client_msg_id, during, &node);
                    } else if stamp.sender != me {
                        let latency_us = now.saturating_sub(stamp.intended_ns) / 1000;
                        run.ledger.arrived(me, stamp.sender, stamp.seq);
                        if log.arrived(stamp.sender, stamp.seq, latency_us, &node) {
                            run.delivered.fetch_add(1, Ordering::AcqRel);
                        }
                        // Late arrivals during the drain count too: dropping them would hide
                        // the tail.
                        if stamp.intended_ns >= run.measure_from_ns {
                            run.record_timeline(now, latency_us);
                        }
                    }
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
                node = Node::from(client.conn().server_node());
                conn.send_replace(client.conn().clone());
            }
            Ok(None) => {
                if client.reconnect_with_backoff(10).await.is_err() {
                    break;
                }
                node = Node::from(client.conn().server_node());
                conn.send_replace(client.conn().clone());
            }
        }
    }
    let _ = client.ack_seen().await;
    log.node = Node::from(client.conn().server_node());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::check;

    fn node() -> Node {
        Node::from("node1")
    }

    /// The case that once ended the drain early: an owed pair is still in flight while an
    /// unconfirmed message (stored, but its sender never saw `Sent`) already arrived, so the
    /// counts match. The drain must wait for the owed pair itself, and then it is no loss.
    #[tokio::test]
    async fn a_late_owed_delivery_inside_the_drain_window_is_waited_for_and_not_lost() {
        let run = Arc::new(Run::new(64, Duration::ZERO));
        let mut sender = SenderLog {
            sender: 0,
            ..SenderLog::default()
        };
        // Seq 1 timed out at the sender, but the server stored it; seq 2 got `Sent`.
        sender.failed += 1;
        sender.accepted(2, Target::User(1), &node());
        run.ledger.sent(0, 2, &[1]);
        let mut receiver = ReceiverLog::new(1);
        run.ledger.arrived(1, 0, 1);
        receiver.arrived(0, 1, 5, &node());
        assert_eq!(run.ledger.outstanding(), 1);

        let late = {
            let run = run.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut receiver = receiver;
                receiver.arrived(0, 2, 300_000, &node());
                run.ledger.arrived(1, 0, 2);
                receiver
            })
        };
        // Generous: the drain ends when the pair arrives, not at the limit.
        run.drain(Duration::from_secs(60)).await;
        assert_eq!(run.ledger.outstanding(), 0);
        assert!(
            late.is_finished(),
            "the drain ended before the owed pair arrived"
        );
        let receiver = late.await.expect("late task");
        let (report, _) = check(run.id, &[sender], &[receiver], &[]);
        assert!(report.clean(), "{report}");
        assert_eq!(
            (report.delivered, report.lost, report.unconfirmed),
            (1, 0, 1)
        );
    }

    #[tokio::test]
    async fn the_drain_gives_up_at_its_limit_and_the_pair_is_then_lost() {
        let run = Arc::new(Run::new(64, Duration::ZERO));
        let mut sender = SenderLog {
            sender: 0,
            ..SenderLog::default()
        };
        sender.accepted(1, Target::User(1), &node());
        run.ledger.sent(0, 1, &[1]);
        run.drain(Duration::from_millis(100)).await;
        assert_eq!(run.ledger.outstanding_pairs(10), vec![(1, 0, 1)]);
        let (report, _) = check(run.id, &[sender], &[ReceiverLog::new(1)], &[]);
        assert_eq!(report.lost, 1);
        assert_eq!(
            report.lost_pairs[0].client_msg_id,
            client_msg_id(run.id, 0, 1)
        );
    }
}
