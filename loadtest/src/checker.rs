//! The loss / duplicate / order checker.
//!
//! It trusts nothing the system under test says about delivery. Expectations come from the
//! sending side only: a message counts as owed to its recipients once the sender holds its
//! acceptance (`Sent`, or an MQTT PUBACK for the peer). What arrived comes from the receiving
//! side only: every recipient logs each payload stamp it saw. The verdict compares the two:
//! - lost: owed to a recipient that never logged it;
//! - duplicate: logged twice by one recipient (however the transport numbered it);
//! - reordered: from one sender, logged after a later message of the same sender;
//! - misdelivered: logged by someone it was not addressed to;
//! - unconfirmed: delivered although its sender never saw it accepted (e.g. a timed-out send
//!   that the server did store) — reported, not an error.

use std::collections::{HashMap, HashSet};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Where one message was addressed, as indices into the run's users and groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    User(u32),
    Group(u32),
}

/// Everything one sender knows: which of its messages were accepted, and for whom.
#[derive(Debug, Default)]
pub struct SenderLog {
    pub sender: u32,
    /// (sender's seq, target) of every accepted message.
    pub accepted: Vec<(u64, Target)>,
    /// Sends that failed or timed out (not owed to anyone).
    pub failed: u64,
}

/// Everything one recipient saw.
#[derive(Debug, Default)]
pub struct ReceiverLog {
    pub recipient: u32,
    /// (sender, sender's seq) → end-to-end latency in microseconds.
    pub seen: HashMap<(u32, u64), u64>,
    pub duplicates: u64,
    pub reordered: u64,
    /// Highest seq seen per sender, for the order check.
    last_from: HashMap<u32, u64>,
}

impl ReceiverLog {
    pub fn new(recipient: u32) -> Self {
        Self {
            recipient,
            ..Self::default()
        }
    }

    /// Logs one arrival; returns false when it was a duplicate.
    pub fn arrived(&mut self, sender: u32, seq: u64, latency_us: u64) -> bool {
        if self.seen.contains_key(&(sender, seq)) {
            self.duplicates += 1;
            return false;
        }
        self.seen.insert((sender, seq), latency_us);
        let last = self.last_from.entry(sender).or_insert(0);
        if seq < *last {
            self.reordered += 1;
        } else {
            *last = seq;
        }
        true
    }
}

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub accepted_messages: u64,
    pub failed_sends: u64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub misdelivered: u64,
    pub unconfirmed: u64,
}

impl CheckReport {
    /// True when nothing was lost, doubled, reordered or misdelivered.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.reordered == 0 && self.misdelivered == 0
    }
}

/// Compares what senders were promised with what recipients saw. `groups[g]` lists the
/// member indices of group `g`; a sender is not owed its own copy.
/// Also returns, per accepted message, the latency until its last recipient had it (µs).
pub fn check(
    senders: &[SenderLog],
    receivers: &[ReceiverLog],
    groups: &[Vec<u32>],
) -> (CheckReport, Histogram<u64>) {
    let mut report = CheckReport::default();
    let mut completion = new_histogram();
    let by_recipient: HashMap<u32, &ReceiverLog> =
        receivers.iter().map(|r| (r.recipient, r)).collect();
    let mut owed: HashSet<(u32, u32, u64)> = HashSet::new();

    for s in senders {
        report.failed_sends += s.failed;
        for &(seq, target) in &s.accepted {
            report.accepted_messages += 1;
            let single;
            let recipients: &[u32] = match target {
                Target::User(u) => {
                    single = [u];
                    &single
                }
                Target::Group(g) => groups.get(g as usize).map_or(&[][..], |m| m.as_slice()),
            };
            let mut last_arrival = None::<u64>;
            let mut complete = true;
            for &r in recipients.iter().filter(|&&r| r != s.sender) {
                report.expected_deliveries += 1;
                owed.insert((r, s.sender, seq));
                match by_recipient
                    .get(&r)
                    .and_then(|log| log.seen.get(&(s.sender, seq)))
                {
                    Some(&lat) => {
                        report.delivered += 1;
                        last_arrival = Some(last_arrival.map_or(lat, |l| l.max(lat)));
                    }
                    None => {
                        report.lost += 1;
                        complete = false;
                    }
                }
            }
            if let (true, Some(lat)) = (complete, last_arrival) {
                let _ = completion.record(lat.max(1));
            }
        }
    }

    let accepted: HashSet<(u32, u64)> = senders
        .iter()
        .flat_map(|s| s.accepted.iter().map(move |&(seq, _)| (s.sender, seq)))
        .collect();
    for r in receivers {
        report.duplicates += r.duplicates;
        report.reordered += r.reordered;
        for &(sender, seq) in r.seen.keys() {
            if owed.contains(&(r.recipient, sender, seq)) {
                continue;
            }
            if accepted.contains(&(sender, seq)) {
                report.misdelivered += 1;
            } else {
                report.unconfirmed += 1;
            }
        }
    }
    (report, completion)
}

/// A histogram of microseconds up to one hour with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(sender: u32, seqs: &[(u64, Target)]) -> SenderLog {
        SenderLog {
            sender,
            accepted: seqs.to_vec(),
            failed: 0,
        }
    }

    #[test]
    fn every_owed_delivery_seen_once_in_order_is_clean() {
        let s = sender(0, &[(1, Target::User(1)), (2, Target::User(1))]);
        let mut r = ReceiverLog::new(1);
        assert!(r.arrived(0, 1, 10));
        assert!(r.arrived(0, 2, 20));
        let (report, hist) = check(&[s], &[r], &[]);
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.delivered, 2);
        assert_eq!(hist.len(), 2);
    }

    #[test]
    fn a_missing_delivery_is_lost_even_if_the_recipient_saw_others() {
        let s = sender(
            0,
            &[
                (1, Target::User(1)),
                (2, Target::User(1)),
                (3, Target::User(1)),
            ],
        );
        let mut r = ReceiverLog::new(1);
        r.arrived(0, 1, 5);
        r.arrived(0, 3, 5);
        let (report, _) = check(&[s], &[r], &[]);
        assert_eq!(report.lost, 1);
        assert!(!report.clean());
    }

    #[test]
    fn duplicates_reorders_and_misdeliveries_are_counted() {
        let s = sender(0, &[(1, Target::User(1)), (2, Target::User(1))]);
        let mut r1 = ReceiverLog::new(1);
        r1.arrived(0, 2, 5);
        r1.arrived(0, 1, 5);
        assert!(!r1.arrived(0, 1, 5));
        let mut r2 = ReceiverLog::new(2);
        r2.arrived(0, 1, 5);
        r2.arrived(9, 9, 5);
        let (report, _) = check(&[s], &[r1, r2], &[]);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.reordered, 1);
        assert_eq!(report.misdelivered, 1);
        assert_eq!(report.unconfirmed, 1);
        assert!(!report.clean());
    }

    #[test]
    fn a_group_message_is_owed_to_every_member_but_the_sender() {
        let groups = vec![vec![0, 1, 2]];
        let s = sender(0, &[(1, Target::Group(0))]);
        let mut r1 = ReceiverLog::new(1);
        r1.arrived(0, 1, 100);
        let r2 = ReceiverLog::new(2);
        let (report, hist) = check(&[s], &[r1, r2], &groups);
        assert_eq!(report.expected_deliveries, 2);
        assert_eq!(report.lost, 1);
        assert_eq!(
            hist.len(),
            0,
            "an incomplete fan-out has no completion time"
        );
    }
}
