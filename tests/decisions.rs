//! One test per decision of docs/PROTOCOL.md ("Where we decided what the
//! spec leaves open", D1–D34) and of README that no other test pins down,
//! each named after its decision and written so that it fails when the
//! decision is taken out of the code (each was seen failing that way; the
//! commit that added it says how). The decision list in docs/PROTOCOL.md
//! names the test of every decision, here or elsewhere.
//!
//! The protocol's decisions run on the simulated network (`tests/sim`,
//! virtual clock, no sockets); the node's (one node per port, backpressure,
//! the DNS relay) on a node started in-process on loopback (`tests/node`).

// Its on_both_drivers! macro is not used here.
#[allow(unused_macros)]
mod node;
mod sim;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mpp::codec::Message;
use mpp::config::IoChoice;
use mpp::proto::{ClientConfig, ClientEvent, ClientState, ServiceConfig};

use node::{deadline, TestNode, POLL};
use sim::{Knobs, Sim};

fn connected(sim: &Sim, d: usize) -> bool {
    sim.devices[d].client.state() == ClientState::Connected
}

/// A connected device of `account` on a clean network, its catch-up
/// acknowledged.
fn one_device(seed: u64, account: &str) -> (Sim, usize) {
    let mut sim = Sim::new(seed, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device(account, ClientConfig::default());
    sim.run_for(2_000);
    assert!(connected(&sim, d), "{:?}", sim.devices[d].client.state());
    assert!(sim.all_acknowledged());
    (sim, d)
}

/// D1: a Serial must be 1 to 2³² − 1; a packet with a missing, zero,
/// negative or larger Serial is dropped as malformed, unanswered and
/// without touching the replay window. The bounds themselves are valid.
#[test]
fn d1_serials_outside_1_to_2_pow_32_are_invalid() {
    let (mut sim, d) = one_device(101, "alice");
    let next = sim.devices[d].client.highest_serial_sent() + 1;
    let before = sim.server.stats().clone();
    let invalid = [
        r#"{"PresenceHeartbeat":{}}"#.to_owned(),
        r#"{"PresenceHeartbeat":{"Serial":0}}"#.to_owned(),
        r#"{"PresenceHeartbeat":{"Serial":-1}}"#.to_owned(),
        format!(r#"{{"PresenceHeartbeat":{{"Serial":{}}}}}"#, -next),
        // 2³² + next: the next fresh Serial if it were cut to 32 bits.
        format!(
            r#"{{"PresenceHeartbeat":{{"Serial":{}}}}}"#,
            (1i64 << 32) + next
        ),
        format!(r#"{{"PresenceHeartbeat":{{"Serial":{}}}}}"#, 1i64 << 32),
        format!(r#"{{"PresenceHeartbeat":{{"Serial":{}}}}}"#, i64::MAX),
    ];
    for json in &invalid {
        assert_eq!(sim.send_raw(d, json), [], "{json} was answered");
    }
    let stats = sim.server.stats();
    assert_eq!(
        stats.dropped_malformed - before.dropped_malformed,
        invalid.len() as u64
    );
    assert_eq!(stats.dropped_replay, before.dropped_replay);
    assert_eq!(stats.heartbeats, before.heartbeats);
    // The window did not move: the next Serial is still fresh, and so is
    // the largest valid one.
    for serial in [next, i64::from(u32::MAX)] {
        let json = format!(r#"{{"PresenceHeartbeat":{{"Serial":{serial}}}}}"#);
        let answers = sim.send_raw(d, &json);
        assert!(
            matches!(&answers[..], [Message::Status(s)] if s.header.acknowledge == Some(serial)),
            "Serial {serial}: {answers:?}"
        );
    }
    assert_eq!(sim.server.stats().heartbeats, before.heartbeats + 2);
}

/// D2: a client starts its Serials at the current Unix time in seconds,
/// and moves up to the clock at its next round of connects (a Serial it
/// was told to start from, 1 here, is kept for its first round only).
#[test]
fn d2_client_serials_follow_the_clock() {
    let mut sim = Sim::new(102, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    let low = ClientConfig {
        first_serial: Some(1),
        ..ClientConfig::default()
    };
    let e = sim.add_device("bob", low);
    // No answers: rounds of three connects, 60 s apart.
    sim.devices[d].online = false;
    sim.devices[e].online = false;
    sim.run_for(10);
    assert_eq!(
        sim.devices[d].client.highest_serial_sent(),
        sim.now.seconds().0
    );
    assert_eq!(sim.devices[e].client.highest_serial_sent(), 1);
    sim.run_for(3_500);
    assert_eq!(sim.devices[e].client.highest_serial_sent(), 3);
    let round = sim.now.seconds().0 + 59;
    sim.run_for(60_000);
    let serial = sim.devices[e].client.highest_serial_sent();
    assert!(
        (round..=sim.now.seconds().0).contains(&serial),
        "the second round's connect has Serial {serial}, the clock is {}",
        sim.now.seconds().0
    );
}

/// D2: a rebooted device whose Serials land on Serials the node has seen
/// gets its connects dropped as replays; its next round jumps 64 ahead,
/// past the node's window, and connects at once.
#[test]
fn d2_a_rebooted_clients_next_round_jumps_64_ahead() {
    let mut sim = Sim::new(103, Knobs::default(), ServiceConfig::default());
    let cred = sim.credential("alice", "phone", 86_400);
    // Above the clock, so that the clock does not move the Serials.
    let first = sim.now.seconds().0 + 1_000;
    let config = ClientConfig {
        first_serial: Some(first),
        ..ClientConfig::default()
    };
    let a = sim.add_device_with(&cred, config.clone());
    sim.run_for(2_000);
    assert!(connected(&sim, a));
    for _ in 0..10 {
        sim.devices[a].client.request_endpoint();
    }
    sim.run_for(100);
    let used = sim.devices[a].client.highest_serial_sent();
    assert!((first + 10..first + 60).contains(&used), "{used}");
    // The device reboots: same credential, same address, the same Serials.
    sim.devices[a].online = false;
    let address = sim.devices[a].addr;
    sim.devices[a].addr = "127.0.0.2:1".parse().expect("addr");
    let b = sim.add_device_with(&cred, config);
    sim.devices[b].addr = address;
    let replays = sim.server.stats().dropped_replay;
    sim.run_for(3_500);
    assert_eq!(
        sim.server.stats().dropped_replay - replays,
        3,
        "a round of three connects, all replays"
    );
    assert!(!connected(&sim, b));
    // The next round, after ClientConfig::reconnect_ms (60 s).
    sim.run_for(60_000);
    assert!(
        connected(&sim, b),
        "the second round did not connect: {:?}",
        sim.devices[b].client.state()
    );
    assert_eq!(
        sim.server.stats().dropped_replay - replays,
        3,
        "the second round's connect was fresh"
    );
    assert!(sim.devices[b].client.highest_serial_sent() > first + 2 + 64);
}

/// D8: the `Acknowledge` field of any client message acknowledges the
/// notify with that Serial; `PresenceAcknowledge` gets no answer.
#[test]
fn d8_any_message_acknowledges_and_presence_acknowledge_gets_no_answer() {
    let (mut sim, d) = one_device(104, "alice");
    // The device hears nothing from now on, so it acknowledges nothing by
    // itself: the test speaks for it.
    sim.devices[d].online = false;
    let mut serial = sim.devices[d].client.highest_serial_sent();
    let cases = [
        ("PresenceHeartbeat", "PresenceStatus"),
        ("PresenceEndpointRequest", "PresenceEndpointResponse"),
        ("PresenceAcknowledge", ""),
    ];
    for (i, (request, answer)) in cases.into_iter().enumerate() {
        sim.server
            .handle_publish(sim.now, "alice", &[1 << i])
            .expect("published");
        let notify = match &sim.answers(d)[..] {
            [Message::Notify(n)] => n.serial.expect("a Serial"),
            other => panic!("not one notify: {other:?}"),
        };
        assert!(!sim.all_acknowledged());
        let acked = sim.server.stats().notifies_acked;
        serial += 1;
        let json = format!(r#"{{"{request}":{{"Serial":{serial},"Acknowledge":{notify}}}}}"#);
        let answers = sim.send_raw(d, &json);
        assert!(sim.all_acknowledged(), "{request} did not acknowledge");
        assert_eq!(sim.server.stats().notifies_acked, acked + 1);
        let names: Vec<&str> = answers.iter().map(Message::name).collect();
        let expected: Vec<&str> = [answer].into_iter().filter(|a| !a.is_empty()).collect();
        assert_eq!(names, expected, "{request}");
    }
    // Acknowledging nothing pending: still no answer.
    serial += 1;
    let json = format!(r#"{{"PresenceAcknowledge":{{"Serial":{serial},"Acknowledge":5}}}}"#);
    assert_eq!(sim.send_raw(d, &json), []);
}

/// D12: a second node on the node's UDP port is refused at start, even
/// though the sockets of both would join one SO_REUSEPORT group; the first
/// node goes on serving its devices.
#[test]
fn d12_a_second_node_on_the_port_is_refused() {
    // The socket layer: a second group on the first group's port.
    let first = mpp::net::socket::bind_group("127.0.0.1:0".parse().expect("addr"), 2, 0)
        .expect("first group");
    let port = first[0].local_addr().expect("addr");
    let err = mpp::net::socket::bind_group(port, 2, 0).expect_err("a second group joined");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
    drop(first);
    // The node.
    let node = TestNode::start(IoChoice::Mmsg);
    let dir = node::TempDir::new("second-node");
    let mut config = node::node_config(IoChoice::Mmsg, dir.path());
    config.udp = node.udp;
    match mpp::node::start(&config, false) {
        Ok(_) => panic!("a second node started on {}", node.udp),
        Err(e) => assert!(
            e.to_string().contains(&node.udp.to_string()),
            "the error names the port: {e}"
        ),
    }
    let mut d = node.device("alice", "phone");
    node.publish("alice", "01");
    assert_eq!(d.wait_notify()[0].1, [0x01]);
}

/// D25 (and README "backpressure"): while 16k datagrams wait to leave a
/// shard, the shard takes no more publishes from its inbox; the inbox
/// fills and the control plane answers 503 with the count it accepted.
/// Once the datagrams leave, publishes are taken again.
#[test]
fn d25_a_send_backlog_of_16k_refuses_publishes_with_503() {
    const BACKLOG_HIGH: u64 = 16 * 1024;
    const INBOX: usize = 4;
    let hold = Arc::new(AtomicBool::new(true));
    let hooks = mpp::node::TestHooks {
        hold_sends: Some(hold.clone()),
        ..mpp::node::TestHooks::default()
    };
    let node = TestNode::start_hooked(IoChoice::Mmsg, hooks, |c| {
        c.threads = 1;
        c.inbox_capacity = INBOX;
        c.stun_rate = 0; // unlimited: every request is answered
    });
    let publish = |account: &str| {
        let body = serde_json::json!({"account": account, "bitmask": "01"});
        node::http(
            node.http,
            "POST",
            "/v1/notify",
            Some(&node.token),
            "application/json",
            body.to_string().as_bytes(),
        )
    };
    // Sends are held: every STUN answer waits in the shard's queue.
    let peer = node::bind_udp(node.udp);
    let mut sent = 0u64;
    let until = deadline() + Duration::from_secs(20);
    loop {
        let answered = node.metrics().shard("mpp_stun_answered_total", 0);
        if answered >= BACKLOG_HIGH {
            break;
        }
        assert!(
            Instant::now() < until,
            "only {answered} STUN answers queued"
        );
        // In bursts the socket's buffer takes, then a look at the count.
        for _ in 0..(BACKLOG_HIGH - answered).min(2_000) {
            let (_, request) = node::binding_request();
            peer.send_to(&request, node.udp).expect("send");
            sent += 1;
        }
        std::thread::sleep(POLL);
    }
    assert!(sent >= BACKLOG_HIGH);
    // The inbox takes INBOX publishes, which the shard leaves there; the
    // next is refused.
    for i in 0..INBOX {
        let r = publish(&format!("user{i}"));
        assert_eq!(r.status, 202, "publish {i}: {}", r.text());
    }
    let r = publish("one-too-many");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["accepted"], 0, "{}", r.text());
    assert!(node.metrics().shard("mpp_publishes_total", 0) == 0);
    // The datagrams leave; the shard takes its inbox again.
    hold.store(false, Ordering::Relaxed);
    let until = deadline();
    loop {
        let r = publish("after");
        if r.status == 202 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(Instant::now() < until, "publishes stayed refused");
        std::thread::sleep(POLL);
    }
}

/// D21 over UDP: a resolve is relayed to the configured upstream and its
/// answer comes back in the resolve response; without an upstream, and for
/// an empty query, the answer is 502 at once.
#[test]
fn d21_dns_relay_and_502_without_upstream() {
    const CANNED: &[u8] = b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00udp-answer";
    let dns = node::FakeDns::start(Some(CANNED));
    let resolve = |node: &TestNode, query: Vec<u8>| {
        let mut d = node.device("rita@example.com", "phone");
        d.events.clear();
        d.client.resolve(query);
        assert!(
            d.pump(
                |e| e.iter().any(|e| matches!(e, ClientEvent::Resolved(_))),
                deadline()
            ),
            "no resolve response: {:?}",
            d.events
        );
        d.events
            .into_iter()
            .filter(|e| matches!(e, ClientEvent::Resolved(_)))
            .collect::<Vec<_>>()
    };
    let relay = TestNode::start_with(IoChoice::Mmsg, |c| c.dns_upstream = Some(dns.addr));
    let query = node::dns_query(0x1234);
    let mut expected = query[..2].to_vec();
    expected.extend_from_slice(CANNED);
    assert_eq!(
        resolve(&relay, query.clone()),
        [ClientEvent::Resolved(Ok(expected))]
    );
    assert_eq!(
        dns.queries.lock().expect("lock").clone(),
        std::slice::from_ref(&query)
    );
    assert_eq!(
        resolve(&relay, Vec::new()),
        [ClientEvent::Resolved(Err(502))],
        "an empty query"
    );
    let alone = TestNode::start(IoChoice::Mmsg);
    assert_eq!(
        resolve(&alone, query),
        [ClientEvent::Resolved(Err(502))],
        "no upstream"
    );
    assert_eq!(dns.queries.lock().expect("lock").len(), 1);
}

/// D17: a notify answers no request; its `Acknowledge` is the highest
/// client Serial the node has seen on the connection.
#[test]
fn d17_a_notify_acknowledges_the_highest_client_serial() {
    let (mut sim, d) = one_device(106, "alice");
    for _ in 0..5 {
        sim.devices[d].client.request_endpoint();
    }
    sim.run_for(100);
    let highest = sim.devices[d].client.highest_serial_sent();
    sim.devices[d].online = false;
    sim.server
        .handle_publish(sim.now, "alice", &[4])
        .expect("published");
    match &sim.answers(d)[..] {
        [Message::Notify(n)] => assert_eq!(n.header.acknowledge, Some(highest)),
        other => panic!("not one notify: {other:?}"),
    }
}

/// D27: a shard shedding a connect storm answers a connect that would
/// create a connection with `PresenceErrorRefused` 503 and a retry-after
/// of 1 to 2 s in `StatusExtended`; held connections are served as usual,
/// and once the shedding ends the same connect creates its connection.
#[test]
fn d27_a_shedding_shard_answers_new_connects_503_with_a_retry_after() {
    let (mut sim, a) = one_device(107, "alice");
    let b = sim.add_device("bob", ClientConfig::default());
    sim.devices[b].online = false;
    let mut buf = vec![0u8; 2048];
    let size = sim.devices[b]
        .client
        .poll_transmit(&mut buf)
        .expect("a connect")
        .size;
    let connect = buf[..size].to_vec();
    sim.server.shed_connects(sim.now.plus_millis(1_000));
    let from = sim.devices[b].addr;
    sim.server.handle_datagram(sim.now, from, &connect);
    match &sim.answers(b)[..] {
        [Message::ErrorRefused(r)] => {
            assert_eq!(r.header.status, Some(503));
            let after = r.header.status_extended.expect("a retry-after");
            assert!((1_000..=2_000).contains(&after), "retry after {after} ms");
        }
        other => panic!("not one 503: {other:?}"),
    }
    assert_eq!(sim.server.stats().connects_shed, 1);
    assert_eq!(sim.server.connections(), 1);
    // The held connection is served meanwhile.
    let serial = sim.devices[a].client.highest_serial_sent() + 1;
    let answers = sim.send_raw(
        a,
        &format!(r#"{{"PresenceHeartbeat":{{"Serial":{serial}}}}}"#),
    );
    assert!(matches!(&answers[..], [Message::Status(_)]), "{answers:?}");
    // After the shedding, the connect (a fresh Serial) is taken.
    sim.now = sim.now.plus_millis(1_001);
    let size = sim.devices[b]
        .client
        .poll_transmit(&mut buf)
        .map(|t| t.size);
    let packet = match size {
        Some(n) => buf[..n].to_vec(),
        None => {
            sim.devices[b].client.handle_timeout(sim.now);
            let n = sim.devices[b]
                .client
                .poll_transmit(&mut buf)
                .expect("a connect again")
                .size;
            buf[..n].to_vec()
        }
    };
    sim.server.handle_datagram(sim.now, from, &packet);
    let answers = sim.answers(b);
    assert!(
        matches!(&answers[..], [Message::ConnectResponse(_), ..]),
        "{answers:?}"
    );
    assert_eq!(sim.server.connections(), 2);
}

/// D30: the client takes a reply once, and only one that acknowledges one
/// of its last 64 Serials: the same reply again, or a reply to a Serial it
/// never sent, is dropped.
#[test]
fn d30_replies_are_accepted_once() {
    let (mut sim, d) = one_device(108, "alice");
    sim.devices[d].online = false;
    let mut buf = vec![0u8; 2048];
    sim.devices[d].client.request_endpoint();
    let size = sim.devices[d]
        .client
        .poll_transmit(&mut buf)
        .expect("a request")
        .size;
    let from = sim.devices[d].addr;
    let request = buf[..size].to_vec();
    sim.server.handle_datagram(sim.now, from, &request);
    let t = sim.server.poll_transmit(sim.now, &mut buf).expect("answer");
    let reply = buf[..t.size].to_vec();
    let endpoints = |sim: &mut Sim| {
        let mut n = 0;
        while let Some(e) = sim.devices[d].client.poll_event() {
            n += usize::from(matches!(e, ClientEvent::Endpoint(_)));
        }
        n
    };
    let stats = sim.devices[d].client.stats().clone();
    sim.devices[d].client.handle_datagram(sim.now, &reply);
    assert_eq!(endpoints(&mut sim), 1);
    sim.devices[d].client.handle_datagram(sim.now, &reply);
    assert_eq!(endpoints(&mut sim), 0, "the same reply taken twice");
    // Replies to Serials it did not send lately: the next one, and one 64
    // below the highest (outside the window).
    let conn_id = sim.devices[d].client.conn_id();
    let key = sim
        .master
        .secret(conn_id)
        .key(mpp::packet::Direction::ServerToClient, conn_id);
    let high = sim.devices[d].client.highest_serial_sent();
    for ack in [high + 1, high - 64] {
        let json = format!(
            r#"{{"PresenceEndpointResponse":{{"EndPoint":{{"IpAddress":"fwAAAQ","Port":1}},"Acknowledge":{ack}}}}}"#
        );
        let m = Message::from_json_str(&json).expect("a message");
        let forged =
            mpp::packet::seal(&key, conn_id, [ack as u8; 12], &m.to_vec()).expect("sealed");
        sim.devices[d].client.handle_datagram(sim.now, &forged);
        assert_eq!(endpoints(&mut sim), 0, "a reply to Serial {ack} taken");
    }
    let after = sim.devices[d].client.stats();
    assert_eq!(after.received, stats.received + 1);
    assert_eq!(after.replays_dropped, stats.replays_dropped + 3);
}
