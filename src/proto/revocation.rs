//! Revoked credentials (docs/PROTOCOL.md §7.11), as generations.
//!
//! Credentials are stateless: a node checks one by its binding alone. To
//! revoke some without a database of every credential issued, each account
//! and each device has a *generation* (0 until first revoked), and the
//! binding of a credential is made under `KDF(master, "bind",
//! u64be(generation))` where the generation is `account's << 32 |
//! device's`. Revoking a device (or a whole account) raises its generation:
//! every credential issued before no longer verifies, and credentials issued
//! after it do. Accounts and devices never revoked stay at generation 0,
//! whose key is the plain binding key of §4, so nothing changes for them.
//!
//! This module is the table of generations and the rules over it; reading
//! and writing it (the data directory's `revocations.json`) is the node's.

use std::collections::HashMap;

/// The generations of the revoked accounts and devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    accounts: HashMap<String, u32>,
    devices: HashMap<String, HashMap<String, u32>>,
}

impl Revocations {
    /// No revocation at all.
    pub fn new() -> Self {
        Revocations::default()
    }

    /// The binding generation of a device's credentials: 0 for an account
    /// and device never revoked.
    pub fn generation(&self, account: &str, device: &str) -> u64 {
        let a = self.accounts.get(account).copied().unwrap_or(0);
        let d = self
            .devices
            .get(account)
            .and_then(|ds| ds.get(device))
            .copied()
            .unwrap_or(0);
        (u64::from(a) << 32) | u64::from(d)
    }

    /// Revokes every credential of `account` issued so far; the new
    /// account generation.
    pub fn revoke_account(&mut self, account: &str) -> u32 {
        let g = self.accounts.entry(account.to_owned()).or_insert(0);
        *g = g.saturating_add(1);
        *g
    }

    /// Revokes every credential of `device` of `account` issued so far;
    /// the new device generation.
    pub fn revoke_device(&mut self, account: &str, device: &str) -> u32 {
        let g = self
            .devices
            .entry(account.to_owned())
            .or_default()
            .entry(device.to_owned())
            .or_insert(0);
        *g = g.saturating_add(1);
        *g
    }

    /// Sets a generation as read from storage (`device: None` for the account's).
    pub fn set(&mut self, account: &str, device: Option<&str>, generation: u32) {
        match device {
            None => {
                self.accounts.insert(account.to_owned(), generation);
            }
            Some(d) => {
                self.devices
                    .entry(account.to_owned())
                    .or_default()
                    .insert(d.to_owned(), generation);
            }
        }
    }

    /// Every entry: (account, device or `None` for the account, generation).
    pub fn entries(&self) -> impl Iterator<Item = (&str, Option<&str>, u32)> {
        let accounts = self.accounts.iter().map(|(a, g)| (a.as_str(), None, *g));
        let devices = self.devices.iter().flat_map(|(a, ds)| {
            ds.iter()
                .map(move |(d, g)| (a.as_str(), Some(d.as_str()), *g))
        });
        accounts.chain(devices)
    }

    /// True when nothing was ever revoked.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.devices.is_empty()
    }

    /// The accounts some of whose credentials `self` revokes and `before`
    /// did not: their held connections must be dropped, so that each of
    /// their devices shows its credential again.
    pub fn newly_revoked_accounts<'a>(&'a self, before: &'a Revocations) -> Vec<&'a str> {
        let mut out: Vec<&str> = self
            .entries()
            .filter(|(account, device, g)| {
                let old = match device {
                    None => before.accounts.get(*account).copied().unwrap_or(0),
                    Some(d) => before
                        .devices
                        .get(*account)
                        .and_then(|ds| ds.get(*d))
                        .copied()
                        .unwrap_or(0),
                };
                *g > old
            })
            .map(|(account, _, _)| account)
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_start_at_zero_and_rise_on_revocation() {
        let mut r = Revocations::new();
        assert_eq!(r.generation("a", "phone"), 0);
        assert_eq!(r.revoke_device("a", "phone"), 1);
        assert_eq!(r.generation("a", "phone"), 1);
        assert_eq!(r.generation("a", "laptop"), 0, "only that device");
        assert_eq!(r.revoke_account("a"), 1);
        assert_eq!(r.generation("a", "phone"), (1 << 32) | 1);
        assert_eq!(r.generation("a", "laptop"), 1 << 32);
        assert_eq!(r.generation("b", "phone"), 0);
    }

    #[test]
    fn newly_revoked_accounts_compare_two_tables() {
        let mut before = Revocations::new();
        before.revoke_device("a", "phone");
        let mut after = before.clone();
        assert!(after.newly_revoked_accounts(&before).is_empty());
        after.revoke_device("b", "x");
        after.revoke_device("b", "y");
        after.revoke_account("c");
        assert_eq!(after.newly_revoked_accounts(&before), ["b", "c"]);
        let mut restored = Revocations::new();
        for (a, d, g) in after.entries() {
            restored.set(a, d, g);
        }
        assert_eq!(restored, after);
    }

    #[test]
    fn is_empty_until_an_account_or_a_device_is_revoked() {
        assert!(Revocations::new().is_empty());
        let mut device_only = Revocations::new();
        device_only.revoke_device("a", "phone");
        assert!(!device_only.is_empty(), "a revoked device is a revocation");
        let mut account_only = Revocations::new();
        account_only.revoke_account("a");
        assert!(
            !account_only.is_empty(),
            "a revoked account is a revocation"
        );
    }
}
