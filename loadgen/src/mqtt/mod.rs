//! A minimal MQTT 3.1.1 client: fan-out through a broker at QoS 0 or QoS 1,
//! the mosquitto peer of docs/BENCHMARKS.md ("fan-out of one publish to N
//! subscribers, same N, same payload size"). QoS 1 is the guarantee mppd
//! gives (every device acknowledges every notify): the publisher publishes
//! at QoS 1 and counts the broker's PUBACKs, every subscriber subscribes at
//! QoS 1 and PUBACKs every delivery.
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
//! arrived by the end of `--drain`; `wrong` counts delivered payloads that
//! differ from what was published (their length, or the filler after the
//! first 16 bytes, [`filler`]), or whose sequence number was never
//! published.
//!
//! Files: [`wire`] (the MQTT 3.1.1 frames), [`subscribers`] (the worker
//! threads and their subscriber connections), [`publisher`] (the one
//! publisher connection), [`epoll`] (the workers' epoll calls), [`run`]
//! (checking the flags, starting the workers, the phases through the
//! shared monitor, the report). This file holds the flags and what the
//! threads share.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::anyhow;
use clap::Args;
use hdrhistogram::Histogram;

mod epoll;
mod publisher;
mod run;
mod subscribers;
mod wire;

pub(crate) use run::run;

/// Writes what the non-blocking `sock` takes of `buf` now: the bytes
/// written (fewer than `buf.len()` once the socket is full), or the error
/// that ends the connection (a write of 0 bytes: the broker stopped
/// reading). The publisher's and the subscribers' output both go out
/// through it, and register for writability while bytes are left.
pub(super) fn write_available(
    mut sock: &std::net::TcpStream,
    buf: &[u8],
) -> std::io::Result<usize> {
    use std::io::{ErrorKind, Write};
    let mut done = 0;
    while done < buf.len() {
        match sock.write(&buf[done..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    ErrorKind::WriteZero,
                    "the broker stopped reading",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `mqtt`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct MqttArgs {
    /// The broker's address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub(crate) broker: SocketAddr,
    /// Topic the publisher publishes to and every subscriber subscribes to.
    #[arg(long, default_value = "mpp/loadgen")]
    pub(crate) topic: String,
    /// Quality of service of the publishes and subscriptions: 0 (at most
    /// once, nothing acknowledged) or 1 (at least once: the broker PUBACKs
    /// each publish, each subscriber PUBACKs each delivery).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub(crate) qos: u8,
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

/// Phases, as stored in `Shared::phase`.
const CONNECTING: u8 = 0;
const WARMUP: u8 = 1;
const MEASURE: u8 = 2;
const DRAIN: u8 = 3;
const STOP: u8 = 4;

/// Top bit of a payload's sequence number: published in the measured window.
const MEASURED: u64 = 1 << 63;

/// Fixed settings every worker reads.
struct Config {
    broker: SocketAddr,
    topic: String,
    qos: u8,
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
    /// PUBACKs the publisher got from the broker (QoS 1).
    publish_acks: AtomicU64,
    settle_timeouts: AtomicU64,
    malformed: AtomicU64,
    /// Payloads that differ from what was published.
    wrong: AtomicU64,
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

/// Byte `i` (≥ 16) of every payload: what the subscribers check.
fn filler(i: usize) -> u8 {
    i as u8
}

/// A latency histogram of deliveries (µs, up to a minute).
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}
