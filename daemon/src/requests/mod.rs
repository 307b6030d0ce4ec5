//! Request handlers, one module per family, each an `impl Session` block dispatched from
//! `Session::dispatch`. Handlers validate input first and change nothing on error.

mod accounts;
mod conversation_cursor;
mod groups;
mod login_budget;
mod messages;

pub use messages::CONVERSATION_PAGE_MAX;

use messenger_protocol::{ErrorCode, WireError};

pub(crate) fn invalid(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, message)
}

/// Validates a short human name (group name, device name): trimmed, 1..=max characters,
/// no control characters.
pub(crate) fn short_name(what: &str, value: &str, max: usize) -> Result<String, WireError> {
    let value = value.trim();
    let n = value.chars().count();
    if n == 0 || n > max {
        return Err(invalid(format!("{what} must be 1 to {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{what} must not contain control characters"
        )));
    }
    Ok(value.to_owned())
}
