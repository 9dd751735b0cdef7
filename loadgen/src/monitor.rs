//! The phase monitor every scenario reports through: it runs the phases of
//! a run (connect, warm-up, the measured window, drain), samples the
//! scenario's main counter once a second into the timeline, keeps the live
//! progress line (indicatif; hidden by `--no-progress` or when stderr is not
//! a terminal), and measures the CPU the loadgen and the server used in the
//! measured window.
//!
//! It exists so that the device scenarios, STUN and MQTT show and time their
//! phases the same way. It reads a scenario through [`Probe`] and must not
//! know any scenario's counters or workers beyond what that trait gives.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

use crate::report::{human, Sample};
use crate::Common;

/// How often a phase checks its end and whether a sample is due.
const POLL: Duration = Duration::from_millis(10);

/// What the monitor reads of a scenario at each poll.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Reading {
    /// The counter behind the scenario's main rate (replies, deliveries…).
    pub(crate) count: u64,
    /// Devices (or subscribers) connected now.
    pub(crate) held: u64,
    /// Devices trying to connect now, where the scenario has such.
    pub(crate) connecting: Option<u64>,
    /// Requests lost so far, where the scenario counts them as it goes.
    pub(crate) lost: Option<u64>,
}

/// A scenario as the monitor sees it.
pub(crate) trait Probe {
    /// What [`Probe::mark`] returns at the edges of the measured window.
    type Mark;
    /// Seconds since the run's time zero (the timeline's clock).
    fn elapsed_s(&self) -> f64;
    /// The counters the live line and the timeline show.
    fn read(&self) -> Reading;
    /// A phase called `label` begins (a scenario may tell its workers).
    fn begin(&self, _label: &'static str) {}
    /// The measured window starts (`true`: workers start recording) or ends
    /// (`false`); returns the scenario's counters at that edge.
    fn mark(&self, measuring: bool) -> Self::Mark;
    /// A worker's error, which ends the phase under way with it.
    fn failure(&self) -> Option<anyhow::Error> {
        None
    }
}

/// The measured window: the scenario's counters at its edges, its length,
/// and the CPU the loadgen and the server (the node, or an in-process
/// baseline server) used per second of it.
pub(crate) struct Window<M> {
    pub(crate) before: M,
    pub(crate) after: M,
    pub(crate) wall_s: f64,
    pub(crate) loadgen_cpu: f64,
    pub(crate) node_cpu: Option<f64>,
}

/// Runs phases over a [`Probe`], one sample a second.
pub(crate) struct Monitor<'a, P: Probe> {
    probe: P,
    bar: ProgressBar,
    rate_name: &'a str,
    last_count: u64,
    last_t: f64,
    timeline: Vec<Sample>,
}

impl<'a, P: Probe> Monitor<'a, P> {
    /// A monitor of `probe` whose main rate is called `rate_name`.
    pub(crate) fn new(c: &Common, probe: P, rate_name: &'a str) -> Self {
        let bar = if c.no_progress {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        };
        Monitor {
            probe,
            bar,
            rate_name,
            last_count: 0,
            last_t: 0.0,
            timeline: Vec::new(),
        }
    }

    /// Runs phase `label` for `secs` (infinite: until `done`) or until
    /// `done` says so, sampling each second; a worker's failure ends it
    /// with that error.
    pub(crate) fn phase(
        &mut self,
        label: &'static str,
        secs: f64,
        done: &dyn Fn() -> bool,
    ) -> Result<()> {
        self.probe.begin(label);
        let start = self.probe.elapsed_s();
        loop {
            if let Some(e) = self.probe.failure() {
                return Err(e);
            }
            let now = self.probe.elapsed_s();
            if now - self.last_t >= 1.0 {
                self.sample(label, now, start, secs);
            }
            // Ctrl-C ends this phase and every later one at once.
            if now - start >= secs || done() || crate::interrupted() {
                return Ok(());
            }
            let left = Duration::from_secs_f64((secs - (now - start)).clamp(0.0, 1.0));
            std::thread::sleep(POLL.min(left));
        }
    }

    /// One timeline sample and the live line.
    fn sample(&mut self, label: &'static str, now: f64, start: f64, secs: f64) {
        let r = self.probe.read();
        let dt = now - self.last_t;
        let rate = r.count.saturating_sub(self.last_count) as f64 / dt;
        self.timeline.push(Sample {
            t_s: now,
            phase: label,
            rate_per_s: rate,
            devices_held: r.held,
        });
        let mut line = format!(
            "{label} {:.0}/{} s · {}/s {} · held {}",
            now - start,
            if secs.is_finite() {
                format!("{secs:.0}")
            } else {
                "-".into()
            },
            self.rate_name,
            human(rate),
            r.held,
        );
        if let Some(n) = r.connecting {
            line.push_str(&format!(" · connecting {n}"));
        }
        if let Some(n) = r.lost {
            line.push_str(&format!(" · lost {n}"));
        }
        self.bar.set_message(line);
        self.bar.tick();
        self.last_count = r.count;
        self.last_t = now;
    }

    /// Runs `--warmup` (when not 0), then the measured window
    /// (`--duration`, labelled `label` in the timeline) between the probe's
    /// two marks. The server whose CPU is measured is the in-process
    /// baseline server `server` (a thread id, 0 if it has not started) when
    /// given, else `--node-pid`; the loadgen's own CPU leaves that thread out.
    pub(crate) fn measure(
        &mut self,
        c: &Common,
        label: &'static str,
        server: Option<&AtomicU32>,
    ) -> Result<Window<P::Mark>> {
        if c.warmup > 0 {
            self.phase("warmup", c.warmup as f64, &|| false)?;
        }
        let server_tid = server.map(|t| t.load(Relaxed)).filter(|&t| t != 0);
        let server_cpu = || match (server, server_tid) {
            (Some(_), Some(tid)) => crate::sys::thread_cpu_seconds(tid),
            (Some(_), None) => None,
            (None, _) => crate::sys::procs_cpu_seconds(&c.node_pids),
        };
        let cpu0 = crate::sys::own_cpu_seconds();
        let server0 = server_cpu();
        let t0 = self.probe.elapsed_s();
        let before = self.probe.mark(true);
        let ran = self.phase(label, c.duration as f64, &|| false);
        let after = self.probe.mark(false);
        ran?;
        // An interrupted run may have measured next to nothing: no division
        // by zero below.
        let wall_s = (self.probe.elapsed_s() - t0).max(1e-3);
        let server_s = server_cpu().zip(server0).map(|(b, a)| b - a);
        let mut loadgen_s = crate::sys::own_cpu_seconds() - cpu0;
        if server_tid.is_some() {
            loadgen_s -= server_s.unwrap_or(0.0);
        }
        Ok(Window {
            before,
            after,
            wall_s,
            loadgen_cpu: loadgen_s.max(0.0) / wall_s,
            node_cpu: server_s.map(|s| s / wall_s),
        })
    }

    /// Clears the live line and hands back the timeline.
    pub(crate) fn finish(mut self) -> Vec<Sample> {
        self.bar.finish_and_clear();
        std::mem::take(&mut self.timeline)
    }
}

impl<P: Probe> Drop for Monitor<'_, P> {
    fn drop(&mut self) {
        // An error ends the run early: leave no half-drawn line behind.
        self.bar.finish_and_clear();
    }
}
