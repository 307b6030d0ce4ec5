//! A WebSocket as a session transport: each binary message is one `ClientFrame` in or one
//! `ServerFrame` out (no length prefix), and the session above is the very one native
//! connections run (same state machine, hub, limits and timeouts).
//!
//! Close codes say why the server ended the connection (RFC 6455 §7.4.1): the session's last
//! word (an `Error` or `GoAway` frame not answering any request) picks it, or what the reader
//! refused (a text message 1003, an oversized one 1009, a broken frame 1002, bad UTF-8 1007).
//! After its close frame the connection ends as native ones do (`writer::finish`).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use messenger_protocol::codec::LENGTH_PREFIX_BYTES;
use messenger_protocol::pb::{self, server_frame::Kind as Resp};
use messenger_protocol::{CodecError, ErrorCode};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use crate::inbound::FrameLimit;
use crate::memory::ConnMemory;
use crate::session::{OUTBOUND_FRAMES, Transport};
use crate::writer::{self, Next, OutboundRx};

/// The close the reader decided on, if any (it wins over the session's last frame).
type CloseCell = Arc<Mutex<Option<(CloseCode, String)>>>;

/// Builds the session transport over an upgraded WebSocket.
pub fn transport<S>(
    ws: WebSocketStream<S>,
    max_frame_bytes: usize,
    frame_limit: FrameLimit,
    stall: Duration,
    memory: Arc<ConnMemory>,
) -> Transport<Frames<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, stream) = ws.split();
    let close = CloseCell::default();
    let (out, rx) = writer::channel(OUTBOUND_FRAMES, max_frame_bytes, memory);
    let closing = CancellationToken::new();
    let (input, input_back) = oneshot::channel();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        stall,
        closing.clone(),
        Arc::clone(&close),
        input_back,
    ));
    Transport {
        frames: Frames {
            inner: stream,
            close,
            limit: frame_limit.clone(),
        },
        out,
        writer,
        closing,
        input,
        frame_limit,
    }
}

/// Decoded client frames from WebSocket messages.
pub struct Frames<S> {
    inner: SplitStream<WebSocketStream<S>>,
    close: CloseCell,
    /// Checked once a message is whole (tungstenite buffers it up to the configured limit).
    limit: FrameLimit,
}

impl<S> Frames<S> {
    fn refuse(&self, code: CloseCode, reason: &str) {
        *self.close.lock().unwrap_or_else(|p| p.into_inner()) = Some((code, reason.to_owned()));
    }
}

impl<S> Stream for Frames<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<pb::ClientFrame, CodecError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let message = match self.inner.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(m)) => m,
            };
            return Poll::Ready(Some(match message {
                Ok(Message::Binary(bytes)) => match self.limit.check(bytes.len()) {
                    Ok(()) => pb::ClientFrame::decode(bytes).map_err(CodecError::Decode),
                    Err(e) => {
                        self.refuse(CloseCode::Size, "message exceeds the frame limit");
                        Err(e)
                    }
                },
                // Pings are answered by the WebSocket layer itself.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(_)) => return Poll::Ready(None),
                Ok(Message::Text(_)) => {
                    let reason =
                        "text messages are not accepted: send each frame as a binary message";
                    self.refuse(CloseCode::Unsupported, reason);
                    Err(CodecError::Io(std::io::Error::other(reason)))
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                    self.refuse(CloseCode::Size, "message exceeds the frame limit");
                    Err(CodecError::TooLarge {
                        len: size,
                        max: max_size,
                    })
                }
                // RFC 6455 §7.4.1: a frame that breaks the framing rules (unmasked, reserved
                // bits or opcode, fragmented control frame, stray continuation) is 1002;
                // non-UTF-8 text where UTF-8 is required (a text message, a close reason)
                // is 1007. A peer that just hung up gets no close code: it cannot read one.
                Err(WsError::Protocol(e))
                    if !matches!(e, ProtocolError::ResetWithoutClosingHandshake) =>
                {
                    let reason = format!("WebSocket protocol error: {e}");
                    self.refuse(CloseCode::Protocol, &reason);
                    Err(CodecError::Io(std::io::Error::other(reason)))
                }
                Err(WsError::Utf8(_)) => {
                    let reason = "invalid UTF-8 where text is required";
                    self.refuse(CloseCode::Invalid, reason);
                    Err(CodecError::Io(std::io::Error::other(reason)))
                }
                Err(e) => Err(CodecError::Io(std::io::Error::other(e))),
            }));
        }
    }
}

async fn write_loop<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    mut rx: OutboundRx,
    stall: Duration,
    closing: CancellationToken,
    close: CloseCell,
    input: oneshot::Receiver<Frames<S>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut last: Option<Bytes> = None;
    let discarded = rx.discard_signal();
    loop {
        let first = match rx.next().await {
            Next::Frame(first) => first,
            Next::Ended => break,
            Next::Discarded => {
                // Kicked or shed: the queue is dropped now; the last words (a GoAway) pick
                // the close code.
                last = rx
                    .discard()
                    .map(|frame| frame.slice(LENGTH_PREFIX_BYTES.min(frame.len())..));
                closing.cancel();
                break;
            }
        };
        let mut frames = 0u64;
        // Everything already queued goes out in one flush (one TLS write).
        let write = async {
            let mut next = Some(first);
            while let Some(frame) = next.take() {
                let body = frame
                    .bytes
                    .slice(LENGTH_PREFIX_BYTES.min(frame.bytes.len())..);
                last = Some(body.clone());
                sink.feed(Message::Binary(body)).await?;
                frames += 1;
                next = rx.try_next();
            }
            sink.flush().await
        };
        let outcome = tokio::select! {
            biased;
            () = discarded.cancelled() => {
                closing.cancel();
                return;
            }
            outcome = tokio::time::timeout(stall, write) => outcome,
        };
        if !writer::settle(outcome, frames, stall, &closing) {
            return;
        }
        rx.progressed();
    }
    let decided = close.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (code, reason) = decided.unwrap_or_else(|| close_for(last.as_deref()));
    let frame = CloseFrame {
        code,
        reason: truncate(&reason, 123).into(),
    };
    let sent = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = sink.send(Message::Close(Some(frame))).await;
        sink.close().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    // The close frame is out; the socket beneath ends like a native one (the client's own
    // close frame, if it sends one, is drained with the rest of its input).
    let Ok(frames) = input.await else { return };
    let Ok(mut ws) = frames.inner.reunite(sink) else {
        return;
    };
    let (rd, mut wr) = tokio::io::split(ws.get_mut());
    writer::finish(&mut wr, async { Some(rd) }).await;
}

/// The close code for a session that ended after sending `last`.
fn close_for(last: Option<&[u8]>) -> (CloseCode, String) {
    let Some(frame) = last.and_then(|b| pb::ServerFrame::decode(b).ok()) else {
        return (CloseCode::Normal, String::new());
    };
    // Only unsolicited frames end a session; an error answering a request does not.
    if frame.request_id != 0 {
        return (CloseCode::Normal, String::new());
    }
    match frame.kind {
        Some(Resp::GoAway(g)) => {
            let code = match ErrorCode::try_from(g.code) {
                Ok(ErrorCode::Unauthenticated | ErrorCode::PermissionDenied) => CloseCode::Policy,
                _ => CloseCode::Away,
            };
            (code, g.reason)
        }
        Some(Resp::Error(e)) => {
            let code = match ErrorCode::try_from(e.code) {
                Ok(ErrorCode::TooLarge) => CloseCode::Size,
                Ok(ErrorCode::InvalidArgument) => CloseCode::Protocol,
                Ok(ErrorCode::Unauthenticated | ErrorCode::PermissionDenied) => CloseCode::Policy,
                Ok(ErrorCode::RateLimited) => CloseCode::Policy,
                Ok(ErrorCode::Unavailable) => CloseCode::Again,
                Ok(ErrorCode::Internal) => CloseCode::Error,
                _ => CloseCode::Normal,
            };
            (code, e.message)
        }
        _ => (CloseCode::Normal, String::new()),
    }
}

/// At most `max` bytes of `s`, cut on a character boundary (close reasons are limited to 123).
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: pb::ServerFrame) -> Vec<u8> {
        frame.encode_to_vec()
    }

    #[test]
    fn the_sessions_last_word_picks_the_close_code() {
        let go_away = encoded(pb::ServerFrame {
            request_id: 0,
            kind: Some(Resp::GoAway(pb::GoAway {
                reason: "server shutting down".into(),
                reconnect_after_ms: 1000,
                code: ErrorCode::Unavailable as i32,
            })),
        });
        assert_eq!(close_for(Some(&go_away)).0, CloseCode::Away);
        let kicked = encoded(pb::ServerFrame {
            request_id: 0,
            kind: Some(Resp::Error(pb::Error {
                code: ErrorCode::Unauthenticated as i32,
                message: "session revoked".into(),
                retry_after_ms: 0,
            })),
        });
        assert_eq!(
            close_for(Some(&kicked)),
            (CloseCode::Policy, "session revoked".to_owned())
        );
        let answer = encoded(pb::ServerFrame {
            request_id: 7,
            kind: Some(Resp::Error(pb::Error {
                code: ErrorCode::NotFound as i32,
                message: "no such user".into(),
                retry_after_ms: 0,
            })),
        });
        assert_eq!(close_for(Some(&answer)).0, CloseCode::Normal);
        assert_eq!(close_for(None).0, CloseCode::Normal);
    }

    #[test]
    fn close_reasons_are_cut_on_character_boundaries() {
        let long = "é".repeat(100);
        let cut = truncate(&long, 123);
        assert!(cut.len() <= 123);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
