//! Interleaved measurement (`--interleave SLICE`, docs/BENCHMARKS.md "How
//! to measure well"): the sides of a comparison — the node, its raw
//! baseline(s), or a second node (`--versus`) — are all started and
//! connected, and then take turns, one short slice each, for the whole
//! measured window. A slow minute of the host then falls on every side
//! instead of on whichever ran during it; the figure is the median of the
//! per-round ratios, reported with their range.
//!
//! Rounds alternate their order (A B, B A, A B, …) so that a steady drift
//! within a round favours neither side. Between two slices the side that
//! had its turn is paused and its last answers are awaited (its count stops
//! moving, [`QUIET`] apart, at most [`QUIESCE_MAX`]); the next side is
//! resumed and given [`SETTLE`] before its slice is counted.
//!
//! It drives the sides only through [`SideControl`]; it must not know how a
//! side generates load.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

/// How long a paused side's count must stand still before the next side
/// starts (its last answers are in).
const QUIET: Duration = Duration::from_millis(10);
/// The longest the wait for a paused side to go quiet lasts.
const QUIESCE_MAX: Duration = Duration::from_millis(1000);
/// Time a resumed side gets before its slice is counted (windows refill,
/// the publisher's pipeline fills).
const SETTLE: Duration = Duration::from_millis(50);

/// What the interleaver needs of one side.
pub(crate) trait SideControl {
    /// The side's name in the report ("node", "raw echo", …).
    fn name(&self) -> String;
    /// The counter behind the side's rate.
    fn count(&self) -> u64;
    /// CPU seconds used so far by the side's server (the node process, or
    /// the in-process baseline thread), if readable.
    fn server_cpu_seconds(&self) -> Option<f64>;
    /// Lets the side generate load (`true`) or pauses it (`false`).
    fn set_active(&self, active: bool);
    /// Latencies of this side are recorded while set.
    fn set_measuring(&self, measuring: bool);
    /// A worker's failure, which ends the run.
    fn failure(&self) -> Option<anyhow::Error> {
        None
    }
}

/// One counted slice.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Slice {
    /// Round number (from 0).
    pub(crate) round: usize,
    /// Index of the side (0 = the node, whose ratios are reported).
    pub(crate) side: usize,
    /// Seconds since the interleaved window began, at the slice's start.
    pub(crate) t_s: f64,
    /// Seconds counted.
    pub(crate) secs: f64,
    /// The side's count over the slice.
    pub(crate) count: u64,
    /// `count / secs`.
    pub(crate) rate_per_s: f64,
    /// CPU seconds per second of the side's server over the slice.
    pub(crate) server_cpu: Option<f64>,
}

/// Median, minimum and maximum of a set of ratios.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    /// How many values.
    pub(crate) n: usize,
}

impl Spread {
    /// The spread of `values` (None when empty). The median of an even
    /// count is the mean of the middle two.
    pub(crate) fn of(mut values: Vec<f64>) -> Option<Spread> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: values[0],
            max: values[n - 1],
            n,
        })
    }
}

/// Side 0 against side `other`, round by round.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comparison {
    /// The other side's name.
    pub(crate) against: String,
    /// Per-round rate ratios (side 0 / other).
    pub(crate) ratio: Option<Spread>,
    /// Per-round ratios of each side's rate per CPU-second of its server.
    pub(crate) ratio_per_cpu: Option<Spread>,
    /// The other side's rate over all its slices.
    pub(crate) rate_per_s: f64,
    /// The other side's server CPU over all its slices.
    pub(crate) server_cpu: Option<f64>,
}

/// What an interleaved run measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Interleaved {
    /// Slice length asked for, seconds.
    pub(crate) slice_s: f64,
    /// Complete rounds (every side had its slice).
    pub(crate) rounds: usize,
    /// Each side's name.
    pub(crate) sides: Vec<String>,
    /// Side 0 against each other side.
    pub(crate) comparisons: Vec<Comparison>,
    /// Every slice.
    pub(crate) slices: Vec<Slice>,
}

impl Interleaved {
    /// The server CPU (CPU-seconds per second) of `side` over its slices.
    pub(crate) fn server_cpu(&self, side: usize) -> Option<f64> {
        side_server_cpu(&self.slices, side)
    }
}

fn side_server_cpu(slices: &[Slice], side: usize) -> Option<f64> {
    let mine: Vec<&Slice> = slices.iter().filter(|s| s.side == side).collect();
    let secs: f64 = mine.iter().map(|s| s.secs).sum();
    mine.iter()
        .map(|s| s.server_cpu.map(|c| c * s.secs))
        .sum::<Option<f64>>()
        .map(|c| c / secs.max(f64::MIN_POSITIVE))
}

/// Parses a slice length: `500ms`, `2s`, or a whole number of seconds.
pub(crate) fn parse_slice(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let d = if let Some(ms) = t.strip_suffix("ms") {
        ms.parse::<u64>().map(Duration::from_millis)
    } else {
        t.strip_suffix('s')
            .unwrap_or(t)
            .parse::<u64>()
            .map(Duration::from_secs)
    }
    .map_err(|_| format!("invalid slice {text:?}: expected e.g. 500ms or 2s"))?;
    if d < Duration::from_millis(200) {
        return Err(format!("slice {text:?} is too short: at least 200ms"));
    }
    Ok(d)
}

/// Runs rounds of one `slice` per side until `total` has passed (at least
/// one round), then leaves every side active. `report` is told each
/// finished round (for a progress line).
pub(crate) fn run(
    sides: &[&dyn SideControl],
    slice: Duration,
    total: Duration,
    report: &mut dyn FnMut(&[Slice]),
) -> Result<Interleaved> {
    if sides.len() < 2 {
        bail!("interleaving needs two sides");
    }
    let start = Instant::now();
    let mut slices = Vec::new();
    let mut round = 0;
    for s in sides {
        s.set_active(false);
        s.set_measuring(false);
    }
    let result = (|| -> Result<()> {
        for s in sides {
            quiesce(*s)?;
        }
        loop {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..sides.len()).collect()
            } else {
                (0..sides.len()).rev().collect()
            };
            for &i in &order {
                let side = sides[i];
                side.set_active(true);
                wait(side, SETTLE)?;
                let (c0, cpu0, t0) = (side.count(), side.server_cpu_seconds(), Instant::now());
                side.set_measuring(true);
                wait(side, slice)?;
                side.set_measuring(false);
                let (c1, cpu1, secs) = (
                    side.count(),
                    side.server_cpu_seconds(),
                    t0.elapsed().as_secs_f64(),
                );
                side.set_active(false);
                let count = c1.saturating_sub(c0);
                slices.push(Slice {
                    round,
                    side: i,
                    t_s: t0.duration_since(start).as_secs_f64(),
                    secs,
                    count,
                    rate_per_s: count as f64 / secs,
                    server_cpu: cpu1.zip(cpu0).map(|(b, a)| (b - a) / secs),
                });
                quiesce(side)?;
            }
            report(&slices);
            round += 1;
            // Ctrl-C ends the interleaving after the round under way.
            if start.elapsed() >= total || crate::interrupted() {
                return Ok(());
            }
        }
    })();
    for s in sides {
        s.set_active(true);
    }
    result?;
    let names: Vec<String> = sides.iter().map(|s| s.name()).collect();
    let comparisons = (1..sides.len())
        .map(|other| compare(&slices, round, other, names[other].clone()))
        .collect();
    Ok(Interleaved {
        slice_s: slice.as_secs_f64(),
        rounds: round,
        sides: names,
        comparisons,
        slices,
    })
}

/// Side 0 against `other`, from the slices of `rounds` rounds.
fn compare(slices: &[Slice], rounds: usize, other: usize, name: String) -> Comparison {
    let of = |round: usize, side: usize| slices.iter().find(|s| s.round == round && s.side == side);
    let mut ratios = Vec::new();
    let mut per_cpu = Vec::new();
    for r in 0..rounds {
        let (Some(a), Some(b)) = (of(r, 0), of(r, other)) else {
            continue;
        };
        if b.rate_per_s > 0.0 {
            ratios.push(a.rate_per_s / b.rate_per_s);
        }
        if let (Some(ca), Some(cb)) = (a.server_cpu, b.server_cpu) {
            if ca > 0.0 && cb > 0.0 && b.rate_per_s > 0.0 {
                per_cpu.push((a.rate_per_s / ca) / (b.rate_per_s / cb));
            }
        }
    }
    let mine: Vec<&Slice> = slices.iter().filter(|s| s.side == other).collect();
    let secs: f64 = mine.iter().map(|s| s.secs).sum();
    let count: u64 = mine.iter().map(|s| s.count).sum();
    let cpu = side_server_cpu(slices, other);
    Comparison {
        against: name,
        ratio: Spread::of(ratios),
        ratio_per_cpu: Spread::of(per_cpu),
        rate_per_s: count as f64 / secs.max(f64::MIN_POSITIVE),
        server_cpu: cpu,
    }
}

/// Sleeps `d`, checking for a worker's failure every few milliseconds.
fn wait(side: &dyn SideControl, d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    loop {
        if let Some(e) = side.failure() {
            return Err(e);
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(5)));
    }
}

/// Waits until a paused side's count stands still for [`QUIET`] (its last
/// answers are in), at most [`QUIESCE_MAX`].
fn quiesce(side: &dyn SideControl) -> Result<()> {
    let until = Instant::now() + QUIESCE_MAX;
    let mut last = side.count();
    while Instant::now() < until {
        wait(side, QUIET)?;
        let now = side.count();
        if now == last {
            return Ok(());
        }
        last = now;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn spreads_take_the_middle() {
        assert_eq!(Spread::of(vec![]), None);
        let s = Spread::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(vec![4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Spread::of(vec![f64::NAN, 1.0]).unwrap().n, 1);
    }

    #[test]
    fn slices_parse_in_milliseconds_or_seconds() {
        assert_eq!(parse_slice("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_slice("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_slice("3"), Ok(Duration::from_secs(3)));
        assert!(parse_slice("100ms").is_err());
        assert!(parse_slice("x").is_err());
        assert!(parse_slice("").is_err());
    }

    /// A side whose count grows at `rate` per second while active.
    struct Fake {
        name: &'static str,
        rate: f64,
        active: Cell<bool>,
        since: Cell<Option<Instant>>,
        banked: Cell<f64>,
        switches: Cell<u32>,
    }

    impl Fake {
        fn new(name: &'static str, rate: f64) -> Fake {
            Fake {
                name,
                rate,
                active: Cell::new(true),
                since: Cell::new(Some(Instant::now())),
                banked: Cell::new(0.0),
                switches: Cell::new(0),
            }
        }
    }

    impl SideControl for Fake {
        fn name(&self) -> String {
            self.name.into()
        }
        fn count(&self) -> u64 {
            let running = self
                .since
                .get()
                .map_or(0.0, |t| t.elapsed().as_secs_f64() * self.rate);
            (self.banked.get() + running) as u64
        }
        fn server_cpu_seconds(&self) -> Option<f64> {
            None
        }
        fn set_active(&self, active: bool) {
            if active == self.active.get() {
                return;
            }
            self.switches.set(self.switches.get() + 1);
            self.active.set(active);
            if active {
                self.since.set(Some(Instant::now()));
            } else if let Some(t) = self.since.take() {
                self.banked
                    .set(self.banked.get() + t.elapsed().as_secs_f64() * self.rate);
            }
        }
        fn set_measuring(&self, _: bool) {}
    }

    #[test]
    fn sides_take_turns_and_the_ratio_is_per_round() {
        let a = Fake::new("a", 100_000.0);
        let b = Fake::new("b", 200_000.0);
        let mut rounds_seen = 0;
        let r = run(
            &[&a, &b],
            Duration::from_millis(200),
            Duration::from_millis(900),
            &mut |_| rounds_seen += 1,
        )
        .unwrap();
        assert!(r.rounds >= 2, "{}", r.rounds);
        assert_eq!(rounds_seen, r.rounds);
        assert_eq!(r.slices.len(), 2 * r.rounds);
        // Alternating order: a b, b a, …
        assert_eq!(r.slices[0].side, 0);
        assert_eq!(r.slices[2].side, 1);
        let ratio = r.comparisons[0].ratio.unwrap();
        assert_eq!(ratio.n, r.rounds);
        assert!((ratio.median - 0.5).abs() < 0.1, "{ratio:?}");
        // Both sides are left active.
        assert!(a.active.get() && b.active.get());
        assert!(a.switches.get() >= 2 * r.rounds as u32);
    }

    #[test]
    fn one_side_is_not_a_comparison() {
        let a = Fake::new("a", 1.0);
        assert!(run(
            &[&a],
            Duration::from_millis(200),
            Duration::ZERO,
            &mut |_| {}
        )
        .is_err());
    }
}
