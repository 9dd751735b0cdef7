//! Shared helpers of the node's end-to-end tests (`tests/node_e2e.rs`,
//! `tests/node_cli.rs`): a node on loopback with its own data directory, a raw
//! HTTP/1.1 client, a Prometheus text reader, a test device (the library's
//! sans-IO `Client` over a std `UdpSocket`) and child processes read with
//! bounded waits.
//!
//! Every wait here is bounded: socket read timeouts, loops with an iteration
//! cap and a deadline. Nothing sleeps to let something happen, except the
//! short polling interval inside a bounded loop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpp::config::{IoChoice, NodeConfig};
use mpp::node::Node;
use mpp::packet::{Credential, MAX_PACKET};
use mpp::proto::{Client, ClientConfig, ClientEvent, ClientState};
use mpp::time::UnixMillis;

/// How long any wait may last before the test fails. Only reached on failure.
pub(crate) const WAIT: Duration = Duration::from_secs(10);

/// Polling interval inside bounded loops (metrics refresh every 200 ms).
pub(crate) const POLL: Duration = Duration::from_millis(25);

/// The deadline of one wait: [`WAIT`] from now.
pub(crate) fn deadline() -> Instant {
    Instant::now() + WAIT
}

/// Generates one `#[test]` per I/O driver for each named case: the case is a
/// `fn name(io: IoChoice)` in the including file, the tests are
/// `uring::name` and `mmsg::name`. (Not every including file uses it.)
#[allow(unused_macros)]
macro_rules! on_both_drivers {
    ($($case:ident),* $(,)?) => {
        mod uring {
            $(
                #[test]
                fn $case() {
                    super::$case(mpp::config::IoChoice::Uring)
                }
            )*
        }
        mod mmsg {
            $(
                #[test]
                fn $case() {
                    super::$case(mpp::config::IoChoice::Mmsg)
                }
            )*
        }
    };
}

/// The command-line name of a driver.
pub(crate) fn io_name(io: IoChoice) -> &'static str {
    match io {
        IoChoice::Uring => "uring",
        IoChoice::Mmsg => "mmsg",
        IoChoice::Auto => "auto",
    }
}

/// The wall clock, as the client wants it.
pub(crate) fn now() -> UnixMillis {
    UnixMillis::from_system_clock()
}

// ---------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "mpp-e2e-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/1.1
// ---------------------------------------------------------------------------

/// A response read off the wire.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// The local address of the TCP connection (the node's view of the peer).
    pub(crate) local: SocketAddr,
}

impl HttpResponse {
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.text()))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection (`Connection: close`), bounded by
/// connect, read and write timeouts.
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> HttpResponse {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to HTTP");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    stream.set_write_timeout(Some(WAIT)).expect("write timeout");
    let local = stream.local_addr().expect("local addr");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .expect("send request head");
    stream.write_all(body).expect("send request body");

    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let started = Instant::now();
    for _ in 0..100_000 {
        if let Some(response) = parse_response(&raw, local, false) {
            return response;
        }
        assert!(
            started.elapsed() < WAIT,
            "HTTP response not complete in time"
        );
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading the HTTP response: {e}"),
        }
    }
    parse_response(&raw, local, true).unwrap_or_else(|| {
        panic!(
            "incomplete HTTP response: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// A complete response in `raw`, or `None` if more bytes are needed
/// (`eof`: the connection closed, take what is there).
fn parse_response(raw: &[u8], local: SocketAddr, eof: bool) -> Option<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).expect("ASCII response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        decode_chunked(rest)?
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(HttpResponse {
        status,
        headers,
        body,
        local,
    })
}

/// A whole chunked body, or `None` until its last chunk arrived.
fn decode_chunked(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        if rest.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------

/// A `/metrics` page.
#[derive(Debug, Clone)]
pub(crate) struct Metrics(pub(crate) String);

impl Metrics {
    /// Every sample of `name`: its labels and value.
    pub(crate) fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, u64)> {
        let mut out = Vec::new();
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let (metric, labels) = match series.split_once('{') {
                Some((m, l)) => (m, l.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                continue;
            }
            let labels = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                .collect();
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
            out.push((labels, value));
        }
        out
    }

    /// The sum of the samples of `name` whose labels include all of `filter`.
    pub(crate) fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.samples(name)
            .into_iter()
            .filter(|(labels, _)| {
                filter
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// The sample of `name` for `shard`.
    pub(crate) fn shard(&self, name: &str, shard: usize) -> u64 {
        let shard = shard.to_string();
        let matching: Vec<u64> = self
            .samples(name)
            .into_iter()
            .filter(|(labels, _)| labels.get("shard") == Some(&shard))
            .map(|(_, v)| v)
            .collect();
        assert_eq!(matching.len(), 1, "one {name} sample for shard {shard}");
        matching[0]
    }

    /// Drops by reason, summed over shards.
    pub(crate) fn drops(&self, reason: &str) -> u64 {
        self.sum("mpp_drops_total", &[("reason", reason)])
    }

    /// The sample lines only (for failure messages).
    pub(crate) fn samples_text(&self) -> String {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `GET /metrics` on `http`.
pub(crate) fn metrics(http_addr: SocketAddr) -> Metrics {
    let r = http(http_addr, "GET", "/metrics", None, "", b"");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
    Metrics(r.text())
}

/// Polls `/metrics` until `cond` holds (metrics refresh every 200 ms); fails
/// after [`WAIT`] with the last page.
pub(crate) fn wait_metrics(
    http_addr: SocketAddr,
    what: &str,
    cond: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let until = deadline();
    let mut last = metrics(http_addr);
    for _ in 0..10_000 {
        if cond(&last) {
            return last;
        }
        if Instant::now() >= until {
            break;
        }
        std::thread::sleep(POLL);
        last = metrics(http_addr);
    }
    panic!(
        "metrics never showed {what} within {WAIT:?}; last page:\n{}",
        last.samples_text()
    );
}

// ---------------------------------------------------------------------------
// A node
// ---------------------------------------------------------------------------

/// The configuration of every test node: loopback, port 0, two unpinned
/// shards, the given driver, its own data directory.
pub(crate) fn node_config(io: IoChoice, data_dir: &Path) -> NodeConfig {
    NodeConfig {
        udp: "127.0.0.1:0".parse().expect("addr"),
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: data_dir.to_path_buf(),
        threads: 2,
        pin: false,
        io,
        ..NodeConfig::default()
    }
}

/// A node started in-process; stopped (bounded) and its directory removed on drop.
pub(crate) struct TestNode {
    node: Option<Node>,
    config: NodeConfig,
    pub(crate) udp: SocketAddr,
    pub(crate) http: SocketAddr,
    /// The web-transport listener, when `web` is set.
    pub(crate) web: Option<SocketAddr>,
    pub(crate) token: String,
    pub(crate) shards: usize,
    pub(crate) dir: TempDir,
}

impl TestNode {
    pub(crate) fn start(io: IoChoice) -> TestNode {
        Self::start_with(io, |_| {})
    }

    /// Starts a node on [`node_config`] changed by `adjust`.
    pub(crate) fn start_with(io: IoChoice, adjust: impl FnOnce(&mut NodeConfig)) -> TestNode {
        let dir = TempDir::new(&format!("node-{}", io_name(io)));
        let mut config = node_config(io, dir.path());
        adjust(&mut config);
        let node = mpp::node::start(&config, false)
            .unwrap_or_else(|e| panic!("node with io={} did not start: {e}", io_name(io)));
        assert_eq!(
            node.backend.name(),
            io_name(io),
            "the requested driver runs"
        );
        assert_eq!(node.shards, config.threads);
        TestNode {
            udp: node.udp,
            http: node.http,
            web: node.web,
            token: node.admin_token.clone(),
            shards: node.shards,
            node: Some(node),
            config,
            dir,
        }
    }

    /// Starts a node on [`node_config`] changed by `adjust`, with the test
    /// hooks given.
    pub(crate) fn start_hooked(
        io: IoChoice,
        hooks: mpp::node::TestHooks,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> TestNode {
        let dir = TempDir::new(&format!("node-{}", io_name(io)));
        let mut config = node_config(io, dir.path());
        adjust(&mut config);
        let node = mpp::node::start_with_hooks(&config, false, hooks)
            .unwrap_or_else(|e| panic!("node with io={} did not start: {e}", io_name(io)));
        TestNode {
            udp: node.udp,
            http: node.http,
            web: node.web,
            token: node.admin_token.clone(),
            shards: node.shards,
            node: Some(node),
            config,
            dir,
        }
    }

    /// Reloads as SIGHUP does (key files at once; no configuration here:
    /// the node runs without an operator) and returns the report.
    pub(crate) fn reload(&self) -> mpp::node::ReloadReport {
        self.node
            .as_ref()
            .expect("node running")
            .reload()
            .expect("the control thread answered the reload")
    }

    /// Makes shard `shard` fail (see `mpp::node::router::Fault`).
    pub(crate) fn inject_fault(&self, shard: usize, fault: mpp::node::router::Fault) {
        self.node
            .as_ref()
            .expect("node running")
            .inject_fault(shard, fault)
            .expect("the fault reached the shard's inbox");
    }

    /// Waits (bounded) for the node to stop by itself, without asking it
    /// to; the result of `Node::wait` and how long it took.
    pub(crate) fn wait_exit(&mut self) -> (std::io::Result<()>, Duration) {
        let node = self.node.take().expect("node running");
        let started = Instant::now();
        let result = wait_bounded(node);
        (result, started.elapsed())
    }

    /// Stops the node gracefully (as SIGTERM does: it saves its state) and
    /// starts a new one on the same ports and data directory, its
    /// configuration changed by `adjust`; how long the node was down.
    pub(crate) fn restart(&mut self, adjust: impl FnOnce(&mut NodeConfig)) -> Duration {
        let started = Instant::now();
        let (result, _) = self.stop();
        result.expect("the node stopped cleanly");
        adjust(&mut self.config);
        self.start_again();
        started.elapsed()
    }

    /// Starts the node again after [`TestNode::stop`], on the same ports
    /// and data directory.
    pub(crate) fn start_again(&mut self) {
        assert!(self.node.is_none(), "stop it first");
        self.config.udp = self.udp;
        self.config.http = self.http;
        if self.web.is_some() {
            self.config.web = self.web;
        }
        let node = mpp::node::start(&self.config, false)
            .unwrap_or_else(|e| panic!("the node did not start again: {e}"));
        assert_eq!((node.udp, node.http), (self.udp, self.http), "same ports");
        self.node = Some(node);
    }

    /// The node's master key, read from its data directory.
    pub(crate) fn master(&self) -> mpp::packet::MasterKey {
        let data = mpp::node::open_data_dir(self.dir.path()).expect("data dir");
        mpp::packet::MasterKey::new(data.master)
    }

    /// A credential issued by `POST /v1/credentials`.
    pub(crate) fn credential(&self, account: &str, device: &str) -> Credential {
        let body = serde_json::json!({"account": account, "device": device, "ttl_secs": 3600});
        let r = http(
            self.http,
            "POST",
            "/v1/credentials",
            Some(&self.token),
            "application/json",
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "POST /v1/credentials: {}", r.text());
        let credential = Credential::from_json(&r.text()).expect("a valid credential");
        assert_eq!(credential.account, account);
        assert_eq!(
            credential.endpoints,
            [self.udp.to_string()],
            "the credential points at the node"
        );
        credential
    }

    /// `POST /v1/notify` for one account; expects 202 `{"accepted":1}`.
    pub(crate) fn publish(&self, account: &str, bitmask_hex: &str) {
        let body = serde_json::json!({"account": account, "bitmask": bitmask_hex});
        let r = http(
            self.http,
            "POST",
            "/v1/notify",
            Some(&self.token),
            "application/json",
            body.to_string().as_bytes(),
        );
        assert_eq!(r.status, 202, "POST /v1/notify: {}", r.text());
        assert_eq!(r.json(), serde_json::json!({"accepted": 1}));
    }

    /// A device of `account`, connected.
    pub(crate) fn device(&self, account: &str, device: &str) -> Device {
        let mut d = Device::new(&self.credential(account, device), self.udp);
        d.connect();
        d
    }

    pub(crate) fn metrics(&self) -> Metrics {
        metrics(self.http)
    }

    pub(crate) fn wait_metrics(&self, what: &str, cond: impl Fn(&Metrics) -> bool) -> Metrics {
        wait_metrics(self.http, what, cond)
    }

    /// Shuts the node down and waits (bounded) for every thread; the result
    /// of `Node::wait` and how long it took.
    pub(crate) fn stop(&mut self) -> (std::io::Result<()>, Duration) {
        let node = self.node.take().expect("node running");
        let started = Instant::now();
        node.shutdown();
        let result = wait_bounded(node);
        (result, started.elapsed())
    }
}

/// `Node::wait` on a helper thread, at most [`WAIT`].
fn wait_bounded(node: Node) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(node.wait());
    });
    match rx.recv_timeout(WAIT) {
        Ok(result) => result,
        Err(_) => panic!("Node::wait did not return within {WAIT:?} of Node::shutdown"),
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown();
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(node.wait());
            });
            let _ = rx.recv_timeout(WAIT);
        }
    }
}

// ---------------------------------------------------------------------------
// A device
// ---------------------------------------------------------------------------

/// A device: the library's sans-IO client over a UDP socket on 127.0.0.1.
pub(crate) struct Device {
    pub(crate) client: Client,
    pub(crate) socket: UdpSocket,
    pub(crate) node: SocketAddr,
    /// Every event the client produced, in order.
    pub(crate) events: Vec<ClientEvent>,
    /// Every datagram sent, as sent.
    pub(crate) sent: Vec<Vec<u8>>,
    /// Datagrams from anywhere but the node (must stay 0).
    pub(crate) strays: usize,
    buf: Vec<u8>,
}

impl Device {
    pub(crate) fn new(credential: &Credential, node: SocketAddr) -> Device {
        Self::with_config(credential, node, ClientConfig::default())
    }

    pub(crate) fn with_config(
        credential: &Credential,
        node: SocketAddr,
        config: ClientConfig,
    ) -> Device {
        let socket = bind_udp(node);
        let seed: [u8; 32] = rand::random();
        Device {
            client: Client::new(credential, node, config, now(), seed),
            socket,
            node,
            events: Vec::new(),
            sent: Vec::new(),
            strays: 0,
            buf: vec![0u8; MAX_PACKET.max(2048)],
        }
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().expect("local addr")
    }

    /// Moves the device to a new socket (a new source port, as a NAT
    /// rebinding does); returns the old one.
    pub(crate) fn rebind(&mut self) -> UdpSocket {
        std::mem::replace(&mut self.socket, bind_udp(self.node))
    }

    /// Sends everything the client has queued.
    pub(crate) fn flush(&mut self) {
        while let Some(t) = self.client.poll_transmit(&mut self.buf) {
            self.sent.push(self.buf[..t.size].to_vec());
            self.socket
                .send_to(&self.buf[..t.size], t.destination)
                .expect("send to the node");
        }
    }

    /// One turn: send, wait at most `max_wait` for a datagram, fire due
    /// timers, collect events, send again.
    pub(crate) fn step(&mut self, max_wait: Duration) {
        self.flush();
        let t = now();
        let wait = self
            .client
            .poll_timeout()
            .map_or(max_wait, |d| {
                Duration::from_millis(d.millis_since(t)).min(max_wait)
            })
            .max(Duration::from_millis(1));
        self.socket
            .set_read_timeout(Some(wait))
            .expect("read timeout");
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) if from == self.client.node() => {
                self.client.handle_datagram(now(), &self.buf[..n])
            }
            Ok(_) => self.strays += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock
                        | ErrorKind::TimedOut
                        | ErrorKind::Interrupted
                        | ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => panic!("device receive: {e}"),
        }
        let t = now();
        if self.client.poll_timeout().is_some_and(|d| d <= t) {
            self.client.handle_timeout(t);
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push(e);
        }
        self.flush();
    }

    /// Steps until `until(events so far)` holds or `deadline` passes;
    /// whether it held.
    pub(crate) fn pump(
        &mut self,
        until: impl Fn(&[ClientEvent]) -> bool,
        deadline: Instant,
    ) -> bool {
        self.pump_until(|d| until(&d.events), deadline)
    }

    /// Steps until `until(self)` holds or `deadline` passes; whether it held.
    pub(crate) fn pump_until(
        &mut self,
        until: impl Fn(&Device) -> bool,
        deadline: Instant,
    ) -> bool {
        for _ in 0..100_000 {
            if until(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.step(Duration::from_millis(50));
        }
        until(self)
    }

    /// Steps for `d` (for checks that something does *not* happen).
    pub(crate) fn pump_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        for _ in 0..100_000 {
            if Instant::now() >= until {
                return;
            }
            self.step(Duration::from_millis(20));
        }
    }

    /// Pumps until the node accepted the connect; its endpoint as seen by the node.
    pub(crate) fn connect(&mut self) -> SocketAddr {
        assert!(
            self.pump(|e| connected(e).is_some(), deadline()),
            "device {} did not connect within {WAIT:?}; events: {:?}",
            self.client.conn_id(),
            self.events
        );
        let endpoint = connected(&self.events).expect("connected");
        assert_eq!(
            endpoint,
            self.local_addr(),
            "the node reports the address we sent from"
        );
        self.settle_catch_up();
        endpoint
    }

    /// A new connection brings a catch-up (a resync for a device with no
    /// mark), which the client acknowledges at once. So that a test's
    /// counts start clean, wait until the node has processed that
    /// acknowledgement: a status request sent after it on the same flow is
    /// answered only after it.
    pub(crate) fn settle_catch_up(&mut self) {
        if catch_ups(&self.events).is_empty() {
            return;
        }
        self.flush();
        self.client.request_status(now());
        assert_eq!(self.client.state(), ClientState::Unacknowledged);
        assert!(
            self.pump_until(|d| d.client.state() == ClientState::Connected, deadline()),
            "device {}: no status after its catch-up",
            self.client.conn_id()
        );
    }

    /// Pumps until a notify arrived; all notifies so far.
    pub(crate) fn wait_notify(&mut self) -> Vec<(i64, Vec<u8>)> {
        assert!(
            self.pump(|e| !notifies(e).is_empty(), deadline()),
            "device {} got no notify within {WAIT:?}; events: {:?}",
            self.client.conn_id(),
            self.events
        );
        notifies(&self.events)
    }
}

/// A UDP socket on the loopback address of `node`'s family, port 0.
pub(crate) fn bind_udp(node: SocketAddr) -> UdpSocket {
    let local = if node.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    UdpSocket::bind(local).expect("bind a loopback UDP socket")
}

/// The endpoint of the first `Connected` event.
pub(crate) fn connected(events: &[ClientEvent]) -> Option<SocketAddr> {
    events.iter().find_map(|e| match e {
        ClientEvent::Connected { endpoint } => Some(*endpoint),
        _ => None,
    })
}

/// Every `Notify` event but the catch-ups given at connect: Serial and bitmask.
pub(crate) fn notifies(events: &[ClientEvent]) -> Vec<(i64, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Notify {
                serial,
                bitmask,
                catch_up: false,
                ..
            } => Some((*serial, bitmask.clone())),
            _ => None,
        })
        .collect()
}

/// Every catch-up given at connect: Serial, bitmask, and whether it is a resync.
pub(crate) fn catch_ups(events: &[ClientEvent]) -> Vec<(i64, Vec<u8>, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Notify {
                serial,
                bitmask,
                catch_up: true,
                resync,
            } => Some((*serial, bitmask.clone(), *resync)),
            _ => None,
        })
        .collect()
}

/// Steps every device in turn until `until(devices)` holds or `deadline`
/// passes; whether it held.
pub(crate) fn pump_all(
    devices: &mut [Device],
    until: impl Fn(&[Device]) -> bool,
    deadline: Instant,
) -> bool {
    for _ in 0..100_000 {
        if until(devices) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        for d in devices.iter_mut() {
            d.step(Duration::from_millis(10));
        }
    }
    until(devices)
}

/// One datagram, waiting at most [`WAIT`]; `None` if none came.
///
/// A timed receive may fail with EINTR without any signal handler: the
/// thread that started a node probed io_uring, and the kernel's teardown of
/// that probe ring notifies the thread with task work (TWA_SIGNAL). Retried.
pub(crate) fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr)> {
    let until = deadline();
    for _ in 0..1000 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        socket.set_read_timeout(Some(left)).expect("read timeout");
        match socket.recv_from(buf) {
            Ok(x) => return Some(x),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("receive: {e}"),
        }
    }
    None
}

/// Whether a datagram waits on `socket` within `within` (for "no reply").
pub(crate) fn receives_within(socket: &UdpSocket, within: Duration) -> Option<(usize, SocketAddr)> {
    let mut buf = [0u8; 2048];
    let until = Instant::now() + within;
    for _ in 0..1000 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        socket.set_read_timeout(Some(left)).expect("read timeout");
        match socket.recv_from(&mut buf) {
            Ok(x) => return Some(x),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return None
            }
            Err(e) => panic!("receive: {e}"),
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// The value of `key=` in a start-up line (`mppd: listening udp=… http=…`).
pub(crate) fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// `mppd` on loopback ports the kernel picks (read them from its
/// "listening" line), unpinned, with `data` as its data directory; the
/// caller adds threads, backend and the rest.
pub(crate) fn loopback_mppd(data: &Path) -> Command {
    let mut cmd = pinned_loopback_mppd(data);
    cmd.arg("--no-pin");
    cmd
}

/// [`loopback_mppd`] with the shards pinned, as `mppd` does by default.
pub(crate) fn pinned_loopback_mppd(data: &Path) -> Command {
    let mut cmd = command(env!("CARGO_BIN_EXE_mppd"));
    cmd.args([
        "--udp",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(data);
    cmd
}

/// A command with no `MPPD_*` variables inherited (they would change the node).
pub(crate) fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MPPD_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A running child whose stdout lines arrive on a channel and whose stderr is
/// collected; killed on drop if still running.
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stdout line read so far.
    pub(crate) stdout: Vec<String>,
    stderr: Option<JoinHandle<String>>,
    stderr_text: Option<String>,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        Proc {
            name: name.to_owned(),
            child,
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
            stderr_text: None,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads stdout lines until one satisfies `pred` (returned) or the deadline.
    pub(crate) fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let until = deadline();
        for _ in 0..100_000 {
            if let Some(l) = self.stdout.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stdout.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process ended.
                    break;
                }
            }
        }
        if let Some(l) = self.stdout.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let status = self.child.try_wait().ok().flatten();
        let stderr = self.stderr_now();
        panic!(
            "{}: no stdout line with {what} within {WAIT:?} (exit status {status:?}); stdout: {:?}; stderr: {stderr}",
            self.name, self.stdout
        );
    }

    /// Waits (bounded) for the process to exit; drains stdout and stderr.
    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
        let until = deadline();
        for _ in 0..100_000 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // The reader thread ends at EOF; take every line.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.stdout.push(line);
                }
                let _ = self.stderr_now();
                return status;
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr = self.stderr_now();
        panic!(
            "{}: did not exit within {WAIT:?}; stdout: {:?}; stderr: {stderr}",
            self.name, self.stdout
        );
    }

    /// Everything written to stderr; complete once the process exited.
    pub(crate) fn stderr_now(&mut self) -> String {
        if self.stderr_text.is_none() {
            let done = self.child.try_wait().ok().flatten().is_some();
            if done {
                if let Some(h) = self.stderr.take() {
                    self.stderr_text = Some(h.join().unwrap_or_default());
                }
            }
        }
        self.stderr_text.clone().unwrap_or_default()
    }

    /// Sends a signal to the child (by its pid).
    pub(crate) fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a command to completion (bounded); its status, stdout and stderr.
pub(crate) fn run(name: &str, cmd: Command) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn(name, cmd);
    let status = p.wait_exit();
    let stdout = p.stdout.join("\n");
    let stderr = p.stderr_now();
    (status, stdout, stderr)
}

// ---------------------------------------------------------------------------
// Peers: STUN and DNS
// ---------------------------------------------------------------------------

/// A STUN Binding request (RFC 8489) with a random transaction id.
pub(crate) fn binding_request() -> ([u8; 12], Vec<u8>) {
    let txid: [u8; 12] = rand::random();
    let mut r = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    r.extend_from_slice(&txid);
    (txid, r)
}

/// A DNS query for `example.com` A, with id `id`.
pub(crate) fn dns_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
    q
}

/// A UDP "DNS server" on loopback: answers each query with its id and
/// `canned` (or, with `None`, never answers); the queries it saw.
pub(crate) struct FakeDns {
    pub(crate) addr: SocketAddr,
    pub(crate) queries: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FakeDns {
    pub(crate) fn start(canned: Option<&'static [u8]>) -> FakeDns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = socket.local_addr().expect("addr");
        let queries = Arc::new(Mutex::new(Vec::new()));
        let seen = queries.clone();
        // Ends when no query came for WAIT (the test is over).
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Some((n, from)) = recv_from(&socket, &mut buf) {
                seen.lock().expect("lock").push(buf[..n].to_vec());
                if let (Some(canned), true) = (canned, n >= 2) {
                    let mut answer = buf[..2].to_vec();
                    answer.extend_from_slice(canned);
                    let _ = socket.send_to(&answer, from);
                }
            }
        });
        FakeDns { addr, queries }
    }
}
