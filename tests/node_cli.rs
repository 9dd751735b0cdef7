//! The `mppd` and `mpp` binaries end to end: the README walk-through (node,
//! credential, subscribe, notify, SIGTERM) on both I/O drivers, `mpp
//! endpoint`, and the one-line start-up errors.
//!
//! Children are read through pipes with bounded waits and killed if a test
//! fails; every node listens on loopback port 0 with its own data directory.

#[macro_use]
mod node;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;

use mpp::config::IoChoice;
use serde_json::Value;

use node::{
    command, field, io_name, loopback_mppd, now, pinned_loopback_mppd, run, Proc, TempDir, TestNode,
};

const MPPD: &str = env!("CARGO_BIN_EXE_mppd");
const MPP: &str = env!("CARGO_BIN_EXE_mpp");

on_both_drivers!(
    walk_through,
    endpoint_prints_the_clients_address,
    crash_and_immediate_restart
);

/// A JSON line of `mpp subscribe`, or Null.
fn event(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or(Value::Null)
}

/// Case 10: the README walk-through with the two binaries.
fn walk_through(io: IoChoice) {
    let dir = TempDir::new(&format!("cli-{}", io_name(io)));
    let data = dir.join("data");
    let mut mppd = loopback_mppd(&data);
    mppd.args(["--threads", "2", "--io", io_name(io)]);
    let mut mppd = Proc::spawn("mppd", mppd);
    let listening = mppd.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
    let udp: SocketAddr = field(&listening, "udp=").parse().expect("udp address");
    let http: SocketAddr = field(&listening, "http=").parse().expect("http address");
    assert_eq!(field(&listening, "shards="), "2");
    assert_eq!(field(&listening, "io="), io_name(io));
    assert!(udp.ip().is_loopback() && udp.port() != 0, "{listening}");
    assert!(http.ip().is_loopback() && http.port() != 0, "{listening}");

    // The credential, issued offline from the data directory.
    let mut issue = command(MPPD);
    issue
        .args(["credential", "issue", "--data-dir"])
        .arg(&data)
        .args(["--account", "a@x", "--device", "phone", "--endpoint"])
        .arg(udp.to_string());
    let (status, credential, stderr) = run("mppd credential issue", issue);
    assert!(status.success(), "credential issue: {status:?} {stderr}");
    let parsed = mpp::packet::Credential::from_json(&credential).expect("a valid credential");
    assert_eq!(parsed.endpoints, [udp.to_string()]);
    let file = dir.join("phone.json");
    std::fs::write(&file, &credential).expect("write credential");

    let mut subscribe = command(MPP);
    subscribe
        .args(["subscribe", "--credential"])
        .arg(&file)
        .args(["--count", "1", "--duration", "20s"]);
    let mut subscribe = Proc::spawn("mpp subscribe", subscribe);
    let connected = subscribe.wait_line("a connected event", |l| event(l)["event"] == "connected");
    let endpoint: SocketAddr = event(&connected)["endpoint"]
        .as_str()
        .expect("endpoint")
        .parse()
        .expect("endpoint address");
    assert_eq!(endpoint.ip(), udp.ip());
    // A first start has no mark: the node cannot know what the device
    // missed and tells it to resynchronise everything.
    let resync = subscribe.wait_line("a resync", |l| event(l)["event"] == "notify");
    assert_eq!(event(&resync)["resync"], true, "{resync}");
    assert_eq!(event(&resync)["bitmask"], "ff".repeat(32), "{resync}");

    let mut notify = command(MPP);
    notify
        .args(["notify", "--account", "a@x", "--bitmask", "05", "--control"])
        .arg(format!("http://{http}"))
        .arg("--data-dir")
        .arg(&data);
    let (status, out, stderr) = run("mpp notify", notify);
    assert!(status.success(), "mpp notify: {status:?} {stderr}");
    assert_eq!(
        serde_json::from_str::<Value>(out.trim()).expect("JSON"),
        serde_json::json!({"accepted": 1})
    );

    let line = subscribe.wait_line("a notify event", |l| {
        event(l)["event"] == "notify" && event(l)["resync"] != true
    });
    assert_eq!(event(&line)["bitmask"], "05", "{line}");
    assert_eq!(event(&line).get("catch_up"), None, "a live notify: {line}");
    let status = subscribe.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "mpp subscribe --count 1 ends after the notify; stderr: {}",
        subscribe.stderr_now()
    );

    mppd.signal(libc::SIGTERM);
    let status = mppd.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "mppd exits 0 on SIGTERM; stderr: {}",
        mppd.stderr_now()
    );
    assert!(
        mppd.stdout.iter().any(|l| l == "mppd: stopped"),
        "stdout: {:?}",
        mppd.stdout
    );
}

/// Case 11: `mpp endpoint` prints the address the node sees.
fn endpoint_prints_the_clients_address(io: IoChoice) {
    let node = TestNode::start(io);
    let credential = node.credential("b@x", "laptop");
    let file = node.dir.join("laptop.json");
    std::fs::write(&file, credential.to_json()).expect("write credential");
    let mut cmd = command(MPP);
    cmd.args(["endpoint", "--timeout", "8", "--credential"])
        .arg(&file);
    let (status, out, stderr) = run("mpp endpoint", cmd);
    assert!(status.success(), "mpp endpoint: {status:?} {stderr}");
    let addr: SocketAddr = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an address: {out:?}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1", "{out}");
    assert_ne!(addr.port(), 0);
    assert_ne!(
        addr.port(),
        node.udp.port(),
        "the client's port, not the node's"
    );
}

/// README: a node that does not answer (or a control port nobody listens
/// on) is a failure of the run, not of the input: `mpp` exits 1 with one
/// line, where invalid input exits 2.
#[test]
fn mpp_exits_1_when_the_node_is_unreachable() {
    let dir = TempDir::new("unreachable");
    // A UDP port that takes datagrams and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let node = silent.local_addr().expect("addr");
    let master = mpp::packet::MasterKey::new([3; 32]);
    let credential = mpp::packet::Credential::issue(
        &master,
        "a@x",
        "phone",
        mpp::time::UnixSeconds(now().seconds().0 + 3_600),
        vec![node.to_string()],
        &mut rand::thread_rng(),
    )
    .expect("credential");
    let file = dir.join("phone.json");
    std::fs::write(&file, credential.to_json()).expect("write credential");
    let mut cmd = command(MPP);
    cmd.args(["endpoint", "--timeout", "1", "--credential"])
        .arg(&file);
    let (status, _, stderr) = run("mpp endpoint", cmd);
    assert_eq!(status.code(), Some(1), "mpp endpoint: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!("mpp: no answer from {node}")),
        "{stderr}"
    );
    // The control port: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let token = dir.join("admin.token");
    std::fs::write(&token, "0123456789abcdef0123\n").expect("write token");
    let mut cmd = command(MPP);
    cmd.args(["notify", "--account", "a@x", "--bitmask", "01", "--control"])
        .arg(format!("http://{closed}"))
        .arg("--admin-token")
        .arg(&token);
    let (status, _, stderr) = run("mpp notify", cmd);
    assert_eq!(status.code(), Some(1), "mpp notify: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("mpp: "), "{stderr}");
    drop(silent);
}

/// Runs `mppd` with `args` (a data dir of its own is added unless given) and
/// checks the failure: non-zero `code`, one stderr line starting `mppd:`
/// that contains `reason`.
fn assert_startup_error(args: &[&str], data_dir: Option<&Path>, code: i32, reason: &str) {
    let dir = TempDir::new("startup");
    let mut cmd = command(MPPD);
    let default = dir.join("data");
    cmd.args(args)
        .arg("--data-dir")
        .arg(data_dir.unwrap_or(&default));
    let (status, out, stderr) = run("mppd", cmd);
    assert_eq!(status.code(), Some(code), "{args:?}: stderr {stderr:?}");
    assert!(!out.contains("listening"), "{args:?} started: {out}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: one stderr line, got {stderr:?}");
    assert!(lines[0].starts_with("mppd: "), "{args:?}: {stderr:?}");
    assert!(
        lines[0].contains(reason),
        "{args:?}: {reason:?} not in {stderr:?}"
    );
}

/// The arguments of a node that would start, but for what a case changes.
const NODE: [&str; 7] = [
    "--threads",
    "2",
    "--no-pin",
    "--io",
    "mmsg",
    "--http",
    "127.0.0.1:0",
];

/// Case 12: the UDP port is taken by a plain socket.
#[test]
fn startup_error_udp_port_taken() {
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let udp = taken.local_addr().expect("addr").to_string();
    let mut args = NODE.to_vec();
    args.extend(["--udp", &udp]);
    assert_startup_error(&args, None, 1, &format!("cannot bind UDP {udp}"));
}

/// Case 12: the HTTP port is taken.
#[test]
fn startup_error_http_port_taken() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let http = taken.local_addr().expect("addr").to_string();
    let args = [
        "--threads",
        "2",
        "--no-pin",
        "--io",
        "mmsg",
        "--udp",
        "127.0.0.1:0",
        "--http",
        &http,
    ];
    assert_startup_error(&args, None, 1, &format!("cannot bind HTTP {http}"));
}

/// Case 12: an invalid master key.
#[test]
fn startup_error_invalid_master_key() {
    let dir = TempDir::new("badkey");
    std::fs::write(dir.join("master.key"), "not hex\n").expect("write");
    let mut args = NODE.to_vec();
    args.extend(["--udp", "127.0.0.1:0"]);
    assert_startup_error(&args, Some(dir.path()), 1, "master.key");
}

/// Case 12: a config file that is not TOML, and one with an unknown key.
#[test]
fn startup_error_bad_config_files() {
    let dir = TempDir::new("config");
    for (name, text, reason) in [
        ("broken.toml", "udp = [\n", "invalid config file"),
        (
            "unknown.toml",
            "bogus_key = 1\n",
            "unknown key \"bogus_key\"",
        ),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        let path = path.to_str().expect("utf-8 path").to_owned();
        let mut args = NODE.to_vec();
        args.extend(["--udp", "127.0.0.1:0", "--config", &path]);
        assert_startup_error(&args, None, 2, reason);
    }
}

/// Case 12: an inverted CPU range.
#[test]
fn startup_error_bad_cpu_list() {
    let mut args = NODE.to_vec();
    args.extend(["--udp", "127.0.0.1:0", "--cpus", "5-2"]);
    assert_startup_error(&args, None, 2, "invalid CPU list");
}

/// Case 12: `--io bogus` is a usage error (clap's): exit 2, nothing started,
/// and the reason names the accepted values.
#[test]
fn startup_error_unknown_io_backend() {
    let dir = TempDir::new("io");
    let mut cmd = command(MPPD);
    cmd.args([
        "--io",
        "bogus",
        "--udp",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir.join("data"));
    let (status, out, stderr) = run("mppd --io bogus", cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(out, "");
    assert!(
        stderr.contains("bogus") && stderr.contains("expected uring, mmsg or auto"),
        "{stderr:?}"
    );
    assert!(!dir.join("data").exists(), "nothing was created");
}

/// README's decision: `--io auto` (the default) runs on recvmmsg/sendmmsg,
/// the backend measured faster here (docs/BENCHMARKS.md, io_uring against
/// mmsg), even where io_uring works (this machine: the driver tests need
/// it); `--io uring` still gets io_uring.
#[test]
fn auto_io_is_the_backend_measured_faster_mmsg() {
    for (flag, expected) in [
        (None, "mmsg"),
        (Some("auto"), "mmsg"),
        (Some("uring"), "uring"),
    ] {
        let dir = TempDir::new("io-auto");
        let mut cmd = loopback_mppd(&dir.join("data"));
        cmd.args(["--threads", "1"]);
        if let Some(io) = flag {
            cmd.args(["--io", io]);
        }
        let mut mppd = Proc::spawn("mppd", cmd);
        let listening = mppd.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
        assert_eq!(
            field(&listening, "io="),
            expected,
            "--io {flag:?}: {listening}"
        );
    }
}

/// The CPUs a thread may run on, from `/proc/PID/task/TID/status`.
fn cpus_allowed(status: &Path) -> Vec<usize> {
    let text = std::fs::read_to_string(status).unwrap_or_default();
    let list = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_else(|| panic!("no Cpus_allowed_list in {}", status.display()));
    list.trim()
        .parse::<mpp::config::CpuList>()
        .expect("a CPU list")
        .0
}

/// The CPUs each thread named `name` of process `pid` may run on.
fn thread_cpus(pid: u32, name: &str) -> Vec<Vec<usize>> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = task.expect("task").path();
        if std::fs::read_to_string(task.join("comm"))
            .unwrap_or_default()
            .trim()
            == name
        {
            found.push(cpus_allowed(&task.join("status")));
        }
    }
    found
}

/// A node given `--cpus` keeps its control thread (HTTP, DNS relay, bus) on
/// those CPUs, so that it neither lands on another program's core nor wakes
/// its shard across cores; `--control-cpus` puts it elsewhere.
#[test]
fn control_thread_stays_on_the_cpus_the_node_was_given() {
    let allowed = cpus_allowed(Path::new("/proc/self/status"));
    let (first, last) = (allowed[0], *allowed.last().expect("a CPU"));
    // On a one-CPU machine both cases name CPU `first`: the first still
    // proves the control thread is confined, not left on every CPU.
    for (control, expected) in [(None, first), (Some(last), last)] {
        let dir = TempDir::new("control-cpus");
        let mut cmd = pinned_loopback_mppd(&dir.join("data"));
        cmd.args(["--threads", "1", "--cpus", &first.to_string()]);
        if let Some(cpu) = control {
            cmd.args(["--control-cpus", &cpu.to_string()]);
        }
        let mut mppd = Proc::spawn("mppd", cmd);
        mppd.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
        assert_eq!(thread_cpus(mppd.pid(), "mpp-shard-0"), [vec![first]]);
        // The control thread confines itself as it starts: wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let seen = thread_cpus(mppd.pid(), "mpp-control");
            if seen == [vec![expected]] {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "--control-cpus {control:?}: control thread on {seen:?}, expected [{expected}] (the process may run on {allowed:?})"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    // A CPU the process may not run on is a configuration error, said at
    // start (CPU 1000 fits a CPU set but is on no machine this runs on).
    for (flag, key) in [("--cpus", "cpus"), ("--control-cpus", "control_cpus")] {
        let dir = TempDir::new("control-cpus-bad");
        let mut cmd = pinned_loopback_mppd(&dir.join("data"));
        cmd.args([flag, "1000"]);
        let (status, _, stderr) = run("mppd", cmd);
        assert_eq!(status.code(), Some(2), "{flag} 1000: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{key} names CPU 1000, which this process may not run on"
            )),
            "{flag} 1000: {stderr}"
        );
    }
}

/// Case 13: `mppd credential issue` without a master key, and with a bad ttl.
#[test]
fn credential_issue_errors() {
    let dir = TempDir::new("issue");
    let empty = dir.join("empty");
    let mut cmd = command(MPPD);
    cmd.args([
        "credential",
        "issue",
        "--account",
        "a@x",
        "--device",
        "d",
        "--data-dir",
    ])
    .arg(&empty);
    let (status, out, stderr) = run("mppd credential issue", cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(out, "");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr:?}");
    assert!(lines[0].starts_with("mppd: no master key in"), "{stderr:?}");
    assert!(!empty.exists(), "no data directory is created");

    let mut cmd = command(MPPD);
    cmd.args([
        "credential",
        "issue",
        "--account",
        "a@x",
        "--device",
        "d",
        "--ttl",
        "3w",
        "--data-dir",
    ])
    .arg(&empty);
    let (status, out, stderr) = run("mppd credential issue --ttl 3w", cmd);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert_eq!(out, "");
    assert!(stderr.contains("3w"), "{stderr:?}");
}

/// SIGTERM sent as soon as the start-up line appears stops the node cleanly
/// (exit 0, `mppd: stopped`), as it does later on. Repeated because the
/// window between the line and the signal handler's installation is short.
#[test]
fn sigterm_right_after_the_startup_line_stops_cleanly() {
    for round in 0..10 {
        let dir = TempDir::new("sigterm");
        let mut cmd = command(MPPD);
        cmd.args(NODE)
            .args(["--udp", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"));
        let mut mppd = Proc::spawn("mppd", cmd);
        mppd.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
        mppd.signal(libc::SIGTERM);
        let status = mppd.wait_exit();
        assert_eq!(
            status.code(),
            Some(0),
            "round {round}: mppd did not stop cleanly ({status:?}): a SIGTERM that arrives \
             after `mppd: listening` but before the control thread installed its handler \
             kills the process; stdout {:?}",
            mppd.stdout
        );
        assert!(
            mppd.stdout.iter().any(|l| l == "mppd: stopped"),
            "round {round}: {:?}",
            mppd.stdout
        );
    }
}

/// `mppd config check FILE`: "FILE: ok" and 0 for a good file, one
/// `mppd:` line and 2 for a bad one.
#[test]
fn config_check_validates_a_file() {
    let dir = TempDir::new("check");
    let good = dir.join("good.toml");
    std::fs::write(&good, "threads = 2\nio = \"mmsg\"\n").expect("write");
    let mut cmd = command(MPPD);
    cmd.args(["config", "check"]).arg(&good);
    let (status, out, stderr) = run("mppd config check", cmd);
    assert!(status.success(), "{stderr}");
    assert_eq!(out.trim(), format!("{}: ok", good.display()));
    for (name, text, reason) in [
        ("range.toml", "batch = 5000\n", "batch must be 1..=1024"),
        ("type.toml", "threads = \"two\"\n", "threads"),
        ("key.toml", "thread = 2\n", "unknown key \"thread\""),
    ] {
        let bad = dir.join(name);
        std::fs::write(&bad, text).expect("write");
        let mut cmd = command(MPPD);
        cmd.args(["config", "check"]).arg(&bad);
        let (status, out, stderr) = run("mppd config check", cmd);
        assert_eq!(status.code(), Some(2), "{name}: {out} {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: {stderr:?}");
        assert!(
            lines[0].starts_with("mppd: ") && lines[0].contains(reason),
            "{name}: {stderr:?}"
        );
    }
}

/// `mppd config show`: the effective value of each setting and where it came
/// from, with defaults < file < MPPD_* < flags, through the real binary.
#[test]
fn config_show_reports_each_value_and_its_source() {
    let dir = TempDir::new("show");
    let file = dir.join("node.toml");
    std::fs::write(&file, "threads = 3\nbatch = 16\nspin_us = 5\n").expect("write");
    let mut cmd = command(MPPD);
    cmd.args(["config", "show", "--config"])
        .arg(&file)
        .args(["--spin-us", "9", "--no-pin"])
        .env("MPPD_BATCH", "32")
        .env("MPPD_SPIN_US", "7");
    let (status, out, stderr) = run("mppd config show", cmd);
    assert!(status.success(), "{stderr}");
    let value_and_source = |key: &str| -> (String, String) {
        let lines: Vec<&str> = out.lines().collect();
        let i = lines
            .iter()
            .position(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in {out}"));
        (lines[i].to_string(), lines[i - 1].to_string())
    };
    let file_source = format!("# from: file {}", file.display());
    assert_eq!(
        value_and_source("threads"),
        ("threads = 3".into(), file_source)
    );
    assert_eq!(
        value_and_source("batch"),
        ("batch = 32".into(), "# from: env MPPD_BATCH".into())
    );
    assert_eq!(
        value_and_source("spin_us"),
        ("spin_us = 9".into(), "# from: flag --spin-us".into())
    );
    assert_eq!(
        value_and_source("pin"),
        ("pin = false".into(), "# from: flag --pin".into())
    );
    assert_eq!(
        value_and_source("io"),
        ("io = \"auto\"".into(), "# from: default".into())
    );
    // An unknown MPPD_* variable is refused, naming it.
    let mut cmd = command(MPPD);
    cmd.args(["config", "show"]).env("MPPD_THREAD", "2");
    let (status, _, stderr) = run("mppd config show", cmd);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("unknown environment setting MPPD_THREAD"),
        "{stderr}"
    );
}

/// `mpp subscribe --state FILE` keeps the device's mark across runs: what
/// was published while it was not running comes as a catch-up at its next
/// start, not as a resync (docs/PROTOCOL.md §6).
#[test]
fn subscribe_state_keeps_the_mark_across_runs() {
    let dir = TempDir::new("state");
    let data = dir.join("data");
    let mut mppd = loopback_mppd(&data);
    mppd.args(["--threads", "1", "--io", "mmsg"]);
    let mut mppd = Proc::spawn("mppd", mppd);
    let listening = mppd.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
    let udp: SocketAddr = field(&listening, "udp=").parse().expect("udp address");
    let http: SocketAddr = field(&listening, "http=").parse().expect("http address");
    let mut issue = command(MPPD);
    issue
        .args(["credential", "issue", "--data-dir"])
        .arg(&data)
        .args(["--account", "s@x", "--device", "phone", "--endpoint"])
        .arg(udp.to_string());
    let (status, credential, stderr) = run("mppd credential issue", issue);
    assert!(status.success(), "{stderr}");
    let file = dir.join("phone.json");
    std::fs::write(&file, &credential).expect("write credential");
    let state = dir.join("phone.state");
    let notify = |mask: &str| {
        let mut cmd = command(MPP);
        cmd.args(["notify", "--account", "s@x", "--bitmask", mask, "--control"])
            .arg(format!("http://{http}"))
            .arg("--data-dir")
            .arg(&data);
        let (status, _, stderr) = run("mpp notify", cmd);
        assert!(status.success(), "mpp notify: {stderr}");
    };
    let subscribe = |count: &str| {
        let mut cmd = command(MPP);
        cmd.args(["subscribe", "--credential"])
            .arg(&file)
            .arg("--state")
            .arg(&state)
            .args(["--count", count, "--duration", "20s"]);
        Proc::spawn("mpp subscribe", cmd)
    };

    // First run: no mark yet, so a resync; then one live notify.
    let mut first = subscribe("1");
    first.wait_line("a resync", |l| event(l)["resync"] == true);
    notify("05");
    first.wait_line("the notify", |l| event(l)["bitmask"] == "05");
    assert_eq!(first.wait_exit().code(), Some(0));
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(&state).expect("state file")).expect("JSON");
    assert!(saved["mark"].as_i64().is_some(), "{saved}");
    assert!(saved["serial"].as_i64().is_some(), "{saved}");

    // Away: a publish nobody hears.
    notify("0a");

    // Second run: the mark brings a catch-up covering what was missed.
    let mut second = subscribe("1");
    let line = second.wait_line("a catch-up", |l| event(l)["event"] == "notify");
    let e = event(&line);
    assert_eq!(e["catch_up"], true, "{line}");
    assert_eq!(e.get("resync"), None, "the node knew what changed: {line}");
    let mask = hex::decode(e["bitmask"].as_str().expect("hex")).expect("hex");
    assert_eq!(mask[0] & 0x0a, 0x0a, "covers the missed publish: {line}");
    notify("01");
    second.wait_line("the live notify", |l| event(l)["bitmask"] == "01");
    assert_eq!(second.wait_exit().code(), Some(0));
    mppd.signal(libc::SIGTERM);
    assert_eq!(mppd.wait_exit().code(), Some(0));
}

/// After `kill -9`, a node started at once on the same port binds it (the
/// killed node's sockets may still be in teardown, an io_uring ring's later
/// than the process), and a device that was connected gets 404, connects
/// again and is told to resynchronise (docs/PROTOCOL.md §6, "Restarts").
fn crash_and_immediate_restart(io: IoChoice) {
    let dir = TempDir::new(&format!("crash-{}", io_name(io)));
    let data = dir.join("data");
    let start = |udp: &str| {
        let mut cmd = command(MPPD);
        cmd.args(["--udp", udp, "--http", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(["--threads", "2", "--no-pin", "--io", io_name(io)]);
        Proc::spawn("mppd", cmd)
    };
    let mut first = start("127.0.0.1:0");
    let listening = first.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
    let udp: SocketAddr = field(&listening, "udp=").parse().expect("udp address");
    let master =
        mpp::packet::MasterKey::new(mpp::node::open_data_dir(&data).expect("data dir").master);
    let credential = mpp::packet::Credential::issue(
        &master,
        "k@x",
        "phone",
        mpp::time::UnixSeconds(now().seconds().0 + 3600),
        vec![udp.to_string()],
        &mut rand::thread_rng(),
    )
    .expect("credential");
    let mut d = node::Device::new(&credential, udp);
    d.connect();

    first.signal(libc::SIGKILL);
    first.wait_exit();
    let started = std::time::Instant::now();
    let mut second = start(&udp.to_string());
    second.wait_line("mppd: listening", |l| l.starts_with("mppd: listening "));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    d.client.request_status(now());
    assert!(
        d.pump(|e| node::catch_ups(e).len() >= 2, node::deadline()),
        "no reconnect and resync: {:?}",
        d.events
    );
    assert!(
        node::catch_ups(&d.events).pop().expect("catch-up").2,
        "a resync"
    );
    second.signal(libc::SIGTERM);
    assert_eq!(second.wait_exit().code(), Some(0));
}
