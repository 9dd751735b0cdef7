//! The publish → send latency of one shard: from the moment the control
//! plane hands a publish to the router to the moment the shard seals the
//! last notify that publish queued (`proto::Service::poll_published`).
//!
//! It exists so an operator can tell "the node is slow" from "the network is
//! slow" without a load generator. It records into an HDR histogram owned by
//! the shard's thread (no lock, no allocation per record) and hands the
//! metrics snapshot fixed Prometheus buckets. It must stay cheap: the only
//! per-publish cost is one `u64` stamp carried in the router message, one
//! entry in the state machine's stamp queue, and one record here; nothing is
//! kept per connection.

use hdrhistogram::Histogram;

/// The upper bounds (`le`) of the exported buckets, in nanoseconds: 50 µs
/// to 10 s, roughly 1-2.5-5 per decade. `+Inf` is added when rendering.
pub const BUCKETS_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Largest latency the histogram tells apart (longer ones count as this).
const MAX_NS: u64 = 60_000_000_000;

/// A shard's latency recorder.
pub(crate) struct PublishLatency {
    histogram: Option<Histogram<u64>>,
    sum_ns: u64,
}

impl PublishLatency {
    pub(crate) fn new() -> Self {
        PublishLatency {
            // 1 ns .. 60 s at 2 significant digits: a few KB per shard. Only
            // invalid bounds make this fail; then nothing is recorded.
            histogram: Histogram::new_with_bounds(1, MAX_NS, 2).ok(),
            sum_ns: 0,
        }
    }

    /// Records one publish that took `ns`.
    pub(crate) fn record(&mut self, ns: u64) {
        if let Some(h) = &mut self.histogram {
            h.saturating_record(ns.clamp(1, MAX_NS));
            self.sum_ns = self.sum_ns.saturating_add(ns);
        }
    }

    /// Cumulative counts at each of [`BUCKETS_NS`], the total and the sum.
    pub(crate) fn snapshot(&self) -> LatencySnapshot {
        let Some(h) = &self.histogram else {
            return LatencySnapshot::default();
        };
        LatencySnapshot {
            buckets: BUCKETS_NS
                .iter()
                .map(|&le| h.count_between(0, le))
                .collect(),
            count: h.len(),
            sum_ns: self.sum_ns,
        }
    }
}

/// The latency histogram as `/metrics` exports it (cumulative buckets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Publishes at or under each bound of [`BUCKETS_NS`] (empty: none yet).
    pub buckets: Vec<u64>,
    /// Publishes recorded.
    pub count: u64,
    /// Their latencies added up, in nanoseconds.
    pub sum_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_count_every_record() {
        let mut l = PublishLatency::new();
        for ns in [10_000, 60_000, 700_000, 3_000_000_000, 90_000_000_000] {
            l.record(ns);
        }
        let s = l.snapshot();
        assert_eq!(s.count, 5);
        assert_eq!(s.buckets.len(), BUCKETS_NS.len());
        assert_eq!(s.buckets[0], 1, "10 µs <= 50 µs");
        assert_eq!(s.buckets[1], 2, "60 µs <= 100 µs");
        assert_eq!(s.buckets[4], 3, "700 µs <= 1 ms");
        assert_eq!(s.buckets[14], 3, "3 s > 2.5 s");
        assert_eq!(s.buckets[15], 4, "3 s <= 5 s");
        assert_eq!(*s.buckets.last().unwrap_or(&0), 4, "90 s is only in +Inf");
        assert!(s.buckets.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(
            s.sum_ns,
            10_000 + 60_000 + 700_000 + 3_000_000_000 + 90_000_000_000
        );
    }
}
