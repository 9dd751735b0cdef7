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

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "aes",
    target_feature = "sse2"
))]
mod aesni;
mod binding;
mod conn_id;
mod credential;
mod fragment;
mod framing;
/// AES-256-GCM on AES-NI and PCLMULQDQ where the build has them compiled
/// in; elsewhere `aes_gcm` behind the same calls. Either way `gcm::Gcm`.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "aes",
    target_feature = "pclmulqdq",
    target_feature = "sse2",
    target_feature = "ssse3",
    target_feature = "sse4.1"
))]
mod gcm;
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "aes",
    target_feature = "pclmulqdq",
    target_feature = "sse2",
    target_feature = "ssse3",
    target_feature = "sse4.1"
)))]
#[path = "gcm_portable.rs"]
mod gcm;
mod kdf;

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

/// The AES-256 encryption key type every packet key and KDF step uses:
/// AES-NI with 240-byte keys where the build has the instructions compiled
/// in, else the `aes` crate (run-time detection).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "aes",
    target_feature = "sse2"
))]
pub(crate) type Aes256 = aesni::Aes256Ni;
/// The AES-256 encryption key type every packet key and KDF step uses.
#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "aes",
    target_feature = "sse2"
)))]
pub(crate) type Aes256 = aes::Aes256Enc;
