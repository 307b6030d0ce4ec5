//! `messenger`, the terminal chat client of Messenger, as a library so its state machine and
//! rendering can be tested without a terminal.
//!
//! - [`app`]: the state machine (no I/O);
//! - [`ui`]: drawing the state with ratatui (no state changes);
//! - [`net`]: the task that owns the SDK client and talks to the daemon;
//! - [`store`]: session tokens per server in the config directory.

pub mod app;
pub mod net;
pub mod store;
pub mod ui;
