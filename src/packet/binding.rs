//! The credential binding (docs/PROTOCOL.md §4): an HMAC that ties a conn id to an
//! account, a device and an expiry, so any node holding the master key can
//! trust a ConnectRequest without a database.
//!
//! The HMAC key's inner and outer pads are computed once ([`BindingKey`]) and
//! the keyed state is cloned per use. Verification compares MACs in constant
//! time and checks the MAC before anything else, so a caller without a valid
//! MAC learns nothing about expiry or affinity. This file must not read the
//! clock: `now` is an argument.

use std::fmt;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::conn_id::{account_affinity, ConnId};
use super::kdf::{MasterKey, KEY_LEN};
use crate::time::UnixSeconds;

/// Longest account or device name the binding encoding can carry: its length
/// is a u16be (docs/PROTOCOL.md §4).
pub const MAX_BINDING_FIELD: usize = u16::MAX as usize;

/// docs/PROTOCOL.md §4: the KDF label of the binding key.
const BIND_LABEL: &[u8; 4] = b"bind";

/// docs/PROTOCOL.md §4: the domain-separation prefix of every binding.
const BINDING_PREFIX: &[u8] = b"mpp1 binding";

/// HMAC-SHA256's block size: a shorter key is zero-padded to it (RFC 2104).
const HMAC_BLOCK: usize = 64;

/// Why a binding could not be computed or was refused. Fieldless: a refused
/// ConnectRequest gets no detail back (docs/PROTOCOL.md §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindingError {
    /// The account or device is longer than its u16be length prefix allows.
    #[error("account or device longer than {MAX_BINDING_FIELD} bytes")]
    FieldTooLong,
    /// The MAC does not match conn id, expiry, account and device.
    #[error("binding does not verify")]
    Invalid,
    /// The MAC is valid but the conn id's affinity is not the account's
    /// (the connection would live on the wrong shard, docs/PROTOCOL.md §4, §8).
    #[error("conn id affinity does not match the account")]
    AffinityMismatch,
    /// The MAC is valid but the credential expired (`now >= expires`).
    #[error("credential expired")]
    Expired,
}

/// The binding key `KDF(master, "bind", 0⁸)` with its HMAC state keyed once.
#[derive(Clone)]
pub struct BindingKey(Hmac<Sha256>);

impl BindingKey {
    /// Keys HMAC-SHA256 with a raw 32-byte binding key.
    pub fn new(bind_key: &[u8; KEY_LEN]) -> Self {
        // A 32-byte key is zero-padded to the 64-byte block by HMAC itself
        // (RFC 2104); padding here lets us use the infallible constructor.
        let mut block = [0u8; HMAC_BLOCK];
        block[..KEY_LEN].copy_from_slice(bind_key);
        BindingKey(<Hmac<Sha256> as KeyInit>::new(&block.into()))
    }

    /// The binding key of a master key (docs/PROTOCOL.md §4).
    pub fn from_master(master: &MasterKey) -> Self {
        Self::new(&master.bind_key())
    }

    /// The binding key of a revocation generation (docs/PROTOCOL.md §7.11):
    /// `KDF(master, "bind", u64be(generation))`; generation 0 is the plain
    /// binding key of [`BindingKey::from_master`].
    pub fn for_generation(master: &MasterKey, generation: u64) -> Self {
        if generation == 0 {
            return Self::from_master(master);
        }
        Self::new(&super::kdf::kdf(
            master.as_bytes(),
            BIND_LABEL,
            &generation.to_be_bytes(),
        ))
    }

    fn mac(
        &self,
        conn_id: ConnId,
        expires: UnixSeconds,
        account: &str,
        device: &str,
    ) -> Result<Hmac<Sha256>, BindingError> {
        let account_len = u16::try_from(account.len()).map_err(|_| BindingError::FieldTooLong)?;
        let device_len = u16::try_from(device.len()).map_err(|_| BindingError::FieldTooLong)?;
        let mut mac = self.0.clone();
        // docs/PROTOCOL.md §4: "mpp1 binding" ‖ conn id ‖ u64be(expires_unix) ‖
        // u16be(len) ‖ account ‖ u16be(len) ‖ device. Expiry is the i64 seconds
        // reinterpreted as u64 (two's complement; real expiries are positive).
        mac.update(BINDING_PREFIX);
        mac.update(&conn_id.0);
        mac.update(&(expires.0 as u64).to_be_bytes());
        mac.update(&account_len.to_be_bytes());
        mac.update(account.as_bytes());
        mac.update(&device_len.to_be_bytes());
        mac.update(device.as_bytes());
        Ok(mac)
    }

    /// The binding of a credential (docs/PROTOCOL.md §4).
    pub fn binding(
        &self,
        conn_id: ConnId,
        expires: UnixSeconds,
        account: &str,
        device: &str,
    ) -> Result<[u8; 32], BindingError> {
        let mac = self.mac(conn_id, expires, account, device)?;
        Ok(mac.finalize().into_bytes().into())
    }

    /// Checks a binding presented in a ConnectRequest: MAC first (constant
    /// time), then affinity, then expiry (`now >= expires` is expired).
    pub fn verify(
        &self,
        conn_id: ConnId,
        expires: UnixSeconds,
        account: &str,
        device: &str,
        binding: &[u8],
        now: UnixSeconds,
    ) -> Result<(), BindingError> {
        // An over-long field cannot have been bound: just "invalid".
        let mac = self
            .mac(conn_id, expires, account, device)
            .map_err(|_| BindingError::Invalid)?;
        mac.verify_slice(binding)
            .map_err(|_| BindingError::Invalid)?;
        if account_affinity(account) != conn_id.affinity() {
            return Err(BindingError::AffinityMismatch);
        }
        if now >= expires {
            return Err(BindingError::Expired);
        }
        Ok(())
    }
}

impl fmt::Debug for BindingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BindingKey(..)")
    }
}

/// `HMAC-SHA256(bind_key, "mpp1 binding" ‖ conn id ‖ u64be(expires) ‖ u16be(len)
/// ‖ account ‖ u16be(len) ‖ device)` (docs/PROTOCOL.md §4). A node verifying many
/// connects should keep a [`BindingKey`] instead.
pub fn binding(
    bind_key: &[u8; KEY_LEN],
    conn_id: ConnId,
    expires: UnixSeconds,
    account: &str,
    device: &str,
) -> Result<[u8; 32], BindingError> {
    BindingKey::new(bind_key).binding(conn_id, expires, account, device)
}

/// Verifies a binding; see [`BindingKey::verify`].
pub fn verify_binding(
    bind_key: &[u8; KEY_LEN],
    conn_id: ConnId,
    expires: UnixSeconds,
    account: &str,
    device: &str,
    binding: &[u8],
    now: UnixSeconds,
) -> Result<(), BindingError> {
    BindingKey::new(bind_key).verify(conn_id, expires, account, device, binding, now)
}

#[cfg(test)]
mod tests {
    #[test]
    fn generation_zero_is_the_plain_binding_key_and_others_differ() {
        let master = MasterKey::new([3; 32]);
        let id = ConnId([1, 2, 3, 4, 0, 0, 0, 9]);
        let t = UnixSeconds(2_000_000_000);
        let plain = BindingKey::from_master(&master).binding(id, t, "a", "d");
        let g0 = BindingKey::for_generation(&master, 0).binding(id, t, "a", "d");
        let g1 = BindingKey::for_generation(&master, 1).binding(id, t, "a", "d");
        let expected =
            BindingKey::new(&super::super::kdf::kdf(master.as_bytes(), b"bind", &[0; 8]))
                .binding(id, t, "a", "d");
        assert_eq!(plain, g0);
        assert_eq!(plain, expected, "the label is KDF(master, \"bind\", 0^8)");
        assert_ne!(plain, g1);
    }

    use super::*;

    const KEY: [u8; 32] = [5; 32];
    const EXP: UnixSeconds = UnixSeconds(1_798_761_600);
    const NOW: UnixSeconds = UnixSeconds(1_798_000_000);

    fn id() -> ConnId {
        let mut id = [1, 2, 3, 4, 0, 0, 0, 0];
        id[4..].copy_from_slice(&account_affinity("alice@example.com").to_be_bytes());
        ConnId(id)
    }

    #[test]
    fn matches_manual_hmac() {
        let b = binding(&KEY, id(), EXP, "alice@example.com", "phone").expect("short fields");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&KEY).expect("any key length");
        let mut msg = b"mpp1 binding".to_vec();
        msg.extend_from_slice(&id().0);
        msg.extend_from_slice(&1_798_761_600u64.to_be_bytes());
        msg.extend_from_slice(&[0, 17]);
        msg.extend_from_slice(b"alice@example.com");
        msg.extend_from_slice(&[0, 5]);
        msg.extend_from_slice(b"phone");
        mac.update(&msg);
        assert_eq!(b, <[u8; 32]>::from(mac.finalize().into_bytes()));
    }

    #[test]
    fn verify_outcomes() {
        let (a, d) = ("alice@example.com", "phone");
        let b = binding(&KEY, id(), EXP, a, d).expect("short fields");
        assert_eq!(verify_binding(&KEY, id(), EXP, a, d, &b, NOW), Ok(()));
        let invalid = Err(BindingError::Invalid);
        assert_eq!(verify_binding(&KEY, id(), EXP, "bob", d, &b, NOW), invalid);
        assert_eq!(
            verify_binding(&KEY, id(), EXP, a, "laptop", &b, NOW),
            invalid
        );
        assert_eq!(
            verify_binding(&KEY, id(), UnixSeconds(EXP.0 + 1), a, d, &b, NOW),
            invalid
        );
        assert_eq!(verify_binding(&[6; 32], id(), EXP, a, d, &b, NOW), invalid);
        assert_eq!(
            verify_binding(&KEY, id(), EXP, a, d, &b[..31], NOW),
            invalid
        );
        let mut other = id();
        other.0[0] ^= 1;
        assert_eq!(verify_binding(&KEY, other, EXP, a, d, &b, NOW), invalid);
        for i in 0..32 {
            let mut t = b;
            t[i] ^= 0x80;
            assert_eq!(verify_binding(&KEY, id(), EXP, a, d, &t, NOW), invalid);
        }
        assert_eq!(
            verify_binding(&KEY, id(), EXP, a, d, &b, EXP),
            Err(BindingError::Expired)
        );
        // Expired but tampered: the MAC is reported, never the expiry.
        let mut t = b;
        t[0] ^= 1;
        assert_eq!(verify_binding(&KEY, id(), EXP, a, d, &t, EXP), invalid);
    }

    #[test]
    fn affinity_is_checked_after_mac() {
        let wrong = ConnId([1, 2, 3, 4, 5, 6, 7, 8]);
        let b = binding(&KEY, wrong, EXP, "alice@example.com", "phone").expect("short");
        assert_eq!(
            verify_binding(&KEY, wrong, EXP, "alice@example.com", "phone", &b, NOW),
            Err(BindingError::AffinityMismatch)
        );
    }

    #[test]
    fn overlong_fields() {
        let long = "x".repeat(MAX_BINDING_FIELD + 1);
        assert_eq!(
            binding(&KEY, id(), EXP, &long, "d"),
            Err(BindingError::FieldTooLong)
        );
        assert_eq!(
            binding(&KEY, id(), EXP, "a", &long),
            Err(BindingError::FieldTooLong)
        );
        assert!(binding(&KEY, id(), EXP, &long[1..], "d").is_ok());
        assert_eq!(
            verify_binding(&KEY, id(), EXP, &long, "d", &[0; 32], NOW),
            Err(BindingError::Invalid)
        );
    }

    /// A binding key's `Debug` names the type and shows no key bytes.
    #[test]
    fn binding_key_debug_hides_the_key() {
        assert_eq!(format!("{:?}", BindingKey::new(&KEY)), "BindingKey(..)");
    }
}
