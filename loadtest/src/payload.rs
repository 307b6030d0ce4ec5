//! What every load-test message carries, so the receiving side can tell exactly which message
//! it got and how late: a magic tag, the run id, the sender's index, the sender's own sequence
//! number and the intended send time. Bodies are padded to the requested size.
//!
//! The intended time (not the moment the send actually happened) is what latency is measured
//! from: when the system stalls, the sends that should have happened meanwhile count their
//! waiting time too (coordinated-omission correction).

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 4] = b"MLT1";
pub const HEADER_BYTES: usize = 4 + 8 + 4 + 8 + 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Random per run, so messages of an earlier run still queued for a user are ignored.
    pub run: u64,
    pub sender: u32,
    pub seq: u64,
    /// Nanoseconds since the run's epoch at which the message was meant to be sent.
    pub intended_ns: u64,
}

impl Stamp {
    pub fn encode(&self, body_size: usize) -> Bytes {
        let mut b = BytesMut::with_capacity(body_size.max(HEADER_BYTES));
        b.put_slice(MAGIC);
        b.put_u64(self.run);
        b.put_u32(self.sender);
        b.put_u64(self.seq);
        b.put_u64(self.intended_ns);
        b.resize(body_size.max(HEADER_BYTES), b'.');
        b.freeze()
    }

    pub fn decode(body: &[u8]) -> Option<Stamp> {
        if body.len() < HEADER_BYTES || &body[..4] != MAGIC {
            return None;
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[i..i + 8]);
            u64::from_be_bytes(a)
        };
        let mut s = [0u8; 4];
        s.copy_from_slice(&body[12..16]);
        Some(Stamp {
            run: u64_at(4),
            sender: u32::from_be_bytes(s),
            seq: u64_at(16),
            intended_ns: u64_at(24),
        })
    }
}

/// The `client_msg_id` of `sender`'s message `seq` in run `run`: unique per run and sender,
/// so a retry reuses it and the checker can name a message the way the server knows it.
pub fn client_msg_id(run: u64, sender: u32, seq: u64) -> String {
    format!("{run:x}-{sender}-{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_round_trips_at_any_body_size() {
        let s = Stamp {
            run: 7,
            sender: 3,
            seq: 99,
            intended_ns: 123_456_789,
        };
        for size in [0, HEADER_BYTES, 100, 4096] {
            let body = s.encode(size);
            assert_eq!(body.len(), size.max(HEADER_BYTES));
            assert_eq!(Stamp::decode(&body), Some(s));
        }
        assert_eq!(Stamp::decode(b"MLT1short"), None);
        assert_eq!(Stamp::decode(&[0u8; 64]), None);
    }
}
