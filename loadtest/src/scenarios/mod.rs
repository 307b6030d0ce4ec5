//! Scenarios: each builds its users and a sending plan, then `run_messaging` drives it and
//! measures. `idle` and `storm` measure connections and catch-up instead; `attack` runs
//! `direct` twice, alone and under attack.

pub mod attack;
pub mod direct;
pub mod group;
pub mod idle;
pub mod mixed;
pub mod storm;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use messenger_protocol::client::Recipient;
use messenger_protocol::pb;
use serde::Serialize;
use std::collections::HashMap;

use crate::checker::{self, CheckReport, Target};
pub use crate::drive::Sender;
use crate::drive::{self, Pace, Run};
use crate::fleet::{ConnectStats, FleetOptions, Member};
use crate::stats::{self, LatencySummary, ProcSample, ResourceUse};

/// Options every scenario shares.
#[derive(Debug, Clone)]
pub struct Params {
    pub fleet: FleetOptions,
    /// Total messages per second over all senders (open loop); `None`: closed loop.
    pub rate: Option<f64>,
    /// How long senders send; with `messages_per_sender`, only an upper limit.
    pub duration: Duration,
    /// When set, each sender sends exactly this many messages (accepted or failed) and the
    /// run ends once every sender is done: traffic bounded by count, not by time.
    pub messages_per_sender: Option<u64>,
    /// When set, every accepted message of the run is also counted here, so a caller can act
    /// on progress — inject a fault after K accepted messages — instead of after N seconds.
    /// Give each run a fresh counter (or read it relative to its value at the start).
    pub accepted: Option<Arc<AtomicU64>>,
    /// A stamp of another run that the server stored at or after this wall-clock time (ms
    /// since the Unix epoch) is a cross-delivery, counted as `foreign`; earlier ones are
    /// leftovers of earlier runs (`stale`). Default: when the run begins. A caller whose
    /// accounts are fresh (a new database) passes `Some(0)`: any other run's stamp crossed over.
    pub foreign_since_unix_ms: Option<i64>,
    pub warmup: Duration,
    pub drain: Duration,
    pub body_size: usize,
    pub daemon_pid: Option<u32>,
    pub progress: bool,
}

/// What a scenario measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub users: u64,
    pub connections: u64,
    pub measured_secs: f64,
    pub sent: u64,
    pub accepted: u64,
    pub delivered: u64,
    pub accepted_per_s: f64,
    pub delivered_per_s: f64,
    /// Send (intended time) to delivery, per recipient.
    pub latency: LatencySummary,
    /// Send to the last recipient having it, per message (group fan-out).
    pub completion: Option<LatencySummary>,
    pub connect: Option<ConnectSummary>,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub check: CheckReport,
    pub harness: ResourceUse,
    pub daemon: Option<ResourceUse>,
    /// The daemon's own counters over the run (from its /metrics), when reachable.
    pub daemon_metrics: std::collections::BTreeMap<String, f64>,
    /// Scenario-specific figures (memory per connection, catch-up time, ...).
    pub extra: std::collections::BTreeMap<String, f64>,
    /// `attack` only: both phases, the daemon's memory, what each attack achieved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack: Option<attack::AttackReport>,
    /// p99 latency per second of the run, for the plot.
    #[serde(skip)]
    pub timeline_p99_us: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectSummary {
    pub connections: u64,
    pub per_s: f64,
    pub handshake: LatencySummary,
    pub ready: LatencySummary,
    pub logins: u64,
    pub resumes: u64,
    pub registrations: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl ConnectSummary {
    pub fn of(s: &ConnectStats) -> Self {
        let n = s.ready.len();
        Self {
            connections: n,
            per_s: n as f64 / s.elapsed.as_secs_f64().max(1e-9),
            handshake: LatencySummary::of(&s.handshake),
            ready: LatencySummary::of(&s.ready),
            logins: s.logins,
            resumes: s.resumes,
            registrations: s.registrations,
            errors: s.errors.clone(),
        }
    }
}

/// Samples CPU and memory of the harness and the daemon across a measured window.
pub struct Meter {
    pids: Vec<(u32, ProcSample)>,
    peaks: Vec<u64>,
    start: Instant,
}

impl Meter {
    pub fn start(daemon: Option<u32>) -> Self {
        let mut pids = vec![std::process::id()];
        pids.extend(daemon);
        let samples: Vec<(u32, ProcSample)> = pids
            .into_iter()
            .map(|p| (p, stats::sample(p).unwrap_or_default()))
            .collect();
        let peaks = samples.iter().map(|(_, s)| s.rss_bytes).collect();
        Self {
            pids: samples,
            peaks,
            start: Instant::now(),
        }
    }

    pub fn tick(&mut self) {
        for (i, (pid, _)) in self.pids.iter().enumerate() {
            if let Some(s) = stats::sample(*pid) {
                self.peaks[i] = self.peaks[i].max(s.rss_bytes);
            }
        }
    }

    /// (harness, daemon)
    pub fn finish(&self) -> (ResourceUse, Option<ResourceUse>) {
        let elapsed = self.start.elapsed();
        let mut uses = self.pids.iter().enumerate().map(|(i, (pid, start))| {
            let end = stats::sample(*pid).unwrap_or(*start);
            stats::resource_use(*pid, *start, end, self.peaks[i], elapsed)
        });
        let harness = uses.next().unwrap_or_default();
        (harness, uses.next())
    }
}

/// Drives a sending plan over connected members and checks every delivery.
pub async fn run_messaging(
    name: &str,
    params: &Params,
    members: Vec<Member>,
    plan: Vec<Sender>,
    groups: Vec<Vec<u32>>,
) -> anyhow::Result<Outcome> {
    let run = Arc::new(
        Run::new(params.body_size, params.warmup)
            .messages_per_sender(params.messages_per_sender)
            .accepted_into(params.accepted.clone())
            .foreign_since(params.foreign_since_unix_ms),
    );
    let accepted_base = run.accepted.load(Ordering::Relaxed);
    let senders = plan.len().max(1) as f64;
    let pace = match params.rate {
        Some(total) => Pace::Open(total / senders),
        None => Pace::Closed,
    };
    let users = members.len() as u64;
    let mut conns = std::collections::HashMap::new();
    let mut receivers = Vec::new();
    for m in members {
        let (conn_tx, conn_rx) = tokio::sync::watch::channel(m.client.conn().clone());
        conns.insert(m.index, conn_rx);
        receivers.push(tokio::spawn(drive::receive_loop(
            run.clone(),
            m.client,
            m.index,
            conn_tx,
        )));
    }
    let mut sender_tasks = Vec::new();
    for s in plan {
        let Some(conn) = conns.get(&s.sender).cloned() else {
            continue;
        };
        sender_tasks.push(tokio::spawn(drive::send_loop(run.clone(), conn, s, pace)));
    }
    drop(conns);

    let planned = params
        .messages_per_sender
        .map(|n| n * sender_tasks.len() as u64);
    let bar = match planned {
        Some(total) => progress_bar(params.progress, total),
        None => progress_bar(params.progress, params.duration.as_millis() as u64),
    };
    let mut meter = Meter::start(params.daemon_pid);
    let mut measured_start = None;
    let mut measured_accepted = accepted_base;
    let mut measured_delivered = 0;
    let start = Instant::now();
    while start.elapsed() < params.duration {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if planned.is_some() && sender_tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        if measured_start.is_none() && start.elapsed() >= params.warmup {
            measured_start = Some(Instant::now());
            measured_accepted = run.accepted.load(Ordering::Relaxed);
            measured_delivered = run.delivered.load(Ordering::Relaxed);
            meter = Meter::start(params.daemon_pid);
        }
        meter.tick();
        if let Some(b) = &bar {
            b.set_position(match planned {
                Some(_) => run.accepted.load(Ordering::Relaxed) - accepted_base,
                None => start.elapsed().as_millis() as u64,
            });
            b.set_message(progress_line(&run, accepted_base, start.elapsed()));
        }
    }
    // A count-bounded run may end before its warm-up did: then the whole run is measured.
    let measured = measured_start.unwrap_or(start).elapsed();
    let accepted_in_window = run.accepted.load(Ordering::Relaxed) - measured_accepted;
    let delivered_in_window = run.delivered.load(Ordering::Relaxed) - measured_delivered;
    let (harness, daemon) = meter.finish();
    run.stop_sending.cancel();
    let mut sender_logs = Vec::new();
    for t in sender_tasks {
        sender_logs.push(t.await?);
    }
    run.drain(params.drain).await;
    run.stop_receiving.cancel();
    let mut receiver_logs = Vec::new();
    for t in receivers {
        let (log, client) = t.await?;
        receiver_logs.push(log);
        client.close().await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let (check, completion) = checker::check(run.id, &sender_logs, &receiver_logs, &groups);
    let latency = drive::merged_latency(&run);
    let timeline = run
        .timeline
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(s, h)| (s as f64, h.value_at_quantile(0.99)))
        .collect();
    let secs = measured.as_secs_f64();
    Ok(Outcome {
        scenario: name.to_string(),
        users,
        connections: users,
        measured_secs: secs,
        sent: run.sent.load(Ordering::Relaxed),
        accepted: run.accepted.load(Ordering::Relaxed) - accepted_base,
        delivered: run.delivered.load(Ordering::Relaxed),
        accepted_per_s: accepted_in_window as f64 / secs,
        delivered_per_s: delivered_in_window as f64 / secs,
        latency: LatencySummary::of(&latency),
        completion: if groups.is_empty() {
            None
        } else {
            Some(LatencySummary::of(&completion))
        },
        connect: None,
        errors: run.errors.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        check,
        harness,
        daemon,
        extra: Default::default(),
        attack: None,
        daemon_metrics: Default::default(),
        timeline_p99_us: timeline,
    })
}

/// A bar of `len` steps (milliseconds of a timed run, messages of a counted one).
pub fn progress_bar(enabled: bool, len: u64) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed:>4} [{bar:20}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}

fn progress_line(run: &Run, accepted_base: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let p99 = run
        .timeline
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .rev()
        .nth(1)
        .filter(|h| !h.is_empty())
        .map(|h| stats::ms(h.value_at_quantile(0.99)))
        .unwrap_or_else(|| "-".into());
    format!(
        "accepted {:.0}/s  delivered {:.0}/s  p99(last s) {p99}  errors {}",
        (run.accepted.load(Ordering::Relaxed) - accepted_base) as f64 / secs,
        run.delivered.load(Ordering::Relaxed) as f64 / secs,
        run.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum::<u64>()
    )
}

/// Shared by scenarios that log their users in before driving them.
pub async fn connect_members(
    params: &Params,
    first: u32,
    count: u32,
) -> anyhow::Result<(Vec<Member>, ConnectSummary)> {
    let bar = if params.progress {
        let b = indicatif::ProgressBar::new(u64::from(count));
        b.set_style(
            indicatif::ProgressStyle::with_template("connecting {pos}/{len} [{bar:20}] {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let (members, stats) =
        crate::fleet::connect(&params.fleet, first, count, 1, bar.as_ref()).await?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((members, ConnectSummary::of(&stats)))
}

/// Users `first..first + 2 * pairs` in pairs (2i, 2i+1), each sending to its partner.
pub fn pair_plan(members: &[Member], first: u32, pairs: u32) -> Vec<Sender> {
    let ids: HashMap<u32, u64> = members.iter().map(|m| (m.index, m.user_id)).collect();
    (first..first + pairs * 2)
        .filter(|i| ids.contains_key(i))
        .filter_map(|i| {
            let partner = first + ((i - first) ^ 1);
            ids.get(&partner).map(|&partner_id| Sender {
                sender: i,
                target: Target::User(partner),
                to: Recipient::User(partner_id),
                owed_to: vec![partner],
            })
        })
        .collect()
}

/// Creates `groups` groups of `size` consecutive users starting at `first` (the first member
/// creates each and is its admin); `senders` members of each send to it. Returns the plan and,
/// per group, its member indices (for the checker).
pub async fn group_plan(
    members: &[Member],
    first: u32,
    groups: u32,
    size: u32,
    senders: u32,
    name: &str,
) -> anyhow::Result<(Vec<Sender>, Vec<Vec<u32>>)> {
    let by_index: HashMap<u32, &Member> = members.iter().map(|m| (m.index, m)).collect();
    let mut plan = Vec::new();
    let mut group_members = Vec::new();
    for g in 0..groups {
        let base = first + g * size;
        let indices: Vec<u32> = (base..base + size)
            .filter(|i| by_index.contains_key(i))
            .collect();
        let Some(admin) = indices.first().and_then(|i| by_index.get(i)) else {
            continue;
        };
        let others: Vec<u64> = indices[1..]
            .iter()
            .filter_map(|i| by_index.get(i).map(|m| m.user_id))
            .collect();
        // Accounts accept group additions from their contacts only by default; load-test
        // accounts are strangers to each other, so each member opens up first.
        for i in &indices[1..] {
            if let Some(m) = by_index.get(i) {
                m.client
                    .conn()
                    .set_group_add_policy(pb::GroupAddPolicy::Anyone)
                    .await?;
            }
        }
        let group = admin
            .client
            .conn()
            .create_group(&format!("{name}-{g}"), &others)
            .await?;
        for &i in indices.iter().take(senders.max(1) as usize) {
            plan.push(Sender {
                sender: i,
                target: Target::Group(group_members.len() as u32),
                to: Recipient::Group(group.group_id),
                owed_to: indices.iter().copied().filter(|&m| m != i).collect(),
            });
        }
        group_members.push(indices);
    }
    Ok((plan, group_members))
}
