//! Ctrl-C in the load generator: a run of a minute, interrupted with SIGINT
//! once its devices are heartbeating, stops at once and still prints the
//! table and writes the JSON and HTML reports for what it measured (exit
//! 130, `figures.interrupted` true).
//!
//! The node runs in-process on loopback; the test waits (bounded) for the
//! node's own count of heartbeats to move before it sends the signal, so
//! nothing depends on timing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mpp::config::{IoChoice, NodeConfig};

const WAIT: Duration = Duration::from_secs(20);

/// The sum of `name`'s samples on the node's `/metrics`.
fn metric(http: std::net::SocketAddr, name: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(http) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn sigint_stops_the_run_and_still_writes_the_table_and_reports() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = NodeConfig {
        udp: "127.0.0.1:0".parse().expect("addr"),
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().join("data"),
        threads: 1,
        pin: false,
        io: IoChoice::Auto,
        ..NodeConfig::default()
    };
    let node = mpp::node::start(&config, false).expect("node starts");
    let json = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mpp-loadgen"))
        .args(["--node", &node.udp.to_string()])
        .args(["--control", &format!("http://{}", node.http)])
        .arg("--data-dir")
        .arg(&config.data_dir)
        .args(["--devices", "50", "--duration", "60s", "--warmup", "0"])
        .args(["--timeout-ms", "5000", "--no-progress", "--json"])
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .arg("heartbeat")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mpp-loadgen");

    // The devices are heartbeating: the run is in its measured window.
    let until = Instant::now() + WAIT;
    while metric(node.http, "mpp_heartbeats_total") < 100 {
        assert!(
            Instant::now() < until,
            "no heartbeats reached the node within {WAIT:?}"
        );
        assert!(
            child.try_wait().expect("try_wait").is_none(),
            "the loadgen ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= until + WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the loadgen did not stop after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    let _ = child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout);
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    assert_eq!(status.code(), Some(130), "stderr: {stderr}");
    assert!(stdout.contains("interrupted"), "{stdout}");
    assert!(stdout.contains("scenario"), "the table: {stdout}");
    assert!(stderr.contains("interrupted"), "{stderr}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report"))
            .expect("JSON");
    assert_eq!(report["figures"]["interrupted"], true, "{report}");
    assert_eq!(report["scenario"], "heartbeat");
    let measured = report["duration_s"].as_f64().expect("duration_s");
    assert!(measured < 60.0, "the run stopped early: {measured}");
    assert!(report["devices_held"].as_u64().is_some());
    let page = std::fs::read_to_string(&html).expect("the HTML report");
    assert!(page.contains("<html") || page.contains("<!DOCTYPE"), "HTML");

    node.shutdown();
    let _ = node.wait();
}
