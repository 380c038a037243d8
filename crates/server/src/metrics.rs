//! Metric names and the Prometheus recorder behind `GET /metrics`.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const CONNECTIONS: &str = "ordo_connections";
/// Sockets open (HTTP and WebSocket, before and after their requests): what `max_connections`
/// caps.
pub const SOCKETS: &str = "ordo_sockets";
/// Connections closed as soon as they were accepted, by limit (`max_connections`,
/// `max_pending_per_ip`), and WebSocket upgrades refused by `max_connections_per_user`.
pub const CONNECTIONS_REFUSED: &str = "ordo_connections_refused_total";
pub const ACCEPTED: &str = "ordo_messages_accepted_total";
pub const DELIVERED: &str = "ordo_messages_delivered_total";
pub const DEDUP_HITS: &str = "ordo_dedup_hits_total";
/// Sends whose client message id was looked up in the store (the dedup cache did not hold it
/// and the dedup filter could not rule it out).
pub const DEDUP_LOOKUPS: &str = "ordo_dedup_lookups_total";
/// Dedup entries held in memory.
pub const DEDUP_CACHED: &str = "ordo_dedup_cached_entries";
/// Conversations (and users' lists of conversations) loaded from the store.
pub const CONV_LOADS: &str = "ordo_conv_loads_total";
/// Conversations held in memory.
pub const CONVS_HELD: &str = "ordo_convs_held";
pub const NOTIFIES: &str = "ordo_notifies_total";
pub const REJECTED: &str = "ordo_sends_rejected_total";
pub const FRAME_ERRORS: &str = "ordo_frame_errors_total";
pub const SLOW_CONSUMERS: &str = "ordo_slow_consumers_dropped_total";
/// Pushes (`msg`, `notify`, `receipt`) left out because the connection's queue had no room for
/// them; the device was sent a `notify` (or the latest `receipt`) once there was.
pub const PUSHES_DEFERRED: &str = "ordo_pushes_deferred_total";
pub const COMMITS: &str = "ordo_commits_total";
pub const COMMIT_MESSAGES: &str = "ordo_commit_batch_messages";
pub const COMMIT_SECONDS: &str = "ordo_commit_seconds";
/// From the router handing a batch to the commit thread to the router having it back durable:
/// the commit plus both hand-overs.
pub const BATCH_SECONDS: &str = "ordo_batch_roundtrip_seconds";
pub const COMMIT_FAILURES: &str = "ordo_commit_failures_total";
/// Commits and store reads tried again because the store could not be reached.
pub const STORE_RETRIES: &str = "ordo_store_retries_total";
/// 1 while the store cannot be reached (new sends are refused with `unavailable`), else 0.
pub const STORE_UNREACHABLE: &str = "ordo_store_unreachable";
/// Offline-push events waiting in the webhook queue (on disk), to be sent or sent again.
pub const WEBHOOK_QUEUED: &str = "ordo_webhook_queued";
/// Events the webhook endpoint took (answered 2xx).
pub const WEBHOOK_SENT: &str = "ordo_webhook_sent_total";
/// Attempts that failed (no answer in time, or not 2xx); the event is tried again later.
pub const WEBHOOK_FAILED: &str = "ordo_webhook_failed_total";
/// Events given up: the queue was full, or they failed for `webhook` retry period (24 h).
pub const WEBHOOK_DROPPED: &str = "ordo_webhook_dropped_total";

/// Partitions of the cluster this node holds the lease of.
pub const CLUSTER_PARTITIONS_HELD: &str = "ordo_cluster_partitions_held";
/// Partitions this node took over (at start, from a node gone, or handed over).
pub const CLUSTER_TAKEOVERS: &str = "ordo_cluster_takeovers_total";
/// Partitions this node handed over to another (drained first).
pub const CLUSTER_HANDOVERS: &str = "ordo_cluster_handovers_total";
/// Partitions this node lost (another took them over while this one believed it held them).
pub const CLUSTER_LEASES_LOST: &str = "ordo_cluster_leases_lost_total";
/// Rounds of lease renewal that went through.
pub const CLUSTER_RENEWALS: &str = "ordo_cluster_lease_renewals_total";
/// Frames of this node's connections forwarded to the nodes owning their conversations, and
/// the sends among them.
pub const CLUSTER_FORWARDED: &str = "ordo_cluster_forwarded_frames_total";
pub const CLUSTER_FORWARDED_SENDS: &str = "ordo_cluster_forwarded_sends_total";
/// From forwarding a send to its owner to its answer coming back: NATS both ways plus the
/// owner's commit.
pub const CLUSTER_FORWARD_SECONDS: &str = "ordo_cluster_forward_roundtrip_seconds";
/// NATS's round trip from this node (a PING and its PONG, every few seconds).
pub const CLUSTER_NATS_RTT_SECONDS: &str = "ordo_cluster_nats_roundtrip_seconds";
/// Connections of other nodes this node serves as an owner.
pub const CLUSTER_REMOTE_SESSIONS: &str = "ordo_cluster_remote_sessions";
/// Connections closed because a frame between nodes was lost, a forwarded send went
/// unanswered, or a conversation moved between owners under them.
pub const CLUSTER_KICKS: &str = "ordo_cluster_connections_closed_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle. `None` if
/// another recorder was installed first (metrics then go there, and `/metrics` says so).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(COMMIT_MESSAGES.into()),
                    &[
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_seconds".into()),
                        &[
                            0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1,
                            0.25, 1.0,
                        ],
                    )
                });
            builder.ok().and_then(|b| b.install_recorder().ok())
        })
        .as_ref()
}
