//! Which AES-256 and AES-256-GCM a process runs, chosen once at run time:
//! our own on AES-NI and PCLMULQDQ (`aesni.rs`, `gcm.rs`, "the fast
//! path"), or RustCrypto's `aes` and `aes_gcm` (`gcm_portable.rs`, "the
//! portable path").
//!
//! This exists so that one binary runs on every x86-64 CPU: the fast path's
//! instructions are not compiled into the whole build (no `target-feature`
//! rustflags) but enabled only inside the `#[target_feature]` functions of
//! [`fast`] below, which are called only after `is_x86_feature_detected!`
//! found AES-NI, PCLMULQDQ, SSSE3 and SSE4.1. A CPU without them gets the
//! portable path (which does its own detection inside the RustCrypto
//! crates), never an illegal instruction. Other architectures build the
//! portable path only.
//!
//! The choice is made once, at the first key a process creates, and cached
//! in a static: the fast path if the CPU has the instructions and the
//! environment variable `MPP_CRYPTO` is not `portable` (any case), the
//! portable path otherwise. `MPP_CRYPTO=portable` is how tests and CI run
//! the portable path on a machine that has AES-NI; it is read once, so
//! setting it later changes nothing. The master key and a connection
//! secret record the path they were made for (the variants of [`Aes256`]
//! and [`SecretAes`]), and each operation on them dispatches on that; a
//! `Fast` one can exist only where detection succeeded. A packet key
//! ([`Gcm`]) is untagged, to stay 240 bytes: it is always in the
//! representation of the process's choice, which never changes once made.
//!
//! Cost: each packet operation (derive a secret, derive a packet key, open
//! or seal a packet, framing checks included) is one call into one
//! `#[target_feature]` function that does the whole of it and builds its
//! result in place, so everything inside is inlined as it was when the
//! features were compiled in.
//!
//! What it must not do: call anything in [`fast`] without having checked
//! [`fast_available`], make a key for a path other than the process's
//! choice, or change that choice once made.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use aes::cipher::{BlockEncrypt, KeyInit};

#[cfg(target_arch = "x86_64")]
use super::aesni::Aes256Ni;
use super::conn_id::ConnId;
use super::framing::{open_with, seal_with, PacketError, PacketKey, NONCE_LEN};
#[cfg(target_arch = "x86_64")]
use super::gcm::Aes256GcmNi;
use super::gcm_portable::Gcm as PortableGcm;
use super::kdf::{kdf_blocks, kdf_output, ExpandedSecret, KEY_LEN};

/// The environment variable that forces the portable path: `MPP_CRYPTO=portable`.
pub const CRYPTO_ENV: &str = "MPP_CRYPTO";

/// The AES-256-GCM implementation a process runs (see
/// [`aes_gcm_implementation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AesGcmImplementation {
    /// Our own on AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 (`src/packet/gcm.rs`).
    AesNi,
    /// RustCrypto's `aes` and `aes_gcm`.
    Portable,
}

impl AesGcmImplementation {
    /// `"aes-ni"` or `"portable"`.
    pub fn name(self) -> &'static str {
        match self {
            AesGcmImplementation::AesNi => "aes-ni",
            AesGcmImplementation::Portable => "portable",
        }
    }
}

impl fmt::Display for AesGcmImplementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const UNDECIDED: u8 = 0;
const FAST: u8 = 1;
const PORTABLE: u8 = 2;

/// The process's choice: [`UNDECIDED`] until the first key is made.
static CHOICE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// Whether this CPU has every instruction the fast path uses (SSE2 is part
/// of x86-64). The standard library caches the detection.
pub(crate) fn fast_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("aes")
            && is_x86_feature_detected!("pclmulqdq")
            && is_x86_feature_detected!("ssse3")
            && is_x86_feature_detected!("sse4.1")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether new keys take the fast path; true only if [`fast_available`].
/// One relaxed load once decided.
#[inline(always)]
fn use_fast() -> bool {
    match CHOICE.load(Ordering::Relaxed) {
        FAST => true,
        PORTABLE => false,
        _ => decide(),
    }
}

/// Detects the instructions and reads `MPP_CRYPTO`: the process's choice,
/// made exactly once (of two threads that race here, the first to store
/// wins and the other takes its answer), never changed after. [`Gcm`]
/// relies on that.
#[cold]
#[inline(never)]
fn decide() -> bool {
    let forced = std::env::var_os(CRYPTO_ENV).is_some_and(|v| v.eq_ignore_ascii_case("portable"));
    let fast = !forced && fast_available();
    let choice = if fast { FAST } else { PORTABLE };
    match CHOICE.compare_exchange(UNDECIDED, choice, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => fast,
        Err(earlier) => earlier == FAST,
    }
}

/// The AES-256-GCM implementation this process runs: decided at the first
/// key it makes (or by this call), from the CPU and `MPP_CRYPTO`.
pub fn aes_gcm_implementation() -> AesGcmImplementation {
    if use_fast() {
        AesGcmImplementation::AesNi
    } else {
        AesGcmImplementation::Portable
    }
}

/// The master key's expanded AES-256 key, for the KDF (docs/PROTOCOL.md
/// §3.4): kept for the life of a [`MasterKey`](super::MasterKey), expanded once on either
/// path.
#[derive(Clone)]
// One per process and shard: the ~1 KB of `aes::Aes256Enc` on x86 costs
// nothing here, and a box would cost an indirection on the fast path.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Aes256 {
    /// Only made where [`fast_available`] is true.
    #[cfg(target_arch = "x86_64")]
    Fast(Aes256Ni),
    Portable(aes::Aes256Enc),
}

/// A connection secret's AES-256 key, per packet ([`ExpandedSecret`]):
/// expanded on the fast path; on the portable path its raw bytes, expanded
/// where it is used, so that the fast path's objects stay 256 bytes
/// instead of the ~1 KB of `aes::Aes256Enc`.
#[derive(Clone)]
// The fast variant is the large one, on purpose: boxing it would allocate
// for every packet.
#[allow(clippy::large_enum_variant)]
pub(crate) enum SecretAes {
    /// Only made where [`fast_available`] is true.
    #[cfg(target_arch = "x86_64")]
    Fast(Aes256Ni),
    Portable([u8; KEY_LEN]),
}

/// A packet key ([`PacketKey`]): its round keys on the fast path, its raw
/// bytes on the portable path. Untagged, unlike [`Aes256`] and
/// [`SecretAes`]: a tag would make it 256 bytes instead of 240, and the load
/// generator holds two per simulated device (ten million of them). Which
/// field holds the key follows from the process's choice, which is made
/// once and never changes ([`decide`]): every `Gcm` is made for that choice
/// (by `Gcm::packet_key` or from a key of the same path), and read by it.
#[derive(Clone, Copy)]
pub(crate) union Gcm {
    /// Written and read only when the process runs the fast path.
    #[cfg(target_arch = "x86_64")]
    fast: Aes256GcmNi,
    /// Written and read only when it runs the portable path.
    portable: [u8; KEY_LEN],
}

// Dispatch: each function below is a test of the key's variant (of the
// process's choice, for a packet key) and a tail call into `fast` or
// `portable`. The portable arms stay out of line so
// that their ~1 KB of RustCrypto state does not give every dispatcher a
// large stack frame and saved registers on the fast path (measured: ~20
// instructions per call).

impl Aes256 {
    /// Expands `key` for the process's path.
    pub(crate) fn new(key: &[u8; KEY_LEN]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if use_fast() {
            // SAFETY: `use_fast()` is true only if `fast_available()`.
            return unsafe { fast::master(key) };
        }
        portable::master(key)
    }

    /// `KDF(self, label, context)`.
    #[inline]
    pub(crate) fn kdf(&self, label: &[u8; 4], context: &[u8; 8]) -> [u8; KEY_LEN] {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Fast` key exists only where `fast_available()`.
            Aes256::Fast(c) => unsafe { fast::kdf(c, label, context) },
            Aes256::Portable(c) => portable::kdf(c, label, context),
        }
    }

    /// The expanded secret `KDF(self, label, conn id)` on the same path, in
    /// one step (for every packet).
    #[inline]
    pub(crate) fn expanded_secret(&self, label: &[u8; 4], conn_id: ConnId) -> ExpandedSecret {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Fast` key exists only where `fast_available()`.
            Aes256::Fast(c) => unsafe { fast::expanded_secret(c, label, conn_id) },
            Aes256::Portable(c) => portable::expanded_secret(c, label, conn_id),
        }
    }

    /// The packet key `KDF(KDF(self, secret_label, conn id), label,
    /// context)` on the same path, in one step.
    #[inline]
    pub(crate) fn packet_key(
        &self,
        secret_label: &[u8; 4],
        conn_id: ConnId,
        label: &[u8; 4],
        context: &[u8; 8],
    ) -> PacketKey {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Fast` key exists only where `fast_available()`.
            Aes256::Fast(c) => unsafe {
                fast::master_packet_key(c, secret_label, conn_id, label, context)
            },
            Aes256::Portable(c) => {
                let secret = portable::kdf(c, secret_label, &conn_id.0);
                PacketKey(Gcm {
                    portable: portable::secret_kdf(&secret, label, context),
                })
            }
        }
    }
}

impl SecretAes {
    /// `secret` as an [`ExpandedSecret`] for `conn_id`, on the process's
    /// path.
    pub(crate) fn expand(secret: &[u8; KEY_LEN], conn_id: ConnId) -> ExpandedSecret {
        #[cfg(target_arch = "x86_64")]
        if use_fast() {
            // SAFETY: `use_fast()` is true only if `fast_available()`.
            return unsafe { fast::expand_secret(secret, conn_id) };
        }
        ExpandedSecret {
            cipher: SecretAes::Portable(*secret),
            conn_id,
        }
    }

    /// The packet key `KDF(secret, label, context)` from a secret's raw
    /// bytes, on the process's path, in one step.
    #[inline]
    pub(crate) fn raw_packet_key(
        secret: &[u8; KEY_LEN],
        label: &[u8; 4],
        context: &[u8; 8],
    ) -> PacketKey {
        #[cfg(target_arch = "x86_64")]
        if use_fast() {
            // SAFETY: `use_fast()` is true only if `fast_available()`.
            return unsafe { fast::raw_packet_key(secret, label, context) };
        }
        PacketKey(Gcm {
            portable: portable::secret_kdf(secret, label, context),
        })
    }

    /// `KDF(self, label, context)`.
    #[inline]
    pub(crate) fn kdf(&self, label: &[u8; 4], context: &[u8; 8]) -> [u8; KEY_LEN] {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Fast` key exists only where `fast_available()`.
            SecretAes::Fast(c) => unsafe { fast::kdf(c, label, context) },
            SecretAes::Portable(raw) => portable::secret_kdf(raw, label, context),
        }
    }

    /// The packet key `KDF(self, label, context)` on the same path, in one
    /// step (for every packet).
    #[inline]
    pub(crate) fn packet_key(&self, label: &[u8; 4], context: &[u8; 8]) -> PacketKey {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: a `Fast` key exists only where `fast_available()`.
            SecretAes::Fast(c) => unsafe { fast::packet_key(c, label, context) },
            SecretAes::Portable(raw) => PacketKey(Gcm {
                portable: portable::secret_kdf(raw, label, context),
            }),
        }
    }
}

/// The tag did not verify (or the buffer is shorter than a tag); the buffer
/// is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unauthentic;

/// AES-256-GCM with 96-bit nonces and 128-bit tags over `text ‖ tag`
/// buffers (the packet layout, see `gcm.rs`): what `framing.rs`'s generic
/// packet code needs from either implementation.
pub(crate) trait PacketCipher {
    /// Encrypts the text `buf[..len - 16]` in place and writes the tag over
    /// `aad` and the ciphertext into `buf[len - 16..]`; nothing if `buf` is
    /// shorter than a tag.
    fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]);

    /// Checks the tag at the end of `buf` over `aad` and the ciphertext
    /// before it, then decrypts the ciphertext in place; on a wrong tag
    /// `buf` is unchanged.
    fn open_in_place(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), Unauthentic>;
}

#[cfg(target_arch = "x86_64")]
impl PacketCipher for Aes256GcmNi {
    #[inline(always)]
    fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
        Aes256GcmNi::seal_in_place(self, nonce, aad, buf)
    }

    #[inline(always)]
    fn open_in_place(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), Unauthentic> {
        Aes256GcmNi::open_in_place(self, nonce, aad, buf).map_err(|_| Unauthentic)
    }
}

impl PacketCipher for PortableGcm {
    fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
        PortableGcm::seal_in_place(self, nonce, aad, buf)
    }

    fn open_in_place(
        &self,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<(), Unauthentic> {
        PortableGcm::open_in_place(self, nonce, aad, buf).map_err(|_| Unauthentic)
    }
}

impl Gcm {
    /// A packet key from its raw bytes, on the process's path.
    #[inline]
    pub(crate) fn packet_key(key: &[u8; KEY_LEN]) -> PacketKey {
        #[cfg(target_arch = "x86_64")]
        if use_fast() {
            // SAFETY: `use_fast()` is true only if `fast_available()`.
            return unsafe { fast::packet_key_new(key) };
        }
        PacketKey(Gcm { portable: *key })
    }

    /// `framing::seal_with` under this key.
    #[inline]
    pub(crate) fn seal_packet(
        &self,
        conn_id: ConnId,
        nonce: [u8; NONCE_LEN],
        buf: &mut [u8],
        plaintext_len: usize,
    ) -> Result<usize, PacketError> {
        #[cfg(target_arch = "x86_64")]
        if use_fast() {
            // SAFETY: the process runs the fast path, so `fast` is the
            // field this key was made with (see `Gcm`), and the CPU has
            // the instructions (`use_fast()` implies `fast_available()`).
            return unsafe { fast::seal_packet(&self.fast, conn_id, nonce, buf, plaintext_len) };
        }
        // SAFETY: the process runs the portable path, so `portable` is the
        // field this key was made with (see `Gcm`).
        let key = unsafe { &self.portable };
        portable::seal_packet(key, conn_id, nonce, buf, plaintext_len)
    }

    /// `framing::open_with` under this key.
    #[inline]
    pub(crate) fn open_packet<'a>(&self, packet: &'a mut [u8]) -> Result<&'a [u8], PacketError> {
        #[cfg(target_arch = "x86_64")]
        if use_fast() {
            // SAFETY: as in `seal_packet`.
            return unsafe { fast::open_packet(&self.fast, packet) };
        }
        // SAFETY: as in `seal_packet`.
        let key = unsafe { &self.portable };
        portable::open_packet(key, packet)
    }
}

/// The portable path's operations, out of line (see "Dispatch" above):
/// RustCrypto's `aes` and `aes_gcm`, per-packet keys expanded where used.
mod portable {
    use super::*;

    #[inline(never)]
    pub(super) fn master(key: &[u8; KEY_LEN]) -> Aes256 {
        Aes256::Portable(aes::Aes256Enc::new(key.into()))
    }

    /// `KDF(cipher, label, context)`.
    #[inline(never)]
    pub(super) fn kdf(
        cipher: &aes::Aes256Enc,
        label: &[u8; 4],
        context: &[u8; 8],
    ) -> [u8; KEY_LEN] {
        let mut blocks = kdf_blocks(label, context).map(aes::Block::from);
        cipher.encrypt_blocks(&mut blocks);
        kdf_output(&blocks)
    }

    /// `KDF(secret, label, context)` from the secret's raw bytes.
    #[inline(never)]
    pub(super) fn secret_kdf(
        secret: &[u8; KEY_LEN],
        label: &[u8; 4],
        context: &[u8; 8],
    ) -> [u8; KEY_LEN] {
        kdf(&aes::Aes256Enc::new(secret.into()), label, context)
    }

    #[inline(never)]
    pub(super) fn expanded_secret(
        master: &aes::Aes256Enc,
        label: &[u8; 4],
        conn_id: ConnId,
    ) -> ExpandedSecret {
        ExpandedSecret {
            cipher: SecretAes::Portable(kdf(master, label, &conn_id.0)),
            conn_id,
        }
    }

    #[inline(never)]
    pub(super) fn seal_packet(
        key: &[u8; KEY_LEN],
        conn_id: ConnId,
        nonce: [u8; NONCE_LEN],
        buf: &mut [u8],
        plaintext_len: usize,
    ) -> Result<usize, PacketError> {
        seal_with(&PortableGcm::new(key), conn_id, nonce, buf, plaintext_len)
    }

    #[inline(never)]
    pub(super) fn open_packet<'a>(
        key: &[u8; KEY_LEN],
        packet: &'a mut [u8],
    ) -> Result<&'a [u8], PacketError> {
        open_with(&PortableGcm::new(key), packet)
    }
}

/// The fast path's entry points: each is one whole operation (a key
/// derivation with its key schedule, or a packet's whole framing and
/// AES-GCM) compiled with AES-NI, PCLMULQDQ, SSSE3 and SSE4.1 enabled, so
/// that the `#[inline(always)]` code of `aesni.rs`, `gcm.rs`, `kdf.rs` and
/// `framing.rs` is inlined into it and every intrinsic is one instruction.
/// Each returns the public type itself, built in place (wrapping a
/// returned key in an enum afterwards cost a 240-byte copy).
///
/// # Safety (every function here)
///
/// The CPU has those instructions: [`fast_available`] returned true, which
/// holds whenever a `Fast` key exists or `use_fast()` returned true.
#[cfg(target_arch = "x86_64")]
mod fast {
    use super::*;

    /// `KDF(c, label, context)`: four AES blocks in one pass.
    #[inline(always)]
    fn derive(c: &Aes256Ni, label: &[u8; 4], context: &[u8; 8]) -> [u8; KEY_LEN] {
        let mut blocks = kdf_blocks(label, context);
        c.encrypt4(&mut blocks);
        kdf_output(&blocks)
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn master(key: &[u8; KEY_LEN]) -> Aes256 {
        // SAFETY: the instructions are present (this module's contract).
        Aes256::Fast(unsafe { Aes256Ni::new(key) })
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn kdf(c: &Aes256Ni, label: &[u8; 4], context: &[u8; 8]) -> [u8; KEY_LEN] {
        derive(c, label, context)
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn expanded_secret(
        master: &Aes256Ni,
        label: &[u8; 4],
        conn_id: ConnId,
    ) -> ExpandedSecret {
        ExpandedSecret {
            // SAFETY: the instructions are present (this module's contract).
            cipher: SecretAes::Fast(unsafe { Aes256Ni::new(&derive(master, label, &conn_id.0)) }),
            conn_id,
        }
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn expand_secret(secret: &[u8; KEY_LEN], conn_id: ConnId) -> ExpandedSecret {
        ExpandedSecret {
            // SAFETY: the instructions are present (this module's contract).
            cipher: SecretAes::Fast(unsafe { Aes256Ni::new(secret) }),
            conn_id,
        }
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn packet_key(
        secret: &Aes256Ni,
        label: &[u8; 4],
        context: &[u8; 8],
    ) -> PacketKey {
        // SAFETY: the instructions are present (this module's contract).
        PacketKey(Gcm {
            fast: unsafe { Aes256GcmNi::new(&derive(secret, label, context)) },
        })
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn master_packet_key(
        master: &Aes256Ni,
        secret_label: &[u8; 4],
        conn_id: ConnId,
        label: &[u8; 4],
        context: &[u8; 8],
    ) -> PacketKey {
        // SAFETY: the instructions are present (this module's contract).
        let secret = unsafe { Aes256Ni::new(&derive(master, secret_label, &conn_id.0)) };
        // SAFETY: as above.
        PacketKey(Gcm {
            fast: unsafe { Aes256GcmNi::new(&derive(&secret, label, context)) },
        })
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn raw_packet_key(
        secret: &[u8; KEY_LEN],
        label: &[u8; 4],
        context: &[u8; 8],
    ) -> PacketKey {
        // SAFETY: the instructions are present (this module's contract).
        let secret = unsafe { Aes256Ni::new(secret) };
        // SAFETY: as above.
        PacketKey(Gcm {
            fast: unsafe { Aes256GcmNi::new(&derive(&secret, label, context)) },
        })
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn packet_key_new(key: &[u8; KEY_LEN]) -> PacketKey {
        // SAFETY: the instructions are present (this module's contract).
        PacketKey(Gcm {
            fast: unsafe { Aes256GcmNi::new(key) },
        })
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn seal_packet(
        k: &Aes256GcmNi,
        conn_id: ConnId,
        nonce: [u8; NONCE_LEN],
        buf: &mut [u8],
        plaintext_len: usize,
    ) -> Result<usize, PacketError> {
        seal_with(k, conn_id, nonce, buf, plaintext_len)
    }

    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn open_packet<'a>(
        k: &Aes256GcmNi,
        packet: &'a mut [u8],
    ) -> Result<&'a [u8], PacketError> {
        open_with(k, packet)
    }

    /// A bare AES-GCM key, for [`testing`].
    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn gcm(key: &[u8; KEY_LEN]) -> Aes256GcmNi {
        // SAFETY: the instructions are present (this module's contract).
        unsafe { Aes256GcmNi::new(key) }
    }

    /// Any AAD and buffer, for [`testing`].
    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn seal(k: &Aes256GcmNi, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
        k.seal_in_place(nonce, aad, buf)
    }

    /// Any AAD and buffer, for [`testing`].
    #[target_feature(enable = "aes,pclmulqdq,sse2,ssse3,sse4.1")]
    pub(super) unsafe fn open(
        k: &Aes256GcmNi,
        nonce: &[u8; 12],
        aad: &[u8],
        buf: &mut [u8],
    ) -> bool {
        k.open_in_place(nonce, aad, buf).is_ok()
    }
}

/// Not API: one AES-256-GCM implementation chosen by name whatever the
/// process chose, so that tests run both (`tests/crypto_wycheproof.rs`).
#[doc(hidden)]
pub mod testing {
    #[cfg(target_arch = "x86_64")]
    use super::{fast, Aes256GcmNi};
    use super::{fast_available, AesGcmImplementation, PortableGcm, KEY_LEN};

    /// The implementations this CPU can run: ours where it has the
    /// instructions, the portable one always.
    pub fn available() -> Vec<AesGcmImplementation> {
        let mut all = vec![AesGcmImplementation::Portable];
        if fast_available() {
            all.insert(0, AesGcmImplementation::AesNi);
        }
        all
    }

    #[allow(clippy::large_enum_variant)] // a few per test
    enum Key {
        /// Only made where `fast_available()`.
        #[cfg(target_arch = "x86_64")]
        Fast(Aes256GcmNi),
        Portable(PortableGcm),
    }

    /// An AES-256-GCM key of one implementation (12-byte nonce, 16-byte
    /// tag). Buffers are `text ‖ tag`, as in a packet.
    pub struct TestGcm(Key);

    impl TestGcm {
        /// `key` for `implementation`; `None` if this CPU cannot run it.
        pub fn new(implementation: AesGcmImplementation, key: &[u8; KEY_LEN]) -> Option<Self> {
            match implementation {
                AesGcmImplementation::Portable => {
                    Some(TestGcm(Key::Portable(PortableGcm::new(key))))
                }
                #[cfg(target_arch = "x86_64")]
                AesGcmImplementation::AesNi if fast_available() => {
                    // SAFETY: `fast_available()` (checked).
                    Some(TestGcm(Key::Fast(unsafe { fast::gcm(key) })))
                }
                AesGcmImplementation::AesNi => None,
            }
        }

        /// `buf` = plaintext ‖ 16 bytes of room: encrypts in place and
        /// writes the tag (nothing if `buf` is shorter than 16 bytes).
        pub fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
            match &self.0 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a `Fast` key exists only where `fast_available()`.
                Key::Fast(k) => unsafe { fast::seal(k, nonce, aad, buf) },
                Key::Portable(k) => k.seal_in_place(nonce, aad, buf),
            }
        }

        /// `buf` = ciphertext ‖ tag: true and the plaintext in place if the
        /// tag verifies, false and `buf` unchanged if not.
        pub fn open_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> bool {
            match &self.0 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a `Fast` key exists only where `fast_available()`.
                Key::Fast(k) => unsafe { fast::open(k, nonce, aad, buf) },
                Key::Portable(k) => k.open_in_place(nonce, aad, buf).is_ok(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet key stays 240 bytes on x86-64 (the load generator holds two
    /// per simulated device), 32 elsewhere.
    #[test]
    fn packet_keys_stay_small() {
        let expected = if cfg!(target_arch = "x86_64") {
            240
        } else {
            32
        };
        assert_eq!(std::mem::size_of::<PacketKey>(), expected);
    }

    /// The choice is made once and then stays, and the fast path is chosen
    /// only where the CPU has the instructions.
    #[test]
    fn the_choice_is_made_once() {
        let first = use_fast();
        assert!(!first || fast_available());
        for _ in 0..3 {
            assert_eq!(decide(), first);
            assert_eq!(use_fast(), first);
        }
    }

    /// The names the node's metrics report the implementations by (`name`
    /// and `Display` agree).
    #[test]
    fn implementations_are_named_aes_ni_and_portable() {
        assert_eq!(AesGcmImplementation::AesNi.name(), "aes-ni");
        assert_eq!(AesGcmImplementation::Portable.name(), "portable");
        assert_eq!(AesGcmImplementation::AesNi.to_string(), "aes-ni");
        assert_eq!(AesGcmImplementation::Portable.to_string(), "portable");
    }

    /// The fast path is available exactly where the CPU has AES-NI,
    /// PCLMULQDQ, SSSE3 and SSE4.1 (so on a CPU that has them the gcm.rs
    /// tests do run).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fast_path_is_available_where_the_cpu_has_its_instructions() {
        let cpu = std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1");
        assert_eq!(fast_available(), cpu);
    }

    /// `MPP_CRYPTO=portable` (any case) forces the portable path; without
    /// it the fast path runs wherever it is available. (CI runs the lib's
    /// packet tests both ways, so each half is checked by one run.)
    #[test]
    fn the_choice_follows_the_environment() {
        let forced =
            std::env::var_os(CRYPTO_ENV).is_some_and(|v| v.eq_ignore_ascii_case("portable"));
        let expected = if !forced && fast_available() {
            AesGcmImplementation::AesNi
        } else {
            AesGcmImplementation::Portable
        };
        assert_eq!(aes_gcm_implementation(), expected);
    }
}
