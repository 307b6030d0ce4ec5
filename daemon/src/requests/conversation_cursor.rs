//! The `ListConversations` cursor: opaque to clients, so its layout may change with a new
//! version byte. It carries the listing's snapshot and where the last page ended; nothing in
//! it grants anything (a forged one can only page the caller's own conversations).

use messenger_protocol::WireError;

use super::invalid;
use crate::model::MessageId;

const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub snapshot: MessageId,
    /// The key of the last conversation returned: the next page starts below it.
    pub after: MessageId,
}

impl Cursor {
    pub(crate) fn encode(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(LEN);
        out.push(VERSION);
        out.extend_from_slice(&self.snapshot.0.to_be_bytes());
        out.extend_from_slice(&self.after.0.to_be_bytes());
        out
    }

    /// `None` for the empty cursor (a first page).
    pub(crate) fn decode(bytes: &[u8]) -> Result<Option<Cursor>, WireError> {
        if bytes.is_empty() {
            return Ok(None);
        }
        let bad = || invalid("invalid cursor: pass next_cursor back unchanged");
        if bytes.len() != LEN || bytes[0] != VERSION {
            return Err(bad());
        }
        let word = |at: usize| {
            bytes
                .get(at..at + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(bad)
        };
        let cursor = Cursor {
            snapshot: MessageId(word(1)?),
            after: MessageId(word(9)?),
        };
        // A key is a message id up to the snapshot; anything else was not made here.
        if cursor.after.0 == 0 || cursor.after > cursor.snapshot {
            return Err(bad());
        }
        Ok(Some(cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_anything_else_is_refused() {
        let c = Cursor {
            snapshot: MessageId(900),
            after: MessageId(42),
        };
        assert_eq!(Cursor::decode(&c.encode()).expect("valid"), Some(c));
        assert_eq!(Cursor::decode(&[]).expect("empty"), None);
        let mut wrong_version = c.encode();
        wrong_version[0] = 2;
        assert!(Cursor::decode(&wrong_version).is_err());
        assert!(Cursor::decode(&c.encode()[..10]).is_err());
        let past_snapshot = Cursor {
            snapshot: MessageId(5),
            after: MessageId(6),
        };
        assert!(Cursor::decode(&past_snapshot.encode()).is_err());
        let zero = Cursor {
            snapshot: MessageId(5),
            after: MessageId(0),
        };
        assert!(Cursor::decode(&zero.encode()).is_err());
    }
}
