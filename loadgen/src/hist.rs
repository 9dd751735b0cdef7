//! Latency histograms in files, and their sum: `--histogram-out FILE`
//! writes a run's histograms, and `mpp-loadgen merge FILE…` adds up the
//! files of several runs (loadgen processes that split one device space,
//! `--first-device`) and prints the table of the sum.
//!
//! The file is HdrHistogram's interval log (the Java `HistogramLogWriter`
//! format, readable by its `HistogramLogProcessor` and HistogramLogAnalyzer):
//! comment lines, then one line per histogram, `Tag=T,start,length,max,` and
//! the histogram serialized as V2 + deflate in base64. Values are
//! microseconds; a run writes one interval, its measured window, per tag:
//! `latency` (the report's latency) and `cross-node` (fanout on several
//! nodes: the deliveries that crossed the bus).

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use hdrhistogram::serialization::interval_log::{
    IntervalLogIterator, IntervalLogWriterBuilder, LogEntry, Tag,
};
use hdrhistogram::serialization::{Deserializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

use crate::report::Latency;

/// The tag of the report's latency histogram.
pub(crate) const LATENCY: &str = "latency";
/// The tag of the cross-node deliveries' histogram.
pub(crate) const CROSS_NODE: &str = "cross-node";

/// The table's label of a tag's row.
fn label(tag: &str) -> String {
    match tag {
        LATENCY => "latency µs".into(),
        other => format!("{other} latency µs"),
    }
}

/// The interval log of `histograms` (tag, histogram), one interval each.
fn log(scenario: &str, histograms: &[(&str, &Histogram<u64>)]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    let mut log = IntervalLogWriterBuilder::new()
        .add_comment(&format!(
            "mpp-loadgen {scenario}: latency in microseconds (mpp-loadgen merge adds files up)"
        ))
        .begin_log_with(&mut buf, &mut serializer)?;
    for (tag, h) in histograms {
        let tag = Tag::new(tag).ok_or_else(|| anyhow!("bad histogram tag {tag:?}"))?;
        log.write_histogram(h, Duration::ZERO, Duration::ZERO, Some(tag))
            .map_err(|e| anyhow!("serializing a histogram: {e}"))?;
    }
    Ok(buf)
}

/// Writes `histograms` to `path` (`--histogram-out`).
pub(crate) fn write(
    path: &Path,
    scenario: &str,
    histograms: &[(&'static str, Histogram<u64>)],
) -> Result<()> {
    let refs: Vec<(&str, &Histogram<u64>)> = histograms.iter().map(|(t, h)| (*t, h)).collect();
    let bytes = log(scenario, &refs)?;
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The histograms of an interval log, by tag (untagged ones as
/// `latency`), each tag's intervals added up, in the order first seen.
fn read(bytes: &[u8]) -> Result<Vec<(String, Histogram<u64>)>> {
    let mut out: Vec<(String, Histogram<u64>)> = Vec::new();
    let mut deserializer = Deserializer::new();
    for entry in IntervalLogIterator::new(bytes) {
        let entry = entry.map_err(|e| anyhow!("not an HdrHistogram interval log: {e:?}"))?;
        let LogEntry::Interval(interval) = entry else {
            continue;
        };
        let tag = interval.tag().map_or(LATENCY, |t| t.as_str()).to_owned();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(interval.encoded_histogram())
            .context("a histogram that is not base64")?;
        let h: Histogram<u64> = deserializer
            .deserialize(&mut raw.as_slice())
            .map_err(|e| anyhow!("a histogram that does not deserialize: {e:?}"))?;
        add(&mut out, tag, &h)?;
    }
    Ok(out)
}

/// Adds `h` to the sum of tag `tag` in `sums`.
fn add(sums: &mut Vec<(String, Histogram<u64>)>, tag: String, h: &Histogram<u64>) -> Result<()> {
    let i = match sums.iter().position(|(t, _)| *t == tag) {
        Some(i) => i,
        None => {
            sums.push((tag, crate::engine::histogram()));
            sums.len() - 1
        }
    };
    sums[i]
        .1
        .add(h)
        .map_err(|e| anyhow!("adding up {}: {e:?}", sums[i].0))
}

/// The sum of each tag's histograms over `files`.
fn sum(files: &[impl AsRef<Path>]) -> Result<Vec<(String, Histogram<u64>)>> {
    let mut sums = Vec::new();
    for f in files {
        let path = f.as_ref();
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let histograms = read(&bytes).with_context(|| format!("{}", path.display()))?;
        if histograms.is_empty() {
            bail!("{}: no histogram in it", path.display());
        }
        for (tag, h) in histograms {
            add(&mut sums, tag, &h)?;
        }
    }
    Ok(sums)
}

/// The table of `sums`: one row per tag, as the run's table has it.
fn table(files: usize, sums: &[(String, Histogram<u64>)]) -> String {
    let mut rows = vec![("files".to_owned(), files.to_string())];
    for (tag, h) in sums {
        rows.push((label(tag), Latency::of(h).row()));
    }
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// `mpp-loadgen merge`: prints the table of the files' sum, and writes the
/// sum to `out` if given.
pub(crate) fn merge(files: &[std::path::PathBuf], out: Option<&Path>) -> Result<()> {
    let sums = sum(files)?;
    print!("{}", table(files.len(), &sums));
    if let Some(path) = out {
        let refs: Vec<(&str, &Histogram<u64>)> =
            sums.iter().map(|(t, h)| (t.as_str(), h)).collect();
        let bytes = log("merge", &refs)?;
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(values: &[(u64, u64)]) -> Histogram<u64> {
        let mut h = crate::engine::histogram();
        for &(v, n) in values {
            h.record_n(v, n).unwrap();
        }
        h
    }

    /// Two runs, one all at 100 µs and one all at 10 ms: the sum counts
    /// both, its lower half is the first's and its upper half the
    /// second's; each tag adds up on its own.
    #[test]
    fn merged_files_count_every_sample_and_take_percentiles_from_both() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.hlog"), dir.path().join("b.hlog"));
        write(
            &a,
            "fanout",
            &[
                (LATENCY, filled(&[(100, 1000)])),
                (CROSS_NODE, filled(&[(300, 10)])),
            ],
        )
        .unwrap();
        write(&b, "fanout", &[(LATENCY, filled(&[(10_000, 1000)]))]).unwrap();
        let sums = sum(&[&a, &b]).unwrap();
        let tags: Vec<&str> = sums.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, [LATENCY, CROSS_NODE]);
        let l = Latency::of(&sums[0].1);
        assert_eq!(l.count, 2000);
        assert_eq!(sums[0].1.value_at_quantile(0.25), 100);
        assert!(sums[0]
            .1
            .equivalent(sums[0].1.value_at_quantile(0.75), 10_000));
        assert!(sums[0].1.equivalent(l.max, 10_000));
        assert_eq!(Latency::of(&sums[1].1).count, 10);
        let t = table(2, &sums);
        assert!(t.contains("latency µs"), "{t}");
        assert!(t.contains("(n=2000)"), "{t}");
        assert!(t.contains("cross-node latency µs"), "{t}");
        // The sum written back reads as the same sum.
        let c = dir.path().join("c.hlog");
        merge(&[a.clone(), b.clone()], Some(&c)).unwrap();
        let again = sum(&[&c]).unwrap();
        assert_eq!(again[0].1, sums[0].1);
        assert_eq!(again[1].1, sums[1].1);
    }

    #[test]
    fn files_that_are_not_logs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "Tag=latency,0.000,0.000,1.000,notbase64!\n").unwrap();
        assert!(sum(&[&bad]).is_err());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "#just a comment\n").unwrap();
        assert!(sum(&[&empty]).is_err());
        assert!(sum(&[dir.path().join("missing")]).is_err());
    }
}
