//! AES-256 encryption on AES-NI, the fast path's block cipher (the KDF of
//! docs/PROTOCOL.md §3.4 and, through [`Aes256Ni::round_keys`], our
//! AES-GCM in `gcm.rs`). The portable path uses `aes::Aes256Enc` instead;
//! `backend.rs` chooses between them at run time.
//!
//! Why not `aes::Aes256Enc` on the fast path: on x86 it is a run-time
//! "autodetect" union whose unused software half makes every key object 960
//! bytes. This protocol creates three AES-256 keys per packet (the
//! connection secret and one AES-GCM key per direction, docs/PROTOCOL.md
//! §3), and zeroing and moving ~1 KB objects was a measurable share of a
//! heartbeat. Here a key is its 15 round keys (240 bytes);
//! `tests/packet_vectors.rs` pins its output.
//!
//! What it must not do: run on a CPU without AES-NI and SSSE3. An
//! [`Aes256Ni`] can only be made by the `unsafe` [`Aes256Ni::new`], whose
//! contract is that the CPU has both (`backend.rs` checks with
//! `is_x86_feature_detected!`); so a key's existence proves the instructions
//! exist, and the methods of an existing key are safe. Everything here is
//! `#[inline(always)]` and meant to be inlined into one of `backend.rs`'s
//! `#[target_feature]` functions, where the intrinsics become single
//! instructions (called from elsewhere, they are correct but slow
//! out-of-line calls). Encryption only: GCM and the KDF never decrypt a
//! block.

use core::arch::x86_64::{
    __m128i, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_loadu_si128, _mm_set1_epi32, _mm_set_epi8,
    _mm_setzero_si128, _mm_shuffle_epi32, _mm_shuffle_epi8, _mm_slli_si128, _mm_storeu_si128,
    _mm_xor_si128,
};

/// An expanded AES-256 encryption key. Exists only on a CPU with AES-NI and
/// SSSE3 (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct Aes256Ni {
    round_keys: [__m128i; 15],
}

// SAFETY (every `unsafe` block below that only calls SIMD intrinsics on
// register values): SSE2 is part of x86-64, and AES-NI and SSSE3 are
// present because an `Aes256Ni` exists or is being made by `new`, whose
// caller promised them; such intrinsics touch no memory.

/// One step of the AES-256 key schedule: `prev` XOR its shifted prefixes,
/// XOR the broadcast word of `assist`.
#[inline(always)]
fn mix(prev: __m128i, assist: __m128i) -> __m128i {
    // SAFETY: SSE2 register ops (see above).
    unsafe {
        let mut k = prev;
        k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        k = _mm_xor_si128(k, _mm_slli_si128::<8>(k));
        _mm_xor_si128(k, assist)
    }
}

/// Two steps of the AES-256 key schedule (round keys `i` and `i + 1`).
///
/// `SubWord` comes from AESENCLAST on a register whose four columns are the
/// same word (ShiftRows then moves nothing), with the round constant as its
/// round key, and PSHUFB does `RotWord` and the broadcast in one go. Measured
/// here, a whole schedule then takes ~63 ns of latency instead of ~150 ns
/// with AESKEYGENASSIST (slow on this machine's cores); a node runs three
/// schedules per packet round trip, each on the critical path. (This is why
/// the fast path needs SSSE3 as well.)
macro_rules! expand_pair {
    ($rk:ident, $i:literal, $rcon:literal) => {{
        // SAFETY: AES-NI and SSSE3 register ops; `new`'s caller promised
        // both (see above).
        unsafe {
            // Each column: bytes 13, 14, 15, 12 of the previous key, i.e.
            // RotWord of its last word.
            let rot_last = _mm_set_epi8(
                12, 15, 14, 13, 12, 15, 14, 13, 12, 15, 14, 13, 12, 15, 14, 13,
            );
            let t = _mm_aesenclast_si128(
                _mm_shuffle_epi8($rk[$i - 1], rot_last),
                _mm_set1_epi32($rcon),
            );
            $rk[$i] = mix($rk[$i - 2], t);
            if $i + 1 < 15 {
                let u =
                    _mm_aesenclast_si128(_mm_shuffle_epi32::<0xff>($rk[$i]), _mm_setzero_si128());
                $rk[$i + 1] = mix($rk[$i - 1], u);
            }
        }
    }};
}

impl Aes256Ni {
    /// Expands a 32-byte key.
    ///
    /// # Safety
    ///
    /// The CPU has AES-NI and SSSE3 (`backend::fast_available()`). Call it
    /// from a function with those target features enabled, or it is slow.
    #[inline(always)]
    pub(crate) unsafe fn new(key: &[u8; 32]) -> Self {
        // SAFETY: unaligned loads of the 32 key bytes, within the array.
        let mut rk: [__m128i; 15] = unsafe {
            let first = _mm_loadu_si128(key.as_ptr().cast());
            let second = _mm_loadu_si128(key.as_ptr().add(16).cast());
            [
                first, second, first, first, first, first, first, first, first, first, first,
                first, first, first, first,
            ]
        };
        expand_pair!(rk, 2, 0x01);
        expand_pair!(rk, 4, 0x02);
        expand_pair!(rk, 6, 0x04);
        expand_pair!(rk, 8, 0x08);
        expand_pair!(rk, 10, 0x10);
        expand_pair!(rk, 12, 0x20);
        expand_pair!(rk, 14, 0x40);
        Aes256Ni { round_keys: rk }
    }

    /// The 15 round keys, for our AES-GCM (`gcm.rs`), which runs its own
    /// AES passes.
    #[inline(always)]
    pub(crate) fn round_keys(&self) -> &[__m128i; 15] {
        &self.round_keys
    }

    /// Encrypts four blocks together: four blocks in flight fill the AES
    /// unit (latency 4, one per cycle), and the KDF (docs/PROTOCOL.md §3.4)
    /// is exactly four blocks.
    #[inline(always)]
    pub(crate) fn encrypt4(&self, blocks: &mut [[u8; 16]; 4]) {
        let k = &self.round_keys;
        // SAFETY: each load and store is of one of the four 16-byte arrays;
        // AES-NI is present (an `Aes256Ni` exists, see above).
        unsafe {
            let mut b = [k[0]; 4];
            for (x, block) in b.iter_mut().zip(blocks.iter()) {
                *x = _mm_xor_si128(_mm_loadu_si128(block.as_ptr().cast()), k[0]);
            }
            for rk in &k[1..14] {
                for x in b.iter_mut() {
                    *x = _mm_aesenc_si128(*x, *rk);
                }
            }
            for (x, block) in b.iter().zip(blocks.iter_mut()) {
                _mm_storeu_si128(block.as_mut_ptr().cast(), _mm_aesenclast_si128(*x, k[14]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockEncrypt, KeyInit};

    /// `key` expanded by us, if this CPU has the instructions.
    fn ours(key: &[u8; 32]) -> Option<Aes256Ni> {
        // SAFETY: only when the CPU has AES-NI and SSSE3 (checked).
        crate::packet::backend::fast_available().then(|| unsafe { Aes256Ni::new(key) })
    }

    /// FIPS-197 Appendix C.3 and agreement with the `aes` crate on many keys.
    /// Skipped, saying so, on a CPU without AES-NI.
    #[test]
    fn matches_fips_197_and_the_aes_crate() {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let Some(cipher) = ours(&key) else {
            eprintln!("no AES-NI/SSSE3 on this CPU: the fast path is not tested here");
            return;
        };
        let plain: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        let mut blocks = [plain; 4];
        cipher.encrypt4(&mut blocks);
        for b in blocks {
            assert_eq!(hex::encode(b), "8ea2b7ca516745bfeafc49904b496089");
        }

        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let mut key = [0u8; 32];
            for b in key.iter_mut() {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                *b = (seed >> 56) as u8;
            }
            let Some(cipher) = ours(&key) else { return };
            let theirs = aes::Aes256Enc::new(&key.into());
            let mut a = [[0u8; 16]; 4];
            for (i, blk) in a.iter_mut().enumerate() {
                blk[0] = i as u8;
                blk[15] = (seed >> 8) as u8;
            }
            let mut b = a;
            cipher.encrypt4(&mut a);
            for blk in b.iter_mut() {
                theirs.encrypt_block(blk.into());
            }
            assert_eq!(a, b);
        }
    }
}
