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

fn account_slots(t: &Table, account: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let mut cur = t.account_head(AccountKey::of(account));
    while let Some(s) = cur {
        out.push(s.0);
        cur = t.next_in_account(s);
    }
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
