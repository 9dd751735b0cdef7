//! The device workers: each thread owns a share of the simulated devices and
//! of the UDP sockets, and drives them with batched I/O.
//!
//! A device is a compact record (its two packet keys, Serial, the request in
//! flight, the last notify Serial, a state byte), not a `proto::Client`: ten
//! million `Client`s would not fit. The requests are built by the library's
//! `proto::seal_request` and the node's answers read with `packet` and
//! `codec`, so the wire format has one implementation. The timers are the
//! client's (docs/PROTOCOL.md §6): a request unanswered for `--timeout-ms` is
//! resent up to `--tries` times; a device whose heartbeats all go unanswered
//! connects again.
//!
//! Scheduling is by rate, not per-device timers: a connect queue drained at
//! `--connect-rate`, and a heartbeat sweep that visits every device once per
//! heartbeat period (hold, fanout, churn) or keeps `--window` heartbeats in
//! flight round-robin (heartbeat, echo).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use mpp::codec::{Message, PresenceNotify, ServiceHeader};
use mpp::packet::{open_in_place, seal_in_place, ConnId, HEADER_LEN, MAX_PACKET, MAX_PLAINTEXT};
use mpp::proto::{seal_request, Request};
use socket2::Socket;

use crate::ident::{account_name, device_name, Identity, Keys};
use crate::io::{send_all, wait_readable};
use mpp::net::mmsg::MmsgBatch;

/// How long a worker keeps polling its sockets after its last datagram
/// before it sleeps in poll(2).
const SPIN_US: u64 = 200;

/// Publish timestamps kept per account (fanout latency).
pub(crate) const RING: usize = 64;

/// What the workers do once connected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Mode {
    /// Heartbeat each device once per `heartbeat_ms` (hold, fanout).
    Sweep {
        /// Heartbeat period.
        heartbeat_ms: u64,
    },
    /// Keep `window` heartbeats in flight, round-robin (heartbeat).
    Window,
    /// Sweep, plus disconnect/reconnect and rebinding at the given rates (churn).
    Churn {
        /// Heartbeat period.
        heartbeat_ms: u64,
        /// Disconnects per second (each followed by a reconnect).
        rate: u64,
        /// Rebindings per second.
        rebind_rate: u64,
    },
    /// Heartbeats against a reflector: the echo is our own packet (echo baseline).
    Echo,
    /// Count raw notify datagrams and acknowledge them (raw fan-out baseline).
    RawReceive,
}

/// Counters shared with the monitor; workers add to them once per loop.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) connects_sent: AtomicU64,
    pub(crate) connected: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) connect_failed: AtomicU64,
    pub(crate) heartbeats_sent: AtomicU64,
    pub(crate) replies: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) primed: AtomicU64,
    pub(crate) acks_sent: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) rebinds: AtomicU64,
    pub(crate) rebinds_confirmed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) refused_full: AtomicU64,
    pub(crate) invalid_serial: AtomicU64,
    pub(crate) unauthentic: AtomicU64,
    pub(crate) unknown: AtomicU64,
    pub(crate) other: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) recv_errors: AtomicU64,
    pub(crate) loss_dropped: AtomicU64,
    pub(crate) notifications: AtomicU64,
}

/// A plain copy of [`Counters`].
#[derive(Default, Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Snapshot {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) connects_sent: u64,
    pub(crate) connected: u64,
    pub(crate) dropped: u64,
    pub(crate) connect_failed: u64,
    pub(crate) heartbeats_sent: u64,
    pub(crate) replies: u64,
    pub(crate) timeouts: u64,
    pub(crate) lost: u64,
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) primed: u64,
    pub(crate) acks_sent: u64,
    pub(crate) disconnects: u64,
    pub(crate) rebinds: u64,
    pub(crate) rebinds_confirmed: u64,
    pub(crate) refused: u64,
    pub(crate) refused_full: u64,
    pub(crate) invalid_serial: u64,
    pub(crate) unauthentic: u64,
    pub(crate) unknown: u64,
    pub(crate) other: u64,
    pub(crate) send_errors: u64,
    pub(crate) recv_errors: u64,
    pub(crate) loss_dropped: u64,
    pub(crate) notifications: u64,
}

macro_rules! each_counter {
    ($m:ident) => {
        $m!(
            sent,
            received,
            connects_sent,
            connected,
            dropped,
            connect_failed,
            heartbeats_sent,
            replies,
            timeouts,
            lost,
            delivered,
            duplicates,
            primed,
            acks_sent,
            disconnects,
            rebinds,
            rebinds_confirmed,
            refused,
            refused_full,
            invalid_serial,
            unauthentic,
            unknown,
            other,
            send_errors,
            recv_errors,
            loss_dropped,
            notifications
        )
    };
}

impl Counters {
    /// The current values.
    pub(crate) fn snapshot(&self) -> Snapshot {
        macro_rules! load {
            ($($f:ident),*) => { Snapshot { $($f: self.$f.load(Relaxed)),* } };
        }
        each_counter!(load)
    }

    /// Adds a worker's local counts and clears them.
    fn add(&self, local: &mut Snapshot) {
        macro_rules! add {
            ($($f:ident),*) => { $(if local.$f != 0 { self.$f.fetch_add(local.$f, Relaxed); })* };
        }
        each_counter!(add);
        *local = Snapshot::default();
    }
}

impl Snapshot {
    /// Counts since `earlier`.
    pub(crate) fn since(&self, earlier: &Snapshot) -> Snapshot {
        macro_rules! sub {
            ($($f:ident),*) => { Snapshot { $($f: self.$f.saturating_sub(earlier.$f)),* } };
        }
        each_counter!(sub)
    }

    /// Devices connected now.
    pub(crate) fn held(&self) -> u64 {
        self.connected.saturating_sub(self.dropped)
    }
}

/// One account's publish clock (fanout): the notify Serial its first
/// notify had, and the time each later Serial was published.
pub(crate) struct AccountClock {
    /// Serial of the priming notify (0 until a device saw it).
    pub(crate) base: AtomicU32,
    /// Publish time (µs since the epoch) of Serial `s`, at `s % RING`.
    pub(crate) ring: [AtomicU64; RING],
    /// Deliveries counted by the devices (one per publish per device).
    pub(crate) delivered: AtomicU64,
}

impl AccountClock {
    fn new() -> Self {
        AccountClock {
            base: AtomicU32::new(0),
            ring: std::array::from_fn(|_| AtomicU64::new(0)),
            delivered: AtomicU64::new(0),
        }
    }
}

/// State shared by the workers and the monitor.
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    /// Workers return when set.
    pub(crate) stop: AtomicBool,
    /// Latencies are recorded while set.
    pub(crate) measuring: AtomicBool,
    /// Workers whose initial connects are all answered or given up.
    pub(crate) connect_done: AtomicU64,
    /// Time zero of the run.
    pub(crate) epoch: Instant,
    /// The Unix time (seconds) at `epoch`.
    pub(crate) epoch_unix_s: u64,
    /// Per-account publish clocks (fanout only; empty otherwise).
    pub(crate) accounts: Vec<AccountClock>,
    /// The first refusal's Status and description, for the report.
    pub(crate) first_refusal: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// Shared state; `clocks` accounts get publish clocks.
    pub(crate) fn new(clocks: u64) -> Arc<Shared> {
        Arc::new(Shared {
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            measuring: AtomicBool::new(false),
            connect_done: AtomicU64::new(0),
            epoch: Instant::now(),
            epoch_unix_s: mpp::time::UnixMillis::from_system_clock()
                .seconds()
                .0
                .max(0) as u64,
            accounts: (0..clocks).map(|_| AccountClock::new()).collect(),
            first_refusal: std::sync::Mutex::new(None),
        })
    }

    /// Microseconds since the epoch.
    pub(crate) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// One worker's share of the run.
pub(crate) struct WorkerConfig {
    pub(crate) index: usize,
    pub(crate) threads: usize,
    /// Devices in the whole run.
    pub(crate) devices: u64,
    pub(crate) sockets: Vec<Socket>,
    pub(crate) batch: usize,
    pub(crate) cpu: Option<usize>,
    pub(crate) mode: Mode,
    /// Requests in flight at most.
    pub(crate) window: usize,
    /// This worker's connects per second.
    pub(crate) connect_rate: f64,
    pub(crate) timeout_ms: u64,
    pub(crate) tries: u8,
    /// Fraction of datagrams dropped in each direction (simulated path loss).
    pub(crate) loss: f64,
}

/// What a worker hands back.
pub(crate) struct WorkerResult {
    /// Round trips (µs) recorded while measuring.
    pub(crate) rtt: Histogram<u64>,
    /// Publish → device latencies (µs) recorded while measuring.
    pub(crate) notify: Histogram<u64>,
}

/// A latency histogram from 1 µs to 100 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static bounds are valid")
}

const IDLE: u8 = 0;
const CONNECTING: u8 = 1;
const CONNECTED: u8 = 2;
const DISCONNECTING: u8 = 3;
/// Refused for good, or out of connect tries.
const DEAD: u8 = 4;

const KIND_CONNECT: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_DISCONNECT: u8 = 3;

/// One simulated device.
struct Device {
    keys: Keys,
    /// Last Serial sent.
    serial: u32,
    /// Serial of the request in flight, 0 if none.
    outstanding: u32,
    /// When the request in flight was sent (µs since the epoch, truncated).
    sent_us: u32,
    /// Highest notify Serial seen, 0 before the first.
    last_notify: u32,
    state: u8,
    /// Sends of the request in flight (or connect attempts).
    tries: u8,
    /// The device's socket (changes on rebinding).
    sock: u16,
    /// Set while a heartbeat from a new socket waits for its answer.
    rebinding: bool,
}

#[derive(Clone, Copy)]
struct Pending {
    device: u32,
    serial: u32,
    at_ms: u32,
    kind: u8,
}

/// Runs one worker until `shared.stop`.
pub(crate) fn run_worker(
    cfg: WorkerConfig,
    ident: Arc<Identity>,
    shared: Arc<Shared>,
) -> anyhow::Result<WorkerResult> {
    if let Some(cpu) = cfg.cpu {
        crate::sys::pin(cpu)?;
    }
    let mut w = Worker::new(cfg, ident, shared)?;
    w.run();
    Ok(WorkerResult {
        rtt: w.rtt,
        notify: w.notify,
    })
}

struct Worker {
    cfg: WorkerConfig,
    ident: Arc<Identity>,
    shared: Arc<Shared>,
    devices: Vec<Device>,
    fds: Vec<i32>,
    out: Vec<MmsgBatch>,
    inb: MmsgBatch,
    pending: VecDeque<Pending>,
    to_connect: VecDeque<u32>,
    inflight: usize,
    cursor: usize,
    swept: u64,
    sweep_start_ms: u64,
    connect_start_ms: u64,
    connects_issued: u64,
    churned: u64,
    churn_cursor: usize,
    rebound: u64,
    rebind_cursor: usize,
    mode_start_ms: u64,
    nonce: u64,
    nonce_salt: [u8; 4],
    local: Snapshot,
    rtt: Histogram<u64>,
    notify: Histogram<u64>,
    connect_reported: bool,
    /// Devices in state CONNECTING.
    connecting: usize,
    /// Drop threshold out of 2³² (simulated loss), and its generator.
    loss: u64,
    rng: u64,
}

impl Worker {
    fn new(cfg: WorkerConfig, ident: Arc<Identity>, shared: Arc<Shared>) -> anyhow::Result<Self> {
        let t = cfg.index as u64;
        let threads = cfg.threads as u64;
        let n = if cfg.devices > t {
            (cfg.devices - t).div_ceil(threads)
        } else {
            0
        };
        let socks = cfg.sockets.len().max(1);
        let first_serial = (mpp::time::UnixMillis::from_system_clock().seconds().0 as u32).max(1);
        let mut devices = Vec::with_capacity(n as usize);
        let mut to_connect = VecDeque::with_capacity(n as usize);
        let needs_connect = !matches!(cfg.mode, Mode::Echo | Mode::RawReceive);
        let mut unusable = 0u64;
        for l in 0..n {
            let g = t + l * threads;
            let Some(keys) = ident.keys(g) else {
                // An id that would look like STUN (one account in 2³²).
                unusable += 1;
                continue;
            };
            devices.push(Device {
                keys,
                serial: first_serial,
                outstanding: 0,
                sent_us: 0,
                last_notify: 0,
                state: if needs_connect { IDLE } else { CONNECTED },
                tries: 0,
                sock: (l % socks as u64) as u16,
                rebinding: false,
            });
            if needs_connect {
                to_connect.push_back(l as u32);
            }
        }
        if unusable > 0 {
            anyhow::bail!(
                "{unusable} device ids collide with the STUN classifier; use other --accounts"
            );
        }
        let fds = cfg.sockets.iter().map(|s| s.as_raw_fd()).collect();
        let mut nonce_salt = [0u8; 4];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce_salt);
        let now_ms = shared.now_us() / 1000;
        let cfg_loss = cfg.loss.clamp(0.0, 1.0);
        Ok(Worker {
            out: (0..cfg.sockets.len())
                .map(|_| MmsgBatch::new(cfg.batch))
                .collect(),
            inb: MmsgBatch::new(cfg.batch),
            cfg,
            ident,
            shared,
            devices,
            fds,
            pending: VecDeque::new(),
            to_connect,
            inflight: 0,
            cursor: 0,
            swept: 0,
            sweep_start_ms: now_ms,
            connect_start_ms: now_ms,
            connects_issued: 0,
            churned: 0,
            churn_cursor: 0,
            rebound: 0,
            rebind_cursor: 0,
            mode_start_ms: now_ms,
            nonce: 0,
            nonce_salt,
            local: Snapshot::default(),
            rtt: histogram(),
            notify: histogram(),
            loss: (cfg_loss * 4_294_967_296.0) as u64,
            rng: u64::from(rand::random::<u32>()) | 1,
            connect_reported: false,
            connecting: 0,
        })
    }

    fn global(&self, l: usize) -> u64 {
        self.cfg.index as u64 + l as u64 * self.cfg.threads as u64
    }

    fn run(&mut self) {
        if matches!(self.cfg.mode, Mode::Echo | Mode::RawReceive) {
            self.report_connect_done();
        }
        let mut last_work_us = 0;
        while !self.shared.stop.load(Relaxed) {
            let now_us = self.shared.now_us();
            let got = self.receive(now_us);
            self.expire(now_us);
            let sent = self.generate(now_us);
            self.flush_all(now_us);
            self.shared.counters.add(&mut self.local);
            if !self.connect_reported
                && self.to_connect.is_empty()
                && self.connects_in_flight() == 0
            {
                self.report_connect_done();
            }
            if got > 0 || sent > 0 {
                last_work_us = now_us;
            } else if now_us - last_work_us > SPIN_US {
                // Sleep only after a spell without work: waking a sleeping
                // thread costs far more than a short spin (most of all in a VM).
                wait_readable(&self.fds, 1);
            }
        }
        self.shared.counters.add(&mut self.local);
    }

    fn report_connect_done(&mut self) {
        self.connect_reported = true;
        self.shared.connect_done.fetch_add(1, Relaxed);
        let now_ms = self.shared.now_us() / 1000;
        self.sweep_start_ms = now_ms;
        self.mode_start_ms = now_ms;
        self.swept = 0;
    }

    fn connects_in_flight(&self) -> usize {
        self.connecting
    }

    /// Changes device `l`'s state, keeping the CONNECTING count.
    fn set_state(&mut self, l: usize, state: u8) {
        let dev = &mut self.devices[l];
        if dev.state == CONNECTING && state != CONNECTING {
            self.connecting -= 1;
        } else if dev.state != CONNECTING && state == CONNECTING {
            self.connecting += 1;
        }
        dev.state = state;
    }

    /// Whether simulated path loss takes this datagram.
    fn lose(&mut self) -> bool {
        if self.loss == 0 {
            return false;
        }
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32;
        if x < self.loss {
            self.local.loss_dropped += 1;
            true
        } else {
            false
        }
    }

    fn next_nonce(&mut self) -> [u8; 12] {
        self.nonce += 1;
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.nonce_salt);
        n[4..].copy_from_slice(&self.nonce.to_be_bytes());
        n
    }

    /// Seals request `kind` of device `l` into its socket's batch and marks
    /// it in flight.
    fn send_request(&mut self, l: usize, kind: u8, now_us: u64) {
        let g = self.global(l);
        let Some(conn_id) = self.ident.conn_id(g) else {
            return;
        };
        let nonce = self.next_nonce();
        let s = self.devices[l].sock as usize;
        if self.out[s].is_full() {
            self.flush(s, now_us);
        }
        let unix_now = (self.shared.epoch_unix_s + now_us / 1_000_000) as u32;
        let dev = &mut self.devices[l];
        if kind == KIND_CONNECT {
            // docs/PROTOCOL.md §6: a connect's Serial is at least the Unix time,
            // or the node takes it for a replay of an old one.
            dev.serial = dev.serial.max(unix_now);
        }
        dev.serial = dev.serial.wrapping_add(1).max(1);
        let serial = dev.serial;
        let (account, device, binding);
        let request = match kind {
            KIND_CONNECT => {
                account = account_name(self.ident.account_of(g));
                device = device_name(g);
                binding = self.ident.binding(g).unwrap_or([0; 32]);
                Request::Connect {
                    account: &account,
                    device: &device,
                    expires: self.ident.expires,
                    binding: &binding,
                }
            }
            KIND_DISCONNECT => Request::Disconnect,
            _ => Request::Heartbeat,
        };
        let Some(slot) = self.out[s].send_slot() else {
            return;
        };
        let buf = &mut slot[..MAX_PACKET];
        let Ok(size) = seal_request(
            &dev.keys.c2s,
            conn_id,
            nonce,
            i64::from(serial),
            &request,
            buf,
        ) else {
            self.local.other += 1;
            return;
        };
        dev.outstanding = serial;
        dev.sent_us = now_us as u32;
        self.inflight += 1;
        self.pending.push_back(Pending {
            device: l as u32,
            serial,
            at_ms: (now_us / 1000) as u32,
            kind,
        });
        if !self.lose() {
            self.out[s].commit(size);
        }
        match kind {
            KIND_CONNECT => self.local.connects_sent += 1,
            KIND_HEARTBEAT => self.local.heartbeats_sent += 1,
            _ => {}
        }
    }

    /// Acknowledges notify `serial` for device `l` (no answer expected).
    fn send_ack(&mut self, l: usize, serial: i64, now_us: u64) {
        let Some(conn_id) = self.ident.conn_id(self.global(l)) else {
            return;
        };
        let nonce = self.next_nonce();
        let s = self.devices[l].sock as usize;
        if self.out[s].is_full() {
            self.flush(s, now_us);
        }
        let dev = &mut self.devices[l];
        dev.serial = dev.serial.wrapping_add(1).max(1);
        let Some(slot) = self.out[s].send_slot() else {
            return;
        };
        let buf = &mut slot[..MAX_PACKET];
        if let Ok(size) = seal_request(
            &dev.keys.c2s,
            conn_id,
            nonce,
            i64::from(dev.serial),
            &Request::Acknowledge(serial),
            buf,
        ) {
            self.local.acks_sent += 1;
            if !self.lose() {
                self.out[s].commit(size);
            }
        }
    }

    fn flush(&mut self, s: usize, _now_us: u64) {
        let queued = self.out[s].queued();
        if queued == 0 {
            return;
        }
        // An error sends nothing: counted below with the rest.
        let sent = send_all(&mut self.out[s], self.fds[s]);
        self.local.sent += sent as u64;
        if sent < queued {
            // The kernel refused the rest (buffer full): those requests
            // count as sent-and-lost; their timeouts will resend them.
            self.local.send_errors += (queued - sent) as u64;
        }
    }

    fn flush_all(&mut self, now_us: u64) {
        for s in 0..self.out.len() {
            self.flush(s, now_us);
        }
    }

    /// Requests unanswered for the timeout: resend, give up, or reconnect.
    fn expire(&mut self, now_us: u64) {
        let now_ms = (now_us / 1000) as u32;
        let timeout = self.cfg.timeout_ms as u32;
        while let Some(&p) = self.pending.front() {
            let dev = &self.devices[p.device as usize];
            if dev.outstanding != p.serial {
                self.pending.pop_front();
                continue;
            }
            if now_ms.wrapping_sub(p.at_ms) < timeout {
                break;
            }
            self.pending.pop_front();
            let l = p.device as usize;
            self.free(l);
            self.local.timeouts += 1;
            let tries = self.cfg.tries.max(1);
            match p.kind {
                KIND_CONNECT => {
                    if self.devices[l].tries < tries {
                        self.to_connect.push_front(p.device);
                    } else {
                        self.set_state(l, DEAD);
                        self.local.connect_failed += 1;
                    }
                }
                KIND_HEARTBEAT if self.cfg.mode == Mode::Window => {
                    // The maximum-rate scenario does not resend: a heartbeat
                    // unanswered in time is lost and the device is free again.
                    self.local.lost += 1;
                }
                KIND_HEARTBEAT => {
                    self.devices[l].tries += 1;
                    if self.devices[l].tries < tries {
                        self.send_request(l, KIND_HEARTBEAT, now_us);
                    } else {
                        // docs/PROTOCOL.md §6: heartbeats unanswered: connect again.
                        self.local.lost += 1;
                        self.set_state(l, IDLE);
                        self.devices[l].tries = 0;
                        self.local.dropped += 1;
                        self.to_connect.push_back(p.device);
                    }
                }
                _ => {
                    self.set_state(l, IDLE);
                    self.devices[l].tries = 0;
                    self.local.dropped += 1;
                    self.to_connect.push_back(p.device);
                }
            }
        }
    }

    fn free(&mut self, l: usize) {
        let dev = &mut self.devices[l];
        if dev.outstanding != 0 {
            dev.outstanding = 0;
            self.inflight -= 1;
        }
    }

    /// Connects, heartbeats, churn: whatever is due. Returns requests queued.
    fn generate(&mut self, now_us: u64) -> usize {
        let now_ms = now_us / 1000;
        let mut queued = 0;
        // Connect queue, paced.
        let allowed =
            (self.cfg.connect_rate * (now_ms - self.connect_start_ms) as f64 / 1000.0) as u64 + 64;
        while self.connects_issued < allowed && self.inflight < self.cfg.window {
            let Some(l) = self.to_connect.pop_front() else {
                break;
            };
            let l = l as usize;
            let dev = &self.devices[l];
            if dev.state == CONNECTED || dev.state == DEAD || dev.outstanding != 0 {
                continue;
            }
            if dev.state != CONNECTING {
                self.devices[l].tries = 0;
            }
            self.set_state(l, CONNECTING);
            self.devices[l].tries += 1;
            self.connects_issued += 1;
            self.send_request(l, KIND_CONNECT, now_us);
            queued += 1;
        }
        if self.connects_issued >= allowed && self.to_connect.is_empty() {
            // Keep the bucket from banking a burst while idle.
            self.connect_start_ms = now_ms;
            self.connects_issued = 0;
        }
        let n = self.devices.len();
        if n == 0 {
            return queued;
        }
        match self.cfg.mode {
            Mode::Window | Mode::Echo => {
                let mut scanned = 0;
                while self.inflight < self.cfg.window && scanned < n {
                    let l = self.cursor;
                    self.cursor = if l + 1 == n { 0 } else { l + 1 };
                    scanned += 1;
                    let dev = &self.devices[l];
                    if dev.state != CONNECTED || dev.outstanding != 0 {
                        continue;
                    }
                    scanned = 0;
                    self.devices[l].tries = 1;
                    self.send_request(l, KIND_HEARTBEAT, now_us);
                    queued += 1;
                }
            }
            Mode::Sweep { heartbeat_ms } => queued += self.sweep(now_ms, heartbeat_ms, now_us),
            Mode::Churn {
                heartbeat_ms,
                rate,
                rebind_rate,
            } => {
                queued += self.sweep(now_ms, heartbeat_ms, now_us);
                if self.connect_reported {
                    queued += self.churn(now_ms, rate, now_us);
                    queued += self.rebind(now_ms, rebind_rate, now_us);
                }
            }
            Mode::RawReceive => {}
        }
        queued
    }

    /// Visits devices so each gets one heartbeat per period.
    fn sweep(&mut self, now_ms: u64, heartbeat_ms: u64, now_us: u64) -> usize {
        let n = self.devices.len() as u64;
        let due = (now_ms - self.sweep_start_ms) * n / heartbeat_ms.max(1);
        let mut queued = 0;
        while self.swept < due && self.inflight < self.cfg.window && queued < 4096 {
            let l = (self.swept % n) as usize;
            self.swept += 1;
            let dev = &self.devices[l];
            if dev.state == CONNECTED && dev.outstanding == 0 {
                self.devices[l].tries = 0;
                self.send_request(l, KIND_HEARTBEAT, now_us);
                queued += 1;
            }
        }
        queued
    }

    /// Disconnects `rate` devices per second; each reconnects when answered.
    fn churn(&mut self, now_ms: u64, rate: u64, now_us: u64) -> usize {
        let per_worker = rate as f64 / self.cfg.threads as f64;
        let due = ((now_ms - self.mode_start_ms) as f64 * per_worker / 1000.0) as u64;
        let n = self.devices.len();
        let mut queued = 0;
        let mut scanned = 0;
        while self.churned < due && self.inflight < self.cfg.window && scanned < n {
            let l = self.churn_cursor;
            self.churn_cursor = (l + 1) % n;
            scanned += 1;
            let dev = &mut self.devices[l];
            if dev.state != CONNECTED || dev.outstanding != 0 {
                continue;
            }
            dev.state = DISCONNECTING;
            self.churned += 1;
            self.send_request(l, KIND_DISCONNECT, now_us);
            queued += 1;
        }
        queued
    }

    /// Moves `rate` devices per second to another socket (a new source port,
    /// as after a NAT rebinding) and heartbeats from there.
    fn rebind(&mut self, now_ms: u64, rate: u64, now_us: u64) -> usize {
        let socks = self.fds.len();
        if socks < 2 {
            return 0;
        }
        let per_worker = rate as f64 / self.cfg.threads as f64;
        let due = ((now_ms - self.mode_start_ms) as f64 * per_worker / 1000.0) as u64;
        let n = self.devices.len();
        let mut queued = 0;
        let mut scanned = 0;
        while self.rebound < due && self.inflight < self.cfg.window && scanned < n {
            let l = self.rebind_cursor;
            self.rebind_cursor = (l + 7919) % n;
            scanned += 1;
            let dev = &mut self.devices[l];
            if dev.state != CONNECTED || dev.outstanding != 0 {
                continue;
            }
            dev.sock = ((dev.sock as usize + 1) % socks) as u16;
            dev.rebinding = true;
            dev.tries = 0;
            self.rebound += 1;
            self.local.rebinds += 1;
            self.send_request(l, KIND_HEARTBEAT, now_us);
            queued += 1;
        }
        queued
    }

    /// Receives and handles what is waiting on every socket.
    fn receive(&mut self, now_us: u64) -> usize {
        let mut total = 0;
        // The batch is taken out while its packets are handled in place.
        let mut inb = std::mem::replace(&mut self.inb, MmsgBatch::new(0));
        for s in 0..self.fds.len() {
            for _ in 0..8 {
                let n = match inb.recv(self.fds[s]) {
                    Ok(n) => n,
                    Err(_) => {
                        self.local.recv_errors += 1;
                        0
                    }
                };
                for i in 0..n {
                    match inb.payload_mut(i) {
                        Some(packet) => self.handle(s, packet, now_us),
                        // Longer than any packet of the protocol.
                        None => self.local.other += 1,
                    }
                }
                total += n;
                if n < inb.capacity() {
                    break;
                }
            }
        }
        self.inb = inb;
        total
    }

    fn handle(&mut self, s: usize, packet: &mut [u8], now_us: u64) {
        self.local.received += 1;
        if self.lose() {
            return;
        }
        let Some(g) = self.ident.index_of(packet, self.cfg.devices) else {
            self.local.unknown += 1;
            return;
        };
        let threads = self.cfg.threads as u64;
        if g % threads != self.cfg.index as u64 {
            self.local.unknown += 1;
            return;
        }
        let l = (g / threads) as usize;
        let Some(dev) = self.devices.get_mut(l) else {
            self.local.unknown += 1;
            return;
        };
        let key = if self.cfg.mode == Mode::Echo {
            &dev.keys.c2s
        } else {
            &dev.keys.s2c
        };
        let Ok(plain) = open_in_place(key, packet) else {
            self.local.unauthentic += 1;
            return;
        };
        let Ok(message) = Message::decode(plain) else {
            self.local.other += 1;
            return;
        };
        match message {
            Message::Heartbeat(h) if self.cfg.mode == Mode::Echo => {
                if dev.outstanding != 0 && h.header.serial == Some(i64::from(dev.outstanding)) {
                    self.answered(l, now_us);
                    self.local.replies += 1;
                }
            }
            Message::Notify(n) if self.cfg.mode == Mode::RawReceive => {
                self.local.delivered += 1;
                if let Some(serial) = n.serial {
                    self.send_ack(l, serial, now_us);
                }
            }
            Message::ConnectResponse(r) => {
                let ours = self.is_answer(l, &r.header);
                if ours && self.devices[l].state == CONNECTING {
                    self.answered(l, now_us);
                    self.set_state(l, CONNECTED);
                    self.devices[l].tries = 0;
                    self.local.connected += 1;
                }
                self.pending_notify(l, r.serial, r.bitmask.as_deref(), now_us);
            }
            Message::Status(r) => {
                if self.is_answer(l, &r.header) {
                    let was_rebinding = self.devices[l].rebinding;
                    self.answered(l, now_us);
                    self.local.replies += 1;
                    let dev = &mut self.devices[l];
                    dev.tries = 0;
                    if was_rebinding {
                        dev.rebinding = false;
                        if dev.sock as usize == s {
                            self.local.rebinds_confirmed += 1;
                        }
                    }
                }
                self.pending_notify(l, r.serial, r.bitmask.as_deref(), now_us);
            }
            Message::Notify(PresenceNotify {
                serial, bitmask, ..
            }) => {
                self.pending_notify(l, serial, bitmask.as_deref(), now_us);
            }
            Message::DisconnectResponse(r) => {
                if self.is_answer(l, &r.header) && self.devices[l].state == DISCONNECTING {
                    self.free(l);
                    self.set_state(l, IDLE);
                    self.devices[l].tries = 0;
                    self.local.dropped += 1;
                    self.local.disconnects += 1;
                    self.to_connect.push_front(l as u32);
                }
            }
            Message::ErrorInvalidSerial(e) => {
                self.local.invalid_serial += 1;
                let dev = &mut self.devices[l];
                if let Some(h) = e.serial.and_then(|s| u32::try_from(s).ok()) {
                    dev.serial = dev.serial.max(h);
                }
                if dev.outstanding != 0 && self.is_answer(l, &e.header) {
                    let state = self.devices[l].state;
                    self.free(l);
                    if state == CONNECTING {
                        self.to_connect.push_front(l as u32);
                    }
                }
            }
            Message::ErrorRefused(e) => {
                let status = e.header.status.unwrap_or(0);
                let state = self.devices[l].state;
                self.free(l);
                if state == CONNECTED || state == DISCONNECTING {
                    self.local.dropped += 1;
                }
                match status {
                    404 => {
                        self.set_state(l, IDLE);
                        self.devices[l].tries = 0;
                        self.to_connect.push_back(l as u32);
                    }
                    503 => {
                        self.local.refused_full += 1;
                        self.set_state(l, DEAD);
                    }
                    _ => {
                        self.local.refused += 1;
                        self.set_state(l, DEAD);
                    }
                }
                if status != 404 {
                    if let Ok(mut first) = self.shared.first_refusal.lock() {
                        if first.is_none() {
                            *first = Some(format!(
                                "{status} {}",
                                e.header.status_description.as_deref().unwrap_or("")
                            ));
                        }
                    }
                }
            }
            _ => self.local.other += 1,
        }
    }

    fn is_answer(&self, l: usize, header: &ServiceHeader<'_>) -> bool {
        let dev = &self.devices[l];
        dev.outstanding != 0 && header.acknowledge == Some(i64::from(dev.outstanding))
    }

    /// The request in flight got its answer.
    fn answered(&mut self, l: usize, now_us: u64) {
        let sent = self.devices[l].sent_us;
        self.free(l);
        if self.shared.measuring.load(Relaxed) {
            let rtt = (now_us as u32).wrapping_sub(sent).max(1);
            let _ = self.rtt.record(u64::from(rtt));
        }
    }

    /// A notify (or pending state in a response): count it once per
    /// publish, time it against its publish, acknowledge it every time.
    fn pending_notify(
        &mut self,
        l: usize,
        serial: Option<i64>,
        bitmask: Option<&[u8]>,
        now_us: u64,
    ) {
        let (Some(serial), Some(bitmask)) = (serial, bitmask) else {
            return;
        };
        if bitmask.is_empty() {
            return;
        }
        let Ok(s) = u32::try_from(serial) else {
            self.local.other += 1;
            return;
        };
        let account = self.ident.account_of(self.global(l)) as usize;
        let clock = self.shared.accounts.get(account);
        let dev = &mut self.devices[l];
        let first = dev.last_notify == 0;
        if first {
            // The first notify this device sees. The publisher waits until
            // its account's priming Serial is known (the first notify any
            // of its devices saw) before publishing more, so counting from
            // that base also counts publishes whose own notify this device
            // missed (it sees a later, merged one).
            self.local.primed += 1;
            dev.last_notify = match clock {
                Some(c) => match c.base.compare_exchange(0, s, Relaxed, Relaxed) {
                    Ok(_) => s,
                    Err(base) => base.min(s),
                },
                None => s,
            };
        }
        if s > dev.last_notify {
            let delta = s - dev.last_notify;
            let measuring = self.shared.measuring.load(Relaxed);
            if let Some(c) = clock {
                for j in (dev.last_notify + 1..=s).rev().take(RING) {
                    let t = c.ring[j as usize % RING].load(Relaxed);
                    if measuring && t != 0 && t <= now_us {
                        let _ = self.notify.record((now_us - t).max(1));
                    }
                }
                c.delivered.fetch_add(u64::from(delta), Relaxed);
            }
            dev.last_notify = s;
            self.local.delivered += u64::from(delta);
            self.local.notifications += 1;
        } else if !first {
            self.local.duplicates += 1;
        }
        self.send_ack(l, serial, now_us);
    }
}

/// Seals a `PresenceNotify` for device `g` (the raw fan-out sender's packets).
pub(crate) fn seal_notify(
    ident: &Identity,
    g: u64,
    serial: i64,
    bitmask: &[u8],
    nonce: [u8; 12],
    buf: &mut [u8],
) -> Option<usize> {
    let conn_id: ConnId = ident.conn_id(g)?;
    let keys = ident.keys(g)?;
    let message = Message::Notify(PresenceNotify {
        bitmask: Some(bitmask.into()),
        serial: Some(serial),
        header: ServiceHeader::default(),
    });
    let n = message
        .encode(&mut buf[HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT])
        .ok()?;
    seal_in_place(&keys.s2c, conn_id, nonce, buf, n).ok()
}

/// Where device `g` lives: its worker and that worker's socket index.
pub(crate) fn placement(g: u64, threads: usize, sockets_per_worker: usize) -> (usize, usize) {
    let t = (g % threads as u64) as usize;
    let l = g / threads as u64;
    (t, (l % sockets_per_worker.max(1) as u64) as usize)
}

/// The local address of each socket.
pub(crate) fn local_addrs(sockets: &[Socket]) -> Vec<SocketAddr> {
    sockets
        .iter()
        .filter_map(|s| s.local_addr().ok()?.as_socket())
        .collect()
}
