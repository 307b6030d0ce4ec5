//! One TLS connection to the daemon: handshake, request/response matching, pushes.
//!
//! A [`Connection`] is a cheap handle (an `Arc` inside) over three tasks:
//!
//! - the **writer** owns the write half (`FramedWrite`) and is fed `ClientFrame`s through an
//!   mpsc queue; it coalesces whatever is queued into one flush;
//! - the **reader** owns the read half (`FramedRead`); a frame with a non-zero `request_id`
//!   completes the waiting request, a frame with `request_id` 0 (Delivery, GoAway, an Error
//!   pushed before close) goes to the bounded [`Events`] channel. When the application does
//!   not consume events the reader waits, which stops reading the socket: TCP back-pressure
//!   toward the server, on purpose;
//! - the optional **pinger** sends `Ping` every `ping_interval` (the server closes idle
//!   connections) and closes a connection that answers nothing at all for `request_timeout`.
//!
//! When the connection ends — EOF, i/o or codec error, GoAway then close, [`Connection::close`],
//! or every handle dropped — every waiting request fails with [`ClientError::Closed`], and
//! the events channel yields one [`Event::Closed`] and then ends.
//!
//! It never retries or reconnects by itself (that is [`super::Client`]'s job), never panics on
//! anything the server sends, and never trusts a server it could not verify (see [`super::tls`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use prost::Message;
use rustls_pki_types::ServerName;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::{Framed, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use super::{ClientError, Trust, tls};
use crate::codec::{ClientCodec, CodecError, LENGTH_PREFIX_BYTES};
use crate::pb::{self, client_frame, server_frame};

type Tls = TlsStream<TcpStream>;

/// Frames the writer may hold before `send` waits.
const OUTBOUND_QUEUE: usize = 256;
/// Frames the writer feeds before it flushes even if more are queued.
const MAX_BATCH: usize = 64;
/// How long a closing connection waits to send its close_notify.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// How to reach and verify the server, and the client-side limits of one connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `"host:port"`; IPv6 as `"[::1]:7000"`.
    pub addr: String,
    /// Name to send as SNI and to verify the certificate against; default: the host part of
    /// `addr` (an IP address is verified as an IP address).
    pub server_name: Option<String>,
    pub trust: Trust,
    /// Sent in `Hello`, for the server's logs.
    pub client_name: String,
    /// TCP connect + TLS handshake + Hello/HelloOk.
    pub connect_timeout: Duration,
    /// How long a request waits for its response.
    pub request_timeout: Duration,
    /// How often to ping; `Duration::ZERO` disables pings.
    pub ping_interval: Duration,
    /// Largest frame this client reads or writes (the server's own limit also applies).
    pub max_frame_bytes: usize,
    /// Capacity of the events channel (pushes waiting for the application).
    pub event_buffer: usize,
    /// Source address to connect from (port chosen by the OS). A load generator spreads its
    /// connections over 127.0.0.0/8 this way to pass 64k ports per destination.
    pub local_addr: Option<std::net::IpAddr>,
}

impl ConnectOptions {
    /// Options with the defaults: 10 s connect, 30 s request timeout, ping every 20 s,
    /// [`crate::DEFAULT_MAX_FRAME_BYTES`], 1024 buffered events.
    pub fn new(addr: impl Into<String>, trust: Trust) -> Self {
        Self {
            addr: addr.into(),
            server_name: None,
            trust,
            client_name: format!("messenger-protocol/{}", env!("CARGO_PKG_VERSION")),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            max_frame_bytes: crate::DEFAULT_MAX_FRAME_BYTES,
            event_buffer: 1024,
            local_addr: None,
        }
    }

    /// The name the certificate is verified against.
    pub fn tls_server_name(&self) -> Result<ServerName<'static>, ClientError> {
        let name = match &self.server_name {
            Some(name) => name.as_str(),
            None => host_of(&self.addr)?,
        };
        ServerName::try_from(name)
            .map(|n| n.to_owned())
            .map_err(|e| ClientError::Config(format!("invalid server name {name:?}: {e}")))
    }
}

/// The host part of `"host:port"` / `"[v6]:port"`.
fn host_of(addr: &str) -> Result<&str, ClientError> {
    let bad = || ClientError::Config(format!("address {addr:?} is not host:port"));
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or_else(bad)?;
        (host, tail.strip_prefix(':').ok_or_else(bad)?)
    } else {
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.contains(':') {
            return Err(ClientError::Config(format!(
                "address {addr:?}: write IPv6 addresses in brackets, e.g. [::1]:7000"
            )));
        }
        (host, port)
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(host)
}

async fn connect_tcp(addr: &str, local: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = local else {
        return TcpStream::connect(addr).await;
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing");
    for remote in tokio::net::lookup_host(addr).await? {
        let socket = if remote.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        match socket.connect(remote).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Who a message or a history request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Recipient {
    /// A direct conversation with this user.
    User(u64),
    /// A group.
    Group(u64),
}

impl Recipient {
    fn send_to(self) -> pb::send_message::To {
        match self {
            Recipient::User(id) => pb::send_message::To::UserId(id),
            Recipient::Group(id) => pb::send_message::To::GroupId(id),
        }
    }

    fn conversation(self) -> pb::get_history::Conversation {
        match self {
            Recipient::User(id) => pb::get_history::Conversation::UserId(id),
            Recipient::Group(id) => pb::get_history::Conversation::GroupId(id),
        }
    }
}

/// A fresh `client_msg_id`: 128 random bits as 32 lowercase hex digits.
pub fn new_client_msg_id() -> String {
    let v: u128 = rand::random();
    format!("{v:032x}")
}

/// A push from the server, or the end of the connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One inbox entry.
    Delivery(pb::Delivery),
    /// The server is about to close this connection; reconnect after `reconnect_after_ms`.
    GoAway(pb::GoAway),
    /// The connection ended; always the last event.
    Closed { reason: String },
}

/// The receiving end of a connection's pushes. Also a [`Stream`] of [`Event`]s.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` after [`Event::Closed`] was returned.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is already waiting.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

enum Outbound {
    Frame(pb::ClientFrame),
    Close(oneshot::Sender<()>),
}

/// What the reader, the writer, the pinger and the handles share.
struct Shared {
    state: Mutex<State>,
    cancel: CancellationToken,
    /// Frames read so far (for the pinger's liveness check).
    frames_received: AtomicU64,
    /// True while the reader waits for the application to take an event.
    reader_stalled: AtomicBool,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<pb::ServerFrame>>,
    closed: Option<String>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; recover rather than propagate anyway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the connection: the first reason wins, waiting requests fail, tasks stop.
    fn shut(&self, reason: String) {
        let pending = {
            let mut st = self.lock();
            if st.closed.is_none() {
                debug!(%reason, "connection closing");
                st.closed = Some(reason);
            }
            std::mem::take(&mut st.pending)
        };
        // Dropping the senders wakes every waiter with "closed".
        drop(pending);
        self.cancel.cancel();
    }

    fn closed_reason(&self) -> Option<String> {
        self.lock().closed.clone()
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(
            self.closed_reason()
                .unwrap_or_else(|| "connection closed".to_string()),
        )
    }

    fn register(&self, id: u64) -> Result<oneshot::Receiver<pb::ServerFrame>, ClientError> {
        let mut st = self.lock();
        if let Some(reason) = &st.closed {
            return Err(ClientError::Closed(reason.clone()));
        }
        if st.pending.contains_key(&id) {
            return Err(ClientError::Config(format!(
                "request id {id} is already waiting for a response"
            )));
        }
        let (tx, rx) = oneshot::channel();
        st.pending.insert(id, tx);
        Ok(rx)
    }
}

/// Removes a request's entry when the request finishes, times out or is cancelled.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

struct Inner {
    shared: Arc<Shared>,
    out: mpsc::Sender<Outbound>,
    next_id: AtomicU64,
    limits: pb::Limits,
    server: String,
    /// The node id from `HelloOk` (empty without a cluster).
    node: String,
    request_timeout: Duration,
    /// The smaller of our limit and the server's.
    max_out_frame: usize,
}

/// One authenticated-or-not TLS connection to the daemon. Clone it to use it from several
/// tasks; the connection closes when [`close`](Connection::close) is called, when the server
/// or the network ends it, or when every clone is dropped.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.inner.server)
            .field("node", &self.inner.node)
            .field("closed", &self.inner.shared.closed_reason())
            .finish_non_exhaustive()
    }
}

fn codec_error(e: CodecError) -> ClientError {
    match e {
        CodecError::Io(io) => ClientError::from_tls_io(io),
        other => ClientError::Codec(other),
    }
}

/// Short name of a response kind, for error messages.
fn kind_name(kind: &server_frame::Kind) -> &'static str {
    use server_frame::Kind as K;
    match kind {
        K::HelloOk(_) => "HelloOk",
        K::Error(_) => "Error",
        K::Registered(_) => "Registered",
        K::Authenticated(_) => "Authenticated",
        K::Ok(_) => "Ok",
        K::User(_) => "User",
        K::Sent(_) => "Sent",
        K::Delivery(_) => "Delivery",
        K::Group(_) => "Group",
        K::GroupList(_) => "GroupList",
        K::HistoryPage(_) => "HistoryPage",
        K::Pong(_) => "Pong",
        K::GoAway(_) => "GoAway",
        K::ConversationList(_) => "ConversationList",
    }
}

fn unexpected(expected: &str, got: server_frame::Kind) -> ClientError {
    ClientError::Protocol(format!(
        "expected {expected} in response, got {}",
        kind_name(&got)
    ))
}

fn missing(what: &str) -> ClientError {
    ClientError::Protocol(format!("response without {what}"))
}

/// Hello → HelloOk on a fresh TLS stream.
async fn handshake(
    framed: &mut Framed<Tls, ClientCodec>,
    client_name: &str,
) -> Result<pb::HelloOk, ClientError> {
    framed
        .send(pb::ClientFrame {
            request_id: 1,
            kind: Some(client_frame::Kind::Hello(pb::Hello {
                protocol_version: crate::PROTOCOL_VERSION,
                client: client_name.to_string(),
            })),
        })
        .await
        .map_err(codec_error)?;
    let frame = match framed.next().await {
        Some(frame) => frame.map_err(codec_error)?,
        None => {
            return Err(ClientError::Closed(
                "server closed the connection during the handshake".into(),
            ));
        }
    };
    match frame.kind {
        Some(server_frame::Kind::HelloOk(ok)) if frame.request_id == 1 => {
            if ok.protocol_version == crate::PROTOCOL_VERSION {
                Ok(ok)
            } else {
                Err(ClientError::Protocol(format!(
                    "server speaks protocol version {}, this client {}",
                    ok.protocol_version,
                    crate::PROTOCOL_VERSION
                )))
            }
        }
        Some(server_frame::Kind::HelloOk(_)) => Err(ClientError::Protocol(format!(
            "HelloOk answered request {} instead of the Hello (1)",
            frame.request_id
        ))),
        Some(server_frame::Kind::Error(e)) => Err(ClientError::Wire(e.into())),
        Some(server_frame::Kind::GoAway(g)) => Err(ClientError::Closed(format!(
            "server going away during the handshake: {}",
            g.reason
        ))),
        Some(other) => Err(unexpected("HelloOk", other)),
        None => Err(missing("a recognised kind (expected HelloOk)")),
    }
}

impl Connection {
    /// Connects, verifies the server per `opts.trust`, and exchanges Hello/HelloOk.
    /// The connection is not authenticated yet.
    pub async fn connect(opts: &ConnectOptions) -> Result<(Connection, Events), ClientError> {
        Self::establish(opts, None).await
    }

    /// As [`connect`](Self::connect), over a TCP stream the caller already opened (for
    /// example after writing a PROXY protocol header in a test that stands in for a balancer).
    /// `opts.addr` still names the server for certificate verification.
    pub async fn connect_stream(
        opts: &ConnectOptions,
        tcp: TcpStream,
    ) -> Result<(Connection, Events), ClientError> {
        Self::establish(opts, Some(tcp)).await
    }

    async fn establish(
        opts: &ConnectOptions,
        tcp: Option<TcpStream>,
    ) -> Result<(Connection, Events), ClientError> {
        if opts.event_buffer == 0 {
            return Err(ClientError::Config(
                "event_buffer must be at least 1".into(),
            ));
        }
        if opts.max_frame_bytes < LENGTH_PREFIX_BYTES || opts.max_frame_bytes > u32::MAX as usize {
            return Err(ClientError::Config(format!(
                "max_frame_bytes {} is out of range",
                opts.max_frame_bytes
            )));
        }
        let config = tls::client_config(&opts.trust)?;
        let server_name = opts.tls_server_name()?;

        let establish = async {
            let tcp = match tcp {
                Some(tcp) => tcp,
                None => connect_tcp(&opts.addr, opts.local_addr).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config)
                .connect(server_name, tcp)
                .await
                .map_err(ClientError::from_tls_io)?;
            match tls.get_ref().1.alpn_protocol() {
                Some(p) if p != crate::ALPN => {
                    return Err(ClientError::Tls(format!(
                        "server chose ALPN {:?}",
                        String::from_utf8_lossy(p)
                    )));
                }
                Some(_) => {}
                None => debug!("server negotiated no ALPN protocol"),
            }
            let mut framed = Framed::new(tls, ClientCodec::new(opts.max_frame_bytes));
            let hello = handshake(&mut framed, &opts.client_name).await?;
            Ok::<_, ClientError>((framed, hello))
        };
        let (framed, hello) = tokio::time::timeout(opts.connect_timeout, establish)
            .await
            .map_err(|_| ClientError::Timeout)??;

        let limits = hello.limits.unwrap_or_default();
        let mut max_out_frame = opts.max_frame_bytes;
        if limits.max_frame_bytes > 0 {
            max_out_frame = max_out_frame.min(limits.max_frame_bytes as usize);
        }

        let parts = framed.into_parts();
        let (read_half, write_half) = tokio::io::split(parts.io);
        let mut reader = FramedRead::new(read_half, parts.codec.clone());
        // Whatever arrived right behind HelloOk is already buffered: keep it. (The codec keeps
        // no partial-frame state between calls, so a fresh copy of it reads on seamlessly.)
        *reader.read_buffer_mut() = parts.read_buf;
        let writer = FramedWrite::new(write_half, parts.codec);

        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cancel: CancellationToken::new(),
            frames_received: AtomicU64::new(0),
            reader_stalled: AtomicBool::new(false),
        });
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_QUEUE);
        let (ev_tx, ev_rx) = mpsc::channel(opts.event_buffer);

        tokio::spawn(write_loop(writer, out_rx, shared.clone()));
        tokio::spawn(read_loop(reader, shared.clone(), ev_tx));

        let inner = Arc::new(Inner {
            shared,
            out: out_tx,
            // 1 was the Hello.
            next_id: AtomicU64::new(2),
            limits,
            server: hello.server,
            node: hello.node,
            request_timeout: opts.request_timeout,
            max_out_frame,
        });
        if !opts.ping_interval.is_zero() {
            tokio::spawn(ping_loop(
                Arc::downgrade(&inner),
                inner.shared.clone(),
                opts.ping_interval,
                opts.request_timeout,
            ));
        }
        debug!(addr = %opts.addr, server = %inner.server, node = %inner.node, "connected");
        Ok((Connection { inner }, Events { rx: ev_rx }))
    }

    /// The limits the server announced in `HelloOk`.
    pub fn limits(&self) -> &pb::Limits {
        &self.inner.limits
    }

    /// The server software name and version from `HelloOk`.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The id of the cluster node serving this connection, from `HelloOk`; empty when the
    /// server is a single daemon without a cluster. Diagnostics only: it tells which node a
    /// client was on when something went wrong.
    pub fn server_node(&self) -> &str {
        &self.inner.node
    }

    /// True once the connection has ended (for whatever reason).
    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed_reason().is_some()
    }

    /// Why the connection ended, once it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.shared.closed_reason()
    }

    /// A fresh request id (ids are never reused on one connection).
    pub fn next_request_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn check_size(&self, frame: &pb::ClientFrame) -> Result<(), ClientError> {
        let len = frame.encoded_len();
        if len > self.inner.max_out_frame {
            return Err(ClientError::Codec(CodecError::TooLarge {
                len,
                max: self.inner.max_out_frame,
            }));
        }
        Ok(())
    }

    /// Sends one request and waits for its response. An `Error` response is
    /// `Err(ClientError::Wire)`; no response within `request_timeout` is `Err(Timeout)`.
    pub async fn request(
        &self,
        kind: client_frame::Kind,
    ) -> Result<server_frame::Kind, ClientError> {
        let id = self.next_request_id();
        let frame = self
            .request_raw(pb::ClientFrame {
                request_id: id,
                kind: Some(kind),
            })
            .await?;
        match frame.kind {
            Some(server_frame::Kind::Error(e)) => Err(ClientError::Wire(e.into())),
            Some(kind) => Ok(kind),
            None => Err(missing("a recognised kind")),
        }
    }

    /// Sends `frame` as is and returns the server's frame answering its `request_id`
    /// (which must be non-zero and not in use), `Error` frames included. For tests of the
    /// protocol itself; applications use [`request`](Self::request).
    pub async fn request_raw(
        &self,
        frame: pb::ClientFrame,
    ) -> Result<pb::ServerFrame, ClientError> {
        let id = frame.request_id;
        if id == 0 {
            return Err(ClientError::Config(
                "request_id 0 is reserved for frames without a response".into(),
            ));
        }
        self.check_size(&frame)?;
        let shared = &*self.inner.shared;
        let rx = shared.register(id)?;
        let _guard = PendingGuard { shared, id };
        let exchange = async {
            self.inner
                .out
                .send(Outbound::Frame(frame))
                .await
                .map_err(|_| shared.closed_error())?;
            rx.await.map_err(|_| shared.closed_error())
        };
        tokio::time::timeout(self.inner.request_timeout, exchange)
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    /// Queues `frame` for sending as is, without waiting for any response (a response, if
    /// the server sends one, is dropped). For tests; returns once the frame is queued.
    pub async fn send_frame(&self, frame: pb::ClientFrame) -> Result<(), ClientError> {
        self.check_size(&frame)?;
        let shared = &*self.inner.shared;
        if let Some(reason) = shared.closed_reason() {
            return Err(ClientError::Closed(reason));
        }
        tokio::time::timeout(
            self.inner.request_timeout,
            self.inner.out.send(Outbound::Frame(frame)),
        )
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(|_| shared.closed_error())
    }

    /// Closes gracefully: frames queued before are written, then TLS close_notify and a TCP
    /// shutdown. Waiting requests fail with `Closed`; the events end with `Event::Closed`.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        let graceful = async {
            if self.inner.out.send(Outbound::Close(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        let _ = tokio::time::timeout(self.inner.request_timeout + CLOSE_GRACE, graceful).await;
        self.inner.shared.shut("closed by client".into());
    }

    // ----- typed helpers ------------------------------------------------------------------

    /// Creates an account. Does not log in.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        display_name: &str,
    ) -> Result<pb::User, ClientError> {
        let kind = client_frame::Kind::Register(pb::Register {
            username: username.into(),
            password: password.into(),
            display_name: display_name.into(),
        });
        match self.request(kind).await? {
            server_frame::Kind::Registered(r) => r.user.ok_or_else(|| missing("Registered.user")),
            other => Err(unexpected("Registered", other)),
        }
    }

    /// Logs in without a login cookie; the server then replays the inbox after this
    /// device's cursor. Prefer [`login_with_cookie`](Self::login_with_cookie) (or
    /// [`Client::login`](super::Client::login), which keeps cookies): without one, the
    /// attempt shares the account's failed-login budget with everyone else.
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device_name: &str,
    ) -> Result<pb::Authenticated, ClientError> {
        self.login_with_cookie(username, password, device_name, &[])
            .await
    }

    /// Logs in presenting `login_cookie` (the `Authenticated.login_cookie` of this device's
    /// last successful login of `username`; empty for none). Keep the cookie the answer
    /// carries for the next login.
    pub async fn login_with_cookie(
        &self,
        username: &str,
        password: &str,
        device_name: &str,
        login_cookie: &[u8],
    ) -> Result<pb::Authenticated, ClientError> {
        let kind = client_frame::Kind::Login(pb::Login {
            username: username.into(),
            password: password.into(),
            device_name: device_name.into(),
            login_cookie: Bytes::copy_from_slice(login_cookie),
        });
        match self.request(kind).await? {
            server_frame::Kind::Authenticated(a) => Ok(a),
            other => Err(unexpected("Authenticated", other)),
        }
    }

    /// Resumes a session with its token; the server then replays the inbox after the
    /// device's cursor.
    pub async fn resume(&self, token: &[u8]) -> Result<pb::Authenticated, ClientError> {
        let kind = client_frame::Kind::Resume(pb::Resume {
            session_token: Bytes::copy_from_slice(token),
        });
        match self.request(kind).await? {
            server_frame::Kind::Authenticated(a) => Ok(a),
            other => Err(unexpected("Authenticated", other)),
        }
    }

    async fn request_ok(&self, kind: client_frame::Kind) -> Result<(), ClientError> {
        match self.request(kind).await? {
            server_frame::Kind::Ok(_) => Ok(()),
            other => Err(unexpected("Ok", other)),
        }
    }

    /// Changes the display name (and nothing else).
    pub async fn update_profile(&self, display_name: &str) -> Result<(), ClientError> {
        self.request_ok(client_frame::Kind::UpdateProfile(pb::UpdateProfile {
            display_name: display_name.into(),
            group_adds: pb::GroupAddPolicy::Unspecified as i32,
        }))
        .await
    }

    /// Sets who may add this account to groups (and nothing else). The current value comes
    /// with `Authenticated.settings` at each sign-in.
    pub async fn set_group_add_policy(
        &self,
        policy: pb::GroupAddPolicy,
    ) -> Result<(), ClientError> {
        self.request_ok(client_frame::Kind::UpdateProfile(pb::UpdateProfile {
            display_name: String::new(),
            group_adds: policy as i32,
        }))
        .await
    }

    /// Changes the password; the server revokes the account's other sessions.
    pub async fn change_password(&self, current: &str, new: &str) -> Result<(), ClientError> {
        self.request_ok(client_frame::Kind::ChangePassword(pb::ChangePassword {
            current_password: current.into(),
            new_password: new.into(),
        }))
        .await
    }

    /// Ends this device's session on the server.
    pub async fn logout(&self) -> Result<(), ClientError> {
        self.request_ok(client_frame::Kind::Logout(pb::Logout {}))
            .await
    }

    pub async fn delete_account(&self, password: &str) -> Result<(), ClientError> {
        self.request_ok(client_frame::Kind::DeleteAccount(pb::DeleteAccount {
            password: password.into(),
        }))
        .await
    }

    async fn lookup(&self, by: pb::lookup_user::By) -> Result<pb::User, ClientError> {
        let kind = client_frame::Kind::LookupUser(pb::LookupUser { by: Some(by) });
        match self.request(kind).await? {
            server_frame::Kind::User(u) => Ok(u),
            other => Err(unexpected("User", other)),
        }
    }

    pub async fn lookup_user_by_name(&self, username: &str) -> Result<pb::User, ClientError> {
        self.lookup(pb::lookup_user::By::Username(username.into()))
            .await
    }

    pub async fn lookup_user_by_id(&self, user_id: u64) -> Result<pb::User, ClientError> {
        self.lookup(pb::lookup_user::By::UserId(user_id)).await
    }

    /// Sends a message. Retrying with the same `client_msg_id` is safe: the server answers
    /// the first result (with `duplicate` set) and delivers nothing twice.
    pub async fn send_message(
        &self,
        to: Recipient,
        client_msg_id: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<pb::Sent, ClientError> {
        let kind = client_frame::Kind::Send(pb::SendMessage {
            to: Some(to.send_to()),
            client_msg_id: client_msg_id.into(),
            body,
            content_type: content_type.into(),
        });
        match self.request(kind).await? {
            server_frame::Kind::Sent(s) => Ok(s),
            other => Err(unexpected("Sent", other)),
        }
    }

    /// Sends a `text/plain` message with a fresh `client_msg_id`.
    pub async fn send_text(&self, to: Recipient, text: &str) -> Result<pb::Sent, ClientError> {
        self.send_message(
            to,
            &new_client_msg_id(),
            Bytes::copy_from_slice(text.as_bytes()),
            "text/plain",
        )
        .await
    }

    /// Acknowledges every inbox entry with seq <= `up_to_seq` (cumulative). Has no response;
    /// returns once the frame is queued.
    pub async fn ack(&self, up_to_seq: u64) -> Result<(), ClientError> {
        self.send_frame(pb::ClientFrame {
            request_id: 0,
            kind: Some(client_frame::Kind::Ack(pb::Ack { up_to_seq })),
        })
        .await
    }

    async fn request_group(&self, kind: client_frame::Kind) -> Result<pb::Group, ClientError> {
        match self.request(kind).await? {
            server_frame::Kind::Group(g) => Ok(g),
            other => Err(unexpected("Group", other)),
        }
    }

    /// Creates a group with the caller as admin and `member_ids` as the other members.
    pub async fn create_group(
        &self,
        name: &str,
        member_ids: &[u64],
    ) -> Result<pb::Group, ClientError> {
        self.request_group(client_frame::Kind::CreateGroup(pb::CreateGroup {
            name: name.into(),
            member_ids: member_ids.to_vec(),
        }))
        .await
    }

    pub async fn add_members(
        &self,
        group_id: u64,
        user_ids: &[u64],
    ) -> Result<pb::Group, ClientError> {
        self.request_group(client_frame::Kind::AddMembers(pb::AddMembers {
            group_id,
            user_ids: user_ids.to_vec(),
        }))
        .await
    }

    pub async fn remove_member(
        &self,
        group_id: u64,
        user_id: u64,
    ) -> Result<pb::Group, ClientError> {
        self.request_group(client_frame::Kind::RemoveMember(pb::RemoveMember {
            group_id,
            user_id,
        }))
        .await
    }

    pub async fn leave_group(&self, group_id: u64) -> Result<(), ClientError> {
        self.request_ok(client_frame::Kind::LeaveGroup(pb::LeaveGroup { group_id }))
            .await
    }

    /// The caller's groups (members omitted; use [`get_group`](Self::get_group)).
    pub async fn list_groups(&self) -> Result<Vec<pb::Group>, ClientError> {
        match self
            .request(client_frame::Kind::ListGroups(pb::ListGroups {}))
            .await?
        {
            server_frame::Kind::GroupList(l) => Ok(l.groups),
            other => Err(unexpected("GroupList", other)),
        }
    }

    pub async fn get_group(&self, group_id: u64) -> Result<pb::Group, ClientError> {
        self.request_group(client_frame::Kind::GetGroup(pb::GetGroup { group_id }))
            .await
    }

    /// One page of a conversation, newest first: messages with id < `before_message_id`
    /// (0: from the newest), at most `limit` (0: the server's cap).
    pub async fn history(
        &self,
        conversation: Recipient,
        before_message_id: u64,
        limit: u32,
    ) -> Result<pb::HistoryPage, ClientError> {
        let kind = client_frame::Kind::GetHistory(pb::GetHistory {
            conversation: Some(conversation.conversation()),
            before_message_id,
            limit,
        });
        match self.request(kind).await? {
            server_frame::Kind::HistoryPage(p) => Ok(p),
            other => Err(unexpected("HistoryPage", other)),
        }
    }

    /// One page of the caller's conversations, most recently active first: at most `limit`
    /// (0: the server's cap), after `cursor` (empty: the first page). Pass the page's
    /// `next_cursor` back for the next one; it is empty on the last page.
    pub async fn list_conversations_page(
        &self,
        limit: u32,
        cursor: &[u8],
    ) -> Result<pb::ConversationList, ClientError> {
        let kind = client_frame::Kind::ListConversations(pb::ListConversations {
            limit,
            cursor: cursor.to_vec().into(),
        });
        match self.request(kind).await? {
            server_frame::Kind::ConversationList(l) => Ok(l),
            other => Err(unexpected("ConversationList", other)),
        }
    }

    /// Every conversation of the caller, most recently active first, fetched page by page
    /// (`page_size` per request; 0: the server's cap). The pages are one snapshot: a chat
    /// that gets a message meanwhile keeps its place (the message arrives as a delivery).
    pub async fn list_conversations(
        &self,
        page_size: u32,
    ) -> Result<Vec<pb::ConversationSummary>, ClientError> {
        let mut all = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut cursor = bytes::Bytes::new();
        loop {
            let page = self.list_conversations_page(page_size, &cursor).await?;
            // Merged by conversation: harmless with a server that keeps its promise, and a
            // guard against one that does not.
            for summary in page.conversations {
                if seen.insert(conversation_key(&summary)) {
                    all.push(summary);
                }
            }
            // A cursor that does not move would loop forever.
            if page.next_cursor.is_empty() || page.next_cursor == cursor {
                return Ok(all);
            }
            cursor = page.next_cursor;
        }
    }

    /// A round trip to the server.
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(client_frame::Kind::Ping(pb::Ping {})).await? {
            server_frame::Kind::Pong(_) => Ok(()),
            other => Err(unexpected("Pong", other)),
        }
    }
}

/// Identifies a listed conversation: the peer's user id or the group id, kept apart.
fn conversation_key(summary: &pb::ConversationSummary) -> (bool, u64) {
    match &summary.with {
        Some(pb::conversation_summary::With::Group(g)) => (true, g.group_id),
        Some(pb::conversation_summary::With::User(u)) => (false, u.user_id),
        None => (false, 0),
    }
}

// ----- tasks ------------------------------------------------------------------------------

async fn write_loop(
    mut sink: FramedWrite<WriteHalf<Tls>, ClientCodec>,
    mut rx: mpsc::Receiver<Outbound>,
    shared: Arc<Shared>,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => {
                // The reader ended or the connection was shut: say goodbye if we still can.
                let goodbye = SinkExt::<pb::ClientFrame>::close(&mut sink);
                let _ = tokio::time::timeout(CLOSE_GRACE, goodbye).await;
                return;
            }
            msg = rx.recv() => msg,
        };
        let mut close_ack = None;
        let batch = async {
            match first {
                None => {
                    // Every handle was dropped.
                    close_ack = Some(None);
                    return Ok(());
                }
                Some(Outbound::Close(done)) => {
                    close_ack = Some(Some(done));
                    return Ok(());
                }
                Some(Outbound::Frame(frame)) => feed(&mut sink, frame).await?,
            }
            for _ in 1..MAX_BATCH {
                match rx.try_recv() {
                    Ok(Outbound::Frame(frame)) => feed(&mut sink, frame).await?,
                    Ok(Outbound::Close(done)) => {
                        close_ack = Some(Some(done));
                        break;
                    }
                    Err(_) => break,
                }
            }
            SinkExt::<pb::ClientFrame>::flush(&mut sink).await
        };
        let result = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            result = batch => result,
        };
        if let Err(e) = result {
            shared.shut(format!("write error: {e}"));
            return;
        }
        if let Some(done) = close_ack {
            let _ = tokio::time::timeout(CLOSE_GRACE, SinkExt::<pb::ClientFrame>::close(&mut sink))
                .await;
            let reason = if done.is_some() {
                "closed by client"
            } else {
                "connection dropped by the application"
            };
            shared.shut(reason.into());
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        }
    }
}

/// Feeds one frame; a frame too large to encode is dropped (its request then times out)
/// rather than ending the connection. Callers check sizes first, so this is a backstop.
async fn feed(
    sink: &mut FramedWrite<WriteHalf<Tls>, ClientCodec>,
    frame: pb::ClientFrame,
) -> Result<(), CodecError> {
    match sink.feed(frame).await {
        Err(CodecError::TooLarge { len, max }) => {
            warn!(len, max, "dropping a frame too large to send");
            Ok(())
        }
        other => other,
    }
}

async fn read_loop(
    mut stream: FramedRead<ReadHalf<Tls>, ClientCodec>,
    shared: Arc<Shared>,
    events: mpsc::Sender<Event>,
) {
    let mut go_away: Option<pb::GoAway> = None;
    let mut pushed_error: Option<crate::WireError> = None;
    let end_reason = loop {
        let item = tokio::select! {
            _ = shared.cancel.cancelled() => break None,
            item = stream.next() => item,
        };
        let frame = match item {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                let e = codec_error(e);
                break Some(match (&go_away, &pushed_error) {
                    (_, Some(err)) => format!("server error: {err} (then {e})"),
                    (Some(g), None) => format!("go-away: {} (then {e})", go_away_text(g)),
                    (None, None) => format!("read error: {e}"),
                });
            }
            None => {
                break Some(match (&go_away, &pushed_error) {
                    (_, Some(err)) => format!("server error: {err}"),
                    (Some(g), None) => format!("go-away: {}", go_away_text(g)),
                    (None, None) => "connection closed by the server".to_string(),
                });
            }
        };
        shared.frames_received.fetch_add(1, Ordering::Relaxed);

        if frame.request_id != 0 {
            let waiter = shared.lock().pending.remove(&frame.request_id);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(frame);
                }
                None => {
                    // A late answer to a request that timed out, or the pinger's Pong.
                    if !matches!(frame.kind, Some(server_frame::Kind::Pong(_))) {
                        debug!(
                            request_id = frame.request_id,
                            "response to no waiting request"
                        );
                    }
                }
            }
            continue;
        }

        let event = match frame.kind {
            Some(server_frame::Kind::Delivery(d)) => Event::Delivery(d),
            Some(server_frame::Kind::GoAway(g)) => {
                debug!(reason = %g.reason, after_ms = g.reconnect_after_ms, "go-away");
                go_away = Some(g.clone());
                Event::GoAway(g)
            }
            Some(server_frame::Kind::Error(e)) => {
                let e = crate::WireError::from(e);
                debug!(error = %e, "error pushed by the server");
                pushed_error = Some(e);
                continue;
            }
            Some(other) => {
                debug!(kind = kind_name(&other), "ignoring unsolicited frame");
                continue;
            }
            None => {
                debug!("ignoring a push of an unknown kind");
                continue;
            }
        };
        shared.reader_stalled.store(true, Ordering::Relaxed);
        let sent = tokio::select! {
            _ = shared.cancel.cancelled() => None,
            res = events.send(event) => Some(res),
        };
        shared.reader_stalled.store(false, Ordering::Relaxed);
        match sent {
            None => break None,
            Some(Ok(())) => {}
            Some(Err(_)) => trace!("events receiver dropped; push discarded"),
        }
    };
    drop(stream);
    if let Some(reason) = end_reason {
        shared.shut(reason);
    }
    let reason = shared
        .closed_reason()
        .unwrap_or_else(|| "connection closed".to_string());
    let _ = events.send(Event::Closed { reason }).await;
}

fn go_away_text(g: &pb::GoAway) -> String {
    match crate::ErrorCode::try_from(g.code) {
        Ok(crate::ErrorCode::Unspecified) | Err(_) => g.reason.clone(),
        Ok(code) => format!("{} ({})", g.reason, crate::error::code_name(code)),
    }
}

/// Pings every `every`; closes the connection when a ping gets no answer and nothing else
/// arrived either within `timeout` — unless the reader is waiting for the application,
/// in which case silence is our own back-pressure, not a dead peer.
async fn ping_loop(conn: Weak<Inner>, shared: Arc<Shared>, every: Duration, timeout: Duration) {
    let start = tokio::time::Instant::now() + every;
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Hold the connection only while queueing, so dropped handles still close it.
        let (id, out) = match conn.upgrade() {
            Some(inner) => (
                inner.next_id.fetch_add(1, Ordering::Relaxed),
                inner.out.clone(),
            ),
            None => return,
        };
        let Ok(rx) = shared.register(id) else { return };
        let _guard = PendingGuard {
            shared: &shared,
            id,
        };
        let received_before = shared.frames_received.load(Ordering::Relaxed);
        let frame = pb::ClientFrame {
            request_id: id,
            kind: Some(client_frame::Kind::Ping(pb::Ping {})),
        };
        let wait = async {
            if out.send(Outbound::Frame(frame)).await.is_err() {
                return false;
            }
            drop(out);
            tokio::time::timeout(timeout, rx).await.is_ok()
        };
        let answered = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            answered = wait => answered,
        };
        if !answered
            && !shared.cancel.is_cancelled()
            && shared.frames_received.load(Ordering::Relaxed) == received_before
            && !shared.reader_stalled.load(Ordering::Relaxed)
        {
            warn!(
                timeout_ms = timeout.as_millis() as u64,
                "no answer to ping; closing"
            );
            shared.shut(format!(
                "no answer to ping within {} ms",
                timeout.as_millis()
            ));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_taken_from_the_address() {
        assert_eq!(
            host_of("chat.example.org:7000").expect("host"),
            "chat.example.org"
        );
        assert_eq!(host_of("127.0.0.1:1").expect("host"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000").expect("host"), "::1");
        for bad in [
            "",
            "host",
            "host:",
            ":7000",
            "::1:7000",
            "[::1]",
            "[::1]7000",
            "h:99999",
        ] {
            assert!(matches!(host_of(bad), Err(ClientError::Config(_))), "{bad}");
        }
    }

    #[test]
    fn server_name_defaults_to_host_and_ip_stays_ip() {
        let trust = Trust::Fingerprint([0; 32]);
        let opts = ConnectOptions::new("127.0.0.1:7000", trust.clone());
        assert!(matches!(
            opts.tls_server_name().expect("name"),
            ServerName::IpAddress(_)
        ));
        let opts = ConnectOptions::new("[::1]:7000", trust.clone());
        assert!(matches!(
            opts.tls_server_name().expect("name"),
            ServerName::IpAddress(_)
        ));
        let mut opts = ConnectOptions::new("localhost:7000", trust);
        assert!(matches!(
            opts.tls_server_name().expect("name"),
            ServerName::DnsName(_)
        ));
        opts.server_name = Some("chat.example.org".into());
        match opts.tls_server_name().expect("name") {
            ServerName::DnsName(d) => assert_eq!(d.as_ref(), "chat.example.org"),
            other => panic!("{other:?}"),
        }
        opts.server_name = Some("not a name!".into());
        assert!(matches!(
            opts.tls_server_name(),
            Err(ClientError::Config(_))
        ));
    }

    #[test]
    fn client_msg_ids_are_32_hex_digits_and_differ() {
        let a = new_client_msg_id();
        let b = new_client_msg_id();
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn defaults_match_the_documentation() {
        let opts = ConnectOptions::new("h:1", Trust::Fingerprint([0; 32]));
        assert_eq!(opts.connect_timeout, Duration::from_secs(10));
        assert_eq!(opts.request_timeout, Duration::from_secs(30));
        assert_eq!(opts.ping_interval, Duration::from_secs(20));
        assert_eq!(opts.max_frame_bytes, crate::DEFAULT_MAX_FRAME_BYTES);
        assert_eq!(opts.event_buffer, 1024);
    }
}
