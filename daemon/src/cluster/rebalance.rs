//! Handing connections back: a restarted (or newly added) node starts empty because its
//! clients resumed on the others, and a long-lived connection never moves by itself. Each node
//! publishes its connection count and readiness with its heartbeat (`Load`); a node that holds
//! clearly more than its share hands a few connections back with a jittered `GoAway`
//! (`UNAVAILABLE`, reconnect in 0.5–3 s), and the balancer (`leastconn`) sends them to the
//! emptier nodes. Rounds are small and spaced by `SETTLE`, so the cluster never stampedes and
//! the counts it acts on include the connections it moved in the last round.

use std::time::Duration;

/// Between two rounds on one node: longer than the longest reconnect delay a rebalancing
/// `GoAway` asks for (3 s), plus a heartbeat for the receiving node to publish its count.
pub const SETTLE: Duration = Duration::from_secs(5);

/// A node never hands back for fewer surplus connections than this: with a handful of
/// clients, moving one is churn, not balance.
pub const MIN_EXCESS: u64 = 2;

/// What the GoAway of a handed-back connection says (docs/PROTOCOL.md §13).
pub const REASON: &str = "rebalancing: this node has more than its share of connections; reconnect";

/// One node's published load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub connections: u64,
    /// Serving sign-ins (not rejoining after being cut off, Redis reachable).
    pub ready: bool,
}

impl Load {
    pub fn encode(self) -> String {
        format!("{} {}", self.connections, u8::from(self.ready))
    }

    /// `None` for anything malformed: another build, or not ours at all.
    pub fn decode(s: &str) -> Option<Self> {
        let (connections, ready) = s.split_once(' ')?;
        let ready = match ready {
            "1" => true,
            "0" => false,
            _ => return None,
        };
        Some(Self {
            connections: connections.parse().ok()?,
            ready,
        })
    }
}

/// How many connections a node holding `mine` should hand back this round, given the loads
/// of every live node (itself included; `None` where a live node published none).
///
/// Nothing moves unless there are at least two nodes, every one published a load and is
/// ready. A node hands back when it is above the mean and either it exceeds the mean by more
/// than `tolerance_percent`, or the emptiest node is below the mean by more than that; it
/// hands back a quarter of what it holds above the (rounded up) mean, at least one and at
/// most `max_batch`. Less than `MIN_EXCESS` above that mean is never worth a move.
pub fn hand_back(
    mine: u64,
    loads: &[Option<Load>],
    tolerance_percent: u64,
    max_batch: usize,
) -> usize {
    if tolerance_percent == 0 || max_batch == 0 || loads.len() < 2 {
        return 0;
    }
    let Some(loads) = loads
        .iter()
        .map(|l| l.filter(|l| l.ready))
        .collect::<Option<Vec<Load>>>()
    else {
        return 0;
    };
    let total: u64 = loads.iter().map(|l| l.connections).sum();
    let nodes = loads.len() as u64;
    let target = total.div_ceil(nodes);
    let Some(emptiest) = loads.iter().map(|l| l.connections).min() else {
        return 0;
    };
    if mine < target + MIN_EXCESS || mine - emptiest < 2 {
        return 0;
    }
    // In hundredths, to stay in integers: mean × (100 ± tolerance) against count × 100 × n.
    let mean_x100n = u128::from(total) * 100;
    let above = u128::from(mine) * 100 * u128::from(nodes)
        > mean_x100n * u128::from(100 + tolerance_percent) / 100;
    let below = u128::from(emptiest) * 100 * u128::from(nodes)
        < mean_x100n * u128::from(100u64.saturating_sub(tolerance_percent)) / 100;
    if !above && !below {
        return 0;
    }
    let excess = mine - target;
    usize::try_from(excess.div_ceil(4))
        .unwrap_or(usize::MAX)
        .clamp(1, max_batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(counts: &[u64]) -> Vec<Option<Load>> {
        counts
            .iter()
            .map(|&c| {
                Some(Load {
                    connections: c,
                    ready: true,
                })
            })
            .collect()
    }

    #[test]
    fn loads_round_trip_and_garbage_is_none() {
        let l = Load {
            connections: 42,
            ready: true,
        };
        assert_eq!(Load::decode(&l.encode()), Some(l));
        for bad in ["", "1", "x 1", "1 2", "-1 1", "1 1 1"] {
            assert_eq!(Load::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_busy_nodes_hand_back_a_quarter_of_their_excess_to_an_empty_one() {
        let loads = ready(&[30, 30, 0]);
        assert_eq!(hand_back(30, &loads, 20, 100), 3);
        assert_eq!(hand_back(0, &loads, 20, 100), 0);
        assert_eq!(hand_back(30, &loads, 20, 2), 2, "capped per round");
        // Within tolerance of the mean on the busy side, but the empty side is far below.
        assert_eq!(hand_back(24, &ready(&[24, 24, 12]), 20, 100), 1);
    }

    #[test]
    fn balanced_small_or_unsure_clusters_stay_put() {
        assert_eq!(hand_back(21, &ready(&[21, 20, 19]), 20, 100), 0);
        assert_eq!(hand_back(22, &ready(&[22, 22, 16]), 20, 100), 0);
        assert_eq!(hand_back(1, &ready(&[1, 1, 0]), 20, 100), 0);
        assert_eq!(
            hand_back(2, &ready(&[2, 1, 0]), 20, 100),
            0,
            "churn, not balance"
        );
        assert_eq!(hand_back(4, &ready(&[4, 0, 2]), 20, 100), 1);
        assert_eq!(hand_back(50, &ready(&[50]), 20, 100), 0, "alone");
        assert_eq!(hand_back(30, &ready(&[30, 0]), 0, 100), 0, "turned off");
        let mut unknown = ready(&[30, 30]);
        unknown.push(None);
        assert_eq!(hand_back(30, &unknown, 20, 100), 0, "a node without a load");
        let mut rejoining = ready(&[30, 30]);
        rejoining.push(Some(Load {
            connections: 0,
            ready: false,
        }));
        assert_eq!(hand_back(30, &rejoining, 20, 100), 0, "a node not ready");
    }
}
