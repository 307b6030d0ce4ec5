//! The Messenger wire protocol, `messenger.v1`.
//!
//! - [`pb`]: the protobuf messages generated from `proto/messenger/v1/messenger.proto`.
//! - [`codec`]: the length-prefixed frame codec both ends use; nobody else touches bytes.
//! - [`error`]: typed error codes and the error a request can fail with.
//! - [`client`] (feature `client`, on by default): the async TLS client SDK.

pub mod codec;
pub mod error;

#[cfg(feature = "client")]
pub mod client;

/// Generated protobuf types for package `messenger.v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/messenger.v1.rs"));
}

pub use codec::{CodecError, FrameCodec};
pub use error::{ErrorCode, WireError};

/// The protocol major version this crate speaks; sent in `Hello`.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN protocol id of the native transport.
pub const ALPN: &[u8] = b"messenger/1";

/// Default maximum frame length in bytes (the server's limit is in `HelloOk.limits`).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 256 * 1024;
