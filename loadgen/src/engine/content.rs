//! The content check (fanout): a device verifies that the bitmask it
//! receives covers every bit published to its account since its last
//! acknowledgement; a message that does not is counted `wrong`.
//!
//! Each publish of the loadgen sets one bit: the k-th publish to an account
//! sets store `(k − 1) mod (8 × --bitmask-bytes)` in a mask of
//! `--bitmask-bytes` bytes ([`publish_mask`]), so publishes merged into one
//! notify carry different bits and a node that drops one of them is seen.
//! Before its request leaves, the publisher records each publish's bit
//! under the notify Serial the node will give it (its account's base plus
//! its rank, as the delivery count assumes) in the account's ring
//! ([`record`]; the latest [`RING`] Serials are kept).
//!
//! **The rule.** A device with mark `M` — the highest account Serial it has
//! seen, each of which it acknowledged (at its first message, its
//! account's base) — that receives a notify, or the pending state of a
//! `PresenceStatus` or `PresenceConnectResponse`, with Serial `S > M` and
//! bitmask `B` (absent: empty) counts it `wrong` when a publish recorded
//! under a Serial `j` with `M < j ≤ S` has a bit that `B` lacks
//! ([`check`]). Why the node must pass (docs/PROTOCOL.md §6.5–6.7):
//! publish `j ≤ S` was ORed into the device's pending bits before Serial
//! `S` existed, so before this message was built; the node clears the
//! pending bits only on an acknowledgement of its latest Serial, and the
//! device acknowledged nothing above `M`; a catch-up covers everything
//! after the connect's mark (`M`) or is all `FF`. So:
//!
//! - more bits than expected is fine (later publishes merged in, a
//!   catch-up's superset, a resync's `FF`);
//! - a publish with a Serial above `S` (accepted after the message left
//!   the node) is not expected in it;
//! - a message with `S ≤ M` (a retransmission, a reordered older notify)
//!   is not checked: its bits were checked when `S` was new.
//!
//! Records can be wrong only when the publisher's Serials are: a request
//! the node answered 503 for part of its entries (the publishes behind
//! them in the pipeline were given one Serial too many), or one sent twice
//! after the control connection broke (the node may have taken it twice).
//! The publisher marks those accounts `unverifiable` when it learns of it,
//! which may be after a device judged with such a record; mismatches on
//! those accounts are reported apart (`wrong_unverifiable`), not as
//! `wrong`.

use std::sync::atomic::{AtomicU64, Ordering::Acquire};

use super::RING;

/// The record of a publish of store `bit` under notify Serial `serial`
/// (never 0, as Serials are not): what an account's ring slot
/// `serial % RING` holds.
pub(crate) fn record(serial: u32, bit: u8) -> u64 {
    (u64::from(serial) << 8) | u64::from(bit)
}

/// Store `bit` set in a mask of `bytes` bytes: bit i is bit `i % 8` of
/// byte `i / 8` (docs/PROTOCOL.md §2.3).
pub(crate) fn publish_mask(bytes: usize, bit: usize) -> Vec<u8> {
    let mut mask = vec![0u8; bytes];
    mask[bit / 8] = 1 << (bit % 8);
    mask
}

/// Whether store `bit` is set in `mask`.
pub(crate) fn has_bit(mask: &[u8], bit: usize) -> bool {
    mask.get(bit / 8).is_some_and(|b| b & (1 << (bit % 8)) != 0)
}

/// What [`check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Checked {
    /// Recorded publishes the message was checked against.
    pub(crate) publishes: u32,
    /// Whether one of their bits was missing from the message's bitmask.
    pub(crate) missing: bool,
}

/// Checks a message with Serial `serial` and `bitmask` to a device whose
/// mark is `mark` against an account's `ring` of recorded publishes: the
/// rule of the module documentation. Serials whose slot holds another
/// Serial's record (overwritten, or never written) are not checked.
pub(crate) fn check(ring: &[AtomicU64; RING], mark: u32, serial: u32, bitmask: &[u8]) -> Checked {
    let mut out = Checked::default();
    if serial <= mark {
        return out;
    }
    let from = (mark + 1).max(serial.saturating_sub(RING as u32 - 1));
    for j in from..=serial {
        let rec = ring[j as usize % RING].load(Acquire);
        if rec >> 8 != u64::from(j) {
            continue;
        }
        out.publishes += 1;
        if !has_bit(bitmask, (rec & 0xFF) as usize) {
            out.missing = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Release;

    const BASE: u32 = 1 << 20;

    /// A ring with publishes `BASE + 1 ..= BASE + bits.len()`, the i-th
    /// setting store `bits[i]`.
    fn ring(bits: &[u8]) -> [AtomicU64; RING] {
        let ring: [AtomicU64; RING] = std::array::from_fn(|_| AtomicU64::new(0));
        for (i, &b) in bits.iter().enumerate() {
            let s = BASE + 1 + i as u32;
            ring[s as usize % RING].store(record(s, b), Release);
        }
        ring
    }

    #[test]
    fn a_notify_missing_a_published_bit_is_wrong() {
        // Stores 0, 1, 2 published; the merged notify of all three lacks 1.
        let r = ring(&[0, 1, 2]);
        let c = check(&r, BASE, BASE + 3, &[0b101]);
        assert_eq!(
            c,
            Checked {
                publishes: 3,
                missing: true
            }
        );
        // No bitmask at all (a connect answer claiming nothing pending).
        assert!(check(&r, BASE, BASE + 1, &[]).missing);
    }

    #[test]
    fn exact_merged_and_superset_masks_pass() {
        let r = ring(&[0, 1, 2]);
        for mask in [&[0b111][..], &[0xFF], &[0b1111, 0], &[0xFF; 32]] {
            assert_eq!(
                check(&r, BASE, BASE + 3, mask),
                Checked {
                    publishes: 3,
                    missing: false
                },
                "{mask:?}"
            );
        }
    }

    #[test]
    fn only_bits_after_the_mark_and_up_to_the_serial_are_expected() {
        let r = ring(&[0, 1, 2]);
        // Store 2 was published after Serial BASE + 2 left the node.
        assert_eq!(check(&r, BASE, BASE + 2, &[0b011]).publishes, 2);
        assert!(!check(&r, BASE, BASE + 2, &[0b011]).missing);
        // Store 0 was acknowledged (mark BASE + 1): the node cleared it.
        let c = check(&r, BASE + 1, BASE + 3, &[0b110]);
        assert_eq!((c.publishes, c.missing), (2, false));
        // A retransmission or an older notify: nothing checked.
        assert_eq!(check(&r, BASE + 3, BASE + 3, &[]), Checked::default());
        assert_eq!(check(&r, BASE + 3, BASE + 2, &[]), Checked::default());
    }

    #[test]
    fn serials_the_ring_no_longer_holds_are_not_checked() {
        // 70 publishes: those of BASE + 1 ..= BASE + 6 were overwritten by
        // BASE + 65 ..= BASE + 70 (store 64 % 8 = 0 …), so a notify of
        // BASE + 6 is checked against nothing, whatever it carries.
        let bits: Vec<u8> = (0..70).map(|i| (i % 8) as u8).collect();
        let r = ring(&bits);
        assert_eq!(check(&r, BASE, BASE + 6, &[]), Checked::default());
        // A device far behind is checked against the latest RING Serials.
        let c = check(&r, BASE, BASE + 70, &[0xFF]);
        assert_eq!((c.publishes, c.missing), (RING as u32, false));
        // Unwritten slots are not checked either.
        let empty = ring(&[]);
        assert_eq!(check(&empty, BASE, BASE + 5, &[]), Checked::default());
    }

    #[test]
    fn masks_set_one_store_each() {
        assert_eq!(publish_mask(1, 0), [1]);
        assert_eq!(publish_mask(1, 7), [0x80]);
        assert_eq!(publish_mask(3, 9), [0, 2, 0]);
        assert!(has_bit(&publish_mask(32, 255), 255));
        assert!(!has_bit(&[0xFF], 8), "beyond the mask");
    }
}
