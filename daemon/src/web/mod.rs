//! Browsers on the client port (DESIGN §3). A TLS connection that negotiated ALPN `http/1.1`
//! (or none) is HTTP: `GET /start` upgrades to a WebSocket carrying the native frames, one
//! per binary message, into the same session as native clients; every other `GET` serves the
//! embedded web client. Responses carry a strict Content-Security-Policy and HSTS.

pub mod assets;
mod socket;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::{Empty, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::inbound::FrameLimit;
use crate::session;
use crate::state::Shared;

/// The page may load only its own files and talk only to its own origin (the WebSocket);
/// nothing inline, no plugins, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self' data:; font-src 'self'; \
    manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

type Body = BoxBody<Bytes, Infallible>;

/// Serves one HTTP connection; if it upgrades to a WebSocket, runs the session over it.
pub async fn serve<S>(shared: Arc<Shared>, stream: S, peer: SocketAddr, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("http", %peer, user = tracing::field::Empty);
    async move {
        let upgrade: Arc<Mutex<Option<OnUpgrade>>> = Arc::default();
        let service = {
            let shared = Arc::clone(&shared);
            let upgrade = Arc::clone(&upgrade);
            service_fn(move |req| {
                let response = route(req, &shared, &upgrade);
                async move { Ok::<_, Infallible>(response) }
            })
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(shared.config.timeouts.handshake())
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(connection);
        let served = tokio::select! {
            r = connection.as_mut() => r,
            () = shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
                return;
            }
        };
        if let Err(e) = served {
            debug!(error = %e, "http connection ended");
            return;
        }
        let pending = upgrade.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(pending) = pending else { return };
        let upgraded = match pending.await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let limits = &shared.config.limits;
        const WRITE_BUFFER: usize = 16 * 1024;
        let config = WebSocketConfig::default()
            .max_message_size(Some(limits.max_frame_bytes))
            .max_frame_size(Some(limits.max_frame_bytes))
            // Small buffers: an idle browser connection should cost about what a native one
            // does; they grow with the traffic.
            .read_buffer_size(4096)
            .write_buffer_size(WRITE_BUFFER)
            // tungstenite panics unless the cap exceeds the buffer, which `max_frame_bytes * 4`
            // alone does not for the smallest valid limit (4096; found by fuzz/session).
            .max_write_buffer_size((limits.max_frame_bytes * 4).max(WRITE_BUFFER + 1));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        let transport = socket::transport(
            ws,
            limits.max_frame_bytes,
            FrameLimit::new(shared.config.memory.pre_auth_max_frame_bytes),
            shared.config.timeouts.write_stall(),
            shared.memory.connection(),
        );
        // The WebSocket session gets the same Hello budget a native one has after TLS.
        let deadline = Instant::now() + shared.config.timeouts.handshake();
        session::drive(transport, shared, peer, shutdown, deadline).await;
    }
    .instrument(span)
    .await;
}

fn route(
    req: Request<Incoming>,
    shared: &Shared,
    upgrade: &Mutex<Option<OnUpgrade>>,
) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    if req.uri().path() == "/start" {
        return start_websocket(req, shared, upgrade);
    }
    let Some(asset) = assets::get(req.uri().path()) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag));
    let (status, body) = if fresh {
        (StatusCode::NOT_MODIFIED, empty())
    } else if head {
        (StatusCode::OK, empty())
    } else {
        (StatusCode::OK, full(Bytes::from_static(asset.body)))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    secure(h);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    if let Ok(etag) = HeaderValue::from_str(&asset.etag) {
        h.insert(header::ETAG, etag);
    }
    // Revalidate every time: the files change with the daemon, and the ETag makes an
    // unchanged file cost a 304.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if !fresh {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(asset.body.len()));
    }
    resp
}

/// Validates an RFC 6455 upgrade and the page's origin; answers 101 and leaves the upgrade
/// for the connection task.
fn start_websocket(
    mut req: Request<Incoming>,
    shared: &Shared,
    upgrade: &Mutex<Option<OnUpgrade>>,
) -> Response<Body> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        let mut resp = text(
            StatusCode::UPGRADE_REQUIRED,
            "/start is a WebSocket endpoint: send an RFC 6455 upgrade\n",
        );
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return resp;
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut resp = text(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 only\n");
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return resp;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
    };
    if !origin_allowed(req.headers(), &shared.config.web.allowed_origins) {
        debug!(origin = ?req.headers().get(header::ORIGIN), "websocket from a foreign origin refused");
        crate::metrics::request_error("origin_refused");
        return text(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    let accept = derive_accept_key(key.as_bytes());
    *upgrade.lock().unwrap_or_else(|p| p.into_inner()) = Some(hyper::upgrade::on(&mut req));
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// A request without `Origin` is not from a browser page and is allowed; a page may connect
/// from the daemon's own origin (the `Host` it used) or from a configured one.
fn origin_allowed(headers: &hyper::HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return headers.get(header::ORIGIN).is_none();
    };
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|host| origin.eq_ignore_ascii_case(&format!("https://{host}")));
    own || allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

/// Browsers that reached the daemon over HTTPS once keep to HTTPS for a year. Without
/// `includeSubDomains`: the daemon may share its host name with sites it does not speak for.
pub const STRICT_TRANSPORT_SECURITY: &str = "max-age=31536000";

fn secure(h: &mut hyper::HeaderMap) {
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(STRICT_TRANSPORT_SECURITY),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    secure(resp.headers_mut());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed()
}

fn empty() -> Body {
    Empty::new().boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                header::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn same_origin_configured_origins_and_non_browsers_may_connect() {
        let allowed = vec!["https://chat.example.com".to_owned()];
        assert!(origin_allowed(
            &headers(&[("host", "127.0.0.1:7443")]),
            &allowed
        ));
        assert!(origin_allowed(
            &headers(&[
                ("host", "127.0.0.1:7443"),
                ("origin", "https://127.0.0.1:7443")
            ]),
            &allowed
        ));
        assert!(origin_allowed(
            &headers(&[
                ("host", "node1:7443"),
                ("origin", "https://chat.example.com")
            ]),
            &allowed
        ));
        assert!(!origin_allowed(
            &headers(&[
                ("host", "127.0.0.1:7443"),
                ("origin", "https://evil.example")
            ]),
            &allowed
        ));
        assert!(!origin_allowed(
            &headers(&[
                ("host", "127.0.0.1:7443"),
                ("origin", "http://127.0.0.1:7443")
            ]),
            &allowed
        ));
    }
}
