//! The memory budget under the audit's attacks (issue 11, F1 and F2): a reader that stops
//! reading holds at most its share, a kicked connection frees it at once, many stalled readers
//! together are shed before the process budget is exceeded (and lose nothing), and an
//! unauthenticated client cannot make the server buffer a large frame.
//!
//! Victims here are raw TLS sockets with a tiny receive buffer that stop reading after sign-in,
//! which is what a hostile client does; every assertion is about bytes, never about time.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::{PASSWORD, TestServer};
use messenger_protocol::client::{Recipient, Trust, client_config};
use messenger_protocol::pb::{self, client_frame::Kind as Req, server_frame::Kind as Resp};
use messenger_protocol::{ErrorCode, PROTOCOL_VERSION};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A hang guard only: on a healthy server every wait here ends long before it.
const HANG: Duration = Duration::from_secs(60);
const SHARE: usize = 256 * 1024;
const BODY: usize = 60 * 1024;
/// Messages flooded at one stalled reader: about 6 MB, more than the kernel's socket buffers
/// on both ends take (loopback autotunes the send buffer up to 4 MiB).
const MESSAGES: usize = 100;

/// A client speaking frames by hand, so it can stop reading whenever it likes.
struct Raw {
    tls: TlsStream<TcpStream>,
    next_id: u64,
    input: BytesMut,
}

impl Raw {
    async fn connect(ts: &TestServer) -> Self {
        let server = ts.server();
        Self::connect_to(server.addr, server.dev_ca.clone().expect("dev CA")).await
    }

    async fn connect_to(addr: std::net::SocketAddr, ca: std::path::PathBuf) -> Self {
        let mut raw = Self::tls_to(addr, ca).await;
        raw.request(Req::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "abuse-memory".into(),
        }))
        .await;
        raw
    }

    /// TLS only, nothing sent yet.
    async fn tls_to(addr: std::net::SocketAddr, ca: std::path::PathBuf) -> Self {
        let trust = Trust::CaFile(ca);
        let config = client_config(&trust).expect("tls config");
        let socket = TcpSocket::new_v4().expect("socket");
        // As small as the kernel allows: the server's bytes pile up on its side.
        socket.set_recv_buffer_size(1024).expect("SO_RCVBUF");
        let tcp = socket.connect(addr).await.expect("tcp");
        let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
        let tls = TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("tls");
        Self {
            tls,
            next_id: 1,
            input: BytesMut::new(),
        }
    }

    async fn send(&mut self, kind: Req) -> u64 {
        let request_id = self.next_id;
        self.next_id += 1;
        let body = pb::ClientFrame {
            request_id,
            kind: Some(kind),
        }
        .encode_to_vec();
        let mut out = BytesMut::new();
        out.put_u32(u32::try_from(body.len()).expect("frame fits"));
        out.extend_from_slice(&body);
        self.tls.write_all(&out).await.expect("write");
        self.tls.flush().await.expect("flush");
        request_id
    }

    /// The next frame, or `None` at EOF or a reset.
    async fn frame(&mut self) -> Option<pb::ServerFrame> {
        loop {
            if self.input.len() >= 4 {
                let len = (&self.input[..4]).get_u32() as usize;
                if self.input.len() >= 4 + len {
                    self.input.advance(4);
                    let body = self.input.split_to(len);
                    return Some(pb::ServerFrame::decode(body.freeze()).expect("decodes"));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(HANG, self.tls.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(n)) => self.input.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("no frame within the hang guard"),
            }
        }
    }

    /// Sends a request and returns its answer (deliveries in between are not expected).
    async fn request(&mut self, kind: Req) -> Resp {
        let id = self.send(kind).await;
        loop {
            let frame = self.frame().await.expect("an answer before the close");
            if frame.request_id == id {
                return frame.kind.expect("kind");
            }
        }
    }

    async fn login(&mut self, username: &str, device: &str) -> pb::Authenticated {
        match self
            .request(Req::Login(pb::Login {
                username: username.into(),
                password: PASSWORD.into(),
                device_name: device.into(),
                login_cookie: Default::default(),
            }))
            .await
        {
            Resp::Authenticated(a) => a,
            other => panic!("login failed: {other:?}"),
        }
    }

    /// Reads deliveries until `n` have arrived; their seqs in order.
    async fn deliveries(&mut self, n: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.len() < n {
            match self.frame().await.expect("a delivery before the close") {
                pb::ServerFrame {
                    kind: Some(Resp::Delivery(d)),
                    ..
                } => seqs.push(d.seq),
                _ => continue,
            }
        }
        seqs
    }
}

fn in_use(ts: &TestServer) -> usize {
    ts.server().shared.memory.in_use()
}

/// Sends `n` messages of `BODY` bytes from `from` to each of `to`, checking the budget after
/// each one with `check`.
async fn flood(
    from: &messenger_protocol::client::Client,
    to: &[u64],
    n: usize,
    tag: &str,
    mut check: impl FnMut(),
) {
    for i in 0..n {
        for &user in to {
            from.conn()
                .send_message(
                    Recipient::User(user),
                    &format!("{tag}-{user}-{i}"),
                    Bytes::from(vec![b'x'; BODY]),
                    "application/octet-stream",
                )
                .await
                .expect("accepted");
            check();
        }
    }
}

/// Waits, bounded by `HANG`, until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = tokio::time::Instant::now() + HANG;
    while !done() {
        assert!(tokio::time::Instant::now() < give_up, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn server() -> TestServer {
    TestServer::start_with(|c| {
        c.memory.connection_outbound_bytes = SHARE;
        // Far beyond any wait here: memory must be freed by the budget, not by this timeout.
        c.timeouts.write_stall_secs = 3_600;
        c.timeouts.idle_secs = 3_600;
    })
    .await
}

/// F1: a connection that stops reading holds at most its share, however much is sent to it;
/// and when it reads again it gets every message, in order.
#[tokio::test]
async fn a_reader_that_stops_reading_holds_at_most_its_share_and_loses_nothing() {
    let ts = server().await;
    let (_victim_client, victim) = ts.user("victim").await;
    let (sender, _) = ts.user("sender").await;
    let mut raw = Raw::connect(&ts).await;
    raw.login("victim", "raw").await;
    let mut peak = 0usize;
    // Enough to fill the kernel's socket buffers and then the connection's share.
    flood(&sender, &[victim.user_id], MESSAGES, "f1", || {
        peak = peak.max(in_use(&ts));
    })
    .await;
    assert!(
        peak > SHARE / 2,
        "the flood must reach the share for this test to mean anything (peak {peak})"
    );
    // Its queue, plus the catch-up page its pump holds (which ends with at most one body past
    // the page bound).
    let bound = SHARE + ts.config.memory.catch_up_page_bytes + ts.config.limits.max_body_bytes;
    assert!(
        peak <= bound,
        "one stalled reader buffered {peak} bytes, over its bound of {bound}"
    );
    let seqs = raw.deliveries(MESSAGES).await;
    assert_eq!(
        seqs,
        (1..=MESSAGES as u64).collect::<Vec<u64>>(),
        "every message, once, in order"
    );
    ts.stop().await;
}

/// F1: a connection replaced by a newer one of the same device (a resume storm) frees what it
/// buffered at once, not when its write-stall timeout (an hour here) ends.
#[tokio::test]
async fn a_kicked_connection_frees_its_memory_at_once() {
    let ts = server().await;
    let (_victim_client, victim) = ts.user("victim").await;
    let (sender, _) = ts.user("sender").await;
    let mut raw = Raw::connect(&ts).await;
    let session = raw.login("victim", "raw").await;
    flood(&sender, &[victim.user_id], MESSAGES, "kick", || {}).await;
    eventually("the stalled reader holds a full share", || {
        in_use(&ts) > SHARE / 2
    })
    .await;
    let mut again = ts.client().await;
    again
        .resume(&session.session_token)
        .await
        .expect("resume the same device");
    eventually("the replaced connection's buffers are freed", || {
        in_use(&ts) == 0
    })
    .await;
    ts.stop().await;
}

/// F1 at scale: stalled readers together cannot exceed the process budget; the slowest are
/// shed, and a shed device that comes back gets everything, once, in order.
#[tokio::test]
async fn stalled_readers_are_shed_within_the_budget_and_lose_nothing() {
    const VICTIMS: usize = 8;
    const BUDGET: usize = 1024 * 1024;
    let ts = TestServer::start_with(|c| {
        c.memory.connection_outbound_bytes = SHARE;
        c.memory.max_buffered_bytes = BUDGET;
        c.timeouts.write_stall_secs = 3_600;
        c.timeouts.idle_secs = 3_600;
    })
    .await;
    let (sender, _) = ts.user("sender").await;
    let mut victims = Vec::new();
    let mut raws = Vec::new();
    for i in 0..VICTIMS {
        let name = format!("victim{i}");
        let (_client, user) = ts.user(&name).await;
        let mut raw = Raw::connect(&ts).await;
        let session = raw.login(&name, "raw").await;
        victims.push((name, user.user_id, session));
        raws.push(raw);
    }
    let ids: Vec<u64> = victims.iter().map(|v| v.1).collect();
    let mut peak = 0usize;
    flood(&sender, &ids, MESSAGES, "shed", || {
        peak = peak.max(in_use(&ts))
    })
    .await;
    assert!(
        peak <= BUDGET,
        "buffered {peak} bytes, over the budget of {BUDGET}"
    );
    assert!(
        common::metrics_value(&ts.metrics().await, "messenger_connections_shed_total") > 0.0,
        "eight stalled readers of a 256 KiB share cannot all fit in 1 MiB: some were shed"
    );
    // Every victim, shed or not, gets every message exactly once, in order, when it
    // comes back as the same device (a shed one resumes from its cursor).
    drop(raws);
    for (_name, _id, session) in &victims {
        let mut back = Raw::connect(&ts).await;
        match back
            .request(Req::Resume(pb::Resume {
                session_token: session.session_token.clone(),
            }))
            .await
        {
            Resp::Authenticated(_) => {}
            other => panic!("resume failed: {other:?}"),
        }
        assert_eq!(
            back.deliveries(MESSAGES).await,
            (1..=MESSAGES as u64).collect::<Vec<u64>>()
        );
    }
    // A bystander is served normally through all of it.
    let (mut bystander, b) = ts.user("bystander").await;
    sender
        .conn()
        .send_text(Recipient::User(b.user_id), "still here")
        .await
        .expect("sent");
    let got = common::deliveries(&mut bystander, 1).await;
    assert_eq!(common::text(&got[0]), "still here");
    ts.stop().await;
}

/// F2: before signing in, a client cannot announce (and have the server buffer) a large frame.
#[tokio::test]
async fn an_unauthenticated_client_cannot_make_the_server_buffer_a_large_frame() {
    let ts = server().await;
    let mut raw = Raw::connect(&ts).await;
    let limit = ts.config.memory.pre_auth_max_frame_bytes;
    let mut header = BytesMut::new();
    header.put_u32(u32::try_from(limit + 1).expect("fits"));
    header.extend_from_slice(&[0u8; 64]);
    raw.tls.write_all(&header).await.expect("write");
    let closing = raw.frame().await.expect("an error before the close");
    match closing.kind {
        Some(Resp::Error(e)) => {
            assert_eq!(e.code, ErrorCode::TooLarge as i32);
            assert!(e.message.contains(&limit.to_string()), "{}", e.message);
        }
        other => panic!("expected TOO_LARGE, got {other:?}"),
    }
    assert!(raw.frame().await.is_none(), "then the connection closes");
    // Signed in, the configured frame limit applies again.
    let (_c, _u) = ts.user("someone").await;
    let mut raw = Raw::connect(&ts).await;
    raw.login("someone", "raw").await;
    let big = "y".repeat(limit * 2);
    match raw
        .request(Req::UpdateProfile(pb::UpdateProfile {
            display_name: big,
            ..Default::default()
        }))
        .await
    {
        Resp::Error(e) => assert_ne!(e.code, ErrorCode::TooLarge as i32, "{e:?}"),
        other => panic!("a long display name is refused on its own terms: {other:?}"),
    }
    ts.stop().await;
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .expect("VmRSS")
        * 1024
}

/// The attacks of F1 and F2 together against the `messengerd` binary (its own allocator and
/// all): stalled readers flooded with large messages, half-sent frames from unauthenticated
/// connections, and a resume storm of one device. The process's resident memory stays within
/// the buffer budget plus a fixed allowance for the connections themselves; and once the
/// attackers are gone, the allocator gives the memory back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_process_stays_under_its_memory_ceiling_under_attack() {
    use std::io::BufRead;
    const BUDGET: usize = 8 * 1024 * 1024;
    const VICTIMS: usize = 40;
    const HALF_FRAMES: usize = 200;
    const RESUMES: usize = 50;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let log = std::fs::File::create(dir.path().join("messengerd.log")).expect("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_messengerd"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--argon2-memory-kib", "1024", "--argon2-iterations", "1"])
        .args([
            "--messages-per-second",
            "100000",
            "--message-burst",
            "100000",
        ])
        .args(["--auth-attempts-per-ip", "100000"])
        .args(["--max-connections-per-ip", "10000"])
        .args(["--send-bytes-per-second", "4000000000"])
        .args(["--send-bytes-burst", "4000000000"])
        .args(["--write-stall-timeout", "3600", "--idle-timeout", "3600"])
        .args(["--max-buffered-bytes", &BUDGET.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn messengerd");
    let stdout = child.stdout.take().expect("stdout");
    let pid = child.id();
    let _guard = common::KillOnDrop(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let addr: std::net::SocketAddr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("messengerd listening on ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|a| a.parse().ok())
        })
        .expect("banner");
    std::thread::spawn(move || for _ in lines {});
    let ca = data.join("tls").join("dev-ca.pem");
    let mut options = messenger_protocol::client::ConnectOptions::new(
        addr.to_string(),
        Trust::CaFile(ca.clone()),
    );
    options.request_timeout = HANG;
    let connect = || async {
        messenger_protocol::client::Client::connect(options.clone())
            .await
            .expect("connect")
    };
    let mut sender = connect().await;
    sender
        .register("sender", PASSWORD, "sender")
        .await
        .expect("register");
    sender.login("sender", PASSWORD, "d").await.expect("login");
    let mut victims = Vec::new();
    for i in 0..VICTIMS {
        let name = format!("victim{i}");
        let c = connect().await;
        let user = c.register(&name, PASSWORD, &name).await.expect("register");
        victims.push((name, user.user_id));
    }
    let baseline = rss_bytes(pid);
    let mut peak = baseline;

    let mut stalled = Vec::new();
    let mut storm_token = None;
    for (name, _) in &victims {
        let mut raw = Raw::connect_to(addr, ca.clone()).await;
        let session = raw.login(name, "raw").await;
        storm_token.get_or_insert(session.session_token);
        stalled.push(raw);
    }
    // Half-sent frames: most of what an unauthenticated client may announce, then silence.
    let mut half = Vec::new();
    for _ in 0..HALF_FRAMES {
        let mut raw = Raw::tls_to(addr, ca.clone()).await;
        let mut bytes = BytesMut::new();
        bytes.put_u32(16_000);
        bytes.extend_from_slice(&[0x0a; 15_000]);
        raw.tls.write_all(&bytes).await.expect("write");
        half.push(raw);
    }
    // A resume storm of one device: each new connection replaces the last.
    let token = storm_token.expect("a session");
    for _ in 0..RESUMES {
        let mut raw = Raw::connect_to(addr, ca.clone()).await;
        match raw
            .request(Req::Resume(pb::Resume {
                session_token: token.clone(),
            }))
            .await
        {
            Resp::Authenticated(_) => {}
            // Past the device's resume burst the storm is refused outright.
            Resp::Error(e) if e.code == ErrorCode::RateLimited as i32 => {}
            other => panic!("resume: {other:?}"),
        }
        stalled.push(raw);
        peak = peak.max(rss_bytes(pid));
    }
    let ids: Vec<u64> = victims.iter().map(|v| v.1).collect();
    for i in 0..10 {
        for &id in &ids {
            sender
                .conn()
                .send_message(
                    Recipient::User(id),
                    &format!("p-{id}-{i}"),
                    Bytes::from(vec![b'z'; BODY]),
                    "application/octet-stream",
                )
                .await
                .expect("accepted");
            peak = peak.max(rss_bytes(pid));
        }
    }
    let mb = |b: usize| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "rss: baseline {:.1} MiB, peak {:.1} MiB (+{:.1} MiB) with {} connections; {:.1} MB sent",
        mb(baseline),
        mb(peak),
        mb(peak - baseline),
        VICTIMS + HALF_FRAMES + RESUMES,
        (VICTIMS * 10 * BODY) as f64 / 1e6,
    );
    // The budget, plus an allowance per connection for what is not charged to it (TLS
    // state, the frame being read, the live queue's share of bodies).
    let connections = VICTIMS + HALF_FRAMES + RESUMES;
    let ceiling = BUDGET + connections * 64 * 1024 + 32 * 1024 * 1024;
    assert!(
        peak - baseline <= ceiling,
        "resident memory grew by {:.1} MiB, over the ceiling of {:.1} MiB",
        mb(peak - baseline),
        mb(ceiling)
    );
    drop(stalled);
    drop(half);
    let grown = peak - baseline;
    let give_up = tokio::time::Instant::now() + HANG;
    let mut after = rss_bytes(pid);
    while after > baseline + grown / 2 && tokio::time::Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = rss_bytes(pid);
    }
    eprintln!("rss after the attackers left: {:.1} MiB", mb(after));
    assert!(
        after <= baseline + grown / 2,
        "memory was not returned: {:.1} MiB resident, baseline {:.1}, peak {:.1}",
        mb(after),
        mb(baseline),
        mb(peak)
    );
}
