//! Runs a scenario: sockets and workers, the phases (connect, warm-up,
//! measure, drain) through the shared [`Monitor`], the baseline run, and
//! the report.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use mpp::packet::MasterKey;
use serde_json::json;

use crate::baseline::Reflector;
use crate::engine::{histogram, Mode, Shared, Snapshot};
use crate::ident::{load_master, load_master_or_random, load_token, Identity, Space};
use crate::interleave::{Interleaved, SideControl};
use crate::monitor::Monitor;
use crate::plan::{
    cpu_for, loopback_any, run_plan, spawn_server, worker_sockets, Devices, Outcome, Plan, RateOf,
    RawKind, ServerCpu, Started,
};
use crate::publisher::{Http, PublishConfig, MAX_AHEAD};
use crate::report::{Baseline, Report, Sample};
use crate::{Cli, Command, Common};

/// Runs the command line's scenario and prints/writes its report.
pub(crate) fn run(cli: &Cli) -> Result<()> {
    let c = &cli.common;
    if let Command::Merge(a) = &cli.command {
        return crate::hist::merge(&a.files, c.histogram_out.as_deref());
    }
    validate(c, &cli.command)?;
    let config = json!({ "common": c, "command": &cli.command });
    if c.interleave.is_some()
        && !matches!(
            cli.command,
            Command::Heartbeat(_) | Command::Fanout(_) | Command::Stun(_)
        )
    {
        bail!("--interleave is for heartbeat, fanout and stun");
    }
    let mut report = match &cli.command {
        Command::Hold(a) => hold(c, a, config)?,
        Command::Fanout(a) => fanout(c, a, config)?,
        Command::Heartbeat(a) => heartbeat(c, a, config)?,
        Command::Churn(a) => churn(c, a, config)?,
        Command::Echo(a) => echo(c, a, config)?,
        Command::RawFanout(a) => raw_fanout(c, a, config)?,
        Command::Stun(a) => stun(c, a, config)?,
        Command::Reflector(a) => reflector(c, a, config)?,
        Command::Mqtt(a) => crate::mqtt::run(c, a)?,
        Command::Merge(_) => unreachable!("merged above"),
    };
    if crate::interrupted() {
        report.figure("interrupted", true);
    }
    finish(c, &report)
}

fn validate(c: &Common, command: &Command) -> Result<()> {
    if c.node.is_empty() {
        bail!("--node needs an address");
    }
    if !c.control.is_empty() && c.control.len() != c.node.len() {
        bail!(
            "--control lists {} URLs for {} --node addresses: give one per node, in the same order",
            c.control.len(),
            c.node.len()
        );
    }
    if c.node.len() > 1 {
        let several = matches!(
            command,
            Command::Hold(_) | Command::Fanout(_) | Command::Heartbeat(_) | Command::Churn(_)
        );
        if !several {
            bail!("several --node addresses are for hold, fanout, heartbeat and churn: give one");
        }
        if c.interleave.is_some() || c.baseline || c.versus.is_some() || c.hostile > 0.0 {
            bail!("--interleave, --baseline, --versus and --hostile take one --node");
        }
    }
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
    if c.interleave.is_some() && !c.baseline && c.versus.is_none() {
        bail!("--interleave alternates the node with --baseline or --versus: give one");
    }
    if c.versus.is_some() && c.interleave.is_none() {
        bail!("--versus needs --interleave");
    }
    if c.versus.is_some() && c.baseline {
        bail!("--versus and --baseline exclude each other");
    }
    space(c, c.node.len()).check()?;
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
    if let Some(p) = &common.histogram_out {
        crate::hist::write(p, &report.scenario, &report.histograms)?;
    }
    Ok(())
}

fn master(c: &Common) -> Result<MasterKey> {
    load_master(c.master_key.as_deref(), &c.data_dir)
}

/// The run's devices (`--first-device`, `--devices`, `--accounts`) on
/// `nodes` nodes.
fn space(c: &Common, nodes: usize) -> Space {
    Space {
        first: c.first_device.unwrap_or(0),
        devices: c.devices,
        accounts: c.accounts.unwrap_or(c.devices),
        nodes: nodes as u64,
        shared: c.first_device.is_some(),
    }
}

/// The identities of the run's devices on its `nodes` nodes.
fn identity_on(c: &Common, master: MasterKey, nodes: usize) -> Result<Arc<Identity>> {
    Ok(Arc::new(Identity::new(master, space(c, nodes))?))
}

/// The identities of the run's devices on the --node list.
fn identity(c: &Common, master: MasterKey) -> Result<Arc<Identity>> {
    identity_on(c, master, c.node.len())
}

fn common_figures(r: &mut Report, o: &Outcome) {
    r.duration_s = o.wall_s;
    r.loadgen_cpu = o.loadgen_cpu;
    r.node_cpu = o.node_cpu;
    r.devices_held = o.held_at_measure_end;
    r.wrong = o.wrong.wrong;
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
        targets: c.node.clone(),
        window: 4096,
        connect_rate: 50_000.0,
        clocks: 0,
        rate_name,
        rate_of,
        label: "measure",
        publish: None,
        drain_s: 0,
        raw_sender: None,
        server_cpu: if c.node_pids.is_empty() {
            ServerCpu::Unknown
        } else {
            ServerCpu::Process(c.node_pids.clone())
        },
        name: "node".into(),
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
    let node_plan = |c, ident, targets: Vec<SocketAddr>| {
        let mut plan = device_plan(c, ident, Mode::Window, "heartbeat round trips", replies);
        plan.targets = targets;
        plan.window = window;
        plan.connect_rate = a.connect_rate.max(1) as f64;
        plan
    };
    let plan = node_plan(c, ident.clone(), c.node.clone());
    let mut r = Report::new("heartbeat", "heartbeat round trips", config);
    r.devices = c.devices;
    r.figure("window", window);
    let Some(slice) = c.interleave else {
        let o = run_plan(plan)?;
        heartbeat_figures(&mut r, &o);
        if c.baseline {
            r.set_baseline("raw echo", echo_baseline(c, ident, window)?);
        }
        return Ok(r);
    };
    let reflector;
    let other = if let Some(v) = versus(c)? {
        let mut p = node_plan(c, v.ident, vec![v.node]);
        p.name = "versus".into();
        p.label = "versus";
        p.server_cpu = v.server_cpu;
        p
    } else {
        reflector = ReflectorThread::start(c)?;
        let mut p = device_plan(c, ident, Mode::Echo, "echo round trips", replies);
        p.name = "raw echo".into();
        p.targets = vec![reflector.addr];
        p.window = window;
        p.label = "baseline";
        p.server_cpu = ServerCpu::Thread(reflector.tid.clone());
        p
    };
    let (outcomes, il) = interleaved(c, vec![plan, other], slice)?;
    heartbeat_figures(&mut r, &outcomes[0]);
    r.set_interleaved(il, |i| outcomes[i].timeline.clone());
    Ok(r)
}

fn heartbeat_figures(r: &mut Report, o: &Outcome) {
    r.rate_per_s = o.measured.replies as f64 / o.wall_s;
    r.lost = o.measured.lost;
    r.set_latency(&o.rtt);
    common_figures(r, o);
}

/// The second node of `--versus`: its address, identity and CPU.
struct Versus {
    node: SocketAddr,
    control: String,
    ident: Arc<Identity>,
    data_dir: std::path::PathBuf,
    server_cpu: ServerCpu,
}

/// `--versus` and its companions, if given.
fn versus(c: &Common) -> Result<Option<Versus>> {
    let Some(node) = c.versus else {
        return Ok(None);
    };
    let data_dir = c
        .versus_data_dir
        .clone()
        .unwrap_or_else(|| c.data_dir.clone());
    let ident = identity_on(c, load_master(None, &data_dir)?, 1)?;
    Ok(Some(Versus {
        node,
        control: c
            .versus_control
            .clone()
            .unwrap_or_else(|| format!("http://{node}")),
        ident,
        data_dir,
        server_cpu: c
            .versus_pid
            .map_or(ServerCpu::Unknown, |p| ServerCpu::Process(vec![p])),
    }))
}

/// Runs `plans` (the node's first) side by side in `slice`s over
/// `--duration`: every side is started and connected, each warms up alone,
/// then they take turns ([`crate::interleave`]). Returns each side's
/// outcome (its counts summed over its slices) and the slices.
fn interleaved(
    c: &Common,
    plans: Vec<Plan<'_>>,
    slice: Duration,
) -> Result<(Vec<Outcome>, Interleaved)> {
    let mut sides = Vec::new();
    for plan in plans {
        match Started::spawn(plan) {
            Ok(s) => sides.push(s),
            Err(e) => {
                for s in sides {
                    let _ = s.finish(Err(anyhow!("stopped")));
                }
                return Err(e);
            }
        }
    }
    let run = (|| -> Result<(Interleaved, f64)> {
        for s in sides.iter_mut() {
            s.connect()?;
        }
        for i in 0..sides.len() {
            for (j, s) in sides.iter().enumerate() {
                s.set_active(i == j);
            }
            sides[i].warm_up()?;
        }
        let server_threads = || -> f64 {
            sides
                .iter()
                .filter_map(|s| s.in_process_server_cpu_seconds())
                .sum()
        };
        let (cpu0, servers0, t0) = (
            crate::sys::own_cpu_seconds(),
            server_threads(),
            std::time::Instant::now(),
        );
        let refs: Vec<&dyn SideControl> = sides.iter().map(|s| s as &dyn SideControl).collect();
        let progress = !c.no_progress;
        let il = crate::interleave::run(
            &refs,
            slice,
            Duration::from_secs(c.duration),
            &mut |slices| {
                if progress {
                    if let Some(last) = slices.last() {
                        eprint!("\rinterleaved: round {} done ", last.round + 1);
                    }
                }
            },
        )?;
        if progress {
            eprintln!();
        }
        let wall = t0.elapsed().as_secs_f64();
        let loadgen = (crate::sys::own_cpu_seconds() - cpu0) - (server_threads() - servers0);
        Ok((il, loadgen.max(0.0) / wall))
    })();
    let (il, loadgen_cpu) = match run {
        Ok(v) => v,
        Err(e) => {
            for s in sides {
                let _ = s.finish(Err(anyhow!("stopped")));
            }
            return Err(e);
        }
    };
    let mut outcomes = Vec::new();
    let mut error = None;
    for (i, s) in sides.into_iter().enumerate() {
        let cpu = if i == 0 {
            il.server_cpu(0)
        } else {
            il.comparisons[i - 1].server_cpu
        };
        let m = s.sliced(loadgen_cpu, cpu);
        match s.finish(Ok(m)) {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok((outcomes, il)),
    }
}

/// The in-process reflector of an interleaved run, stopped when dropped.
struct ReflectorThread {
    addr: SocketAddr,
    tid: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ReflectorThread {
    fn start(c: &Common) -> Result<ReflectorThread> {
        let refl = Reflector::bind(loopback_any(c.first_node()))?;
        let addr = refl.addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, cpu, batch) = (stop.clone(), c.baseline_cpu(), c.batch);
        let (thread, tid) = spawn_server(move || refl.run(cpu, batch, &s2));
        Ok(ReflectorThread {
            addr,
            tid,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ReflectorThread {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs `load` against an in-process reflector (pinned to
/// `--baseline-cpu`), stopping the reflector afterwards. `load` gets the
/// reflector's address and its thread id (0 until it starts).
fn with_reflector<T>(
    c: &Common,
    load: impl FnOnce(SocketAddr, Arc<AtomicU32>) -> Result<T>,
) -> Result<T> {
    let refl = Reflector::bind(loopback_any(c.first_node()))?;
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
        plan.targets = vec![addr];
        plan.window = window;
        plan.label = "baseline";
        plan.server_cpu = ServerCpu::Thread(tid);
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
    let accounts = ident.accounts();
    // One control connection per node (the nodes of a cluster share the
    // data directory's admin token, as they share its master key).
    let node_plan = |ident: Arc<Identity>,
                     targets: Vec<SocketAddr>,
                     controls: &[String],
                     data_dir|
     -> Result<Plan<'_>> {
        let token = load_token(c.token_file.as_deref(), data_dir)?;
        let https = controls
            .iter()
            .map(|url| Http::new(url, token.clone()))
            .collect::<Result<Vec<_>>>()?;
        let space = *ident.space();
        let pcfg = PublishConfig {
            rate: a.rate,
            batch: a.publish_batch,
            bitmask_bytes: a.bitmask_bytes,
            space,
            devices_per_account: space.devices_per_account(),
            devices_per_clock: space.devices_per_clock(),
            pipeline: a.pipeline,
            ahead: a.ahead,
        };
        let mut plan = device_plan(
            c,
            ident,
            Mode::Sweep {
                heartbeat_ms: a.heartbeat.max(1) * 1000,
            },
            "notifications delivered",
            notifications,
        );
        plan.targets = targets;
        plan.connect_rate = a.connect_rate.max(1) as f64;
        plan.clocks = space.clocks();
        plan.publish = Some((https, pcfg));
        plan.drain_s = a.drain;
        Ok(plan)
    };
    let plan = node_plan(ident.clone(), c.node.clone(), &c.controls(), &c.data_dir)?;
    let mut r = Report::new("fanout", "notifications delivered", config);
    r.devices = c.devices;
    r.figure("accounts", accounts);
    let Some(slice) = c.interleave else {
        let o = run_plan(plan)?;
        fanout_figures(&mut r, &o, c.node.len());
        if c.baseline {
            let reliable = raw_fanout_baseline(c, ident.clone(), mask.clone(), RawKind::Reliable)?;
            r.set_baseline(RELIABLE, reliable);
            let one_way = raw_fanout_baseline(c, ident, mask, RawKind::OneWay)?;
            r.set_second_baseline(ONE_WAY, one_way);
        }
        return Ok(r);
    };
    let others = if let Some(v) = versus(c)? {
        let mut p = node_plan(
            v.ident,
            vec![v.node],
            std::slice::from_ref(&v.control),
            &v.data_dir,
        )?;
        p.name = "versus".into();
        p.label = "versus";
        p.server_cpu = v.server_cpu;
        vec![p]
    } else {
        vec![
            raw_fanout_plan(c, ident.clone(), mask.clone(), RawKind::Reliable),
            raw_fanout_plan(c, ident, mask.clone(), RawKind::OneWay),
        ]
    };
    let mut plans = vec![plan];
    plans.extend(others);
    let (outcomes, il) = interleaved(c, plans, slice)?;
    fanout_figures(&mut r, &outcomes[0], c.node.len());
    r.set_interleaved(il, |i| outcomes[i].timeline.clone());
    for (i, o) in outcomes.iter().enumerate().skip(1) {
        if let Some(n) = o.raw_resent {
            r.figure(&format!("side_{i}_resent"), n);
        }
    }
    Ok(r)
}

/// The name of the raw reliable fan-out baseline (the fan-out bar's).
const RELIABLE: &str = "raw reliable fan-out";
/// The name of the one-way raw fan-out baseline (orientation).
const ONE_WAY: &str = "raw one-way fan-out";

fn fanout_figures(r: &mut Report, o: &Outcome, nodes: usize) {
    let p = o.publish.unwrap_or_default();
    // Notify datagrams that brought a device news (a new Serial): what the
    // raw fan-out baselines' acknowledged datagrams compare with. Publishes
    // merged into one notify (the node coalesces a device's pending bits)
    // count once.
    r.rate_per_s = o.measured.notifications as f64 / o.wall_s;
    r.figure(
        "publishes_delivered_per_s",
        o.measured.delivered as f64 / o.wall_s,
    );
    // Every accepted publish should reach every device of its account.
    r.lost = p.expected.saturating_sub(o.end.delivered);
    r.set_latency(&o.notify);
    if nodes > 1 {
        r.set_cross_node_latency(&o.remote);
    }
    common_figures(r, o);
    r.figure("nodes", nodes);
    r.figure("publishes_per_s", p.published_measured as f64 / o.wall_s);
    // The nodes' CPU time per publish they took while measuring (all the
    // --node-pid processes): with several nodes, what the bus adds.
    if let Some(cpu) = o.node_cpu.filter(|_| p.published_measured > 0) {
        r.figure(
            "node_cpu_us_per_publish",
            (cpu * o.wall_s * 1e6 / p.published_measured as f64 * 10.0).round() / 10.0,
        );
    }
    r.figure("published", p.published);
    r.figure("expected_deliveries", p.expected);
    r.figure("delivered", o.end.delivered);
    r.figure("notifications", o.end.notifications);
    r.figure("acknowledgements_sent", o.end.acks_sent);
    r.figure("retransmits_seen", o.end.duplicates);
    // The content check (engine/content.rs): messages checked against the
    // publishes recorded for them, and mismatches on accounts whose
    // records may be off (a 503 for part of a request, a request sent
    // twice), which `wrong` leaves out.
    r.figure("content_checked", o.end.content_checked);
    r.figure("wrong_unverifiable", o.wrong.unverifiable);
    r.figure("unverifiable_accounts", o.wrong.unverifiable_accounts);
    r.figure("http_requests", p.requests);
    r.figure("http_rtt_p50_us", p.http_rtt_p50_us);
    r.figure("http_rtt_p99_us", p.http_rtt_p99_us);
    r.figure("http_rtt_max_us", p.http_rtt_max_us);
    r.figure("http_503", p.overloaded);
    r.figure("publisher_throttled", p.throttled);
}

/// A raw fan-out baseline side: devices that take raw notifies from an
/// in-process sender of `kind` pinned to `--baseline-cpu`.
fn raw_fanout_plan(c: &Common, ident: Arc<Identity>, mask: Vec<u8>, kind: RawKind) -> Plan<'_> {
    let mut plan = device_plan(
        c,
        ident,
        Mode::RawReceive,
        "raw notifications delivered",
        delivered,
    );
    plan.raw_sender = Some((kind, mask, c.baseline_cpu()));
    plan.label = "baseline";
    plan.name = match kind {
        RawKind::Reliable => RELIABLE,
        RawKind::OneWay => ONE_WAY,
    }
    .into();
    plan
}

/// A raw fan-out baseline's rate: acknowledgements the reliable sender
/// received, or notifies the devices received from the one-way sender.
fn raw_rate(o: &Outcome) -> f64 {
    o.raw_acked.unwrap_or(o.measured.delivered) as f64 / o.wall_s
}

fn raw_fanout_baseline(
    c: &Common,
    ident: Arc<Identity>,
    mask: Vec<u8>,
    kind: RawKind,
) -> Result<Baseline> {
    let o = run_plan(raw_fanout_plan(c, ident, mask, kind))?;
    Ok(Baseline {
        rate: raw_rate(&o),
        server_cpu: o.node_cpu,
        timeline: o.timeline,
    })
}

fn raw_fanout(c: &Common, a: &crate::RawFanoutArgs, config: serde_json::Value) -> Result<Report> {
    let master = load_master_or_random(c.master_key.as_deref(), &c.data_dir)?;
    let ident = identity(c, master)?;
    let kind = if a.reliable {
        RawKind::Reliable
    } else {
        RawKind::OneWay
    };
    let mut plan = raw_fanout_plan(c, ident, vec![1], kind);
    plan.raw_sender = Some((kind, vec![1], a.sender_cpu));
    plan.label = "measure";
    plan.server_cpu = ServerCpu::Unknown;
    let o = run_plan(plan)?;
    let name = if a.reliable {
        "raw notifications acknowledged"
    } else {
        "raw notifications delivered"
    };
    let mut r = Report::new("raw-fanout", name, config);
    r.devices = c.devices;
    r.rate_per_s = raw_rate(&o);
    common_figures(&mut r, &o);
    r.node_cpu = o.node_cpu;
    if let Some(sent) = o.raw_sent {
        r.figure("sender_datagrams_sent", sent);
    }
    r.figure("devices_received", o.measured.delivered);
    if let Some(n) = o.raw_resent {
        r.figure("sender_resent", n);
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
    let workers = spawn_stun_workers(c, a, target, accept_echo, &shared)?;
    let probe = Devices::new(shared.clone(), replies, None);
    let mut mon = Monitor::new(c, probe, "STUN responses");
    let window = mon.measure(c, label, server);
    shared.stop.store(true, Relaxed);
    let timeline = mon.finish();
    let window = window?;
    let rtt = join_stun_workers(workers)?;
    Ok(StunRun {
        measured: window.after.since(&window.before),
        wall: window.wall_s,
        rtt,
        timeline,
        cpu: window.loadgen_cpu,
        node_cpu: window.node_cpu,
    })
}

type StunWorkers = Vec<JoinHandle<Result<Histogram<u64>>>>;

/// `--threads` STUN workers keeping `--window` requests to `target` in
/// flight, counting into `shared`.
fn spawn_stun_workers(
    c: &Common,
    a: &crate::WindowArgs,
    target: SocketAddr,
    accept_echo: bool,
    shared: &Arc<Shared>,
) -> Result<StunWorkers> {
    let sockets = worker_sockets(c, &[target])?;
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
    Ok(workers)
}

/// Waits for STUN workers (told to stop) and merges their round trips.
fn join_stun_workers(workers: StunWorkers) -> Result<Histogram<u64>> {
    let mut rtt = histogram();
    for w in workers {
        let h = w.join().map_err(|_| anyhow!("a STUN worker panicked"))??;
        let _ = rtt.add(&h);
    }
    Ok(rtt)
}

/// One side of an interleaved STUN run: its workers and their counters.
struct StunSide {
    name: String,
    shared: Arc<Shared>,
    server: ServerCpu,
    workers: StunWorkers,
}

impl StunSide {
    fn start(
        c: &Common,
        a: &crate::WindowArgs,
        name: &str,
        (target, accept_echo): (SocketAddr, bool),
        server: ServerCpu,
    ) -> Result<StunSide> {
        let shared = Shared::new(0);
        shared.active.store(false, Relaxed);
        let workers = spawn_stun_workers(c, a, target, accept_echo, &shared)?;
        Ok(StunSide {
            name: name.to_owned(),
            shared,
            server,
            workers,
        })
    }

    fn finish(self) -> Result<(Snapshot, Histogram<u64>)> {
        self.shared.stop.store(true, Relaxed);
        let rtt = join_stun_workers(self.workers)?;
        Ok((self.shared.counters.snapshot(), rtt))
    }
}

impl SideControl for StunSide {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn count(&self) -> u64 {
        self.shared.counters.replies.load(Relaxed)
    }
    fn server_cpu_seconds(&self) -> Option<f64> {
        self.server.seconds()
    }
    fn set_active(&self, active: bool) {
        self.shared.active.store(active, Relaxed);
    }
    fn set_measuring(&self, measuring: bool) {
        self.shared.measuring.store(measuring, Relaxed);
    }
}

/// `stun --interleave SLICE`: the node and the in-process reflector
/// (`--baseline`) or a second STUN server (`--versus ADDR`, e.g. coturn,
/// with `--versus-pid`) take turns, as heartbeat and fanout do.
fn stun_interleaved(
    c: &Common,
    a: &crate::WindowArgs,
    config: serde_json::Value,
    slice: Duration,
) -> Result<Report> {
    let node_cpu = if c.node_pids.is_empty() {
        ServerCpu::Unknown
    } else {
        ServerCpu::Process(c.node_pids.clone())
    };
    let reflector;
    let (name, other_target, other_cpu) = match c.versus {
        Some(addr) => (
            "versus",
            (addr, false),
            c.versus_pid
                .map_or(ServerCpu::Unknown, |p| ServerCpu::Process(vec![p])),
        ),
        None => {
            reflector = ReflectorThread::start(c)?;
            (
                "raw echo",
                (reflector.addr, true),
                ServerCpu::Thread(reflector.tid.clone()),
            )
        }
    };
    let sides = [
        StunSide::start(c, a, "node", (c.first_node(), false), node_cpu)?,
        StunSide::start(c, a, name, other_target, other_cpu)?,
    ];
    let run = (|| -> Result<Interleaved> {
        for i in 0..sides.len() {
            for (j, s) in sides.iter().enumerate() {
                s.set_active(i == j);
            }
            std::thread::sleep(Duration::from_secs(c.warmup));
            if sides[i].count() == 0 {
                bail!(
                    "no STUN response from the {} side during the warm-up (is a STUN server listening there?)",
                    sides[i].name
                );
            }
        }
        let refs: Vec<&dyn SideControl> = sides.iter().map(|s| s as &dyn SideControl).collect();
        crate::interleave::run(&refs, slice, Duration::from_secs(c.duration), &mut |_| {})
    })();
    let [node, other] = sides;
    let (node_end, rtt) = node.finish()?;
    other.finish()?;
    let il = run?;
    let mut r = Report::new("stun", "STUN binding responses", config);
    let mine: Vec<_> = il.slices.iter().filter(|s| s.side == 0).collect();
    let secs: f64 = mine.iter().map(|s| s.secs).sum();
    let count: f64 = mine.iter().map(|s| s.rate_per_s * s.secs).sum();
    r.rate_per_s = count / secs.max(f64::MIN_POSITIVE);
    r.duration_s = secs;
    r.lost = node_end.lost;
    r.node_cpu = il.server_cpu(0);
    r.set_latency(&rtt);
    r.figure("requests_sent", node_end.sent);
    r.figure("unexpected", node_end.other + node_end.duplicates);
    r.set_interleaved(il, |_| Vec::new());
    Ok(r)
}

fn stun(c: &Common, a: &crate::WindowArgs, config: serde_json::Value) -> Result<Report> {
    if let Some(slice) = c.interleave {
        return stun_interleaved(c, a, config, slice);
    }
    let StunRun {
        measured: m,
        wall,
        rtt,
        timeline,
        cpu,
        node_cpu,
    } = stun_run(c, a, c.first_node(), false, "measure", None)?;
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
            c.first_node()
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
    sleep_unless_interrupted(Duration::from_secs(c.warmup));
    let e0 = echoed.load(Relaxed);
    let t0 = std::time::Instant::now();
    sleep_unless_interrupted(Duration::from_secs(c.duration));
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
    // Datagrams echoed in the measured window, and over the whole run.
    r.figure("echoed", e1 - e0);
    r.figure("echoed_total", echoed.load(Relaxed));
    Ok(r)
}

/// Sleeps `d`, or less if the run is interrupted meanwhile.
fn sleep_unless_interrupted(d: Duration) {
    let until = std::time::Instant::now() + d;
    while !crate::interrupted() {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}
