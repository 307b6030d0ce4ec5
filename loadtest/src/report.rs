//! Output: the human table, `--json FILE`, and the latency-over-time plot (SVG).

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde::Serialize;

use crate::peers::PeerResult;
use crate::scenarios::Outcome;
use crate::stats::ResourceUse;

#[derive(Debug, Serialize)]
pub struct Report {
    pub command: String,
    pub outcome: Outcome,
    pub peers: Vec<PeerResult>,
    /// Messenger's delivered msgs/s divided by each peer's.
    pub ratios: std::collections::BTreeMap<String, f64>,
}

impl Report {
    pub fn new(command: String, outcome: Outcome, peers: Vec<PeerResult>) -> Self {
        let ratios = peers
            .iter()
            .filter(|p| p.delivered_per_s > 0.0)
            .map(|p| {
                (
                    format!("delivered_per_s_vs_{}", p.name),
                    outcome.delivered_per_s / p.delivered_per_s,
                )
            })
            .collect();
        Self {
            command,
            outcome,
            peers,
            ratios,
        }
    }

    pub fn human(&self) -> String {
        let o = &self.outcome;
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<22} {v}\n"));
        row("scenario", o.scenario.clone());
        row(
            "users / connections",
            format!("{} / {}", o.users, o.connections),
        );
        row("measured", format!("{:.1} s", o.measured_secs));
        if o.sent > 0 {
            row(
                "messages",
                format!(
                    "sent {}  accepted {}  delivered {}",
                    o.sent, o.accepted, o.delivered
                ),
            );
            row(
                "throughput",
                format!(
                    "accepted {:.0}/s  delivered {:.0}/s",
                    o.accepted_per_s, o.delivered_per_s
                ),
            );
            row("latency", o.latency.human());
            if let Some(c) = &o.completion {
                row("fan-out complete", c.human());
            }
        }
        if let Some(c) = &o.connect {
            row(
                "connect",
                format!("{} in total, {:.0}/s", c.connections, c.per_s),
            );
            if c.handshake.count > 0 {
                row("  tls + hello", c.handshake.human());
            }
            row("  ready (authed)", c.ready.human());
            if c.logins + c.resumes + c.registrations > 0 {
                row(
                    "  auth",
                    format!(
                        "{} resumed, {} logged in, {} registered",
                        c.resumes, c.logins, c.registrations
                    ),
                );
            }
            for (k, v) in &c.errors {
                row("  error", format!("{k}: {v}"));
            }
        }
        for (k, v) in &o.extra {
            row(k, format!("{v:.2}"));
        }
        if let Some(a) = &o.attack {
            row("A (baseline)", a.baseline.latency.human());
            row("B (under attack)", a.attacked.latency.human());
            row("A check", a.baseline.check.summary());
            row("B check", a.attacked.check.summary());
            for (name, counts) in &a.attackers {
                let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
                row(&format!("attack {name}"), line.join(", "));
            }
            for (k, v) in &a.skipped {
                row(&format!("skipped {k}"), v.clone());
            }
            for (k, v) in &a.daemon_counters {
                row(
                    k.trim_start_matches("messenger_"),
                    format!("{v:.0} (daemon, phase B)"),
                );
            }
        }
        row("check", o.check.summary());
        // The pairs behind a failed check, by name: sender, recipient, client_msg_id, seq, nodes.
        for line in o.check.named().lines() {
            row("", line.to_string());
        }
        for (k, v) in &o.errors {
            row("error", format!("{k}: {v}"));
        }
        for (k, v) in &o.daemon_metrics {
            row(
                k.trim_start_matches("messenger_"),
                format!("{v:.0} (daemon, during the run)"),
            );
        }
        row("harness", resource(&o.harness));
        if let Some(d) = &o.daemon {
            row("daemon", resource(d));
        }
        for p in &self.peers {
            row(
                &format!("peer {}", p.name),
                format!(
                    "delivered {:.0}/s  {}  check {}",
                    p.delivered_per_s,
                    p.latency.human(),
                    if p.check.clean() {
                        "clean"
                    } else {
                        "NOT CLEAN"
                    }
                ),
            );
        }
        for (k, v) in &self.ratios {
            row(k, format!("{v:.2}×"));
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// p99 latency per second of the run, as an SVG line chart.
    pub fn write_plot(&self, path: &Path) -> anyhow::Result<()> {
        let points: Vec<(f64, f64)> = self
            .outcome
            .timeline_p99_us
            .iter()
            .map(|&(s, us)| (s, us as f64 / 1000.0))
            .collect();
        let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
        let max_y = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
        let root = SVGBackend::new(path, (900, 400)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{}: p99 latency per second", self.outcome.scenario),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..max_x, 0.0..max_y)
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc("p99 ms")
            .draw()
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        chart
            .draw_series(LineSeries::new(points, &BLUE))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
        Ok(())
    }
}

fn resource(r: &ResourceUse) -> String {
    format!(
        "pid {}  cpu {:.0}% of a core  rss {:.0} MiB (peak {:.0} MiB)",
        r.pid, r.cpu_percent, r.rss_mib_end, r.rss_mib_peak
    )
}
