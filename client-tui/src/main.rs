//! `messenger`: parse the command line, set up the terminal (restored on every exit, panics
//! included), start the network task and run the event loop. Nothing else lives here.

use std::io::{Stdout, stdout};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use crossterm::event::{
    DisableBracketedPaste, EnableBracketedPaste, Event, EventStream, KeyEventKind,
};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use futures_util::StreamExt;
use messenger_client_tui::app::{App, Command};
use messenger_client_tui::net::{self, NetConfig};
use messenger_client_tui::store::TokenStore;
use messenger_client_tui::ui;
use messenger_protocol::client::{ConnectOptions, Trust, parse_fingerprint};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use tokio::sync::mpsc;

/// The development CA a locally started `messengerd` writes into its default data directory.
const LOCAL_DEV_CA: &str = "messenger-data/tls/dev-ca.pem";

/// Terminal chat client of Messenger.
#[derive(Debug, Parser)]
#[command(name = "messenger", version)]
struct Args {
    /// Server address, host:port.
    #[arg(long, env = "MESSENGER_SERVER", default_value = "127.0.0.1:7443")]
    server: String,
    /// PEM file of the CA (or the self-signed certificate) to trust. Default: the local
    /// daemon's development CA, ./messenger-data/tls/dev-ca.pem, when it exists.
    #[arg(long, env = "MESSENGER_CA", conflicts_with = "fingerprint")]
    ca: Option<PathBuf>,
    /// SHA-256 fingerprint of the server's certificate to pin (as messengerd prints it).
    #[arg(long, env = "MESSENGER_FINGERPRINT")]
    fingerprint: Option<String>,
    /// Name to verify the certificate against, when it differs from the address's host.
    #[arg(long)]
    server_name: Option<String>,
    /// Where session tokens are kept (default: the platform's config directory).
    #[arg(long, env = "MESSENGER_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
}

fn trust(args: &Args) -> anyhow::Result<Trust> {
    if let Some(fp) = &args.fingerprint {
        return Ok(Trust::Fingerprint(
            parse_fingerprint(fp).context("--fingerprint")?,
        ));
    }
    if let Some(ca) = &args.ca {
        if !ca.is_file() {
            bail!("--ca {}: no such file", ca.display());
        }
        return Ok(Trust::CaFile(ca.clone()));
    }
    let local = PathBuf::from(LOCAL_DEV_CA);
    if local.is_file() {
        return Ok(Trust::CaFile(local));
    }
    bail!(
        "say what to trust: --ca FILE (e.g. messenger-data/tls/dev-ca.pem of a local messengerd) \
         or --fingerprint SHA256 (as messengerd prints it at start)"
    )
}

fn device_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".into());
    format!("terminal on {host}")
}

fn restore_terminal() {
    // Best effort: each step may fail when the terminal is already gone.
    let _ = disable_raw_mode();
    let _ = execute!(
        stdout(),
        DisableBracketedPaste,
        LeaveAlternateScreen,
        crossterm::cursor::Show
    );
}

/// Restores the terminal when dropped, so every return path (errors included) leaves it usable.
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn setup_terminal() -> anyhow::Result<(Terminal<CrosstermBackend<Stdout>>, TerminalGuard)> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Restore first, or the panic message lands in the alternate screen and vanishes.
        restore_terminal();
        previous(info);
    }));
    enable_raw_mode().context("raw mode")?;
    let guard = TerminalGuard;
    execute!(stdout(), EnterAlternateScreen, EnableBracketedPaste).context("terminal setup")?;
    let terminal = Terminal::new(CrosstermBackend::new(stdout())).context("terminal")?;
    Ok((terminal, guard))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The local offset can only be read soundly while the process has one thread, so it is
    // read here, before the runtime starts; a zone change while running is not followed.
    let utc_offset_secs =
        time::UtcOffset::current_local_offset().map_or(0, |o| i64::from(o.whole_seconds()));
    let trust = trust(&args)?;
    let store = TokenStore::open(args.config_dir.clone())?;
    let mut opts = ConnectOptions::new(args.server.clone(), trust);
    opts.server_name = args.server_name.clone();
    opts.client_name = format!("messenger-tui/{}", env!("CARGO_PKG_VERSION"));
    // Check the address before taking over the terminal, so a typo is a plain error.
    opts.tls_server_name().context("--server")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(run(args, opts, store, utc_offset_secs))
}

async fn run(
    args: Args,
    opts: ConnectOptions,
    store: TokenStore,
    utc_offset_secs: i64,
) -> anyhow::Result<()> {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel::<Command>();
    let (net_tx, mut net_rx) = mpsc::unbounded_channel();
    let net_task = tokio::spawn(net::run(
        NetConfig {
            opts,
            store,
            device_name: device_name(),
        },
        cmd_rx,
        net_tx,
    ));

    let (mut terminal, _guard) = setup_terminal()?;
    let mut app = App::new(args.server.clone());
    app.utc_offset_secs = utc_offset_secs;
    let mut events = EventStream::new();
    // Redraws the reconnect countdown; input and network events redraw at once.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let mut info = ui::RenderInfo::default();
        terminal
            .draw(|f| info = ui::render(f, &app, Instant::now()))
            .context("draw")?;
        if info.view_height > 0 {
            app.view_height = info.view_height;
        }
        let mut cmds = Vec::new();
        if let Some(max) = info.top_reached {
            app.clamp_scroll(max);
            cmds.extend(app.reached_top());
        }
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => {
                    cmds.extend(app.on_key(k));
                }
                Some(Ok(Event::Paste(text))) => app.paste(&text),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e).context("reading the terminal"),
                None => break,
            },
            ev = net_rx.recv() => {
                let Some(ev) = ev else { bail!("the network task stopped") };
                cmds.extend(app.on_net(ev));
                // Apply everything already waiting before drawing once (a replay after a
                // reconnect can be thousands of messages).
                while let Ok(ev) = net_rx.try_recv() {
                    cmds.extend(app.on_net(ev));
                }
            }
            _ = tick.tick() => {}
        }
        for c in cmds {
            if cmd_tx.send(c).is_err() {
                bail!("the network task stopped");
            }
        }
        if app.quit {
            break;
        }
    }
    drop(cmd_tx);
    // Give the network task a moment to acknowledge what was shown and close cleanly.
    let _ = tokio::time::timeout(Duration::from_secs(2), net_task).await;
    Ok(())
}
