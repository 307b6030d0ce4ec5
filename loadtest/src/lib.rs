//! The load generator and delivery checker as a library: the `messenger-loadtest` binary is
//! its command line, and the daemon's cluster failure tests drive traffic through it while
//! they kill nodes, so both judge delivery with the same checker.

pub mod chaos;
pub mod checker;
pub mod daemon_metrics;
pub mod drive;
pub mod fleet;
pub mod ledger;
pub mod payload;
pub mod peers;
pub mod report;
pub mod scenarios;
pub mod stats;
