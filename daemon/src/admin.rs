//! Admin HTTP on its own (by default loopback) address: `/healthz` (the process serves),
//! `/readyz` (the store answers, and Redis when clustered), `/metrics` (Prometheus text).
//! Never exposes user data. Every answer comes from memory (the store's health is probed in
//! the background, see `readiness`), so a check answers within a second even while the store
//! or Redis is down.

mod readiness;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::metrics;
use crate::state::Shared;
use readiness::StoreHealth;

/// A client that has not sent its request headers by then is dropped, so a stuck or slow
/// client cannot keep a connection (and a balancer's check slot) forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let (health, prober) = StoreHealth::spawn(shared.store.clone(), shutdown.clone());
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => {
                // The store is closed after this returns: no probe may still be using it.
                let _ = prober.await;
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(req, shared.clone(), health.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection");
            }
        });
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
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    Ok(resp)
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
