//! `storm`: `clients` users each have `backlog` messages waiting; all reconnect at once
//! (resume with their tokens, as after a node failure), replay their backlog and are checked.
//! Reports the time until every client is fully caught up.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use messenger_protocol::client::{Client, Event, Recipient};

use super::{ConnectSummary, Meter, Outcome, Params};
use crate::checker::{self, Node, ReceiverLog, SenderLog, Target};
use crate::drive::Run;
use crate::payload::{Stamp, client_msg_id};
use crate::stats::LatencySummary;

/// Users sending the backlog; they are indices after the clients.
const FEEDERS: u32 = 128;

pub async fn run(params: &Params, clients: u32, backlog: u32) -> anyhow::Result<Outcome> {
    // 1. Every client logs in once (or resumes), so it has a device with a cursor, then leaves.
    let (members, _) = super::connect_members(params, 0, clients).await?;
    // Leftovers of earlier runs carry another run id and are ignored, so nothing needs
    // draining here; the devices just go offline.
    let mut sessions = Vec::new();
    for m in members {
        let c = m.client;
        let token = c
            .session()
            .map(|s| s.session_token.clone())
            .unwrap_or_default();
        sessions.push((m.index, m.user_id, token, c.options().clone()));
        c.close().await;
    }
    // 2. Feeders queue the backlog.
    let (feeders, _) = super::connect_members(params, clients, FEEDERS).await?;
    let run = Arc::new(
        Run::new(params.body_size, Duration::ZERO)
            .accepted_into(params.accepted.clone())
            .foreign_since(params.foreign_since_unix_ms),
    );
    let targets: Arc<Vec<(u32, u64)>> = Arc::new(sessions.iter().map(|s| (s.0, s.1)).collect());
    let mut feeding = Vec::new();
    for (f, feeder) in feeders.into_iter().enumerate() {
        let run = run.clone();
        let targets = targets.clone();
        feeding.push(tokio::spawn(async move {
            let mut log = SenderLog {
                sender: feeder.index,
                ..SenderLog::default()
            };
            let conn = feeder.client.conn().clone();
            let node = Node::from(conn.server_node());
            // A feeder receives its own copies; keep reading them so its responses never
            // queue behind unread pushes.
            let mut own = feeder.client;
            let reader = tokio::spawn(async move { while own.next_event().await.is_some() {} });
            let mut seq = 0;
            for _ in 0..backlog {
                for (i, &(index, user_id)) in targets.iter().enumerate() {
                    if i % FEEDERS as usize != f {
                        continue;
                    }
                    seq += 1;
                    let body = Stamp {
                        run: run.id,
                        sender: feeder.index,
                        seq,
                        intended_ns: run.now_ns(),
                    }
                    .encode(run.body_size);
                    let id = client_msg_id(run.id, feeder.index, seq);
                    match conn
                        .send_message(
                            Recipient::User(user_id),
                            &id,
                            body,
                            "application/x-loadtest",
                        )
                        .await
                    {
                        Ok(_) => {
                            log.accepted(seq, Target::User(index), &node);
                            run.accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            log.failed += 1;
                            run.error(format!("feed: {e}"));
                        }
                    }
                }
            }
            reader.abort();
            (log, conn)
        }));
    }
    let mut sender_logs = Vec::new();
    for t in feeding {
        let (log, conn) = t.await?;
        sender_logs.push(log);
        conn.close().await;
    }
    let queued: u64 = sender_logs.iter().map(|l| l.accepted.len() as u64).sum();

    // 3. The storm: everyone resumes at once and reads until its backlog is in.
    let mut meter = Meter::start(params.daemon_pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    // Each client reads until every pair owed to it arrived (by identity: an unconfirmed
    // message that arrives too must not stand in for an owed one still on its way).
    let mut owed_each: std::collections::HashMap<u32, HashSet<(u32, u64)>> =
        std::collections::HashMap::new();
    for l in &sender_logs {
        for a in &l.accepted {
            if let Target::User(u) = a.target {
                owed_each.entry(u).or_default().insert((l.sender, a.seq));
            }
        }
    }
    for (index, _, token, opts) in sessions {
        let run = run.clone();
        let mut owed = owed_each.remove(&index).unwrap_or_default();
        let limit = params.drain + params.duration;
        tasks.push(tokio::spawn(async move {
            let mut log = ReceiverLog::new(index);
            let t0 = Instant::now();
            let mut connected_at = None;
            let mut client = None;
            for attempt in 0..20u32 {
                match Client::connect(opts.clone()).await {
                    Ok(mut c) => match c.resume(&token).await {
                        Ok(_) => {
                            connected_at = Some(t0.elapsed());
                            client = Some(c);
                            break;
                        }
                        Err(e) => run.error(format!("resume: {e}")),
                    },
                    Err(e) => run.error(format!("connect: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
            }
            let Some(mut c) = client else {
                return (log, None, None);
            };
            let mut node = Node::from(c.conn().server_node());
            let deadline = Instant::now() + limit;
            while !owed.is_empty() && Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(1), c.next_event()).await {
                    Ok(Some(Event::Delivery(d))) => {
                        if let Some(m) = d.message.as_ref()
                            && let Some(s) = Stamp::decode(&m.body)
                        {
                            if s.run != run.id {
                                let during = run.stored_during(m.server_time_ms);
                                log.other_run(s.sender, s.seq, &m.client_msg_id, during, &node);
                            } else {
                                owed.remove(&(s.sender, s.seq));
                                if log.arrived(s.sender, s.seq, 0, &node) {
                                    run.delivered.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    Ok(Some(Event::Closed { .. })) | Ok(None) => {
                        if c.reconnect_with_backoff(10).await.is_err() {
                            break;
                        }
                        node = Node::from(c.conn().server_node());
                    }
                    _ => {}
                }
            }
            let _ = c.ack_seen().await;
            log.node = node;
            let done = t0.elapsed();
            c.close().await;
            (log, connected_at, Some(done))
        }));
    }
    let mut receiver_logs = Vec::new();
    let mut connect_hist = checker::new_histogram();
    let mut caught_up_hist = checker::new_histogram();
    for t in tasks {
        let (log, connected, done) = t.await?;
        receiver_logs.push(log);
        if let Some(c) = connected {
            let _ = connect_hist.record((c.as_micros() as u64).max(1));
        }
        if let Some(d) = done {
            let _ = caught_up_hist.record((d.as_micros() as u64).max(1));
        }
    }
    let all_caught_up = start.elapsed();
    meter.tick();
    let (harness, daemon) = meter.finish();
    let (check, _) = checker::check(run.id, &sender_logs, &receiver_logs, &[]);
    let reconnected = connect_hist.len();
    let mut outcome = Outcome {
        scenario: "storm".into(),
        users: u64::from(clients),
        connections: reconnected,
        measured_secs: all_caught_up.as_secs_f64(),
        sent: queued,
        accepted: queued,
        delivered: check.delivered,
        delivered_per_s: check.delivered as f64 / all_caught_up.as_secs_f64().max(1e-9),
        latency: LatencySummary::of(&caught_up_hist),
        connect: Some(ConnectSummary {
            connections: reconnected,
            per_s: reconnected as f64 / all_caught_up.as_secs_f64().max(1e-9),
            ready: LatencySummary::of(&connect_hist),
            ..ConnectSummary::default()
        }),
        errors: run.errors.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        check,
        harness,
        daemon,
        ..Outcome::default()
    };
    outcome
        .extra
        .insert("all_caught_up_secs".into(), all_caught_up.as_secs_f64());
    outcome
        .extra
        .insert("backlog_per_client".into(), f64::from(backlog));
    Ok(outcome)
}
