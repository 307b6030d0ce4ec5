//! What a legitimate user and an operator try while the attackers run: the bystanders' own
//! logins with their login cookies (the lockout must not reach them), the admin `/healthz`
//! a balancer polls, and the daemon's resident memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use messenger_protocol::client::{Client, ConnectOptions};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::checker::new_histogram;
use crate::fleet::PASSWORD;
use crate::stats::{self, LatencySummary};

/// The device name the bystanders' probing logins use (their messaging devices resume).
const PROBE_DEVICE: &str = "attack-probe";

/// A bystander account and the login cookie its probe device holds.
#[derive(Debug, Clone)]
pub struct CookieAccount {
    pub username: String,
    pub cookie: Bytes,
}

/// Logs each account's probe device in once (before any attack), so it holds a login cookie.
pub async fn issue_cookies(opts: &ConnectOptions, usernames: &[String]) -> Vec<CookieAccount> {
    let mut out = Vec::new();
    for username in usernames {
        let Ok(mut c) = Client::connect(opts.clone()).await else {
            continue;
        };
        if c.login(username, PASSWORD, PROBE_DEVICE).await.is_ok()
            && let Some(cookie) = c.login_cookie(username).cloned()
        {
            out.push(CookieAccount {
                username: username.clone(),
                cookie,
            });
        }
        c.close().await;
    }
    out
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LoginProbe {
    pub attempted: u64,
    pub succeeded: u64,
    /// Failures by error ("rate_limited", "unavailable", ...).
    pub failed: BTreeMap<String, u64>,
    /// Connect + TLS + Hello + Login (password hash included).
    pub latency: LatencySummary,
}

/// `count` logins with the accounts' cookies, round-robin, one every `gap`: bounded by count,
/// so each phase tries exactly as many.
pub async fn cookie_logins(
    opts: ConnectOptions,
    accounts: Vec<CookieAccount>,
    count: u64,
    gap: Duration,
) -> LoginProbe {
    let mut probe = LoginProbe::default();
    let mut hist = new_histogram();
    if accounts.is_empty() {
        return probe;
    }
    for i in 0..count {
        let account = &accounts[i as usize % accounts.len()];
        tokio::time::sleep(gap).await;
        probe.attempted += 1;
        let t0 = Instant::now();
        let result = async {
            let mut c = Client::connect(opts.clone()).await?;
            c.set_login_cookie(&account.username, account.cookie.clone());
            let r = c.login(&account.username, PASSWORD, PROBE_DEVICE).await;
            c.close().await;
            r
        };
        match result.await {
            Ok(_) => {
                probe.succeeded += 1;
                let _ = hist.record((t0.elapsed().as_micros() as u64).max(1));
            }
            Err(e) => {
                let key = match e.wire_code() {
                    Some(c) => messenger_protocol::error::code_name(c).to_string(),
                    None => e.to_string(),
                };
                *probe.failed.entry(key).or_insert(0) += 1;
            }
        }
    }
    probe.latency = LatencySummary::of(&hist);
    probe
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HealthProbe {
    pub ok: u64,
    pub failed: u64,
}

/// GETs `/healthz` once a second until stopped, as a balancer would.
pub async fn healthz(admin: String, stop: CancellationToken) -> HealthProbe {
    let mut probe = HealthProbe::default();
    loop {
        let get = async {
            let mut s = tokio::net::TcpStream::connect(&admin).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.0\r\nHost: admin\r\n\r\n")
                .await
                .ok()?;
            let mut text = String::new();
            s.read_to_string(&mut text).await.ok()?;
            Some(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"))
        };
        match tokio::time::timeout(Duration::from_secs(2), get).await {
            Ok(Some(true)) => probe.ok += 1,
            _ => probe.failed += 1,
        }
        tokio::select! {
            _ = stop.cancelled() => return probe,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The daemon's resident memory, sampled every 100 ms; the peak since the last `take_peak`.
pub struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// Peaks of the daemon's own memory gauges (from its `/metrics`, once a second, when the
/// admin port answers — it may not, while the admin attack holds it).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GaugePeaks {
    /// `messenger_buffered_bytes`: what the memory budget bounds.
    pub buffered_mib: Option<f64>,
    /// `messenger_memory_allocated_bytes`: the allocator's live bytes.
    pub allocated_mib: Option<f64>,
    /// Scrapes that got no numbers.
    pub scrapes_failed: u64,
}

const GAUGES: [&str; 2] = [
    "messenger_buffered_bytes",
    "messenger_memory_allocated_bytes",
];

/// Samples [`GaugePeaks`] until the phase ends.
pub async fn gauges(admin: String, stop: CancellationToken) -> GaugePeaks {
    let mut peaks = GaugePeaks::default();
    let max = |slot: &mut Option<f64>, v: Option<&f64>| {
        if let Some(&v) = v {
            *slot = Some(slot.unwrap_or(0.0).max(v / 1_048_576.0));
        }
    };
    loop {
        match crate::daemon_metrics::scrape_prefixed(&admin, &GAUGES).await {
            Some(m) if !m.is_empty() => {
                max(&mut peaks.buffered_mib, m.get(GAUGES[0]));
                max(&mut peaks.allocated_mib, m.get(GAUGES[1]));
            }
            _ => peaks.scrapes_failed += 1,
        }
        tokio::select! {
            _ = stop.cancelled() => return peaks,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

impl RssWatch {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(sample) = stats::sample(pid) {
                    p.fetch_max(sample.rss_bytes, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { peak, stop }
    }

    /// The highest reading since the previous call (or the start), in bytes.
    pub fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
