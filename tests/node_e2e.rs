//! The node end to end, in-process (`mpp::node::start`): real sockets on
//! loopback, the HTTP control plane spoken to with raw HTTP/1.1, devices that
//! are the library's sans-IO `Client` over std UDP sockets.
//!
//! Every case that touches the data path runs once per I/O driver (`uring::*`
//! and `mmsg::*`). Each test starts its own node (UDP and HTTP on port 0, two
//! unpinned shards, its own data directory). Waits are bounded: read
//! timeouts, and loops with an iteration cap and a 10 s deadline that only a
//! failure reaches.

#[macro_use]
mod node;

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpp::config::IoChoice;
use mpp::net::socket::bind_group;
use mpp::net::{IoBackend, Waker};
use mpp::node::router::Fault;
use mpp::node::router::{Router, ShardMessage};
use mpp::node::shard::{ShardHealth, ShardMetrics};
use mpp::node::{shard::ShardSetup, Clock, StartError, TestHooks};
use mpp::packet::{account_affinity, Credential, MasterKey, MAX_PACKET};
use mpp::proto::{ClientConfig, ClientEvent, ServiceConfig};
use mpp::time::UnixSeconds;

use node::{
    binding_request, deadline, dns_query, notifies, pump_all, receives_within, Device, FakeDns,
    Metrics, TestNode, POLL, WAIT,
};

on_both_drivers!(
    publish_is_notified_and_acknowledged,
    every_device_of_the_account_is_notified_and_no_other,
    connections_are_steered_to_their_accounts_shard,
    misrouted_datagrams_are_forwarded_through_the_router,
    nat_rebinding_moves_the_endpoint,
    forged_and_replayed_packets_get_no_reply,
    stun_binding_request_gets_the_mapped_address,
    stun_binding_request_over_ipv6,
    web_transport_answers_an_endpoint_request,
    shutdown_stops_every_thread_and_frees_the_ports,
    a_web_listener_takes_the_web_transport_off_the_control_port,
    web_transport_returns_the_resolve_answer,
    web_transport_returns_a_resolve_timeout,
    a_shard_whose_io_fails_makes_the_node_unhealthy_and_exit,
    fallback_steering_keeps_garbage_away_from_publishes,
);

/// A client that never resends a connect within a test's deadline, so
/// counters of connects are exact even on a slow machine.
fn patient() -> ClientConfig {
    ClientConfig {
        retry_ms: 30_000,
        ..ClientConfig::default()
    }
}

/// Case 1: subscribe, publish over HTTP, the device gets the bitmask and
/// acknowledges it.
fn publish_is_notified_and_acknowledged(io: IoChoice) {
    let node = TestNode::start(io);
    let mut phone = node.device("alice@example.com", "phone");

    node.publish("alice@example.com", "05");
    let got = phone.wait_notify();
    assert_eq!(got.len(), 1, "one notify event per Serial: {got:?}");
    assert_eq!(got[0].1, [0x05], "the published bitmask");

    let m = node.wait_metrics("mpp_notifies_acked_total summing to 1", |m| {
        m.sum("mpp_notifies_acked_total", &[]) >= 1
    });
    assert_eq!(m.sum("mpp_notifies_acked_total", &[]), 1);
    assert_eq!(m.sum("mpp_notifies_sent_total", &[]), 1);
    assert_eq!(m.sum("mpp_publishes_total", &[]), 1);
    assert_eq!(m.sum("mpp_connections", &[]), 1);
    let samples = m.samples("mpp_notifies_acked_total");
    assert_eq!(
        samples.len(),
        node.shards,
        "one sample per shard: {samples:?}"
    );
    assert_eq!(phone.strays, 0);
}

/// Case 2: three devices of one account (three source ports) are notified by
/// one publish; a device of another account is not.
fn every_device_of_the_account_is_notified_and_no_other(io: IoChoice) {
    let node = TestNode::start(io);
    let mut family: Vec<Device> = ["phone", "laptop", "watch"]
        .iter()
        .map(|d| node.device("carol@example.com", d))
        .collect();
    let ports: std::collections::BTreeSet<u16> =
        family.iter().map(|d| d.local_addr().port()).collect();
    assert_eq!(ports.len(), 3, "three distinct source ports");
    let mut stranger = node.device("dave@example.com", "phone");

    node.publish("carol@example.com", "0102");
    assert!(
        pump_all(
            &mut family,
            |ds| ds.iter().all(|d| !notifies(&d.events).is_empty()),
            deadline()
        ),
        "not every device was notified: {:?}",
        family.iter().map(|d| &d.events).collect::<Vec<_>>()
    );
    let serials: Vec<i64> = family
        .iter()
        .map(|d| {
            let n = notifies(&d.events);
            assert_eq!(n.len(), 1, "{n:?}");
            assert_eq!(n[0].1, [0x01, 0x02], "the published bitmask");
            n[0].0
        })
        .collect();
    assert!(
        serials.windows(2).all(|w| w[0] == w[1]),
        "one account Serial: {serials:?}"
    );

    // Exactly three notifies went out and all three were acknowledged, so
    // the other account's device was not notified; its socket stays quiet.
    let m = node.wait_metrics("three notifies acknowledged", |m| {
        m.sum("mpp_notifies_acked_total", &[]) >= 3
    });
    assert_eq!(m.sum("mpp_notifies_sent_total", &[]), 3);
    assert_eq!(m.sum("mpp_notifies_acked_total", &[]), 3);
    stranger.pump_for(Duration::from_millis(300));
    assert!(
        notifies(&stranger.events).is_empty(),
        "{:?}",
        stranger.events
    );
    assert_eq!(stranger.strays, 0);
}

/// `n` accounts whose affinity is `shard` mod 2.
fn accounts_on(shard: u32, n: usize, tag: &str) -> Vec<String> {
    (0..10_000)
        .map(|i| format!("{tag}{i}@example.com"))
        .filter(|a| account_affinity(a) % 2 == shard)
        .take(n)
        .collect()
}

/// Case 3: with two shards, the cBPF program delivers each connection's
/// datagrams to the socket of the shard that owns its account
/// (affinity mod 2), so nothing needs the router.
fn connections_are_steered_to_their_accounts_shard(io: IoChoice) {
    let node = TestNode::start(io);
    assert_eq!(node.shards, 2);
    let even = accounts_on(0, 2, "even");
    let odd = accounts_on(1, 3, "odd");
    let mut devices = Vec::new();
    for account in even.iter().chain(&odd) {
        let mut d = Device::with_config(&node.credential(account, "phone"), node.udp, patient());
        d.connect();
        assert_eq!(d.client.conn_id().affinity(), account_affinity(account));
        devices.push(d);
    }
    let m = node.wait_metrics("2 connects on shard 0 and 3 on shard 1", |m| {
        m.sum("mpp_connects_total", &[]) >= 5
    });
    assert_eq!(m.shard("mpp_connects_total", 0), 2, "{}", m.samples_text());
    assert_eq!(m.shard("mpp_connects_total", 1), 3, "{}", m.samples_text());
    assert_eq!(m.shard("mpp_connections", 0), 2);
    assert_eq!(m.shard("mpp_connections", 1), 3);
    assert_eq!(m.sum("mpp_threads", &[]), 2);
    // A datagram that reached the wrong shard's socket would have been
    // forwarded (or dropped there).
    assert_eq!(
        m.sum("mpp_misrouted_forwarded_total", &[]) + m.sum("mpp_misrouted_dropped_total", &[]),
        0,
        "a datagram reached the wrong shard's socket: the steering program is not attached \
         or selects another socket than affinity mod N"
    );
    assert_eq!(m.sum("mpp_forwarded_in_total", &[]), 0);
    assert_eq!(m.sum("mpp_router_forwarded_total", &[]), 0);
}

/// Case 4: the router's forward path. The node attaches the steering
/// program (or refuses to start), so from outside a datagram cannot be made
/// to reach the wrong socket. The shard layer is public, though: this runs two real shard loops
/// (`mpp::node::shard::run`) over a SO_REUSEPORT group *without* the program, the
/// fallback mode of docs/PROTOCOL.md §8, where the kernel spreads flows by hash.
/// Devices of one account connect from new source ports until one lands on
/// the other shard's socket; every one must still be served by the owner.
fn misrouted_datagrams_are_forwarded_through_the_router(io: IoChoice) {
    let backend = match io {
        IoChoice::Uring => IoBackend::Uring,
        _ => IoBackend::Mmsg,
    };
    let sockets = bind_group("127.0.0.1:0".parse().expect("addr"), 2, 1 << 20).expect("bind");
    let addr = sockets[0].local_addr().expect("addr");
    let wakers: Vec<Arc<Waker>> = (0..2)
        .map(|_| Arc::new(Waker::new().expect("eventfd")))
        .collect();
    let (router, inboxes) = Router::new(wakers.clone(), 1024);
    let master: [u8; 32] = rand::random();
    let clock = Clock::new();
    let metrics: Vec<Arc<Mutex<ShardMetrics>>> = (0..2)
        .map(|i| {
            Arc::new(Mutex::new(ShardMetrics {
                shard: i,
                ..ShardMetrics::default()
            }))
        })
        .collect();
    let health = ShardHealth::new(2);
    let mut threads = Vec::new();
    for (i, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
        let setup = ShardSetup {
            id: i,
            cpu: None,
            backend,
            batch: 64,
            spin: std::time::Duration::from_micros(100),
            socket,
            inbox,
            waker: wakers[i].clone(),
            router: router.clone(),
            server: ServiceConfig::default(),
            keys: mpp::proto::KeySet {
                current: MasterKey::new(master),
                parity: 0,
                previous: None,
            },
            revocations: Arc::new(mpp::proto::revocation::Revocations::new()),
            revocations_changed_since_save: false,
            dns: None,
            metrics: metrics[i].clone(),
            clock,
            restore: None,
            save: None,
            health: health.clone(),
            hold_sends: None,
            cluster: None,
        };
        threads.push(std::thread::spawn(move || mpp::node::shard::run(setup)));
    }
    /// Stops the shards even when an assertion fails.
    struct StopShards(Arc<Router>);
    impl Drop for StopShards {
        fn drop(&mut self) {
            self.0.shutdown_all();
        }
    }
    let stop = StopShards(router.clone());

    let account = "router@example.com";
    let owner = router.shard_of_account(account);
    let other = 1 - owner;
    let master_key = MasterKey::new(master);
    let expires = UnixSeconds(node::now().seconds().0 + 3600);
    let mut devices = Vec::new();
    for i in 0..32 {
        let credential = Credential::issue(
            &master_key,
            account,
            &format!("device{i}"),
            expires,
            vec![addr.to_string()],
            &mut rand::rngs::OsRng,
        )
        .expect("issue");
        let mut d = Device::with_config(&credential, addr, patient());
        d.connect();
        devices.push(d);
        // Only misrouted datagrams are forwarded.
        if devices.len() >= 4 && router.forwarded_datagrams(owner) > 0 {
            break;
        }
    }
    let forwarded = router.forwarded_datagrams(owner);
    assert!(
        forwarded > 0,
        "none of {} flows was hashed to shard {other}'s socket (odds 2^-32): \
         is a steering program attached to a fresh group?",
        devices.len()
    );
    assert_eq!(router.forwarded_datagrams(other), 0);
    assert_eq!(
        router.forwarded(owner),
        0,
        "nothing took the inbox of publishes"
    );

    assert!(router
        .send(
            owner,
            ShardMessage::Publish {
                account: account.into(),
                bitmask: vec![0x09],
                stamp: 0,
            },
        )
        .is_ok());
    assert!(
        pump_all(
            &mut devices,
            |ds| ds.iter().all(|d| !notifies(&d.events).is_empty()),
            deadline()
        ),
        "a device behind a misrouted flow was not notified"
    );
    for d in &devices {
        assert_eq!(notifies(&d.events)[0].1, [0x09]);
    }

    let n = devices.len() as u64;
    let snapshot = |i: usize| metrics[i].lock().expect("metrics").clone();
    let until = deadline();
    // Each shard publishes its counters every 200 ms: wait for both to show
    // the (monotonic) counts checked below.
    for _ in 0..10_000 {
        let done = snapshot(owner).service.notifies_acked >= n
            && snapshot(other).datagrams_received > 0
            && snapshot(other).misrouted_forwarded > 0;
        if done || Instant::now() >= until {
            break;
        }
        std::thread::sleep(POLL);
    }
    let (own, oth) = (snapshot(owner), snapshot(other));
    assert_eq!(own.service.notifies_acked, n, "{own:?}");
    assert_eq!(
        own.service.connects, n,
        "every connect handled by the owner"
    );
    assert_eq!(own.connections, n);
    assert_eq!(oth.service.connects, 0, "{oth:?}");
    assert_eq!(
        oth.service.datagrams_in, 0,
        "the other shard handed nothing to its state machine"
    );
    assert!(
        oth.misrouted_forwarded > 0 && oth.misrouted_dropped == 0,
        "every misrouted datagram authenticated and was forwarded: {oth:?}"
    );
    assert!(
        oth.datagrams_received > 0,
        "datagrams did reach the other shard's socket: {oth:?}"
    );

    drop(stop);
    let until = deadline();
    for t in threads {
        while !t.is_finished() {
            assert!(Instant::now() < until, "a shard did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().expect("shard thread").expect("shard loop");
    }
}

/// Case 5: NAT rebinding. The same client continues from a new source port;
/// its next heartbeat moves the endpoint, and the notify goes there.
fn nat_rebinding_moves_the_endpoint(io: IoChoice) {
    let node = TestNode::start(io);
    let config = ClientConfig {
        heartbeat_ms: Some(300),
        ..ClientConfig::default()
    };
    let mut d = Device::with_config(
        &node.credential("erin@example.com", "phone"),
        node.udp,
        config,
    );
    let first = d.connect();
    let old = d.rebind();
    let moved_to = d.local_addr();
    assert_ne!(first, moved_to);
    assert!(
        d.pump_until(|d| d.client.endpoint() == Some(moved_to), deadline()),
        "the node never reported the new address {moved_to} (still {:?}); events {:?}",
        d.client.endpoint(),
        d.events
    );
    // Whatever reached the old port before the move is history.
    old.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 2048];
    while old.recv_from(&mut buf).is_ok() {}

    node.publish("erin@example.com", "80");
    let got = d.wait_notify();
    assert_eq!(got[0].1, [0x80]);
    assert!(
        old.recv_from(&mut buf).is_err(),
        "nothing goes to the old address after the move"
    );
    node.wait_metrics("mpp_migrations_total >= 1", |m| {
        m.sum("mpp_migrations_total", &[]) >= 1
    });
}

/// Case 6: a replayed datagram (a real sealed connect and endpoint request)
/// and a forged one (the device's conn id, random bytes) from another port
/// get no reply, are counted, and do not move the connection.
fn forged_and_replayed_packets_get_no_reply(io: IoChoice) {
    let node = TestNode::start(io);
    let mut d = Device::with_config(
        &node.credential("frank@example.com", "phone"),
        node.udp,
        patient(),
    );
    d.connect();
    // The connect, the acknowledgement of its catch-up (a resync: no mark)
    // and the status request that waited for it; one connect only.
    assert_eq!(
        d.sent.len(),
        3,
        "one connect sent, the one the node accepted"
    );
    let connect = d.sent[0].clone();
    d.client.request_endpoint();
    d.flush();
    let endpoint_request = d.sent.last().expect("sent").clone();
    assert!(
        d.pump(
            |e| e.iter().any(|e| matches!(e, ClientEvent::Endpoint(_))),
            deadline()
        ),
        "no endpoint answer: {:?}",
        d.events
    );

    let before = node.metrics();
    let (replay0, auth0) = (before.drops("replay"), before.drops("auth"));
    let attacker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let mut forged = d.client.conn_id().0.to_vec();
    forged.extend((0..60).map(|_| rand::random::<u8>()));
    for datagram in [&connect, &endpoint_request, &forged] {
        attacker.send_to(datagram, node.udp).expect("send");
    }
    assert_eq!(
        receives_within(&attacker, Duration::from_secs(1)),
        None,
        "the node answered a replayed or forged datagram"
    );
    let m = node.wait_metrics("two replay drops and one auth drop", |m| {
        m.drops("replay") >= replay0 + 2 && m.drops("auth") > auth0
    });
    assert_eq!(m.drops("replay"), replay0 + 2, "{}", m.samples_text());
    assert_eq!(m.drops("auth"), auth0 + 1, "{}", m.samples_text());
    assert_eq!(
        m.sum("mpp_migrations_total", &[]),
        0,
        "the endpoint did not move"
    );
    assert_eq!(
        m.sum("mpp_connects_total", &[]),
        1,
        "the replayed connect changed nothing"
    );

    // The connection still belongs to the device's own socket.
    node.publish("frank@example.com", "01");
    assert_eq!(d.wait_notify()[0].1, [0x01]);
}

/// Checks a Binding success response and returns its XOR-MAPPED-ADDRESS.
fn mapped_address(txid: &[u8; 12], resp: &[u8]) -> SocketAddr {
    assert!(resp.len() >= 20 && resp.len() <= 64, "{} bytes", resp.len());
    assert_eq!(&resp[0..2], &[0x01, 0x01], "Binding success response");
    assert_eq!(
        usize::from(u16::from_be_bytes([resp[2], resp[3]])),
        resp.len() - 20
    );
    assert_eq!(&resp[4..8], &[0x21, 0x12, 0xA4, 0x42], "magic cookie");
    assert_eq!(&resp[8..20], txid, "the request's transaction id");
    let key: Vec<u8> = [0x21, 0x12, 0xA4, 0x42]
        .iter()
        .chain(txid.iter())
        .copied()
        .collect();
    let mut at = 20;
    while at + 4 <= resp.len() {
        let kind = u16::from_be_bytes([resp[at], resp[at + 1]]);
        let len = usize::from(u16::from_be_bytes([resp[at + 2], resp[at + 3]]));
        let value = &resp[at + 4..at + 4 + len];
        if kind == 0x0020 {
            let port = u16::from_be_bytes([value[2], value[3]]) ^ 0x2112;
            let ip: IpAddr = match value[1] {
                0x01 => {
                    let b: [u8; 4] = std::array::from_fn(|i| value[4 + i] ^ key[i]);
                    b.into()
                }
                0x02 => {
                    let b: [u8; 16] = std::array::from_fn(|i| value[4 + i] ^ key[i]);
                    b.into()
                }
                f => panic!("unknown address family {f}"),
            };
            return SocketAddr::new(ip, port);
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    panic!("no XOR-MAPPED-ADDRESS in {resp:02x?}");
}

fn stun_round_trip(node: &TestNode, local: &str) {
    let socket = UdpSocket::bind(local).expect("bind");
    let (txid, request) = binding_request();
    socket.send_to(&request, node.udp).expect("send");
    let mut buf = [0u8; 2048];
    let (n, from) = node::recv_from(&socket, &mut buf).expect("a STUN answer");
    assert_eq!(from, node.udp, "answered from the node's port");
    assert_eq!(
        mapped_address(&txid, &buf[..n]),
        socket.local_addr().expect("addr"),
        "XOR-MAPPED-ADDRESS is the request's source"
    );
    node.wait_metrics("mpp_stun_answered_total >= 1", |m| {
        m.sum("mpp_stun_answered_total", &[]) >= 1
    });
}

/// Case 7: STUN on the MPP port.
fn stun_binding_request_gets_the_mapped_address(io: IoChoice) {
    let node = TestNode::start(io);
    stun_round_trip(&node, "127.0.0.1:0");
}

/// Case 7, on an IPv6 node (`[::1]`): the mapped address is IPv6.
fn stun_binding_request_over_ipv6(io: IoChoice) {
    let node = TestNode::start_with(io, |c| c.udp = "[::1]:0".parse().expect("addr"));
    assert!(node.udp.is_ipv6());
    stun_round_trip(&node, "[::1]:0");
    // An MPP device works over IPv6 too.
    let mut d = node.device("gina@example.com", "phone");
    node.publish("gina@example.com", "02");
    assert_eq!(d.wait_notify()[0].1, [0x02]);
}

/// Splits a web-transport body into its u16be-length-prefixed packets.
fn split_replies(body: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        assert!(rest.len() >= 2, "truncated length prefix");
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        assert!(rest.len() >= 2 + len, "truncated reply packet");
        out.push(rest[2..2 + len].to_vec());
        rest = &rest[2 + len..];
    }
    out
}

fn post_packet(node: &TestNode, packet: &[u8]) -> node::HttpResponse {
    node::http(
        node.http,
        "POST",
        "/.well-known/mmmpresence/",
        None,
        "application/octet-stream",
        packet,
    )
}

/// Case 8: the web-service transport answers a sealed EndpointRequest with
/// the HTTP peer's address; it never moves the UDP endpoint, where notifies
/// keep going.
fn web_transport_answers_an_endpoint_request(io: IoChoice) {
    let node = TestNode::start(io);
    let mut d = node.device("hank@example.com", "laptop");
    d.client.request_endpoint();
    let mut buf = vec![0u8; MAX_PACKET];
    let n = d
        .client
        .poll_transmit(&mut buf)
        .expect("an endpoint request")
        .size;
    assert!(
        d.client.poll_transmit(&mut buf).is_none(),
        "one packet queued"
    );

    let r = post_packet(&node, &buf[..n]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let replies = split_replies(&r.body);
    assert!(!replies.is_empty(), "no reply packet");
    for p in &replies {
        d.client.handle_datagram(node::now(), p);
    }
    let mut events = Vec::new();
    while let Some(e) = d.client.poll_event() {
        events.push(e);
    }
    assert_eq!(
        events,
        [ClientEvent::Endpoint(r.local)],
        "the endpoint is the HTTP peer's address"
    );

    // A forged packet over the web gets an empty answer.
    let mut forged = d.client.conn_id().0.to_vec();
    forged.extend((0..60).map(|_| rand::random::<u8>()));
    let r = post_packet(&node, &forged);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.body.is_empty(),
        "a forged packet got replies: {:02x?}",
        r.body
    );

    node.publish("hank@example.com", "03");
    assert_eq!(d.wait_notify()[0].1, [0x03], "notifies stay on UDP");
    let m = node.metrics();
    assert_eq!(m.sum("mpp_migrations_total", &[]), 0);
}

/// Case 9: `Node::shutdown` then `Node::wait` returns Ok promptly, and the
/// ports are released.
fn shutdown_stops_every_thread_and_frees_the_ports(io: IoChoice) {
    let mut node = TestNode::start(io);
    let _d = node.device("ivan@example.com", "phone");
    node.publish("ivan@example.com", "01");
    let (udp, http) = (node.udp, node.http);
    let (result, took) = node.stop();
    assert!(result.is_ok(), "Node::wait: {result:?}");
    assert!(took < WAIT, "shutdown took {took:?}");
    assert!(
        TcpStream::connect_timeout(&http, Duration::from_secs(2)).is_err(),
        "the HTTP port still accepts connections"
    );
    UdpSocket::bind(udp).expect("the UDP port is free again");
}

/// Case 10: docs/PROTOCOL.md §9. With `web` set, the web transport answers
/// on the web address and 404s on the control address; the admin API,
/// `/metrics` and `/healthz` answer only on the control address.
fn a_web_listener_takes_the_web_transport_off_the_control_port(io: IoChoice) {
    let node = TestNode::start_with(io, |c| c.web = Some("127.0.0.1:0".parse().expect("addr")));
    let web = node.web.expect("the node reports its web address");
    assert_ne!(web, node.http);
    assert_ne!(web.port(), 0);
    let mut d = node.device("kate@example.com", "laptop");
    d.client.request_endpoint();
    let mut buf = vec![0u8; MAX_PACKET];
    let n = d.client.poll_transmit(&mut buf).expect("a request").size;
    let packet = buf[..n].to_vec();
    let post = |addr| {
        node::http(
            addr,
            "POST",
            "/.well-known/mmmpresence/",
            None,
            "application/octet-stream",
            &packet,
        )
    };
    let r = post(node.http);
    assert_eq!(
        r.status, 404,
        "the control port still serves the web transport"
    );
    let r = post(web);
    assert_eq!(r.status, 200, "{}", r.text());
    for p in split_replies(&r.body) {
        d.client.handle_datagram(node::now(), &p);
    }
    let mut events = Vec::new();
    while let Some(e) = d.client.poll_event() {
        events.push(e);
    }
    assert_eq!(events, [ClientEvent::Endpoint(r.local)]);

    let notify = serde_json::json!({"account": "kate@example.com", "bitmask": "01"}).to_string();
    let credential = serde_json::json!({"account": "kate@example.com", "device": "x"}).to_string();
    for (method, path, body) in [
        ("POST", "/v1/notify", notify.as_bytes()),
        ("POST", "/v1/credentials", credential.as_bytes()),
        ("GET", "/metrics", &b""[..]),
        ("GET", "/healthz", &b""[..]),
    ] {
        let r = node::http(
            web,
            method,
            path,
            Some(&node.token),
            "application/json",
            body,
        );
        assert_eq!(
            r.status,
            404,
            "{method} {path} on the web address: {}",
            r.text()
        );
    }
    // The control port keeps everything else.
    node.publish("kate@example.com", "02");
    assert_eq!(d.wait_notify()[0].1, [0x02]);
    let r = node::http(node.http, "GET", "/healthz", None, "", b"");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let m = node.metrics();
    assert!(
        m.sum(
            "mpp_http_connections_accepted_total",
            &[("listener", "web")]
        ) >= 5
    );
}

/// Sends one resolve over the web transport; the client's events from the
/// answer.
fn resolve_over_web(node: &TestNode, d: &mut Device, query: &[u8]) -> Vec<ClientEvent> {
    d.client.resolve(query.to_vec());
    let mut buf = vec![0u8; MAX_PACKET];
    let n = d.client.poll_transmit(&mut buf).expect("a resolve").size;
    let r = post_packet(node, &buf[..n]);
    assert_eq!(r.status, 200, "{}", r.text());
    let replies = split_replies(&r.body);
    assert!(!replies.is_empty(), "the web answer carries no packet");
    for p in &replies {
        d.client.handle_datagram(node::now(), p);
    }
    let mut events = Vec::new();
    while let Some(e) = d.client.poll_event() {
        events.push(e);
    }
    events
}

/// Case 11: docs/PROTOCOL.md D22. A resolve over the web transport is held
/// open until the upstream answered, and its answer is the resolve response.
fn web_transport_returns_the_resolve_answer(io: IoChoice) {
    const CANNED: &[u8] = b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00canned-answer";
    let dns = FakeDns::start(Some(CANNED));
    let node = TestNode::start_with(io, |c| c.dns_upstream = Some(dns.addr));
    let mut d = node.device("lena@example.com", "phone");
    let query = dns_query(0x4d2);
    let events = resolve_over_web(&node, &mut d, &query);
    let mut expected = query[..2].to_vec();
    expected.extend_from_slice(CANNED);
    assert_eq!(events, [ClientEvent::Resolved(Ok(expected))]);
    assert_eq!(dns.queries.lock().expect("lock").clone(), [query]);
}

/// Case 12: a resolve over the web transport whose upstream never answers
/// gets the node's 504 (its resolve timeout, here shorter than the web
/// transport's 2 s), not an empty answer.
fn web_transport_returns_a_resolve_timeout(io: IoChoice) {
    let dns = FakeDns::start(None);
    let node = TestNode::start_with(io, |c| {
        c.dns_upstream = Some(dns.addr);
        c.resolve_timeout_ms = 300;
    });
    let mut d = node.device("mona@example.com", "phone");
    let events = resolve_over_web(&node, &mut d, &dns_query(7));
    assert_eq!(events, [ClientEvent::Resolved(Err(504))]);
}

/// Without an upstream a resolve over the web transport is answered 502 at once.
#[test]
fn web_transport_resolve_without_upstream_is_502() {
    let node = TestNode::start(IoChoice::Mmsg);
    let mut d = node.device("nina@example.com", "phone");
    let events = resolve_over_web(&node, &mut d, &dns_query(9));
    assert_eq!(events, [ClientEvent::Resolved(Err(502))]);
}

/// Polls `/healthz` until it answers 503; its body.
fn wait_unhealthy(node: &TestNode) -> String {
    let until = deadline();
    for _ in 0..10_000 {
        let r = node::http(node.http, "GET", "/healthz", None, "", b"");
        if r.status == 503 {
            return r.json()["error"].as_str().unwrap_or_default().to_owned();
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(Instant::now() < until, "/healthz stayed 200");
        std::thread::sleep(POLL);
    }
    panic!("/healthz stayed 200");
}

/// A shard dies: `/healthz` says 503 and why, `mpp_shard_up` of that shard
/// is 0, and the node stops by itself with an error from `Node::wait`.
fn dead_shard(io: IoChoice, fault: Fault, reason: &str) {
    let mut node = TestNode::start(io);
    let m = node.metrics();
    assert_eq!(m.shard("mpp_shard_up", 0), 1);
    assert_eq!(m.shard("mpp_shard_up", 1), 1);
    let r = node::http(node.http, "GET", "/healthz", None, "", b"");
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));

    node.inject_fault(1, fault);
    let why = wait_unhealthy(&node);
    assert!(
        why.contains("shard 1") && why.contains(reason),
        "/healthz: {why}"
    );
    let m = node.metrics();
    assert_eq!(m.shard("mpp_shard_up", 1), 0, "{}", m.samples_text());
    assert_eq!(m.shard("mpp_shard_up", 0), 1);
    assert_eq!(m.sum("mpp_threads", &[]), 1);

    let (result, _) = node.wait_exit();
    let err = result.expect_err("Node::wait reports the dead shard");
    assert!(err.to_string().contains("shard 1"), "{err}");
    assert!(err.to_string().contains(reason), "{err}");
}

/// Case 13: a shard whose loop ends with an I/O error (as after 1,000 failed
/// calls in a row).
fn a_shard_whose_io_fails_makes_the_node_unhealthy_and_exit(io: IoChoice) {
    dead_shard(io, Fault::IoError, "I/O failure injected");
}

/// A shard whose thread panics.
#[test]
fn a_shard_that_panics_makes_the_node_unhealthy_and_exit() {
    dead_shard(IoChoice::Mmsg, Fault::Panic, "panicked");
}

/// HTTP connection caps that the hard open-file limit cannot hold refuse
/// the start with a clear error (skipped where the hard limit is unlimited).
#[test]
fn http_caps_above_the_open_file_limit_refuse_to_start() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one struct passed.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    let caps: libc::rlim_t = 2 << 20;
    if limit.rlim_max == libc::RLIM_INFINITY || limit.rlim_max > caps {
        eprintln!(
            "skipped: the hard open-file limit ({}) holds any cap",
            limit.rlim_max
        );
        return;
    }
    let dir = node::TempDir::new("fdlimit");
    let mut config = node::node_config(IoChoice::Mmsg, dir.path());
    config.web = Some("127.0.0.1:0".parse().expect("addr"));
    config.http_max_connections = 1 << 20;
    config.web_max_connections = 1 << 20;
    match mpp::node::start(&config, false) {
        Ok(_) => panic!("started with caps above the open-file limit"),
        Err(e) => {
            assert!(matches!(e, StartError::FdLimit { .. }), "{e}");
            let text = e.to_string();
            assert!(text.contains("open-file limit"), "{text}");
            assert!(text.contains("http_max_connections"), "{text}");
        }
    }
}

/// docs/PROTOCOL.md §8.3: a node whose steering program cannot be attached
/// refuses to start, unless fallback steering is allowed.
#[test]
fn a_node_without_steering_refuses_to_start() {
    let dir = node::TempDir::new("steering");
    let config = node::node_config(IoChoice::Mmsg, dir.path());
    let hooks = TestHooks {
        fail_steering: true,
        ..TestHooks::default()
    };
    match mpp::node::start_with_hooks(&config, false, hooks) {
        Ok(_) => panic!("started without steering"),
        Err(e) => {
            assert!(matches!(e, StartError::Steering(_)), "{e}");
            assert!(e.to_string().contains("allow_fallback_steering"), "{e}");
        }
    }
}

/// Case 14: fallback steering (docs/PROTOCOL.md §8.3). Garbage carrying the
/// affinity of shard 0's accounts floods the port from many source ports,
/// so the kernel's flow hash puts much of it on shard 1's socket. Every
/// publish during the flood is accepted and shard 0's inbox holds nothing
/// but them (the garbage is dropped where it lands, never queued for shard
/// 0); a device still connects and is notified.
fn fallback_steering_keeps_garbage_away_from_publishes(io: IoChoice) {
    let hooks = TestHooks {
        fail_steering: true,
        ..TestHooks::default()
    };
    let node = TestNode::start_hooked(io, hooks, |c| {
        c.allow_fallback_steering = true;
        // Room for the test's 101 publishes and little more: only something
        // else in the inbox could make one of them refused.
        c.inbox_capacity = 128;
    });
    let accounts = accounts_on(0, 3, "fallback");
    let affinity = account_affinity(&accounts[0]).to_be_bytes();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let target = node.udp;
        std::thread::spawn(move || {
            // From another loopback address than the devices': a source
            // whose packets keep failing authentication has all its packets
            // dropped (D6), and the device must not share that fate here.
            let sockets: Vec<UdpSocket> = (0..32)
                .map(|_| UdpSocket::bind("127.0.0.2:0").expect("bind 127.0.0.2"))
                .collect();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 2_000_000 {
                for s in &sockets {
                    let mut garbage: Vec<u8> = (0..120).map(|_| rand::random::<u8>()).collect();
                    garbage[0] &= 0x3f;
                    garbage[0] |= 0x40; // never STUN-like
                    garbage[4..8].copy_from_slice(&affinity);
                    let _ = s.send_to(&garbage, target);
                    sent += 1;
                }
                std::thread::yield_now();
            }
            sent
        })
    };
    let m = node.wait_metrics("garbage dropped on shard 1", |m| {
        m.shard("mpp_misrouted_dropped_total", 1) > 0
    });
    assert_eq!(
        m.shard("mpp_forwarded_in_total", 0),
        0,
        "{}",
        m.samples_text()
    );
    for i in 0..100 {
        node.publish(&accounts[i % accounts.len()], "01");
    }
    let mut d = node.device(&accounts[1], "phone");
    node.publish(&accounts[1], "04");
    assert_eq!(d.wait_notify()[0].1, [0x04]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flooder.join().expect("flooder");
    assert!(sent > 0);
    // Shard 0's inbox took the 101 publishes and nothing else (garbage that
    // reached shard 1 was dropped there), and never refused one.
    let m = node.wait_metrics("the 101 publishes in shard 0's inbox", |m| {
        m.shard("mpp_router_forwarded_total", 0) >= 101
    });
    assert_eq!(
        m.shard("mpp_router_forwarded_total", 0),
        101,
        "{}",
        m.samples_text()
    );
    assert_eq!(
        m.shard("mpp_router_overflows_total", 0),
        0,
        "{}",
        m.samples_text()
    );
    assert!(m.shard("mpp_misrouted_dropped_total", 1) > 0);
}
#[test]
fn metrics_parser_reads_labels() {
    let m = Metrics(
        "# HELP x y\nmpp_drops_total{shard=\"0\",reason=\"auth\"} 3\n\
         mpp_drops_total{shard=\"1\",reason=\"auth\"} 4\nmpp_threads 2\n"
            .into(),
    );
    assert_eq!(m.drops("auth"), 7);
    assert_eq!(m.sum("mpp_threads", &[]), 2);
}
