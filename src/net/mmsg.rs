//! The portable driver: `recvmmsg` / `sendmmsg` over a non-blocking socket,
//! `poll(2)` on the socket and the waker eventfd to sleep.
//!
//! It exists for kernels and containers where io_uring is missing or blocked
//! (seccomp, `kernel.io_uring_disabled`), and as the reference the io_uring
//! driver is tested against. Like it, it must never allocate per datagram
//! (every buffer, address and header is preallocated at construction), never
//! block outside [`Driver::wait`] except for a short, bounded stall when the
//! socket's send buffer is full, and never loop without bound.

use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::time::Duration;

use super::socket::{decode_sockaddr, encode_sockaddr, storage_bytes, zeroed_storage};
use super::{
    check_batch, clear_eventfd, timeout_millis, Driver, DriverStats, IoBackend, MAX_DATAGRAM,
};

/// At most this many `recvmmsg` calls per [`Driver::recv`], so one shard turn
/// stays bounded under a flood (the rest waits for the next turn). With the
/// default batch of 64 that is 1024 datagrams: as many as the shard sends per
/// turn, so the acknowledgements and replies a turn's sends bring back are
/// read at the pace they arrive and never pile up until the socket drops.
const MAX_RECV_ROUNDS: usize = 16;

/// When `sendmmsg` says the send buffer is full, wait for POLLOUT at most
/// this many times per flush before counting the rest as send errors.
const MAX_SEND_STALLS: usize = 4;

/// How long one send stall may last.
const SEND_STALL: Duration = Duration::from_millis(5);

/// Preallocated buffers, addresses, iovecs and headers for one direction.
///
/// The headers' pointers are rewritten from the owning boxes just before each
/// system call, so they are never stale and never alias a live `&mut`.
struct Slots {
    /// `n` buffers of [`MAX_DATAGRAM`] bytes, back to back.
    bufs: Box<[u8]>,
    /// One address per slot.
    addrs: Box<[libc::sockaddr_storage]>,
    /// One iovec per slot (its length is the datagram length when sending).
    iovs: Box<[libc::iovec]>,
    /// One header per slot.
    hdrs: Box<[libc::mmsghdr]>,
}

impl Slots {
    fn new(n: usize) -> Slots {
        let iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: MAX_DATAGRAM,
        };
        // SAFETY: mmsghdr is plain old data (pointers, lengths, flags); the
        // all-zero value is valid, pointers are filled in before use.
        let hdr: libc::mmsghdr = unsafe { mem::zeroed() };
        Slots {
            bufs: vec![0u8; n * MAX_DATAGRAM].into_boxed_slice(),
            addrs: vec![zeroed_storage(); n].into_boxed_slice(),
            iovs: vec![iov; n].into_boxed_slice(),
            hdrs: vec![hdr; n].into_boxed_slice(),
        }
    }

    /// Points headers `0..n` at their buffer, address and iovec.
    fn link(&mut self, n: usize) {
        let bufs = self.bufs.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < n <= slot count, so the offset stays inside `bufs`.
            self.iovs[i].iov_base = unsafe { bufs.add(i * MAX_DATAGRAM) }.cast();
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
    }
}

/// The `recvmmsg`/`sendmmsg` driver (see the module documentation).
pub struct MmsgDriver {
    /// The shard's socket (non-blocking).
    socket: UdpSocket,
    /// The waker's eventfd, or negative for none; not owned.
    waker_fd: RawFd,
    /// Whether the socket is AF_INET6 (IPv4 destinations are then mapped).
    socket_is_v6: bool,
    /// Receive slots: `batch` datagrams per `recvmmsg`.
    recv: Slots,
    /// Send slots: `batch` datagrams per flush.
    send: Slots,
    /// Send slots committed since the last flush.
    queued: usize,
    /// Counters.
    stats: DriverStats,
}

// SAFETY: the raw pointers inside the mmsghdr/iovec arrays only ever point
// into heap allocations owned by this same value (and are rewritten before
// every use), so moving the driver to another thread moves everything they
// refer to with it; nothing is shared with another thread.
unsafe impl Send for MmsgDriver {}

impl std::fmt::Debug for MmsgDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmsgDriver")
            .field("socket", &self.socket)
            .field("waker_fd", &self.waker_fd)
            .field("batch", &self.send.hdrs.len())
            .field("queued", &self.queued)
            .field("stats", &self.stats)
            .finish()
    }
}

impl MmsgDriver {
    /// A driver over `socket` (made non-blocking), woken by the eventfd
    /// `waker_fd` (negative for none; the caller keeps it open for the
    /// driver's lifetime), with `batch` (1..=[`super::MAX_BATCH`]) receive
    /// slots per `recvmmsg` and `batch` send slots.
    pub fn new(socket: UdpSocket, waker_fd: RawFd, batch: usize) -> io::Result<Self> {
        let batch = check_batch(batch)?;
        socket.set_nonblocking(true)?;
        let socket_is_v6 = socket2::SockRef::from(&socket).domain()? == socket2::Domain::IPV6;
        Ok(MmsgDriver {
            socket,
            waker_fd,
            socket_is_v6,
            recv: Slots::new(batch),
            send: Slots::new(batch),
            queued: 0,
            stats: DriverStats::default(),
        })
    }

    /// The socket this driver reads and writes.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Waits up to [`SEND_STALL`] for the send buffer to have room.
    fn wait_writable(&self) {
        let mut fds = [libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, length 1.
        unsafe {
            libc::poll(fds.as_mut_ptr(), 1, timeout_millis(Some(SEND_STALL)));
        }
    }
}

impl Driver for MmsgDriver {
    fn backend(&self) -> IoBackend {
        IoBackend::Mmsg
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // poll(2) ignores a negative fd: no waker.
                fd: self.waker_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, length 2.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_millis(timeout)) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            // A signal is just an early return; the shard loop goes round.
            return if err.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(err)
            };
        }
        if fds[1].revents & libc::POLLIN != 0 {
            clear_eventfd(self.waker_fd);
        }
        Ok(())
    }

    fn recv(&mut self, each: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        let batch = self.recv.hdrs.len();
        let fd = self.socket.as_raw_fd();
        let mut delivered = 0;
        for _ in 0..MAX_RECV_ROUNDS {
            self.recv.link(batch);
            for hdr in self.recv.hdrs.iter_mut() {
                hdr.msg_hdr.msg_namelen =
                    mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                hdr.msg_len = 0;
            }
            // SAFETY: `hdrs` holds `batch` headers, each pointing at its own
            // MAX_DATAGRAM buffer, sockaddr_storage and iovec, all owned by
            // `self.recv` and alive for the call; no timeout pointer.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.recv.hdrs.as_mut_ptr(),
                    batch as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    ptr::null_mut(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    // A signal, or an ICMP error queued on the socket (only
                    // reported once): try again.
                    Some(
                        libc::EINTR | libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH,
                    ) => continue,
                    // Report a hard error now only if nothing was delivered;
                    // otherwise the next call sees it.
                    _ if delivered == 0 => return Err(err),
                    _ => break,
                }
            }
            let n = n as usize;
            for i in 0..n {
                let hdr = &self.recv.hdrs[i];
                let len = hdr.msg_len as usize;
                if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > MAX_DATAGRAM {
                    self.stats.receive_drops += 1;
                    continue;
                }
                let name = storage_bytes(&self.recv.addrs[i], hdr.msg_hdr.msg_namelen);
                let Some(from) = decode_sockaddr(name) else {
                    self.stats.receive_drops += 1;
                    continue;
                };
                let start = i * MAX_DATAGRAM;
                each(from, &self.recv.bufs[start..start + len]);
                self.stats.received += 1;
                delivered += 1;
            }
            if n < batch {
                // The socket is drained; save the EAGAIN round trip.
                break;
            }
        }
        Ok(delivered)
    }

    fn send_slot(&mut self) -> Option<&mut [u8]> {
        if self.queued >= self.send.hdrs.len() {
            return None;
        }
        let start = self.queued * MAX_DATAGRAM;
        Some(&mut self.send.bufs[start..start + MAX_DATAGRAM])
    }

    fn commit_send(&mut self, to: SocketAddr, len: usize) {
        let i = self.queued;
        if i >= self.send.hdrs.len() || len > MAX_DATAGRAM {
            self.stats.send_errors += 1;
            return;
        }
        let Some(namelen) = encode_sockaddr(to, self.socket_is_v6, &mut self.send.addrs[i]) else {
            self.stats.send_errors += 1;
            return;
        };
        self.send.hdrs[i].msg_hdr.msg_namelen = namelen;
        self.send.iovs[i].iov_len = len;
        self.queued += 1;
    }

    fn flush(&mut self) -> io::Result<()> {
        let queued = mem::take(&mut self.queued);
        if queued == 0 {
            return Ok(());
        }
        // `link` keeps each slot's namelen and iov_len, set by commit_send.
        self.send.link(queued);
        let fd = self.socket.as_raw_fd();
        let mut next = 0;
        let mut stalls = 0;
        while next < queued {
            // SAFETY: headers next..queued are linked to live buffers,
            // addresses and iovecs owned by `self.send`.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.send.hdrs.as_mut_ptr().add(next),
                    (queued - next) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            self.stats.send_batches += 1;
            if n > 0 {
                self.stats.sent += n as u64;
                next += n as usize;
                continue;
            }
            if n == 0 {
                // Not expected for a non-empty vector; never spin on it.
                self.stats.send_errors += (queued - next) as u64;
                break;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN | libc::ENOBUFS) if stalls < MAX_SEND_STALLS => {
                    stalls += 1;
                    self.wait_writable();
                }
                Some(libc::EAGAIN | libc::ENOBUFS) => {
                    self.stats.send_errors += (queued - next) as u64;
                    break;
                }
                // This datagram was refused (unreachable, too big, firewall):
                // count it and go on with the rest.
                _ => {
                    self.stats.send_errors += 1;
                    next += 1;
                }
            }
        }
        Ok(())
    }

    fn stats(&self) -> &DriverStats {
        &self.stats
    }
}
