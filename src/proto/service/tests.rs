//! Unit tests of the server shard: requests sealed the way a device seals
//! them (`seal_request_with`), answers opened with the device's key and
//! decoded, so each test asserts exactly what the node sent and counted.

use super::*;
use crate::codec::{ClientHeader, PresenceConnectRequest};
use crate::packet::{peek_conn_id, Credential};
use crate::proto::{seal_request_with, Request, RequestHeader};

const T0: UnixMillis = UnixMillis(1_795_262_400_000);

fn master() -> MasterKey {
    MasterKey::new([7; 32])
}

fn service(config: ServiceConfig) -> Service {
    Service::new(config, master(), [1; 32], T0)
}

/// A device: its credential, its address, the last Serial it used.
struct Dev {
    cred: Credential,
    addr: SocketAddr,
    serial: i64,
}

impl Dev {
    fn new(account: &str, device: &str, port: u16) -> Dev {
        Dev::issued(&master(), 0, account, device, port)
    }

    fn issued(master: &MasterKey, generation: u64, account: &str, device: &str, port: u16) -> Dev {
        let mut rng = StdRng::seed_from_u64(u64::from(port));
        let cred = Credential::issue_at_generation(
            master,
            generation,
            account,
            device,
            UnixSeconds(T0.seconds().0 + 86_400),
            Vec::new(),
            &mut rng,
        )
        .expect("valid credential");
        Dev {
            cred,
            addr: SocketAddr::from(([192, 0, 2, 1], port)),
            serial: T0.seconds().0,
        }
    }

    fn connect(&self) -> Request<'_> {
        Request::Connect {
            account: &self.cred.account,
            device: &self.cred.device,
            expires: self.cred.expires,
            binding: &self.cred.binding,
        }
    }

    /// `request` with the next Serial, acknowledging `ack`.
    fn packet(&mut self, ack: Option<i64>, request: &Request<'_>) -> Vec<u8> {
        self.serial += 1;
        self.packet_with(self.serial, ack, None, request)
    }

    /// A connect with the next Serial, carrying `mark`.
    fn connect_packet(&mut self, mark: Option<i64>) -> Vec<u8> {
        self.serial += 1;
        self.packet_with(self.serial, mark, None, &self.connect())
    }

    fn packet_with(
        &self,
        serial: i64,
        ack: Option<i64>,
        echo: Option<[u8; 8]>,
        request: &Request<'_>,
    ) -> Vec<u8> {
        let key = self
            .cred
            .secret
            .key(Direction::ClientToServer, self.cred.conn_id);
        let mut buf = vec![0u8; MAX_PACKET];
        let header = RequestHeader {
            serial,
            acknowledge: ack,
            echo,
        };
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&serial.to_le_bytes());
        let n = seal_request_with(&key, self.cred.conn_id, nonce, &header, request, &mut buf)
            .expect("sealed");
        buf.truncate(n);
        buf
    }

    /// Sends `request` (next Serial) over UDP.
    fn send(&mut self, s: &mut Service, now: UnixMillis, request: &Request<'_>) {
        let p = self.packet(None, request);
        s.handle_datagram(now, self.addr, &p);
    }

    /// Connects over UDP (next Serial) and takes the answer.
    fn connected(&mut self, s: &mut Service, now: UnixMillis) -> Message<'static> {
        let c = self.connect_packet(None);
        s.handle_datagram(now, self.addr, &c);
        let mut out = sent(s, now, &[&*self]);
        assert_eq!(out.len(), 1, "{out:?}");
        let (_, m) = out.remove(0);
        assert!(matches!(m, Message::ConnectResponse(_)), "{m:?}");
        m
    }

    fn open(&self, datagram: &[u8]) -> Message<'static> {
        let key = self
            .cred
            .secret
            .key(Direction::ServerToClient, self.cred.conn_id);
        let mut d = datagram.to_vec();
        let plain = open_in_place(&key, &mut d).expect("sealed for the device");
        let plain: &'static [u8] = Box::leak(plain.to_vec().into_boxed_slice());
        Message::decode_liberal(plain).expect("a message")
    }
}

/// Every datagram the service sends now, opened by the device whose conn id
/// it carries.
fn sent(s: &mut Service, now: UnixMillis, devs: &[&Dev]) -> Vec<(Transmit, Message<'static>)> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut out = Vec::new();
    while let Some(t) = s.poll_transmit(now, &mut buf) {
        let d = &buf[..t.size];
        let conn_id = peek_conn_id(d).expect("a packet");
        let dev = devs
            .iter()
            .find(|v| v.cred.conn_id == conn_id)
            .expect("for one of the devices");
        out.push((t, dev.open(d)));
    }
    out
}

fn header<'m>(m: &'m Message<'static>) -> &'m ServiceHeader<'static> {
    match m {
        Message::ConnectResponse(r) => &r.header,
        Message::Status(r) => &r.header,
        Message::EndpointResponse(r) => &r.header,
        Message::Notify(r) => &r.header,
        Message::ResolveResponse(r) => &r.header,
        Message::ErrorInvalidSerial(r) => &r.header,
        Message::DisconnectResponse(r) => &r.header,
        Message::ErrorRefused(r) => &r.header,
        m => panic!("not a service message: {m:?}"),
    }
}

/// `Status` of a refusal (or a resolve answer).
fn status(m: &Message<'static>) -> Option<i64> {
    header(m).status
}

fn saved_account(affinity: u32, low: u32, serial: u32) -> Account {
    Account {
        affinity,
        low,
        head: 0,
        serial,
        since: serial,
        catch_up: 0,
        epoch: 0,
        stamp: 0,
    }
}

fn saved_connection(id: u8, a: &Account) -> SavedConnection {
    SavedConnection {
        conn_id: ConnId([id, 2, 3, 4, 5, 6, 7, 8]),
        account: AccountKey {
            affinity: a.affinity,
            low: a.low,
        },
        highest_serial: 1000,
        window: u64::MAX,
        last_seen: 0,
        expires: 2_000_000_000,
        endpoint: None,
        pending: [0; MAX_BITMASK],
        pending_len: 0,
        tries: 0,
        catch_up: false,
        validated: false,
        key_parity: 0,
    }
}

/// `restore` counts what it took and what it left out, record for
/// record: a duplicate account, a free account record, an account beyond
/// the table's room; a connection of an unknown account, a duplicate conn
/// id, a connection beyond the table's room. Its times count from the
/// saved epoch from then on.
#[test]
fn restore_counts_each_record_taken_or_skipped() {
    // Room for 2 connections and 4 accounts.
    let config = ServiceConfig {
        max_connections: 2,
        ..ServiceConfig::default()
    };
    let mut s = service(config.clone());
    assert_eq!(s.epoch(), T0);
    let a = saved_account(10, 1, 500);
    let b = saved_account(11, 1, 600);
    let free = saved_account(12, 1, 0);
    let unknown = saved_account(99, 9, 9);
    let connections = [
        saved_connection(1, &a),
        saved_connection(1, &b), // the same conn id again
        saved_connection(2, &unknown),
        saved_connection(3, &b),
        saved_connection(4, &a), // no room left
    ];
    let saved_at = UnixMillis(T0.0 - 60_000);
    let done = s.restore(saved_at, &[a, b, a, free], &connections);
    assert_eq!(
        done,
        Restored {
            accounts: 2,
            connections: 2,
            skipped: 2 + 3,
        }
    );
    assert_eq!(s.epoch(), saved_at);
    assert_eq!(s.connections(), 2);
    assert_eq!(s.transmit_backlog(), 0, "nothing pending: no notify");
    assert_eq!(s.table().accounts_len(), 2);
    let mut s = service(config);
    let more: Vec<Account> = (0..5).map(|i| saved_account(20 + i, 1, 7)).collect();
    let done = s.restore(T0, &more, &[]);
    assert_eq!(
        done,
        Restored {
            accounts: 4,
            connections: 0,
            skipped: 1,
        }
    );
}

/// `restore` takes nothing into a shard that holds anything, even only an
/// account record whose devices left, and says it skipped every record.
#[test]
fn restore_into_a_shard_holding_an_account_takes_nothing() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    dev.send(&mut s, T0, &Request::Disconnect);
    assert_eq!(s.connections(), 0);
    assert_eq!(s.table().accounts_len(), 1);
    let a = saved_account(10, 1, 500);
    let b = saved_account(11, 1, 500);
    let c = saved_account(12, 1, 500);
    let done = s.restore(
        T0,
        &[a, b, c],
        &[saved_connection(1, &a), saved_connection(2, &b)],
    );
    assert_eq!(
        done,
        Restored {
            accounts: 0,
            connections: 0,
            skipped: 5,
        }
    );
    assert_eq!(s.table().accounts_len(), 1);
}

/// A wrong `account_of` index is not trusted: each connection joins the
/// account its key names, whether the indexed account differs from it in
/// the affinity, in the low half, or in both.
#[test]
fn restore_indexed_checks_each_hint_against_the_key() {
    let mut s = service(ServiceConfig::default());
    let a = saved_account(10, 1, 500);
    let b = saved_account(10, 2, 600); // a's affinity
    let c = saved_account(11, 1, 700); // a's low half
    let accounts = [a, b, c];
    let connections = [
        saved_connection(1, &a),
        saved_connection(2, &b),
        saved_connection(3, &c),
        saved_connection(4, &a),
    ];
    // Every hint names another account (and the last one none).
    let done = s.restore_indexed(T0, &accounts, &connections, &[1, 2, 0, 7]);
    assert_eq!(done.connections, 4);
    let mut got: Vec<(u8, AccountKey)> = s
        .saved_connections()
        .map(|(_, c)| (c.conn_id.0[0], c.account))
        .collect();
    got.sort_by_key(|&(id, _)| id);
    let key = |a: &Account| AccountKey {
        affinity: a.affinity,
        low: a.low,
    };
    assert_eq!(
        got,
        vec![(1, key(&a)), (2, key(&b)), (3, key(&c)), (4, key(&a))]
    );
    // And the right hints are taken.
    let mut s = service(ServiceConfig::default());
    let done = s.restore_indexed(T0, &accounts, &connections, &[0, 1, 2, 0]);
    assert_eq!(done.connections, 4);
    assert_eq!(
        s.saved_connections()
            .filter(|(_, c)| c.account == key(&a))
            .count(),
        2
    );
}

/// A saved account's `head` (a slot link of the shard it was saved from)
/// is not taken: a restored account with no connection notifies nobody,
/// and `saved_accounts` writes `head` 0 even for an account with devices.
#[test]
fn account_heads_are_neither_saved_nor_restored() {
    let mut s = service(ServiceConfig::default());
    let a = Account {
        head: 3,
        ..saved_account(
            AccountKey::of("alice").affinity,
            AccountKey::of("alice").low,
            500,
        )
    };
    assert_eq!(s.restore(T0, &[a], &[]).accounts, 1);
    assert_eq!(s.handle_publish(T0, "alice", &[1]), Ok(0));
    assert_eq!(
        s.saved_accounts().map(|(_, a)| a.head).collect::<Vec<_>>(),
        vec![0]
    );

    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    assert_ne!(s.table().account(AccountSlot(0)).map(|a| a.head), Some(0));
    let saved: Vec<Account> = s.saved_accounts().map(|(_, a)| a).collect();
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].head, 0);
}

/// A shard of a cluster of 4 partitions.
fn cluster_service() -> Service {
    service(ServiceConfig {
        cluster_partitions: 4,
        catch_up_timeout_ms: 500,
        ..ServiceConfig::default()
    })
}

fn partition_of(account: &str) -> u32 {
    AccountKey::of(account).affinity % 4
}

fn connect_response<'m>(m: &'m Message<'static>) -> &'m PresenceConnectResponse<'static> {
    match m {
        Message::ConnectResponse(r) => r,
        m => panic!("not a ConnectResponse: {m:?}"),
    }
}

/// docs/PROTOCOL.md §10.4: a connect in a partition the node does not
/// hear yet is answered only once it does, with a resync (the node had
/// no state for the account); the account created meanwhile takes no
/// partition gap.
#[test]
fn a_connect_in_an_unheard_partition_waits_until_it_is_heard() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    let mut dev = Dev::new("alice", "phone", 4000);
    let c = dev.connect_packet(None);
    s.handle_datagram(T0, dev.addr, &c);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    assert_eq!(s.poll_event(), None, "no mark: nothing to ask");
    assert_eq!(s.stats().connects, 1);
    // Another partition heard: still waiting.
    s.set_hearing(T0, &[(p + 1) % 4], true);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    s.set_hearing(T0, &[p], true);
    assert!(s.hears(p));
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out.len(), 1, "{out:?}");
    let r = connect_response(&out[0].1);
    assert_eq!(r.bitmask.as_deref(), Some(&[0xFF; MAX_BITMASK][..]));
    assert_eq!(s.stats().resyncs, 1);
    assert_eq!(s.stats().partition_gaps, 0);
    assert_eq!(s.stats().connects, 1);
}

/// Hearing a partition again after a time unheard resyncs each of its
/// accounts' devices (a notify of every store); hearing it while heard,
/// or another partition, does nothing.
#[test]
fn hearing_a_partition_again_resyncs_its_devices() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    s.set_hearing(T0, &[p], true);
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    s.set_hearing(T0, &[p], true);
    s.set_hearing(T0, &[(p + 1) % 4], false);
    s.set_hearing(T0, &[(p + 1) % 4], true);
    assert_eq!(s.stats().partition_gaps, 0);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    s.set_hearing(T0, &[p], false);
    assert!(!s.hears(p));
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    s.set_hearing(T0, &[p], true);
    assert_eq!(s.stats().partition_gaps, 1);
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out.len(), 1, "{out:?}");
    match &out[0].1 {
        Message::Notify(n) => assert_eq!(n.bitmask.as_deref(), Some(&[0xFF; MAX_BITMASK][..])),
        m => panic!("{m:?}"),
    }
}

/// docs/PROTOCOL.md §10.3: a gap in a heard partition's stream resyncs
/// its accounts' devices; a gap in a partition not heard, or on a node
/// outside a cluster, does nothing.
#[test]
fn a_bus_gap_resyncs_the_partitions_devices_only() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    s.set_hearing(T0, &[p], true);
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    s.bus_gap(T0, (p + 1) % 4);
    assert_eq!(s.stats().partition_gaps, 0);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    s.bus_gap(T0, p);
    assert_eq!(s.stats().partition_gaps, 1);
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(matches!(&out[0].1, Message::Notify(n)
        if n.bitmask.as_deref() == Some(&[0xFF; MAX_BITMASK][..])));
    // No longer heard: a gap in its stream is left to hearing it again.
    s.set_hearing(T0, &[p], false);
    s.bus_gap(T0, p);
    assert_eq!(s.stats().partition_gaps, 1);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());

    let mut alone = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut alone, T0);
    alone.bus_gap(T0, 0);
    alone.set_hearing(T0, &[0], true);
    assert!(!alone.hears(0));
    assert_eq!(alone.stats().partition_gaps, 0);
    assert!(sent(&mut alone, T0, &[&dev]).is_empty());
}

/// One case of the test below.
type Case = (Option<&'static [u8]>, Option<&'static [u8]>, u64, u64, u64);

/// A mark the node cannot place is asked of the cluster; the connect is
/// answered with the cluster's answer: the bits it names, nothing for an
/// all-zero answer, a resync for none or an oversize one.
#[test]
fn a_connect_with_a_foreign_mark_is_answered_with_the_clusters_catch_up() {
    // (the cluster's answer, the bitmask sent, catch_ups_answered, catch_ups, resyncs)
    let answers: [Case; 4] = [
        (Some(&[0x05]), Some(&[0x05]), 1, 1, 0),
        (Some(&[0, 0]), None, 1, 0, 0),
        (None, Some(&[0xFF; MAX_BITMASK]), 0, 0, 1),
        (
            Some(&[1; MAX_BITMASK + 1]),
            Some(&[0xFF; MAX_BITMASK]),
            0,
            0,
            1,
        ),
    ];
    for (answer, bitmask, answered, catch_ups, resyncs) in answers {
        let mut s = cluster_service();
        let p = partition_of("alice");
        s.set_hearing(T0, &[p], true);
        let mut dev = Dev::new("alice", "phone", 4000);
        let c = dev.connect_packet(Some(12_345));
        s.handle_datagram(T0, dev.addr, &c);
        assert!(sent(&mut s, T0, &[&dev]).is_empty());
        let Some(ServiceEvent::CatchUpRequest {
            token,
            account,
            mark,
            partition,
        }) = s.poll_event()
        else {
            panic!("no catch-up request");
        };
        assert_eq!((account.as_str(), mark, partition), ("alice", 12_345, p));
        assert_eq!(s.stats().catch_ups_asked, 1);
        s.handle_catch_up_answer(CatchUpToken(token.0 + 1), Some(&[1]));
        assert!(sent(&mut s, T0, &[&dev]).is_empty(), "an unknown token");
        s.handle_catch_up_answer(token, answer);
        let out = sent(&mut s, T0, &[&dev]);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(
            connect_response(&out[0].1).bitmask.as_deref(),
            bitmask,
            "{answer:?}"
        );
        let st = s.stats();
        assert_eq!(
            (st.catch_ups_answered, st.catch_ups, st.resyncs, st.connects),
            (answered, catch_ups, resyncs, 1),
            "{answer:?}"
        );
    }
}

/// A parked connect nobody answers is answered with a resync at its
/// deadline (`catch_up_timeout_ms`), which `poll_timeout` names.
#[test]
fn a_parked_connect_unanswered_resyncs_at_its_deadline() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    s.set_hearing(T0, &[p], true);
    let mut dev = Dev::new("alice", "phone", 4000);
    let c = dev.connect_packet(Some(12_345));
    s.handle_datagram(T0, dev.addr, &c);
    assert!(matches!(
        s.poll_event(),
        Some(ServiceEvent::CatchUpRequest { .. })
    ));
    let deadline = T0.plus_millis(500);
    assert_eq!(s.poll_timeout(), Some(deadline));
    s.handle_timeout(UnixMillis(deadline.0 - 1));
    assert!(sent(&mut s, deadline, &[&dev]).is_empty());
    s.handle_timeout(deadline);
    let out = sent(&mut s, deadline, &[&dev]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        connect_response(&out[0].1).bitmask.as_deref(),
        Some(&[0xFF; MAX_BITMASK][..])
    );
    assert_eq!(s.stats().resyncs, 1);
}

/// Another node's question is answered only by a shard of a cluster that
/// hears the account's partition, holds its record and knows the mark.
#[test]
fn catch_up_since_answers_only_what_it_knows() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    assert_eq!(s.catch_up_since("alice", 1), None, "not heard");
    s.set_hearing(T0, &[p], true);
    assert_eq!(s.catch_up_since("alice", 1), None, "no record");
    let mut dev = Dev::new("alice", "phone", 4000);
    let r = dev.connected(&mut s, T0);
    let mark = connect_response(&r).serial.expect("a Serial") as u32;
    assert_eq!(s.catch_up_since("alice", mark), Some(CatchUp::Nothing));
    s.handle_publish(T0, "alice", &[0x02]).expect("published");
    let Some(CatchUp::Bits(m)) = s.catch_up_since("alice", mark) else {
        panic!("bits");
    };
    assert_eq!(m.as_bytes(), &[0x02]);
    assert_eq!(s.catch_up_since("alice", 0), None, "no mark");
    assert_eq!(s.stats().catch_up_answers_given, 2);
    s.set_hearing(T0, &[p], false);
    assert_eq!(s.catch_up_since("alice", mark), None, "no longer heard");

    let mut alone = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    let r = dev.connected(&mut alone, T0);
    let mark = connect_response(&r).serial.expect("a Serial") as u32;
    assert_eq!(alone.catch_up_since("alice", mark), None, "not a cluster");
    assert_eq!(alone.stats().catch_up_answers_given, 0);
}

/// A sealed request of exactly `MAX_PACKET` bytes (a resolve whose query
/// fills the packet).
fn full_size_resolve(dev: &mut Dev) -> Vec<u8> {
    dev.serial += 1;
    let key = dev
        .cred
        .secret
        .key(Direction::ClientToServer, dev.cred.conn_id);
    let header = RequestHeader {
        serial: dev.serial,
        acknowledge: None,
        echo: None,
    };
    let mut buf = vec![0u8; MAX_PACKET];
    for q in (0..MAX_PACKET).rev() {
        let query = vec![0x41; q];
        let sealed = seal_request_with(
            &key,
            dev.cred.conn_id,
            [9; 12],
            &header,
            &Request::Resolve(&query),
            &mut buf,
        );
        if let Ok(n) = sealed {
            assert_eq!(n, MAX_PACKET, "a query of {q} bytes");
            return buf;
        }
    }
    unreachable!("some query fits");
}

/// `authentic` is true for a packet sealed for its conn id under a usable
/// key, up to `MAX_PACKET` bytes, and for nothing else.
#[test]
fn authentic_is_a_packet_sealed_under_a_usable_key() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    let p = dev.packet(None, &Request::Heartbeat);
    assert!(s.authentic(T0, &p));
    let mut forged = p.clone();
    *forged.last_mut().expect("bytes") ^= 1;
    assert!(!s.authentic(T0, &forged));
    assert!(!s.authentic(T0, &p[..4]));
    assert!(s.authentic(T0, &full_size_resolve(&mut dev)));
    let stranger = Dev::issued(&MasterKey::new([8; 32]), 0, "alice", "phone", 4001);
    assert!(!s.authentic(
        T0,
        &stranger.packet_with(T0.seconds().0, None, None, &Request::Heartbeat)
    ));
    // A packet is handled (and counted) only through handle_datagram.
    assert_eq!(s.stats().datagrams_in, 0);
}

/// A request of exactly `MAX_PACKET` bytes is handled; the node counts
/// every datagram it is handed, by UDP or over the web transport.
#[test]
fn a_max_packet_request_is_handled_and_every_datagram_counted() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    let p = full_size_resolve(&mut dev);
    s.handle_datagram(T0, dev.addr, &p);
    assert!(matches!(
        s.poll_event(),
        Some(ServiceEvent::ResolveUpstream { .. })
    ));
    assert_eq!(s.stats().resolves, 1);
    let h = dev.packet(None, &Request::Heartbeat);
    s.handle_web_request(T0, dev.addr, &h, WebRequestId(9));
    let st = s.stats();
    assert_eq!(
        (st.datagrams_in, st.heartbeats, st.dropped_malformed),
        (3, 1, 0)
    );
    // Too short for a conn id, and one byte over MAX_PACKET: malformed.
    s.handle_datagram(T0, dev.addr, &p[..4]);
    let mut long = p.clone();
    long.push(0);
    s.handle_datagram(T0, dev.addr, &long);
    let st = s.stats();
    assert_eq!(
        (st.datagrams_in, st.dropped_malformed, st.dropped_auth),
        (5, 2, 0)
    );
}

/// docs/PROTOCOL.md §7.11: after a rotation a device of the previous key
/// connects (its packets are tried under both keys, current first) until
/// the grace period ends, exactly.
#[test]
fn the_previous_key_opens_packets_until_its_grace_ends() {
    let old = master();
    let new = MasterKey::new([9; 32]);
    let until = T0.plus_millis(10_000);
    let mut s = service(ServiceConfig::default());
    s.set_keys(KeySet {
        current: new.clone(),
        parity: 1,
        previous: Some((old.clone(), until)),
    });
    assert_eq!(
        s.current_master().map(MasterKey::as_bytes),
        Some(new.as_bytes())
    );
    let mut fresh = Dev::issued(&new, 0, "bob", "phone", 4001);
    fresh.connected(&mut s, T0);
    let mut dev = Dev::new("alice", "phone", 4000);
    let before = UnixMillis(until.0 - 1);
    dev.connected(&mut s, before);
    let mut late = Dev::new("carol", "phone", 4002);
    let c = late.connect_packet(None);
    s.handle_datagram(until, late.addr, &c);
    assert!(sent(&mut s, until, &[&late]).is_empty());
    assert_eq!(s.stats().dropped_auth, 1);
    assert_eq!(s.stats().connects, 2);
}

/// The first Serial of the first account a shard seeded with `seed`
/// creates: 2^20 plus its first draw below 2^30 (docs/PROTOCOL.md D4).
fn first_serial(seed: [u8; 32]) -> u32 {
    (1 << 20) + StdRng::from_seed(seed).next_u32() % (1 << 30)
}

/// A new account's notify Serials start at 2^20 plus a random number
/// below 2^30 (docs/PROTOCOL.md D4): the shard's first draw from its seed.
#[test]
fn a_new_accounts_serials_start_above_two_to_the_twenty() {
    let mut s = Service::new(ServiceConfig::default(), master(), [5; 32], T0);
    let mut dev = Dev::new("alice", "phone", 4000);
    let r = dev.connected(&mut s, T0);
    assert_eq!(
        connect_response(&r).serial,
        Some(i64::from(first_serial([5; 32])))
    );
}

/// A device whose connect creates the account resynchronises whatever its
/// mark, even a mark equal to the new record's first Serial (a Serial of
/// an earlier life that happens to match): the node had no state for it.
#[test]
fn a_new_account_resyncs_even_a_mark_equal_to_its_first_serial() {
    let mut s = service(ServiceConfig::default());
    let first = i64::from(first_serial([1; 32]));
    let mut dev = Dev::new("alice", "phone", 4000);
    let c = dev.connect_packet(Some(first));
    s.handle_datagram(T0, dev.addr, &c);
    let out = sent(&mut s, T0, &[&dev]);
    let r = connect_response(&out[0].1);
    assert_eq!(r.serial, Some(first));
    assert_eq!(r.bitmask.as_deref(), Some(&[0xFF; MAX_BITMASK][..]));
    assert_eq!((s.stats().resyncs, s.stats().catch_ups), (1, 0));
}

/// Connects `dev` with `mark` and takes the catch-up request the shard
/// asks of the cluster for it (nothing is sent to the device yet).
fn parked(dev: &mut Dev, s: &mut Service, mark: i64) -> CatchUpToken {
    let c = dev.connect_packet(Some(mark));
    s.handle_datagram(T0, dev.addr, &c);
    assert!(sent(s, T0, &[&*dev]).is_empty(), "parked");
    match s.poll_event() {
        Some(ServiceEvent::CatchUpRequest { token, mark: m, .. }) => {
            assert_eq!(i64::from(m), mark);
            token
        }
        e => panic!("no catch-up request: {e:?}"),
    }
}

/// In a cluster, the device that creates the account has its mark asked
/// of the other nodes, even a mark equal to the new record's first Serial
/// (this node's record is new: it cannot place any mark).
#[test]
fn a_new_accounts_mark_is_asked_of_the_cluster() {
    let mut s = cluster_service();
    s.set_hearing(T0, &[partition_of("alice")], true);
    let first = i64::from(first_serial([1; 32]));
    let mut dev = Dev::new("alice", "phone", 4000);
    let token = parked(&mut dev, &mut s, first);
    s.handle_catch_up_answer(token, Some(&[0x20]));
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(
        connect_response(&out[0].1).bitmask.as_deref(),
        Some(&[0x20][..])
    );
}

/// Each parked connect has its own token, and the cluster's answer goes
/// to the connect it names; a catch-up answered so is acknowledged as a
/// catch-up, and bits already pending when the answer came (a publish
/// meanwhile) as a notify.
#[test]
fn parked_connects_take_their_own_answers() {
    let mut s = cluster_service();
    s.set_hearing(T0, &[partition_of("alice")], true);
    let mut a = Dev::new("alice", "phone", 4000);
    let r = a.connected(&mut s, T0);
    let mut serial = connect_response(&r).serial.expect("a Serial");
    a.send(&mut s, T0, &Request::Acknowledge(serial));
    let mut b = Dev::new("alice", "tablet", 4001);
    let mut c = Dev::new("alice", "watch", 4002);
    let tb = parked(&mut b, &mut s, 5);
    let tc = parked(&mut c, &mut s, 6);
    assert_ne!(tb, tc);
    s.handle_catch_up_answer(tc, Some(&[0x10]));
    let out = sent(&mut s, T0, &[&a, &b, &c]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0.destination, c.addr);
    assert_eq!(
        connect_response(&out[0].1).bitmask.as_deref(),
        Some(&[0x10][..])
    );
    c.send(&mut s, T0, &Request::Acknowledge(serial));
    assert_eq!(
        (s.stats().catch_ups_acked, s.stats().notifies_acked),
        (2, 0)
    );
    // A publish reaches b while it waits: its answer adds to a notify.
    assert_eq!(s.handle_publish(T0, "alice", &[0x01]), Ok(3));
    serial += 1;
    s.handle_catch_up_answer(tb, Some(&[0x02]));
    let out = sent(&mut s, T0, &[&a, &b, &c]);
    let answer = out
        .iter()
        .find(|(t, m)| t.destination == b.addr && matches!(m, Message::ConnectResponse(_)))
        .expect("b's connect answered");
    assert_eq!(
        connect_response(&answer.1).bitmask.as_deref(),
        Some(&[0x03][..])
    );
    b.send(&mut s, T0, &Request::Acknowledge(serial));
    assert_eq!(
        (s.stats().catch_ups_acked, s.stats().notifies_acked),
        (2, 1)
    );
}

/// `max_queued_replies` bounds the reply queue: more are dropped and
/// counted, and a reply goes again once the queue has room.
#[test]
fn replies_beyond_the_queue_are_dropped_and_counted() {
    let mut s = service(ServiceConfig {
        max_queued_replies: 2,
        ..ServiceConfig::default()
    });
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    for _ in 0..3 {
        dev.send(&mut s, T0, &Request::Endpoint);
    }
    assert_eq!(s.stats().dropped_queue_full, 1);
    assert_eq!(s.transmit_backlog(), 2);
    assert_eq!(sent(&mut s, T0, &[&dev]).len(), 2);
    dev.send(&mut s, T0, &Request::Endpoint);
    assert_eq!(sent(&mut s, T0, &[&dev]).len(), 1);
    assert_eq!(s.stats().dropped_queue_full, 1);
}

/// Seals any client message for `dev` (fields a device's own requests
/// always carry may be left out).
fn sealed(dev: &Dev, message: &Message<'_>) -> Vec<u8> {
    let key = dev
        .cred
        .secret
        .key(Direction::ClientToServer, dev.cred.conn_id);
    let mut buf = vec![0u8; MAX_PACKET];
    let n = message
        .encode(&mut buf[HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT])
        .expect("fits");
    let n = seal_in_place(&key, dev.cred.conn_id, [3; 12], &mut buf, n).expect("sealed");
    buf.truncate(n);
    buf
}

/// A STUN Binding request with no attributes.
fn stun_request(id: u8) -> Vec<u8> {
    let mut r = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    r.extend_from_slice(&[id; 12]);
    r
}

/// The challenge a reply or notify carries in `ID`.
fn challenge_of(m: &Message<'static>) -> [u8; 8] {
    let id = header(m).id.as_deref().expect("a challenge");
    id.try_into().expect("8 bytes")
}

/// Connects `dev` and echoes the connect answer's challenge in a
/// heartbeat that acknowledges the connect's catch-up, so its endpoint is
/// validated and nothing is pending; takes the heartbeat's answer.
fn validated(dev: &mut Dev, s: &mut Service, now: UnixMillis) -> [u8; 8] {
    let r = dev.connected(s, now);
    let echo = challenge_of(&r);
    let serial = connect_response(&r).serial;
    dev.serial += 1;
    let h = dev.packet_with(dev.serial, serial, Some(echo), &Request::Heartbeat);
    s.handle_datagram(now, dev.addr, &h);
    let out = sent(s, now, &[&*dev]);
    assert_eq!(out.len(), 1);
    assert_eq!(header(&out[0].1).id, None, "validated: no challenge");
    echo
}

/// Refused connects say why in `Status` and `StatusDescription`, answer
/// the connect's Serial and the source's address, and are counted.
#[test]
fn refused_connects_say_why() {
    let mut s = service(ServiceConfig {
        max_connections: 1,
        ..ServiceConfig::default()
    });
    let mut first = Dev::new("alice", "phone", 4000);
    first.connected(&mut s, T0);
    let mut dev = Dev::new("bob", "phone", 4001);
    let mut cases: Vec<(Vec<u8>, i64, &str)> = Vec::new();
    dev.serial += 1;
    let no_binding = Message::ConnectRequest(PresenceConnectRequest {
        account: Some("bob".into()),
        device: Some("phone".into()),
        expires: Some(dev.cred.expires),
        binding: None,
        header: ClientHeader {
            serial: Some(dev.serial),
            ..Default::default()
        },
    });
    cases.push((
        sealed(&dev, &no_binding),
        401,
        "connect needs Account, Device, Expires and Binding",
    ));
    let mut forged = dev.cred.binding;
    forged[0] ^= 1;
    dev.serial += 1;
    let bad = Request::Connect {
        account: &dev.cred.account,
        device: &dev.cred.device,
        expires: dev.cred.expires,
        binding: &forged,
    };
    cases.push((
        dev.packet_with(dev.serial, None, None, &bad),
        401,
        "invalid binding",
    ));
    let mut rng = StdRng::seed_from_u64(3);
    let old = Credential::issue(
        &master(),
        "bob",
        "phone",
        UnixSeconds(T0.seconds().0 - 1),
        Vec::new(),
        &mut rng,
    )
    .expect("credential");
    let old = Dev {
        cred: old,
        addr: dev.addr,
        serial: dev.serial,
    };
    let expired = old.packet_with(old.serial + 1, None, None, &old.connect());
    let full = dev.connect_packet(None);
    let mut n = 0;
    for (packet, code, why) in cases.into_iter().chain([
        (expired, 403, "credential expired"),
        (full, 503, "node full"),
    ]) {
        n += 1;
        let serial = packet_serial(&s, &packet, &[&dev, &old]);
        s.handle_datagram(T0, dev.addr, &packet);
        let out = sent(&mut s, T0, &[&dev, &old]);
        assert_eq!(out.len(), 1, "{why}");
        let h = header(&out[0].1);
        assert!(matches!(out[0].1, Message::ErrorRefused(_)), "{why}");
        assert_eq!(h.status, Some(code), "{why}");
        assert_eq!(h.status_description.as_deref(), Some(why));
        assert_eq!(h.status_extended, None);
        assert_eq!(h.acknowledge, Some(serial), "{why}");
        assert_eq!(h.endpoint, Some(dev.addr), "{why}");
        assert_eq!(h.now, Some(T0.seconds()), "{why}");
        assert_eq!(s.stats().refused, n);
    }
    assert_eq!(s.connections(), 1);
}

/// The Serial inside a sealed request (opened with the node's key).
fn packet_serial(_s: &Service, packet: &[u8], devs: &[&Dev]) -> i64 {
    let conn_id = peek_conn_id(packet).expect("a packet");
    let dev = devs
        .iter()
        .find(|d| d.cred.conn_id == conn_id)
        .expect("a device");
    let key = dev
        .cred
        .secret
        .key(Direction::ClientToServer, dev.cred.conn_id);
    let mut p = packet.to_vec();
    let plain = open_in_place(&key, &mut p).expect("sealed");
    Message::decode(plain)
        .expect("a message")
        .client_header()
        .and_then(|h| h.serial)
        .expect("a Serial")
}

fn notify<'m>(m: &'m Message<'static>) -> &'m PresenceNotify<'static> {
    match m {
        Message::Notify(n) => n,
        m => panic!("not a notify: {m:?}"),
    }
}

/// A publish must name 1 to 32 bytes with a bit set; to an account with no
/// record here it is counted and reaches nobody.
#[test]
fn publishes_are_checked_and_counted() {
    let mut s = service(ServiceConfig::default());
    assert_eq!(
        s.handle_publish(T0, "alice", &[]),
        Err(PublishError::BadBitmask)
    );
    assert_eq!(
        s.handle_publish(T0, "alice", &[1; MAX_BITMASK + 1]),
        Err(PublishError::BadBitmask)
    );
    assert_eq!(
        s.handle_publish(T0, "alice", &[0, 0]),
        Err(PublishError::NoStore)
    );
    assert_eq!(s.stats().publishes, 0);
    assert_eq!(s.handle_publish(T0, "alice", &[1; MAX_BITMASK]), Ok(0));
    assert_eq!(s.stats().publishes, 1);
}

/// docs/PROTOCOL.md §6: every device of the account gets one notify with
/// the merged bits of the publishes since it was queued, carrying the
/// account's Serial, the device's endpoint, the node's time, the device's
/// highest Serial and (endpoint not validated) the challenge; a heartbeat's
/// `Status` carries the pending state until the latest Serial is
/// acknowledged, and only that Serial clears it.
#[test]
fn notifies_merge_publishes_and_clear_on_the_latest_serial() {
    let mut s = service(ServiceConfig::default());
    let mut a = Dev::new("alice", "phone", 4000);
    let mut b = Dev::new("alice", "tablet", 4001);
    let r = a.connected(&mut s, T0);
    let first = connect_response(&r).serial.expect("a Serial");
    // The first device created the account: a resync, acknowledged.
    assert_eq!(
        connect_response(&r).bitmask.as_deref(),
        Some(&[0xFF; MAX_BITMASK][..])
    );
    a.send(&mut s, T0, &Request::Acknowledge(first));
    assert_eq!(s.stats().catch_ups_acked, 1);
    assert_eq!(
        s.stats().dropped_unexpected,
        0,
        "an Acknowledge is expected"
    );
    let p = b.connect_packet(Some(first));
    s.handle_datagram(T0, b.addr, &p);
    let out = sent(&mut s, T0, &[&a, &b]);
    assert_eq!(connect_response(&out[0].1).bitmask, None, "nothing missed");
    assert_eq!(s.stats().catch_ups, 0);

    let now = T0.plus_millis(5_000);
    assert_eq!(s.handle_publish(now, "alice", &[0x01]), Ok(2));
    assert_eq!(s.handle_publish(now, "alice", &[0x00, 0x02]), Ok(2));
    assert_eq!(s.stats().notifies_sent, 4);
    assert_eq!(s.transmit_backlog(), 2);
    let out = sent(&mut s, now, &[&a, &b]);
    assert_eq!(out.len(), 2);
    assert_eq!(s.armed_timers(), 2);
    for (t, m) in &out {
        let n = notify(m);
        let dev = if t.destination == a.addr { &a } else { &b };
        assert_eq!(n.bitmask.as_deref(), Some(&[0x01, 0x02][..]));
        assert_eq!(n.serial, Some(first + 2));
        assert_eq!(n.header.endpoint, Some(dev.addr));
        assert_eq!(n.header.now, Some(now.seconds()));
        assert_eq!(n.header.acknowledge, Some(dev.serial));
        assert!(n.header.id.is_some(), "not validated: a challenge");
    }
    // A heartbeat's Status carries the pending state.
    a.send(&mut s, now, &Request::Heartbeat);
    let out = sent(&mut s, now, &[&a]);
    match &out[0].1 {
        Message::Status(st) => {
            assert_eq!(st.serial, Some(first + 2));
            assert_eq!(st.bitmask.as_deref(), Some(&[0x01, 0x02][..]));
            assert_eq!(st.header.acknowledge, Some(a.serial));
        }
        m => panic!("{m:?}"),
    }
    // An older Serial does not clear it; the latest does, in any message.
    let p = a.packet(Some(first + 1), &Request::Heartbeat);
    s.handle_datagram(now, a.addr, &p);
    assert_eq!(s.stats().notifies_acked, 0);
    sent(&mut s, now, &[&a]);
    let p = a.packet(Some(first + 2), &Request::Heartbeat);
    s.handle_datagram(now, a.addr, &p);
    assert_eq!(s.stats().notifies_acked, 1);
    let out = sent(&mut s, now, &[&a]);
    match &out[0].1 {
        Message::Status(st) => assert_eq!((st.serial, st.bitmask.as_deref()), (None, None)),
        m => panic!("{m:?}"),
    }
    assert_eq!(s.stats().heartbeats, 3);
}

/// docs/PROTOCOL.md §6, "Catch-up": a connect carrying the account's
/// latest Serial as its mark missed nothing; one carrying an earlier
/// Serial of this life gets the bits published since; any other mark, a
/// resync.
#[test]
fn a_connects_mark_decides_its_catch_up() {
    let mut s = service(ServiceConfig::default());
    let mut a = Dev::new("alice", "phone", 4000);
    let r = a.connected(&mut s, T0);
    let mark = connect_response(&r).serial.expect("a Serial");
    s.handle_publish(T0, "alice", &[0x04]).expect("published");
    sent(&mut s, T0, &[&a]);
    let cases: [(i64, Option<&[u8]>); 3] = [
        (mark + 1, None),
        (mark, Some(&[0x04])),
        (7, Some(&[0xFF; MAX_BITMASK])),
    ];
    for (i, (m, bits)) in cases.into_iter().enumerate() {
        let mut d = Dev::new("alice", &format!("d{i}"), 4010 + i as u16);
        let p = d.connect_packet(Some(m));
        s.handle_datagram(T0, d.addr, &p);
        let out = sent(&mut s, T0, &[&d]);
        let r = connect_response(&out[0].1);
        assert_eq!(r.bitmask.as_deref(), bits, "mark {m}");
        assert_eq!(r.serial, Some(mark + 1));
        assert_eq!(r.connection_timeout, Some(60_000));
    }
    assert_eq!((s.stats().catch_ups, s.stats().resyncs), (1, 2));
}

/// A connect that would create a connection must be recent: its Serial at
/// most 2 × ConnectionTimeout behind the node's clock, else it is told to
/// resume above now (InvalidSerial with the node's time).
#[test]
fn a_new_connection_needs_a_recent_serial() {
    let mut s = service(ServiceConfig::default());
    let now_s = T0.seconds().0;
    let dev = Dev::new("alice", "phone", 4000);
    let old = dev.packet_with(now_s - 121, None, None, &dev.connect());
    s.handle_datagram(T0, dev.addr, &old);
    let out = sent(&mut s, T0, &[&dev]);
    match &out[0].1 {
        Message::ErrorInvalidSerial(e) => {
            assert_eq!(e.serial, Some(now_s));
            assert_eq!(e.header.acknowledge, Some(now_s - 121));
        }
        m => panic!("{m:?}"),
    }
    assert_eq!((s.stats().dropped_replay, s.connections()), (1, 0));
    let ok = dev.packet_with(now_s - 120, None, None, &dev.connect());
    s.handle_datagram(T0, dev.addr, &ok);
    assert!(matches!(
        sent(&mut s, T0, &[&dev])[0].1,
        Message::ConnectResponse(_)
    ));
    assert_eq!(s.connections(), 1);
}

/// A held connection's connect: the same packet again is dropped without
/// an answer; one from far below the window gets InvalidSerial with the
/// highest Serial; a fresh one is answered, acknowledges, and keeps the
/// connection.
#[test]
fn a_held_connections_connect_is_checked_against_its_window() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    let c = dev.connect_packet(None);
    s.handle_datagram(T0, dev.addr, &c);
    let r = sent(&mut s, T0, &[&dev]);
    let serial = connect_response(&r[0].1).serial.expect("a Serial");
    s.handle_datagram(T0, dev.addr, &c);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    assert_eq!(s.stats().dropped_replay, 1);
    let stale = dev.packet_with(dev.serial - 100, None, None, &dev.connect());
    s.handle_datagram(T0, dev.addr, &stale);
    let out = sent(&mut s, T0, &[&dev]);
    match &out[0].1 {
        Message::ErrorInvalidSerial(e) => assert_eq!(e.serial, Some(dev.serial)),
        m => panic!("{m:?}"),
    }
    assert_eq!(s.stats().dropped_replay, 2);
    let again = dev.connect_packet(Some(serial));
    s.handle_datagram(T0, dev.addr, &again);
    let out = sent(&mut s, T0, &[&dev]);
    let r = connect_response(&out[0].1);
    assert_eq!((r.serial, r.bitmask.as_deref()), (Some(serial), None));
    assert_eq!(
        s.stats().catch_ups_acked,
        1,
        "the connect acknowledged the resync"
    );
    assert_eq!((s.stats().connects, s.connections()), (2, 1));
}

/// Runs `s`'s timers from `from` until `until`, collecting every datagram
/// it sends with the time it left.
fn run_timers(
    s: &mut Service,
    from: UnixMillis,
    until: UnixMillis,
    devs: &[&Dev],
) -> Vec<(UnixMillis, Message<'static>)> {
    let mut out = Vec::new();
    let mut now = from;
    while let Some(t) = s.poll_timeout() {
        if t > until {
            break;
        }
        assert!(t >= now, "time goes forward");
        now = t;
        s.handle_timeout(now);
        out.extend(sent(s, now, devs).into_iter().map(|(_, m)| (now, m)));
    }
    out
}

/// docs/PROTOCOL.md §6: an unacknowledged notify to a validated endpoint is
/// sent again after 1 s, then 2, 4, 8 and 16 s (five retransmissions), then
/// waits for the device's next heartbeat.
#[test]
fn a_notify_is_retransmitted_five_times_doubling_from_one_second() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    let serial = {
        let r = s.handle_publish(T0, "alice", &[0x08]);
        assert_eq!(r, Ok(1));
        let out = sent(&mut s, T0, &[&dev]);
        assert_eq!(header(&out[0].1).id, None);
        notify(&out[0].1).serial
    };
    let out = run_timers(&mut s, T0, T0.plus_millis(100_000), &[&dev]);
    let times: Vec<u64> = out.iter().map(|(t, _)| t.0 - T0.0).collect();
    assert_eq!(times, vec![1_000, 3_000, 7_000, 15_000, 31_000]);
    for (_, m) in &out {
        assert_eq!(notify(m).serial, serial);
        assert_eq!(notify(m).bitmask.as_deref(), Some(&[0x08][..]));
    }
    assert_eq!(s.stats().notifies_retransmitted, 5);
    assert_eq!(s.stats().notifies_sent, 1);
    assert_eq!(s.armed_timers(), 0);
}

/// `retransmit_tries` and `retransmit_initial_ms` are the configuration's.
#[test]
fn retransmissions_follow_the_configuration() {
    let mut s = service(ServiceConfig {
        retransmit_initial_ms: 300,
        retransmit_tries: 2,
        ..ServiceConfig::default()
    });
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    s.handle_publish(T0, "alice", &[0x08]).expect("published");
    assert_eq!(sent(&mut s, T0, &[&dev]).len(), 1);
    let out = run_timers(&mut s, T0, T0.plus_millis(100_000), &[&dev]);
    let times: Vec<u64> = out.iter().map(|(t, _)| t.0 - T0.0).collect();
    assert_eq!(times, vec![300, 900]);
}

/// docs/PROTOCOL.md §7.9: an endpoint not validated gets a notify once, with
/// the challenge; its retransmissions are held (and counted) until the
/// device echoes the challenge. A wrong echo, or one over the web
/// transport, validates nothing.
#[test]
fn retransmissions_wait_for_a_validated_endpoint() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    let r = dev.connected(&mut s, T0);
    let echo = challenge_of(&r);
    s.handle_publish(T0, "alice", &[0x08]).expect("published");
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(challenge_of(&out[0].1), echo);
    let out = run_timers(&mut s, T0, T0.plus_millis(1_000), &[&dev]);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(s.stats().retransmits_held, 1);
    assert_eq!(s.stats().notifies_retransmitted, 1);
    let mut wrong = echo;
    wrong[0] ^= 1;
    dev.serial += 1;
    let p = dev.packet_with(dev.serial, None, Some(wrong), &Request::Heartbeat);
    s.handle_datagram(T0, dev.addr, &p);
    dev.serial += 1;
    let p = dev.packet_with(dev.serial, None, Some(echo), &Request::Heartbeat);
    s.handle_web_request(T0, dev.addr, &p, WebRequestId(1));
    assert_eq!(s.stats().validations, 0);
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(
        out.iter()
            .map(|(t, m)| (t.web, header(m).id.is_some()))
            .collect::<Vec<_>>(),
        vec![(None, true), (Some(WebRequestId(1)), false)],
        "a web answer needs no challenge"
    );
    dev.serial += 1;
    let p = dev.packet_with(dev.serial, None, Some(echo), &Request::Heartbeat);
    s.handle_datagram(T0, dev.addr, &p);
    assert_eq!(s.stats().validations, 1);
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(header(&out[0].1).id, None);
    // The same echo again changes nothing.
    dev.serial += 1;
    let p = dev.packet_with(dev.serial, None, Some(echo), &Request::Heartbeat);
    s.handle_datagram(T0, dev.addr, &p);
    assert_eq!(s.stats().validations, 1);
}

/// A fresh packet from another address moves the endpoint (counted) and
/// un-validates it: the next answer carries the new address's challenge.
#[test]
fn a_moved_endpoint_is_validated_again() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    let first_challenge = validated(&mut dev, &mut s, T0);
    let moved = SocketAddr::from(([198, 51, 100, 7], 9999));
    let p = dev.packet(None, &Request::Endpoint);
    s.handle_datagram(T0, moved, &p);
    assert_eq!(s.stats().migrations, 1);
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out[0].0.destination, moved);
    assert!(matches!(out[0].1, Message::EndpointResponse(_)));
    assert_eq!(header(&out[0].1).endpoint, Some(moved));
    let challenge = challenge_of(&out[0].1);
    assert_ne!(challenge, first_challenge, "each address its own challenge");
    // The old address's challenge does not validate the new one.
    dev.serial += 1;
    let p = dev.packet_with(dev.serial, None, Some(first_challenge), &Request::Heartbeat);
    s.handle_datagram(T0, moved, &p);
    assert_eq!(s.stats().validations, 1);
    assert_eq!(challenge_of(&sent(&mut s, T0, &[&dev])[0].1), challenge);
    s.handle_publish(T0, "alice", &[1]).expect("published");
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out[0].0.destination, moved);
}

/// Sends a resolve of `query` and returns the upstream request's token.
fn resolve(dev: &mut Dev, s: &mut Service, now: UnixMillis, query: &[u8]) -> ResolveToken {
    dev.send(s, now, &Request::Resolve(query));
    match s.poll_event() {
        Some(ServiceEvent::ResolveUpstream { token, query: q }) => {
            assert_eq!(q, query);
            token
        }
        e => panic!("{e:?}"),
    }
}

fn resolved<'m>(m: &'m Message<'static>) -> &'m PresenceResolveResponse<'static> {
    match m {
        Message::ResolveResponse(r) => r,
        m => panic!("not a ResolveResponse: {m:?}"),
    }
}

/// docs/PROTOCOL.md §7.9 (D21): a resolve is handed upstream and its
/// answer, or the upstream's failure, goes back to the device; an empty
/// query is a 502 at once, a query beyond `max_pending_resolves` a 503, no
/// answer within `resolve_timeout_ms` a 504; answers for unknown or
/// timed-out tokens are ignored.
#[test]
fn resolves_are_answered_refused_or_timed_out() {
    let mut s = service(ServiceConfig {
        max_pending_resolves: 2,
        resolve_timeout_ms: 3_000,
        ..ServiceConfig::default()
    });
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    let a = resolve(&mut dev, &mut s, T0, b"query a");
    let b = resolve(&mut dev, &mut s, T0, b"query b");
    let b_serial = dev.serial;
    dev.send(&mut s, T0, &Request::Resolve(b"query c"));
    dev.send(&mut s, T0, &Request::Resolve(b""));
    assert_eq!(s.poll_event(), None);
    assert_eq!(s.stats().resolves, 2);
    let out = sent(&mut s, T0, &[&dev]);
    let codes: Vec<_> = out.iter().map(|(_, m)| resolved(m).header.status).collect();
    assert_eq!(codes, vec![Some(503), Some(502)]);
    assert_ne!(a, b);
    s.handle_resolve_answer(ResolveToken(b.0 + 7), Ok(b"nobody's"));
    s.handle_resolve_answer(b, Ok(b"answer b"));
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out.len(), 1);
    let r = resolved(&out[0].1);
    assert_eq!(r.dns_response.as_deref(), Some(&b"answer b"[..]));
    assert_eq!(
        (r.header.status, r.header.acknowledge),
        (None, Some(b_serial))
    );
    s.handle_resolve_answer(b, Ok(b"again"));
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    s.handle_timeout(T0.plus_millis(2_999));
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    let late = T0.plus_millis(3_000);
    s.handle_timeout(late);
    let out = sent(&mut s, late, &[&dev]);
    assert_eq!(out.len(), 1);
    assert_eq!(resolved(&out[0].1).header.status, Some(504));
    assert_eq!(resolved(&out[0].1).dns_response, None);
    assert_eq!(
        header(&out[0].1).acknowledge,
        Some(b_serial - 1),
        "a's request"
    );
    s.handle_resolve_answer(a, Err(502));
    assert!(sent(&mut s, late, &[&dev]).is_empty());
    let c = resolve(&mut dev, &mut s, late, b"query d");
    s.handle_resolve_answer(c, Err(502));
    let out = sent(&mut s, late, &[&dev]);
    assert_eq!(resolved(&out[0].1).header.status, Some(502));
}

/// docs/PROTOCOL.md §7.9: to an endpoint not validated the node sends at
/// most three times the request's bytes: a DNS answer that would not fit
/// (with `RESOLVE_OVERHEAD`) is withheld with 425 "Too Early" and counted.
#[test]
fn an_unvalidated_endpoint_gets_at_most_three_times_its_request() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    let query = [0x41; 40];
    let request_bytes = dev
        .packet_with(dev.serial + 1, None, None, &Request::Resolve(&query))
        .len();
    let fits = 3 * request_bytes - RESOLVE_OVERHEAD;
    let t = resolve(&mut dev, &mut s, T0, &query);
    s.handle_resolve_answer(t, Ok(&vec![0x61; fits]));
    let t = resolve(&mut dev, &mut s, T0, &query);
    s.handle_resolve_answer(t, Ok(&vec![0x62; fits + 1]));
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out.len(), 2);
    assert!(out[0].0.size <= 3 * request_bytes);
    assert_eq!(
        resolved(&out[0].1).dns_response.as_deref(),
        Some(&vec![0x61; fits][..])
    );
    assert_eq!(resolved(&out[1].1).header.status, Some(425));
    assert_eq!(resolved(&out[1].1).dns_response, None);
    assert_eq!(s.stats().replies_capped, 1);
}

/// A message larger than one packet goes as fragments (docs/PROTOCOL.md
/// §5), one per `poll_transmit`, which reassemble into it; other answers
/// wait until the last one is out, and `transmit_backlog` counts the
/// fragmented message as one.
#[test]
fn a_large_answer_goes_in_fragments_counted_in_the_backlog() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    let answer: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let t = resolve(&mut dev, &mut s, T0, b"big");
    s.handle_resolve_answer(t, Ok(&answer));
    let mut buf = vec![0u8; MAX_PACKET];
    let first = s.poll_transmit(T0, &mut buf).expect("a fragment");
    let mut d = buf[..first.size].to_vec();
    let key = dev
        .cred
        .secret
        .key(Direction::ServerToClient, dev.cred.conn_id);
    let plain = open_in_place(&key, &mut d).expect("sealed").to_vec();
    assert_eq!(plain[0], crate::packet::FRAGMENT_MARKER);
    let count = usize::from(plain[4]);
    assert!(count > 1);
    assert_eq!(s.transmit_backlog(), 1);
    // Two STUN answers, three replies and a notify join it.
    for id in 0..2 {
        s.handle_datagram(T0, dev.addr, &stun_request(id));
    }
    for _ in 0..3 {
        dev.send(&mut s, T0, &Request::Endpoint);
    }
    s.handle_publish(T0, "alice", &[1]).expect("published");
    assert_eq!(s.transmit_backlog(), 2 + 3 + 1 + 1);
    let mut r = crate::packet::Reassembler::new();
    assert!(matches!(r.push(T0, &plain), Ok(None)));
    let mut rest = Vec::new();
    while let Some(t) = s.poll_transmit(T0, &mut buf) {
        rest.push((t, buf[..t.size].to_vec()));
    }
    // STUN first, then the fragments, then the replies and the notify.
    assert!(rest[..2]
        .iter()
        .all(|(t, _)| t.size <= stun::MAX_RESPONSE_LEN));
    let mut whole = None;
    for (_, d) in &rest[2..2 + count - 1] {
        let mut d = d.clone();
        let plain = open_in_place(&key, &mut d).expect("sealed");
        whole = r.push(T0, plain).expect("a fragment");
    }
    let whole = whole.expect("reassembled");
    let m = Message::decode_liberal(&whole).expect("a message");
    match m {
        Message::ResolveResponse(r) => assert_eq!(r.dns_response.as_deref(), Some(&answer[..])),
        m => panic!("{m:?}"),
    }
    assert_eq!(rest.len(), 2 + (count - 1) + 3 + 1);
    assert_eq!(s.transmit_backlog(), 0);
    assert_eq!(s.stats().datagrams_out, 2 + 2 + count as u64 + 3 + 1);
}

/// Replies to a web-transport request are handed back with its id.
#[test]
fn web_requests_are_answered_through_the_web_transport() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    let c = dev.connect_packet(None);
    s.handle_web_request(T0, dev.addr, &c, WebRequestId(42));
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out[0].0.web, Some(WebRequestId(42)));
    assert_eq!(out[0].0.destination, dev.addr);
    assert!(matches!(out[0].1, Message::ConnectResponse(_)));
}

/// `handle_publish_stamped` hands its stamp back once every notify it
/// queued has been sealed, oldest first; a publish reaching nobody here
/// gives nothing back.
#[test]
fn a_publish_stamp_comes_back_once_its_notifies_are_sent() {
    let mut s = service(ServiceConfig::default());
    let mut a = Dev::new("alice", "phone", 4000);
    let mut b = Dev::new("alice", "tablet", 4001);
    a.connected(&mut s, T0);
    b.connected(&mut s, T0);
    assert_eq!(s.handle_publish_stamped(T0, "bob", &[1], 5), Ok(0));
    assert_eq!(s.handle_publish_stamped(T0, "alice", &[1], 6), Ok(2));
    assert_eq!(s.handle_publish_stamped(T0, "alice", &[2], 7), Ok(2));
    assert_eq!(s.poll_published(), None);
    let mut buf = vec![0u8; MAX_PACKET];
    assert!(s.poll_transmit(T0, &mut buf).is_some());
    assert_eq!(s.poll_published(), None, "one of two notifies out");
    assert!(s.poll_transmit(T0, &mut buf).is_some());
    assert_eq!(s.poll_published(), Some(6));
    assert_eq!(s.poll_published(), Some(7));
    assert_eq!(s.poll_published(), None);
}

/// At most 2^16 publish stamps wait; beyond, a publish goes unstamped.
#[test]
fn publish_stamps_are_bounded() {
    let mut s = service(ServiceConfig::default());
    let mut a = Dev::new("alice", "phone", 4000);
    a.connected(&mut s, T0);
    let max = 1u64 << 16;
    for stamp in 0..=max {
        assert_eq!(s.handle_publish_stamped(T0, "alice", &[1], stamp), Ok(1));
    }
    let mut buf = vec![0u8; MAX_PACKET];
    assert!(s.poll_transmit(T0, &mut buf).is_some());
    let mut n = 0;
    while let Some(stamp) = s.poll_published() {
        assert_eq!(stamp, n);
        n += 1;
    }
    assert_eq!(n, max);
}

/// `set_stun_limits` replaces the STUN rate limit per source address.
#[test]
fn stun_limits_can_be_changed() {
    let mut s = service(ServiceConfig::default());
    let from = SocketAddr::from(([192, 0, 2, 9], 3478));
    for id in 0..3 {
        s.handle_datagram(T0, from, &stun_request(id));
    }
    assert_eq!((s.stats().stun_answered, s.stats().stun_dropped), (3, 0));
    s.set_stun_limits(1, 2);
    for id in 0..3 {
        s.handle_datagram(T0, from, &stun_request(id));
    }
    assert_eq!((s.stats().stun_answered, s.stats().stun_dropped), (5, 1));
    // A Binding indication is STUN but gets no answer.
    let mut indication = stun_request(7);
    indication[1] = 0x11;
    s.set_stun_limits(100, 200);
    s.handle_datagram(T0, from, &indication);
    assert_eq!((s.stats().stun_answered, s.stats().stun_dropped), (5, 2));
    let mut buf = vec![0u8; MAX_PACKET];
    let mut n = 0;
    while let Some(t) = s.poll_transmit(T0, &mut buf) {
        assert_eq!(t.destination, from);
        n += 1;
    }
    assert_eq!(n, 5);
}

/// The STUN answer queue is bounded by `max_queued_replies` too.
#[test]
fn stun_answers_beyond_the_queue_are_dropped() {
    let mut s = service(ServiceConfig {
        max_queued_replies: 2,
        ..ServiceConfig::default()
    });
    let from = SocketAddr::from(([192, 0, 2, 9], 3478));
    for id in 0..3 {
        s.handle_datagram(T0, from, &stun_request(id));
    }
    assert_eq!((s.stats().stun_answered, s.stats().stun_dropped), (2, 1));
    assert_eq!(s.transmit_backlog(), 2);
}

/// docs/PROTOCOL.md §6: a connection silent for more than twice the
/// ConnectionTimeout is removed by the sweep (seconds since the shard's
/// epoch), and so is one whose credential expired; an account with no
/// device left is removed once its catch-up window has passed.
#[test]
fn the_sweep_expires_silent_connections_then_their_accounts() {
    let mut s = service(ServiceConfig {
        connection_timeout_ms: 10_000,
        catch_up_window_secs: 50,
        ..ServiceConfig::default()
    });
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0.plus_millis(5_000));
    s.handle_timeout(T0.plus_millis(25_000));
    assert_eq!(s.connections(), 1);
    s.handle_timeout(T0.plus_millis(26_000));
    assert_eq!((s.connections(), s.stats().expired), (0, 1));
    assert_eq!(s.table().accounts_len(), 1);
    s.handle_timeout(T0.plus_millis(76_000));
    assert_eq!(s.table().accounts_len(), 1);
    s.handle_timeout(T0.plus_millis(77_000));
    assert_eq!(
        (s.table().accounts_len(), s.stats().accounts_expired),
        (0, 1)
    );
    assert_eq!(s.poll_timeout(), None, "nothing left to time");
}

/// A credential that expires while connected: the sweep removes the
/// connection at its expiry, and a packet at or after it is refused 403.
#[test]
fn a_credential_expiring_ends_its_connection() {
    let mut rng = StdRng::seed_from_u64(3);
    let expires = UnixSeconds(T0.seconds().0 + 30);
    let cred = Credential::issue(&master(), "alice", "phone", expires, Vec::new(), &mut rng)
        .expect("credential");
    let mut dev = Dev {
        cred,
        addr: SocketAddr::from(([192, 0, 2, 1], 4000)),
        serial: T0.seconds().0,
    };
    let mut s = service(ServiceConfig::default());
    dev.connected(&mut s, T0);
    let at = UnixMillis(expires.0 as u64 * 1000);
    s.handle_timeout(UnixMillis(at.0 - 1000));
    assert_eq!(s.connections(), 1);
    dev.send(&mut s, UnixMillis(at.0 - 1), &Request::Heartbeat);
    assert!(matches!(sent(&mut s, at, &[&dev])[0].1, Message::Status(_)));
    dev.send(&mut s, at, &Request::Heartbeat);
    let out = sent(&mut s, at, &[&dev]);
    assert_eq!(status(&out[0].1), Some(403));
    assert_eq!((s.connections(), s.stats().expired), (0, 1));

    let mut s = service(ServiceConfig::default());
    dev.connected(&mut s, T0);
    s.handle_timeout(UnixMillis(at.0 - 1000));
    assert_eq!(s.connections(), 1);
    s.handle_timeout(at);
    assert_eq!((s.connections(), s.stats().expired), (0, 1));
}

/// A packet of a connection the node does not hold is answered 404; a
/// disconnect removes the connection and is answered.
#[test]
fn disconnect_then_404() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    dev.send(&mut s, T0, &Request::Disconnect);
    let out = sent(&mut s, T0, &[&dev]);
    assert!(matches!(out[0].1, Message::DisconnectResponse(_)));
    assert_eq!(header(&out[0].1).acknowledge, Some(dev.serial));
    assert_eq!((s.connections(), s.stats().disconnects), (0, 1));
    dev.send(&mut s, T0, &Request::Heartbeat);
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(status(&out[0].1), Some(404));
    assert_eq!(
        header(&out[0].1).status_description.as_deref(),
        Some("no such connection: connect again")
    );
    assert_eq!(s.stats().refused, 1);
    assert_eq!(s.stats().heartbeats, 0);
}

/// `poll_timeout`: nothing for an empty shard; with a connection, the next
/// sweep step (every second); the earliest of that, retransmissions,
/// resolve and catch-up deadlines.
#[test]
fn poll_timeout_is_the_earliest_deadline() {
    let mut s = service(ServiceConfig {
        resolve_timeout_ms: 300,
        ..ServiceConfig::default()
    });
    assert_eq!(s.poll_timeout(), None);
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    assert_eq!(s.poll_timeout(), Some(T0.plus_millis(1_000)));
    resolve(&mut dev, &mut s, T0.plus_millis(100), b"q");
    assert_eq!(s.poll_timeout(), Some(T0.plus_millis(400)));
    s.handle_timeout(T0.plus_millis(400));
    sent(&mut s, T0.plus_millis(400), &[&dev]);
    s.handle_publish(T0, "alice", &[1]).expect("published");
    sent(&mut s, T0.plus_millis(500), &[&dev]);
    assert_eq!(s.poll_timeout(), Some(T0.plus_millis(1_000)));
    s.handle_timeout(T0.plus_millis(1_000));
    assert_eq!(s.poll_timeout(), Some(T0.plus_millis(1_500)));
}

/// A connect of a held conn id bound to another account (a credential
/// for another account with the same conn id) replaces the connection: it
/// now belongs to the new account, and the old account's record stays.
/// The two names share their affinity (the first 4 bytes of SHA-256, as
/// a conn id carries it) and differ only in the next 4.
#[test]
fn a_conn_id_connecting_for_another_account_starts_afresh() {
    let (old, new) = ("a104074", "a109178");
    assert_eq!(AccountKey::of(old).affinity, AccountKey::of(new).affinity);
    assert_ne!(AccountKey::of(old).low, AccountKey::of(new).low);
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new(old, "phone", 4000);
    dev.connected(&mut s, T0);
    let binding = BindingKey::from_master(&master())
        .binding(dev.cred.conn_id, dev.cred.expires, new, "phone")
        .expect("binding");
    dev.cred.account = new.into();
    dev.cred.binding = binding;
    let r = dev.connected(&mut s, T0);
    assert_eq!(
        connect_response(&r).bitmask.as_deref(),
        Some(&[0xFF; MAX_BITMASK][..]),
        "a new account: a resync"
    );
    assert_eq!(s.connections(), 1);
    assert_eq!(s.table().accounts_len(), 2);
    let saved: Vec<_> = s.saved_connections().map(|(_, c)| c.account).collect();
    assert_eq!(saved, vec![AccountKey::of(new)]);
    assert_eq!(s.stats().connects, 2);
    assert_eq!(s.handle_publish(T0, old, &[1]), Ok(0));
    assert_eq!(s.handle_publish(T0, new, &[1]), Ok(1));
}

/// In a cluster, a connect whose mark this node can place is answered at
/// once; one whose mark it cannot (not one of this record's Serials) is
/// asked of the other nodes, and a resent connect meanwhile is answered
/// with that answer, once, acknowledging the latest connect.
#[test]
fn a_placeable_mark_is_answered_at_once_and_a_resent_parked_connect_once() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    s.set_hearing(T0, &[p], true);
    let mut a = Dev::new("alice", "phone", 4000);
    let r = a.connected(&mut s, T0);
    let mark = connect_response(&r).serial.expect("a Serial");
    assert_eq!(s.poll_event(), None);
    let mut b = Dev::new("alice", "tablet", 4001);
    let c = b.connect_packet(Some(mark));
    s.handle_datagram(T0, b.addr, &c);
    let out = sent(&mut s, T0, &[&b]);
    assert_eq!(connect_response(&out[0].1).bitmask, None);
    assert_eq!(s.poll_event(), None);
    let mut d = Dev::new("alice", "watch", 4002);
    let c = d.connect_packet(Some(5));
    s.handle_datagram(T0, d.addr, &c);
    let Some(ServiceEvent::CatchUpRequest { token, .. }) = s.poll_event() else {
        panic!("no catch-up request");
    };
    let again = d.connect_packet(Some(5));
    s.handle_datagram(T0, d.addr, &again);
    assert_eq!(s.poll_event(), None, "asked once");
    assert!(sent(&mut s, T0, &[&d]).is_empty());
    s.handle_catch_up_answer(token, Some(&[0x10]));
    let out = sent(&mut s, T0, &[&d]);
    assert_eq!(out.len(), 1);
    assert_eq!(
        connect_response(&out[0].1).bitmask.as_deref(),
        Some(&[0x10][..])
    );
    assert_eq!(header(&out[0].1).acknowledge, Some(d.serial));
    assert_eq!(s.stats().connects, 3);
}

/// docs/PROTOCOL.md §10.4: the cluster's answer to a connect in a
/// partition the node does not hear yet waits until it does; a partition
/// gap skips connects waiting for their answer (which covers it).
#[test]
fn a_parked_connect_takes_the_answer_not_the_gap() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    s.set_hearing(T0, &[p], true);
    let mut a = Dev::new("alice", "phone", 4000);
    a.connected(&mut s, T0);
    let mut b = Dev::new("alice", "tablet", 4001);
    let c = b.connect_packet(Some(5));
    s.handle_datagram(T0, b.addr, &c);
    let Some(ServiceEvent::CatchUpRequest { token, .. }) = s.poll_event() else {
        panic!("no catch-up request");
    };
    s.bus_gap(T0, p);
    let out = sent(&mut s, T0, &[&a, &b]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0.destination, a.addr);
    s.set_hearing(T0, &[p], false);
    s.handle_catch_up_answer(token, Some(&[0x10]));
    assert!(
        sent(&mut s, T0, &[&b]).is_empty(),
        "the partition is not heard"
    );
    s.set_hearing(T0, &[p], true);
    let out = sent(&mut s, T0, &[&a, &b]);
    let to_b: Vec<_> = out
        .iter()
        .filter(|(t, _)| t.destination == b.addr)
        .collect();
    assert_eq!(to_b.len(), 1, "{out:?}");
    assert_eq!(
        connect_response(&to_b[0].1).bitmask.as_deref(),
        Some(&[0x10][..])
    );
    assert_eq!(s.stats().partition_gaps, 2);
}

/// A connect parked for a partition not heard, answered at its deadline
/// (a resync), leaves its account to the next partition gap: hearing the
/// partition then resyncs it.
#[test]
fn a_connect_answered_before_its_partition_is_heard_takes_the_next_gap() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    let mut dev = Dev::new("alice", "phone", 4000);
    let c = dev.connect_packet(None);
    s.handle_datagram(T0, dev.addr, &c);
    let late = T0.plus_millis(500);
    s.handle_timeout(late);
    let out = sent(&mut s, late, &[&dev]);
    assert_eq!(
        connect_response(&out[0].1).bitmask.as_deref(),
        Some(&[0xFF; MAX_BITMASK][..])
    );
    s.set_hearing(late, &[p], true);
    assert_eq!(s.stats().partition_gaps, 1);
    let out = sent(&mut s, late, &[&dev]);
    assert!(matches!(out[0].1, Message::Notify(_)), "{out:?}");
}

/// At most 1024 connects wait for the cluster; more are resynchronised
/// at once.
#[test]
fn connects_beyond_the_parked_limit_resync_at_once() {
    let mut s = cluster_service();
    let mut rng = StdRng::seed_from_u64(9);
    let mut last = None;
    for i in 0..=1024u32 {
        let cred = Credential::issue(
            &master(),
            "alice",
            &format!("d{i}"),
            UnixSeconds(T0.seconds().0 + 3_600),
            Vec::new(),
            &mut rng,
        )
        .expect("credential");
        let mut dev = Dev {
            cred,
            addr: SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 4000)),
            serial: T0.seconds().0,
        };
        let c = dev.connect_packet(None);
        s.handle_datagram(T0, dev.addr, &c);
        last = Some(dev);
    }
    let last = last.expect("devices");
    let out = sent(&mut s, T0, &[&last]);
    assert_eq!(out.len(), 1, "only the last is answered");
    assert_eq!(
        connect_response(&out[0].1).bitmask.as_deref(),
        Some(&[0xFF; MAX_BITMASK][..])
    );
    assert_eq!(s.stats().connects, 1025);
}

/// Messages a device never sends, messages without a valid Serial, and
/// authentic packets that hold no message are counted and dropped without
/// an answer.
#[test]
fn service_messages_and_serial_zero_are_dropped() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    let status_msg = Message::Status(PresenceStatus::default());
    s.handle_datagram(T0, dev.addr, &sealed(&dev, &status_msg));
    assert_eq!(s.stats().dropped_unexpected, 1);
    let zero = dev.packet_with(0, None, None, &Request::Heartbeat);
    s.handle_datagram(T0, dev.addr, &zero);
    assert_eq!(s.stats().dropped_malformed, 1);
    // Authentic, but not a message.
    let key = dev
        .cred
        .secret
        .key(Direction::ClientToServer, dev.cred.conn_id);
    let mut buf = vec![0u8; MAX_PACKET];
    buf[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(b"junk");
    let n = seal_in_place(&key, dev.cred.conn_id, [4; 12], &mut buf, 4).expect("sealed");
    s.handle_datagram(T0, dev.addr, &buf[..n]);
    assert_eq!(s.stats().dropped_malformed, 2);
    assert_eq!(s.stats().dropped_auth, 0);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    assert_eq!(s.stats().heartbeats, 0);
}

/// `poll_transmit` writes nothing into a buffer shorter than `MAX_PACKET`,
/// and what waits stays queued.
#[test]
fn poll_transmit_needs_max_packet_bytes() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    let c = dev.connect_packet(None);
    s.handle_datagram(T0, dev.addr, &c);
    let mut short = vec![0u8; MAX_PACKET - 1];
    assert_eq!(s.poll_transmit(T0, &mut short), None);
    assert_eq!(s.stats().datagrams_out, 0);
    assert_eq!(sent(&mut s, T0, &[&dev]).len(), 1);
    assert_eq!(s.stats().datagrams_out, 1);
}

/// A notify acknowledged before it left is not sent (its publish stamp
/// still comes back).
#[test]
fn a_notify_acknowledged_before_it_leaves_is_not_sent() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    assert_eq!(s.handle_publish_stamped(T0, "alice", &[1], 9), Ok(1));
    let r = sent(&mut s, T0, &[&dev]);
    let serial = notify(&r[0].1).serial;
    assert_eq!(s.handle_publish_stamped(T0, "alice", &[2], 10), Ok(1));
    let p = dev.packet(
        serial.map(|s| s + 1),
        &Request::Acknowledge(serial.expect("a Serial") + 1),
    );
    s.handle_datagram(T0, dev.addr, &p);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    assert_eq!(s.poll_published(), Some(9));
    assert_eq!(s.poll_published(), Some(10));
    assert_eq!(s.stats().notifies_acked, 1);
}

/// A reply remembers the slot of its connection only while the slot still
/// holds it: a Status queued before its connection left, whose slot a new
/// connection took, carries none of the new connection's state.
#[test]
fn a_reply_for_a_gone_connection_does_not_read_its_slots_new_owner() {
    let mut s = service(ServiceConfig::default());
    let mut a = Dev::new("alice", "phone", 4000);
    validated(&mut a, &mut s, T0);
    a.send(&mut s, T0, &Request::Heartbeat);
    a.send(&mut s, T0, &Request::Disconnect);
    let mut b = Dev::new("bob", "phone", 4001);
    let c = b.connect_packet(None);
    s.handle_datagram(T0, b.addr, &c);
    let out = sent(&mut s, T0, &[&a, &b]);
    assert_eq!(out.len(), 3);
    match &out[0].1 {
        Message::Status(st) => assert_eq!((st.serial, st.bitmask.as_deref()), (None, None)),
        m => panic!("{m:?}"),
    }
    assert_eq!(
        connect_response(&out[2].1).bitmask.as_deref(),
        Some(&[0xFF; MAX_BITMASK][..])
    );
}

/// A retransmission timer is stale once a newer publish's notify left (it
/// armed its own) or the notify was acknowledged: neither sends again.
#[test]
fn stale_retransmission_timers_send_nothing() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    s.handle_publish(T0, "alice", &[1]).expect("published");
    assert_eq!(sent(&mut s, T0, &[&dev]).len(), 1);
    let later = T0.plus_millis(500);
    s.handle_publish(later, "alice", &[2]).expect("published");
    let out = sent(&mut s, later, &[&dev]);
    let serial = notify(&out[0].1).serial.expect("a Serial");
    let out = run_timers(&mut s, later, T0.plus_millis(1_600), &[&dev]);
    let times: Vec<u64> = out.iter().map(|(t, _)| t.0 - T0.0).collect();
    assert_eq!(times, vec![1_500], "only the newer notify's timer");
    let p = dev.packet(Some(serial), &Request::Heartbeat);
    s.handle_datagram(T0.plus_millis(1_600), dev.addr, &p);
    sent(&mut s, T0.plus_millis(1_600), &[&dev]);
    let out = run_timers(
        &mut s,
        T0.plus_millis(1_600),
        T0.plus_millis(60_000),
        &[&dev],
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(s.stats().notifies_retransmitted, 1);
}

/// docs/PROTOCOL.md §6: the sweep looks at a tenth of the table per step
/// (one step a second), so silent connections go within ten seconds.
#[test]
fn the_sweep_takes_a_tenth_of_the_table_per_step() {
    let mut s = service(ServiceConfig {
        connection_timeout_ms: 10_000,
        ..ServiceConfig::default()
    });
    for i in 0..25u16 {
        let mut dev = Dev::new("alice", &format!("d{i}"), 4000 + i);
        dev.connected(&mut s, T0);
    }
    // Idle for more than 20 s from the 21st second on.
    let mut expired = Vec::new();
    for step in 21..=31u64 {
        s.handle_timeout(T0.plus_millis(step * 1_000));
        expired.push(s.stats().expired);
    }
    assert_eq!(expired, vec![3, 6, 9, 12, 15, 18, 21, 24, 25, 25, 25]);
}

/// A restored connection with pending bits is queued for a notify at once
/// (its retransmission timer was not saved), with the saved bits and the
/// account's Serial.
#[test]
fn a_restored_connection_with_pending_bits_is_notified_at_once() {
    let mut s = service(ServiceConfig::default());
    let key = AccountKey::of("alice");
    let a = saved_account(key.affinity, key.low, 500);
    let to = SocketAddr::from(([192, 0, 2, 1], 4000));
    let mut c = saved_connection(1, &a);
    c.endpoint = Some(to);
    c.pending[..2].copy_from_slice(&[0x05, 0x01]);
    c.pending_len = 2;
    c.tries = 3;
    c.catch_up = true;
    c.validated = true;
    assert_eq!(s.restore(T0, &[a], &[c]).connections, 1);
    assert_eq!(s.transmit_backlog(), 1);
    let saved: Vec<SavedConnection> = s.saved_connections().map(|(_, c)| c).collect();
    assert_eq!(saved, vec![c]);
    let mut buf = vec![0u8; MAX_PACKET];
    let t = s.poll_transmit(T0, &mut buf).expect("a notify");
    assert_eq!(t.destination, to);
    let k = master()
        .secret(c.conn_id)
        .key(Direction::ServerToClient, c.conn_id);
    let mut d = buf[..t.size].to_vec();
    let plain = open_in_place(&k, &mut d).expect("sealed for the connection");
    match Message::decode_liberal(plain).expect("a message") {
        Message::Notify(n) => {
            assert_eq!(n.bitmask.as_deref(), Some(&[0x05, 0x01][..]));
            assert_eq!(n.serial, Some(500));
        }
        m => panic!("{m:?}"),
    }
}

/// `set_keys` files the current key under the parity the key set names
/// (0 or 1): a connection opened with it records that parity, and one
/// opened with the previous key the other.
#[test]
fn a_connection_records_the_parity_of_the_key_that_opened_it() {
    for parity in [0u8, 1] {
        let old = master();
        let new = MasterKey::new([9; 32]);
        let mut s = service(ServiceConfig::default());
        s.set_keys(KeySet {
            current: new.clone(),
            parity,
            previous: Some((old, T0.plus_millis(10_000))),
        });
        let mut fresh = Dev::issued(&new, 0, "bob", "phone", 4001);
        fresh.connected(&mut s, T0);
        let mut dev = Dev::new("alice", "phone", 4000);
        dev.connected(&mut s, T0);
        let mut parities: Vec<(AccountKey, u8)> = s
            .saved_connections()
            .map(|(_, c)| (c.account, c.key_parity))
            .collect();
        parities.sort_by_key(|&(a, _)| a != AccountKey::of("bob"));
        assert_eq!(
            parities,
            vec![
                (AccountKey::of("bob"), parity),
                (AccountKey::of("alice"), parity ^ 1)
            ],
            "key set parity {parity}"
        );
    }
}

/// docs/PROTOCOL.md §7.11: a new revocation drops every held connection
/// of the account it names (counted), and no other; a credential issued
/// at the new generation connects again, the revoked one is refused 401.
#[test]
fn a_revocation_drops_the_accounts_connections_and_only_those() {
    let mut s = service(ServiceConfig::default());
    let mut a = Dev::new("alice", "phone", 4000);
    let mut b = Dev::new("alice", "tablet", 4001);
    let mut c = Dev::new("bob", "phone", 4002);
    for d in [&mut a, &mut b, &mut c] {
        d.connected(&mut s, T0);
    }
    let mut r = Revocations::new();
    let generation = r.revoke_device("alice", "phone");
    s.set_revocations(T0, std::sync::Arc::new(r.clone()));
    assert_eq!((s.connections(), s.stats().revoked), (1, 2));
    // The same table again revokes nothing new.
    s.set_revocations(T0, std::sync::Arc::new(r));
    assert_eq!((s.connections(), s.stats().revoked), (1, 2));
    let c = a.connect_packet(None);
    s.handle_datagram(T0, a.addr, &c);
    let out = sent(&mut s, T0, &[&a]);
    assert_eq!(status(&out[0].1), Some(401));
    let mut again = Dev::issued(&master(), u64::from(generation), "alice", "phone", 4003);
    again.connected(&mut s, T0);
    b.connected(&mut s, T0);
    assert_eq!(s.connections(), 3);
}

/// docs/PROTOCOL.md §7.9: a connection's resolves are rate-limited (a
/// burst of 20): the 21st at once is refused 429 and counted, and is not
/// handed upstream.
#[test]
fn resolves_beyond_the_burst_are_refused_429() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    for _ in 0..21 {
        dev.send(&mut s, T0, &Request::Resolve(b"q"));
    }
    let mut events = 0;
    while s.poll_event().is_some() {
        events += 1;
    }
    assert_eq!(events, 20);
    assert_eq!((s.stats().resolves, s.stats().resolves_limited), (20, 1));
    let out = sent(&mut s, T0, &[&dev]);
    assert_eq!(out.len(), 1);
    assert_eq!(status(&out[0].1), Some(429));
}

/// docs/PROTOCOL.md §7: a held connection's packet replayed is dropped
/// (counted) with no answer and changes nothing.
#[test]
fn a_replayed_packet_is_dropped_and_counted() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    let p = dev.packet(None, &Request::Endpoint);
    s.handle_datagram(T0, dev.addr, &p);
    assert_eq!(sent(&mut s, T0, &[&dev]).len(), 1);
    let elsewhere = SocketAddr::from(([198, 51, 100, 7], 9999));
    s.handle_datagram(T0, elsewhere, &p);
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    assert_eq!((s.stats().dropped_replay, s.stats().migrations), (1, 0));
}

/// A shard of a cluster counts its connections per partition (for the
/// node's partition table); outside a cluster it counts nothing.
#[test]
fn partition_devices_counts_connections_per_partition() {
    let mut s = cluster_service();
    let p = partition_of("alice");
    let other = (0..)
        .map(|i| format!("user{i}"))
        .find(|a| partition_of(a) != p)
        .expect("an account in another partition");
    s.set_hearing(T0, &[0, 1, 2, 3], true);
    let mut devs = [
        Dev::new("alice", "phone", 4000),
        Dev::new("alice", "tablet", 4001),
        Dev::new(&other, "phone", 4002),
    ];
    for d in &mut devs {
        d.connected(&mut s, T0);
    }
    let mut want = [0u32; 4];
    want[p as usize] = 2;
    want[partition_of(&other) as usize] = 1;
    assert_eq!(s.partition_devices(), &want[..]);
    devs[0].send(&mut s, T0, &Request::Disconnect);
    want[p as usize] = 1;
    assert_eq!(s.partition_devices(), &want[..]);

    let mut alone = service(ServiceConfig::default());
    Dev::new("alice", "phone", 4000).connected(&mut alone, T0);
    assert_eq!(alone.partition_devices(), &[] as &[u32]);
}

/// An account whose devices all left keeps the sweep running (its
/// catch-up window must end): `poll_timeout` names the next sweep step
/// while the shard holds an account record and no connection.
#[test]
fn poll_timeout_runs_the_sweep_for_an_account_without_devices() {
    let mut s = service(ServiceConfig {
        catch_up_window_secs: 5,
        ..ServiceConfig::default()
    });
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    dev.send(&mut s, T0, &Request::Disconnect);
    sent(&mut s, T0, &[&dev]);
    assert_eq!((s.connections(), s.table().accounts_len()), (0, 1));
    assert_eq!(s.poll_timeout(), Some(T0.plus_millis(1_000)));
    // Run by poll_timeout alone, the sweep removes the account once its
    // window has passed, and then nothing is left to time.
    let mut now = T0;
    for _ in 0..60 {
        let Some(t) = s.poll_timeout() else { break };
        now = t;
        s.handle_timeout(now);
    }
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(s.stats().accounts_expired, 1);
    assert_eq!(now, T0.plus_millis(6_000));
}

/// A retransmission timer of a connection that left is stale for the
/// connection that takes its slot, even one of the same account at the
/// same Serial with bits pending (its catch-up): it sends and counts
/// nothing.
#[test]
fn a_timer_of_a_gone_connection_does_not_retransmit_to_its_slots_new_owner() {
    let mut s = service(ServiceConfig::default());
    let mut a = Dev::new("alice", "phone", 4000);
    validated(&mut a, &mut s, T0);
    s.handle_publish(T0, "alice", &[1]).expect("published");
    assert_eq!(sent(&mut s, T0, &[&a]).len(), 1);
    let out = run_timers(&mut s, T0, T0.plus_millis(1_000), &[&a]);
    assert_eq!(out.len(), 1, "the first retransmission");
    let later = T0.plus_millis(1_500);
    a.send(&mut s, later, &Request::Disconnect);
    sent(&mut s, later, &[&a]);
    let mut b = Dev::new("alice", "tablet", 4001);
    b.connected(&mut s, later);
    assert_eq!(s.table().slot_bound(), 1, "b took a's slot");
    let out = run_timers(&mut s, later, T0.plus_millis(10_000), &[&a, &b]);
    assert!(out.is_empty(), "{out:?}");
    let st = s.stats();
    assert_eq!((st.notifies_retransmitted, st.retransmits_held), (1, 0));
}

/// docs/PROTOCOL.md §7.9: an answer that needs fragments is never sent to
/// an endpoint not validated, even one within three times its request (a
/// `MAX_PACKET` resolve): it is dropped and counted.
#[test]
fn a_fragmented_answer_to_an_unvalidated_endpoint_is_dropped_and_counted() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    dev.connected(&mut s, T0);
    let p = full_size_resolve(&mut dev);
    s.handle_datagram(T0, dev.addr, &p);
    let Some(ServiceEvent::ResolveUpstream { token, .. }) = s.poll_event() else {
        panic!("no resolve");
    };
    let answer = vec![0x61; 2 * MAX_PACKET];
    assert!(answer.len() + RESOLVE_OVERHEAD <= 3 * MAX_PACKET);
    s.handle_resolve_answer(token, Ok(&answer));
    assert!(sent(&mut s, T0, &[&dev]).is_empty());
    assert_eq!(s.stats().replies_capped, 1);
    assert_eq!(s.stats().datagrams_out, 1, "the connect's answer only");
}

/// Once the last fragment of a message is out, nothing of it is left in
/// the backlog: `transmit_backlog` falls to 0 with the last
/// `poll_transmit` that sends something.
#[test]
fn the_backlog_is_empty_once_the_last_fragment_is_out() {
    let mut s = service(ServiceConfig::default());
    let mut dev = Dev::new("alice", "phone", 4000);
    validated(&mut dev, &mut s, T0);
    let t = resolve(&mut dev, &mut s, T0, b"big");
    s.handle_resolve_answer(t, Ok(&[0x62; 3000]));
    let mut buf = vec![0u8; MAX_PACKET];
    let mut fragments = 0;
    while s.transmit_backlog() > 0 {
        assert!(
            s.poll_transmit(T0, &mut buf).is_some(),
            "the backlog is real"
        );
        fragments += 1;
        assert!(fragments < 100);
    }
    assert!(fragments > 1);
    assert_eq!(s.poll_transmit(T0, &mut buf), None);
}
