//! The loss / duplicate / order checker.
//!
//! It trusts nothing the system under test says about delivery. Expectations come from the
//! sending side only: a message counts as owed to its recipients once the sender holds its
//! acceptance (`Sent`, or an MQTT PUBACK for the peer). What arrived comes from the receiving
//! side only: every recipient logs each payload stamp it saw. The verdict compares the two,
//! pair by pair — (message, recipient), never by counts — and names every bad pair:
//! - lost: owed to a recipient that never logged it;
//! - duplicate: logged twice by one recipient (however the transport numbered it);
//! - reordered: from one sender, logged after a later message of the same sender;
//! - misdelivered: logged by someone it was not addressed to;
//! - foreign: a stamp of another run stored while this run went (another cluster's or another
//!   harness's message reached our users);
//! - unconfirmed: delivered although its sender never saw it accepted (e.g. a timed-out send
//!   that the server did store) — reported, neither owed nor lost;
//! - stale: a stamp of an earlier run, stored before this run began (left in an inbox by a
//!   previous run of the same accounts) — reported, not an error.
//!
//! Each side also logs the node it was on (`HelloOk.node`), so a named pair says where the
//! sender was when it got `Sent` and where the recipient was when the pair arrived (or, for a
//! lost pair, when the run ended).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::payload::client_msg_id;

/// The id of the node a connection was served by; empty when unknown or not a cluster.
/// Shared, so logging it per message costs a reference count, not a string.
pub type Node = Arc<str>;

/// How many pairs of each kind a report names; the counts stay exact.
pub const NAMED_PAIRS: usize = 50;

/// Where one message was addressed, as indices into the run's users and groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    User(u32),
    Group(u32),
}

/// One message whose sender holds its acceptance.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub seq: u64,
    pub target: Target,
    /// The node the sender was on when `Sent` arrived.
    pub node: Node,
}

/// Everything one sender knows: which of its messages were accepted, and for whom.
#[derive(Debug, Default)]
pub struct SenderLog {
    pub sender: u32,
    pub accepted: Vec<Accepted>,
    /// Sends that failed or timed out (not owed to anyone).
    pub failed: u64,
}

impl SenderLog {
    pub fn accepted(&mut self, seq: u64, target: Target, node: &Node) {
        self.accepted.push(Accepted {
            seq,
            target,
            node: node.clone(),
        });
    }
}

/// One logged arrival.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// End-to-end latency in microseconds.
    pub latency_us: u64,
    /// The node the recipient was on when it arrived.
    pub node: Node,
}

/// An arrival that is wrong in itself (a duplicate, a reorder, another run's stamp), kept
/// with what names it.
#[derive(Debug, Clone)]
struct Noted {
    sender: u32,
    seq: u64,
    node: Node,
    /// Reordered: the later seq of the same sender that had already arrived.
    after_seq: Option<u64>,
    /// Foreign: the id the message really carried.
    client_msg_id: Option<String>,
}

/// Everything one recipient saw.
#[derive(Debug, Default)]
pub struct ReceiverLog {
    pub recipient: u32,
    /// (sender, sender's seq) → its first arrival.
    pub seen: HashMap<(u32, u64), Arrival>,
    pub duplicates: u64,
    pub reordered: u64,
    /// Stamps of another run stored while this run went.
    pub foreign: u64,
    /// Stamps of an earlier run, stored before this one began.
    pub stale: u64,
    /// The node this recipient was on last (when the run ended).
    pub node: Node,
    /// Highest seq seen per sender, for the order check.
    last_from: HashMap<u32, u64>,
    duplicate_arrivals: Vec<Noted>,
    reordered_arrivals: Vec<Noted>,
    foreign_arrivals: Vec<Noted>,
}

fn note(list: &mut Vec<Noted>, n: Noted) {
    if list.len() < NAMED_PAIRS {
        list.push(n);
    }
}

impl ReceiverLog {
    pub fn new(recipient: u32) -> Self {
        Self {
            recipient,
            node: Node::from(""),
            ..Self::default()
        }
    }

    /// Logs one arrival of this run on `node`; returns false when it was a duplicate.
    pub fn arrived(&mut self, sender: u32, seq: u64, latency_us: u64, node: &Node) -> bool {
        if self.seen.contains_key(&(sender, seq)) {
            self.duplicates += 1;
            note(
                &mut self.duplicate_arrivals,
                Noted {
                    sender,
                    seq,
                    node: node.clone(),
                    after_seq: None,
                    client_msg_id: None,
                },
            );
            return false;
        }
        self.seen.insert(
            (sender, seq),
            Arrival {
                latency_us,
                node: node.clone(),
            },
        );
        let last = self.last_from.entry(sender).or_insert(0);
        if seq < *last {
            self.reordered += 1;
            let after = *last;
            note(
                &mut self.reordered_arrivals,
                Noted {
                    sender,
                    seq,
                    node: node.clone(),
                    after_seq: Some(after),
                    client_msg_id: None,
                },
            );
        } else {
            *last = seq;
        }
        true
    }

    /// Logs a stamp of another run. `stored_during_run`: the server stored it after this run
    /// began, so it is not a leftover of an earlier run but a message that crossed over from
    /// somewhere else (another cluster sharing a store, another harness on the same accounts).
    pub fn other_run(
        &mut self,
        sender: u32,
        seq: u64,
        client_msg_id: &str,
        stored_during_run: bool,
        node: &Node,
    ) {
        if !stored_during_run {
            self.stale += 1;
            return;
        }
        self.foreign += 1;
        note(
            &mut self.foreign_arrivals,
            Noted {
                sender,
                seq,
                node: node.clone(),
                after_seq: None,
                client_msg_id: Some(client_msg_id.to_string()),
            },
        );
    }
}

/// One (message, recipient) pair the checker names.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Pair {
    pub sender: u32,
    pub recipient: u32,
    pub client_msg_id: String,
    /// The sender's own sequence number of the message.
    pub seq: u64,
    /// Where the sender was when `Sent` arrived (empty: never accepted, or not a cluster).
    pub sender_node: String,
    /// Where the recipient was when the pair arrived; for a lost pair, when the run ended.
    pub recipient_node: String,
    /// Reordered: the later seq of the same sender that arrived before this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
}

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = |n: &str| if n.is_empty() { "?" } else { n }.to_string();
        write!(
            f,
            "user {} -> user {}: {} (seq {}), sender on {}, recipient on {}",
            self.sender,
            self.recipient,
            self.client_msg_id,
            self.seq,
            node(&self.sender_node),
            node(&self.recipient_node)
        )?;
        if let Some(after) = self.after_seq {
            write!(f, ", arrived after seq {after}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub accepted_messages: u64,
    pub failed_sends: u64,
    /// Owed (message, recipient) pairs.
    pub expected_deliveries: u64,
    /// Owed pairs that arrived (at least once).
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub misdelivered: u64,
    /// Stamps of another run stored while this one went: a cross-delivery.
    pub foreign: u64,
    /// Delivered though the sender never saw `Sent`: neither owed nor lost.
    pub unconfirmed: u64,
    /// Leftovers of earlier runs: not an error.
    pub stale: u64,
    /// The first [`NAMED_PAIRS`] of each kind; the count fields above are complete.
    pub lost_pairs: Vec<Pair>,
    pub duplicate_pairs: Vec<Pair>,
    pub reordered_pairs: Vec<Pair>,
    pub misdelivered_pairs: Vec<Pair>,
    pub foreign_pairs: Vec<Pair>,
}

impl CheckReport {
    /// True when nothing was lost, doubled, reordered, misdelivered or crossed over.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicates == 0
            && self.reordered == 0
            && self.misdelivered == 0
            && self.foreign == 0
    }

    /// The counts on one line.
    pub fn summary(&self) -> String {
        format!(
            "{} — accepted {}, owed {}, delivered {}, lost {}, duplicates {}, reordered {}, misdelivered {}, foreign {}, unconfirmed {}, stale {}, failed sends {}",
            if self.clean() { "CLEAN" } else { "FAILED" },
            self.accepted_messages,
            self.expected_deliveries,
            self.delivered,
            self.lost,
            self.duplicates,
            self.reordered,
            self.misdelivered,
            self.foreign,
            self.unconfirmed,
            self.stale,
            self.failed_sends
        )
    }

    /// Every named pair, one per line, grouped by kind (nothing when clean).
    pub fn named(&self) -> String {
        let mut out = String::new();
        for (kind, total, pairs) in [
            ("lost", self.lost, &self.lost_pairs),
            ("duplicated", self.duplicates, &self.duplicate_pairs),
            ("reordered", self.reordered, &self.reordered_pairs),
            ("misdelivered", self.misdelivered, &self.misdelivered_pairs),
            ("foreign", self.foreign, &self.foreign_pairs),
        ] {
            if total == 0 {
                continue;
            }
            out.push_str(&format!("{kind} ({total}):\n"));
            for p in pairs {
                out.push_str(&format!("  {p}\n"));
            }
            if total > pairs.len() as u64 {
                out.push_str(&format!("  ... and {} more\n", total - pairs.len() as u64));
            }
        }
        out
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary())?;
        write!(f, "{}", self.named())
    }
}

fn push_named(list: &mut Vec<Pair>, pair: impl FnOnce() -> Pair) {
    if list.len() < NAMED_PAIRS {
        list.push(pair());
    }
}

/// Compares what senders were promised with what recipients saw. `run` is the run id the
/// senders' `client_msg_id`s were made from; `groups[g]` lists the member indices of group
/// `g`; a sender is not owed its own copy.
/// Also returns, per accepted message, the latency until its last recipient had it (µs).
pub fn check(
    run: u64,
    senders: &[SenderLog],
    receivers: &[ReceiverLog],
    groups: &[Vec<u32>],
) -> (CheckReport, Histogram<u64>) {
    let mut report = CheckReport::default();
    let mut completion = new_histogram();
    let by_recipient: HashMap<u32, &ReceiverLog> =
        receivers.iter().map(|r| (r.recipient, r)).collect();
    let mut owed: HashSet<(u32, u32, u64)> = HashSet::new();
    // (sender, seq) → the node the sender got `Sent` on.
    let mut accepted: HashMap<(u32, u64), &Node> = HashMap::new();

    for s in senders {
        report.failed_sends += s.failed;
        for a in &s.accepted {
            report.accepted_messages += 1;
            accepted.insert((s.sender, a.seq), &a.node);
            let single;
            let recipients: &[u32] = match a.target {
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
                owed.insert((r, s.sender, a.seq));
                let log = by_recipient.get(&r);
                match log.and_then(|log| log.seen.get(&(s.sender, a.seq))) {
                    Some(arrival) => {
                        report.delivered += 1;
                        let lat = arrival.latency_us;
                        last_arrival = Some(last_arrival.map_or(lat, |l| l.max(lat)));
                    }
                    None => {
                        report.lost += 1;
                        complete = false;
                        push_named(&mut report.lost_pairs, || Pair {
                            sender: s.sender,
                            recipient: r,
                            client_msg_id: client_msg_id(run, s.sender, a.seq),
                            seq: a.seq,
                            sender_node: a.node.to_string(),
                            recipient_node: log.map(|l| l.node.to_string()).unwrap_or_default(),
                            after_seq: None,
                        });
                    }
                }
            }
            if let (true, Some(lat)) = (complete, last_arrival) {
                let _ = completion.record(lat.max(1));
            }
        }
    }

    let sender_node = |sender: u32, seq: u64| {
        accepted
            .get(&(sender, seq))
            .map(|n| n.to_string())
            .unwrap_or_default()
    };
    let named = |r: &ReceiverLog, n: &Noted| Pair {
        sender: n.sender,
        recipient: r.recipient,
        client_msg_id: n
            .client_msg_id
            .clone()
            .unwrap_or_else(|| client_msg_id(run, n.sender, n.seq)),
        seq: n.seq,
        sender_node: if n.client_msg_id.is_some() {
            // Another run's sender: its node is not ours to know.
            String::new()
        } else {
            sender_node(n.sender, n.seq)
        },
        recipient_node: n.node.to_string(),
        after_seq: n.after_seq,
    };
    for r in receivers {
        report.duplicates += r.duplicates;
        report.reordered += r.reordered;
        report.foreign += r.foreign;
        report.stale += r.stale;
        for n in &r.duplicate_arrivals {
            push_named(&mut report.duplicate_pairs, || named(r, n));
        }
        for n in &r.reordered_arrivals {
            push_named(&mut report.reordered_pairs, || named(r, n));
        }
        for n in &r.foreign_arrivals {
            push_named(&mut report.foreign_pairs, || named(r, n));
        }
        for (&(sender, seq), arrival) in &r.seen {
            if owed.contains(&(r.recipient, sender, seq)) {
                continue;
            }
            if accepted.contains_key(&(sender, seq)) {
                report.misdelivered += 1;
                push_named(&mut report.misdelivered_pairs, || Pair {
                    sender,
                    recipient: r.recipient,
                    client_msg_id: client_msg_id(run, sender, seq),
                    seq,
                    sender_node: sender_node(sender, seq),
                    recipient_node: arrival.node.to_string(),
                    after_seq: None,
                });
            } else {
                report.unconfirmed += 1;
            }
        }
    }
    // Iteration over hash maps above is unordered; a report reads best sorted.
    for list in [
        &mut report.duplicate_pairs,
        &mut report.reordered_pairs,
        &mut report.misdelivered_pairs,
        &mut report.foreign_pairs,
    ] {
        list.sort_by_key(|p| (p.sender, p.seq, p.recipient));
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

    const RUN: u64 = 0xab;

    fn node(n: &str) -> Node {
        Node::from(n)
    }

    fn sender(sender: u32, seqs: &[(u64, Target)]) -> SenderLog {
        let mut log = SenderLog {
            sender,
            ..SenderLog::default()
        };
        for &(seq, target) in seqs {
            log.accepted(seq, target, &node("node1"));
        }
        log
    }

    fn to_user(r: u32, seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, Target)> {
        seqs.map(|s| (s, Target::User(r))).collect()
    }

    #[test]
    fn every_owed_delivery_seen_once_in_order_is_clean() {
        let s = sender(0, &[(1, Target::User(1)), (2, Target::User(1))]);
        let mut r = ReceiverLog::new(1);
        assert!(r.arrived(0, 1, 10, &node("node2")));
        assert!(r.arrived(0, 2, 20, &node("node2")));
        let (report, hist) = check(RUN, &[s], &[r], &[]);
        assert!(report.clean(), "{report}");
        assert_eq!(report.delivered, 2);
        assert_eq!(hist.len(), 2);
        assert_eq!(report.named(), "");
    }

    #[test]
    fn a_dropped_delivery_is_named_lost_with_both_nodes() {
        let s = sender(0, &to_user(1, 1..=3));
        let mut r = ReceiverLog::new(1);
        r.arrived(0, 1, 5, &node("node2"));
        r.arrived(0, 3, 5, &node("node3"));
        r.node = node("node3");
        let (report, _) = check(RUN, &[s], &[r], &[]);
        assert_eq!(report.lost, 1);
        assert!(!report.clean());
        assert_eq!(
            report.lost_pairs,
            vec![Pair {
                sender: 0,
                recipient: 1,
                client_msg_id: "ab-0-2".into(),
                seq: 2,
                sender_node: "node1".into(),
                recipient_node: "node3".into(),
                after_seq: None,
            }]
        );
        let text = report.to_string();
        assert!(text.contains("lost (1):"), "{text}");
        assert!(
            text.contains("user 0 -> user 1: ab-0-2 (seq 2), sender on node1, recipient on node3"),
            "{text}"
        );
    }

    #[test]
    fn a_duplicated_delivery_is_named() {
        let s = sender(4, &to_user(5, 1..=2));
        let mut r = ReceiverLog::new(5);
        assert!(r.arrived(4, 1, 5, &node("node2")));
        assert!(r.arrived(4, 2, 5, &node("node2")));
        assert!(!r.arrived(4, 1, 5, &node("node3")));
        let (report, _) = check(RUN, &[s], &[r], &[]);
        assert_eq!(
            (report.duplicates, report.lost, report.delivered),
            (1, 0, 2)
        );
        assert!(!report.clean());
        assert_eq!(report.duplicate_pairs.len(), 1);
        let p = &report.duplicate_pairs[0];
        assert_eq!(
            (p.sender, p.recipient, p.client_msg_id.as_str(), p.seq),
            (4, 5, "ab-4-1", 1)
        );
        assert_eq!(
            (p.sender_node.as_str(), p.recipient_node.as_str()),
            ("node1", "node3")
        );
    }

    #[test]
    fn a_reordered_delivery_is_named_with_what_it_came_after() {
        let s = sender(2, &to_user(3, 1..=3));
        let mut r = ReceiverLog::new(3);
        r.arrived(2, 1, 5, &node("n"));
        r.arrived(2, 3, 5, &node("n"));
        r.arrived(2, 2, 5, &node("n"));
        let (report, _) = check(RUN, &[s], &[r], &[]);
        assert_eq!(
            (report.reordered, report.lost, report.duplicates),
            (1, 0, 0)
        );
        assert!(!report.clean());
        let p = &report.reordered_pairs[0];
        assert_eq!(
            (p.sender, p.recipient, p.client_msg_id.as_str(), p.after_seq),
            (2, 3, "ab-2-2", Some(3))
        );
        assert!(report.to_string().contains("arrived after seq 3"));
    }

    #[test]
    fn a_delivery_to_the_wrong_user_is_named_misdelivered() {
        let s = sender(0, &[(1, Target::User(1))]);
        let mut r1 = ReceiverLog::new(1);
        r1.arrived(0, 1, 5, &node("n"));
        let mut r2 = ReceiverLog::new(2);
        r2.arrived(0, 1, 5, &node("node9"));
        let (report, _) = check(RUN, &[s], &[r1, r2], &[]);
        assert_eq!(report.misdelivered, 1);
        assert!(!report.clean());
        let p = &report.misdelivered_pairs[0];
        assert_eq!(
            (p.sender, p.recipient, p.recipient_node.as_str()),
            (0, 2, "node9")
        );
    }

    #[test]
    fn an_unconfirmed_delivery_is_neither_owed_nor_delivered_nor_lost() {
        // Seq 2 timed out at the sender (never `Sent`) but the server stored it.
        let mut s = sender(0, &[(1, Target::User(1))]);
        s.failed = 1;
        let mut r = ReceiverLog::new(1);
        r.arrived(0, 1, 5, &node("n"));
        r.arrived(0, 2, 5, &node("n"));
        let (report, _) = check(RUN, &[s], &[r], &[]);
        assert!(report.clean(), "{report}");
        assert_eq!(report.unconfirmed, 1);
        assert_eq!(report.expected_deliveries, 1);
        assert_eq!(report.delivered, 1);
        assert_eq!(report.lost, 0);
        assert_eq!(report.failed_sends, 1);
    }

    #[test]
    fn another_runs_stamp_stored_during_the_run_is_foreign_and_fails_the_check() {
        let s = sender(0, &[(1, Target::User(1))]);
        let mut r = ReceiverLog::new(1);
        r.arrived(0, 1, 5, &node("n"));
        r.other_run(0, 1, "ff-0-1", true, &node("node2"));
        // A leftover of an earlier run is no cross-delivery.
        r.other_run(0, 7, "ee-0-7", false, &node("node2"));
        let (report, _) = check(RUN, &[s], &[r], &[]);
        assert_eq!((report.foreign, report.stale), (1, 1));
        assert!(!report.clean());
        let p = &report.foreign_pairs[0];
        assert_eq!(
            (
                p.recipient,
                p.client_msg_id.as_str(),
                p.recipient_node.as_str()
            ),
            (1, "ff-0-1", "node2")
        );
        assert_eq!(report.delivered, 1);
    }

    #[test]
    fn a_group_message_is_owed_to_every_member_but_the_sender() {
        let groups = vec![vec![0, 1, 2]];
        let s = sender(0, &[(1, Target::Group(0))]);
        let mut r1 = ReceiverLog::new(1);
        r1.arrived(0, 1, 100, &node("n"));
        let r2 = ReceiverLog::new(2);
        let (report, hist) = check(RUN, &[s], &[r1, r2], &groups);
        assert_eq!(report.expected_deliveries, 2);
        assert_eq!(report.lost, 1);
        assert_eq!(report.lost_pairs[0].recipient, 2);
        assert_eq!(
            hist.len(),
            0,
            "an incomplete fan-out has no completion time"
        );
    }

    #[test]
    fn the_report_names_a_bounded_number_of_pairs_but_counts_all() {
        let s = sender(0, &to_user(1, 1..=200));
        let r = ReceiverLog::new(1);
        let (report, _) = check(RUN, &[s], &[r], &[]);
        assert_eq!(report.lost, 200);
        assert_eq!(report.lost_pairs.len(), NAMED_PAIRS);
        assert!(report.named().contains("... and 150 more"));
    }
}
