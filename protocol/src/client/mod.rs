//! The async TLS client SDK of Messenger: everything that talks to the daemon — tests, the
//! terminal client, the load tester — goes through it.
//!
//! - [`tls`]: what the client trusts ([`Trust`]: a custom CA, or a pinned SHA-256
//!   fingerprint of the server's certificate) and the rustls configuration built from it.
//! - [`connection`]: one TLS connection ([`Connection`], [`Events`]): Hello/HelloOk,
//!   requests matched to responses by `request_id`, pushes as [`Event`]s, keep-alive pings.
//! - [`session`]: [`Client`], the resumable session most code uses: login/resume, reconnect
//!   with backoff, duplicate-free deliveries across reconnects, acks.
//! - [`error`]: the one error type, [`ClientError`].
//!
//! What this module owns: the client end of the transport, from TCP connect to graceful
//! close. What it must never do: skip or weaken certificate verification (there is no
//! accept-anything mode, not even for tests), panic or `unwrap` on anything the network
//! sends, acknowledge a delivery the application has not been given, or reconnect on its
//! own behind the application's back.
//!
//! ```no_run
//! # async fn demo() -> Result<(), messenger_protocol::client::ClientError> {
//! use messenger_protocol::client::{Client, ConnectOptions, Event, Recipient, Trust};
//!
//! let trust = Trust::Fingerprint(messenger_protocol::client::parse_fingerprint(
//!     "sha256:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
//! )?);
//! let mut client = Client::connect(ConnectOptions::new("127.0.0.1:7443", trust)).await?;
//! client.login("alice", "correct horse", "laptop").await?;
//! client.conn().send_text(Recipient::User(2), "hi bob").await?;
//! while let Some(event) = client.next_event().await {
//!     match event {
//!         Event::Delivery(d) => {
//!             println!("#{}: {:?}", d.seq, d.message);
//!             client.ack_seen().await?;
//!         }
//!         Event::GoAway(_) => {}
//!         Event::Closed { .. } => client.reconnect_with_backoff(10).await?,
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod connection;
pub mod error;
pub mod session;
pub mod tls;

pub use connection::{ConnectOptions, Connection, Event, Events, Recipient, new_client_msg_id};
pub use error::ClientError;
pub use session::Client;
pub use tls::{
    Trust, certificate_fingerprint, client_config, format_fingerprint, parse_fingerprint,
};
