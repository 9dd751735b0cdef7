//! AES-256-GCM framing of every datagram (docs/PROTOCOL.md §3):
//! `conn id (8) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`, AAD = the conn id.
//!
//! This is the hot path: a node opens and seals every packet here, so the
//! in-place functions never allocate and their errors carry no data. This file
//! must not choose nonces (the caller owns nonce uniqueness per key), read a
//! clock, or interpret the plaintext.

use std::fmt;

use super::backend::{Gcm, PacketCipher};
use super::conn_id::{ConnId, CONN_ID_LEN};
use super::kdf::KEY_LEN;

/// Length of the nonce that follows the conn id (docs/PROTOCOL.md §3).
pub const NONCE_LEN: usize = 12;
/// Length of the cleartext header: conn id ‖ nonce (docs/PROTOCOL.md §3).
pub const HEADER_LEN: usize = CONN_ID_LEN + NONCE_LEN;
/// Length of the GCM tag at the end of every packet (docs/PROTOCOL.md §3).
pub const TAG_LEN: usize = 16;
/// Bytes a packet adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest datagram either side sends or accepts (docs/PROTOCOL.md §3).
pub const MAX_PACKET: usize = 1232;
/// Largest plaintext that fits in one packet.
pub const MAX_PLAINTEXT: usize = MAX_PACKET - OVERHEAD;

/// Why a packet could not be sealed or opened. Fieldless: on the hot path an
/// error is counted, never described (docs/PROTOCOL.md §3: no answer, no state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The buffer cannot hold header, plaintext and tag.
    #[error("buffer too small for the packet")]
    BufferTooSmall,
    /// The packet would be, or is, longer than MAX_PACKET.
    #[error("packet longer than {MAX_PACKET} bytes")]
    TooLong,
    /// The datagram is shorter than header plus tag.
    #[error("packet shorter than {OVERHEAD} bytes")]
    TooShort,
    /// The conn id is the reserved all-zero id.
    #[error("reserved conn id")]
    ReservedConnId,
    /// The tag did not verify: wrong key, wrong conn id, or tampered bytes.
    #[error("packet failed authentication")]
    Unauthentic,
}

/// One direction's packet key, ready to seal or open: its expanded AES key
/// schedule (and, on the portable path, its GHASH key), for the AES-GCM
/// implementation the process runs (`packet/mod.rs`).
#[derive(Clone)]
pub struct PacketKey(pub(super) Gcm);

impl PacketKey {
    /// Expands a raw 32-byte packet key (`k_c2s` or `k_s2c`).
    #[inline]
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        Gcm::packet_key(key)
    }
}

impl fmt::Debug for PacketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PacketKey(..)")
    }
}

/// Seals a packet in place. The caller has written the plaintext at
/// `buf[HEADER_LEN..HEADER_LEN + plaintext_len]`; this writes conn id and nonce
/// before it and the tag after it, and returns the packet's total length.
/// The nonce must never repeat under one key (docs/PROTOCOL.md §3).
#[inline]
pub fn seal_in_place(
    key: &PacketKey,
    conn_id: ConnId,
    nonce: [u8; NONCE_LEN],
    buf: &mut [u8],
    plaintext_len: usize,
) -> Result<usize, PacketError> {
    key.0.seal_packet(conn_id, nonce, buf, plaintext_len)
}

/// [`seal_in_place`] with either AES-GCM implementation: `backend.rs` runs
/// it inside the fast path's `#[target_feature]` function, or with the
/// portable one.
#[inline(always)]
pub(super) fn seal_with<C: PacketCipher>(
    cipher: &C,
    conn_id: ConnId,
    nonce: [u8; NONCE_LEN],
    buf: &mut [u8],
    plaintext_len: usize,
) -> Result<usize, PacketError> {
    if conn_id.is_reserved() {
        return Err(PacketError::ReservedConnId);
    }
    let total = plaintext_len
        .checked_add(OVERHEAD)
        .ok_or(PacketError::TooLong)?;
    if total > MAX_PACKET {
        return Err(PacketError::TooLong);
    }
    let packet = buf.get_mut(..total).ok_or(PacketError::BufferTooSmall)?;
    let (header, body_and_tag) = packet.split_at_mut(HEADER_LEN);
    header[..CONN_ID_LEN].copy_from_slice(&conn_id.0);
    header[CONN_ID_LEN..].copy_from_slice(&nonce);
    // docs/PROTOCOL.md §3: AAD = the 8-byte conn id.
    cipher.seal_in_place(&nonce, &conn_id.0, body_and_tag);
    Ok(total)
}

/// Opens a packet in place and returns its plaintext, which lies inside
/// `packet`. The tag is checked before anything is decrypted, so on any error
/// the buffer holds what it held before.
#[inline]
pub fn open_in_place<'a>(key: &PacketKey, packet: &'a mut [u8]) -> Result<&'a [u8], PacketError> {
    key.0.open_packet(packet)
}

/// [`open_in_place`] with either AES-GCM implementation (see
/// [`seal_with`]).
#[inline(always)]
pub(super) fn open_with<'a, C: PacketCipher>(
    cipher: &C,
    packet: &'a mut [u8],
) -> Result<&'a [u8], PacketError> {
    if packet.len() < OVERHEAD {
        return Err(PacketError::TooShort);
    }
    if packet.len() > MAX_PACKET {
        return Err(PacketError::TooLong);
    }
    let (header, body_and_tag) = packet.split_at_mut(HEADER_LEN);
    let (conn_id, nonce) = header.split_at(CONN_ID_LEN);
    let Ok(nonce) = <&[u8; NONCE_LEN]>::try_from(nonce) else {
        return Err(PacketError::Unauthentic); // unreachable: lengths fixed above
    };
    cipher
        .open_in_place(nonce, conn_id, body_and_tag)
        .map_err(|_| PacketError::Unauthentic)?;
    let body_len = body_and_tag.len() - TAG_LEN;
    Ok(&body_and_tag[..body_len])
}

/// The conn id a datagram claims, read before any key is known: `None` if the
/// datagram is too short to be a packet or claims the reserved id.
pub fn peek_conn_id(packet: &[u8]) -> Option<ConnId> {
    if packet.len() < OVERHEAD {
        return None;
    }
    let id = ConnId::from_slice(packet.get(..CONN_ID_LEN)?)?;
    (!id.is_reserved()).then_some(id)
}

/// Seals `plaintext` into a new packet; for tools and tests (the hot path uses
/// [`seal_in_place`]).
pub fn seal(
    key: &PacketKey,
    conn_id: ConnId,
    nonce: [u8; NONCE_LEN],
    plaintext: &[u8],
) -> Result<Vec<u8>, PacketError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(PacketError::TooLong);
    }
    let mut buf = vec![0u8; plaintext.len() + OVERHEAD];
    buf[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
    let len = seal_in_place(key, conn_id, nonce, &mut buf, plaintext.len())?;
    buf.truncate(len);
    Ok(buf)
}

/// Opens a packet into a new plaintext vector; for tools and tests (the hot
/// path uses [`open_in_place`]).
pub fn open(key: &PacketKey, packet: &[u8]) -> Result<Vec<u8>, PacketError> {
    let mut buf = packet.to_vec();
    open_in_place(key, &mut buf).map(<[u8]>::to_vec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PacketKey {
        PacketKey::new(&[b; KEY_LEN])
    }

    const ID: ConnId = ConnId([1, 2, 3, 4, 5, 6, 7, 8]);

    #[test]
    fn round_trip_in_place() {
        let k = key(1);
        let mut buf = [0u8; MAX_PACKET];
        buf[HEADER_LEN..HEADER_LEN + 5].copy_from_slice(b"hello");
        let n = seal_in_place(&k, ID, [9; NONCE_LEN], &mut buf, 5).expect("fits");
        assert_eq!(n, 5 + OVERHEAD);
        assert_eq!(peek_conn_id(&buf[..n]), Some(ID));
        assert_eq!(&buf[8..20], &[9; 12]);
        let pt = open_in_place(&k, &mut buf[..n]).expect("authentic");
        assert_eq!(pt, b"hello");
    }

    #[test]
    fn sizes_are_checked() {
        let k = key(1);
        let mut buf = vec![0u8; MAX_PACKET + 10];
        assert_eq!(
            seal_in_place(&k, ID, [0; 12], &mut buf, MAX_PLAINTEXT + 1),
            Err(PacketError::TooLong)
        );
        assert_eq!(
            seal_in_place(&k, ID, [0; 12], &mut buf, usize::MAX),
            Err(PacketError::TooLong)
        );
        assert_eq!(
            seal_in_place(&k, ID, [0; 12], &mut buf[..OVERHEAD + 3], 4),
            Err(PacketError::BufferTooSmall)
        );
        assert_eq!(
            seal_in_place(&k, ConnId::RESERVED, [0; 12], &mut buf, 4),
            Err(PacketError::ReservedConnId)
        );
        let n = seal_in_place(&k, ID, [0; 12], &mut buf, MAX_PLAINTEXT).expect("max fits");
        assert_eq!(n, MAX_PACKET);
        assert_eq!(open(&k, &buf[..n]).map(|p| p.len()), Ok(MAX_PLAINTEXT));
        assert_eq!(open(&k, &buf[..MAX_PACKET + 1]), Err(PacketError::TooLong));
        assert_eq!(open(&k, &buf[..OVERHEAD - 1]), Err(PacketError::TooShort));
        assert_eq!(
            seal(&k, ID, [0; 12], &[0; MAX_PLAINTEXT + 1]),
            Err(PacketError::TooLong)
        );
    }

    #[test]
    fn empty_plaintext_round_trips() {
        let k = key(3);
        let p = seal(&k, ID, [1; 12], b"").expect("empty seals");
        assert_eq!(p.len(), OVERHEAD);
        assert_eq!(open(&k, &p), Ok(Vec::new()));
    }

    #[test]
    fn wrong_key_or_conn_id_fails_and_leaves_buffer() {
        let p = seal(&key(1), ID, [2; 12], b"payload").expect("seals");
        assert_eq!(open(&key(2), &p), Err(PacketError::Unauthentic));
        let mut moved = p.clone();
        moved[0] ^= 1;
        assert_eq!(open(&key(1), &moved), Err(PacketError::Unauthentic));
        let mut buf = p.clone();
        assert!(open_in_place(&key(2), &mut buf).is_err());
        assert_eq!(buf, p);
    }

    #[test]
    fn peek_rejects_short_and_reserved() {
        assert_eq!(peek_conn_id(&[1; OVERHEAD - 1]), None);
        assert_eq!(peek_conn_id(&[0; 64]), None);
        assert_eq!(peek_conn_id(&[7; 64]), Some(ConnId([7; 8])));
    }

    /// The boundaries of `seal` and `peek_conn_id`: exactly
    /// `MAX_PLAINTEXT` bytes seal into a `MAX_PACKET` packet, and exactly
    /// `OVERHEAD` bytes (an empty plaintext) is a packet whose conn id
    /// can be read.
    #[test]
    fn boundaries_of_seal_and_peek() {
        let k = key(4);
        let p = seal(&k, ID, [3; 12], &[5; MAX_PLAINTEXT]).expect("the largest plaintext");
        assert_eq!(p.len(), MAX_PACKET);
        assert_eq!(open(&k, &p), Ok(vec![5; MAX_PLAINTEXT]));
        assert_eq!(peek_conn_id(&[7; OVERHEAD]), Some(ConnId([7; 8])));
        let empty = seal(&k, ID, [3; 12], b"").expect("seals");
        assert_eq!(peek_conn_id(&empty), Some(ID));
    }
}
