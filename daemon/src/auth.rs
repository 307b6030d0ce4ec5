//! Credentials: argon2id password hashing on a fixed set of threads behind bounded queues
//! (`hash_pool`), session tokens and login cookies, and the validation rules for usernames,
//! display names and passwords.
//!
//! Hashing never runs on the async workers, and a login flood never queues without bound: a
//! check that finds the queue full is refused at once (`UNAVAILABLE` with a retry hint), and
//! known devices have a reserved queue served first.

use std::sync::Arc;
use std::time::Instant;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use messenger_protocol::{ErrorCode, WireError};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::Passwords;
pub use crate::hash_pool::Lane;
use crate::hash_pool::{Busy, HashPool, Hold};
use crate::metrics;

pub const MAX_PASSWORD_BYTES: usize = 1024;
pub const USERNAME_MIN: usize = 3;
pub const USERNAME_MAX: usize = 32;
pub const DISPLAY_NAME_MAX_CHARS: usize = 64;

#[derive(Clone)]
pub struct PasswordHasher {
    params: Params,
    pool: Arc<HashPool>,
    /// A real hash of a random password, verified against when the account does not exist,
    /// so a failed login takes the same time whether or not the username is taken.
    dummy_hash: Arc<String>,
}

impl PasswordHasher {
    pub fn new(config: &Passwords) -> Result<Self, String> {
        let params = Params::new(
            config.argon2_memory_kib,
            config.argon2_iterations,
            config.argon2_parallelism,
            None,
        )
        .map_err(|e| format!("argon2 parameters: {e}"))?;
        let concurrency = match config.hash_concurrency {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        // The dummy hash doubles as the first measurement for retry hints.
        let start = Instant::now();
        let dummy_hash = argon
            .hash_password(&random_bytes::<16>())
            .map_err(|e| format!("argon2: {e}"))?
            .to_string();
        let pool = HashPool::start(
            concurrency,
            config.hash_queue,
            config.hash_queue_reserved,
            start.elapsed(),
        )?;
        Ok(Self {
            params,
            pool: Arc::new(pool),
            dummy_hash: Arc::new(dummy_hash),
        })
    }

    fn argon(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// Hashes a password into a PHC string.
    pub async fn hash(&self, password: &str, lane: Lane) -> Result<String, WireError> {
        let argon = self.argon();
        let password = password.to_owned();
        self.run(lane, move || {
            argon
                .hash_password(password.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| internal(format!("hashing: {e}")))
        })
        .await
    }

    /// True when `password` matches `phc`; a missing account passes `None` and gets `false`
    /// after the same amount of work.
    pub async fn verify(
        &self,
        password: &str,
        phc: Option<&str>,
        lane: Lane,
    ) -> Result<bool, WireError> {
        let argon = self.argon();
        let password = password.to_owned();
        let (phc, real) = match phc {
            Some(p) => (p.to_owned(), true),
            None => (self.dummy_hash.as_str().to_owned(), false),
        };
        self.run(lane, move || {
            let parsed =
                PasswordHash::new(&phc).map_err(|e| internal(format!("stored hash: {e}")))?;
            Ok(argon.verify_password(password.as_bytes(), &parsed).is_ok() && real)
        })
        .await
    }

    /// Password checks waiting for a hashing thread.
    pub fn waiting(&self) -> usize {
        self.pool.waiting()
    }

    /// Test hook: the hashing threads take no new job until the guard is dropped.
    #[doc(hidden)]
    pub fn hold(&self) -> Hold {
        self.pool.hold()
    }

    async fn run<T: Send + 'static>(
        &self,
        lane: Lane,
        work: impl FnOnce() -> Result<T, WireError> + Send + 'static,
    ) -> Result<T, WireError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Box::new(move || {
            // The client is gone (closed the connection): nobody would see the answer, so a
            // flood of abandoned logins costs no hashing.
            if reply.is_closed() {
                return false;
            }
            let start = Instant::now();
            let _ = reply.send(work());
            metrics::password_hash_time(start);
            true
        });
        self.pool.submit(lane, job).map_err(busy)?;
        answer
            .await
            .map_err(|_| WireError::new(ErrorCode::Unavailable, "shutting down"))?
    }
}

/// The refusal when the hash queues are full: retryable, with a hint.
fn busy(b: Busy) -> WireError {
    metrics::auth_refused(metrics::budget::HASH_QUEUE);
    let ms = u32::try_from(b.retry_after.as_millis()).unwrap_or(u32::MAX);
    let mut e = WireError::new(
        ErrorCode::Unavailable,
        format!("server busy checking passwords; retry in {ms} ms"),
    );
    e.retry_after_ms = ms.max(1);
    e
}

fn internal(message: String) -> WireError {
    WireError::new(ErrorCode::Internal, message)
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}

/// A new session token (32 random bytes) and the hash that is stored instead of it.
pub fn new_token() -> ([u8; 32], [u8; 32]) {
    let token = random_bytes::<32>();
    (token, token_hash(&token))
}

pub fn token_hash(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Length of a login cookie; anything else a client sends is no cookie.
pub const LOGIN_COOKIE_BYTES: usize = 32;

/// A new login cookie (32 random bytes) and the hash that is stored instead of it.
pub fn new_login_cookie() -> ([u8; LOGIN_COOKIE_BYTES], [u8; 32]) {
    new_token()
}

/// The stored hash of a presented login cookie, or `None` when it cannot be one.
pub fn login_cookie_hash(cookie: &[u8]) -> Option<[u8; 32]> {
    (cookie.len() == LOGIN_COOKIE_BYTES).then(|| token_hash(cookie))
}

fn invalid(message: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::InvalidArgument, message)
}

/// Usernames: 3–32 ASCII letters, digits, `_`, `.` or `-`, starting with a letter or digit.
/// Returns the case-folded key that uniqueness is decided on.
pub fn username_key(username: &str) -> Result<String, WireError> {
    let len = username.len();
    if !(USERNAME_MIN..=USERNAME_MAX).contains(&len) {
        return Err(invalid(format!(
            "username must be {USERNAME_MIN} to {USERNAME_MAX} characters"
        )));
    }
    let mut chars = username.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_alphanumeric()) {
        return Err(invalid("username must start with a letter or digit"));
    }
    if !username
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(invalid(
            "username may contain only ASCII letters, digits, '_', '.' and '-'",
        ));
    }
    Ok(username.to_ascii_lowercase())
}

/// Display names: 1–64 characters after trimming, no control characters.
pub fn display_name(name: &str) -> Result<String, WireError> {
    let name = name.trim();
    let count = name.chars().count();
    if count == 0 || count > DISPLAY_NAME_MAX_CHARS {
        return Err(invalid(format!(
            "display name must be 1 to {DISPLAY_NAME_MAX_CHARS} characters"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("display name must not contain control characters"));
    }
    Ok(name.to_owned())
}

pub fn check_new_password(password: &str, min_chars: usize) -> Result<(), WireError> {
    if password.chars().count() < min_chars {
        return Err(invalid(format!(
            "password must be at least {min_chars} characters"
        )));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(invalid(format!(
            "password must be at most {MAX_PASSWORD_BYTES} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_validated_and_case_folded() {
        assert_eq!(username_key("Alice_1").ok().as_deref(), Some("alice_1"));
        for bad in ["ab", "_alice", "al ice", "ålice", &"a".repeat(33), ""] {
            assert!(username_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn display_names_are_trimmed_and_refuse_control_characters() {
        assert_eq!(display_name("  Zoë 🐱 ").ok().as_deref(), Some("Zoë 🐱"));
        assert!(display_name("a\u{1b}[2J").is_err());
        assert!(display_name("   ").is_err());
    }

    #[tokio::test]
    async fn a_hash_verifies_only_its_own_password() {
        let hasher = PasswordHasher::new(&Passwords::default()).expect("hasher");
        let hash = hasher
            .hash("correct horse", Lane::Normal)
            .await
            .expect("hash");
        assert!(
            hasher
                .verify("correct horse", Some(&hash), Lane::Normal)
                .await
                .expect("verify")
        );
        assert!(
            !hasher
                .verify("wrong horse", Some(&hash), Lane::Reserved)
                .await
                .expect("verify")
        );
        assert!(
            !hasher
                .verify("correct horse", None, Lane::Normal)
                .await
                .expect("verify")
        );
    }
}
