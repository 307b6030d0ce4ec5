//! Reads the daemon's own counters from its admin `/metrics` (Prometheus text), so a report
//! shows what the daemon saw during the run next to what the harness measured.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counters and gauges worth reporting as before/after deltas.
const WATCHED: &[&str] = &[
    "messenger_messages_accepted_total",
    "messenger_messages_delivered_total",
    "messenger_outbound_queue_full_total",
    "messenger_catch_up_reads_total",
    "messenger_write_stall_disconnects_total",
    "messenger_connections_accepted_total",
    "messenger_tls_handshake_failures_total",
    "messenger_frames_in_total",
    "messenger_frames_out_total",
];

/// Scrapes `/metrics`; `None` if the admin address does not answer.
pub async fn scrape(admin: &str) -> Option<BTreeMap<String, f64>> {
    let text = fetch(admin).await?;
    Some(parse(&text, |name| WATCHED.contains(&name)))
}

/// Every sample (labelled ones included, named with their labels) of the metric families
/// starting with one of `prefixes`; `None` if the admin address does not answer, and an
/// empty map if it answers with something else (an admin port at its connection cap).
pub async fn scrape_prefixed(admin: &str, prefixes: &[&str]) -> Option<BTreeMap<String, f64>> {
    let text = fetch(admin).await?;
    Some(parse(&text, |name| {
        prefixes.iter().any(|p| name.starts_with(p))
    }))
}

async fn fetch(admin: &str) -> Option<String> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: admin\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.ok()?;
        Some(text)
    };
    tokio::time::timeout(Duration::from_secs(3), fetch)
        .await
        .ok()?
}

fn parse(text: &str, wanted: impl Fn(&str) -> bool) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if wanted(name)
            && let Ok(v) = value.parse::<f64>()
        {
            out.insert(name.to_string(), v);
        }
    }
    out
}

/// `after - before` for every watched counter seen after the run.
pub fn delta(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        // A counter the daemon had not created before the run started from zero.
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}
