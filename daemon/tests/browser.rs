//! The browser client (`web/`) end to end: the real daemon serves it over HTTPS and its
//! WebSocket bridge, and `web/tests/e2e.mjs` drives two users in headless Chromium through
//! Playwright, next to an SDK user answering as an echo bot.
//!
//! Needs `node`, `web/node_modules` (`npm ci --prefix web`) and `/usr/bin/chromium`; anything
//! missing fails the test with the command to run. Nothing is skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PASSWORD, TestServer};
use messenger_protocol::client::{Client, ClientError, Recipient};
use messenger_protocol::pb;

const CHROMIUM: &str = "/usr/bin/chromium";
const NODE_TIMEOUT: Duration = Duration::from_secs(150);
const BOT: &str = "echo_bot";
/// A short idle timeout, so the test sees the page's pings keep an idle connection alive.
const IDLE_SECS: u64 = 4;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the daemon crate sits in the workspace")
        .to_path_buf()
}

/// Fails with the exact command to run when something the browser test needs is missing.
fn check_prerequisites(web: &Path) {
    let node = std::process::Command::new("node").arg("--version").output();
    if !matches!(&node, Ok(out) if out.status.success()) {
        panic!("node is missing; install it with: apt-get install -y nodejs npm");
    }
    let installed = |web: &Path| {
        web.join("node_modules/playwright-core/package.json")
            .is_file()
    };
    if !installed(web) {
        // The lock file pins every package: installing them is part of running the test, as
        // starting a throwaway PostgreSQL is for the store tests.
        let npm = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(web)
            .output();
        if !matches!(&npm, Ok(out) if out.status.success()) || !installed(web) {
            panic!(
                "web/node_modules is missing and `npm ci` failed ({npm:?}); install it with: \
                 npm ci --prefix {}",
                web.display()
            );
        }
    }
    if !Path::new(CHROMIUM).is_file() {
        panic!("{CHROMIUM} is missing; install it with: apt-get install -y chromium");
    }
}

/// Answers every direct message from someone else with `echo: <text>`; returns what it got.
fn spawn_echo_bot(
    mut bot: Client,
    me: u64,
    received: Arc<Mutex<Vec<String>>>,
) -> tokio::task::JoinHandle<ClientError> {
    tokio::spawn(async move {
        loop {
            let d = match bot.next_delivery(Duration::from_secs(3600)).await {
                Ok(d) => d,
                Err(e) => return e,
            };
            let Some(m) = d.message.as_ref() else {
                continue;
            };
            let sender = m.sender.as_ref().map_or(0, |s| s.user_id);
            if sender == me || !matches!(m.to, Some(pb::message::To::UserId(_))) {
                continue;
            }
            let text = String::from_utf8_lossy(&m.body).into_owned();
            received.lock().expect("bot log").push(text.clone());
            if let Err(e) = bot
                .conn()
                .send_text(Recipient::User(sender), &format!("echo: {text}"))
                .await
            {
                return e;
            }
            if let Err(e) = bot.ack_seen().await {
                return e;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_users_and_an_sdk_user_chat_through_the_web_client() {
    let root = repo_root();
    let web = root.join("web");
    check_prerequisites(&web);

    let ts = TestServer::start_with(|c| c.timeouts.idle_secs = IDLE_SECS).await;
    let mut options = ts.options();
    options.ping_interval = Duration::from_secs(1);
    let mut bot = Client::connect(options).await.expect("connect the bot");
    let bot_user = bot
        .register(BOT, PASSWORD, &format!("{BOT} display"))
        .await
        .expect("register the bot");
    bot.login(BOT, PASSWORD, "bot").await.expect("bot login");
    let received = Arc::new(Mutex::new(Vec::new()));
    let bot_task = spawn_echo_bot(bot, bot_user.user_id, received.clone());

    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-e2e-screenshots");
    // Only this run's pictures: clear the previous run's.
    let _ = std::fs::remove_dir_all(&screenshots);
    std::fs::create_dir_all(&screenshots).expect("screenshot folder");
    let server = ts.server();
    let url = format!("https://127.0.0.1:{}/", server.addr.port());

    let child = tokio::process::Command::new("node")
        .arg(web.join("tests/e2e.mjs"))
        .current_dir(&web)
        .env("MESSENGER_URL", &url)
        .env("MESSENGER_CERT", &server.cert_path)
        .env("MESSENGER_SDK_USER", BOT)
        .env("MESSENGER_IDLE_MS", (IDLE_SECS * 1000).to_string())
        .env("MESSENGER_SCREENSHOTS", &screenshots)
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let out = tokio::time::timeout(NODE_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("web/tests/e2e.mjs did not finish within {NODE_TIMEOUT:?}"))
        .expect("node ran");
    println!("--- web/tests/e2e.mjs stdout ---");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!("--- web/tests/e2e.mjs stderr ---");
    println!("{}", String::from_utf8_lossy(&out.stderr));
    println!("screenshots: {}", screenshots.display());
    assert!(
        out.status.success(),
        "web/tests/e2e.mjs failed ({}); its output is above",
        out.status
    );

    // The browser user really reached the SDK user (and got its echo, checked in the page).
    assert!(!bot_task.is_finished(), "the echo bot stopped early");
    let got = received.lock().expect("bot log").clone();
    assert!(
        got.iter().any(|t| t.starts_with("hello bot")),
        "the SDK user received no message from the browser: {got:?}"
    );
    bot_task.abort();
    ts.stop().await;
}
