//! The budgets every account has (issue 11 item 2), built from `[limits]`, and the one place a
//! budget's refusal becomes a wire error naming it. What each request costs is decided by its
//! handler; how buckets are kept (and shared by a cluster) is `budget`'s business.

use std::sync::Arc;
use std::time::Duration;

use messenger_protocol::WireError;

use crate::budget::{Allowance, Limiter, SharedBudgets};
use crate::config::Limits;
use crate::model::UserId;
use crate::session::rate_limited;

pub struct AccountBudgets {
    /// Messages sent (1 per send, checked before the store).
    pub sends: Limiter<UserId>,
    /// Message-body bytes sent (a message costs its body's size, checked before the store).
    pub send_bytes: Limiter<UserId>,
    /// Inbox entries created by the account's sends (their fan-out, charged after the store).
    pub recipients: Limiter<UserId>,
    /// Read requests.
    pub reads: Limiter<UserId>,
    /// LookupUser, on top of `reads`.
    pub lookups: Limiter<UserId>,
    pub groups_created: Limiter<UserId>,
    /// Members added to groups, initial members of new groups included.
    pub members_added: Limiter<UserId>,
}

impl AccountBudgets {
    pub fn new(l: &Limits) -> Self {
        Self {
            sends: Limiter::new(
                "sends",
                Allowance::per_second(l.messages_per_second, l.message_burst),
            ),
            send_bytes: Limiter::new(
                "send_bytes",
                Allowance::per_second(l.send_bytes_per_second, l.send_bytes_burst),
            ),
            recipients: Limiter::new(
                "recipients",
                Allowance::per_second(l.recipients_per_second, l.recipient_burst),
            ),
            reads: Limiter::new(
                "reads",
                Allowance::per_second(l.reads_per_second, l.read_burst),
            ),
            lookups: Limiter::new("lookups", Allowance::per_minute(l.lookups_per_minute)),
            groups_created: Limiter::new(
                "groups_created",
                Allowance::per_hour(l.groups_created_per_hour),
            ),
            members_added: Limiter::new(
                "members_added",
                Allowance::per_minute(l.group_members_added_per_minute),
            ),
        }
    }

    /// Every budget from now on is the cluster's (see `budget`).
    pub fn share_through(&mut self, shared: Arc<dyn SharedBudgets>) {
        for limiter in [
            &mut self.sends,
            &mut self.send_bytes,
            &mut self.recipients,
            &mut self.reads,
            &mut self.lookups,
            &mut self.groups_created,
            &mut self.members_added,
        ] {
            limiter.share_through(Arc::clone(&shared));
        }
    }
}

/// `RATE_LIMITED` for a refusal by `limiter`, naming the budget and its size so a client (and
/// whoever reads its logs) knows which one it ran into.
pub fn refused(limiter: &Limiter<UserId>, wait: Duration) -> WireError {
    crate::metrics::budget_refused(limiter.name());
    let a = limiter.allowance();
    let what = match limiter.name() {
        "sends" => format!(
            "sending too fast: at most {} messages per second per account (burst {})",
            fmt(a.rate),
            fmt(a.burst)
        ),
        "send_bytes" => format!(
            "sending too many bytes: at most {} bytes of message bodies per second per account \
             (burst {})",
            fmt(a.rate),
            fmt(a.burst)
        ),
        "recipients" => format!(
            "sending to too many recipients: at most {} inbox deliveries per second per account \
             (burst {}; a group message counts once per member)",
            fmt(a.rate),
            fmt(a.burst)
        ),
        "reads" => format!(
            "too many read requests: at most {} per second per account (burst {})",
            fmt(a.rate),
            fmt(a.burst)
        ),
        "lookups" => format!(
            "too many user lookups: at most {} per minute per account",
            fmt(a.burst)
        ),
        "groups_created" => format!(
            "too many groups created: at most {} per hour per account",
            fmt(a.burst)
        ),
        "members_added" => format!(
            "too many group members added: at most {} per minute per account",
            fmt(a.burst)
        ),
        other => format!("the {other} budget of this account is used up"),
    };
    rate_limited(&format!("{what}; retry later"), wait)
}

fn fmt(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
