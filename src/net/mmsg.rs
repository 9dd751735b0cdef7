//! The portable driver: `recvmmsg` / `sendmmsg` over a non-blocking socket,
//! `poll(2)` on the socket and the waker eventfd to sleep.
//!
//! It exists for kernels and containers where io_uring is missing or blocked
//! (seccomp, `kernel.io_uring_disabled`), and as the reference the io_uring
//! driver is tested against. Like it, it must never allocate per datagram
//! (every buffer, address and header is preallocated at construction), never
//! block outside [`Driver::wait`] except for a short, bounded stall when the
//! socket's send buffer is full, and never loop without bound.
//!
//! The header arrays live in [`MmsgBatch`], public so that the load
//! generator's devices, reflector and raw sender use the same batches as the
//! node instead of a copy of them; the driver's policy (receive rounds,
//! send stalls, counters) stays here.

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

/// Preallocated datagram slots for `recvmmsg` / `sendmmsg`: one buffer of
/// [`MAX_DATAGRAM`] bytes, one `sockaddr_storage`, one iovec and one
/// `mmsghdr` per slot, allocated once.
///
/// Both the node's [`MmsgDriver`] and the load generator (devices,
/// reflector, raw fan-out sender) move their datagrams through it, so the
/// header arrays are built in one place. The headers' pointers are
/// rewritten from the owning boxes just before each system call, so they are
/// never stale and never alias a live `&mut`; nothing is allocated after
/// [`MmsgBatch::new`].
///
/// Receiving: [`MmsgBatch::recv_from`] (keeping each sender's address) or
/// [`MmsgBatch::recv`] (a connected socket) fills slots `0..n`; read them
/// with [`MmsgBatch::payload`] / [`MmsgBatch::payload_mut`] and
/// [`MmsgBatch::source`]. Sending: write into [`MmsgBatch::send_slot`],
/// queue it with [`MmsgBatch::commit`] (connected socket) or
/// [`MmsgBatch::commit_to`], or queue what was received back to its senders
/// with [`MmsgBatch::echo`]; then [`MmsgBatch::send`] (one `sendmmsg`,
/// callable again for the rest after a partial send) and
/// [`MmsgBatch::clear`].
pub struct MmsgBatch {
    /// One buffer of [`MAX_DATAGRAM`] bytes per slot, back to back.
    bufs: Box<[u8]>,
    /// One address per slot.
    addrs: Box<[libc::sockaddr_storage]>,
    /// One iovec per slot (its length is the datagram length when sending).
    iovs: Box<[libc::iovec]>,
    /// One header per slot.
    hdrs: Box<[libc::mmsghdr]>,
    /// Slots filled by the last receive.
    received: usize,
    /// Slots committed for sending since the last [`MmsgBatch::clear`].
    queued: usize,
}

// SAFETY: the raw pointers inside the mmsghdr/iovec arrays only ever point
// into heap allocations owned by this same value (and are rewritten before
// every system call), so moving the batch to another thread moves
// everything they refer to with it; nothing is shared with another thread.
unsafe impl Send for MmsgBatch {}

impl std::fmt::Debug for MmsgBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmsgBatch")
            .field("slots", &self.hdrs.len())
            .field("received", &self.received)
            .field("queued", &self.queued)
            .finish()
    }
}

impl MmsgBatch {
    /// A batch of `slots` datagrams (at most [`super::MAX_BATCH`], the most
    /// one system call moves; a larger request gets that many).
    pub fn new(slots: usize) -> MmsgBatch {
        let n = slots.min(super::MAX_BATCH);
        let iov = libc::iovec {
            iov_base: ptr::null_mut(),
            iov_len: MAX_DATAGRAM,
        };
        // SAFETY: mmsghdr is plain old data (pointers, lengths, flags); the
        // all-zero value is valid, pointers are filled in before use.
        let hdr: libc::mmsghdr = unsafe { mem::zeroed() };
        MmsgBatch {
            bufs: vec![0u8; n * MAX_DATAGRAM].into_boxed_slice(),
            addrs: vec![zeroed_storage(); n].into_boxed_slice(),
            iovs: vec![iov; n].into_boxed_slice(),
            hdrs: vec![hdr; n].into_boxed_slice(),
            received: 0,
            queued: 0,
        }
    }

    /// Datagrams the batch holds.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Datagrams committed for sending and not yet cleared.
    #[inline]
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Whether every slot is committed (send, then clear).
    #[inline]
    pub fn is_full(&self) -> bool {
        self.queued >= self.hdrs.len()
    }

    /// Points headers `from..to` at their buffer, iovec and (with `names`)
    /// address; no address otherwise.
    fn link(&mut self, from: usize, to: usize, names: bool) {
        let bufs = self.bufs.as_mut_ptr();
        for i in from..to {
            // SAFETY: i < to <= slot count, so the offset stays inside `bufs`.
            self.iovs[i].iov_base = unsafe { bufs.add(i * MAX_DATAGRAM) }.cast();
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = if names {
                (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast()
            } else {
                ptr::null_mut()
            };
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
        }
    }

    /// Receives up to a batch from `fd` without blocking, keeping each
    /// sender's address ([`MmsgBatch::source`]). Returns how many arrived:
    /// 0 when none was waiting (`EAGAIN`); other errors as they are. It
    /// empties the send queue (a batch moves one direction at a time).
    pub fn recv_from(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_batch(fd, true)
    }

    /// [`MmsgBatch::recv_from`] without the senders' addresses, for a
    /// connected socket ([`MmsgBatch::source`] is then `None`).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_batch(fd, false)
    }

    fn recv_batch(&mut self, fd: RawFd, names: bool) -> io::Result<usize> {
        let n = self.hdrs.len();
        self.received = 0;
        // Receiving reuses every slot: whatever was queued is gone.
        self.queued = 0;
        if n == 0 {
            return Ok(0);
        }
        self.link(0, n, names);
        let namelen = if names {
            mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t
        } else {
            0
        };
        for (hdr, iov) in self.hdrs.iter_mut().zip(self.iovs.iter_mut()) {
            hdr.msg_hdr.msg_namelen = namelen;
            hdr.msg_len = 0;
            iov.iov_len = MAX_DATAGRAM;
        }
        // SAFETY: `hdrs` holds `n` headers, each pointing at its own
        // MAX_DATAGRAM buffer, iovec and (when asked) sockaddr_storage, all
        // owned by `self` and alive for the call; no timeout pointer.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            return if err.raw_os_error() == Some(libc::EAGAIN) {
                Ok(0)
            } else {
                Err(err)
            };
        }
        self.received = got as usize;
        Ok(self.received)
    }

    /// The bytes of received datagram `i`, or `None` when there is no such
    /// datagram or the kernel truncated it (longer than [`MAX_DATAGRAM`]).
    #[inline]
    pub fn payload(&self, i: usize) -> Option<&[u8]> {
        let len = self.received_len(i)?;
        let start = i * MAX_DATAGRAM;
        Some(&self.bufs[start..start + len])
    }

    /// [`MmsgBatch::payload`], writable (to open a packet in place).
    #[inline]
    pub fn payload_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        let len = self.received_len(i)?;
        let start = i * MAX_DATAGRAM;
        Some(&mut self.bufs[start..start + len])
    }

    #[inline]
    fn received_len(&self, i: usize) -> Option<usize> {
        if i >= self.received {
            return None;
        }
        let hdr = &self.hdrs[i];
        let len = hdr.msg_len as usize;
        if hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > MAX_DATAGRAM {
            return None;
        }
        Some(len)
    }

    /// The sender of received datagram `i` (IPv4 for a v4-mapped source),
    /// or `None` when it was received without addresses or the address is
    /// not IPv4/IPv6.
    #[inline]
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        if i >= self.received {
            return None;
        }
        let hdr = &self.hdrs[i].msg_hdr;
        if hdr.msg_name.is_null() {
            return None;
        }
        decode_sockaddr(storage_bytes(&self.addrs[i], hdr.msg_namelen))
    }

    /// The next free send buffer ([`MAX_DATAGRAM`] bytes), or `None` when
    /// every slot is committed.
    #[inline]
    pub fn send_slot(&mut self) -> Option<&mut [u8]> {
        if self.queued >= self.hdrs.len() {
            return None;
        }
        let start = self.queued * MAX_DATAGRAM;
        Some(&mut self.bufs[start..start + MAX_DATAGRAM])
    }

    /// Queues the first `len` bytes of [`MmsgBatch::send_slot`] for the
    /// socket's connected peer. False (nothing queued) when the batch is
    /// full or `len` is over [`MAX_DATAGRAM`].
    #[inline]
    pub fn commit(&mut self, len: usize) -> bool {
        let i = self.queued;
        if i >= self.hdrs.len() || len > MAX_DATAGRAM {
            return false;
        }
        self.hdrs[i].msg_hdr.msg_namelen = 0;
        self.iovs[i].iov_len = len;
        self.queued += 1;
        true
    }

    /// Queues the first `len` bytes of [`MmsgBatch::send_slot`] for `to`,
    /// written in the form a socket of the given family takes (an IPv4
    /// destination is v4-mapped on an IPv6 socket). False (nothing queued)
    /// when the batch is full, `len` is over [`MAX_DATAGRAM`], or the socket
    /// cannot reach `to` (a real IPv6 address on an IPv4 socket).
    #[inline]
    pub fn commit_to(&mut self, len: usize, to: SocketAddr, socket_is_v6: bool) -> bool {
        let i = self.queued;
        if i >= self.hdrs.len() || len > MAX_DATAGRAM {
            return false;
        }
        let Some(namelen) = encode_sockaddr(to, socket_is_v6, &mut self.addrs[i]) else {
            return false;
        };
        self.hdrs[i].msg_hdr.msg_namelen = namelen;
        self.iovs[i].iov_len = len;
        self.queued += 1;
        true
    }

    /// Queues the first `n` received datagrams, unchanged, back to their
    /// senders (a reflector echoing in place). Call after
    /// [`MmsgBatch::recv_from`] on an empty queue.
    pub fn echo(&mut self, n: usize) {
        let n = n.min(self.received);
        for i in 0..n {
            self.iovs[i].iov_len = self.hdrs[i].msg_len as usize;
        }
        self.queued = n;
    }

    /// One `sendmmsg` of queued slots `from..`: returns how many the kernel
    /// took (`Ok(0)` when there is nothing from `from` on), or the error of
    /// the first datagram it refused (`EAGAIN` when the send buffer is full).
    /// The queue is kept: call again with `from` advanced, then
    /// [`MmsgBatch::clear`].
    pub fn send(&mut self, fd: RawFd, from: usize) -> io::Result<usize> {
        let to = self.queued;
        if from >= to {
            return Ok(0);
        }
        // Slot lengths and address lengths were set by commit/echo; a zero
        // address length sends to the connected peer.
        self.link(from, to, true);
        // SAFETY: headers from..to are linked to live buffers, iovecs and
        // addresses owned by `self`; the count stays inside the array.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs.as_mut_ptr().add(from),
                (to - from) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Empties the send queue.
    #[inline]
    pub fn clear(&mut self) {
        self.queued = 0;
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
    recv: MmsgBatch,
    /// Send slots: `batch` datagrams per flush.
    send: MmsgBatch,
    /// Counters.
    stats: DriverStats,
}

impl std::fmt::Debug for MmsgDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmsgDriver")
            .field("socket", &self.socket)
            .field("waker_fd", &self.waker_fd)
            .field("batch", &self.send.capacity())
            .field("queued", &self.send.queued())
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
            recv: MmsgBatch::new(batch),
            send: MmsgBatch::new(batch),
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
        let batch = self.recv.capacity();
        let fd = self.socket.as_raw_fd();
        let mut delivered = 0;
        for _ in 0..MAX_RECV_ROUNDS {
            let n = match self.recv.recv_from(fd) {
                // EAGAIN: the socket is drained.
                Ok(0) => break,
                Ok(n) => n,
                Err(err) => match err.raw_os_error() {
                    // A signal, or an ICMP error queued on the socket (only
                    // reported once): try again.
                    Some(
                        libc::EINTR | libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH,
                    ) => continue,
                    // Report a hard error now only if nothing was delivered;
                    // otherwise the next call sees it.
                    _ if delivered == 0 => return Err(err),
                    _ => break,
                },
            };
            for i in 0..n {
                // Truncated (longer than MAX_DATAGRAM) or from an address
                // that is neither IPv4 nor IPv6: dropped.
                let Some(bytes) = self.recv.payload(i) else {
                    self.stats.receive_drops += 1;
                    continue;
                };
                let Some(from) = self.recv.source(i) else {
                    self.stats.receive_drops += 1;
                    continue;
                };
                each(from, bytes);
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
        self.send.send_slot()
    }

    fn commit_send(&mut self, to: SocketAddr, len: usize) {
        if !self.send.commit_to(len, to, self.socket_is_v6) {
            self.stats.send_errors += 1;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let queued = self.send.queued();
        if queued == 0 {
            return Ok(());
        }
        let fd = self.socket.as_raw_fd();
        let mut next = 0;
        let mut stalls = 0;
        while next < queued {
            let result = self.send.send(fd, next);
            self.stats.send_batches += 1;
            self.stats.send_calls += 1;
            match result {
                Ok(n) if n > 0 => {
                    self.stats.sent += n as u64;
                    next += n;
                }
                Ok(_) => {
                    // Not expected for a non-empty vector; never spin on it.
                    self.stats.send_errors += (queued - next) as u64;
                    break;
                }
                Err(err) => match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::ENOBUFS) if stalls < MAX_SEND_STALLS => {
                        stalls += 1;
                        self.wait_writable();
                        self.stats.send_calls += 1;
                    }
                    Some(libc::EAGAIN | libc::ENOBUFS) => {
                        self.stats.send_errors += (queued - next) as u64;
                        break;
                    }
                    // This datagram was refused (unreachable, too big,
                    // firewall): count it and go on with the rest.
                    _ => {
                        self.stats.send_errors += 1;
                        next += 1;
                    }
                },
            }
        }
        self.send.clear();
        Ok(())
    }

    fn stats(&self) -> &DriverStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind a");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind b");
        b.connect(a.local_addr().expect("addr")).expect("connect");
        a.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    /// Waits (bounded) until `fd` is readable.
    fn readable(fd: RawFd) {
        let mut p = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, length 1.
        assert_eq!(unsafe { libc::poll(p.as_mut_ptr(), 1, 3000) }, 1);
    }

    /// A connected sender's batch reaches an unconnected receiver, which
    /// sees each source and echoes the datagrams back in place.
    #[test]
    fn send_receive_and_echo() {
        let (a, b) = pair();
        let mut tx = MmsgBatch::new(4);
        for i in 0..4u8 {
            let slot = tx.send_slot().expect("free slot");
            slot[..3].copy_from_slice(&[i, i, i]);
            assert!(tx.commit(3));
        }
        assert!(tx.is_full());
        assert!(tx.send_slot().is_none());
        assert!(!tx.commit(1), "full");
        assert_eq!(tx.send(b.as_raw_fd(), 0).expect("send"), 4);
        tx.clear();
        readable(a.as_raw_fd());
        let mut rx = MmsgBatch::new(8);
        let n = rx.recv_from(a.as_raw_fd()).expect("recv");
        assert_eq!(n, 4);
        for i in 0..n {
            assert_eq!(rx.payload(i), Some(&[i as u8; 3][..]));
            assert_eq!(rx.source(i), Some(b.local_addr().expect("addr")));
        }
        assert_eq!(rx.payload(n), None, "beyond what arrived");
        rx.payload_mut(0).expect("first")[0] = 9;
        rx.echo(n);
        assert_eq!(rx.queued(), 4);
        assert_eq!(rx.send(a.as_raw_fd(), 0).expect("echo"), 4);
        readable(b.as_raw_fd());
        let mut back = MmsgBatch::new(8);
        assert_eq!(back.recv(b.as_raw_fd()).expect("recv"), 4);
        assert_eq!(back.payload(0), Some(&[9, 0, 0][..]));
        assert_eq!(back.source(0), None, "received without addresses");
        assert_eq!(back.recv(b.as_raw_fd()).expect("empty"), 0, "EAGAIN is 0");
    }

    #[test]
    fn oversized_and_unreachable_sends_are_refused() {
        let mut tx = MmsgBatch::new(2);
        assert!(!tx.commit(MAX_DATAGRAM + 1));
        let v6: SocketAddr = "[2001:db8::1]:9".parse().expect("v6");
        assert!(!tx.commit_to(10, v6, false), "IPv6 from an IPv4 socket");
        assert_eq!(tx.queued(), 0);
        assert!(tx.commit_to(10, "127.0.0.1:9".parse().expect("v4"), true));
        assert_eq!(tx.queued(), 1);
        assert_eq!(MmsgBatch::new(super::super::MAX_BATCH + 5).capacity(), 1024);
    }

    #[test]
    fn truncated_datagrams_have_no_payload() {
        let (a, b) = pair();
        let big = vec![7u8; MAX_DATAGRAM + 10];
        b.send(&big).expect("send");
        readable(a.as_raw_fd());
        let mut rx = MmsgBatch::new(2);
        assert_eq!(rx.recv_from(a.as_raw_fd()).expect("recv"), 1);
        assert_eq!(rx.payload(0), None);
    }
}
