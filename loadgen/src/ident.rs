//! The simulated devices' identities, minted from the node's master key.
//!
//! Device `g` (0-based, over the whole run) belongs to account `g % A`, is
//! named `dev-g`, and its conn id is `(g XOR salt)` as 4 big-endian bytes ‖
//! the account's affinity (docs/PROTOCOL.md §4). Nothing but the two packet keys
//! is stored per device: the conn id is recomputed from the index, and a
//! received packet's conn id gives the index back without a hash table. The
//! binding is computed when the device connects.

use std::path::Path;

use anyhow::{bail, Context, Result};
use mpp::packet::{
    account_affinity, BindingKey, ConnId, Direction, MasterKey, PacketKey, CONN_ID_LEN,
};
use mpp::time::{UnixMillis, UnixSeconds};

/// Everything needed to mint any device of the run.
pub(crate) struct Identity {
    master: MasterKey,
    binding_key: BindingKey,
    salt: u32,
    affinities: Vec<u32>,
    /// Credentials' expiry (a day from the start).
    pub(crate) expires: UnixSeconds,
}

/// A device's keys, the only per-device crypto state.
pub(crate) struct Keys {
    pub(crate) c2s: PacketKey,
    pub(crate) s2c: PacketKey,
}

impl Identity {
    /// Identities for `accounts` accounts under `master`.
    pub(crate) fn new(master: MasterKey, accounts: u64) -> Result<Identity> {
        if accounts == 0 || accounts > u64::from(u32::MAX) {
            bail!("--accounts must be between 1 and {}", u32::MAX);
        }
        let affinities = (0..accounts)
            .map(|a| account_affinity(&account_name(a)))
            .collect();
        let now = UnixMillis::from_system_clock().seconds();
        Ok(Identity {
            binding_key: BindingKey::from_master(&master),
            master,
            salt: rand::random(),
            affinities,
            expires: UnixSeconds(now.0 + 86_400),
        })
    }

    /// Accounts in the run.
    pub(crate) fn accounts(&self) -> u64 {
        self.affinities.len() as u64
    }

    /// Account of device `g`.
    pub(crate) fn account_of(&self, g: u64) -> u64 {
        g % self.accounts()
    }

    /// Device `g`'s conn id, or `None` for the (one in 2³² accounts) id
    /// that would look like STUN or be reserved.
    pub(crate) fn conn_id(&self, g: u64) -> Option<ConnId> {
        let mut id = [0u8; CONN_ID_LEN];
        id[..4].copy_from_slice(&((g as u32) ^ self.salt).to_be_bytes());
        id[4..].copy_from_slice(&self.affinities[self.account_of(g) as usize].to_be_bytes());
        let id = ConnId(id);
        (!id.is_reserved() && !id.looks_like_stun()).then_some(id)
    }

    /// The device index a packet's conn id names, if it is one of ours.
    pub(crate) fn index_of(&self, packet: &[u8], devices: u64) -> Option<u64> {
        let id = packet.get(..CONN_ID_LEN)?;
        let g = u64::from(u32::from_be_bytes([id[0], id[1], id[2], id[3]]) ^ self.salt);
        (g < devices && self.conn_id(g)?.0[..] == id[..]).then_some(g)
    }

    /// Device `g`'s packet keys (the secret derivation the node does per packet).
    pub(crate) fn keys(&self, g: u64) -> Option<Keys> {
        let id = self.conn_id(g)?;
        let x = self.master.expanded_secret(id);
        Some(Keys {
            c2s: x.key(Direction::ClientToServer),
            s2c: x.key(Direction::ServerToClient),
        })
    }

    /// Device `g`'s binding for its ConnectRequest.
    pub(crate) fn binding(&self, g: u64) -> Option<[u8; 32]> {
        let id = self.conn_id(g)?;
        let account = account_name(self.account_of(g));
        self.binding_key
            .binding(id, self.expires, &account, &device_name(g))
            .ok()
    }
}

/// Account `a`'s name.
pub(crate) fn account_name(a: u64) -> String {
    format!("load-{a}@loadgen.example")
}

/// Device `g`'s name.
pub(crate) fn device_name(g: u64) -> String {
    format!("dev-{g}")
}

/// The master key from `--master-key FILE`, else from `--data-dir`'s
/// `master.key` (`./mppd-data`, mppd's own default, unless given).
pub(crate) fn load_master(master_key: Option<&Path>, data_dir: &Path) -> Result<MasterKey> {
    if let Some(path) = master_key {
        return read_master(path);
    }
    let path = data_dir.join("master.key");
    read_master(&path).with_context(|| {
        format!(
            "devices need the node's master key: give --data-dir DIR (the node's data \
             directory; {} has none) or --master-key FILE",
            data_dir.display()
        )
    })
}

/// The node's master key where there is one (`--master-key`, or
/// `--data-dir` holding a `master.key`), else a random one: for the
/// scenarios that talk to themselves (echo, raw fan-out), any key will do.
pub(crate) fn load_master_or_random(
    master_key: Option<&Path>,
    data_dir: &Path,
) -> Result<MasterKey> {
    if master_key.is_some() || data_dir.join("master.key").exists() {
        return load_master(master_key, data_dir);
    }
    Ok(MasterKey::new(rand::random()))
}

fn read_master(path: &Path) -> Result<MasterKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading master key {}", path.display()))?;
    MasterKey::from_hex(&text).map_err(|e| anyhow::anyhow!("master key {}: {e}", path.display()))
}

/// The admin token from `--token-file FILE`, else from `--data-dir`'s
/// `admin.token`.
pub(crate) fn load_token(token_file: Option<&Path>, data_dir: &Path) -> Result<String> {
    let path = match token_file {
        Some(p) => p.to_path_buf(),
        None => data_dir.join("admin.token"),
    };
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "publishing needs the node's admin token: reading {} (give --data-dir DIR or \
             --token-file FILE)",
            path.display()
        )
    })?;
    let token = text.trim().to_owned();
    if token.is_empty() || token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        bail!("admin token {} is empty or has spaces", path.display());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_round_trips_and_rejects_strangers() {
        let id = Identity::new(MasterKey::new([7; 32]), 10).unwrap();
        for g in [0u64, 1, 9, 10, 12345] {
            let c = id.conn_id(g).unwrap();
            assert_eq!(id.index_of(&c.0, 100_000), Some(g));
            assert_eq!(c.affinity(), account_affinity(&account_name(g % 10)));
        }
        let c = id.conn_id(5).unwrap();
        assert_eq!(id.index_of(&c.0, 5), None, "index beyond the run");
        let mut other = c.0;
        other[7] ^= 1;
        assert_eq!(id.index_of(&other, 100), None, "wrong affinity");
        assert_eq!(id.index_of(&c.0[..4], 100), None, "short");
    }

    #[test]
    fn bindings_verify_with_the_master_key() {
        let master = MasterKey::new([9; 32]);
        let id = Identity::new(master.clone(), 3).unwrap();
        let g = 4;
        let cred = mpp::packet::Credential {
            conn_id: id.conn_id(g).unwrap(),
            secret: master.secret(id.conn_id(g).unwrap()),
            account: account_name(id.account_of(g)),
            device: device_name(g),
            expires: id.expires,
            binding: id.binding(g).unwrap(),
            endpoints: Vec::new(),
        };
        cred.verify(&master, UnixMillis::from_system_clock().seconds())
            .unwrap();
    }
}
