//! The node's data directory: the master key and the admin token, created on
//! first start with mode 0600 inside a 0700 directory.
//!
//! Everything secret the node keeps on disk lives here, so it is the one
//! place that creates, reads and checks those files; nothing here knows
//! about sockets or threads.

use std::io;
use std::path::{Path, PathBuf};

use crate::packet::MasterKey;

/// File holding the master key (64 hex digits) in the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// File holding the admin bearer token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The keys a node keeps on disk.
pub struct DataDir {
    /// The master key all credentials and packet keys derive from.
    pub master: [u8; 32],
    /// The bearer token for control-plane writes.
    pub admin_token: String,
}

/// Shortest admin token accepted, in characters.
const MIN_ADMIN_TOKEN: usize = 16;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory did not exist and could not be created.
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A key file could not be created or written.
    #[error("cannot create {path}: {source}")]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A key file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `master.key` does not hold 64 hex digits.
    #[error("{path}: {message}")]
    BadMasterKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// `admin.token` is too short to be a secret.
    #[error("{path}: the admin token must be at least {MIN_ADMIN_TOKEN} characters")]
    ShortToken {
        /// The file.
        path: PathBuf,
    },
    /// Only reading was asked for, and there is no master key yet.
    #[error("no master key in {dir} (start mppd once with --data-dir {dir} to create it)")]
    NoMasterKey {
        /// The directory.
        dir: PathBuf,
    },
}

/// Opens the data directory, creating it, a random master key and a random
/// admin token (mode 0600) on first use.
pub fn open_data_dir(dir: &Path) -> Result<DataDir, DataDirError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| DataDirError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let read_or_create = |name: &str| -> Result<String, DataDirError> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
                let text = hex::encode(bytes);
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .and_then(|mut f| io::Write::write_all(&mut f, format!("{text}\n").as_bytes()));
                created.map_err(|source| DataDirError::CreateFile { path, source })?;
                Ok(text)
            }
            Err(source) => Err(DataDirError::Read { path, source }),
        }
    };
    let master = MasterKey::from_hex(&read_or_create(MASTER_KEY_FILE)?)
        .map(|key| *key.as_bytes())
        .map_err(|e| DataDirError::BadMasterKey {
            path: dir.join(MASTER_KEY_FILE),
            message: e.to_string(),
        })?;
    let admin_token = read_or_create(ADMIN_TOKEN_FILE)?;
    if admin_token.len() < MIN_ADMIN_TOKEN {
        return Err(DataDirError::ShortToken {
            path: dir.join(ADMIN_TOKEN_FILE),
        });
    }
    Ok(DataDir {
        master,
        admin_token,
    })
}

/// Opens an existing data directory for reading (offline tools such as
/// `mppd credential issue`): refuses to create a master key.
pub fn open_existing_data_dir(dir: &Path) -> Result<DataDir, DataDirError> {
    if !dir.join(MASTER_KEY_FILE).exists() {
        return Err(DataDirError::NoMasterKey {
            dir: dir.to_path_buf(),
        });
    }
    open_data_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    /// README: the master key and the admin token are created mode 0600
    /// in a 0700 directory, whatever the umask lets through (the usual
    /// 022 would leave them readable by everyone).
    #[test]
    fn key_files_are_created_with_mode_0600() {
        let parent = std::env::temp_dir().join(format!(
            "mpp-data-dir-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let dir = parent.join("data");
        let first = open_data_dir(&dir).expect("created");
        assert_eq!(mode(&dir), 0o700, "the directory");
        for name in [MASTER_KEY_FILE, ADMIN_TOKEN_FILE] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        // Read back, not created again.
        let again = open_data_dir(&dir).expect("read");
        assert_eq!(again.master, first.master);
        assert_eq!(again.admin_token, first.admin_token);
        let _ = std::fs::remove_dir_all(&parent);
    }
}
