//! Typed error codes of the wire, and the error a request answers with.

pub use crate::pb::ErrorCode;

/// An `Error` frame's content as a Rust error: a code for programs, a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code_name}: {message}", code_name = code_name(*.code))]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// For `RateLimited`: how long to wait before retrying, in milliseconds.
    pub retry_after_ms: u32,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: 0,
        }
    }

    pub fn to_pb(&self) -> crate::pb::Error {
        crate::pb::Error {
            code: self.code as i32,
            message: self.message.clone(),
            retry_after_ms: self.retry_after_ms,
        }
    }
}

impl From<crate::pb::Error> for WireError {
    fn from(e: crate::pb::Error) -> Self {
        Self {
            // An unknown code from a newer server reads as Unspecified rather than failing.
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }
}

/// The short lowercase name used in logs and docs (`invalid_argument`, ...).
pub fn code_name(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unspecified => "unspecified",
        ErrorCode::InvalidArgument => "invalid_argument",
        ErrorCode::Unauthenticated => "unauthenticated",
        ErrorCode::PermissionDenied => "permission_denied",
        ErrorCode::NotFound => "not_found",
        ErrorCode::AlreadyExists => "already_exists",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::UnsupportedVersion => "unsupported_version",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
        ErrorCode::ResourceExhausted => "resource_exhausted",
    }
}
