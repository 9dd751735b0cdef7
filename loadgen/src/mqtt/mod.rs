//! A minimal MQTT 3.1.1 client: QoS 0 fan-out through a broker, the
//! mosquitto peer of docs/BENCHMARKS.md ("fan-out of one publish to N
//! subscribers, same N, same payload size").
//!
//! `--devices` subscriber connections and one publisher connection, all on
//! non-blocking sockets driven by epoll in `--threads` workers (worker 0 also
//! drives the publisher), so 10,000 subscribers need no thread each. Every
//! payload carries its send time (ns since the run started) and a sequence
//! number whose top bit marks publishes of the measured window. With
//! `--rate 0` at most `--max-in-flight` publishes are out that not every
//! subscriber has seen yet (a subscriber that got a later one counts as
//! having seen it: QoS 0 may drop); a publish still unsettled after 10 s is
//! given up on so that a subscriber the broker stopped serving cannot stall
//! the run. `lost` counts the measured window's deliveries that had not
//! arrived by the end of `--drain`.

use std::io::{self, IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use hdrhistogram::Histogram;

use crate::report::{human, Report, Sample};
use crate::{sys, Common};

/// `mqtt`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct MqttArgs {
    /// The broker's address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub(crate) broker: SocketAddr,
    /// Topic the publisher publishes to and every subscriber subscribes to.
    #[arg(long, default_value = "mpp/loadgen")]
    pub(crate) topic: String,
    /// Payload bytes of each publish (at least 16: send time and sequence).
    #[arg(long, default_value_t = 16)]
    pub(crate) payload_bytes: usize,
    /// Publishes per second; 0 = as fast as the subscribers keep up (at most
    /// --max-in-flight publishes not yet delivered to every subscriber).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) rate: f64,
    /// With --rate 0: publishes not yet delivered to every subscriber, at
    /// most; default: enough for about 12,800 deliveries under way (64 for
    /// 200 subscribers, 2 for 10,000), which keeps a broker busy without a
    /// backlog that would outlast the measured window.
    #[arg(long)]
    pub(crate) max_in_flight: Option<usize>,
    /// Subscriber connections opened per second (0 = as fast as the broker
    /// accepts them, a few dozen handshakes at a time).
    #[arg(long, default_value_t = 0)]
    pub(crate) connect_rate: u64,
    /// Time after the measured window for its last deliveries (ends as soon
    /// as all have arrived).
    #[arg(long, default_value = "2s", value_parser = crate::parse_secs)]
    pub(crate) drain: u64,
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// Packet types (the high nibble of the fixed header).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// The largest remaining length MQTT can encode (four varint bytes).
const MAX_REMAINING_LENGTH: usize = 268_435_455;
/// The largest frame this client accepts from a broker.
const MAX_FRAME: usize = 4 << 20;
/// Keepalive announced in CONNECT; a PINGREQ goes out every half of it.
const KEEPALIVE_S: u16 = 60;
/// Packet identifier of each subscriber's one SUBSCRIBE.
const SUBSCRIBE_ID: u16 = 1;

/// What can be wrong with the bytes a broker sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A remaining length of more than four bytes.
    MalformedLength,
    /// A frame larger than this client accepts (or MQTT can encode).
    TooLarge(usize),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::MalformedLength => {
                write!(f, "malformed remaining length (more than 4 bytes)")
            }
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes is too large"),
        }
    }
}

impl std::error::Error for FrameError {}

/// One control packet: the fixed header's first byte and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    /// Packet type (high nibble) and flags (low nibble).
    pub(crate) header: u8,
    /// Variable header and payload.
    pub(crate) body: &'a [u8],
}

impl Frame<'_> {
    /// The packet type.
    pub(crate) fn kind(&self) -> u8 {
        self.header >> 4
    }
}

/// Appends the remaining-length varint of `len`.
pub(crate) fn encode_remaining_length(len: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    if len > MAX_REMAINING_LENGTH {
        return Err(FrameError::TooLarge(len));
    }
    let mut x = len;
    loop {
        let mut byte = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if x == 0 {
            return Ok(());
        }
    }
}

/// Decodes a remaining-length varint: `(value, bytes used)`, or `None` when
/// `buf` ends before it does.
pub(crate) fn decode_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(FrameError::MalformedLength)
}

/// The first whole frame of `buf` and the bytes it takes, or `None` when
/// `buf` holds only part of one.
pub(crate) fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(&header) = buf.first() else {
        return Ok(None);
    };
    let Some((len, n)) = decode_remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let total = 1 + n + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            header,
            body: &buf[1 + n..total],
        },
        total,
    )))
}

/// Splits a TCP byte stream into frames, whatever the reads' boundaries.
#[derive(Debug, Default)]
pub(crate) struct FrameStream {
    /// The start of a frame not yet complete (usually empty).
    pending: Vec<u8>,
}

impl FrameStream {
    /// Calls `on_frame` for each frame completed by `data` (the bytes of one
    /// read), in order, and keeps any trailing part for the next read.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        mut on_frame: impl FnMut(Frame<'_>) -> Result<()>,
    ) -> Result<()> {
        if self.pending.is_empty() {
            let used = split_frames(data, &mut on_frame)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            self.pending.extend_from_slice(data);
            let used = split_frames(&self.pending, &mut on_frame)?;
            self.pending.drain(..used);
            if self.pending.is_empty() && self.pending.capacity() > 64 << 10 {
                self.pending = Vec::new();
            }
        }
        Ok(())
    }

    /// Bytes held back for the next read.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Calls `on_frame` for each whole frame at the start of `buf`; returns the
/// bytes they took.
fn split_frames(buf: &[u8], on_frame: &mut impl FnMut(Frame<'_>) -> Result<()>) -> Result<usize> {
    let mut pos = 0;
    while let Some((frame, n)) = parse_frame(&buf[pos..])? {
        on_frame(frame)?;
        pos += n;
    }
    Ok(pos)
}

/// Appends a frame with `header` and `parts` as its body.
fn put_frame(out: &mut Vec<u8>, header: u8, parts: &[&[u8]]) -> Result<(), FrameError> {
    let len = parts.iter().map(|p| p.len()).sum();
    out.push(header);
    encode_remaining_length(len, out)?;
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(())
}

/// A length-prefixed MQTT string.
fn mqtt_string(s: &str) -> Result<Vec<u8>> {
    let len = u16::try_from(s.len()).map_err(|_| anyhow!("string of {} bytes", s.len()))?;
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    Ok(v)
}

/// CONNECT, MQTT 3.1.1, clean session.
pub(crate) fn connect_frame(client_id: &str, keepalive_s: u16) -> Result<Vec<u8>> {
    let mut var = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    var.extend_from_slice(&keepalive_s.to_be_bytes());
    let mut out = Vec::with_capacity(16 + client_id.len());
    put_frame(&mut out, CONNECT << 4, &[&var, &mqtt_string(client_id)?])?;
    Ok(out)
}

/// SUBSCRIBE to one topic filter at `qos`.
pub(crate) fn subscribe_frame(packet_id: u16, topic: &str, qos: u8) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(8 + topic.len());
    put_frame(
        &mut out,
        (SUBSCRIBE << 4) | 0x02,
        &[&packet_id.to_be_bytes(), &mqtt_string(topic)?, &[qos]],
    )?;
    Ok(out)
}

/// Appends a QoS 0 PUBLISH.
pub(crate) fn put_publish(out: &mut Vec<u8>, topic: &[u8], payload: &[u8]) -> Result<()> {
    let len = u16::try_from(topic.len()).map_err(|_| anyhow!("topic too long"))?;
    put_frame(out, PUBLISH << 4, &[&len.to_be_bytes(), topic, payload])?;
    Ok(())
}

/// The application payload of a PUBLISH (after topic and packet id).
pub(crate) fn publish_payload<'a>(frame: &Frame<'a>) -> Option<&'a [u8]> {
    let b = frame.body;
    let topic_len = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    let qos = (frame.header >> 1) & 3;
    let start = 2 + topic_len + if qos > 0 { 2 } else { 0 };
    b.get(start..)
}

/// What a CONNACK return code means (MQTT 3.1.1 table 3.1).
fn connack_meaning(code: u8) -> &'static str {
    match code {
        0 => "accepted",
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    }
}

/// Checks a CONNACK's return code.
fn check_connack(frame: &Frame<'_>, who: &str, broker: SocketAddr) -> Result<()> {
    match frame.body {
        [_, 0] => Ok(()),
        [_, code] => bail!(
            "broker {broker} refused {who}: CONNACK return code {code} ({})",
            connack_meaning(*code)
        ),
        _ => bail!("broker {broker} sent {who} a malformed CONNACK"),
    }
}

/// Checks a SUBACK for our one SUBSCRIBE.
fn check_suback(frame: &Frame<'_>, who: &str, topic: &str) -> Result<()> {
    match frame.body {
        [hi, lo, code, ..] if u16::from_be_bytes([*hi, *lo]) == SUBSCRIBE_ID => match code {
            0..=2 => Ok(()),
            _ => bail!("broker rejected {who}'s subscription to {topic:?} (SUBACK return code 0x{code:02x})"),
        },
        _ => bail!("broker sent {who} a malformed SUBACK"),
    }
}

/// A packet type's name, for errors.
fn kind_name(kind: u8) -> &'static str {
    const NAMES: [&str; 16] = [
        "reserved-0",
        "CONNECT",
        "CONNACK",
        "PUBLISH",
        "PUBACK",
        "PUBREC",
        "PUBREL",
        "PUBCOMP",
        "SUBSCRIBE",
        "SUBACK",
        "UNSUBSCRIBE",
        "UNSUBACK",
        "PINGREQ",
        "PINGRESP",
        "DISCONNECT",
        "reserved-15",
    ];
    NAMES[usize::from(kind & 15)]
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

/// Phases, as stored in `Shared::phase`.
const CONNECTING: u8 = 0;
const WARMUP: u8 = 1;
const MEASURE: u8 = 2;
const DRAIN: u8 = 3;
const STOP: u8 = 4;

/// Top bit of a payload's sequence number: published in the measured window.
const MEASURED: u64 = 1 << 63;
/// Handshakes (connect → SUBACK) in progress at once, over all workers; the
/// broker's listen backlog is small.
const HANDSHAKES_IN_PROGRESS: usize = 64;
/// A subscriber's handshake must be done within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A publish some live subscriber has seen neither it nor any later one of
/// after this long is given up on (settled as lost) so that the window moves
/// on: only a subscriber the broker stopped serving gets there, since a slow
/// one that receives a later publish settles the earlier ones.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries under way that the default --max-in-flight aims at.
const AUTO_DELIVERIES_IN_FLIGHT: u64 = 12_800;
/// Publishes built per write at most.
const PUBLISH_BATCH: u64 = 256;
/// epoll tokens that are not subscriber indices.
const TOKEN_PUBLISHER: u64 = u64::MAX;
const TOKEN_WAKE: u64 = u64::MAX - 1;

/// Fixed settings every worker reads.
struct Config {
    broker: SocketAddr,
    topic: String,
    payload_bytes: usize,
    rate: f64,
    max_in_flight: u64,
    subscribers: u64,
    workers: usize,
    /// Per worker; 0 = unlimited.
    connect_rate: f64,
    handshakes: usize,
    settle_timeout_ns: u64,
    cpus: Option<Vec<usize>>,
    pid: u32,
}

/// What the workers and the controller share.
struct Shared {
    start: Instant,
    phase: AtomicU8,
    /// Subscribers that got their SUBACK.
    ready: AtomicU64,
    /// Ready subscribers whose connection was lost since.
    dropped: AtomicU64,
    delivered: AtomicU64,
    delivered_measured: AtomicU64,
    published: AtomicU64,
    published_measured: AtomicU64,
    settle_timeouts: AtomicU64,
    malformed: AtomicU64,
    /// Per sequence number (mod the ring's size): subscribers that have
    /// seen it or a later one.
    ring: Box<[AtomicU32]>,
    ring_mask: u64,
    /// Set by worker 0 before it sleeps with a full window.
    publisher_waiting: AtomicBool,
    /// eventfd in worker 0's epoll: phase changes, settled publishes.
    wake: OwnedFd,
    failed: AtomicBool,
    error: Mutex<Option<anyhow::Error>>,
    first_drop: Mutex<Option<String>>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn live(&self) -> u64 {
        self.ready
            .load(Ordering::Acquire)
            .saturating_sub(self.dropped.load(Ordering::Acquire))
    }

    fn fail(&self, e: anyhow::Error) {
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        self.failed.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn take_error(&self) -> anyhow::Error {
        self.error
            .lock()
            .ok()
            .and_then(|mut e| e.take())
            .unwrap_or_else(|| anyhow!("a worker failed"))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe {
            libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8);
        }
    }
}

/// Raises the open-files limit to at least `need`.
fn raise_nofile(need: u64) -> Result<()> {
    // SAFETY: getrlimit/setrlimit read and write a plain struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Ok(());
        }
        if lim.rlim_cur >= need {
            return Ok(());
        }
        let want = libc::rlimit {
            rlim_cur: need.max(lim.rlim_cur),
            rlim_max: need.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return Ok(());
        }
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        if lim.rlim_max < need {
            bail!(
                "{need} file descriptors needed but the limit is {} (raise it with ulimit -n)",
                lim.rlim_max
            );
        }
    }
    Ok(())
}

/// A new epoll instance.
fn epoll_new() -> Result<OwnedFd> {
    // SAFETY: epoll_create1 returns a new fd or -1.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("epoll_create1");
    }
    // SAFETY: fd is ours and open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds (`op` = EPOLL_CTL_ADD) or changes a registration.
fn epoll_ctl(ep: &OwnedFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a valid epoll_event; the fds are open.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error()).context("epoll_ctl");
    }
    Ok(())
}

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
        if sys::proc_cpu_seconds(pid).is_none() {
            bail!("mqtt: --node-pid {pid}: no such process");
        }
    }
    let workers = common.threads.max(1).min(common.devices as usize);
    raise_nofile(common.devices + 64 + 4 * workers as u64)?;

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
        settle_timeouts: AtomicU64::new(0),
        malformed: AtomicU64::new(0),
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
        sys::pin(cpus[0])?;
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
    let mut progress = result?;
    if shared.failed.load(Ordering::SeqCst) {
        return Err(shared.take_error());
    }
    progress.finish();
    Ok(progress.report(config_json, &hist, args))
}

/// The default window: about `AUTO_DELIVERIES_IN_FLIGHT` deliveries, 2 to 64
/// publishes.
fn auto_in_flight(subscribers: u64) -> usize {
    AUTO_DELIVERIES_IN_FLIGHT
        .div_ceil(subscribers.max(1))
        .clamp(2, 64) as usize
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// The controller's view of the run: timeline and window figures.
struct Control<'a> {
    shared: &'a Shared,
    cfg: &'a Config,
    common: &'a Common,
    samples: Vec<Sample>,
    last_t: Instant,
    last_delivered: u64,
    tty: Option<bool>,
    connect_ms: f64,
    window_s: f64,
    window_delivered: u64,
    held: u64,
    loadgen_cpu: f64,
    node_cpu: Option<f64>,
    drain_ms: f64,
}

/// Connect, warm up, measure, drain: the controller's side.
fn control<'a>(
    common: &'a Common,
    args: &MqttArgs,
    shared: &'a Shared,
    cfg: &'a Config,
) -> Result<Control<'a>> {
    let progress = !common.no_progress;
    let mut c = Control {
        shared,
        cfg,
        common,
        samples: Vec::new(),
        last_t: shared.start,
        last_delivered: 0,
        tty: progress.then(|| io::stderr().is_terminal()),
        connect_ms: 0.0,
        window_s: 0.0,
        window_delivered: 0,
        held: 0,
        loadgen_cpu: 0.0,
        node_cpu: None,
        drain_ms: 0.0,
    };
    // Connect: until every subscriber has its SUBACK (the workers enforce
    // the per-handshake timeout).
    c.phase("connect", None, |s| {
        s.ready.load(Ordering::Acquire) >= cfg.subscribers
    })?;
    c.connect_ms = shared.start.elapsed().as_secs_f64() * 1e3;

    if common.warmup > 0 {
        shared.phase.store(WARMUP, Ordering::SeqCst);
        shared.wake();
        c.phase("warmup", Some(Duration::from_secs(common.warmup)), |_| {
            false
        })?;
    }

    let cpu0 = sys::own_cpu_seconds();
    let node0 = common.node_pid.and_then(sys::proc_cpu_seconds);
    let d0 = shared.delivered.load(Ordering::Acquire);
    let t0 = Instant::now();
    shared.phase.store(MEASURE, Ordering::SeqCst);
    shared.wake();
    c.phase(
        "measure",
        Some(Duration::from_secs(common.duration)),
        |_| false,
    )?;
    shared.phase.store(DRAIN, Ordering::SeqCst);
    let elapsed = t0.elapsed().as_secs_f64();
    c.window_delivered = shared.delivered.load(Ordering::Acquire) - d0;
    c.window_s = elapsed;
    c.held = shared.live();
    c.loadgen_cpu = (sys::own_cpu_seconds() - cpu0) / elapsed;
    c.node_cpu = match (node0, common.node_pid.and_then(sys::proc_cpu_seconds)) {
        (Some(a), Some(b)) => Some((b - a) / elapsed),
        _ => None,
    };

    let t1 = Instant::now();
    c.phase("drain", Some(Duration::from_secs(args.drain)), |s| {
        s.delivered_measured.load(Ordering::Acquire)
            >= s.published_measured.load(Ordering::Acquire) * s.live()
    })?;
    c.drain_ms = t1.elapsed().as_secs_f64() * 1e3;
    Ok(c)
}

impl Control<'_> {
    /// Runs one phase: a sample every second, until `len` has passed or
    /// `done` holds; returns a worker's error if one failed.
    fn phase(
        &mut self,
        name: &'static str,
        len: Option<Duration>,
        done: impl Fn(&Shared) -> bool,
    ) -> Result<()> {
        let begin = Instant::now();
        let end = len.map(|l| begin + l);
        let mut next = begin + Duration::from_secs(1);
        loop {
            if self.shared.failed.load(Ordering::SeqCst) {
                self.end_progress_line();
                return Err(self.shared.take_error());
            }
            if done(self.shared) {
                break;
            }
            let now = Instant::now();
            if end.is_some_and(|e| now >= e) {
                break;
            }
            if now >= next {
                self.sample(name);
                next += Duration::from_secs(1);
            }
            let mut until = next.min(now + Duration::from_millis(10));
            if let Some(e) = end {
                until = until.min(e);
            }
            std::thread::sleep(until.saturating_duration_since(now));
        }
        if self.last_t.elapsed() >= Duration::from_millis(50) || name == "measure" {
            self.sample(name);
        }
        Ok(())
    }

    fn sample(&mut self, phase: &'static str) {
        let now = Instant::now();
        let delivered = self.shared.delivered.load(Ordering::Acquire);
        let dt = now.duration_since(self.last_t).as_secs_f64();
        let rate = if dt > 0.0 {
            (delivered - self.last_delivered) as f64 / dt
        } else {
            0.0
        };
        let held = self.shared.live();
        self.samples.push(Sample {
            t_s: now.duration_since(self.shared.start).as_secs_f64(),
            phase,
            rate_per_s: rate,
            devices_held: held,
        });
        self.last_t = now;
        self.last_delivered = delivered;
        if let Some(tty) = self.tty {
            let line = format!(
                "mqtt: {phase:<7} {:>6.1} s  {} deliveries/s  {held}/{} subscribers",
                now.duration_since(self.shared.start).as_secs_f64(),
                human(rate),
                self.cfg.subscribers
            );
            if tty {
                eprint!("\r{line}\x1b[K");
            } else {
                eprintln!("{line}");
            }
        }
    }

    fn end_progress_line(&mut self) {
        if self.tty == Some(true) {
            eprintln!();
            self.tty = Some(false);
        }
    }

    fn finish(&mut self) {
        self.end_progress_line();
    }

    fn report(&self, config: serde_json::Value, hist: &Histogram<u64>, args: &MqttArgs) -> Report {
        let s = self.shared;
        let mut r = Report::new("mqtt", "notifications delivered", config);
        r.devices = self.cfg.subscribers;
        r.devices_held = self.held;
        r.duration_s = self.window_s;
        r.rate_per_s = self.window_delivered as f64 / self.window_s.max(1e-9);
        r.timeline = self.samples.clone();
        r.set_window_stats();
        r.set_latency(hist);
        let published = s.published_measured.load(Ordering::Acquire);
        let delivered = s.delivered_measured.load(Ordering::Acquire);
        r.lost = (published * self.cfg.subscribers).saturating_sub(delivered);
        r.loadgen_cpu = self.loadgen_cpu;
        r.node_cpu = self.node_cpu;
        r.figure("broker", self.cfg.broker.to_string());
        r.figure("published", published);
        r.figure("delivered", delivered);
        r.figure(
            "publishes_per_s",
            (published as f64 / self.window_s.max(1e-9)).round(),
        );
        r.figure("delivered_in_window", self.window_delivered);
        r.figure("published_total", s.published.load(Ordering::Acquire));
        r.figure("delivered_total", s.delivered.load(Ordering::Acquire));
        r.figure("connect_ms", self.connect_ms.round());
        r.figure("drain_ms", self.drain_ms.round());
        r.figure("payload_bytes", args.payload_bytes);
        r.figure(
            "publish_mode",
            if args.rate > 0.0 {
                format!("{} /s", args.rate)
            } else {
                format!("max {} in flight", self.cfg.max_in_flight)
            },
        );
        r.figure("workers", self.cfg.workers);
        r.figure("settle_timeouts", s.settle_timeouts.load(Ordering::Acquire));
        r.figure("disconnects", s.dropped.load(Ordering::Acquire));
        let malformed = s.malformed.load(Ordering::Acquire);
        if malformed > 0 {
            r.figure("foreign_messages", malformed);
        }
        if let Some(e) = s.first_drop.lock().ok().and_then(|e| e.clone()) {
            r.figure("first_disconnect", e);
        }
        if let Some(node) = self.common.node_pid {
            r.figure("node_pid", node);
        }
        r
    }
}

// ---------------------------------------------------------------------------
// Workers
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Non-blocking connect under way.
    Connecting,
    AwaitConnack,
    AwaitSuback,
    Ready,
    Closed,
}

impl State {
    fn waiting_for(self) -> &'static str {
        match self {
            State::Connecting => "TCP connection",
            State::AwaitConnack => "CONNACK",
            State::AwaitSuback => "SUBACK",
            State::Ready | State::Closed => "nothing",
        }
    }
}

struct Sub {
    /// Subscriber number over all workers.
    id: u64,
    sock: Option<TcpStream>,
    state: State,
    stream: FrameStream,
    /// Highest sequence number received.
    last_seq: u64,
    since: Instant,
}

/// What a worker hands back.
struct WorkerOut {
    hist: Histogram<u64>,
}

/// Delivery bookkeeping of one worker (kept apart from its sockets).
struct Sink {
    shared: Arc<Shared>,
    hist: Histogram<u64>,
    delivered: u64,
    delivered_measured: u64,
    malformed: u64,
    now_ns: u64,
    /// Signal worker 0 when a publish settles (other workers only).
    signal: bool,
    subscribers: u32,
}

impl Sink {
    fn deliver(&mut self, last_seq: &mut u64, payload: &[u8]) {
        let (Some(ts), Some(raw)) = (read_u64(payload, 0), read_u64(payload, 8)) else {
            self.malformed += 1;
            return;
        };
        let seq = raw & !MEASURED;
        self.delivered += 1;
        if raw & MEASURED != 0 {
            self.delivered_measured += 1;
            self.hist
                .saturating_record(self.now_ns.saturating_sub(ts) / 1000);
        }
        if seq > *last_seq {
            let s = &*self.shared;
            let from = (*last_seq + 1).max(seq.saturating_sub(s.ring_mask));
            for q in from..=seq {
                let n = s.ring[(q & s.ring_mask) as usize].fetch_add(1, Ordering::AcqRel) + 1;
                if self.signal
                    && n >= self.subscribers
                    && s.publisher_waiting.swap(false, Ordering::AcqRel)
                {
                    s.wake();
                }
            }
            *last_seq = seq;
        }
    }

    fn flush(&mut self) {
        let s = &self.shared;
        if self.delivered > 0 {
            s.delivered.fetch_add(self.delivered, Ordering::AcqRel);
            self.delivered = 0;
        }
        if self.delivered_measured > 0 {
            s.delivered_measured
                .fetch_add(self.delivered_measured, Ordering::AcqRel);
            self.delivered_measured = 0;
        }
        if self.malformed > 0 {
            s.malformed.fetch_add(self.malformed, Ordering::AcqRel);
            self.malformed = 0;
        }
    }
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

struct Worker {
    id: usize,
    shared: Arc<Shared>,
    cfg: Arc<Config>,
    ep: OwnedFd,
    subs: Vec<Sub>,
    /// Subscribers not yet started (index into `subs`).
    next_start: usize,
    in_progress: usize,
    connect_tokens: f64,
    last_refill: Instant,
    last_deadline_check: Instant,
    publisher: Option<Publisher>,
    sink: Sink,
    scratch: Vec<u8>,
    next_ping: Instant,
}

impl Worker {
    fn new(
        id: usize,
        shared: Arc<Shared>,
        cfg: Arc<Config>,
        ids: Vec<u64>,
        publisher: Option<Publisher>,
    ) -> Result<Worker> {
        let ep = epoll_new()?;
        if let Some(p) = &publisher {
            epoll_ctl(
                &ep,
                libc::EPOLL_CTL_ADD,
                p.sock.as_raw_fd(),
                (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
                TOKEN_PUBLISHER,
            )?;
            epoll_ctl(
                &ep,
                libc::EPOLL_CTL_ADD,
                shared.wake.as_raw_fd(),
                libc::EPOLLIN as u32,
                TOKEN_WAKE,
            )?;
        }
        let now = Instant::now();
        let subs = ids
            .into_iter()
            .map(|id| Sub {
                id,
                sock: None,
                state: State::Connecting,
                stream: FrameStream::default(),
                last_seq: 0,
                since: now,
            })
            .collect();
        let sink = Sink {
            shared: Arc::clone(&shared),
            hist: new_histogram(),
            delivered: 0,
            delivered_measured: 0,
            malformed: 0,
            now_ns: 0,
            signal: id != 0,
            subscribers: u32::try_from(cfg.subscribers).unwrap_or(u32::MAX),
        };
        Ok(Worker {
            id,
            shared,
            ep,
            subs,
            next_start: 0,
            in_progress: 0,
            connect_tokens: 1.0,
            last_refill: now,
            last_deadline_check: now,
            publisher,
            sink,
            scratch: vec![0; 256 << 10],
            next_ping: now + Duration::from_secs(u64::from(KEEPALIVE_S) / 2),
            cfg,
        })
    }

    /// The thread's body: a worker error is handed to the controller.
    fn run(mut self) -> Option<WorkerOut> {
        match self.event_loop() {
            Ok(()) => {
                self.say_goodbye();
                Some(WorkerOut {
                    hist: std::mem::replace(&mut self.sink.hist, new_histogram()),
                })
            }
            Err(e) => {
                self.shared.fail(e);
                None
            }
        }
    }

    fn event_loop(&mut self) -> Result<()> {
        if let Some(cpus) = &self.cfg.cpus {
            sys::pin(cpus[self.id % cpus.len()])?;
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        loop {
            let phase = self.shared.phase.load(Ordering::Acquire);
            if phase == STOP || self.shared.failed.load(Ordering::Acquire) {
                return Ok(());
            }
            self.start_connects()?;
            let mut timeout = if self.next_start < self.subs.len() || self.in_progress > 0 {
                10
            } else {
                100
            };
            if let Some(p) = &mut self.publisher {
                timeout = timeout.min(p.pump(&self.shared, &self.cfg, &self.ep)?);
            }
            // SAFETY: events is a live buffer of events.len() entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("epoll_wait");
            }
            for ev in &events[..n as usize] {
                let (flags, token) = (ev.events, ev.u64);
                match token {
                    TOKEN_WAKE => {
                        let mut buf = [0u8; 8];
                        // SAFETY: reads 8 bytes into a live buffer.
                        unsafe {
                            libc::read(self.shared.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
                        }
                    }
                    TOKEN_PUBLISHER => {
                        if let Some(p) = &mut self.publisher {
                            p.on_event(flags, &mut self.scratch, &self.ep)?;
                        }
                    }
                    idx => self.on_sub_event(idx as usize, flags)?,
                }
            }
            self.sink.flush();
            let now = Instant::now();
            if self.in_progress > 0
                && now.duration_since(self.last_deadline_check) >= Duration::from_millis(100)
            {
                self.last_deadline_check = now;
                self.check_deadlines(now)?;
            }
            if now >= self.next_ping {
                self.next_ping = now + Duration::from_secs(u64::from(KEEPALIVE_S) / 2);
                self.ping();
            }
        }
    }

    /// Opens subscriber connections, within the handshake and rate limits.
    fn start_connects(&mut self) -> Result<()> {
        if self.next_start >= self.subs.len() {
            return Ok(());
        }
        if self.cfg.connect_rate > 0.0 {
            let now = Instant::now();
            let dt = now.duration_since(self.last_refill).as_secs_f64();
            self.last_refill = now;
            self.connect_tokens = (self.connect_tokens + dt * self.cfg.connect_rate)
                .min(self.cfg.connect_rate / 10.0 + 1.0);
        }
        while self.next_start < self.subs.len() && self.in_progress < self.cfg.handshakes {
            if self.cfg.connect_rate > 0.0 {
                if self.connect_tokens < 1.0 {
                    break;
                }
                self.connect_tokens -= 1.0;
            }
            let idx = self.next_start;
            self.next_start += 1;
            self.in_progress += 1;
            self.start_connect(idx)?;
        }
        Ok(())
    }

    fn start_connect(&mut self, idx: usize) -> Result<()> {
        let broker = self.cfg.broker;
        let sub = &mut self.subs[idx];
        let who = format!("subscriber {}", sub.id);
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(broker),
            socket2::Type::STREAM,
            None,
        )
        .with_context(|| format!("{who}: creating a socket"))?;
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        let connected = match sock.connect(&broker.into()) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
            Err(e) => {
                return Err(e).with_context(|| format!("{who}: cannot connect to broker {broker}"))
            }
        };
        let stream: TcpStream = sock.into();
        epoll_ctl(
            &self.ep,
            libc::EPOLL_CTL_ADD,
            stream.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP) as u32,
            idx as u64,
        )?;
        sub.sock = Some(stream);
        sub.since = Instant::now();
        sub.state = State::Connecting;
        if connected {
            self.send_connect(idx)?;
        }
        Ok(())
    }

    /// The TCP connection is up: CONNECT, then wait for CONNACK.
    fn send_connect(&mut self, idx: usize) -> Result<()> {
        let sub = &mut self.subs[idx];
        let Some(sock) = &sub.sock else {
            return Ok(());
        };
        let frame = connect_frame(&format!("lg{}s{}", self.cfg.pid, sub.id), KEEPALIVE_S)?;
        write_small(sock, &frame)
            .with_context(|| format!("subscriber {}: sending CONNECT", sub.id))?;
        epoll_ctl(
            &self.ep,
            libc::EPOLL_CTL_MOD,
            sock.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLRDHUP) as u32,
            idx as u64,
        )?;
        sub.state = State::AwaitConnack;
        Ok(())
    }

    fn on_sub_event(&mut self, idx: usize, flags: u32) -> Result<()> {
        let Some(sub) = self.subs.get_mut(idx) else {
            return Ok(());
        };
        let Some(sock) = &sub.sock else {
            return Ok(());
        };
        if sub.state == State::Connecting {
            if let Some(e) = sock.take_error()? {
                bail!(
                    "subscriber {}: cannot connect to broker {}: {e}",
                    sub.id,
                    self.cfg.broker
                );
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                return self.send_connect(idx);
            }
            if flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                bail!(
                    "subscriber {}: cannot connect to broker {}: connection failed",
                    sub.id,
                    self.cfg.broker
                );
            }
            return Ok(());
        }
        let n = match (&*sock).read(&mut self.scratch) {
            Ok(0) => return self.lost(idx, "the broker closed the connection".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return self.lost(idx, e.to_string()),
        };
        self.sink.now_ns = self.shared.now_ns();
        let cfg = &*self.cfg;
        let sink = &mut self.sink;
        let mut stream = std::mem::take(&mut sub.stream);
        let mut became_ready = false;
        let result = stream.feed(&self.scratch[..n], |frame| {
            match (sub.state, frame.kind()) {
                (State::Ready, PUBLISH) => match publish_payload(&frame) {
                    Some(p) => sink.deliver(&mut sub.last_seq, p),
                    None => bail!("broker sent a malformed PUBLISH"),
                },
                (_, PINGRESP) => {}
                (State::AwaitConnack, CONNACK) => {
                    check_connack(&frame, &format!("subscriber {}", sub.id), cfg.broker)?;
                    let subscribe = subscribe_frame(SUBSCRIBE_ID, &cfg.topic, 0)?;
                    if let Some(sock) = &sub.sock {
                        write_small(sock, &subscribe).context("sending SUBSCRIBE")?;
                    }
                    sub.state = State::AwaitSuback;
                }
                (State::AwaitSuback, SUBACK) => {
                    check_suback(&frame, &format!("subscriber {}", sub.id), &cfg.topic)?;
                    sub.state = State::Ready;
                    became_ready = true;
                }
                (state, kind) => bail!(
                    "unexpected {} from the broker while waiting for {}",
                    kind_name(kind),
                    state.waiting_for()
                ),
            }
            Ok(())
        });
        sub.stream = stream;
        if became_ready {
            self.in_progress -= 1;
            self.shared.ready.fetch_add(1, Ordering::AcqRel);
        }
        result.with_context(|| format!("subscriber {}", self.subs[idx].id))
    }

    /// A subscriber's connection ended: fatal before its SUBACK, counted after.
    fn lost(&mut self, idx: usize, why: String) -> Result<()> {
        let sub = &mut self.subs[idx];
        let state = sub.state;
        if let Some(sock) = sub.sock.take() {
            // SAFETY: removes an fd we registered; the fd is still open.
            unsafe {
                libc::epoll_ctl(
                    self.ep.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                );
            }
        }
        sub.state = State::Closed;
        match state {
            State::Ready => {
                if self.shared.phase.load(Ordering::Acquire) < STOP {
                    self.shared.dropped.fetch_add(1, Ordering::AcqRel);
                    if let Ok(mut first) = self.shared.first_drop.lock() {
                        first.get_or_insert_with(|| format!("subscriber {}: {why}", sub.id));
                    }
                }
                Ok(())
            }
            State::Closed => Ok(()),
            waiting => bail!(
                "subscriber {}: {why} while waiting for {} (broker {})",
                sub.id,
                waiting.waiting_for(),
                self.cfg.broker
            ),
        }
    }

    fn check_deadlines(&self, now: Instant) -> Result<()> {
        for sub in &self.subs[..self.next_start] {
            if matches!(
                sub.state,
                State::Connecting | State::AwaitConnack | State::AwaitSuback
            ) && now.duration_since(sub.since) > HANDSHAKE_TIMEOUT
            {
                bail!(
                    "subscriber {}: no {} from broker {} within {} s",
                    sub.id,
                    sub.state.waiting_for(),
                    self.cfg.broker,
                    HANDSHAKE_TIMEOUT.as_secs()
                );
            }
        }
        Ok(())
    }

    fn ping(&mut self) {
        let ping = [PINGREQ << 4, 0];
        for sub in &self.subs {
            if let (State::Ready, Some(sock)) = (sub.state, &sub.sock) {
                let _ = (&*sock).write(&ping);
            }
        }
        if let Some(p) = &mut self.publisher {
            p.out.extend_from_slice(&ping);
        }
    }

    /// DISCONNECT on every connection, best effort.
    fn say_goodbye(&mut self) {
        let bye = [DISCONNECT << 4, 0];
        for sub in &mut self.subs {
            if let Some(sock) = sub.sock.take() {
                if sub.state == State::Ready {
                    let _ = (&sock).write(&bye);
                }
            }
        }
        if let Some(p) = &mut self.publisher {
            p.out.extend_from_slice(&bye);
            let _ = p.flush(&self.ep);
        }
    }
}

/// Writes a handshake frame that must go out whole (a fresh socket's buffer
/// always takes a few dozen bytes).
fn write_small(sock: &TcpStream, frame: &[u8]) -> Result<()> {
    match (&*sock).write(frame) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(n) => bail!("only {n} of {} bytes written", frame.len()),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------
// The publisher
// ---------------------------------------------------------------------------

struct Publisher {
    sock: TcpStream,
    broker: SocketAddr,
    /// Bytes not yet written.
    out: Vec<u8>,
    out_pos: usize,
    /// EPOLLOUT is registered.
    want_out: bool,
    stream: FrameStream,
    topic: Vec<u8>,
    payload: Vec<u8>,
    /// Next sequence number (from 1).
    next_seq: u64,
    /// Every sequence number up to this one has settled.
    settled: u64,
    /// Send time (ns) per ring slot.
    sent_ns: Vec<u64>,
    /// Rate mode: when publishing started, and publishes since.
    rate_start: Option<Instant>,
    rate_sent: u64,
}

impl Publisher {
    /// Connects and waits for CONNACK (blocking, with a timeout).
    fn connect(cfg: &Config, ring_len: usize) -> Result<Publisher> {
        let broker = cfg.broker;
        let sock =
            TcpStream::connect_timeout(&broker, Duration::from_secs(5)).with_context(|| {
                format!("publisher: cannot connect to the MQTT broker at {broker} (is it running?)")
            })?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let frame = connect_frame(&format!("lg{}p", cfg.pid), KEEPALIVE_S)?;
        (&sock)
            .write_all(&frame)
            .context("publisher: sending CONNECT")?;
        let mut stream = FrameStream::default();
        let mut buf = [0u8; 512];
        let mut got = false;
        while !got {
            let n = match (&sock).read(&mut buf) {
                Ok(0) => bail!("publisher: broker {broker} closed the connection before CONNACK"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("publisher: no CONNACK from broker {broker} within 5 s")
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("publisher: reading CONNACK from broker {broker}")
                    })
                }
            };
            stream.feed(&buf[..n], |f| {
                if f.kind() != CONNACK {
                    bail!(
                        "publisher: broker sent {} instead of CONNACK",
                        kind_name(f.kind())
                    );
                }
                check_connack(&f, "the publisher", broker)?;
                got = true;
                Ok(())
            })?;
        }
        sock.set_read_timeout(None)?;
        sock.set_nonblocking(true)?;
        let mut payload = vec![0u8; cfg.payload_bytes];
        for (i, b) in payload.iter_mut().enumerate().skip(16) {
            *b = i as u8;
        }
        Ok(Publisher {
            sock,
            broker,
            out: Vec::with_capacity(64 << 10),
            out_pos: 0,
            want_out: false,
            stream,
            topic: cfg.topic.as_bytes().to_vec(),
            payload,
            next_seq: 1,
            settled: 0,
            sent_ns: vec![0; ring_len],
            rate_start: None,
            rate_sent: 0,
        })
    }

    /// Publishes what the window or the rate allows; returns the epoll
    /// timeout (ms) to use until the next call.
    fn pump(&mut self, shared: &Shared, cfg: &Config, ep: &OwnedFd) -> Result<libc::c_int> {
        if !self.flush(ep)? {
            return Ok(100);
        }
        let phase = shared.phase.load(Ordering::Acquire);
        if phase != WARMUP && phase != MEASURE {
            return Ok(100);
        }
        let now_ns = shared.now_ns();
        let (count, timeout) = if cfg.rate > 0.0 {
            let start = *self.rate_start.get_or_insert_with(Instant::now);
            let elapsed = start.elapsed().as_secs_f64();
            let due = (elapsed * cfg.rate) as u64 + 1;
            let count = due.saturating_sub(self.rate_sent).min(PUBLISH_BATCH);
            self.rate_sent += count;
            let next = (self.rate_sent as f64 / cfg.rate - elapsed) * 1e3;
            (count, (next.ceil() as libc::c_int).clamp(0, 100))
        } else {
            if cfg.workers > 1 {
                // Other workers wake us when a publish settles; announce it
                // before looking so that no wake-up is missed.
                shared.publisher_waiting.store(true, Ordering::SeqCst);
            }
            self.settle(shared, cfg, now_ns);
            let in_flight = self.next_seq - 1 - self.settled;
            let room = cfg.max_in_flight.saturating_sub(in_flight);
            let count = room.min(PUBLISH_BATCH);
            (count, if room > count { 0 } else { 10 })
        };
        if count == 0 {
            return Ok(timeout);
        }
        let flag = if phase == MEASURE { MEASURED } else { 0 };
        for _ in 0..count {
            let seq = self.next_seq;
            self.next_seq += 1;
            let slot = (seq & shared.ring_mask) as usize;
            shared.ring[slot].store(0, Ordering::Release);
            self.sent_ns[slot] = now_ns;
            self.payload[0..8].copy_from_slice(&now_ns.to_le_bytes());
            self.payload[8..16].copy_from_slice(&(seq | flag).to_le_bytes());
            put_publish(&mut self.out, &self.topic, &self.payload)?;
        }
        shared.published.fetch_add(count, Ordering::AcqRel);
        if flag != 0 {
            shared.published_measured.fetch_add(count, Ordering::AcqRel);
        }
        self.flush(ep)?;
        Ok(timeout)
    }

    /// Moves `settled` past publishes every live subscriber has seen, or
    /// that waited longer than the timeout.
    fn settle(&mut self, shared: &Shared, cfg: &Config, now_ns: u64) {
        let live = u32::try_from(shared.live()).unwrap_or(u32::MAX);
        while self.settled + 1 < self.next_seq {
            let s = self.settled + 1;
            let slot = (s & shared.ring_mask) as usize;
            if shared.ring[slot].load(Ordering::Acquire) >= live {
                self.settled = s;
            } else if now_ns.saturating_sub(self.sent_ns[slot]) > cfg.settle_timeout_ns {
                self.settled = s;
                shared.settle_timeouts.fetch_add(1, Ordering::AcqRel);
            } else {
                break;
            }
        }
    }

    /// Writes what it can of `out`; true when all of it went.
    fn flush(&mut self, ep: &OwnedFd) -> Result<bool> {
        while self.out_pos < self.out.len() {
            match (&self.sock).write(&self.out[self.out_pos..]) {
                Ok(0) => bail!("publisher: the broker {} stopped reading", self.broker),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.want_out {
                        self.want_out = true;
                        self.register(ep)?;
                    }
                    return Ok(false);
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("publisher: writing to the broker {}", self.broker)
                    })
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.want_out {
            self.want_out = false;
            self.register(ep)?;
        }
        Ok(true)
    }

    fn register(&self, ep: &OwnedFd) -> Result<()> {
        let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        if self.want_out {
            events |= libc::EPOLLOUT as u32;
        }
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_MOD,
            self.sock.as_raw_fd(),
            events,
            TOKEN_PUBLISHER,
        )
    }

    fn on_event(&mut self, flags: u32, scratch: &mut [u8], ep: &OwnedFd) -> Result<()> {
        if flags & libc::EPOLLOUT as u32 != 0 {
            self.flush(ep)?;
        }
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 == 0
        {
            return Ok(());
        }
        let broker = self.broker;
        let n = match (&self.sock).read(scratch) {
            Ok(0) => bail!("publisher: the broker {broker} closed the connection"),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(())
            }
            Err(e) => {
                return Err(e).with_context(|| format!("publisher: connection to broker {broker}"))
            }
        };
        self.stream.feed(&scratch[..n], |f| match f.kind() {
            PINGRESP => Ok(()),
            k => bail!("publisher: unexpected {} from the broker", kind_name(k)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn rl(len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        encode_remaining_length(len, &mut v).unwrap();
        v
    }

    #[test]
    fn remaining_length_edges() {
        for (len, bytes) in [
            (0, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (16_384, vec![0x80, 0x80, 0x01]),
            (2_097_151, vec![0xff, 0xff, 0x7f]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
            (268_435_455, vec![0xff, 0xff, 0xff, 0x7f]),
        ] {
            assert_eq!(rl(len), bytes, "encoding {len}");
            assert_eq!(
                decode_remaining_length(&bytes).unwrap(),
                Some((len, bytes.len())),
                "decoding {len}"
            );
            // Every proper prefix is "need more", never an error.
            for cut in 0..bytes.len() {
                assert_eq!(decode_remaining_length(&bytes[..cut]).unwrap(), None);
            }
        }
        assert_eq!(
            encode_remaining_length(268_435_456, &mut Vec::new()),
            Err(FrameError::TooLarge(268_435_456))
        );
    }

    #[test]
    fn malformed_length_is_an_error() {
        let bad = [0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(parse_frame(&bad), Err(FrameError::MalformedLength));
        let mut s = FrameStream::default();
        let e = s.feed(&bad, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("malformed remaining length"), "{e}");
        // Split across reads, too.
        let mut s = FrameStream::default();
        s.feed(&bad[..3], |_| Ok(())).unwrap();
        assert!(s.feed(&bad[3..], |_| Ok(())).is_err());
        // Longer than this client takes.
        let mut big = vec![0x30];
        encode_remaining_length(MAX_FRAME + 1, &mut big).unwrap();
        assert_eq!(parse_frame(&big), Err(FrameError::TooLarge(MAX_FRAME + 1)));
    }

    fn publish(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_publish(&mut v, b"mpp/loadgen", payload).unwrap();
        v
    }

    fn collect(stream: &mut FrameStream, data: &[u8], out: &mut Vec<(u8, Vec<u8>)>) {
        stream
            .feed(data, |f| {
                out.push((f.header, f.body.to_vec()));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn publish_round_trip() {
        let payload: Vec<u8> = (0..200).map(|i| i as u8).collect();
        let frame = publish(&payload);
        // 2 + 11 topic + 200 payload = 213: a two-byte remaining length.
        assert_eq!(&frame[..3], &[0x30, 0xd5, 0x01]);
        let (f, n) = parse_frame(&frame).unwrap().unwrap();
        assert_eq!(n, frame.len());
        assert_eq!(f.kind(), PUBLISH);
        assert_eq!(publish_payload(&f), Some(&payload[..]));
        // A QoS 1 PUBLISH carries a packet identifier before the payload.
        let body = [&[0u8, 1, b't'][..], &[0, 7], b"xyz"].concat();
        let f = Frame {
            header: 0x32,
            body: &body,
        };
        assert_eq!(publish_payload(&f), Some(&b"xyz"[..]));
        let short = Frame {
            header: 0x30,
            body: &[0, 9, b'a'],
        };
        assert_eq!(publish_payload(&short), None);
    }

    #[test]
    fn publish_split_across_reads() {
        let payload: Vec<u8> = (0..300).map(|i| (i * 7) as u8).collect();
        let frame = publish(&payload);
        for cut in 0..=frame.len() {
            let mut s = FrameStream::default();
            let mut got = Vec::new();
            collect(&mut s, &frame[..cut], &mut got);
            if cut < frame.len() {
                assert!(got.is_empty(), "cut {cut}");
                assert_eq!(s.pending(), cut);
            }
            collect(&mut s, &frame[cut..], &mut got);
            assert_eq!(got.len(), 1, "cut {cut}");
            assert_eq!(s.pending(), 0);
            let f = Frame {
                header: got[0].0,
                body: &got[0].1,
            };
            assert_eq!(publish_payload(&f), Some(&payload[..]));
        }
        // One byte per read.
        let mut s = FrameStream::default();
        let mut got = Vec::new();
        for b in &frame {
            collect(&mut s, std::slice::from_ref(b), &mut got);
        }
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut data = publish(b"first-payload-16");
        data.extend_from_slice(&[PINGRESP << 4, 0]);
        data.extend(publish(b"second-payload16"));
        let third = publish(b"third-payload-16");
        data.extend_from_slice(&third[..5]);
        let mut s = FrameStream::default();
        let mut got = Vec::new();
        collect(&mut s, &data, &mut got);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (PINGRESP << 4, vec![]));
        assert_eq!(s.pending(), 5);
        collect(&mut s, &third[5..], &mut got);
        assert_eq!(got.len(), 4);
        let payloads: Vec<&[u8]> = got
            .iter()
            .filter(|(h, _)| h >> 4 == PUBLISH)
            .map(|(h, b)| {
                publish_payload(&Frame {
                    header: *h,
                    body: b,
                })
                .unwrap()
            })
            .collect();
        assert_eq!(
            payloads,
            vec![
                &b"first-payload-16"[..],
                b"second-payload16",
                b"third-payload-16"
            ]
        );
    }

    #[test]
    fn handshake_frames() {
        let c = connect_frame("lg1s2", 60).unwrap();
        assert_eq!(
            c,
            [
                &[0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 5][..],
                b"lg1s2"
            ]
            .concat()
        );
        let s = subscribe_frame(1, "a/b", 0).unwrap();
        assert_eq!(s, [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'b', 0]);
        let broker: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ok = Frame {
            header: 0x20,
            body: &[0, 0],
        };
        assert!(check_connack(&ok, "x", broker).is_ok());
        let refused = Frame {
            header: 0x20,
            body: &[0, 5],
        };
        let e = check_connack(&refused, "x", broker).unwrap_err();
        assert!(e.to_string().contains("not authorized"), "{e}");
        let granted = Frame {
            header: 0x90,
            body: &[0, 1, 0],
        };
        assert!(check_suback(&granted, "x", "t").is_ok());
        let failed = Frame {
            header: 0x90,
            body: &[0, 1, 0x80],
        };
        assert!(check_suback(&failed, "x", "t").is_err());
    }

    #[test]
    fn default_window_bounds_deliveries_in_flight() {
        assert_eq!(auto_in_flight(1), 64);
        assert_eq!(auto_in_flight(200), 64);
        assert_eq!(auto_in_flight(1000), 13);
        assert_eq!(auto_in_flight(10_000), 2);
        assert_eq!(auto_in_flight(1_000_000), 2);
    }

    // --- Against a tiny in-process broker -------------------------------

    /// A broker that answers CONNECT with `code` and forwards every PUBLISH
    /// to every subscriber, one thread per connection.
    fn fake_broker(code: u8) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let subs: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let subs = Arc::clone(&subs);
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
                                    replies.extend_from_slice(&[0x90, 3, f.body[0], f.body[1], 0]);
                                    subscribed = true;
                                }
                                PUBLISH => {
                                    forward.push(f.header);
                                    encode_remaining_length(f.body.len(), &mut forward)?;
                                    forward.extend_from_slice(f.body);
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
        addr
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

    #[test]
    fn fan_out_through_a_broker() {
        let addr = fake_broker(0).to_string();
        let c = cli(&[
            "--devices",
            "20",
            "--threads",
            "2",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "mqtt",
            "--broker",
            &addr,
            "--payload-bytes",
            "32",
            "--drain",
            "2s",
        ]);
        let r = run_cli(&c).unwrap();
        assert_eq!(r.scenario, "mqtt");
        assert_eq!(r.devices, 20);
        assert_eq!(r.devices_held, 20);
        assert!(r.rate_per_s > 0.0, "{r:?}");
        assert_eq!(r.lost, 0, "{:?}", r.figures);
        let published = r.figures["published"].as_u64().unwrap();
        assert!(published > 0);
        assert_eq!(r.figures["delivered"].as_u64().unwrap(), published * 20);
        assert_eq!(r.latency_us.as_ref().unwrap().count, published * 20);
        assert!(r.timeline.iter().any(|s| s.phase == "measure"));
    }

    #[test]
    fn refused_connack_is_a_clear_error() {
        let addr = fake_broker(5).to_string();
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
