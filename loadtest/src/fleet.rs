//! The simulated users: accounts created or reused, connections opened at a bounded rate
//! from spread source addresses, sessions resumed from a token cache so repeated runs cost no
//! password hashing, and deleted again on request.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use messenger_protocol::ErrorCode;
use messenger_protocol::client::{Client, ClientError, ConnectOptions, Trust};
use tokio::sync::{Mutex, Semaphore};

use crate::checker::new_histogram;

pub const PASSWORD: &str = "loadtest-password";

#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub targets: Vec<String>,
    pub trust: Trust,
    /// Usernames are `<prefix><index>`.
    pub prefix: String,
    /// Source addresses connections are spread over (empty: the OS picks).
    pub source_ips: Vec<IpAddr>,
    /// Connections being opened at once.
    pub connect_concurrency: usize,
    /// Pause between connection starts, for ramp-up (zero: as fast as allowed).
    pub ramp_gap: Duration,
    pub token_cache: Option<PathBuf>,
    pub ping_interval: Duration,
    /// How long a request (and a ping) waits for its answer before the connection counts as
    /// dead; connecting waits as long, at most 30 s.
    pub request_timeout: Duration,
    pub event_buffer: usize,
}

pub struct Member {
    pub index: u32,
    pub username: String,
    pub user_id: u64,
    pub client: Client,
}

/// Connect-phase measurements.
pub struct ConnectStats {
    /// TCP + TLS + Hello, per connection, in microseconds.
    pub handshake: Histogram<u64>,
    /// Handshake plus authentication (resume, or login, or register + login).
    pub ready: Histogram<u64>,
    pub elapsed: Duration,
    pub errors: BTreeMap<String, u64>,
    pub logins: u64,
    pub resumes: u64,
    pub registrations: u64,
}

/// Per-target token cache: username → session token (hex).
type Cache = BTreeMap<String, BTreeMap<String, String>>;

fn load_cache(path: &Option<PathBuf>) -> Cache {
    path.as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn save_cache(path: &Option<PathBuf>, cache: &Cache) -> anyhow::Result<()> {
    if let Some(p) = path {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        std::fs::write(p, serde_json::to_vec(cache)?)
            .with_context(|| format!("writing the token cache {}", p.display()))?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

fn error_key(phase: &str, e: &ClientError) -> String {
    match e.wire_code() {
        Some(code) => format!("{phase}: {}", messenger_protocol::error::code_name(code)),
        None => format!("{phase}: {}", short(e)),
    }
}

fn short(e: &ClientError) -> &'static str {
    match e {
        ClientError::Io(_) => "io",
        ClientError::Tls(_) => "tls",
        ClientError::Codec(_) => "codec",
        ClientError::Wire(_) => "wire",
        ClientError::Closed(_) => "closed",
        ClientError::Timeout => "timeout",
        ClientError::Protocol(_) => "protocol",
        ClientError::Config(_) => "config",
    }
}

impl FleetOptions {
    pub fn connect_options(&self, index: usize) -> ConnectOptions {
        let target = &self.targets[index % self.targets.len()];
        let mut o = ConnectOptions::new(target.clone(), self.trust.clone());
        o.client_name = "messenger-loadtest".into();
        o.ping_interval = self.ping_interval;
        o.event_buffer = self.event_buffer;
        o.request_timeout = self.request_timeout;
        o.connect_timeout = self.request_timeout.min(Duration::from_secs(30));
        if !self.source_ips.is_empty() {
            o.local_addr = Some(self.source_ips[index % self.source_ips.len()]);
        }
        o
    }
}

/// Source addresses 127.0.0.1 ... for `count` of them (each passes its own 64k ports).
pub fn loopback_sources(count: usize) -> Vec<IpAddr> {
    (0..count)
        .map(|i| {
            let n = i + 1;
            IpAddr::from([
                127,
                ((n >> 16) & 0xff) as u8,
                ((n >> 8) & 0xff) as u8,
                (n & 0xff) as u8,
            ])
        })
        .collect()
}

/// Opens and authenticates users `first..first+count`, `devices` connections each (device
/// names differ, so each is its own session). Users that fail are counted, not fatal, unless
/// none succeeds.
pub async fn connect(
    opts: &FleetOptions,
    first: u32,
    count: u32,
    devices: u32,
    progress: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<(Vec<Member>, ConnectStats)> {
    let cache = Arc::new(Mutex::new(load_cache(&opts.token_cache)));
    let permits = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let stats = Arc::new(std::sync::Mutex::new(ConnectStats {
        handshake: new_histogram(),
        ready: new_histogram(),
        elapsed: Duration::ZERO,
        errors: BTreeMap::new(),
        logins: 0,
        resumes: 0,
        registrations: 0,
    }));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for index in first..first + count {
        for device in 0..devices.max(1) {
            let permit = permits.clone().acquire_owned().await?;
            if !opts.ramp_gap.is_zero() {
                tokio::time::sleep(opts.ramp_gap).await;
            }
            let opts = opts.clone();
            let cache = cache.clone();
            let stats = stats.clone();
            let progress = progress.cloned();
            tasks.push(tokio::spawn(async move {
                let r = connect_one(&opts, index, device, &cache, &stats).await;
                drop(permit);
                if let Some(p) = progress {
                    p.inc(1);
                }
                r
            }));
        }
    }
    let mut members = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(Some(m)) = t.await {
            members.push(m);
        }
    }
    save_cache(&opts.token_cache, &*cache.lock().await)?;
    let mut stats = match Arc::try_unwrap(stats) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(_) => anyhow::bail!("connect tasks still hold the statistics"),
    };
    stats.elapsed = start.elapsed();
    if members.is_empty() && count > 0 {
        anyhow::bail!("no user could connect and authenticate: {:?}", stats.errors);
    }
    Ok((members, stats))
}

async fn connect_one(
    opts: &FleetOptions,
    index: u32,
    device: u32,
    cache: &Mutex<Cache>,
    stats: &std::sync::Mutex<ConnectStats>,
) -> Option<Member> {
    let record_error = |key: String| {
        let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
        *s.errors.entry(key).or_insert(0) += 1;
    };
    let username = format!("{}{index}", opts.prefix);
    let cache_key = format!("{username}#{device}");
    let co = opts.connect_options(index as usize + device as usize);
    let target = co.addr.clone();
    let t0 = Instant::now();
    let mut client = match Client::connect(co).await {
        Ok(c) => c,
        Err(e) => {
            record_error(error_key("connect", &e));
            return None;
        }
    };
    let handshake_us = t0.elapsed().as_micros() as u64;
    let token = cache
        .lock()
        .await
        .get(&target)
        .and_then(|m| m.get(&cache_key))
        .and_then(|t| unhex(t));
    let mut how = "resume";
    let mut authed = match token {
        Some(t) => client.resume(&t).await.ok(),
        None => None,
    };
    if authed.is_none() {
        how = "login";
        let device_name = format!("loadtest-{device}");
        authed = match client.login(&username, PASSWORD, &device_name).await {
            Ok(a) => Some(a),
            Err(e) if e.wire_code() == Some(ErrorCode::Unauthenticated) => {
                how = "register";
                match client.register(&username, PASSWORD, &username).await {
                    Ok(_) => {}
                    Err(e) if e.wire_code() == Some(ErrorCode::AlreadyExists) => {}
                    Err(e) => {
                        record_error(error_key("register", &e));
                        return None;
                    }
                }
                match client.login(&username, PASSWORD, &device_name).await {
                    Ok(a) => Some(a),
                    Err(e) => {
                        record_error(error_key("login", &e));
                        return None;
                    }
                }
            }
            Err(e) => {
                record_error(error_key("login", &e));
                return None;
            }
        };
    }
    let auth = authed?;
    let user_id = auth.user.as_ref().map(|u| u.user_id)?;
    cache
        .lock()
        .await
        .entry(target)
        .or_default()
        .insert(cache_key, hex(&auth.session_token));
    {
        let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
        let _ = s.handshake.record(handshake_us.max(1));
        let _ = s.ready.record((t0.elapsed().as_micros() as u64).max(1));
        match how {
            "resume" => s.resumes += 1,
            "login" => s.logins += 1,
            _ => s.registrations += 1,
        }
    }
    Some(Member {
        index,
        username,
        user_id,
        client,
    })
}

/// Deletes the accounts of these members (`--cleanup`) and forgets their tokens.
pub async fn delete_accounts(opts: &FleetOptions, members: Vec<Member>) -> u64 {
    let mut deleted = 0;
    let mut cache = load_cache(&opts.token_cache);
    for m in members {
        if m.client.conn().delete_account(PASSWORD).await.is_ok() {
            deleted += 1;
        }
        for per_target in cache.values_mut() {
            per_target.retain(|k, _| !k.starts_with(&format!("{}#", m.username)));
        }
    }
    let _ = save_cache(&opts.token_cache, &cache);
    deleted
}
