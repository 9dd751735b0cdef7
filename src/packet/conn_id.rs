//! The connection id: the first 8 bytes of every datagram (docs/PROTOCOL.md §3, §4).
//!
//! A conn id names a connection, selects its keys and steers its packets to
//! the shard that owns its account. This file only builds and classifies ids;
//! it must not keep any per-connection state.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Length of a conn id on the wire (docs/PROTOCOL.md §3).
pub const CONN_ID_LEN: usize = 8;

/// The STUN magic cookie (RFC 8489), which bytes 4..8 of a conn id must never
/// equal in a packet that could pass for STUN (docs/PROTOCOL.md §3, §8).
pub const STUN_MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

/// The 8-byte id of a connection: 4 random bytes ‖ 4 bytes of account affinity
/// (docs/PROTOCOL.md §4).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub [u8; CONN_ID_LEN]);

/// The shard-steering value of an account: the first 4 bytes of SHA-256 of its
/// UTF-8 name, read as a big-endian u32 (docs/PROTOCOL.md §4).
pub fn account_affinity(account: &str) -> u32 {
    let digest = Sha256::digest(account.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl ConnId {
    /// The reserved all-zero id (docs/PROTOCOL.md §3), never issued.
    pub const RESERVED: ConnId = ConnId([0; CONN_ID_LEN]);

    /// A fresh id for a connection of `account`: 4 random bytes ‖ the account's
    /// affinity (docs/PROTOCOL.md §4).
    pub fn generate(account: &str, rng: &mut impl RngCore) -> ConnId {
        Self::generate_with_affinity(account_affinity(account), rng)
    }

    /// A fresh id with the given affinity in bytes 4..8 and a random first half,
    /// never reserved and never STUN-looking (see [`ConnId::generate`]).
    pub fn generate_with_affinity(affinity: u32, rng: &mut impl RngCore) -> ConnId {
        let affinity = affinity.to_be_bytes();
        loop {
            let mut id = [0u8; CONN_ID_LEN];
            rng.fill_bytes(&mut id[..4]);
            id[4..].copy_from_slice(&affinity);
            let id = ConnId(id);
            // docs/PROTOCOL.md §3 forbids bytes 4..8 equal to the STUN cookie and
            // §4 says to re-draw the random half on a clash. Bytes 4..8 are the
            // account's affinity, which no draw can change, so for the one
            // affinity 0x2112A442 the only way to stay out of the STUN
            // classifier (§8: top two bits of byte 0 clear AND the cookie at
            // 4..8) is a random half whose first byte has a nonzero top-two
            // bits. Re-draw until that holds: 3 draws in 4 succeed.
            if !id.is_reserved() && !id.looks_like_stun() {
                return id;
            }
        }
    }

    /// The id in `bytes`, which must be exactly 8 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<ConnId> {
        <[u8; CONN_ID_LEN]>::try_from(bytes).ok().map(ConnId)
    }

    /// Parses 16 hex digits.
    pub fn from_hex(text: &str) -> Option<ConnId> {
        let mut id = [0u8; CONN_ID_LEN];
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(ConnId(id))
    }

    /// The 16 lower-case hex digits of the id.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The account affinity carried in bytes 4..8, big-endian (docs/PROTOCOL.md §4);
    /// the shard is `affinity mod N` (§8).
    pub fn affinity(&self) -> u32 {
        u32::from_be_bytes([self.0[4], self.0[5], self.0[6], self.0[7]])
    }

    /// Whether this is the reserved all-zero id (docs/PROTOCOL.md §3).
    pub fn is_reserved(&self) -> bool {
        self.0 == [0; CONN_ID_LEN]
    }

    /// Whether a datagram starting with these 8 bytes would be classified as
    /// STUN: first two bits zero and the magic cookie at 4..8 (docs/PROTOCOL.md §8).
    pub fn looks_like_stun(&self) -> bool {
        self.0[0] & 0xC0 == 0 && self.0[4..8] == STUN_MAGIC_COOKIE
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnId({self})")
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn affinity_vector() {
        assert_eq!(account_affinity("alice@example.com"), 0xff8d_9819);
    }

    #[test]
    fn generated_ids_carry_affinity() {
        let mut rng = StdRng::seed_from_u64(7);
        for account in ["alice@example.com", "bob@example.net", "é@ü"] {
            for _ in 0..100 {
                let id = ConnId::generate(account, &mut rng);
                assert_eq!(id.affinity(), account_affinity(account));
                assert!(!id.is_reserved());
                assert!(!id.looks_like_stun());
            }
        }
    }

    #[test]
    fn stun_classification() {
        let cookie = [0x21, 0x12, 0xA4, 0x42];
        let with = |b0: u8| {
            let mut id = [b0, 1, 2, 3, 0, 0, 0, 0];
            id[4..].copy_from_slice(&cookie);
            ConnId(id)
        };
        assert!(with(0x00).looks_like_stun());
        assert!(with(0x3F).looks_like_stun());
        assert!(!with(0x40).looks_like_stun());
        assert!(!with(0x80).looks_like_stun());
        assert!(!with(0xC0).looks_like_stun());
        assert!(!ConnId([0, 1, 2, 3, 0x21, 0x12, 0xA4, 0x43]).looks_like_stun());
        assert_eq!(with(0x40).affinity(), 0x2112_A442);
    }

    /// An RNG whose first draws would make a STUN-looking id.
    struct Scripted(Vec<u8>, usize);
    impl RngCore for Scripted {
        fn next_u32(&mut self) -> u32 {
            let mut b = [0; 4];
            self.fill_bytes(&mut b);
            u32::from_le_bytes(b)
        }
        fn next_u64(&mut self) -> u64 {
            let mut b = [0; 8];
            self.fill_bytes(&mut b);
            u64::from_le_bytes(b)
        }
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for d in dest {
                *d = self.0[self.1 % self.0.len()];
                self.1 += 1;
            }
        }
        fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
            self.fill_bytes(dest);
            Ok(())
        }
    }

    #[test]
    fn reserved_is_redrawn() {
        // An all-zero random half is fine unless the affinity is zero too.
        let mut rng = Scripted(vec![0, 0, 0, 0, 9, 9, 9, 9], 0);
        let id = ConnId::generate("alice@example.com", &mut rng);
        assert_eq!(&id.0[..4], &[0, 0, 0, 0]);
        let mut rng = Scripted(vec![0, 0, 0, 0, 9, 9, 9, 9], 0);
        let id = ConnId::generate_with_affinity(0, &mut rng);
        assert_eq!(id, ConnId([9, 9, 9, 9, 0, 0, 0, 0]));
    }

    #[test]
    fn stun_cookie_affinity_is_redrawn() {
        // First draws have a clear top-two-bits: STUN-looking, so re-drawn.
        let mut rng = Scripted(vec![0x00, 1, 2, 3, 0x3F, 1, 2, 3, 0x41, 5, 6, 7], 0);
        let id = ConnId::generate_with_affinity(0x2112_A442, &mut rng);
        assert_eq!(id, ConnId([0x41, 5, 6, 7, 0x21, 0x12, 0xA4, 0x42]));
        assert!(!id.looks_like_stun());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let id = ConnId::generate_with_affinity(0x2112_A442, &mut rng);
            assert!(!id.looks_like_stun());
            assert_eq!(id.affinity(), 0x2112_A442);
        }
    }

    #[test]
    fn hex_and_slices() {
        let id = ConnId([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(id.to_hex(), "0102030405060708");
        assert_eq!(format!("{id:?}"), "ConnId(0102030405060708)");
        assert_eq!(ConnId::from_hex("0102030405060708"), Some(id));
        assert_eq!(ConnId::from_hex("01020304050607"), None);
        assert_eq!(ConnId::from_hex("010203040506070g"), None);
        assert_eq!(ConnId::from_slice(&id.0), Some(id));
        assert_eq!(ConnId::from_slice(&id.0[..7]), None);
        assert_eq!(id.affinity(), 0x0506_0708);
    }
}
