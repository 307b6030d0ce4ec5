//! One client connection's life: `Hello` → authentication → serving → closing.
//!
//! The session task reads frames and answers requests one at a time, in order (so two sends
//! pipelined on one connection are stored in the order they were sent). Two helpers run beside
//! it: the writer (`writer::run`), which alone owns the socket's write half, and, once the
//! connection is authenticated, the delivery pump (`delivery::pump`), which feeds the user's
//! inbox to the writer. Nothing here touches another connection; other sessions reach this one
//! only through the hub.
//!
//! The session never panics on input: every malformed, oversized or out-of-place frame gets a
//! typed `Error` and, where the stream can no longer be trusted, a close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use messenger_protocol::{CodecError, ErrorCode, PROTOCOL_VERSION, WireError};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::account_budgets;
use crate::delivery;
use crate::hub::ConnHandle;
use crate::inbound::{self, BudgetedRead, FrameLimit, InboundCodec, ReadGate};
use crate::metrics;
use crate::model::{DeviceId, User, now_millis};
use crate::state::Shared;
use crate::writer::{self, Outbound};

/// Frames queued for the writer (their bytes are bounded by the memory budget); small,
/// because the writer coalesces whatever is queued into one TLS write and back-pressure
/// should reach the pump quickly.
pub const OUTBOUND_FRAMES: usize = 64;

/// The authenticated part of a session.
pub(crate) struct Authed {
    pub user: User,
    pub device: DeviceId,
    pub handle: Arc<ConnHandle>,
    pump: JoinHandle<()>,
    /// When the session token expires (ms since the epoch, as told to the client): the
    /// connection ends then, unless a resume elsewhere has already replaced it.
    expires_at_ms: i64,
}

pub(crate) struct Session {
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    pub out: writer::Outbound,
    pub auth: Option<Authed>,
    /// Cancelled when the connection must end (writer failure, pump failure).
    pub closing: CancellationToken,
    /// The largest frame accepted now: small until sign-in.
    pub frame_limit: FrameLimit,
}

/// What a request handler decided beyond its response.
pub(crate) enum After {
    Continue,
    /// The request gets no response (`Ack`).
    NoReply,
    /// Send the response, then join live delivery (login, resume): the `Authenticated`
    /// response must precede every `Delivery`.
    SignIn {
        user: User,
        device: DeviceId,
        acked: crate::model::Seq,
    },
    /// Send the response, then close the connection with this GoAway.
    Close(pb::GoAway),
}

pub(crate) type Handled = Result<(Resp, After), WireError>;

pub(crate) fn ok(resp: Resp) -> Handled {
    Ok((resp, After::Continue))
}

/// Runs one connection to its end. `shutdown` is the server's; `handshake_deadline` bounds
/// TLS plus `Hello`.
///
/// Not an `async fn`: the stream is split before the future is built, so the future (which
/// lives as long as the connection) holds two pointers instead of the whole TLS stream.
pub fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    shutdown: CancellationToken,
    handshake_deadline: Instant,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let span = info_span!("conn", %peer, user = tracing::field::Empty);
    let (rd, wr) = tokio::io::split(stream);
    async move {
        let limits = &shared.config.limits;
        let frame_limit = FrameLimit::new(shared.config.memory.pre_auth_max_frame_bytes);
        // Start the read buffer small: an idle connection should not hold 8 KiB it never
        // uses; it grows with a large frame and shrinks back after it.
        let memory = shared.memory.connection();
        let gate = Arc::new(ReadGate::default());
        let frames = FramedRead::with_capacity(
            BudgetedRead::new(rd, Arc::clone(&gate), Arc::clone(&memory)),
            InboundCodec::new(
                limits.max_frame_bytes,
                frame_limit.clone(),
                shared.memory.clone(),
                gate,
            ),
            inbound::START_CAPACITY,
        );
        let (out, out_rx) = writer::channel(OUTBOUND_FRAMES, limits.max_frame_bytes, memory);
        let closing = CancellationToken::new();
        let (input, input_back) = oneshot::channel::<FramedRead<_, InboundCodec>>();
        let writer = tokio::spawn(
            writer::run(
                wr,
                out_rx,
                shared.config.timeouts.write_stall(),
                closing.clone(),
                // The raw read half, without the frame buffer: the writer only drains it.
                async move { input_back.await.ok().map(FramedRead::into_inner) },
            )
            .in_current_span(),
        );
        drive(
            Transport {
                frames,
                out,
                writer,
                closing,
                input,
                frame_limit,
            },
            shared,
            peer,
            shutdown,
            handshake_deadline,
        )
        .await;
    }
    .instrument(span)
}

/// A connection's two halves as the session sees them, whatever carries them (length-prefixed
/// frames over TLS, or WebSocket messages): decoded frames in, and a queue of encoded frames
/// drained by a writer task.
pub struct Transport<F> {
    pub frames: F,
    pub out: Outbound,
    pub writer: tokio::task::JoinHandle<()>,
    /// Cancelled by the writer when the peer stopped reading or the socket failed.
    pub closing: CancellationToken,
    /// The session hands `frames` back here when it ends, so the writer can drain the input
    /// after the last frame (see `writer::finish`).
    pub input: oneshot::Sender<F>,
    /// The frame limit `frames` enforces, raised by the session on sign-in.
    pub frame_limit: FrameLimit,
}

/// Runs the session over `transport` to its end (call inside the connection's span).
pub async fn drive<F>(
    transport: Transport<F>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    shutdown: CancellationToken,
    handshake_deadline: Instant,
) where
    F: Stream<Item = Result<pb::ClientFrame, CodecError>> + Unpin,
{
    let Transport {
        mut frames,
        out,
        writer,
        closing,
        input,
        frame_limit,
    } = transport;
    let mut session = Session {
        shared: shared.clone(),
        peer,
        out,
        auth: None,
        closing,
        frame_limit,
    };
    if session
        .hello(&mut frames, handshake_deadline, &shutdown)
        .await
    {
        session.serve(&mut frames, &shutdown).await;
    }
    session.sign_out();
    let Session { out, .. } = session;
    // Closing the channel lets the writer flush what is queued (GoAway included), half-close
    // and drain the input it gets back here.
    drop(out);
    let _ = input.send(frames);
    if tokio::time::timeout(shared.config.timeouts.shutdown_drain(), writer)
        .await
        .is_err()
    {
        debug!("writer did not drain in time");
    }
    debug!("connection closed");
}

impl Session {
    /// Waits for `Hello`; false when the connection must close.
    async fn hello<F>(
        &mut self,
        frames: &mut F,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> bool
    where
        F: Stream<Item = Result<pb::ClientFrame, CodecError>> + Unpin,
    {
        let frame = tokio::select! {
            f = frames.next() => f,
            _ = shutdown.cancelled() => {
                self.go_away(shutdown_go_away()).await;
                return false;
            }
            _ = tokio::time::sleep_until(deadline) => {
                self.close_with(ErrorCode::InvalidArgument, "no Hello before the handshake timeout").await;
                return false;
            }
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                self.codec_error(e).await;
                return false;
            }
            None => return false,
        };
        metrics::frame_in();
        let Some(Req::Hello(hello)) = frame.kind else {
            self.respond(
                frame.request_id,
                Err(WireError::new(
                    ErrorCode::InvalidArgument,
                    "the first frame must be Hello",
                )),
            )
            .await;
            return false;
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            self.respond(
                frame.request_id,
                Err(WireError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                        hello.protocol_version
                    ),
                )),
            )
            .await;
            return false;
        }
        debug!(client = %hello.client, "hello");
        let l = &self.shared.config.limits;
        let resp = Resp::HelloOk(pb::HelloOk {
            protocol_version: PROTOCOL_VERSION,
            server: concat!("messengerd/", env!("CARGO_PKG_VERSION")).to_string(),
            limits: Some(pb::Limits {
                max_frame_bytes: u32::try_from(l.max_frame_bytes).unwrap_or(u32::MAX),
                max_body_bytes: u32::try_from(l.max_body_bytes).unwrap_or(u32::MAX),
                max_group_members: u32::try_from(l.max_group_members).unwrap_or(u32::MAX),
                max_history_page: u32::try_from(l.max_history_page).unwrap_or(u32::MAX),
                max_conversation_page: u32::try_from(crate::requests::CONVERSATION_PAGE_MAX)
                    .unwrap_or(u32::MAX),
                idle_timeout_ms: u32::try_from(self.shared.config.timeouts.idle().as_millis())
                    .unwrap_or(u32::MAX),
            }),
            node: self
                .shared
                .cluster
                .as_ref()
                .map(|c| c.node_id().to_string())
                .unwrap_or_default(),
        });
        self.respond(frame.request_id, Ok(resp)).await;
        true
    }

    async fn serve<F>(&mut self, frames: &mut F, shutdown: &CancellationToken)
    where
        F: Stream<Item = Result<pb::ClientFrame, CodecError>> + Unpin,
    {
        let timeouts = self.shared.config.timeouts.clone();
        let mut auth_deadline = Instant::now() + timeouts.auth();
        let mut idle_deadline = Instant::now() + timeouts.idle();
        loop {
            let kicked = self.kick_token();
            let deadline = match &self.auth {
                None => idle_deadline.min(auth_deadline),
                Some(a) => idle_deadline.min(expiry_deadline(a.expires_at_ms)),
            };
            let frame = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.go_away(shutdown_go_away()).await;
                    return;
                }
                _ = kicked.cancelled() => {
                    let reason = self
                        .auth
                        .as_ref()
                        .and_then(|a| a.handle.kick_reason())
                        .unwrap_or_else(|| WireError::new(ErrorCode::Unauthenticated, "session ended"));
                    // A node closing all its clients at once (cut off from its cluster) must not
                    // have them all reconnect in the same instant; a revoked session does not
                    // reconnect at all.
                    let reconnect_after_ms = if reason.code == ErrorCode::Unavailable {
                        use rand::Rng;
                        rand::rng().random_range(500..3_000)
                    } else {
                        0
                    };
                    // Whatever is still queued is dropped with the connection (freed now, not
                    // after a stalled peer's write timeout): the device gets it from the store.
                    self.out.close_now(Some(&pb::ServerFrame {
                        request_id: 0,
                        kind: Some(Resp::GoAway(pb::GoAway {
                            reason: reason.message,
                            reconnect_after_ms,
                            code: reason.code as i32,
                        })),
                    }));
                    return;
                }
                _ = self.closing.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    if self.auth.is_none() && now >= auth_deadline {
                        self.close_with(
                            ErrorCode::Unauthenticated,
                            "not authenticated before the authentication timeout",
                        )
                        .await;
                    } else if self
                        .auth
                        .as_ref()
                        .is_some_and(|a| now_millis() >= a.expires_at_ms)
                    {
                        self.close_with(ErrorCode::Unauthenticated, "session expired; log in again")
                            .await;
                    } else if now >= idle_deadline {
                        self.close_with(
                            ErrorCode::Unavailable,
                            "idle timeout: nothing received; send Ping more often",
                        )
                        .await;
                    } else {
                        // A capped wait for a far expiry, or the wall clock lagging the timer.
                        continue;
                    }
                    return;
                }
                f = frames.next() => f,
            };
            let frame = match frame {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    self.codec_error(e).await;
                    return;
                }
                None => return,
            };
            metrics::frame_in();
            idle_deadline = Instant::now() + timeouts.idle();
            let request_id = frame.request_id;
            let Some(kind) = frame.kind else {
                self.respond(
                    request_id,
                    Err(WireError::new(
                        ErrorCode::InvalidArgument,
                        "frame has no request (unknown or missing kind)",
                    )),
                )
                .await;
                continue;
            };
            // Ack has no response, not even an error: the client is not waiting for one.
            let is_ack = matches!(kind, Req::Ack(_));
            let was_authed = self.auth.is_some();
            let result = self.dispatch(kind).await;
            if was_authed && self.auth.is_none() {
                // Logged out: a fresh window to log in again on this connection.
                auth_deadline = Instant::now() + timeouts.auth();
            }
            if is_ack {
                if let Err(e) = result {
                    debug!(error = %e, "ack refused");
                }
                continue;
            }
            match result {
                Ok((resp, After::Continue)) => self.respond(request_id, Ok(resp)).await,
                Ok((_, After::NoReply)) => {}
                Ok((
                    resp,
                    After::SignIn {
                        user,
                        device,
                        acked,
                    },
                )) => {
                    // The expiry the client was told is the one enforced.
                    let expires_at_ms = match &resp {
                        Resp::Authenticated(a) => a.expires_at_ms,
                        _ => i64::MAX,
                    };
                    self.respond(request_id, Ok(resp)).await;
                    self.sign_in(user, device, acked, expires_at_ms);
                }
                Ok((resp, After::Close(go_away))) => {
                    self.respond(request_id, Ok(resp)).await;
                    self.go_away(go_away).await;
                    return;
                }
                Err(e) => self.respond(request_id, Err(e)).await,
            }
        }
    }

    /// The single match on a request's kind.
    async fn dispatch(&mut self, kind: Req) -> Handled {
        let open_to_anyone = matches!(
            kind,
            Req::Ping(_) | Req::Hello(_) | Req::Register(_) | Req::Login(_) | Req::Resume(_)
        );
        if !open_to_anyone && self.auth.is_none() {
            return Err(WireError::new(
                ErrorCode::Unauthenticated,
                "log in or resume first",
            ));
        }
        if matches!(kind, Req::Login(_) | Req::Resume(_))
            && self
                .shared
                .cluster
                .as_ref()
                .is_some_and(|c| c.is_rejoining())
        {
            // Sign-ins read from sockets while this node was frozen may be ones their clients
            // already gave up on (and resumed elsewhere): taking them now would fence the
            // live connection. Real clients retry and land on a node that is ready.
            let mut e = WireError::new(
                ErrorCode::Unavailable,
                "this node is rejoining its cluster; try again",
            );
            // Rejoining takes about a heartbeat; spread the retries.
            e.retry_after_ms = {
                use rand::Rng;
                rand::rng().random_range(500..2_000)
            };
            return Err(e);
        }
        self.charge_read(&kind).await?;
        match kind {
            Req::Ping(_) => ok(Resp::Pong(pb::Pong {})),
            Req::Hello(_) => Err(WireError::new(
                ErrorCode::InvalidArgument,
                "Hello was already received",
            )),
            Req::Register(r) => self.register(r).await,
            Req::Login(_) | Req::Resume(_) if self.auth.is_some() => Err(WireError::new(
                ErrorCode::InvalidArgument,
                "already authenticated on this connection; log out first",
            )),
            Req::Login(r) => self.login(r).await,
            Req::Resume(r) => self.resume(r).await,
            Req::UpdateProfile(r) => self.update_profile(r).await,
            Req::ChangePassword(r) => self.change_password(r).await,
            Req::Logout(_) => self.logout().await,
            Req::DeleteAccount(r) => self.delete_account(r).await,
            Req::LookupUser(r) => self.lookup_user(r).await,
            Req::Send(r) => self.send_message(r).await,
            Req::Ack(r) => self.ack(r).await,
            Req::CreateGroup(r) => self.create_group(r).await,
            Req::AddMembers(r) => self.add_members(r).await,
            Req::RemoveMember(r) => self.remove_member(r).await,
            Req::LeaveGroup(r) => self.leave_group(r).await,
            Req::ListGroups(_) => self.list_groups().await,
            Req::GetGroup(r) => self.get_group(r).await,
            Req::GetHistory(r) => self.history(r).await,
            Req::ListConversations(r) => self.list_conversations(r).await,
        }
    }

    /// Read requests draw on the account's read budget; `LookupUser` on the lookup budget too
    /// (enumeration, F10). Sends and group changes are charged by their handlers.
    async fn charge_read(&self, kind: &Req) -> Result<(), WireError> {
        let lookup = matches!(kind, Req::LookupUser(_));
        let read = lookup
            || matches!(
                kind,
                Req::GetHistory(_)
                    | Req::ListConversations(_)
                    | Req::GetGroup(_)
                    | Req::ListGroups(_)
            );
        if !read {
            return Ok(());
        }
        let user = self.authed()?.user.id;
        let budgets = &self.shared.budgets;
        if lookup {
            budgets
                .lookups
                .hit(&user)
                .await
                .map_err(|wait| account_budgets::refused(&budgets.lookups, wait))?;
        }
        budgets
            .reads
            .hit(&user)
            .await
            .map_err(|wait| account_budgets::refused(&budgets.reads, wait))
    }

    /// The authenticated user, or `Unauthenticated`.
    pub fn authed(&self) -> Result<&Authed, WireError> {
        self.auth
            .as_ref()
            .ok_or_else(|| WireError::new(ErrorCode::Unauthenticated, "log in or resume first"))
    }

    /// Joins live delivery for `user`'s `device` and starts replaying its inbox after `acked`.
    /// Call after the `Authenticated` response is queued, so it precedes every `Delivery`.
    pub fn sign_in(
        &mut self,
        user: User,
        device: DeviceId,
        acked: crate::model::Seq,
        expires_at_ms: i64,
    ) {
        self.sign_out();
        tracing::Span::current().record("user", user.username.as_str());
        info!(user = %user.username, device = %device, "authenticated");
        let (handle, live) = self.shared.hub.register(user.id, device);
        let pump = tokio::spawn(
            delivery::pump(
                self.shared.clone(),
                handle.clone(),
                live,
                acked,
                self.out.clone(),
                self.closing.clone(),
            )
            .in_current_span(),
        );
        metrics::online_users(self.shared.hub.online_users());
        self.frame_limit
            .set(self.shared.config.limits.max_frame_bytes);
        self.auth = Some(Authed {
            user,
            device,
            handle,
            pump,
            expires_at_ms,
        });
    }

    /// Leaves live delivery; the connection stays open but unauthenticated.
    pub fn sign_out(&mut self) {
        self.frame_limit
            .set(self.shared.config.memory.pre_auth_max_frame_bytes);
        if let Some(a) = self.auth.take() {
            a.pump.abort();
            self.shared.hub.unregister(&a.handle);
            metrics::online_users(self.shared.hub.online_users());
        }
    }

    fn kick_token(&self) -> CancellationToken {
        match &self.auth {
            Some(a) => a.handle.kicked().clone(),
            None => CancellationToken::new(),
        }
    }

    /// Queues a response (or an error) for the writer.
    pub async fn respond(&self, request_id: u64, result: Result<Resp, WireError>) {
        let mut frame = pb::ServerFrame {
            request_id,
            kind: Some(match result {
                Ok(resp) => resp,
                Err(e) => error_kind(e),
            }),
        };
        if frame.encoded_len() > self.shared.config.limits.max_frame_bytes {
            // The writer would have to drop it; the client gets told instead of waiting.
            frame.kind = Some(error_kind(WireError::new(
                ErrorCode::TooLarge,
                "the response exceeds the frame limit; ask for less (e.g. a smaller history page)",
            )));
        }
        // A closed channel means the writer is gone: the connection is over anyway.
        let _ = self.out.send(&frame).await;
    }

    async fn go_away(&self, go_away: pb::GoAway) {
        let _ = self
            .out
            .send(&pb::ServerFrame {
                request_id: 0,
                kind: Some(Resp::GoAway(go_away)),
            })
            .await;
    }

    /// An error push followed by close, for failures not tied to a request.
    async fn close_with(&self, code: ErrorCode, message: &str) {
        self.respond(0, Err(WireError::new(code, message))).await;
    }

    async fn codec_error(&self, e: CodecError) {
        match e {
            CodecError::TooLarge { len, max } => {
                self.close_with(
                    ErrorCode::TooLarge,
                    &format!("frame of {len} bytes exceeds the limit of {max} bytes"),
                )
                .await
            }
            CodecError::Decode(e) => {
                self.close_with(ErrorCode::InvalidArgument, &format!("malformed frame: {e}"))
                    .await
            }
            CodecError::Io(e) if e.kind() == std::io::ErrorKind::OutOfMemory => {
                self.close_with(ErrorCode::Unavailable, inbound::SHORT_OF_MEMORY)
                    .await
            }
            CodecError::Io(e) => debug!(error = %e, "read failed"),
        }
    }
}

/// When to wake up for a token expiring at `expires_at_ms`; at most a day ahead, so a far
/// expiry never overflows a timer (the session then just checks again).
fn expiry_deadline(expires_at_ms: i64) -> Instant {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    let left = u64::try_from(expires_at_ms.saturating_sub(now_millis())).unwrap_or(0);
    Instant::now() + Duration::from_millis(left.min(DAY_MS))
}

fn error_kind(e: WireError) -> Resp {
    metrics::request_error(messenger_protocol::error::code_name(e.code));
    Resp::Error(e.to_pb())
}

/// `GoAway` for a server shutdown: reconnect after a random 1–5 s, so a rolling restart
/// spreads its reconnects instead of stampeding the balancer.
pub fn shutdown_go_away() -> pb::GoAway {
    use rand::Rng;
    pb::GoAway {
        reason: "server shutting down".into(),
        reconnect_after_ms: rand::rng().random_range(1_000..5_000),
        code: ErrorCode::Unavailable as i32,
    }
}

/// How long a rate-limited client should wait, for the error's `retry_after_ms`.
pub fn rate_limited(message: &str, wait: Duration) -> WireError {
    let mut e = WireError::new(ErrorCode::RateLimited, message);
    e.retry_after_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
    e
}
