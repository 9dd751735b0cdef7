//! STUN on the MPP port (docs/PROTOCOL.md §8.2) against STUN clients of other
//! ecosystems, on real loopback sockets, with a node running in-process on
//! each I/O driver: coturn's stock client `turnutils_stunclient` (Debian
//! package `coturn`) and the STUN message and transaction code of the Python
//! package `aioice` (PyPI), which checks FINGERPRINT on what it receives.
//!
//! The tools are not vendored: `.ci/run` installs them. A missing tool fails
//! its test with the command that installs it; nothing is skipped. Every
//! child process runs under a deadline and is killed past it.

#[macro_use]
mod node;

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mpp::config::IoChoice;
use node::TestNode;

on_both_drivers!(
    turnutils_stunclient_reports_the_mapped_address,
    aioice_binding_over_ipv4,
    aioice_binding_over_ipv6,
);

/// How long one client run may take before it is killed and the test fails.
const CLIENT_DEADLINE: Duration = Duration::from_secs(20);

/// What a finished client printed.
struct Run {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion within [`CLIENT_DEADLINE`]; `install` says how to
/// get the program when it is missing.
fn run_bounded(mut cmd: Command, install: &str) -> Run {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("`{program}` is not installed: {install} (.ci/run does this)")
        }
        Err(e) => panic!("cannot start `{program}`: {e}"),
    };
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let until = Instant::now() + CLIENT_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the client") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap_or_default();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "`{program}` did not finish within {CLIENT_DEADLINE:?}; stdout: {stdout}; stderr: {stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------
// coturn's turnutils_stunclient
// ---------------------------------------------------------------------------

/// The stock client sends a Binding request with no attributes and prints
/// the XOR-MAPPED-ADDRESS of the success response as its "reflexive addr".
fn turnutils_stunclient_reports_the_mapped_address(io: IoChoice) {
    let node = TestNode::start(io);
    let mut cmd = node::command("turnutils_stunclient");
    cmd.arg("-p")
        .arg(node.udp.port().to_string())
        .arg(node.udp.ip().to_string());
    let run = run_bounded(cmd, "apt-get install -y coturn");
    eprintln!("turnutils_stunclient stdout:\n{}", run.stdout);
    assert!(
        run.status.success(),
        "turnutils_stunclient failed ({}); stdout: {}; stderr: {}",
        run.status,
        run.stdout,
        run.stderr
    );
    let mapped = run
        .stdout
        .lines()
        .find_map(|l| l.split("reflexive addr:").nth(1))
        .map(|a| a.trim().to_owned())
        .unwrap_or_else(|| {
            panic!(
                "turnutils_stunclient printed no reflexive address; stdout: {}; stderr: {}",
                run.stdout, run.stderr
            )
        });
    let mapped: SocketAddr = mapped
        .parse()
        .unwrap_or_else(|e| panic!("reflexive addr {mapped:?}: {e}"));
    assert_eq!(mapped.ip(), IpAddr::from([127, 0, 0, 1]), "{}", run.stdout);
    assert_ne!(mapped.port(), 0);
    assert_ne!(
        mapped.port(),
        node.udp.port(),
        "the client's port, not ours"
    );
    node.wait_metrics("mpp_stun_answered_total >= 1", |m| {
        m.sum("mpp_stun_answered_total", &[]) >= 1
    });
}

// ---------------------------------------------------------------------------
// aioice (Python)
// ---------------------------------------------------------------------------

/// Drives aioice's STUN code against `host port`: its `Message` builds the
/// requests (FINGERPRINT by `add_fingerprint`, MESSAGE-INTEGRITY by
/// `add_message_integrity`), its `Transaction` sends and retransmits them,
/// its `parse_message` reads the answers (verifying their FINGERPRINT). One
/// line per exchange, `key=value` words.
const AIOICE_CLIENT: &str = r#"
import asyncio, socket, struct, sys
from aioice import stun

HOST, PORT = sys.argv[1], int(sys.argv[2])


class Client(asyncio.DatagramProtocol):
    def __init__(self):
        self.transactions = {}
        self.raw = {}

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        message = stun.parse_message(data)  # raises on a bad FINGERPRINT
        self.raw[message.transaction_id] = data
        transaction = self.transactions.get(message.transaction_id)
        if transaction is not None:
            transaction.response_received(message, (addr[0], addr[1]))

    def send_stun(self, message, addr):
        self.transport.sendto(bytes(message), addr)

    async def request(self, message):
        transaction = stun.Transaction(message, (HOST, PORT), self, retransmissions=3)
        self.transactions[message.transaction_id] = transaction
        try:
            return await transaction.run()
        finally:
            del self.transactions[message.transaction_id]


def unknown_attributes(data):
    pos = 20
    while pos + 4 <= len(data):
        kind, length = struct.unpack("!HH", data[pos : pos + 4])
        if kind == 0x000A:
            value = data[pos + 4 : pos + 4 + length]
            return ",".join("%#06x" % struct.unpack("!H", value[i : i + 2]) for i in range(0, length, 2))
        pos += 4 + length + (-length % 4)
    return "none"


def describe(name, response, addr, raw):
    words = [name, "class=" + response.message_class.name]
    if "XOR-MAPPED-ADDRESS" in response.attributes:
        ip, port = response.attributes["XOR-MAPPED-ADDRESS"]
        words.append("mapped=%s,%d" % (ip, port))
    if "ERROR-CODE" in response.attributes:
        code, reason = response.attributes["ERROR-CODE"]
        words.append("error=%d" % code)
        words.append("reason=%s" % reason.replace(" ", "_"))
        words.append("unknown=" + unknown_attributes(raw))
    words.append("from=%s,%d" % (addr[0], addr[1]))
    words.append("attributes=" + ",".join(response.attributes))
    words.append("bytes=%d" % len(raw))
    print(" ".join(words), flush=True)


async def main():
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in HOST else socket.AF_INET
    transport, client = await loop.create_datagram_endpoint(
        Client, local_addr=(HOST, 0), family=family
    )
    local = transport.get_extra_info("sockname")
    print("local %s,%d" % (local[0], local[1]), flush=True)

    # A Binding request with SOFTWARE and FINGERPRINT.
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    request.attributes["SOFTWARE"] = "aioice interop test"
    request.add_fingerprint()
    response, addr = await client.request(request)
    describe("binding", response, addr, client.raw[request.transaction_id])

    # Unknown comprehension-required attributes: CHANGE-REQUEST, PRIORITY.
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    request.attributes["CHANGE-REQUEST"] = 6
    request.attributes["PRIORITY"] = 1
    request.add_fingerprint()
    try:
        response, addr = await client.request(request)
    except stun.TransactionFailed as e:
        response, addr = e.response, (HOST, PORT)
    describe("unknown", response, addr, client.raw[request.transaction_id])

    # Short-term credentials the node does not hold (USERNAME,
    # MESSAGE-INTEGRITY, FINGERPRINT).
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    request.attributes["USERNAME"] = "alice:bob"
    request.add_message_integrity(b"a key the node does not have")
    response, addr = await client.request(request)
    describe("integrity", response, addr, client.raw[request.transaction_id])

    transport.close()


asyncio.run(asyncio.wait_for(main(), 15))
"#;

/// The `key=value` words of the line that starts with `name`.
fn words<'a>(stdout: &'a str, name: &str) -> Vec<(&'a str, &'a str)> {
    let line = stdout
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("no `{name}` line in the aioice client's output: {stdout}"));
    line.split(' ')
        .skip(1)
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// The value of `key` among `words`.
fn word<'a>(words: &[(&'a str, &'a str)], key: &str) -> &'a str {
    words
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {key}= in {words:?}"))
}

/// An `ip,port` word as an address.
fn address(w: &str) -> SocketAddr {
    let (ip, port) = w.rsplit_once(',').expect("ip,port");
    SocketAddr::new(
        ip.parse().expect("an IP address"),
        port.parse().expect("a port"),
    )
}

/// Runs the aioice client against `node` from `host` and checks each answer.
fn aioice_round_trips(node: &TestNode, host: &str) {
    // A clear failure when the package is missing, before anything else.
    let mut probe = node::command("python3");
    probe.arg("-c").arg("import aioice");
    let run = run_bounded(probe, "apt-get install -y python3");
    assert!(
        run.status.success(),
        "the Python package aioice is not installed: pip install aioice (.ci/run does this); {}",
        run.stderr
    );

    let mut cmd = node::command("python3");
    cmd.arg("-c")
        .arg(AIOICE_CLIENT)
        .arg(host)
        .arg(node.udp.port().to_string());
    let run = run_bounded(cmd, "apt-get install -y python3");
    eprintln!("aioice client stdout:\n{}", run.stdout);
    assert!(
        run.status.success(),
        "the aioice client failed ({}); stdout: {}; stderr: {}",
        run.status,
        run.stdout,
        run.stderr
    );
    let local = address(
        run.stdout
            .lines()
            .find_map(|l| l.strip_prefix("local "))
            .expect("a `local` line"),
    );

    // A success response from the node's port, with the client's address
    // and (the request had one) a FINGERPRINT, which aioice verified.
    let b = words(&run.stdout, "binding");
    assert_eq!(word(&b, "class"), "RESPONSE");
    assert_eq!(address(word(&b, "mapped")), local, "XOR-MAPPED-ADDRESS");
    assert_eq!(
        address(word(&b, "from")),
        node.udp,
        "answered from our port"
    );
    assert_eq!(word(&b, "attributes"), "XOR-MAPPED-ADDRESS,FINGERPRINT");
    let bytes: usize = word(&b, "bytes").parse().expect("a length");
    assert!(bytes <= 64, "amplification bound: {bytes}");

    // A 420 listing both unknown comprehension-required attributes, with a
    // FINGERPRINT.
    let u = words(&run.stdout, "unknown");
    assert_eq!(word(&u, "class"), "ERROR");
    assert_eq!(word(&u, "error"), "420");
    assert_eq!(word(&u, "unknown"), "0x0003,0x0024");
    assert_eq!(word(&u, "attributes"), "ERROR-CODE,FINGERPRINT");
    let bytes: usize = word(&u, "bytes").parse().expect("a length");
    assert!(bytes <= 64, "amplification bound: {bytes}");

    // Credentials the node does not hold: answered as without them (D26),
    // and the answer carries no MESSAGE-INTEGRITY.
    let i = words(&run.stdout, "integrity");
    assert_eq!(word(&i, "class"), "RESPONSE");
    assert_eq!(address(word(&i, "mapped")), local);
    assert_eq!(word(&i, "attributes"), "XOR-MAPPED-ADDRESS,FINGERPRINT");

    node.wait_metrics("mpp_stun_answered_total >= 3", |m| {
        m.sum("mpp_stun_answered_total", &[]) >= 3
    });
}

fn aioice_binding_over_ipv4(io: IoChoice) {
    let node = TestNode::start(io);
    aioice_round_trips(&node, "127.0.0.1");
}

fn aioice_binding_over_ipv6(io: IoChoice) {
    let node = TestNode::start_with(io, |c| c.udp = "[::1]:0".parse().expect("addr"));
    assert!(node.udp.is_ipv6());
    aioice_round_trips(&node, "::1");
}
