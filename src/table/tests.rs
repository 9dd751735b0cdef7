use super::*;
use std::net::SocketAddr;

fn record(id: u8, account: &str) -> Connection {
    let key = AccountKey::of(account);
    let mut conn_id = [id, 1, 2, 3, 0, 0, 0, 0];
    conn_id[4..].copy_from_slice(&key.affinity.to_be_bytes());
    Connection {
        conn_id,
        ..Connection::default()
    }
}

/// The account's record, created on first use.
fn account(t: &mut Table, name: &str) -> AccountSlot {
    let key = AccountKey::of(name);
    match t.find_account(key) {
        Some(a) => a,
        None => t
            .insert_account(Account::new(key.affinity, key.low, 100, 0))
            .expect("room"),
    }
}

fn insert(t: &mut Table, id: u8, name: &str) -> Result<Slot, TableFull> {
    let a = account(t, name);
    let s = t.insert(record(id, name), a)?;
    t.set_endpoint(s, SocketAddr::from(([127, 0, 0, 1], 4000 + u16::from(id))));
    Ok(s)
}

/// An account's connections in list order (newest first).
fn account_chain(t: &Table, account: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let mut cur = t.account_head(AccountKey::of(account));
    while let Some(s) = cur {
        out.push(s.0);
        cur = t.next_in_account(s);
    }
    out
}

/// An account's connections, sorted by slot.
fn account_slots(t: &Table, account: &str) -> Vec<u32> {
    let mut out = account_chain(t, account);
    out.sort();
    out
}

#[test]
fn connection_record_is_48_bytes() {
    assert_eq!(std::mem::size_of::<Connection>(), 48);
    assert_eq!(std::mem::align_of::<Connection>(), 4);
}

#[test]
fn insert_find_remove_and_account_lists() {
    let mut t = Table::new(10);
    let a = insert(&mut t, 1, "alice").expect("room");
    let b = insert(&mut t, 2, "alice").expect("room");
    let c = insert(&mut t, 3, "bob").expect("room");
    assert_eq!(t.len(), 3);
    assert_eq!(t.accounts_len(), 2);
    assert_eq!(t.find(&ConnId(record(2, "alice").conn_id)), Some(b));
    assert_eq!(t.account_of(a), t.account_of(b));
    assert_ne!(t.account_of(a), t.account_of(c));
    assert_eq!(account_slots(&t, "alice"), vec![a.0, b.0]);
    assert_eq!(account_slots(&t, "bob"), vec![c.0]);
    assert_eq!(account_slots(&t, "carol"), Vec::<u32>::new());

    t.remove(b, 7); // the head (inserted last)
    assert_eq!(account_slots(&t, "alice"), vec![a.0]);
    assert_eq!(t.find(&ConnId(record(2, "alice").conn_id)), None);
    let d = insert(&mut t, 4, "alice").expect("room");
    assert_eq!(d, b, "freed slot is reused");
    t.remove(a, 8); // not the head
    assert_eq!(account_slots(&t, "alice"), vec![d.0]);
    t.remove(d, 9);
    assert_eq!(t.account_head(AccountKey::of("alice")), None);
    t.remove(d, 9); // twice is harmless
    assert_eq!(t.len(), 1);
    // The account outlives its devices, stamped with the last removal.
    let alice = t.find_account(AccountKey::of("alice")).expect("kept");
    assert_eq!(t.account(alice).expect("live").stamp, 9);
    t.remove_account(alice);
    assert_eq!(t.find_account(AccountKey::of("alice")), None);
    assert_eq!(t.accounts_len(), 1);
    // An account with a device is not removed.
    let bob = t.find_account(AccountKey::of("bob")).expect("held");
    t.remove_account(bob);
    assert_eq!(t.find_account(AccountKey::of("bob")), Some(bob));
    // A freed account slot is reused.
    assert_eq!(account(&mut t, "carol"), alice);
}

#[test]
fn limits_are_enforced() {
    let mut t = Table::new(2);
    insert(&mut t, 1, "a").expect("room");
    insert(&mut t, 2, "a").expect("room");
    assert_eq!(insert(&mut t, 3, "a"), Err(TableFull));
    for i in 0..2 {
        t.insert_account(Account::new(i, 0, 1, 0)).expect("room");
    }
    assert_eq!(t.accounts_len(), 3);
    assert_eq!(
        t.insert_account(Account::new(9, 0, 1, 0)),
        Ok(AccountSlot(3))
    );
    assert_eq!(
        t.insert_account(Account::new(10, 0, 1, 0)),
        Err(TableFull),
        "twice the connection limit"
    );
}

#[test]
fn pending_masks_inline_and_wide() {
    let mut t = Table::new(10);
    let a = insert(&mut t, 1, "alice").expect("room");
    assert!(t.pending_mask(a).is_empty());
    t.or_pending(a, &[0x01]);
    t.or_pending(a, &[0x04, 0x80]);
    assert_eq!(t.pending_mask(a), &[0x05, 0x80]);
    let mut wide = [0u8; 20];
    wide[19] = 1;
    t.or_pending(a, &wide);
    let mut expect = wide;
    expect[0] = 0x05;
    expect[1] = 0x80;
    assert_eq!(t.pending_mask(a), &expect);
    t.clear_pending(a);
    assert!(t.pending_mask(a).is_empty());
    assert!(t.wide_masks.is_empty());
}

#[test]
fn endpoints_round_trip_and_v6_spills() {
    let mut t = Table::new(10);
    let s = insert(&mut t, 1, "alice").expect("room");
    for a in [
        "10.1.2.3:5",
        "[2001:db8::1]:65535",
        "[::ffff:1.2.3.4]:80",
        "127.0.0.1:9",
    ] {
        let a: SocketAddr = a.parse().expect("addr");
        t.set_endpoint(s, a);
        assert_eq!(t.endpoint(s), Some(a));
        assert!(t.endpoint_is(s, a));
        let other = SocketAddr::new(a.ip(), a.port().wrapping_add(1));
        assert!(!t.endpoint_is(s, other));
    }
    assert!(t.v6_addrs.is_empty(), "back to IPv4: the side entry goes");
    t.set_endpoint(s, "[::1]:1".parse().expect("addr"));
    assert_eq!(t.v6_addrs.len(), 1);
    t.remove(s, 0);
    assert!(t.v6_addrs.is_empty(), "removal drops the side entry");
    let fresh = insert(&mut t, 2, "bob").expect("room");
    t.get_mut(fresh).expect("live").port = [0, 0];
    assert_eq!(t.endpoint(fresh), None, "no UDP endpoint yet");
}

#[test]
fn flags_do_not_collide() {
    let mut r = Connection::default();
    r.set_in_use(true);
    r.set_queued(true);
    r.set_tries(5);
    r.set_ipv6(true);
    r.set_catch_up(true);
    assert!(r.in_use() && r.queued() && r.is_ipv6() && r.catch_up());
    assert_eq!(r.tries(), 5);
    r.set_tries(200);
    assert_eq!(r.tries(), 7);
    r.set_queued(false);
    assert!(r.in_use() && !r.queued() && r.is_ipv6() && r.catch_up());
    r.set_catch_up(false);
    assert!(r.in_use() && r.is_ipv6() && !r.catch_up());
    assert_eq!(r.tries(), 7);
    r.set_validated(true);
    assert!(r.validated() && r.in_use() && r.is_ipv6() && !r.catch_up());
    assert_eq!(r.tries(), 7);
    r.set_tries(0);
    assert!(r.validated());
}

#[test]
fn an_all_ones_mask_takes_no_side_entry_and_absorbs_publishes() {
    let mut t = Table::new(10);
    let a = insert(&mut t, 1, "alice").expect("room");
    t.or_pending(a, &[0x01, 0, 0, 0, 0, 7]);
    assert_eq!(t.wide_masks.len(), 1);
    t.or_pending(a, &[0xFF; 32]);
    assert_eq!(t.pending_mask(a), &[0xFF; 32]);
    assert!(t.wide_masks.is_empty(), "held as a flag");
    t.or_pending(a, &[0x02]);
    assert_eq!(t.pending_mask(a), &[0xFF; 32], "stays all ones");
    t.clear_pending(a);
    assert!(t.pending_mask(a).is_empty());
}

#[test]
fn key_parity_and_the_pending_length_share_a_byte_without_colliding() {
    let mut t = Table::new(10);
    let a = insert(&mut t, 1, "alice").expect("room");
    t.get_mut(a).expect("live").set_key_parity(1);
    t.or_pending(a, &[0x01, 0x02]);
    assert_eq!(t.get(a).expect("live").key_parity(), 1);
    assert_eq!(t.pending_mask(a), &[0x01, 0x02]);
    t.or_pending(a, &[0xFF; 32]);
    assert_eq!(t.get(a).expect("live").key_parity(), 1);
    assert_eq!(t.pending_mask(a), &[0xFF; 32]);
    t.clear_pending(a);
    let r = t.get(a).expect("live");
    assert!(!r.has_pending());
    assert_eq!(r.key_parity(), 1);
}

#[test]
fn affinity_is_the_conn_ids_last_four_bytes() {
    let r = Connection {
        conn_id: [9, 9, 9, 9, 0x12, 0x34, 0x56, 0x78],
        ..Connection::default()
    };
    assert_eq!(r.affinity(), 0x1234_5678);
}

#[test]
fn removing_from_the_middle_or_the_end_keeps_the_rest_of_the_list_in_order() {
    let mut t = Table::new(10);
    let s: Vec<Slot> = (1..=5)
        .map(|id| insert(&mut t, id, "alice").expect("room"))
        .collect();
    let ids = |v: &[usize]| v.iter().map(|&i| s[i].0).collect::<Vec<_>>();
    assert_eq!(account_chain(&t, "alice"), ids(&[4, 3, 2, 1, 0]));
    t.remove(s[2], 1); // the middle
    assert_eq!(account_chain(&t, "alice"), ids(&[4, 3, 1, 0]));
    t.remove(s[0], 2); // the end
    assert_eq!(account_chain(&t, "alice"), ids(&[4, 3, 1]));
    t.remove(s[3], 3); // second
    assert_eq!(account_chain(&t, "alice"), ids(&[4, 1]));
    t.remove(s[4], 4); // the head
    assert_eq!(account_chain(&t, "alice"), ids(&[1]));
    assert_eq!(t.len(), 1);
    assert_eq!(t.by_conn.len(), 1, "removed connections leave the index");
    assert_eq!(t.find(&ConnId(record(2, "alice").conn_id)), Some(s[1]));
    for id in [1, 3, 4, 5] {
        assert_eq!(t.find(&ConnId(record(id, "alice").conn_id)), None);
    }
}

#[test]
fn sizes_and_bounds_follow_inserts_and_removals() {
    let mut t = Table::new(10);
    assert_eq!(t.limit(), 10);
    assert!(t.is_empty());
    assert_eq!((t.len(), t.accounts_len()), (0, 0));
    assert_eq!((t.slot_bound(), t.account_bound()), (0, 0));
    let a = insert(&mut t, 1, "alice").expect("room");
    insert(&mut t, 2, "alice").expect("room");
    insert(&mut t, 3, "bob").expect("room");
    assert!(!t.is_empty());
    assert_eq!((t.len(), t.accounts_len()), (3, 2));
    assert_eq!((t.slot_bound(), t.account_bound()), (3, 2));
    t.remove(a, 0);
    assert_eq!((t.len(), t.accounts_len()), (2, 2));
    assert_eq!(
        (t.slot_bound(), t.account_bound()),
        (3, 2),
        "bounds never shrink"
    );
    insert(&mut t, 4, "carol").expect("room");
    assert_eq!((t.len(), t.accounts_len()), (3, 3));
    assert_eq!(
        (t.slot_bound(), t.account_bound()),
        (3, 3),
        "the freed slot is reused"
    );
    for id in [2, 3, 4] {
        let name = ["", "", "alice", "bob", "carol"][id as usize];
        let s = t.find(&ConnId(record(id, name).conn_id)).expect("held");
        t.remove(s, 0);
    }
    assert!(t.is_empty());
}

#[test]
fn a_new_page_is_added_only_when_one_is_full() {
    let mut t = Table::new(PAGE + 1);
    let a = account(&mut t, "alice");
    let conn = |i: u32| {
        let mut r = record(0, "alice");
        r.conn_id[..4].copy_from_slice(&i.to_be_bytes());
        r
    };
    for i in 0..PAGE as u32 {
        assert_eq!(t.insert(conn(i), a), Ok(Slot(i)));
    }
    assert_eq!(t.conns.pages.len(), 1);
    let last = PAGE as u32;
    assert_eq!(t.insert(conn(last), a), Ok(Slot(last)));
    assert_eq!(t.conns.pages.len(), 2);
    for i in [0, 1, last - 1, last] {
        assert_eq!(t.find(&ConnId(conn(i).conn_id)), Some(Slot(i)));
        assert_eq!(t.get(Slot(i)).expect("held").conn_id, conn(i).conn_id);
    }
    assert_eq!(t.insert(conn(last + 1), a), Err(TableFull));
}

#[test]
fn reserve_makes_room_in_both_indexes_up_to_the_limits() {
    let mut t = Table::new(5000);
    t.reserve(1000, 300);
    assert!(t.by_conn.capacity() >= 1000, "{}", t.by_conn.capacity());
    assert!(
        t.by_account.capacity() >= 300,
        "{}",
        t.by_account.capacity()
    );
    let mut small = Table::new(10);
    small.reserve(1000, 1000);
    assert!(
        small.by_conn.capacity() < 1000,
        "{}",
        small.by_conn.capacity()
    );
    assert!(
        small.by_account.capacity() < 1000,
        "{}",
        small.by_account.capacity()
    );
}

#[test]
fn accounts_sharing_an_affinity_are_told_apart_by_the_low_bits() {
    let mut t = Table::new(1000);
    // Fixed hash keys, so the outcome does not depend on the run.
    t.hasher = ahash::RandomState::with_seeds(1, 2, 3, 4);
    let slots: Vec<AccountSlot> = (0..1000)
        .map(|low| t.insert_account(Account::new(7, low, 1, 0)).expect("room"))
        .collect();
    for (low, &slot) in slots.iter().enumerate() {
        let key = AccountKey {
            affinity: 7,
            low: low as u32,
        };
        assert_eq!(t.find_account(key), Some(slot), "low {low}");
    }
    assert_eq!(
        t.find_account(AccountKey {
            affinity: 8,
            low: 0
        }),
        None
    );
    assert_eq!(
        t.find_account(AccountKey {
            affinity: 7,
            low: 1000
        }),
        None
    );
}

#[test]
fn removed_accounts_leave_the_index() {
    let mut t = Table::new(10);
    let alice = account(&mut t, "alice");
    let bob = account(&mut t, "bob");
    assert_eq!(t.by_account.len(), 2);
    t.remove_account(alice);
    assert_eq!(t.by_account.len(), 1);
    assert_eq!(t.find_account(AccountKey::of("alice")), None);
    assert_eq!(t.find_account(AccountKey::of("bob")), Some(bob));
    t.remove_account(bob);
    assert_eq!(t.by_account.len(), 0);
    assert_eq!(t.accounts_len(), 0);
}

#[test]
fn partitions_count_the_connections_held_before_and_after() {
    let part = |name: &str| (AccountKey::of(name).affinity % 5) as usize;
    let mut t = Table::new(10);
    assert_eq!(t.partition_devices(), &[] as &[u32]);
    insert(&mut t, 1, "alice").expect("room");
    insert(&mut t, 2, "alice").expect("room");
    let b = insert(&mut t, 3, "bob").expect("room");
    t.count_partitions(5);
    let mut want = [0u32; 5];
    want[part("alice")] += 2;
    want[part("bob")] += 1;
    assert_eq!(t.partition_devices(), &want);
    insert(&mut t, 4, "carol").expect("room");
    want[part("carol")] += 1;
    assert_eq!(t.partition_devices(), &want);
    t.remove(b, 0);
    want[part("bob")] -= 1;
    assert_eq!(t.partition_devices(), &want);
    t.count_partitions(5); // counted again: the free slot is skipped
    assert_eq!(t.partition_devices(), &want);
    t.count_partitions(0);
    assert_eq!(t.partition_devices(), &[] as &[u32]);
}

#[test]
fn an_endpoint_matches_only_its_own_address_and_port() {
    let mut t = Table::new(10);
    let s = insert(&mut t, 1, "alice").expect("room");
    let ep = |a: &str| a.parse::<SocketAddr>().expect("addr");
    t.set_endpoint(s, ep("10.1.2.3:80"));
    assert!(t.endpoint_is(s, ep("10.1.2.3:80")));
    assert!(!t.endpoint_is(s, ep("10.1.2.4:80")));
    assert!(!t.endpoint_is(s, ep("[::ffff:10.1.2.3]:80")));
    t.set_endpoint(s, ep("[2001:db8::1]:80"));
    assert!(t.endpoint_is(s, ep("[2001:db8::1]:80")));
    assert!(!t.endpoint_is(s, ep("[2001:db8::2]:80")));
    assert!(
        !t.endpoint_is(s, ep("0.0.0.0:80")),
        "the v4 bytes of a v6 record are zero"
    );
    let fresh = insert(&mut t, 2, "bob").expect("room");
    t.get_mut(fresh).expect("live").port = [0, 0];
    t.get_mut(fresh).expect("live").addr_v4 = [0; 4];
    assert!(
        !t.endpoint_is(fresh, ep("0.0.0.0:0")),
        "no endpoint is no match"
    );
    assert!(
        !t.endpoint_is(Slot(PAGE as u32), ep("0.0.0.0:0")),
        "no record"
    );
}
