//! The loadgen's UDP sockets and the two calls it makes around the library's
//! [`MmsgBatch`]: sending a whole queued batch, and sleeping until a socket
//! is readable.
//!
//! The batches themselves (buffers, addresses, mmsghdr arrays) and the
//! socket buffer sizing are the node's own (`mpp::net::mmsg`,
//! `mpp::net::socket`): this file must not grow a second copy of either.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use mpp::net::mmsg::MmsgBatch;
use socket2::{Domain, Protocol, Socket, Type};

/// Receive and send buffer size asked for every loadgen socket.
const SOCKET_BUFFER: usize = 8 << 20;

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
    // Forced past rmem_max when root, as the node's sockets are.
    mpp::net::socket::set_buffers(&sock, SOCKET_BUFFER)
        .context("setting a UDP socket's buffer sizes")?;
    // DF as the node sets it: the baselines and the devices pay what the
    // node pays per datagram, no more (no per-datagram IP identification).
    mpp::net::socket::set_dont_fragment(&sock, peer.is_ipv6())
        .context("setting IP_MTU_DISCOVER on a UDP socket")?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Sends every datagram queued in `batch` on `fd` and empties the queue;
/// returns how many the kernel took. It stops at the first refusal (a full
/// send buffer, above all): the caller counts the difference as send errors
/// and its timers resend what matters.
pub(crate) fn send_all(batch: &mut MmsgBatch, fd: i32) -> usize {
    let queued = batch.queued();
    let mut sent = 0;
    while sent < queued {
        match batch.send(fd, sent) {
            Ok(n) if n > 0 => sent += n,
            _ => break,
        }
    }
    batch.clear();
    sent
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
