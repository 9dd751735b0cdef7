//! The epoll calls of the MQTT workers: one instance per worker, its
//! registrations, and the tokens that are not subscriber indices.
//!
//! It exists so that the two `unsafe` calls live in one place; it must not
//! read or write a connection.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};

/// The publisher's epoll token (subscribers' tokens are their indices).
pub(super) const TOKEN_PUBLISHER: u64 = u64::MAX;
/// The wake eventfd's epoll token.
pub(super) const TOKEN_WAKE: u64 = u64::MAX - 1;

/// The events a connection is registered for: readable and hang-up
/// always, writable while output waits for room in its socket.
pub(super) fn connection_events(want_out: bool) -> u32 {
    let mut events = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
    if want_out {
        events |= libc::EPOLLOUT as u32;
    }
    events
}

/// A new epoll instance.
pub(super) fn epoll_new() -> Result<OwnedFd> {
    // SAFETY: epoll_create1 returns a new fd or -1.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("epoll_create1");
    }
    // SAFETY: fd is ours and open.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds (`op` = EPOLL_CTL_ADD) or changes a registration.
pub(super) fn epoll_ctl(
    ep: &OwnedFd,
    op: libc::c_int,
    fd: RawFd,
    events: u32,
    token: u64,
) -> Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a valid epoll_event; the fds are open.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error()).context("epoll_ctl");
    }
    Ok(())
}
