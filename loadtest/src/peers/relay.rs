//! The no-op TLS relay: the transport ceiling. It does what any TLS message server must do at
//! the least (terminate TLS, parse frames, route them to another connection, acknowledge
//! them) and nothing else: no authentication, no storage, no sequencing.
//!
//! Wire format, every integer big-endian u32:
//! - after the TLS handshake (ALPN `messenger/1`) the client sends its user index; the relay
//!   answers with one ack frame once the user is registered (routable);
//! - client → relay: `[length][destination index][payload]`, `length` = 4 + payload bytes;
//! - relay → destination: `[length][source index][payload]`;
//! - relay → sender, right after queueing the forward: `[4][0xFFFF_FFFF]` (accepted), or
//!   `[4][0xFFFF_FFFE]` when the destination is not connected (refused).
//!
//! Each connection has one writer task that drains its bounded queue and coalesces whatever is
//! queued into one write, like the daemon's writer; a full queue back-pressures the reader that
//! forwards into it.
//!
//! The relay's server side runs on its own tokio runtime in its own threads, so its CPU is
//! measured per thread (`/proc/<tid>/stat`) and reported separately from the harness's; its
//! memory is part of the harness process and is not reported.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{Connected, Inbox, Peer, PeerParams, PeerResult, PeerSender, PeerUsage, Pki};

pub const ALPN: &[u8] = b"messenger/1";
/// Source index of an acceptance frame.
pub const ACK: u32 = 0xFFFF_FFFF;
/// Source index of a refusal frame (destination not connected).
pub const NACK: u32 = 0xFFFF_FFFE;
/// Largest `length` field accepted (destination index + payload); longer frames close the
/// connection. With at most `OUTBOUND_FRAMES` queued, a connection's queue holds at most 4 MiB.
pub const MAX_FRAME: usize = 64 * 1024 + 4;

/// Frames queued per connection before forwarding into it waits (as in the daemon).
const OUTBOUND_FRAMES: usize = 64;
/// Stop coalescing once this much is buffered; the rest goes in the next write.
const COALESCE_BYTES: usize = 64 * 1024;
/// Buffers that grew past this during a burst are released instead of kept per connection.
const KEEP_CAPACITY: usize = 16 * 1024;

const ACK_FRAME: [u8; 8] = [0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF];
const NACK_FRAME: [u8; 8] = [0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFE];

/// A running relay. Dropping it stops it (without waiting for its thread).
pub struct Relay {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the relay's certificate (for `localhost` and `127.0.0.1`).
    #[allow(dead_code)] // for clients outside this module (tests)
    pub ca_pem: Vec<u8>,
    pki: Arc<Pki>,
    shared: Arc<RelayShared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct RelayShared {
    drop_every: Option<u64>,
    routes: RwLock<HashMap<u32, Outbox>>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
    /// Thread ids of the relay's runtime, for its CPU.
    tids: Mutex<Vec<u32>>,
}

type Outbox = mpsc::Sender<Bytes>;

impl Relay {
    /// Starts a relay on a free 127.0.0.1 port with a fresh certificate. `drop_every: Some(n)`
    /// silently drops every n-th frame to forward but still acknowledges it (for proving that
    /// the checker notices loss).
    pub fn start(drop_every: Option<u64>) -> anyhow::Result<Relay> {
        if drop_every == Some(0) {
            bail!("drop_every must be at least 1");
        }
        let pki = Arc::new(Pki::generate()?);
        let mut server = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![pki.cert_der.clone()], pki.key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(server));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the relay")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(RelayShared {
            drop_every,
            routes: RwLock::new(HashMap::new()),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            tids: Mutex::new(Vec::new()),
        });
        let (shutdown, stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || {
                let tid_shared = thread_shared.clone();
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("relay-worker")
                    .on_thread_start(move || record_tid(&tid_shared))
                    .enable_all()
                    .build();
                let rt = match rt {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                record_tid(&thread_shared);
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    tokio::select! {
                        _ = accept_loop(listener, acceptor, thread_shared) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime here cancels every connection task.
            })
            .context("spawning the relay thread")?;
        ready_rx
            .recv()
            .context("the relay thread ended before it was ready")??;
        Ok(Relay {
            addr,
            ca_pem: pki.ca_pem.clone().into_bytes(),
            pki,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Frames to a connected destination so far, forwarded or (with `drop_every`) dropped.
    #[allow(dead_code)] // used by tests/peers.rs
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// Frames dropped on purpose (`drop_every`) so far.
    #[allow(dead_code)] // used by tests/peers.rs
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// CPU seconds the relay's threads used so far.
    pub fn cpu_secs(&self) -> Option<f64> {
        let tids = self
            .shared
            .tids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if tids.is_empty() {
            return None;
        }
        Some(tids.iter().filter_map(|&t| thread_cpu_secs(t)).sum())
    }

    /// A client configuration trusting this relay (aws-lc-rs, ALPN `messenger/1`).
    pub fn client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        self.pki.client_config(Some(ALPN))
    }

    /// Stops the relay and waits for its thread to end.
    pub fn stop(mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// CPU seconds of one thread of this process, from /proc/self/task/<tid>/stat (`/proc/<tid>`
/// would show the whole process).
fn thread_cpu_secs(tid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // Clock ticks of 1/100 s, as in `stats::sample`.
    Some((utime + stime) / 100.0)
}

fn record_tid(shared: &RelayShared) {
    // /proc/thread-self -> "<pid>/task/<tid>"
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok());
    if let Some(tid) = tid {
        shared
            .tids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tid);
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<RelayShared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "relay accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, acceptor, shared).await {
                tracing::debug!(error = %e, "relay connection ended");
            }
        });
    }
}

async fn serve(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    shared: Arc<RelayShared>,
) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let tls = acceptor.accept(stream).await?;
    let (mut rd, wr) = tokio::io::split(tls);
    let me = rd.read_u32().await?;
    let (outbox, rx) = mpsc::channel::<Bytes>(OUTBOUND_FRAMES);
    let writer = tokio::spawn(write_loop(wr, rx));
    shared
        .routes
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(me, outbox.clone());
    let result = forward_loop(me, &mut rd, &outbox, &shared).await;
    {
        let mut routes = shared.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.get(&me).is_some_and(|o| o.same_channel(&outbox)) {
            routes.remove(&me);
        }
    }
    drop(outbox);
    let _ = writer.await;
    result
}

async fn forward_loop<R: AsyncRead + Unpin>(
    me: u32,
    rd: &mut R,
    outbox: &Outbox,
    shared: &RelayShared,
) -> anyhow::Result<()> {
    outbox.send(Bytes::from_static(&ACK_FRAME)).await?;
    let mut cache: HashMap<u32, Outbox> = HashMap::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        while buf.len() >= 8 {
            let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            if !(4..=MAX_FRAME).contains(&len) {
                bail!("bad frame length {len}");
            }
            if buf.len() < 4 + len {
                buf.reserve(4 + len - buf.len());
                break;
            }
            let mut frame = buf.split_to(4 + len);
            let dest = u32::from_be_bytes(frame[4..8].try_into().expect("4 bytes"));
            frame[4..8].copy_from_slice(&me.to_be_bytes());
            let ok = forward(dest, frame.freeze(), &mut cache, shared).await;
            let reply = if ok { &ACK_FRAME } else { &NACK_FRAME };
            outbox.send(Bytes::from_static(reply)).await?;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        if rd.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}

/// Queues `frame` for `dest` (or, every `drop_every`-th time, pretends to); false when `dest`
/// is not connected.
async fn forward(
    dest: u32,
    frame: Bytes,
    cache: &mut HashMap<u32, Outbox>,
    shared: &RelayShared,
) -> bool {
    let mut frame = frame;
    let mut counted = false;
    for _ in 0..2 {
        let out = match cache.get(&dest) {
            Some(o) => o.clone(),
            None => {
                let found = shared
                    .routes
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&dest)
                    .cloned();
                match found {
                    Some(o) => {
                        cache.insert(dest, o.clone());
                        o
                    }
                    None => return false,
                }
            }
        };
        if !counted {
            counted = true;
            let n = shared.forwarded.fetch_add(1, Ordering::Relaxed) + 1;
            if shared
                .drop_every
                .is_some_and(|every| n.is_multiple_of(every))
            {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        match out.send(frame).await {
            Ok(()) => return true,
            // The destination went away (or reconnected): look it up again once.
            Err(mpsc::error::SendError(f)) => {
                cache.remove(&dest);
                frame = f;
            }
        }
    }
    false
}

async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Bytes>) {
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        buf.extend_from_slice(&first);
        while buf.len() < COALESCE_BYTES {
            match rx.try_recv() {
                Ok(f) => buf.extend_from_slice(&f),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        buf.clear();
        if buf.capacity() > KEEP_CAPACITY {
            buf = BytesMut::new();
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), wr.shutdown()).await;
}

/// Runs the workload against a fresh relay (no drops) and stops it.
pub async fn run(params: &PeerParams) -> anyhow::Result<PeerResult> {
    run_with(params, None).await
}

/// Runs the workload against a fresh relay that drops every n-th frame when `drop_every` is
/// set (the checker must then report loss).
pub async fn run_with(params: &PeerParams, drop_every: Option<u64>) -> anyhow::Result<PeerResult> {
    if params.body_size.max(crate::payload::HEADER_BYTES) + 4 > MAX_FRAME {
        bail!(
            "the relay carries bodies of at most {} bytes",
            MAX_FRAME - 4
        );
    }
    let relay = Relay::start(drop_every)?;
    let peer = RelayPeer {
        connector: TlsConnector::from(Arc::new(relay.client_config()?)),
        relay,
    };
    let name = match drop_every {
        None => "no-op TLS relay".to_string(),
        Some(n) => format!("no-op TLS relay (dropping every {n}th frame)"),
    };
    let result = super::drive(&name, params, &peer).await;
    let relay = peer.relay;
    tokio::task::spawn_blocking(move || relay.stop()).await?;
    result
}

struct RelayPeer {
    relay: Relay,
    connector: TlsConnector,
}

impl PeerUsage for RelayPeer {
    fn cpu_secs(&self) -> Option<f64> {
        self.relay.cpu_secs()
    }
    fn rss_bytes(&self) -> Option<u64> {
        None
    }
    fn in_process(&self) -> bool {
        true
    }
}

impl Peer for RelayPeer {
    type Sender = RelaySender;

    async fn connect(&self, me: u32, inbox: Arc<Inbox>) -> anyhow::Result<Connected<RelaySender>> {
        let tcp = TcpStream::connect(self.relay.addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let tls = self.connector.connect(name, tcp).await?;
        let (mut rd, mut wr) = tokio::io::split(tls);
        wr.write_all(&me.to_be_bytes()).await?;
        wr.flush().await?;
        // The relay acknowledges the registration; only then can others reach this user.
        let mut buf = BytesMut::with_capacity(8 * 1024);
        match next_frame(&mut rd, &mut buf).await? {
            Some((ACK, _)) => {}
            Some((src, _)) => bail!("expected the registration ack, got a frame from {src}"),
            None => bail!("the relay closed the connection"),
        }
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let task = tokio::spawn(read_loop(rd, buf, acks_tx, inbox));
        Ok(Connected {
            sender: RelaySender {
                wr,
                acks,
                frame: BytesMut::new(),
            },
            tasks: vec![task],
        })
    }
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

struct RelaySender {
    wr: WriteHalf<ClientStream>,
    acks: mpsc::UnboundedReceiver<bool>,
    frame: BytesMut,
}

impl PeerSender for RelaySender {
    async fn send(&mut self, to: u32, _seq: u64, body: Bytes) -> anyhow::Result<()> {
        self.frame.clear();
        self.frame.put_u32((4 + body.len()) as u32);
        self.frame.put_u32(to);
        self.frame.put_slice(&body);
        self.wr.write_all(&self.frame).await?;
        self.wr.flush().await?;
        // One send in flight per user, and the relay answers every frame in order.
        match self.acks.recv().await {
            Some(true) => Ok(()),
            Some(false) => bail!("refused: destination not connected"),
            None => bail!("connection closed"),
        }
    }
}

async fn read_loop(
    mut rd: ReadHalf<ClientStream>,
    mut buf: BytesMut,
    acks: mpsc::UnboundedSender<bool>,
    inbox: Arc<Inbox>,
) {
    loop {
        match next_frame(&mut rd, &mut buf).await {
            Ok(Some((ACK, _))) => {
                let _ = acks.send(true);
            }
            Ok(Some((NACK, _))) => {
                let _ = acks.send(false);
            }
            Ok(Some((_src, payload))) => inbox.arrived(&payload),
            Ok(None) => return,
            Err(e) => {
                inbox.shared.error(format!("receive: {e:#}"));
                return;
            }
        }
    }
}

/// Reads the next `[length][index][payload]` frame; `None` at a clean end of stream.
async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> anyhow::Result<Option<(u32, Bytes)>> {
    loop {
        if buf.len() >= 8 {
            let len = u32::from_be_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
            if !(4..=MAX_FRAME).contains(&len) {
                bail!("bad frame length {len}");
            }
            if buf.len() >= 4 + len {
                let mut frame = buf.split_to(4 + len);
                frame.advance(4);
                let index = frame.get_u32();
                return Ok(Some((index, frame.freeze())));
            }
            buf.reserve(4 + len - buf.len());
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(8 * 1024);
        }
        if rd.read_buf(buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            bail!("connection closed mid-frame");
        }
    }
}
