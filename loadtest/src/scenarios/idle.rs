//! `idle`: hold many authenticated connections that only keep alive, and report what each
//! costs in the daemon (and in the harness). Connections are spread over source addresses so
//! more than 64k can reach one port.

use std::time::{Duration, Instant};

use messenger_protocol::client::Event;

use super::{Meter, Outcome, Params};
use crate::stats;

pub async fn run(params: &Params, connections: u32) -> anyhow::Result<Outcome> {
    let daemon_before = params.daemon_pid.and_then(stats::sample);
    let harness_before = stats::sample(std::process::id());
    let (members, connect) = super::connect_members(params, 0, connections).await?;
    let connected = members.len() as u64;
    // Let allocators settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let daemon_after = params.daemon_pid.and_then(stats::sample);
    let harness_after = stats::sample(std::process::id());

    let mut meter = Meter::start(params.daemon_pid);
    let bar = super::progress_bar(params.progress, params.duration.as_millis() as u64);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut watchers = Vec::new();
    for mut m in members {
        let stop = stop.clone();
        watchers.push(tokio::spawn(async move {
            // Counts a connection that the server closed while idle.
            let dropped = tokio::select! {
                _ = stop.cancelled() => false,
                e = m.client.next_event() => matches!(e, Some(Event::Closed { .. }) | None),
            };
            (dropped, m)
        }));
    }
    let start = Instant::now();
    while start.elapsed() < params.duration {
        tokio::time::sleep(Duration::from_millis(500)).await;
        meter.tick();
        if let Some(b) = &bar {
            b.set_position(start.elapsed().as_millis() as u64);
            b.set_message(format!("holding {connected} connections"));
        }
    }
    stop.cancel();
    let mut dropped = 0u64;
    let mut members = Vec::new();
    for w in watchers {
        let (d, m) = w.await?;
        dropped += u64::from(d);
        members.push(m);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let (harness, daemon) = meter.finish();
    let mut outcome = Outcome {
        scenario: "idle".into(),
        users: connected,
        connections: connected,
        measured_secs: start.elapsed().as_secs_f64(),
        connect: Some(connect),
        harness,
        daemon,
        ..Outcome::default()
    };
    outcome
        .extra
        .insert("dropped_while_idle".into(), dropped as f64);
    let per_conn =
        |before: Option<stats::ProcSample>, after: Option<stats::ProcSample>| match (before, after)
        {
            (Some(b), Some(a)) if connected > 0 => {
                Some((a.rss_bytes.saturating_sub(b.rss_bytes)) as f64 / connected as f64 / 1024.0)
            }
            _ => None,
        };
    if let Some(kib) = per_conn(daemon_before, daemon_after) {
        outcome
            .extra
            .insert("daemon_kib_per_connection".into(), kib);
    }
    if let Some(kib) = per_conn(harness_before, harness_after) {
        outcome
            .extra
            .insert("harness_kib_per_connection".into(), kib);
    }
    for m in members {
        m.client.close().await;
    }
    Ok(outcome)
}
