//! `messengerd`: parse the configuration, start the server, run until SIGTERM/SIGINT.
//! SIGHUP reloads the TLS certificate.

use anyhow::Context;
use clap::Parser;
use messenger_daemon::config::{Cli, Command, LogFormat};
use messenger_daemon::{RunningServer, store};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.load()?;
    init_logging(config.log_format);
    // Every connection is a descriptor: use all the process may have (the hard limit).
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Run) {
            Command::Migrate => {
                let store = store::open(&config).await.context("migrating the store")?;
                store.close().await?;
                println!("store at {} is up to date", config.sqlite_path().display());
                Ok(())
            }
            Command::Run => run(config).await,
        }
    })
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
    let db = config.sqlite_path();
    let server = RunningServer::start(config).await?;
    println!(
        "messengerd listening on {} (TLS, ALPN messenger/1)",
        server.addr
    );
    println!("  admin:       http://{}/metrics", server.admin_addr);
    println!("  store:       {}", db.display());
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
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match server.reload_tls() {
                Ok(()) => tracing::info!(fingerprint = %server.fingerprint, "TLS certificate reloaded"),
                Err(e) => tracing::error!(error = %e, "TLS reload failed; keeping the old certificate"),
            },
        }
    }
    server.shutdown().await;
    Ok(())
}
