use super::*;
use std::net::SocketAddr;

fn record(id: u8, account: &str) -> Connection {
    let key = AccountKey::of(account);
    let mut conn_id = [id, 1, 2, 3, 0, 0, 0, 0];
    conn_id[4..].copy_from_slice(&key.affinity.to_be_bytes());
    let mut r = Connection {
        conn_id,
        account_low: key.low,
        ..Connection::default()
    };
    r.set_endpoint(SocketAddr::from(([127, 0, 0, 1], 4000 + u16::from(id))));
    r
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
fn record_is_68_bytes() {
    assert_eq!(std::mem::size_of::<Connection>(), 68);
    assert_eq!(std::mem::align_of::<Connection>(), 4);
}

#[test]
fn insert_find_remove_and_account_lists() {
    let mut t = Table::new(10);
    let a = t.insert(record(1, "alice")).expect("room");
    let b = t.insert(record(2, "alice")).expect("room");
    let c = t.insert(record(3, "bob")).expect("room");
    assert_eq!(t.len(), 3);
    assert_eq!(t.find(&ConnId(record(2, "alice").conn_id)), Some(b));
    assert_eq!(account_slots(&t, "alice"), vec![a.0, b.0]);
    assert_eq!(account_slots(&t, "bob"), vec![c.0]);
    assert_eq!(account_slots(&t, "carol"), Vec::<u32>::new());

    t.remove(b); // the head (inserted last)
    assert_eq!(account_slots(&t, "alice"), vec![a.0]);
    assert_eq!(t.find(&ConnId(record(2, "alice").conn_id)), None);
    let d = t.insert(record(4, "alice")).expect("room");
    assert_eq!(d, b, "freed slot is reused");
    t.remove(a); // not the head
    assert_eq!(account_slots(&t, "alice"), vec![d.0]);
    t.remove(d);
    assert_eq!(t.account_head(AccountKey::of("alice")), None);
    t.remove(d); // twice is harmless
    assert_eq!(t.len(), 1);
}

#[test]
fn limit_is_enforced() {
    let mut t = Table::new(2);
    t.insert(record(1, "a")).expect("room");
    t.insert(record(2, "a")).expect("room");
    assert_eq!(t.insert(record(3, "a")), Err(TableFull));
}

#[test]
fn new_device_takes_the_account_serial() {
    let mut t = Table::new(10);
    let a = t.insert(record(1, "alice")).expect("room");
    t.get_mut(a).expect("live").notify_serial = 41;
    let b = t.insert(record(2, "alice")).expect("room");
    assert_eq!(t.get(b).expect("live").notify_serial, 41);
}

#[test]
fn pending_masks_inline_and_wide() {
    let mut t = Table::new(10);
    let a = t.insert(record(1, "alice")).expect("room");
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
fn endpoints_round_trip() {
    let mut r = Connection::default();
    for a in ["10.1.2.3:5", "[2001:db8::1]:65535", "[::ffff:1.2.3.4]:80"] {
        let a: SocketAddr = a.parse().expect("addr");
        r.set_endpoint(a);
        assert_eq!(r.endpoint(), a);
    }
}

#[test]
fn flags_do_not_collide() {
    let mut r = Connection::default();
    r.set_in_use(true);
    r.set_queued(true);
    r.set_tries(5);
    r.set_endpoint("[::1]:1".parse().expect("addr"));
    assert!(r.in_use() && r.queued());
    assert_eq!(r.tries(), 5);
    r.set_tries(200);
    assert_eq!(r.tries(), 15);
    r.set_queued(false);
    assert!(r.in_use() && !r.queued());
    assert_eq!(r.endpoint(), "[::1]:1".parse::<SocketAddr>().expect("addr"));
}
