//! The raw limits every figure is compared with (docs/BENCHMARKS.md): a
//! recvmmsg → sendmmsg reflector (raw echo), a one-way sendmmsg fan-out
//! sender of notify-sized datagrams (raw fan-out, for orientation), and the
//! raw *reliable* fan-out sender, which also receives every device's
//! acknowledgement and sends a device its next notify only once the last
//! one was acknowledged: the node's fan-out work minus the protocol. None
//! does any protocol work: the reliable sender finds the device an
//! acknowledgement comes from by the conn id in its first bytes, with no
//! crypto and no decoding.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mpp::net::mmsg::MmsgBatch;
use mpp::net::MAX_DATAGRAM;
use socket2::Socket;

use crate::engine::seal_notify;
use crate::ident::Identity;
use crate::io::{send_all, wait_readable};

/// A reflector bound to `listen`; `run` echoes until `stop`.
pub(crate) struct Reflector {
    sock: Socket,
    /// Datagrams echoed.
    pub(crate) echoed: Arc<AtomicU64>,
}

impl Reflector {
    /// Binds the reflector's socket.
    pub(crate) fn bind(listen: SocketAddr) -> Result<Reflector> {
        let sock = crate::io::unconnected_socket(listen)?;
        sock.bind(&listen.into())
            .with_context(|| format!("reflector: binding {listen}"))?;
        Ok(Reflector {
            sock,
            echoed: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> Result<SocketAddr> {
        self.sock
            .local_addr()?
            .as_socket()
            .context("reflector address")
    }

    /// Echoes every datagram to its sender until `stop`.
    pub(crate) fn run(self, cpu: Option<usize>, batch: usize, stop: &AtomicBool) -> Result<()> {
        if let Some(cpu) = cpu {
            crate::sys::pin(cpu)?;
        }
        let fd = self.sock.as_raw_fd();
        let mut b = MmsgBatch::new(batch);
        while !stop.load(Relaxed) {
            let n = b.recv_from(fd).unwrap_or(0);
            if n == 0 {
                wait_readable(&[fd], 5);
                continue;
            }
            b.echo(n);
            let sent = send_all(&mut b, fd);
            self.echoed.fetch_add(sent as u64, Relaxed);
        }
        Ok(())
    }
}

/// Most devices a raw fan-out sender addresses (one prebuilt packet each).
const MAX_RAW_DEVICES: u64 = 65_536;

/// Datagrams the reliable sender sends per turn before it reads its socket
/// again: the node's shard does the same (`SEND_PER_TURN` in
/// `src/node/shard.rs`), so both take acknowledgements at the same pace.
const SEND_PER_TURN: usize = 1024;

/// A notify unacknowledged this long is sent again by the reliable sender
/// (a datagram lost to a full socket buffer would otherwise stall its
/// device for the rest of the run).
const RESEND_AFTER: Duration = Duration::from_millis(200);

/// One prebuilt sealed notify per device (up to [`MAX_RAW_DEVICES`]):
/// device `g` at index `g`, addressed to `addrs[worker][socket]`.
fn notify_packets(
    ident: &Identity,
    devices: u64,
    threads: usize,
    addrs: &[Vec<SocketAddr>],
    bitmask: &[u8],
) -> Vec<(Vec<u8>, SocketAddr)> {
    let n = devices.min(MAX_RAW_DEVICES);
    let mut packets = Vec::with_capacity(n as usize);
    for g in 0..n {
        let (t, s) = crate::engine::placement(g, threads, addrs[0].len());
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&g.to_be_bytes());
        let Some(len) = seal_notify(ident, g, 1, bitmask, nonce, &mut buf) else {
            // An id the engine cannot use either (it refuses such runs).
            break;
        };
        packets.push((buf[..len].to_vec(), addrs[t][s]));
    }
    packets
}

/// The one-way raw fan-out sender: one prebuilt sealed notify per device
/// (up to 65,536 devices), sent round-robin to the device's socket with
/// sendmmsg as fast as one core can. The devices' acknowledgements are
/// read and dropped; nothing waits for them.
pub(crate) struct RawSender {
    sock: Socket,
    /// Whether `sock` is IPv6 (destinations are written for its family).
    is_v6: bool,
    packets: Vec<(Vec<u8>, SocketAddr)>,
    /// Datagrams the kernel accepted.
    pub(crate) sent: Arc<AtomicU64>,
    /// Sends while set (cleared while another side of an interleaved run
    /// has its slice).
    pub(crate) active: Arc<AtomicBool>,
}

impl RawSender {
    /// Builds the packets: device `g` goes to `addrs[worker][socket]`.
    pub(crate) fn new(
        ident: &Identity,
        devices: u64,
        threads: usize,
        addrs: &[Vec<SocketAddr>],
        bitmask: &[u8],
        bind: SocketAddr,
    ) -> Result<RawSender> {
        let sock = crate::io::unconnected_socket(bind)?;
        sock.bind(&bind.into())
            .context("raw fan-out sender socket")?;
        Ok(RawSender {
            sock,
            is_v6: bind.is_ipv6(),
            packets: notify_packets(ident, devices, threads, addrs, bitmask),
            sent: Arc::new(AtomicU64::new(0)),
            active: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The sender's address (the receivers connect to it).
    pub(crate) fn addr(&self) -> Result<SocketAddr> {
        self.sock
            .local_addr()?
            .as_socket()
            .context("sender address")
    }

    /// Sends until `stop`.
    pub(crate) fn run(self, cpu: Option<usize>, batch: usize, stop: &AtomicBool) -> Result<()> {
        if let Some(cpu) = cpu {
            crate::sys::pin(cpu)?;
        }
        if self.packets.is_empty() {
            return Ok(());
        }
        let fd = self.sock.as_raw_fd();
        let mut b = MmsgBatch::new(batch);
        let mut i = 0;
        let mut drain = MmsgBatch::new(batch);
        while !stop.load(Relaxed) {
            // Acknowledgements come back here; read and drop them.
            while drain.recv(fd).unwrap_or(0) == drain.capacity() {}
            if !self.active.load(Relaxed) {
                wait_readable(&[fd], 1);
                continue;
            }
            while let Some(slot) = b.send_slot() {
                let (p, to) = &self.packets[i];
                i = (i + 1) % self.packets.len();
                slot[..p.len()].copy_from_slice(p);
                if !b.commit_to(p.len(), *to, self.is_v6) {
                    // Not reachable from this socket's family: never
                    // expected, and never a reason to spin.
                    break;
                }
            }
            let sent = send_all(&mut b, fd);
            self.sent.fetch_add(sent as u64, Relaxed);
        }
        Ok(())
    }
}

/// The raw reliable fan-out sender (docs/BENCHMARKS.md, "raw reliable
/// fan-out"): one prebuilt sealed notify per device (up to 65,536
/// devices), each device with one notify in flight at most, as the node's
/// fan-out with `--ahead 0` has. Each turn it reads the acknowledgements
/// waiting (recvmmsg, with their sources, as the node reads), frees their
/// devices, and sends up to [`SEND_PER_TURN`] notifies to free devices
/// (sendmmsg); a notify unacknowledged for [`RESEND_AFTER`] is sent again.
/// Its rate is acknowledgements received per second.
pub(crate) struct ReliableSender {
    sock: Socket,
    is_v6: bool,
    ident: Arc<Identity>,
    packets: Vec<(Vec<u8>, SocketAddr)>,
    /// Notify datagrams the kernel accepted (resends included).
    pub(crate) sent: Arc<AtomicU64>,
    /// Acknowledgements of a notify in flight (each frees its device).
    pub(crate) acked: Arc<AtomicU64>,
    /// Notifies sent again after [`RESEND_AFTER`].
    pub(crate) resent: Arc<AtomicU64>,
    /// Sends while set (cleared while another side of an interleaved run
    /// has its slice; acknowledgements are still read).
    pub(crate) active: Arc<AtomicBool>,
}

impl ReliableSender {
    /// Builds the packets as [`RawSender::new`] does.
    pub(crate) fn new(
        ident: Arc<Identity>,
        devices: u64,
        threads: usize,
        addrs: &[Vec<SocketAddr>],
        bitmask: &[u8],
        bind: SocketAddr,
    ) -> Result<ReliableSender> {
        let sock = crate::io::unconnected_socket(bind)?;
        sock.bind(&bind.into())
            .context("raw reliable fan-out sender socket")?;
        let packets = notify_packets(&ident, devices, threads, addrs, bitmask);
        Ok(ReliableSender {
            sock,
            is_v6: bind.is_ipv6(),
            ident,
            packets,
            sent: Arc::new(AtomicU64::new(0)),
            acked: Arc::new(AtomicU64::new(0)),
            resent: Arc::new(AtomicU64::new(0)),
            active: Arc::new(AtomicBool::new(true)),
        })
    }

    /// The sender's address (the receivers connect to it).
    pub(crate) fn addr(&self) -> Result<SocketAddr> {
        self.sock
            .local_addr()?
            .as_socket()
            .context("sender address")
    }

    /// Sends and reads acknowledgements until `stop`.
    pub(crate) fn run(self, cpu: Option<usize>, batch: usize, stop: &AtomicBool) -> Result<()> {
        if let Some(cpu) = cpu {
            crate::sys::pin(cpu)?;
        }
        let n = self.packets.len();
        if n == 0 {
            return Ok(());
        }
        let fd = self.sock.as_raw_fd();
        let epoch = Instant::now();
        // When each device's notify in flight went out (µs since `epoch`,
        // plus one); 0 = none in flight.
        let mut in_flight = vec![0u64; n];
        let mut ready: VecDeque<u32> = (0..n as u32).collect();
        let mut out = MmsgBatch::new(batch);
        let mut inb = MmsgBatch::new(batch);
        let mut last_scan = 0u64;
        let resend_us = RESEND_AFTER.as_micros() as u64;
        while !stop.load(Relaxed) {
            let now = epoch.elapsed().as_micros() as u64 + 1;
            // Read the acknowledgements waiting, as many as a turn sends.
            let mut got = 0;
            let mut acked = 0;
            while got < SEND_PER_TURN {
                let k = inb.recv_from(fd).unwrap_or(0);
                for i in 0..k {
                    let Some(g) = inb
                        .payload(i)
                        .and_then(|p| self.ident.index_of(p, n as u64))
                    else {
                        continue;
                    };
                    let slot = &mut in_flight[g as usize];
                    if *slot != 0 {
                        *slot = 0;
                        acked += 1;
                        ready.push_back(g as u32);
                    }
                }
                got += k;
                if k < inb.capacity() {
                    break;
                }
            }
            if acked > 0 {
                self.acked.fetch_add(acked, Relaxed);
            }
            let active = self.active.load(Relaxed);
            // Notifies unacknowledged for too long go out again.
            if active && now - last_scan >= resend_us / 2 {
                last_scan = now;
                let mut resent = 0;
                for (g, at) in in_flight.iter_mut().enumerate() {
                    if *at != 0 && now - *at >= resend_us {
                        *at = 0;
                        ready.push_front(g as u32);
                        resent += 1;
                    }
                }
                self.resent.fetch_add(resent, Relaxed);
            }
            let mut produced = 0;
            while active && produced < SEND_PER_TURN {
                let Some(g) = ready.pop_front() else {
                    break;
                };
                let (p, to) = &self.packets[g as usize];
                let Some(slot) = out.send_slot() else {
                    self.flush(&mut out, fd);
                    ready.push_front(g);
                    continue;
                };
                slot[..p.len()].copy_from_slice(p);
                if out.commit_to(p.len(), *to, self.is_v6) {
                    in_flight[g as usize] = now;
                    produced += 1;
                }
            }
            self.flush(&mut out, fd);
            if got == 0 && produced == 0 {
                wait_readable(&[fd], 1);
            }
        }
        Ok(())
    }

    fn flush(&self, out: &mut MmsgBatch, fd: i32) {
        if out.queued() > 0 {
            // A refused datagram is resent after RESEND_AFTER.
            let sent = send_all(out, fd);
            self.sent.fetch_add(sent as u64, Relaxed);
        }
    }
}
