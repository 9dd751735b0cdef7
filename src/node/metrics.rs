//! What the node counts, and how it is named on `GET /metrics`.
//!
//! Each shard publishes a [`ShardMetrics`] snapshot a few times a second;
//! this module names every counter of it (one family per counter, one sample
//! per shard with a `shard="i"` label, nothing summed: Prometheus sums at
//! query time) and writes them through the control plane's
//! [`Exposition`]. Rendering is a pure function of a [`NodeMetrics`]
//! snapshot, so it never reaches into a shard.

use super::latency::{LatencySnapshot, BUCKETS_NS};
use super::process::ProcessStats;
use super::shard::ShardMetrics;
use crate::control::metrics::{counter, gauge, Exposition, Family, Kind};

/// A snapshot of the node's counters, as `GET /metrics` reports them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeMetrics {
    /// The I/O backend in use: `"uring"` or `"mmsg"`.
    pub io_backend: &'static str,
    /// The AES-GCM implementation in use (`aes-ni` or `portable`).
    pub aes_gcm: &'static str,
    /// The process's own figures (memory, CPU, descriptors, start time).
    pub process: ProcessStats,
    /// Shard threads running.
    pub threads: usize,
    /// Seconds since the node started.
    pub uptime_secs: u64,
    /// One entry per shard, in shard order.
    pub shards: Vec<ShardMetrics>,
    /// The current master key's parity (docs/PROTOCOL.md §7.11).
    pub key_parity: u8,
    /// Seconds left in a key rotation's grace period (0: none running).
    pub key_grace_secs: u64,
    /// Revocation entries in force (accounts and devices).
    pub revocations: usize,
    /// The cluster bus's counters, in a cluster (docs/PROTOCOL.md §10).
    pub cluster: Option<super::cluster::ClusterMetrics>,
}

type ClusterValue = fn(&super::cluster::ClusterMetrics) -> u64;

/// The cluster's families (node-level, no shard label), in output order.
const CLUSTER_FAMILIES: &[(&str, Kind, &str, ClusterValue)] = &[
    ("mpp_cluster_connected", Kind::Gauge, "1 while the node is connected to a NATS server of its cluster.", |c| u64::from(c.connected)),
    ("mpp_cluster_partitions", Kind::Gauge, "Account partitions the node subscribes to (it holds devices there, or did within a second).", |c| c.partitions),
    ("mpp_cluster_partitions_heard", Kind::Gauge, "Subscribed partitions whose subscription the server confirmed.", |c| c.heard),
    ("mpp_cluster_published_total", Kind::Counter, "Publishes accepted here and handed to the bus for the other nodes.", |c| c.published),
    ("mpp_cluster_publish_failed_total", Kind::Counter, "Publishes accepted here that could not be handed to the bus within cluster_publish_timeout_ms (reported to the publisher as remote_failed).", |c| c.publish_failed),
    ("mpp_cluster_publish_retries_total", Kind::Counter, "Batches of publishes sent to the bus again after it went away.", |c| c.publish_retries),
    ("mpp_cluster_received_total", Kind::Counter, "Publishes of other nodes received from the bus and handed to a shard.", |c| c.received),
    ("mpp_cluster_received_dropped_total", Kind::Counter, "Messages received from the bus and dropped: malformed, or the shard's inbox stayed full.", |c| c.received_dropped),
    ("mpp_cluster_received_duplicates_total", Kind::Counter, "Publishes received from the bus a second time (a batch sent again after the connection broke) and dropped.", |c| c.received_duplicates),
    ("mpp_cluster_sequence_gaps_total", Kind::Counter, "Times another node's numbered publishes for a partition arrived with some missing, or its announced last number was beyond the last received (lost on the way): the partition's account records resynchronised.", |c| c.sequence_gaps),
    ("mpp_cluster_catch_up_questions_total", Kind::Counter, "Catch-up questions this node asked the cluster for moving devices.", |c| c.questions),
    ("mpp_cluster_catch_up_answered_total", Kind::Counter, "Catch-up questions of this node that another node answered (the rest resynchronised).", |c| c.answered),
    ("mpp_cluster_catch_up_answers_given_total", Kind::Counter, "Catch-up questions of other nodes this node answered.", |c| c.answers_given),
    ("mpp_cluster_disconnects_total", Kind::Counter, "Times the connection to the bus was lost.", |c| c.disconnects),
    ("mpp_cluster_connect_errors_total", Kind::Counter, "Attempts to connect to a NATS server that failed (the host did not resolve, the server refused or did not answer); the first of an outage is logged.", |c| c.connect_errors),
];

/// The names of the cluster's families (served only in a cluster).
pub fn cluster_family_names() -> impl Iterator<Item = &'static str> {
    CLUSTER_FAMILIES.iter().map(|f| f.0)
}

/// Reads one counter of a shard.
pub type ShardValue = fn(&ShardMetrics) -> u64;

/// Families before `mpp_drops_total`, in output order.
const SOCKET_FAMILIES: &[Family<ShardMetrics>] = &[
    gauge(
        "mpp_shard_up",
        "1 while the shard's thread runs; 0 once it stopped or died (the node then exits).",
        |s| u64::from(s.up),
    ),
    gauge("mpp_connections", "Connections held by the shard.", |s| {
        s.connections
    }),
    counter(
        "mpp_datagrams_received_total",
        "Datagrams read from the shard's socket.",
        |s| s.datagrams_received,
    ),
    counter(
        "mpp_datagrams_sent_total",
        "Datagrams written to the shard's socket.",
        |s| s.datagrams_sent,
    ),
    counter(
        "mpp_send_batches_total",
        "Batches of sends submitted, one syscall each.",
        |s| s.send_batches,
    ),
    counter("mpp_send_errors_total", "Sends the kernel refused.", |s| {
        s.send_errors
    }),
    counter(
        "mpp_receive_drops_total",
        "Datagrams lost on receive (no buffer or truncated).",
        |s| s.receive_drops,
    ),
    counter(
        "mpp_socket_drops_total",
        "Datagrams the kernel dropped at the shard's socket because its receive buffer was full (the shard fell behind).",
        |s| s.socket_drops,
    ),
];

/// The `reason` label values of `mpp_drops_total`, each with what it means
/// (README's metrics table repeats these; a test keeps the two in step).
pub const DROP_REASONS: &[(&str, ShardValue, &str)] = &[
    ("malformed", |s| s.service.dropped_malformed,
        "not a packet: too short or too long, a STUN message that does not parse, an undecodable message inside an authentic packet"),
    ("auth", |s| s.service.dropped_auth,
        "failed authentication (wrong key, forged or corrupted, unknown conn id), answered by nothing"),
    ("replay", |s| s.service.dropped_replay,
        "an authentic packet whose Serial the replay window has seen or left behind"),
    ("unexpected", |s| s.service.dropped_unexpected,
        "an authentic message the node does not take in that state or direction (e.g. a heartbeat for no connection)"),
    ("queue_full", |s| s.service.dropped_queue_full,
        "a reply dropped because the shard already holds max_queued_replies (the client retries)"),
    ("stun", |s| s.service.stun_dropped,
        "a STUN request not answered: over stun_rate for its source, or one RFC 8489 says to ignore"),
    ("refusal_rate_limited", |s| s.service.refusals_rate_limited,
        "a refusal (404, 403, InvalidSerial…) not sent: over 10/s for that source and conn id"),
    ("auth_rate_limited", |s| s.service.dropped_auth_limited,
        "a packet from a source already over 100 authentication failures/s, dropped before any crypto"),
];

/// Families after `mpp_drops_total`, in output order.
const PROTOCOL_FAMILIES: &[Family<ShardMetrics>] = &[
    counter("mpp_connects_total", "Connections accepted.", |s| {
        s.service.connects
    }),
    counter(
        "mpp_refused_total",
        "Connects refused (invalid binding, expired, node full).",
        |s| s.service.refused,
    ),
    counter(
        "mpp_disconnects_total",
        "Connections removed by a disconnect request.",
        |s| s.service.disconnects,
    ),
    counter(
        "mpp_expired_total",
        "Connections removed for idleness or credential expiry.",
        |s| s.service.expired,
    ),
    counter("mpp_migrations_total", "Connection endpoint moves.", |s| {
        s.service.migrations
    }),
    counter("mpp_publishes_total", "Publishes handled.", |s| {
        s.service.publishes
    }),
    counter(
        "mpp_notifies_sent_total",
        "Notifies sent for the first time.",
        |s| s.service.notifies_sent,
    ),
    counter(
        "mpp_notifies_retransmitted_total",
        "Notify retransmissions.",
        |s| s.service.notifies_retransmitted,
    ),
    counter("mpp_notifies_acked_total", "Notifies acknowledged.", |s| {
        s.service.notifies_acked
    }),
    counter(
        "mpp_catch_ups_total",
        "New connections told what was published while their device was away.",
        |s| s.service.catch_ups,
    ),
    counter(
        "mpp_resyncs_total",
        "New connections told to resynchronise every store (the node could not know what they missed).",
        |s| s.service.resyncs,
    ),
    counter(
        "mpp_catch_ups_acked_total",
        "Catch-ups and resyncs acknowledged.",
        |s| s.service.catch_ups_acked,
    ),
    counter(
        "mpp_cluster_gap_resyncs_total",
        "Account records told to resynchronise because the node began hearing their partition again (start, bus outage, new interest), or the bus lost or could not hand over publishes of it, and could not know what it missed.",
        |s| s.service.partition_gaps,
    ),
    counter(
        "mpp_connections_revoked_total",
        "Held connections dropped because a revocation named their account (their devices reconnect).",
        |s| s.service.revoked,
    ),
    counter(
        "mpp_connects_shed_total",
        "New connects refused with 503 and a retry-after while the shard's socket overflowed.",
        |s| s.service.connects_shed,
    ),
    gauge(
        "mpp_accounts",
        "Account records held: with devices, or within their catch-up window.",
        |s| s.accounts,
    ),
    counter(
        "mpp_accounts_expired_total",
        "Account records dropped: no device left and the catch-up window over.",
        |s| s.service.accounts_expired,
    ),
    counter("mpp_heartbeats_total", "Heartbeats answered.", |s| {
        s.service.heartbeats
    }),
    counter(
        "mpp_resolves_total",
        "DNS queries handed to the upstream.",
        |s| s.service.resolves,
    ),
    counter(
        "mpp_resolves_limited_total",
        "Resolves answered with 429 at once: the connection asked more than 10 per second (burst 20).",
        |s| s.service.resolves_limited,
    ),
    counter(
        "mpp_validations_total",
        "Endpoints validated: a device echoed the challenge the node sent to its address.",
        |s| s.service.validations,
    ),
    counter(
        "mpp_replies_capped_total",
        "Answers not sent to an address not yet validated because they exceeded three times the bytes received from it (a 425 went instead where one fits).",
        |s| s.service.replies_capped,
    ),
    counter(
        "mpp_retransmits_held_total",
        "Notify retransmissions held back until the device's address is validated.",
        |s| s.service.retransmits_held,
    ),
    counter(
        "mpp_stun_answered_total",
        "STUN Binding requests answered.",
        |s| s.service.stun_answered,
    ),
    counter(
        "mpp_router_forwarded_total",
        "Messages the router delivered to this shard's inbox (publishes, web requests, DNS answers).",
        |s| s.router_forwarded,
    ),
    counter(
        "mpp_router_overflows_total",
        "Publishes refused because a destination inbox was full.",
        |s| s.router_overflows,
    ),
    counter(
        "mpp_misrouted_forwarded_total",
        "Datagrams that reached this shard's socket for another shard (fallback steering), authenticated and forwarded to their owner.",
        |s| s.misrouted_forwarded,
    ),
    counter(
        "mpp_misrouted_dropped_total",
        "Datagrams that reached this shard's socket for another shard and were dropped: they failed authentication, or the owner's forward queue was full.",
        |s| s.misrouted_dropped,
    ),
    counter(
        "mpp_forwarded_in_total",
        "Datagrams other shards forwarded to this one (fallback steering).",
        |s| s.forwarded_in,
    ),
];

/// Writes every counter of `metrics`: node-level gauges first, then one
/// sample per shard for each family.
pub fn render(metrics: &NodeMetrics, out: &mut Exposition) {
    metrics.process.render(out);
    out.family(
        "mpp_build_info",
        Kind::Gauge,
        "Always 1; the labels say what runs: version, I/O backend, AES-GCM implementation.",
    );
    out.sample(
        "mpp_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("io_backend", metrics.io_backend),
            ("aes_gcm", metrics.aes_gcm),
        ],
        1,
    );
    out.family(
        "mpp_io_backend",
        Kind::Gauge,
        "The I/O backend in use (value 1).",
    );
    out.sample("mpp_io_backend", &[("backend", metrics.io_backend)], 1);
    out.family("mpp_threads", Kind::Gauge, "Shard threads running.");
    out.sample("mpp_threads", &[], metrics.threads as u64);
    out.family(
        "mpp_uptime_seconds",
        Kind::Gauge,
        "Seconds since the node started.",
    );
    out.sample("mpp_uptime_seconds", &[], metrics.uptime_secs);
    out.family(
        "mpp_master_key_parity",
        Kind::Gauge,
        "Parity of the current master key; it flips with each rotation.",
    );
    out.sample("mpp_master_key_parity", &[], u64::from(metrics.key_parity));
    out.family(
        "mpp_previous_key_grace_seconds",
        Kind::Gauge,
        "Seconds during which credentials of the previous master key still verify (0: none).",
    );
    out.sample(
        "mpp_previous_key_grace_seconds",
        &[],
        metrics.key_grace_secs,
    );
    out.family(
        "mpp_revocations",
        Kind::Gauge,
        "Revoked accounts and devices in force.",
    );
    out.sample("mpp_revocations", &[], metrics.revocations as u64);
    let shard_label = |s: &ShardMetrics| ("shard", s.shard.to_string());
    for family in SOCKET_FAMILIES {
        out.per_item(family, &metrics.shards, shard_label);
    }
    out.family(
        "mpp_drops_total",
        Kind::Counter,
        "Datagrams dropped by the protocol layer, by reason.",
    );
    for s in &metrics.shards {
        let shard = s.shard.to_string();
        for (reason, value, _) in DROP_REASONS {
            let labels = [("shard", shard.as_str()), ("reason", reason)];
            out.sample("mpp_drops_total", &labels, value(s));
        }
    }
    for family in PROTOCOL_FAMILIES {
        out.per_item(family, &metrics.shards, shard_label);
    }
    if let Some(cluster) = &metrics.cluster {
        for (name, kind, help, value) in CLUSTER_FAMILIES {
            out.family(name, *kind, help);
            out.sample(name, &[], value(cluster));
        }
    }
    type Hop = fn(&ShardMetrics) -> &LatencySnapshot;
    const HOPS: [(&str, &str, Hop); 2] = [
        (
            "mpp_publish_send_seconds",
            "Publish to send: from the control plane handing a publish to the router to the shard sealing the last notify it queued.",
            |s| &s.publish_latency,
        ),
        (
            "mpp_publish_pickup_seconds",
            "Publish to pick-up: from the control plane handing a publish to the router to the shard taking it from its inbox (the shard's wake-up, or the rest of the turn it was in).",
            |s| &s.publish_pickup,
        ),
    ];
    for (name, help, hop) in HOPS {
        out.family(name, Kind::Histogram, help);
        for s in &metrics.shards {
            let shard = s.shard.to_string();
            let l = hop(s);
            let buckets: Vec<(f64, u64)> = BUCKETS_NS
                .iter()
                .zip(l.buckets.iter().copied().chain(std::iter::repeat(0)))
                .map(|(&le, n)| (le as f64 / 1e9, n))
                .collect();
            out.histogram(
                name,
                &[("shard", &shard)],
                &buckets,
                l.count,
                l.sum_ns as f64 / 1e9,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::shard::ShardMetrics;
    use crate::proto::ServiceStats;

    fn shard(i: usize, base: u64) -> ShardMetrics {
        ShardMetrics {
            shard: i,
            cpu: Some(i),
            connections: base + 1,
            accounts: base + 28,
            service: ServiceStats {
                dropped_malformed: base + 2,
                dropped_auth: base + 3,
                dropped_replay: base + 4,
                dropped_unexpected: base + 5,
                dropped_queue_full: base + 6,
                stun_dropped: base + 7,
                connects: base + 8,
                refused: base + 9,
                disconnects: base + 10,
                expired: base + 11,
                migrations: base + 12,
                publishes: base + 13,
                notifies_sent: base + 14,
                notifies_retransmitted: base + 15,
                notifies_acked: base + 16,
                heartbeats: base + 17,
                resolves: base + 18,
                stun_answered: base + 19,
                ..ServiceStats::default()
            },
            datagrams_received: base + 20,
            datagrams_sent: base + 21,
            send_errors: base + 22,
            receive_drops: base + 23,
            send_batches: base + 24,
            router_forwarded: base + 25,
            router_overflows: base + 26,
            socket_drops: base + 27,
            up: i == 0,
            misrouted_forwarded: base + 29,
            misrouted_dropped: base + 30,
            forwarded_in: base + 31,
            publish_latency: crate::node::latency::LatencySnapshot {
                buckets: vec![base + 1; crate::node::latency::BUCKETS_NS.len()],
                count: base + 2,
                sum_ns: 1_500_000_000,
            },
            publish_pickup: crate::node::latency::LatencySnapshot {
                buckets: vec![base + 3; crate::node::latency::BUCKETS_NS.len()],
                count: base + 4,
                sum_ns: 2_500_000_000,
            },
        }
    }

    fn rendered(m: &NodeMetrics) -> String {
        let mut e = Exposition::new();
        render(m, &mut e);
        e.into_string()
    }

    fn node() -> NodeMetrics {
        NodeMetrics {
            io_backend: "uring",
            aes_gcm: "aes-ni",
            process: ProcessStats::default(),
            threads: 2,
            uptime_secs: 3600,
            shards: vec![shard(0, 0), shard(1, 100)],
            key_parity: 1,
            key_grace_secs: 60,
            revocations: 3,
            cluster: None,
        }
    }

    #[test]
    fn every_family_has_one_help_and_type_and_a_sample_per_shard() {
        let text = rendered(&node());
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(
            families.len(),
            7 + SOCKET_FAMILIES.len() + 1 + PROTOCOL_FAMILIES.len() + 2
        );
        for name in &families {
            let help = format!("# HELP {name} ");
            assert_eq!(text.lines().filter(|l| l.starts_with(&help)).count(), 1);
            let samples = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| l.split(['{', ' ']).next() == Some(name))
                .count();
            let expected = match *name {
                "mpp_io_backend"
                | "mpp_threads"
                | "mpp_uptime_seconds"
                | "mpp_master_key_parity"
                | "mpp_previous_key_grace_seconds"
                | "mpp_revocations"
                | "mpp_build_info" => 1,
                "mpp_drops_total" => 2 * DROP_REASONS.len(),
                "mpp_publish_send_seconds" | "mpp_publish_pickup_seconds" => 0,
                _ => 2,
            };
            assert_eq!(samples, expected, "{name}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        for hop in ["mpp_publish_send_seconds", "mpp_publish_pickup_seconds"] {
            let buckets = text
                .lines()
                .filter(|l| l.starts_with(&format!("{hop}_bucket{{")))
                .count();
            assert_eq!(buckets, 2 * (crate::node::latency::BUCKETS_NS.len() + 1));
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn samples_carry_the_right_labels_and_values() {
        let text = rendered(&node());
        for expected in [
            "# TYPE mpp_connections gauge",
            "# TYPE mpp_datagrams_received_total counter",
            "mpp_io_backend{backend=\"uring\"} 1",
            "mpp_threads 2",
            "mpp_uptime_seconds 3600",
            "mpp_connections{shard=\"0\"} 1",
            "mpp_connections{shard=\"1\"} 101",
            "mpp_drops_total{shard=\"0\",reason=\"malformed\"} 2",
            "mpp_drops_total{shard=\"1\",reason=\"auth\"} 103",
            "mpp_drops_total{shard=\"1\",reason=\"queue_full\"} 106",
            "mpp_drops_total{shard=\"0\",reason=\"stun\"} 7",
            "mpp_connects_total{shard=\"1\"} 108",
            "mpp_stun_answered_total{shard=\"0\"} 19",
            "mpp_datagrams_sent_total{shard=\"1\"} 121",
            "mpp_send_batches_total{shard=\"0\"} 24",
            "mpp_router_overflows_total{shard=\"1\"} 126",
            "mpp_shard_up{shard=\"0\"} 1",
            "mpp_shard_up{shard=\"1\"} 0",
            "mpp_misrouted_dropped_total{shard=\"1\"} 130",
            "mpp_forwarded_in_total{shard=\"0\"} 31",
            "# TYPE mpp_publish_send_seconds histogram",
            "mpp_publish_send_seconds_bucket{shard=\"1\",le=\"0.00005\"} 101",
            "mpp_publish_send_seconds_bucket{shard=\"1\",le=\"+Inf\"} 102",
            "mpp_publish_send_seconds_sum{shard=\"0\"} 1.5",
            "mpp_publish_send_seconds_count{shard=\"0\"} 2",
            "# TYPE mpp_publish_pickup_seconds histogram",
            "mpp_publish_pickup_seconds_bucket{shard=\"1\",le=\"0.00005\"} 103",
            "mpp_publish_pickup_seconds_sum{shard=\"1\"} 2.5",
            "mpp_publish_pickup_seconds_count{shard=\"1\"} 104",
        ] {
            assert!(text.lines().any(|l| l == expected), "missing {expected}");
        }
    }

    #[test]
    fn build_info_names_version_backend_and_aes_gcm() {
        let text = rendered(&node());
        let expected = format!(
            "mpp_build_info{{version=\"{}\",io_backend=\"uring\",aes_gcm=\"aes-ni\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.lines().any(|l| l == expected), "{text}");
    }

    #[test]
    fn no_shards_still_renders_node_gauges() {
        let text = rendered(&NodeMetrics {
            io_backend: "mmsg",
            ..NodeMetrics::default()
        });
        assert!(text.contains("mpp_io_backend{backend=\"mmsg\"} 1\n"));
        assert!(!text.contains("shard=\""));
    }
}
