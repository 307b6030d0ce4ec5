//! The one error type of the client SDK.

use crate::{CodecError, WireError};

/// Everything a client call can fail with.
///
/// Nothing that arrives from the network makes the SDK panic; it becomes one of these.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket error (connect refused, reset, ...).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake failed (untrusted certificate, fingerprint mismatch, ALPN, ...).
    #[error("tls error: {0}")]
    Tls(String),
    /// A frame could not be encoded or decoded (too large, malformed).
    #[error("codec error: {0}")]
    Codec(#[from] CodecError),
    /// The server answered the request with an `Error` frame.
    #[error("server error: {0}")]
    Wire(#[from] WireError),
    /// The connection is closed (or closed while the request was waiting); the reason says why.
    #[error("connection closed: {0}")]
    Closed(String),
    /// No answer within the request (or connect) timeout.
    #[error("timed out")]
    Timeout,
    /// The server answered with something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Bad options: address, server name, trust material, fingerprint syntax.
    #[error("configuration error: {0}")]
    Config(String),
}

impl ClientError {
    /// The wire error code when the server refused the request, else `None`.
    pub fn wire_code(&self) -> Option<crate::ErrorCode> {
        match self {
            ClientError::Wire(e) => Some(e.code),
            _ => None,
        }
    }

    /// True when retrying on a new connection may succeed (network trouble, server
    /// restarting, rate limiting); false for errors a retry cannot fix (bad credentials,
    /// bad configuration, certificate not trusted, protocol mismatch).
    pub fn is_transient(&self) -> bool {
        use crate::ErrorCode;
        match self {
            ClientError::Io(_) | ClientError::Closed(_) | ClientError::Timeout => true,
            ClientError::Codec(CodecError::Io(_)) => true,
            ClientError::Codec(_) => false,
            ClientError::Wire(e) => matches!(
                e.code,
                ErrorCode::Unavailable | ErrorCode::RateLimited | ErrorCode::Internal
            ),
            ClientError::Tls(_) | ClientError::Protocol(_) | ClientError::Config(_) => false,
        }
    }

    /// Maps an i/o error from the TLS stream: a rustls error inside becomes [`ClientError::Tls`].
    pub(crate) fn from_tls_io(e: std::io::Error) -> Self {
        match e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(tls) => ClientError::Tls(tls.to_string()),
            None => ClientError::Io(e),
        }
    }
}
