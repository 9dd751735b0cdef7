//! Runs a scenario: sockets and workers, the phases (connect, warm-up,
//! measure, drain) through the shared [`Monitor`], the baseline run, and
//! the report.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use mpp::packet::MasterKey;
use serde_json::json;

use crate::baseline::{RawSender, Reflector};
use crate::engine::{self, histogram, Mode, Shared, Snapshot, WorkerConfig};
use crate::ident::{load_master, load_master_or_random, load_token, Identity};
use crate::monitor::{Monitor, Probe, Reading, Window};
use crate::publisher::{self, Http, PublishConfig, PublishStats, MAX_AHEAD};
use crate::report::{Baseline, Report, Sample};
use crate::{Cli, Command, Common};

/// Runs the command line's scenario and prints/writes its report.
pub(crate) fn run(cli: &Cli) -> Result<()> {
    let c = &cli.common;
    validate(c)?;
    let config = json!({ "common": c, "command": &cli.command });
    let report = match &cli.command {
        Command::Hold(a) => hold(c, a, config)?,
        Command::Fanout(a) => fanout(c, a, config)?,
        Command::Heartbeat(a) => heartbeat(c, a, config)?,
        Command::Churn(a) => churn(c, a, config)?,
        Command::Echo(a) => echo(c, a, config)?,
        Command::RawFanout(a) => raw_fanout(c, a, config)?,
        Command::Stun(a) => stun(c, a, config)?,
        Command::Reflector(a) => reflector(c, a, config)?,
        Command::Mqtt(a) => crate::mqtt::run(c, a)?,
    };
    finish(c, &report)
}

fn validate(c: &Common) -> Result<()> {
    if c.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if c.devices > u64::from(u32::MAX) {
        bail!("--devices must be at most {}", u32::MAX);
    }
    if let Some(a) = c.accounts {
        if a == 0 || a > c.devices {
            bail!("--accounts must be between 1 and --devices ({})", c.devices);
        }
    }
    if c.threads == 0 || c.threads > 256 {
        bail!("--threads must be between 1 and 256");
    }
    if c.sockets == 0 || c.sockets > 65_535 {
        bail!("--sockets must be between 1 and 65535");
    }
    if c.batch == 0 || c.batch > 1024 {
        bail!("--batch must be between 1 and 1024");
    }
    if c.duration == 0 {
        bail!("--duration must be at least 1s");
    }
    if !(0.0..=100.0).contains(&c.loss) {
        bail!("--loss must be a percentage between 0 and 100");
    }
    if c.timeout_ms == 0 {
        bail!("--timeout-ms must be positive");
    }
    if c.tries == 0 {
        bail!("--tries must be at least 1");
    }
    Ok(())
}

/// Prints the table and writes the files the flags ask for.
pub(crate) fn finish(common: &Common, report: &Report) -> Result<()> {
    report.print_table(&mut std::io::stdout().lock())?;
    if let Some(p) = &common.json {
        report.write_json(p)?;
    }
    if let Some(p) = &common.html {
        report.write_html(p)?;
    }
    Ok(())
}

/// The CPU for worker `i`.
fn cpu_for(c: &Common, i: usize) -> Option<usize> {
    c.worker_cpus().map(|l| l[i % l.len()])
}

fn master(c: &Common) -> Result<MasterKey> {
    load_master(c.master_key.as_deref(), &c.data_dir)
}

fn identity(c: &Common, master: MasterKey) -> Result<Arc<Identity>> {
    Ok(Arc::new(Identity::new(
        master,
        c.accounts.unwrap_or(c.devices),
    )?))
}

/// Sockets for worker `t`, connected to `target`.
fn worker_sockets(c: &Common, target: SocketAddr) -> Result<Vec<Vec<socket2::Socket>>> {
    let per = (c.sockets / c.threads).max(1);
    (0..c.threads)
        .map(|_| {
            (0..per)
                .map(|_| crate::io::connected_socket(target))
                .collect()
        })
        .collect()
}

/// What the main rate counts.
type RateOf = fn(&Snapshot) -> u64;

/// One run of device workers.
struct Plan<'a> {
    common: &'a Common,
    ident: Arc<Identity>,
    mode: Mode,
    target: SocketAddr,
    window: usize,
    connect_rate: f64,
    /// Accounts that get publish clocks (fanout).
    clocks: u64,
    rate_name: &'a str,
    rate_of: RateOf,
    /// Label of the measured phase in the timeline ("measure" or "baseline").
    label: &'static str,
    /// Publish over HTTP once connected (fanout).
    publish: Option<(Http, PublishConfig)>,
    /// Time after the measured window before stopping (fanout).
    drain_s: u64,
    /// Run the raw fan-out sender (baseline) with this bitmask.
    raw_sender: Option<(Vec<u8>, Option<usize>)>,
    /// The thread id of an in-process baseline server (0 until it starts):
    /// its CPU is measured in place of `--node-pid`'s.
    server_tid: Option<Arc<AtomicU32>>,
}

/// What one run measured.
struct Outcome {
    measured: Snapshot,
    end: Snapshot,
    wall_s: f64,
    loadgen_cpu: f64,
    node_cpu: Option<f64>,
    rtt: Histogram<u64>,
    notify: Histogram<u64>,
    timeline: Vec<Sample>,
    connect_s: f64,
    held_at_measure_end: u64,
    /// Devices still connecting at the end of the measured window (None
    /// for the baselines, whose devices do not connect).
    connecting: Option<u64>,
    publish: Option<PublishStats>,
    raw_sent: Option<u64>,
    first_refusal: Option<String>,
    /// What the hostile mix sent and got back (--hostile).
    hostile: Option<serde_json::Value>,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
}

/// The device workers' counters, as the monitor reads them.
struct Devices<'a> {
    shared: &'a Shared,
    rate_of: RateOf,
    /// Devices that connect (None for the baselines, whose do not).
    connecting: Option<u64>,
}

impl Probe for Devices<'_> {
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

fn run_plan(mut plan: Plan<'_>) -> Result<Outcome> {
    let c = plan.common;
    let shared = Shared::new(plan.clocks);
    let mut sockets = worker_sockets(c, plan.target)?;
    let stop_aux = Arc::new(AtomicBool::new(false));
    let mut aux: Vec<JoinHandle<Result<()>>> = Vec::new();
    let mut raw_sent = None;
    if let Some((bitmask, cpu)) = plan.raw_sender.take() {
        let addrs: Vec<Vec<SocketAddr>> = sockets.iter().map(|s| engine::local_addrs(s)).collect();
        let bind = loopback_any(plan.target);
        let sender = RawSender::new(&plan.ident, c.devices, c.threads, &addrs, &bitmask, bind)?;
        // The receivers only take datagrams from the sender.
        let from = sender.addr()?;
        for s in sockets.iter().flatten() {
            s.connect(&from.into())?;
        }
        raw_sent = Some(sender.sent.clone());
        let stop = stop_aux.clone();
        let batch = c.batch;
        let (thread, tid) = spawn_server(move || sender.run(cpu, batch, &stop));
        aux.push(thread);
        plan.server_tid = Some(tid);
    }
    let rss_before = c.node_pid.and_then(crate::sys::proc_rss_bytes);
    let mut hostile = None;
    let mut workers = Vec::new();
    for (i, socks) in sockets.drain(..).enumerate() {
        let cfg = WorkerConfig {
            index: i,
            threads: c.threads,
            devices: c.devices,
            sockets: socks,
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
        shared: &shared,
        rate_of: plan.rate_of,
        connecting: connects.then_some(c.devices),
    };
    let mut mon = Monitor::new(c, probe, plan.rate_name);
    let result = (|| -> Result<Outcome> {
        let threads = c.threads as u64;
        // No time limit: devices never give up, so the phase ends when every
        // one has connected (or was refused for good); heartbeats that go
        // unanswered meanwhile make some connect again. Only a node that
        // answers nobody at all ends the run, after a few connect timeouts.
        let silence_s = (c.timeout_ms as f64 / 1000.0 * 5.0).max(5.0);
        mon.phase("connect", f64::INFINITY, &|| {
            shared.connect_done.load(Relaxed) >= threads
                || workers.iter().any(|w| w.is_finished())
                || (shared.counters.connected.load(Relaxed) == 0
                    && shared.epoch.elapsed().as_secs_f64() >= silence_s)
        })?;
        if workers.iter().any(|w| w.is_finished()) {
            bail!("a worker stopped during the connect phase");
        }
        let connect_s = shared.epoch.elapsed().as_secs_f64();
        let held = shared.counters.snapshot().held();
        let silent = shared.connect_done.load(Relaxed) < threads;
        if connects && (held == 0 || silent) {
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
            bail!("no device connected to {}{why}", plan.target);
        }
        // The hostile mix starts once the devices are connected.
        if c.hostile > 0.0 {
            let h = crate::hostile::Hostile::new(&plan.ident, c.devices, plan.target, c.hostile)?;
            hostile = Some((h.counts.clone(), Instant::now()));
            let (stop, batch) = (stop_aux.clone(), c.batch);
            aux.push(std::thread::spawn(move || h.run(batch, &stop)));
        }
        let mut publisher = None;
        if let Some((mut http, pcfg)) = plan.publish.take() {
            // A node with catch-up (docs/PROTOCOL.md §6.7) told every
            // device its account's Serial when it connected; an older one
            // did not, and a priming publish to those accounts does.
            let accounts = plan.clocks as usize;
            let unprimed: Vec<u64> = (0..plan.clocks)
                .filter(|&a| shared.accounts[a as usize].base.load(Relaxed) == 0)
                .collect();
            publisher::prime(&mut http, &unprimed)?;
            mon.phase("prime", 10.0, &|| {
                shared
                    .accounts
                    .iter()
                    .take(accounts)
                    .all(|a| a.base.load(Relaxed) != 0)
            })?;
            let (sh, stop) = (shared.clone(), stop_aux.clone());
            publisher = Some(std::thread::spawn(move || {
                publisher::run(&mut http, &pcfg, &sh, &stop)
            }));
        }
        let Window {
            before,
            after,
            wall_s,
            loadgen_cpu,
            node_cpu,
        } = mon.measure(c, plan.label, plan.server_tid.as_deref())?;
        let rss_after = c.node_pid.and_then(crate::sys::proc_rss_bytes);
        let mut publish = None;
        if let Some(p) = publisher {
            stop_aux.store(true, Relaxed);
            let p = p.join().map_err(|_| anyhow!("the publisher panicked"))??;
            // Late deliveries and retransmissions, until every accepted
            // publish reached every device of its account or --drain ends.
            let expected = p.expected;
            let all_in = || shared.counters.delivered.load(Relaxed) >= expected;
            publish = Some(p);
            mon.phase("drain", plan.drain_s as f64, &all_in)?;
        }
        Ok(Outcome {
            measured: after.since(&before),
            end: shared.counters.snapshot(),
            wall_s,
            loadgen_cpu,
            node_cpu,
            rtt: histogram(),
            notify: histogram(),
            timeline: Vec::new(),
            connect_s,
            held_at_measure_end: after.held(),
            connecting: connects.then(|| after.connecting(c.devices)),
            publish,
            raw_sent: raw_sent.as_ref().map(|s| s.load(Relaxed)),
            first_refusal: shared.first_refusal.lock().ok().and_then(|f| f.clone()),
            hostile: None,
            rss_before,
            rss_after,
        })
    })();
    shared.stop.store(true, Relaxed);
    stop_aux.store(true, Relaxed);
    let timeline = mon.finish();
    let mut rtt = histogram();
    let mut notify = histogram();
    let mut worker_error = None;
    for w in workers {
        match w.join() {
            Ok(Ok(r)) => {
                let _ = rtt.add(&r.rtt);
                let _ = notify.add(&r.notify);
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
    let mut out = match (result, worker_error) {
        (Err(e), Some(w)) => return Err(e.context(format!("worker: {w:#}"))),
        (Err(e), None) => return Err(e),
        (Ok(_), Some(w)) => return Err(w),
        (Ok(o), None) => o,
    };
    out.hostile = hostile.map(
        |(counts, since): (Arc<crate::hostile::HostileCounts>, Instant)| {
            counts.to_json(since.elapsed().as_secs_f64())
        },
    );
    out.rtt = rtt;
    out.notify = notify;
    out.timeline = timeline;
    Ok(out)
}

fn common_figures(r: &mut Report, o: &Outcome) {
    r.duration_s = o.wall_s;
    r.loadgen_cpu = o.loadgen_cpu;
    r.node_cpu = o.node_cpu;
    r.devices_held = o.held_at_measure_end;
    r.figure("connect_phase_s", (o.connect_s * 10.0).round() / 10.0);
    if let Some(n) = o.connecting {
        r.figure("devices_connected", o.end.first_connects);
        r.figure("connecting", n);
    }
    if let Some(f) = &o.first_refusal {
        r.figure("first_refusal", f.as_str());
    }
    if let Some(h) = &o.hostile {
        r.figure("hostile", h.clone());
    }
    r.figure(
        "measured",
        serde_json::to_value(o.measured).unwrap_or_default(),
    );
    r.figure("whole_run", serde_json::to_value(o.end).unwrap_or_default());
    r.timeline = o.timeline.clone();
    r.set_window_stats();
}

fn device_plan<'a>(
    c: &'a Common,
    ident: Arc<Identity>,
    mode: Mode,
    rate_name: &'a str,
    rate_of: RateOf,
) -> Plan<'a> {
    Plan {
        common: c,
        ident,
        mode,
        target: c.node,
        window: 4096,
        connect_rate: 50_000.0,
        clocks: 0,
        rate_name,
        rate_of,
        label: "measure",
        publish: None,
        drain_s: 0,
        raw_sender: None,
        server_tid: None,
    }
}

fn replies(s: &Snapshot) -> u64 {
    s.replies
}

fn delivered(s: &Snapshot) -> u64 {
    s.delivered
}

fn notifications(s: &Snapshot) -> u64 {
    s.notifications
}

fn disconnects(s: &Snapshot) -> u64 {
    s.disconnects
}

fn hold(c: &Common, a: &crate::HoldArgs, config: serde_json::Value) -> Result<Report> {
    let ident = identity(c, master(c)?)?;
    let mut plan = device_plan(
        c,
        ident,
        Mode::Sweep {
            heartbeat_ms: a.heartbeat.max(1) * 1000,
        },
        "heartbeat round trips",
        replies,
    );
    plan.window = a.window;
    plan.connect_rate = a.connect_rate.max(1) as f64;
    let o = run_plan(plan)?;
    let mut r = Report::new("hold", "heartbeat round trips", config);
    r.devices = c.devices;
    r.rate_per_s = o.measured.replies as f64 / o.wall_s;
    r.lost = o.measured.lost;
    r.set_latency(&o.rtt);
    common_figures(&mut r, &o);
    r.figure("connect_retries", o.end.connect_retries);
    r.figure("heartbeat_s", a.heartbeat);
    // A node restarted or killed during the window (docs/BENCHMARKS.md,
    // "Restarts"): how many connections the devices lost, and how long
    // until every device was held again.
    r.figure("connections_lost", o.measured.dropped);
    r.figure("reconnects", o.measured.connected);
    r.figure("heartbeat_timeouts", o.measured.timeouts);
    let target = c.devices.saturating_sub(o.end.refused_devices);
    if let Some(outage) = outage(&o.timeline, target) {
        r.figure("outage", outage);
    }
    if let (Some(b), Some(e)) = (o.rss_before, o.rss_after) {
        r.figure("node_rss_before_bytes", b);
        r.figure("node_rss_after_bytes", e);
        if o.held_at_measure_end > 0 {
            r.node_rss_bytes_per_device =
                Some(e.saturating_sub(b) as f64 / o.held_at_measure_end as f64);
        }
    }
    Ok(r)
}

/// From the per-second timeline after the connect phase: when the devices
/// held first fell below `target`, the fewest held, and when all `target`
/// were held again (None: never below).
fn outage(timeline: &[crate::report::Sample], target: u64) -> Option<serde_json::Value> {
    let after_connect = timeline.iter().skip_while(|s| s.phase == "connect");
    let mut start = None;
    let mut min_held = target;
    for s in after_connect {
        if s.devices_held < target {
            start.get_or_insert(s.t_s);
            min_held = min_held.min(s.devices_held);
        } else if let Some(t0) = start {
            return Some(serde_json::json!({
                "from_s": t0,
                "to_s": s.t_s,
                "seconds": ((s.t_s - t0) * 10.0).round() / 10.0,
                "min_held": min_held,
                "recovered": true,
            }));
        }
    }
    start.map(|t0| serde_json::json!({ "from_s": t0, "min_held": min_held, "recovered": false }))
}

fn heartbeat(c: &Common, a: &crate::WindowArgs, config: serde_json::Value) -> Result<Report> {
    let ident = identity(c, master(c)?)?;
    let window = a.window.min(c.devices as usize);
    let mut plan = device_plan(
        c,
        ident.clone(),
        Mode::Window,
        "heartbeat round trips",
        replies,
    );
    plan.window = window;
    plan.connect_rate = a.connect_rate.max(1) as f64;
    let o = run_plan(plan)?;
    let mut r = Report::new("heartbeat", "heartbeat round trips", config);
    r.devices = c.devices;
    r.rate_per_s = o.measured.replies as f64 / o.wall_s;
    r.lost = o.measured.lost;
    r.set_latency(&o.rtt);
    common_figures(&mut r, &o);
    r.figure("window", window);
    if c.baseline {
        r.set_baseline("raw echo", echo_baseline(c, ident, window)?);
    }
    Ok(r)
}

/// An ephemeral loopback address of `peer`'s family.
fn loopback_any(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
    }
}

/// Starts an in-process baseline server on a thread of its own and returns
/// the thread and its thread id (0 until the thread has started), whose CPU
/// [`Monitor::measure`] reads in place of the node's.
fn spawn_server<R: Send + 'static>(
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

/// Runs `load` against an in-process reflector (pinned to
/// `--baseline-cpu`), stopping the reflector afterwards. `load` gets the
/// reflector's address and its thread id (0 until it starts).
fn with_reflector<T>(
    c: &Common,
    load: impl FnOnce(SocketAddr, Arc<AtomicU32>) -> Result<T>,
) -> Result<T> {
    let refl = Reflector::bind(loopback_any(c.node))?;
    let addr = refl.addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, cpu, batch) = (stop.clone(), c.baseline_cpu(), c.batch);
    let (th, tid) = spawn_server(move || refl.run(cpu, batch, &s2));
    let result = load(addr, tid);
    stop.store(true, Relaxed);
    let _ = th.join();
    result
}

/// The same heartbeat load against an in-process reflector.
fn echo_baseline(c: &Common, ident: Arc<Identity>, window: usize) -> Result<Baseline> {
    let o = with_reflector(c, |addr, tid| {
        let mut plan = device_plan(c, ident, Mode::Echo, "echo round trips", replies);
        plan.target = addr;
        plan.window = window;
        plan.label = "baseline";
        plan.server_tid = Some(tid);
        run_plan(plan)
    })?;
    Ok(Baseline {
        rate: o.measured.replies as f64 / o.wall_s,
        server_cpu: o.node_cpu,
        timeline: o.timeline,
    })
}

fn echo(c: &Common, a: &crate::WindowArgs, config: serde_json::Value) -> Result<Report> {
    // The reflector echoes our packets: any key will do.
    let master = load_master_or_random(c.master_key.as_deref(), &c.data_dir)?;
    let ident = identity(c, master)?;
    let window = a.window.min(c.devices as usize);
    let mut plan = device_plan(c, ident, Mode::Echo, "echo round trips", replies);
    plan.window = window;
    let o = run_plan(plan)?;
    let mut r = Report::new("echo", "echo round trips", config);
    r.devices = c.devices;
    r.rate_per_s = o.measured.replies as f64 / o.wall_s;
    r.lost = o.measured.lost;
    r.set_latency(&o.rtt);
    common_figures(&mut r, &o);
    Ok(r)
}

fn bitmask(bytes: usize) -> Result<Vec<u8>> {
    if !(1..=32).contains(&bytes) {
        bail!("--bitmask-bytes must be between 1 and 32");
    }
    let mut b = vec![0u8; bytes];
    b[0] = 1;
    Ok(b)
}

fn fanout(c: &Common, a: &crate::FanoutArgs, config: serde_json::Value) -> Result<Report> {
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        bail!("--rate must be a number ≥ 0");
    }
    if a.publish_batch == 0 || a.publish_batch > 10_000 {
        bail!("--publish-batch must be between 1 and 10000");
    }
    if a.pipeline == 0 || a.pipeline > 64 {
        bail!("--pipeline must be between 1 and 64");
    }
    if a.ahead > MAX_AHEAD {
        bail!("--ahead must be between 0 and {MAX_AHEAD}");
    }
    let mask = bitmask(a.bitmask_bytes)?;
    let ident = identity(c, master(c)?)?;
    let token = load_token(c.token_file.as_deref(), &c.data_dir)?;
    let http = Http::new(&c.control, token)?;
    let accounts = ident.accounts();
    let per_account: Vec<u64> = (0..accounts)
        .map(|x| c.devices / accounts + u64::from(x < c.devices % accounts))
        .collect();
    let pcfg = PublishConfig {
        rate: a.rate,
        batch: a.publish_batch,
        bitmask_hex: hex::encode(&mask),
        devices_per_account: per_account,
        pipeline: a.pipeline,
        ahead: a.ahead,
    };
    let mut plan = device_plan(
        c,
        ident.clone(),
        Mode::Sweep {
            heartbeat_ms: a.heartbeat.max(1) * 1000,
        },
        "notifications delivered",
        notifications,
    );
    plan.connect_rate = a.connect_rate.max(1) as f64;
    plan.clocks = accounts;
    plan.publish = Some((http, pcfg));
    plan.drain_s = a.drain;
    let o = run_plan(plan)?;
    let p = o.publish.unwrap_or_default();
    let mut r = Report::new("fanout", "notifications delivered", config);
    r.devices = c.devices;
    // Notify datagrams that brought a device news (a new Serial): what the
    // raw fan-out baseline's datagrams compare with. Publishes merged into
    // one notify (the node coalesces a device's pending bits) count once.
    r.rate_per_s = o.measured.notifications as f64 / o.wall_s;
    r.figure(
        "publishes_delivered_per_s",
        o.measured.delivered as f64 / o.wall_s,
    );
    // Every accepted publish should reach every device of its account.
    r.lost = p.expected.saturating_sub(o.end.delivered);
    r.set_latency(&o.notify);
    common_figures(&mut r, &o);
    r.figure("accounts", accounts);
    r.figure("publishes_per_s", p.published_measured as f64 / o.wall_s);
    r.figure("published", p.published);
    r.figure("expected_deliveries", p.expected);
    r.figure("delivered", o.end.delivered);
    r.figure("notifications", o.end.notifications);
    r.figure("acknowledgements_sent", o.end.acks_sent);
    r.figure("retransmits_seen", o.end.duplicates);
    r.figure("http_requests", p.requests);
    r.figure("http_rtt_p50_us", p.http_rtt_p50_us);
    r.figure("http_rtt_p99_us", p.http_rtt_p99_us);
    r.figure("http_rtt_max_us", p.http_rtt_max_us);
    r.figure("http_503", p.overloaded);
    r.figure("publisher_throttled", p.throttled);
    if c.baseline {
        r.set_baseline("raw fan-out", raw_fanout_baseline(c, ident, mask)?);
    }
    Ok(r)
}

fn raw_fanout_baseline(c: &Common, ident: Arc<Identity>, mask: Vec<u8>) -> Result<Baseline> {
    let mut plan = device_plan(
        c,
        ident,
        Mode::RawReceive,
        "raw notifications delivered",
        delivered,
    );
    plan.raw_sender = Some((mask, c.baseline_cpu()));
    plan.label = "baseline";
    let o = run_plan(plan)?;
    Ok(Baseline {
        rate: o.measured.delivered as f64 / o.wall_s,
        server_cpu: o.node_cpu,
        timeline: o.timeline,
    })
}

fn raw_fanout(c: &Common, a: &crate::RawFanoutArgs, config: serde_json::Value) -> Result<Report> {
    let master = load_master_or_random(c.master_key.as_deref(), &c.data_dir)?;
    let ident = identity(c, master)?;
    let mut plan = device_plan(
        c,
        ident,
        Mode::RawReceive,
        "raw notifications delivered",
        delivered,
    );
    plan.raw_sender = Some((vec![1], a.sender_cpu));
    let o = run_plan(plan)?;
    let mut r = Report::new("raw-fanout", "raw notifications delivered", config);
    r.devices = c.devices;
    r.rate_per_s = o.measured.delivered as f64 / o.wall_s;
    common_figures(&mut r, &o);
    if let Some(sent) = o.raw_sent {
        r.figure("sender_datagrams_sent", sent);
    }
    Ok(r)
}

fn churn(c: &Common, a: &crate::ChurnArgs, config: serde_json::Value) -> Result<Report> {
    let ident = identity(c, master(c)?)?;
    let mut plan = device_plan(
        c,
        ident,
        Mode::Churn {
            heartbeat_ms: 60_000,
            rate: a.rate,
            rebind_rate: a.rebind_rate,
        },
        "disconnect/reconnect cycles",
        disconnects,
    );
    plan.connect_rate = a.connect_rate.max(1) as f64;
    let o = run_plan(plan)?;
    let mut r = Report::new("churn", "disconnect/reconnect cycles", config);
    r.devices = c.devices;
    r.rate_per_s = o.measured.disconnects as f64 / o.wall_s;
    r.lost = o.measured.lost;
    r.set_latency(&o.rtt);
    common_figures(&mut r, &o);
    r.figure("reconnects_per_s", o.measured.connected as f64 / o.wall_s);
    r.figure("rebinds", o.measured.rebinds);
    r.figure("rebinds_confirmed", o.measured.rebinds_confirmed);
    r.figure(
        "rebinds_per_s",
        o.measured.rebinds_confirmed as f64 / o.wall_s,
    );
    Ok(r)
}

/// What one STUN run measured.
struct StunRun {
    measured: Snapshot,
    wall: f64,
    rtt: Histogram<u64>,
    timeline: Vec<Sample>,
    cpu: f64,
    node_cpu: Option<f64>,
}

fn stun_run(
    c: &Common,
    a: &crate::WindowArgs,
    target: SocketAddr,
    accept_echo: bool,
    label: &'static str,
    server: Option<&AtomicU32>,
) -> Result<StunRun> {
    let shared = Shared::new(0);
    let sockets = worker_sockets(c, target)?;
    let per_worker = (a.window / c.threads).max(1);
    let mut workers = Vec::new();
    for (i, socks) in sockets.into_iter().enumerate() {
        let cfg = crate::stun::StunWorker {
            sockets: socks,
            window: per_worker,
            batch: c.batch,
            timeout_ms: c.timeout_ms,
            cpu: cpu_for(c, i),
            accept_echo,
        };
        let sh = shared.clone();
        workers.push(std::thread::spawn(move || crate::stun::run_worker(cfg, sh)));
    }
    let probe = Devices {
        shared: &shared,
        rate_of: replies,
        connecting: None,
    };
    let mut mon = Monitor::new(c, probe, "STUN responses");
    let window = mon.measure(c, label, server);
    shared.stop.store(true, Relaxed);
    let timeline = mon.finish();
    let window = window?;
    let mut rtt = histogram();
    for w in workers {
        let h = w.join().map_err(|_| anyhow!("a STUN worker panicked"))??;
        let _ = rtt.add(&h);
    }
    Ok(StunRun {
        measured: window.after.since(&window.before),
        wall: window.wall_s,
        rtt,
        timeline,
        cpu: window.loadgen_cpu,
        node_cpu: window.node_cpu,
    })
}

fn stun(c: &Common, a: &crate::WindowArgs, config: serde_json::Value) -> Result<Report> {
    let StunRun {
        measured: m,
        wall,
        rtt,
        timeline,
        cpu,
        node_cpu,
    } = stun_run(c, a, c.node, false, "measure", None)?;
    let mut r = Report::new("stun", "STUN binding responses", config);
    r.rate_per_s = m.replies as f64 / wall;
    r.duration_s = wall;
    r.lost = m.lost;
    r.loadgen_cpu = cpu;
    r.node_cpu = node_cpu;
    r.set_latency(&rtt);
    r.timeline = timeline;
    r.set_window_stats();
    r.figure("requests_sent", m.sent);
    r.figure("unexpected", m.other + m.duplicates);
    if m.replies == 0 {
        bail!(
            "no STUN response from {} (is a STUN server listening there?)",
            c.node
        );
    }
    if c.baseline {
        let b = with_reflector(c, |addr, tid| {
            stun_run(c, a, addr, true, "baseline", Some(&tid))
        })?;
        r.set_baseline(
            "raw echo",
            Baseline {
                rate: b.measured.replies as f64 / b.wall,
                server_cpu: b.node_cpu,
                timeline: b.timeline,
            },
        );
    }
    Ok(r)
}

fn reflector(c: &Common, a: &crate::ReflectorArgs, config: serde_json::Value) -> Result<Report> {
    let refl = Reflector::bind(a.listen)?;
    let addr = refl.addr()?;
    let echoed = refl.echoed.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, cpu, batch) = (stop.clone(), a.cpu, c.batch);
    let th = std::thread::spawn(move || refl.run(cpu, batch, &s2));
    eprintln!(
        "mpp-loadgen: reflector on {addr} for {} s",
        c.warmup + c.duration
    );
    std::thread::sleep(Duration::from_secs(c.warmup));
    let e0 = echoed.load(Relaxed);
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(c.duration));
    let wall = t0.elapsed().as_secs_f64();
    let e1 = echoed.load(Relaxed);
    stop.store(true, Relaxed);
    th.join()
        .map_err(|_| anyhow!("the reflector panicked"))?
        .context("reflector")?;
    let mut r = Report::new("reflector", "datagrams echoed", config);
    r.duration_s = wall;
    r.rate_per_s = (e1 - e0) as f64 / wall;
    r.figure("listen", addr.to_string());
    Ok(r)
}
