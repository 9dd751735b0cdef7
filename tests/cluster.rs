//! Cluster mode end to end (docs/PROTOCOL.md §10): nodes in-process on
//! loopback, joined by a real `nats-server` that each test starts on a free
//! loopback port (Debian package `nats-server`; `.ci/run` installs it).
//!
//! Every wait is bounded (metrics polled until a condition holds, devices
//! pumped until an event arrives, both with the helpers' 10 s deadline);
//! nothing sleeps and then asserts.

#[allow(unused_macros)]
mod node;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mpp::config::{IoChoice, NodeConfig};
use mpp::packet::{account_affinity, Credential};
use mpp::proto::{ClientConfig, ClientEvent, ClientState};

use node::{
    catch_ups, deadline, http, notifies, run, Device, HttpResponse, Metrics, TempDir, TestNode,
    WAIT,
};

/// The partitions every test node uses (the default, 256).
const PARTITIONS: u32 = 256;

// ---------------------------------------------------------------------------
// A NATS server of the test's own
// ---------------------------------------------------------------------------

/// `nats-server` on 127.0.0.1 and a free port; killed on drop.
struct Nats {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl Nats {
    fn start() -> Nats {
        // A free port: bind port 0, note it, let it go. Another process
        // could take it in between; the start below then fails loudly.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut nats = Nats {
            port,
            child: None,
            dir: TempDir::new("nats"),
        };
        nats.start_again();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port; returns once it accepts
    /// TCP connections.
    fn start_again(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        let program = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let log = self.dir.join("nats.log");
        let child = Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-l"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}): install it (apt-get install nats-server)")
            });
        self.child = Some(child);
        let until = deadline();
        // The port may still be held by the previous server for a moment.
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "nats-server exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < until,
                "nats-server did not listen within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Nodes of one cluster
// ---------------------------------------------------------------------------

/// Starts a cluster node named `id` on `nats`, sharing `master` (the master
/// key file of the first node) so every node accepts every credential.
fn cluster_node(
    nats: &Nats,
    id: &str,
    master: Option<&Path>,
    adjust: impl FnOnce(&mut NodeConfig),
) -> TestNode {
    let url = nats.url();
    let id = id.to_owned();
    let shared = master.map(Path::to_path_buf);
    TestNode::start_with(IoChoice::Mmsg, move |c| {
        if let Some(key) = shared {
            std::fs::copy(&key, c.data_dir.join(mpp::node::data_dir::MASTER_KEY_FILE))
                .expect("copy the cluster's master key");
        }
        c.cluster = vec![url];
        c.node_id = id;
        c.keep_state = false;
        adjust(c);
    })
}

/// `n` nodes named `a`, `b`, … on `nats`, one master key.
fn cluster(nats: &Nats, n: usize, adjust: impl Fn(&str, &mut NodeConfig)) -> Vec<TestNode> {
    let first = cluster_node(nats, "a", None, |c| adjust("a", c));
    let key = first.dir.join(mpp::node::data_dir::MASTER_KEY_FILE);
    let mut nodes = vec![first];
    for i in 1..n {
        let id = ((b'a' + i as u8) as char).to_string();
        nodes.push(cluster_node(nats, &id, Some(&key), |c| adjust(&id, c)));
    }
    nodes
}

/// The account's partition.
fn partition(account: &str) -> u32 {
    account_affinity(account) % PARTITIONS
}

/// `n` account names, each in a partition of its own (and of none in `not`).
fn accounts(tag: &str, n: usize, not: &[&str]) -> Vec<String> {
    let mut taken: Vec<u32> = not.iter().map(|a| partition(a)).collect();
    let mut out = Vec::new();
    for i in 0..10_000 {
        if out.len() == n {
            break;
        }
        let a = format!("{tag}-{i}");
        if !taken.contains(&partition(&a)) {
            taken.push(partition(&a));
            out.push(a);
        }
    }
    assert_eq!(out.len(), n);
    out
}

/// A device of `account` on `node`, with a credential listing `endpoints`
/// (the node first) and the client configured by `config`.
fn device_on(
    node: &TestNode,
    account: &str,
    device: &str,
    others: &[&TestNode],
    config: ClientConfig,
) -> Device {
    let credential = node.credential(account, device);
    let mut d = Device::with_config(&credential, node.udp, config);
    let endpoints: Vec<SocketAddr> = others.iter().map(|n| n.udp).collect();
    d.client.set_nodes(&endpoints);
    d.connect();
    d
}

/// `POST /v1/notify` on `node`; the response.
fn notify(node: &TestNode, account: &str, bitmask_hex: &str) -> HttpResponse {
    let body = serde_json::json!({"account": account, "bitmask": bitmask_hex});
    http(
        node.http,
        "POST",
        "/v1/notify",
        Some(&node.token),
        "application/json",
        body.to_string().as_bytes(),
    )
}

/// Publishes and expects the bus to have taken it.
fn publish_everywhere(node: &TestNode, account: &str, bitmask_hex: &str) {
    let r = notify(node, account, bitmask_hex);
    assert_eq!(r.status, 202, "POST /v1/notify: {}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!({"accepted": 1, "remote": 1, "remote_failed": 0}),
        "the bus took the publish"
    );
}

fn gauge(m: &Metrics, name: &str) -> u64 {
    m.sum(name, &[])
}

/// Waits until `node` is connected and hears `n` partitions.
fn wait_heard(node: &TestNode, n: u64) -> Metrics {
    node.wait_metrics(&format!("connected, {n} partitions heard"), |m| {
        gauge(m, "mpp_cluster_connected") == 1 && gauge(m, "mpp_cluster_partitions_heard") == n
    })
}

/// Pumps `d` until a notify (not a catch-up) with exactly `bits` arrived.
fn wait_bits(d: &mut Device, bits: &[u8]) {
    let got = d.pump(|e| notifies(e).iter().any(|(_, b)| b == bits), deadline());
    assert!(
        got,
        "device {} never got {bits:02x?}; events: {:?}",
        d.client.conn_id(),
        d.events
    );
    settle(d);
}

/// Waits until the node processed the device's acknowledgements so far: a
/// status request sent after them on the same flow is answered after them
/// (so the next publish is not merged with an unacknowledged one).
fn settle(d: &mut Device) {
    d.flush();
    if d.client.state() != ClientState::Connected {
        return;
    }
    d.client.request_status(node::now());
    assert!(
        d.pump_until(|d| d.client.state() == ClientState::Connected, deadline()),
        "device {}: no status answer",
        d.client.conn_id()
    );
}

/// Whether `mask` names every store `bits` names.
fn covers(mask: &[u8], bits: &[u8]) -> bool {
    bits.iter()
        .enumerate()
        .all(|(i, &b)| mask.get(i).copied().unwrap_or(0) & b == b)
}

/// Every bitmask the device received (notifies and catch-ups).
fn all_masks(events: &[ClientEvent]) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Notify { bitmask, .. } => Some(bitmask.clone()),
            _ => None,
        })
        .collect()
}

/// A client that notices a silent node within about a second.
fn quick() -> ClientConfig {
    ClientConfig {
        heartbeat_ms: Some(300),
        retry_ms: 200,
        heartbeat_tries: 2,
        connect_tries: 2,
        reconnect_jitter_ms: 300,
        ..ClientConfig::default()
    }
}

/// [`quick`] at noticing a silent node, but patient with a connect: a
/// node that holds no device of the account's partition parks a connect
/// until it hears the partition and then while it asks the cluster about
/// the device's mark (docs/PROTOCOL.md §10.3–10.4: each wait up to
/// `cluster_catch_up_timeout_ms`, 500 ms, the first 250 ms more), and a
/// client that gives up sooner leaves a live node (quick's two connects
/// 200 ms apart give it about 400 ms). Ten give it 2 s, above both waits.
fn patient() -> ClientConfig {
    ClientConfig {
        connect_tries: 10,
        ..quick()
    }
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

/// Three nodes and one NATS server; one account's devices on every node.
/// A publish entering each node reaches every device, and a node with no
/// device of an account's partition receives none of its publishes.
#[test]
fn a_publish_on_any_node_reaches_the_accounts_devices_on_every_node() {
    let nats = Nats::start();
    let nodes = cluster(&nats, 3, |_, _| {});
    let names = accounts("spread", 2, &[]);
    let (spread, local) = (names[0].as_str(), names[1].as_str());
    let mut devices: Vec<Device> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| device_on(n, spread, &format!("d{i}"), &[], ClientConfig::default()))
        .collect();
    // `local` has devices on node a only.
    let mut lonely = device_on(&nodes[0], local, "only", &[], ClientConfig::default());
    wait_heard(&nodes[0], 2);
    wait_heard(&nodes[1], 1);
    wait_heard(&nodes[2], 1);

    for (i, n) in nodes.iter().enumerate() {
        let bits = [1u8 << i];
        publish_everywhere(n, spread, &format!("{:02x}", bits[0]));
        for d in devices.iter_mut() {
            wait_bits(d, &bits);
        }
    }
    // A publish for `local` entering node b reaches node a's device only.
    publish_everywhere(&nodes[1], local, "80");
    wait_bits(&mut lonely, &[0x80]);
    // Then one more for `spread` from b: once node c has it, c has had
    // everything b published before it to c's partitions (one connection,
    // in order), so its count is final.
    publish_everywhere(&nodes[1], spread, "40");
    for d in devices.iter_mut() {
        wait_bits(d, &[0x40]);
    }
    let received = |n: &TestNode| gauge(&n.metrics(), "mpp_cluster_received_total");
    assert_eq!(
        received(&nodes[2]),
        3,
        "node c: spread from a, b, b; nothing of local"
    );
    assert_eq!(
        received(&nodes[0]),
        4,
        "node a: spread from b, c, b and local from b"
    );
    assert_eq!(received(&nodes[1]), 2, "node b: spread from a and c");
    for d in devices.iter().chain([&lonely]) {
        assert_eq!(
            notifies(&d.events).len(),
            if d.client.conn_id() == lonely.client.conn_id() {
                1
            } else {
                4
            },
            "every publish once: {:?}",
            d.events
        );
    }
    for n in &nodes {
        let m = n.metrics();
        assert_eq!(gauge(&m, "mpp_cluster_publish_failed_total"), 0);
        assert_eq!(gauge(&m, "mpp_cluster_received_dropped_total"), 0);
    }
}

/// docs/PROTOCOL.md §10.3: another node's publishes come numbered per
/// partition. A copy of one already delivered (a batch sent again, e.g.
/// after the publish-confirm round trip timed out) is dropped, so the
/// device's Serials count each publish once and its notify covers exactly
/// what was published; a number skipped (a publish lost between the server
/// and this node, which NATS core allows without a disconnect) resyncs the
/// partition's devices instead of leaving a silent gap. A raw NATS client
/// stands in for the other node, so the copy and the loss are exact, not
/// timing luck.
#[test]
fn a_repeated_bus_publish_is_dropped_and_a_missing_one_resyncs() {
    use mpp::node::cluster::wire::{numbered_publish, Number};
    let nats = Nats::start();
    let nodes = cluster(&nats, 1, |_, _| {});
    let node = &nodes[0];
    let account = accounts("numbered", 1, &[]).remove(0);
    let mut d = device_on(node, &account, "d", &[], ClientConfig::default());
    wait_heard(node, 1);
    settle(&mut d);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let other = rt
        .block_on(async_nats::connect(nats.url()))
        .expect("a raw NATS client");
    let subject = format!("mpp.pub.{}", partition(&account));
    let send = |seq: u64, bits: u8| {
        rt.block_on(async {
            let n = Number { sender: 42, seq };
            let payload = numbered_publish(n, &account, &[bits]);
            other
                .publish(subject.clone(), payload)
                .await
                .expect("publish");
            other.flush().await.expect("flush");
        })
    };
    let metric = |name: &str| gauge(&node.metrics(), name);

    send(1, 0x01);
    wait_bits(&mut d, &[0x01]);
    // The same publish again (the sender's retry), then the next one.
    send(1, 0x01);
    send(2, 0x02);
    wait_bits(&mut d, &[0x02]);
    let got = notifies(&d.events);
    assert_eq!(got.len(), 2, "each publish once: {got:?}");
    assert_eq!(got[1].0, got[0].0 + 1, "one Serial per publish: {got:?}");
    assert_eq!(metric("mpp_cluster_received_duplicates_total"), 1);
    assert_eq!(metric("mpp_cluster_received_total"), 2);

    // Publish 3 is lost on the way; 4 arrives: the device resynchronises.
    send(4, 0x08);
    let resynced = d.pump(
        |e| {
            notifies(e)
                .iter()
                .any(|(_, b)| b.len() == 32 && b.iter().all(|&x| x == 0xFF))
        },
        deadline(),
    );
    assert!(resynced, "a resync after the gap: {:?}", d.events);
    settle(&mut d);
    assert_eq!(metric("mpp_cluster_sequence_gaps_total"), 1);
    // The shard's record of it (shard counters reach /metrics periodically).
    node.wait_metrics("the account's record resynchronised", |m| {
        gauge(m, "mpp_cluster_gap_resyncs_total") == 1
    });
    // And publish 5 goes on as usual.
    send(5, 0x10);
    wait_bits(&mut d, &[0x10]);
}

/// The last publish of a stream on a partition is lost on the way (no later
/// publish shows the gap): the sender's announcement of its last number
/// shows it, and the partition's devices resynchronise; an announcement of
/// what was received changes nothing. The node announces its own last
/// number after its publishes.
#[test]
fn a_lost_last_bus_publish_is_announced_and_resyncs() {
    use futures_util::StreamExt;
    use mpp::node::cluster::wire::{decode, last, numbered_publish, BusMessage, Number};
    let nats = Nats::start();
    let nodes = cluster(&nats, 1, |_, _| {});
    let node = &nodes[0];
    let account = accounts("announced", 1, &[]).remove(0);
    let mut d = device_on(node, &account, "d", &[], ClientConfig::default());
    wait_heard(node, 1);
    settle(&mut d);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let other = rt
        .block_on(async_nats::connect(nats.url()))
        .expect("a raw NATS client");
    let subject = format!("mpp.pub.{}", partition(&account));
    let send = |payload: bytes::Bytes| {
        rt.block_on(async {
            other
                .publish(subject.clone(), payload)
                .await
                .expect("publish");
            other.flush().await.expect("flush");
        })
    };
    let publish =
        |seq: u64, bits: u8| numbered_publish(Number { sender: 42, seq }, &account, &[bits]);
    let announce = |seq: u64| last(Number { sender: 42, seq });
    let metric = |name: &str| gauge(&node.metrics(), name);
    let resynced = |e: &[ClientEvent]| {
        notifies(e)
            .iter()
            .any(|(_, b)| b.len() == 32 && b.iter().all(|&x| x == 0xFF))
    };

    send(publish(1, 0x01));
    wait_bits(&mut d, &[0x01]);
    // The announcement of what was received: nothing. (Publish 2 comes
    // after it on the same subscription, so had it resynchronised, the
    // resync would be here before 0x02.)
    send(announce(1));
    send(publish(2, 0x02));
    wait_bits(&mut d, &[0x02]);
    assert!(!resynced(&d.events), "no resync: {:?}", d.events);
    assert_eq!(metric("mpp_cluster_sequence_gaps_total"), 0);

    // Publish 3, the stream's last, is lost on the way; its announcement
    // arrives: the device resynchronises.
    send(announce(3));
    assert!(
        d.pump(resynced, deadline()),
        "a resync after the announcement: {:?}",
        d.events
    );
    settle(&mut d);
    assert_eq!(metric("mpp_cluster_sequence_gaps_total"), 1);
    node.wait_metrics("the account's record resynchronised", |m| {
        gauge(m, "mpp_cluster_gap_resyncs_total") == 1
    });
    // A late copy of 3 is dropped; 4 goes on as usual, without another gap.
    send(publish(3, 0x04));
    send(publish(4, 0x08));
    wait_bits(&mut d, &[0x08]);
    assert_eq!(metric("mpp_cluster_sequence_gaps_total"), 1);
    assert_eq!(metric("mpp_cluster_received_duplicates_total"), 1);

    // The node's own stream: its publishes to the partition, then (within
    // about a second) the announcement of its last number, never ahead of
    // a publish; after that, nothing until it publishes again.
    let mut sub = rt.block_on(async {
        let s = other.subscribe(subject.clone()).await.expect("subscribe");
        other.flush().await.expect("flush");
        s
    });
    let mut next = || {
        let m = rt
            .block_on(async { tokio::time::timeout(WAIT, sub.next()).await })
            .expect("a message of the node within the deadline")
            .expect("the subscription is open");
        match decode(&m.payload).expect("a well-formed payload") {
            BusMessage::Publish {
                number: Some(n), ..
            } => ('N', n),
            BusMessage::Last { number } => ('L', number),
            other => panic!("unexpected {other:?}"),
        }
    };
    // Reads until the announcement of `upto`; every announcement seen is
    // of the publish just before it (the first message is a publish).
    let mut until_announced = |upto: u64| {
        let mut published = None;
        loop {
            match next() {
                ('L', n) if published.is_none() => panic!("announced while idle: {n:?}"),
                ('N', n) => {
                    if let Some(p) = published {
                        assert_eq!(n.seq, p + 1, "in order");
                    }
                    published = Some(n.seq);
                }
                (_, n) => {
                    assert_eq!(
                        Some(n.seq),
                        published,
                        "an announcement of the last publish"
                    );
                    if n.seq == upto {
                        return;
                    }
                }
            }
        }
    };
    publish_everywhere(node, &account, "10");
    publish_everywhere(node, &account, "20");
    until_announced(2);
    publish_everywhere(node, &account, "40");
    // (Had it announced 2 again while idle, that would come first.)
    until_announced(3);
    rt.block_on(async move { drop(sub) });
}

/// nats-server restarted mid-run: local delivery goes on; a publish whose
/// node retries long enough reaches the other nodes after the outage; one
/// whose node gives up first is counted and reported as failed, and the
/// devices elsewhere are told to resynchronise once their node hears the
/// partition again. Nothing is dropped silently.
#[test]
fn a_bus_outage_delays_or_reports_remote_publishes_and_never_loses_them() {
    let mut nats = Nats::start();
    // Node a retries for 20 s, node b for 300 ms.
    let nodes = cluster(&nats, 2, |id, c| {
        c.cluster_publish_timeout_ms = if id == "a" { 20_000 } else { 300 };
    });
    let names = accounts("outage", 1, &[]);
    let account = &names[0];
    let mut on_a = device_on(&nodes[0], account, "on-a", &[], ClientConfig::default());
    let mut on_b = device_on(&nodes[1], account, "on-b", &[], ClientConfig::default());
    wait_heard(&nodes[0], 1);
    wait_heard(&nodes[1], 1);
    publish_everywhere(&nodes[0], account, "01");
    wait_bits(&mut on_a, &[0x01]);
    wait_bits(&mut on_b, &[0x01]);

    nats.stop();
    for n in &nodes {
        n.wait_metrics("the bus is lost", |m| {
            gauge(m, "mpp_cluster_connected") == 0 && gauge(m, "mpp_cluster_partitions_heard") == 0
        });
    }
    // Node b gives up after 300 ms and says so.
    let r = notify(&nodes[1], account, "02");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!({"accepted": 1, "remote": 0, "remote_failed": 1})
    );
    wait_bits(&mut on_b, &[0x02]);
    let m = nodes[1].metrics();
    assert_eq!(gauge(&m, "mpp_cluster_publish_failed_total"), 1);
    // Node a keeps trying while the bus is away; its own device has it at once.
    let http_a = (nodes[0].http, nodes[0].token.clone());
    let acct = account.clone();
    let waiting = std::thread::spawn(move || {
        let body = serde_json::json!({"account": acct, "bitmask": "04"});
        http(
            http_a.0,
            "POST",
            "/v1/notify",
            Some(&http_a.1),
            "application/json",
            body.to_string().as_bytes(),
        )
    });
    wait_bits(&mut on_a, &[0x04]);
    nats.start_again();
    let r = waiting.join().expect("the waiting publish");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!({"accepted": 1, "remote": 1, "remote_failed": 0}),
        "handed over after the outage"
    );
    for n in &nodes {
        wait_heard(n, 1);
    }
    // Node b's device learns of 0x04 (the publish itself, or the resync b
    // gives every record of a partition it hears again), and node a's of
    // 0x02 (b's failed publish: a resync when a heard the partition again).
    let got = on_b.pump(
        |e| all_masks(e).iter().any(|m| covers(m, &[0x04])),
        deadline(),
    );
    assert!(
        got,
        "node b's device never learned of 0x04: {:?}",
        on_b.events
    );
    let got = on_a.pump(
        |e| all_masks(e).iter().any(|m| covers(m, &[0x02])),
        deadline(),
    );
    assert!(
        got,
        "node a's device never learned of 0x02: {:?}",
        on_a.events
    );
    let m = nodes[0].metrics();
    assert!(gauge(&m, "mpp_cluster_disconnects_total") >= 1);
    assert_eq!(gauge(&m, "mpp_cluster_publish_failed_total"), 0);
    assert_eq!(gauge(&m, "mpp_cluster_published_total"), 2);
}

/// A node stops: its devices notice, fail over to the next endpoint of
/// their credential and catch up there (a resync: the node that knew their
/// mark is gone), including what was published while they moved.
#[test]
fn a_stopped_nodes_devices_fail_over_and_catch_up() {
    let nats = Nats::start();
    let mut nodes = cluster(&nats, 2, |_, _| {});
    let names = accounts("failover", 1, &[]);
    let account = &names[0];
    let mut moving = device_on(&nodes[0], account, "moving", &[&nodes[1]], quick());
    let mut staying = device_on(&nodes[1], account, "staying", &[], ClientConfig::default());
    wait_heard(&nodes[0], 1);
    wait_heard(&nodes[1], 1);
    publish_everywhere(&nodes[1], account, "01");
    wait_bits(&mut moving, &[0x01]);
    wait_bits(&mut staying, &[0x01]);
    let before = moving.events.len();

    let (result, _) = nodes[0].stop();
    result.expect("node a stopped");
    // Published while the device is moving: only node b holds the account now.
    let r = notify(&nodes[1], account, "08");
    assert_eq!(r.status, 202, "{}", r.text());
    wait_bits(&mut staying, &[0x08]);
    let moved = moving.pump(
        |e| {
            e[before..].iter().any(|e| {
                matches!(e, ClientEvent::Notify { catch_up: true, bitmask, .. } if covers(bitmask, &[0x08]))
            })
        },
        deadline(),
    );
    assert!(
        moved,
        "the device did not fail over and catch up: {:?}",
        &moving.events[before..]
    );
    assert_eq!(moving.client.node(), nodes[1].udp, "it moved to node b");
    assert!(moving.client.failovers() >= 1);
    let (_, _, resync) = catch_ups(&moving.events[before..])
        .pop()
        .expect("a catch-up");
    assert!(resync, "nobody knew its mark: a resync");
    // And it is a device of node b from now on.
    publish_everywhere(&nodes[1], account, "10");
    wait_bits(&mut moving, &[0x10]);
    let m = nodes[1].metrics();
    assert!(gauge(&m, "mpp_cluster_catch_up_questions_total") >= 1);
}

/// A cluster node in a process of its own (`mppd`), so that the test can
/// kill it with SIGKILL: no state saved, no goodbye to anyone.
struct NodeProcess {
    proc: node::Proc,
    udp: SocketAddr,
    http: SocketAddr,
    _dir: TempDir,
}

impl NodeProcess {
    /// Starts `mppd` named `id` on `nats` with the cluster's master key
    /// (`master`, the first node's key file); returns once it listens.
    fn start(nats: &Nats, id: &str, master: &Path) -> NodeProcess {
        let dir = TempDir::new(&format!("cluster-{id}"));
        std::fs::copy(master, dir.join(mpp::node::data_dir::MASTER_KEY_FILE))
            .expect("copy the cluster's master key");
        let mut cmd = node::command(env!("CARGO_BIN_EXE_mppd"));
        cmd.arg("--data-dir").arg(dir.path());
        cmd.args(["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-pin"]);
        cmd.args(["--threads", "1", "--cluster", &nats.url(), "--node-id", id]);
        let mut proc = node::Proc::spawn(&format!("mppd {id}"), cmd);
        let listening = proc.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
        let addr = |key| {
            node::field(&listening, key)
                .parse::<SocketAddr>()
                .unwrap_or_else(|e| panic!("{key} in {listening:?}: {e}"))
        };
        NodeProcess {
            udp: addr("udp="),
            http: addr("http="),
            proc,
            _dir: dir,
        }
    }

    /// Kills the process with SIGKILL and reaps it.
    fn kill(&mut self) {
        use std::os::unix::process::ExitStatusExt;
        self.proc.signal(libc::SIGKILL);
        let status = self.proc.wait_exit();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
}

/// A node killed with SIGKILL (no state saved, no goodbye): its devices,
/// whose credentials list every node (in two orders), notice that it
/// stopped answering, fail over to the next endpoint and catch up there.
/// The node that knew their marks is gone, so the catch-up is a resync,
/// and it covers what was published while they moved, entering a
/// surviving node: never an empty answer.
#[test]
fn a_killed_nodes_devices_fail_over_and_catch_up() {
    let nats = Nats::start();
    let nodes = cluster(&nats, 2, |_, _| {});
    let key = nodes[0].dir.join(mpp::node::data_dir::MASTER_KEY_FILE);
    let mut doomed = NodeProcess::start(&nats, "k", &key);
    let names = accounts("killed", 1, &[]);
    let account = &names[0];
    // Two devices on the doomed node: one lists node a next, one node b.
    let mut moving: Vec<(Device, SocketAddr)> = [(0, 1), (1, 0)]
        .iter()
        .map(|&(next, last)| {
            let credential = nodes[0].credential(account, &format!("moving-{next}"));
            let mut d = Device::with_config(&credential, doomed.udp, patient());
            d.client.set_nodes(&[nodes[next].udp, nodes[last].udp]);
            d.connect();
            (d, nodes[next].udp)
        })
        .collect();
    let mut staying = device_on(&nodes[0], account, "staying", &[], ClientConfig::default());
    node::wait_metrics(doomed.http, "node k hears the account", |m| {
        gauge(m, "mpp_cluster_connected") == 1 && gauge(m, "mpp_cluster_partitions_heard") == 1
    });
    wait_heard(&nodes[0], 1);
    publish_everywhere(&nodes[0], account, "01");
    for (d, _) in moving.iter_mut() {
        wait_bits(d, &[0x01]);
    }
    wait_bits(&mut staying, &[0x01]);
    let before: Vec<usize> = moving.iter().map(|(d, _)| d.events.len()).collect();

    doomed.kill();
    // Published while the devices are moving, entering a surviving node.
    let r = notify(&nodes[0], account, "08");
    assert_eq!(r.status, 202, "{}", r.text());
    wait_bits(&mut staying, &[0x08]);
    for ((d, next), &from) in moving.iter_mut().zip(&before) {
        let moved = d.pump(
            |e| {
                e[from..].iter().any(|e| {
                    matches!(e, ClientEvent::Notify { catch_up: true, bitmask, .. } if covers(bitmask, &[0x08]))
                })
            },
            deadline(),
        );
        assert!(
            moved,
            "device {} did not fail over and catch up: {:?}",
            d.client.conn_id(),
            &d.events[from..]
        );
        assert_eq!(d.client.node(), *next, "it moved to its next endpoint");
        assert!(d.client.failovers() >= 1);
        let (_, bits, resync) = catch_ups(&d.events[from..]).pop().expect("a catch-up");
        assert!(resync, "nobody knew its mark: a resync, {bits:02x?}");
        settle(d);
    }
    // They are devices of nodes a and b from now on: a publish entering
    // node b reaches them all.
    publish_everywhere(&nodes[1], account, "10");
    for (d, _) in moving.iter_mut() {
        wait_bits(d, &[0x10]);
    }
    wait_bits(&mut staying, &[0x10]);
    for n in &nodes {
        assert!(gauge(&n.metrics(), "mpp_cluster_catch_up_questions_total") >= 1);
    }
}

/// A device that moves while its old node still lives gets the old node's
/// exact catch-up (not a resync): the old node answers the new one's
/// question over the bus.
#[test]
fn a_device_moving_between_live_nodes_gets_the_exact_catch_up() {
    let nats = Nats::start();
    let nodes = cluster(&nats, 2, |_, _| {});
    let names = accounts("moving", 1, &[]);
    let account = &names[0];
    let credential: Credential = nodes[0].credential(account, "mover");
    let mut mover = Device::with_config(&credential, nodes[0].udp, ClientConfig::default());
    mover.connect();
    let mut staying = device_on(&nodes[1], account, "staying", &[], ClientConfig::default());
    wait_heard(&nodes[0], 1);
    wait_heard(&nodes[1], 1);
    publish_everywhere(&nodes[0], account, "01");
    wait_bits(&mut mover, &[0x01]);
    wait_bits(&mut staying, &[0x01]);
    // The acknowledgement reached node a (a status answered after it).
    let mark = mover.client.mark().expect("a mark");

    // Published after the mark, entering node b: node a hears it too.
    publish_everywhere(&nodes[1], account, "04");
    wait_bits(&mut staying, &[0x04]);
    nodes[0].wait_metrics("node a has the publish", |m| {
        gauge(m, "mpp_cluster_received_total") >= 1
    });
    // The device comes back through node b with its mark.
    let config = ClientConfig {
        mark: Some(mark),
        ..ClientConfig::default()
    };
    let mut back = Device::with_config(&credential, nodes[1].udp, config);
    assert!(
        back.pump(|e| node::connected(e).is_some(), deadline()),
        "no connect through node b: {:?}",
        back.events
    );
    // Node a's union since its record began (0x01 | 0x04): a superset of
    // what the device missed, as on one node (docs/PROTOCOL.md §6.7), and
    // no resync.
    let catch_up = catch_ups(&back.events);
    assert_eq!(
        catch_up
            .iter()
            .map(|(_, b, r)| (b.clone(), *r))
            .collect::<Vec<_>>(),
        vec![(vec![0x05], false)],
        "what node a knows was published after the mark"
    );
    let m = nodes[1].metrics();
    assert_eq!(gauge(&m, "mpp_cluster_catch_up_answered_total"), 1);
    assert_eq!(
        gauge(
            &nodes[0].metrics(),
            "mpp_cluster_catch_up_answers_given_total"
        ),
        1
    );
}

/// Bad cluster URLs (flag, environment, file) stop mppd at start with one
/// line and exit status 2.
#[test]
fn bad_cluster_urls_refuse_to_start() {
    let dir = TempDir::new("cluster-bad");
    for (how, bad) in [
        ("flag", "http://127.0.0.1:4222"),
        ("flag", "nats://127.0.0.1:99999"),
        ("flag", "nats://:4222"),
        ("env", "nats://a b:1"),
        ("flag", "nats://127.0.0.1:4222,127.0.0.1:4223"),
    ] {
        let mut cmd = node::command(env!("CARGO_BIN_EXE_mppd"));
        cmd.arg("--data-dir").arg(dir.path());
        cmd.args(["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
        match how {
            "flag" => {
                cmd.args(["--cluster", bad]);
            }
            _ => {
                cmd.env("MPPD_CLUSTER", bad);
            }
        }
        let (status, _, stderr) = run("mppd", cmd);
        assert_eq!(status.code(), Some(2), "{bad}: {stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{bad}: one line: {stderr}");
        assert!(
            lines[0].contains("invalid cluster URL"),
            "{bad}: {}",
            lines[0]
        );
    }
    let mut cmd = node::command(env!("CARGO_BIN_EXE_mppd"));
    cmd.arg("--data-dir").arg(dir.path());
    cmd.args(["--cluster", "nats://127.0.0.1:4222", "--node-id", "a.b"]);
    let (status, _, stderr) = run("mppd", cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("invalid node id"), "{stderr}");
}

/// A NATS server that cannot be reached (nothing listens on its loopback
/// port) is no reason to stop: the node starts, delivers locally, retries in
/// the background, counts each failed attempt and warns once per outage,
/// not at each attempt (the client alone logged several lines a second).
#[test]
fn an_unreachable_bus_is_retried_with_one_warning() {
    let dir = TempDir::new("cluster-unreachable");
    let nobody = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut cmd = node::command(env!("CARGO_BIN_EXE_mppd"));
    cmd.arg("--data-dir").arg(dir.path());
    cmd.args(["--udp", "127.0.0.1:0", "--http", "127.0.0.1:0", "--no-pin"]);
    cmd.args(["--threads", "1", "--cluster", &format!("nats://{nobody}")]);
    let mut mppd = node::Proc::spawn("mppd", cmd);
    let listening = mppd.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
    let control: SocketAddr = node::field(&listening, "http=")
        .parse()
        .expect("the http= address");
    // Several attempts failed (the client retries within a second).
    let until = deadline();
    let errors = loop {
        let text = http(control, "GET", "/metrics", None, "", &[]).text();
        let m = Metrics(text);
        let errors = gauge(&m, "mpp_cluster_connect_errors_total");
        if errors >= 3 {
            assert_eq!(gauge(&m, "mpp_cluster_connected"), 0);
            break errors;
        }
        assert!(
            Instant::now() < until,
            "{errors} failed attempts within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(http(control, "GET", "/healthz", None, "", &[]).status, 200);
    mppd.signal(libc::SIGTERM);
    let status = mppd.wait_exit();
    assert!(status.success(), "{status:?}");
    let stderr = mppd.stderr_now();
    let warnings = stderr.matches("cannot reach a NATS server").count();
    assert_eq!(warnings, 1, "{errors} attempts, one warning: {stderr}");
    assert!(
        !stderr.contains("async_nats"),
        "the client's own lines: {stderr}"
    );
}
