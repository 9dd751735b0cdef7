//! What a run measured: the JSON report, the table on stdout, and the data
//! behind the HTML page's charts.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{Map, Value};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    /// Samples recorded.
    pub(crate) count: u64,
    /// Mean.
    pub(crate) mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub(crate) max: u64,
}

impl Latency {
    /// The table's row: `p50 … p90 … p99 … p99.9 … max … (n=…)`.
    pub(crate) fn row(&self) -> String {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }

    /// Percentiles of a histogram of microseconds.
    pub(crate) fn of(h: &hdrhistogram::Histogram<u64>) -> Latency {
        Latency {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What a baseline run measured, for [`Report::set_baseline`].
pub(crate) struct Baseline {
    /// The baseline's rate in the same unit as the scenario's.
    pub(crate) rate: f64,
    /// CPU seconds per second its server used (None if unreadable).
    pub(crate) server_cpu: Option<f64>,
    /// Its per-second samples.
    pub(crate) timeline: Vec<Sample>,
}

/// One second of the run: the scenario's main rate and its other counters.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the run started (connect phase included).
    pub(crate) t_s: f64,
    /// Which part of the run: "connect", "warmup", "measure", "drain", "baseline".
    pub(crate) phase: &'static str,
    /// The scenario's main rate over this second (per second).
    pub(crate) rate_per_s: f64,
    /// Devices connected at the end of this second.
    pub(crate) devices_held: u64,
}

/// A whole run's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// Subcommand that ran.
    pub(crate) scenario: String,
    /// Devices simulated (0 for scenarios without devices).
    pub(crate) devices: u64,
    /// Devices connected at the end of the measured window.
    pub(crate) devices_held: u64,
    /// Length of the measured window in seconds.
    pub(crate) duration_s: f64,
    /// What `rate_per_s` counts, e.g. "heartbeat round trips".
    pub(crate) rate_name: String,
    /// The scenario's main rate over the measured window.
    pub(crate) rate_per_s: f64,
    /// Min / median / max of the per-second rates in the measured window.
    pub(crate) rate_min_per_s: f64,
    /// See `rate_min_per_s`.
    pub(crate) rate_median_per_s: f64,
    /// See `rate_min_per_s`.
    pub(crate) rate_max_per_s: f64,
    /// The same load's rate against the baseline, when one ran.
    pub(crate) baseline_rate_per_s: Option<f64>,
    /// Which baseline ran ("raw echo", "raw fan-out").
    pub(crate) baseline: Option<String>,
    /// `rate_per_s / baseline_rate_per_s`.
    pub(crate) ratio: Option<f64>,
    /// CPU seconds per second the in-process baseline server (reflector or
    /// raw sender thread) used in its measured window.
    pub(crate) baseline_server_cpu: Option<f64>,
    /// `(rate_per_s / node_cpu) / (baseline_rate_per_s /
    /// baseline_server_cpu)`: the ratio per CPU-second of each server. It
    /// differs from `ratio` when a server was not the bottleneck (on two
    /// cores the loadgen shares the machine with it), and needs `--node-pid`.
    pub(crate) ratio_per_cpu: Option<f64>,
    /// The scenario's latency (round trip, or publish → device).
    pub(crate) latency_us: Option<Latency>,
    /// `fanout` on several nodes: the publish → device latency of the
    /// deliveries to devices on another node than the one the publish
    /// entered (across the bus); part of `latency_us`.
    pub(crate) cross_node_latency_us: Option<Latency>,
    /// Requests or notifications that never got through.
    pub(crate) lost: u64,
    /// Messages whose content was wrong: for `fanout`, notifies (or the
    /// pending state of an answer) whose bitmask lacked a bit published to
    /// the device's account after its last acknowledgement, up to the
    /// message's Serial (`engine/content.rs`); for `mqtt`, payloads that
    /// differ from what was published.
    pub(crate) wrong: u64,
    /// `hold`: the node's RSS growth divided by devices held.
    pub(crate) node_rss_bytes_per_device: Option<f64>,
    /// CPU seconds per second of the measured window (1.0 = one core).
    pub(crate) loadgen_cpu: f64,
    /// Same for the node, when `--node-pid` was given.
    pub(crate) node_cpu: Option<f64>,
    /// Every counter of the scenario, by name.
    pub(crate) figures: Map<String, Value>,
    /// The full configuration of the run.
    pub(crate) config: Value,
    /// Per-second samples over the whole run.
    pub(crate) timeline: Vec<Sample>,
    /// Latency distribution: (upper bound in µs, samples in the bucket).
    pub(crate) latency_buckets: Vec<(u64, u64)>,
    /// Per-second rates of the baseline run, when one ran.
    pub(crate) baseline_timeline: Vec<Sample>,
    /// A second baseline beside the first (`fanout`: the one-way raw
    /// sender beside the reliable one): its name, rate, and the ratio.
    pub(crate) second_baseline: Option<SecondBaseline>,
    /// `--interleave`: every slice, and the per-round ratios (median and
    /// range) against each other side; `ratio` and `ratio_per_cpu` are then
    /// the medians against the first.
    pub(crate) interleave: Option<crate::interleave::Interleaved>,
    /// The histograms behind `latency_us` and `cross_node_latency_us`, by
    /// tag, for `--histogram-out`.
    #[serde(skip)]
    pub(crate) histograms: Vec<(&'static str, hdrhistogram::Histogram<u64>)>,
}

/// A second baseline's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SecondBaseline {
    pub(crate) name: String,
    pub(crate) rate_per_s: f64,
    pub(crate) ratio: Option<f64>,
    pub(crate) server_cpu: Option<f64>,
}

impl Report {
    /// A report with the main fields and empty extras.
    pub(crate) fn new(scenario: &str, rate_name: &str, config: Value) -> Report {
        Report {
            scenario: scenario.to_owned(),
            devices: 0,
            devices_held: 0,
            duration_s: 0.0,
            rate_name: rate_name.to_owned(),
            rate_per_s: 0.0,
            rate_min_per_s: 0.0,
            rate_median_per_s: 0.0,
            rate_max_per_s: 0.0,
            baseline_rate_per_s: None,
            baseline: None,
            ratio: None,
            baseline_server_cpu: None,
            ratio_per_cpu: None,
            latency_us: None,
            cross_node_latency_us: None,
            lost: 0,
            wrong: 0,
            node_rss_bytes_per_device: None,
            loadgen_cpu: 0.0,
            node_cpu: None,
            figures: Map::new(),
            config,
            timeline: Vec::new(),
            latency_buckets: Vec::new(),
            baseline_timeline: Vec::new(),
            second_baseline: None,
            interleave: None,
            histograms: Vec::new(),
        }
    }

    /// Records a named counter.
    pub(crate) fn figure(&mut self, name: &str, value: impl Into<Value>) {
        self.figures.insert(name.to_owned(), value.into());
    }

    /// Sets min/median/max from the timeline's "measure" samples.
    pub(crate) fn set_window_stats(&mut self) {
        let mut rates: Vec<f64> = self
            .timeline
            .iter()
            .filter(|s| s.phase == "measure")
            .map(|s| s.rate_per_s)
            .collect();
        if rates.is_empty() {
            return;
        }
        rates.sort_by(f64::total_cmp);
        self.rate_min_per_s = rates[0];
        self.rate_median_per_s = rates[rates.len() / 2];
        self.rate_max_per_s = rates[rates.len() - 1];
    }

    /// Stores the histogram's percentiles and its distribution for the chart.
    pub(crate) fn set_latency(&mut self, h: &hdrhistogram::Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.histograms.push((crate::hist::LATENCY, h.clone()));
        self.latency_us = Some(Latency::of(h));
        self.latency_buckets = h
            .iter_log(1, 2.0)
            .map(|v| (v.value_iterated_to(), v.count_since_last_iteration()))
            .collect();
    }

    /// Stores the cross-node deliveries' percentiles (fanout on several nodes).
    pub(crate) fn set_cross_node_latency(&mut self, h: &hdrhistogram::Histogram<u64>) {
        if h.is_empty() {
            return;
        }
        self.histograms.push((crate::hist::CROSS_NODE, h.clone()));
        self.cross_node_latency_us = Some(Latency::of(h));
    }

    /// Sets the baseline figure and the ratio.
    pub(crate) fn set_baseline(&mut self, name: &str, b: Baseline) {
        self.baseline = Some(name.to_owned());
        self.baseline_rate_per_s = Some(b.rate);
        self.ratio = (b.rate > 0.0).then(|| self.rate_per_s / b.rate);
        self.baseline_server_cpu = b.server_cpu;
        // Each side's rate per CPU-second of its server: what the ratio
        // would be if both servers had been the bottleneck at full core.
        self.ratio_per_cpu = match (self.node_cpu, b.server_cpu) {
            (Some(n), Some(s)) if n > 0.0 && s > 0.0 && b.rate > 0.0 => {
                Some((self.rate_per_s / n) / (b.rate / s))
            }
            _ => None,
        };
        self.baseline_timeline = b.timeline;
    }

    /// Sets a second baseline beside the first.
    pub(crate) fn set_second_baseline(&mut self, name: &str, b: Baseline) {
        self.second_baseline = Some(SecondBaseline {
            name: name.to_owned(),
            rate_per_s: b.rate,
            ratio: (b.rate > 0.0).then(|| self.rate_per_s / b.rate),
            server_cpu: b.server_cpu,
        });
    }

    /// Sets the figures of an interleaved run: the first comparison is the
    /// baseline (`ratio`, `ratio_per_cpu` are its per-round medians), the
    /// second (if any) the second baseline; the rates' min/median/max are
    /// those of side 0's slices. `timeline(i)` is side `i`'s.
    pub(crate) fn set_interleaved(
        &mut self,
        il: crate::interleave::Interleaved,
        timeline: impl Fn(usize) -> Vec<Sample>,
    ) {
        if let Some(first) = il.comparisons.first() {
            self.baseline = Some(first.against.clone());
            self.baseline_rate_per_s = Some(first.rate_per_s);
            self.baseline_server_cpu = first.server_cpu;
            self.ratio = first.ratio.map(|s| s.median);
            self.ratio_per_cpu = first.ratio_per_cpu.map(|s| s.median);
            self.baseline_timeline = timeline(1);
        }
        if let Some(second) = il.comparisons.get(1) {
            self.second_baseline = Some(SecondBaseline {
                name: second.against.clone(),
                rate_per_s: second.rate_per_s,
                ratio: second.ratio.map(|s| s.median),
                server_cpu: second.server_cpu,
            });
        }
        let mut rates: Vec<f64> = il
            .slices
            .iter()
            .filter(|s| s.side == 0)
            .map(|s| s.rate_per_s)
            .collect();
        rates.sort_by(f64::total_cmp);
        if let (Some(first), Some(last)) = (rates.first(), rates.last()) {
            self.rate_min_per_s = *first;
            self.rate_max_per_s = *last;
            self.rate_median_per_s = rates[rates.len() / 2];
        }
        self.interleave = Some(il);
    }

    /// The report as JSON.
    pub(crate) fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Writes the JSON report to `path`.
    pub(crate) fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.to_json())?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Writes the HTML page to `path`.
    pub(crate) fn write_html(&self, path: &Path) -> Result<()> {
        let page = crate::html::page(self);
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))
    }

    /// The final table, one figure per line.
    pub(crate) fn print_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut rows: Vec<(String, String)> = Vec::new();
        if self.figures.get("interrupted") == Some(&Value::Bool(true)) {
            rows.push((
                "interrupted".into(),
                "yes: stopped by a signal, figures cover what was measured".into(),
            ));
        }
        rows.extend([
            ("scenario".into(), self.scenario.clone()),
            ("devices".into(), self.devices.to_string()),
            ("devices held".into(), self.devices_held.to_string()),
            ("measured".into(), format!("{:.1} s", self.duration_s)),
            (
                format!("{}/s", self.rate_name),
                format!(
                    "{} (per second: min {} median {} max {})",
                    human(self.rate_per_s),
                    human(self.rate_min_per_s),
                    human(self.rate_median_per_s),
                    human(self.rate_max_per_s)
                ),
            ),
        ]);
        if let Some(il) = &self.interleave {
            rows.push((
                "interleaved".into(),
                format!(
                    "{} rounds of {} slices of {:.1} s ({})",
                    il.rounds,
                    il.sides.len(),
                    il.slice_s,
                    il.sides.join(", ")
                ),
            ));
            for c in &il.comparisons {
                rows.push((format!("{} baseline/s", c.against), human(c.rate_per_s)));
                if let Some(r) = c.ratio {
                    rows.push((
                        format!("ratio to {}", c.against),
                        format!(
                            "{:.3} (median of {} rounds, {:.3}-{:.3})",
                            r.median, r.n, r.min, r.max
                        ),
                    ));
                }
                if let Some(cpu) = c.server_cpu {
                    rows.push((
                        format!("{} server CPU", c.against),
                        format!("{:.0} %", cpu * 100.0),
                    ));
                }
                if let Some(r) = c.ratio_per_cpu {
                    rows.push((
                        format!("ratio to {} per server CPU-s", c.against),
                        format!("{:.3} ({:.3}-{:.3})", r.median, r.min, r.max),
                    ));
                }
            }
        } else if let (Some(b), Some(name)) = (self.baseline_rate_per_s, &self.baseline) {
            rows.push((format!("{name} baseline/s"), human(b)));
            if let Some(r) = self.ratio {
                rows.push(("ratio to baseline".into(), format!("{r:.3}")));
            }
            if let Some(c) = self.baseline_server_cpu {
                rows.push((format!("{name} server CPU"), format!("{:.0} %", c * 100.0)));
            }
            if let Some(r) = self.ratio_per_cpu {
                rows.push(("ratio per server CPU-s".into(), format!("{r:.3}")));
            }
            if let Some(b) = &self.second_baseline {
                rows.push((format!("{} baseline/s", b.name), human(b.rate_per_s)));
                if let Some(r) = b.ratio {
                    rows.push((format!("ratio to {}", b.name), format!("{r:.3}")));
                }
            }
        }
        if let Some(l) = &self.latency_us {
            rows.push(("latency µs".into(), l.row()));
        }
        if let Some(l) = &self.cross_node_latency_us {
            rows.push(("cross-node latency µs".into(), l.row()));
        }
        rows.push(("lost".into(), self.lost.to_string()));
        rows.push(("wrong".into(), self.wrong.to_string()));
        if let Some(b) = self.node_rss_bytes_per_device {
            rows.push(("node RSS bytes/device".into(), format!("{b:.1}")));
        }
        rows.push((
            "loadgen CPU".into(),
            format!("{:.0} %", self.loadgen_cpu * 100.0),
        ));
        if let Some(c) = self.node_cpu {
            rows.push(("node CPU".into(), format!("{:.0} %", c * 100.0)));
        }
        for (k, v) in &self.figures {
            rows.push((k.replace('_', " "), v.to_string()));
        }
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        for (k, v) in rows {
            writeln!(out, "{k:<width$}  {v}")?;
        }
        Ok(())
    }
}

/// A rate with a k/M suffix.
pub(crate) fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline(rate: f64, server_cpu: Option<f64>) -> Baseline {
        Baseline {
            rate,
            server_cpu,
            timeline: Vec::new(),
        }
    }

    #[test]
    fn ratio_per_cpu_divides_each_rate_by_its_server_cpu() {
        // The node at half a core gave 100/s, the baseline at a full core
        // 200/s: half the rate, the same work per CPU-second.
        let mut r = Report::new("heartbeat", "round trips", Value::Null);
        r.rate_per_s = 100.0;
        r.node_cpu = Some(0.5);
        r.set_baseline("raw echo", baseline(200.0, Some(1.0)));
        assert_eq!(r.ratio, Some(0.5));
        assert_eq!(r.baseline_server_cpu, Some(1.0));
        assert_eq!(r.ratio_per_cpu, Some(1.0));
        let json = r.to_json();
        assert_eq!(json["ratio_per_cpu"], 1.0);
        assert_eq!(json["baseline_server_cpu"], 1.0);
    }

    #[test]
    fn ratio_per_cpu_needs_both_cpu_figures() {
        let mut r = Report::new("heartbeat", "round trips", Value::Null);
        r.rate_per_s = 100.0;
        r.set_baseline("raw echo", baseline(200.0, Some(1.0)));
        assert_eq!(r.ratio_per_cpu, None, "no --node-pid");
        r.node_cpu = Some(1.0);
        r.set_baseline("raw echo", baseline(200.0, None));
        assert_eq!(r.ratio_per_cpu, None, "baseline CPU unreadable");
        r.set_baseline("raw echo", baseline(0.0, Some(1.0)));
        assert_eq!(
            (r.ratio, r.ratio_per_cpu),
            (None, None),
            "baseline gave nothing"
        );
    }
}
