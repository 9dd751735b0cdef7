//! `mpp resolve` end to end against a real resolver: dnsmasq, started by
//! the test on a free loopback port with its own records only
//! (`--no-resolv --no-hosts`, never the system's resolver), behind a node
//! started in-process with `dns_upstream` pointing at it. Over UDP and over
//! the web transport; a TXT answer large enough to need several fragments
//! (docs/PROTOCOL.md §5); bad names and types (exit 2); upstream failures
//! (exit 1 with the Status).
//!
//! dnsmasq comes from Debian (`apt-get install dnsmasq`; `.ci/run` installs
//! it): without it these tests fail and say so, rather than pass unrun.

#[macro_use]
mod node;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use mpp::config::IoChoice;
use node::{command, run, TestNode, WAIT};

const MPP: &str = env!("CARGO_BIN_EXE_mpp");

/// The strings of the large TXT record: 12 × 200 bytes, an answer of about
/// 2.5 KB, three fragments of at most 1,191 bytes.
fn big_strings() -> Vec<String> {
    (0..12)
        .map(|i| format!("{i:02}-{}", "x".repeat(197)))
        .collect()
}

/// dnsmasq on 127.0.0.1:`port`, killed on drop.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Dnsmasq {
    fn start() -> Dnsmasq {
        let available = Command::new("dnsmasq")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            available,
            "dnsmasq is not installed: these tests need a real resolver \
             (apt-get install -y dnsmasq; .ci/run does it)"
        );
        // A free port: bound, then released for dnsmasq (retried if taken
        // meanwhile).
        for _ in 0..5 {
            let port = UdpSocket::bind("127.0.0.1:0")
                .and_then(|s| s.local_addr())
                .expect("a free port")
                .port();
            let big = big_strings().join(",");
            let child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--pid-file",
                    "--log-facility=-",
                    "--address=/example.test/192.0.2.1",
                    // No quotes: dnsmasq keeps them as part of the text.
                    "--txt-record=small.txt.test,hello world",
                    // Its default EDNS limit (1,232 bytes) would truncate
                    // the large TXT answer.
                    "--edns-packet-max=4096",
                ])
                .arg(format!("--txt-record=big.txt.test,{big}"))
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start dnsmasq");
            let mut d = Dnsmasq {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            if d.answers() {
                return d;
            }
            let _ = d.child.kill();
            let _ = d.child.wait();
        }
        panic!("dnsmasq did not answer on a free loopback port");
    }

    /// Whether it answers a query (bounded wait): ready, or dead.
    fn answers(&mut self) -> bool {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut query = Message::new(7, MessageType::Query, OpCode::Query);
        query.add_query(Query::query(
            Name::from_ascii("www.example.test.").expect("name"),
            RecordType::A,
        ));
        let bytes = query.to_vec().expect("query");
        let until = Instant::now() + WAIT;
        let mut buf = [0u8; 512];
        while Instant::now() < until {
            if self.child.try_wait().ok().flatten().is_some() {
                return false; // exited: the port was taken
            }
            let _ = socket.send_to(&bytes, self.addr);
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                return n > 12;
            }
        }
        false
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node whose resolve proxy goes to `upstream`, and a credential file.
fn node_with(upstream: Option<SocketAddr>, timeout_ms: u64) -> (TestNode, std::path::PathBuf) {
    let node = TestNode::start_with(IoChoice::Mmsg, |c| {
        c.dns_upstream = upstream;
        c.resolve_timeout_ms = timeout_ms;
    });
    let file = node.dir.join("phone.json");
    std::fs::write(&file, node.credential("r@x", "phone").to_json()).expect("credential");
    (node, file)
}

fn resolve(node: &TestNode, credential: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = command(MPP);
    cmd.arg("resolve")
        .arg("--credential")
        .arg(credential)
        .args(["--node", &node.udp.to_string()])
        .args(["--web", &format!("http://{}", node.http)])
        .args(args);
    let (status, out, err) = run("mpp resolve", cmd);
    (status.code().unwrap_or(-1), out, err)
}

#[test]
fn an_a_record_prints_like_dig_short_over_udp_and_http() {
    let dns = Dnsmasq::start();
    let (node, cred) = node_with(Some(dns.addr), 5_000);
    for transport in ["udp", "http"] {
        let (code, out, err) = resolve(
            &node,
            &cred,
            &["--transport", transport, "www.example.test"],
        );
        assert_eq!(code, 0, "{transport}: {err}");
        assert_eq!(out.trim(), "192.0.2.1", "{transport}");
    }
    let (code, out, err) = resolve(&node, &cred, &["small.txt.test", "txt"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "\"hello world\"");
}

#[test]
fn a_txt_answer_in_several_fragments_arrives_whole_over_udp_and_http() {
    let dns = Dnsmasq::start();
    let (node, cred) = node_with(Some(dns.addr), 5_000);
    let expected = big_strings()
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(" ");
    for transport in ["udp", "http"] {
        let (code, out, err) = resolve(
            &node,
            &cred,
            &["--transport", transport, "big.txt.test", "TXT"],
        );
        assert_eq!(code, 0, "{transport}: {err}");
        assert_eq!(out.trim(), expected, "{transport}");
        let (code, out, err) = resolve(
            &node,
            &cred,
            &["--transport", transport, "--json", "big.txt.test", "TXT"],
        );
        assert_eq!(code, 0, "{transport}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
        assert_eq!(v["status"], "NOERROR", "{v}");
        assert_eq!(v["question"][0]["name"], "big.txt.test.");
        assert_eq!(v["answer"][0]["type"], "TXT");
        assert_eq!(v["answer"][0]["data"], expected.as_str());
        assert!(v["flags"]["qr"].as_bool().unwrap_or(false));
    }
    // Larger than one packet can carry: the node sent fragments.
    assert!(expected.len() > 1191, "{}", expected.len());
}

#[test]
fn an_unknown_name_prints_nothing_and_json_says_nxdomain() {
    let dns = Dnsmasq::start();
    let (node, cred) = node_with(Some(dns.addr), 5_000);
    // dnsmasq without upstreams answers names it does not know REFUSED
    // or NXDOMAIN; either way dig +short prints nothing and exits 0.
    let (code, out, err) = resolve(&node, &cred, &["nowhere.invalid"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "");
    let (code, out, err) = resolve(&node, &cred, &["--json", "nowhere.invalid"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_ne!(v["status"], "NOERROR", "{v}");
    assert_eq!(v["answer"], serde_json::json!([]));
}

#[test]
fn bad_names_and_types_are_one_line_and_exit_2() {
    let (node, cred) = node_with(None, 5_000);
    for args in [
        &["a..b"][..],
        &[&*"x".repeat(64)],
        &["example.test", "BOGUS"],
        &["example.test", "TYPE99999"],
    ] {
        let (code, out, err) = resolve(&node, &cred, args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].starts_with("mpp: "), "{err}");
    }
}

#[test]
fn upstream_failures_exit_1_with_the_status() {
    // No upstream configured: 502. The two runs come within a second, so
    // the second starts at the first's Serials (they follow the clock, D2):
    // its connects are dropped as replays, and it must still answer (its
    // next round, 64 ahead, follows at once) instead of "the node stopped
    // answering".
    let (node, cred) = node_with(None, 5_000);
    for transport in ["udp", "http"] {
        let (code, out, err) = resolve(&node, &cred, &["--transport", transport, "example.test"]);
        assert_eq!(code, 1, "{transport}: {err}");
        assert_eq!(out, "");
        assert!(err.contains("Status 502"), "{transport}: {err}");
    }
    drop(node);
    // An upstream that never answers: 504 once the resolve timeout passes.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (node, cred) = node_with(Some(silent.local_addr().expect("addr")), 300);
    let (code, _, err) = resolve(&node, &cred, &["example.test"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Status 504"), "{err}");
}
