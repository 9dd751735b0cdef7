//! The shard sockets: one SO_REUSEPORT group of UDP sockets bound to the node's
//! address, one socket per shard, and the `sockaddr` conversions both drivers
//! share.
//!
//! It exists so that every platform detail of opening the port (reuse flags,
//! dual stack, forced buffer sizes, resolving port 0 once for the whole group,
//! naming the address in bind errors) lives in one place. It must not choose
//! which shard a datagram goes to (that is [`super::steer`]) nor read or write
//! datagrams (that is the drivers).

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

/// A bind that failed, with the address it was for; carried inside the
/// [`io::Error`] returned by [`bind_group`] (reach it with
/// `io::Error::get_ref` and `downcast_ref`).
#[derive(Debug, thiserror::Error)]
#[error("cannot bind UDP socket {index} of {count} to {addr}: {source}")]
pub struct BindError {
    /// The address the socket was being bound to.
    pub addr: SocketAddr,
    /// Which socket of the group (0-based).
    pub index: usize,
    /// The size of the group.
    pub count: usize,
    /// The kernel's error (`EADDRINUSE` when the port is taken).
    #[source]
    pub source: io::Error,
}

/// Opens `count` UDP sockets in one SO_REUSEPORT group, all bound to `addr`.
///
/// Each socket has SO_REUSEPORT and SO_REUSEADDR, is non-blocking and
/// close-on-exec, and has receive and send buffers of `buffer_bytes`
/// (SO_RCVBUFFORCE / SO_SNDBUFFORCE when the process may exceed the sysctl
/// limits, the capped SO_RCVBUF / SO_SNDBUF otherwise; 0 keeps the kernel's
/// defaults). An IPv6 unspecified address (`[::]`) is dual-stack (IPV6_V6ONLY
/// off), as is a v4-mapped one (`[::ffff:127.0.0.1]`), which takes IPv4
/// traffic on an IPv6 socket. When the port is 0 the first socket gets a port from the kernel and
/// the others join it, so the group shares one real port.
///
/// The order of the returned sockets is the order of the group, which is the
/// index the steering program of [`super::steer::attach_steering`] selects.
///
/// Errors: `InvalidInput` for `count == 0`; a failed bind keeps the kernel's
/// error kind (`AddrInUse` for a taken port) and its message names the
/// address (the payload is a [`BindError`]).
pub fn bind_group(
    addr: SocketAddr,
    count: usize,
    buffer_bytes: usize,
) -> io::Result<Vec<UdpSocket>> {
    if count == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a socket group needs at least one socket",
        ));
    }
    // SO_REUSEPORT lets a second process of the same user join our group
    // silently and take a share of the traffic. A plain bind first (without
    // SO_REUSEPORT) fails if anything holds the port, which is what an
    // operator means by "port taken".
    if addr.port() != 0 {
        if let Err(source) = UdpSocket::bind(addr) {
            return Err(io::Error::new(
                source.kind(),
                BindError {
                    addr,
                    index: 0,
                    count,
                    source,
                },
            ));
        }
    }
    let mut sockets = Vec::with_capacity(count);
    let mut bind_addr = addr;
    for index in 0..count {
        let socket = open_member(bind_addr, buffer_bytes)?;
        if let Err(source) = socket.bind(&bind_addr.into()) {
            return Err(io::Error::new(
                source.kind(),
                BindError {
                    addr: bind_addr,
                    index,
                    count,
                    source,
                },
            ));
        }
        let socket: UdpSocket = socket.into();
        if index == 0 && bind_addr.port() == 0 {
            bind_addr.set_port(local_port(&socket)?);
        }
        sockets.push(socket);
    }
    Ok(sockets)
}

/// [`bind_group`], retried while the port is in use for at most `patience`:
/// a node killed a moment ago may still hold its port while the kernel tears
/// its sockets down (an io_uring ring releases its registered socket later,
/// from a worker), and a restart must not fail on that. A port held by a
/// live process is still refused, `patience` later.
pub fn bind_group_retrying(
    addr: SocketAddr,
    count: usize,
    buffer_bytes: usize,
    patience: std::time::Duration,
) -> io::Result<Vec<UdpSocket>> {
    let until = std::time::Instant::now() + patience;
    let mut logged = false;
    loop {
        match bind_group(addr, count, buffer_bytes) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && std::time::Instant::now() < until => {
                if !logged {
                    tracing::debug!(%addr, "UDP port busy (a stopped node's socket in teardown?): retrying");
                    logged = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The port a bound socket is bound to.
pub fn local_port(socket: &UdpSocket) -> io::Result<u16> {
    Ok(socket.local_addr()?.port())
}

/// The receive and send buffer sizes the kernel reports for `socket` (twice
/// the requested size on Linux, which keeps half for bookkeeping); handy to
/// check that [`bind_group`]'s request was not capped by `net.core.rmem_max`.
pub fn buffer_sizes(socket: &UdpSocket) -> io::Result<(usize, usize)> {
    let socket = socket2::SockRef::from(socket);
    Ok((socket.recv_buffer_size()?, socket.send_buffer_size()?))
}

/// Datagrams the kernel dropped at this socket because its receive buffer
/// was full (`SO_MEMINFO`'s `SK_MEMINFO_DROPS`, a wrapping 32-bit count);
/// `None` when the kernel does not say.
pub fn kernel_drops(fd: std::os::fd::RawFd) -> Option<u32> {
    const SK_MEMINFO_DROPS: usize = 8;
    let mut info = [0u32; 16];
    let mut len = mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes; the kernel writes at most
    // `len` bytes and stores the length it wrote back into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < (SK_MEMINFO_DROPS + 1) * mem::size_of::<u32>() {
        return None;
    }
    Some(info[SK_MEMINFO_DROPS])
}

/// A configured, unbound member of the group.
fn open_member(addr: SocketAddr, buffer_bytes: usize) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if let SocketAddr::V6(v6) = addr {
        // Dual stack for `[::]`; a v4-mapped address needs it to bind at all.
        if v6.ip().is_unspecified() || v6.ip().to_ipv4_mapped().is_some() {
            socket.set_only_v6(false)?;
        }
    }
    if buffer_bytes > 0 {
        set_buffers(&socket, buffer_bytes)?;
    }
    set_dont_fragment(&socket, addr.is_ipv6())?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Sends with the don't-fragment bit set and no path-MTU bookkeeping
/// (`IP_PMTUDISC_PROBE`, as QUIC stacks do): every packet of the protocol
/// fits 1,280 bytes (`MAX_PACKET` is 1,232), so it never needs the IP
/// layer's fragmentation, and with DF set the kernel skips choosing an IP
/// identification per datagram (a keyed hash and a shared counter, ~2 % of a
/// shard's time at full load). An IPv6 socket gets the IPv6 option too, and
/// the IPv4 one for v4-mapped traffic when it is dual-stack.
pub fn set_dont_fragment(socket: &Socket, is_ipv6: bool) -> io::Result<()> {
    let (ip, mode) = (libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_PROBE);
    if is_ipv6 {
        set_int_option(
            socket,
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )?;
        // Only a dual-stack socket carries IPv4; a v6-only one refuses this.
        let _ = set_int_option(socket, libc::IPPROTO_IP, ip, mode);
        Ok(())
    } else {
        set_int_option(socket, libc::IPPROTO_IP, ip, mode)
    }
}

/// `setsockopt(level, option, value)` for an `int` option.
fn set_int_option(
    socket: &Socket,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size to
    // setsockopt on a socket the caller owns; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks for receive and send buffers of `bytes` each on any socket: with
/// SO_RCVBUFFORCE / SO_SNDBUFFORCE, which go past `net.core.rmem_max` /
/// `wmem_max` but need CAP_NET_ADMIN (root), and otherwise, silently, with
/// the plain SO_RCVBUF / SO_SNDBUF, which the kernel caps at those sysctls.
/// [`buffer_sizes`] tells what the kernel granted (twice the request on
/// Linux). The node's sockets get theirs through [`bind_group`]; the load
/// generator calls it for its own.
///
/// Errors: only the capped option's failure (not expected on a UDP socket).
pub fn set_buffers(socket: &Socket, bytes: usize) -> io::Result<()> {
    set_buffer(socket, libc::SO_RCVBUFFORCE, bytes, |s, n| {
        s.set_recv_buffer_size(n)
    })?;
    set_buffer(socket, libc::SO_SNDBUFFORCE, bytes, |s, n| {
        s.set_send_buffer_size(n)
    })
}

/// Sets a buffer size with the `*FORCE` option (needs CAP_NET_ADMIN, ignores
/// `net.core.*mem_max`), falling back silently to the capped option.
fn set_buffer(
    socket: &Socket,
    force_option: libc::c_int,
    bytes: usize,
    capped: impl Fn(&Socket, usize) -> io::Result<()>,
) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    set_int_option(socket, libc::SOL_SOCKET, force_option, value).or_else(|_| capped(socket, bytes))
}

/// Writes `to` into `out` in the form a socket of the given family takes:
/// an IPv4 destination on an IPv6 socket becomes `::ffff:a.b.c.d`, a
/// v4-mapped destination on an IPv4 socket becomes plain IPv4. Returns the
/// address length, or `None` when the socket cannot reach `to` (a real IPv6
/// address on an IPv4 socket).
pub(crate) fn encode_sockaddr(
    to: SocketAddr,
    socket_is_v6: bool,
    out: &mut libc::sockaddr_storage,
) -> Option<libc::socklen_t> {
    let to = match (to, socket_is_v6) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        (SocketAddr::V6(v6), false) => {
            let v4 = v6.ip().to_ipv4_mapped()?;
            SocketAddr::V4(SocketAddrV4::new(v4, v6.port()))
        }
        (to, _) => to,
    };
    match to {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and at least as aligned
            // as sockaddr_in (that is its purpose); `out` is a valid &mut.
            unsafe {
                (out as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            Some(mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6 (28 bytes, 4-byte aligned).
            unsafe {
                (out as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            Some(mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Reads a `sockaddr_in` / `sockaddr_in6` from raw bytes as the kernel wrote
/// them (any alignment). A v4-mapped IPv6 source (a dual-stack socket
/// receiving from an IPv4 peer) is returned as IPv4, so a peer has one
/// address whatever the socket's family. `None` for anything else.
pub(crate) fn decode_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*name.first()?, *name.get(1)?]);
    let port = u16::from_be_bytes([*name.get(2)?, *name.get(3)?]);
    if libc::c_int::from(family) == libc::AF_INET {
        let ip: [u8; 4] = name.get(4..8)?.try_into().ok()?;
        Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
    } else if libc::c_int::from(family) == libc::AF_INET6 {
        let flowinfo = u32::from_be_bytes(name.get(4..8)?.try_into().ok()?);
        let ip: [u8; 16] = name.get(8..24)?.try_into().ok()?;
        let scope_id = u32::from_ne_bytes(name.get(24..28)?.try_into().ok()?);
        let ip = Ipv6Addr::from(ip);
        Some(match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
            None => SocketAddr::V6(SocketAddrV6::new(ip, port, flowinfo, scope_id)),
        })
    } else {
        None
    }
}

/// The bytes of a `sockaddr_storage` the kernel filled, `len` of them.
pub(crate) fn storage_bytes(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> &[u8] {
    let len = (len as usize).min(mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: sockaddr_storage is plain old data, fully initialised (every
    // driver zeroes it at construction), and `len` is clamped to its size.
    unsafe {
        std::slice::from_raw_parts((storage as *const libc::sockaddr_storage).cast::<u8>(), len)
    }
}

/// An all-zero `sockaddr_storage`.
pub(crate) fn zeroed_storage() -> libc::sockaddr_storage {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(to: SocketAddr, v6: bool) -> Option<SocketAddr> {
        let mut storage = zeroed_storage();
        let len = encode_sockaddr(to, v6, &mut storage)?;
        decode_sockaddr(storage_bytes(&storage, len))
    }

    /// Datagrams sent to a socket nobody reads overflow its receive buffer;
    /// the kernel counts each one it drops, and `kernel_drops` reads that.
    #[test]
    fn kernel_drops_counts_what_a_full_receive_buffer_dropped() {
        use std::os::fd::AsRawFd;
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
        // The smallest buffer the kernel allows (it enforces a floor).
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(1)
            .expect("SO_RCVBUF");
        let before = kernel_drops(rx.as_raw_fd()).expect("SO_MEMINFO");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind tx");
        let to = rx.local_addr().expect("addr");
        // Loopback delivers (or drops) inside send_to, so the count is
        // settled when the loop ends: a few KiB of buffer cannot hold 200 KB.
        for _ in 0..200 {
            tx.send_to(&[0u8; 1000], to).expect("send");
        }
        let after = kernel_drops(rx.as_raw_fd()).expect("SO_MEMINFO");
        let dropped = after.wrapping_sub(before);
        assert!(dropped > 100, "dropped {dropped} of 200");
        assert!(dropped < 200, "some fit: dropped {dropped} of 200");
    }

    fn int_option(fd: libc::c_int, level: libc::c_int, option: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = -1;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into a live c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                level,
                option,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt: {}", io::Error::last_os_error());
        value
    }

    /// The group's sockets send with DF set and no path-MTU bookkeeping,
    /// and a datagram still goes through.
    #[test]
    fn group_sockets_set_dont_fragment() {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let group = bind_group(addr, 2, 0).expect("bind");
        for s in &group {
            let mode = int_option(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER);
            assert_eq!(mode, libc::IP_PMTUDISC_PROBE);
        }
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind rx");
        let n = group[0]
            .send_to(&[7u8; 1232], rx.local_addr().expect("addr"))
            .expect("send");
        assert_eq!(n, 1232);
        let mut buf = [0u8; 1500];
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(rx.recv(&mut buf).expect("recv"), 1232);
        if let Ok(v6) = bind_group("[::1]:0".parse().expect("v6"), 1, 0) {
            let mode = int_option(
                v6[0].as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
            );
            assert_eq!(mode, libc::IPV6_PMTUDISC_PROBE);
        }
    }

    #[test]
    fn v4_and_v6_roundtrip() {
        let v4: SocketAddr = "192.0.2.7:15099".parse().expect("v4");
        let v6: SocketAddr = "[2001:db8::5]:443".parse().expect("v6");
        assert_eq!(roundtrip(v4, false), Some(v4));
        assert_eq!(roundtrip(v6, true), Some(v6));
    }

    #[test]
    fn v4_on_a_v6_socket_is_mapped_and_reads_back_as_v4() {
        let v4: SocketAddr = "127.0.0.1:9".parse().expect("v4");
        let mut storage = zeroed_storage();
        let len = encode_sockaddr(v4, true, &mut storage).expect("encodable");
        assert_eq!(len as usize, mem::size_of::<libc::sockaddr_in6>());
        assert_eq!(storage.ss_family as libc::c_int, libc::AF_INET6);
        assert_eq!(decode_sockaddr(storage_bytes(&storage, len)), Some(v4));
    }

    #[test]
    fn real_v6_on_a_v4_socket_is_refused_mapped_is_not() {
        let v6: SocketAddr = "[2001:db8::5]:443".parse().expect("v6");
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:7".parse().expect("mapped");
        let mut storage = zeroed_storage();
        assert_eq!(encode_sockaddr(v6, false, &mut storage), None);
        assert_eq!(
            roundtrip(mapped, false),
            Some("10.0.0.1:7".parse().expect("v4"))
        );
    }

    #[test]
    fn garbage_names_decode_to_none() {
        assert_eq!(decode_sockaddr(&[]), None);
        assert_eq!(decode_sockaddr(&[2, 0, 0]), None);
        let unix_family = (libc::AF_UNIX as u16).to_ne_bytes();
        assert_eq!(
            decode_sockaddr(&[unix_family[0], unix_family[1], 0, 0, 0, 0, 0, 0]),
            None
        );
    }

    #[test]
    fn empty_group_is_invalid_input() {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let err = bind_group(addr, 0, 0).expect_err("count 0");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
