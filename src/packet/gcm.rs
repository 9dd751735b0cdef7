//! AES-256-GCM with 96-bit nonces on AES-NI and PCLMULQDQ: the fast path.
//! `backend.rs` runs it only when the CPU has AES-NI, PCLMULQDQ, SSSE3 and
//! SSE4.1 (detected at run time, once) and `MPP_CRYPTO=portable` is not
//! set; otherwise every packet goes through `aes_gcm` (`gcm_portable.rs`).
//!
//! Why our own: a node derives a fresh key for every packet it opens or seals
//! (docs/PROTOCOL.md §3), and its packets are short (a heartbeat is 3 blocks, its
//! reply 7). `aes_gcm` then spends most of its time outside the cipher: a
//! separate one-block AES call for the GHASH key `H` at set-up and another for
//! the tag mask `E(J0)`, GHASH one block at a time through generic buffering
//! with a byte reversal per block, and copies for partial blocks. Here:
//!
//! - a key is only its AES round keys; `H`, `E(J0)` and the keystream of up
//!   to 8 blocks go through the AES unit together in one pass exactly as wide
//!   as the message needs;
//! - GHASH runs on PCLMULQDQ in the POLYVAL representation (RFC 8452,
//!   Appendix A: no bit shifts per multiplication), two blocks per reduction
//!   with `H²`, which halves its chain of dependent multiplications;
//! - sealing encrypts and hashes each block in one go;
//! - buffers are the packet's `text ‖ tag`, so a partial last block is read
//!   and written as 16 bytes, masked, instead of copied through a scratch
//!   block.
//!
//! What it must not do: execute on a CPU without those instructions. An
//! [`Aes256GcmNi`] is made only by the `unsafe` [`Aes256GcmNi::new`], whose
//! contract is that the CPU has them, so an existing key proves they exist
//! and its methods are safe. The helpers are `#[inline(always)]`, to be
//! inlined into `backend.rs`'s `#[target_feature]` functions (one per
//! packet operation, key derivation included), where each intrinsic is one
//! instruction; the one helper not inlined, `first_pass`, carries the
//! target features itself.
//!
//! Tested: output is byte for byte that of GCM (NIST SP 800-38D). The tests
//! below compare it with `aes_gcm` on random inputs (every AAD length to 40
//! with every text length to 300, and long texts);
//! `tests/crypto_wycheproof.rs` runs the Wycheproof AES-256-GCM vectors
//! through it and through the portable path; `tests/packet_vectors.rs` pins
//! a packet. On a CPU without the instructions these tests say so and check
//! the portable path only. Measurements: tuning/journal/2026-11-22.md (§4,
//! "A GCM of our own, second attempt"); the current figure is in
//! tuning/RESULTS.md.

use core::arch::x86_64::{
    __m128i, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_and_si128, _mm_clmulepi64_si128,
    _mm_insert_epi32, _mm_loadu_si128, _mm_or_si128, _mm_set_epi64x, _mm_set_epi8,
    _mm_setzero_si128, _mm_shuffle_epi32, _mm_shuffle_epi8, _mm_slli_epi64, _mm_slli_si128,
    _mm_srai_epi32, _mm_srli_epi64, _mm_srli_si128, _mm_storeu_si128, _mm_testz_si128,
    _mm_xor_si128,
};

use super::aesni::Aes256Ni;

const BLOCK: usize = 16;
/// Length of the tag that follows the text in every buffer here.
const TAG: usize = 16;

/// The buffer is shorter than a tag, or the tag did not verify (then the
/// buffer is unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unauthentic;

/// An AES-256-GCM key: the AES round keys only. `H = E_k(0)` is computed with
/// each message's first AES pass, where it costs one block of throughput
/// instead of a separate one-block call's latency. Exists only on a CPU
/// with AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct Aes256GcmNi {
    aes: Aes256Ni,
}

impl Aes256GcmNi {
    /// Expands a 32-byte key.
    ///
    /// # Safety
    ///
    /// The CPU has AES-NI, PCLMULQDQ, SSSE3 and SSE4.1
    /// (`backend::fast_available()`).
    #[inline(always)]
    pub(crate) unsafe fn new(key: &[u8; 32]) -> Self {
        Aes256GcmNi {
            // SAFETY: our caller promised AES-NI and SSSE3 (and more).
            aes: unsafe { Aes256Ni::new(key) },
        }
    }

    /// `buf` holds the plaintext followed by 16 bytes for the tag (the packet
    /// layout): encrypts the plaintext in place and writes the tag over `aad`
    /// and the ciphertext after it. Nothing is written if `buf` is shorter
    /// than a tag (the framing never passes such a buffer).
    #[inline(always)]
    pub(crate) fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
        let Some(len) = buf.len().checked_sub(TAG) else {
            return;
        };
        let rk = self.aes.round_keys();
        let nonce = load_nonce(nonce);
        let blocks = len.div_ceil(BLOCK);
        let mut first = [zero(); FIRST_PASS];
        // SAFETY: `self` exists, so the CPU has the features `first_pass`
        // is compiled for (see the module docs).
        let ks_blocks = unsafe { first_pass(rk, nonce, blocks, &mut first) };
        let mut gh = Ghash::new(first[0]);
        gh.aad(aad);
        // Each block is encrypted and hashed in one go, the first ones with
        // the keystream of the first pass, any others four at a time.
        seal_blocks(buf, len, 0, &first[2..2 + ks_blocks], &mut gh);
        let mut block = ks_blocks;
        while block < blocks {
            let ctr = 2 + block as u32; // see `ctr_from` on wrapping
            let ks = encrypt(
                rk,
                [
                    counter(nonce, ctr),
                    counter(nonce, ctr.wrapping_add(1)),
                    counter(nonce, ctr.wrapping_add(2)),
                    counter(nonce, ctr.wrapping_add(3)),
                ],
            );
            seal_blocks(buf, len, block, &ks, &mut gh);
            block += 4;
        }
        let tag = xor(gh.finish(aad.len(), len), first[1]);
        if let Some(out) = buf.last_chunk_mut::<TAG>() {
            store(out, tag);
        }
    }

    /// `buf` holds the ciphertext followed by its 16-byte tag: checks the tag
    /// over `aad` and the ciphertext, then decrypts the ciphertext in place.
    /// The tag bytes are left as they are; on a wrong tag nothing is
    /// decrypted and `buf` is unchanged.
    #[inline(always)]
    pub(crate) fn open_in_place(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), Unauthentic> {
        let (Some(len), Some(tag)) = (buf.len().checked_sub(TAG), buf.last_chunk::<TAG>()) else {
            return Err(Unauthentic);
        };
        let tag = load(tag);
        let rk = self.aes.round_keys();
        let nonce = load_nonce(nonce);
        let mut first = [zero(); FIRST_PASS];
        // SAFETY: `self` exists, so the CPU has the features `first_pass`
        // is compiled for (see the module docs).
        let ks_blocks = unsafe { first_pass(rk, nonce, len.div_ceil(BLOCK), &mut first) };
        let mut gh = Ghash::new(first[0]);
        gh.aad(aad);
        gh.text(buf, len);
        let diff = xor(xor(gh.finish(aad.len(), len), first[1]), tag);
        // One test of all 128 bits: the time taken does not depend on where
        // the tags differ (like `subtle::ConstantTimeEq`, which `aes_gcm` uses).
        // SAFETY: SSE4.1 is present (`self` exists); register op.
        if unsafe { _mm_testz_si128(diff, diff) } == 0 {
            return Err(Unauthentic);
        }
        xor_blocks(buf, len, 0, &first[2..2 + ks_blocks]);
        ctr_from(rk, nonce, buf, len, ks_blocks);
        Ok(())
    }
}

// SAFETY (every `unsafe` block below that only calls SIMD intrinsics on
// register values, whose comments say "features present"): these helpers
// run only for an existing `Aes256GcmNi`, which exists only on a CPU with
// AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 (`new`'s contract; SSE2 is part of
// x86-64), so the instructions exist; such intrinsics touch no memory.

#[inline(always)]
fn xor(a: __m128i, b: __m128i) -> __m128i {
    // SAFETY: register op, features present (see above).
    unsafe { _mm_xor_si128(a, b) }
}

#[inline(always)]
fn and(a: __m128i, b: __m128i) -> __m128i {
    // SAFETY: register op, features present (see above).
    unsafe { _mm_and_si128(a, b) }
}

/// `nonce ‖ 0³²` as a register.
#[inline(always)]
fn load_nonce(nonce: &[u8; 12]) -> __m128i {
    let mut block = [0u8; 16];
    block[..12].copy_from_slice(nonce);
    load(&block)
}

#[inline(always)]
fn load(block: &[u8; 16]) -> __m128i {
    // SAFETY: `block` is 16 readable bytes; the load is unaligned.
    unsafe { _mm_loadu_si128(block.as_ptr().cast()) }
}

#[inline(always)]
fn store(block: &mut [u8; 16], value: __m128i) {
    // SAFETY: `block` is 16 writable bytes; the store is unaligned.
    unsafe { _mm_storeu_si128(block.as_mut_ptr().cast(), value) }
}

/// 16 bytes of 0xff then 16 of zero: `tail_mask(n)` reads 16 from `16 - n`.
static TAIL_MASKS: [u8; 32] = {
    let mut m = [0u8; 32];
    let mut i = 0;
    while i < 16 {
        m[i] = 0xff;
        i += 1;
    }
    m
};

/// A mask keeping the first `n` bytes of a block (`n` ≤ 16).
#[inline(always)]
fn tail_mask(n: usize) -> __m128i {
    match TAIL_MASKS[16 - n.min(16)..].first_chunk::<16>() {
        Some(m) => load(m),
        None => zero(), // unreachable: 16 - min(n, 16) ≤ 16
    }
}

/// Block `at / 16` of the text `buf[..len]`, zero-padded when it is the
/// partial last one. It is read as 16 bytes, which stay inside `buf` because
/// the tag follows the text.
#[inline(always)]
fn text_block(buf: &[u8], at: usize, len: usize) -> Option<__m128i> {
    let block = load(buf.get(at..)?.first_chunk::<16>()?);
    Some(if len - at < BLOCK {
        and(block, tail_mask(len - at))
    } else {
        block
    })
}

/// A block of AAD (at most 16 bytes), zero-padded.
#[inline(always)]
fn aad_block(bytes: &[u8]) -> __m128i {
    if let Ok(full) = <&[u8; 16]>::try_from(bytes) {
        return load(full);
    }
    let mut block = [0u8; 16];
    if let Ok(conn_id) = <&[u8; 8]>::try_from(bytes) {
        // The protocol's AAD: the 8-byte conn id (a fixed-size copy).
        block[..8].copy_from_slice(conn_id);
    } else {
        for (b, a) in block.iter_mut().zip(bytes) {
            *b = *a;
        }
    }
    load(&block)
}

/// XORs keystream blocks into the text `buf[..len]` from block `first` on,
/// as far as the text reaches. A partial last block is read and written as
/// 16 bytes with the keystream masked to the text, so the tag bytes after it
/// keep their values.
#[inline(always)]
fn xor_blocks(buf: &mut [u8], len: usize, first: usize, ks: &[__m128i]) {
    for (i, k) in ks.iter().enumerate() {
        let at = (first + i) * BLOCK;
        if at >= len {
            break;
        }
        let Some(block) = buf.get_mut(at..).and_then(|b| b.first_chunk_mut::<16>()) else {
            break; // unreachable: the tag follows the text
        };
        let k = if len - at < BLOCK {
            and(*k, tail_mask(len - at))
        } else {
            *k
        };
        store(block, xor(load(block), k));
    }
}

/// Counter block `i`: `nonce ‖ u32be(i)`.
#[inline(always)]
fn counter(nonce: __m128i, i: u32) -> __m128i {
    // SAFETY: register op, features present (see above).
    unsafe { _mm_insert_epi32::<3>(nonce, i.to_be() as i32) }
}

/// AES-256 of `N` blocks together (N blocks in flight through each round).
#[inline(always)]
fn encrypt<const N: usize>(rk: &[__m128i; 15], mut b: [__m128i; N]) -> [__m128i; N] {
    for x in b.iter_mut() {
        *x = xor(*x, rk[0]);
    }
    // SAFETY: register ops, AES-NI present (see above).
    unsafe {
        for k in &rk[1..14] {
            for x in b.iter_mut() {
                *x = _mm_aesenc_si128(*x, *k);
            }
        }
        for x in b.iter_mut() {
            *x = _mm_aesenclast_si128(*x, rk[14]);
        }
    }
    b
}

/// Blocks in the first AES pass at most: `H`, `E(J0)` and 8 of keystream
/// (a heartbeat is 3 blocks of text, its reply 7).
const FIRST_PASS: usize = 10;

/// The first AES pass of a message of `blocks` blocks of text, exactly as
/// wide as it needs to be (up to [`FIRST_PASS`]): `H = E(0)`, the tag mask
/// `E(J0)` (counter 1) and the keystream for counters 2, 3, … in `out`, in
/// that order. Returns how many keystream blocks it computed.
///
/// Not inlined: sealing and opening share one copy of the nine widths. So
/// that its intrinsics are still single instructions it has the target
/// features itself.
///
/// # Safety
///
/// The CPU has AES-NI (an existing `Aes256GcmNi` proves it).
#[inline(never)]
#[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
unsafe fn first_pass(
    rk: &[__m128i; 15],
    nonce: __m128i,
    blocks: usize,
    out: &mut [__m128i; FIRST_PASS],
) -> usize {
    #[inline(always)]
    fn pass<const N: usize>(rk: &[__m128i; 15], nonce: __m128i, out: &mut [__m128i]) -> usize {
        let mut b = [zero(); N];
        for (i, x) in (1u32..).zip(b.iter_mut().skip(1)) {
            *x = counter(nonce, i);
        }
        out[..N].copy_from_slice(&encrypt(rk, b));
        N - 2
    }
    match blocks {
        0 => pass::<2>(rk, nonce, out),
        1 => pass::<3>(rk, nonce, out),
        2 => pass::<4>(rk, nonce, out),
        3 => pass::<5>(rk, nonce, out),
        4 => pass::<6>(rk, nonce, out),
        5 => pass::<7>(rk, nonce, out),
        6 => pass::<8>(rk, nonce, out),
        7 => pass::<9>(rk, nonce, out),
        _ => pass::<10>(rk, nonce, out),
    }
}

/// CTR-encrypts the text `buf[..len]` from block `done` on (counter
/// `2 + done`): four blocks per AES pass, then a pass as wide as the rest.
#[inline(always)]
fn ctr_from(rk: &[__m128i; 15], nonce: __m128i, buf: &mut [u8], len: usize, done: usize) {
    #[inline(always)]
    fn pass<const N: usize>(
        rk: &[__m128i; 15],
        nonce: __m128i,
        buf: &mut [u8],
        len: usize,
        block: usize,
    ) {
        // A packet is at most 1232 bytes; any message of fewer than 2³²
        // blocks keeps the 32-bit counter from wrapping into counters 0 and 1.
        let first = 2 + block as u32;
        let mut b = [zero(); N];
        for (i, x) in (0u32..).zip(b.iter_mut()) {
            *x = counter(nonce, first.wrapping_add(i));
        }
        xor_blocks(buf, len, block, &encrypt(rk, b));
    }
    let blocks = len.div_ceil(BLOCK);
    let mut block = done;
    while blocks - block >= 4 {
        pass::<4>(rk, nonce, buf, len, block);
        block += 4;
    }
    match blocks - block {
        1 => pass::<1>(rk, nonce, buf, len, block),
        2 => pass::<2>(rk, nonce, buf, len, block),
        3 => pass::<3>(rk, nonce, buf, len, block),
        _ => {}
    }
}

/// Reverses the 16 bytes of a block: GCM's bit order to POLYVAL's.
#[inline(always)]
fn bswap(x: __m128i) -> __m128i {
    // SAFETY: register ops, SSSE3 present (see above).
    unsafe {
        _mm_shuffle_epi8(
            x,
            _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        )
    }
}

#[inline(always)]
fn zero() -> __m128i {
    // SAFETY: register op, SSE2 present (see above).
    unsafe { _mm_setzero_si128() }
}

/// x¹²⁸ + x¹²⁷ + x¹²⁶ + x¹²¹ + 1 without its x¹²⁸ term, in POLYVAL's bit
/// order (bit i = coefficient of xⁱ).
#[inline(always)]
fn poly() -> __m128i {
    // SAFETY: register op, SSE2 present (see above).
    unsafe { _mm_set_epi64x(0xc200_0000_0000_0000_u64 as i64, 1) }
}

/// `x · h` in POLYVAL's field (RFC 8452's `mulX_POLYVAL`).
#[inline(always)]
fn mul_x(h: __m128i) -> __m128i {
    // SAFETY: register ops, SSE2 present (see above).
    unsafe {
        // All ones when bit 127 is set: x¹²⁸ reduces to poly().
        let top = _mm_srai_epi32::<31>(_mm_shuffle_epi32::<0xff>(h));
        let carry = _mm_slli_si128::<8>(_mm_srli_epi64::<63>(h));
        let shifted = _mm_or_si128(_mm_slli_epi64::<1>(h), carry);
        _mm_xor_si128(shifted, _mm_and_si128(top, poly()))
    }
}

/// The 256-bit carry-less product `a · b` as (low, middle, high) parts:
/// schoolbook, 4 PCLMULQDQ, nothing reduced yet.
#[inline(always)]
fn mul_wide(a: __m128i, b: __m128i) -> [__m128i; 3] {
    // SAFETY: register ops, PCLMULQDQ and SSE2 present (see above).
    unsafe {
        [
            _mm_clmulepi64_si128::<0x00>(a, b),
            _mm_xor_si128(
                _mm_clmulepi64_si128::<0x01>(a, b),
                _mm_clmulepi64_si128::<0x10>(a, b),
            ),
            _mm_clmulepi64_si128::<0x11>(a, b),
        ]
    }
}

/// POLYVAL's reduction of a product from [`mul_wide`] (or a XOR of several):
/// `· x⁻¹²⁸ mod P`, a Montgomery reduction in two x⁻⁶⁴ steps
/// (x⁻⁶⁴ ≡ x⁶⁴ + 0xc2…00, so each step is a qword swap plus one PCLMULQDQ
/// by 0xc200000000000000).
#[inline(always)]
fn reduce([lo, mid, hi]: [__m128i; 3]) -> __m128i {
    // SAFETY: register ops, PCLMULQDQ and SSE2 present (see above).
    unsafe {
        let lo = _mm_xor_si128(lo, _mm_slli_si128::<8>(mid));
        let hi = _mm_xor_si128(hi, _mm_srli_si128::<8>(mid));
        let p = poly();
        let lo = _mm_xor_si128(
            _mm_shuffle_epi32::<0x4e>(lo),
            _mm_clmulepi64_si128::<0x10>(lo, p),
        );
        let lo = _mm_xor_si128(
            _mm_shuffle_epi32::<0x4e>(lo),
            _mm_clmulepi64_si128::<0x10>(lo, p),
        );
        _mm_xor_si128(hi, lo)
    }
}

/// POLYVAL's `dot(a, b) = a · b · x⁻¹²⁸`.
#[inline(always)]
fn dot(a: __m128i, b: __m128i) -> __m128i {
    reduce(mul_wide(a, b))
}

#[inline(always)]
fn xor3(a: [__m128i; 3], b: [__m128i; 3]) -> [__m128i; 3] {
    [xor(a[0], b[0]), xor(a[1], b[1]), xor(a[2], b[2])]
}

/// GHASH, computed as POLYVAL (RFC 8452, Appendix A): GHASH(H, X…) =
/// ByteReverse(POLYVAL(mulX(ByteReverse(H)), ByteReverse(X)…)).
///
/// Blocks are taken two at a time with one reduction per pair,
/// `y' = (y + X₁)·H² + X₂·H`: half the chain of dependent multiplications
/// of one block at a time (the chain sets GHASH's latency, ~25 cycles per
/// step), for about the same instruction count. More powers of `H` would
/// shorten it further but cost a multiplication each, for every packet: its
/// key is fresh.
struct Ghash {
    /// mulX(ByteReverse(H)): POLYVAL's key.
    h: __m128i,
    /// `h²` in POLYVAL's field (`dot(h, h)`).
    h2: __m128i,
    /// The state after every block before `pending`.
    y: __m128i,
    /// A block waiting for its pair (already byte-reversed).
    pending: Option<__m128i>,
}

impl Ghash {
    /// GHASH under `h = E_k(0)` (GCM's byte order).
    #[inline(always)]
    fn new(h: __m128i) -> Self {
        let h = mul_x(bswap(h));
        Ghash {
            h,
            h2: dot(h, h),
            y: zero(),
            pending: None,
        }
    }

    /// One block in GCM's byte order.
    #[inline(always)]
    fn block(&mut self, x: __m128i) {
        let x = bswap(x);
        match self.pending.take() {
            None => self.pending = Some(x),
            Some(first) => {
                self.y = reduce(xor3(
                    mul_wide(xor(self.y, first), self.h2),
                    mul_wide(x, self.h),
                ));
            }
        }
    }

    /// `aad`, zero-padded to whole blocks.
    #[inline(always)]
    fn aad(&mut self, aad: &[u8]) {
        for chunk in aad.chunks(BLOCK) {
            self.block(aad_block(chunk));
        }
    }

    /// The text `buf[..len]`, zero-padded.
    #[inline(always)]
    fn text(&mut self, buf: &[u8], len: usize) {
        let mut at = 0;
        while at < len {
            let Some(x) = text_block(buf, at, len) else {
                break; // unreachable: the tag follows the text
            };
            self.block(x);
            at += BLOCK;
        }
    }

    /// The lengths block u64be(bits(aad)) ‖ u64be(bits(text)), then the
    /// result in GCM's byte order.
    #[inline(always)]
    fn finish(mut self, aad_len: usize, len: usize) -> __m128i {
        // The lengths block byte-reversed: bits(text) in the low half.
        // SAFETY: register op, SSE2 present (see above).
        let lengths =
            unsafe { _mm_set_epi64x((aad_len as u64 * 8) as i64, (len as u64 * 8) as i64) };
        let y = match self.pending.take() {
            None => dot(xor(self.y, lengths), self.h),
            Some(first) => reduce(xor3(
                mul_wide(xor(self.y, first), self.h2),
                mul_wide(lengths, self.h),
            )),
        };
        bswap(y)
    }
}

/// Sealing's inner loop: XORs keystream `ks` into text blocks `first…` of
/// `buf[..len]` and hashes the ciphertext. A partial last block is written
/// as 16 bytes with zeros after the text, which the tag then overwrites.
#[inline(always)]
fn seal_blocks(buf: &mut [u8], len: usize, first: usize, ks: &[__m128i], gh: &mut Ghash) {
    for (i, k) in ks.iter().enumerate() {
        let at = (first + i) * BLOCK;
        if at >= len {
            break;
        }
        let Some(block) = buf.get_mut(at..).and_then(|b| b.first_chunk_mut::<16>()) else {
            break; // unreachable: the tag follows the text
        };
        let mut c = xor(load(block), *k);
        if len - at < BLOCK {
            c = and(c, tail_mask(len - at));
        }
        store(block, c);
        gh.block(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::consts::U12;
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    use aes_gcm::{AesGcm, Nonce, Tag};
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};

    type Reference = AesGcm<aes::Aes256, U12>;

    /// Whether this CPU can run the fast path; if not, the test says so and
    /// checks nothing (`tests/crypto_wycheproof.rs` then covers the
    /// portable path).
    fn fast_cpu() -> bool {
        let fast = crate::packet::backend::fast_available();
        if !fast {
            eprintln!("no AES-NI/PCLMULQDQ/SSSE3/SSE4.1 on this CPU: fast path not tested");
        }
        fast
    }

    /// Our key; only after `fast_cpu()` returned true.
    fn ni(key: &[u8; 32]) -> Aes256GcmNi {
        assert!(crate::packet::backend::fast_available());
        // SAFETY: the CPU has the features (asserted just above).
        unsafe { Aes256GcmNi::new(key) }
    }

    /// `plain ‖ tag` sealed by us; the tag space starts as random bytes.
    fn seal(
        key: &Aes256GcmNi,
        nonce: &[u8; 12],
        aad: &[u8],
        plain: &[u8],
        rng: &mut StdRng,
    ) -> Vec<u8> {
        let mut buf = plain.to_vec();
        buf.extend(rng.gen::<[u8; 16]>());
        key.seal_in_place(nonce, aad, &mut buf);
        buf
    }

    /// `plain ‖ tag` sealed by `aes_gcm`.
    fn reference_seal(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut buf = plain.to_vec();
        let tag = Reference::new(key.into())
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut buf)
            .expect("seal");
        buf.extend_from_slice(&tag);
        buf
    }

    /// Every AAD length 0..=40 with every plaintext length 0..=300, each with
    /// a random key and nonce: ciphertext and tag equal `aes_gcm`'s, opening
    /// round-trips (leaving the tag bytes as they were), and a tampered tag,
    /// ciphertext or AAD is refused with the buffer untouched.
    #[test]
    fn matches_aes_gcm() {
        if !fast_cpu() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(0x0067_636d);
        for aad_len in 0..=40usize {
            for len in 0..=300usize {
                let key: [u8; 32] = rng.gen();
                let nonce: [u8; 12] = rng.gen();
                let mut aad = vec![0u8; aad_len];
                let mut plain = vec![0u8; len];
                rng.fill_bytes(&mut aad);
                rng.fill_bytes(&mut plain);

                let ours = ni(&key);
                let sealed = seal(&ours, &nonce, &aad, &plain, &mut rng);
                let expected = reference_seal(&key, &nonce, &aad, &plain);
                assert_eq!(sealed, expected, "aad {aad_len} len {len}");

                let mut opened = sealed.clone();
                assert_eq!(ours.open_in_place(&nonce, &aad, &mut opened), Ok(()));
                assert_eq!(opened[..len], plain[..]);
                assert_eq!(opened[len..], sealed[len..], "tag bytes untouched");

                // Tampering: one random bit of the tag, the ciphertext or the AAD.
                let mut bad = sealed.clone();
                bad[len + rng.gen_range(0..16)] ^= 1 << rng.gen_range(0..8);
                let before = bad.clone();
                assert_eq!(ours.open_in_place(&nonce, &aad, &mut bad), Err(Unauthentic));
                assert_eq!(bad, before);
                // The reference agrees that this tag is wrong.
                let (body, tag) = before.split_at(len);
                let mut body = body.to_vec();
                assert!(Reference::new(&key.into())
                    .decrypt_in_place_detached(
                        Nonce::from_slice(&nonce),
                        &aad,
                        &mut body,
                        Tag::from_slice(tag),
                    )
                    .is_err());
                if len > 0 {
                    let mut bad = sealed.clone();
                    bad[rng.gen_range(0..len)] ^= 1 << rng.gen_range(0..8);
                    let before = bad.clone();
                    assert_eq!(ours.open_in_place(&nonce, &aad, &mut bad), Err(Unauthentic));
                    assert_eq!(bad, before);
                }
                if aad_len > 0 {
                    let mut bad_aad = aad.clone();
                    bad_aad[rng.gen_range(0..aad_len)] ^= 1 << rng.gen_range(0..8);
                    let mut buf = sealed.clone();
                    assert_eq!(
                        ours.open_in_place(&nonce, &bad_aad, &mut buf),
                        Err(Unauthentic)
                    );
                    assert_eq!(buf, sealed);
                }
            }
        }
    }

    /// Long messages (every block count up to a full packet and beyond),
    /// where the CTR loop runs several passes.
    #[test]
    fn long_messages_match_aes_gcm() {
        if !fast_cpu() {
            return;
        }
        let mut rng = StdRng::seed_from_u64(7);
        for len in 300..=1300 {
            let key: [u8; 32] = rng.gen();
            let nonce: [u8; 12] = rng.gen();
            let mut plain = vec![0u8; len];
            rng.fill_bytes(&mut plain);
            let ours = ni(&key);
            let sealed = seal(&ours, &nonce, b"conn-id!", &plain, &mut rng);
            assert_eq!(
                sealed,
                reference_seal(&key, &nonce, b"conn-id!", &plain),
                "len {len}"
            );
            let mut opened = sealed.clone();
            assert_eq!(ours.open_in_place(&nonce, b"conn-id!", &mut opened), Ok(()));
            assert_eq!(opened[..len], plain[..]);
        }
    }

    /// A buffer shorter than a tag is refused by open and left alone by seal.
    #[test]
    fn short_buffers() {
        if !fast_cpu() {
            return;
        }
        let key = ni(&[1; 32]);
        for n in 0..TAG {
            let mut buf = vec![9u8; n];
            key.seal_in_place(&[0; 12], b"", &mut buf);
            assert_eq!(buf, vec![9u8; n]);
            assert_eq!(key.open_in_place(&[0; 12], b"", &mut buf), Err(Unauthentic));
        }
    }

    /// NIST GCM test vector (McGrew–Viega test case 16: AES-256, 60-byte
    /// plaintext, 20-byte AAD).
    #[test]
    fn nist_test_case_16() {
        if !fast_cpu() {
            return;
        }
        let key = hex::decode("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .expect("hex");
        let nonce = hex::decode("cafebabefacedbaddecaf888").expect("hex");
        let aad = hex::decode("feedfacedeadbeeffeedfacedeadbeefabaddad2").expect("hex");
        let mut buf = hex::decode(
            "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72\
             1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39",
        )
        .expect("hex");
        buf.extend([0u8; 16]);
        let key: [u8; 32] = key.try_into().expect("32 bytes");
        let nonce: [u8; 12] = nonce.try_into().expect("12 bytes");
        ni(&key).seal_in_place(&nonce, &aad, &mut buf);
        assert_eq!(
            hex::encode(&buf),
            "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa\
             8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662\
             76fc6ece0f4e1768cddf8853bb2d551b"
        );
    }
}
