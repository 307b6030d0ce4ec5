//! The listener: accepts TCP, reads the balancer's PROXY v2 header when configured, enforces
//! connection limits, runs the TLS handshake with ALPN `messenger/1` under the handshake timeout, and hands each connection to a session task.
//! The total cap is the effective one of [`ConnectionBudget`] (below the open-file limit), so
//! connections over it are refused by us ([`at_capacity`]) rather than by `accept()` failing.
//! Owns shutdown: stop accepting, tell every session to send `GoAway`, wait for the drain,
//! close the store.

pub(crate) mod accept_errors;
mod at_capacity;

pub use at_capacity::REASON as AT_CAPACITY;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admin;
use crate::config::Config;
use crate::fd_limit::{self, ConnectionBudget};
use crate::limits::ConnectionsPerIp;
use crate::metrics;
use crate::proxy_protocol;
use crate::session;
use crate::state::Shared;
use crate::store::{self, Store};
use crate::tls::Tls;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    /// The client port actually bound (useful with port 0).
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// SHA-256 fingerprint of the served certificate (colon-separated hex).
    pub fingerprint: String,
    /// The development CA file, when the development certificate is in use.
    pub dev_ca: Option<PathBuf>,
    pub cert_path: PathBuf,
    /// How many client connections this server takes at once, and why.
    pub connections: ConnectionBudget,
    pub shared: Arc<Shared>,
    tls: Arc<Tls>,
    shutdown: CancellationToken,
    accept_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    sessions: TaskTracker,
}

impl RunningServer {
    /// Opens the store, loads TLS, binds both ports and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        metrics::install();
        let store = store::open(&config).await?;
        Self::start_with_store(config, store).await
    }

    /// As [`start`](Self::start), on a store the caller opened.
    pub async fn start_with_store(
        config: Config,
        store: Arc<dyn Store>,
    ) -> Result<Self, StartError> {
        metrics::install();
        let connections = connection_budget(&config)?;
        let tls = Arc::new(Tls::load(&config)?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.admin_listen,
                source,
            })?;
        let addr = local_addr(&listener, config.listen)?;
        let admin_addr = local_addr(&admin_listener, config.admin_listen)?;
        let mut shared = Shared::new(config, store).map_err(StartError::Config)?;
        if let Some(url) = shared.config.cluster.redis_url.clone() {
            // The database names the cluster: nodes sharing it share a Redis keyspace.
            let cluster_id = shared.store.cluster_id().await?;
            let cluster = crate::cluster::Cluster::start(
                &shared.config.cluster,
                &url,
                &cluster_id,
                shared.hub.clone(),
            )
            .await?;
            // Every node draws an account's (and an address's) budgets from one bucket in Redis.
            shared.share_budgets_through(Arc::new(cluster.budgets()));
            shared.cluster = Some(cluster);
        }
        let shared = Arc::new(shared);
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let accept_task = tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            tls.clone(),
            connections.cap,
            shutdown.clone(),
            sessions.clone(),
        ));
        tokio::spawn(shared.memory.clone().shed_slow_readers(shutdown.clone()));
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            shared.clone(),
            shutdown.clone(),
        ));
        info!(%addr, %admin_addr, "listening");
        Ok(Self {
            addr,
            admin_addr,
            fingerprint: tls.fingerprint(),
            dev_ca: tls.source.dev_ca.clone(),
            cert_path: tls.source.cert.clone(),
            connections,
            shared,
            tls,
            shutdown,
            accept_task,
            admin_task,
            sessions,
        })
    }

    /// Resolves, with the reason, when this server can no longer serve and its process should
    /// exit: its cluster node id was taken over by another process. Never resolves otherwise.
    pub async fn failed(&self) -> String {
        match &self.shared.cluster {
            Some(cluster) => cluster.claim_lost().await,
            None => std::future::pending().await,
        }
    }

    /// Re-reads the TLS certificate and key (SIGHUP); returns the fingerprint now served.
    pub fn reload_tls(&self) -> Result<String, crate::tls::TlsError> {
        self.tls.reload()
    }

    /// Stops accepting, sends `GoAway` to every client, waits for them to drain (bounded by
    /// the shutdown drain timeout), then commits and closes the store.
    pub async fn shutdown(self) {
        info!("shutting down");
        self.shutdown.cancel();
        let _ = self.accept_task.await;
        self.sessions.close();
        let drain = self.shared.config.timeouts.shutdown_drain() + Duration::from_secs(1);
        if tokio::time::timeout(drain, self.sessions.wait())
            .await
            .is_err()
        {
            warn!("some connections did not drain in time");
        }
        let _ = self.admin_task.await;
        if let Some(cluster) = &self.shared.cluster {
            cluster.shutdown().await;
        }
        if let Err(e) = self.shared.store.close().await {
            warn!(error = %e, "closing the store");
        }
        info!("stopped");
    }
}

/// Raises the open-file limit and sizes the client-connection cap below it; says so once.
fn connection_budget(config: &Config) -> Result<ConnectionBudget, StartError> {
    let budget = ConnectionBudget::for_config(config);
    let limit = budget
        .open_files
        .map_or_else(|| "unknown".to_string(), |n| n.to_string());
    if budget.cap == 0 {
        return Err(StartError::Config(format!(
            "the open-file limit ({limit}) leaves no descriptors for client connections after {} of headroom (store, Redis, admin.max_connections, listeners); raise it (LimitNOFILE= in the systemd unit, ulimit -n, docker --ulimit nofile=)",
            budget.headroom
        )));
    }
    info!(
        open_file_limit = %limit,
        headroom = budget.headroom,
        configured = budget.configured,
        cap = budget.cap,
        "client connection cap"
    );
    if budget.clamped() {
        warn!(
            "limits.max_connections = {} is above what the open-file limit {limit} allows; serving at most {} client connections ({} descriptors kept for the store, Redis, the admin port and listeners). Raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -n, docker --ulimit nofile=) or set limits.max_connections = 0 (auto)",
            budget.configured, budget.cap, budget.headroom
        );
    }
    metrics::connection_cap(budget.cap);
    Ok(budget)
}

fn local_addr(listener: &TcpListener, wanted: SocketAddr) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        addr: wanted,
        source,
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Arc<Tls>,
    cap: usize,
    shutdown: CancellationToken,
    sessions: TaskTracker,
) {
    let connections = Arc::new(Semaphore::new(cap));
    let refusals = Arc::new(Semaphore::new(fd_limit::REFUSAL_SLOTS));
    let per_ip = ConnectionsPerIp::new(shared.config.limits.max_connections_per_ip);
    let mut errors = accept_errors::AcceptErrors::new("client");
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    errors.succeeded();
                    a
                }
                Err(e) => {
                    errors.failed(&e).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::connection_refused("max_connections");
            // Told why when a refusal slot is free; otherwise closed before TLS (dropping it).
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                debug!(%peer, "refusing: at the connection cap");
                sessions.spawn(at_capacity::refuse(
                    shared.clone(),
                    tls.clone(),
                    tcp,
                    peer,
                    shutdown.clone(),
                    slot,
                ));
            }
            continue;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        let per_ip = per_ip.clone();
        let shutdown = shutdown.clone();
        sessions.spawn(async move {
            let _permit = permit;
            serve_connection(shared, tls, tcp, peer, per_ip, shutdown).await;
        });
    }
}

/// One accepted socket: learns who is really on the other end (the PROXY header, when the
/// daemon sits behind a balancer), applies the per-IP limit to that address, then runs TLS and
/// the session.
async fn serve_connection(
    shared: Arc<Shared>,
    tls: Arc<Tls>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    per_ip: ConnectionsPerIp,
    shutdown: CancellationToken,
) {
    // The PROXY header and the TLS handshake share one budget, so a peer that trickles the
    // header cannot hold a connection slot longer than one that trickles its ClientHello.
    let deadline = Instant::now() + shared.config.timeouts.handshake();
    let client = if shared.config.proxy_protocol {
        match proxy_protocol::read_header_by(&mut tcp, peer, deadline).await {
            Ok(origin) => origin.addr(),
            Err(e) => {
                debug!(%peer, reason = %e, "closing: no valid PROXY v2 header");
                metrics::proxy_header_rejected(e.reason());
                return;
            }
        }
    } else {
        peer
    };
    let Some(_ip_permit) = per_ip.acquire(client.ip()) else {
        debug!(%client, "closing: too many connections from this address");
        metrics::connection_refused("max_connections_per_ip");
        return;
    };
    metrics::connection_opened();
    handle_connection(shared, tls, tcp, client, shutdown, deadline).await;
    metrics::connection_closed();
}

async fn handle_connection(
    shared: Arc<Shared>,
    tls: Arc<Tls>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    deadline: Instant,
) {
    let _ = tcp.set_nodelay(true);
    // Boxed: the handshake's state (a whole rustls connection) would otherwise stay part of
    // every connection task's size for the connection's whole life.
    let accept = Box::pin(tls.acceptor.accept(tcp));
    let stream = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "tls handshake failed");
            metrics::handshake_failed();
            return;
        }
        Err(_) => {
            debug!(%peer, "tls handshake timed out");
            metrics::handshake_failed();
            return;
        }
    };
    match stream.get_ref().1.alpn_protocol() {
        Some(messenger_protocol::ALPN) => {
            session::run(shared, stream, peer, shutdown, deadline).await;
        }
        // No ALPN is what plain HTTP clients send; browsers ask for http/1.1.
        Some(b"http/1.1") | None if shared.config.web.enabled => {
            crate::web::serve(shared, stream, peer, shutdown).await;
        }
        _ => {
            debug!(%peer, "client did not negotiate ALPN messenger/1");
            metrics::handshake_failed();
        }
    }
}
