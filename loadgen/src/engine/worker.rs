//! One worker thread: its share of the devices and sockets, and the loop
//! that receives, expires, generates and flushes until the run stops.
//!
//! The pieces of the loop live beside it: [`super::answers`] (what the node
//! sent), [`super::schedule`] (what is due: connects, heartbeats, churn,
//! timeouts) and [`super::requests`] (sealing requests into the batches).
//! This file must not build or read packets itself.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hdrhistogram::Histogram;
use mpp::net::mmsg::MmsgBatch;

use super::device::{ConnectTimer, Device, DeviceState, Pending};
use super::{histogram, Mode, Shared, Snapshot, WorkerConfig, WorkerResult, SPIN_US};
use crate::ident::Identity;
use crate::io::{send_all, wait_readable};

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
    w.shared.workers_ready.fetch_add(1, Relaxed);
    w.run();
    Ok(WorkerResult {
        rtt: w.rtt,
        notify: w.notify,
        remote: w.remote,
    })
}

/// One worker: its devices, sockets, batches, queues and counters.
pub(super) struct Worker {
    pub(super) cfg: WorkerConfig,
    pub(super) ident: Arc<Identity>,
    pub(super) shared: Arc<Shared>,
    pub(super) devices: Vec<Device>,
    pub(super) fds: Vec<i32>,
    pub(super) out: Vec<MmsgBatch>,
    pub(super) inb: MmsgBatch,
    pub(super) pending: VecDeque<Pending>,
    pub(super) to_connect: VecDeque<u32>,
    pub(super) inflight: usize,
    pub(super) cursor: usize,
    pub(super) swept: u64,
    pub(super) sweep_start_ms: u64,
    pub(super) connect_start_ms: u64,
    pub(super) connects_issued: u64,
    pub(super) churned: u64,
    pub(super) churn_cursor: usize,
    pub(super) rebound: u64,
    pub(super) rebind_cursor: usize,
    pub(super) mode_start_ms: u64,
    pub(super) nonce: u64,
    pub(super) nonce_salt: [u8; 4],
    pub(super) local: Snapshot,
    pub(super) rtt: Histogram<u64>,
    pub(super) notify: Histogram<u64>,
    pub(super) remote: Histogram<u64>,
    pub(super) connect_reported: bool,
    /// Connects in flight and 503 waits, soonest first.
    pub(super) connect_timers: BinaryHeap<Reverse<ConnectTimer>>,
    /// Devices whose address the node has not confirmed validated, each
    /// with when to heartbeat to find out (due times in order: every
    /// probe waits the same `--timeout-ms`).
    pub(super) probes: VecDeque<(u64, u32)>,
    /// Devices that have not connected once yet and were not refused for
    /// good: the connect phase lasts until there are none.
    pub(super) never_connected: usize,
    /// Drop threshold out of 2³² (simulated loss), and its generator.
    pub(super) loss: u64,
    pub(super) rng: u64,
}

impl Worker {
    pub(super) fn new(
        cfg: WorkerConfig,
        ident: Arc<Identity>,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Self> {
        let t = cfg.index as u64;
        let threads = cfg.threads as u64;
        let n = if cfg.devices > t {
            (cfg.devices - t).div_ceil(threads)
        } else {
            0
        };
        // Each node's group of sockets (device l uses its node's).
        let nodes = cfg.nodes.max(1);
        let socks = (cfg.sockets.len() / nodes).max(1);
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
                echo: [0; 8],
                probing: false,
                state: if needs_connect {
                    DeviceState::Idle
                } else {
                    DeviceState::Connected
                },
                tries: 0,
                sock: (ident.space().node_of(g) * socks + (l % socks as u64) as usize) as u16,
                rebinding: false,
                settled: false,
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
        let never_connected = if needs_connect { devices.len() } else { 0 };
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
            connect_timers: BinaryHeap::new(),
            probes: VecDeque::new(),
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
            remote: histogram(),
            loss: (cfg_loss * 4_294_967_296.0) as u64,
            rng: u64::from(rand::random::<u32>()) | 1,
            connect_reported: false,
            never_connected,
        })
    }

    pub(super) fn global(&self, l: usize) -> u64 {
        self.cfg.index as u64 + l as u64 * self.cfg.threads as u64
    }

    pub(super) fn run(&mut self) {
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
            if !self.connect_reported && self.never_connected == 0 {
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

    pub(super) fn report_connect_done(&mut self) {
        self.connect_reported = true;
        self.shared.connect_done.fetch_add(1, Relaxed);
        let now_ms = self.shared.now_us() / 1000;
        self.sweep_start_ms = now_ms;
        self.mode_start_ms = now_ms;
        self.swept = 0;
    }

    /// Changes device `l`'s state, counting its first connect (and a device
    /// refused before it ever connected) for the connect phase.
    pub(super) fn set_state(&mut self, l: usize, state: DeviceState) {
        let dev = &mut self.devices[l];
        let settles = matches!(state, DeviceState::Connected | DeviceState::Refused);
        if settles && !dev.settled {
            dev.settled = true;
            self.never_connected -= 1;
            if state == DeviceState::Connected {
                self.local.first_connects += 1;
            }
        }
        dev.state = state;
    }

    /// 32 random bits (xorshift64*: simulated loss, backoff jitter).
    pub(super) fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32
    }

    /// Whether simulated path loss takes this datagram.
    pub(super) fn lose(&mut self) -> bool {
        if self.loss == 0 {
            return false;
        }
        if self.random() < self.loss {
            self.local.loss_dropped += 1;
            true
        } else {
            false
        }
    }

    pub(super) fn free(&mut self, l: usize) {
        let dev = &mut self.devices[l];
        if dev.outstanding != 0 {
            dev.outstanding = 0;
            self.inflight -= 1;
        }
    }

    pub(super) fn flush(&mut self, s: usize, _now_us: u64) {
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

    pub(super) fn flush_all(&mut self, now_us: u64) {
        for s in 0..self.out.len() {
            self.flush(s, now_us);
        }
    }
}
