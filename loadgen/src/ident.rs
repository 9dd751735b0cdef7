//! The simulated devices' identities, minted from the node's master key.
//!
//! A run simulates devices `N .. N + D` of a device space (`--first-device
//! N`, `--devices D`; N is 0 unless given) in accounts of `D / A` devices
//! each (`--accounts A`): device `n` of the space is named `dev-n` and
//! belongs to account `⌊n·A/D⌋`, named `load-<that>@loadgen.example`, so
//! several loadgen processes with the same `--devices` and `--accounts`
//! and disjoint ranges agree on every device's account and hold disjoint
//! accounts (each account's devices are consecutive). Within the run,
//! devices and accounts are counted from 0 (`l = n − N`); the names and
//! conn ids use the space's numbers.
//!
//! A device's conn id is `(n XOR salt)` as 4 big-endian bytes ‖ its
//! account's affinity (docs/PROTOCOL.md §4). The salt is random, so that
//! two runs never share a connection, unless `--first-device` is given:
//! then it is 0, so that processes sharing a space never do either (and a
//! run takes over the connections a previous run of the same range left
//! on the node). Nothing but the two packet keys is stored per device:
//! the conn id is recomputed from the index, and a received packet's conn
//! id gives the index back without a hash table. The binding is computed
//! when the device connects.
//!
//! With several nodes (`--node A,B,…`, k of them) device `n` connects to
//! node `n mod k` and account `a` publishes enter node `a mod k` (its
//! entry node): an account of more than one device has devices on several
//! nodes, and each node's record of the account counts its own Serials,
//! so the publish clocks are per account and node ([`Identity::clock_of`]).

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
    space: Space,
    affinities: Vec<u32>,
    /// Credentials' expiry (a day from the start).
    pub(crate) expires: UnixSeconds,
}

/// A device's keys, the only per-device crypto state.
pub(crate) struct Keys {
    pub(crate) c2s: PacketKey,
    pub(crate) s2c: PacketKey,
}

/// Which devices of which space a run simulates, and on how many nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Space {
    /// The space's number of the run's first device (`--first-device`).
    pub(crate) first: u64,
    /// Devices in the run (`--devices`).
    pub(crate) devices: u64,
    /// Accounts in the run (`--accounts`).
    pub(crate) accounts: u64,
    /// Nodes the devices are spread over (`--node`'s list).
    pub(crate) nodes: u64,
    /// Whether the conn ids are the space's (`--first-device` given), not
    /// salted at random.
    pub(crate) shared: bool,
}

impl Space {
    /// `devices` in `accounts` on one node, the run's own (tests).
    #[cfg(test)]
    pub(crate) fn new(devices: u64, accounts: u64) -> Space {
        Space {
            first: 0,
            devices,
            accounts,
            nodes: 1,
            shared: false,
        }
    }

    /// The flags' space; an error names the flag that does not fit.
    pub(crate) fn check(self) -> Result<Space> {
        let Space {
            first,
            devices,
            accounts,
            nodes,
            ..
        } = self;
        if devices == 0 || accounts == 0 || accounts > devices {
            bail!("--accounts must be between 1 and --devices ({devices})");
        }
        if nodes == 0 {
            bail!("--node needs at least one address");
        }
        if first.checked_add(devices).is_none_or(|end| end > 1 << 32) {
            bail!("--first-device + --devices must be at most 2^32 (conn ids hold 32 bits of the device)");
        }
        if u128::from(first) * u128::from(accounts) % u128::from(devices) != 0 {
            bail!(
                "--first-device {first} does not start an account: with {devices} devices in \
                 {accounts} accounts it must be a multiple of {devices}/{accounts} (so that \
                 --first-device × --accounts is a multiple of --devices)"
            );
        }
        Ok(self)
    }

    /// The space's number of the run's first account.
    pub(crate) fn first_account(&self) -> u64 {
        (u128::from(self.first) * u128::from(self.accounts) / u128::from(self.devices)) as u64
    }

    /// The run's account of device `l`: ⌊l·A/D⌋.
    pub(crate) fn account_of(&self, l: u64) -> u64 {
        (u128::from(l) * u128::from(self.accounts) / u128::from(self.devices)) as u64
    }

    /// The node (index in `--node`) device `l` connects to.
    pub(crate) fn node_of(&self, l: u64) -> usize {
        ((self.first + l) % self.nodes) as usize
    }

    /// The node (index in `--node`) account `a`'s publishes enter.
    pub(crate) fn entry_node(&self, a: u64) -> usize {
        ((self.first_account() + a) % self.nodes) as usize
    }

    /// Publish clocks: one per account and node.
    pub(crate) fn clocks(&self) -> u64 {
        self.accounts * self.nodes
    }

    /// The clock of account `a`'s devices on node `node`.
    pub(crate) fn clock(&self, a: u64, node: usize) -> usize {
        (a * self.nodes) as usize + node
    }

    /// The publish clock of device `l`: its account's on its node.
    pub(crate) fn clock_of(&self, l: u64) -> usize {
        self.clock(self.account_of(l), self.node_of(l))
    }

    /// Devices of each clock (account `a` on node `j` at `a·k + j`).
    pub(crate) fn devices_per_clock(&self) -> Vec<u64> {
        let mut n = vec![0u64; self.clocks() as usize];
        for a in 0..self.accounts {
            // Account a's devices: ⌈a·D/A⌉ .. ⌈(a+1)·D/A⌉.
            let (lo, hi) = (self.first_device_of(a), self.first_device_of(a + 1));
            for j in 0..self.nodes {
                // Those n ≡ j (mod k) among first+lo .. first+hi.
                let below = |x: u64| (x + self.nodes - 1 - j) / self.nodes;
                n[self.clock(a, j as usize)] = below(self.first + hi) - below(self.first + lo);
            }
        }
        n
    }

    /// Devices of each account.
    pub(crate) fn devices_per_account(&self) -> Vec<u64> {
        (0..self.accounts)
            .map(|a| self.first_device_of(a + 1) - self.first_device_of(a))
            .collect()
    }

    /// The run's first device of account `a` (`devices` for `a` = A).
    fn first_device_of(&self, a: u64) -> u64 {
        (u128::from(a) * u128::from(self.devices)).div_ceil(u128::from(self.accounts)) as u64
    }
}

impl Identity {
    /// Identities of the devices of `space` under `master`.
    pub(crate) fn new(master: MasterKey, space: Space) -> Result<Identity> {
        if space.accounts == 0 || space.accounts > u64::from(u32::MAX) {
            bail!("--accounts must be between 1 and {}", u32::MAX);
        }
        let space = space.check()?;
        let first = space.first_account();
        let affinities = (0..space.accounts)
            .map(|a| account_affinity(&account_name(first + a)))
            .collect();
        let now = UnixMillis::from_system_clock().seconds();
        Ok(Identity {
            binding_key: BindingKey::from_master(&master),
            master,
            salt: if space.shared { 0 } else { rand::random() },
            space,
            affinities,
            expires: UnixSeconds(now.0 + 86_400),
        })
    }

    /// The run's devices, accounts and nodes.
    pub(crate) fn space(&self) -> &Space {
        &self.space
    }

    /// Accounts in the run.
    pub(crate) fn accounts(&self) -> u64 {
        self.affinities.len() as u64
    }

    /// Account of device `g`.
    pub(crate) fn account_of(&self, g: u64) -> u64 {
        self.space.account_of(g)
    }

    /// The publish clock of device `g` ([`Space::clock_of`]).
    pub(crate) fn clock_of(&self, g: u64) -> usize {
        self.space.clock_of(g)
    }

    /// Whether device `g` is on another node than its account's entry
    /// node: what it receives crossed the bus.
    pub(crate) fn is_remote(&self, g: u64) -> bool {
        self.space.nodes > 1 && self.space.node_of(g) != self.space.entry_node(self.account_of(g))
    }

    /// Account `a`'s name.
    pub(crate) fn account_name(&self, a: u64) -> String {
        account_name(self.space.first_account() + a)
    }

    /// Device `g`'s name.
    pub(crate) fn device_name(&self, g: u64) -> String {
        device_name(self.space.first + g)
    }

    /// Device `g`'s conn id, or `None` for the (one in 2³² accounts) id
    /// that would look like STUN or be reserved.
    pub(crate) fn conn_id(&self, g: u64) -> Option<ConnId> {
        let mut id = [0u8; CONN_ID_LEN];
        let n = (self.space.first + g) as u32;
        id[..4].copy_from_slice(&(n ^ self.salt).to_be_bytes());
        id[4..].copy_from_slice(&self.affinities[self.account_of(g) as usize].to_be_bytes());
        let id = ConnId(id);
        (!id.is_reserved() && !id.looks_like_stun()).then_some(id)
    }

    /// The device index a packet's conn id names, if it is one of ours.
    pub(crate) fn index_of(&self, packet: &[u8], devices: u64) -> Option<u64> {
        let id = packet.get(..CONN_ID_LEN)?;
        let n = u64::from(u32::from_be_bytes([id[0], id[1], id[2], id[3]]) ^ self.salt);
        let g = n.checked_sub(self.space.first)?;
        (g < devices.min(self.space.devices) && self.conn_id(g)?.0[..] == id[..]).then_some(g)
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
        let account = self.account_name(self.account_of(g));
        self.binding_key
            .binding(id, self.expires, &account, &self.device_name(g))
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
        let id = Identity::new(MasterKey::new([7; 32]), Space::new(100_000, 10)).unwrap();
        for g in [0u64, 1, 9, 10, 12345, 99_999] {
            let c = id.conn_id(g).unwrap();
            assert_eq!(id.index_of(&c.0, 100_000), Some(g));
            // 10 000 consecutive devices per account.
            assert_eq!(c.affinity(), account_affinity(&account_name(g / 10_000)));
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
        let id = Identity::new(master.clone(), Space::new(12, 3)).unwrap();
        let g = 4;
        let cred = mpp::packet::Credential {
            conn_id: id.conn_id(g).unwrap(),
            secret: master.secret(id.conn_id(g).unwrap()),
            account: id.account_name(id.account_of(g)),
            device: id.device_name(g),
            expires: id.expires,
            binding: id.binding(g).unwrap(),
            endpoints: Vec::new(),
        };
        cred.verify(&master, UnixMillis::from_system_clock().seconds())
            .unwrap();
    }

    /// Accounts are blocks of consecutive devices, as even as the counts
    /// allow, every one of them used.
    #[test]
    fn accounts_are_blocks_of_consecutive_devices() {
        let s = Space::new(10, 4).check().unwrap();
        let accounts: Vec<u64> = (0..10).map(|l| s.account_of(l)).collect();
        assert_eq!(accounts, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]);
        assert_eq!(s.devices_per_account(), [3, 2, 3, 2]);
        let one_each = Space::new(5, 5);
        assert_eq!(
            (0..5).map(|l| one_each.account_of(l)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
    }

    /// Two processes of one space (`--first-device 0` and `1000`, the same
    /// `--devices` and `--accounts`): no conn id in common, each device of
    /// the space in the same account whichever process runs it, disjoint
    /// accounts, and neither takes the other's packets for its own.
    #[test]
    fn two_ranges_of_one_space_never_overlap_and_agree_on_accounts() {
        let master = MasterKey::new([5; 32]);
        let range = |first| {
            let space = Space {
                first,
                devices: 1000,
                accounts: 50,
                nodes: 1,
                shared: true,
            };
            Identity::new(master.clone(), space).unwrap()
        };
        let (a, b) = (range(0), range(1000));
        let ids_a: std::collections::HashSet<_> =
            (0..1000).map(|g| a.conn_id(g).unwrap()).collect();
        let ids_b: std::collections::HashSet<_> =
            (0..1000).map(|g| b.conn_id(g).unwrap()).collect();
        assert_eq!((ids_a.len(), ids_b.len()), (1000, 1000));
        assert!(ids_a.is_disjoint(&ids_b));
        // The space's account of device n is ⌊n / 20⌋ in both.
        for g in [0u64, 19, 20, 999] {
            assert_eq!(a.account_name(a.account_of(g)), account_name(g / 20));
            assert_eq!(
                b.account_name(b.account_of(g)),
                account_name((1000 + g) / 20)
            );
            assert_eq!(b.device_name(g), device_name(1000 + g));
        }
        let names_a: std::collections::HashSet<_> = (0..50).map(|x| a.account_name(x)).collect();
        assert!((0..50).all(|x| !names_a.contains(&b.account_name(x))));
        for g in 0..1000 {
            assert_eq!(b.index_of(&a.conn_id(g).unwrap().0, 1000), None);
            assert_eq!(a.index_of(&b.conn_id(g).unwrap().0, 1000), None);
        }
        // A third process of another space's shape would not agree: a
        // range must start an account.
        let bad = Space {
            first: 10,
            ..*a.space()
        };
        assert!(bad.check().is_err());
    }

    /// Devices are dealt to the nodes in turn (device n to node n mod k);
    /// each account's publishes enter one node; the clocks count each
    /// account's devices on each node.
    #[test]
    fn devices_are_dealt_to_the_nodes_and_clocks_count_them() {
        let s = Space {
            first: 30,
            devices: 30,
            accounts: 3,
            nodes: 2,
            shared: true,
        }
        .check()
        .unwrap();
        assert_eq!(
            (0..4).map(|l| s.node_of(l)).collect::<Vec<_>>(),
            [0, 1, 0, 1]
        );
        assert_eq!(s.first_account(), 3);
        assert_eq!(
            (0..3).map(|a| s.entry_node(a)).collect::<Vec<_>>(),
            [1, 0, 1]
        );
        // 10 devices per account, 5 on each node.
        assert_eq!(s.devices_per_clock(), [5; 6]);
        let odd = Space {
            first: 0,
            devices: 7,
            accounts: 2,
            nodes: 3,
            shared: false,
        };
        // Account 0: devices 0..4 (nodes 0,1,2,0); account 1: 4..7 (1,2,0).
        assert_eq!(odd.devices_per_clock(), [2, 1, 1, 1, 1, 1]);
        let mut counted = vec![0; 6];
        for l in 0..7 {
            counted[odd.clock_of(l)] += 1;
        }
        assert_eq!(counted, odd.devices_per_clock());
    }
}
