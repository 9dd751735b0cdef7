//! The node's keys and revocations on disk (docs/PROTOCOL.md §7.11), and
//! noticing when an operator changed them.
//!
//! Files in the data directory, each written whole beside its name and
//! renamed into place (a reader sees the old file or the new one):
//!
//! * `master.key` — the current master key (64 hex digits, mode 0600);
//! * `master.previous.key` — during a rotation's grace period, the key it
//!   replaced;
//! * `rotation.json` — `{"parity": 0|1, "previous_until": unix seconds}`:
//!   which parity the current key has (each rotation flips it) and when the
//!   previous key stops verifying; absent before the first rotation;
//! * `revocations.json` — `{"accounts": {"a": 1}, "devices": {"a": {"phone": 2}}}`:
//!   the revocation generations.
//!
//! `mppd credential revoke` and `mppd key rotate` change these files, offline
//! or under a running node; the node reads them at start and polls them
//! (their modification times) on its control thread, so a revocation or a
//! rotation takes effect on every shard within a few seconds, without a
//! restart, and survives restarts. Nothing here touches a socket or a shard.

use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::packet::MasterKey;
use crate::proto::revocation::Revocations;
use crate::proto::KeySet;
use crate::time::{UnixMillis, UnixSeconds};

use super::data_dir::MASTER_KEY_FILE;

/// The previous master key during a rotation's grace period.
pub const PREVIOUS_KEY_FILE: &str = "master.previous.key";
/// The current key's parity and the end of the grace period.
pub const ROTATION_FILE: &str = "rotation.json";
/// The revocation generations.
pub const REVOCATIONS_FILE: &str = "revocations.json";

/// Why the key or revocation files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file's content is not what it should be.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> KeyringError + '_ {
    move |source| KeyringError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> KeyringError {
    KeyringError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Writes `text` to `path` whole: a temporary file beside it (mode 0600),
/// synced, renamed over it.
fn write_atomically(path: &Path, text: &str) -> Result<(), KeyringError> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(io_error(path))
}

fn read_optional(path: &Path) -> Result<Option<String>, KeyringError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

fn read_key(path: &Path) -> Result<MasterKey, KeyringError> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    MasterKey::from_hex(text.trim()).map_err(|e| invalid(path, e.to_string()))
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    parity: u8,
    previous_until: i64,
}

/// The master keys in `dir`: the current one, its parity, and the previous
/// one while its grace period lasts.
pub fn load_keys(dir: &Path) -> Result<KeySet, KeyringError> {
    let current = read_key(&dir.join(MASTER_KEY_FILE))?;
    let rotation_path = dir.join(ROTATION_FILE);
    let Some(text) = read_optional(&rotation_path)? else {
        return Ok(KeySet {
            current,
            parity: 0,
            previous: None,
        });
    };
    let rotation: Rotation =
        serde_json::from_str(&text).map_err(|e| invalid(&rotation_path, e.to_string()))?;
    if rotation.parity > 1 {
        return Err(invalid(&rotation_path, "parity must be 0 or 1"));
    }
    let previous_path = dir.join(PREVIOUS_KEY_FILE);
    let previous = match read_optional(&previous_path)? {
        None => None,
        Some(text) => {
            let key = MasterKey::from_hex(text.trim())
                .map_err(|e| invalid(&previous_path, e.to_string()))?;
            let until = UnixMillis(rotation.previous_until.max(0) as u64 * 1000);
            Some((key, until))
        }
    };
    Ok(KeySet {
        current,
        parity: rotation.parity,
        previous,
    })
}

/// Rotates the master key in `dir`: a new random key becomes current, the
/// old one becomes the previous key until `now + grace`. Returns the new set.
pub fn rotate(
    dir: &Path,
    now: UnixSeconds,
    grace_secs: u64,
    rng: &mut impl rand::RngCore,
) -> Result<KeySet, KeyringError> {
    let old = load_keys(dir)?;
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    let new = MasterKey::new(bytes);
    let until = UnixSeconds(now.0.saturating_add(grace_secs.min(i64::MAX as u64) as i64));
    let parity = old.parity ^ 1;
    // Order matters for a reader in between: the previous key first, then
    // the rotation record, then the new current key.
    write_atomically(
        &dir.join(PREVIOUS_KEY_FILE),
        &format!("{}\n", old.current.to_hex()),
    )?;
    let rotation = Rotation {
        parity,
        previous_until: until.0,
    };
    let text = serde_json::to_string(&rotation).map_err(|e| invalid(dir, e.to_string()))?;
    write_atomically(&dir.join(ROTATION_FILE), &(text + "\n"))?;
    write_atomically(&dir.join(MASTER_KEY_FILE), &format!("{}\n", new.to_hex()))?;
    load_keys(dir)
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RevocationsFile {
    #[serde(default)]
    accounts: std::collections::BTreeMap<String, u32>,
    #[serde(default)]
    devices: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>>,
}

/// The revocations in `dir` (none when the file does not exist).
pub fn load_revocations(dir: &Path) -> Result<Revocations, KeyringError> {
    let path = dir.join(REVOCATIONS_FILE);
    let mut out = Revocations::new();
    let Some(text) = read_optional(&path)? else {
        return Ok(out);
    };
    let file: RevocationsFile =
        serde_json::from_str(&text).map_err(|e| invalid(&path, e.to_string()))?;
    for (account, g) in &file.accounts {
        out.set(account, None, *g);
    }
    for (account, devices) in &file.devices {
        for (device, g) in devices {
            out.set(account, Some(device), *g);
        }
    }
    Ok(out)
}

/// Writes the revocations to `dir`.
pub fn save_revocations(dir: &Path, revocations: &Revocations) -> Result<(), KeyringError> {
    let mut file = RevocationsFile::default();
    for (account, device, g) in revocations.entries() {
        match device {
            None => {
                file.accounts.insert(account.to_owned(), g);
            }
            Some(d) => {
                file.devices
                    .entry(account.to_owned())
                    .or_default()
                    .insert(d.to_owned(), g);
            }
        }
    }
    let path = dir.join(REVOCATIONS_FILE);
    let text = serde_json::to_string_pretty(&file).map_err(|e| invalid(&path, e.to_string()))?;
    write_atomically(&path, &(text + "\n"))
}

/// Revokes a device's credentials (or, with `device: None`, every
/// credential of the account) in `dir`; the new generation.
pub fn revoke(dir: &Path, account: &str, device: Option<&str>) -> Result<u32, KeyringError> {
    let mut revocations = load_revocations(dir)?;
    let g = match device {
        None => revocations.revoke_account(account),
        Some(d) => revocations.revoke_device(account, d),
    };
    save_revocations(dir, &revocations)?;
    Ok(g)
}

/// Notices changes of the key and revocation files by their modification
/// times (polled: cheap, and works on every file system).
#[derive(Debug, Default)]
pub struct Watch {
    keys: Vec<Option<SystemTime>>,
    revocations: Option<SystemTime>,
}

/// What changed since the last look.
#[derive(Default)]
pub struct Changes {
    /// New master keys, if a key file changed.
    pub keys: Option<KeySet>,
    /// New revocations, if their file changed.
    pub revocations: Option<Revocations>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Watch {
    /// A watch that takes the files as they are now as seen.
    pub fn new(dir: &Path) -> Self {
        Watch {
            keys: Self::key_times(dir),
            revocations: modified(&dir.join(REVOCATIONS_FILE)),
        }
    }

    fn key_times(dir: &Path) -> Vec<Option<SystemTime>> {
        [MASTER_KEY_FILE, PREVIOUS_KEY_FILE, ROTATION_FILE]
            .iter()
            .map(|f| modified(&dir.join(f)))
            .collect()
    }

    /// What changed since the last call; a file that changed but does not
    /// read is an error (and is looked at again next time).
    pub fn poll(&mut self, dir: &Path) -> Result<Changes, KeyringError> {
        let mut changes = Changes::default();
        let keys = Self::key_times(dir);
        if keys != self.keys {
            changes.keys = Some(load_keys(dir)?);
            self.keys = keys;
        }
        let revocations = modified(&dir.join(REVOCATIONS_FILE));
        if revocations != self.revocations {
            changes.revocations = Some(load_revocations(dir)?);
            self.revocations = revocations;
        }
        Ok(changes)
    }
}

/// Whether the revocations file changed after `time` (a saved state older
/// than the last revocation must not bring back connections it revoked).
pub fn revocations_changed_after(dir: &Path, time: UnixMillis) -> bool {
    modified(&dir.join(REVOCATIONS_FILE))
        .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
        .is_some_and(|m| m.as_millis() as u64 >= time.0)
}

/// When a rotation's grace period ends, if one is running at `now`.
pub fn grace_end(keys: &KeySet, now: UnixMillis) -> Option<UnixMillis> {
    keys.previous
        .as_ref()
        .map(|(_, until)| *until)
        .filter(|&u| u > now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "mpp-keyring-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("dir");
        super::super::data_dir::open_data_dir(&p).expect("data dir");
        p
    }

    #[test]
    fn a_rotation_keeps_the_old_key_for_the_grace_period() {
        let d = dir("rotate");
        let first = load_keys(&d).expect("keys");
        assert_eq!(first.parity, 0);
        assert!(first.previous.is_none());
        let now = UnixSeconds(2_000_000_000);
        let second = rotate(&d, now, 3600, &mut rand::thread_rng()).expect("rotated");
        assert_eq!(second.parity, 1);
        assert_ne!(second.current.as_bytes(), first.current.as_bytes());
        let (prev, until) = second.previous.as_ref().expect("previous");
        assert_eq!(prev.as_bytes(), first.current.as_bytes());
        assert_eq!(*until, UnixMillis((now.0 as u64 + 3600) * 1000));
        let third = rotate(&d, now, 60, &mut rand::thread_rng()).expect("rotated");
        assert_eq!(third.parity, 0);
        assert_eq!(
            third.previous.expect("previous").0.as_bytes(),
            second.current.as_bytes()
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    /// README: key files are mode 0600; a rotation writes the new master
    /// key, the previous one and the rotation record, a revocation its
    /// list, each through a new file.
    #[test]
    fn key_files_are_written_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("modes");
        rotate(&d, UnixSeconds(2_000_000_000), 60, &mut rand::thread_rng()).expect("rotated");
        revoke(&d, "a@x", None).expect("revoked");
        for name in [
            MASTER_KEY_FILE,
            PREVIOUS_KEY_FILE,
            ROTATION_FILE,
            REVOCATIONS_FILE,
        ] {
            let meta = std::fs::metadata(d.join(name)).expect(name);
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{name}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn revocations_survive_a_reload_and_are_noticed() {
        let d = dir("revoke");
        let mut watch = Watch::new(&d);
        assert!(watch.poll(&d).expect("poll").revocations.is_none());
        assert_eq!(revoke(&d, "a@x", Some("phone")).expect("revoked"), 1);
        assert_eq!(revoke(&d, "a@x", None).expect("revoked"), 1);
        assert_eq!(revoke(&d, "a@x", Some("phone")).expect("revoked"), 2);
        let seen = watch.poll(&d).expect("poll").revocations.expect("changed");
        assert_eq!(seen.generation("a@x", "phone"), (1 << 32) | 2);
        assert_eq!(load_revocations(&d).expect("load"), seen);
        assert!(
            watch.poll(&d).expect("poll").revocations.is_none(),
            "seen once"
        );
        std::fs::write(d.join(REVOCATIONS_FILE), "{\"acounts\": {}}").expect("write");
        // A typo is an error, not an empty table that would lift every revocation.
        let mut fresh = Watch::default();
        assert!(fresh.poll(&d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
