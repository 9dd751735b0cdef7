//! Sockets and batched datagram I/O for one shard: the only layer that talks
//! to the kernel's network stack.
//!
//! Each shard owns one UDP socket of a SO_REUSEPORT group (all bound to the
//! same address, large buffers) and one [`Driver`] over it. Two drivers
//! implement the same trait: [`uring::UringDriver`] (io_uring: multishot
//! recvmsg into a provided-buffer ring, every send of a loop turn submitted as
//! one batch with a single `io_uring_enter`) and [`mmsg::MmsgDriver`]
//! (`recvmmsg`/`sendmmsg`, for kernels or containers where io_uring is
//! unavailable). [`steer`] attaches the classic-BPF program that sends each
//! datagram to the socket of the shard owning its account (docs/PROTOCOL.md §8).
//! [`open_driver`] opens either backend; [`detect_backend`] picks io_uring
//! when [`uring::probe`] passes.
//!
//! This layer contains no protocol logic: it moves opaque datagrams.

pub mod mmsg;
pub mod socket;
pub mod steer;
pub mod uring;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::RawFd;
use std::time::Duration;

/// Most send slots (and receive slots per `recvmmsg`) a driver holds: the
/// kernel's `UIO_MAXIOV`, beyond which `sendmmsg`/`recvmmsg` silently clamp.
pub const MAX_BATCH: usize = 1024;

/// Largest datagram a driver receives; anything longer is truncated by the
/// kernel and dropped by the driver (MPP packets are at most 1232 bytes).
pub const MAX_DATAGRAM: usize = 2048;

/// Which I/O backend a shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring.
    Uring,
    /// recvmmsg / sendmmsg.
    Mmsg,
}

impl IoBackend {
    /// The name used on the command line and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Mmsg => "mmsg",
        }
    }
}

/// Counters a driver keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams the kernel refused to send (counted, never retried).
    pub send_errors: u64,
    /// Received datagrams dropped (truncated, or no buffer available).
    pub receive_drops: u64,
    /// Batches submitted: flushes with something to send (uring), or
    /// `sendmmsg` calls (mmsg).
    pub send_batches: u64,
    /// System calls the flushes made: every `io_uring_enter` (uring: the
    /// submit and wait of the batch, a submit forced by a full submission
    /// queue, a further wait for completions), every `sendmmsg` and every
    /// `poll` for room in the send buffer (mmsg). One per flush when all
    /// goes well.
    pub send_calls: u64,
}

/// Batched datagram I/O over one socket, woken early by an eventfd.
///
/// The shard loop is: [`Driver::wait`] (blocks until datagrams arrive, the
/// waker fires, or the timeout passes) → [`Driver::recv`] hands every
/// datagram received to a closure → the shard fills send slots with
/// [`Driver::send_slot`] + [`Driver::commit_send`] → [`Driver::flush`]
/// submits all of them as one batch.
pub trait Driver {
    /// Which backend this is.
    fn backend(&self) -> IoBackend;

    /// Blocks until a datagram is ready, the waker eventfd is signalled, or
    /// `timeout` passes (`None` = no timeout). Returns immediately if
    /// datagrams are already waiting. Clears the waker's count when it fired.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;

    /// Hands every datagram received so far to `each(from, bytes)`, without
    /// blocking, and returns how many there were. Buffers are reused: no
    /// allocation per datagram.
    fn recv(&mut self, each: &mut dyn FnMut(SocketAddr, &[u8])) -> io::Result<usize>;

    /// A free send buffer of at least [`MAX_DATAGRAM`] bytes, or `None` when
    /// every slot of this batch is in use (then call [`Driver::flush`]).
    fn send_slot(&mut self) -> Option<&mut [u8]>;

    /// Queues the first `len` bytes of the slot last returned by
    /// [`Driver::send_slot`] for `to`.
    fn commit_send(&mut self, to: SocketAddr, len: usize);

    /// Submits every queued send as one batch and waits until the kernel has
    /// taken them, so all slots are free again afterwards.
    fn flush(&mut self) -> io::Result<()>;

    /// Counters.
    fn stats(&self) -> &DriverStats;
}

// `Driver` must stay usable as `Box<dyn Driver + Send>` (see [`open_driver`]).
const _: Option<&(dyn Driver + Send)> = None;

/// Opens the chosen backend's driver over `socket` (made non-blocking),
/// watching `waker_fd` (a [`Waker::fd`]; negative for none), with `batch`
/// send slots (1..=[`MAX_BATCH`]; the mmsg driver also receives up to
/// `batch` datagrams per system call).
///
/// Call it on the shard thread that will run the driver: the io_uring ring
/// works from any thread, but its completions are cheapest on the thread
/// that submits. Fails if the backend cannot run here (see [`uring::probe`]).
pub fn open_driver(
    backend: IoBackend,
    socket: UdpSocket,
    waker_fd: RawFd,
    batch: usize,
) -> io::Result<Box<dyn Driver + Send>> {
    Ok(match backend {
        IoBackend::Uring => Box::new(uring::UringDriver::new(socket, waker_fd, batch)?),
        IoBackend::Mmsg => Box::new(mmsg::MmsgDriver::new(socket, waker_fd, batch)?),
    })
}

/// [`IoBackend::Uring`] when io_uring works here ([`uring::probe`] succeeds),
/// otherwise [`IoBackend::Mmsg`] (old kernels, `kernel.io_uring_disabled`,
/// seccomp profiles of container runtimes).
pub fn detect_backend() -> IoBackend {
    detect_backend_why().0
}

/// [`detect_backend`], with the reason io_uring was not picked (the probe's
/// error, which names the step that failed), for the log.
pub fn detect_backend_why() -> (IoBackend, Option<io::Error>) {
    match uring::probe() {
        Ok(()) => (IoBackend::Uring, None),
        Err(e) => (IoBackend::Mmsg, Some(e)),
    }
}

/// Checks a requested batch size: 1..=[`MAX_BATCH`].
pub(crate) fn check_batch(batch: usize) -> io::Result<usize> {
    if (1..=MAX_BATCH).contains(&batch) {
        Ok(batch)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("driver batch must be 1..={MAX_BATCH}, not {batch}"),
        ))
    }
}

/// A wait timeout in whole milliseconds for poll(2), rounded up so a
/// sub-millisecond timeout still sleeps rather than spins; -1 for none.
pub(crate) fn timeout_millis(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(d) => {
            let ms = d.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

/// Resets an eventfd's counter (a no-op when it is already zero or `fd` is
/// negative).
pub(crate) fn clear_eventfd(fd: RawFd) {
    if fd < 0 {
        return;
    }
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a valid u64; the eventfd is
    // non-blocking, so an empty counter returns EAGAIN, which is fine.
    unsafe {
        libc::read(fd, (&mut v as *mut u64).cast(), 8);
    }
}

/// An eventfd that wakes a shard's [`Driver::wait`] from another thread.
#[derive(Debug)]
pub struct Waker {
    fd: RawFd,
}

impl Waker {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker { fd })
    }

    /// The eventfd, for the driver to watch.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Wakes the shard (cheap; coalesces).
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our own eventfd. A full
        // counter (EAGAIN) means a wake is already pending, which is enough.
        unsafe {
            libc::write(self.fd, (&one as *const u64).cast(), 8);
        }
    }

    /// Resets the counter after a wake-up.
    pub fn clear(&self) {
        clear_eventfd(self.fd);
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: we own the fd and close it once.
        unsafe {
            libc::close(self.fd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_whole_milliseconds() {
        assert_eq!(timeout_millis(None), -1);
        assert_eq!(timeout_millis(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_millis(Some(Duration::from_micros(10))), 1);
        assert_eq!(timeout_millis(Some(Duration::from_millis(50))), 50);
        assert_eq!(
            timeout_millis(Some(Duration::from_secs(u64::MAX))),
            libc::c_int::MAX
        );
    }

    #[test]
    fn batch_bounds() {
        assert!(check_batch(0).is_err());
        assert_eq!(check_batch(1).ok(), Some(1));
        assert_eq!(check_batch(MAX_BATCH).ok(), Some(MAX_BATCH));
        assert!(check_batch(MAX_BATCH + 1).is_err());
    }

    #[test]
    fn waker_wakes_and_clears() {
        let waker = Waker::new().expect("eventfd");
        waker.wake();
        waker.wake();
        let mut fds = [libc::pollfd {
            fd: waker.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) }, 1);
        waker.clear();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) }, 0);
    }
}
