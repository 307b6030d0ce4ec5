//! The one place Redis key and channel names are made. Everything a cluster writes to Redis
//! lives under `messenger:{cluster_id}:`, the id its database was created with
//! (`Store::cluster_id`), so clusters sharing one Redis (same node names, same user and
//! device ids in their own databases) never read or fence each other.

use crate::model::{DeviceId, UserId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    cluster_id: String,
    prefix: String,
}

impl Keyspace {
    /// `cluster_id` must be what `Store::cluster_id` returns: 32 lowercase hex characters.
    /// Anything else is refused, so no id can reach into another keyspace (a `:` or a glob).
    pub fn new(cluster_id: &str) -> Result<Self, String> {
        let valid = cluster_id.len() == 32
            && cluster_id
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(format!(
                "cluster id {cluster_id:?} is not 32 lowercase hex characters"
            ));
        }
        Ok(Self {
            cluster_id: cluster_id.to_owned(),
            prefix: format!("messenger:{cluster_id}:"),
        })
    }

    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// A node's claim and heartbeat: holds the claiming process's token, expires after the
    /// node TTL unless refreshed.
    pub fn node(&self, node: &str) -> String {
        format!("{}node:{node}", self.prefix)
    }

    /// A node's connection count and readiness, written with its heartbeat (same TTL).
    pub fn load(&self, node: &str) -> String {
        format!("{}load:{node}", self.prefix)
    }

    /// The set of node ids that heartbeat (or did recently).
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// The set of nodes holding a connection of `user`.
    pub fn presence(&self, user: UserId) -> String {
        format!("{}presence:{}", self.prefix, user.0)
    }

    /// The last connect epoch handed out for `device`.
    pub fn epoch(&self, device: DeviceId) -> String {
        format!("{}epoch:{}", self.prefix, device.0)
    }

    /// One account's (or other key's) bucket of one budget (`cluster::budgets`).
    pub fn budget(&self, budget: &str, key: &str) -> String {
        format!("{}budget:{budget}:{key}", self.prefix)
    }

    /// The channel a node subscribes to for what other nodes send it.
    pub fn to_node(&self, node: &str) -> String {
        format!("{}to:{node}", self.prefix)
    }

    /// The channel every node of the cluster subscribes to.
    pub fn all(&self) -> String {
        format!("{}all", self.prefix)
    }

    /// Matches every key of this cluster (for operators cleaning up, `SCAN MATCH`).
    pub fn pattern(&self) -> String {
        format!("{}*", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn every_name_is_under_the_cluster_id() {
        let k = Keyspace::new(ID).expect("valid id");
        let p = format!("messenger:{ID}:");
        assert_eq!(k.node("node1"), format!("{p}node:node1"));
        assert_eq!(k.load("node1"), format!("{p}load:node1"));
        assert_eq!(k.nodes(), format!("{p}nodes"));
        assert_eq!(k.presence(UserId(7)), format!("{p}presence:7"));
        assert_eq!(k.epoch(DeviceId(9)), format!("{p}epoch:9"));
        assert_eq!(k.to_node("node2"), format!("{p}to:node2"));
        assert_eq!(k.budget("sends", "42"), format!("{p}budget:sends:42"));
        assert_eq!(k.all(), format!("{p}all"));
        assert_eq!(k.pattern(), format!("{p}*"));
    }

    #[test]
    fn only_a_32_hex_id_names_a_keyspace() {
        for bad in [
            "",
            "abc",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcde:",
            "0123456789abcdef0123456789abcdef0",
            "*123456789abcdef0123456789abcdef",
        ] {
            assert!(Keyspace::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
