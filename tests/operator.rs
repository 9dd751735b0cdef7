//! What an operator sees of `mppd`: logs (no colour on a pipe, JSON fields),
//! systemd notifications, SIGHUP reloads, SIGTERM with its output pipes
//! closed, configuration errors that exit 2, the metrics and their
//! documentation, man pages and completions, the systemd unit and the
//! Debian package.
//!
//! Children run on loopback port 0 with their own data directories and are
//! read with bounded waits; nothing sleeps to let something happen. Two
//! tests need tools from outside Rust (`systemd-analyze`, `cargo-deb` with
//! `dpkg-deb`): without them they fail and say why, unless
//! `MPP_SKIP_PACKAGING_TESTS=1` is set, which makes them print the reason
//! and pass (README, Tests). `.ci/run` installs both.

#[macro_use]
mod node;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mpp::config::IoChoice;
use node::{command, loopback_mppd, TempDir, TestNode, WAIT};

const MPPD: &str = env!("CARGO_BIN_EXE_mppd");
const MPP: &str = env!("CARGO_BIN_EXE_mpp");

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Out,
    Err,
}

/// A child whose stdout and stderr lines arrive, in order per stream, on one
/// channel; killed on drop if still running.
struct Daemon {
    child: Child,
    lines: mpsc::Receiver<(Stream, String)>,
    seen: Vec<(Stream, String)>,
}

impl Daemon {
    fn spawn(mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start mppd");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for (stream, pipe) in [
            (Stream::Out, Box::new(out) as Box<dyn Read + Send>),
            (Stream::Err, Box::new(err)),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((stream, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Daemon {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one of `stream` satisfies `pred` (bounded).
    fn wait_line(&mut self, stream: Stream, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + WAIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((s, line)) => {
                    self.seen.push((s, line.clone()));
                    if s == stream && pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {what} within {WAIT:?}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// Waits (bounded) for the exit; then every remaining line is in `seen`.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let until = Instant::now() + WAIT;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(l);
                }
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("mppd did not exit within {WAIT:?}; seen: {:#?}", self.seen);
    }

    fn stderr(&self) -> Vec<&str> {
        self.seen
            .iter()
            .filter(|(s, _)| *s == Stream::Err)
            .map(|(_, l)| l.as_str())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `mppd` on loopback port 0 with its own data directory in `dir`.
fn mppd(dir: &TempDir, extra: &[&str]) -> Command {
    let mut cmd = loopback_mppd(&dir.join("data"));
    cmd.args(["--threads", "2", "--io", "mmsg"]).args(extra);
    cmd
}

fn listening(line: &str) -> bool {
    line.starts_with("mppd: listening ")
}

/// The `http=` address of the start-up line.
fn http_of(line: &str) -> std::net::SocketAddr {
    let addr = node::field(line, "http=");
    addr.parse()
        .unwrap_or_else(|_| panic!("bad http= address {addr:?} in {line:?}"))
}

/// Item 4: text logs on a pipe carry no ANSI escape; JSON logs carry the
/// documented fields on every line.
#[test]
fn logs_on_a_pipe_are_plain_text_and_json_has_the_documented_fields() {
    let dir = TempDir::new("logs");
    let mut d = Daemon::spawn(mppd(&dir, &[]));
    d.wait_line(Stream::Out, "the start-up line", listening);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    let stderr = d.stderr();
    assert!(
        stderr.iter().any(|l| l.contains("shard started")),
        "{stderr:#?}"
    );
    for line in &stderr {
        assert!(
            !line.contains('\u{1b}'),
            "an escape sequence on a pipe: {line:?}"
        );
    }

    let dir = TempDir::new("logs-json");
    let mut d = Daemon::spawn(mppd(&dir, &["--log-format", "json"]));
    d.wait_line(Stream::Out, "the start-up line", listening);
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
    let stderr = d.stderr();
    assert!(stderr.len() >= 3, "{stderr:#?}");
    for line in stderr {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for key in ["timestamp", "level", "target", "message", "threadName"] {
            assert!(
                v.get(key).is_some_and(|x| x.is_string()),
                "no {key}: {line}"
            );
        }
        assert!(!line.contains('\u{1b}'), "{line:?}");
    }
}

/// The bug: with its stdout and stderr pipe closed (`mppd 2>&1 | head -1`),
/// the log line written on SIGTERM made tracing-subscriber panic the control
/// thread (its internal-error eprintln!), the shards were never told to stop
/// and the process hung. Now the lines are lost and the node stops, exit 0.
#[test]
fn sigterm_stops_the_node_after_its_output_pipes_were_closed() {
    let dir = TempDir::new("closed-pipe");
    let mut cmd = mppd(&dir, &[]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start mppd");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("read the first line");
    assert!(listening(&first), "{first:?}");
    // Close both pipes, as `head -1` does when it exits.
    drop(out);
    drop(child.stderr.take());
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let until = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mppd did not exit within {WAIT:?} of SIGTERM once its pipes were closed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Item 1: `READY=1` on the notify socket once the node runs (after the
/// start-up line), `STOPPING=1` when SIGTERM begins the stop.
#[test]
fn systemd_hears_ready_after_start_and_stopping_on_sigterm() {
    use std::os::unix::net::UnixDatagram;
    let dir = TempDir::new("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(WAIT)).expect("read timeout");
    let mut cmd = mppd(&dir, &[]);
    cmd.env("NOTIFY_SOCKET", &socket_path);
    let mut d = Daemon::spawn(cmd);
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the wait");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // READY comes after the start-up line: the node answers by then.
    let line = d.wait_line(Stream::Out, "the start-up line", listening);
    let health = node::http(http_of(&line), "GET", "/healthz", None, "", b"");
    assert_eq!(health.status, 200);
    d.signal(libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("STOPPING within the wait");
    let stopping = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert_eq!(d.wait_exit().code(), Some(0));
}

/// Item 5: SIGHUP reads the configuration file again, applies the log
/// level (debug lines appear from then on) and the STUN limits, and names
/// what needs a restart; a file that does not validate changes nothing.
#[test]
fn sighup_reloads_the_log_level_and_names_what_needs_a_restart() {
    let dir = TempDir::new("sighup");
    let config = dir.join("mppd.toml");
    let data = dir.join("data");
    let write = |log_level: &str, threads: usize, stun_rate: u32| {
        let text = format!(
            "udp = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nthreads = {threads}\npin = false\n\
             io = \"mmsg\"\ndata_dir = {:?}\nlog_level = {log_level:?}\nstun_rate = {stun_rate}\n",
            data.display().to_string()
        );
        std::fs::write(&config, text).expect("write the config");
    };
    write("info", 2, 100);
    let mut cmd = command(MPPD);
    cmd.arg("--config").arg(&config);
    let mut d = Daemon::spawn(cmd);
    let line = d.wait_line(Stream::Out, "the start-up line", listening);
    let http = http_of(&line);
    // At info, a control request logs nothing: its debug line would come
    // before the reload's line, which is written after this answer.
    assert_eq!(
        node::http(http, "GET", "/healthz", None, "", b"").status,
        200
    );

    write("debug", 3, 5);
    d.signal(libc::SIGHUP);
    let reloaded = d.wait_line(Stream::Err, "the reload line", |l| l.contains("reloaded:"));
    assert!(
        reloaded.contains(r#"log_level ("info" -> "debug")"#)
            && reloaded.contains("stun_rate (100 -> 5)"),
        "{reloaded}"
    );
    assert!(
        reloaded.contains("needs a restart: threads (2 -> 3)"),
        "{reloaded}"
    );
    let before: Vec<&str> = d.stderr();
    assert!(
        !before.iter().any(|l| l.contains("control request")),
        "a debug line before the reload: {before:#?}"
    );
    // Now at debug: the next request is logged.
    assert_eq!(
        node::http(http, "GET", "/healthz", None, "", b"").status,
        200
    );
    d.wait_line(Stream::Err, "a debug line for the request", |l| {
        l.contains("DEBUG") && l.contains("control request")
    });

    // A file that does not validate: an error, the node runs on.
    std::fs::write(&config, "threads = 5000\n").expect("write");
    d.signal(libc::SIGHUP);
    let error = d.wait_line(Stream::Err, "the reload error", |l| {
        l.contains("configuration not reloaded")
    });
    assert!(error.contains("threads"), "{error}");
    assert_eq!(
        node::http(http, "GET", "/healthz", None, "", b"").status,
        200
    );
    d.signal(libc::SIGTERM);
    assert_eq!(d.wait_exit().code(), Some(0));
}

/// Item 5: a reload looks at the revocation file at once: when it returns,
/// the revocation is in force (whether the reload or the one-second poll
/// saw it first).
#[test]
fn a_reload_puts_a_new_revocation_in_force_before_it_returns() {
    let node = TestNode::start(IoChoice::Mmsg);
    assert_eq!(node.metrics().sum("mpp_revocations", &[]), 0);
    mpp::node::keyring::revoke(node.dir.path(), "a@x", None).expect("revoke");
    let report = node.reload();
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(node.metrics().sum("mpp_revocations", &[]), 1, "{report:?}");
}

/// The bug: `--cpus 5000` aborted (pinning past the 1,024 CPUs a CPU set
/// holds). Now it is a configuration error, as is a CPU this process may
/// not run on: one line, exit 2, nothing started.
#[test]
fn cpus_beyond_the_cpu_set_or_the_machine_are_configuration_errors() {
    for (cpus, reason) in [("5000", "CPU 5000"), ("0,1023", "CPU 1023")] {
        let dir = TempDir::new("cpus");
        let mut d = Daemon::spawn(mppd(&dir, &["--pin", "true", "--cpus", cpus]));
        let status = d.wait_exit();
        let stderr = d.stderr();
        assert_eq!(status.code(), Some(2), "--cpus {cpus}: {stderr:#?}");
        assert_eq!(stderr.len(), 1, "{stderr:#?}");
        assert!(
            stderr[0].starts_with("mppd: ") && stderr[0].contains(reason),
            "{stderr:#?}"
        );
    }
}

/// Item 3: every family `/metrics` serves is in README's metrics table,
/// every drop reason in its reasons table, and the Grafana dashboard uses
/// only documented names.
#[test]
fn every_metric_family_is_documented_and_the_dashboard_uses_only_those() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let documented = |name: &str| readme.contains(&format!("| `{name}` |"));
    let node = TestNode::start(IoChoice::Mmsg);
    let text = node.metrics().0;
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for expected in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_start_time_seconds",
        "mpp_build_info",
        "mpp_publish_send_seconds",
        "mpp_drops_total",
        "mpp_catch_ups_total",
        "mpp_resyncs_total",
        "mpp_shard_up",
    ] {
        assert!(families.contains(&expected), "{expected} not served");
    }
    // The cluster's families are served only in a cluster (tests/cluster.rs).
    let mut served: Vec<&str> = families.clone();
    for name in mpp::node::metrics::cluster_family_names() {
        served.push(name);
    }
    let undocumented: Vec<&str> = served.into_iter().filter(|f| !documented(f)).collect();
    assert!(
        undocumented.is_empty(),
        "families served but not in README's metrics table: {undocumented:?}"
    );
    for (reason, _, meaning) in mpp::node::metrics::DROP_REASONS {
        assert!(
            readme.contains(&format!("| `{reason}` | {meaning} |")),
            "drop reason {reason} is not in README's table with its meaning"
        );
    }
    let build = text
        .lines()
        .find(|l| l.starts_with("mpp_build_info{"))
        .expect("mpp_build_info");
    assert!(
        build.contains("io_backend=\"mmsg\"") && build.contains("aes_gcm=\""),
        "{build}"
    );

    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/grafana-dashboard.json"
    ))
    .expect("the dashboard");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut used = Vec::new();
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            used.extend(metric_names(expr));
        }
    }
    assert!(used.iter().any(|n| n == "mpp_publish_send_seconds"));
    for name in used {
        assert!(
            families.contains(&name.as_str()) && documented(&name),
            "the dashboard uses {name}, which the node does not serve or README does not document"
        );
    }
}

/// The metric names in a PromQL expression (histogram suffixes removed).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        if (rest.starts_with("mpp_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|_| name.contains("_seconds")))
                .unwrap_or(name);
            names.push(base.to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

/// Item 3: a publish to a connected device is counted in the latency
/// histogram of the shard that sent its notify.
#[test]
fn a_delivered_publish_is_counted_in_the_latency_histogram() {
    let node = TestNode::start(IoChoice::Mmsg);
    let mut device = node.device("lat@x", "phone");
    node.publish("lat@x", "01");
    assert!(
        device.pump_until(
            |d| d.events.iter().any(|e| matches!(
                e,
                mpp::proto::ClientEvent::Notify {
                    catch_up: false,
                    resync: false,
                    ..
                }
            )),
            node::deadline()
        ),
        "the notify arrived: {:?}",
        device.events
    );
    let m = node.wait_metrics("a latency sample", |m| {
        m.sum("mpp_publish_send_seconds_count", &[]) >= 1
    });
    let inf = m.sum("mpp_publish_send_seconds_bucket", &[("le", "+Inf")]);
    assert_eq!(inf, m.sum("mpp_publish_send_seconds_count", &[]));
    assert!(m.0.contains("mpp_publish_send_seconds_sum{shard="));
}

/// Item 7: man pages and completions come from the clap definitions, for
/// both tools.
#[test]
fn man_pages_and_completions_are_generated_for_both_tools() {
    let dir = TempDir::new("man");
    for (tool, page, sub) in [
        (MPPD, "mppd.1", "mppd-credential.1"),
        (MPP, "mpp.1", "mpp-resolve.1"),
    ] {
        let status = command(tool)
            .arg("manpage")
            .arg(dir.path())
            .status()
            .expect("run");
        assert!(status.success());
        for name in [page, sub] {
            let text =
                std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(text.contains(".TH"), "{name} is not a man page");
        }
        for shell in ["bash", "zsh", "fish"] {
            let out = command(tool)
                .args(["completions", shell])
                .output()
                .expect("run");
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout);
            let name = Path::new(tool)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            assert!(text.contains(name) && text.len() > 200, "{tool} {shell}");
        }
    }
    assert!(std::fs::read_to_string(dir.join("mppd.1"))
        .unwrap_or_default()
        .contains("credential"));
}

/// Whether a packaging test may be skipped: `MPP_SKIP_PACKAGING_TESTS=1`
/// (README, Tests). Otherwise a missing tool fails the test with the reason.
fn missing_tool(tool: &str, why: &str) {
    if std::env::var("MPP_SKIP_PACKAGING_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped (MPP_SKIP_PACKAGING_TESTS=1): {tool} is not installed: {why}");
        return;
    }
    panic!(
        "{tool} is not installed ({why}); install it (.ci/run does) or set \
         MPP_SKIP_PACKAGING_TESTS=1 to skip this test on purpose"
    );
}

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Item 1: the unit passes `systemd-analyze verify` (warnings count as
/// failures) with ExecStart pointed at the binary under test, and holds the
/// settings README promises. Without systemd-analyze: see [`missing_tool`].
#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("packaging/mppd.service")).expect("unit");
    for line in [
        "Type=notify",
        "User=mppd",
        "ExecStart=/usr/bin/mppd --config /etc/mppd/mppd.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
        "StateDirectory=mppd",
        "LimitNOFILE=65536",
        "LimitMEMLOCK=64M",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "RestrictNamespaces=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}");
    }
    if !have("systemd-analyze", "--version") {
        return missing_tool("systemd-analyze", "the unit cannot be verified");
    }
    let dir = TempDir::new("unit");
    let path = dir.join("mppd.service");
    std::fs::write(&path, unit.replace("/usr/bin/mppd", MPPD)).expect("write");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warned: {stderr}"
    );
}

/// Item 2: the Debian package builds (from the test build's binaries) and
/// holds the binaries, the unit, the configuration, man pages,
/// completions and maintainer scripts. Without cargo-deb or dpkg-deb: see
/// [`missing_tool`].
#[test]
fn the_debian_package_holds_what_readme_lists() {
    if !have("cargo-deb", "--version") {
        return missing_tool("cargo-deb", "the package cannot be built");
    }
    if !have("dpkg-deb", "--version") {
        return missing_tool("dpkg-deb", "the package cannot be read");
    }
    let built = Command::new("bash")
        .arg(repo().join("packaging/build-deb.sh"))
        .args(["--profile", "dev"])
        .current_dir(repo())
        .output()
        .expect("build-deb.sh");
    let log = String::from_utf8_lossy(&built.stderr).into_owned()
        + &String::from_utf8_lossy(&built.stdout);
    assert!(built.status.success(), "build-deb.sh failed: {log}");
    let deb = String::from_utf8_lossy(&built.stdout)
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no .deb path in the output: {log}"));
    let listing = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .expect("dpkg-deb -c");
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for path in [
        "./usr/bin/mppd",
        "./usr/bin/mpp",
        "./usr/lib/systemd/system/mppd.service",
        "./etc/mppd/mppd.toml",
        "./usr/share/man/man1/mppd.1.gz",
        "./usr/share/man/man1/mpp-resolve.1.gz",
        "./usr/share/bash-completion/completions/mppd",
        "./usr/share/zsh/vendor-completions/_mpp",
        "./usr/share/fish/vendor_completions.d/mppd.fish",
        "./usr/share/doc/mppd/grafana-dashboard.json",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} is not in the package:\n{listing}"
        );
    }
    let control = Command::new("dpkg-deb")
        .args(["-I"])
        .arg(&deb)
        .output()
        .expect("dpkg-deb -I");
    let control = String::from_utf8_lossy(&control.stdout).into_owned();
    for needle in [
        "Package: mppd",
        "postinst",
        "postrm",
        "conffiles",
        "adduser",
    ] {
        assert!(control.contains(needle), "{needle} not in:\n{control}");
    }
    let scratch = TempDir::new("deb");
    let extracted = Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(scratch.join("control"))
        .status()
        .expect("dpkg-deb -e");
    assert!(extracted.success());
    let postinst = std::fs::read_to_string(scratch.join("control/postinst")).expect("postinst");
    assert!(postinst.contains("adduser --system"), "{postinst}");
    assert!(
        postinst.contains("chown mppd:mppd /var/lib/mppd")
            && postinst.contains("chmod 0700 /var/lib/mppd"),
        "{postinst}"
    );
    // The unit is enabled and started once, after its user exists (a
    // marker in a comment once made cargo-deb insert the enable/start
    // block a second time, at the top, and left half a comment as a command).
    let user = postinst.find("adduser --system").expect("adduser");
    let enables: Vec<usize> = postinst
        .match_indices("deb-systemd-helper enable")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(enables.len(), 1, "{postinst}");
    assert!(
        enables[0] > user,
        "enabled before the user exists: {postinst}"
    );
    let check = Command::new("sh")
        .arg("-n")
        .arg(scratch.join("control/postinst"))
        .status()
        .expect("sh -n");
    assert!(check.success(), "postinst does not parse");
    let conffiles = std::fs::read_to_string(scratch.join("control/conffiles")).unwrap_or_default();
    assert!(conffiles.contains("/etc/mppd/mppd.toml"), "{conffiles}");
    let fields = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .output()
        .expect("tarfile");
    assert!(!fields.stdout.is_empty());
}
