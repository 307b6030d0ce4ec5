//! Every metric the daemon exports, named in one place. `/metrics` renders them in the
//! Prometheus text format through the `metrics` facade; the recorder is process-global, so
//! several in-process servers (tests) share it.
//!
//! [`ALL`] describes each metric once (kind, help, unit, known label values); `install` turns
//! it into `# HELP` lines and registers every series at zero, so a scrape right after start
//! shows every counter and a rate() over a restart has a starting point. Adding a metric is
//! its constant plus one row in [`ALL`] (a unit test fails if the row is missing).

use std::sync::OnceLock;
use std::time::Instant;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "messenger_connections";
pub const CONNECTIONS_TOTAL: &str = "messenger_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "messenger_connections_refused_total";
pub const CONNECTION_CAP: &str = "messenger_connection_cap";
pub const HANDSHAKE_FAILURES: &str = "messenger_tls_handshake_failures_total";
pub const PROXY_HEADER_REJECTED: &str = "messenger_proxy_header_rejected_total";
pub const FRAMES_IN: &str = "messenger_frames_in_total";
pub const FRAMES_OUT: &str = "messenger_frames_out_total";
pub const MESSAGES_ACCEPTED: &str = "messenger_messages_accepted_total";
pub const MESSAGES_DELIVERED: &str = "messenger_messages_delivered_total";
pub const QUEUE_FULL: &str = "messenger_outbound_queue_full_total";
pub const STALL_DISCONNECTS: &str = "messenger_write_stall_disconnects_total";
pub const CATCH_UP_READS: &str = "messenger_catch_up_reads_total";
pub const BUFFERED_BYTES: &str = "messenger_buffered_bytes";
pub const BUFFERED_BYTES_LIMIT: &str = "messenger_buffered_bytes_limit";
pub const CONNECTIONS_SHED: &str = "messenger_connections_shed_total";
pub const MEMORY_ALLOCATED: &str = "messenger_memory_allocated_bytes";
pub const MEMORY_RESIDENT: &str = "messenger_memory_resident_bytes";
pub const ERRORS: &str = "messenger_request_errors_total";
pub const AUTH_FAILURES: &str = "messenger_auth_failures_total";
pub const AUTH_REFUSED: &str = "messenger_auth_refusals_total";
pub const STORE_SECONDS: &str = "messenger_store_seconds";
pub const PASSWORD_HASH_SECONDS: &str = "messenger_password_hash_seconds";
pub const ONLINE_USERS: &str = "messenger_online_users";
pub const CLUSTER_REDIS_UP: &str = "messenger_cluster_redis_up";
pub const CLUSTER_LIVE_NODES: &str = "messenger_cluster_live_nodes";
pub const CLUSTER_PUBLISHED: &str = "messenger_cluster_deliveries_published_total";
pub const CLUSTER_RECEIVED: &str = "messenger_cluster_deliveries_received_total";
pub const CLUSTER_PUBLISH_FAILURES: &str = "messenger_cluster_publish_failures_total";
pub const CLUSTER_FENCED: &str = "messenger_cluster_fenced_connections_total";
pub const CLUSTER_CATCH_UPS: &str = "messenger_cluster_catch_up_all_total";
pub const CLUSTER_CUT_OFF: &str = "messenger_cluster_cut_off_total";
pub const CLUSTER_REBALANCED: &str = "messenger_cluster_rebalanced_total";
pub const CLUSTER_FOREIGN_ENVELOPES: &str = "messenger_cluster_foreign_envelopes_total";
pub const CLUSTER_CLAIM_LOST: &str = "messenger_cluster_node_id_lost_total";
pub const BUDGET_REFUSALS: &str = "messenger_budget_refusals_total";
pub const QUOTA_REFUSALS: &str = "messenger_quota_refusals_total";
pub const BUDGET_FALLBACKS: &str = "messenger_cluster_budget_fallbacks_total";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric: what `# HELP` says, and which series exist from the start.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub unit: Option<Unit>,
    /// The label and its known values; one series per value is registered at zero.
    pub label: Option<(&'static str, &'static [&'static str])>,
    /// Set only by the cluster (a single node exporting `redis_up 0` would read as an outage).
    pub cluster_only: bool,
}

impl Metric {
    const fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Self {
            name,
            kind,
            help,
            unit: None,
            label: None,
            cluster_only: false,
        }
    }
    const fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Counter, help)
    }
    const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, Kind::Gauge, help)
    }
    const fn seconds(name: &'static str, help: &'static str) -> Self {
        let mut m = Self::new(name, Kind::Histogram, help);
        m.unit = Some(Unit::Seconds);
        m
    }
    const fn label(mut self, key: &'static str, values: &'static [&'static str]) -> Self {
        self.label = Some((key, values));
        self
    }
    const fn cluster_only(mut self) -> Self {
        self.cluster_only = true;
        self
    }
}

/// Reasons a connection is refused (`connection_refused`): the client port's effective cap,
/// its per-IP cap, and the admin port's cap.
const REFUSED_REASONS: &[&str] = &[
    "max_connections",
    "max_connections_per_ip",
    "admin_max_connections",
];
/// `ProxyHeaderError::reason` values.
const PROXY_REASONS: &[&str] = &[
    "timeout",
    "closed",
    "v1",
    "tls_without_header",
    "signature",
    "too_long",
    "malformed",
    "unsupported",
];
/// Wire error code names (`messenger_protocol::error::code_name`) plus the WebSocket origin check.
const ERROR_CODES: &[&str] = &[
    "unspecified",
    "invalid_argument",
    "unauthenticated",
    "permission_denied",
    "not_found",
    "already_exists",
    "rate_limited",
    "too_large",
    "unsupported_version",
    "unavailable",
    "internal",
    "resource_exhausted",
    "origin_refused",
];
/// Which budget refused a sign-in or password check: the `budget` label of `auth_refused`.
pub mod budget {
    pub const IP: &str = "auth_attempts_per_ip";
    pub const UNTRUSTED: &str = "login_failures_per_account";
    pub const COOKIE: &str = "login_failures_per_cookie";
    pub const DEVICE_PASSWORD: &str = "password_failures_per_device";
    pub const INVALID_RESUME: &str = "invalid_resumes_per_ip";
    pub const RESUME_DEVICE: &str = "resumes_per_device";
    pub const HASH_QUEUE: &str = "hash_queue";
}
const AUTH_BUDGETS: &[&str] = &[
    budget::IP,
    budget::UNTRUSTED,
    budget::COOKIE,
    budget::DEVICE_PASSWORD,
    budget::INVALID_RESUME,
    budget::RESUME_DEVICE,
    budget::HASH_QUEUE,
];
/// Per-account budgets (`AccountBudgets`), by the name each uses in Redis keys.
pub const BUDGETS: &[&str] = &[
    "sends",
    "send_bytes",
    "recipients",
    "reads",
    "lookups",
    "groups_created",
    "members_added",
];
/// Store calls timed with `timed_store`.
const STORE_OPS: &[&str] = &["append_message", "read_inbox"];

/// Every metric, one row each.
pub const ALL: &[Metric] = &[
    Metric::gauge(
        CONNECTIONS,
        "Client connections open now (TCP and WebSocket).",
    ),
    Metric::counter(
        CONNECTIONS_TOTAL,
        "Client connections accepted since start.",
    ),
    Metric::counter(
        CONNECTIONS_REFUSED,
        "Connections refused at accept, by reason.",
    )
    .label("reason", REFUSED_REASONS),
    Metric::gauge(
        CONNECTION_CAP,
        "Client connections allowed at once: limits.max_connections, lowered to fit the open-file limit.",
    ),
    Metric::counter(
        HANDSHAKE_FAILURES,
        "TLS handshakes that failed or timed out.",
    ),
    Metric::counter(
        PROXY_HEADER_REJECTED,
        "Connections closed for a missing or bad PROXY v2 header, by reason.",
    )
    .label("reason", PROXY_REASONS),
    Metric::counter(FRAMES_IN, "Frames read from clients."),
    Metric::counter(FRAMES_OUT, "Frames written to clients."),
    Metric::counter(
        MESSAGES_ACCEPTED,
        "Messages stored and confirmed to their sender (Sent).",
    ),
    Metric::counter(
        MESSAGES_DELIVERED,
        "Deliveries written to recipients' connections.",
    ),
    Metric::counter(
        QUEUE_FULL,
        "Times a connection's outbound queue was full (the pump falls back to the store).",
    ),
    Metric::counter(
        STALL_DISCONNECTS,
        "Connections closed because the client stopped reading.",
    ),
    Metric::counter(
        CATCH_UP_READS,
        "Inbox pages read from the store to catch a connection up.",
    ),
    Metric::gauge(
        BUFFERED_BYTES,
        "Bytes buffered by all connections now (queued outbound frames, large inbound frames being read).",
    ),
    Metric::gauge(
        BUFFERED_BYTES_LIMIT,
        "memory.max_buffered_bytes: the budget BUFFERED_BYTES stays within.",
    ),
    Metric::counter(
        CONNECTIONS_SHED,
        "Slow readers closed because the memory budget ran out (they resume from the store).",
    ),
    Metric::gauge(
        MEMORY_ALLOCATED,
        "Bytes the daemon has allocated now (from the allocator's statistics).",
    ),
    Metric::gauge(
        MEMORY_RESIDENT,
        "Bytes of physical memory the allocator holds now (freed memory is returned to the OS after about a second).",
    ),
    Metric::counter(ERRORS, "Error replies sent to clients, by wire error code.")
        .label("code", ERROR_CODES),
    Metric::counter(
        AUTH_FAILURES,
        "Failed sign-ins (wrong password, unknown user or bad token).",
    ),
    Metric::counter(
        AUTH_REFUSED,
        "Sign-ins and password checks refused before being tried, by the budget that ran out.",
    )
    .label("budget", AUTH_BUDGETS),
    Metric::seconds(
        STORE_SECONDS,
        "Time spent in store calls on the message path, by operation.",
    )
    .label("op", STORE_OPS),
    Metric::seconds(
        PASSWORD_HASH_SECONDS,
        "Time spent hashing or verifying one password.",
    ),
    Metric::gauge(
        ONLINE_USERS,
        "Users with at least one signed-in connection on this node.",
    ),
    Metric::gauge(
        CLUSTER_REDIS_UP,
        "1 when Redis answered this node's last heartbeat, else 0.",
    )
    .cluster_only(),
    Metric::gauge(
        CLUSTER_LIVE_NODES,
        "Nodes with a live heartbeat, as this node last saw them.",
    )
    .cluster_only(),
    Metric::counter(
        CLUSTER_PUBLISHED,
        "Deliveries published to other nodes through Redis.",
    ),
    Metric::counter(
        CLUSTER_RECEIVED,
        "Deliveries received from other nodes through Redis.",
    ),
    Metric::counter(
        CLUSTER_PUBLISH_FAILURES,
        "Redis publishes that failed, by kind (deliveries are recovered by a catch-up).",
    )
    .label("what", &["deliveries", "control"]),
    Metric::counter(
        CLUSTER_FENCED,
        "Connections closed because the user's session moved or was revoked on another node.",
    ),
    Metric::counter(
        CLUSTER_CATCH_UPS,
        "Catch-ups of every connection from the store, by cause.",
    )
    .label(
        "why",
        &[
            "resubscribed",
            "redis_recovered",
            "redis_down_poll",
            "peer_request",
        ],
    ),
    Metric::counter(
        CLUSTER_CUT_OFF,
        "Times this node found itself cut off from the cluster and closed its connections.",
    ),
    Metric::counter(
        CLUSTER_REBALANCED,
        "Connections this node handed back (jittered GoAway) because it held more than its share.",
    ),
    Metric::counter(
        CLUSTER_FOREIGN_ENVELOPES,
        "Envelopes of another cluster (same Redis, other database) received and dropped.",
    ),
    Metric::counter(
        CLUSTER_CLAIM_LOST,
        "Times this node's id was taken over by another process (it stops serving).",
    ),
    Metric::counter(
        BUDGET_REFUSALS,
        "Requests refused RATE_LIMITED by a per-account budget, by budget.",
    )
    .label("budget", BUDGETS),
    Metric::counter(
        QUOTA_REFUSALS,
        "Sends refused RESOURCE_EXHAUSTED by a storage quota, by quota.",
    )
    .label("quota", &["inbox_backlog", "history"]),
    Metric::counter(
        BUDGET_FALLBACKS,
        "Budget checks decided by this node alone because Redis did not answer, by budget.",
    )
    .label("budget", BUDGETS),
];

/// `# HELP` for every metric, and a zero for every series known in advance.
fn describe_and_register() {
    for m in ALL {
        match (m.kind, m.unit) {
            (Kind::Counter, _) => describe_counter!(m.name, m.help),
            (Kind::Gauge, _) => describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(m.name, unit, m.help),
            (Kind::Histogram, None) => describe_histogram!(m.name, m.help),
        }
        if m.cluster_only {
            continue;
        }
        match m.label {
            None => register(m, None),
            Some((key, values)) => values.iter().for_each(|v| register(m, Some((key, v)))),
        }
    }
}

fn register(m: &Metric, label: Option<(&'static str, &'static str)>) {
    let labels: Vec<(&'static str, &'static str)> = label.into_iter().collect();
    match m.kind {
        // Adding zero registers the series without disturbing a value already counted.
        Kind::Counter => counter!(m.name, &labels).increment(0),
        Kind::Gauge => gauge!(m.name, &labels).increment(0.0),
        // Registering is enough: an empty histogram renders with zero count.
        Kind::Histogram => drop(histogram!(m.name, &labels)),
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder once; later calls return the same handle. `None` if another
/// recorder was installed by the embedding program.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let latency_buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .ok()?
                .install_recorder()
                .ok()?;
            describe_and_register();
            Some(handle)
        })
        .clone()
}

pub fn render() -> String {
    match HANDLE.get().and_then(Option::as_ref) {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// Bytes buffered by connections now, and the budget.
pub fn buffered_bytes(now: usize, limit: usize) {
    gauge!(BUFFERED_BYTES).set(now as f64);
    gauge!(BUFFERED_BYTES_LIMIT).set(limit as f64);
}

pub fn connections_shed(n: u64) {
    counter!(CONNECTIONS_SHED).increment(n);
}

/// The allocator's own figures, when it reports them.
pub fn memory(allocated: usize, resident: usize) {
    gauge!(MEMORY_ALLOCATED).set(allocated as f64);
    gauge!(MEMORY_RESIDENT).set(resident as f64);
}

pub fn connection_opened() {
    counter!(CONNECTIONS_TOTAL).increment(1);
    gauge!(CONNECTIONS).increment(1.0);
}

pub fn connection_closed() {
    gauge!(CONNECTIONS).decrement(1.0);
}

pub fn connection_refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// The effective client-connection cap, set once at start.
pub fn connection_cap(cap: usize) {
    gauge!(CONNECTION_CAP).set(cap as f64);
}

pub fn handshake_failed() {
    counter!(HANDSHAKE_FAILURES).increment(1);
}

/// A connection closed because it lacked a valid PROXY v2 header (`proxy_protocol` on).
pub fn proxy_header_rejected(reason: &'static str) {
    counter!(PROXY_HEADER_REJECTED, "reason" => reason).increment(1);
}

pub fn frame_in() {
    counter!(FRAMES_IN).increment(1);
}

pub fn frames_out(n: u64) {
    counter!(FRAMES_OUT).increment(n);
}

pub fn message_accepted() {
    counter!(MESSAGES_ACCEPTED).increment(1);
}

pub fn delivered(n: u64) {
    counter!(MESSAGES_DELIVERED).increment(n);
}

pub fn queue_full() {
    counter!(QUEUE_FULL).increment(1);
}

pub fn stall_disconnect() {
    counter!(STALL_DISCONNECTS).increment(1);
}

pub fn catch_up_read() {
    counter!(CATCH_UP_READS).increment(1);
}

pub fn request_error(code: &'static str) {
    counter!(ERRORS, "code" => code).increment(1);
}

pub fn budget_refused(budget: &'static str) {
    counter!(BUDGET_REFUSALS, "budget" => budget).increment(1);
}

pub fn quota_refused(quota: &'static str) {
    counter!(QUOTA_REFUSALS, "quota" => quota).increment(1);
}

pub fn budget_fallback(budget: &'static str) {
    counter!(BUDGET_FALLBACKS, "budget" => budget).increment(1);
}

pub fn auth_failure() {
    counter!(AUTH_FAILURES).increment(1);
}

pub fn auth_refused(budget: &'static str) {
    counter!(AUTH_REFUSED, "budget" => budget).increment(1);
}

pub fn online_users(n: usize) {
    gauge!(ONLINE_USERS).set(n as f64);
}

pub fn password_hash_time(start: Instant) {
    histogram!(PASSWORD_HASH_SECONDS).record(start.elapsed().as_secs_f64());
}

/// Times one store call under `op`.
pub async fn timed_store<T>(op: &'static str, fut: impl Future<Output = T>) -> T {
    let start = Instant::now();
    let out = fut.await;
    histogram!(STORE_SECONDS, "op" => op).record(start.elapsed().as_secs_f64());
    out
}

pub fn cluster_redis_up(up: bool) {
    gauge!(CLUSTER_REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

pub fn cluster_live_nodes(n: usize) {
    gauge!(CLUSTER_LIVE_NODES).set(n as f64);
}

pub fn cluster_published(n: u64) {
    counter!(CLUSTER_PUBLISHED).increment(n);
}

pub fn cluster_received(n: u64) {
    counter!(CLUSTER_RECEIVED).increment(n);
}

/// `what`: "deliveries" (lost on the way; recovered by a catch-up) or "control".
pub fn cluster_publish_failed(what: &'static str) {
    counter!(CLUSTER_PUBLISH_FAILURES, "what" => what).increment(1);
}

pub fn cluster_fenced(n: u64) {
    counter!(CLUSTER_FENCED).increment(n);
}

/// `why`: "resubscribed", "redis_recovered", "redis_down_poll", "peer_request".
pub fn cluster_catch_up_all(why: &'static str) {
    counter!(CLUSTER_CATCH_UPS, "why" => why).increment(1);
}

pub fn cluster_cut_off() {
    counter!(CLUSTER_CUT_OFF).increment(1);
}

/// Connections this node handed back (a jittered `GoAway`) because it held more than its share.
pub fn cluster_rebalanced(n: u64) {
    counter!(CLUSTER_REBALANCED).increment(n);
}

/// Envelopes of another cluster that reached this node and were dropped.
pub fn cluster_foreign_envelope() {
    counter!(CLUSTER_FOREIGN_ENVELOPES).increment(1);
}

/// This node's id was taken over by another process (it stops serving).
pub fn cluster_claim_lost() {
    counter!(CLUSTER_CLAIM_LOST).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A constant without a row in `ALL` would be exported without `# HELP` and only after
    /// its first event: read this file's own constants and check each has its row.
    #[test]
    fn every_metric_constant_has_a_row() {
        let source = include_str!("metrics.rs");
        let names: Vec<&str> = source
            .lines()
            .filter_map(|l| l.strip_prefix("pub const "))
            .filter_map(|l| l.split_once(": &str = \""))
            .filter_map(|(_, rest)| rest.split_once('"'))
            .map(|(name, _)| name)
            .collect();
        assert!(names.len() >= 20, "constants not found: {names:?}");
        for name in names {
            assert!(
                ALL.iter().any(|m| m.name == name),
                "{name} has no row in metrics::ALL"
            );
        }
        for m in ALL {
            assert!(!m.help.is_empty(), "{} has no help text", m.name);
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
        }
    }
}
