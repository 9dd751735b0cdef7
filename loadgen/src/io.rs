//! Batched UDP I/O: recvmmsg/sendmmsg over non-blocking sockets.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Largest datagram any scenario sends or receives.
pub(crate) const BUF_LEN: usize = 1500;

/// A non-blocking UDP socket connected to `peer`, with large buffers.
pub(crate) fn connected_socket(peer: SocketAddr) -> Result<Socket> {
    let sock = unconnected_socket(peer)?;
    sock.connect(&peer.into())
        .with_context(|| format!("connecting a UDP socket to {peer}"))?;
    Ok(sock)
}

/// A non-blocking UDP socket of `peer`'s family on an ephemeral loopback or
/// wildcard port, with large buffers.
pub(crate) fn unconnected_socket(peer: SocketAddr) -> Result<Socket> {
    let domain = if peer.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).context("UDP socket")?;
    set_buffers(&sock);
    // DF as the node sets it: the baselines and the devices pay what the
    // node pays per datagram, no more (no per-datagram IP identification).
    mpp::net::socket::set_dont_fragment(&sock, peer.is_ipv6())
        .context("setting IP_MTU_DISCOVER on a UDP socket")?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Asks for 8 MiB buffers, forcing them past rmem_max when root.
pub(crate) fn set_buffers(sock: &Socket) {
    const SIZE: libc::c_int = 8 << 20;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: setsockopt reads an int of the given size.
        let ok = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                force,
                (&SIZE as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } == 0;
        if !ok {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    plain,
                    (&SIZE as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
}

/// Buffers for one recvmmsg or sendmmsg batch.
pub(crate) struct Batch {
    bufs: Vec<[u8; BUF_LEN]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    addrs: Vec<libc::sockaddr_storage>,
    /// Length of each datagram.
    pub(crate) lens: Vec<usize>,
    /// A tag per queued datagram (the device index, for the caller).
    pub(crate) tags: Vec<u32>,
    /// Datagrams queued for sending.
    pub(crate) len: usize,
}

// SAFETY: the raw pointers in iovs/hdrs point into this struct's own heap
// buffers, which move with it; nothing is shared.
unsafe impl Send for Batch {}

impl Batch {
    /// Room for `n` datagrams.
    pub(crate) fn new(n: usize) -> Batch {
        let mut b = Batch {
            bufs: vec![[0u8; BUF_LEN]; n],
            // SAFETY: iovec, mmsghdr and sockaddr_storage are plain C structs;
            // all-zero is a valid value of each.
            iovs: vec![unsafe { std::mem::zeroed() }; n],
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
            addrs: vec![unsafe { std::mem::zeroed() }; n],
            lens: vec![0; n],
            tags: vec![0; n],
            len: 0,
        };
        for i in 0..n {
            b.iovs[i].iov_base = b.bufs[i].as_mut_ptr().cast();
            b.iovs[i].iov_len = BUF_LEN;
            b.hdrs[i].msg_hdr.msg_iov = &mut b.iovs[i];
            b.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        b
    }

    /// Datagrams the batch holds.
    pub(crate) fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Whether no more datagrams can be queued.
    pub(crate) fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    /// Buffer `i`.
    pub(crate) fn buf(&mut self, i: usize) -> &mut [u8; BUF_LEN] {
        &mut self.bufs[i]
    }

    /// The next free send buffer; commit it with [`Batch::push`].
    pub(crate) fn next_buf(&mut self) -> &mut [u8; BUF_LEN] {
        &mut self.bufs[self.len]
    }

    /// Queues the datagram written into [`Batch::next_buf`].
    pub(crate) fn push(&mut self, len: usize, tag: u32) {
        self.lens[self.len] = len;
        self.tags[self.len] = tag;
        self.len += 1;
    }

    /// Queues the datagram written into [`Batch::next_buf`] for `to` (on an
    /// unconnected socket).
    pub(crate) fn push_to(&mut self, len: usize, tag: u32, to: &SockAddr) {
        let i = self.len;
        // SAFETY: SockAddr holds a valid sockaddr of `len()` bytes, at most
        // the size of sockaddr_storage.
        unsafe {
            std::ptr::copy_nonoverlapping(
                to.as_ptr().cast::<u8>(),
                (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                to.len() as usize,
            );
        }
        self.hdrs[i].msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
        self.hdrs[i].msg_hdr.msg_namelen = to.len();
        self.push(len, tag);
    }

    /// Receives up to a batch without blocking; returns how many arrived
    /// (their lengths in `lens`), or the error.
    pub(crate) fn recv(&mut self, fd: i32) -> std::io::Result<usize> {
        self.recv_batch(fd, false)
    }

    /// Receives up to a batch, keeping each sender's address (for a
    /// reflector); returns how many arrived.
    pub(crate) fn recv_from(&mut self, fd: i32) -> std::io::Result<usize> {
        self.recv_batch(fd, true)
    }

    fn recv_batch(&mut self, fd: i32, keep_addr: bool) -> std::io::Result<usize> {
        let n = self.capacity();
        for i in 0..n {
            self.iovs[i].iov_len = BUF_LEN;
            self.hdrs[i].msg_len = 0;
            if keep_addr {
                self.hdrs[i].msg_hdr.msg_name =
                    (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                self.hdrs[i].msg_hdr.msg_namelen =
                    std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            } else {
                self.hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
                self.hdrs[i].msg_hdr.msg_namelen = 0;
            }
        }
        // SAFETY: hdrs point at iovs which point at bufs, and msg_name (when
        // set) at this batch's address storage, all alive and sized.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let got = got as usize;
        for i in 0..got {
            self.lens[i] = self.hdrs[i].msg_len as usize;
        }
        Ok(got)
    }

    /// Sends the first `len` queued datagrams (to the addresses they were
    /// received from or queued for, or the connected peer); returns how many
    /// the kernel took and empties the batch. Datagrams it did not take are
    /// reported as the difference.
    pub(crate) fn send(&mut self, fd: i32) -> std::io::Result<usize> {
        let len = self.len;
        self.len = 0;
        if len == 0 {
            return Ok(0);
        }
        for i in 0..len {
            self.iovs[i].iov_len = self.lens[i];
        }
        let mut sent = 0;
        while sent < len {
            // SAFETY: as in recv; only the first `len` entries are passed.
            let n = unsafe {
                libc::sendmmsg(fd, self.hdrs[sent..].as_mut_ptr(), (len - sent) as u32, 0)
            };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                for i in 0..len {
                    self.hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
                    self.hdrs[i].msg_hdr.msg_namelen = 0;
                }
                return if sent > 0 || e.kind() == std::io::ErrorKind::WouldBlock {
                    Ok(sent)
                } else {
                    Err(e)
                };
            }
            sent += n as usize;
        }
        for i in 0..len {
            self.hdrs[i].msg_hdr.msg_name = std::ptr::null_mut();
            self.hdrs[i].msg_hdr.msg_namelen = 0;
        }
        Ok(sent)
    }

    /// Marks the first `n` received datagrams as queued for sending back
    /// (a reflector echoes in place).
    pub(crate) fn echo(&mut self, n: usize) {
        self.len = n;
    }
}

/// Blocks up to `ms` for any of `fds` to become readable.
pub(crate) fn wait_readable(fds: &[i32], ms: i32) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of pollfd of the given length.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
}
