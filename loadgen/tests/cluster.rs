//! The load generator against a cluster (docs/PROTOCOL.md §10): two nodes
//! in-process on loopback, sharing one master key and admin token, joined
//! by a real `nats-server` the test starts on a free loopback port (Debian
//! package `nats-server`; `.ci/run` installs it and sets
//! `MPP_REQUIRE_NATS=1`, which turns a missing server into a failure
//! instead of a skip, as `MPP_REQUIRE_MOSQUITTO` does for the mqtt test).
//!
//! `fanout --node A,B`: devices dealt to both nodes, each account's
//! publishes entering one of them, every publish reaching every device of
//! its account on both. Counts are exact; waits are bounded (the node is
//! polled for a condition, never slept on and then asserted).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mpp::config::{IoChoice, NodeConfig};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

/// `nats-server` on 127.0.0.1 and a free port; killed on drop.
struct Nats {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// Starts nats-server, or returns `None` (after saying so) when it is
    /// not installed, unless `MPP_REQUIRE_NATS=1` (CI): then a missing
    /// server fails the test.
    fn start() -> Option<Nats> {
        let Some(program) = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .map(PathBuf::from)
            .or_else(|| {
                Command::new("nats-server")
                    .arg("--version")
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|_| PathBuf::from("nats-server"))
            })
        else {
            if std::env::var("MPP_REQUIRE_NATS").as_deref() == Ok("1") {
                panic!(
                    "nats-server is not installed and MPP_REQUIRE_NATS=1: \
                     apt-get install nats-server (.ci/run does this)"
                );
            }
            eprintln!(
                "skipped: nats-server not installed (apt-get install nats-server; \
                 MPP_REQUIRE_NATS=1 makes this a failure)"
            );
            return None;
        };
        // A free port: bind port 0, note it, let it go. Another process
        // could take it in between; the start below then fails loudly.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("nats.log");
        let mut child = Command::new(program)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-l"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let until = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < until, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Nats {
            port,
            child,
            _dir: dir,
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster node in-process; stopped on drop.
struct ClusterNode {
    node: Option<mpp::node::Node>,
    udp: SocketAddr,
    http: SocketAddr,
    dir: tempfile::TempDir,
}

impl ClusterNode {
    /// Node `id` on `nats`; with `like`, that node's master key and admin
    /// token (the loadgen mints and publishes with one data directory's).
    fn start(nats: &Nats, id: &str, like: Option<&ClusterNode>) -> ClusterNode {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(first) = like {
            for file in [
                mpp::node::data_dir::MASTER_KEY_FILE,
                mpp::node::data_dir::ADMIN_TOKEN_FILE,
            ] {
                std::fs::copy(first.dir.path().join(file), dir.path().join(file))
                    .expect("copy the cluster's key and token");
            }
        }
        let config = NodeConfig {
            udp: "127.0.0.1:0".parse().expect("addr"),
            http: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_path_buf(),
            threads: 1,
            pin: false,
            io: IoChoice::Auto,
            stun_rate: 0,
            keep_state: false,
            cluster: vec![nats.url()],
            node_id: id.to_owned(),
            ..NodeConfig::default()
        };
        let node = mpp::node::start(&config, false).expect("node starts");
        ClusterNode {
            udp: node.udp,
            http: node.http,
            node: Some(node),
            dir,
        }
    }

    /// The sum of `name`'s samples on the node's `/metrics`.
    fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(self.http).expect("control API");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("metrics");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Waits (bounded) until `cond` holds of the node's metrics.
    fn wait_for(&self, what: &str, cond: impl Fn(&ClusterNode) -> bool) {
        let until = Instant::now() + WAIT;
        while !cond(self) {
            assert!(Instant::now() < until, "{what} within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown();
            let _ = node.wait();
        }
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// 2000 devices in 100 accounts dealt to two nodes of a cluster (device n
/// to node n mod 2: each account's 20 devices 10 and 10), each account's
/// publishes entering one node (account a's node a mod 2): every publish
/// reaches all 20 devices of its account, across the bus for the 10 on
/// the other node; nothing lost, nothing wrong; both nodes took publishes
/// and handed each to the bus, and each node received exactly what the
/// other handed over.
#[test]
fn fanout_across_two_nodes_delivers_every_publish_to_every_device() {
    let Some(nats) = Nats::start() else {
        return;
    };
    let a = ClusterNode::start(&nats, "a", None);
    let b = ClusterNode::start(&nats, "b", Some(&a));
    for n in [&a, &b] {
        n.wait_for("the node is on the bus", |n| {
            n.metric("mpp_cluster_connected") == 1
        });
    }
    let json = a.dir.path().join("report.json");
    let hlog = a.dir.path().join("report.hlog");
    let nodes = format!("{},{}", a.udp, b.udp);
    let controls = format!("http://{},http://{}", a.http, b.http);
    let out = Command::new(env!("CARGO_BIN_EXE_mpp-loadgen"))
        .args(["--node", &nodes, "--control", &controls])
        .arg("--data-dir")
        .arg(a.dir.path())
        .args(["--devices", "2000", "--accounts", "100"])
        .args(["--duration", "2s", "--warmup", "1s", "--timeout-ms", "5000"])
        .args(["--no-progress", "--json"])
        .arg(&json)
        .arg("--histogram-out")
        .arg(&hlog)
        .args(["fanout", "--rate", "500", "--drain", "10s"])
        .output()
        .expect("mpp-loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mpp-loadgen failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report"))
        .expect("JSON report parses");
    let f = &r["figures"];
    assert_eq!(u(&r["devices_held"]), 2000, "{r}");
    assert_eq!(u(&f["nodes"]), 2);
    let published = u(&f["published"]);
    assert!(published > 0, "{r}");
    assert_eq!(u(&f["expected_deliveries"]), published * 20, "{r}");
    assert_eq!(u(&f["delivered"]), published * 20, "{r}");
    assert_eq!(u(&r["lost"]), 0, "{r}");
    assert_eq!(u(&r["wrong"]), 0, "{r}");
    assert_eq!(u(&f["wrong_unverifiable"]), 0, "{r}");
    assert_eq!(u(&f["content_checked"]), u(&f["notifications"]), "{r}");
    // Half the deliveries crossed the bus, and were timed apart.
    let all = u(&r["latency_us"]["count"]);
    let cross = u(&r["cross_node_latency_us"]["count"]);
    assert!(cross > 0 && cross < all, "{all} {cross}: {r}");
    assert!(stdout.contains("cross-node latency µs"), "{stdout}");
    // Publishes entered both nodes; every one went to the bus once, and
    // the other node received it (each node hears every partition with
    // devices of the run's accounts, as it holds devices of all of them).
    let (pa, pb) = (
        a.metric("mpp_cluster_published_total"),
        b.metric("mpp_cluster_published_total"),
    );
    assert!(pa > 0 && pb > 0, "publishes entered both nodes: {pa} {pb}");
    assert_eq!(pa + pb, published, "no priming publish, none twice");
    assert_eq!(b.metric("mpp_cluster_received_total"), pa);
    assert_eq!(a.metric("mpp_cluster_received_total"), pb);
    for n in [&a, &b] {
        assert_eq!(n.metric("mpp_cluster_publish_failed_total"), 0);
        assert_eq!(n.metric("mpp_cluster_received_dropped_total"), 0);
    }
    // The histograms file holds both, and merges to the report's counts.
    let merged = Command::new(env!("CARGO_BIN_EXE_mpp-loadgen"))
        .arg("merge")
        .arg(&hlog)
        .output()
        .expect("mpp-loadgen merge runs");
    let table = String::from_utf8_lossy(&merged.stdout);
    assert!(merged.status.success(), "{table}");
    assert!(table.contains(&format!("(n={all})")), "{table}");
    assert!(table.contains(&format!("(n={cross})")), "{table}");
}
