//! One side of a run: device workers aimed at a node (or at an in-process
//! baseline server), the raw sender a fan-out baseline needs, and the
//! publisher of `fanout`, taken through their phases — started, connected
//! (and primed), measured, drained and stopped.
//!
//! A scenario measures one side in one window ([`run_plan`]), or several
//! sides in interleaved slices ([`crate::interleave`]): then each
//! [`Started`] side is paused and resumed through
//! [`SideControl`], and its measured counts are the sum of its slices.
//! This file must not know any scenario's report.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Result};
use hdrhistogram::Histogram;

use crate::baseline::{RawSender, ReliableSender};
use crate::engine::{self, histogram, Mode, Shared, Snapshot, WorkerConfig, WorkerResult, Wrong};
use crate::ident::Identity;
use crate::interleave::SideControl;
use crate::monitor::{Monitor, Probe, Reading, Window};
use crate::publisher::{self, Http, PublishConfig, PublishStats};
use crate::report::Sample;
use crate::Common;

/// What the main rate counts.
pub(crate) type RateOf = fn(&Snapshot) -> u64;

/// Which raw fan-out sender a baseline side runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawKind {
    /// One-way: sends as fast as it can, drops the acknowledgements.
    OneWay,
    /// Reliable: one notify in flight per device, acknowledgements counted.
    Reliable,
}

/// Where a side's server CPU is read.
#[derive(Debug, Clone)]
pub(crate) enum ServerCpu {
    /// Processes: the node or nodes (`--node-pid`, summed), or
    /// `--versus-pid`.
    Process(Vec<u32>),
    /// A thread of this process, an in-process baseline server (its id, 0
    /// until it has started).
    Thread(Arc<AtomicU32>),
    /// Not known.
    Unknown,
}

impl ServerCpu {
    /// CPU seconds used so far.
    pub(crate) fn seconds(&self) -> Option<f64> {
        match self {
            ServerCpu::Process(pids) => crate::sys::procs_cpu_seconds(pids),
            ServerCpu::Thread(tid) => match tid.load(Relaxed) {
                0 => None,
                t => crate::sys::thread_cpu_seconds(t),
            },
            ServerCpu::Unknown => None,
        }
    }
}

/// One run of device workers.
pub(crate) struct Plan<'a> {
    pub(crate) common: &'a Common,
    /// The side's name in an interleaved report ("node", "raw echo"…).
    pub(crate) name: String,
    pub(crate) ident: Arc<Identity>,
    pub(crate) mode: Mode,
    /// The node(s) the devices connect to (device `l` to
    /// `targets[Space::node_of(l)]`), or the in-process baseline server.
    pub(crate) targets: Vec<SocketAddr>,
    pub(crate) window: usize,
    pub(crate) connect_rate: f64,
    /// Publish clocks (fanout: one per account and node, [`crate::ident::Space::clocks`]).
    pub(crate) clocks: u64,
    pub(crate) rate_name: &'a str,
    pub(crate) rate_of: RateOf,
    /// Label of the measured phase in the timeline ("measure" or "baseline").
    pub(crate) label: &'static str,
    /// Publish over HTTP once connected (fanout): one control connection
    /// per node of `targets`.
    pub(crate) publish: Option<(Vec<Http>, PublishConfig)>,
    /// Time after the measured window before stopping (fanout).
    pub(crate) drain_s: u64,
    /// Run a raw fan-out sender (baseline) with this bitmask, pinned to
    /// this CPU.
    pub(crate) raw_sender: Option<(RawKind, Vec<u8>, Option<usize>)>,
    /// Whose CPU is the server's: `--node-pid`'s unless the side says
    /// otherwise (an in-process baseline server, or `--versus-pid`).
    pub(crate) server_cpu: ServerCpu,
}

/// What one run measured.
pub(crate) struct Outcome {
    pub(crate) measured: Snapshot,
    pub(crate) end: Snapshot,
    pub(crate) wall_s: f64,
    pub(crate) loadgen_cpu: f64,
    pub(crate) node_cpu: Option<f64>,
    pub(crate) rtt: Histogram<u64>,
    pub(crate) notify: Histogram<u64>,
    /// Of `notify`, the deliveries across the bus (several nodes).
    pub(crate) remote: Histogram<u64>,
    pub(crate) timeline: Vec<Sample>,
    pub(crate) connect_s: f64,
    pub(crate) held_at_measure_end: u64,
    /// Devices still connecting at the end of the measured window (None
    /// for the baselines, whose devices do not connect).
    pub(crate) connecting: Option<u64>,
    pub(crate) publish: Option<PublishStats>,
    pub(crate) raw_sent: Option<u64>,
    /// The reliable sender's acknowledgements in the measured window.
    pub(crate) raw_acked: Option<u64>,
    /// The reliable sender's resends over the whole run.
    pub(crate) raw_resent: Option<u64>,
    pub(crate) first_refusal: Option<String>,
    /// What the hostile mix sent and got back (--hostile).
    pub(crate) hostile: Option<serde_json::Value>,
    pub(crate) rss_before: Option<u64>,
    pub(crate) rss_after: Option<u64>,
    /// The content check over the whole run (fanout; zero elsewhere).
    pub(crate) wrong: Wrong,
}

/// The device workers' counters, as the monitor reads them.
pub(crate) struct Devices {
    shared: Arc<Shared>,
    rate_of: RateOf,
    /// Devices that connect (None for the baselines, whose do not).
    connecting: Option<u64>,
}

impl Devices {
    /// A probe of `shared`'s counters; `connecting`: devices that connect.
    pub(crate) fn new(shared: Arc<Shared>, rate_of: RateOf, connecting: Option<u64>) -> Devices {
        Devices {
            shared,
            rate_of,
            connecting,
        }
    }
}

impl Probe for Devices {
    type Mark = Snapshot;

    fn elapsed_s(&self) -> f64 {
        self.shared.epoch.elapsed().as_secs_f64()
    }

    fn read(&self) -> Reading {
        let snap = self.shared.counters.snapshot();
        Reading {
            count: (self.rate_of)(&snap),
            held: snap.held(),
            connecting: self.connecting.map(|d| snap.connecting(d)),
            lost: Some(snap.lost),
        }
    }

    fn mark(&self, measuring: bool) -> Snapshot {
        if measuring {
            let snap = self.shared.counters.snapshot();
            self.shared.measuring.store(true, Relaxed);
            snap
        } else {
            self.shared.measuring.store(false, Relaxed);
            self.shared.counters.snapshot()
        }
    }
}

/// The counters and switch of a side's raw sender.
struct RawHandles {
    sent: Arc<AtomicU64>,
    /// The reliable sender's acknowledgements (its rate).
    acked: Option<Arc<AtomicU64>>,
    resent: Option<Arc<AtomicU64>>,
    active: Arc<AtomicBool>,
}

/// The CPU a thread of this process may be pinned to (`--cpus`).
pub(crate) fn cpu_for(c: &Common, i: usize) -> Option<usize> {
    c.worker_cpus().map(|l| l[i % l.len()])
}

/// Each worker's sockets: `--sockets` shared out over the workers and the
/// `targets`, at least one per worker and target; a worker's sockets are
/// one group per target, in order, each connected to its target.
pub(crate) fn worker_sockets(
    c: &Common,
    targets: &[SocketAddr],
) -> Result<Vec<Vec<socket2::Socket>>> {
    let per = (c.sockets / (c.threads * targets.len().max(1))).max(1);
    (0..c.threads)
        .map(|_| {
            targets
                .iter()
                .flat_map(|&t| (0..per).map(move |_| crate::io::connected_socket(t)))
                .collect()
        })
        .collect()
}

/// An ephemeral loopback address of `peer`'s family.
pub(crate) fn loopback_any(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    }
}

/// Starts an in-process baseline server on a thread of its own and returns
/// the thread and its thread id (0 until the thread has started), whose CPU
/// is measured in place of the node's.
pub(crate) fn spawn_server<R: Send + 'static>(
    run: impl FnOnce() -> R + Send + 'static,
) -> (JoinHandle<R>, Arc<AtomicU32>) {
    let tid = Arc::new(AtomicU32::new(0));
    let t2 = tid.clone();
    let thread = std::thread::spawn(move || {
        t2.store(crate::sys::current_tid(), Relaxed);
        run()
    });
    (thread, tid)
}

/// Runs `plan` through one measured window.
pub(crate) fn run_plan(plan: Plan<'_>) -> Result<Outcome> {
    let mut side = Started::spawn(plan)?;
    let window = side.connect().and_then(|()| side.measure());
    side.finish(window)
}

/// What a side measured, in one window or summed over its slices.
pub(crate) struct Measured {
    measured: Snapshot,
    held_at_end: u64,
    connecting_at_end: u64,
    wall_s: f64,
    loadgen_cpu: f64,
    node_cpu: Option<f64>,
    raw_acked: Option<u64>,
}

/// A side whose workers run: see the module documentation.
pub(crate) struct Started<'a> {
    common: &'a Common,
    name: String,
    label: &'static str,
    rate_of: RateOf,
    targets: Vec<SocketAddr>,
    drain_s: u64,
    connects: bool,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<Result<WorkerResult>>>,
    aux: Vec<JoinHandle<Result<()>>>,
    /// Stops the raw sender and the publisher.
    stop_aux: Arc<AtomicBool>,
    raw: Option<RawHandles>,
    server_cpu: ServerCpu,
    mon: Monitor<'a, Devices>,
    publish: Option<(Vec<Http>, PublishConfig)>,
    publisher: Option<JoinHandle<Result<PublishStats>>>,
    connect_s: f64,
    rss_before: Option<u64>,
    /// The hostile mix's counters and start (--hostile).
    hostile: Option<(Arc<crate::hostile::HostileCounts>, std::time::Instant)>,
    ident: Arc<Identity>,
    /// Interleaved: the counts of the slices so far, and the current
    /// slice's start (counters, raw acknowledgements, time).
    sliced: RefCell<Snapshot>,
    slice_start: RefCell<Option<(Snapshot, u64, std::time::Instant)>>,
    sliced_acked: Cell<u64>,
    sliced_s: Cell<f64>,
}

impl<'a> Started<'a> {
    /// Opens the sockets and starts the raw sender (if any) and the
    /// workers.
    pub(crate) fn spawn(mut plan: Plan<'a>) -> Result<Started<'a>> {
        let c = plan.common;
        let shared = Shared::new(plan.clocks);
        let mut sockets = worker_sockets(c, &plan.targets)?;
        let stop_aux = Arc::new(AtomicBool::new(false));
        let mut aux: Vec<JoinHandle<Result<()>>> = Vec::new();
        let mut raw = None;
        let mut server_cpu = plan.server_cpu.clone();
        if let Some((kind, bitmask, cpu)) = plan.raw_sender.take() {
            let addrs: Vec<Vec<SocketAddr>> =
                sockets.iter().map(|s| engine::local_addrs(s)).collect();
            let bind = loopback_any(plan.targets[0]);
            let stop = stop_aux.clone();
            let batch = c.batch;
            let (from, handles, (thread, tid)) = match kind {
                RawKind::OneWay => {
                    let sender =
                        RawSender::new(&plan.ident, c.devices, c.threads, &addrs, &bitmask, bind)?;
                    let handles = RawHandles {
                        sent: sender.sent.clone(),
                        acked: None,
                        resent: None,
                        active: sender.active.clone(),
                    };
                    let from = sender.addr()?;
                    (
                        from,
                        handles,
                        spawn_server(move || sender.run(cpu, batch, &stop)),
                    )
                }
                RawKind::Reliable => {
                    let sender = ReliableSender::new(
                        plan.ident.clone(),
                        c.devices,
                        c.threads,
                        &addrs,
                        &bitmask,
                        bind,
                    )?;
                    let handles = RawHandles {
                        sent: sender.sent.clone(),
                        acked: Some(sender.acked.clone()),
                        resent: Some(sender.resent.clone()),
                        active: sender.active.clone(),
                    };
                    let from = sender.addr()?;
                    (
                        from,
                        handles,
                        spawn_server(move || sender.run(cpu, batch, &stop)),
                    )
                }
            };
            // The receivers only take datagrams from the sender.
            for s in sockets.iter().flatten() {
                s.connect(&from.into())?;
            }
            raw = Some(handles);
            aux.push(thread);
            server_cpu = ServerCpu::Thread(tid);
        }
        let rss_before = crate::sys::procs_rss_bytes(&c.node_pids);
        let mut workers = Vec::new();
        for (i, socks) in sockets.drain(..).enumerate() {
            let cfg = WorkerConfig {
                index: i,
                threads: c.threads,
                devices: c.devices,
                sockets: socks,
                nodes: plan.targets.len(),
                batch: c.batch,
                cpu: cpu_for(c, i),
                mode: plan.mode,
                window: plan.window.max(1),
                connect_rate: plan.connect_rate / c.threads as f64,
                timeout_ms: c.timeout_ms,
                tries: c.tries,
                loss: c.loss / 100.0,
            };
            let (ident, shared) = (plan.ident.clone(), shared.clone());
            workers.push(
                std::thread::Builder::new()
                    .name(format!("loadgen-{i}"))
                    .spawn(move || engine::run_worker(cfg, ident, shared))?,
            );
        }
        let connects = plan.mode != Mode::Echo && plan.mode != Mode::RawReceive;
        let probe = Devices {
            shared: shared.clone(),
            rate_of: plan.rate_of,
            connecting: connects.then_some(c.devices),
        };
        let mon = Monitor::new(c, probe, plan.rate_name);
        Ok(Started {
            common: c,
            name: plan.name,
            label: plan.label,
            rate_of: plan.rate_of,
            targets: plan.targets.clone(),
            drain_s: plan.drain_s,
            connects,
            shared,
            workers,
            aux,
            stop_aux,
            raw,
            server_cpu,
            mon,
            publish: plan.publish.take(),
            publisher: None,
            connect_s: 0.0,
            rss_before,
            hostile: None,
            ident: plan.ident.clone(),
            sliced: RefCell::new(Snapshot::default()),
            slice_start: RefCell::new(None),
            sliced_acked: Cell::new(0),
            sliced_s: Cell::new(0.0),
        })
    }

    /// The connect phase (until every device connected or was refused),
    /// then, for fanout, the priming publishes and the publisher.
    pub(crate) fn connect(&mut self) -> Result<()> {
        let c = self.common;
        let threads = c.threads as u64;
        let shared = self.shared.clone();
        // No time limit: devices never give up, so the phase ends when every
        // one has connected (or was refused for good); heartbeats that go
        // unanswered meanwhile make some connect again. Only a node that
        // answers nobody at all ends the run, after a few connect timeouts.
        let silence_s = (c.timeout_ms as f64 / 1000.0 * 5.0).max(5.0);
        // The silence counts from when every worker has built its devices
        // and is sending: deriving the keys of 10M devices alone takes
        // longer than that.
        let workers = &self.workers;
        let ready_at = std::cell::Cell::new(None::<f64>);
        self.mon.phase("connect", f64::INFINITY, &|| {
            let now = shared.epoch.elapsed().as_secs_f64();
            if ready_at.get().is_none() && shared.workers_ready.load(Relaxed) >= threads {
                ready_at.set(Some(now));
            }
            shared.connect_done.load(Relaxed) >= threads
                || workers.iter().any(|w| w.is_finished())
                || (shared.counters.connected.load(Relaxed) == 0
                    && ready_at.get().is_some_and(|t| now - t >= silence_s))
        })?;
        if self.workers.iter().any(|w| w.is_finished()) {
            bail!("a worker stopped during the connect phase");
        }
        self.connect_s = shared.epoch.elapsed().as_secs_f64();
        let held = shared.counters.snapshot().held();
        let silent = shared.connect_done.load(Relaxed) < threads;
        if self.connects && (held == 0 || silent) && !crate::interrupted() {
            let why = shared
                .first_refusal
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .map(|r| format!(" (the node refused: {r})"))
                .unwrap_or_else(|| {
                    format!(
                        " (no answer in {silence_s:.0} s: is the node running there, with \
                         this data directory's key?)"
                    )
                });
            let to = self
                .targets
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(",");
            bail!("no device connected to {to}{why}");
        }
        // The hostile mix starts once the devices are connected.
        if c.hostile > 0.0 {
            let h =
                crate::hostile::Hostile::new(&self.ident, c.devices, self.targets[0], c.hostile)?;
            self.hostile = Some((h.counts.clone(), std::time::Instant::now()));
            let (stop, batch) = (self.stop_aux.clone(), c.batch);
            self.aux
                .push(std::thread::spawn(move || h.run(batch, &stop)));
        }
        if let Some((mut https, pcfg)) = self.publish.take() {
            // A node with catch-up (docs/PROTOCOL.md §6.7) told every
            // device its account's Serial when it connected; an older one
            // did not, and a priming publish to those accounts does. A
            // clock is an account's devices on one node (clocks without
            // devices never learn a Serial).
            let unprimed_clock = |c: usize| {
                pcfg.devices_per_clock.get(c).copied().unwrap_or(0) > 0
                    && shared.accounts[c].base.load(Relaxed) == 0
            };
            let space = pcfg.space;
            let unprimed: Vec<u64> = (0..space.accounts)
                .filter(|&a| (0..space.nodes as usize).any(|j| unprimed_clock(space.clock(a, j))))
                .collect();
            publisher::prime(&mut https, &space, &unprimed)?;
            self.mon.phase("prime", 10.0, &|| {
                (0..shared.accounts.len()).all(|c| !unprimed_clock(c))
            })?;
            let (sh, stop) = (shared.clone(), self.stop_aux.clone());
            self.publisher = Some(std::thread::spawn(move || {
                publisher::run(&mut https, &pcfg, &sh, &stop)
            }));
        }
        Ok(())
    }

    /// Warm-up and one measured window.
    pub(crate) fn measure(&mut self) -> Result<Measured> {
        let c = self.common;
        let tid = match &self.server_cpu {
            ServerCpu::Thread(t) => Some(t.clone()),
            _ => None,
        };
        let acked0 = self.acked();
        let Window {
            before,
            after,
            wall_s,
            loadgen_cpu,
            node_cpu,
        } = self.mon.measure(c, self.label, tid.as_deref())?;
        Ok(Measured {
            measured: after.since(&before),
            held_at_end: after.held(),
            connecting_at_end: after.connecting(c.devices),
            wall_s,
            loadgen_cpu,
            node_cpu,
            raw_acked: self.acked().zip(acked0).map(|(b, a)| b - a),
        })
    }

    /// The warm-up alone (interleaved runs warm every side up first).
    pub(crate) fn warm_up(&mut self) -> Result<()> {
        let c = self.common;
        if c.warmup > 0 {
            self.mon.phase("warmup", c.warmup as f64, &|| false)?;
        }
        Ok(())
    }

    /// What this side's slices of an interleaved run measured, as one
    /// window: counts summed, CPU per second of the slices; the loadgen's
    /// CPU is the whole interleaved window's (`loadgen_cpu`).
    pub(crate) fn sliced(&self, loadgen_cpu: f64, node_cpu: Option<f64>) -> Measured {
        let snap = self.shared.counters.snapshot();
        Measured {
            measured: *self.sliced.borrow(),
            held_at_end: snap.held(),
            connecting_at_end: snap.connecting(self.common.devices),
            wall_s: self.sliced_s.get(),
            loadgen_cpu,
            node_cpu,
            raw_acked: self.raw_acked_handle().map(|_| self.sliced_acked.get()),
        }
    }

    fn raw_acked_handle(&self) -> Option<&Arc<AtomicU64>> {
        self.raw.as_ref().and_then(|r| r.acked.as_ref())
    }

    /// CPU seconds of the side's in-process baseline server thread, if it
    /// has one (the loadgen's own CPU leaves it out).
    pub(crate) fn in_process_server_cpu_seconds(&self) -> Option<f64> {
        match &self.server_cpu {
            ServerCpu::Thread(_) => self.server_cpu.seconds(),
            _ => None,
        }
    }

    fn acked(&self) -> Option<u64> {
        self.raw_acked_handle().map(|a| a.load(Relaxed))
    }

    /// Stops the publisher (and drains, after a measured window), the raw
    /// sender and the workers; the run's outcome, or the first error.
    pub(crate) fn finish(self, window: Result<Measured>) -> Result<Outcome> {
        let Started {
            common: c,
            connects,
            shared,
            workers,
            aux,
            stop_aux,
            raw,
            mut mon,
            mut publisher,
            drain_s,
            connect_s,
            rss_before,
            hostile,
            ..
        } = self;
        let mut publish = None;
        let result = window.and_then(|m| {
            if let Some(p) = publisher.take() {
                stop_aux.store(true, Relaxed);
                let p = p.join().map_err(|_| anyhow!("the publisher panicked"))??;
                // Late deliveries and retransmissions, until every accepted
                // publish reached every device of its account or --drain ends.
                let expected = p.expected;
                let all_in = || shared.counters.delivered.load(Relaxed) >= expected;
                publish = Some(p);
                mon.phase("drain", drain_s as f64, &all_in)?;
            }
            Ok(m)
        });
        shared.stop.store(true, Relaxed);
        stop_aux.store(true, Relaxed);
        if let Some(p) = publisher.take() {
            let _ = p.join();
        }
        let timeline = mon.finish();
        let mut rtt = histogram();
        let mut notify = histogram();
        let mut remote = histogram();
        let mut worker_error = None;
        for w in workers {
            match w.join() {
                Ok(Ok(r)) => {
                    let _ = rtt.add(&r.rtt);
                    let _ = notify.add(&r.notify);
                    let _ = remote.add(&r.remote);
                }
                Ok(Err(e)) => worker_error = Some(e),
                Err(_) => worker_error = Some(anyhow!("a worker panicked")),
            }
        }
        for a in aux {
            if let Ok(Err(e)) = a.join() {
                worker_error.get_or_insert(e);
            }
        }
        let m = match (result, worker_error) {
            (Err(e), Some(w)) => return Err(e.context(format!("worker: {w:#}"))),
            (Err(e), None) => return Err(e),
            (Ok(_), Some(w)) => return Err(w),
            (Ok(m), None) => m,
        };
        Ok(Outcome {
            measured: m.measured,
            end: shared.counters.snapshot(),
            wall_s: m.wall_s,
            loadgen_cpu: m.loadgen_cpu,
            node_cpu: m.node_cpu,
            rtt,
            notify,
            remote,
            timeline,
            connect_s,
            held_at_measure_end: m.held_at_end,
            connecting: connects.then_some(m.connecting_at_end),
            publish,
            raw_sent: raw.as_ref().map(|r| r.sent.load(Relaxed)),
            raw_acked: m.raw_acked,
            raw_resent: raw
                .as_ref()
                .and_then(|r| r.resent.as_ref())
                .map(|r| r.load(Relaxed)),
            first_refusal: shared.first_refusal.lock().ok().and_then(|f| f.clone()),
            hostile: hostile.map(|(counts, since)| counts.to_json(since.elapsed().as_secs_f64())),
            rss_before,
            rss_after: crate::sys::procs_rss_bytes(&c.node_pids),
            wrong: shared.wrong(),
        })
    }
}

impl SideControl for Started<'_> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn count(&self) -> u64 {
        match self.acked() {
            Some(acked) => acked,
            None => (self.rate_of)(&self.shared.counters.snapshot()),
        }
    }

    fn server_cpu_seconds(&self) -> Option<f64> {
        self.server_cpu.seconds()
    }

    fn set_active(&self, active: bool) {
        self.shared.active.store(active, Relaxed);
        if let Some(r) = &self.raw {
            r.active.store(active, Relaxed);
        }
    }

    fn set_measuring(&self, measuring: bool) {
        if measuring {
            let start = (
                self.shared.counters.snapshot(),
                self.acked().unwrap_or(0),
                std::time::Instant::now(),
            );
            *self.slice_start.borrow_mut() = Some(start);
            self.shared.measuring.store(true, Relaxed);
        } else {
            self.shared.measuring.store(false, Relaxed);
            if let Some((before, acked0, t0)) = self.slice_start.borrow_mut().take() {
                let delta = self.shared.counters.snapshot().since(&before);
                let sum = self.sliced.borrow().plus(&delta);
                *self.sliced.borrow_mut() = sum;
                self.sliced_acked
                    .set(self.sliced_acked.get() + self.acked().unwrap_or(0) - acked0);
                self.sliced_s
                    .set(self.sliced_s.get() + t0.elapsed().as_secs_f64());
            }
        }
    }

    fn failure(&self) -> Option<anyhow::Error> {
        if self.workers.iter().any(|w| w.is_finished()) {
            return Some(anyhow!("a worker of side {:?} stopped", self.name));
        }
        if self.aux.iter().any(|a| a.is_finished()) {
            return Some(anyhow!("the raw sender of side {:?} stopped", self.name));
        }
        if self.publisher.as_ref().is_some_and(|p| p.is_finished()) {
            return Some(anyhow!("the publisher of side {:?} stopped", self.name));
        }
        None
    }
}
