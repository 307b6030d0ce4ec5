//! The faults the soak cycles through, each injected and recovered from as an operator (or a
//! crash) would, and the CPU hog that keeps the machine busy meanwhile.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use super::cluster::{Cluster, SingleNode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL one node, then start it again.
    Kill,
    /// SIGSTOP one node for 8 s, then SIGCONT.
    Freeze,
    /// Redis down for 1 s.
    #[serde(rename = "redis-1s")]
    Redis1s,
    /// Redis down for 10 s.
    #[serde(rename = "redis-10s")]
    Redis10s,
    /// PostgreSQL down for 5 s.
    #[serde(rename = "postgres-5s")]
    Postgres5s,
    /// SIGTERM each node in turn, start it again, wait until the balancer routes to it.
    Rolling,
    /// The single node on SQLite: SIGKILL, then start it again on the same data dir.
    SingleKill,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::Kill,
        Fault::Freeze,
        Fault::Redis1s,
        Fault::Redis10s,
        Fault::Postgres5s,
        Fault::Rolling,
        Fault::SingleKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Freeze => "freeze",
            Fault::Redis1s => "redis-1s",
            Fault::Redis10s => "redis-10s",
            Fault::Postgres5s => "postgres-5s",
            Fault::Rolling => "rolling",
            Fault::SingleKill => "single-kill",
        }
    }

    /// Runs on the single SQLite node rather than on the cluster.
    pub fn single_node(self) -> bool {
        self == Fault::SingleKill
    }

    /// About how long the fault lasts once injected, recovery included: traffic must go on
    /// at least this long after the injection for clients to live through all of it.
    pub fn span(self) -> Duration {
        Duration::from_secs(match self {
            Fault::Kill | Fault::SingleKill => 2,
            Fault::Freeze => 9,
            Fault::Redis1s => 2,
            Fault::Redis10s => 11,
            Fault::Postgres5s => 6,
            Fault::Rolling => 9,
        })
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown fault {s:?} (one of {})", names.join(", "))
            })
    }
}

/// Breaks the cluster (the moment "served again" is timed from); `round` picks the node, so
/// every node gets its turn. Quick: the waiting and mending is [`recover`].
pub async fn inject(fault: Fault, cluster: &mut Cluster, round: usize) -> anyhow::Result<()> {
    let victim = round % cluster.nodes.len();
    match fault {
        Fault::Kill => cluster.nodes[victim].kill(),
        Fault::Freeze => cluster.nodes[victim].freeze()?,
        Fault::Redis1s | Fault::Redis10s => cluster.stop_redis(),
        Fault::Postgres5s => cluster.stop_postgres()?,
        Fault::Rolling => cluster.nodes[0].terminate().await?,
        Fault::SingleKill => anyhow::bail!("single-kill runs on the single node"),
    }
    Ok(())
}

/// Ends the fault injected by [`inject`] with the same `round`: waits out its length and
/// starts or resumes what was stopped. The caller then waits for the whole cluster.
pub async fn recover(fault: Fault, cluster: &mut Cluster, round: usize) -> anyhow::Result<()> {
    let victim = round % cluster.nodes.len();
    match fault {
        Fault::Kill => cluster.nodes[victim].restart().await?,
        Fault::Freeze => {
            // Longer than the node TTL (5 s): the others drop it and its clients move.
            tokio::time::sleep(Duration::from_secs(8)).await;
            cluster.nodes[victim].thaw()?;
            cluster.nodes[victim].ready().await?;
        }
        Fault::Redis1s | Fault::Redis10s => {
            let down = if fault == Fault::Redis1s { 1 } else { 10 };
            tokio::time::sleep(Duration::from_secs(down)).await;
            cluster.start_redis()?;
        }
        Fault::Postgres5s => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            cluster.start_postgres()?;
        }
        Fault::Rolling => {
            for i in 0..cluster.nodes.len() {
                if i > 0 {
                    cluster.nodes[i].terminate().await?;
                }
                cluster.nodes[i].restart().await?;
                // The next one goes only once the balancer routes to this one again.
                cluster.balanced().await?;
            }
        }
        Fault::SingleKill => anyhow::bail!("single-kill runs on the single node"),
    }
    Ok(())
}

/// The single node's fault: SIGKILL under load (`inject_single`), then start it again on the
/// same data dir (`recover_single`).
pub fn inject_single(single: &mut SingleNode) {
    single.node.kill();
}

pub async fn recover_single(single: &mut SingleNode) -> anyhow::Result<()> {
    single.node.restart().await
}

/// Busy loops, one per core, until dropped: the soak's "busy machine".
pub struct CpuHog {
    children: Vec<Child>,
}

impl CpuHog {
    pub fn start() -> anyhow::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut hog = Self {
            children: Vec::new(),
        };
        for _ in 0..cores {
            let child = Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            hog.children.push(child);
        }
        Ok(hog)
    }

    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
