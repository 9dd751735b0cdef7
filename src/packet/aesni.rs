//! AES-256 encryption on AES-NI, for builds where the instructions are
//! compiled in (`.cargo/config.toml`).
//!
//! Why not `aes::Aes256Enc`: on x86 it is a run-time "autodetect" union whose
//! unused software half makes every key object 960 bytes. This protocol
//! creates three AES-256 keys per packet (the connection secret and one
//! AES-GCM key per direction, docs/PROTOCOL.md §3), and zeroing and moving ~1 KB
//! objects was a measurable share of a heartbeat. Here a key is its 15 round
//! keys (240 bytes). It implements the `cipher` traits, so `aes_gcm::AesGcm`
//! and our KDF use it unchanged; `tests/packet_vectors.rs` pins its output.
//!
//! Encryption only: GCM and the KDF never decrypt a block.

#[cfg(not(target_feature = "ssse3"))]
use core::arch::x86_64::_mm_aeskeygenassist_si128;
use core::arch::x86_64::{
    __m128i, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_loadu_si128, _mm_shuffle_epi32,
    _mm_slli_si128, _mm_storeu_si128, _mm_xor_si128,
};
#[cfg(target_feature = "ssse3")]
use core::arch::x86_64::{_mm_set1_epi32, _mm_set_epi8, _mm_setzero_si128, _mm_shuffle_epi8};

use aes::cipher::consts::{U16, U32, U4};
use aes::cipher::inout::InOut;
use aes::cipher::{
    Block, BlockBackend, BlockCipher, BlockClosure, BlockEncrypt, BlockSizeUser, Key, KeyInit,
    KeySizeUser, ParBlocks, ParBlocksSizeUser,
};

/// An expanded AES-256 encryption key.
#[derive(Clone)]
pub(crate) struct Aes256Ni {
    round_keys: [__m128i; 15],
}

/// One step of the AES-256 key schedule: `prev` XOR its shifted prefixes,
/// XOR the broadcast word of `assist`.
#[inline(always)]
fn mix(prev: __m128i, assist: __m128i) -> __m128i {
    // SAFETY (whole fn): SSE2 is part of x86-64; these intrinsics only move
    // and combine register values.
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
/// schedules per packet round trip, each on the critical path. The
/// AESKEYGENASSIST form stays for builds without SSSE3.
#[cfg(target_feature = "ssse3")]
macro_rules! expand_pair {
    ($rk:ident, $i:literal, $rcon:literal) => {{
        // SAFETY: AES-NI and SSSE3 are enabled for this build (module cfg
        // and the `cfg` above); register ops only.
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

/// Two steps of the AES-256 key schedule with AESKEYGENASSIST.
#[cfg(not(target_feature = "ssse3"))]
macro_rules! expand_pair {
    ($rk:ident, $i:literal, $rcon:literal) => {{
        // SAFETY: AES-NI is enabled for this build (module cfg); register ops only.
        unsafe {
            let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>($rk[$i - 1]));
            $rk[$i] = mix($rk[$i - 2], t);
            if $i + 1 < 15 {
                let u = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>($rk[$i]));
                $rk[$i + 1] = mix($rk[$i - 1], u);
            }
        }
    }};
}

impl Aes256Ni {
    /// The 15 round keys, for our AES-GCM (`gcm.rs`), which runs its own
    /// AES passes.
    #[cfg(all(
        target_feature = "pclmulqdq",
        target_feature = "ssse3",
        target_feature = "sse4.1"
    ))]
    #[inline(always)]
    pub(crate) fn round_keys(&self) -> &[__m128i; 15] {
        &self.round_keys
    }
}

impl KeySizeUser for Aes256Ni {
    type KeySize = U32;
}

impl KeyInit for Aes256Ni {
    #[inline]
    fn new(key: &Key<Self>) -> Self {
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
}

impl BlockSizeUser for Aes256Ni {
    type BlockSize = U16;
}

impl BlockCipher for Aes256Ni {}

impl BlockEncrypt for Aes256Ni {
    #[inline]
    fn encrypt_with_backend(&self, f: impl BlockClosure<BlockSize = U16>) {
        f.call(&mut Backend(&self.round_keys));
    }
}

struct Backend<'a>(&'a [__m128i; 15]);

impl BlockSizeUser for Backend<'_> {
    type BlockSize = U16;
}

impl ParBlocksSizeUser for Backend<'_> {
    /// Four blocks in flight fill the AES unit (latency 4, one per cycle),
    /// and the KDF (docs/PROTOCOL.md §3) is exactly four blocks.
    type ParBlocksSize = U4;
}

impl BlockBackend for Backend<'_> {
    #[inline(always)]
    fn proc_block(&mut self, block: InOut<'_, '_, Block<Self>>) {
        let k = self.0;
        let (input, output) = block.into_raw();
        // SAFETY: `input`/`output` point at one 16-byte block each (InOut
        // guarantees validity); AES-NI is enabled for this build.
        unsafe {
            let mut b = _mm_xor_si128(_mm_loadu_si128(input.cast()), k[0]);
            for rk in &k[1..14] {
                b = _mm_aesenc_si128(b, *rk);
            }
            b = _mm_aesenclast_si128(b, k[14]);
            _mm_storeu_si128(output.cast(), b);
        }
    }

    #[inline(always)]
    fn proc_par_blocks(&mut self, blocks: InOut<'_, '_, ParBlocks<Self>>) {
        let k = self.0;
        let (input, output) = blocks.into_raw();
        // SAFETY: `input`/`output` point at 4 consecutive 16-byte blocks
        // (InOut over ParBlocks); AES-NI is enabled for this build.
        unsafe {
            let input = input.cast::<__m128i>();
            let output = output.cast::<__m128i>();
            let mut b = [k[0]; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = _mm_xor_si128(_mm_loadu_si128(input.add(i)), k[0]);
            }
            for rk in &k[1..14] {
                for x in b.iter_mut() {
                    *x = _mm_aesenc_si128(*x, *rk);
                }
            }
            for (i, x) in b.iter().enumerate() {
                _mm_storeu_si128(output.add(i), _mm_aesenclast_si128(*x, k[14]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS-197 Appendix C.3 and agreement with the `aes` crate on many keys.
    #[test]
    fn matches_fips_197_and_the_aes_crate() {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let mut block = Block::<Aes256Ni>::clone_from_slice(
            &hex::decode("00112233445566778899aabbccddeeff").expect("hex"),
        );
        Aes256Ni::new(&key.into()).encrypt_block(&mut block);
        assert_eq!(hex::encode(block), "8ea2b7ca516745bfeafc49904b496089");

        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            let mut key = [0u8; 32];
            for b in key.iter_mut() {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                *b = (seed >> 56) as u8;
            }
            let ours = Aes256Ni::new(&key.into());
            let theirs = aes::Aes256Enc::new(&key.into());
            let mut a = [Block::<Aes256Ni>::default(); 11];
            for (i, blk) in a.iter_mut().enumerate() {
                blk[0] = i as u8;
                blk[15] = (seed >> 8) as u8;
            }
            let mut b = a;
            ours.encrypt_blocks(&mut a); // 2 x 4 in parallel + 3 single
            theirs.encrypt_blocks(&mut b);
            assert_eq!(a, b);
        }
    }
}
