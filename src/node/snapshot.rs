//! The node's saved state (docs/PROTOCOL.md §6, "Restarts"): what a graceful
//! stop writes to the data directory and the next start reads back, so
//! devices keep their connections across `systemctl restart`.
//!
//! Each shard writes its own file, `state/shard-<i>.bin`, in parallel, when
//! it stops: its account records (Serials and catch-up state) and its
//! connections (endpoints, replay windows, pending bits, retransmission
//! count). A file is versioned, names the save it belongs to (a random
//! generation, the shard's index, the shard count) and ends with an
//! HMAC-SHA256 under `KDF(master, "stat", 0⁸)`, so a file from another save,
//! another master key, or with one bit changed is refused.
//!
//! Loading is all or nothing: every file of one generation must be present
//! and verify, and the save must be younger than the catch-up window;
//! anything else is one log line and an empty start (devices then get 404,
//! connect again and catch up), never a crash. Records are handed to the
//! shard that owns them under the *new* shard count. The files are removed
//! once read, so a later crash cannot bring back a stale state; a rejected
//! set is moved to `state.rejected/` for inspection.
//!
//! This module knows the file format and nothing of sockets or threads.

use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::packet::{ConnId, MasterKey};
use crate::proto::{SavedConnection, Service, MAX_BITMASK};
use crate::table::{Account, AccountKey, AccountSlot};
use crate::time::UnixMillis;

/// First bytes of a state file.
const MAGIC: &[u8; 8] = b"MPPSTATE";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Fixed header: magic, version, generation, index, count, saved, epoch,
/// accounts, connections.
const HEADER_LEN: usize = 8 + 4 + 8 + 4 + 4 + 8 + 8 + 8 + 8;
/// Bytes of one saved account.
const ACCOUNT_LEN: usize = 7 * 4;
/// Bytes of one saved IPv4 connection without pending bits (the least a
/// connection takes: the bound on how many a file of a given size can hold).
const MIN_CONNECTION_LEN: usize = 8 + 8 + 4 + 4 + 4 + 4 + 2 + 1 + 1;
/// The HMAC at the end.
const TAG_LEN: usize = 32;

/// Flag bits of a saved connection.
const FLAG_IPV6: u8 = 1;
const FLAG_ENDPOINT: u8 = 2;
const FLAG_VALIDATED: u8 = 4;
const FLAG_KEY_PARITY: u8 = 0x80;
const FLAG_CATCH_UP: u8 = 8;
const TRIES_SHIFT: u8 = 4;

/// The directory, inside the data directory, that holds the state files.
pub fn state_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("state")
}

fn shard_file(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index}.bin"))
}

/// Identifies one save: every shard's file of it carries the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveId {
    /// Random, chosen when the node starts.
    pub generation: u64,
    /// The number of shard files in the save.
    pub count: u32,
}

type StateMac = Hmac<Sha256>;

fn mac(master: &MasterKey) -> StateMac {
    // HMAC pads a short key with zeros to its block: the same MAC as keying
    // it with the 32 bytes, without a fallible constructor.
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(&master.state_key());
    <StateMac as KeyInit>::new(&block.into())
}

/// A writer that feeds the HMAC with every byte it writes, a MiB at a
/// time (one HMAC update per record cost more than the hashing).
struct Signed<W: Write> {
    out: W,
    mac: StateMac,
    buf: Vec<u8>,
}

impl<W: Write> Signed<W> {
    const CHUNK: usize = 1 << 20;

    fn new(out: W, mac: StateMac) -> Self {
        Signed {
            out,
            mac,
            buf: Vec::with_capacity(Self::CHUNK + 256),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= Self::CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.mac.update(&self.buf);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is buffered and the tag; returns the writer.
    fn finish(mut self) -> io::Result<W> {
        self.flush()?;
        let tag = self.mac.finalize().into_bytes();
        self.out.write_all(&tag)?;
        Ok(self.out)
    }
}

/// Writes `service`'s state as shard `index` of save `id`, to a temporary
/// file renamed into place once complete (a crash mid-save leaves no
/// half-written file under the real name). Returns the bytes written.
pub fn save_shard(
    data_dir: &Path,
    master: &MasterKey,
    id: SaveId,
    index: usize,
    service: &Service,
    now: UnixMillis,
) -> io::Result<u64> {
    let dir = state_dir(data_dir);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let path = shard_file(&dir, index);
    let tmp = path.with_extension("tmp");
    let accounts: Vec<(AccountSlot, Account)> = service.saved_accounts().collect();
    let count = service.table().len();
    // Accounts, conn ids and addresses: for the node's user only.
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let mut w = Signed::new(file, mac(master));
    w.put(MAGIC)?;
    w.put(&VERSION.to_le_bytes())?;
    w.put(&id.generation.to_le_bytes())?;
    w.put(&(index as u32).to_le_bytes())?;
    w.put(&id.count.to_le_bytes())?;
    w.put(&now.0.to_le_bytes())?;
    w.put(&service.epoch().0.to_le_bytes())?;
    w.put(&(accounts.len() as u64).to_le_bytes())?;
    w.put(&(count as u64).to_le_bytes())?;
    // A connection names its account by its index in the file, looked up
    // by the account's slot in the table (no hashing per connection).
    let mut index_of = vec![u32::MAX; accounts.last().map_or(0, |(s, _)| s.0 as usize + 1)];
    for (i, (slot, a)) in accounts.iter().enumerate() {
        index_of[slot.0 as usize] = i as u32;
        let mut rec = [0u8; ACCOUNT_LEN];
        for (chunk, v) in rec.chunks_exact_mut(4).zip([
            a.affinity, a.low, a.serial, a.since, a.catch_up, a.epoch, a.stamp,
        ]) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        w.put(&rec)?;
    }
    let mut written = 0usize;
    let mut buf = Vec::with_capacity(MIN_CONNECTION_LEN + 16 + MAX_BITMASK);
    for (slot, c) in service.saved_connections() {
        let account = index_of.get(slot.0 as usize).copied().unwrap_or(u32::MAX);
        if account == u32::MAX {
            continue;
        }
        buf.clear();
        encode_connection(&c, account, &mut buf);
        w.put(&buf)?;
        written += 1;
    }
    if written != count {
        return Err(io::Error::other(format!(
            "{count} connections held but {written} saved"
        )));
    }
    let file = w.finish()?;
    file.sync_all()?;
    let bytes = file.metadata()?.len();
    drop(file);
    fs::rename(&tmp, &path)?;
    Ok(bytes)
}

fn encode_connection(c: &SavedConnection, account: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&c.conn_id.0);
    out.extend_from_slice(&c.window.to_le_bytes());
    out.extend_from_slice(&c.highest_serial.to_le_bytes());
    out.extend_from_slice(&c.last_seen.to_le_bytes());
    out.extend_from_slice(&c.expires.to_le_bytes());
    out.extend_from_slice(&account.to_le_bytes());
    let mut flags = (c.tries.min(7)) << TRIES_SHIFT;
    if c.catch_up {
        flags |= FLAG_CATCH_UP;
    }
    if c.validated {
        flags |= FLAG_VALIDATED;
    }
    if c.key_parity & 1 == 1 {
        flags |= FLAG_KEY_PARITY;
    }
    let (port, addr): (u16, Vec<u8>) = match c.endpoint {
        None => (0, Vec::new()),
        Some(a) => {
            flags |= FLAG_ENDPOINT;
            match a.ip() {
                IpAddr::V4(v4) => (a.port(), v4.octets().to_vec()),
                IpAddr::V6(v6) => {
                    flags |= FLAG_IPV6;
                    (a.port(), v6.octets().to_vec())
                }
            }
        }
    };
    out.extend_from_slice(&port.to_le_bytes());
    out.push(flags);
    let n = usize::from(c.pending_len).min(MAX_BITMASK);
    out.push(n as u8);
    out.extend_from_slice(&addr);
    out.extend_from_slice(&c.pending[..n]);
}

/// The state one shard of the new node takes back.
#[derive(Debug, Default)]
pub struct ShardState {
    /// Account records, times relative to `epoch`.
    pub accounts: Vec<Account>,
    /// Connections, times relative to `epoch`.
    pub connections: Vec<SavedConnection>,
    /// For each connection, the index of its account in `accounts` (so
    /// that a restore need not look 10M account keys up).
    pub account_of: Vec<u32>,
}

/// A saved state, read and verified, split by the new shard count.
#[derive(Debug)]
pub struct LoadedState {
    /// The time every record's relative times count from.
    pub epoch: UnixMillis,
    /// One entry per new shard.
    pub shards: Vec<ShardState>,
    /// When it was saved.
    pub saved: UnixMillis,
    /// Bytes read.
    pub bytes: u64,
}

/// Why a saved state was not used. Each is reported in one log line, and
/// the node starts empty.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file is shorter than its header and tag, or its counts run past its end.
    #[error("{0}: truncated")]
    Truncated(PathBuf),
    /// A file does not start with the state magic.
    #[error("{0}: not a state file")]
    NotState(PathBuf),
    /// A file was written by another format version.
    #[error("{path}: format version {found}, this node reads {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The HMAC does not verify: changed, or made under another master key.
    #[error("{0}: authentication failed (tampered, or saved under another master key)")]
    Tampered(PathBuf),
    /// The files do not form one complete save.
    #[error("incomplete save: {0}")]
    Incomplete(String),
    /// A record inside a verified file is inconsistent.
    #[error("{path}: bad record: {what}")]
    BadRecord {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: &'static str,
    },
    /// The save is older than the catch-up window: what it holds is no
    /// longer worth more than a resync.
    #[error("saved {age_secs} s ago, longer than the catch-up window ({window_secs} s)")]
    Stale {
        /// Its age.
        age_secs: u64,
        /// The window.
        window_secs: u32,
    },
}

/// One verified file, decoded.
struct ShardFile {
    id: SaveId,
    index: u32,
    saved: UnixMillis,
    epoch: UnixMillis,
    accounts: Vec<Account>,
    connections: Vec<SavedConnection>,
    /// Each connection's account: its index in `accounts`.
    account_of: Vec<u32>,
}

/// A bounds-checked little-endian reader over a verified file's body.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
}

/// Verifies and decodes one file's bytes.
fn decode_file(path: &Path, bytes: &[u8], master: &MasterKey) -> Result<ShardFile, LoadError> {
    let truncated = || LoadError::Truncated(path.to_path_buf());
    if bytes.len() < HEADER_LEN + TAG_LEN {
        return Err(if bytes.starts_with(MAGIC) || bytes.is_empty() {
            truncated()
        } else {
            LoadError::NotState(path.to_path_buf())
        });
    }
    if &bytes[..8] != MAGIC {
        return Err(LoadError::NotState(path.to_path_buf()));
    }
    let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    // The header is read before the HMAC is checked only to name what is
    // wrong (another version, a file cut short); nothing else trusts it
    // until the HMAC verifies.
    let mut c = Cursor {
        bytes: body,
        pos: 8,
    };
    let version = c.u32().ok_or_else(truncated)?;
    if version != VERSION {
        return Err(LoadError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let generation = c.u64().ok_or_else(truncated)?;
    let index = c.u32().ok_or_else(truncated)?;
    let count = c.u32().ok_or_else(truncated)?;
    let saved = UnixMillis(c.u64().ok_or_else(truncated)?);
    let epoch = UnixMillis(c.u64().ok_or_else(truncated)?);
    let n_accounts = c.u64().ok_or_else(truncated)?;
    let n_connections = c.u64().ok_or_else(truncated)?;
    let room = (body.len() - HEADER_LEN) as u64;
    let needed = n_accounts
        .checked_mul(ACCOUNT_LEN as u64)
        .and_then(|a| {
            n_connections
                .checked_mul(MIN_CONNECTION_LEN as u64)
                .and_then(|b| a.checked_add(b))
        })
        .ok_or_else(truncated)?;
    if needed > room {
        return Err(truncated());
    }
    // The HMAC is checked on another thread while this one parses (half
    // the time of a large file); the parse is bounds-checked and its sizes
    // bounded by the file's, and nothing parsed is used unless the HMAC
    // verifies.
    let (parsed, authentic) = std::thread::scope(|scope| {
        let check = scope.spawn(|| {
            let mut m = mac(master);
            m.update(body);
            m.verify_slice(tag).is_ok()
        });
        let parsed = parse_records(path, c, body.len(), n_accounts, n_connections);
        // A thread that cannot run (or panicked) verifies nothing.
        (parsed, check.join().unwrap_or(false))
    });
    if !authentic {
        return Err(LoadError::Tampered(path.to_path_buf()));
    }
    let (accounts, connections, account_of) = parsed?;
    Ok(ShardFile {
        id: SaveId { generation, count },
        index,
        saved,
        epoch,
        accounts,
        connections,
        account_of,
    })
}

/// The records of a shard file, after its header.
type Records = (Vec<Account>, Vec<SavedConnection>, Vec<u32>);

fn parse_records(
    path: &Path,
    mut c: Cursor<'_>,
    body_len: usize,
    n_accounts: u64,
    n_connections: u64,
) -> Result<Records, LoadError> {
    let truncated = || LoadError::Truncated(path.to_path_buf());
    let bad = |what| LoadError::BadRecord {
        path: path.to_path_buf(),
        what,
    };
    let mut accounts = Vec::with_capacity(n_accounts as usize);
    for _ in 0..n_accounts {
        let mut v = [0u32; 7];
        for x in &mut v {
            *x = c.u32().ok_or_else(truncated)?;
        }
        let [affinity, low, serial, since, catch_up, epoch, stamp] = v;
        if serial == 0 {
            return Err(bad("an account with Serial 0"));
        }
        accounts.push(Account {
            affinity,
            low,
            head: 0,
            serial,
            since,
            catch_up,
            epoch,
            stamp,
        });
    }
    let mut connections = Vec::with_capacity(n_connections as usize);
    let mut account_of = Vec::with_capacity(n_connections as usize);
    for _ in 0..n_connections {
        let conn_id: [u8; 8] = c
            .take(8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(truncated)?;
        let window = c.u64().ok_or_else(truncated)?;
        let highest_serial = c.u32().ok_or_else(truncated)?;
        let last_seen = c.u32().ok_or_else(truncated)?;
        let expires = c.u32().ok_or_else(truncated)?;
        let account = c.u32().ok_or_else(truncated)?;
        let port = c.u16().ok_or_else(truncated)?;
        let flags = c.u8().ok_or_else(truncated)?;
        let pending_len = c.u8().ok_or_else(truncated)?;
        if usize::from(pending_len) > MAX_BITMASK {
            return Err(bad("a pending mask longer than 32 bytes"));
        }
        let endpoint = if flags & FLAG_ENDPOINT == 0 {
            None
        } else if flags & FLAG_IPV6 != 0 {
            let b: [u8; 16] = c
                .take(16)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(truncated)?;
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port))
        } else {
            let b: [u8; 4] = c
                .take(4)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(truncated)?;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(b)), port))
        };
        let mut pending = [0u8; MAX_BITMASK];
        let mask = c.take(usize::from(pending_len)).ok_or_else(truncated)?;
        pending[..mask.len()].copy_from_slice(mask);
        let Some(a) = accounts.get(account as usize) else {
            return Err(bad("a connection of an account not in the file"));
        };
        account_of.push(account);
        connections.push(SavedConnection {
            conn_id: ConnId(conn_id),
            account: AccountKey {
                affinity: a.affinity,
                low: a.low,
            },
            highest_serial,
            window,
            last_seen,
            expires,
            endpoint,
            pending,
            pending_len,
            tries: (flags >> TRIES_SHIFT) & 0x7,
            catch_up: flags & FLAG_CATCH_UP != 0,
            validated: flags & FLAG_VALIDATED != 0,
            key_parity: u8::from(flags & FLAG_KEY_PARITY != 0),
        });
    }
    if c.pos != body_len {
        return Err(bad("bytes after the last record"));
    }
    Ok((accounts, connections, account_of))
}

/// Not API: one state file decoded by [`decode_state`], for tests and
/// fuzzing (`fuzz/`, `tests/fuzz_regressions.rs`, `tests/fuzz_properties.rs`).
#[doc(hidden)]
#[derive(Debug)]
pub struct DecodedState {
    /// The save the file belongs to (generation, shard count).
    pub id: SaveId,
    /// The shard that wrote it.
    pub index: u32,
    /// When it was saved.
    pub saved: UnixMillis,
    /// The time its records' relative times count from.
    pub epoch: UnixMillis,
    /// Its account records, in file order.
    pub accounts: Vec<Account>,
    /// Its connections, in file order.
    pub connections: Vec<SavedConnection>,
}

/// Not API: verifies and decodes one state file's bytes exactly as [`load`]
/// does for each file it reads (the same private decoder), for tests and
/// fuzzing. Errors name the file `<bytes>`.
#[doc(hidden)]
pub fn decode_state(bytes: &[u8], master: &MasterKey) -> Result<DecodedState, LoadError> {
    let f = decode_file(Path::new("<bytes>"), bytes, master)?;
    Ok(DecodedState {
        id: f.id,
        index: f.index,
        saved: f.saved,
        epoch: f.epoch,
        accounts: f.accounts,
        connections: f.connections,
    })
}

/// Not API: `body` followed by the HMAC-SHA256 a state file ends with, under
/// `master`'s state key: a file whose MAC verifies whatever `body` holds, so
/// that tests and fuzzers reach the decoder behind the MAC check.
#[doc(hidden)]
pub fn sign_state(body: &[u8], master: &MasterKey) -> Vec<u8> {
    let mut m = mac(master);
    m.update(body);
    let mut out = Vec::with_capacity(body.len() + TAG_LEN);
    out.extend_from_slice(body);
    out.extend_from_slice(&m.finalize().into_bytes());
    out
}

/// Reads the saved state, if any: `Ok(None)` when there is none. The
/// records are split among `shards` new shards by `owner(affinity)`.
pub fn load(
    data_dir: &Path,
    keys: &crate::proto::KeySet,
    shards: usize,
    owner: impl Fn(u32) -> usize,
    now: UnixMillis,
    window_secs: u32,
) -> Result<Option<LoadedState>, LoadError> {
    let dir = state_dir(data_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(LoadError::Read { path: dir, source }),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shard-") && n.ends_with(".bin"))
        })
        .collect();
    if paths.is_empty() {
        return Ok(None);
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    let mut bytes = 0u64;
    for path in &paths {
        let data = fs::read(path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        bytes += data.len() as u64;
        // Saved under the current key, or under the previous one when the
        // key was rotated while the node was stopped.
        let decoded = match decode_file(path, &data, &keys.current) {
            Err(LoadError::Tampered(p)) => match &keys.previous {
                Some((previous, _)) => decode_file(path, &data, previous),
                None => Err(LoadError::Tampered(p)),
            },
            other => other,
        };
        files.push(decoded?);
    }
    let id = files[0].id;
    if files.iter().any(|f| f.id != id) {
        return Err(LoadError::Incomplete(
            "files of different saves (generation or shard count differ)".into(),
        ));
    }
    let mut seen = vec![false; id.count as usize];
    for f in &files {
        match seen.get_mut(f.index as usize) {
            Some(s) if !*s => *s = true,
            _ => {
                return Err(LoadError::Incomplete(format!(
                    "shard {} of {} twice or out of range",
                    f.index, id.count
                )))
            }
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(LoadError::Incomplete(format!(
            "shard {missing} of {} is missing",
            id.count
        )));
    }
    let saved = files.iter().map(|f| f.saved).max().unwrap_or(now);
    let age_secs = now.millis_since(saved) / 1000;
    if age_secs > u64::from(window_secs) {
        return Err(LoadError::Stale {
            age_secs,
            window_secs,
        });
    }
    // Every record's times become relative to the earliest epoch.
    let epoch = files.iter().map(|f| f.epoch).min().unwrap_or(now);
    let mut out: Vec<ShardState> = (0..shards.max(1)).map(|_| ShardState::default()).collect();
    // Room for an even share and an eighth more: records are not copied
    // twice over while the vectors grow (10M connections are a GB).
    let n = out.len();
    let share = |total: usize| (total / n).saturating_add(total / n / 8);
    let total_accounts = files.iter().map(|f| f.accounts.len()).sum();
    let total_connections = files.iter().map(|f| f.connections.len()).sum();
    if n > 1 {
        for o in &mut out {
            o.accounts.reserve(share(total_accounts));
            o.connections.reserve(share(total_connections));
            o.account_of.reserve(share(total_connections));
        }
    }
    for mut f in files {
        let shift = (f.epoch.millis_since(epoch) / 1000).min(u64::from(u32::MAX)) as u32;
        for a in &mut f.accounts {
            a.epoch = a.epoch.saturating_add(shift);
            a.stamp = a.stamp.saturating_add(shift);
        }
        for c in &mut f.connections {
            c.last_seen = c.last_seen.saturating_add(shift);
        }
        if n == 1 && out[0].accounts.is_empty() {
            // One shard takes everything: the file's vectors move whole.
            out[0] = ShardState {
                accounts: f.accounts,
                connections: f.connections,
                account_of: f.account_of,
            };
            continue;
        }
        // Each account's index in the shard it goes to.
        let mut moved = Vec::with_capacity(f.accounts.len());
        for a in f.accounts {
            let i = owner(a.affinity).min(n - 1);
            moved.push(out[i].accounts.len() as u32);
            out[i].accounts.push(a);
        }
        for (c, a) in f.connections.into_iter().zip(f.account_of) {
            let i = owner(c.account.affinity).min(n - 1);
            out[i].account_of.push(moved[a as usize]);
            out[i].connections.push(c);
        }
    }
    Ok(Some(LoadedState {
        epoch,
        shards: out,
        saved,
        bytes,
    }))
}

/// Removes the state files once read (so a later crash cannot restore them).
pub fn discard(data_dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(state_dir(data_dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves a rejected state aside, to `state.rejected/`, replacing an older one.
pub fn set_aside(data_dir: &Path) -> io::Result<()> {
    let aside = data_dir.join("state.rejected");
    let _ = fs::remove_dir_all(&aside);
    fs::rename(state_dir(data_dir), aside)
}

#[cfg(test)]
mod tests;
