//! The audit's attacks (issue 11), each a loop that runs until told to stop and counts what it
//! achieved. Nothing here measures latency: the bystanders do. Looping attacks are paced at
//! a fixed rate each (the harness shares the machine with the daemon; an unpaced attacker would
//! mostly measure the harness's own CPU use), except the floods that the daemon itself paces.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, ClientError, ConnectOptions, Event, Recipient};
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::raw::Raw;
use crate::fleet::{Member, PASSWORD};

/// What each attack achieved, by outcome ("resumed", "rate_limited", ...).
#[derive(Default)]
pub struct Tally(std::sync::Mutex<BTreeMap<String, BTreeMap<String, u64>>>);

impl Tally {
    pub fn add(&self, attack: &str, what: &str, n: u64) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t.entry(attack.to_string())
            .or_default()
            .entry(what.to_string())
            .or_insert(0) += n;
    }

    pub fn snapshot(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What every attack shares.
#[derive(Clone)]
pub struct Ctx {
    /// Options for the daemon's client port (trust, timeouts); the source address is set per
    /// connection from `sources`.
    pub opts: ConnectOptions,
    /// Loopback addresses the attackers connect from, none of them the bystanders'.
    pub sources: Arc<Vec<IpAddr>>,
    /// Operations per second of each paced attack; 0: as fast as answers come.
    pub rate: f64,
    pub stop: CancellationToken,
    pub tally: Arc<Tally>,
    next_source: Arc<AtomicUsize>,
}

impl Ctx {
    pub fn new(opts: ConnectOptions, sources: Vec<IpAddr>, rate: f64) -> Self {
        Self {
            opts,
            sources: Arc::new(sources),
            rate,
            stop: CancellationToken::new(),
            tally: Arc::default(),
            next_source: Arc::default(),
        }
    }

    /// The attacker addresses in turn.
    pub fn source(&self) -> IpAddr {
        let i = self.next_source.fetch_add(1, Ordering::Relaxed);
        self.sources[i % self.sources.len()]
    }

    fn options_from(&self, source: IpAddr) -> ConnectOptions {
        let mut o = self.opts.clone();
        o.local_addr = Some(source);
        o.client_name = "messenger-loadtest-attack".into();
        o
    }

    /// Sleeps `d` unless stopped first; false when stopped.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn pacer(&self) -> Pacer {
        Pacer {
            interval: (self.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / self.rate)),
            next: Instant::now(),
        }
    }
}

/// A fixed schedule that does not slip when an answer is slow.
struct Pacer {
    interval: Option<Duration>,
    next: Instant,
}

impl Pacer {
    /// Waits for the next slot; false when stopped.
    async fn tick(&mut self, stop: &CancellationToken) -> bool {
        let Some(i) = self.interval else {
            return !stop.is_cancelled();
        };
        let at = self.next;
        self.next += i;
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep_until(at.into()) => true,
        }
    }
}

/// "rate_limited", "unauthenticated", "closed", ... for a failed request.
fn outcome_of(e: &ClientError) -> String {
    match e.wire_code() {
        Some(c) => messenger_protocol::error::code_name(c).to_string(),
        None => match e {
            ClientError::Closed(_) | ClientError::Io(_) => "connection_lost".into(),
            ClientError::Timeout => "timeout".into(),
            _ => "other_error".into(),
        },
    }
}

fn retry_after(e: &ClientError) -> Duration {
    match e {
        ClientError::Wire(w) if w.retry_after_ms > 0 => {
            Duration::from_millis(u64::from(w.retry_after_ms).min(5_000))
        }
        _ => Duration::from_millis(200),
    }
}

/// Accounts signed in over raw connections with a tiny receive buffer that then stop reading,
/// while `flooders` send them bodies of `body` bytes as fast as the daemon accepts. A stalled
/// connection the daemon sheds (or times out) is resumed and stalls again, as a persistent
/// attacker would. Returns once every victim signed in (or failed to).
pub async fn slow_readers(
    ctx: &Ctx,
    victims: Vec<(String, u64)>,
    flooders: Vec<Member>,
    body: usize,
) -> Vec<JoinHandle<()>> {
    const NAME: &str = "slow_readers";
    let mut tasks = Vec::new();
    let mut ids = Vec::new();
    for (username, user_id) in victims {
        let source = ctx.source();
        let opts = ctx.options_from(source);
        let signed_in = async {
            let mut raw = Raw::hello(&opts, source, true).await?;
            match raw
                .request(Req::Login(pb::Login {
                    username: username.clone(),
                    password: PASSWORD.into(),
                    device_name: "stalled".into(),
                    login_cookie: Bytes::new(),
                }))
                .await?
            {
                Resp::Authenticated(a) => Ok((raw, a.session_token)),
                other => anyhow::bail!("login answered {other:?}"),
            }
        };
        let (raw, token) = match signed_in.await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(%username, error = %e, "slow reader could not sign in");
                ctx.tally.add(NAME, "sign_in_failed", 1);
                continue;
            }
        };
        ctx.tally.add(NAME, "stalled_readers", 1);
        ids.push(user_id);
        tasks.push(tokio::spawn(hold_stalled(
            ctx.clone(),
            raw,
            token,
            opts,
            source,
        )));
    }
    if ids.is_empty() {
        return tasks;
    }
    let ids = Arc::new(ids);
    for (f, flooder) in flooders.into_iter().enumerate() {
        tasks.push(tokio::spawn(flood(
            ctx.clone(),
            flooder,
            ids.clone(),
            f,
            body,
        )));
    }
    tasks
}

/// Keeps one stalled reader alive: a ping now and then (written, never read), and when the
/// write fails because the daemon closed the connection, a resume that stalls again.
async fn hold_stalled(ctx: Ctx, mut raw: Raw, token: Bytes, opts: ConnectOptions, source: IpAddr) {
    const NAME: &str = "slow_readers";
    let mut stalled = VecDeque::new();
    while ctx.pause(Duration::from_secs(2)).await {
        if raw.send(Req::Ping(pb::Ping {})).await.is_ok() {
            continue;
        }
        ctx.tally.add(NAME, "closed_by_daemon", 1);
        let resumed = async {
            let mut again = Raw::hello(&opts, source, true).await?;
            let answer = again
                .request(Req::Resume(pb::Resume {
                    session_token: token.clone(),
                }))
                .await?;
            Ok::<_, anyhow::Error>((again, answer))
        };
        match resumed.await {
            Ok((again, Resp::Authenticated(_))) => {
                ctx.tally.add(NAME, "resumed", 1);
                // The closed one is kept too (as the attacker would), until it is dropped.
                stalled.push_back(std::mem::replace(&mut raw, again));
                if stalled.len() > 4 {
                    stalled.pop_front();
                }
            }
            Ok((_, Resp::Error(e))) => {
                ctx.tally.add(
                    NAME,
                    &format!(
                        "resume_{}",
                        messenger_protocol::error::code_name(
                            ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified)
                        )
                    ),
                    1,
                );
                let wait = Duration::from_millis(u64::from(e.retry_after_ms).clamp(200, 5_000));
                if !ctx.pause(wait).await {
                    break;
                }
            }
            Ok(_) | Err(_) => ctx.tally.add(NAME, "resume_failed", 1),
        }
    }
}

/// Sends large messages to the stalled readers round-robin, as fast as the daemon accepts.
async fn flood(ctx: Ctx, flooder: Member, victims: Arc<Vec<u64>>, f: usize, body: usize) {
    const NAME: &str = "slow_readers";
    let conn = flooder.client.conn().clone();
    // A flooder gets its own copies; reading (and acknowledging) them keeps its answers from
    // queueing behind them, and a later run from replaying them.
    let mut own = flooder.client;
    let reader = tokio::spawn(async move {
        let mut unacked = 0u32;
        while own.next_event().await.is_some() {
            unacked += 1;
            if unacked >= 256 {
                let _ = own.ack_seen().await;
                unacked = 0;
            }
        }
    });
    let payload = Bytes::from(vec![b'A'; body]);
    let mut i = f;
    while !ctx.stop.is_cancelled() {
        let to = victims[i % victims.len()];
        i += 1;
        let id = messenger_protocol::client::new_client_msg_id();
        let sent = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            r = conn.send_message(Recipient::User(to), &id, payload.clone(), "application/octet-stream") => r,
        };
        match sent {
            Ok(_) => {
                ctx.tally.add(NAME, "flood_messages_accepted", 1);
                ctx.tally.add(NAME, "flood_bytes_accepted", body as u64);
            }
            Err(e) => {
                ctx.tally.add(NAME, &format!("flood_{}", outcome_of(&e)), 1);
                if conn.is_closed() {
                    break;
                }
                if !ctx.pause(retry_after(&e)).await {
                    break;
                }
            }
        }
    }
    reader.abort();
    conn.close().await;
}

/// `connections` unauthenticated connections, each announcing a frame just under the
/// pre-sign-in limit, sending most of it and falling silent; each is reopened when the daemon
/// closes it.
pub fn half_frames(ctx: &Ctx, connections: usize) -> Vec<JoinHandle<()>> {
    const NAME: &str = "half_frames";
    (0..connections)
        .map(|_| {
            let ctx = ctx.clone();
            let source = ctx.source();
            tokio::spawn(async move {
                let opts = ctx.options_from(source);
                let mut frame = Vec::with_capacity(15_004);
                frame.extend_from_slice(&16_000u32.to_be_bytes());
                frame.extend_from_slice(&[0x0a; 15_000]);
                while !ctx.stop.is_cancelled() {
                    let opened = async {
                        let mut raw = Raw::tls(&opts, source, false).await?;
                        raw.write_raw(&frame).await?;
                        Ok::<_, anyhow::Error>(raw)
                    };
                    let mut raw = match opened.await {
                        Ok(r) => r,
                        Err(_) => {
                            ctx.tally.add(NAME, "open_failed", 1);
                            if !ctx.pause(Duration::from_secs(1)).await {
                                break;
                            }
                            continue;
                        }
                    };
                    ctx.tally.add(NAME, "opened", 1);
                    tokio::select! {
                        _ = ctx.stop.cancelled() => break,
                        _ = raw.closed() => ctx.tally.add(NAME, "closed_by_daemon", 1),
                    }
                    if !ctx.pause(Duration::from_millis(100)).await {
                        break;
                    }
                }
            })
        })
        .collect()
}

/// One device resumed over and over, each new connection replacing the last (which is kept
/// open and unread, as the audit's storm did).
pub fn resume_storm(ctx: &Ctx, member: Member) -> JoinHandle<()> {
    const NAME: &str = "resume_storm";
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let token = member
            .client
            .session()
            .map(|s| s.session_token.clone())
            .unwrap_or_default();
        member.client.close().await;
        let mut held = VecDeque::new();
        let mut pacer = ctx.pacer();
        while pacer.tick(&ctx.stop).await {
            let source = ctx.source();
            let opts = ctx.options_from(source);
            let attempt = async {
                let mut raw = Raw::hello(&opts, source, true).await?;
                let answer = raw
                    .request(Req::Resume(pb::Resume {
                        session_token: token.clone(),
                    }))
                    .await?;
                Ok::<_, anyhow::Error>((raw, answer))
            };
            match attempt.await {
                Ok((raw, Resp::Authenticated(_))) => {
                    ctx.tally.add(NAME, "resumed", 1);
                    held.push_back(raw);
                    if held.len() > 32 {
                        held.pop_front();
                    }
                }
                Ok((_, Resp::Error(e))) => ctx.tally.add(
                    NAME,
                    messenger_protocol::error::code_name(
                        ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
                    ),
                    1,
                ),
                Ok(_) => ctx.tally.add(NAME, "unexpected_answer", 1),
                Err(_) => ctx.tally.add(NAME, "connect_failed", 1),
            }
        }
    })
}

/// A client per attacker address, reconnected when the daemon closes it.
struct Clients {
    ctx: Ctx,
    clients: Vec<(IpAddr, Option<Client>)>,
    next: usize,
}

impl Clients {
    fn new(ctx: &Ctx) -> Self {
        Self {
            ctx: ctx.clone(),
            clients: ctx.sources.iter().map(|&s| (s, None)).collect(),
            next: 0,
        }
    }

    /// The next address's client, connected if it was not.
    async fn next(&mut self) -> Option<&mut Client> {
        let i = self.next % self.clients.len();
        self.next += 1;
        let (source, slot) = &mut self.clients[i];
        if slot.as_ref().is_none_or(|c| c.conn().is_closed()) {
            *slot = Client::connect(self.ctx.options_from(*source)).await.ok();
        }
        slot.as_mut()
    }
}

/// Wrong passwords for the bystanders' accounts from the attacker addresses. First each
/// account is pushed past its budget for unknown devices (so the bystanders' own logins, with
/// their login cookies, are tried while the lockout holds); then the attempts go on at the
/// attack rate. Returns the task once every account was refused at least once (or gave up).
pub async fn lockout(ctx: &Ctx, usernames: Vec<String>) -> JoinHandle<()> {
    const NAME: &str = "lockout";
    let mut clients = Clients::new(ctx);
    let attempt = async |clients: &mut Clients, username: &str| -> Option<bool> {
        let Some(c) = clients.next().await else {
            ctx.tally.add(NAME, "connect_failed", 1);
            return None;
        };
        match c.login(username, "not-the-password", "attacker").await {
            Ok(_) => {
                ctx.tally.add(NAME, "logged_in", 1);
                Some(false)
            }
            Err(e) => {
                let what = outcome_of(&e);
                ctx.tally.add(NAME, &what, 1);
                Some(match &e {
                    // The message is for people, not programs; here it only sorts a report:
                    // whether the account's budget or an address's budget refused.
                    ClientError::Wire(w) if w.code == ErrorCode::RateLimited => {
                        w.message.contains("does not know")
                    }
                    _ => false,
                })
            }
        }
    };
    let mut locked = 0;
    for username in &usernames {
        for _ in 0..64 {
            if ctx.stop.is_cancelled() {
                break;
            }
            if attempt(&mut clients, username).await == Some(true) {
                locked += 1;
                break;
            }
        }
    }
    ctx.tally
        .add(NAME, "accounts_locked_for_unknown_devices", locked);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut pacer = ctx.pacer();
        let mut i = 0;
        while pacer.tick(&ctx.stop).await {
            let Some(c) = clients.next().await else {
                ctx.tally.add(NAME, "connect_failed", 1);
                continue;
            };
            let username = &usernames[i % usernames.len()];
            i += 1;
            match c.login(username, "not-the-password", "attacker").await {
                Ok(_) => ctx.tally.add(NAME, "logged_in", 1),
                Err(e) => ctx.tally.add(NAME, &outcome_of(&e), 1),
            }
        }
    })
}

/// Resumes with made-up tokens from the attacker addresses.
pub fn invalid_resumes(ctx: &Ctx) -> JoinHandle<()> {
    const NAME: &str = "invalid_resumes";
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut clients = Clients::new(&ctx);
        let mut pacer = ctx.pacer();
        while pacer.tick(&ctx.stop).await {
            let Some(c) = clients.next().await else {
                ctx.tally.add(NAME, "connect_failed", 1);
                continue;
            };
            let fake: [u8; 32] = rand::random();
            match c.resume(&fake).await {
                Ok(_) => ctx.tally.add(NAME, "resumed", 1),
                Err(e) => ctx.tally.add(NAME, &outcome_of(&e), 1),
            }
        }
    })
}

/// Looks up user ids 1, 2, 3, ... as one signed-in attacker.
pub fn lookups(ctx: &Ctx, member: Member) -> JoinHandle<()> {
    const NAME: &str = "lookups";
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut client = member.client;
        let conn = client.conn().clone();
        let reader = tokio::spawn(async move { while client.next_event().await.is_some() {} });
        let mut pacer = ctx.pacer();
        let mut id = 0u64;
        while pacer.tick(&ctx.stop).await {
            id += 1;
            match conn.lookup_user_by_id(id).await {
                Ok(_) => ctx.tally.add(NAME, "found", 1),
                Err(e) => {
                    ctx.tally.add(NAME, &outcome_of(&e), 1);
                    if conn.is_closed() {
                        break;
                    }
                }
            }
        }
        reader.abort();
        conn.close().await;
    })
}

/// `connections` connections that say Hello and never sign in, spread over the attacker
/// addresses; each is reopened when the daemon closes it.
pub fn connection_flood(ctx: &Ctx, connections: usize) -> Vec<JoinHandle<()>> {
    const NAME: &str = "connections";
    (0..connections)
        .map(|_| {
            let ctx = ctx.clone();
            let source = ctx.source();
            tokio::spawn(async move {
                let opts = ctx.options_from(source);
                while !ctx.stop.is_cancelled() {
                    match Client::connect(opts.clone()).await {
                        Ok(mut c) => {
                            ctx.tally.add(NAME, "opened", 1);
                            let closed = tokio::select! {
                                _ = ctx.stop.cancelled() => false,
                                e = c.next_event() => matches!(e, Some(Event::Closed { .. }) | None),
                            };
                            c.close().await;
                            if closed {
                                ctx.tally.add(NAME, "closed_by_daemon", 1);
                            }
                        }
                        Err(e) => {
                            ctx.tally.add(NAME, &format!("refused_{}", outcome_of(&e)), 1);
                            if !ctx.pause(Duration::from_secs(1)).await {
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

/// `connections` idle TCP connections to the admin port; a connection answered at once with
/// 503 (the port is at its cap) or closed by the daemon is reopened a moment later.
pub fn admin_exhaustion(ctx: &Ctx, admin: String, connections: usize) -> Vec<JoinHandle<()>> {
    const NAME: &str = "admin";
    (0..connections)
        .map(|_| {
            let ctx = ctx.clone();
            let admin = admin.clone();
            let source = ctx.source();
            tokio::spawn(async move {
                while !ctx.stop.is_cancelled() {
                    let Some(mut tcp) = admin_connect(&admin, source).await else {
                        ctx.tally.add(NAME, "connect_failed", 1);
                        if !ctx.pause(Duration::from_secs(1)).await {
                            break;
                        }
                        continue;
                    };
                    ctx.tally.add(NAME, "opened", 1);
                    let mut first = [0u8; 64];
                    let read = tokio::select! {
                        _ = ctx.stop.cancelled() => break,
                        r = tcp.read(&mut first) => r,
                    };
                    let what = match read {
                        Ok(n) if first[..n].starts_with(b"HTTP/1.1 503") => "refused_at_capacity",
                        Ok(0) | Err(_) => "held_until_closed_by_daemon",
                        Ok(_) => "answered",
                    };
                    ctx.tally.add(NAME, what, 1);
                    if !ctx.pause(Duration::from_millis(500)).await {
                        break;
                    }
                }
            })
        })
        .collect()
}

async fn admin_connect(admin: &str, source: IpAddr) -> Option<tokio::net::TcpStream> {
    let remote = tokio::net::lookup_host(admin)
        .await
        .ok()?
        .find(|a| a.is_ipv4() == source.is_ipv4())?;
    let socket = if remote.is_ipv4() {
        tokio::net::TcpSocket::new_v4().ok()?
    } else {
        tokio::net::TcpSocket::new_v6().ok()?
    };
    socket.bind(std::net::SocketAddr::new(source, 0)).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(remote))
        .await
        .ok()?
        .ok()
}
