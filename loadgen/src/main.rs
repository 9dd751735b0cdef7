//! `mpp-loadgen`: simulated MPP devices by the million, the raw baselines
//! they are compared with, the peers (coturn, mosquitto), and reports.
//!
//! Every scenario runs a connect phase (where it has devices), `--warmup`,
//! then the measured `--duration`, and prints a table; `--json` and `--html`
//! write the full report. Devices are built on the project's own protocol
//! code (`mpp::packet`, `mpp::codec`, `mpp::proto::seal_request`) with a
//! compact per-device record instead of a `Client` each.
//!
//! Ctrl-C (SIGINT) or SIGTERM ends the phase under way and every later one
//! at once: the table and the `--json`/`--html` reports are still written,
//! for what was measured until then (`figures.interrupted` is true), and
//! the exit status is 130. A second Ctrl-C ends the process at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use clap::{Args, Parser, Subcommand};
use mpp::config::CpuList;

mod baseline;
mod engine;
mod hist;
mod hostile;
mod html;
mod ident;
mod interleave;
mod io;
mod monitor;
mod mqtt;
mod plan;
mod publisher;
mod report;
mod run;
mod stun;
mod sys;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for mppd: devices, publishers, baselines and peers.
#[derive(Parser, Debug)]
#[command(name = "mpp-loadgen", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags every scenario understands.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct Common {
    /// The node's (or STUN server's, or reflector's) UDP address; for hold,
    /// fanout, heartbeat and churn also the nodes of a cluster,
    /// comma-separated: device n of the space (see --first-device) connects
    /// to the (n mod k)-th of the k nodes, and fanout's publishes enter
    /// every node (each account's through one node, account a's through
    /// the (a mod k)-th), so most deliveries cross the bus.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        num_args = 1,
        value_name = "ADDR[,ADDR…]",
        default_value = "127.0.0.1:15099"
    )]
    pub(crate) node: Vec<std::net::SocketAddr>,
    /// The nodes' control APIs, for publishing (fanout): one URL per
    /// --node, comma-separated, in the same order (default: http:// and
    /// each --node address, which is mppd's default for one node).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        num_args = 1,
        value_name = "URL[,URL…]"
    )]
    pub(crate) control: Vec<String>,
    /// The node's data directory: credentials are minted from its master.key
    /// and publishes authorized with its admin.token. The default is mppd's
    /// own, so a loadgen started beside a default mppd needs no flag. With
    /// several --node, any one of theirs: the nodes of a cluster share the
    /// master key, and the loadgen publishes to every node with this one
    /// admin token (copy it into each node's directory too).
    #[arg(long, global = true, default_value = "./mppd-data")]
    pub(crate) data_dir: PathBuf,
    /// A master key file (64 hex digits) instead of --data-dir's.
    #[arg(long, global = true)]
    pub(crate) master_key: Option<PathBuf>,
    /// An admin token file instead of --data-dir's.
    #[arg(long, global = true)]
    pub(crate) token_file: Option<PathBuf>,
    /// Simulated devices.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub(crate) devices: u64,
    /// Accounts the devices are spread over (default: one per device),
    /// each a block of consecutive devices (device n of the space is in
    /// account ⌊n × accounts / devices⌋).
    #[arg(long, global = true)]
    pub(crate) accounts: Option<u64>,
    /// Simulate devices N .. N+devices-1 of a device space shared by
    /// several loadgen processes (each with the same --devices and
    /// --accounts and its own N, a multiple of devices/accounts): their
    /// devices, conn ids and accounts never overlap, so each one's counts
    /// are exact. Conn ids are then the space's, not salted per run: a run
    /// takes over what an earlier run of the same range left on the node.
    #[arg(long, global = true, value_name = "N")]
    pub(crate) first_device: Option<u64>,
    /// Measured window, e.g. 10s, 2m.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_secs)]
    pub(crate) duration: u64,
    /// Load before the measured window, not counted (0 for none).
    #[arg(long, global = true, default_value = "2s", value_parser = parse_secs)]
    pub(crate) warmup: u64,
    /// Worker threads (each owns a share of the devices and sockets).
    #[arg(long, global = true, default_value_t = 1)]
    pub(crate) threads: usize,
    /// Pin worker i to the i-th CPU of this list, e.g. 1 or 2-3,6. An empty
    /// list (--cpus '') pins nothing, the same as leaving the flag out.
    #[arg(long, global = true, value_parser = parse_cpus)]
    #[serde(serialize_with = "cpus_json")]
    pub(crate) cpus: Option<CpuList>,
    /// UDP sockets, shared by the devices (spread over the workers).
    #[arg(long, global = true, default_value_t = 8)]
    pub(crate) sockets: usize,
    /// Datagrams per recvmmsg/sendmmsg call.
    #[arg(long, global = true, default_value_t = 64)]
    pub(crate) batch: usize,
    /// A connect or heartbeat unanswered this long (ms) is sent again. A
    /// connect's later waits double (2x, 4x this) up to 4 s (or this, if
    /// longer), each with random jitter (between half and all of it), and
    /// never end: a device keeps connecting for as long as the run lasts.
    #[arg(long, global = true, default_value_t = 1000)]
    pub(crate) timeout_ms: u64,
    /// Sends of one heartbeat, --timeout-ms apart, before the device takes
    /// its connection for lost (each such heartbeat counts as lost) and
    /// connects again, retrying as above (at least 1). Connects have no
    /// such limit.
    #[arg(long, global = true, default_value_t = 3)]
    pub(crate) tries: u8,
    /// Simulated path loss: drop this percentage of the datagrams the
    /// devices send and of those they receive (0-100).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub(crate) loss: f64,
    /// Hostile datagrams per second sent to the node from the devices' own
    /// address once they are connected (a neighbour behind the same NAT):
    /// random bytes, real conn ids with bad tags, truncated and oversized
    /// packets, STUN requests and replays, in turn. The report says what
    /// the node answered to each kind (0 = none sent).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub(crate) hostile: f64,
    /// The node's pid: report its CPU use (and for hold, its RSS growth);
    /// with several nodes, their pids, comma-separated: the sum is
    /// reported (2.0 = two cores), and fanout reports the nodes' CPU time
    /// per publish.
    #[arg(
        long = "node-pid",
        global = true,
        value_delimiter = ',',
        num_args = 1,
        value_name = "PID[,PID…]"
    )]
    pub(crate) node_pids: Vec<u32>,
    /// The first of --node-pid (the scenarios that watch one node).
    #[arg(skip)]
    #[serde(skip)]
    pub(crate) node_pid: Option<u32>,
    /// Also run the scenario's baseline (raw echo or raw fan-out) in this
    /// run and report the ratio.
    #[arg(long, global = true)]
    pub(crate) baseline: bool,
    /// CPU for the in-process baseline server (use the node's CPU). Empty
    /// (--baseline-cpu '') leaves it unpinned, the same as leaving the flag out.
    #[arg(long, global = true, value_parser = parse_one_cpu)]
    #[serde(serialize_with = "one_cpu_json")]
    pub(crate) baseline_cpu: Option<CpuList>,
    /// Alternate the node and its baseline (--baseline) or a second node
    /// (--versus) in slices of this length (e.g. 500ms, 2s) for the whole
    /// --duration, and report the median of the per-round ratios with
    /// their range (heartbeat, fanout, stun).
    #[arg(long, global = true, value_parser = interleave::parse_slice)]
    pub(crate) interleave: Option<std::time::Duration>,
    /// A second node's UDP address: with --interleave, the same scenario
    /// runs against it in alternate slices, and the ratio is this node's
    /// rate over the second's (e.g. io_uring against mmsg; for stun any
    /// STUN server, e.g. coturn).
    #[arg(long, global = true)]
    pub(crate) versus: Option<std::net::SocketAddr>,
    /// The second node's control API (default: http:// and --versus).
    #[arg(long, global = true)]
    pub(crate) versus_control: Option<String>,
    /// The second node's data directory (default: --data-dir).
    #[arg(long, global = true)]
    pub(crate) versus_data_dir: Option<PathBuf>,
    /// The second node's pid (its CPU use).
    #[arg(long, global = true)]
    pub(crate) versus_pid: Option<u32>,
    /// Write the full report as JSON.
    #[arg(long, global = true)]
    pub(crate) json: Option<PathBuf>,
    /// Write a self-contained HTML page with charts.
    #[arg(long, global = true)]
    pub(crate) html: Option<PathBuf>,
    /// Write the measured window's latency histograms to FILE, in
    /// HdrHistogram's interval log format (each histogram V2 + deflate,
    /// tagged `latency` and, with several fanout nodes, `cross-node`), for
    /// `mpp-loadgen merge` to add up over several processes.
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) histogram_out: Option<PathBuf>,
    /// No live progress bar.
    #[arg(long, global = true)]
    pub(crate) no_progress: bool,
}

/// The scenarios.
#[derive(Subcommand, Debug, Clone, serde::Serialize)]
pub(crate) enum Command {
    /// Connect --devices at --connect-rate and keep them with heartbeats
    /// every --heartbeat; report devices held and the node's memory per device.
    Hold(HoldArgs),
    /// Accounts × devices; publish over HTTP at --rate and measure publish →
    /// device latency, notifications/s, acknowledgements, losses.
    Fanout(FanoutArgs),
    /// Maximum sustained heartbeat round trips/s (--window in flight).
    Heartbeat(WindowArgs),
    /// STUN Binding requests/s against any STUN server (--node).
    Stun(WindowArgs),
    /// Connect/disconnect storms and NAT rebinding at given rates.
    Churn(ChurnArgs),
    /// Run a recvmmsg → sendmmsg reflector on --listen (the raw echo limit).
    Reflector(ReflectorArgs),
    /// Heartbeat-shaped load against a reflector at --node (raw echo).
    Echo(WindowArgs),
    /// Raw sendmmsg fan-out of notify-sized datagrams to the devices'
    /// sockets: one-way, or --reliable (each acknowledged before the next).
    RawFanout(RawFanoutArgs),
    /// MQTT QoS 0 fan-out through a broker (mosquitto): one publisher, --devices subscribers.
    Mqtt(mqtt::MqttArgs),
    /// Add up the --histogram-out files of several runs (processes that
    /// split one device space) and print the latency table of the sum, per
    /// tag; --histogram-out writes the sum.
    Merge(MergeArgs),
}

/// `merge`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct MergeArgs {
    /// --histogram-out files.
    #[arg(required = true, value_name = "FILE")]
    pub(crate) files: Vec<PathBuf>,
}

/// `heartbeat`, `stun`, `echo`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct WindowArgs {
    /// Requests kept in flight (at most one per device).
    #[arg(long, default_value_t = 256)]
    pub(crate) window: usize,
    /// Connects per second during the connect phase.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) connect_rate: u64,
}

/// `hold`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct HoldArgs {
    /// Connects per second (the ramp).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) connect_rate: u64,
    /// Heartbeat period of each device, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = parse_secs)]
    pub(crate) heartbeat: u64,
    /// Requests in flight at most (connects and heartbeats).
    #[arg(long, default_value_t = 4096)]
    pub(crate) window: usize,
}

/// `fanout`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct FanoutArgs {
    /// Publishes per second (each reaches every device of one account); 0 =
    /// as fast as the node takes them.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) rate: f64,
    /// Notifications per HTTP request (the batch API).
    #[arg(long, default_value_t = 100)]
    pub(crate) publish_batch: usize,
    /// Publish requests kept in flight on each control connection (HTTP/1.1
    /// pipelining, 1 to 64; 1 = wait for each answer before the next).
    #[arg(long, default_value_t = 4)]
    pub(crate) pipeline: usize,
    /// Publishes of one account allowed in flight beyond the first (0 to 32):
    /// 0 publishes to an account only once every device has its previous
    /// publish, so each publish is its own notify; more lets publishes
    /// reach a device whose notify is still queued, where the node merges
    /// them into one notify (docs/PROTOCOL.md §6).
    #[arg(long, default_value_t = 32)]
    pub(crate) ahead: u64,
    /// Bytes of the published bitmask (1 to 32): the payload size. Each
    /// publish sets one store of them, an account's k-th store
    /// (k − 1) mod (8 × bytes), and the devices check that the bitmasks
    /// they get cover what was published (`wrong`).
    #[arg(long, default_value_t = 1)]
    pub(crate) bitmask_bytes: usize,
    /// Heartbeat period of each device.
    #[arg(long, default_value = "60s", value_parser = parse_secs)]
    pub(crate) heartbeat: u64,
    /// Connects per second during the connect phase.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) connect_rate: u64,
    /// Longest wait after the measured window for late deliveries and
    /// retransmissions; it ends as soon as every accepted publish reached
    /// every device of its account. The default covers the node's whole
    /// notify retransmission schedule (1 + 2 + 4 + 8 + 16 s).
    #[arg(long, default_value = "31s", value_parser = parse_secs)]
    pub(crate) drain: u64,
}

/// `churn`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct ChurnArgs {
    /// Disconnect + reconnect cycles per second.
    #[arg(long, default_value_t = 1000)]
    pub(crate) rate: u64,
    /// NAT rebindings per second (a device moves to another socket, i.e. source port).
    #[arg(long, default_value_t = 1000)]
    pub(crate) rebind_rate: u64,
    /// Connects per second during the connect phase.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) connect_rate: u64,
}

/// `reflector`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct ReflectorArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:15098")]
    pub(crate) listen: std::net::SocketAddr,
    /// Pin the reflector to this CPU.
    #[arg(long)]
    pub(crate) cpu: Option<usize>,
}

/// `raw-fanout`.
#[derive(Args, Debug, Clone, serde::Serialize)]
pub(crate) struct RawFanoutArgs {
    /// Pin the sender to this CPU.
    #[arg(long)]
    pub(crate) sender_cpu: Option<usize>,
    /// The reliable sender: one notify in flight per device, the next only
    /// once the device acknowledged (the rate is acknowledgements/s).
    #[arg(long)]
    pub(crate) reliable: bool,
}

fn parse_secs(text: &str) -> Result<u64, String> {
    mpp::time::parse_duration_secs(text)
}

impl Common {
    /// The first (or only) --node.
    pub(crate) fn first_node(&self) -> std::net::SocketAddr {
        self.node[0]
    }

    /// The control API of each --node: --control, or http:// and the
    /// node's address.
    pub(crate) fn controls(&self) -> Vec<String> {
        if self.control.is_empty() {
            self.node.iter().map(|n| format!("http://{n}")).collect()
        } else {
            self.control.clone()
        }
    }

    /// The CPUs of `--cpus`, or `None` when workers stay unpinned (no
    /// flag, or an empty list).
    pub(crate) fn worker_cpus(&self) -> Option<&[usize]> {
        self.cpus
            .as_ref()
            .map(|l| l.0.as_slice())
            .filter(|l| !l.is_empty())
    }

    /// The CPU of `--baseline-cpu`, or `None` (no flag, or empty).
    pub(crate) fn baseline_cpu(&self) -> Option<usize> {
        self.baseline_cpu
            .as_ref()
            .and_then(|l| l.0.first().copied())
    }
}

/// A CPU list in the library's syntax (`mpp::config::CpuList`: `0,2-5`,
/// empty = no pinning here), each CPU one a CPU set can name.
fn parse_cpus(text: &str) -> Result<CpuList, String> {
    let list: CpuList = text.parse()?;
    if let Some(&cpu) = list.0.iter().find(|&&c| c >= sys::MAX_CPUS) {
        return Err(format!(
            "invalid CPU list {text:?}: CPU {cpu} is beyond the {} a CPU set holds",
            sys::MAX_CPUS
        ));
    }
    Ok(list)
}

/// One CPU, or none for an empty value.
fn parse_one_cpu(text: &str) -> Result<CpuList, String> {
    let list = parse_cpus(text)?;
    if list.0.len() > 1 {
        return Err(format!("{text:?} names {} CPUs: give one", list.0.len()));
    }
    Ok(list)
}

/// `--cpus` in the JSON report: the list, or null when nothing is pinned.
fn cpus_json<S: serde::Serializer>(cpus: &Option<CpuList>, s: S) -> Result<S::Ok, S::Error> {
    let list = cpus.as_ref().map(|l| &l.0).filter(|l| !l.is_empty());
    serde::Serialize::serialize(&list, s)
}

/// `--baseline-cpu` in the JSON report: the CPU, or null.
fn one_cpu_json<S: serde::Serializer>(cpu: &Option<CpuList>, s: S) -> Result<S::Ok, S::Error> {
    let cpu = cpu.as_ref().and_then(|l| l.0.first());
    serde::Serialize::serialize(&cpu, s)
}

/// Set by the first SIGINT or SIGTERM (signal-hook: the handler only
/// stores to the atomic).
static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Whether the run was interrupted: every phase ends at once, and the
/// reports cover what was measured.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED
        .get()
        .is_some_and(|flag| flag.load(Ordering::Relaxed))
}

/// The exit status of an interrupted run (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

/// SIGINT and SIGTERM set the flag; the same signal again exits at once.
fn handle_interruptions() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(
            signal,
            i32::from(EXIT_INTERRUPTED),
            Arc::clone(flag),
        )?;
        signal_hook::flag::register(signal, Arc::clone(flag))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.common.node_pid = cli.common.node_pids.first().copied();
    if let Err(e) = handle_interruptions() {
        eprintln!("mpp-loadgen: cannot handle signals: {e:#}");
        return ExitCode::FAILURE;
    }
    match run::run(&cli) {
        Ok(()) if interrupted() => {
            eprintln!("mpp-loadgen: interrupted: the reports cover what was measured until then");
            ExitCode::from(EXIT_INTERRUPTED)
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mpp-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(args: &[&str]) -> Result<Common, clap::Error> {
        let mut all = vec!["mpp-loadgen"];
        all.extend_from_slice(args);
        all.push("heartbeat");
        Cli::try_parse_from(all).map(|c| c.common)
    }

    #[test]
    fn cpu_flags_use_the_library_lists_and_empty_pins_nothing() {
        let c = common(&["--cpus", "0,2-3", "--baseline-cpu", "1"]).unwrap();
        assert_eq!(c.worker_cpus(), Some(&[0, 2, 3][..]));
        assert_eq!(c.baseline_cpu(), Some(1));
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j["cpus"], serde_json::json!([0, 2, 3]));
        assert_eq!(j["baseline_cpu"], 1);
        for empty in [
            common(&["--cpus", "", "--baseline-cpu", ""]).unwrap(),
            common(&[]).unwrap(),
        ] {
            assert_eq!(empty.worker_cpus(), None);
            assert_eq!(empty.baseline_cpu(), None);
            let j = serde_json::to_value(&empty).unwrap();
            assert!(j["cpus"].is_null() && j["baseline_cpu"].is_null(), "{j}");
        }
        for bad in [
            &["--cpus", "x"][..],
            &["--cpus", "3-1"],
            &["--cpus", "5000"],
            &["--baseline-cpu", "0,1"],
        ] {
            assert!(common(bad).is_err(), "{bad:?}");
        }
    }
}
