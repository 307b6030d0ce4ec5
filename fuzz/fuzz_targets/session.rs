//! The session state machine driven by a sequence of client frames, with the real store.
//!
//! Entry point: `web::serve` over an in-memory `tokio::io::duplex` pipe. It is the daemon's only
//! public way into a session over a caller-supplied stream (the native transport's
//! `session::run` is private and is reached only through a TLS listener): the harness upgrades
//! to a WebSocket once, then each frame is one binary message into `session::drive`, the very
//! state machine, hub, store, limits and handlers native connections use. The length-prefix
//! codec in front of native sessions is the `frame_codec` target's subject.
//!
//! Input: frames as on the native wire (4-byte big-endian length, then a `ClientFrame`), the
//! last one cut at the end of the input. Each frame is sent on one connection in order, and
//! the harness waits for its answer before the next. Frames that decode get the harness's own
//! request ids (so every answer is attributable); frames that do not decode go out byte for
//! byte. A frame with no request kind and request id `u64::MAX` is the harness's: it closes the
//! connection and opens the next (at most 8 per input); a `Resume` with an empty token gets
//! the token of the input's last `Authenticated`, so the fuzzer reaches resumed sessions.
//!
//! Properties, beyond "never panics" (a panic on any thread aborts the process):
//! - no answer and no push is ever `Error{INTERNAL}`;
//! - every request but `Ack` gets exactly one answer: its own response kind or an `Error`;
//! - the connection closes only where docs/PROTOCOL.md §3.3 says it does (after an error to
//!   the first frame, a connection-level `Error` with a closing code, or a `GoAway`), never
//!   silently with a request unanswered.
//!
//! One store (SQLite in a temp dir) serves many inputs, as a long-running daemon serves many
//! connections; it is replaced every `MESSENGER_FUZZ_RECYCLE` inputs (default 5000) to bound
//! its size. `MESSENGER_FUZZ_RECYCLE=1` gives every input a fresh store, to reproduce a
//! finding independently of earlier inputs; `MESSENGER_FUZZ_TRACE=1` prints each exchange.
#![no_main]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use messenger_daemon::Config;
use messenger_daemon::state::Shared;
use messenger_protocol::ErrorCode;
use messenger_protocol::codec::LENGTH_PREFIX_BYTES;
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use prost::Message as _;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

/// Small, so that oversized frames and responses are within the fuzzer's reach (and valid:
/// the frame limit must exceed the body limit by 4096 bytes of envelope).
const MAX_BODY_BYTES: usize = 1024;
const MAX_FRAME_BYTES: usize = MAX_BODY_BYTES + 4096;
/// Far above anything an input takes; reaching it means a request went unanswered.
const INPUT_DEADLINE: Duration = Duration::from_secs(60);

struct Fixture {
    shared: Arc<Shared>,
    dir: PathBuf,
    inputs: u64,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn recycle_every() -> u64 {
    static EVERY: OnceLock<u64> = OnceLock::new();
    *EVERY.get_or_init(|| {
        std::env::var("MESSENGER_FUZZ_RECYCLE")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(5000)
    })
}

/// `MESSENGER_FUZZ_TRACE=1`: print every request and its answer (to read what an input does).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("MESSENGER_FUZZ_TRACE").is_some())
}

fn config(dir: &Path) -> Config {
    let mut c = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    c.passwords.argon2_memory_kib = 1024;
    c.passwords.argon2_iterations = 1;
    c.passwords.hash_concurrency = 1;
    c.limits.max_frame_bytes = MAX_FRAME_BYTES;
    c.limits.max_body_bytes = MAX_BODY_BYTES;
    // Limits per IP and account would otherwise turn most of a long run into RateLimited.
    c.limits.messages_per_second = 1_000_000;
    c.limits.message_burst = 1_000_000;
    c.limits.recipients_per_second = 1_000_000;
    c.limits.send_bytes_per_second = u32::MAX;
    c.limits.send_bytes_burst = u32::MAX;
    c.limits.recipient_burst = 1_000_000;
    c.limits.reads_per_second = 1_000_000;
    c.limits.read_burst = 1_000_000;
    c.limits.lookups_per_minute = 1_000_000;
    c.limits.groups_created_per_hour = 1_000_000;
    c.limits.group_members_added_per_minute = 1_000_000;
    c.limits.auth_attempts_per_ip = 1_000_000;
    c.limits.login_failures_per_account = 1_000_000;
    c.limits.login_failures_per_cookie = 1_000_000;
    c.limits.invalid_resumes_per_ip = 1_000_000;
    c.limits.resumes_per_device_per_minute = 1_000_000;
    c.limits.resume_burst_per_device = 1_000_000;
    c.passwords.hash_queue = 1_000_000;
    c.store.sqlite_sync_full = false;
    c.validate()
        .expect("the fuzzed configuration is one an operator may run");
    c
}

async fn fixture() -> Fixture {
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!(
        "messenger-fuzz-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("fuzz data dir");
    let config = config(&dir);
    let store = messenger_daemon::store::open(&config)
        .await
        .expect("sqlite store opens");
    let shared = Shared::new(config, store).expect("shared state");
    Fixture {
        shared: Arc::new(shared),
        dir,
        inputs: 0,
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Data dirs of fuzzing processes that are gone (killed runs never clean up after themselves).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("messenger-fuzz-"))
            .and_then(|n| n.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);
    let rt = runtime();
    let mut slot = FIXTURE.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|f| f.inputs >= recycle_every()) {
        // Every session of earlier inputs has ended, so this drops the last reference and
        // closes the store before its directory goes.
        *slot = None;
    }
    let fixture = match slot.as_mut() {
        Some(f) => f,
        None => slot.insert(rt.block_on(fixture())),
    };
    fixture.inputs += 1;
    let shared = fixture.shared.clone();
    rt.block_on(async move {
        match tokio::time::timeout(INPUT_DEADLINE, run_input(shared, data)).await {
            Ok(()) => {}
            Err(_) => panic!("a request got no answer within {INPUT_DEADLINE:?}"),
        }
    });
});

/// The input's frames: whole ones, then whatever the input ends with (cut short).
fn split_frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut frames = Vec::new();
    while data.len() >= LENGTH_PREFIX_BYTES {
        let (prefix, rest) = data.split_at(LENGTH_PREFIX_BYTES);
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        let len = len.min(rest.len());
        frames.push(&rest[..len]);
        data = &rest[len..];
    }
    frames
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>;

async fn run_input(shared: Arc<Shared>, data: &[u8]) {
    let frames = split_frames(data);
    let mut token = None;
    for (n, segment) in frames.split(|raw| is_reconnect(raw)).enumerate() {
        if n == MAX_CONNECTIONS {
            break;
        }
        connection(shared.clone(), segment, &mut token).await;
    }
}

/// Connections one input may open, one after the other.
const MAX_CONNECTIONS: usize = 8;

/// The harness's own marker between connections: a frame with no request kind and request id
/// `u64::MAX` closes the connection and opens the next one (to reach `Resume`).
fn is_reconnect(raw: &[u8]) -> bool {
    pb::ClientFrame::decode(raw).is_ok_and(|f| f.kind.is_none() && f.request_id == u64::MAX)
}

/// One connection carrying `frames`; `token` is the last session token seen in this input.
async fn connection(shared: Arc<Shared>, frames: &[&[u8]], token: &mut Option<Bytes>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let shutdown = CancellationToken::new();
    let peer: SocketAddr = "127.0.0.1:50000".parse().expect("addr");
    let server = tokio::spawn(messenger_daemon::web::serve(
        shared,
        server,
        peer,
        shutdown.clone(),
    ));
    let ws_config = WebSocketConfig::default().max_message_size(Some(4 * MAX_FRAME_BYTES));
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        "ws://localhost/start",
        client,
        Some(ws_config),
    )
    .await
    .expect("the WebSocket upgrade succeeds");
    converse(&mut ws, frames, token).await;
    drop(ws);
    match server.await {
        Ok(()) => {}
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("session task failed: {e}"),
    }
}

/// What the server's frames said about the connection's end.
enum Next {
    /// The answer to the request arrived; the connection stays open.
    Open,
    /// The server announced a close (documented): stop sending.
    Closing,
}

async fn converse(ws: &mut Ws, frames: &[&[u8]], token: &mut Option<Bytes>) {
    for (i, raw) in frames.iter().enumerate() {
        let first = i == 0;
        let request_id = i as u64 + 1;
        let (bytes, req) = match pb::ClientFrame::decode(*raw) {
            Ok(mut frame) => {
                frame.request_id = request_id;
                if let Some(Req::Resume(r)) = &mut frame.kind
                    && r.session_token.is_empty()
                    && let Some(t) = token.as_ref()
                {
                    r.session_token = t.clone();
                }
                (Bytes::from(frame.encode_to_vec()), Some(frame.kind))
            }
            // Undecodable: the server must refuse it (INVALID_ARGUMENT, request 0) and close.
            Err(_) => (Bytes::copy_from_slice(raw), None),
        };
        let oversized = bytes.len() > MAX_FRAME_BYTES;
        if ws.send(Message::Binary(bytes)).await.is_err() {
            // The server closed first (it may refuse an oversized message before reading it
            // all); what it said before closing is checked below.
            assert!(
                oversized,
                "the connection closed while a frame was being sent"
            );
        }
        let expect = if oversized {
            Expect::Close(&[ErrorCode::TooLarge])
        } else {
            match &req {
                None => Expect::Close(&[ErrorCode::InvalidArgument]),
                Some(Some(Req::Ack(_))) if !first => Expect::Nothing,
                Some(kind) => Expect::Answer {
                    request_id,
                    req: kind.as_ref(),
                    first,
                },
            }
        };
        match receive(ws, expect, token).await {
            Next::Open => {}
            Next::Closing => {
                expect_end(ws).await;
                return;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Expect<'a> {
    /// `Ack`: no answer. The harness sends a `Ping` behind it to know it was processed.
    Nothing,
    /// Its own response kind or an error, under its request id.
    Answer {
        request_id: u64,
        req: Option<&'a Req>,
        first: bool,
    },
    /// A connection-level error with one of these codes, then the end.
    Close(&'a [ErrorCode]),
}

async fn receive(ws: &mut Ws, expect: Expect<'_>, token: &mut Option<Bytes>) -> Next {
    // After an Ack, a Ping proves the session read it and is still serving.
    const FENCE: u64 = u64::MAX;
    let (request_id, req, first) = match expect {
        Expect::Nothing => {
            let ping = pb::ClientFrame {
                request_id: FENCE,
                kind: Some(Req::Ping(pb::Ping {})),
            };
            // A failed send shows up below as a close without a reason.
            let _ = ws.send(Message::Binary(ping.encode_to_vec().into())).await;
            (FENCE, Some(Req::Ping(pb::Ping {})), false)
        }
        Expect::Answer {
            request_id,
            req,
            first,
        } => (request_id, req.cloned(), first),
        Expect::Close(_) => (0, None, false),
    };
    loop {
        let Some(frame) = next_frame(ws).await else {
            panic!("the connection closed without a documented error (waiting for {expect:?})");
        };
        let kind = frame.kind.expect("every server frame has a kind");
        if let Resp::Error(e) = &kind {
            assert_ne!(
                e.code,
                ErrorCode::Internal as i32,
                "INTERNAL error: {}",
                e.message
            );
        }
        if frame.request_id == 0 {
            match kind {
                Resp::Delivery(_) => continue,
                Resp::GoAway(_) => return Next::Closing,
                Resp::Error(e) => {
                    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                    let allowed: &[ErrorCode] = match expect {
                        Expect::Close(codes) => codes,
                        // §3.3: the closing errors that are not tied to a request.
                        _ => &[
                            ErrorCode::TooLarge,
                            ErrorCode::InvalidArgument,
                            ErrorCode::Unauthenticated,
                            ErrorCode::Unavailable,
                        ],
                    };
                    assert!(
                        allowed.contains(&code),
                        "connection-level error {code:?} ({}) where {allowed:?} was expected",
                        e.message
                    );
                    return Next::Closing;
                }
                other => panic!("unexpected push {other:?}"),
            }
        }
        assert_eq!(
            frame.request_id, request_id,
            "an answer to another request id"
        );
        if let Expect::Close(codes) = expect {
            panic!("{kind:?} answered a frame that must be refused with {codes:?}");
        }
        assert!(answers(req.as_ref(), &kind), "{req:?} answered by {kind:?}");
        if trace() {
            eprintln!("session: {req:?} -> {kind:?}");
        }
        if let Resp::Authenticated(a) = &kind {
            *token = Some(a.session_token.clone());
        }
        let is_error = matches!(kind, Resp::Error(_));
        // §3.3: an error to the first frame (not Hello, or a version not spoken) closes.
        if first && is_error {
            return Next::Closing;
        }
        // DeleteAccount: `Ok`, then a GoAway and the close.
        if !is_error && matches!(req, Some(Req::DeleteAccount(_))) {
            return Next::Closing;
        }
        return Next::Open;
    }
}

impl std::fmt::Debug for Expect<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Nothing => write!(f, "nothing"),
            Expect::Answer { request_id, .. } => write!(f, "the answer to request {request_id}"),
            Expect::Close(codes) => write!(f, "a closing error in {codes:?}"),
        }
    }
}

/// The next server frame, or `None` once the connection is over.
async fn next_frame(ws: &mut Ws) -> Option<pb::ServerFrame> {
    loop {
        match ws.next().await? {
            Ok(Message::Binary(b)) => {
                return Some(pb::ServerFrame::decode(b).expect("the server sends valid frames"));
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(Message::Text(t)) => panic!("the server sent a text message: {t}"),
            Ok(_) => continue,
        }
    }
}

/// After a documented close: nothing but pushes until the end.
async fn expect_end(ws: &mut Ws) {
    while let Some(frame) = next_frame(ws).await {
        match frame.kind {
            Some(Resp::Delivery(_) | Resp::GoAway(_)) => {}
            Some(Resp::Error(e)) if e.code != ErrorCode::Internal as i32 => {}
            other => panic!("{other:?} after the connection was closing"),
        }
    }
}

/// Whether `resp` is an acceptable answer to `req` (`None`: a frame without a request kind).
fn answers(req: Option<&Req>, resp: &Resp) -> bool {
    if matches!(resp, Resp::Error(_)) {
        return true;
    }
    let Some(req) = req else { return false };
    matches!(
        (req, resp),
        (Req::Hello(_), Resp::HelloOk(_))
            | (Req::Register(_), Resp::Registered(_))
            | (Req::Login(_) | Req::Resume(_), Resp::Authenticated(_))
            | (
                Req::UpdateProfile(_)
                    | Req::ChangePassword(_)
                    | Req::Logout(_)
                    | Req::DeleteAccount(_)
                    | Req::LeaveGroup(_),
                Resp::Ok(_)
            )
            | (Req::LookupUser(_), Resp::User(_))
            | (Req::Send(_), Resp::Sent(_))
            | (
                Req::CreateGroup(_) | Req::AddMembers(_) | Req::RemoveMember(_) | Req::GetGroup(_),
                Resp::Group(_)
            )
            | (Req::ListGroups(_), Resp::GroupList(_))
            | (Req::GetHistory(_), Resp::HistoryPage(_))
            | (Req::ListConversations(_), Resp::ConversationList(_))
            | (Req::Ping(_), Resp::Pong(_))
    )
}
