//! The control API over real HTTP/1.1 on loopback (docs/PROTOCOL.md §9): a fake
//! node behind `control::serve` (or `serve_listeners`, for a control and a
//! web listener), spoken to with raw requests on a `std::net::TcpStream` and
//! `Connection: close`. Reads have bounded timeouts and nothing sleeps.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mpp::control::{
    serve, serve_listeners, Exposition, HttpLimits, HttpListener, NodeApi, Overloaded, Routes,
    DEFAULT_CREDENTIAL_TTL_SECS, MAX_NOTIFY_BATCH, MAX_REQUEST_BODY,
};
use mpp::node::metrics::{render, NodeMetrics};
use mpp::node::shard::ShardMetrics;
use mpp::packet::{Credential, CredentialError, MasterKey};
use mpp::proto::ServiceStats;
use mpp::time::{UnixMillis, UnixSeconds};
use serde_json::{json, Value};
use tokio::sync::oneshot;

const TOKEN: &str = "test-admin-token";
const MASTER: [u8; 32] = [9; 32];
const ENDPOINT: &str = "127.0.0.1:15099";

/// What the fake node does with a web-service request.
enum WebMode {
    Reply(Vec<Vec<u8>>),
    Overloaded,
    /// Keeps the sender and never answers.
    Silent,
    /// Drops the sender.
    Drop,
}

/// A node that records what it is asked.
struct FakeNode {
    published: Mutex<Vec<(String, Vec<u8>)>>,
    /// `Some(k)`: accept k more publishes, then report Overloaded.
    publish_budget: Mutex<Option<usize>>,
    issued_ttls: Mutex<Vec<u64>>,
    web_mode: Mutex<WebMode>,
    web_requests: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
    silent_senders: Mutex<Vec<oneshot::Sender<Vec<Vec<u8>>>>>,
    /// What `health` answers.
    health: Mutex<Result<(), String>>,
}

impl FakeNode {
    fn new() -> Self {
        FakeNode {
            published: Mutex::default(),
            publish_budget: Mutex::default(),
            issued_ttls: Mutex::default(),
            web_mode: Mutex::new(WebMode::Reply(vec![])),
            web_requests: Mutex::default(),
            silent_senders: Mutex::default(),
            health: Mutex::new(Ok(())),
        }
    }

    fn published(&self) -> Vec<(String, Vec<u8>)> {
        self.published.lock().expect("lock").clone()
    }
}

impl NodeApi for FakeNode {
    fn publish(&self, account: &str, bitmask: &[u8]) -> Result<(), Overloaded> {
        let mut budget = self.publish_budget.lock().expect("lock");
        match budget.as_mut() {
            Some(0) => return Err(Overloaded),
            Some(k) => *k -= 1,
            None => {}
        }
        let mut published = self.published.lock().expect("lock");
        published.push((account.to_owned(), bitmask.to_vec()));
        Ok(())
    }

    fn issue_credential(
        &self,
        account: &str,
        device: &str,
        ttl_secs: u64,
    ) -> Result<Credential, CredentialError> {
        self.issued_ttls.lock().expect("lock").push(ttl_secs);
        let now = UnixMillis::from_system_clock().seconds();
        let expires = UnixSeconds(now.0 + ttl_secs as i64);
        Credential::issue(
            &MasterKey::new(MASTER),
            account,
            device,
            expires,
            vec![ENDPOINT.to_owned()],
            &mut rand::thread_rng(),
        )
    }

    fn web_request(
        &self,
        peer: SocketAddr,
        packet: Vec<u8>,
    ) -> Result<oneshot::Receiver<Vec<Vec<u8>>>, Overloaded> {
        let (tx, rx) = oneshot::channel();
        match &*self.web_mode.lock().expect("lock") {
            WebMode::Reply(replies) => {
                let _ = tx.send(replies.clone());
            }
            WebMode::Overloaded => return Err(Overloaded),
            WebMode::Silent => self.silent_senders.lock().expect("lock").push(tx),
            WebMode::Drop => drop(tx),
        }
        self.web_requests.lock().expect("lock").push((peer, packet));
        Ok(rx)
    }

    fn metrics(&self, out: &mut Exposition) {
        let shard = |i: usize, base: u64| ShardMetrics {
            shard: i,
            cpu: Some(i),
            connections: base + 1,
            service: ServiceStats {
                dropped_auth: base + 2,
                dropped_queue_full: base + 3,
                stun_dropped: base + 4,
                connects: base + 5,
                notifies_acked: base + 6,
                ..ServiceStats::default()
            },
            datagrams_received: base + 7,
            router_overflows: base + 8,
            ..ShardMetrics::default()
        };
        let snapshot = NodeMetrics {
            io_backend: "uring",
            threads: 2,
            uptime_secs: 42,
            shards: vec![shard(0, 0), shard(1, 100)],
            ..NodeMetrics::default()
        };
        render(&snapshot, out);
    }

    fn health(&self) -> Result<(), String> {
        self.health.lock().expect("lock").clone()
    }
}

/// `serve` on 127.0.0.1:0 in its own thread and current-thread runtime;
/// shut down gracefully and joined on drop.
struct TestServer {
    addr: SocketAddr,
    node: Arc<FakeNode>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    fn start() -> Self {
        let node = Arc::new(FakeNode::new());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, signal) = oneshot::channel::<()>();
        let api: Arc<dyn NodeApi> = node.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                serve(listener, api, TOKEN.to_owned(), async move {
                    let _ = signal.await;
                })
                .await
            })
        });
        TestServer {
            addr,
            node,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// A control listener (admin API, metrics, health) and a web listener
    /// (the web transport alone) on one `serve_listeners`; the web
    /// listener's address.
    fn start_split() -> (Self, SocketAddr) {
        let node = Arc::new(FakeNode::new());
        let bind = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
            l.set_nonblocking(true).expect("nonblocking");
            l
        };
        let (control, web) = (bind(), bind());
        let addr = control.local_addr().expect("local addr");
        let web_addr = web.local_addr().expect("local addr");
        let (shutdown, signal) = oneshot::channel::<()>();
        let api: Arc<dyn NodeApi> = node.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listeners = vec![
                    HttpListener {
                        listener: tokio::net::TcpListener::from_std(control)?,
                        routes: Routes::Admin,
                        limits: HttpLimits::default(),
                    },
                    HttpListener {
                        listener: tokio::net::TcpListener::from_std(web)?,
                        routes: Routes::Web,
                        limits: HttpLimits::default(),
                    },
                ];
                serve_listeners(listeners, api, TOKEN.to_owned(), async move {
                    let _ = signal.await;
                })
                .await
            })
        });
        let server = TestServer {
            addr,
            node,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        (server, web_addr)
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        request_at(self.addr, method, path, headers, body)
    }

    fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        self.request("POST", path, &headers, body)
    }

    fn notify(&self, body: &Value) -> Reply {
        self.post("/v1/notify", Some(TOKEN), body.to_string().as_bytes())
    }

    fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], b"")
    }
}

/// One request to `addr` on its own connection.
fn request_at(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut stream = TcpStream::connect(addr).expect("connect");

    let timeout = Some(Duration::from_secs(10));
    stream.set_read_timeout(timeout).expect("read timeout");
    stream.set_write_timeout(timeout).expect("write timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        addr,
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    // The server may answer (413) and close before reading the whole
    // body; the answer is still in our receive buffer then.
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body));
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => panic!("reading the response to {method} {path}: {e}"),
        }
    }
    Reply::parse(&raw)
}

impl Drop for TestServer {
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

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn parse(raw: &[u8]) -> Reply {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..split]).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut reply = Reply {
            status,
            headers,
            body: raw[split + 4..].to_vec(),
        };
        if reply.header("transfer-encoding") == Some("chunked") {
            reply.body = dechunk(&reply.body);
        } else if let Some(len) = reply.header("content-length") {
            assert_eq!(
                len.parse::<usize>().ok(),
                Some(reply.body.len()),
                "content-length"
            );
        }
        reply
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    fn json(&self) -> Value {
        assert_eq!(self.header("content-type"), Some("application/json"));
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The `error` of a JSON error body.
    fn error(&self) -> String {
        let v = self.json();
        v["error"].as_str().expect("error string").to_owned()
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&body[..end]).expect("chunk size");
        let size = usize::from_str_radix(size_text.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[end + 2 + size + 2..];
    }
}

#[test]
fn healthz_and_unknown_paths() {
    let server = TestServer::start();
    let r = server.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    let r = server.get("/v2/nothing");
    assert_eq!(r.status, 404);
    assert_eq!(r.error(), "no such endpoint");
    let r = server.post("/nope", Some(TOKEN), b"{}");
    assert_eq!(r.status, 404);
}

#[test]
fn wrong_method_is_405_even_without_token() {
    let server = TestServer::start();
    let r = server.get("/v1/notify");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(r.error(), "method not allowed");
    let r = server.post("/metrics", None, b"");
    assert_eq!(r.status, 405);
    let r = server.get("/.well-known/mmmpresence/");
    assert_eq!(r.status, 405);
}

#[test]
fn notify_single_and_batch_are_published() {
    let server = TestServer::start();
    let r = server.notify(&json!({"account": "alice@example.com", "bitmask": "0102"}));
    assert_eq!(r.status, 202);
    assert_eq!(r.json(), json!({"accepted": 1}));
    let r = server.notify(&json!({"notifications": [
        {"account": "bob", "bitmask": "ff"},
        {"account": "carol", "bitmask": "00000000000000000000000000000000000000000000000000000000000000AB"},
        {"account": "bob", "bitmask": "80"},
    ]}));
    assert_eq!(r.status, 202);
    assert_eq!(r.json(), json!({"accepted": 3}));
    let mut last = vec![0u8; 32];
    last[31] = 0xab;
    assert_eq!(
        server.node.published(),
        [
            ("alice@example.com".to_owned(), vec![1, 2]),
            ("bob".to_owned(), vec![0xff]),
            ("carol".to_owned(), last),
            ("bob".to_owned(), vec![0x80]),
        ]
    );
}

#[test]
fn notify_refuses_bad_requests_with_a_reason() {
    let server = TestServer::start();
    let entry = json!({"account": "a", "bitmask": "01"});
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"account\": ".to_vec(), "malformed JSON"),
        (b"not json".to_vec(), "malformed JSON"),
        (
            json!({"account": "a", "bitmask": "01", "extra": true})
                .to_string()
                .into_bytes(),
            "unknown field `extra`",
        ),
        (
            json!({"notifications": [{"account": "a", "bitmask": "01", "ttl": 1}]})
                .to_string()
                .into_bytes(),
            "unknown field `ttl`",
        ),
        (
            json!({"account": "a", "bitmask": "01", "notifications": [entry]})
                .to_string()
                .into_bytes(),
            "not both",
        ),
        (
            b"{}".to_vec(),
            "expected either account and bitmask, or notifications",
        ),
        (
            json!({"bitmask": "01"}).to_string().into_bytes(),
            "missing field `account`",
        ),
        (
            json!({"account": "", "bitmask": "01"})
                .to_string()
                .into_bytes(),
            "account is empty",
        ),
        (
            json!({"account": "a".repeat(256), "bitmask": "01"})
                .to_string()
                .into_bytes(),
            "account is longer than 255 bytes",
        ),
        (
            json!({"account": "a", "bitmask": "xyz1"})
                .to_string()
                .into_bytes(),
            "bitmask is not hex",
        ),
        (
            json!({"account": "a", "bitmask": "012"})
                .to_string()
                .into_bytes(),
            "bitmask is not hex",
        ),
        (
            json!({"account": "a", "bitmask": ""})
                .to_string()
                .into_bytes(),
            "bitmask is empty",
        ),
        (
            json!({"account": "a", "bitmask": "ab".repeat(33)})
                .to_string()
                .into_bytes(),
            "bitmask is longer than 32 bytes",
        ),
        (
            json!({"notifications": []}).to_string().into_bytes(),
            "notifications is empty",
        ),
        (
            json!({"notifications": vec![entry.clone(); MAX_NOTIFY_BATCH + 1]})
                .to_string()
                .into_bytes(),
            "10001 entries, at most 10000 allowed",
        ),
    ];
    for (body, reason) in cases {
        let r = server.post("/v1/notify", Some(TOKEN), &body);
        let shown = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        assert_eq!(r.status, 400, "{shown}");
        let error = r.error();
        assert!(error.contains(reason), "{shown}: {error}");
    }
    assert!(server.node.published().is_empty());
}

#[test]
fn notify_batch_is_validated_before_anything_is_published() {
    let server = TestServer::start();
    let mut entries = vec![json!({"account": "a", "bitmask": "01"}); 5];
    entries.push(json!({"account": "b", "bitmask": "zz"}));
    entries.push(json!({"account": "c", "bitmask": "02"}));
    let r = server.notify(&json!({ "notifications": entries }));
    assert_eq!(r.status, 400);
    assert_eq!(r.error(), "notifications[5]: bitmask is not hex");
    assert!(server.node.published().is_empty());
    // The largest batch is accepted whole.
    let entries = vec![json!({"account": "a", "bitmask": "01"}); MAX_NOTIFY_BATCH];
    let r = server.notify(&json!({ "notifications": entries }));
    assert_eq!(r.status, 202);
    assert_eq!(r.json(), json!({"accepted": MAX_NOTIFY_BATCH}));
    assert_eq!(server.node.published().len(), MAX_NOTIFY_BATCH);
}

#[test]
fn oversized_body_is_a_json_413() {
    let server = TestServer::start();
    let pad = "0".repeat(MAX_REQUEST_BODY);
    let body = format!(r#"{{"account": "a", "bitmask": "01", "pad": "{pad}"}}"#);
    let r = server.post("/v1/notify", Some(TOKEN), body.as_bytes());
    assert_eq!(r.status, 413);
    assert!(
        r.error().contains("larger than 1048576 bytes"),
        "{}",
        r.error()
    );
    assert!(server.node.published().is_empty());
}

#[test]
fn writes_need_the_admin_token() {
    let server = TestServer::start();
    let notify = json!({"account": "a", "bitmask": "01"}).to_string();
    let credential = json!({"account": "a", "device": "d"}).to_string();
    for path in ["/v1/notify", "/v1/credentials"] {
        let body = if path == "/v1/notify" {
            &notify
        } else {
            &credential
        };
        for token in [None, Some("wrong-token"), Some(&TOKEN[1..]), Some("")] {
            let r = server.post(path, token, body.as_bytes());
            assert_eq!(r.status, 401, "{path} {token:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            assert!(!r.error().is_empty());
            assert!(!r.text().contains(TOKEN));
        }
        let basic = [("Authorization", "Basic dGVzdDp0ZXN0")];
        let r = server.request("POST", path, &basic, body.as_bytes());
        assert_eq!(r.status, 401);
    }
    assert!(server.node.published().is_empty());
    assert!(server.node.issued_ttls.lock().expect("lock").is_empty());
}

#[test]
fn overloaded_shard_is_503_with_the_accepted_count() {
    let server = TestServer::start();
    *server.node.publish_budget.lock().expect("lock") = Some(2);
    let entries: Vec<Value> = (0..5)
        .map(|i| json!({"account": format!("user{i}"), "bitmask": "01"}))
        .collect();
    let r = server.notify(&json!({ "notifications": entries }));
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    let v = r.json();
    assert_eq!(v["accepted"], 2);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("overloaded")),
        "{v}"
    );
    let accounts: Vec<String> = server
        .node
        .published()
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert_eq!(accounts, ["user0", "user1"]);

    let r = server.notify(&json!({"account": "x", "bitmask": "01"}));
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["accepted"], 0);
}

#[test]
fn credentials_parse_back_and_verify() {
    let server = TestServer::start();
    let body = json!({"account": "alice@example.com", "device": "phone"}).to_string();
    let r = server.post("/v1/credentials", Some(TOKEN), body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let credential = Credential::from_json(&r.text()).expect("credential JSON");
    assert_eq!(r.text(), credential.to_json());
    assert_eq!(credential.account, "alice@example.com");
    assert_eq!(credential.device, "phone");
    assert_eq!(credential.endpoints, [ENDPOINT]);
    let now = UnixMillis::from_system_clock().seconds();
    assert_eq!(credential.verify(&MasterKey::new(MASTER), now), Ok(()));
    assert!(credential.expires.0 > now.0 + DEFAULT_CREDENTIAL_TTL_SECS as i64 - 60);

    let body = json!({"account": "bob", "device": "laptop", "ttl_secs": 3600}).to_string();
    let r = server.post("/v1/credentials", Some(TOKEN), body.as_bytes());
    assert_eq!(r.status, 200);
    let ttls = server.node.issued_ttls.lock().expect("lock").clone();
    assert_eq!(ttls, [DEFAULT_CREDENTIAL_TTL_SECS, 3600]);
}

#[test]
fn credentials_refuse_bad_requests_with_a_reason() {
    let server = TestServer::start();
    let cases: Vec<(String, &str)> = vec![
        ("{\"account\"".into(), "malformed JSON"),
        (
            json!({"account": "a"}).to_string(),
            "missing field `device`",
        ),
        (
            json!({"account": "a", "device": "d", "admin": true}).to_string(),
            "unknown field `admin`",
        ),
        (
            json!({"account": "a", "device": "d", "ttl_secs": 59}).to_string(),
            "ttl_secs must be at least 60",
        ),
        (
            json!({"account": "a", "device": "d", "ttl_secs": 366 * 86_400 + 1}).to_string(),
            "ttl_secs must be at most 31622400",
        ),
        (
            json!({"account": "a", "device": "d", "ttl_secs": "long"}).to_string(),
            "invalid request",
        ),
        (
            json!({"account": "", "device": "d"}).to_string(),
            "invalid account: empty",
        ),
        (
            json!({"account": "a", "device": "d".repeat(256)}).to_string(),
            "invalid device: longer than 255 bytes",
        ),
        (
            json!({"account": "a\u{7}", "device": "d"}).to_string(),
            "invalid account: contains control characters",
        ),
    ];
    for (body, reason) in cases {
        let r = server.post("/v1/credentials", Some(TOKEN), body.as_bytes());
        assert_eq!(r.status, 400, "{body}");
        let error = r.error();
        assert!(error.contains(reason), "{body}: {error}");
    }
}

#[test]
fn web_transport_frames_the_replies() {
    let server = TestServer::start();
    *server.node.web_mode.lock().expect("lock") =
        WebMode::Reply(vec![vec![0xaa; 3], vec![0xbb; 300]]);
    let packet = vec![0x42; 100];
    let octets = [("Content-Type", "application/octet-stream")];
    let r = server.request("POST", "/.well-known/mmmpresence/", &octets, &packet);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    let mut expected = vec![0, 3, 0xaa, 0xaa, 0xaa, 1, 44];
    expected.extend_from_slice(&[0xbb; 300]);
    assert_eq!(r.body, expected);
    let requests = server.node.web_requests.lock().expect("lock").clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0.ip(), server.addr.ip());
    assert_ne!(requests[0].0.port(), server.addr.port());
    assert_eq!(requests[0].1, packet);

    *server.node.web_mode.lock().expect("lock") = WebMode::Reply(vec![]);
    let r = server.request("POST", "/.well-known/mmmpresence/", &[], &[1; 1232]);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
}

#[test]
fn web_transport_refuses_bad_packets() {
    let server = TestServer::start();
    let r = server.request("POST", "/.well-known/mmmpresence/", &[], b"");
    assert_eq!(r.status, 400);
    assert_eq!(r.error(), "empty packet");
    let r = server.request("POST", "/.well-known/mmmpresence/", &[], &[1; 1233]);
    assert_eq!(r.status, 400);
    assert_eq!(r.error(), "packet longer than 1232 bytes");
    assert!(server.node.web_requests.lock().expect("lock").is_empty());
}

#[test]
fn web_transport_reports_overload_dropped_and_silent_shards() {
    let server = TestServer::start();
    let path = "/.well-known/mmmpresence/";
    *server.node.web_mode.lock().expect("lock") = WebMode::Overloaded;
    let r = server.request("POST", path, &[], b"packet");
    assert_eq!(r.status, 503);
    assert!(r.error().contains("overloaded"));
    *server.node.web_mode.lock().expect("lock") = WebMode::Drop;
    let r = server.request("POST", path, &[], b"packet");
    assert_eq!(r.status, 503);
    assert_eq!(r.error(), "the shard dropped the request");
    // Waits out the 2 s reply timeout.
    *server.node.web_mode.lock().expect("lock") = WebMode::Silent;
    let r = server.request("POST", path, &[], b"packet");
    assert_eq!(r.status, 504);
    assert!(r.error().contains("no reply"), "{}", r.error());
}

#[test]
fn metrics_have_every_family_with_shard_labels() {
    let server = TestServer::start();
    let r = server.get("/metrics");
    assert_eq!(r.status, 200);
    let content_type = r.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let text = r.text();
    for family in [
        "mpp_connections gauge",
        "mpp_datagrams_received_total counter",
        "mpp_datagrams_sent_total counter",
        "mpp_send_batches_total counter",
        "mpp_send_errors_total counter",
        "mpp_receive_drops_total counter",
        "mpp_drops_total counter",
        "mpp_connects_total counter",
        "mpp_refused_total counter",
        "mpp_disconnects_total counter",
        "mpp_expired_total counter",
        "mpp_migrations_total counter",
        "mpp_publishes_total counter",
        "mpp_notifies_sent_total counter",
        "mpp_notifies_retransmitted_total counter",
        "mpp_notifies_acked_total counter",
        "mpp_heartbeats_total counter",
        "mpp_resolves_total counter",
        "mpp_stun_answered_total counter",
        "mpp_router_forwarded_total counter",
        "mpp_router_overflows_total counter",
        "mpp_io_backend gauge",
        "mpp_threads gauge",
        "mpp_uptime_seconds gauge",
    ] {
        let name = family.split(' ').next().unwrap_or_default();
        assert!(
            text.contains(&format!("\n# TYPE {family}\n")),
            "TYPE {family}"
        );
        assert!(text.contains(&format!("# HELP {name} ")), "HELP {name}");
    }
    for sample in [
        "mpp_io_backend{backend=\"uring\"} 1",
        "mpp_threads 2",
        "mpp_uptime_seconds 42",
        "mpp_connections{shard=\"0\"} 1",
        "mpp_connections{shard=\"1\"} 101",
        "mpp_drops_total{shard=\"0\",reason=\"auth\"} 2",
        "mpp_drops_total{shard=\"1\",reason=\"queue_full\"} 103",
        "mpp_drops_total{shard=\"1\",reason=\"stun\"} 104",
        "mpp_drops_total{shard=\"0\",reason=\"malformed\"} 0",
        "mpp_drops_total{shard=\"1\",reason=\"replay\"} 0",
        "mpp_drops_total{shard=\"0\",reason=\"unexpected\"} 0",
        "mpp_connects_total{shard=\"1\"} 105",
        "mpp_notifies_acked_total{shard=\"0\"} 6",
        "mpp_datagrams_received_total{shard=\"1\"} 107",
        "mpp_router_overflows_total{shard=\"0\"} 8",
        "mpp_send_errors_total{shard=\"1\"} 0",
    ] {
        assert!(text.lines().any(|l| l == sample), "missing {sample}");
    }
    assert!(!text.contains("shard=\"2\""));
}

#[test]
fn healthz_is_503_with_the_reason_when_the_node_is_unhealthy() {
    let server = TestServer::start();
    *server.node.health.lock().expect("lock") =
        Err("shard 1: the shard's thread panicked; the node is exiting".into());
    let r = server.get("/healthz");
    assert_eq!(r.status, 503);
    assert_eq!(
        r.error(),
        "shard 1: the shard's thread panicked; the node is exiting"
    );
    *server.node.health.lock().expect("lock") = Ok(());
    let r = server.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
}

#[test]
fn metrics_count_the_http_connections() {
    let server = TestServer::start();
    let text = server.get("/metrics").text();
    for family in [
        "mpp_http_connections gauge",
        "mpp_http_connections_accepted_total counter",
        "mpp_http_connections_refused_total counter",
        "mpp_http_timeouts_total counter",
    ] {
        assert!(
            text.contains(&format!("\n# TYPE {family}\n")),
            "TYPE {family}"
        );
    }
    // The scrape's own connection is open while the page is written.
    assert!(text
        .lines()
        .any(|l| l == "mpp_http_connections{listener=\"control\"} 1"));
    for phase in ["header", "body", "idle", "write"] {
        let line = format!("mpp_http_timeouts_total{{listener=\"control\",phase=\"{phase}\"}} 0");
        assert!(text.lines().any(|l| l == line), "missing {line}");
    }
    assert!(!text.contains("listener=\"web\""), "no web listener here");
}

/// docs/PROTOCOL.md §9: with a web listener, the web transport is served
/// there and only there; the admin API, metrics and health only on the
/// control listener.
#[test]
fn a_web_listener_serves_only_the_web_transport() {
    let (server, web) = TestServer::start_split();
    *server.node.web_mode.lock().expect("lock") = WebMode::Reply(vec![vec![0xcc; 2]]);
    let path = "/.well-known/mmmpresence/";
    let r = request_at(web, "POST", path, &[], b"packet");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, [0, 2, 0xcc, 0xcc]);
    let requests = server.node.web_requests.lock().expect("lock").clone();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0.ip(), web.ip(), "the web peer's address");

    let r = server.request("POST", path, &[], b"packet");
    assert_eq!(r.status, 404, "the web transport on the control listener");
    assert_eq!(server.node.web_requests.lock().expect("lock").len(), 1);

    let auth = format!("Bearer {TOKEN}");
    let admin = [("Authorization", auth.as_str())];
    let notify = json!({"account": "a", "bitmask": "01"}).to_string();
    let credential = json!({"account": "a", "device": "d"}).to_string();
    for (method, path, body) in [
        ("POST", "/v1/notify", notify.as_bytes()),
        ("POST", "/v1/credentials", credential.as_bytes()),
        ("GET", "/metrics", &b""[..]),
        ("GET", "/healthz", &b""[..]),
    ] {
        let r = request_at(web, method, path, &admin, body);
        assert_eq!(r.status, 404, "{method} {path} on the web listener");
        assert_eq!(r.error(), "no such endpoint");
    }
    assert!(server.node.published().is_empty());
    assert!(server.node.issued_ttls.lock().expect("lock").is_empty());

    // …and they are served on the control listener, which reports both.
    let r = server.notify(&json!({"account": "a", "bitmask": "01"}));
    assert_eq!(r.status, 202);
    assert_eq!(server.get("/healthz").status, 200);
    let text = server.get("/metrics").text();
    assert!(text
        .lines()
        .any(|l| l.starts_with("mpp_http_connections_accepted_total{listener=\"web\"} ")));
    assert!(text
        .lines()
        .any(|l| l.starts_with("mpp_http_connections_accepted_total{listener=\"control\"} ")));
}
