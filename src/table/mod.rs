//! The per-shard connection table: compact connection records, compact
//! account records with their catch-up state, two indexes and a timer wheel.
//!
//! This module exists to hold millions of connections in little memory
//! (the budget is 100 bytes per held connection, indexes and catch-up state
//! included, docs/BENCHMARKS.md). A connection record is 48 bytes and an
//! account record 32; both indexes store only a 4-byte slot number per
//! entry (the keys are read from the records themselves), and records live
//! in fixed-size pages so that growth never copies the whole table.
//!
//! What a connection record does *not* hold, by design:
//! * no keys — packet keys are derived from the master key per packet
//!   (docs/PROTOCOL.md §3);
//! * no account or device name — a connection points at its account's
//!   record, and an account is known by a 64-bit key made of its affinity
//!   (conn id bytes 4..8) and 32 more bits of SHA-256 of its name (see
//!   [`AccountKey`]);
//! * no queue — pending notify state is one mask, the Serial is the
//!   account's (docs/PROTOCOL.md §6); masks longer than 4 bytes and IPv6
//!   addresses spill to side maps.
//!
//! The table is owned by one shard thread and is not `Sync` by construction
//! (it is never shared).

mod account;
mod record;
mod wheel;

pub use account::{Account, CatchUp, CatchUpMask};
pub use record::{Connection, INLINE_MASK, MASK_ALL_ONES, MAX_TRIES};
pub use wheel::TimerWheel;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hashbrown::HashTable;
use sha2::{Digest, Sha256};

use crate::packet::ConnId;

/// Index of a connection record in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(pub u32);

/// Index of an account record in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccountSlot(pub u32);

/// Records per page.
const PAGE: usize = 4096;

static ALL_ONES: [u8; 32] = [0xFF; 32];

/// An account's identity inside a shard: the affinity (first 4 bytes of
/// SHA-256 of the name, also conn id bytes 4..8) and the next 4 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccountKey {
    /// First 4 bytes of SHA-256(account), big-endian (docs/PROTOCOL.md §4).
    pub affinity: u32,
    /// Bytes 4..8 of SHA-256(account).
    pub low: u32,
}

impl AccountKey {
    /// The key of an account name.
    pub fn of(account: &str) -> Self {
        let digest = Sha256::digest(account.as_bytes());
        AccountKey {
            affinity: u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]),
            low: u32::from_be_bytes([digest[4], digest[5], digest[6], digest[7]]),
        }
    }
}

/// No more connections (or accounts) can be held: the configured limit, or
/// `u32` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection table full")]
pub struct TableFull;

/// Fixed-size pages of records with a free list threaded through them.
struct Pages<R> {
    pages: Vec<Box<[R]>>,
    /// Head of the free list (slot + 1; 0 = empty).
    free_head: u32,
    /// Slots handed out so far (the high-water mark).
    high_water: u32,
    len: usize,
}

impl<R: Copy + Default> Pages<R> {
    fn new() -> Self {
        Pages {
            pages: Vec::new(),
            free_head: 0,
            high_water: 0,
            len: 0,
        }
    }

    fn get(&self, slot: u32) -> Option<&R> {
        let s = slot as usize;
        self.pages.get(s / PAGE).map(|p| &p[s % PAGE])
    }

    fn get_mut(&mut self, slot: u32) -> Option<&mut R> {
        let s = slot as usize;
        self.pages.get_mut(s / PAGE).map(|p| &mut p[s % PAGE])
    }

    fn at(&self, slot: u32) -> &R {
        &self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    fn at_mut(&mut self, slot: u32) -> &mut R {
        &mut self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    /// A free slot; `next_free` reads the free-list link of a free record.
    fn allocate(&mut self, next_free: impl Fn(&R) -> u32) -> Result<u32, TableFull> {
        if self.free_head != 0 {
            let slot = self.free_head - 1;
            self.free_head = next_free(self.at(slot));
            self.len += 1;
            return Ok(slot);
        }
        let slot = self.high_water;
        if slot == u32::MAX {
            return Err(TableFull);
        }
        if slot as usize / PAGE >= self.pages.len() {
            self.pages.push(vec![R::default(); PAGE].into_boxed_slice());
        }
        self.high_water += 1;
        self.len += 1;
        Ok(slot)
    }

    /// Returns `slot` to the free list; `free` resets a record and stores
    /// the link it is given.
    fn release(&mut self, slot: u32, free: impl Fn(&mut R, u32)) {
        let link = self.free_head;
        free(self.at_mut(slot), link);
        self.free_head = slot + 1;
        self.len -= 1;
    }
}

/// The connection table of one shard.
pub struct Table {
    conns: Pages<Connection>,
    accounts: Pages<Account>,
    limit: usize,
    account_limit: usize,
    by_conn: HashTable<u32>,
    by_account: HashTable<u32>,
    hasher: ahash::RandomState,
    wide_masks: HashMap<u32, [u8; 32]>,
    v6_addrs: HashMap<u32, [u8; 16]>,
    /// Connections per account-affinity partition (affinity mod the
    /// slice's length), kept only in a cluster (docs/PROTOCOL.md §10): the
    /// node subscribes to the partitions where it holds devices.
    partitions: Option<Box<[u32]>>,
}

/// A conn id's hash for the by-conn index: its 8 bytes as one `u64`, one
/// hasher round (hashing the array would feed its length and then its bytes).
fn hash_conn_id(hasher: &ahash::RandomState, id: &[u8; 8]) -> u64 {
    hasher.hash_one(u64::from_ne_bytes(*id))
}

fn hash_account(hasher: &ahash::RandomState, affinity: u32, low: u32) -> u64 {
    hasher.hash_one((u64::from(affinity) << 32) | u64::from(low))
}

impl Table {
    /// An empty table that refuses connections beyond `limit` (and keeps at
    /// most twice as many accounts: those with devices, and those whose
    /// devices left within the catch-up window).
    pub fn new(limit: usize) -> Self {
        Table {
            conns: Pages::new(),
            accounts: Pages::new(),
            limit,
            account_limit: limit.saturating_mul(2),
            by_conn: HashTable::new(),
            by_account: HashTable::new(),
            hasher: ahash::RandomState::new(),
            wide_masks: HashMap::new(),
            v6_addrs: HashMap::new(),
            partitions: None,
        }
    }

    /// Counts connections per partition (affinity mod `partitions`) from
    /// now on, the ones held included; 0 stops counting.
    pub fn count_partitions(&mut self, partitions: u32) {
        if partitions == 0 {
            self.partitions = None;
            return;
        }
        let mut counts = vec![0u32; partitions as usize].into_boxed_slice();
        for s in 0..self.conns.high_water {
            if let Some(rec) = self.conns.get(s).filter(|r| r.in_use()) {
                let affinity = self.accounts.at(rec.account).affinity;
                counts[(affinity % partitions) as usize] += 1;
            }
        }
        self.partitions = Some(counts);
    }

    /// Connections held per partition (empty when not counting).
    pub fn partition_devices(&self) -> &[u32] {
        self.partitions.as_deref().unwrap_or(&[])
    }

    fn count_partition(&mut self, account: u32, up: bool) {
        if let Some(counts) = self.partitions.as_deref_mut() {
            let affinity = self.accounts.at(account).affinity;
            let n = &mut counts[(affinity % counts.len() as u32) as usize];
            *n = if up {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
        }
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.conns.len
    }

    /// True when no connection is held.
    pub fn is_empty(&self) -> bool {
        self.conns.len == 0
    }

    /// Account records held (with devices, or within their catch-up window).
    pub fn accounts_len(&self) -> usize {
        self.accounts.len
    }

    /// The configured connection limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Connection slots ever handed out; every live slot is below this.
    pub fn slot_bound(&self) -> u32 {
        self.conns.high_water
    }

    /// Account slots ever handed out; every live account slot is below this.
    pub fn account_bound(&self) -> u32 {
        self.accounts.high_water
    }

    /// The connection record in `slot`, live or not.
    pub fn get(&self, slot: Slot) -> Option<&Connection> {
        self.conns.get(slot.0)
    }

    /// The connection record in `slot`, mutable.
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut Connection> {
        self.conns.get_mut(slot.0)
    }

    /// The account record in `slot`, live or not.
    pub fn account(&self, slot: AccountSlot) -> Option<&Account> {
        self.accounts.get(slot.0)
    }

    /// The account record in `slot`, mutable.
    pub fn account_mut(&mut self, slot: AccountSlot) -> Option<&mut Account> {
        self.accounts.get_mut(slot.0)
    }

    /// The account a live connection belongs to.
    pub fn account_of(&self, slot: Slot) -> AccountSlot {
        AccountSlot(self.conns.at(slot.0).account)
    }

    /// The live connection with this conn id.
    pub fn find(&self, id: &ConnId) -> Option<Slot> {
        let h = hash_conn_id(&self.hasher, &id.0);
        self.by_conn
            .find(h, |&s| self.conns.at(s).conn_id == id.0)
            .map(|&s| Slot(s))
    }

    /// The account record of `key`, if held.
    pub fn find_account(&self, key: AccountKey) -> Option<AccountSlot> {
        let h = hash_account(&self.hasher, key.affinity, key.low);
        self.by_account
            .find(h, |&s| {
                let a = self.accounts.at(s);
                a.affinity == key.affinity && a.low == key.low
            })
            .map(|&s| AccountSlot(s))
    }

    /// The first connection of an account (follow [`Table::next_in_account`]).
    pub fn account_head(&self, key: AccountKey) -> Option<Slot> {
        let a = self.find_account(key)?;
        let head = self.accounts.at(a.0).head;
        (head != 0).then(|| Slot(head - 1))
    }

    /// The connection after `slot` in its account's list.
    pub fn next_in_account(&self, slot: Slot) -> Option<Slot> {
        let n = self.conns.at(slot.0).next_in_account;
        (n != 0).then(|| Slot(n - 1))
    }

    /// Makes room for `conns` more connections and `accounts` more account
    /// records (within the limits), so that inserting them does not grow
    /// the indexes step by step: a restore knows how many it brings.
    pub fn reserve(&mut self, conns: usize, accounts: usize) {
        let conns = conns.min(self.limit.saturating_sub(self.conns.len));
        let accounts = accounts.min(self.account_limit.saturating_sub(self.accounts.len));
        let (pages, hasher) = (&self.conns, &self.hasher);
        self.by_conn
            .reserve(conns, |&s| hash_conn_id(hasher, &pages.at(s).conn_id));
        let (pages, hasher) = (&self.accounts, &self.hasher);
        self.by_account.reserve(accounts, |&s| {
            let a = pages.at(s);
            hash_account(hasher, a.affinity, a.low)
        });
    }

    /// Adds an account record (the key must not be held: check with
    /// [`Table::find_account`] first).
    pub fn insert_account(&mut self, record: Account) -> Result<AccountSlot, TableFull> {
        if self.accounts.len >= self.account_limit {
            return Err(TableFull);
        }
        let slot = self.accounts.allocate(|a| a.head)?;
        *self.accounts.at_mut(slot) = record;
        let h = hash_account(&self.hasher, record.affinity, record.low);
        let pages = &self.accounts;
        let hasher = &self.hasher;
        self.by_account.insert_unique(h, slot, |&s| {
            let a = pages.at(s);
            hash_account(hasher, a.affinity, a.low)
        });
        Ok(AccountSlot(slot))
    }

    /// Removes an account record that has no connection left.
    pub fn remove_account(&mut self, slot: AccountSlot) {
        let Some(a) = self.accounts.get(slot.0).copied() else {
            return;
        };
        if !a.in_use() || a.head != 0 {
            return;
        }
        let h = hash_account(&self.hasher, a.affinity, a.low);
        if let Ok(e) = self.by_account.find_entry(h, |&x| x == slot.0) {
            e.remove();
        }
        self.accounts.release(slot.0, |r, link| {
            *r = Account::default();
            r.head = link;
        });
    }

    /// Inserts a new connection of `account` (the conn id must not be
    /// present: check with [`Table::find`] first); it joins the account's list.
    pub fn insert(
        &mut self,
        mut record: Connection,
        account: AccountSlot,
    ) -> Result<Slot, TableFull> {
        if self.conns.len >= self.limit {
            return Err(TableFull);
        }
        let Some(head) = self.accounts.get(account.0).map(|a| a.head) else {
            return Err(TableFull);
        };
        let slot = self.conns.allocate(|r| r.next_in_account)?;
        record.set_in_use(true);
        record.account = account.0;
        record.next_in_account = head;
        let id = record.conn_id;
        *self.conns.at_mut(slot) = record;
        self.accounts.at_mut(account.0).head = slot + 1;
        self.count_partition(account.0, true);
        let ch = hash_conn_id(&self.hasher, &id);
        let pages = &self.conns;
        let hasher = &self.hasher;
        self.by_conn
            .insert_unique(ch, slot, |&s| hash_conn_id(hasher, &pages.at(s).conn_id));
        Ok(Slot(slot))
    }

    /// Removes a live connection; its slot may be reused at once. Its
    /// account stays (for the catch-up window), stamped `now` (seconds
    /// since the table epoch).
    pub fn remove(&mut self, slot: Slot, now: u32) {
        let s = slot.0;
        if !self.conns.get(s).is_some_and(Connection::in_use) {
            return;
        }
        let rec = *self.conns.at(s);
        let ch = hash_conn_id(&self.hasher, &rec.conn_id);
        if let Ok(e) = self.by_conn.find_entry(ch, |&x| x == s) {
            e.remove();
        }
        self.count_partition(rec.account, false);
        // Unlink from the account's list.
        let account = self.accounts.at_mut(rec.account);
        account.stamp = now;
        if account.head == s + 1 {
            account.head = rec.next_in_account;
        } else {
            let mut cur = account.head;
            while cur != 0 {
                let next = self.conns.at(cur - 1).next_in_account;
                if next == s + 1 {
                    self.conns.at_mut(cur - 1).next_in_account = rec.next_in_account;
                    break;
                }
                cur = next;
            }
        }
        self.wide_masks.remove(&s);
        self.v6_addrs.remove(&s);
        self.conns.release(s, |r, link| {
            *r = Connection::default();
            r.next_in_account = link;
        });
    }

    /// The UDP endpoint of a connection (`None` before its first UDP packet).
    pub fn endpoint(&self, slot: Slot) -> Option<SocketAddr> {
        let r = self.conns.get(slot.0)?;
        let port = r.port();
        if port == 0 {
            return None;
        }
        let ip = if r.is_ipv6() {
            IpAddr::V6(Ipv6Addr::from(*self.v6_addrs.get(&slot.0)?))
        } else {
            IpAddr::V4(Ipv4Addr::from(r.addr_v4))
        };
        Some(SocketAddr::new(ip, port))
    }

    /// Whether the connection's UDP endpoint is `addr` (without building it).
    pub fn endpoint_is(&self, slot: Slot, addr: SocketAddr) -> bool {
        let Some(r) = self.conns.get(slot.0) else {
            return false;
        };
        if r.port() != addr.port() || r.port() == 0 {
            return false;
        }
        match addr.ip() {
            IpAddr::V4(v4) => !r.is_ipv6() && r.addr_v4 == v4.octets(),
            IpAddr::V6(v6) => {
                r.is_ipv6()
                    && self
                        .v6_addrs
                        .get(&slot.0)
                        .is_some_and(|a| *a == v6.octets())
            }
        }
    }

    /// Moves a connection to a new UDP endpoint.
    pub fn set_endpoint(&mut self, slot: Slot, to: SocketAddr) {
        let Some(r) = self.conns.get_mut(slot.0) else {
            return;
        };
        r.port = to.port().to_be_bytes();
        match to.ip() {
            IpAddr::V4(v4) => {
                r.addr_v4 = v4.octets();
                if r.is_ipv6() {
                    r.set_ipv6(false);
                    self.v6_addrs.remove(&slot.0);
                }
            }
            IpAddr::V6(v6) => {
                r.addr_v4 = [0; 4];
                r.set_ipv6(true);
                self.v6_addrs.insert(slot.0, v6.octets());
            }
        }
    }

    /// The pending notify mask of a connection (empty when nothing is pending).
    pub fn pending_mask(&self, slot: Slot) -> &[u8] {
        let r = self.conns.at(slot.0);
        if r.mask_len() == MASK_ALL_ONES {
            return &ALL_ONES;
        }
        let n = r.mask_len() as usize;
        if n <= INLINE_MASK {
            &r.pending[..n]
        } else {
            self.wide_masks
                .get(&slot.0)
                .map(|m| &m[..n.min(32)])
                .unwrap_or(&[])
        }
    }

    /// ORs `bits` (≤ 32 bytes) into the pending mask of `slot`.
    pub fn or_pending(&mut self, slot: Slot, bits: &[u8]) {
        let bits = &bits[..bits.len().min(32)];
        // All ones (a resync) stays all ones, and is kept without a side
        // entry: after a node restart every reconnecting device holds one
        // until it acknowledges.
        if self.conns.at(slot.0).mask_len() == MASK_ALL_ONES {
            return;
        }
        if bits == ALL_ONES {
            let r = self.conns.at_mut(slot.0);
            let wide = (r.mask_len() as usize) > INLINE_MASK;
            r.set_mask_len(MASK_ALL_ONES);
            r.pending = [0xFF; INLINE_MASK];
            if wide {
                self.wide_masks.remove(&slot.0);
            }
            return;
        }
        let mut mask = [0u8; 32];
        let old = self.pending_mask(slot);
        let old_len = old.len();
        mask[..old_len].copy_from_slice(old);
        for (m, b) in mask.iter_mut().zip(bits) {
            *m |= b;
        }
        let n = old_len.max(bits.len());
        let r = self.conns.at_mut(slot.0);
        r.set_mask_len(n as u8);
        if n <= INLINE_MASK {
            r.pending[..n].copy_from_slice(&mask[..n]);
        } else {
            self.wide_masks.insert(slot.0, mask);
        }
    }

    /// Clears the pending mask of `slot`.
    pub fn clear_pending(&mut self, slot: Slot) {
        let r = self.conns.at_mut(slot.0);
        let wide = r.mask_len() as usize > INLINE_MASK && r.mask_len() != MASK_ALL_ONES;
        r.set_mask_len(0);
        r.pending = [0; INLINE_MASK];
        r.set_tries(0);
        r.set_catch_up(false);
        if wide {
            self.wide_masks.remove(&slot.0);
        }
    }
}

#[cfg(test)]
mod tests;
