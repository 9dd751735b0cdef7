//! One connection's record: 48 bytes, 4-byte aligned.
//!
//! The record is what a held device costs, so every byte is argued for. It
//! holds no key (keys are derived per packet), no names (the account is an
//! index into the account records), and an IPv4 endpoint inline; an IPv6
//! endpoint's address lives in a side map of the table (the port stays
//! here), and a pending mask longer than [`INLINE_MASK`] bytes in another.

/// Pending-mask bytes kept inside the record; longer masks spill to a side map.
pub const INLINE_MASK: usize = 4;

/// The pending-mask length meaning 32 bytes of `FF` (a resync,
/// docs/PROTOCOL.md §6.7), held without a side-map entry.
pub const MASK_ALL_ONES: u8 = 0x3F;
const MASK_LEN_BITS: u8 = 0x3F;
const KEY_PARITY: u8 = 0x80;

const IN_USE: u8 = 1;
const IPV6: u8 = 2;
const QUEUED: u8 = 4;
const TRIES_SHIFT: u8 = 3;
const TRIES_MASK: u8 = 0b0011_1000;
/// The highest retransmission count a record holds.
pub const MAX_TRIES: u8 = 7;
const VALIDATED: u8 = 0b0100_0000;
const CATCH_UP: u8 = 0b1000_0000;

/// The state of one held connection. Field order keeps it at 48 bytes
/// with 4-byte alignment (checked by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Connection {
    /// The connection id (docs/PROTOCOL.md §4).
    pub conn_id: [u8; 8],
    /// Replay window: bit i set = Serial `highest_serial - i` was seen (docs/PROTOCOL.md §7).
    pub replay_window: [u32; 2],
    /// Highest client Serial seen.
    pub highest_serial: u32,
    /// Seconds since the table's epoch when an authenticated packet was last seen.
    pub last_seen: u32,
    /// Credential expiry, Unix seconds (clamped to `u32`).
    pub expires: u32,
    /// The account's record (its slot in the account table).
    pub account: u32,
    /// Next connection of the same account (slot + 1; 0 = end). In a free
    /// record: the next free slot + 1.
    pub next_in_account: u32,
    /// IPv4 address (for IPv6, unused: the table keeps the address).
    pub addr_v4: [u8; 4],
    /// UDP port, big-endian (0 = no UDP endpoint yet).
    pub port: [u8; 2],
    /// Low 6 bits: the length of the pending mask in bytes (0 = nothing
    /// pending, ≤ 32), or [`MASK_ALL_ONES`] for 32 bytes of `FF`. Bit 7:
    /// which of the node's two master keys the connection uses (its key
    /// parity, docs/PROTOCOL.md §7.11).
    pub mask_state: u8,
    /// In use, IPv6, queued for sending, retransmission count (3 bits),
    /// endpoint validated, pending bits from a catch-up.
    pub flags: u8,
    /// Pending mask bytes when `mask_len` ≤ [`INLINE_MASK`].
    pub pending: [u8; INLINE_MASK],
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

    /// Sets the retransmission count (saturates at [`MAX_TRIES`]).
    pub fn set_tries(&mut self, tries: u8) {
        self.flags = (self.flags & !TRIES_MASK) | (tries.min(MAX_TRIES) << TRIES_SHIFT);
    }

    /// True once the device proved it receives at its current endpoint
    /// (docs/PROTOCOL.md §7.9); cleared when the endpoint moves.
    pub fn validated(&self) -> bool {
        self.flags & VALIDATED != 0
    }

    /// Marks the current endpoint validated (or no longer).
    pub fn set_validated(&mut self, on: bool) {
        self.set_flag(VALIDATED, on);
    }

    /// True while the pending bits are a catch-up given at connect, not yet
    /// joined by a publish (counted apart when acknowledged).
    pub fn catch_up(&self) -> bool {
        self.flags & CATCH_UP != 0
    }

    /// Marks the pending bits as a catch-up (or no longer).
    pub fn set_catch_up(&mut self, on: bool) {
        self.set_flag(CATCH_UP, on);
    }

    /// The pending mask's length field: 0 to 32, or [`MASK_ALL_ONES`].
    pub fn mask_len(&self) -> u8 {
        self.mask_state & MASK_LEN_BITS
    }

    /// True while notify bits wait for an acknowledgement.
    pub fn has_pending(&self) -> bool {
        self.mask_len() != 0
    }

    pub(crate) fn set_mask_len(&mut self, len: u8) {
        self.mask_state = (self.mask_state & !MASK_LEN_BITS) | (len & MASK_LEN_BITS);
    }

    /// Which of the node's two master keys (0 or 1) the connection uses.
    pub fn key_parity(&self) -> u8 {
        u8::from(self.mask_state & KEY_PARITY != 0)
    }

    /// Records which master key the connection uses.
    pub fn set_key_parity(&mut self, parity: u8) {
        if parity & 1 == 1 {
            self.mask_state |= KEY_PARITY;
        } else {
            self.mask_state &= !KEY_PARITY;
        }
    }

    /// True when the endpoint is IPv6 (its address is in the table's side map).
    pub fn is_ipv6(&self) -> bool {
        self.flags & IPV6 != 0
    }

    pub(crate) fn set_ipv6(&mut self, on: bool) {
        self.set_flag(IPV6, on);
    }

    /// The endpoint's UDP port (0: no UDP endpoint yet).
    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    /// The 64-bit replay window.
    pub fn window(&self) -> u64 {
        u64::from(self.replay_window[0]) | (u64::from(self.replay_window[1]) << 32)
    }

    /// Stores the replay window.
    pub fn set_window(&mut self, w: u64) {
        self.replay_window = [w as u32, (w >> 32) as u32];
    }

    /// The account affinity: conn id bytes 4..8 (docs/PROTOCOL.md §4).
    pub fn affinity(&self) -> u32 {
        u32::from_be_bytes([
            self.conn_id[4],
            self.conn_id[5],
            self.conn_id[6],
            self.conn_id[7],
        ])
    }
}
