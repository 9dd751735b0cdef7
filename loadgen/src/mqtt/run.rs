//! Runs the MQTT fan-out: checks the flags, connects the publisher, starts
//! the workers, runs the phases (connect, warm-up, measure, drain) through
//! the shared [`Monitor`], and builds the report.
//!
//! It is the controller: it must not touch a connection (the workers and
//! the publisher do) nor keep its own progress line or phase clock.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;

use super::publisher::Publisher;
use super::subscribers::Worker;
use super::{new_histogram, Config, MqttArgs, Shared, CONNECTING, DRAIN, MEASURE, STOP, WARMUP};
use crate::monitor::{Monitor, Probe, Reading, Window};
use crate::report::{Report, Sample};
use crate::Common;

/// Handshakes (connect → SUBACK) in progress at once, over all workers; the
/// broker's listen backlog is small.
const HANDSHAKES_IN_PROGRESS: usize = 64;
/// A publish some live subscriber has seen neither it nor any later one of
/// after this long is given up on (settled as lost) so that the window moves
/// on: only a subscriber the broker stopped serving gets there, since a slow
/// one that receives a later publish settles the earlier ones.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries under way that the default --max-in-flight aims at.
const AUTO_DELIVERIES_IN_FLIGHT: u64 = 12_800;

/// Runs the MQTT fan-out.
pub(crate) fn run(common: &Common, args: &MqttArgs) -> Result<Report> {
    let config_json = serde_json::json!({ "common": common, "mqtt": args });
    if common.devices == 0 {
        bail!("mqtt: --devices must be at least 1 (the subscribers)");
    }
    if args.payload_bytes < 16 || args.payload_bytes > 1 << 20 {
        bail!(
            "mqtt: --payload-bytes must be 16 to 1048576 (send time and sequence number take 16)"
        );
    }
    if args.topic.is_empty() || args.topic.contains(['+', '#']) || args.topic.len() > 65535 {
        bail!(
            "mqtt: --topic {:?} must be a non-empty topic name without wildcards",
            args.topic
        );
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("mqtt: --rate must be 0 or a positive number");
    }
    let max_in_flight = args
        .max_in_flight
        .unwrap_or_else(|| auto_in_flight(common.devices));
    if max_in_flight == 0 || max_in_flight > 1 << 20 {
        bail!("mqtt: --max-in-flight must be 1 to 1048576");
    }
    if common.duration == 0 {
        bail!("mqtt: --duration must be at least 1s");
    }
    if let Some(pid) = common.node_pid {
        if crate::sys::proc_cpu_seconds(pid).is_none() {
            bail!("mqtt: --node-pid {pid}: no such process");
        }
    }
    let workers = common.threads.max(1).min(common.devices as usize);
    crate::sys::raise_nofile(common.devices + 64 + 4 * workers as u64)?;

    let ring_len = (max_in_flight * 2).next_power_of_two().max(1024);
    // SAFETY: eventfd returns a new fd or -1.
    let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if wake < 0 {
        return Err(io::Error::last_os_error()).context("eventfd");
    }
    let shared = Arc::new(Shared {
        start: Instant::now(),
        phase: AtomicU8::new(CONNECTING),
        ready: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        delivered_measured: AtomicU64::new(0),
        published: AtomicU64::new(0),
        published_measured: AtomicU64::new(0),
        publish_acks: AtomicU64::new(0),
        settle_timeouts: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
        wrong: AtomicU64::new(0),
        ring: (0..ring_len).map(|_| AtomicU32::new(0)).collect(),
        ring_mask: ring_len as u64 - 1,
        publisher_waiting: AtomicBool::new(false),
        // SAFETY: a fresh fd of ours.
        wake: unsafe { OwnedFd::from_raw_fd(wake) },
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        first_drop: Mutex::new(None),
    });
    let cfg = Arc::new(Config {
        broker: args.broker,
        topic: args.topic.clone(),
        qos: args.qos,
        payload_bytes: args.payload_bytes,
        rate: args.rate,
        max_in_flight: max_in_flight as u64,
        subscribers: common.devices,
        workers,
        connect_rate: args.connect_rate as f64 / workers as f64,
        handshakes: (HANDSHAKES_IN_PROGRESS / workers).max(8),
        settle_timeout_ns: SETTLE_TIMEOUT.as_nanos() as u64,
        cpus: common.worker_cpus().map(<[usize]>::to_vec),
        pid: std::process::id(),
    });
    if let Some(cpus) = &cfg.cpus {
        crate::sys::pin(cpus[0])?;
    }

    // The publisher first: it tells at once whether the broker is there.
    let publisher = Publisher::connect(&cfg, ring_len)?;

    let mut handles = Vec::with_capacity(workers);
    let mut publisher = Some(publisher);
    for id in 0..workers {
        let subs: Vec<u64> = (id as u64..common.devices).step_by(workers).collect();
        let worker = Worker::new(
            id,
            Arc::clone(&shared),
            Arc::clone(&cfg),
            subs,
            publisher.take(),
        )?;
        let handle = std::thread::Builder::new()
            .name(format!("mqtt-{id}"))
            .spawn(move || worker.run())
            .context("spawning a worker thread")?;
        handles.push(handle);
    }

    let result = control(common, args, &shared, &cfg);
    shared.phase.store(STOP, Ordering::SeqCst);
    shared.wake();
    let mut hist = new_histogram();
    for h in handles {
        match h.join() {
            Ok(Some(out)) => {
                hist.add(&out.hist).ok();
            }
            Ok(None) => {}
            Err(_) => shared.fail(anyhow!("an MQTT worker thread panicked")),
        }
    }
    let outcome = result?;
    if shared.failed.load(Ordering::SeqCst) {
        return Err(shared.take_error());
    }
    Ok(report(
        &outcome,
        config_json,
        &hist,
        args,
        &shared,
        &cfg,
        common,
    ))
}

/// The default window: about `AUTO_DELIVERIES_IN_FLIGHT` deliveries, 2 to 64
/// publishes.
fn auto_in_flight(subscribers: u64) -> usize {
    AUTO_DELIVERIES_IN_FLIGHT
        .div_ceil(subscribers.max(1))
        .clamp(2, 64) as usize
}

/// The MQTT run as the monitor reads it: deliveries, live subscribers, and
/// the phase the workers see.
struct Deliveries<'a> {
    shared: &'a Shared,
}

impl Probe for Deliveries<'_> {
    /// Deliveries so far and live subscribers, at an edge of the window.
    type Mark = (u64, u64);

    fn elapsed_s(&self) -> f64 {
        self.shared.start.elapsed().as_secs_f64()
    }

    fn read(&self) -> Reading {
        Reading {
            count: self.shared.delivered.load(Ordering::Acquire),
            held: self.shared.live(),
            connecting: None,
            lost: None,
        }
    }

    fn begin(&self, label: &'static str) {
        if label == "warmup" {
            self.shared.phase.store(WARMUP, Ordering::SeqCst);
            self.shared.wake();
        }
    }

    fn mark(&self, measuring: bool) -> (u64, u64) {
        let s = self.shared;
        if measuring {
            let delivered = s.delivered.load(Ordering::Acquire);
            s.phase.store(MEASURE, Ordering::SeqCst);
            s.wake();
            (delivered, s.live())
        } else {
            s.phase.store(DRAIN, Ordering::SeqCst);
            (s.delivered.load(Ordering::Acquire), s.live())
        }
    }

    fn failure(&self) -> Option<anyhow::Error> {
        self.shared
            .failed
            .load(Ordering::SeqCst)
            .then(|| self.shared.take_error())
    }
}

/// What the controller saw.
struct Outcome {
    timeline: Vec<Sample>,
    connect_ms: f64,
    window: Window<(u64, u64)>,
    drain_ms: f64,
}

/// Connect, warm up, measure, drain: the controller's side.
fn control(common: &Common, args: &MqttArgs, shared: &Shared, cfg: &Config) -> Result<Outcome> {
    let mut mon = Monitor::new(common, Deliveries { shared }, "notifications delivered");
    // Connect: until every subscriber has its SUBACK (the workers enforce
    // the per-handshake timeout).
    mon.phase("connect", f64::INFINITY, &|| {
        shared.ready.load(Ordering::Acquire) >= cfg.subscribers
    })?;
    let connect_ms = shared.start.elapsed().as_secs_f64() * 1e3;
    let window = mon.measure(common, "measure", None)?;
    let t1 = Instant::now();
    // Drained: every measured publish reached every live subscriber and,
    // at QoS 1, the broker acknowledged every publish (its last PUBACKs may
    // still be on their way when the last delivery arrives).
    mon.phase("drain", args.drain as f64, &|| {
        shared.delivered_measured.load(Ordering::Acquire)
            >= shared.published_measured.load(Ordering::Acquire) * shared.live()
            && (cfg.qos == 0
                || shared.publish_acks.load(Ordering::Acquire)
                    >= shared.published.load(Ordering::Acquire))
    })?;
    let drain_ms = t1.elapsed().as_secs_f64() * 1e3;
    Ok(Outcome {
        timeline: mon.finish(),
        connect_ms,
        window,
        drain_ms,
    })
}

/// The report of a finished run.
fn report(
    o: &Outcome,
    config: serde_json::Value,
    hist: &Histogram<u64>,
    args: &MqttArgs,
    s: &Shared,
    cfg: &Config,
    common: &Common,
) -> Report {
    let window_s = o.window.wall_s;
    let window_delivered = o.window.after.0 - o.window.before.0;
    let mut r = Report::new("mqtt", "notifications delivered", config);
    r.devices = cfg.subscribers;
    r.devices_held = o.window.after.1;
    r.duration_s = window_s;
    r.rate_per_s = window_delivered as f64 / window_s.max(1e-9);
    r.timeline = o.timeline.clone();
    r.set_window_stats();
    r.set_latency(hist);
    let published = s.published_measured.load(Ordering::Acquire);
    let delivered = s.delivered_measured.load(Ordering::Acquire);
    r.lost = (published * cfg.subscribers).saturating_sub(delivered);
    r.wrong = s.wrong.load(Ordering::Acquire);
    r.loadgen_cpu = o.window.loadgen_cpu;
    r.node_cpu = o.window.node_cpu;
    r.figure("broker", cfg.broker.to_string());
    r.figure("published", published);
    r.figure("delivered", delivered);
    r.figure(
        "publishes_per_s",
        (published as f64 / window_s.max(1e-9)).round(),
    );
    r.figure("delivered_in_window", window_delivered);
    r.figure("published_total", s.published.load(Ordering::Acquire));
    r.figure("delivered_total", s.delivered.load(Ordering::Acquire));
    r.figure("connect_ms", o.connect_ms.round());
    r.figure("drain_ms", o.drain_ms.round());
    r.figure("payload_bytes", args.payload_bytes);
    r.figure("qos", args.qos);
    if args.qos > 0 {
        r.figure("publish_acks", s.publish_acks.load(Ordering::Acquire));
    }
    r.figure(
        "publish_mode",
        if args.rate > 0.0 {
            format!("{} /s", args.rate)
        } else {
            format!("max {} in flight", cfg.max_in_flight)
        },
    );
    r.figure("workers", cfg.workers);
    r.figure("settle_timeouts", s.settle_timeouts.load(Ordering::Acquire));
    r.figure("disconnects", s.dropped.load(Ordering::Acquire));
    let malformed = s.malformed.load(Ordering::Acquire);
    if malformed > 0 {
        r.figure("foreign_messages", malformed);
    }
    if let Some(e) = s.first_drop.lock().ok().and_then(|e| e.clone()) {
        r.figure("first_disconnect", e);
    }
    if let Some(node) = common.node_pid {
        r.figure("node_pid", node);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::super::wire::{
        encode_remaining_length, publish_packet_id, put_puback, FrameStream, CONNECT, PINGREQ,
        PINGRESP, PUBACK, PUBLISH, SUBSCRIBE,
    };
    use super::*;
    use clap::Parser;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};

    #[test]
    fn default_window_bounds_deliveries_in_flight() {
        assert_eq!(auto_in_flight(1), 64);
        assert_eq!(auto_in_flight(200), 64);
        assert_eq!(auto_in_flight(1000), 13);
        assert_eq!(auto_in_flight(10_000), 2);
        assert_eq!(auto_in_flight(1_000_000), 2);
    }

    // --- Against a tiny in-process broker -------------------------------

    /// A broker that answers CONNECT with `code`, grants each SUBSCRIBE
    /// the QoS asked, PUBACKs QoS 1 publishes and forwards every PUBLISH
    /// as it came to every subscriber, one thread per connection. Returns
    /// its address and the PUBACKs the subscribers sent it.
    fn fake_broker(code: u8) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let subs: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let acks = Arc::new(AtomicU64::new(0));
        let acks_out = Arc::clone(&acks);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let subs = Arc::clone(&subs);
                let acks = Arc::clone(&acks);
                std::thread::spawn(move || {
                    let mut stream = FrameStream::default();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let mut replies: Vec<u8> = Vec::new();
                        let mut forward: Vec<u8> = Vec::new();
                        let mut subscribed = false;
                        let mut closing = false;
                        let r = stream.feed(&buf[..n], |f| {
                            match f.kind() {
                                CONNECT => replies.extend_from_slice(&[0x20, 2, 0, code]),
                                SUBSCRIBE => {
                                    let qos = *f.body.last().unwrap();
                                    replies
                                        .extend_from_slice(&[0x90, 3, f.body[0], f.body[1], qos]);
                                    subscribed = true;
                                }
                                PUBLISH => {
                                    if let Some(id) = publish_packet_id(&f) {
                                        put_puback(&mut replies, id);
                                    }
                                    forward.push(f.header);
                                    encode_remaining_length(f.body.len(), &mut forward)?;
                                    forward.extend_from_slice(f.body);
                                }
                                PUBACK => {
                                    acks.fetch_add(1, Ordering::SeqCst);
                                }
                                PINGREQ => replies.extend_from_slice(&[PINGRESP << 4, 0]),
                                _ => closing = true,
                            }
                            Ok(())
                        });
                        if r.is_err() || conn.write_all(&replies).is_err() || closing {
                            return;
                        }
                        if subscribed {
                            subs.lock().unwrap().push(conn.try_clone().unwrap());
                        }
                        if !forward.is_empty() {
                            for s in subs.lock().unwrap().iter_mut() {
                                let _ = s.write_all(&forward);
                            }
                        }
                    }
                });
            }
        });
        (addr, acks_out)
    }

    fn cli(args: &[&str]) -> crate::Cli {
        let mut all = vec!["mpp-loadgen", "--no-progress"];
        all.extend_from_slice(args);
        crate::Cli::try_parse_from(all).unwrap()
    }

    fn run_cli(cli: &crate::Cli) -> Result<Report> {
        match &cli.command {
            crate::Command::Mqtt(a) => run(&cli.common, a),
            _ => unreachable!(),
        }
    }

    /// A 1 s run of `devices` subscribers on 2 threads through the broker
    /// at `addr`, with `mqtt` flags `extra`.
    fn run_through(addr: SocketAddr, devices: &str, extra: &[&str]) -> Report {
        let addr = addr.to_string();
        let mut args = vec!["--devices", devices, "--threads", "2"];
        args.extend(["--duration", "1s", "--warmup", "0s"]);
        args.extend(["mqtt", "--broker", &addr, "--drain", "2s"]);
        args.extend_from_slice(extra);
        run_cli(&cli(&args)).unwrap()
    }

    #[test]
    fn fan_out_through_a_broker() {
        let r = run_through(fake_broker(0).0, "20", &["--payload-bytes", "32"]);
        assert_eq!(r.scenario, "mqtt");
        assert_eq!(r.devices, 20);
        assert_eq!(r.devices_held, 20);
        assert!(r.rate_per_s > 0.0, "{r:?}");
        assert_eq!(r.lost, 0, "{:?}", r.figures);
        assert_eq!(r.wrong, 0, "{:?}", r.figures);
        let published = r.figures["published"].as_u64().unwrap();
        assert!(published > 0);
        assert_eq!(r.figures["delivered"].as_u64().unwrap(), published * 20);
        assert_eq!(r.latency_us.as_ref().unwrap().count, published * 20);
        assert!(r.timeline.iter().any(|s| s.phase == "measure"));
    }

    /// QoS 1: every delivery is PUBACKed by its subscriber, every publish
    /// by the broker, and the report says so.
    #[test]
    fn fan_out_at_qos_1_acknowledges_every_delivery() {
        let (addr, acks) = fake_broker(0);
        let r = run_through(addr, "10", &["--qos", "1"]);
        assert_eq!(r.lost, 0, "{:?}", r.figures);
        assert_eq!(r.wrong, 0, "{:?}", r.figures);
        assert_eq!(r.figures["qos"].as_u64(), Some(1));
        let total = r.figures["published_total"].as_u64().unwrap();
        assert!(total > 0);
        assert_eq!(r.figures["publish_acks"].as_u64(), Some(total));
        let delivered = r.figures["delivered_total"].as_u64().unwrap();
        assert_eq!(delivered, total * 10);
        // The subscribers' PUBACKs went out before their goodbye; the
        // broker's threads may still be reading the last of them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while acks.load(Ordering::SeqCst) < delivered && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(acks.load(Ordering::SeqCst), delivered);
    }

    #[test]
    fn refused_connack_is_a_clear_error() {
        let addr = fake_broker(5).0.to_string();
        let c = cli(&["--devices", "3", "mqtt", "--broker", &addr]);
        let e = format!("{:#}", run_cli(&c).unwrap_err());
        assert!(e.contains("CONNACK return code 5 (not authorized)"), "{e}");
    }

    #[test]
    fn no_broker_is_a_clear_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let c = cli(&["--devices", "3", "mqtt", "--broker", &addr]);
        let e = format!("{:#}", run_cli(&c).unwrap_err());
        assert!(e.contains("cannot connect to the MQTT broker"), "{e}");
    }
}
