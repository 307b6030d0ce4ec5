//! Every metric the daemon exports, named in one place. `/metrics` renders them in the
//! Prometheus text format through the `metrics` facade; the recorder is process-global, so
//! several in-process servers (tests) share it.

use std::sync::OnceLock;
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "messenger_connections";
pub const CONNECTIONS_TOTAL: &str = "messenger_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "messenger_connections_refused_total";
pub const HANDSHAKE_FAILURES: &str = "messenger_tls_handshake_failures_total";
pub const PROXY_HEADER_REJECTED: &str = "messenger_proxy_header_rejected_total";
pub const FRAMES_IN: &str = "messenger_frames_in_total";
pub const FRAMES_OUT: &str = "messenger_frames_out_total";
pub const MESSAGES_ACCEPTED: &str = "messenger_messages_accepted_total";
pub const MESSAGES_DELIVERED: &str = "messenger_messages_delivered_total";
pub const QUEUE_FULL: &str = "messenger_outbound_queue_full_total";
pub const STALL_DISCONNECTS: &str = "messenger_write_stall_disconnects_total";
pub const CATCH_UP_READS: &str = "messenger_catch_up_reads_total";
pub const ERRORS: &str = "messenger_request_errors_total";
pub const AUTH_FAILURES: &str = "messenger_auth_failures_total";
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
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
                .ok()?
                .install_recorder()
                .ok()
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

pub fn auth_failure() {
    counter!(AUTH_FAILURES).increment(1);
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

// ----- cluster identity, node id claims, rebalancing -----

pub const CLUSTER_REBALANCED: &str = "messenger_cluster_rebalanced_total";
pub const CLUSTER_FOREIGN_ENVELOPES: &str = "messenger_cluster_foreign_envelopes_total";
pub const CLUSTER_CLAIM_LOST: &str = "messenger_cluster_node_id_lost_total";

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
