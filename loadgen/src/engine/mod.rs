//! The device workers: each thread owns a share of the simulated devices and
//! of the UDP sockets, and drives them with batched I/O.
//!
//! A device is a compact record (its two packet keys, Serial, the request in
//! flight, the last notify Serial, a state byte), not a `proto::Client`: ten
//! million `Client`s would not fit. The requests are built by the library's
//! `proto::seal_request` and the node's answers read with `packet` and
//! `codec`, so the wire format has one implementation. The timers follow
//! the client's (docs/PROTOCOL.md §6.9), except that a simulated device never
//! gives up on a silent node: a connect is retried with exponential backoff
//! and jitter for as long as the run lasts, a heartbeat is sent up to
//! `--tries` times before the device connects again ([`schedule`]).
//!
//! Scheduling is by rate, not a timer per device: a connect queue drained at
//! `--connect-rate`, and a heartbeat sweep that visits every device once per
//! heartbeat period (hold, fanout, churn) or keeps `--window` heartbeats in
//! flight round-robin (heartbeat, echo). Only requests in flight have
//! deadlines: heartbeats and disconnects in one queue (one timeout), connects
//! in a heap (each its own backoff).
//!
//! Files: [`shared`] (counters and flags the monitor reads), [`device`] (the
//! device record and its state), [`worker`] (a worker's loop),
//! [`schedule`] (what is due), [`requests`] (sealing requests),
//! [`answers`] (reading the node's answers), [`content`] (whether a
//! notify's bitmask covers what was published: `wrong`).

use std::net::SocketAddr;

use hdrhistogram::Histogram;
use socket2::Socket;

mod answers;
pub(crate) mod content;
mod device;
mod requests;
mod schedule;
mod shared;
mod worker;

pub(crate) use requests::seal_notify;
pub(crate) use shared::{Shared, Snapshot, Wrong};
pub(crate) use worker::run_worker;

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

/// One worker's share of the run.
pub(crate) struct WorkerConfig {
    pub(crate) index: usize,
    pub(crate) threads: usize,
    /// Devices in the whole run.
    pub(crate) devices: u64,
    /// The worker's sockets: `nodes` groups of equal size, group `j`
    /// connected to node `j` (device `l` uses its node's group).
    pub(crate) sockets: Vec<Socket>,
    /// Nodes the devices are spread over (`--node`'s list).
    pub(crate) nodes: usize,
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
    /// Of those, the deliveries to a device on another node than the one
    /// the publish entered (several `--node`s): across the bus.
    pub(crate) remote: Histogram<u64>,
}

/// A latency histogram from 1 µs to 100 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("static bounds are valid")
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
