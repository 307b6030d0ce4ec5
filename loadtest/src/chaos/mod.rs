//! `messenger-loadtest chaos`: the soak anyone can run. It starts a local cluster (three
//! `messengerd` on PostgreSQL and Redis behind HAProxy) and, for the single-node fault, one
//! `messengerd` on SQLite; then, round after round, it drives direct-pairs traffic through
//! the front door, injects the next fault mid-traffic, recovers, lets deliveries drain and has
//! the checker judge the round. It ends with a table per fault and fails when anything
//! accepted was lost, doubled, reordered or misdelivered.

pub mod cluster;
pub mod faults;
pub mod probe;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use messenger_protocol::client::Trust;
use serde::Serialize;

use crate::fleet::FleetOptions;
use crate::scenarios::{self, Outcome, Params};
use cluster::{Cluster, LaunchOptions, PostgresChoice, SingleNode};
use faults::{CpuHog, Fault};
use probe::Probe;

/// The command line of `messenger-loadtest chaos` (with the global `--rate` and `--json`).
#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Fault rounds to run; the faults are taken in turn.
    #[arg(long, default_value_t = 14)]
    pub rounds: usize,
    /// Faults to cycle through.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,freeze,redis-1s,redis-10s,postgres-5s,rolling,single-kill"
    )]
    pub faults: Vec<Fault>,
    /// Keep every core busy (one busy loop per core) for the whole soak.
    #[arg(long)]
    pub cpu_hog: bool,
    /// Users in pairs, each sending to its partner.
    #[arg(long, default_value_t = 50)]
    pub pairs: u32,
    /// Messages per round (at --rate); default: enough to outlast the round's fault.
    #[arg(long)]
    pub messages_per_round: Option<u64>,
    /// The daemon binary (default: `messengerd` next to this executable).
    #[arg(long)]
    pub messengerd: Option<PathBuf>,
    /// The HAProxy configuration the cluster runs behind.
    #[arg(long, default_value = "deploy/haproxy.cfg")]
    pub haproxy_cfg: PathBuf,
    /// `throwaway` (a PostgreSQL server of the soak's own, which the postgres fault stops),
    /// `server` (the one on 127.0.0.1:5432) or an admin URL `postgres://.../postgres`.
    #[arg(long, default_value = "throwaway")]
    pub postgres: PostgresChoice,
    /// Keep the state dirs (logs, data) and the database at the end.
    #[arg(long)]
    pub keep: bool,
}

/// Everything a soak needs, for the command line and for tests.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub rounds: usize,
    pub faults: Vec<Fault>,
    pub cpu_hog: bool,
    /// Messages per second over all senders.
    pub rate: f64,
    pub pairs: u32,
    pub messages_per_round: Option<u64>,
    pub launch: LaunchOptions,
    /// Traffic before the fault is injected.
    pub lead_in: Duration,
    /// Traffic after the fault's span.
    pub tail: Duration,
    /// How long deliveries may take to arrive after sending stops.
    pub drain: Duration,
    /// A round whose front door does not serve a new client within this is a failure.
    pub served_limit: Duration,
    /// One line per round on stderr.
    pub verbose: bool,
}

impl SoakOptions {
    pub fn new(launch: LaunchOptions) -> Self {
        Self {
            rounds: 14,
            faults: Fault::ALL.to_vec(),
            cpu_hog: false,
            rate: 1000.0,
            pairs: 50,
            messages_per_round: None,
            launch,
            lead_in: Duration::from_millis(1500),
            tail: Duration::from_millis(1500),
            drain: Duration::from_secs(30),
            served_limit: Duration::from_secs(60),
            verbose: true,
        }
    }
}

/// What one round did and what the checker said.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub round: usize,
    pub fault: Fault,
    pub accepted: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub misdelivered: u64,
    /// Stored although the sender never saw `Sent` (reported, not an error).
    pub unconfirmed: u64,
    pub failed_sends: u64,
    /// Connections the traffic's clients saw closed (and resumed): proof the fault hit them.
    pub reconnects: u64,
    /// `messengerd` starts during the round (restarts after a kill, a rolling restart).
    pub node_starts: u32,
    /// From the fault's injection until a new client could sign in and exchange a message
    /// through the front door; `None`: not within the limit.
    pub served_again_ms: Option<u64>,
    pub traffic_secs: f64,
    pub round_secs: f64,
    /// A step of the round that failed (the deployment is then started afresh).
    pub error: Option<String>,
}

impl RoundRecord {
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.misdelivered == 0
            && self.served_again_ms.is_some()
            && self.error.is_none()
    }

    fn failed(round: usize, fault: Fault, error: String) -> Self {
        Self {
            round,
            fault,
            accepted: 0,
            delivered: 0,
            lost: 0,
            duplicated: 0,
            reordered: 0,
            misdelivered: 0,
            unconfirmed: 0,
            failed_sends: 0,
            reconnects: 0,
            node_starts: 0,
            served_again_ms: None,
            traffic_secs: 0.0,
            round_secs: 0.0,
            error: Some(error),
        }
    }
}

/// The CLI entry: runs the soak, prints the table, writes `--json`; true when clean.
pub async fn run(
    args: &ChaosArgs,
    rate: Option<f64>,
    json: Option<PathBuf>,
) -> anyhow::Result<bool> {
    let messengerd = match &args.messengerd {
        Some(p) => p.clone(),
        None => cluster::default_messengerd()?,
    };
    let mut launch = LaunchOptions::new(messengerd, args.haproxy_cfg.clone());
    launch.postgres = args.postgres.clone();
    launch.keep = args.keep;
    let mut opts = SoakOptions::new(launch);
    opts.rounds = args.rounds;
    opts.faults = args.faults.clone();
    opts.cpu_hog = args.cpu_hog;
    opts.pairs = args.pairs.max(1);
    opts.messages_per_round = args.messages_per_round;
    if let Some(rate) = rate {
        anyhow::ensure!(rate > 0.0, "--rate must be positive");
        opts.rate = rate;
    }
    let started = Instant::now();
    let mut rounds = Vec::new();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = tokio::select! {
        r = soak(&opts, &mut rounds) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    // Everything the soak started is gone by now (dropped with its future).
    print!("{}", table(&rounds));
    println!(
        "{} rounds in {:.0} s{}",
        rounds.len(),
        started.elapsed().as_secs_f64(),
        if opts.cpu_hog {
            " with a CPU hog on every core"
        } else {
            ""
        }
    );
    if let Some(path) = json {
        let doc = serde_json::json!({ "rounds": rounds, "faults": summarize(&rounds) });
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    result?;
    Ok(rounds.iter().all(RoundRecord::clean) && rounds.len() == opts.rounds)
}

/// The deployments rounds run on, started when first needed and kept across rounds (the
/// fleet's accounts and session tokens with them); one that a round left broken is replaced.
#[derive(Default)]
struct Deployments {
    cluster: Option<(Cluster, Probe)>,
    single: Option<(SingleNode, Probe)>,
}

/// Runs the rounds, appending each one's record to `rounds` as it ends (so an interrupted
/// soak still has its finished rounds).
pub async fn soak(opts: &SoakOptions, rounds: &mut Vec<RoundRecord>) -> anyhow::Result<()> {
    anyhow::ensure!(!opts.faults.is_empty(), "no faults to inject");
    if opts.faults.contains(&Fault::Postgres5s) {
        anyhow::ensure!(
            opts.launch.postgres == PostgresChoice::Throwaway,
            "the postgres-5s fault stops PostgreSQL: it needs --postgres throwaway"
        );
    }
    let _hog = if opts.cpu_hog {
        let hog = CpuHog::start().context("starting the CPU hog")?;
        eprintln!("chaos: {} busy loops running", hog.len());
        Some(hog)
    } else {
        None
    };
    let mut deployments = Deployments::default();
    for round in 0..opts.rounds {
        let fault = opts.faults[round % opts.faults.len()];
        let started = Instant::now();
        let mut record = match one_round(opts, &mut deployments, round, fault).await {
            Ok(record) => record,
            Err(e) => {
                // Whatever state it is in, the next round gets a fresh one.
                if fault.single_node() {
                    deployments.single = None;
                } else {
                    deployments.cluster = None;
                }
                RoundRecord::failed(round, fault, format!("{e:#}"))
            }
        };
        record.round_secs = started.elapsed().as_secs_f64();
        if opts.verbose {
            eprintln!("{}", round_line(&record, opts.rounds));
        }
        rounds.push(record);
    }
    Ok(())
}

fn round_line(r: &RoundRecord, total: usize) -> String {
    let served = r.served_again_ms.map_or("never".to_string(), |ms| {
        format!("{:.1} s", ms as f64 / 1000.0)
    });
    let mut line = format!(
        "round {}/{} {}: accepted {} delivered {} lost {} dup {} reordered {} misdelivered {} \
         unconfirmed {} reconnects {} starts {} served again {served} ({:.1} s)",
        r.round + 1,
        total,
        r.fault,
        r.accepted,
        r.delivered,
        r.lost,
        r.duplicated,
        r.reordered,
        r.misdelivered,
        r.unconfirmed,
        r.reconnects,
        r.node_starts,
        r.round_secs
    );
    if let Some(e) = &r.error {
        line.push_str(&format!(" ERROR: {e}"));
    }
    line
}

async fn one_round(
    opts: &SoakOptions,
    deployments: &mut Deployments,
    round: usize,
    fault: Fault,
) -> anyhow::Result<RoundRecord> {
    let traffic_secs = traffic_time(opts, fault);
    if fault.single_node() {
        if deployments.single.is_none() {
            let single = SingleNode::start(&opts.launch).await?;
            let probe =
                Probe::prepare(single.address().to_string(), trust(&single.ca), "chaos").await?;
            deployments.single = Some((single, probe));
        }
        let Some((single, probe)) = deployments.single.as_mut() else {
            anyhow::bail!("no single node");
        };
        let starts = single.node.starts;
        let params = params(
            opts,
            single.address().to_string(),
            &single.ca,
            single.dir().join("tokens.json"),
            traffic_secs,
        );
        let (traffic, served) = with_traffic(opts, params, probe, async {
            let t0 = Instant::now();
            faults::inject_single(single);
            Ok(t0)
        })
        .await?;
        faults::recover_single(single).await?;
        let outcome = traffic.join().await??;
        let served = served.join().await?;
        let starts = single.node.starts - starts;
        return Ok(record(round, fault, &outcome, starts, served, traffic_secs));
    }
    if deployments.cluster.is_none() {
        let cluster = Cluster::start(&opts.launch).await?;
        if opts.verbose {
            eprintln!(
                "chaos: cluster up behind {} (state in {}, database {})",
                cluster.address,
                cluster.dir().display(),
                cluster.database()
            );
        }
        let probe =
            Probe::prepare(cluster.address.to_string(), trust(&cluster.ca), "chaos").await?;
        deployments.cluster = Some((cluster, probe));
    }
    let Some((cluster, probe)) = deployments.cluster.as_mut() else {
        anyhow::bail!("no cluster");
    };
    cluster.heal().await?;
    let starts: u32 = cluster.nodes.iter().map(|n| n.starts).sum();
    let params = params(
        opts,
        cluster.address.to_string(),
        &cluster.ca,
        cluster.dir().join("tokens.json"),
        traffic_secs,
    );
    let (traffic, served) = with_traffic(opts, params, probe, async {
        let t0 = Instant::now();
        faults::inject(fault, cluster, round).await?;
        Ok(t0)
    })
    .await?;
    faults::recover(fault, cluster, round).await?;
    let outcome = traffic.join().await??;
    let served = served.join().await?;
    cluster.heal().await?;
    let starts = cluster.nodes.iter().map(|n| n.starts).sum::<u32>() - starts;
    Ok(record(round, fault, &outcome, starts, served, traffic_secs))
}

/// A spawned task that is aborted when dropped: a round that fails half-way leaves no traffic
/// or probe running into the next one.
struct Task<T>(tokio::task::JoinHandle<T>);

impl<T> Task<T> {
    async fn join(mut self) -> anyhow::Result<T> {
        (&mut self.0).await.context("task panicked")
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type TrafficTask = Task<anyhow::Result<Outcome>>;
type ProbeTask = Task<Option<Duration>>;

/// Starts the traffic; once its users are connected and it has sent for the lead-in, runs
/// `inject` (which returns the moment of the fault) and starts probing for service from then.
async fn with_traffic(
    opts: &SoakOptions,
    params: Params,
    probe: &Probe,
    inject: impl std::future::Future<Output = anyhow::Result<Instant>>,
) -> anyhow::Result<(TrafficTask, ProbeTask)> {
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let pairs = opts.pairs;
    let traffic = Task(tokio::spawn(async move {
        direct_pairs(&params, pairs, connected_tx).await
    }));
    tokio::select! {
        connected = connected_rx => if connected.is_err() {
            // The task ended before its users connected: its error says why.
            traffic.join().await??;
            anyhow::bail!("the traffic ended before it started");
        },
        _ = tokio::time::sleep(cluster::WAIT) => anyhow::bail!("the users did not connect within {:?}", cluster::WAIT),
    }
    tokio::time::sleep(opts.lead_in).await;
    let t0 = inject.await?;
    let probe = probe.clone();
    let limit = opts.served_limit;
    let served = Task(tokio::spawn(
        async move { probe.served_again(t0, limit).await },
    ));
    Ok((traffic, served))
}

/// `scenarios::direct` with a signal once every user is connected, so the fault lands in the
/// middle of the sending rather than among the sign-ins.
async fn direct_pairs(
    params: &Params,
    pairs: u32,
    connected: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<Outcome> {
    let (members, connect) = scenarios::connect_members(params, 0, pairs * 2).await?;
    let plan = scenarios::pair_plan(&members, 0, pairs);
    let _ = connected.send(());
    let mut outcome = scenarios::run_messaging("direct", params, members, plan, Vec::new()).await?;
    outcome.connect = Some(connect);
    Ok(outcome)
}

/// How long a round's sending takes at the nominal rate: `--messages-per-round` at the rate,
/// or enough to cover the lead-in, the fault and a tail. The round itself is bounded by the
/// message count this implies (see `params`), so a busy machine sends the same messages, later.
fn traffic_time(opts: &SoakOptions, fault: Fault) -> Duration {
    match opts.messages_per_round {
        Some(messages) => Duration::from_secs_f64(messages as f64 / opts.rate),
        None => opts.lead_in + fault.span() + opts.tail,
    }
}

fn trust(ca: &std::path::Path) -> Trust {
    Trust::CaFile(ca.to_path_buf())
}

fn params(
    opts: &SoakOptions,
    target: String,
    ca: &std::path::Path,
    token_cache: PathBuf,
    traffic: Duration,
) -> Params {
    Params {
        fleet: FleetOptions {
            targets: vec![target],
            trust: trust(ca),
            prefix: "chaos".into(),
            source_ips: Vec::new(),
            connect_concurrency: 32,
            ramp_gap: Duration::ZERO,
            // Accounts are made in the first round; later rounds resume by token, cheaply.
            token_cache: Some(token_cache),
            // Real clients notice a dead peer by its missing Pong.
            ping_interval: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            event_buffer: 1024,
        },
        rate: Some(opts.rate),
        // Each sender sends its share of the round's messages; the duration is only a cap.
        messages_per_sender: Some(
            ((opts.rate * traffic.as_secs_f64()) / (2 * opts.pairs.max(1)) as f64).ceil() as u64,
        ),
        duration: traffic * 3 + Duration::from_secs(30),
        warmup: Duration::ZERO,
        drain: opts.drain,
        body_size: 100,
        daemon_pid: None,
        progress: false,
        accepted: None,
        // Accounts are reused across rounds: earlier rounds' stamps are stale leftovers.
        foreign_since_unix_ms: None,
    }
}

fn record(
    round: usize,
    fault: Fault,
    outcome: &Outcome,
    node_starts: u32,
    served: Option<Duration>,
    traffic: Duration,
) -> RoundRecord {
    let c = &outcome.check;
    let reconnects = outcome
        .errors
        .iter()
        .filter(|(k, _)| k.starts_with("receive: connection closed"))
        .map(|(_, n)| n)
        .sum();
    RoundRecord {
        round,
        fault,
        accepted: c.accepted_messages,
        delivered: c.delivered,
        lost: c.lost,
        duplicated: c.duplicates,
        reordered: c.reordered,
        misdelivered: c.misdelivered + c.foreign,
        unconfirmed: c.unconfirmed,
        failed_sends: c.failed_sends,
        reconnects,
        node_starts,
        served_again_ms: served.map(|d| d.as_millis() as u64),
        traffic_secs: traffic.as_secs_f64(),
        round_secs: 0.0,
        error: None,
    }
}

/// One fault's rounds added up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultSummary {
    pub rounds: usize,
    pub failed_rounds: usize,
    pub accepted: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub misdelivered: u64,
    pub unconfirmed: u64,
    pub reconnects: u64,
    pub served_again_p50_ms: Option<u64>,
    pub served_again_max_ms: Option<u64>,
}

pub fn summarize(rounds: &[RoundRecord]) -> BTreeMap<Fault, FaultSummary> {
    let mut by_fault: BTreeMap<Fault, (FaultSummary, Vec<u64>)> = BTreeMap::new();
    for r in rounds {
        let (s, served) = by_fault.entry(r.fault).or_default();
        s.rounds += 1;
        s.failed_rounds += usize::from(!r.clean());
        s.accepted += r.accepted;
        s.delivered += r.delivered;
        s.lost += r.lost;
        s.duplicated += r.duplicated;
        s.reordered += r.reordered;
        s.misdelivered += r.misdelivered;
        s.unconfirmed += r.unconfirmed;
        s.reconnects += r.reconnects;
        served.extend(r.served_again_ms);
    }
    by_fault
        .into_iter()
        .map(|(fault, (mut s, mut served))| {
            served.sort_unstable();
            s.served_again_p50_ms = served.get(served.len().saturating_sub(1) / 2).copied();
            s.served_again_max_ms = served.last().copied();
            (fault, s)
        })
        .collect()
}

/// The soak's verdict as a table, one row per fault and a total.
pub fn table(rounds: &[RoundRecord]) -> String {
    let secs = |ms: Option<u64>| ms.map_or("-".to_string(), |ms| format!("{:.1}", ms as f64 / 1e3));
    let mut out = format!(
        "{:<12} {:>6} {:>6} {:>9} {:>9} {:>5} {:>5} {:>7} {:>7} {:>7} {:>10} {:>8} {:>8}\n",
        "fault",
        "rounds",
        "failed",
        "accepted",
        "delivered",
        "lost",
        "dup",
        "reorder",
        "misdel",
        "unconf",
        "reconnects",
        "served50",
        "servedmx"
    );
    let summary = summarize(rounds);
    let mut total = FaultSummary::default();
    for (fault, s) in &summary {
        out.push_str(&format!(
            "{:<12} {:>6} {:>6} {:>9} {:>9} {:>5} {:>5} {:>7} {:>7} {:>7} {:>10} {:>8} {:>8}\n",
            fault.name(),
            s.rounds,
            s.failed_rounds,
            s.accepted,
            s.delivered,
            s.lost,
            s.duplicated,
            s.reordered,
            s.misdelivered,
            s.unconfirmed,
            s.reconnects,
            secs(s.served_again_p50_ms),
            secs(s.served_again_max_ms),
        ));
        total.rounds += s.rounds;
        total.failed_rounds += s.failed_rounds;
        total.accepted += s.accepted;
        total.delivered += s.delivered;
        total.lost += s.lost;
        total.duplicated += s.duplicated;
        total.reordered += s.reordered;
        total.misdelivered += s.misdelivered;
        total.unconfirmed += s.unconfirmed;
        total.reconnects += s.reconnects;
    }
    out.push_str(&format!(
        "{:<12} {:>6} {:>6} {:>9} {:>9} {:>5} {:>5} {:>7} {:>7} {:>7} {:>10}\n",
        "total",
        total.rounds,
        total.failed_rounds,
        total.accepted,
        total.delivered,
        total.lost,
        total.duplicated,
        total.reordered,
        total.misdelivered,
        total.unconfirmed,
        total.reconnects,
    ));
    for r in rounds.iter().filter(|r| !r.clean()) {
        out.push_str(&format!("FAILED {}\n", round_line(r, rounds.len())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(fault: Fault, lost: u64, served_ms: Option<u64>) -> RoundRecord {
        RoundRecord {
            accepted: 100,
            delivered: 100 - lost,
            lost,
            served_again_ms: served_ms,
            error: None,
            ..RoundRecord::failed(0, fault, String::new())
        }
    }

    #[test]
    fn a_round_fails_on_a_loss_on_no_service_or_on_an_error() {
        assert!(round(Fault::Kill, 0, Some(10)).clean());
        assert!(!round(Fault::Kill, 1, Some(10)).clean());
        assert!(!round(Fault::Kill, 0, None).clean());
        assert!(!RoundRecord::failed(0, Fault::Kill, "boom".into()).clean());
    }

    #[test]
    fn the_summary_adds_up_per_fault_with_served_again_median_and_max() {
        let rounds = vec![
            round(Fault::Kill, 0, Some(300)),
            round(Fault::Kill, 2, Some(100)),
            round(Fault::Kill, 0, Some(200)),
            round(Fault::Freeze, 0, None),
        ];
        let s = summarize(&rounds);
        let kill = &s[&Fault::Kill];
        assert_eq!(kill.rounds, 3);
        assert_eq!(kill.failed_rounds, 1);
        assert_eq!(kill.accepted, 300);
        assert_eq!(kill.lost, 2);
        assert_eq!(kill.served_again_p50_ms, Some(200));
        assert_eq!(kill.served_again_max_ms, Some(300));
        assert_eq!(s[&Fault::Freeze].failed_rounds, 1);
        assert_eq!(s[&Fault::Freeze].served_again_max_ms, None);
        let table = table(&rounds);
        assert!(table.contains("FAILED"), "{table}");
    }

    #[test]
    fn faults_parse_by_their_names() {
        for f in Fault::ALL {
            assert_eq!(f.name().parse::<Fault>(), Ok(f));
        }
        assert!("nap".parse::<Fault>().is_err());
    }
}
