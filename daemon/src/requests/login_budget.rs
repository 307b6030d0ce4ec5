//! Which failed-login budget a `Login` spends (the "device cookie" scheme, audit F6).
//!
//! A device that presents a login cookie the account gave it earlier spends a budget of its
//! own; every other attempt (no cookie, or one that is unknown, forged or another account's)
//! shares the account's "untrusted" budget. An attacker can exhaust the untrusted budget, and
//! so slow down only unknown devices: never the owner's known device with the right password.
//!
//! Refusals name the budget but never whether the username exists: the untrusted budget is
//! kept per case-folded username whether or not an account has it, and the cookie lookup runs
//! (against no user) for an unknown username too.

use messenger_protocol::WireError;

use crate::auth::Lane;
use crate::metrics;
use crate::model::{Account, UserId};
use crate::session::{Session, rate_limited};

/// Login cookies remembered per account (the most recently used); a device whose cookie was
/// pushed out gets a new one at its next successful login.
pub(crate) const LOGIN_COOKIES_PER_ACCOUNT: usize = 32;

/// The budget one login attempt spends.
pub(crate) enum Budget {
    /// A valid login cookie of the account, by its hash.
    Cookie([u8; 32]),
    /// The account's shared budget, by case-folded username.
    Untrusted(String),
}

impl Budget {
    /// The hash queue a known device's check waits in.
    pub(crate) fn lane(&self) -> Lane {
        match self {
            Budget::Cookie(_) => Lane::Reserved,
            Budget::Untrusted(_) => Lane::Normal,
        }
    }
}

pub(crate) fn untrusted_refusal(wait: std::time::Duration) -> WireError {
    metrics::auth_refused(metrics::budget::UNTRUSTED);
    rate_limited(
        "too many failed logins for this account from devices it does not know; sign in from a \
         device that signed in before, or retry later",
        wait,
    )
}

impl Session {
    /// Refuses early, before any store read, when an attempt without a cookie would spend an
    /// exhausted untrusted budget.
    pub(crate) async fn check_untrusted(&self, username_key: &str) -> Result<(), WireError> {
        self.shared
            .login_failures
            .check(&username_key.to_owned())
            .await
            .map_err(untrusted_refusal)
    }

    /// Decides the attempt's budget and refuses when it is exhausted.
    pub(crate) async fn login_budget(
        &self,
        username_key: &str,
        account: Option<&Account>,
        cookie_hash: Option<[u8; 32]>,
    ) -> Result<Budget, WireError> {
        let known = match cookie_hash {
            // No user has id 0: an unknown username costs the same lookup and finds nothing.
            Some(hash) => {
                let user = account.map_or(UserId(0), |a| a.user.id);
                self.shared
                    .store
                    .has_login_cookie(user, &hash)
                    .await?
                    .then_some(hash)
            }
            None => None,
        };
        let budget = match known {
            Some(hash) => Budget::Cookie(hash),
            None => Budget::Untrusted(username_key.to_owned()),
        };
        match &budget {
            Budget::Cookie(hash) => self.shared.cookie_failures.check(hash).map_err(|wait| {
                metrics::auth_refused(metrics::budget::COOKIE);
                rate_limited(
                    "too many failed logins from this device for this account; retry later",
                    wait,
                )
            })?,
            Budget::Untrusted(key) => self
                .shared
                .login_failures
                .check(key)
                .await
                .map_err(untrusted_refusal)?,
        }
        Ok(budget)
    }

    pub(crate) fn record_login_failure(&self, budget: &Budget) {
        match budget {
            Budget::Cookie(hash) => self.shared.cookie_failures.record(hash),
            Budget::Untrusted(key) => self.shared.login_failures.record(key),
        }
    }

    /// After a successful login: a known device's slate is clean again. The untrusted budget
    /// is left alone: the owner signing in must not reset an attacker's count.
    pub(crate) fn clear_login_failures(&self, budget: &Budget) {
        if let Budget::Cookie(hash) = budget {
            self.shared.cookie_failures.clear(hash);
        }
    }
}
