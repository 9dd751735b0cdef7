//! AES-256-GCM through `aes_gcm`, for builds without AES-NI, PCLMULQDQ
//! and SSE4.1 compiled in: the same `Gcm` calls as `gcm.rs`, which
//! `framing` uses on either build (`packet/mod.rs` picks the file).

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{AesGcm, Nonce, Tag};

/// The tag did not verify; the buffer is unchanged.
pub(crate) struct Unauthentic;

/// AES-256-GCM with a 96-bit nonce over encryption-only AES: GCM never
/// decrypts a block, so the decryption round keys `aes_gcm::Aes256Gcm`
/// would also compute for every derived key are skipped.
#[derive(Clone)]
pub(crate) struct Gcm(AesGcm<super::Aes256, U12>);

impl Gcm {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        Gcm(AesGcm::new(key.into()))
    }

    /// `buf` = plaintext ‖ room for the tag (see `gcm.rs`).
    pub(crate) fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
        let Some(len) = buf.len().checked_sub(16) else {
            return;
        };
        let (body, tag_out) = buf.split_at_mut(len);
        // Never fails: packets are far below GCM's length limits.
        if let Ok(tag) = self
            .0
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, body)
        {
            tag_out.copy_from_slice(&tag);
        }
    }

    /// `buf` = ciphertext ‖ tag (see `gcm.rs`).
    pub(crate) fn open_in_place(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), Unauthentic> {
        let len = buf.len().checked_sub(16).ok_or(Unauthentic)?;
        let (body, tag) = buf.split_at_mut(len);
        self.0
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, body, Tag::from_slice(tag))
            .map_err(|_| Unauthentic)
    }
}
