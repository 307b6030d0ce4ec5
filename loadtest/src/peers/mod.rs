//! Side-by-side peers: the same `direct` workload Messenger runs, driven against
//! (a) Mosquitto with MQTT QoS 1 and persistent sessions ([`mosquitto`]) and
//! (b) a no-op TLS relay that only forwards frames, the transport ceiling ([`relay`]),
//! so Messenger's figures can be reported as ratios to both.
//!
//! The workload: `2 × pairs` users, user `2i` and `2i + 1` are partners, every user sends to
//! its partner and receives from it. Open loop: each user sends at `rate / (2 × pairs)` on a
//! fixed schedule starting at a random phase; it awaits each acceptance before the next send
//! but the schedule does not slip, and latency is measured from the scheduled time
//! (coordinated-omission correction). Closed loop: each user sends back to back. Messages
//! meant to be sent during the warm-up are checked but their latency is not recorded. After
//! `duration` the senders stop; the run waits until every accepted message arrived (or `drain`
//! elapsed) and hands one [`SenderLog`] and one [`ReceiverLog`] per user to
//! [`checker::check`](crate::checker::check).

pub mod mosquitto;
pub mod relay;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::checker::{self, CheckReport, Node, ReceiverLog, SenderLog, Target, new_histogram};
use crate::ledger::Ledger;
use crate::payload::Stamp;
use crate::stats::{self, ErrorCounts, LatencySummary, ProcSample};

/// The workload both peers run; the same as Messenger's `direct` scenario.
#[derive(Debug, Clone)]
pub struct PeerParams {
    /// Number of partner pairs; there are `2 × pairs` users (one connection each).
    pub pairs: usize,
    /// Total messages per second over all users, open loop; `None` = closed loop.
    pub rate: Option<f64>,
    /// How long senders send, warm-up included.
    pub duration: Duration,
    /// Latency of messages meant to be sent before this is not recorded (they are checked).
    pub warmup: Duration,
    /// Bytes per message body (at least the stamp's size).
    pub body_size: usize,
    /// Longest wait for in-flight deliveries after sending stops.
    pub drain: Duration,
}

/// What one peer did with the workload.
#[derive(Debug, Clone, Serialize)]
pub struct PeerResult {
    pub name: String,
    /// Accepted messages whose intended send time lies in the measured window
    /// (`warmup..duration`); all accepted messages are in `check.accepted_messages`.
    pub accepted: u64,
    /// Deliveries of messages whose intended send time lies in the measured window.
    pub delivered: u64,
    /// `accepted / (duration - warmup)`.
    pub accepted_per_s: f64,
    /// `delivered / (duration - warmup)`.
    pub delivered_per_s: f64,
    /// End-to-end latency from the intended send time to arrival, warm-up excluded.
    pub latency: LatencySummary,
    pub check: CheckReport,
    /// CPU of the harness (the load generator) over the measured window, in percent of one
    /// core; an in-process peer's own threads are not included.
    pub harness_cpu_percent: f64,
    /// CPU of the peer over the measured window, in percent of one core.
    pub peer_cpu_percent: Option<f64>,
    /// Resident memory of the peer at the end of the measured window (`None` when the peer
    /// runs inside the harness's process).
    pub peer_rss_mib: Option<f64>,
    /// Failed sends, connection errors and ignored arrivals, by kind.
    pub errors: ErrorCounts,
}

impl PeerParams {
    fn validate(&self) -> anyhow::Result<()> {
        if self.pairs == 0 {
            bail!("pairs must be at least 1");
        }
        if self.pairs > (u32::MAX / 4) as usize {
            bail!("too many pairs");
        }
        if let Some(rate) = self.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            bail!("rate must be a positive number of messages per second");
        }
        if self.warmup >= self.duration {
            bail!("warm-up must be shorter than the duration");
        }
        Ok(())
    }

    fn users(&self) -> u32 {
        (self.pairs * 2) as u32
    }
}

/// Partner of user `u`: 2i ↔ 2i+1.
pub(crate) fn partner(u: u32) -> u32 {
    u ^ 1
}

/// A send that is not accepted within this long counts as failed and stops its sender.
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections opened at once while setting up.
const CONNECT_CONCURRENCY: usize = 64;
/// After everything arrived, keep listening this long so late duplicates are seen too.
const SETTLE: Duration = Duration::from_millis(100);

/// State shared by every loop of one peer run.
pub(crate) struct Shared {
    run: u64,
    epoch: OnceLock<Instant>,
    warmup_ns: u64,
    accepted: AtomicU64,
    delivered: AtomicU64,
    /// Owed (message, recipient) pairs not arrived yet: the drain waits on it.
    ledger: Ledger,
    /// A peer is one server, not a cluster node.
    node: Node,
    errors: Mutex<ErrorCounts>,
}

impl Shared {
    fn new(warmup: Duration) -> Arc<Self> {
        Arc::new(Self {
            run: rand::random(),
            epoch: OnceLock::new(),
            warmup_ns: warmup.as_nanos() as u64,
            accepted: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            ledger: Ledger::new(),
            node: Node::from(""),
            errors: Mutex::new(ErrorCounts::new()),
        })
    }

    pub(crate) fn error(&self, kind: impl Into<String>) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(kind.into()).or_insert(0) += 1;
    }
}

/// One user's receiving side: every payload its connection delivers goes through
/// [`Inbox::arrived`].
pub(crate) struct Inbox {
    shared: Arc<Shared>,
    state: Mutex<InboxState>,
}

struct InboxState {
    log: ReceiverLog,
    latency: Histogram<u64>,
    measured: u64,
}

impl Inbox {
    fn new(me: u32, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Self {
            shared,
            state: Mutex::new(InboxState {
                log: ReceiverLog::new(me),
                latency: new_histogram(),
                measured: 0,
            }),
        })
    }

    /// Logs one delivered body. Bodies that are not stamps of this run are counted as errors
    /// and otherwise ignored.
    pub(crate) fn arrived(&self, body: &[u8]) {
        let Some(epoch) = self.shared.epoch.get() else {
            self.shared.error("receive: arrival before the run started");
            return;
        };
        let now_ns = epoch.elapsed().as_nanos() as u64;
        let Some(stamp) = Stamp::decode(body) else {
            self.shared.error("receive: not a load-test body");
            return;
        };
        if stamp.run != self.shared.run {
            self.shared.error("receive: body of another run");
            return;
        }
        let latency_us = (now_ns.saturating_sub(stamp.intended_ns) / 1000).clamp(1, 3_600_000_000);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let me = st.log.recipient;
        self.shared.ledger.arrived(me, stamp.sender, stamp.seq);
        if st
            .log
            .arrived(stamp.sender, stamp.seq, latency_us, &self.shared.node)
        {
            self.shared.delivered.fetch_add(1, Ordering::Relaxed);
            if stamp.intended_ns >= self.shared.warmup_ns {
                st.measured += 1;
                let _ = st.latency.record(latency_us);
            }
        }
    }

    fn take(&self) -> InboxState {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let me = st.log.recipient;
        std::mem::replace(
            &mut st,
            InboxState {
                log: ReceiverLog::new(me),
                latency: new_histogram(),
                measured: 0,
            },
        )
    }
}

/// The sending half of one user's connection to a peer.
pub(crate) trait PeerSender: Send + 'static {
    /// Sends `body` (message `seq` of this user) to user `to` and returns once the peer has
    /// accepted it.
    fn send(
        &mut self,
        to: u32,
        seq: u64,
        body: Bytes,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A user connected to a peer: its sending half and the tasks that feed its inbox.
pub(crate) struct Connected<S> {
    pub sender: S,
    pub tasks: Vec<JoinHandle<()>>,
}

/// CPU and memory of the peer, as far as it can be told apart from the harness.
pub(crate) trait PeerUsage {
    /// CPU seconds the peer used so far.
    fn cpu_secs(&self) -> Option<f64>;
    /// Resident memory of the peer's own process.
    fn rss_bytes(&self) -> Option<u64>;
    /// True when the peer's CPU is part of the harness process's CPU.
    fn in_process(&self) -> bool;
}

/// A peer the workload can run against.
pub(crate) trait Peer: PeerUsage + Sync {
    type Sender: PeerSender;
    /// Connects user `me`; returns once messages sent to `me` reach `inbox`.
    fn connect(
        &self,
        me: u32,
        inbox: Arc<Inbox>,
    ) -> impl Future<Output = anyhow::Result<Connected<Self::Sender>>> + Send;
}

/// Runs the workload against `peer` and checks it.
pub(crate) async fn drive<P: Peer>(
    name: &str,
    params: &PeerParams,
    peer: &P,
) -> anyhow::Result<PeerResult> {
    params.validate()?;
    let users = params.users();
    let shared = Shared::new(params.warmup);
    let inboxes: Vec<Arc<Inbox>> = (0..users).map(|u| Inbox::new(u, shared.clone())).collect();

    // Everyone is connected (and subscribed) before anyone sends, so nothing is sent to a
    // user the peer does not know yet.
    let mut connected = futures_util::stream::iter(0..users)
        .map(|u| {
            let inbox = inboxes[u as usize].clone();
            async move { (u, peer.connect(u, inbox).await) }
        })
        .buffer_unordered(CONNECT_CONCURRENCY);
    let mut senders: Vec<Option<P::Sender>> = (0..users).map(|_| None).collect();
    // Aborted however this function ends, so no connection outlives the run.
    let mut tasks = AbortOnDrop(Vec::new());
    let mut failure = None;
    while let Some((u, result)) = connected.next().await {
        match result {
            Ok(c) => {
                senders[u as usize] = Some(c.sender);
                tasks.0.extend(c.tasks);
            }
            Err(e) => {
                failure = Some(e.context(format!("{name}: connecting user {u}")));
                break;
            }
        }
    }
    drop(connected);
    if let Some(e) = failure {
        return Err(e);
    }

    let epoch = Instant::now() + Duration::from_millis(20);
    let _ = shared.epoch.set(epoch);
    let interval = params
        .rate
        .map(|rate| Duration::from_secs_f64(2.0 * params.pairs as f64 / rate));
    let mut send_tasks = AbortOnDrop(Vec::with_capacity(users as usize));
    for (u, sender) in senders.into_iter().enumerate() {
        let sender = sender.context("a user was not connected")?;
        let phase = interval.map(|i| {
            let ns = i.as_nanos().min(u64::MAX as u128) as u64;
            Duration::from_nanos(rand::rng().random_range(0..ns.max(1)))
        });
        send_tasks.0.push(tokio::spawn(send_loop(
            sender,
            u as u32,
            shared.clone(),
            epoch,
            params.duration,
            params.body_size,
            interval.zip(phase),
        )));
    }

    // Resource use over the measured window.
    let window = params.duration - params.warmup;
    tokio::time::sleep_until((epoch + params.warmup).into()).await;
    let self_pid = std::process::id();
    let start_self = stats::sample(self_pid);
    let start_peer = peer.cpu_secs();
    tokio::time::sleep_until((epoch + params.duration).into()).await;
    let end_self = stats::sample(self_pid);
    let end_peer = peer.cpu_secs();
    let peer_rss = peer.rss_bytes();
    let measured = (epoch + params.warmup)
        .elapsed()
        .max(Duration::from_millis(1));

    let mut sender_logs = Vec::with_capacity(users as usize);
    let mut measured_accepted = 0;
    for t in send_tasks.0.iter_mut() {
        let (log, in_window) = t.await.context("a sender task panicked")?;
        sender_logs.push(log);
        measured_accepted += in_window;
    }

    let drain_until = Instant::now() + params.drain;
    while shared.ledger.outstanding() > 0 && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(SETTLE).await;
    tasks.0.iter().for_each(JoinHandle::abort);
    for t in tasks.0.iter_mut() {
        let _ = t.await;
    }

    let mut receiver_logs = Vec::with_capacity(users as usize);
    let mut latency = new_histogram();
    let mut measured_delivered = 0;
    for inbox in &inboxes {
        let st = inbox.take();
        latency
            .add(&st.latency)
            .context("merging latency histograms")?;
        measured_delivered += st.measured;
        receiver_logs.push(st.log);
    }
    let (check, _) = checker::check(shared.run, &sender_logs, &receiver_logs, &[]);

    let secs = window.as_secs_f64();
    let cpu = |a: Option<ProcSample>, b: Option<ProcSample>| match (a, b) {
        (Some(a), Some(b)) => Some(b.cpu_secs - a.cpu_secs),
        _ => None,
    };
    let peer_cpu = start_peer.zip(end_peer).map(|(a, b)| b - a);
    let mut harness_cpu = cpu(start_self, end_self).unwrap_or(0.0);
    if peer.in_process() {
        harness_cpu -= peer_cpu.unwrap_or(0.0);
    }
    let pct = |cpu_secs: f64| (cpu_secs / measured.as_secs_f64() * 100.0).max(0.0);
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(PeerResult {
        name: name.to_string(),
        accepted: measured_accepted,
        delivered: measured_delivered,
        accepted_per_s: measured_accepted as f64 / secs,
        delivered_per_s: measured_delivered as f64 / secs,
        latency: LatencySummary::of(&latency),
        check,
        harness_cpu_percent: pct(harness_cpu),
        peer_cpu_percent: peer_cpu.map(pct),
        peer_rss_mib: peer_rss.map(|b| b as f64 / 1_048_576.0),
        errors,
    })
}

/// Aborts its tasks when dropped.
struct AbortOnDrop<T>(Vec<JoinHandle<T>>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.iter().for_each(JoinHandle::abort);
    }
}

/// One user's sender. Returns its log and how many of its accepted messages were meant to be
/// sent in the measured window.
async fn send_loop<S: PeerSender>(
    mut sender: S,
    me: u32,
    shared: Arc<Shared>,
    epoch: Instant,
    duration: Duration,
    body_size: usize,
    schedule: Option<(Duration, Duration)>,
) -> (SenderLog, u64) {
    let to = partner(me);
    let mut log = SenderLog {
        sender: me,
        ..SenderLog::default()
    };
    let mut in_window = 0;
    let end = epoch + duration;
    let mut seq = 0u64;
    if schedule.is_none() {
        tokio::time::sleep_until(epoch.into()).await;
    }
    loop {
        let intended = match schedule {
            Some((interval, phase)) => {
                let at = epoch + phase + interval.mul_f64(seq as f64);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                at
            }
            None => Instant::now(),
        };
        // A sender that fell behind its schedule does not send past the end.
        if Instant::now() >= end {
            break;
        }
        seq += 1;
        let intended_ns = intended.saturating_duration_since(epoch).as_nanos() as u64;
        let body = Stamp {
            run: shared.run,
            sender: me,
            seq,
            intended_ns,
        }
        .encode(body_size);
        match tokio::time::timeout(SEND_TIMEOUT, sender.send(to, seq, body)).await {
            Ok(Ok(())) => {
                log.accepted(seq, Target::User(to), &shared.node);
                shared.ledger.sent(me, seq, &[to]);
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                if intended_ns >= shared.warmup_ns {
                    in_window += 1;
                }
            }
            Ok(Err(e)) => {
                log.failed += 1;
                shared.error(format!("send: {e:#}"));
                break;
            }
            Err(_) => {
                log.failed += 1;
                shared.error("send: not accepted in time");
                break;
            }
        }
    }
    (log, in_window)
}

/// A throw-away PKI for a peer: a CA and a server certificate for `localhost` and
/// `127.0.0.1`, signed by it.
pub(crate) struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_pem: String,
    pub key_der: Vec<u8>,
}

impl Pki {
    pub(crate) fn generate() -> anyhow::Result<Self> {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "messenger-loadtest peer CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
        let mut leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "messenger-loadtest peer");
        leaf_params.use_authority_key_identifier_extension = true;
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
        Ok(Self {
            ca_pem: ca.pem(),
            ca_der: ca.der().clone(),
            cert_pem: leaf.pem(),
            cert_der: leaf.der().clone(),
            key_pem: leaf_key.serialize_pem(),
            key_der: leaf_key.serialize_der(),
        })
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key_der.clone()).into()
    }

    /// A client configuration (aws-lc-rs provider) trusting only this CA.
    pub(crate) fn client_config(
        &self,
        alpn: Option<&[u8]>,
    ) -> anyhow::Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        if let Some(alpn) = alpn {
            config.alpn_protocols = vec![alpn.to_vec()];
        }
        Ok(config)
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}
