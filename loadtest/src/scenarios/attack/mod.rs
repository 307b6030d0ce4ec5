//! `attack`: the audit's attacks (issue 11) against a running daemon, judged by what a
//! bystander sees. Phase A runs the `direct` workload alone (the baseline); phase B runs the
//! same workload, with the same bounds, while the chosen attacks run from other loopback
//! addresses. The report puts the bystanders' latency of both phases side by side (and the
//! ratio of their p99s), checks both phases' deliveries with the checker, counts the
//! bystanders' own cookie logins and the admin `/healthz` answers in each phase, samples the
//! daemon's resident memory (before, peak per phase, after), and counts what each attack
//! achieved, in the harness's eyes and in the daemon's counters.
//!
//! Each attack is a loop: the floods the daemon paces itself (large messages to stalled
//! readers) go as fast as it accepts; the rest at `--attack-rate` operations per second each.

mod attackers;
mod probes;
mod raw;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::task::JoinHandle;

use super::{Outcome, Params, connect_members, pair_plan, run_messaging};
use crate::checker::{CheckReport, NAMED_PAIRS};
use crate::daemon_metrics;
use crate::fleet::{self, FleetOptions, Member};
use crate::stats::{self, LatencySummary};
use attackers::Ctx;
use probes::{HealthProbe, LoginProbe};

/// One of the audit's attacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Every attack below (admin only when the admin address answers).
    All,
    /// Raw connections with a tiny receive buffer sign in and stop reading while other
    /// accounts flood them with large messages (F1).
    SlowReaders,
    /// Unauthenticated connections send most of a frame and fall silent (F2).
    HalfFrames,
    /// One device resumes over and over, each connection replacing the last (F1).
    ResumeStorm,
    /// Wrong passwords for the bystanders' accounts (F6).
    Lockout,
    /// Resumes with made-up tokens (F9).
    InvalidResumes,
    /// Idle connections to the admin port (F5).
    Admin,
    /// One account looks up user ids 1, 2, 3, ... (F10).
    Lookups,
    /// Connections that say Hello and never sign in, from many addresses (F4).
    Connections,
}

impl Attack {
    const EACH: [Attack; 8] = [
        Attack::SlowReaders,
        Attack::HalfFrames,
        Attack::ResumeStorm,
        Attack::Lockout,
        Attack::InvalidResumes,
        Attack::Admin,
        Attack::Lookups,
        Attack::Connections,
    ];

    /// The list with `all` expanded, each once.
    pub fn expand(list: &[Attack]) -> Vec<Attack> {
        let mut out: Vec<Attack> = if list.is_empty() || list.contains(&Attack::All) {
            Self::EACH.to_vec()
        } else {
            list.to_vec()
        };
        out.sort();
        out.dedup();
        out
    }
}

/// The knobs of `attack` (the bystanders' rate, bounds and warm-up are the global ones).
#[derive(Debug, Clone)]
pub struct AttackOptions {
    /// Bystander pairs (users 0..2*pairs of the global prefix).
    pub pairs: u32,
    pub attacks: Vec<Attack>,
    /// Attacker source addresses, after the bystanders' (127.0.0.2... by default).
    pub attack_ips: usize,
    pub slow_readers: u32,
    pub flooders: u32,
    pub flood_body: usize,
    pub half_frames: usize,
    pub connections: usize,
    pub admin_connections: usize,
    /// Operations per second of each paced attack (0: unpaced).
    pub attack_rate: f64,
    /// Bystander accounts whose own devices log in with their cookies during each phase.
    pub probe_accounts: u32,
    /// Cookie logins per phase (count-bounded, one every 500 ms).
    pub probe_logins: u64,
    /// The daemon's admin address (for `/healthz`, `/metrics` and the admin attack).
    pub admin: String,
    /// How long after the attack the daemon's memory is read again.
    pub settle: Duration,
}

/// One phase as the bystanders saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseReport {
    pub measured_secs: f64,
    pub accepted: u64,
    pub delivered: u64,
    pub latency: LatencySummary,
    pub check: CheckReport,
    pub cookie_logins: LoginProbe,
    /// `None` when the admin address did not answer before the run.
    pub healthz: Option<HealthProbe>,
    pub daemon_rss_peak_mib: Option<f64>,
    /// The daemon's own memory gauges at their highest, when its admin port answered.
    pub daemon_gauges: Option<probes::GaugePeaks>,
}

/// Everything `attack` found, beside the usual outcome (which is phase B's).
#[derive(Debug, Clone, Default, Serialize)]
pub struct AttackReport {
    pub attacks: Vec<Attack>,
    pub attack_sources: Vec<IpAddr>,
    pub baseline: PhaseReport,
    pub attacked: PhaseReport,
    /// p99 of phase B over p99 of phase A (the issue asks for at most 2).
    pub p99_ratio: f64,
    pub daemon_rss_mib_before: Option<f64>,
    pub daemon_rss_mib_after: Option<f64>,
    /// `memory.max_buffered_bytes` as the daemon reports it.
    pub buffered_bytes_budget_mib: Option<f64>,
    /// What each attack achieved, counted by the harness.
    pub attackers: BTreeMap<String, BTreeMap<String, u64>>,
    /// The daemon's counters over phase B (connections refused and shed, sign-ins refused by
    /// budget, error replies by code, ...), when its admin address answered.
    pub daemon_counters: BTreeMap<String, f64>,
    /// Attacks asked for but not run, and why.
    pub skipped: BTreeMap<String, String>,
}

const COUNTER_FAMILIES: &[&str] = &[
    "messenger_connections_shed_total",
    "messenger_connections_refused_total",
    "messenger_connections_accepted_total",
    "messenger_auth_refusals_total",
    "messenger_auth_failures_total",
    "messenger_request_errors_total",
    "messenger_write_stall_disconnects_total",
    "messenger_tls_handshake_failures_total",
    "messenger_catch_up_reads_total",
];

/// The attacker accounts, under their own prefix so a bystander never inherits a flooded
/// inbox. Only the stalled readers' accounts are known by name; the others are signed in when
/// the attack starts, so their own catching up (a flooder's copies of what it sent in earlier
/// runs) happens under attack, not in the baseline.
struct Roles {
    fleet: FleetOptions,
    victims: Vec<(String, u64)>,
    flooders: std::ops::Range<u32>,
    storm: Option<u32>,
    enumerator: Option<u32>,
}

impl Roles {
    /// Signs in the attacker accounts `range` (by token, as the fleet does).
    async fn sign_in(&self, range: std::ops::Range<u32>) -> Vec<Member> {
        if range.is_empty() {
            return Vec::new();
        }
        match fleet::connect(&self.fleet, range.start, range.end - range.start, 1, None).await {
            Ok((members, _)) => members,
            Err(e) => {
                tracing::warn!(error = %e, "attacker accounts could not sign in");
                Vec::new()
            }
        }
    }
}

pub async fn run(params: &Params, opts: &AttackOptions) -> anyhow::Result<Outcome> {
    let mut attacks = Attack::expand(&opts.attacks);
    let mut skipped = BTreeMap::new();
    let admin_up = daemon_metrics::scrape(&opts.admin).await.is_some();
    if !admin_up && attacks.contains(&Attack::Admin) {
        attacks.retain(|a| *a != Attack::Admin);
        skipped.insert(
            "admin".to_string(),
            format!("the admin address {} does not answer", opts.admin),
        );
    }
    let bystander_sources = params.fleet.source_ips.len().max(1);
    let sources: Vec<IpAddr> = fleet::loopback_sources(bystander_sources + opts.attack_ips.max(1))
        .split_off(bystander_sources);
    let budget = scrape_counters(&opts.admin, &["messenger_buffered_bytes_limit"])
        .await
        .and_then(|m| m.get("messenger_buffered_bytes_limit").copied())
        .map(|b| b / 1_048_576.0);

    // Accounts first: bystanders exist (and their probe devices hold cookies) before anything.
    let users = opts.pairs * 2;
    let usernames: Vec<String> = (0..users)
        .map(|i| format!("{}{i}", params.fleet.prefix))
        .collect();
    let mut setup = params.clone();
    // A first run registers every account: no more password hashes at once than the daemon's
    // hash queue takes (later runs resume by token and connect at full speed).
    setup.fleet.connect_concurrency = params.fleet.connect_concurrency.min(4);
    let (members, _) = connect_members(&setup, 0, users).await?;
    anyhow::ensure!(
        members.len() == users as usize,
        "only {} of {users} bystanders could sign in",
        members.len()
    );
    for m in members {
        m.client.close().await;
    }
    let probe_opts = params.fleet.connect_options(0);
    let probe_names: Vec<String> = usernames
        .iter()
        .take(opts.probe_accounts as usize)
        .cloned()
        .collect();
    let cookies = probes::issue_cookies(&probe_opts, &probe_names).await;
    anyhow::ensure!(
        probe_names.is_empty() || !cookies.is_empty(),
        "no bystander could log in to get a login cookie"
    );
    let attacker_fleet = FleetOptions {
        prefix: format!("{}-atk", params.fleet.prefix),
        source_ips: sources.clone(),
        // Registrations hash passwords: more at once than the daemon's hash queue takes are
        // refused, and the fleet does not retry them.
        connect_concurrency: params.fleet.connect_concurrency.min(4),
        ..params.fleet.clone()
    };
    let roles = attacker_accounts(attacker_fleet, &attacks, opts).await?;

    let pid = params.daemon_pid;
    let rss = |p: Option<u32>| p.and_then(stats::sample).map(|s| mib(s.rss_bytes));
    let rss_before = rss(pid);
    let watch = pid.map(probes::RssWatch::start);
    let peak = |w: &Option<probes::RssWatch>| w.as_ref().map(|w| mib(w.take_peak()));

    // Phase A: the bystanders alone.
    if let Some(w) = &watch {
        w.take_peak();
    }
    let (members, _) = connect_members(params, 0, users).await?;
    let (a, mut baseline) = measure(
        "attack-baseline",
        params,
        opts,
        members,
        &cookies,
        admin_up,
        &probe_opts,
    )
    .await?;
    baseline.daemon_rss_peak_mib = peak(&watch);

    // Phase B: the same, under attack.
    let (members, connect) = connect_members(params, 0, users).await?;
    let counters_before = scrape_counters(&opts.admin, COUNTER_FAMILIES).await;
    if let Some(w) = &watch {
        w.take_peak();
    }
    let ctx = Ctx::new(
        params.fleet.connect_options(0),
        sources.clone(),
        opts.attack_rate,
    );
    let tasks = start(&ctx, &attacks, roles, &usernames, opts).await;
    let (b, mut attacked) = measure(
        "attack",
        params,
        opts,
        members,
        &cookies,
        admin_up,
        &probe_opts,
    )
    .await?;
    ctx.stop.cancel();
    for t in tasks {
        // Every attack stops at once when told; a stuck one is not worth waiting for.
        if tokio::time::timeout(Duration::from_secs(10), t)
            .await
            .is_err()
        {
            tracing::warn!("an attacker did not stop within 10 s");
        }
    }
    attacked.daemon_rss_peak_mib = peak(&watch);
    let counters_after = scrape_counters(&opts.admin, COUNTER_FAMILIES).await;
    tokio::time::sleep(opts.settle).await;
    let rss_after = rss(pid);
    drop(watch);

    let daemon_counters = match (counters_before, counters_after) {
        (Some(before), Some(after)) => daemon_metrics::delta(&before, &after)
            .into_iter()
            .filter(|(_, v)| *v != 0.0)
            .collect(),
        _ => BTreeMap::new(),
    };
    let p99_ratio = if baseline.latency.p99_us > 0 {
        attacked.latency.p99_us as f64 / baseline.latency.p99_us as f64
    } else {
        0.0
    };
    let report = AttackReport {
        attacks,
        attack_sources: sources,
        baseline,
        attacked,
        p99_ratio,
        daemon_rss_mib_before: rss_before,
        daemon_rss_mib_after: rss_after,
        buffered_bytes_budget_mib: budget,
        attackers: ctx.tally.snapshot(),
        daemon_counters,
        skipped,
    };
    let mut outcome = b;
    outcome.check = merged(&a.check, &outcome.check);
    outcome.connect = Some(connect);
    outcome.extra = headline(&report);
    outcome.attack = Some(report);
    Ok(outcome)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// The figures a reader wants first, for the human table.
fn headline(r: &AttackReport) -> BTreeMap<String, f64> {
    let ms = |us: u64| us as f64 / 1000.0;
    let mut e = BTreeMap::new();
    e.insert("a_p50_ms".into(), ms(r.baseline.latency.p50_us));
    e.insert("a_p99_ms".into(), ms(r.baseline.latency.p99_us));
    e.insert("a_max_ms".into(), ms(r.baseline.latency.max_us));
    e.insert("b_p50_ms".into(), ms(r.attacked.latency.p50_us));
    e.insert("b_p99_ms".into(), ms(r.attacked.latency.p99_us));
    e.insert("b_max_ms".into(), ms(r.attacked.latency.max_us));
    e.insert("p99_ratio_b_over_a".into(), r.p99_ratio);
    for (phase, p) in [("a", &r.baseline), ("b", &r.attacked)] {
        e.insert(
            format!("{phase}_cookie_logins_ok"),
            p.cookie_logins.succeeded as f64,
        );
        e.insert(
            format!("{phase}_cookie_logins_failed"),
            p.cookie_logins.failed.values().sum::<u64>() as f64,
        );
        if let Some(peak) = p.daemon_rss_peak_mib {
            e.insert(format!("{phase}_daemon_rss_peak_mib"), peak);
        }
        if let Some(v) = p.daemon_gauges.as_ref().and_then(|g| g.buffered_mib) {
            e.insert(format!("{phase}_daemon_buffered_peak_mib"), v);
        }
        if let Some(h) = &p.healthz {
            e.insert(format!("{phase}_healthz_failed"), h.failed as f64);
        }
    }
    if let Some(v) = r.daemon_rss_mib_before {
        e.insert("daemon_rss_before_mib".into(), v);
    }
    if let Some(v) = r.daemon_rss_mib_after {
        e.insert("daemon_rss_after_mib".into(), v);
    }
    if let Some(v) = r.buffered_bytes_budget_mib {
        e.insert("buffered_bytes_budget_mib".into(), v);
    }
    e
}

/// Creates the accounts the chosen attacks need (from the attacker addresses), and leaves.
async fn attacker_accounts(
    fleet_opts: FleetOptions,
    attacks: &[Attack],
    opts: &AttackOptions,
) -> anyhow::Result<Roles> {
    let slow = attacks.contains(&Attack::SlowReaders);
    let victims = if slow { opts.slow_readers } else { 0 };
    let flooders = if slow { opts.flooders.max(1) } else { 0 };
    let storm_at = victims + flooders;
    let lookup_at = storm_at + 1;
    let (members, _) = fleet::connect(&fleet_opts, 0, lookup_at + 1, 1, None).await?;
    let mut roles = Roles {
        fleet: fleet_opts,
        victims: Vec::new(),
        flooders: victims..storm_at,
        storm: attacks.contains(&Attack::ResumeStorm).then_some(storm_at),
        enumerator: attacks.contains(&Attack::Lookups).then_some(lookup_at),
    };
    for m in members {
        if m.index < victims {
            roles.victims.push((m.username.clone(), m.user_id));
        }
        m.client.close().await;
    }
    Ok(roles)
}

/// Starts the attacks; returns once each is under way (the stalled readers signed in, the
/// bystanders' accounts locked for unknown devices).
async fn start(
    ctx: &Ctx,
    attacks: &[Attack],
    mut roles: Roles,
    usernames: &[String],
    opts: &AttackOptions,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for attack in attacks {
        match attack {
            Attack::All => {}
            Attack::SlowReaders => {
                let victims = std::mem::take(&mut roles.victims);
                let flooders = roles.sign_in(roles.flooders.clone()).await;
                tasks.extend(attackers::slow_readers(ctx, victims, flooders, opts.flood_body).await)
            }
            Attack::HalfFrames => tasks.extend(attackers::half_frames(ctx, opts.half_frames)),
            Attack::ResumeStorm => {
                if let Some(i) = roles.storm {
                    tasks.extend(
                        roles
                            .sign_in(i..i + 1)
                            .await
                            .into_iter()
                            .map(|m| attackers::resume_storm(ctx, m)),
                    );
                }
            }
            Attack::Lockout => tasks.push(attackers::lockout(ctx, usernames.to_vec()).await),
            Attack::InvalidResumes => tasks.push(attackers::invalid_resumes(ctx)),
            Attack::Admin => tasks.extend(attackers::admin_exhaustion(
                ctx,
                opts.admin.clone(),
                opts.admin_connections,
            )),
            Attack::Lookups => {
                if let Some(i) = roles.enumerator {
                    tasks.extend(
                        roles
                            .sign_in(i..i + 1)
                            .await
                            .into_iter()
                            .map(|m| attackers::lookups(ctx, m)),
                    );
                }
            }
            Attack::Connections => tasks.extend(attackers::connection_flood(ctx, opts.connections)),
        }
    }
    tasks
}

/// Runs the bystanders' workload once, with their cookie logins and the `/healthz` poll
/// alongside.
async fn measure(
    name: &str,
    params: &Params,
    opts: &AttackOptions,
    members: Vec<Member>,
    cookies: &[probes::CookieAccount],
    admin_up: bool,
    probe_opts: &messenger_protocol::client::ConnectOptions,
) -> anyhow::Result<(Outcome, PhaseReport)> {
    let plan = pair_plan(&members, 0, opts.pairs);
    let stop = tokio_util::sync::CancellationToken::new();
    let health = admin_up.then(|| tokio::spawn(probes::healthz(opts.admin.clone(), stop.clone())));
    let gauges = admin_up.then(|| tokio::spawn(probes::gauges(opts.admin.clone(), stop.clone())));
    let logins = tokio::spawn(probes::cookie_logins(
        probe_opts.clone(),
        cookies.to_vec(),
        opts.probe_logins,
        Duration::from_millis(500),
    ));
    let outcome = run_messaging(name, params, members, plan, Vec::new()).await;
    // The logins are bounded by count: they finish even if the workload ended first.
    let cookie_logins = logins.await?;
    stop.cancel();
    let healthz = match health {
        Some(h) => Some(h.await?),
        None => None,
    };
    let daemon_gauges = match gauges {
        Some(g) => Some(g.await?),
        None => None,
    };
    let outcome = outcome?;
    let report = PhaseReport {
        measured_secs: outcome.measured_secs,
        accepted: outcome.accepted,
        delivered: outcome.delivered,
        latency: outcome.latency.clone(),
        check: outcome.check.clone(),
        cookie_logins,
        healthz,
        daemon_rss_peak_mib: None,
        daemon_gauges,
    };
    Ok((outcome, report))
}

/// The daemon's counters of `prefixes`, retried a few times: right after the admin attack the
/// port may still be at its cap for a moment.
async fn scrape_counters(admin: &str, prefixes: &[&str]) -> Option<BTreeMap<String, f64>> {
    for _ in 0..5 {
        match daemon_metrics::scrape_prefixed(admin, prefixes).await {
            Some(m) if !m.is_empty() => return Some(m),
            None => return None,
            Some(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    None
}

/// Both phases' checks as one verdict (counts added, named pairs kept up to the usual bound).
fn merged(a: &CheckReport, b: &CheckReport) -> CheckReport {
    let join = |x: &Vec<_>, y: &Vec<_>| {
        let mut v: Vec<_> = x.iter().chain(y.iter()).cloned().collect();
        v.truncate(NAMED_PAIRS);
        v
    };
    CheckReport {
        accepted_messages: a.accepted_messages + b.accepted_messages,
        failed_sends: a.failed_sends + b.failed_sends,
        expected_deliveries: a.expected_deliveries + b.expected_deliveries,
        delivered: a.delivered + b.delivered,
        lost: a.lost + b.lost,
        duplicates: a.duplicates + b.duplicates,
        reordered: a.reordered + b.reordered,
        misdelivered: a.misdelivered + b.misdelivered,
        foreign: a.foreign + b.foreign,
        unconfirmed: a.unconfirmed + b.unconfirmed,
        stale: a.stale + b.stale,
        lost_pairs: join(&a.lost_pairs, &b.lost_pairs),
        duplicate_pairs: join(&a.duplicate_pairs, &b.duplicate_pairs),
        reordered_pairs: join(&a.reordered_pairs, &b.reordered_pairs),
        misdelivered_pairs: join(&a.misdelivered_pairs, &b.misdelivered_pairs),
        foreign_pairs: join(&a.foreign_pairs, &b.foreign_pairs),
    }
}
