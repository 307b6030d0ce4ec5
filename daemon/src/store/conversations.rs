//! The conversation list's paging rule, kept once for both backends: which conversations a
//! page holds and in what order. Backends only find each candidate's key (its newest message
//! id as of the snapshot) through their indexes; they never decide order or bounds themselves.
//!
//! Keys are message ids, so they are unique per reader: a message is in one conversation.
//! Ordering by the key as of a fixed snapshot makes every page a slice of one fixed list,
//! whatever happens while a client pages through it.

use crate::model::{ConversationQuery, GroupId, MessageId, UserId};

/// A conversation a backend found, before its message and names are loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Candidate {
    Direct(UserId),
    Group {
        id: GroupId,
        name: String,
        created_at: i64,
    },
}

/// Keys of this page must be below this: below the previous page's last key, and never
/// above the snapshot.
pub(crate) fn upper_bound(snapshot: MessageId, query: &ConversationQuery) -> u64 {
    let past_snapshot = snapshot.0.saturating_add(1);
    query
        .before
        .map_or(past_snapshot, |before| before.0.min(past_snapshot))
}

/// The page: the highest keys below the bound, newest first, at most `limit`.
pub(crate) fn page(
    mut candidates: Vec<(MessageId, Candidate)>,
    bound: u64,
    limit: usize,
) -> Vec<(MessageId, Candidate)> {
    candidates.retain(|(key, _)| key.0 < bound);
    candidates.sort_unstable_by_key(|(key, _)| std::cmp::Reverse(*key));
    candidates.truncate(limit);
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(before: Option<u64>) -> ConversationQuery {
        ConversationQuery {
            snapshot: None,
            before: before.map(MessageId),
            limit: 10,
        }
    }

    #[test]
    fn the_bound_is_the_cursor_but_never_past_the_snapshot() {
        assert_eq!(upper_bound(MessageId(50), &query(None)), 51);
        assert_eq!(upper_bound(MessageId(50), &query(Some(20))), 20);
        assert_eq!(upper_bound(MessageId(50), &query(Some(90))), 51);
        assert_eq!(upper_bound(MessageId(u64::MAX), &query(None)), u64::MAX);
    }

    #[test]
    fn a_page_is_the_newest_keys_below_the_bound() {
        let c = |n: u64| (MessageId(n), Candidate::Direct(UserId(n)));
        let got = page(vec![c(3), c(9), c(5), c(7), c(1)], 8, 2);
        assert_eq!(got, vec![c(7), c(5)]);
    }
}
