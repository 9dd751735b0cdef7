//! The io_uring driver: one ring per shard, a multishot `recvmsg` filling a
//! provided-buffer ring, a multishot poll on the waker eventfd, and every
//! send of a loop turn submitted as one batch of `sendmsg` SQEs with a single
//! `io_uring_enter`.
//!
//! It exists because it turns the receive side into "read completions from
//! shared memory" and the send side into one system call per loop turn. It
//! is built on the io-uring crate directly (see ARCHITECTURE.md for why not
//! tokio-uring). It must never let the kernel write into or read from memory
//! it has freed or handed out as `&mut`: provided buffers go back to the
//! kernel only after the receive callback returns, send slots are reused only
//! after their completions arrive, and on drop the multishot requests are
//! cancelled and awaited before the buffer ring is unregistered and freed
//! (or the memory is leaked if the kernel does not confirm in time).

use std::alloc::{self, Layout};
use std::io;
use std::mem;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::{BufRingEntry, Fd, Fixed, RecvMsgOut, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

use super::socket::{decode_sockaddr, encode_sockaddr, zeroed_storage};
use super::{check_batch, clear_eventfd, Driver, DriverStats, IoBackend, MAX_DATAGRAM};

/// Submission queue entries: room for a full batch of sends plus re-arms.
const SQ_ENTRIES: u32 = 2 * super::MAX_BATCH as u32;

/// Completion queue entries: more than every buffer plus every send slot can
/// produce between two reaps, so the multishot receive is not cut short.
const CQ_ENTRIES: u32 = 4 * SQ_ENTRIES;

/// Provided buffers (a power of two, at most 32768).
const BUF_COUNT: u16 = 1024;

/// The buffer group id of our provided-buffer ring (one per ring).
const BGID: u16 = 0;

/// Space reserved for a multishot recvmsg result's name: a `sockaddr_in6`
/// holds both families.
const NAME_LEN: usize = mem::size_of::<libc::sockaddr_in6>();

/// One provided buffer: the `io_uring_recvmsg_out` header (16 bytes), the
/// name, and a payload of at least [`MAX_DATAGRAM`] bytes.
const BUF_SIZE: usize = MAX_DATAGRAM + 64;

/// How long one bounded wait for send or cancel completions lasts.
const REAP_WAIT: Duration = Duration::from_millis(5);

/// How many [`REAP_WAIT`]s a flush waits for its sends before cancelling
/// them, and a drop waits for its cancellations before leaking the buffers.
const REAP_ROUNDS: usize = 4;

/// `user_data` of the multishot receive.
const UD_RECV: u64 = 1;
/// `user_data` of the multishot poll on the waker eventfd.
const UD_WAKER: u64 = 2;
/// `user_data` of cancellation requests.
const UD_CANCEL: u64 = 3;
/// `user_data` of send slot `i` is `UD_SEND + i`.
const UD_SEND: u64 = 1 << 16;

/// Checks that io_uring can run this driver here: the sysctl allows it, a
/// ring can be created (seccomp profiles often refuse `io_uring_setup`),
/// the kernel knows `recvmsg`, `sendmsg` and `poll_add`, and a driver (a
/// provided-buffer ring and a multishot receive, Linux 6.0+) starts on an
/// unbound socket. The error says which step failed.
///
/// The probe runs on a short-lived thread of its own: tearing its ring down
/// can interrupt the calling thread's next blocking call (EINTR), and the
/// caller is often the thread that embeds the node.
pub fn probe() -> io::Result<()> {
    std::thread::spawn(probe_on_this_thread)
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the io_uring probe panicked")))
}

fn probe_on_this_thread() -> io::Result<()> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if v.trim() == "2" {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "io_uring is disabled (kernel.io_uring_disabled = 2)",
            ));
        }
    }
    let ring: IoUring = IoUring::new(8).map_err(|e| context(e, "io_uring_setup"))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| context(e, "io_uring probe"))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "recvmsg"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::PollAdd::CODE, "poll_add"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} opcode"),
            ));
        }
    }
    drop(ring);
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    UringDriver::new(socket.into(), -1, 1).map(drop)
}

/// `err` with what we were doing in front of it, same kind.
fn context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// The provided-buffer ring and its buffers: memory the kernel writes
/// received datagrams into, owned here and freed only on drop.
struct ProvidedBuffers {
    /// `BUF_COUNT` ring entries, page aligned (`io_uring_buf_ring`).
    entries: NonNull<BufRingEntry>,
    /// Layout of `entries`.
    entries_layout: Layout,
    /// `BUF_COUNT` buffers of [`BUF_SIZE`] bytes.
    bufs: NonNull<u8>,
    /// Layout of `bufs`.
    bufs_layout: Layout,
    /// Our copy of the ring's tail (the kernel only reads it).
    tail: u16,
    /// Set when the kernel may still use the memory: then drop leaks it.
    leak: bool,
}

impl ProvidedBuffers {
    fn new() -> io::Result<ProvidedBuffers> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let entries_layout = Layout::from_size_align(
            usize::from(BUF_COUNT) * mem::size_of::<BufRingEntry>(),
            page.max(4096),
        )
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer ring layout"))?;
        let bufs_layout = Layout::from_size_align(usize::from(BUF_COUNT) * BUF_SIZE, 64)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "buffer layout"))?;
        // SAFETY: both layouts have a non-zero size.
        let entries =
            NonNull::new(unsafe { alloc::alloc_zeroed(entries_layout) }.cast::<BufRingEntry>());
        // SAFETY: as above.
        let bufs = NonNull::new(unsafe { alloc::alloc_zeroed(bufs_layout) });
        let (Some(entries), Some(bufs)) = (entries, bufs) else {
            alloc::handle_alloc_error(entries_layout)
        };
        let mut provided = ProvidedBuffers {
            entries,
            entries_layout,
            bufs,
            bufs_layout,
            tail: 0,
            leak: false,
        };
        for bid in 0..BUF_COUNT {
            provided.recycle(bid);
        }
        Ok(provided)
    }

    /// Queues buffer `bid` for the kernel (visible after [`Self::publish`]).
    fn recycle(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (BUF_COUNT - 1));
        // SAFETY: slot < BUF_COUNT, inside the entries allocation; bid <
        // BUF_COUNT (checked by callers), so the address is inside `bufs`.
        // The kernel only reads entries between its head and the published
        // tail, and this one is past the published tail, so it is ours.
        // The setters leave the entry's `resv` field (the ring's tail when
        // slot is 0) alone.
        unsafe {
            let entry = &mut *self.entries.as_ptr().add(slot);
            entry.set_addr(self.bufs.as_ptr().add(usize::from(bid) * BUF_SIZE) as u64);
            entry.set_len(BUF_SIZE as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every recycled buffer visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail is the u16 `resv` field of entry 0, inside our
        // allocation, 2-byte aligned; the kernel reads it concurrently, so it
        // is written atomically with release ordering (after the entries).
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// The buffer `bid`, as the kernel filled it, `len` bytes.
    fn buffer(&self, bid: u16, len: usize) -> Option<&[u8]> {
        if bid >= BUF_COUNT {
            return None;
        }
        // SAFETY: bid < BUF_COUNT so the range is inside `bufs`; the kernel
        // handed this buffer back in a completion and gets it again only
        // through `recycle`, after this borrow ends.
        Some(unsafe {
            std::slice::from_raw_parts(
                self.bufs.as_ptr().add(usize::from(bid) * BUF_SIZE),
                len.min(BUF_SIZE),
            )
        })
    }
}

impl Drop for ProvidedBuffers {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: allocated in `new` with exactly these layouts, freed once;
        // the owner unregistered the ring and saw the receive end first.
        unsafe {
            alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            alloc::dealloc(self.bufs.as_ptr(), self.bufs_layout);
        }
    }
}

/// A send slot's kernel-facing header; its pointers are rewritten just
/// before each submission.
struct SendSlot {
    /// The `msghdr` a `SendMsg` SQE points at.
    hdr: libc::msghdr,
    /// The single iovec of `hdr` (its length is the datagram's).
    iov: libc::iovec,
    /// The destination.
    addr: libc::sockaddr_storage,
}

/// A receive completion reaped but not yet handed to the shard.
#[derive(Clone, Copy)]
struct RecvCompletion {
    /// The CQE's result: bytes written into the buffer, or `-errno`.
    result: i32,
    /// The CQE's flags (buffer id, more).
    flags: u32,
}

/// The io_uring driver (see the module documentation).
pub struct UringDriver {
    // Field order is drop order: the ring is closed before the memory it
    // may point at is freed.
    /// The ring.
    ring: IoUring,
    /// The provided-buffer ring receives land in.
    provided: ProvidedBuffers,
    /// The header the multishot receive was armed with (name length only).
    recv_hdr: Box<libc::msghdr>,
    /// Send slot headers.
    send_slots: Box<[SendSlot]>,
    /// Send slot payloads, [`MAX_DATAGRAM`] bytes each.
    send_bufs: Box<[u8]>,
    /// The shard's socket.
    socket: UdpSocket,
    /// The waker's eventfd, or negative for none; not owned.
    waker_fd: RawFd,
    /// Whether the socket is AF_INET6 (IPv4 destinations are then mapped).
    socket_is_v6: bool,
    /// The socket is registered as the ring's file 0, so receives and sends
    /// name it as `Fixed(0)` and the kernel skips looking the descriptor up
    /// for each one (`fget`, ~1 % of a shard's samples at full load).
    fixed_socket: bool,
    /// A multishot receive is armed (no final CQE seen yet).
    recv_armed: bool,
    /// A multishot poll on the waker is armed.
    waker_armed: bool,
    /// The waker poll failed with this errno; reported by `wait`.
    waker_error: Option<i32>,
    /// The waker fired during a reap that was not part of `wait` (e.g. in
    /// `flush`); the next `wait` must return at once instead of sleeping.
    woken: bool,
    /// Receive completions reaped during `wait` or `flush`, for `recv`.
    pending: Vec<RecvCompletion>,
    /// Send slots committed since the last flush.
    queued: usize,
    /// Sends submitted whose completion has not arrived.
    in_flight: usize,
    /// `io_uring_enter` calls made so far (submits and waits).
    enters: u64,
    /// Counters.
    stats: DriverStats,
}

// SAFETY: the raw pointers held (in `ProvidedBuffers` and in the msghdr /
// iovec of the send slots and receive header) only point into allocations
// owned by this same value, which move with it; the kernel's view of them
// is tied to the ring, which also moves with it (IoUring is Send). Nothing
// is shared with another thread.
unsafe impl Send for UringDriver {}

impl std::fmt::Debug for UringDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDriver")
            .field("socket", &self.socket)
            .field("waker_fd", &self.waker_fd)
            .field("batch", &self.send_slots.len())
            .field("queued", &self.queued)
            .field("in_flight", &self.in_flight)
            .field("stats", &self.stats)
            .finish()
    }
}

impl UringDriver {
    /// A driver over `socket` (made non-blocking), woken by the eventfd
    /// `waker_fd` (negative for none; the caller keeps it open for the
    /// driver's lifetime), with `batch` (1..=[`super::MAX_BATCH`]) send
    /// slots. Fails if io_uring, the provided-buffer ring or multishot
    /// receive is unavailable.
    pub fn new(socket: UdpSocket, waker_fd: RawFd, batch: usize) -> io::Result<Self> {
        let batch = check_batch(batch)?;
        socket.set_nonblocking(true)?;
        let socket_is_v6 = socket2::SockRef::from(&socket).domain()? == socket2::Domain::IPV6;
        let ring = build_ring().map_err(|e| context(e, "io_uring_setup"))?;
        let provided = ProvidedBuffers::new()?;
        provided.publish();
        // SAFETY: the entries are BUF_COUNT page-aligned BufRingEntry, alive
        // until `Drop for UringDriver` unregisters them (or leaks them).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(provided.entries.as_ptr() as u64, BUF_COUNT, BGID, 0)
                .map_err(|e| context(e, "registering the provided-buffer ring"))?;
        }
        // Without it (an old kernel, or a limit) the plain descriptor is used.
        let fixed_socket = ring
            .submitter()
            .register_files(&[socket.as_raw_fd()])
            .is_ok();
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
        recv_hdr.msg_namelen = NAME_LEN as libc::socklen_t;
        let slot = || SendSlot {
            // SAFETY: as above.
            hdr: unsafe { mem::zeroed() },
            iov: libc::iovec {
                iov_base: ptr::null_mut(),
                iov_len: 0,
            },
            addr: zeroed_storage(),
        };
        let mut driver = UringDriver {
            ring,
            provided,
            recv_hdr,
            send_slots: (0..batch).map(|_| slot()).collect(),
            send_bufs: vec![0u8; batch * MAX_DATAGRAM].into_boxed_slice(),
            socket,
            waker_fd,
            socket_is_v6,
            fixed_socket,
            recv_armed: false,
            waker_armed: false,
            waker_error: None,
            woken: false,
            pending: Vec::with_capacity(usize::from(BUF_COUNT) * 2),
            queued: 0,
            in_flight: 0,
            enters: 0,
            stats: DriverStats::default(),
        };
        driver.arm()?;
        driver
            .ring
            .submit()
            .map_err(|e| context(e, "io_uring_enter"))?;
        driver.reap();
        // An unsupported multishot receive fails at once, in the submit.
        // ENOBUFS is not that: the receive ran out of provided buffers. With
        // datagrams received (a socket that had some queued) that is the
        // ordinary case `recv` handles (it returns the buffers and re-arms).
        // With none, the kernel saw an empty buffer ring: the receive is
        // armed once more, and if it still finds no buffer the error says
        // so, not that multishot receive is unsupported.
        let mut retried = false;
        loop {
            let failed = driver
                .pending
                .iter()
                .find(|c| c.result < 0 && !cqueue::more(c.flags))
                .map(|c| -c.result);
            let received = driver.pending.iter().any(|c| c.result >= 0);
            match failed {
                None => break,
                Some(libc::ENOBUFS) if received => break,
                Some(libc::ENOBUFS) if !retried => {
                    retried = true;
                    driver.pending.retain(|c| c.result >= 0);
                    driver.provided.publish();
                    driver.arm()?;
                    driver
                        .ring
                        .submit()
                        .map_err(|e| context(e, "io_uring_enter"))?;
                    driver.reap();
                }
                Some(libc::ENOBUFS) => {
                    return Err(io::Error::new(
                        io::ErrorKind::OutOfMemory,
                        "multishot recvmsg: the kernel found no provided buffer at start \
                         (ENOBUFS, twice): the provided-buffer ring is empty, which is a \
                         bug or a resource limit, not a kernel without multishot receive",
                    ));
                }
                Some(errno) => {
                    return Err(context(
                        io::Error::from_raw_os_error(errno),
                        "multishot recvmsg (unsupported by this kernel?)",
                    ));
                }
            }
        }
        if let Some(errno) = driver.waker_error {
            return Err(context(
                io::Error::from_raw_os_error(errno),
                "poll on the waker eventfd",
            ));
        }
        Ok(driver)
    }

    /// The socket this driver reads and writes.
    pub fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// Whether the socket is the ring's registered file 0 (named by index
    /// in every receive and send), or, where registering failed, by its fd.
    pub fn uses_registered_socket(&self) -> bool {
        self.fixed_socket
    }

    /// Queues the multishot receive and waker poll if they are not armed.
    fn arm(&mut self) -> io::Result<()> {
        if !self.recv_armed {
            let sqe = if self.fixed_socket {
                opcode::RecvMsgMulti::new(Fixed(0), &*self.recv_hdr, BGID).build()
            } else {
                opcode::RecvMsgMulti::new(Fd(self.socket.as_raw_fd()), &*self.recv_hdr, BGID)
                    .build()
            }
            .user_data(UD_RECV);
            // SAFETY: `recv_hdr` is boxed and lives as long as the ring; the
            // buffers come from the registered group BGID.
            self.push(&sqe)?;
            self.recv_armed = true;
        }
        if !self.waker_armed && self.waker_fd >= 0 && self.waker_error.is_none() {
            let sqe = opcode::PollAdd::new(Fd(self.waker_fd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(UD_WAKER);
            self.push(&sqe)?;
            self.waker_armed = true;
        }
        Ok(())
    }

    /// Pushes one SQE, submitting first if the queue is full.
    ///
    /// Callers guarantee that whatever the entry points at stays valid
    /// until its (final) completion.
    fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: see the callers: every pointer in the entry targets
            // memory owned by this driver and kept until its completion.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.enters += 1;
            self.ring.submit()?;
        }
    }

    /// Takes every completion from the queue: receives are stashed for
    /// `recv`, sends counted, a waker poll clears the eventfd. Returns
    /// whether the waker fired.
    fn reap(&mut self) -> bool {
        let mut woken = false;
        for cqe in self.ring.completion() {
            let (result, flags) = (cqe.result(), cqe.flags());
            match cqe.user_data() {
                UD_RECV => {
                    if !cqueue::more(flags) {
                        self.recv_armed = false;
                    }
                    self.pending.push(RecvCompletion { result, flags });
                }
                UD_WAKER => {
                    if !cqueue::more(flags) {
                        self.waker_armed = false;
                    }
                    if result < 0 && result != -libc::ECANCELED {
                        self.waker_error = Some(-result);
                    }
                    woken = true;
                }
                ud if ud >= UD_SEND => {
                    self.in_flight = self.in_flight.saturating_sub(1);
                    if result < 0 {
                        self.stats.send_errors += 1;
                    } else {
                        self.stats.sent += 1;
                    }
                }
                _ => {}
            }
        }
        if woken {
            clear_eventfd(self.waker_fd);
            self.woken = true;
        }
        woken
    }

    /// Enters the kernel to submit queued SQEs and wait for `want`
    /// completions, at most `timeout`. Timeouts and signals are not errors.
    fn enter(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        self.enters += 1;
        let submitter = self.ring.submitter();
        let result = match timeout {
            None => submitter.submit_and_wait(want),
            Some(d) => {
                let ts = Timespec::from(d);
                let args = SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(want, &args)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // ETIME: the timeout passed; EINTR: a signal; EBUSY: the
                // completion queue overflowed and must be reaped first.
                Some(libc::ETIME | libc::EINTR | libc::EBUSY) => Ok(()),
                _ => Err(e),
            },
        }
    }

    /// Waits (bounded) until every in-flight send completed; cancels them
    /// after [`REAP_ROUNDS`] waits.
    fn reap_sends(&mut self) -> io::Result<()> {
        let mut rounds = 0;
        loop {
            self.reap();
            if self.in_flight == 0 {
                return Ok(());
            }
            rounds += 1;
            if rounds == REAP_ROUNDS {
                for i in 0..self.send_slots.len() {
                    let sqe = opcode::AsyncCancel::new(UD_SEND + i as u64)
                        .build()
                        .user_data(UD_CANCEL);
                    // SAFETY: a cancellation points at no memory.
                    self.push(&sqe)?;
                }
            } else if rounds > 2 * REAP_ROUNDS {
                // The slots stay unusable (send_slot says None) until the
                // completions arrive in a later reap.
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "io_uring sends did not complete",
                ));
            }
            self.enter(1, Some(REAP_WAIT))?;
        }
    }
}

/// A ring with cooperative task running (completions are posted when we
/// enter the kernel, not by interrupting the shard), falling back to a plain
/// ring on kernels older than 5.19.
fn build_ring() -> io::Result<IoUring> {
    let tuned = IoUring::builder()
        .setup_cqsize(CQ_ENTRIES)
        .setup_clamp()
        .setup_submit_all()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(SQ_ENTRIES);
    match tuned {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .setup_clamp()
            .build(SQ_ENTRIES),
        other => other,
    }
}

impl Driver for UringDriver {
    fn backend(&self) -> IoBackend {
        IoBackend::Uring
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if let Some(errno) = self.waker_error {
            return Err(context(
                io::Error::from_raw_os_error(errno),
                "poll on the waker eventfd",
            ));
        }
        self.arm()?;
        let woken_earlier = std::mem::take(&mut self.woken);
        if woken_earlier || !self.pending.is_empty() || self.reap() || !self.pending.is_empty() {
            // This turn handles the wake-up; do not carry it to the next one.
            self.woken = false;
            // Work is already here: just submit any re-arm.
            if !self.ring.submission().is_empty() {
                self.ring.submit()?;
            }
            return Ok(());
        }
        self.enter(1, timeout)?;
        self.reap();
        self.woken = false;
        Ok(())
    }

    fn recv(&mut self, each: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        {
            let sq = self.ring.submission();
            // Completions waiting as task work or in the overflow list only
            // show after an enter with GETEVENTS, which `submit` does then.
            let nudge = sq.taskrun() || sq.cq_overflow();
            drop(sq);
            if nudge {
                self.ring.submit()?;
            }
        }
        self.reap();
        let mut delivered = 0;
        let mut hard_error = None;
        for c in self.pending.drain(..) {
            if c.result < 0 {
                match -c.result {
                    // Out of buffers (they are returned below and the
                    // receive re-armed; the datagrams wait in the socket),
                    // cancelled, interrupted, or an ICMP error: re-arm.
                    libc::ENOBUFS
                    | libc::ECANCELED
                    | libc::EINTR
                    | libc::ECONNREFUSED
                    | libc::EHOSTUNREACH
                    | libc::ENETUNREACH => {}
                    errno => hard_error = hard_error.or(Some(errno)),
                }
                continue;
            }
            let Some(bid) = cqueue::buffer_select(c.flags) else {
                continue;
            };
            let Some(buffer) = self.provided.buffer(bid, c.result as usize) else {
                self.stats.receive_drops += 1;
                continue;
            };
            match RecvMsgOut::parse(buffer, &self.recv_hdr) {
                Ok(msg)
                    if !msg.is_payload_truncated()
                        && msg.incoming_payload_len() as usize <= MAX_DATAGRAM =>
                {
                    match decode_sockaddr(msg.name_data()) {
                        Some(from) => {
                            each(from, msg.payload_data());
                            self.stats.received += 1;
                            delivered += 1;
                        }
                        None => self.stats.receive_drops += 1,
                    }
                }
                _ => self.stats.receive_drops += 1,
            }
            self.provided.recycle(bid);
        }
        self.provided.publish();
        if !self.recv_armed {
            self.arm()?;
            self.ring.submit()?;
        }
        match hard_error {
            Some(errno) if delivered == 0 => Err(context(
                io::Error::from_raw_os_error(errno),
                "multishot recvmsg",
            )),
            _ => Ok(delivered),
        }
    }

    fn send_slot(&mut self) -> Option<&mut [u8]> {
        if self.in_flight > 0 || self.queued >= self.send_slots.len() {
            return None;
        }
        let start = self.queued * MAX_DATAGRAM;
        Some(&mut self.send_bufs[start..start + MAX_DATAGRAM])
    }

    fn commit_send(&mut self, to: SocketAddr, len: usize) {
        let i = self.queued;
        if self.in_flight > 0 || i >= self.send_slots.len() || len > MAX_DATAGRAM {
            self.stats.send_errors += 1;
            return;
        }
        let slot = &mut self.send_slots[i];
        let Some(namelen) = encode_sockaddr(to, self.socket_is_v6, &mut slot.addr) else {
            self.stats.send_errors += 1;
            return;
        };
        slot.hdr.msg_namelen = namelen;
        slot.iov.iov_len = len;
        self.queued += 1;
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.in_flight > 0 {
            // A previous flush timed out: its slots are still the kernel's.
            return self.reap_sends();
        }
        let n = mem::take(&mut self.queued);
        if n == 0 {
            return Ok(());
        }
        let enters = self.enters;
        let result = self.flush_batch(n);
        self.stats.send_calls += self.enters - enters;
        result
    }

    fn stats(&self) -> &DriverStats {
        &self.stats
    }
}

impl UringDriver {
    /// Submits the `n` queued sends (see [`Driver::flush`]).
    fn flush_batch(&mut self, n: usize) -> io::Result<()> {
        self.arm()?;
        let (fd, fixed) = (self.socket.as_raw_fd(), self.fixed_socket);
        let bufs = self.send_bufs.as_mut_ptr();
        for i in 0..n {
            let slot = &mut self.send_slots[i];
            // SAFETY: i < n <= slot count, so the offset is inside send_bufs.
            slot.iov.iov_base = unsafe { bufs.add(i * MAX_DATAGRAM) }.cast();
            slot.hdr.msg_name = (&mut slot.addr as *mut libc::sockaddr_storage).cast();
            slot.hdr.msg_iov = &mut slot.iov;
            slot.hdr.msg_iovlen = 1;
            let sqe = if fixed {
                opcode::SendMsg::new(Fixed(0), &slot.hdr).build()
            } else {
                opcode::SendMsg::new(Fd(fd), &slot.hdr).build()
            }
            .user_data(UD_SEND + i as u64);
            // SAFETY: the header, iovec, address and payload live in boxed
            // slices owned by the driver; none is touched again (send_slot
            // returns None) until this send's completion is reaped.
            self.push(&sqe)?;
        }
        self.in_flight = n;
        self.stats.send_batches += 1;
        // One io_uring_enter submits the whole batch and waits for it
        // (bounded, in case a send waits for room in the socket buffer).
        self.enter(n, Some(REAP_WAIT))?;
        self.reap_sends()
    }
}

impl Drop for UringDriver {
    fn drop(&mut self) {
        // Cancel the multishot requests and wait (bounded) for their final
        // completions, so the kernel no longer writes into our buffers.
        let mut ok = true;
        for (armed, ud) in [(self.recv_armed, UD_RECV), (self.waker_armed, UD_WAKER)] {
            if armed {
                let sqe = opcode::AsyncCancel::new(ud).build().user_data(UD_CANCEL);
                ok &= self.push(&sqe).is_ok();
            }
        }
        for _ in 0..REAP_ROUNDS {
            self.reap();
            if !self.recv_armed && !self.waker_armed && self.in_flight == 0 {
                break;
            }
            ok &= self.enter(1, Some(REAP_WAIT)).is_ok();
        }
        self.reap();
        let quiet = ok && !self.recv_armed && self.in_flight == 0;
        // A registered file keeps the socket open until the ring lets go of
        // it, and a closed ring does that later, from a kernel worker: drop
        // it now, so the port is free once the driver is gone. (Only when
        // nothing is in flight: unregistering waits for the file's users.)
        if quiet && self.fixed_socket {
            let _ = self.ring.submitter().unregister_files();
        }
        if quiet && self.ring.submitter().unregister_buf_ring(BGID).is_ok() {
            return;
        }
        // The kernel may still hold on to the buffer ring or a send: never
        // free memory it may touch.
        self.provided.leak = true;
        mem::forget(mem::take(&mut self.send_bufs));
        mem::forget(mem::take(&mut self.send_slots));
    }
}
