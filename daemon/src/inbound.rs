//! Reading frames under the memory budget. The frame codec alone would let any client make
//! the server hold a buffer as large as the frame limit (256 KiB) for as long as it takes to
//! send it; here:
//! - before a connection has signed in, its frames are limited to a few KiB (`FrameLimit`):
//!   an unauthenticated client cannot pin more;
//! - a large frame (over `FREE_FRAME_BYTES`) is charged to the process's memory budget from
//!   its header until it is decoded; when the budget is dry the connection stops reading
//!   (`BudgetedRead`) until the budget has room (slow readers are shed to make it), and is
//!   closed with `UNAVAILABLE` if it stays dry;
//! - the read buffer shrinks back after a large frame instead of keeping its high-water mark
//!   for the life of the connection.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use messenger_protocol::CodecError;
use messenger_protocol::codec::{LENGTH_PREFIX_BYTES, ServerCodec};
use messenger_protocol::pb;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::Decoder;

use crate::memory::{BudgetError, ConnMemory, MemoryBudget, PoolCharge};

/// Frames up to this size are read without a reservation: every connection may hold that
/// much, and charging each small frame would cost more than it protects.
pub const FREE_FRAME_BYTES: usize = 16 * 1024;
/// A read buffer larger than this is released once it is empty.
const KEEP_CAPACITY: usize = 16 * 1024;
/// Capacity of a fresh read buffer.
pub const START_CAPACITY: usize = 512;

/// The largest frame a connection accepts right now: small until it signs in. Shared between
/// the session (which raises and lowers it) and the transport's reader (which enforces it).
#[derive(Clone, Debug)]
pub struct FrameLimit(Arc<AtomicUsize>);

impl FrameLimit {
    pub fn new(bytes: usize) -> Self {
        Self(Arc::new(AtomicUsize::new(bytes)))
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self, bytes: usize) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    /// `TooLarge` when a frame of `len` bytes is over the limit.
    pub fn check(&self, len: usize) -> Result<(), CodecError> {
        let max = self.get();
        if len > max {
            return Err(CodecError::TooLarge { len, max });
        }
        Ok(())
    }
}

/// Error text of a frame refused because the process's memory budget is dry.
pub const SHORT_OF_MEMORY: &str = "server is short of memory; retry later";

/// How the decoder asks the reader beneath it for budget: it sets `need`, the reader waits
/// for that many bytes of the pool (reading nothing meanwhile) and leaves them in `granted`.
#[derive(Default)]
pub struct ReadGate {
    need: AtomicUsize,
    granted: Mutex<Option<PoolCharge>>,
}

/// The native transport's decoder: the length-prefixed codec under the rules above.
pub struct InboundCodec {
    inner: ServerCodec,
    limit: FrameLimit,
    budget: Arc<MemoryBudget>,
    gate: Arc<ReadGate>,
    reservation: Option<PoolCharge>,
}

impl InboundCodec {
    /// `max_frame_bytes` is the configured limit (the codec's backstop); `limit` the one in
    /// force, at most that. `gate` is shared with the connection's `BudgetedRead`.
    pub fn new(
        max_frame_bytes: usize,
        limit: FrameLimit,
        budget: Arc<MemoryBudget>,
        gate: Arc<ReadGate>,
    ) -> Self {
        Self {
            inner: ServerCodec::new(max_frame_bytes),
            limit,
            budget,
            gate,
            reservation: None,
        }
    }
}

/// A wait for budget that the reader polls.
type BudgetWait = Pin<Box<dyn Future<Output = Result<PoolCharge, BudgetError>> + Send>>;

/// The socket's read half, which stops reading while the decoder waits for budget.
pub struct BudgetedRead<R> {
    inner: R,
    gate: Arc<ReadGate>,
    memory: Arc<ConnMemory>,
    waiting: Option<BudgetWait>,
}

impl<R> BudgetedRead<R> {
    pub fn new(inner: R, gate: Arc<ReadGate>, memory: Arc<ConnMemory>) -> Self {
        Self {
            inner,
            gate,
            memory,
            waiting: None,
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for BudgetedRead<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if let Some(waiting) = self.waiting.as_mut() {
                let charge = match waiting.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(charge) => charge,
                };
                self.waiting = None;
                self.gate.need.store(0, Ordering::Relaxed);
                match charge {
                    Ok(charge) => {
                        *self.gate.granted.lock().unwrap_or_else(|p| p.into_inner()) = Some(charge);
                    }
                    Err(_) => {
                        return Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::OutOfMemory,
                            SHORT_OF_MEMORY,
                        )));
                    }
                }
            }
            let need = self.gate.need.load(Ordering::Relaxed);
            if need > 0 {
                let memory = Arc::clone(&self.memory);
                self.waiting = Some(Box::pin(async move { memory.charge_read(need).await }));
                continue;
            }
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
    }
}

impl Decoder for InboundCodec {
    type Item = pb::ClientFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<pb::ClientFrame>, CodecError> {
        if let Some(mut prefix) = src.get(..LENGTH_PREFIX_BYTES) {
            let len = prefix.get_u32() as usize;
            self.limit.check(len)?;
            if len > FREE_FRAME_BYTES && self.reservation.is_none() {
                let granted = self
                    .gate
                    .granted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                match granted.or_else(|| self.budget.try_reserve_read(len + LENGTH_PREFIX_BYTES)) {
                    Some(charge) => self.reservation = Some(charge),
                    None => {
                        // The reader waits for the budget (reading nothing) and calls again.
                        self.gate
                            .need
                            .store(len + LENGTH_PREFIX_BYTES, Ordering::Relaxed);
                        return Ok(None);
                    }
                }
            }
        }
        let frame = self.inner.decode(src)?;
        if frame.is_some() {
            self.reservation = None;
            if src.is_empty() && src.capacity() > KEEP_CAPACITY {
                *src = BytesMut::with_capacity(START_CAPACITY);
            }
        }
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use messenger_protocol::codec::encode_frame;

    use super::*;
    use crate::config::MemoryConfig;

    fn frame_of(bytes: usize) -> BytesMut {
        let frame = pb::ClientFrame {
            request_id: 1,
            kind: Some(pb::client_frame::Kind::Ping(pb::Ping {})),
        };
        let mut buf = BytesMut::new();
        encode_frame(&frame, usize::MAX, &mut buf).expect("encode");
        // Pad with an unknown field (tag 1000, bytes) to reach the size: still decodable.
        let mut padded = BytesMut::new();
        let body_len = buf.len() - LENGTH_PREFIX_BYTES;
        let pad = bytes.saturating_sub(body_len + 8);
        let mut extra = BytesMut::new();
        prost::encoding::bytes::encode(1000, &vec![0u8; pad], &mut extra);
        padded.put_u32(u32::try_from(body_len + extra.len()).expect("len"));
        padded.extend_from_slice(&buf[LENGTH_PREFIX_BYTES..]);
        padded.extend_from_slice(&extra);
        padded
    }

    fn budget(bytes: usize) -> Arc<MemoryBudget> {
        MemoryBudget::new(&MemoryConfig {
            max_buffered_bytes: bytes,
            ..MemoryConfig::default()
        })
    }

    fn codec(limit: FrameLimit, budget: Arc<MemoryBudget>) -> (InboundCodec, Arc<ReadGate>) {
        let gate = Arc::new(ReadGate::default());
        (
            InboundCodec::new(256 * 1024, limit, budget, Arc::clone(&gate)),
            gate,
        )
    }

    #[test]
    fn frames_over_the_current_limit_are_refused_before_they_are_buffered() {
        let limit = FrameLimit::new(1024);
        let (mut codec, _) = codec(limit.clone(), budget(1 << 20));
        let mut header = BytesMut::new();
        header.put_u32(2048);
        assert!(matches!(
            codec.decode(&mut header),
            Err(CodecError::TooLarge {
                len: 2048,
                max: 1024
            })
        ));
        limit.set(4096);
        let mut header = BytesMut::new();
        header.put_u32(2048);
        assert!(matches!(codec.decode(&mut header), Ok(None)));
    }

    #[test]
    fn a_large_frame_is_charged_until_decoded_and_waits_when_the_budget_is_dry() {
        let b = budget(100 * 1024);
        let (mut first, _) = codec(FrameLimit::new(256 * 1024), b.clone());
        let mut whole = frame_of(60 * 1024);
        let mut partial = whole.split_to(1000);
        assert!(matches!(first.decode(&mut partial), Ok(None)));
        assert!(b.in_use() >= 60 * 1024, "charged from the header on");
        let (mut second, gate) = codec(FrameLimit::new(256 * 1024), b.clone());
        let mut other = frame_of(60 * 1024);
        assert!(
            matches!(second.decode(&mut other), Ok(None)),
            "not decoded while the budget is dry, though all of it is here"
        );
        assert_eq!(gate.need.load(Ordering::Relaxed), other.len());
        partial.unsplit(whole);
        assert!(matches!(first.decode(&mut partial), Ok(Some(_))));
        assert_eq!(b.in_use(), 0, "released once decoded");
        assert!(
            partial.capacity() <= KEEP_CAPACITY,
            "the big buffer is let go"
        );
        // The reader got the budget for it: the frame goes through.
        *gate.granted.lock().expect("lock") = b.try_reserve_read(other.len());
        assert!(matches!(second.decode(&mut other), Ok(Some(_))));
        assert_eq!(b.in_use(), 0);
    }

    #[test]
    fn small_frames_need_no_reservation() {
        let b = budget(4 * 1024 * 1024);
        let _all = b.try_reserve_read(4 * 1024 * 1024).expect("drain the pool");
        let (mut codec, _) = codec(FrameLimit::new(256 * 1024), b.clone());
        let mut small = frame_of(100);
        assert!(matches!(codec.decode(&mut small), Ok(Some(_))));
    }
}
