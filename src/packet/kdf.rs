//! Key derivation from the node's master key (docs/PROTOCOL.md §3, §4).
//!
//! A node stores no keys per connection: it derives a connection's secret from
//! the master key and the conn id, and both packet keys from that secret, for
//! every packet. This file therefore keeps the master key's AES-256 key
//! schedule expanded once ([`MasterKey`]), expands a secret's schedule once
//! for both directions ([`ExpandedSecret`]), uses encryption-only AES (no
//! decryption round keys are ever computed) and runs each KDF as four AES
//! blocks encrypted together. It must never print key bytes (every `Debug` here is
//! redacted) and never touches a socket, a clock or an RNG.

use std::fmt;

use super::backend::{Aes256, SecretAes};
use super::conn_id::ConnId;
use super::framing::PacketKey;

/// Length of every key in the protocol: AES-256.
pub const KEY_LEN: usize = 32;

/// docs/PROTOCOL.md §4: label of the connection secret `S`.
const LABEL_SECRET: &[u8; 4] = b"sec ";
/// docs/PROTOCOL.md §4: label of the binding key.
const LABEL_BIND: &[u8; 4] = b"bind";
/// docs/PROTOCOL.md §3: label of the client → service packet key.
const LABEL_C2S: &[u8; 4] = b"c2s ";
/// docs/PROTOCOL.md §3: label of the service → client packet key.
const LABEL_S2C: &[u8; 4] = b"s2c ";
/// docs/PROTOCOL.md §6 ("Restarts"): label of the key that authenticates
/// the node's saved state.
const LABEL_STATE: &[u8; 4] = b"stat";

/// Why a hex key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyHexError {
    /// The text holds something other than hex digits.
    #[error("key is not hex")]
    NotHex,
    /// The text is not exactly 64 hex digits (32 bytes).
    #[error("key must be 64 hex digits (32 bytes)")]
    WrongLength,
}

fn key_from_hex(text: &str) -> Result<[u8; KEY_LEN], KeyHexError> {
    let text = text.trim();
    if text.len() != 2 * KEY_LEN {
        return Err(KeyHexError::WrongLength);
    }
    let mut key = [0u8; KEY_LEN];
    hex::decode_to_slice(text, &mut key).map_err(|_| KeyHexError::NotHex)?;
    Ok(key)
}

/// docs/PROTOCOL.md §3.4 KDF, step 1: the four blocks `u32le(i) ‖ label ‖
/// context`, i = 0..3, which `backend.rs` encrypts together with the path's
/// AES.
#[inline(always)]
pub(super) fn kdf_blocks(label: &[u8; 4], context: &[u8; 8]) -> [[u8; 16]; 4] {
    let mut blocks = [[0u8; 16]; 4];
    for (i, block) in (0u32..).zip(blocks.iter_mut()) {
        block[0..4].copy_from_slice(&i.to_le_bytes());
        block[4..8].copy_from_slice(label);
        block[8..16].copy_from_slice(context);
    }
    blocks
}

/// docs/PROTOCOL.md §3.4 KDF, step 3: the first 8 bytes of each encrypted
/// block, concatenated.
#[inline(always)]
pub(super) fn kdf_output<B: AsRef<[u8]>>(blocks: &[B; 4]) -> [u8; KEY_LEN] {
    let mut out = [0u8; KEY_LEN];
    for (chunk, block) in out.chunks_exact_mut(8).zip(blocks.iter()) {
        if let Some(head) = block.as_ref().first_chunk::<8>() {
            chunk.copy_from_slice(head);
        }
    }
    out
}

/// `KDF(K, label, C)` of docs/PROTOCOL.md §3 (the key derivation of AES-GCM-SIV,
/// RFC 8452 §4, with AES-256 key `K`).
pub fn kdf(key: &[u8; KEY_LEN], label: &[u8; 4], context: &[u8; 8]) -> [u8; KEY_LEN] {
    Aes256::new(key).kdf(label, context)
}

/// Which way a packet travels; selects the packet key (docs/PROTOCOL.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → service, key `k_c2s`.
    ClientToServer,
    /// Service → client, key `k_s2c`.
    ServerToClient,
}

impl Direction {
    /// The 4-byte KDF label of this direction's key: `"c2s "` or `"s2c "`.
    pub fn label(self) -> &'static [u8; 4] {
        match self {
            Direction::ClientToServer => LABEL_C2S,
            Direction::ServerToClient => LABEL_S2C,
        }
    }
}

/// The node's (or cluster's) master key, with its AES-256 key schedule
/// expanded once so per-packet derivation starts at the block encryptions.
#[derive(Clone)]
pub struct MasterKey {
    raw: [u8; KEY_LEN],
    cipher: Aes256,
}

impl MasterKey {
    /// A master key from its 32 bytes.
    pub fn new(key: [u8; KEY_LEN]) -> Self {
        MasterKey {
            cipher: Aes256::new(&key),
            raw: key,
        }
    }

    /// A master key from 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Self, KeyHexError> {
        key_from_hex(text).map(Self::new)
    }

    /// The key as 64 lower-case hex digits, for writing a key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.raw)
    }

    /// The key's bytes (to hand the same key to each shard).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.raw
    }

    /// The connection secret `S = KDF(master, "sec ", conn id)` (docs/PROTOCOL.md §4).
    pub fn secret(&self, conn_id: ConnId) -> ConnSecret {
        ConnSecret(self.cipher.kdf(LABEL_SECRET, &conn_id.0))
    }

    /// The binding key `KDF(master, "bind", 0⁸)` (docs/PROTOCOL.md §4).
    pub fn bind_key(&self) -> [u8; KEY_LEN] {
        self.cipher.kdf(LABEL_BIND, &[0; 8])
    }

    /// The saved-state key `KDF(master, "stat", 0⁸)` (docs/PROTOCOL.md §6):
    /// a state file made under another master key does not verify.
    pub fn state_key(&self) -> [u8; KEY_LEN] {
        self.cipher.kdf(LABEL_STATE, &[0; 8])
    }

    /// `self.secret(conn_id).expand(conn_id)`: where a node starts for each
    /// packet, deriving one or both packet keys from it. (One call into
    /// the AES code: the KDF and the secret's key schedule together.)
    #[inline]
    pub fn expanded_secret(&self, conn_id: ConnId) -> ExpandedSecret {
        self.cipher.expanded_secret(LABEL_SECRET, conn_id)
    }

    /// Shorthand for `self.secret(conn_id).key(dir, conn_id)`: the packet key a
    /// node derives for each packet it opens or seals.
    /// (One call into the AES code, the secret's schedule never leaving
    /// registers.)
    #[inline]
    pub fn packet_key(&self, conn_id: ConnId, dir: Direction) -> PacketKey {
        self.cipher
            .packet_key(LABEL_SECRET, conn_id, dir.label(), &conn_id.0)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// A connection's secret `S` (docs/PROTOCOL.md §4): what a credential gives the
/// device, and what both packet keys derive from.
#[derive(Clone)]
pub struct ConnSecret(pub [u8; KEY_LEN]);

impl ConnSecret {
    /// The secret's bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A secret from 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, KeyHexError> {
        key_from_hex(text).map(ConnSecret)
    }

    /// The secret as 64 lower-case hex digits, for a credential.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The secret with its AES-256 key schedule expanded, bound to `conn_id`:
    /// expand once when both directions' keys are needed.
    pub fn expand(&self, conn_id: ConnId) -> ExpandedSecret {
        SecretAes::expand(&self.0, conn_id)
    }

    /// The raw packet key `KDF(S, label(dir), conn id)` (docs/PROTOCOL.md §3).
    pub fn key_bytes(&self, dir: Direction, conn_id: ConnId) -> [u8; KEY_LEN] {
        self.expand(conn_id).key_bytes(dir)
    }

    /// The expanded packet key for one direction (docs/PROTOCOL.md §3).
    /// (One call into the AES code: `S`'s schedule, the KDF and the key's
    /// schedule.)
    #[inline]
    pub fn key(&self, dir: Direction, conn_id: ConnId) -> PacketKey {
        SecretAes::raw_packet_key(&self.0, dir.label(), &conn_id.0)
    }
}

/// A connection secret's expanded AES-256 key schedule together with its conn
/// id: what a node holds while it handles one packet, so that opening the
/// client's packet and sealing the reply expand `S` only once.
#[derive(Clone)]
pub struct ExpandedSecret {
    /// Built by `backend.rs`, on the process's AES path.
    pub(super) cipher: SecretAes,
    pub(super) conn_id: ConnId,
}

impl ExpandedSecret {
    /// The conn id the keys are derived for.
    pub fn conn_id(&self) -> ConnId {
        self.conn_id
    }

    /// The raw packet key `KDF(S, label(dir), conn id)` (docs/PROTOCOL.md §3).
    #[inline]
    pub fn key_bytes(&self, dir: Direction) -> [u8; KEY_LEN] {
        self.cipher.kdf(dir.label(), &self.conn_id.0)
    }

    /// The expanded packet key for one direction (docs/PROTOCOL.md §3).
    /// (One call into the AES code: the KDF and the key's schedule.)
    #[inline]
    pub fn key(&self, dir: Direction) -> PacketKey {
        self.cipher.packet_key(dir.label(), &self.conn_id.0)
    }
}

impl fmt::Debug for ExpandedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ExpandedSecret({}, ..)", self.conn_id)
    }
}

impl PartialEq for ConnSecret {
    /// Compares without an early exit, so the time taken says nothing about
    /// where two secrets differ.
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for ConnSecret {}

impl fmt::Debug for ConnSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnSecret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockEncrypt, KeyInit};
    use aes::Block;

    fn master() -> MasterKey {
        MasterKey::from_hex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
            .expect("valid hex")
    }

    #[test]
    fn expanded_and_plain_kdf_agree() {
        let m = master();
        let id = ConnId([1, 2, 3, 4, 5, 6, 7, 8]);
        let raw: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(m.secret(id).0, kdf(&raw, b"sec ", &id.0));
        assert_eq!(m.bind_key(), kdf(&raw, b"bind", &[0; 8]));
    }

    #[test]
    fn kdf_block_layout() {
        // Each 8-byte output chunk i is the head of AES(K, u32le(i) ‖ label ‖ C).
        let key = [7u8; 32];
        let out = kdf(&key, b"abcd", b"01234567");
        // The reference AES (RustCrypto), whichever path `kdf` ran.
        let cipher = aes::Aes256Enc::new(&key.into());
        for i in 0u32..4 {
            let mut block = Block::default();
            block[..4].copy_from_slice(&i.to_le_bytes());
            block[4..8].copy_from_slice(b"abcd");
            block[8..].copy_from_slice(b"01234567");
            cipher.encrypt_block(&mut block);
            let at = 8 * i as usize;
            assert_eq!(&out[at..at + 8], &block[..8]);
        }
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let m = master();
        assert_eq!(MasterKey::from_hex(&m.to_hex()).map(|k| k.raw), Ok(m.raw));
        assert_eq!(
            MasterKey::from_hex("00").map(|_| ()),
            Err(KeyHexError::WrongLength)
        );
        let bad = "zz".repeat(32);
        assert_eq!(
            MasterKey::from_hex(&bad).map(|_| ()),
            Err(KeyHexError::NotHex)
        );
        let s = m.secret(ConnId([9; 8]));
        assert_eq!(ConnSecret::from_hex(&s.to_hex()), Ok(s));
    }

    #[test]
    fn debug_never_prints_keys() {
        let m = master();
        let s = m.secret(ConnId([1; 8]));
        let k = s.key(Direction::ClientToServer, ConnId([1; 8]));
        for text in [format!("{m:?}"), format!("{s:?}"), format!("{k:?}")] {
            assert!(text.ends_with("(..)"), "{text}");
            assert!(!text.contains("0001020304"));
        }
    }

    #[test]
    fn expanded_secret_matches_plain_kdf() {
        let id = ConnId([3; 8]);
        let s = master().secret(id);
        let x = master().expanded_secret(id);
        assert_eq!(x.conn_id(), id);
        for dir in [Direction::ClientToServer, Direction::ServerToClient] {
            assert_eq!(x.key_bytes(dir), kdf(&s.0, dir.label(), &id.0));
            assert_eq!(s.key_bytes(dir, id), x.key_bytes(dir));
        }
        assert!(!format!("{x:?}").contains(&hex::encode(x.key_bytes(Direction::ClientToServer))));
    }

    #[test]
    fn directions_differ() {
        let id = ConnId([1; 8]);
        let s = master().secret(id);
        assert_ne!(
            s.key_bytes(Direction::ClientToServer, id),
            s.key_bytes(Direction::ServerToClient, id)
        );
    }

    /// `as_bytes` is the secret itself (what a credential writes in hex).
    #[test]
    fn conn_secret_as_bytes_are_its_bytes() {
        let id = ConnId([1, 2, 3, 4, 5, 6, 7, 8]);
        let s = master().secret(id);
        let raw: [u8; 32] = core::array::from_fn(|i| i as u8);
        assert_eq!(s.as_bytes(), &kdf(&raw, b"sec ", &id.0));
        assert_eq!(hex::encode(s.as_bytes()), s.to_hex());
    }

    /// An expanded secret shows its conn id, never its keys.
    #[test]
    fn expanded_secret_debug_shows_only_the_conn_id() {
        let id = ConnId([3; 8]);
        let x = master().expanded_secret(id);
        assert_eq!(format!("{x:?}"), format!("ExpandedSecret({id}, ..)"));
    }

    /// Secrets are equal only when every byte is: two that differ in two
    /// bytes by the same bits are not equal (the differences are OR-ed,
    /// not XOR-ed, into the result).
    #[test]
    fn secrets_differing_in_two_bytes_alike_are_not_equal() {
        let a = ConnSecret([0; 32]);
        let mut b = [0; 32];
        b[0] = 1;
        b[9] = 1;
        assert!(a != ConnSecret(b));
        assert!(a == ConnSecret([0; 32]));
    }
}
