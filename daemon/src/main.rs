//! `messengerd`: parse the configuration, start the server, run until SIGTERM/SIGINT.
//! SIGHUP reloads the TLS certificate.

use anyhow::Context;
use clap::Parser;
use messenger_daemon::config::{Cli, Command, LogFormat, SeedArgs, StoreBackend};
use messenger_daemon::{RunningServer, store};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol (see `allocator`).
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: messenger_daemon::allocator::MallocConf =
    messenger_daemon::allocator::MALLOC_CONF;

fn main() -> anyhow::Result<()> {
    messenger_daemon::allocator::mark_installed();
    let cli = Cli::parse();
    let config = cli.load()?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Migrate => {
                let store = store::open_with(&config, true)
                    .await
                    .context("migrating the store")?;
                store.close().await?;
                println!("store {} is up to date", store_location(&config));
                Ok(())
            }
            Command::Seed(args) => seed(&config, args).await,
            Command::Run => run(config).await,
        }
    })
}

/// Where the store is, for humans: the SQLite file, or the PostgreSQL server and database
/// (never the password).
fn store_location(config: &messenger_daemon::Config) -> String {
    match config.store.backend {
        StoreBackend::Sqlite => format!("at {}", config.sqlite_path().display()),
        StoreBackend::Postgres => {
            let url = store::postgres_url(&config.store, |name| std::env::var(name).ok());
            match url.parse::<tokio_postgres::Config>() {
                Ok(pg) => {
                    let hosts: Vec<String> = pg
                        .get_hosts()
                        .iter()
                        .map(|h| match h {
                            tokio_postgres::config::Host::Tcp(h) => h.clone(),
                            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                        })
                        .collect();
                    format!(
                        "PostgreSQL {} database {}",
                        hosts.join(","),
                        pg.get_dbname().unwrap_or("(default)")
                    )
                }
                Err(_) => "PostgreSQL (unparsable URL)".to_owned(),
            }
        }
    }
}

async fn seed(config: &messenger_daemon::Config, args: SeedArgs) -> anyhow::Result<()> {
    let store = store::open(config).await.context("opening the store")?;
    let hasher = messenger_daemon::auth::PasswordHasher::new(&config.passwords)
        .map_err(anyhow::Error::msg)?;
    let options = messenger_daemon::seed::SeedOptions {
        users: args.users,
        groups: args.groups,
        group_size: args.group_size,
        password: args.password,
        prefix: args.prefix,
        max_group_members: config.limits.max_group_members,
    };
    let outcome = messenger_daemon::seed::seed(
        store.as_ref(),
        &hasher,
        &options,
        config.passwords.min_length,
    )
    .await;
    store.close().await?;
    let summary = outcome.context("seeding")?;
    println!("seeded store {}: {summary}", store_location(config));
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr; stdout carries only the start-up banner (address, fingerprint).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: messenger_daemon::Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let db = store_location(&config);
    let server = RunningServer::start(config).await?;
    println!(
        "messengerd listening on {} (TLS, ALPN messenger/1)",
        server.addr
    );
    println!("  admin:       http://{}/metrics", server.admin_addr);
    println!("  store:       {db}");
    let budget = &server.connections;
    println!(
        "  connections: at most {} clients (open-file limit {}, {} kept for store, admin and listeners)",
        budget.cap,
        budget
            .open_files
            .map_or_else(|| "unknown".to_string(), |n| n.to_string()),
        budget.headroom
    );
    println!("  certificate: {}", server.cert_path.display());
    println!("  fingerprint: SHA256 {}", server.fingerprint);
    if let Some(ca) = &server.dev_ca {
        println!(
            "  dev CA:      {} (development certificate: trust this CA or pin the fingerprint)",
            ca.display()
        );
    }
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut failed = None;
    loop {
        tokio::select! {
            reason = server.failed() => {
                failed = Some(reason);
                break;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match server.reload_tls() {
                Ok(fingerprint) => tracing::info!(%fingerprint, "TLS certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the old certificate"),
            },
        }
    }
    server.shutdown().await;
    match failed {
        Some(reason) => Err(anyhow::anyhow!(reason)),
        None => Ok(()),
    }
}
