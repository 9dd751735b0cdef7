//! The node's counters in the Prometheus text exposition format, version
//! 0.0.4, for `GET /metrics` (PROTOCOL.md §9).
//!
//! Every per-shard family carries a `shard="i"` label and nothing is summed
//! here: Prometheus sums across shards at query time. Rendering is a pure
//! function of a [`NodeMetrics`] snapshot, so it never reaches into a shard.

use std::fmt::Write as _;

use super::{NodeMetrics, ShardMetrics};

/// The Content-Type of [`render_prometheus`]'s output.
pub(super) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Reads one counter of a shard.
type ShardValue = fn(&ShardMetrics) -> u64;

/// A family with one sample per shard.
struct ShardFamily {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: ShardValue,
}

const fn counter(name: &'static str, help: &'static str, value: ShardValue) -> ShardFamily {
    ShardFamily {
        name,
        kind: "counter",
        help,
        value,
    }
}

/// Families before `mpp_drops_total`, in output order.
const SOCKET_FAMILIES: &[ShardFamily] = &[
    ShardFamily {
        name: "mpp_connections",
        kind: "gauge",
        help: "Connections held by the shard.",
        value: |s| s.connections,
    },
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

/// The `reason` label values of `mpp_drops_total`.
const DROP_REASONS: &[(&str, ShardValue)] = &[
    ("malformed", |s| s.server.dropped_malformed),
    ("auth", |s| s.server.dropped_auth),
    ("replay", |s| s.server.dropped_replay),
    ("unexpected", |s| s.server.dropped_unexpected),
    ("queue_full", |s| s.server.dropped_queue_full),
    ("stun", |s| s.server.stun_dropped),
    ("refusal_rate_limited", |s| s.server.refusals_rate_limited),
    ("auth_rate_limited", |s| s.server.dropped_auth_limited),
];

/// Families after `mpp_drops_total`, in output order.
const PROTOCOL_FAMILIES: &[ShardFamily] = &[
    counter("mpp_connects_total", "Connections accepted.", |s| {
        s.server.connects
    }),
    counter(
        "mpp_refused_total",
        "Connects refused (invalid binding, expired, node full).",
        |s| s.server.refused,
    ),
    counter(
        "mpp_disconnects_total",
        "Connections removed by a disconnect request.",
        |s| s.server.disconnects,
    ),
    counter(
        "mpp_expired_total",
        "Connections removed for idleness or credential expiry.",
        |s| s.server.expired,
    ),
    counter("mpp_migrations_total", "Connection endpoint moves.", |s| {
        s.server.migrations
    }),
    counter("mpp_publishes_total", "Publishes handled.", |s| {
        s.server.publishes
    }),
    counter(
        "mpp_notifies_sent_total",
        "Notifies sent for the first time.",
        |s| s.server.notifies_sent,
    ),
    counter(
        "mpp_notifies_retransmitted_total",
        "Notify retransmissions.",
        |s| s.server.notifies_retransmitted,
    ),
    counter("mpp_notifies_acked_total", "Notifies acknowledged.", |s| {
        s.server.notifies_acked
    }),
    counter("mpp_heartbeats_total", "Heartbeats answered.", |s| {
        s.server.heartbeats
    }),
    counter(
        "mpp_resolves_total",
        "DNS queries handed to the upstream.",
        |s| s.server.resolves,
    ),
    counter(
        "mpp_stun_answered_total",
        "STUN Binding requests answered.",
        |s| s.server.stun_answered,
    ),
    counter(
        "mpp_router_forwarded_total",
        "Messages the router delivered to this shard's inbox (publishes, web requests, misrouted datagrams, DNS answers).",
        |s| s.router_forwarded,
    ),
    counter(
        "mpp_router_overflows_total",
        "Publishes refused because a destination inbox was full.",
        |s| s.router_overflows,
    ),
];

/// Renders every counter of `metrics` in the Prometheus text format 0.0.4:
/// node-level gauges first, then one sample per shard for each family, each
/// family under its `# HELP` and `# TYPE` lines.
pub fn render_prometheus(metrics: &NodeMetrics) -> String {
    let mut out = String::with_capacity(1024 + 2048 * metrics.shards.len());
    header(
        &mut out,
        "mpp_io_backend",
        "gauge",
        "The I/O backend in use (value 1).",
    );
    line(
        &mut out,
        "mpp_io_backend",
        &[("backend", metrics.io_backend)],
        1,
    );
    header(&mut out, "mpp_threads", "gauge", "Shard threads running.");
    line(&mut out, "mpp_threads", &[], metrics.threads as u64);
    header(
        &mut out,
        "mpp_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
    );
    line(&mut out, "mpp_uptime_seconds", &[], metrics.uptime_secs);

    let shard_family = |out: &mut String, family: &ShardFamily| {
        header(out, family.name, family.kind, family.help);
        for s in &metrics.shards {
            let shard = s.shard.to_string();
            line(out, family.name, &[("shard", &shard)], (family.value)(s));
        }
    };
    SOCKET_FAMILIES
        .iter()
        .for_each(|f| shard_family(&mut out, f));
    header(
        &mut out,
        "mpp_drops_total",
        "counter",
        "Datagrams dropped by the protocol layer, by reason.",
    );
    for s in &metrics.shards {
        let shard = s.shard.to_string();
        for (reason, value) in DROP_REASONS {
            let labels = [("shard", shard.as_str()), ("reason", reason)];
            line(&mut out, "mpp_drops_total", &labels, value(s));
        }
    }
    PROTOCOL_FAMILIES
        .iter()
        .for_each(|f| shard_family(&mut out, f));
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing into a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn line(out: &mut String, name: &str, labels: &[(&str, &str)], value: u64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            escape_label_value(out, val);
            out.push('"');
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Label values escape `\`, `"` and line feeds (text format 0.0.4).
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ServerStats;

    fn shard(i: usize, base: u64) -> ShardMetrics {
        ShardMetrics {
            shard: i,
            cpu: Some(i),
            connections: base + 1,
            server: ServerStats {
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
                ..ServerStats::default()
            },
            datagrams_received: base + 20,
            datagrams_sent: base + 21,
            send_errors: base + 22,
            receive_drops: base + 23,
            send_batches: base + 24,
            router_forwarded: base + 25,
            router_overflows: base + 26,
            socket_drops: base + 27,
        }
    }

    fn node() -> NodeMetrics {
        NodeMetrics {
            io_backend: "uring",
            threads: 2,
            uptime_secs: 3600,
            shards: vec![shard(0, 0), shard(1, 100)],
        }
    }

    #[test]
    fn every_family_has_one_help_and_type_and_a_sample_per_shard() {
        let text = render_prometheus(&node());
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(
            families.len(),
            3 + SOCKET_FAMILIES.len() + 1 + PROTOCOL_FAMILIES.len()
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
                "mpp_io_backend" | "mpp_threads" | "mpp_uptime_seconds" => 1,
                "mpp_drops_total" => 2 * DROP_REASONS.len(),
                _ => 2,
            };
            assert_eq!(samples, expected, "{name}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn samples_carry_the_right_labels_and_values() {
        let text = render_prometheus(&node());
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
        ] {
            assert!(text.lines().any(|l| l == expected), "missing {expected}");
        }
    }

    #[test]
    fn no_shards_still_renders_node_gauges() {
        let text = render_prometheus(&NodeMetrics {
            io_backend: "mmsg",
            ..NodeMetrics::default()
        });
        assert!(text.contains("mpp_io_backend{backend=\"mmsg\"} 1\n"));
        assert!(!text.contains("shard=\""));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape_label_value(&mut out, "a\"b\\c\nd");
        assert_eq!(out, "a\\\"b\\\\c\\nd");
    }
}
