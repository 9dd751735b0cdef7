//! The load generator at small scale against a node started by the test
//! (in-process, loopback, its own data directory): each scenario runs, its
//! counts add up, its JSON report parses and holds the documented keys, and
//! bad flags give a one-line error. Every scenario with devices reports
//! `wrong` 0 (no bitmask lacked a bit published to its account since the
//! device's last acknowledgement: loadgen/src/engine/content.rs), in the
//! JSON report and in the table on stdout. `echo` runs against a
//! `reflector` the test starts, and `mqtt` against a real `mosquitto` the
//! test starts on a free loopback port (Debian package `mosquitto`;
//! `.ci/run` installs it and sets `MPP_REQUIRE_MOSQUITTO=1`, which turns a
//! missing broker into a failure instead of a skip).
//!
//! Timeouts are generous (`--timeout-ms 5000`) so a stalled CI machine
//! delays a reply instead of losing it, except where a test is about the
//! default timers; nothing asserts a speed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use mpp::config::{IoChoice, NodeConfig};
use serde_json::Value;

struct TestNode {
    node: Option<mpp::node::Node>,
    udp: String,
    http: String,
    dir: tempfile::TempDir,
}

impl TestNode {
    fn start() -> TestNode {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = NodeConfig {
            udp: "127.0.0.1:0".parse().expect("addr"),
            http: "127.0.0.1:0".parse().expect("addr"),
            data_dir: dir.path().to_path_buf(),
            threads: 2,
            pin: false,
            io: IoChoice::Auto,
            stun_rate: 0,
            ..NodeConfig::default()
        };
        let node = mpp::node::start(&config, false).expect("node starts");
        TestNode {
            udp: node.udp.to_string(),
            http: format!("http://{}", node.http),
            node: Some(node),
            dir,
        }
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.shutdown();
            let _ = node.wait();
        }
    }
}

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mpp-loadgen"))
        .args(args)
        .output()
        .expect("mpp-loadgen runs")
}

/// Runs a scenario against `node` with the common small-scale flags and
/// returns its JSON report.
fn scenario(node: &TestNode, extra: &[&str]) -> Value {
    scenario_with_timeout(node, Some("5000"), extra)
}

/// [`scenario`] with another `--timeout-ms`, or (`None`) the default.
fn scenario_with_timeout(node: &TestNode, timeout_ms: Option<&str>, extra: &[&str]) -> Value {
    let json: PathBuf = node
        .data_dir()
        .join(format!("report-{}.json", extra.join("-")));
    let json_s = json.to_string_lossy().into_owned();
    let dir = node.data_dir().to_string_lossy().into_owned();
    let mut args = vec![
        "--node",
        &node.udp,
        "--control",
        &node.http,
        "--data-dir",
        &dir,
        "--duration",
        "2s",
        "--warmup",
        "1s",
        "--no-progress",
        "--json",
        &json_s,
    ];
    if let Some(ms) = timeout_ms {
        args.extend_from_slice(&["--timeout-ms", ms]);
    }
    args.extend_from_slice(extra);
    let out = loadgen(&args);
    assert!(
        out.status.success(),
        "mpp-loadgen {extra:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let text = std::fs::read_to_string(&json).expect("JSON report written");
    let report: Value = serde_json::from_str(&text).expect("JSON report parses");
    // The table on stdout says what the JSON report says.
    let stdout = String::from_utf8_lossy(&out.stdout);
    for key in ["lost", "wrong"] {
        assert_eq!(
            table_count(&stdout, key),
            u(&report[key]),
            "{key} in the table: {stdout}"
        );
    }
    for key in [
        "scenario",
        "devices",
        "devices_held",
        "duration_s",
        "rate_per_s",
        "lost",
        "wrong",
        "latency_us",
        "baseline_rate_per_s",
        "ratio",
        "config",
        "timeline",
    ] {
        assert!(report.get(key).is_some(), "report lacks {key}: {text}");
    }
    report
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The count on the table's row `key` (`key`, spaces, the number).
fn table_count(table: &str, key: &str) -> u64 {
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key) && l.split_whitespace().count() == 2)
        .unwrap_or_else(|| panic!("no {key} row in the table: {table}"));
    let n = row.split_whitespace().nth(1).unwrap();
    n.parse()
        .unwrap_or_else(|_| panic!("{key} row is not a count: {row}"))
}

/// A fanout report whose devices checked what they received and found it
/// right: `wrong` 0, and no account's records in doubt. Every notification
/// (a message with a Serial above the device's mark) was checked: its own
/// Serial is a publish the publisher recorded before sending it, and the
/// ring holds the latest 64 (--ahead is at most 32). A check that found
/// nothing pending where a publish was recorded would be `wrong`, so
/// checks and notifications are equal.
fn every_bitmask_covered_what_was_published(r: &Value) {
    let f = &r["figures"];
    assert_eq!(u(&r["wrong"]), 0, "{r}");
    assert_eq!(u(&f["wrong_unverifiable"]), 0, "{r}");
    assert_eq!(u(&f["unverifiable_accounts"]), 0, "{r}");
    assert!(u(&f["notifications"]) > 0, "{r}");
    assert_eq!(u(&f["content_checked"]), u(&f["notifications"]), "{r}");
    assert_eq!(u(&f["whole_run"]["content_mismatches"]), 0, "{r}");
}

/// A fanout report of 2000 devices in 100 accounts in which every accepted
/// publish reached each of its account's 20 devices and nothing was lost;
/// returns the publishes.
fn every_publish_reached_every_device(r: &Value) -> u64 {
    every_publish_reached_every_one_of(r, 2000)
}

/// A fanout report of `devices` devices, 20 per account, in which every
/// accepted publish reached each of its account's devices and nothing was
/// lost; returns the publishes.
fn every_publish_reached_every_one_of(r: &Value, devices: u64) -> u64 {
    assert_eq!(u(&r["devices_held"]), devices);
    let f = &r["figures"];
    let published = u(&f["published"]);
    assert!(published > 0, "{r}");
    // 20 devices per account: every publish is one notification to each.
    assert_eq!(u(&f["expected_deliveries"]), published * 20);
    assert_eq!(u(&f["delivered"]), u(&f["expected_deliveries"]), "{r}");
    assert_eq!(u(&r["lost"]), 0);
    every_bitmask_covered_what_was_published(r);
    published
}

#[test]
fn heartbeat_holds_every_device_and_counts_add_up() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &["--devices", "10000", "--threads", "2", "heartbeat"],
    );
    assert_eq!(r["scenario"], "heartbeat");
    assert_eq!(u(&r["devices"]), 10_000);
    assert_eq!(u(&r["devices_held"]), 10_000);
    assert_eq!(u(&r["lost"]), 0);
    assert_eq!(u(&r["wrong"]), 0, "{r}");
    let whole = &r["figures"]["whole_run"];
    assert_eq!(u(&whole["connected"]), 10_000);
    assert_eq!(u(&whole["refused"]) + u(&whole["unauthentic"]), 0);
    // Every reply answered a heartbeat we sent.
    assert!(u(&whole["replies"]) <= u(&whole["heartbeats_sent"]));
    let measured = &r["figures"]["measured"];
    assert!(u(&measured["replies"]) > 0, "{r}");
    assert!(r["rate_per_s"].as_f64().unwrap() > 0.0);
    assert!(u(&r["latency_us"]["p50"]) <= u(&r["latency_us"]["max"]));
    assert!(r["ratio"].is_null(), "no baseline asked for");
}

#[test]
fn heartbeat_with_baseline_reports_a_ratio() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "1000",
            "--baseline",
            "heartbeat",
            "--window",
            "64",
        ],
    );
    let base = r["baseline_rate_per_s"].as_f64().expect("baseline rate");
    assert!(base > 0.0);
    let ratio = r["ratio"].as_f64().expect("ratio");
    let rate = r["rate_per_s"].as_f64().unwrap();
    assert!((ratio - rate / base).abs() < 1e-9);
    assert_eq!(r["baseline"], "raw echo");
    // The in-process reflector's own thread CPU, measured in its window
    // (a CPU-seconds-per-second figure: between 0 and one core, plus tick
    // rounding); without --node-pid there is no per-CPU ratio.
    let cpu = r["baseline_server_cpu"].as_f64().expect("reflector CPU");
    assert!((0.0..=1.2).contains(&cpu), "{cpu}");
    assert!(r["ratio_per_cpu"].is_null(), "{r}");
    assert_eq!(u(&r["lost"]), 0, "{r}");
    assert_eq!(u(&r["wrong"]), 0, "{r}");
}

#[test]
fn fanout_delivers_every_publish_to_every_device() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "2000",
            "--accounts",
            "100",
            "fanout",
            "--rate",
            "500",
            "--drain",
            "5s",
        ],
    );
    every_publish_reached_every_device(&r);
    let f = &r["figures"];
    assert!(u(&f["acknowledgements_sent"]) > 0);
    assert!(u(&r["latency_us"]["count"]) > 0, "{r}");
}

/// The sum of `name`'s samples on the node's `/metrics`.
fn metric(node: &TestNode, name: &str) -> u64 {
    use std::io::{Read, Write};
    let addr = node.http.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("control API");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
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

/// Two loadgen processes split one device space at the same time against
/// one node (`--first-device 0` and `1000`, 1000 devices in 50 accounts
/// each): no device and no account in common, so each one's counts are
/// exact (a shared account would get the other's publishes: more
/// deliveries than expected) and the node holds all 2000 connections (a
/// shared conn id would be one). Their `--histogram-out` files add up with
/// `merge`: the count is the sum of both runs', and the percentiles come
/// from both (the sum's minimum and maximum are the lower and the higher
/// of the two).
#[test]
fn two_processes_split_one_device_space_and_their_histograms_merge() {
    let node = TestNode::start();
    let dir = node.data_dir().to_string_lossy().into_owned();
    let runs: Vec<_> = ["0", "1000"]
        .into_iter()
        .map(|first| {
            let json = node.data_dir().join(format!("split-{first}.json"));
            let hlog = node.data_dir().join(format!("split-{first}.hlog"));
            let args: Vec<String> = [
                "--node",
                &node.udp,
                "--control",
                &node.http,
                "--data-dir",
                &dir,
                "--duration",
                "2s",
                "--warmup",
                "1s",
                "--no-progress",
                "--timeout-ms",
                "5000",
                "--devices",
                "1000",
                "--accounts",
                "50",
                "--first-device",
                first,
                "--json",
                json.to_str().unwrap(),
                "--histogram-out",
                hlog.to_str().unwrap(),
                "fanout",
                "--rate",
                "250",
                "--drain",
                "5s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let run = std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                loadgen(&args)
            });
            (run, json, hlog)
        })
        .collect();
    let mut reports = Vec::new();
    let mut hlogs = Vec::new();
    for (run, json, hlog) in runs {
        let out = run.join().expect("the loadgen thread");
        assert!(
            out.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report")).unwrap();
        every_publish_reached_every_one_of(&r, 1000);
        reports.push(r);
        hlogs.push(hlog);
    }
    assert_eq!(
        metric(&node, "mpp_connections"),
        2000,
        "no conn id in common"
    );
    let out = loadgen(&[
        "merge",
        hlogs[0].to_str().unwrap(),
        hlogs[1].to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("latency µs"))
        .unwrap_or_else(|| panic!("no latency row: {table}"));
    let field = |key: &str| -> u64 {
        let v = row
            .split_whitespace()
            .skip_while(|w| *w != key)
            .nth(1)
            .unwrap_or_else(|| panic!("no {key} in {row}"));
        v.trim_start_matches("(n=")
            .trim_end_matches(')')
            .parse()
            .unwrap_or_else(|_| panic!("{key} in {row}"))
    };
    let lat = |i: usize, k: &str| u(&reports[i]["latency_us"][k]);
    let n = row.rsplit("(n=").next().unwrap().trim_end_matches(')');
    assert_eq!(
        n.parse::<u64>().unwrap(),
        lat(0, "count") + lat(1, "count"),
        "{row}"
    );
    assert_eq!(field("max"), lat(0, "max").max(lat(1, "max")), "{row}");
    let p50 = field("p50");
    let (lo, hi) = (
        lat(0, "p50").min(lat(1, "p50")),
        lat(0, "p50").max(lat(1, "p50")),
    );
    assert!(lo <= p50 && p50 <= hi, "{row}: p50 between {lo} and {hi}");
}

#[test]
fn fanout_baseline_is_the_reliable_sender_with_the_one_way_beside_it() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "2000",
            "--accounts",
            "100",
            "--baseline",
            "fanout",
            "--rate",
            "500",
            "--drain",
            "5s",
        ],
    );
    every_publish_reached_every_device(&r);
    assert_eq!(r["baseline"], "raw reliable fan-out");
    let base = r["baseline_rate_per_s"].as_f64().expect("baseline rate");
    assert!(base > 0.0, "{r}");
    let ratio = r["ratio"].as_f64().expect("ratio");
    let rate = r["rate_per_s"].as_f64().unwrap();
    assert!((ratio - rate / base).abs() < 1e-9);
    let second = &r["second_baseline"];
    assert_eq!(second["name"], "raw one-way fan-out");
    assert!(second["rate_per_s"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn interleaved_heartbeat_alternates_node_and_raw_echo() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "1000",
            "--baseline",
            "--interleave",
            "200ms",
            "heartbeat",
            "--window",
            "64",
        ],
    );
    node_and_raw_echo_took_turns(&r);
    assert_eq!(u(&r["lost"]), 0);
    assert_eq!(u(&r["wrong"]), 0, "{r}");
}

/// An interleaved report of the node against the in-process reflector:
/// both sides had every slice of every round, each counted answers, and
/// `ratio` is the median of the per-round ratios.
fn node_and_raw_echo_took_turns(r: &serde_json::Value) {
    let il = &r["interleave"];
    assert_eq!(il["sides"], serde_json::json!(["node", "raw echo"]));
    let rounds = u(&il["rounds"]);
    assert!(rounds >= 1, "{r}");
    let slices = il["slices"].as_array().unwrap();
    assert_eq!(slices.len() as u64, 2 * rounds);
    // Every slice of both sides counted answers.
    assert!(slices.iter().all(|s| u(&s["count"]) > 0), "{r}");
    let ratio = &il["comparisons"][0]["ratio"];
    assert_eq!(u(&ratio["n"]), rounds);
    let (lo, med, hi) = (
        ratio["min"].as_f64().unwrap(),
        ratio["median"].as_f64().unwrap(),
        ratio["max"].as_f64().unwrap(),
    );
    assert!(lo <= med && med <= hi, "{ratio}");
    assert_eq!(r["ratio"].as_f64().unwrap(), med);
    assert_eq!(r["baseline"], "raw echo");
}

#[test]
fn interleaved_fanout_against_both_raw_senders_loses_nothing() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "2000",
            "--accounts",
            "100",
            "--baseline",
            "--interleave",
            "200ms",
            "fanout",
            "--rate",
            "500",
            "--drain",
            "5s",
        ],
    );
    every_publish_reached_every_device(&r);
    let il = &r["interleave"];
    assert_eq!(
        il["sides"],
        serde_json::json!(["node", "raw reliable fan-out", "raw one-way fan-out"])
    );
    let slices = il["slices"].as_array().unwrap();
    assert_eq!(slices.len() as u64, 3 * u(&il["rounds"]));
    assert!(slices.iter().all(|s| u(&s["count"]) > 0), "{r}");
    assert_eq!(il["comparisons"].as_array().unwrap().len(), 2);
    assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn pipelined_fanout_delivers_every_publish_to_every_device() {
    // Eight requests in flight on the control connection at --rate 0: the
    // answers are read in order and every accepted publish is counted,
    // including those still in flight when the window closed.
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "2000",
            "--accounts",
            "100",
            "fanout",
            "--rate",
            "0",
            "--publish-batch",
            "10",
            "--pipeline",
            "8",
            "--drain",
            "5s",
        ],
    );
    assert_eq!(r["config"]["command"]["Fanout"]["pipeline"], 8, "{r}");
    every_publish_reached_every_device(&r);
    assert!(u(&r["figures"]["http_requests"]) > 8, "{r}");
    assert!(u(&r["latency_us"]["count"]) > 0, "{r}");
}

#[test]
fn fanout_ahead_zero_sends_each_publish_in_its_own_notify() {
    // --ahead 0: an account's next publish only once every device has the
    // last, so the node never merges two publishes into one notify and
    // every notify a device sees is one publish (no loss here, so no
    // retransmit can stand in for a missed notify).
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "2000",
            "--accounts",
            "100",
            "fanout",
            "--rate",
            "0",
            "--ahead",
            "0",
            "--drain",
            "5s",
        ],
    );
    assert_eq!(r["config"]["command"]["Fanout"]["ahead"], 0, "{r}");
    assert!(every_publish_reached_every_device(&r) > 100, "{r}");
    let f = &r["figures"];
    assert_eq!(
        u(&f["notifications"]),
        u(&f["delivered"]),
        "one publish per notify: {r}"
    );
}

#[test]
fn fanout_loses_nothing_with_ten_percent_loss_each_way() {
    // The loadgen drops 10 % of what the devices send and of what they
    // receive. Retransmissions, acknowledgements and the pending state in
    // heartbeat answers must still bring every publish to every device,
    // with the default timers and tries.
    let node = TestNode::start();
    let r = scenario_with_timeout(
        &node,
        None,
        &[
            "--devices",
            "1000",
            "--accounts",
            "100",
            "--loss",
            "10",
            "fanout",
            "--rate",
            "200",
            "--heartbeat",
            "2s",
            "--drain",
            "12s",
        ],
    );
    let f = &r["figures"];
    assert!(
        u(&f["whole_run"]["loss_dropped"]) > 0,
        "the loss was simulated"
    );
    assert!(u(&f["published"]) > 0);
    assert_eq!(u(&f["delivered"]), u(&f["expected_deliveries"]), "{r}");
    assert_eq!(u(&r["lost"]), 0);
    every_bitmask_covered_what_was_published(&r);
}

#[test]
fn fanout_at_thirty_percent_loss_holds_every_device_with_default_retries() {
    // A simulated device never gives up, as a real one does not. At 30 %
    // loss each way a connect round trip fails half the time: with the
    // old give-up after three unanswered connects, about one device in
    // eight stopped for good and every publish to it counted as lost. With
    // the default --tries and --timeout-ms, connects are retried with
    // backoff until every device is held; heartbeats that go unanswered
    // make a device connect again the same way, and the pending state its
    // answers carry still brings it every publish. A device that is
    // reconnecting when publishing stops gets the last publish with its
    // connect answer, after a few 4 s waits at worst: hence the long drain
    // (at 12 s, one run in two still had a device or two short).
    let node = TestNode::start();
    let r = scenario_with_timeout(
        &node,
        None,
        &[
            "--devices",
            "200",
            "--accounts",
            "20",
            "--loss",
            "30",
            "fanout",
            "--rate",
            "100",
            "--heartbeat",
            "5s",
            "--drain",
            "35s",
        ],
    );
    let f = &r["figures"];
    assert!(
        u(&f["whole_run"]["loss_dropped"]) > 0,
        "the loss was simulated"
    );
    assert!(u(&f["published"]) > 0, "{r}");
    assert_eq!(u(&r["lost"]), 0, "{r}");
    assert_eq!(u(&f["delivered"]), u(&f["expected_deliveries"]), "{r}");
    every_bitmask_covered_what_was_published(&r);
    // Every device connected, and none was given up since: each is held
    // or connecting again.
    assert_eq!(u(&f["devices_connected"]), 200, "{r}");
    assert_eq!(u(&r["devices_held"]) + u(&f["connecting"]), 200, "{r}");
    assert_eq!(u(&f["whole_run"]["refused_devices"]), 0, "{r}");
    assert!(u(&f["whole_run"]["connect_retries"]) > 0, "{r}");
}

/// docs/PROTOCOL.md §7.8: a neighbour on the devices' own address sends the
/// hostile mix while they are notified; every publish still reaches every
/// device, and the node answers nothing but the STUN requests.
#[test]
fn a_hostile_mix_from_the_devices_address_costs_them_nothing() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "2000",
            "--accounts",
            "100",
            "--hostile",
            "3000",
            "fanout",
            "--rate",
            "500",
            "--drain",
            "5s",
        ],
    );
    every_publish_reached_every_device(&r);
    let h = &r["figures"]["hostile"];
    assert_eq!(u(&h["answer_bytes_except_stun"]), 0, "{h}");
    for kind in [
        "random",
        "bad_tag",
        "truncated",
        "oversized",
        "stun",
        "replay",
    ] {
        assert!(u(&h["kinds"][kind]["sent"]) > 0, "{kind} not sent: {h}");
        if kind != "stun" {
            assert_eq!(u(&h["kinds"][kind]["answers"]), 0, "{kind} answered: {h}");
        }
    }
    // The test node does not limit STUN (--stun-rate 0): every request that
    // reached it was answered, and answers are counted.
    assert!(u(&h["kinds"]["stun"]["answers"]) > 0, "{h}");
}

#[test]
fn hold_reports_node_memory_per_device() {
    let node = TestNode::start();
    // The node runs inside this test process: its RSS is ours.
    let pid = std::process::id().to_string();
    let r = scenario(
        &node,
        &[
            "--devices",
            "10000",
            "--node-pid",
            &pid,
            "hold",
            "--connect-rate",
            "20000",
            "--heartbeat",
            "2s",
        ],
    );
    assert_eq!(u(&r["devices_held"]), 10_000);
    assert_eq!(u(&r["lost"]), 0);
    assert_eq!(u(&r["wrong"]), 0, "{r}");
    assert!(r["node_rss_bytes_per_device"].as_f64().is_some(), "{r}");
    // 10,000 devices heartbeating every 2 s: about 5,000 round trips a second.
    assert!(u(&r["figures"]["measured"]["replies"]) > 0);
}

#[test]
fn churn_disconnects_reconnects_and_rebinds() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--devices",
            "2000",
            "churn",
            "--rate",
            "200",
            "--rebind-rate",
            "200",
        ],
    );
    let m = &r["figures"]["measured"];
    assert!(u(&m["disconnects"]) > 0, "{r}");
    assert!(u(&m["rebinds_confirmed"]) > 0, "{r}");
    let whole = &r["figures"]["whole_run"];
    assert!(u(&whole["rebinds_confirmed"]) <= u(&whole["rebinds"]));
    assert_eq!(u(&r["figures"]["whole_run"]["refused"]), 0);
    assert_eq!(u(&r["lost"]), 0);
    assert_eq!(u(&r["wrong"]), 0, "{r}");
}

#[test]
fn stun_against_the_node_and_the_reflector() {
    let node = TestNode::start();
    let r = scenario(&node, &["--baseline", "stun", "--window", "32"]);
    assert!(u(&r["figures"]["requests_sent"]) > 0);
    assert!(r["rate_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["baseline_rate_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(u(&r["wrong"]), 0, "{r}");
}

#[test]
fn interleaved_stun_alternates_node_and_reflector() {
    let node = TestNode::start();
    let r = scenario(
        &node,
        &[
            "--baseline",
            "--interleave",
            "200ms",
            "stun",
            "--window",
            "32",
        ],
    );
    // Each side sends only in its own turn (stun.rs's unit test), and
    // both answer.
    node_and_raw_echo_took_turns(&r);
    assert!(r["rate_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(u(&r["figures"]["requests_sent"]) > 0, "{r}");
    assert_eq!(u(&r["lost"]), 0, "{r}");
}

#[test]
fn raw_fanout_and_html_report() {
    let dir = tempfile::tempdir().expect("temp dir");
    let html = dir.path().join("r.html");
    let json = dir.path().join("r.json");
    let out = loadgen(&[
        "--devices",
        "500",
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--no-progress",
        "--html",
        html.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "raw-fanout",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(u(&r["figures"]["measured"]["delivered"]) > 0, "{r}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("raw-fanout"));
    // The table on stdout names the main rate.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("raw notifications delivered/s"), "{stdout}");
}

#[test]
fn raw_reliable_fanout_counts_acknowledgements() {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("r.json");
    let out = loadgen(&[
        "--devices",
        "500",
        "--duration",
        "1s",
        "--warmup",
        "0s",
        "--no-progress",
        "--json",
        json.to_str().unwrap(),
        "raw-fanout",
        "--reliable",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(r["rate_per_s"].as_f64().unwrap() > 0.0, "{r}");
    // Each acknowledgement answers a notify a device received.
    let sent = u(&r["figures"]["sender_datagrams_sent"]);
    assert!(sent >= u(&r["figures"]["devices_received"]), "{r}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("raw notifications acknowledged/s"),
        "{stdout}"
    );
}

/// A child process of the test, killed (by its own pid) and reaped on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to `limit` for `child` to exit on its own; kills it and fails
/// past that.
fn exits_within(child: &mut Reaped, limit: std::time::Duration, what: &str) {
    let until = std::time::Instant::now() + limit;
    loop {
        match child.0.try_wait().expect("try_wait") {
            Some(status) => {
                assert!(status.success(), "{what} failed: {status}");
                return;
            }
            None if std::time::Instant::now() >= until => {
                panic!("{what} did not exit within {limit:?}")
            }
            None => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// `echo` (heartbeat-shaped packets, 64 in flight) against `reflector`,
/// both as the user runs them, each its own process: every datagram the
/// devices sent came back, each was an answer to the heartbeat in flight,
/// and nothing timed out.
#[test]
fn echo_against_the_reflector_gets_every_heartbeat_back() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("temp dir");
    let refl_json = dir.path().join("reflector.json");
    let echo_json = dir.path().join("echo.json");
    // The reflector outlasts the echo run (about 3 s) by a wide margin:
    // everything the devices send is echoed while it runs.
    let mut reflector = Reaped(
        Command::new(env!("CARGO_BIN_EXE_mpp-loadgen"))
            .args([
                "--duration",
                "10s",
                "--warmup",
                "0s",
                "--no-progress",
                "--json",
            ])
            .arg(&refl_json)
            .args(["reflector", "--listen", "127.0.0.1:0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("mpp-loadgen reflector starts"),
    );
    // "mpp-loadgen: reflector on 127.0.0.1:PORT for 10 s"
    let mut line = String::new();
    std::io::BufReader::new(reflector.0.stderr.take().unwrap())
        .read_line(&mut line)
        .expect("the reflector's first line");
    let addr = line
        .split_whitespace()
        .nth(3)
        .filter(|a| a.parse::<std::net::SocketAddr>().is_ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let out = loadgen(&[
        "--node",
        &addr,
        "--devices",
        "1000",
        "--duration",
        "2s",
        "--warmup",
        "1s",
        "--timeout-ms",
        "5000",
        "--no-progress",
        "--json",
        echo_json.to_str().unwrap(),
        "echo",
        "--window",
        "64",
    ]);
    assert!(
        out.status.success(),
        "echo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: Value = serde_json::from_str(&std::fs::read_to_string(&echo_json).unwrap()).unwrap();
    assert_eq!(e["scenario"], "echo");
    assert_eq!(u(&e["devices"]), 1000);
    assert_eq!(u(&e["lost"]), 0, "{e}");
    assert_eq!(u(&e["wrong"]), 0, "{e}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table_count(&stdout, "lost"), 0, "{stdout}");
    assert_eq!(table_count(&stdout, "wrong"), 0, "{stdout}");
    let w = &e["figures"]["whole_run"];
    // Only heartbeats went out (no connects to a reflector), and every one
    // the kernel took.
    assert_eq!(u(&w["connects_sent"]), 0, "{e}");
    assert_eq!(u(&w["heartbeats_sent"]), u(&w["sent"]), "{e}");
    assert_eq!(u(&w["send_errors"]), 0, "{e}");
    // Each datagram received was the device's own heartbeat, the one in
    // flight, opened with its key; none was given up on.
    assert_eq!(u(&w["replies"]), u(&w["received"]), "{e}");
    for k in ["timeouts", "unauthentic", "unknown", "other", "duplicates"] {
        assert_eq!(u(&w[k]), 0, "{k}: {e}");
    }
    // What was still in flight when the devices stopped: at most the window.
    let (sent, received) = (u(&w["sent"]), u(&w["received"]));
    assert!(received <= sent && sent - received <= 64, "{e}");
    assert!(u(&e["figures"]["measured"]["replies"]) > 0, "{e}");
    assert!(e["rate_per_s"].as_f64().unwrap() > 0.0, "{e}");

    exits_within(
        &mut reflector,
        std::time::Duration::from_secs(60),
        "the reflector",
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&refl_json).unwrap()).unwrap();
    assert_eq!(r["scenario"], "reflector");
    assert_eq!(r["figures"]["listen"], addr.as_str());
    // The reflector echoed exactly what the devices sent, all of it in its
    // measured window (no warm-up, and it outlived the echo run).
    assert_eq!(u(&r["figures"]["echoed_total"]), sent, "{r}");
    assert_eq!(u(&r["figures"]["echoed"]), sent, "{r}");
    assert!(r["rate_per_s"].as_f64().unwrap() > 0.0, "{r}");
}

/// `mosquitto`'s path, if it is installed.
fn mosquitto_program() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .into_iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// A `mosquitto` of the test's own on 127.0.0.1 and a free port, killed
/// (by its pid) when dropped.
struct Mosquitto {
    port: u16,
    _child: Reaped,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts mosquitto, or returns `None` (after saying so) when it is
    /// not installed, unless `MPP_REQUIRE_MOSQUITTO=1` (CI): then a
    /// missing mosquitto fails the test.
    fn start() -> Option<Mosquitto> {
        let Some(program) = mosquitto_program() else {
            if std::env::var("MPP_REQUIRE_MOSQUITTO").as_deref() == Ok("1") {
                panic!(
                    "mosquitto is not installed and MPP_REQUIRE_MOSQUITTO=1: \
                     apt-get install mosquitto (.ci/run does this)"
                );
            }
            eprintln!(
                "skipped: mosquitto not installed (apt-get install mosquitto; \
                 MPP_REQUIRE_MOSQUITTO=1 makes this a failure)"
            );
            return None;
        };
        // A free port: bind port 0, note it, let it go. Another process
        // could take it in between; the start below then fails loudly.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\n"
            ),
        )
        .expect("mosquitto.conf written");
        let log = dir.path().join("mosquitto.log");
        let child = Command::new(&program)
            .arg("-c")
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(std::fs::File::create(dir.path().join("mosquitto.err")).expect("log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut child = Reaped(child);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.0.try_wait().ok().flatten() {
                panic!(
                    "mosquitto exited ({status}): {}",
                    std::fs::read_to_string(dir.path().join("mosquitto.err")).unwrap_or_default()
                );
            }
            assert!(
                std::time::Instant::now() < until,
                "mosquitto did not listen on port {port} within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(Mosquitto {
            port,
            _child: child,
            _dir: dir,
        })
    }
}

/// `mqtt` through a real mosquitto: 50 subscribers, 200 publishes a
/// second, at QoS 0. On loopback, with a broker that keeps up, every
/// publish reaches every subscriber, intact.
#[test]
fn mqtt_through_mosquitto_delivers_every_publish_to_every_subscriber() {
    mqtt_through_mosquitto(0);
}

/// The same at QoS 1: the broker PUBACKs every publish (counted by the
/// publisher), and every delivery arrives, which needs the subscribers'
/// PUBACKs: mosquitto keeps at most 20 unacknowledged messages in flight
/// per subscriber (`max_inflight_messages`), far fewer than the run's
/// publishes.
#[test]
fn mqtt_at_qos_1_through_mosquitto_acknowledges_every_publish() {
    mqtt_through_mosquitto(1);
}

fn mqtt_through_mosquitto(qos: u8) {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("mqtt.json");
    let addr = format!("127.0.0.1:{}", broker.port);
    let out = loadgen(&[
        "--devices",
        "50",
        "--threads",
        "2",
        "--duration",
        "2s",
        "--warmup",
        "1s",
        "--no-progress",
        "--json",
        json.to_str().unwrap(),
        "mqtt",
        "--broker",
        &addr,
        "--qos",
        &qos.to_string(),
        "--rate",
        "200",
        "--payload-bytes",
        "32",
        "--drain",
        "10s",
    ]);
    assert!(
        out.status.success(),
        "mqtt failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = &r["figures"];
    assert_eq!(r["scenario"], "mqtt");
    assert_eq!(u(&r["devices"]), 50);
    assert_eq!(u(&r["devices_held"]), 50, "{r}");
    assert_eq!(f["broker"], addr.as_str());
    assert_eq!(u(&r["lost"]), 0, "{r}");
    assert_eq!(u(&r["wrong"]), 0, "{r}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table_count(&stdout, "lost"), 0, "{stdout}");
    assert_eq!(table_count(&stdout, "wrong"), 0, "{stdout}");
    // The measured window's publishes, each to each of the 50, each
    // delivery timed; and over the whole run (warm-up included) too.
    let published = u(&f["published"]);
    assert!(published > 0, "{r}");
    assert_eq!(u(&f["delivered"]), published * 50, "{r}");
    assert_eq!(u(&r["latency_us"]["count"]), published * 50, "{r}");
    assert_eq!(
        u(&f["delivered_total"]),
        u(&f["published_total"]) * 50,
        "{r}"
    );
    assert_eq!(u(&f["settle_timeouts"]), 0, "{r}");
    assert_eq!(u(&f["disconnects"]), 0, "{r}");
    assert!(f.get("foreign_messages").is_none(), "{r}");
    assert_eq!(u(&f["qos"]), u64::from(qos), "{r}");
    if qos == 1 {
        assert_eq!(u(&f["publish_acks"]), u(&f["published_total"]), "{r}");
    } else {
        assert!(f.get("publish_acks").is_none(), "{r}");
    }
}

fn one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_flags_give_clear_errors() {
    one_line_error(
        &loadgen(&["--devices", "0", "heartbeat"]),
        1,
        "--devices must be at least 1",
    );
    one_line_error(
        &loadgen(&["--cpus", "x", "heartbeat"]),
        2,
        "invalid CPU list",
    );
    one_line_error(
        &loadgen(&["--duration", "soon", "heartbeat"]),
        2,
        "invalid duration",
    );
    one_line_error(&loadgen(&["nonsense"]), 2, "unrecognized subcommand");
    // Without --data-dir, mppd's default ./mppd-data (none here).
    one_line_error(
        &loadgen(&["--devices", "10", "heartbeat"]),
        1,
        "give --data-dir DIR",
    );
    one_line_error(
        &loadgen(&["--tries", "0", "heartbeat"]),
        1,
        "--tries must be at least 1",
    );
    one_line_error(
        &loadgen(&["--interleave", "500ms", "heartbeat"]),
        1,
        "--interleave alternates the node with --baseline or --versus",
    );
    one_line_error(
        &loadgen(&["--interleave", "50ms", "--baseline", "heartbeat"]),
        2,
        "too short",
    );
    one_line_error(
        &loadgen(&["--baseline-cpu", "0,1", "heartbeat"]),
        2,
        "give one",
    );
    one_line_error(
        &loadgen(&["--devices", "10", "--accounts", "11", "heartbeat"]),
        1,
        "--accounts must be between 1 and --devices",
    );
    one_line_error(
        &loadgen(&["--node", "127.0.0.1:1,127.0.0.1:2", "stun"]),
        1,
        "several --node addresses are for hold, fanout, heartbeat and churn",
    );
    one_line_error(
        &loadgen(&[
            "--node",
            "127.0.0.1:1,127.0.0.1:2",
            "--control",
            "http://127.0.0.1:1",
            "fanout",
        ]),
        1,
        "--control lists 1 URLs for 2 --node addresses",
    );
    one_line_error(
        &loadgen(&[
            "--node",
            "127.0.0.1:1,127.0.0.1:2",
            "--baseline",
            "heartbeat",
        ]),
        1,
        "take one --node",
    );
    one_line_error(
        &loadgen(&[
            "--devices",
            "100",
            "--accounts",
            "10",
            "--first-device",
            "5",
            "heartbeat",
        ]),
        1,
        "--first-device 5 does not start an account",
    );
    one_line_error(
        &loadgen(&[
            "--devices",
            "10",
            "--first-device",
            "4294967290",
            "heartbeat",
        ]),
        1,
        "at most 2^32",
    );
    one_line_error(&loadgen(&["merge"]), 2, "required");
    let missing = loadgen(&["--data-dir", "/nonexistent/mpp", "heartbeat"]);
    one_line_error(&missing, 1, "/nonexistent/mpp/master.key");
    let dir = tempfile::tempdir().unwrap();
    let out = loadgen(&[
        "--token-file",
        dir.path().join("none").to_str().unwrap(),
        "--master-key",
        dir.path().join("none").to_str().unwrap(),
        "fanout",
        "--bitmask-bytes",
        "33",
    ]);
    one_line_error(&out, 1, "--bitmask-bytes must be between 1 and 32");
    for depth in ["0", "65"] {
        let out = loadgen(&[
            "--token-file",
            dir.path().join("none").to_str().unwrap(),
            "--master-key",
            dir.path().join("none").to_str().unwrap(),
            "fanout",
            "--pipeline",
            depth,
        ]);
        one_line_error(&out, 1, "--pipeline must be between 1 and 64");
    }
    let out = loadgen(&[
        "--token-file",
        dir.path().join("none").to_str().unwrap(),
        "--master-key",
        dir.path().join("none").to_str().unwrap(),
        "fanout",
        "--ahead",
        "33",
    ]);
    one_line_error(&out, 1, "--ahead must be between 0 and 32");
}

#[test]
fn no_node_is_a_clear_error() {
    // A node's data directory but nothing listening on the port.
    let node = TestNode::start();
    let dir = node.data_dir().to_string_lossy().into_owned();
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let out = loadgen(&[
        "--node",
        &addr,
        "--data-dir",
        &dir,
        "--devices",
        "10",
        "--timeout-ms",
        "200",
        "--tries",
        "1",
        "--no-progress",
        "heartbeat",
    ]);
    one_line_error(&out, 1, "no device connected");
}
