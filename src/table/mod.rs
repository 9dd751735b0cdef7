//! The per-shard connection table: compact records, a conn-id index, an
//! account index and a timer wheel.
//!
//! This module exists to hold millions of connections in little memory
//! (the budget is 100 bytes per held connection, indexes included). A record
//! is 68 bytes; both indexes store only a 4-byte slot number per entry (the
//! keys are read from the record itself), and records live in fixed-size
//! pages so that growth never copies the whole table.
//!
//! What a record does *not* hold, by design:
//! * no keys — packet keys are derived from the master key per packet
//!   (docs/PROTOCOL.md §3);
//! * no account or device name — an account is known by a 64-bit key made of
//!   its affinity (conn id bytes 4..8) and 32 more bits of SHA-256 of its
//!   name (see [`AccountKey`]);
//! * no queue — pending notify state is one serial and one mask
//!   (docs/PROTOCOL.md §6); masks longer than 8 bytes spill to a side map.
//!
//! The table is owned by one shard thread and is not `Sync` by construction
//! (it is never shared).

mod record;
mod wheel;

pub use record::{Connection, Endpoint, INLINE_MASK};
pub use wheel::TimerWheel;

use std::collections::HashMap;

use hashbrown::HashTable;
use sha2::{Digest, Sha256};

use crate::packet::ConnId;

/// Index of a record in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(pub u32);

/// Records per page.
const PAGE: usize = 4096;

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

/// No more connections can be held (the configured limit or `u32` slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("connection table full")]
pub struct TableFull;

/// The connection table of one shard.
pub struct Table {
    pages: Vec<Box<[Connection]>>,
    /// Head of the free list (slot + 1; 0 = empty), threaded through
    /// `next_in_account` of unused records.
    free_head: u32,
    /// Slots handed out so far (the high-water mark).
    high_water: u32,
    len: usize,
    limit: usize,
    by_conn: HashTable<u32>,
    by_account: HashTable<u32>,
    hasher: ahash::RandomState,
    wide_masks: HashMap<u32, [u8; 32]>,
}

/// A conn id's hash for the by-conn index: its 8 bytes as one `u64`, one
/// hasher round (hashing the array would feed its length and then its bytes).
fn hash_conn_id(hasher: &ahash::RandomState, id: &[u8; 8]) -> u64 {
    hasher.hash_one(u64::from_ne_bytes(*id))
}

impl Table {
    /// An empty table that refuses connections beyond `limit`.
    pub fn new(limit: usize) -> Self {
        Table {
            pages: Vec::new(),
            free_head: 0,
            high_water: 0,
            len: 0,
            limit,
            by_conn: HashTable::new(),
            by_account: HashTable::new(),
            hasher: ahash::RandomState::new(),
            wide_masks: HashMap::new(),
        }
    }

    /// Connections held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The configured connection limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Slots ever handed out; every live slot is below this.
    pub fn slot_bound(&self) -> u32 {
        self.high_water
    }

    fn conn_hash(&self, id: &ConnId) -> u64 {
        hash_conn_id(&self.hasher, &id.0)
    }

    fn account_hash(&self, key: AccountKey) -> u64 {
        self.hasher.hash_one((key.affinity, key.low))
    }

    /// The record in `slot`, live or not.
    pub fn get(&self, slot: Slot) -> Option<&Connection> {
        let s = slot.0 as usize;
        self.pages.get(s / PAGE).map(|p| &p[s % PAGE])
    }

    /// The record in `slot`, mutable.
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut Connection> {
        let s = slot.0 as usize;
        self.pages.get_mut(s / PAGE).map(|p| &mut p[s % PAGE])
    }

    fn rec(&self, slot: u32) -> &Connection {
        &self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    fn rec_mut(&mut self, slot: u32) -> &mut Connection {
        &mut self.pages[slot as usize / PAGE][slot as usize % PAGE]
    }

    /// The live connection with this conn id.
    pub fn find(&self, id: &ConnId) -> Option<Slot> {
        let h = self.conn_hash(id);
        self.by_conn
            .find(h, |&s| self.rec(s).conn_id == id.0)
            .map(|&s| Slot(s))
    }

    /// The first connection of an account (follow [`Table::next_in_account`]).
    pub fn account_head(&self, key: AccountKey) -> Option<Slot> {
        let h = self.account_hash(key);
        self.by_account
            .find(h, |&s| self.rec(s).account_key() == key)
            .map(|&s| Slot(s))
    }

    /// The connection after `slot` in its account's list.
    pub fn next_in_account(&self, slot: Slot) -> Option<Slot> {
        let n = self.rec(slot.0).next_in_account;
        (n != 0).then(|| Slot(n - 1))
    }

    /// Inserts a new connection (the conn id must not be present: check with
    /// [`Table::find`] first). It joins its account's list, taking the
    /// account's current notify serial.
    pub fn insert(&mut self, mut record: Connection) -> Result<Slot, TableFull> {
        if self.len >= self.limit {
            return Err(TableFull);
        }
        let slot = self.allocate()?;
        let key = record.account_key();
        let ah = self.account_hash(key);
        let head = self
            .by_account
            .find(ah, |&s| self.rec(s).account_key() == key)
            .copied();
        record.set_in_use(true);
        match head {
            Some(h) => {
                record.notify_serial = self.rec(h).notify_serial;
                record.next_in_account = h + 1;
            }
            None => record.next_in_account = 0,
        }
        let id = ConnId(record.conn_id);
        *self.rec_mut(slot) = record;
        // Point the account at its new head.
        let pages = &self.pages;
        let hasher = &self.hasher;
        match self.by_account.find_mut(ah, |&s| {
            pages[s as usize / PAGE][s as usize % PAGE].account_key() == key
        }) {
            Some(entry) => *entry = slot,
            None => {
                self.by_account.insert_unique(ah, slot, |&s| {
                    let k = pages[s as usize / PAGE][s as usize % PAGE].account_key();
                    hasher.hash_one((k.affinity, k.low))
                });
            }
        }
        let ch = self.conn_hash(&id);
        self.by_conn.insert_unique(ch, slot, |&s| {
            hash_conn_id(hasher, &pages[s as usize / PAGE][s as usize % PAGE].conn_id)
        });
        self.len += 1;
        Ok(Slot(slot))
    }

    fn allocate(&mut self) -> Result<u32, TableFull> {
        if self.free_head != 0 {
            let slot = self.free_head - 1;
            self.free_head = self.rec(slot).next_in_account;
            return Ok(slot);
        }
        let slot = self.high_water;
        if slot == u32::MAX {
            return Err(TableFull);
        }
        if slot as usize / PAGE >= self.pages.len() {
            self.pages
                .push(vec![Connection::default(); PAGE].into_boxed_slice());
        }
        self.high_water += 1;
        Ok(slot)
    }

    /// Removes a live connection; its slot may be reused at once.
    pub fn remove(&mut self, slot: Slot) {
        let s = slot.0;
        if !self.get(slot).is_some_and(Connection::in_use) {
            return;
        }
        let rec = *self.rec(s);
        let id = ConnId(rec.conn_id);
        let ch = self.conn_hash(&id);
        if let Ok(e) = self.by_conn.find_entry(ch, |&x| x == s) {
            e.remove();
        }
        // Unlink from the account list.
        let key = rec.account_key();
        let ah = self.account_hash(key);
        let pages = &self.pages;
        let head = self
            .by_account
            .find(ah, |&x| {
                pages[x as usize / PAGE][x as usize % PAGE].account_key() == key
            })
            .copied();
        if head == Some(s) {
            if rec.next_in_account == 0 {
                if let Ok(e) = self.by_account.find_entry(ah, |&x| x == s) {
                    e.remove();
                }
            } else if let Some(e) = self.by_account.find_mut(ah, |&x| x == s) {
                *e = rec.next_in_account - 1;
            }
        } else if let Some(mut cur) = head {
            loop {
                let next = self.rec(cur).next_in_account;
                if next == 0 {
                    break;
                }
                if next - 1 == s {
                    self.rec_mut(cur).next_in_account = rec.next_in_account;
                    break;
                }
                cur = next - 1;
            }
        }
        self.wide_masks.remove(&s);
        let free_head = self.free_head;
        let r = self.rec_mut(s);
        *r = Connection::default();
        r.next_in_account = free_head;
        self.free_head = s + 1;
        self.len -= 1;
    }

    /// The pending notify mask of a connection (empty when nothing is pending).
    pub fn pending_mask(&self, slot: Slot) -> &[u8] {
        let r = self.rec(slot.0);
        let n = r.mask_len as usize;
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
        let mut mask = [0u8; 32];
        let old = self.pending_mask(slot);
        let old_len = old.len();
        mask[..old_len].copy_from_slice(old);
        for (m, b) in mask.iter_mut().zip(bits) {
            *m |= b;
        }
        let n = old_len.max(bits.len());
        let r = self.rec_mut(slot.0);
        r.mask_len = n as u8;
        if n <= INLINE_MASK {
            r.pending[..n].copy_from_slice(&mask[..n]);
        } else {
            self.wide_masks.insert(slot.0, mask);
        }
    }

    /// Clears the pending mask of `slot`.
    pub fn clear_pending(&mut self, slot: Slot) {
        let r = self.rec_mut(slot.0);
        let wide = r.mask_len as usize > INLINE_MASK;
        r.mask_len = 0;
        r.pending = [0; INLINE_MASK];
        r.set_tries(0);
        if wide {
            self.wide_masks.remove(&slot.0);
        }
    }
}

#[cfg(test)]
mod tests;
