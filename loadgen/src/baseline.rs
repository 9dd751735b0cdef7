//! The raw limits every figure is compared with (docs/BENCHMARKS.md): a
//! recvmmsg → sendmmsg reflector (raw echo) and a sendmmsg fan-out sender of
//! notify-sized datagrams (raw fan-out). Neither does any protocol work.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

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

/// The raw fan-out sender: one prebuilt sealed notify per device (up to
/// `max_devices`), sent round-robin to the device's socket with sendmmsg as
/// fast as one core can.
pub(crate) struct RawSender {
    sock: Socket,
    /// Whether `sock` is IPv6 (destinations are written for its family).
    is_v6: bool,
    packets: Vec<(Vec<u8>, SocketAddr)>,
    /// Datagrams the kernel accepted.
    pub(crate) sent: Arc<AtomicU64>,
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
        let n = devices.min(65_536);
        let mut packets = Vec::with_capacity(n as usize);
        for g in 0..n {
            let (t, s) = crate::engine::placement(g, threads, addrs[0].len());
            let mut buf = [0u8; MAX_DATAGRAM];
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&g.to_be_bytes());
            let Some(len) = seal_notify(ident, g, 1, bitmask, nonce, &mut buf) else {
                continue;
            };
            packets.push((buf[..len].to_vec(), addrs[t][s]));
        }
        Ok(RawSender {
            sock,
            is_v6: bind.is_ipv6(),
            packets,
            sent: Arc::new(AtomicU64::new(0)),
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
            // Acknowledgements come back here; read and drop them.
            while drain.recv(fd).unwrap_or(0) == drain.capacity() {}
        }
        Ok(())
    }
}
