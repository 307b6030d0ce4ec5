//! `messenger-loadtest`: drives a Messenger daemon (or several, or a balancer) with simulated
//! users, measures throughput, latency and connection cost, and checks that every accepted
//! message reached every intended recipient exactly once and in order. Exits non-zero when the
//! check finds any loss, duplicate, reordering or misdelivery.

use messenger_loadtest::{chaos, daemon_metrics, fleet, payload, peers, report, scenarios, stats};

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use messenger_protocol::client::{Trust, parse_fingerprint};

#[derive(Debug, Parser)]
#[command(
    name = "messenger-loadtest",
    version,
    about = "Load generator and delivery checker for Messenger"
)]
struct Cli {
    /// Daemon address; repeat for several nodes (users are spread round-robin).
    #[arg(long = "target", default_value = "127.0.0.1:7443", global = true)]
    targets: Vec<String>,
    /// CA certificate (PEM) the daemon's certificate chains to.
    #[arg(long, global = true, conflicts_with = "fingerprint")]
    ca: Option<PathBuf>,
    /// Pinned SHA-256 fingerprint of the daemon's certificate (hex, colons allowed).
    #[arg(long, global = true)]
    fingerprint: Option<String>,
    /// Total messages per second over all senders (open loop, latency corrected for
    /// coordinated omission). Omit for a closed loop: each sender sends as soon as its
    /// previous message was accepted.
    #[arg(long, global = true)]
    rate: Option<f64>,
    /// Seconds of sending, warm-up included (default 10). With --messages, only an upper
    /// limit (default: one hour).
    #[arg(long, global = true)]
    duration: Option<f64>,
    /// Messages each sender sends (accepted or failed); the run ends when every sender is
    /// done, however long that takes (up to --duration). Not with --peers or idle/storm.
    #[arg(long, global = true)]
    messages: Option<u64>,
    /// Seconds at the start whose latencies and rates are not reported.
    #[arg(long, default_value_t = 2.0, global = true)]
    warmup: f64,
    /// Seconds over which connections are opened (0: as fast as --connect-concurrency allows).
    #[arg(long, default_value_t = 0.0, global = true)]
    ramp_up: f64,
    /// Seconds to wait after sending stops for in-flight deliveries before checking.
    #[arg(long, default_value_t = 15.0, global = true)]
    drain: f64,
    /// Message body size in bytes (at least the 32-byte stamp).
    #[arg(long, default_value_t = 100, global = true)]
    body_size: usize,
    /// Usernames are PREFIX0, PREFIX1, ...
    #[arg(long, default_value = "lt", global = true)]
    prefix: String,
    /// Spread connections over this many source addresses 127.0.0.1, 127.0.0.2, ... (each
    /// passes its own 64k ports). 0: the OS picks (enough below ~28k connections).
    #[arg(long, default_value_t = 0, global = true)]
    source_ips: usize,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 256, global = true)]
    connect_concurrency: usize,
    /// Session tokens are kept here between runs, so later runs resume without passwords.
    #[arg(long, global = true)]
    token_cache: Option<PathBuf>,
    /// Seconds between keep-alive pings per connection.
    #[arg(long, default_value_t = 30.0, global = true)]
    ping_interval: f64,
    /// Seconds a request or ping waits for its answer before the connection counts as dead
    /// (and the longest a connect may take, up to 30).
    #[arg(long, default_value_t = 60.0, global = true)]
    request_timeout: f64,
    /// The daemon's admin address; its counters are reported as deltas over the run.
    #[arg(long, default_value = "127.0.0.1:7480", global = true)]
    admin: String,
    /// The daemon's pid for its CPU and memory (default: the one running `messengerd`).
    #[arg(long, global = true)]
    daemon_pid: Option<u32>,
    /// Also run these peers with the same workload and report ratios (direct only):
    /// `mosquitto` (MQTT QoS 1, persistent sessions, TLS) and/or `relay` (no-op TLS relay).
    #[arg(long, value_delimiter = ',', global = true)]
    peers: Vec<String>,
    /// The mosquitto binary for the mosquitto peer.
    #[arg(long, default_value = "/usr/sbin/mosquitto", global = true)]
    mosquitto: PathBuf,
    /// Write the full report as JSON.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// Write p99 latency per second as an SVG plot.
    #[arg(long, global = true)]
    plot: Option<PathBuf>,
    /// Delete the accounts this run used when it ends.
    #[arg(long, global = true)]
    cleanup: bool,
    /// No live progress line.
    #[arg(long, global = true)]
    no_progress: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Users in pairs, each sending to its partner.
    Direct {
        #[arg(long, default_value_t = 100)]
        pairs: u32,
    },
    /// Groups of SIZE members; SENDERS of each group send to it, everyone else must get it.
    Group {
        #[arg(long, default_value_t = 1)]
        groups: u32,
        #[arg(long, default_value_t = 100)]
        size: u32,
        #[arg(long, default_value_t = 1)]
        senders: u32,
    },
    /// Hold CONNECTIONS authenticated connections with keep-alives; report memory per
    /// connection in the daemon.
    Idle {
        #[arg(long, default_value_t = 1000)]
        connections: u32,
    },
    /// CLIENTS each get BACKLOG messages queued, then all reconnect at once and catch up.
    Storm {
        #[arg(long, default_value_t = 1000)]
        clients: u32,
        #[arg(long, default_value_t = 100)]
        backlog: u32,
    },
    /// Direct pairs and groups at the same time.
    Mixed {
        #[arg(long, default_value_t = 100)]
        pairs: u32,
        #[arg(long, default_value_t = 4)]
        groups: u32,
        #[arg(long, default_value_t = 50)]
        size: u32,
    },
    /// The audit's attacks (issue 11) against a running daemon: `direct` pairs alone (phase A),
    /// then the same while the attacks run from other loopback addresses (phase B). Reports
    /// both phases' latency and their p99 ratio, both delivery checks, the bystanders' cookie
    /// logins, the daemon's memory and what each attack achieved. --rate defaults to 200.
    Attack {
        #[arg(long, default_value_t = 20)]
        pairs: u32,
        /// Attacks to run, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
        attacks: Vec<scenarios::attack::Attack>,
        /// Loopback addresses the attackers connect from (after the bystanders' addresses:
        /// 127.0.0.2, 127.0.0.3, ... by default).
        #[arg(long, default_value_t = 16)]
        attack_ips: usize,
        /// slow-readers: stalled connections (one attacker account each).
        #[arg(long, default_value_t = 16)]
        slow_readers: u32,
        /// slow-readers: accounts flooding them.
        #[arg(long, default_value_t = 2)]
        flooders: u32,
        /// slow-readers: body size of the flood's messages in bytes.
        #[arg(long, default_value_t = 60 * 1024)]
        flood_body: usize,
        /// half-frames: connections holding a half-sent frame.
        #[arg(long, default_value_t = 200)]
        half_frames: usize,
        /// connections: unauthenticated connections held open.
        #[arg(long, default_value_t = 500)]
        connections: usize,
        /// admin: idle connections to the admin port.
        #[arg(long, default_value_t = 200)]
        admin_connections: usize,
        /// Operations per second of each paced attack (resume storm, lockout, invalid
        /// resumes, lookups); 0: as fast as answers come.
        #[arg(long, default_value_t = 100.0)]
        attack_rate: f64,
        /// Bystander accounts whose own devices log in with their login cookies in each phase.
        #[arg(long, default_value_t = 4)]
        probe_accounts: u32,
        /// Cookie logins per phase (one every 500 ms).
        #[arg(long, default_value_t = 8)]
        probe_logins: u64,
        /// Seconds after the attack before the daemon's memory is read again.
        #[arg(long, default_value_t = 5.0)]
        settle: f64,
    },
    /// Chaos soak: starts a local cluster (three messengerd on PostgreSQL and Redis behind
    /// HAProxy) and a single SQLite node, cycles faults under traffic for N rounds, prints a
    /// table per fault. Uses the global --rate and --json only.
    Chaos(chaos::ChaosArgs),
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A soak kills nodes on purpose: every client noticing it is not news.
    let default_filter = match cli.scenario {
        Scenario::Chaos(_) => "warn,messenger_protocol::client=error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    // Tens of thousands of sockets need more than the usual 1024 descriptors.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("warning: could not raise the open-files limit: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let clean = match &cli.scenario {
        Scenario::Chaos(args) => runtime.block_on(chaos::run(args, cli.rate, cli.json.clone()))?,
        _ => runtime.block_on(run(cli))?,
    };
    if !clean {
        std::process::exit(1);
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let trust = match (&cli.ca, &cli.fingerprint) {
        (Some(ca), _) => Trust::CaFile(ca.clone()),
        (None, Some(fp)) => Trust::Fingerprint(parse_fingerprint(fp)?),
        (None, None) => {
            let default = PathBuf::from("messenger-data/tls/dev-ca.pem");
            anyhow::ensure!(
                default.exists(),
                "give --ca FILE or --fingerprint HEX (no {} here)",
                default.display()
            );
            Trust::CaFile(default)
        }
    };
    let planned_connections = match &cli.scenario {
        Scenario::Direct { pairs } => pairs * 2,
        Scenario::Group { groups, size, .. } => groups * size,
        Scenario::Idle { connections } => *connections,
        Scenario::Storm { clients, .. } => clients + 128,
        Scenario::Mixed {
            pairs,
            groups,
            size,
        } => pairs * 2 + groups * size,
        Scenario::Attack { pairs, .. } => pairs * 2,
        Scenario::Chaos(_) => 0,
    };
    let token_cache = cli.token_cache.clone().or_else(|| {
        std::env::var_os("HOME").map(|h| {
            PathBuf::from(h)
                .join(".cache")
                .join("messenger-loadtest")
                .join("tokens.json")
        })
    });
    anyhow::ensure!(
        cli.messages.is_none() || cli.peers.is_empty(),
        "--peers compares over --duration; give --duration instead of --messages"
    );
    anyhow::ensure!(
        cli.messages.is_none()
            || !matches!(cli.scenario, Scenario::Idle { .. } | Scenario::Storm { .. }),
        "--messages bounds direct, group and mixed; idle and storm have their own bounds"
    );
    let duration = cli
        .duration
        .unwrap_or(if cli.messages.is_some() { 3600.0 } else { 10.0 });
    let params = scenarios::Params {
        fleet: fleet::FleetOptions {
            targets: cli.targets.clone(),
            trust,
            prefix: cli.prefix.clone(),
            source_ips: fleet::loopback_sources(cli.source_ips),
            connect_concurrency: cli.connect_concurrency,
            ramp_gap: secs(cli.ramp_up) / planned_connections.max(1),
            token_cache,
            ping_interval: secs(cli.ping_interval),
            request_timeout: secs(cli.request_timeout),
            event_buffer: 1024,
        },
        rate: match cli.scenario {
            Scenario::Attack { .. } => cli.rate.or(Some(200.0)),
            _ => cli.rate,
        },
        duration: secs(duration),
        messages_per_sender: cli.messages,
        accepted: None,
        foreign_since_unix_ms: None,
        warmup: secs(cli.warmup.min(duration / 2.0)),
        drain: secs(cli.drain),
        body_size: cli.body_size.max(payload::HEADER_BYTES),
        daemon_pid: cli.daemon_pid.or_else(stats::find_daemon),
        progress: !cli.no_progress,
    };
    let metrics_before = daemon_metrics::scrape(&cli.admin).await;
    let mut outcome = match &cli.scenario {
        Scenario::Direct { pairs } => scenarios::direct::run(&params, *pairs).await?,
        Scenario::Group {
            groups,
            size,
            senders,
        } => scenarios::group::run(&params, *groups, *size, *senders).await?,
        Scenario::Idle { connections } => scenarios::idle::run(&params, *connections).await?,
        Scenario::Storm { clients, backlog } => {
            scenarios::storm::run(&params, *clients, *backlog).await?
        }
        Scenario::Mixed {
            pairs,
            groups,
            size,
        } => scenarios::mixed::run(&params, *pairs, *groups, *size).await?,
        Scenario::Attack {
            pairs,
            attacks,
            attack_ips,
            slow_readers,
            flooders,
            flood_body,
            half_frames,
            connections,
            admin_connections,
            attack_rate,
            probe_accounts,
            probe_logins,
            settle,
        } => {
            let opts = scenarios::attack::AttackOptions {
                pairs: *pairs,
                attacks: attacks.clone(),
                attack_ips: *attack_ips,
                slow_readers: *slow_readers,
                flooders: *flooders,
                flood_body: *flood_body,
                half_frames: *half_frames,
                connections: *connections,
                admin_connections: *admin_connections,
                attack_rate: *attack_rate,
                probe_accounts: *probe_accounts,
                probe_logins: *probe_logins,
                admin: cli.admin.clone(),
                settle: secs(*settle),
            };
            scenarios::attack::run(&params, &opts).await?
        }
        Scenario::Chaos(_) => anyhow::bail!("chaos runs on its own"),
    };
    if let (Some(before), Some(after)) = (&metrics_before, daemon_metrics::scrape(&cli.admin).await)
    {
        outcome.daemon_metrics = daemon_metrics::delta(before, &after);
    }
    let mut peer_results = Vec::new();
    if let Scenario::Direct { pairs } = &cli.scenario {
        let peer_params = peers::PeerParams {
            pairs: *pairs as usize,
            rate: cli.rate,
            duration: params.duration,
            warmup: params.warmup,
            body_size: params.body_size,
            drain: params.drain,
        };
        for peer in &cli.peers {
            let result = match peer.as_str() {
                "mosquitto" => peers::mosquitto::run(&peer_params, &cli.mosquitto).await,
                "relay" => peers::relay::run(&peer_params).await,
                other => anyhow::bail!("unknown peer {other:?} (mosquitto, relay)"),
            };
            peer_results.push(result.with_context(|| format!("peer {peer}"))?);
        }
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = report::Report::new(command, outcome, peer_results);
    print!("{}", report.human());
    if let Some(path) = &cli.json {
        report.write_json(path)?;
    }
    if let Some(path) = &cli.plot {
        report.write_plot(path)?;
    }
    let o = &report.outcome;
    let messaging = !matches!(cli.scenario, Scenario::Idle { .. });
    // Under attack, a bystander that cannot log in with its own cookie is a broken promise too.
    let bystanders_got_in = o.attack.as_ref().is_none_or(|a| {
        [&a.baseline, &a.attacked]
            .iter()
            .all(|p| p.cookie_logins.succeeded == p.cookie_logins.attempted)
    });
    let clean = o.check.clean()
        && bystanders_got_in
        && (!messaging || o.delivered > 0)
        && report.peers.iter().all(|p| p.check.clean());
    if cli.cleanup {
        // The accounts are reconnected (cheaply, by token) and deleted.
        let (members, _) = fleet::connect(&params.fleet, 0, planned_connections, 1, None).await?;
        let deleted = fleet::delete_accounts(&params.fleet, members).await;
        eprintln!("cleanup: deleted {deleted} accounts");
    }
    Ok(clean)
}
