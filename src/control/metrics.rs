//! The Prometheus text exposition format, version 0.0.4, for `GET /metrics`
//! (docs/PROTOCOL.md §9).
//!
//! This module knows the format, not the counters: the node decides what it
//! counts (`node::metrics`) and writes its families through an
//! [`Exposition`]. Keeping the format here and the names with the code that
//! counts means a new counter is added in one place, next to its meaning.

use std::fmt::Write as _;

/// The Content-Type of an [`Exposition`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a family counts up or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever increases (names end in `_total`).
    Counter,
    /// May go up and down.
    Gauge,
    /// Observations in cumulative buckets (`_bucket{le=…}`, `_sum`, `_count`).
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A family whose value is read from a `T` (one sample per `T`).
pub struct Family<T> {
    /// The metric name.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// The `# HELP` text.
    pub help: &'static str,
    /// Reads the value.
    pub value: fn(&T) -> u64,
}

/// A counter family (see [`Family`]).
pub const fn counter<T>(name: &'static str, help: &'static str, value: fn(&T) -> u64) -> Family<T> {
    Family {
        name,
        kind: Kind::Counter,
        help,
        value,
    }
}

/// A gauge family (see [`Family`]).
pub const fn gauge<T>(name: &'static str, help: &'static str, value: fn(&T) -> u64) -> Family<T> {
    Family {
        name,
        kind: Kind::Gauge,
        help,
        value,
    }
}

/// The text of one scrape, written family by family: each family's
/// `# HELP` and `# TYPE` lines once, then its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        // Writing into a String cannot fail.
        let _ = writeln!(
            self.out,
            "# HELP {name} {help}\n# TYPE {name} {}",
            kind.as_str()
        );
    }

    /// One sample of the family started last.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.labels(name, labels);
        let _ = writeln!(self.out, " {value}");
    }

    /// One sample with a fractional value (seconds, CPU time).
    pub fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.labels(name, labels);
        if value.is_finite() {
            let _ = writeln!(self.out, " {value}");
        } else if value.is_nan() {
            self.out.push_str(" NaN\n");
        } else if value > 0.0 {
            self.out.push_str(" +Inf\n");
        } else {
            self.out.push_str(" -Inf\n");
        }
    }

    /// The samples of one histogram (the family, of kind
    /// [`Kind::Histogram`], started by the caller): a `name_bucket` sample
    /// per upper bound in `buckets` (`(le, cumulative count)`, the bound
    /// already in the family's unit), one for `+Inf` (= `count`),
    /// `name_sum` and `name_count`; `labels` go on each.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        let bounds = buckets
            .iter()
            .map(|(le, n)| (le.to_string(), *n))
            .chain(std::iter::once(("+Inf".to_string(), count)));
        for (le, n) in bounds {
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, n);
        }
        self.sample_f64(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, count);
    }

    fn labels(&mut self, name: &str, labels: &[(&str, &str)]) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(key);
                self.out.push_str("=\"");
                escape_label_value(&mut self.out, val);
                self.out.push('"');
            }
            self.out.push('}');
        }
    }

    /// A family with one sample per item, each labelled by `label(item)`
    /// (`(label name, value)`).
    pub fn per_item<T>(
        &mut self,
        family: &Family<T>,
        items: &[T],
        label: impl Fn(&T) -> (&'static str, String),
    ) {
        self.family(family.name, family.kind, family.help);
        for item in items {
            let (key, value) = label(item);
            self.sample(family.name, &[(key, &value)], (family.value)(item));
        }
    }

    /// The text so far.
    pub fn as_str(&self) -> &str {
        &self.out
    }

    /// The finished text.
    pub fn into_string(self) -> String {
        self.out
    }
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

    #[test]
    fn families_and_samples_in_the_text_format() {
        let mut e = Exposition::new();
        e.family("mpp_threads", Kind::Gauge, "Shard threads running.");
        e.sample("mpp_threads", &[], 2);
        struct Item(usize, u64);
        let family: Family<Item> = counter("mpp_x_total", "X.", |i| i.1);
        e.per_item(&family, &[Item(0, 5), Item(1, 7)], |i| {
            ("shard", i.0.to_string())
        });
        assert_eq!(
            e.into_string(),
            "# HELP mpp_threads Shard threads running.\n# TYPE mpp_threads gauge\nmpp_threads 2\n\
             # HELP mpp_x_total X.\n# TYPE mpp_x_total counter\n\
             mpp_x_total{shard=\"0\"} 5\nmpp_x_total{shard=\"1\"} 7\n"
        );
    }

    #[test]
    fn histograms_have_cumulative_buckets_sum_and_count() {
        let mut e = Exposition::new();
        e.family("x_seconds", Kind::Histogram, "X.");
        e.histogram(
            "x_seconds",
            &[("shard", "0")],
            &[(0.001, 2), (0.5, 3)],
            4,
            2.25,
        );
        assert_eq!(
            e.into_string(),
            "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{shard=\"0\",le=\"0.001\"} 2\n\
             x_seconds_bucket{shard=\"0\",le=\"0.5\"} 3\n\
             x_seconds_bucket{shard=\"0\",le=\"+Inf\"} 4\n\
             x_seconds_sum{shard=\"0\"} 2.25\nx_seconds_count{shard=\"0\"} 4\n"
        );
    }

    #[test]
    fn fractional_samples() {
        let mut e = Exposition::new();
        e.sample_f64("a", &[], 1.5);
        e.sample_f64("b", &[], f64::INFINITY);
        assert_eq!(e.into_string(), "a 1.5\nb +Inf\n");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        escape_label_value(&mut out, "a\"b\\c\nd");
        assert_eq!(out, "a\\\"b\\\\c\\nd");
    }
}
