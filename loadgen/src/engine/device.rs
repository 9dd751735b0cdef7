//! One simulated device as a worker holds it: a compact record (its two
//! packet keys, Serials, the request in flight, a state byte), the record of
//! a heartbeat or disconnect in flight, and a connect's timer.
//!
//! It exists so that the record's size is visible and tested: ten million
//! of them must fit in memory, so it must not grow a field without a test
//! saying so.

use crate::ident::Keys;

/// Where a device is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum DeviceState {
    /// Not connected; waiting in the connect queue.
    Idle,
    /// Connecting: a connect in flight, queued to be sent again after a
    /// timeout, or waiting out a 503. A device never leaves this state by
    /// giving up.
    Connecting,
    /// Connected: heartbeats and notifies.
    Connected,
    /// A disconnect is in flight (churn).
    Disconnecting,
    /// Refused for good: 401, 403 or another status a retry cannot fix
    /// (not 404 or 503). It stops, as `proto::Client` aborts.
    Refused,
}

/// What a request in flight asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum RequestKind {
    /// `PresenceConnectRequest`.
    Connect = 1,
    /// `PresenceHeartbeat`.
    Heartbeat,
    /// `PresenceDisconnectRequest`.
    Disconnect,
}

/// One simulated device.
pub(super) struct Device {
    pub(super) keys: Keys,
    /// Last Serial sent.
    pub(super) serial: u32,
    /// Serial of the request in flight, 0 if none.
    pub(super) outstanding: u32,
    /// When the request in flight was sent (µs since the epoch, truncated).
    pub(super) sent_us: u32,
    /// Highest notify Serial seen, 0 before the first.
    pub(super) last_notify: u32,
    pub(super) state: DeviceState,
    /// Sends of the heartbeat in flight, or connects sent since the device
    /// last connected (the connect backoff's exponent).
    pub(super) tries: u8,
    /// The device's socket (changes on rebinding).
    pub(super) sock: u16,
    /// Set while a heartbeat from a new socket waits for its answer.
    pub(super) rebinding: bool,
    /// Set when the device's first connect ended: answered, or refused for
    /// good (the connect phase lasts until every device's has).
    pub(super) settled: bool,
    /// The node's challenge for the device's address, echoed in every
    /// request until an answer comes without one (docs/PROTOCOL.md §7.9);
    /// all zero: none.
    pub(super) echo: [u8; 8],
    /// Set while the device is in the worker's `probes` queue.
    pub(super) probing: bool,
}

impl Device {
    /// The challenge to echo, if the node sent one.
    pub(super) fn echo(&self) -> Option<[u8; 8]> {
        (self.echo != [0; 8]).then_some(self.echo)
    }
}

/// A heartbeat or disconnect in flight, in the order sent (one timeout for
/// all, so the queue is in deadline order).
#[derive(Clone, Copy)]
pub(super) struct Pending {
    pub(super) device: u32,
    pub(super) serial: u32,
    pub(super) at_ms: u32,
    pub(super) kind: RequestKind,
}

/// When a connect in flight (`serial`) is given up on and sent again, or,
/// with `serial` 0, when a device refused with 503 connects again. Each
/// connect waits a backoff of its own, so these sit in a heap, soonest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct ConnectTimer {
    /// Milliseconds since the run's epoch (compared first).
    pub(super) due_ms: u64,
    pub(super) device: u32,
    pub(super) serial: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record is what ten million devices cost: 480 bytes of AES round
    /// keys (two `PacketKey`s of 240) and 32 of state, the keys' 16-byte
    /// alignment rounding it to 512 (5.1 GB for ten million).
    #[test]
    fn a_device_record_stays_compact() {
        use std::mem::size_of;
        let own = size_of::<Device>() - size_of::<Keys>();
        assert!(own <= 32, "a device's own state grew to {own} bytes");
        assert_eq!(
            size_of::<Keys>(),
            480,
            "mpp::packet::PacketKey is no longer 240 bytes: every simulated device grows"
        );
        assert_eq!(size_of::<Device>(), 512);
        assert_eq!(std::mem::size_of::<DeviceState>(), 1);
        assert_eq!(std::mem::size_of::<Pending>(), 16);
    }
}
