//! The only code that writes to a connection's socket. Frames reach it already encoded (so
//! each queue slot is a small `Bytes`, not a whole message: an idle connection's queue costs
//! little), and it coalesces every frame already waiting into one buffer, so a burst of
//! deliveries costs one TLS record series and one syscall instead of one per frame.
//!
//! What is queued is bounded in bytes by the memory budget (`memory`): a sender waits while
//! the connection's share is full. A socket that accepts no bytes for `stall` is given up on:
//! the connection closes and the device later resumes from its acknowledged cursor, so nothing
//! is lost. A connection that is kicked or shed (`Outbound::close_now`, the budget) drops its
//! queue at once, abandoning even a write stuck on a peer that stopped reading.
//!
//! It also owns how a connection ends once its last frame is written (`finish`): shut down the
//! write side (TLS close_notify, then a TCP half-close), then read and discard what the client
//! is still sending, for a bounded time and byte count, before the socket is dropped. Closing a
//! socket with unread input makes the kernel answer with RST, which discards whatever the
//! client had not yet received — the closing `Error` or `GoAway` included.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use messenger_protocol::codec::{LENGTH_PREFIX_BYTES, encode_frame};
use messenger_protocol::pb;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::memory::{Charge, ConnMemory};
use crate::metrics;

/// Stop coalescing once this much is buffered; the rest goes in the next write.
const COALESCE_BYTES: usize = 64 * 1024;
/// Buffers that grew past this during a burst are released instead of kept per connection.
const KEEP_CAPACITY: usize = 16 * 1024;
/// Bound on sending close_notify and the TCP FIN to a peer that may not be reading.
const SHUTDOWN_TIME: Duration = Duration::from_secs(2);
/// After the half-close, input is discarded until EOF, for at most this long...
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// ...or this many bytes: enough for what a client had in flight (a frame or two), while a
/// peer that keeps sending cannot hold the connection open.
const DRAIN_BYTES: u64 = 1024 * 1024;

/// The sending side of a connection's outbound queue; encodes on the caller's task.
#[derive(Clone)]
pub struct Outbound {
    tx: mpsc::Sender<Queued>,
    max_frame_bytes: usize,
    memory: Arc<ConnMemory>,
    last_words: LastWords,
}

/// A frame to send after the queue was discarded (a kicked or shed connection's `GoAway`).
type LastWords = Arc<Mutex<Option<Bytes>>>;

/// One encoded frame in the queue, with the bytes it holds charged to the memory budget
/// until it is written or dropped.
pub struct Queued {
    pub bytes: Bytes,
    charge: Charge,
}

#[derive(Debug)]
pub struct Closed;

impl Outbound {
    /// Queues one frame, waiting while the connection's share of the memory budget is full
    /// (back-pressure). A frame that cannot be encoded within the frame limit is dropped with
    /// a warning (callers keep responses within it; deliveries are bounded by the body
    /// limit). `Closed` when the connection is ending, or was shed because the process's
    /// budget stayed exhausted.
    pub async fn send(&self, frame: &pb::ServerFrame) -> Result<(), Closed> {
        let len = frame.encoded_len() + LENGTH_PREFIX_BYTES;
        if len > self.max_frame_bytes + LENGTH_PREFIX_BYTES {
            warn!(len, "dropping an unencodable outbound frame");
            return Ok(());
        }
        let charge = self.memory.charge(len).await.map_err(|_| Closed)?;
        let mut buf = BytesMut::with_capacity(len);
        if let Err(e) = encode_frame(frame, self.max_frame_bytes, &mut buf) {
            warn!(error = %e, "dropping an unencodable outbound frame");
            return Ok(());
        }
        self.tx
            .send(Queued {
                bytes: buf.freeze(),
                charge,
            })
            .await
            .map_err(|_| Closed)
    }

    /// The connection's account in the memory budget.
    pub fn memory(&self) -> &Arc<ConnMemory> {
        &self.memory
    }

    /// Ends the connection now: whatever is queued is dropped (its memory freed at once; the
    /// device gets it again from the store when it resumes) and `last` is the only frame still
    /// tried, unless the socket is stuck in the middle of a write.
    pub fn close_now(&self, last: Option<&pb::ServerFrame>) {
        if let Some(frame) = last {
            let mut buf = BytesMut::new();
            if encode_frame(frame, self.max_frame_bytes, &mut buf).is_ok() {
                *self.last_words.lock().unwrap_or_else(|p| p.into_inner()) = Some(buf.freeze());
            }
        }
        self.memory.discard();
    }
}

/// The writer's side of the queue.
pub struct OutboundRx {
    rx: mpsc::Receiver<Queued>,
    memory: Arc<ConnMemory>,
    last_words: LastWords,
}

/// What the writer gets next.
pub enum Next {
    Frame(Queued),
    /// The session ended and everything it queued was taken.
    Ended,
    /// The queue was discarded (`close_now`, or shed by the memory budget): drop everything.
    Discarded,
}

impl OutboundRx {
    pub async fn next(&mut self) -> Next {
        tokio::select! {
            biased;
            () = self.memory.discarded().cancelled() => Next::Discarded,
            frame = self.rx.recv() => frame.map_or(Next::Ended, Next::Frame),
        }
    }

    /// A frame already queued, without waiting (for coalescing).
    pub fn try_next(&mut self) -> Option<Queued> {
        if self.memory.discarded().is_cancelled() {
            return None;
        }
        self.rx.try_recv().ok()
    }

    /// Cancelled when the queue is discarded (to abandon a write stuck on a stalled peer).
    pub fn discard_signal(&self) -> CancellationToken {
        self.memory.discarded().clone()
    }

    /// A write completed.
    pub fn progressed(&self) {
        self.memory.progressed();
    }

    /// Drops everything queued (freeing its memory) and returns the frame still to try.
    pub fn discard(&mut self) -> Option<Bytes> {
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        self.last_words
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }
}

pub fn channel(
    capacity: usize,
    max_frame_bytes: usize,
    memory: Arc<ConnMemory>,
) -> (Outbound, OutboundRx) {
    let (tx, rx) = mpsc::channel(capacity);
    let last_words = LastWords::default();
    (
        Outbound {
            tx,
            max_frame_bytes,
            memory: Arc::clone(&memory),
            last_words: Arc::clone(&last_words),
        },
        OutboundRx {
            rx,
            memory,
            last_words,
        },
    )
}

/// Writes what the session queues until it ends, then `finish`es the connection with the
/// input the session hands back (`input`; `None` when it was dropped instead).
pub async fn run<W, R>(
    mut wr: W,
    mut rx: OutboundRx,
    stall: Duration,
    closing: CancellationToken,
    input: impl Future<Output = Option<R>>,
) where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::new();
    // Charges of the frames copied into `buf` (their own bytes are let go once copied, so a
    // frame is held once, not twice), released once `buf` is written.
    let mut charged: Vec<Charge> = Vec::new();
    let discarded = rx.discard_signal();
    loop {
        let first = match rx.next().await {
            Next::Frame(first) => first,
            Next::Ended => break,
            Next::Discarded => {
                drop(charged);
                drop(buf);
                let last = rx.discard();
                closing.cancel();
                if let Some(last) = last {
                    let sent = tokio::time::timeout(SHUTDOWN_TIME, async {
                        wr.write_all(&last).await?;
                        wr.flush().await
                    })
                    .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        return;
                    }
                }
                finish(&mut wr, input).await;
                return;
            }
        };
        let mut frames = 0u64;
        let mut next = Some(first);
        while let Some(Queued { bytes, charge }) = next.take() {
            buf.extend_from_slice(&bytes);
            drop(bytes);
            charged.push(charge);
            frames += 1;
            if buf.len() < COALESCE_BYTES {
                next = rx.try_next();
            }
        }
        let write = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        };
        let outcome = tokio::select! {
            biased;
            // A write stuck on a peer that stopped reading is abandoned at once when the
            // connection is discarded: its bytes are freed now, not after the stall timeout.
            () = discarded.cancelled() => {
                closing.cancel();
                return;
            }
            outcome = tokio::time::timeout(stall, write) => outcome,
        };
        if !settle(outcome, frames, stall, &closing) {
            return;
        }
        rx.progressed();
        charged.clear();
        buf.clear();
        if buf.capacity() > KEEP_CAPACITY {
            buf = BytesMut::new();
        }
    }
    // The session ended and everything queued was written.
    finish(&mut wr, input).await;
}

/// Ends a connection whose last frame has been flushed: half-closes it, then drains the input
/// (once the session hands it over) so that dropping the socket sends FIN, not RST. A peer
/// that stopped reading or failed is not finished this way: it gets no more bytes anyway.
pub async fn finish<W, R>(wr: &mut W, input: impl Future<Output = Option<R>>)
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    if tokio::time::timeout(SHUTDOWN_TIME, wr.shutdown())
        .await
        .is_err()
    {
        debug!("peer did not take the close in time");
        return;
    }
    let Some(rd) = input.await else { return };
    let mut limited = rd.take(DRAIN_BYTES);
    let mut discard = tokio::io::sink();
    let drain = tokio::io::copy(&mut limited, &mut discard);
    match tokio::time::timeout(DRAIN_TIME, drain).await {
        Ok(Ok(bytes)) => debug!(bytes, "input drained after close"),
        Ok(Err(e)) => debug!(error = %e, "input ended with an error after close"),
        Err(_) => debug!("peer still sending after close; dropping"),
    }
}

/// Accounts for one write of `frames` frames bounded by `stall`; false when the connection
/// must close (the write failed, or the peer stopped reading), with `closing` cancelled.
pub fn settle<E: std::fmt::Display>(
    outcome: Result<Result<(), E>, tokio::time::error::Elapsed>,
    frames: u64,
    stall: Duration,
    closing: &CancellationToken,
) -> bool {
    match outcome {
        Ok(Ok(())) => {
            metrics::frames_out(frames);
            true
        }
        Ok(Err(e)) => {
            debug!(error = %e, "write failed");
            closing.cancel();
            false
        }
        Err(_) => {
            warn!(
                stall_secs = stall.as_secs(),
                "peer stopped reading; closing"
            );
            metrics::stall_disconnect();
            closing.cancel();
            false
        }
    }
}
