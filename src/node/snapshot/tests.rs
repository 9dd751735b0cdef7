use super::*;
use crate::proto::ServiceConfig;

const NOW: UnixMillis = UnixMillis(1_795_262_400_000);

/// A directory under the system's temp dir, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "mpp-snapshot-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn master() -> MasterKey {
    MasterKey::new([5; 32])
}

/// A key set of `current` alone.
fn keys(current: &MasterKey) -> crate::proto::KeySet {
    crate::proto::KeySet {
        current: current.clone(),
        parity: 0,
        previous: None,
    }
}

fn account(affinity: u32, serial: u32) -> Account {
    Account {
        affinity,
        low: affinity ^ 0xABCD,
        head: 0,
        serial,
        since: serial - 3,
        catch_up: 0x8000_0005,
        epoch: 7,
        stamp: 9,
    }
}

fn connection(
    id: u8,
    a: &Account,
    endpoint: Option<SocketAddr>,
    pending: &[u8],
) -> SavedConnection {
    let mut conn_id = [id, 2, 3, 4, 0, 0, 0, 0];
    conn_id[4..].copy_from_slice(&a.affinity.to_be_bytes());
    let mut mask = [0u8; MAX_BITMASK];
    mask[..pending.len()].copy_from_slice(pending);
    SavedConnection {
        conn_id: ConnId(conn_id),
        account: AccountKey {
            affinity: a.affinity,
            low: a.low,
        },
        highest_serial: 1000 + u32::from(id),
        window: u64::MAX - u64::from(id),
        last_seen: 11,
        expires: 2_000_000_000,
        endpoint,
        pending: mask,
        pending_len: pending.len() as u8,
        tries: id % 6,
        catch_up: id == 3,
        validated: id.is_multiple_of(2),
        key_parity: u8::from(id == 4),
    }
}

/// A shard holding three accounts and four connections (IPv4, IPv6, one
/// without an endpoint, short and 32-byte pending masks).
fn service() -> (Service, Vec<Account>, Vec<SavedConnection>) {
    let accounts = vec![account(10, 500), account(11, 600), account(12, 700)];
    let wide = [0xFF; 32];
    let connections = vec![
        connection(
            1,
            &accounts[0],
            Some("127.0.0.1:4000".parse().expect("addr")),
            &[0x05],
        ),
        connection(
            2,
            &accounts[0],
            Some("[2001:db8::9]:5".parse().expect("addr")),
            &[],
        ),
        connection(3, &accounts[1], None, &wide),
        connection(
            4,
            &accounts[2],
            Some("10.0.0.1:6".parse().expect("addr")),
            &[1, 2, 3, 4, 5],
        ),
    ];
    let mut s = Service::new(ServiceConfig::default(), master(), [1; 32], NOW);
    let done = s.restore(UnixMillis(NOW.0 - 60_000), &accounts, &connections);
    assert_eq!((done.accounts, done.connections, done.skipped), (3, 4, 0));
    (s, accounts, connections)
}

fn save_one(dir: &Path, service: &Service, id: SaveId, index: usize) {
    save_shard(dir, &master(), id, index, service, NOW).expect("saved");
}

fn load_with(dir: &Path, shards: usize, key: &MasterKey) -> Result<Option<LoadedState>, LoadError> {
    load(
        dir,
        &keys(key),
        shards,
        |a| a as usize % shards,
        NOW,
        86_400,
    )
}

fn sorted_conns(mut v: Vec<SavedConnection>) -> Vec<SavedConnection> {
    v.sort_by_key(|c| c.conn_id.0);
    v
}

#[test]
fn a_saved_shard_reads_back_record_for_record() {
    let dir = Dir::new("roundtrip");
    let (s, accounts, connections) = service();
    assert_eq!(
        load_with(&dir.0, 1, &master())
            .expect("no state")
            .map(|_| ()),
        None
    );
    save_one(
        &dir.0,
        &s,
        SaveId {
            generation: 42,
            count: 1,
        },
        0,
    );
    // Accounts, conn ids and addresses are for the node's user only.
    for entry in std::fs::read_dir(state_dir(&dir.0)).expect("state dir") {
        let meta = entry.expect("entry").metadata().expect("metadata");
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777;
        assert_eq!(mode, 0o600, "state file mode {mode:o}");
    }
    let loaded = load_with(&dir.0, 1, &master())
        .expect("valid")
        .expect("a state");
    assert_eq!(loaded.epoch, s.epoch());
    assert_eq!(loaded.saved, NOW);
    let shard = &loaded.shards[0];
    let mut got = shard.accounts.clone();
    got.sort_by_key(|a| a.affinity);
    assert_eq!(got, accounts);
    assert_eq!(
        sorted_conns(shard.connections.clone()),
        sorted_conns(connections.clone())
    );
    // Restored into a fresh shard, it saves the same again.
    let mut again = Service::new(ServiceConfig::default(), master(), [2; 32], NOW);
    again.restore(loaded.epoch, &shard.accounts, &shard.connections);
    assert_eq!(
        sorted_conns(again.saved_connections().map(|(_, c)| c).collect()),
        sorted_conns(connections)
    );
}

#[test]
fn records_go_to_their_owner_under_a_new_shard_count() {
    let dir = Dir::new("split");
    let (s, _, connections) = service();
    save_one(
        &dir.0,
        &s,
        SaveId {
            generation: 1,
            count: 1,
        },
        0,
    );
    let loaded = load_with(&dir.0, 3, &master())
        .expect("valid")
        .expect("a state");
    assert_eq!(loaded.shards.len(), 3);
    for (i, shard) in loaded.shards.iter().enumerate() {
        assert!(shard.accounts.iter().all(|a| a.affinity as usize % 3 == i));
        assert!(shard
            .connections
            .iter()
            .all(|c| c.account.affinity as usize % 3 == i));
    }
    let total: usize = loaded.shards.iter().map(|s| s.connections.len()).sum();
    assert_eq!(total, connections.len());
}

#[test]
fn files_of_two_shards_load_together_and_one_missing_is_refused() {
    let dir = Dir::new("two");
    let (s, _, _) = service();
    let id = SaveId {
        generation: 7,
        count: 2,
    };
    save_one(&dir.0, &s, id, 0);
    let err = load_with(&dir.0, 1, &master()).expect_err("shard 1 missing");
    assert!(matches!(err, LoadError::Incomplete(_)), "{err}");
    assert!(err.to_string().contains("shard 1 of 2 is missing"), "{err}");
    let empty = Service::new(ServiceConfig::default(), master(), [3; 32], NOW);
    save_one(
        &dir.0,
        &empty,
        SaveId {
            generation: 8,
            count: 2,
        },
        1,
    );
    let err = load_with(&dir.0, 1, &master()).expect_err("two saves mixed");
    assert!(err.to_string().contains("different saves"), "{err}");
    save_one(&dir.0, &empty, id, 1);
    assert!(load_with(&dir.0, 1, &master()).expect("valid").is_some());
}

/// Saves one shard and returns its file's path.
fn saved_file(dir: &Path) -> PathBuf {
    let (s, _, _) = service();
    save_one(
        dir,
        &s,
        SaveId {
            generation: 3,
            count: 1,
        },
        0,
    );
    shard_file(&state_dir(dir), 0)
}

#[test]
fn a_truncated_file_is_refused() {
    let dir = Dir::new("truncated");
    let path = saved_file(&dir.0);
    let bytes = fs::read(&path).expect("read");
    for cut in [0, 10, HEADER_LEN, bytes.len() / 2, bytes.len() - 1] {
        fs::write(&path, &bytes[..cut]).expect("write");
        let err = load_with(&dir.0, 1, &master()).expect_err("truncated");
        assert!(
            matches!(err, LoadError::Truncated(_) | LoadError::Tampered(_)),
            "cut at {cut}: {err}"
        );
    }
    fs::write(&path, &bytes[..HEADER_LEN + 10]).expect("write");
    assert!(matches!(
        load_with(&dir.0, 1, &master()),
        Err(LoadError::Truncated(_))
    ));
}

#[test]
fn any_changed_bit_is_refused() {
    let dir = Dir::new("tampered");
    let path = saved_file(&dir.0);
    let bytes = fs::read(&path).expect("read");
    // Every byte after the version, one at a time (the header's counts
    // may make it look truncated first, which is refused too).
    for i in 12..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x10;
        fs::write(&path, &b).expect("write");
        let err = load_with(&dir.0, 1, &master()).expect_err("tampered");
        assert!(
            matches!(err, LoadError::Tampered(_) | LoadError::Truncated(_)),
            "byte {i}: {err}"
        );
    }
}

#[test]
fn another_master_key_another_version_or_not_a_state_file_is_refused() {
    let dir = Dir::new("key");
    let path = saved_file(&dir.0);
    let err = load_with(&dir.0, 1, &MasterKey::new([6; 32])).expect_err("other key");
    assert!(matches!(err, LoadError::Tampered(_)), "{err}");
    let mut b = fs::read(&path).expect("read");
    b[8] = 2;
    fs::write(&path, &b).expect("write");
    let err = load_with(&dir.0, 1, &master()).expect_err("version 2");
    assert!(matches!(err, LoadError::Version { found: 2, .. }), "{err}");
    fs::write(&path, b"{\"json\": true}").expect("write");
    let err = load_with(&dir.0, 1, &master()).expect_err("not ours");
    assert!(matches!(err, LoadError::NotState(_)), "{err}");
}

#[test]
fn a_save_older_than_the_catch_up_window_is_stale() {
    let dir = Dir::new("stale");
    saved_file(&dir.0);
    let later = UnixMillis(NOW.0 + 3_601_000);
    let err = load(&dir.0, &keys(&master()), 1, |_| 0, later, 3_600).expect_err("stale");
    assert!(
        matches!(err, LoadError::Stale { age_secs: 3601, .. }),
        "{err}"
    );
    assert!(load(&dir.0, &keys(&master()), 1, |_| 0, later, 7_200).is_ok());
}

#[test]
fn discard_and_set_aside_leave_no_state_behind() {
    let dir = Dir::new("discard");
    saved_file(&dir.0);
    set_aside(&dir.0).expect("moved");
    assert!(dir.0.join("state.rejected").join("shard-0.bin").exists());
    assert_eq!(
        load_with(&dir.0, 1, &master()).expect("none").map(|_| ()),
        None
    );
    saved_file(&dir.0);
    discard(&dir.0).expect("removed");
    assert!(!state_dir(&dir.0).exists());
    discard(&dir.0).expect("twice is fine");
}

#[test]
fn a_state_saved_before_a_key_rotation_reads_with_the_previous_key() {
    let dir = Dir::new("rotated");
    saved_file(&dir.0);
    let rotated = crate::proto::KeySet {
        current: MasterKey::new([6; 32]),
        parity: 1,
        previous: Some((master(), UnixMillis(NOW.0 + 3_600_000))),
    };
    assert!(load(&dir.0, &rotated, 1, |_| 0, NOW, 86_400)
        .expect("verifies")
        .is_some());
}
