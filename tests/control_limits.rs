//! Slow, idle and too many HTTP clients against the control plane
//! (docs/PROTOCOL.md §9, D24): `control::serve_listeners` on loopback with a
//! node that accepts every publish, and thousands of raw TCP connections.
//!
//! Each test gives the listener short timeouts so that it runs in seconds;
//! every wait is bounded by socket read timeouts or a deadline only a failure
//! reaches, and nothing sleeps to let something happen except the short
//! polling interval of a bounded loop. The connection counts fit this
//! process's open-file limit (raised to its hard limit first).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpp::control::{
    serve_listeners, Exposition, HttpLimits, HttpListener, NodeApi, Overloaded, Routes,
};
use mpp::packet::{Credential, CredentialError};
use tokio::sync::oneshot;

const TOKEN: &str = "limits-admin-token";
/// Any wait here; only reached on failure.
const WAIT: Duration = Duration::from_secs(20);
/// A request on a fresh connection must be answered within this, however
/// many slow clients hold connections.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A node that accepts every publish and counts them.
#[derive(Default)]
struct CountingNode {
    published: AtomicUsize,
}

impl NodeApi for CountingNode {
    fn publish(&self, _account: &str, _bitmask: &[u8]) -> Result<(), Overloaded> {
        self.published.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn issue_credential(
        &self,
        _account: &str,
        _device: &str,
        _ttl_secs: u64,
    ) -> Result<Credential, CredentialError> {
        Err(CredentialError::TooManyEndpoints)
    }

    fn web_request(
        &self,
        _peer: SocketAddr,
        _packet: Vec<u8>,
    ) -> Result<oneshot::Receiver<Vec<Vec<u8>>>, Overloaded> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(vec![]);
        Ok(rx)
    }

    fn metrics(&self, _out: &mut Exposition) {}
}

/// `serve_listeners` with one listener (every route) in its own thread;
/// shut down and joined on drop.
struct Server {
    addr: SocketAddr,
    node: Arc<CountingNode>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    fn start(limits: HttpLimits) -> Server {
        let node = Arc::new(CountingNode::default());
        // A backlog for thousands of connects in a row (std's is 128: a
        // burst beyond what the server accepted yet would wait out SYN
        // retransmissions, which says nothing about the server).
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind loopback");
        socket.listen(4096).expect("listen");
        let listener: std::net::TcpListener = socket.into();
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, signal) = oneshot::channel::<()>();
        let api: Arc<dyn NodeApi> = node.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = HttpListener {
                    listener: tokio::net::TcpListener::from_std(listener)?,
                    routes: Routes::All,
                    limits,
                };
                serve_listeners(vec![listener], api, TOKEN.to_owned(), async move {
                    let _ = signal.await;
                })
                .await
            })
        });
        Server {
            addr,
            node,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// One request on a fresh connection (`Connection: close`); the status
    /// and body, or why there was none.
    fn try_request(&self, head: &str, body: &[u8]) -> Result<(u16, String), String> {
        let mut s = TcpStream::connect_timeout(&self.addr, ANSWER_WITHIN)
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(ANSWER_WITHIN)).expect("timeout");
        s.set_write_timeout(Some(ANSWER_WITHIN)).expect("timeout");
        s.write_all(head.as_bytes())
            .and_then(|()| s.write_all(body))
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status line in {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    fn notify(&self) -> Result<(u16, String), String> {
        let body = br#"{"account":"alice@example.com","bitmask":"01"}"#;
        let head = format!(
            "POST /v1/notify HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.try_request(&head, body)
    }

    /// `GET /metrics`; `None` if the server did not answer.
    fn metrics(&self) -> Option<String> {
        let head = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        match self.try_request(head, b"") {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    }

    /// Polls `/metrics` until `cond` holds of it; fails after [`WAIT`].
    fn wait_metrics(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + WAIT;
        let mut last = String::new();
        for _ in 0..10_000 {
            if let Some(m) = self.metrics() {
                if cond(&m) {
                    return m;
                }
                last = m;
            }
            assert!(
                Instant::now() < until,
                "metrics never showed {what}; last:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("metrics never showed {what}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let result = thread.join().expect("server thread panicked");
            if !std::thread::panicking() {
                result.expect("serve returned an error");
            }
        }
    }
}

/// The value of the sample `series` (name and labels, as written).
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
}

/// Raises this process's soft open-file limit to its hard limit; the limit.
fn raise_open_files() -> libc::rlim_t {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write the one struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            }
        }
    }
    limit.rlim_cur
}

/// Waits until the server closed `s` (read returns 0 or a reset), reading
/// whatever it answered first; false if it is still open at `until`.
fn closed_by_server(s: &mut TcpStream, until: Instant) -> bool {
    let mut buf = [0u8; 4096];
    for _ in 0..100_000 {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(e) => panic!("unexpected read error: {e}"),
        }
    }
    false
}

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, ANSWER_WITHIN).expect("connect")
}

/// 1,000+ connections that send nothing, 1,000+ that send half a request
/// head and 1,000+ that send a head and half the body it announces: a
/// publish on a fresh connection is still answered at once; every one of
/// them is closed by the server after its timeout; the count of open
/// connections drains to the one asking.
#[test]
fn slow_and_idle_clients_do_not_hold_the_control_plane() {
    // Each connection takes two descriptors in this process (client and
    // server side); keep a margin for the test harness and other tests.
    let limit = raise_open_files();
    let per_kind = (limit.saturating_sub(1024) / 6).min(1100) as usize;
    assert!(
        per_kind >= 100,
        "the open-file limit ({limit}) is too low for this test"
    );
    let limits = HttpLimits {
        header_timeout: Duration::from_secs(4),
        body_timeout: Duration::from_secs(4),
        idle_timeout: Duration::from_secs(4),
        max_connections: 4 * per_kind + 64,
    };
    let server = Server::start(limits);
    let body = br#"{"account":"alice@example.com","bitmask":"01"}"#;
    let half_body_head = format!(
        "POST /v1/notify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut idle = Vec::with_capacity(per_kind);
    let mut half_head = Vec::with_capacity(per_kind);
    let mut half_body = Vec::with_capacity(per_kind);
    let first_opened = Instant::now();
    for _ in 0..per_kind {
        idle.push(connect(server.addr));
        let mut s = connect(server.addr);
        s.write_all(b"POST /v1/notify HTTP/1.1\r\nHost: x\r\nContent-Le")
            .expect("half a head");
        half_head.push(s);
        let mut s = connect(server.addr);
        s.write_all(half_body_head.as_bytes())
            .and_then(|()| s.write_all(&body[..body.len() / 2]))
            .expect("a head and half its body");
        half_body.push(s);
    }

    // A publish on a fresh connection, while they all wait.
    let answer = server.notify();
    assert_eq!(
        answer.as_ref().map(|(status, _)| *status),
        Ok(202),
        "{answer:?}"
    );
    assert_eq!(server.node.published.load(Ordering::Relaxed), 1);
    // They were all held when it was answered (unless this machine took the
    // whole timeout to get here, when the check says nothing).
    if let Some(m) = server.metrics() {
        if first_opened.elapsed() < limits.header_timeout {
            let open = sample(&m, "mpp_http_connections{listener=\"control\"}");
            assert!(open as usize > 2 * per_kind, "open connections: {open}");
        }
    }

    // The server closes every one of them after its timeout.
    let until = Instant::now() + WAIT;
    for (kind, conns) in [
        ("idle", &mut idle),
        ("half a head", &mut half_head),
        ("half a body", &mut half_body),
    ] {
        for (i, s) in conns.iter_mut().enumerate() {
            assert!(
                closed_by_server(s, until),
                "{kind} connection {i} still open after {WAIT:?}"
            );
        }
    }
    let m = server.wait_metrics("the open connections drained", |m| {
        sample(m, "mpp_http_connections{listener=\"control\"}") <= 1
    });
    let header = sample(
        &m,
        "mpp_http_timeouts_total{listener=\"control\",phase=\"header\"}",
    );
    let body_timeouts = sample(
        &m,
        "mpp_http_timeouts_total{listener=\"control\",phase=\"body\"}",
    );
    assert!(header as usize >= 2 * per_kind, "header timeouts: {header}");
    assert!(
        body_timeouts as usize >= per_kind,
        "body timeouts: {body_timeouts}"
    );
    assert_eq!(
        sample(
            &m,
            "mpp_http_connections_refused_total{listener=\"control\"}"
        ),
        0
    );
    // Nothing of the half bodies was published.
    assert_eq!(server.node.published.load(Ordering::Relaxed), 1);
}

/// A kept-alive connection is answered, then closed once it idles past the
/// idle timeout.
#[test]
fn an_idle_kept_alive_connection_is_closed() {
    let limits = HttpLimits {
        idle_timeout: Duration::from_millis(500),
        ..HttpLimits::default()
    };
    let server = Server::start(limits);
    let mut s = connect(server.addr);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    while !raw.ends_with(b"ok") {
        let n = s.read(&mut buf).expect("the answer");
        assert!(n > 0, "closed before answering: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    }
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{raw:?}");
    assert!(
        closed_by_server(&mut s, Instant::now() + WAIT),
        "the idle connection stayed open"
    );
    let m = server.wait_metrics("one idle timeout", |m| {
        sample(
            m,
            "mpp_http_timeouts_total{listener=\"control\",phase=\"idle\"}",
        ) >= 1
    });
    assert_eq!(
        sample(&m, "mpp_http_connections{listener=\"control\"}"),
        1,
        "only the scrape's own connection"
    );
}

/// At the cap, a new connection is closed at once (long before any
/// timeout would close it), and counted; once the held ones go, requests
/// are served again.
#[test]
fn connections_beyond_the_cap_are_closed_at_once() {
    let cap = 16;
    let limits = HttpLimits {
        header_timeout: Duration::from_secs(60),
        max_connections: cap,
        ..HttpLimits::default()
    };
    let server = Server::start(limits);
    let mut held: Vec<TcpStream> = (0..cap).map(|_| connect(server.addr)).collect();
    // Accepted in order: the next one is over the cap.
    let mut over = connect(server.addr);
    let _ = over.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        closed_by_server(&mut over, Instant::now() + WAIT),
        "a connection over the cap was kept (the header timeout is 60 s)"
    );
    // The held ones are still open and served.
    let mut first = held.remove(0);
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    first.set_read_timeout(Some(WAIT)).expect("timeout");
    let mut answer = Vec::new();
    first.read_to_end(&mut answer).expect("answer");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    drop(held);
    let m = server.wait_metrics("a refused connection", |m| {
        sample(
            m,
            "mpp_http_connections_refused_total{listener=\"control\"}",
        ) >= 1
    });
    assert!(
        sample(
            &m,
            "mpp_http_connections_accepted_total{listener=\"control\"}"
        ) > cap as u64
    );
}
