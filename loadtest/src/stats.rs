//! Numbers of a run: latency summaries from HDR histograms, rates, and resource use of the
//! harness itself and of the daemon (from /proc), so the generator can show it was not the
//! bottleneck it measured.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of a histogram of microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }

    /// "p50 1.2 ms  p99 4.0 ms ..." for the human table.
    pub fn human(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.count
        )
    }
}

pub fn ms(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.0} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} ms", us as f64 / 1000.0)
    }
}

/// CPU and memory of one process over the measured interval.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResourceUse {
    pub pid: u32,
    /// Average CPU over the interval, in percent of one core.
    pub cpu_percent: f64,
    pub rss_mib_end: f64,
    pub rss_mib_peak: f64,
}

/// One reading of /proc/<pid>: CPU seconds used so far and resident memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

/// Reads /proc/<pid>/stat (utime + stime) and /proc/<pid>/status (VmRSS).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    // Linux reports in clock ticks of 1/100 s on every platform this runs on.
    Some(ProcSample {
        cpu_secs: (utime + stime) / 100.0,
        rss_bytes: rss_kb * 1024,
    })
}

pub fn resource_use(
    pid: u32,
    start: ProcSample,
    end: ProcSample,
    peak_rss: u64,
    elapsed: Duration,
) -> ResourceUse {
    let secs = elapsed.as_secs_f64().max(1e-9);
    ResourceUse {
        pid,
        cpu_percent: (end.cpu_secs - start.cpu_secs) / secs * 100.0,
        rss_mib_end: end.rss_bytes as f64 / 1_048_576.0,
        rss_mib_peak: peak_rss.max(end.rss_bytes) as f64 / 1_048_576.0,
    }
}

/// The pid of a running `messengerd` on this machine, if exactly one runs.
pub fn find_daemon() -> Option<u32> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "messengerd" {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

/// Errors by kind ("send: rate_limited", "connect: timed out", ...).
pub type ErrorCounts = BTreeMap<String, u64>;
