//! One account's record, 32 bytes: its notify Serial, the head of its
//! connection list, and its catch-up state (docs/PROTOCOL.md §6, "Catch-up").
//!
//! The account outlives its connections: when every device has gone (out of
//! coverage, asleep, dropped after 2 × ConnectionTimeout) the record stays
//! for the catch-up window, so a device that comes back learns what was
//! published while it was away. The catch-up state is deliberately coarse
//! and bounded, because it is paid for every account a node holds:
//!
//! * `since` and `catch_up`: the union of every bit published after Serial
//!   `since`. A device whose mark (its last processed Serial) is at or above
//!   `since` gets that union — a superset of what it missed, which the
//!   protocol allows (syncing an unchanged store is harmless). A device
//!   whose mark is below it, or that has none, is told to resynchronise
//!   everything (32 bytes of `FF`).
//! * The union keeps stores 0..=30 exactly (the low 31 bits of the mask's
//!   first four bytes, little-endian) and one bit for "a store ≥ 31
//!   changed", which answers all-ones from store 31 up: exact for the
//!   stores accounts use most, a superset for the rest, never a miss.
//! * At most once per catch-up window the union is restarted (`since` moves
//!   to the current Serial), so it does not grow to "everything ever
//!   published": a device away across that moment resynchronises.

use crate::proto::MAX_BITMASK;

/// Bit of [`Account::catch_up`] meaning "a store ≥ 31 changed".
const HIGH_STORES: u32 = 1 << 31;

/// One account of a shard. Field order keeps it at 32 bytes, 4-byte aligned
/// (checked by a test).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Account {
    /// First 4 bytes of SHA-256 of the account name (docs/PROTOCOL.md §4).
    pub affinity: u32,
    /// The next 4 bytes (together: the account's key inside a shard).
    pub low: u32,
    /// First connection of the account (slot + 1; 0 = no device held). In
    /// a free record: the next free account slot + 1.
    pub head: u32,
    /// The account's latest notify Serial; 0 marks a free record.
    pub serial: u32,
    /// `catch_up` covers every publish after this Serial.
    pub since: u32,
    /// The union of the bits published after `since` (see the module docs).
    pub catch_up: u32,
    /// Seconds since the table's epoch when `since` was last moved.
    pub epoch: u32,
    /// Seconds since the table's epoch of the last publish, connect or
    /// removal: a record with no device expires a catch-up window after it.
    pub stamp: u32,
}

/// What a new connection is told about the time its device was away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Nothing was published after the device's mark.
    Nothing,
    /// These stores (or a superset) changed after the device's mark.
    Bits(CatchUpMask),
    /// The node cannot know what changed: synchronise every store.
    Resync,
}

/// A catch-up bitmask, held without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpMask {
    bytes: [u8; MAX_BITMASK],
    len: u8,
}

impl CatchUpMask {
    /// The mask's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// 32 bytes of `FF`: "anything may have changed".
    pub fn all() -> Self {
        CatchUpMask {
            bytes: [0xFF; MAX_BITMASK],
            len: MAX_BITMASK as u8,
        }
    }
}

impl CatchUp {
    /// The bitmask to send: `None` for [`CatchUp::Nothing`].
    pub fn mask(&self) -> Option<CatchUpMask> {
        match self {
            CatchUp::Nothing => None,
            CatchUp::Bits(m) => Some(*m),
            CatchUp::Resync => Some(CatchUpMask::all()),
        }
    }
}

/// Folds a published mask into the union's 32-bit form.
fn fold(mask: &[u8]) -> u32 {
    let mut low = [0u8; 4];
    let n = mask.len().min(4);
    low[..n].copy_from_slice(&mask[..n]);
    let mut bits = u32::from_le_bytes(low);
    if bits & HIGH_STORES != 0 || mask.iter().skip(4).any(|&b| b != 0) {
        bits |= HIGH_STORES;
    }
    bits
}

/// Unfolds the union into a mask: the exact low stores, all-ones above
/// store 30 when the high bit is set, trimmed of trailing zero bytes.
fn unfold(bits: u32) -> CatchUpMask {
    if bits & HIGH_STORES != 0 {
        let mut m = CatchUpMask::all();
        m.bytes[..4].copy_from_slice(&bits.to_le_bytes());
        return m;
    }
    let low = bits.to_le_bytes();
    let len = low.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let mut bytes = [0u8; MAX_BITMASK];
    bytes[..4].copy_from_slice(&low);
    CatchUpMask {
        bytes,
        len: len as u8,
    }
}

impl Account {
    /// A new account record whose notify Serials start at `serial` and
    /// whose catch-up starts empty at `now` (seconds since the table epoch).
    pub fn new(affinity: u32, low: u32, serial: u32, now: u32) -> Self {
        let serial = serial.max(1);
        Account {
            affinity,
            low,
            head: 0,
            serial,
            since: serial,
            catch_up: 0,
            epoch: now,
            stamp: now,
        }
    }

    /// True for a live record.
    pub fn in_use(&self) -> bool {
        self.serial != 0
    }

    /// Records a publish of `mask` at `now` and returns the new Serial. The
    /// union restarts first when it is older than `window` seconds.
    pub fn publish(&mut self, mask: &[u8], now: u32, window: u32) -> u32 {
        if now.saturating_sub(self.epoch) > window {
            self.since = self.serial;
            self.catch_up = 0;
            self.epoch = now;
        }
        self.serial = match self.serial.wrapping_add(1) {
            0 => 1,
            s => s,
        };
        self.catch_up |= fold(mask);
        self.stamp = now;
        self.serial
    }

    /// What a device whose mark is `mark` (its last processed Serial; `None`
    /// or 0 when it has no history) missed (docs/PROTOCOL.md §6).
    pub fn catch_up(&self, mark: Option<u32>) -> CatchUp {
        match mark {
            Some(m) if m == self.serial => CatchUp::Nothing,
            // A mark this node never issued (it came from an earlier life of
            // the account), or none at all: we cannot know.
            Some(m) if m != 0 && m >= self.since && m < self.serial => {
                let mask = unfold(self.catch_up);
                if mask.len == 0 {
                    // Something was published; never answer with nothing.
                    CatchUp::Resync
                } else {
                    CatchUp::Bits(mask)
                }
            }
            _ => CatchUp::Resync,
        }
    }

    /// What a device whose mark is `mark` missed, only when this record can
    /// tell exactly (the mark is one of this life's Serials, at or after
    /// `since`): the answer a node gives another node's catch-up request
    /// (docs/PROTOCOL.md §10.4). `None` when it cannot tell.
    pub fn catch_up_known(&self, mark: u32) -> Option<CatchUp> {
        if mark == 0 {
            return None;
        }
        match self.catch_up(Some(mark)) {
            CatchUp::Resync => None,
            known => Some(known),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Account>(), 32);
        assert_eq!(std::mem::align_of::<Account>(), 4);
    }

    #[test]
    fn catch_up_is_the_union_after_the_mark() {
        let mut a = Account::new(1, 2, 1000, 0);
        assert_eq!(a.catch_up(Some(1000)), CatchUp::Nothing);
        assert_eq!(a.catch_up(None), CatchUp::Resync, "no history");
        assert_eq!(a.catch_up(Some(0)), CatchUp::Resync);
        assert_eq!(a.publish(&[0x01], 10, 3600), 1001);
        assert_eq!(a.publish(&[0x00, 0x04], 20, 3600), 1002);
        let bits = |c: CatchUp| c.mask().map(|m| m.as_bytes().to_vec());
        assert_eq!(bits(a.catch_up(Some(1000))), Some(vec![0x01, 0x04]));
        // A superset for a device that saw 1001: allowed, never a miss.
        assert_eq!(bits(a.catch_up(Some(1001))), Some(vec![0x01, 0x04]));
        assert_eq!(a.catch_up(Some(1002)), CatchUp::Nothing);
        assert_eq!(a.catch_up(Some(999)), CatchUp::Resync, "before `since`");
        assert_eq!(
            a.catch_up(Some(5000)),
            CatchUp::Resync,
            "a mark never issued"
        );
    }

    #[test]
    fn high_stores_answer_all_ones_from_store_31() {
        let mut a = Account::new(1, 2, 10, 0);
        let mut wide = [0u8; 20];
        wide[19] = 0x10; // store 156
        a.publish(&wide, 1, 3600);
        a.publish(&[0x02], 2, 3600);
        let m = a.catch_up(Some(10)).mask().expect("bits");
        assert_eq!(m.as_bytes().len(), 32);
        assert_eq!(&m.as_bytes()[..4], &[0x02, 0, 0, 0x80]);
        assert!(m.as_bytes()[4..].iter().all(|&b| b == 0xFF));
        // Store 31 alone (byte 3, bit 7) is in the high group too.
        let mut b = Account::new(1, 2, 10, 0);
        b.publish(&[0, 0, 0, 0x80], 1, 3600);
        assert_eq!(
            b.catch_up(Some(10)).mask().expect("bits").as_bytes().len(),
            32
        );
    }

    #[test]
    fn the_union_restarts_once_per_window() {
        let mut a = Account::new(1, 2, 100, 0);
        a.publish(&[0x01], 10, 60); // 101
        a.publish(&[0x02], 50, 60); // 102: same epoch
        assert_eq!(a.since, 100);
        a.publish(&[0x04], 61, 60); // 103: the epoch began 61 s ago: restart at 102
        assert_eq!(a.since, 102);
        assert_eq!(
            a.catch_up(Some(102)).mask().expect("bits").as_bytes(),
            &[0x04]
        );
        assert_eq!(a.catch_up(Some(101)), CatchUp::Resync);
    }

    #[test]
    fn only_marks_of_this_life_are_known() {
        let mut a = Account::new(1, 2, 500, 0);
        assert_eq!(a.catch_up_known(500), Some(CatchUp::Nothing));
        a.publish(&[0x02], 1, 60);
        let known = a.catch_up_known(500).and_then(|c| c.mask());
        assert_eq!(known.map(|m| m.as_bytes().to_vec()), Some(vec![0x02]));
        assert_eq!(a.catch_up_known(499), None, "before since");
        assert_eq!(a.catch_up_known(502), None, "never issued");
        assert_eq!(a.catch_up_known(0), None, "no history");
    }

    #[test]
    fn an_all_zero_publish_still_is_not_nothing() {
        let mut a = Account::new(1, 2, 7, 0);
        a.publish(&[0x00], 1, 60);
        assert_eq!(a.catch_up(Some(7)), CatchUp::Resync);
    }

    #[test]
    fn zero_bytes_past_the_fourth_are_no_high_store() {
        // A mask padded with zero bytes changed no store ≥ 32: the union
        // stays exact.
        let mut a = Account::new(1, 2, 10, 0);
        a.publish(&[0x01, 0, 0, 0, 0, 0, 0, 0], 1, 3600);
        let m = a.catch_up(Some(10)).mask().expect("bits");
        assert_eq!(m.as_bytes(), &[0x01]);
        // One byte past the fourth with every bit set: the high group.
        let mut b = Account::new(1, 2, 10, 0);
        b.publish(&[0x01, 0, 0, 0, 0xFF], 1, 3600);
        let m = b.catch_up(Some(10)).mask().expect("bits");
        assert_eq!(&m.as_bytes()[..4], &[0x01, 0, 0, 0x80]);
        assert_eq!(m.as_bytes().len(), 32);
    }

    #[test]
    fn the_union_restarts_only_after_a_whole_window() {
        let mut a = Account::new(1, 2, 100, 0);
        a.publish(&[0x01], 60, 60); // 101, a window after the epoch: no restart
        assert_eq!((a.since, a.epoch, a.catch_up), (100, 0, 0x01));
        a.publish(&[0x02], 121, 60); // 102, 121 s after it: restart at 101
        assert_eq!((a.since, a.epoch, a.catch_up), (101, 121, 0x02));
    }
}
