//! The network layer on real loopback sockets (127.0.0.1 and ::1 only):
//! both drivers echo, batch-send, wake and time out the same way, the
//! reuseport steering program sends each datagram to its shard's socket
//! (docs/PROTOCOL.md §8), and socket groups bind as documented.
//!
//! Every driver test runs on both backends. io_uring must work on the test
//! machine: if it does not, the io_uring runs fail with the probe's reason.
//! Waits are bounded (timeouts, iteration caps); nothing sleeps except the
//! waker test's helper thread.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use mpp::net::socket::{bind_group, local_port, BindError};
use mpp::net::steer::{attach_steering, shard_for_datagram, shard_of};
use mpp::net::{open_driver, uring, Driver, IoBackend, Waker, MAX_DATAGRAM};

/// Socket buffers for drivers and clients: large, so loopback never drops.
const BUFFERS: usize = 8 << 20;

/// How long a client waits for one datagram before the test fails.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

/// Both backends; io_uring must be usable here.
fn backends() -> [IoBackend; 2] {
    if let Err(e) = uring::probe() {
        panic!(
            "\n\n*** io_uring is NOT usable on this machine: {e} ***\n\
             *** these tests run every case on both drivers and need it (the node itself \
             would fall back to mmsg) ***\n"
        );
    }
    [IoBackend::Uring, IoBackend::Mmsg]
}

/// A driver on its own socket, with its waker (dropped after the driver).
struct Node {
    driver: Box<dyn Driver + Send>,
    waker: Waker,
    addr: SocketAddr,
}

impl Node {
    fn new(backend: IoBackend, addr: &str, batch: usize) -> Node {
        let addr: SocketAddr = addr.parse().expect("test address");
        let socket = bind_group(addr, 1, BUFFERS)
            .expect("bind driver socket")
            .pop()
            .expect("one socket");
        let addr = socket.local_addr().expect("local addr");
        let waker = Waker::new().expect("eventfd");
        let driver = open_driver(backend, socket, waker.fd(), batch).expect("open driver");
        assert_eq!(driver.backend(), backend);
        Node {
            driver,
            waker,
            addr,
        }
    }

    /// Runs shard turns until `want` datagrams were received and echoed to
    /// their sources, at most `turns` turns. Returns each datagram's source.
    fn echo(&mut self, want: usize, turns: usize) -> Vec<SocketAddr> {
        let mut sources = Vec::new();
        let mut got: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        for _ in 0..turns {
            if sources.len() >= want {
                break;
            }
            self.driver
                .wait(Some(Duration::from_secs(1)))
                .expect("wait");
            got.clear();
            self.driver
                .recv(&mut |from, bytes| got.push((from, bytes.to_vec())))
                .expect("recv");
            for (from, bytes) in &got {
                let slot = match self.driver.send_slot() {
                    Some(slot) => slot,
                    None => {
                        self.driver.flush().expect("flush");
                        self.driver.send_slot().expect("a free slot after flush")
                    }
                };
                slot[..bytes.len()].copy_from_slice(bytes);
                self.driver.commit_send(*from, bytes.len());
                sources.push(*from);
            }
            self.driver.flush().expect("flush");
        }
        assert_eq!(sources.len(), want, "datagrams echoed");
        sources
    }
}

/// A client socket with a big receive buffer and a read timeout.
fn client(addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().expect("client address");
    let socket = bind_group(addr, 1, BUFFERS)
        .expect("bind client")
        .pop()
        .expect("one socket");
    socket.set_nonblocking(false).expect("blocking");
    socket
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .expect("timeout");
    socket
}

/// Receives `n` datagrams (or fails after CLIENT_TIMEOUT without one).
fn receive_n(client: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    let mut buf = [0u8; 4096];
    (0..n)
        .map(|i| {
            let (len, _) = client
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("client timed out after {i} of {n} datagrams: {e}"));
            buf[..len].to_vec()
        })
        .collect()
}

/// Deterministic test payload `i` of `len` bytes.
fn payload(i: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|j| (i * 31 + j * 7 + (j >> 8)) as u8)
        .collect()
}

/// Echo `count` datagrams of varied sizes through a driver, in windows.
fn echo_roundtrip(backend: IoBackend, server: &str, client_addr: &str, count: usize) {
    let mut node = Node::new(backend, server, 256);
    let client = client(client_addr);
    let client_addr = client.local_addr().expect("client addr");
    let sizes: Vec<usize> = (0..count)
        .map(|i| match i {
            0 => 1,
            1 => 1232,
            _ => 1 + (i * 389) % 1232,
        })
        .collect();
    let mut echoed = 0;
    for window in (0..count).collect::<Vec<_>>().chunks(64) {
        let mut sent: Vec<Vec<u8>> = window.iter().map(|&i| payload(i, sizes[i])).collect();
        for p in &sent {
            client.send_to(p, node.addr).expect("client send");
        }
        let sources = node.echo(window.len(), 200);
        assert!(
            sources.iter().all(|s| *s == client_addr),
            "{backend:?}: sources {sources:?} should all be {client_addr}"
        );
        let mut back = receive_n(&client, window.len());
        sent.sort();
        back.sort();
        assert!(back == sent, "{backend:?}: echoed bytes differ");
        echoed += window.len();
    }
    let stats = node.driver.stats();
    assert_eq!(echoed, count);
    assert_eq!(stats.received, count as u64, "{backend:?}: {stats:?}");
    assert_eq!(stats.sent, count as u64, "{backend:?}: {stats:?}");
    assert_eq!(stats.send_errors, 0, "{backend:?}: {stats:?}");
    assert_eq!(stats.receive_drops, 0, "{backend:?}: {stats:?}");
}

#[test]
fn echo_1000_datagrams_ipv4() {
    for backend in backends() {
        echo_roundtrip(backend, "127.0.0.1:0", "127.0.0.1:0", 1000);
    }
}

#[test]
fn echo_ipv6() {
    for backend in backends() {
        echo_roundtrip(backend, "[::1]:0", "[::1]:0", 300);
    }
}

#[test]
fn ipv4_peer_on_a_v4_mapped_ipv6_socket_is_reported_and_answered_as_ipv4() {
    for backend in backends() {
        let mut node = Node::new(backend, "[::ffff:127.0.0.1]:0", 16);
        let client = client("127.0.0.1:0");
        let target = SocketAddr::from(([127, 0, 0, 1], node.addr.port()));
        client.send_to(b"mapped", target).expect("send");
        let sources = node.echo(1, 100);
        assert_eq!(
            sources,
            vec![client.local_addr().expect("client addr")],
            "{backend:?}"
        );
        assert_eq!(
            receive_n(&client, 1),
            vec![b"mapped".to_vec()],
            "{backend:?}"
        );
    }
}

/// On this kernel (6.x) the io_uring driver registers its socket and names
/// it by index; datagrams still go both ways through it, and the port is
/// free as soon as the driver is dropped.
#[test]
fn uring_driver_uses_its_registered_socket() {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    let mut driver = uring::UringDriver::new(socket, -1, 8).expect("io_uring driver");
    assert!(driver.uses_registered_socket());
    let peer = client("127.0.0.1:0");
    peer.send_to(b"ping", addr).expect("send");
    let mut got = Vec::new();
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    while got.is_empty() && Instant::now() < deadline {
        driver.wait(Some(Duration::from_millis(50))).expect("wait");
        driver
            .recv(&mut |from, bytes| got.push((from, bytes.to_vec())))
            .expect("recv");
    }
    assert_eq!(got.len(), 1, "one datagram received");
    assert_eq!(got[0].1, b"ping");
    let slot = driver.send_slot().expect("a send slot");
    slot[..4].copy_from_slice(b"pong");
    driver.commit_send(got[0].0, 4);
    driver.flush().expect("flush");
    assert_eq!(receive_n(&peer, 1), vec![b"pong".to_vec()]);
    // Dropping the driver lets go of the registered socket at once.
    drop(driver);
    UdpSocket::bind(addr).expect("the port is free again");
}

#[test]
fn one_flush_sends_a_batch_of_500() {
    for backend in backends() {
        let mut node = Node::new(backend, "127.0.0.1:0", 500);
        let client = client("127.0.0.1:0");
        let to = client.local_addr().expect("client addr");
        for i in 0..500usize {
            let len = 8 + (i * 97) % 1200;
            let slot = node.driver.send_slot().expect("a slot per datagram");
            assert!(slot.len() >= MAX_DATAGRAM);
            slot[..len].copy_from_slice(&payload(i, len));
            slot[..4].copy_from_slice(&(i as u32).to_be_bytes());
            node.driver.commit_send(to, len);
        }
        assert!(
            node.driver.send_slot().is_none(),
            "{backend:?}: all 500 slots in use"
        );
        let before = node.driver.stats().clone();
        node.driver.flush().expect("flush");
        let stats = node.driver.stats().clone();
        assert_eq!(stats.sent, 500, "{backend:?}: {stats:?}");
        assert_eq!(stats.send_errors, 0, "{backend:?}: {stats:?}");
        // One system call for the whole batch: one io_uring_enter that
        // submits the 500 sends and reaps them, or one sendmmsg.
        assert_eq!(
            stats.send_calls - before.send_calls,
            1,
            "{backend:?}: system calls for one batch: {stats:?}"
        );
        assert_eq!(stats.send_batches - before.send_batches, 1, "{backend:?}");
        let mut seen = vec![false; 500];
        for d in receive_n(&client, 500) {
            let i = u32::from_be_bytes(d[..4].try_into().expect("index")) as usize;
            let mut want = payload(i, d.len());
            want[..4].copy_from_slice(&(i as u32).to_be_bytes());
            assert_eq!(d.len(), 8 + (i * 97) % 1200, "{backend:?}: length of {i}");
            assert!(d == want, "{backend:?}: bytes of {i}");
            assert!(!seen[i], "{backend:?}: {i} twice");
            seen[i] = true;
        }
        // The slots are free again.
        assert!(
            node.driver.send_slot().is_some(),
            "{backend:?}: slots after flush"
        );
    }
}

#[test]
fn waker_interrupts_wait_and_timeouts_hold() {
    for backend in backends() {
        let Node {
            mut driver, waker, ..
        } = Node::new(backend, "127.0.0.1:0", 8);
        let waker = &waker;
        let started = Instant::now();
        thread::scope(|s| {
            s.spawn(move || {
                thread::sleep(Duration::from_millis(50));
                waker.wake();
            });
            driver.wait(Some(Duration::from_secs(10))).expect("wait");
        });
        let woken_after = started.elapsed();
        assert!(
            woken_after < Duration::from_secs(5),
            "{backend:?}: woke after {woken_after:?}"
        );

        // The wake-up was consumed: nothing to do now, so the timeout holds.
        let t = Instant::now();
        driver.wait(Some(Duration::from_millis(50))).expect("wait");
        let slept = t.elapsed();
        assert!(
            slept >= Duration::from_millis(40),
            "{backend:?}: slept only {slept:?}"
        );

        // A wake before the wait makes it return at once, once.
        waker.wake();
        let t = Instant::now();
        driver.wait(Some(Duration::from_secs(10))).expect("wait");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{backend:?}: pre-wake ignored"
        );
        let t = Instant::now();
        driver.wait(Some(Duration::from_millis(50))).expect("wait");
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{backend:?}: wake not cleared"
        );

        // A sub-millisecond timeout is waited, not a busy return (mmsg
        // rounds it up to poll's whole millisecond, uring waits it exactly).
        let t = Instant::now();
        driver.wait(Some(Duration::from_micros(10))).expect("wait");
        let floor = match backend {
            IoBackend::Mmsg => Duration::from_millis(1),
            IoBackend::Uring => Duration::from_micros(10),
        };
        assert!(
            t.elapsed() >= floor,
            "{backend:?}: a 10 µs timeout returned after {:?}",
            t.elapsed()
        );
        drop(driver);
    }
}

#[test]
fn wait_returns_when_a_datagram_is_already_queued() {
    for backend in backends() {
        let mut node = Node::new(backend, "127.0.0.1:0", 8);
        let client = client("127.0.0.1:0");
        client.send_to(b"early", node.addr).expect("send");
        let t = Instant::now();
        let sources = node.echo(1, 10);
        assert!(t.elapsed() < Duration::from_secs(5), "{backend:?}");
        assert_eq!(sources.len(), 1);
        assert_eq!(receive_n(&client, 1), vec![b"early".to_vec()]);
    }
}

#[test]
fn a_burst_larger_than_the_buffer_ring_is_received_whole() {
    // 3000 datagrams queued before the first recv: more than the io_uring
    // driver's 1024 provided buffers (its multishot receive runs out, ends
    // with ENOBUFS and must be re-armed) and more than the mmsg driver takes
    // in one recv call (4 batches).
    const BURST: usize = 3000;
    for backend in backends() {
        let mut node = Node::new(backend, "127.0.0.1:0", 64);
        let client = client("127.0.0.1:0");
        for i in 0..BURST {
            client
                .send_to(&(i as u32).to_be_bytes(), node.addr)
                .expect("send");
        }
        let mut seen = vec![false; BURST];
        let mut count = 0;
        for _ in 0..1000 {
            if count == BURST {
                break;
            }
            node.driver
                .wait(Some(Duration::from_secs(1)))
                .expect("wait");
            node.driver
                .recv(&mut |_, bytes| {
                    let i = u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize;
                    assert!(!seen[i], "{i} twice");
                    seen[i] = true;
                    count += 1;
                })
                .expect("recv");
        }
        assert_eq!(count, BURST, "{backend:?}: {:?}", node.driver.stats());
        assert_eq!(node.driver.stats().receive_drops, 0, "{backend:?}");
    }
}

#[test]
fn oversized_datagrams_are_dropped_and_counted() {
    for backend in backends() {
        let mut node = Node::new(backend, "127.0.0.1:0", 8);
        let client = client("127.0.0.1:0");
        client
            .send_to(&[7u8; MAX_DATAGRAM + 500], node.addr)
            .expect("send big");
        client
            .send_to(&[1u8; MAX_DATAGRAM], node.addr)
            .expect("send max");
        let sources = node.echo(1, 50);
        assert_eq!(sources.len(), 1);
        assert_eq!(
            receive_n(&client, 1),
            vec![vec![1u8; MAX_DATAGRAM]],
            "{backend:?}"
        );
        let stats = node.driver.stats();
        assert_eq!(stats.receive_drops, 1, "{backend:?}: {stats:?}");
        assert_eq!(stats.received, 1, "{backend:?}: {stats:?}");
    }
}

#[test]
fn drivers_drop_cleanly_with_traffic_pending() {
    for backend in backends() {
        for round in 0..20 {
            let node = Node::new(backend, "127.0.0.1:0", 4);
            let client = client("127.0.0.1:0");
            for i in 0..round {
                client.send_to(&payload(i, 100), node.addr).expect("send");
            }
            let addr = node.addr;
            drop(node);
            // Nothing of the driver holds the port any more (a registered
            // socket is let go of at once, pending traffic or not).
            UdpSocket::bind(addr)
                .unwrap_or_else(|e| panic!("{backend:?} round {round}: {addr} still held: {e}"));
        }
    }
}

#[test]
fn commit_to_an_unreachable_family_is_a_send_error_not_a_panic() {
    for backend in backends() {
        let mut node = Node::new(backend, "127.0.0.1:0", 4);
        let slot = node.driver.send_slot().expect("slot");
        slot[0] = 1;
        node.driver
            .commit_send("[2001:db8::1]:9".parse().expect("v6"), 1);
        node.driver.flush().expect("flush");
        assert_eq!(node.driver.stats().send_errors, 1, "{backend:?}");
        assert_eq!(node.driver.stats().sent, 0, "{backend:?}");
    }
}

/// Receives everything waiting on the non-blocking group sockets until
/// `total` datagrams arrived (bounded by a deadline).
fn drain_group(group: &[UdpSocket], total: usize) -> Vec<Vec<Vec<u8>>> {
    let mut per_socket = vec![Vec::new(); group.len()];
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut received = 0;
    while received < total && Instant::now() < deadline {
        for (i, socket) in group.iter().enumerate() {
            loop {
                match socket.recv(&mut buf) {
                    Ok(len) => {
                        per_socket[i].push(buf[..len].to_vec());
                        received += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("group recv: {e}"),
                }
            }
        }
        thread::yield_now();
    }
    per_socket
}

#[test]
fn steering_sends_each_datagram_to_its_shard_socket() {
    const SHARDS: u32 = 4;
    let group = bind_group(
        "127.0.0.1:0".parse().expect("addr"),
        SHARDS as usize,
        1 << 20,
    )
    .expect("group");
    let port = local_port(&group[0]).expect("port");
    attach_steering(&group[0], SHARDS).expect("attach steering");
    let client = client("127.0.0.1:0");
    let target = SocketAddr::from(([127, 0, 0, 1], port));

    // (datagram, socket the §8 rule sends it to), spelled out independently.
    let mut cases: Vec<(Vec<u8>, usize)> = Vec::new();
    for word in 0u32..40 {
        let mut d = vec![0x80, 0xAA, 0xBB, 0xCC];
        d.extend(word.to_be_bytes());
        d.extend([0x55; 8]);
        cases.push((d, (word % 4) as usize));
    }
    for txid in 1000u32..1020 {
        let mut d = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        d.extend(txid.to_be_bytes());
        d.extend([0x33; 8]);
        cases.push((d, (txid % 4) as usize));
    }
    for tag in 0u8..4 {
        // The cookie with a high first byte is not STUN: it steers by the
        // cookie itself, 0x2112A442 mod 4 = 2.
        let mut d = vec![0x40 | tag, 0, 0, 0, 0x21, 0x12, 0xA4, 0x42];
        d.extend([0, 0, 0, 1]);
        cases.push((d, 2));
        // Too short for the load: socket 0.
        cases.push((vec![0xEE, tag, 0xEE], 0));
    }
    for (d, want) in &cases {
        assert_eq!(
            shard_for_datagram(d, SHARDS) as usize,
            *want,
            "rule and test disagree on {d:02x?}"
        );
        client.send_to(d, target).expect("send");
    }
    assert_eq!(shard_of(41, SHARDS), 1);

    let per_socket = drain_group(&group, cases.len());
    for (i, got) in per_socket.iter().enumerate() {
        let mut got = got.clone();
        let mut want: Vec<Vec<u8>> = cases
            .iter()
            .filter(|(_, s)| *s == i)
            .map(|(d, _)| d.clone())
            .collect();
        got.sort();
        want.sort();
        assert!(
            got == want,
            "socket {i}: got {} datagrams, want {}",
            got.len(),
            want.len()
        );
    }
}

#[test]
fn steering_with_one_shard_attaches_nothing() {
    let group = bind_group("127.0.0.1:0".parse().expect("addr"), 1, 0).expect("group");
    attach_steering(&group[0], 1).expect("no-op");
}

#[test]
fn port_zero_gets_one_real_port_for_the_whole_group() {
    let group = bind_group("127.0.0.1:0".parse().expect("addr"), 3, 1 << 20).expect("group");
    let port = local_port(&group[0]).expect("port");
    assert_ne!(port, 0);
    for s in &group {
        assert_eq!(local_port(s).expect("port"), port);
        assert!(
            s.recv(&mut [0u8; 8])
                .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock),
            "non-blocking"
        );
    }
    let (rcv, snd) = mpp::net::socket::buffer_sizes(&group[0]).expect("sizes");
    assert!(rcv >= 1 << 20 && snd >= 1 << 20, "buffers {rcv} {snd}");
    // IPv6 any (dual stack) works too.
    let v6 = bind_group("[::]:0".parse().expect("addr"), 2, 0).expect("v6 group");
    assert_ne!(local_port(&v6[0]).expect("port"), 0);
}

#[test]
fn binding_a_taken_port_names_the_address() {
    // A plain socket without SO_REUSEPORT holds the port.
    let holder = UdpSocket::bind("127.0.0.1:0").expect("holder");
    let taken = holder.local_addr().expect("addr");
    let err = bind_group(taken, 2, 0).expect_err("port is taken");
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    assert!(
        err.to_string().contains(&taken.to_string()),
        "message names the address: {err}"
    );
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<BindError>())
        .expect("a BindError inside");
    assert_eq!(inner.addr, taken);
}

/// A wake-up that lands while the shard is flushing sends (the driver reaps
/// completions then) must still end the next wait at once.
#[test]
fn a_wake_during_flush_is_not_lost() {
    for backend in backends() {
        let Node {
            mut driver, waker, ..
        } = Node::new(backend, "127.0.0.1:0", 8);
        let peer = client("127.0.0.1:0");
        let to = peer.local_addr().expect("addr");
        let slot = driver.send_slot().expect("a free slot");
        slot[..3].copy_from_slice(b"abc");
        driver.commit_send(to, 3);
        waker.wake();
        driver.flush().expect("flush");
        let t = Instant::now();
        driver.wait(Some(Duration::from_secs(10))).expect("wait");
        let waited = t.elapsed();
        assert!(
            waited < Duration::from_secs(5),
            "{backend:?}: a wake during flush was lost (waited {waited:?})"
        );
        // It is consumed: the next wait sleeps its timeout.
        let t = Instant::now();
        driver.wait(Some(Duration::from_millis(50))).expect("wait");
        assert!(
            t.elapsed() >= Duration::from_millis(40),
            "{backend:?}: the wake was not cleared"
        );
        drop(driver);
    }
}
