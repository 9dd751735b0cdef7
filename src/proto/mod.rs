//! Sans-IO protocol state machines: the server shard and the client.
//!
//! Both follow quinn's shape. Input comes in through `handle_*` calls that
//! take the current time as an argument; output comes out of `poll_*` calls:
//! `poll_transmit` writes the next datagram into the caller's buffer,
//! `poll_timeout` says when `handle_timeout` wants to be called, and
//! `poll_event` hands out what the application must act on. Nothing here opens
//! a socket, spawns a thread or reads a clock, which is what lets the
//! simulated-network tests drive a client and a server through loss,
//! reordering and corruption deterministically, and lets the node, the `mpp`
//! CLI and the load generator share one implementation.

pub mod client;
pub mod limit;
mod replay;
pub mod revocation;
pub mod service;
pub mod stun;

pub use client::{
    seal_request, seal_request_acknowledging, seal_request_with, Client, ClientConfig, ClientEvent,
    ClientState, ClientStats, DisconnectReason, Request, RequestHeader, SealRequestError,
};
pub use replay::{Freshness, ReplayWindow};
pub use service::{
    CatchUpToken, KeySet, PublishError, ResolveToken, Restored, SavedConnection, Service,
    ServiceConfig, ServiceEvent, ServiceStats, WebRequestId, DEFAULT_CATCH_UP_WINDOW_SECS,
};

use std::net::SocketAddr;

/// A datagram written into the caller's buffer by a `poll_transmit` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send it.
    pub destination: SocketAddr,
    /// Bytes of the caller's buffer that hold the datagram.
    pub size: usize,
    /// Set when this answers a web-service transport request: hand the bytes
    /// to that HTTP request instead of sending them by UDP.
    pub web: Option<WebRequestId>,
}

/// Default ConnectionTimeout announced to clients, in milliseconds (docs/PROTOCOL.md §6).
pub const CONNECTION_TIMEOUT_MS: u32 = 60_000;
/// First retransmission delay of an unacknowledged notify (docs/PROTOCOL.md §6).
pub const RETRANSMIT_INITIAL_MS: u64 = 1_000;
/// Retransmissions of one notify before waiting for the next heartbeat (docs/PROTOCOL.md §6).
pub const RETRANSMIT_TRIES: u8 = 5;
/// Largest notify bitmask in bytes (docs/PROTOCOL.md §2).
pub const MAX_BITMASK: usize = 32;
