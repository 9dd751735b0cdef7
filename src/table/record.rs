//! One connection's record: 68 bytes, 4-byte aligned.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::AccountKey;

/// Pending-mask bytes kept inside the record; longer masks spill to a side map.
pub const INLINE_MASK: usize = 8;

const IN_USE: u8 = 1;
const IPV6: u8 = 2;
const QUEUED: u8 = 4;
const TRIES_SHIFT: u8 = 3;
const TRIES_MASK: u8 = 0b0111_1000;

/// A device's UDP address, stored in 18 bytes (IPv4 in the first 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Endpoint {
    addr: [u8; 16],
    port: [u8; 2],
}

/// The state of one held connection. Field order keeps it at 68 bytes
/// with 4-byte alignment (checked by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Connection {
    /// The connection id (docs/PROTOCOL.md §4).
    pub conn_id: [u8; 8],
    /// Replay window: bit i set = Serial `highest_serial - i` was seen (docs/PROTOCOL.md §7).
    pub replay_window: [u32; 2],
    /// Where the device was last heard from.
    pub endpoint: Endpoint,
    /// Length of the pending mask in bytes (0 = nothing pending, ≤ 32).
    pub mask_len: u8,
    /// In use, IPv6, queued for sending, retransmission count.
    pub flags: u8,
    /// Bytes 4..8 of SHA-256 of the account name ([`AccountKey::low`]).
    pub account_low: u32,
    /// Highest client Serial seen.
    pub highest_serial: u32,
    /// The account's notify Serial as last sent to this device.
    pub notify_serial: u32,
    /// Seconds since the table's epoch when an authenticated packet was last seen.
    pub last_seen: u32,
    /// Credential expiry, Unix seconds (clamped to `u32`).
    pub expires: u32,
    /// Next connection of the same account (slot + 1; 0 = end). In a free
    /// record: the next free slot + 1.
    pub next_in_account: u32,
    /// Pending mask bytes when `mask_len` ≤ [`INLINE_MASK`].
    pub pending: [u8; INLINE_MASK],
}

impl Endpoint {
    /// Packs a socket address.
    pub fn from_socket_addr(a: SocketAddr) -> (Self, bool) {
        let mut e = Endpoint {
            addr: [0; 16],
            port: a.port().to_be_bytes(),
        };
        match a.ip() {
            IpAddr::V4(v4) => {
                e.addr[..4].copy_from_slice(&v4.octets());
                (e, false)
            }
            IpAddr::V6(v6) => {
                e.addr = v6.octets();
                (e, true)
            }
        }
    }

    fn to_socket_addr(self, v6: bool) -> SocketAddr {
        let port = u16::from_be_bytes(self.port);
        if v6 {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(self.addr)), port)
        } else {
            let [a, b, c, d, ..] = self.addr;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
        }
    }
}

impl Connection {
    /// True for a live record.
    pub fn in_use(&self) -> bool {
        self.flags & IN_USE != 0
    }

    pub(crate) fn set_in_use(&mut self, on: bool) {
        self.set_flag(IN_USE, on);
    }

    fn set_flag(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// True while a notify for this connection waits in the send queue.
    pub fn queued(&self) -> bool {
        self.flags & QUEUED != 0
    }

    /// Marks the connection as waiting (or no longer) in the send queue.
    pub fn set_queued(&mut self, on: bool) {
        self.set_flag(QUEUED, on);
    }

    /// Retransmissions of the current notify so far.
    pub fn tries(&self) -> u8 {
        (self.flags & TRIES_MASK) >> TRIES_SHIFT
    }

    /// Sets the retransmission count (saturates at 15).
    pub fn set_tries(&mut self, tries: u8) {
        self.flags = (self.flags & !TRIES_MASK) | (tries.min(15) << TRIES_SHIFT);
    }

    /// The device's address.
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint.to_socket_addr(self.flags & IPV6 != 0)
    }

    /// Moves the connection to a new address.
    pub fn set_endpoint(&mut self, a: SocketAddr) {
        let (e, v6) = Endpoint::from_socket_addr(a);
        self.endpoint = e;
        self.set_flag(IPV6, v6);
    }

    /// The account this connection belongs to.
    pub fn account_key(&self) -> AccountKey {
        AccountKey {
            affinity: u32::from_be_bytes([
                self.conn_id[4],
                self.conn_id[5],
                self.conn_id[6],
                self.conn_id[7],
            ]),
            low: self.account_low,
        }
    }

    /// The 64-bit replay window.
    pub fn window(&self) -> u64 {
        u64::from(self.replay_window[0]) | (u64::from(self.replay_window[1]) << 32)
    }

    /// Stores the replay window.
    pub fn set_window(&mut self, w: u64) {
        self.replay_window = [w as u32, (w >> 32) as u32];
    }
}
