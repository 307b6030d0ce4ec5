//! Refusing a client connection over the effective connection cap in a way the client can act
//! on: after TLS, one `Error{UNAVAILABLE, "server at capacity; retry later"}` frame
//! (`request_id` 0, with a jittered `retry_after_ms`), or an HTTP 503 for a browser, then
//! `close_notify`, then the input drained for a moment so the close does not reset the error
//! away. At most [`REFUSAL_SLOTS`](crate::fd_limit::REFUSAL_SLOTS) refusals run at once (the
//! headroom counts them), each within a short deadline; over that, connections are closed
//! before TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use messenger_protocol::pb::{self, server_frame};
use messenger_protocol::{ALPN, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::proxy_protocol;
use crate::state::Shared;
use crate::tls::Tls;

/// The error's message, as documented in docs/PROTOCOL.md.
pub const REASON: &str = "server at capacity; retry later";
/// Longest a refusal may hold its descriptor, handshake included (and never longer than the
/// handshake timeout).
const LONGEST: Duration = Duration::from_secs(5);
/// Input read and discarded after the answer (a `Hello`, a request head), at most.
const DRAIN_BYTES: usize = 64 * 1024;

/// Answers one over-cap connection and closes it. `_slot` is its refusal slot.
pub async fn refuse(
    shared: Arc<Shared>,
    tls: Arc<Tls>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let deadline = Instant::now() + shared.config.timeouts.handshake().min(LONGEST);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep_until(deadline) => {
            debug!(%peer, "refusal at capacity ran out of time");
        }
        _ = answer(&shared, &tls, tcp, peer, deadline) => {}
    }
}

async fn answer(
    shared: &Shared,
    tls: &Tls,
    mut tcp: TcpStream,
    peer: SocketAddr,
    deadline: Instant,
) {
    if shared.config.proxy_protocol
        && proxy_protocol::read_header_by(&mut tcp, peer, deadline)
            .await
            .is_err()
    {
        return;
    }
    let _ = tcp.set_nodelay(true);
    let mut stream = match Box::pin(tls.acceptor.accept(tcp)).await {
        Ok(stream) => stream,
        Err(e) => {
            debug!(%peer, error = %e, "tls handshake failed while refusing at capacity");
            return;
        }
    };
    let retry_after_ms = {
        use rand::Rng;
        // Refused clients must not all come back in the same instant.
        rand::rng().random_range(1_000..5_000u32)
    };
    let reply = match stream.get_ref().1.alpn_protocol() {
        Some(ALPN) => error_frame(shared.config.limits.max_frame_bytes, retry_after_ms),
        Some(b"http/1.1") | None if shared.config.web.enabled => {
            Some(http_503(retry_after_ms.div_ceil(1_000)))
        }
        _ => None,
    };
    if let Some(reply) = reply
        && (stream.write_all(&reply).await.is_err() || stream.flush().await.is_err())
    {
        return;
    }
    // close_notify and FIN; then read what the client sent meanwhile, so closing a socket
    // with unread input does not reset the connection before the client read the answer.
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < DRAIN_BYTES {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// `Error{UNAVAILABLE, REASON}` as one length-prefixed frame, pushed with `request_id` 0.
fn error_frame(max_frame_bytes: usize, retry_after_ms: u32) -> Option<Vec<u8>> {
    let frame = pb::ServerFrame {
        request_id: 0,
        kind: Some(server_frame::Kind::Error(pb::Error {
            code: ErrorCode::Unavailable as i32,
            message: REASON.to_string(),
            retry_after_ms,
        })),
    };
    let mut out = BytesMut::new();
    messenger_protocol::codec::encode_frame(&frame, max_frame_bytes, &mut out).ok()?;
    Some(out.to_vec())
}

fn http_503(retry_after_secs: u32) -> Vec<u8> {
    let body = format!("{REASON}\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nretry-after: {retry_after_secs}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use messenger_protocol::codec::ClientCodec;
    use tokio_util::codec::Decoder;

    #[test]
    fn the_refusal_is_one_decodable_unavailable_error() {
        let bytes = error_frame(256 * 1024, 2_000).expect("encodes");
        let mut buf = BytesMut::from(&bytes[..]);
        let frame = ClientCodec::new(256 * 1024)
            .decode(&mut buf)
            .expect("decodes")
            .expect("one whole frame");
        assert!(buf.is_empty());
        assert_eq!(frame.request_id, 0);
        match frame.kind {
            Some(server_frame::Kind::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Unavailable as i32);
                assert_eq!(e.message, REASON);
                assert_eq!(e.retry_after_ms, 2_000);
            }
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn browsers_get_a_503_with_retry_after() {
        let text = String::from_utf8(http_503(3)).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        assert!(text.contains("retry-after: 3\r\n"), "{text}");
        assert!(text.ends_with(&format!("\r\n\r\n{REASON}\n")), "{text}");
    }
}
