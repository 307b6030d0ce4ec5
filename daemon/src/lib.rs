//! messengerd as a library, so integration tests and tools can run the real server in-process.
//! `main.rs` only parses the configuration and runs [`server::RunningServer`] until a signal.

pub mod account_budgets;
pub mod admin;
pub mod allocator;
pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod fd_limit;
pub mod hash_pool;
pub mod hub;
pub mod inbound;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod proxy_protocol;
mod requests;
pub mod seed;
pub mod server;
mod session;
pub mod state;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod web;
mod writer;

pub use config::Config;
pub use server::RunningServer;
