//! One simulated device as a worker holds it: a compact record (its two
//! packet keys, Serials, the request in flight, a state byte), and the
//! record of a request in flight.
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
    /// A connect is in flight (or queued again after a timeout).
    Connecting,
    /// Connected: heartbeats and notifies.
    Connected,
    /// A disconnect is in flight (churn).
    Disconnecting,
    /// Refused for good, or out of connect tries.
    Dead,
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
    /// Sends of the request in flight (or connect attempts).
    pub(super) tries: u8,
    /// The device's socket (changes on rebinding).
    pub(super) sock: u16,
    /// Set while a heartbeat from a new socket waits for its answer.
    pub(super) rebinding: bool,
}

/// A request in flight, in the order sent (one timeout for all, so the
/// queue is in deadline order).
#[derive(Clone, Copy)]
pub(super) struct Pending {
    pub(super) device: u32,
    pub(super) serial: u32,
    pub(super) at_ms: u32,
    pub(super) kind: RequestKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record is what ten million devices cost: 480 bytes of AES round
    /// keys and 32 of state (the keys' 16-byte alignment rounds it to 512).
    #[test]
    fn a_device_record_stays_compact() {
        assert_eq!(std::mem::size_of::<Keys>(), 480);
        assert_eq!(std::mem::size_of::<Device>(), 512);
        assert_eq!(std::mem::size_of::<DeviceState>(), 1);
        assert_eq!(std::mem::size_of::<Pending>(), 16);
    }
}
