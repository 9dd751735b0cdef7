//! AES-256-GCM through RustCrypto's `aes_gcm` and `aes`: the portable path,
//! which `backend.rs` runs on a CPU without AES-NI, PCLMULQDQ, SSSE3 or
//! SSE4.1, on other architectures, and wherever `MPP_CRYPTO=portable` is
//! set. The same calls as `gcm.rs` (buffers are `text ‖ tag`).
//!
//! It must contain no code of our own beyond adapting buffers: it is the
//! reference our fast path is tested against. Those crates pick their own
//! AES and GHASH code at run time (hardware where present, constant-time
//! software otherwise), so this path never executes an instruction the CPU
//! lacks.

use aes_gcm::aead::consts::U12;
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{AesGcm, Nonce, Tag};

/// The tag did not verify; the buffer is unchanged.
pub(crate) struct Unauthentic;

/// AES-256-GCM with a 96-bit nonce over encryption-only AES: GCM never
/// decrypts a block, so the decryption round keys `aes_gcm::Aes256Gcm`
/// would also compute for every derived key are skipped.
#[derive(Clone)]
pub(crate) struct Gcm(AesGcm<aes::Aes256Enc, U12>);

impl Gcm {
    /// Expands a 32-byte key.
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
