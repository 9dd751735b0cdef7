//! Encrypted packet framing, key derivation, credentials and fragments
//! (docs/PROTOCOL.md §3, §4, §5).
//!
//! This layer exists so that every byte that crosses the wire is produced and
//! checked in one place: the conn id that names a connection and steers it to
//! its shard, the keys derived from the node's master key, the AES-256-GCM
//! framing of every datagram, the stateless credential binding a connection to
//! an account and a device, and the fragments that carry a large service
//! message.
//!
//! It must not know about sockets, threads or clocks: time only ever comes in
//! as an argument ([`UnixSeconds`](crate::time::UnixSeconds),
//! [`UnixMillis`](crate::time::UnixMillis)), randomness as an `RngCore`
//! argument. It does not parse the messages inside a packet either; that is
//! the codec's job. Nothing here may panic on input from the network, a file
//! or a user: bad input is an error value.
//!
//! # Which AES-GCM runs
//!
//! Two implementations of the same AES-256 and AES-256-GCM, byte for byte:
//!
//! - the fast path, our own on AES-NI, PCLMULQDQ, SSSE3 and SSE4.1
//!   (`aesni.rs`, `gcm.rs`): about twice as fast for this protocol's short
//!   packets, each under a freshly derived key
//!   (tuning/journal/2026-11-22.md §4);
//! - the portable path, RustCrypto's `aes` and `aes_gcm` (`gcm_portable.rs`).
//!
//! The choice is made at run time, once per process, at the first key it
//! creates (`backend.rs`): the fast path if `is_x86_feature_detected!` finds
//! all four instruction sets, the portable path otherwise, so a CPU without
//! AES-NI runs the same binary without an illegal instruction. The build
//! enables no target features; the fast path's code is compiled with
//! `#[target_feature]` inside one function per operation (derive a secret,
//! derive a packet key, open, seal). Other architectures build the portable
//! path only. [`aes_gcm_implementation`] says which one runs.
//!
//! To force the portable path, set `MPP_CRYPTO=portable` (any case) in the
//! environment before the process starts ([`CRYPTO_ENV`]); it is read once.
//! An environment variable rather than a cargo feature so the same binaries
//! run both ways: CI runs the crypto test suites a second time with it
//! (`.ci/run`) without building anything again, and an operator can rule
//! our AES-GCM out on a production binary.
//!
//! Tested: both implementations against the Wycheproof AES-256-GCM vectors
//! with 96-bit nonces and 128-bit tags, seal and open, and a known-answer
//! open (`tests/crypto_wycheproof.rs`, which selects each explicitly through
//! the hidden `testing` module); ours against `aes_gcm` on random inputs
//! (`gcm.rs`); the protocol's vectors through whichever path runs
//! (`tests/packet_vectors.rs`), in CI once per path; and the portable path
//! on an emulated CPU without AES-NI (`qemu-x86_64 -cpu
//! qemu64,-aes,-pclmulqdq`, the `qemu_without_aes_ni` test there).

#[cfg(target_arch = "x86_64")]
mod aesni;
mod backend;
mod binding;
mod conn_id;
mod credential;
mod fragment;
mod framing;
/// Our AES-256-GCM on AES-NI and PCLMULQDQ (the fast path).
#[cfg(target_arch = "x86_64")]
mod gcm;
/// AES-256-GCM through `aes_gcm` (the portable path).
mod gcm_portable;
mod kdf;

#[doc(hidden)]
pub use backend::testing;
pub use backend::{aes_gcm_implementation, AesGcmImplementation, CRYPTO_ENV};
pub use binding::{binding, verify_binding, BindingError, BindingKey, MAX_BINDING_FIELD};
pub use conn_id::{account_affinity, ConnId, CONN_ID_LEN, STUN_MAGIC_COOKIE};
pub use credential::{Credential, CredentialError, MAX_ACCOUNT_LEN, MAX_DEVICE_LEN, MAX_ENDPOINTS};
pub use fragment::{
    fragment_count, write_fragment, FragmentChunk, FragmentError, Fragments, Reassembler,
    FRAGMENT_HEADER_LEN, FRAGMENT_MARKER, FRAGMENT_TIMEOUT_MS, MAX_FRAGMENTS, MAX_FRAGMENT_DATA,
    MAX_MESSAGES_IN_PROGRESS,
};
pub use framing::{
    open, open_in_place, peek_conn_id, seal, seal_in_place, PacketError, PacketKey, HEADER_LEN,
    MAX_PACKET, MAX_PLAINTEXT, NONCE_LEN, OVERHEAD, TAG_LEN,
};
pub use kdf::{kdf, ConnSecret, Direction, ExpandedSecret, KeyHexError, MasterKey, KEY_LEN};
