//! Admin HTTP on its own (by default loopback) address: `/healthz` (the process serves),
//! `/readyz` (the store answers, and Redis when clustered), `/metrics` (Prometheus text).
//! Never exposes user data. Every answer comes from memory (the store's health is probed in
//! the background, see `readiness`), so a check answers within a second even while the store
//! or Redis is down.
//!
//! No authentication, so it must stay off public interfaces (loopback by default; deploy/
//! keeps it on the private network). Its descriptors are bounded so no client of it can
//! starve the client port: at most `admin.max_connections` at once (more are answered 503
//! and closed at once), each closed after `admin.idle_timeout_secs` without a request head
//! and when a request's answer is not produced or not read within
//! `admin.request_timeout_secs`. `fd_limit` counts the cap in the client port's headroom.

mod readiness;
mod write_deadline;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics;
use crate::server::accept_errors::AcceptErrors;
use crate::state::Shared;
use readiness::StoreHealth;
use write_deadline::WriteDeadline;

/// What a client over the cap gets, if its socket takes it at once.
const AT_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 37\r\n\r\nadmin port at capacity; retry later\r\n";

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let (health, prober) = StoreHealth::spawn(shared.store.clone(), shutdown.clone());
    let slots = Arc::new(Semaphore::new(shared.config.admin.max_connections));
    let mut errors = AcceptErrors::new("admin");
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => {
                // The store is closed after this returns: no probe may still be using it.
                let _ = prober.await;
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    errors.succeeded();
                    stream
                }
                Err(e) => {
                    errors.failed(&e).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::connection_refused("admin_max_connections");
            // Never waits: a client that does not take the answer at once just sees the close.
            let _ = stream.try_write(AT_CAPACITY);
            continue;
        };
        let shared = shared.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(stream, shared, health).await;
        });
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, health: StoreHealth) {
    let admin = shared.config.admin.clone();
    let request_timeout = admin.request_timeout();
    let service = service_fn(move |req| {
        let answer = respond(req, shared.clone(), health.clone());
        async move {
            match tokio::time::timeout(request_timeout, answer).await {
                Ok(answered) => answered,
                Err(_) => Ok(plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no answer in time\n".to_string(),
                )),
            }
        }
    });
    let io = TokioIo::new(WriteDeadline::new(stream, request_timeout));
    // hyper starts the header timer whenever it waits for a request head, so it is both the
    // slow-headers bound and the keep-alive idle bound.
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(admin.idle_timeout())
        .serve_connection(io, service)
        .await
    {
        debug!(error = %e, "admin connection");
    }
}

async fn respond(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    health: StoreHealth,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/readyz") => readiness(&shared, &health).await,
        (&Method::GET, "/metrics") => {
            metrics::online_users(shared.hub.online_users());
            metrics::buffered_bytes(shared.memory.in_use(), shared.memory.total());
            if let Some(stats) = crate::allocator::stats() {
                metrics::memory(stats.allocated, stats.resident);
            }
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                metrics::render(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    Ok(plain(status, content_type, body))
}

fn plain(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Ready when the store answers and, in a cluster, Redis answered the last heartbeat and the
/// node is not rejoining after being cut off (it takes no sign-ins meanwhile). A node
/// cut off from Redis would still serve (messages are safe in the store) but its clients would
/// get other nodes' messages only by polling, so the balancer should prefer the others. If
/// Redis is down for every node, every node reports it: the balancer config (deploy/) keeps
/// routing to them then rather than refusing everyone. Nothing here waits on the network: the
/// store's state is the background probe's last result, Redis's the last heartbeat's.
async fn readiness(shared: &Shared, health: &StoreHealth) -> (StatusCode, &'static str, String) {
    let store = health.status().await;
    let mut body = match &store {
        Ok(_) => "store: ok\n".to_string(),
        Err(e) => format!("store: {e}\n"),
    };
    let mut ready = store.is_ok();
    if let Some(cluster) = &shared.cluster {
        if cluster.redis_reachable() {
            body.push_str("redis: ok\n");
        } else {
            body.push_str("redis: unreachable\n");
            ready = false;
        }
        if cluster.is_rejoining() {
            body.push_str("cluster: rejoining after being cut off\n");
            ready = false;
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, "text/plain", body)
}
