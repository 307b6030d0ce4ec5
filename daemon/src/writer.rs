//! The only code that writes to a connection's socket. Frames reach it already encoded (so
//! each queue slot is a small `Bytes`, not a whole message: an idle connection's queue costs
//! little), and it coalesces every frame already waiting into one buffer, so a burst of
//! deliveries costs one TLS record series and one syscall instead of one per frame.
//!
//! A socket that accepts no bytes for `stall` is given up on: the connection closes and the
//! device later resumes from its acknowledged cursor, so nothing is lost.
//!
//! It also owns how a connection ends once its last frame is written (`finish`): shut down the
//! write side (TLS close_notify, then a TCP half-close), then read and discard what the client
//! is still sending, for a bounded time and byte count, before the socket is dropped. Closing a
//! socket with unread input makes the kernel answer with RST, which discards whatever the
//! client had not yet received — the closing `Error` or `GoAway` included.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use messenger_protocol::codec::encode_frame;
use messenger_protocol::pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
    tx: mpsc::Sender<Bytes>,
    max_frame_bytes: usize,
}

#[derive(Debug)]
pub struct Closed;

impl Outbound {
    /// Queues one frame, waiting while the queue is full (back-pressure). A frame that cannot
    /// be encoded within the frame limit is dropped with a warning (callers keep responses
    /// within it; deliveries are bounded by the body limit).
    pub async fn send(&self, frame: &pb::ServerFrame) -> Result<(), Closed> {
        let mut buf = BytesMut::new();
        if let Err(e) = encode_frame(frame, self.max_frame_bytes, &mut buf) {
            warn!(error = %e, "dropping an unencodable outbound frame");
            return Ok(());
        }
        self.tx.send(buf.freeze()).await.map_err(|_| Closed)
    }
}

pub fn channel(capacity: usize, max_frame_bytes: usize) -> (Outbound, mpsc::Receiver<Bytes>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        Outbound {
            tx,
            max_frame_bytes,
        },
        rx,
    )
}

/// Writes what the session queues until it ends, then `finish`es the connection with the
/// input the session hands back (`input`; `None` when it was dropped instead).
pub async fn run<W, R>(
    mut wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    stall: Duration,
    closing: CancellationToken,
    input: impl Future<Output = Option<R>>,
) where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut frames = 0u64;
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            buf.extend_from_slice(&frame);
            frames += 1;
            if buf.len() < COALESCE_BYTES {
                next = rx.try_recv().ok();
            }
        }
        let write = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        };
        if !settle(
            tokio::time::timeout(stall, write).await,
            frames,
            stall,
            &closing,
        ) {
            return;
        }
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
