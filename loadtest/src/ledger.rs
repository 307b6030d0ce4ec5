//! The live ledger of owed deliveries: which (recipient, sender, sender's seq) pairs are owed
//! and have not arrived yet, while the run goes. The drain waits on it — until no owed pair is
//! outstanding — so it can neither stop early because some other delivery made the counts
//! match (an unconfirmed message, a duplicate) nor wait for something nobody owes.
//!
//! A pair becomes owed when the sender reads its `Sent`; it is settled when the recipient
//! logs it. Both sides run concurrently, so a delivery may be logged before its `Sent` was
//! read: such an early arrival is remembered and settles the pair the moment it becomes owed.
//! The final verdict (which pairs were lost, doubled, reordered) is the checker's, from the
//! complete logs; the ledger only answers "is anything owed still on its way?".

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// (recipient, sender, sender's seq).
pub type PairKey = (u32, u32, u64);

/// Independent locks, so thousands of receivers and senders rarely wait on one another.
const SHARDS: usize = 32;

#[derive(Default)]
struct Shard {
    /// Owed and not arrived yet.
    owed: HashSet<PairKey>,
    /// Arrived while not owed (yet): before its `Sent` was read, or never owed at all
    /// (unconfirmed, duplicate). Only the first kind is ever looked up again.
    early: HashSet<PairKey>,
}

pub struct Ledger {
    shards: Vec<Mutex<Shard>>,
    outstanding: AtomicU64,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new()
    }
}

impl Ledger {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            outstanding: AtomicU64::new(0),
        }
    }

    fn shard(&self, recipient: u32) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[recipient as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// `sender`'s message `seq` was accepted: it is owed to each of `recipients` (the sender
    /// itself is skipped: nobody owes a sender its own copy).
    pub fn sent(&self, sender: u32, seq: u64, recipients: &[u32]) {
        for &r in recipients.iter().filter(|&&r| r != sender) {
            let key = (r, sender, seq);
            let mut shard = self.shard(r);
            if !shard.early.remove(&key) && shard.owed.insert(key) {
                self.outstanding.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// `recipient` logged `sender`'s message `seq` (any arrival, owed or not).
    pub fn arrived(&self, recipient: u32, sender: u32, seq: u64) {
        let key = (recipient, sender, seq);
        let mut shard = self.shard(recipient);
        if shard.owed.remove(&key) {
            self.outstanding.fetch_sub(1, Ordering::AcqRel);
        } else {
            shard.early.insert(key);
        }
    }

    /// Owed pairs that have not arrived.
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Up to `limit` of the outstanding pairs, for a progress or timeout message.
    pub fn outstanding_pairs(&self, limit: usize) -> Vec<PairKey> {
        let mut out = Vec::new();
        for s in &self.shards {
            let shard = s.lock().unwrap_or_else(|p| p.into_inner());
            out.extend(shard.owed.iter().take(limit - out.len()).copied());
            if out.len() >= limit {
                break;
            }
        }
        out.sort_unstable();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_outstanding_from_its_sent_until_it_arrives() {
        let l = Ledger::new();
        l.sent(0, 1, &[1, 2]);
        assert_eq!(l.outstanding(), 2);
        l.arrived(1, 0, 1);
        assert_eq!(l.outstanding_pairs(10), vec![(2, 0, 1)]);
        l.arrived(2, 0, 1);
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn an_arrival_read_before_its_sent_settles_the_pair_at_once() {
        let l = Ledger::new();
        l.arrived(1, 0, 7);
        l.sent(0, 7, &[1]);
        assert_eq!(l.outstanding(), 0);
    }

    #[test]
    fn other_arrivals_do_not_settle_an_owed_pair() {
        let l = Ledger::new();
        l.sent(0, 1, &[1]);
        // Unconfirmed (never owed), a duplicate of something else, the sender's own copy:
        // none of them is the owed pair, whatever the counts say.
        l.arrived(1, 0, 2);
        l.arrived(1, 0, 2);
        l.sent(0, 3, &[0]);
        assert_eq!(l.outstanding_pairs(10), vec![(1, 0, 1)]);
    }
}
