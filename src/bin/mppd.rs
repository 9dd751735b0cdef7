//! `mppd`: the Mesh Presence Protocol node.
//!
//! `mppd` with no arguments runs a node on its embedded defaults (UDP and
//! HTTP on port 15099, data in `./mppd-data`). `mppd credential issue` prints
//! a device credential offline from the data directory.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mpp::config::{IoChoice, LogFormat, NodeConfig};

const EXAMPLES: &str = "\
Examples:
  mppd                                   # run on the defaults (UDP and HTTP on 15099)
  mppd --threads 2 --cpus 0,1 --io uring # two shards pinned to CPUs 0 and 1
  mppd --config /etc/mppd.toml           # settings from a file (MPPD_* env vars override it)
  mppd credential issue --account alice@example.com --device phone --ttl 30d";

/// The Mesh Presence Protocol node.
#[derive(Parser, Debug)]
#[command(name = "mppd", version, about = "The Mesh Presence Protocol node", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node (the default).
    Run(RunArgs),
    /// Credentials for devices.
    #[command(subcommand)]
    Credential(CredentialCommand),
}

#[derive(Subcommand, Debug)]
enum CredentialCommand {
    /// Print a new credential (JSON) for a device, from the data directory's master key.
    Issue(IssueArgs),
}

#[derive(Args, Debug)]
struct IssueArgs {
    /// The Mesh account.
    #[arg(long)]
    account: String,
    /// The device's name within the account.
    #[arg(long)]
    device: String,
    /// Lifetime, e.g. 90s, 12h, 30d.
    #[arg(long, default_value = "30d", value_parser = parse_ttl)]
    ttl: u64,
    /// Data directory holding master.key.
    #[arg(long, default_value = "./mppd-data")]
    data_dir: PathBuf,
    /// host:port the device should use (repeatable); default 127.0.0.1:15099.
    #[arg(long = "endpoint")]
    endpoints: Vec<String>,
}

#[derive(Args, Debug, Default)]
struct RunArgs {
    /// TOML config file (flags and MPPD_* env vars override it).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// UDP address for devices [default: 0.0.0.0:15099]; port 0 picks a free port.
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// HTTP control address [default: 127.0.0.1:15099]; port 0 picks a free port.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Data directory (master.key, admin.token) [default: ./mppd-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shards (threads) [default: one per core].
    #[arg(long)]
    threads: Option<usize>,
    /// CPUs to pin shard i to, e.g. 0,2-5 (the i-th listed).
    #[arg(long)]
    cpus: Option<String>,
    /// Do not pin shard threads.
    #[arg(long)]
    no_pin: bool,
    /// I/O backend: uring, mmsg or auto [default: auto].
    #[arg(long)]
    io: Option<IoChoice>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    log_format: Option<LogFormat>,
    /// Log filter, e.g. info, debug, mpp=trace [default: info].
    #[arg(long)]
    log_level: Option<String>,
    /// Most connections the node holds [default: 10000000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Upstream DNS server for the resolve proxy, e.g. 127.0.0.1:53.
    #[arg(long)]
    dns_upstream: Option<SocketAddr>,
    /// STUN answers per second per source address, 0 = unlimited [default: 100].
    #[arg(long)]
    stun_rate: Option<u32>,
}

fn parse_ttl(text: &str) -> Result<u64, String> {
    let secs = mpp::time::parse_duration_secs(text)?;
    if secs == 0 {
        return Err("the ttl must be positive".into());
    }
    Ok(secs)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Credential(CredentialCommand::Issue(args))) => issue(args),
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn issue(args: IssueArgs) -> ExitCode {
    let result = (|| -> Result<String, String> {
        if !args.data_dir.join(mpp::server::MASTER_KEY_FILE).exists() {
            return Err(format!(
                "no master key in {} (start mppd once with --data-dir {} to create it)",
                args.data_dir.display(),
                args.data_dir.display()
            ));
        }
        let data = mpp::server::open_data_dir(&args.data_dir)?;
        let master = mpp::packet::MasterKey::new(data.master);
        let now = mpp::time::UnixMillis::from_system_clock().seconds();
        let expires =
            mpp::time::UnixSeconds(now.0.saturating_add(args.ttl.min(i64::MAX as u64) as i64));
        let endpoints = if args.endpoints.is_empty() {
            vec!["127.0.0.1:15099".to_string()]
        } else {
            args.endpoints
        };
        let cred = mpp::packet::Credential::issue(
            &master,
            &args.account,
            &args.device,
            expires,
            endpoints,
            &mut rand::rngs::OsRng,
        )
        .map_err(|e| e.to_string())?;
        Ok(cred.to_json())
    })();
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mppd: {e}");
            ExitCode::from(2)
        }
    }
}

fn build_config(args: RunArgs) -> Result<NodeConfig, String> {
    let mut config = match args
        .config
        .clone()
        .or_else(|| std::env::var_os("MPPD_CONFIG").map(PathBuf::from))
    {
        Some(path) => NodeConfig::from_file(&path)?,
        None => NodeConfig::default(),
    };
    config.apply_env(std::env::vars())?;
    let RunArgs {
        udp,
        http,
        data_dir,
        threads,
        cpus,
        no_pin,
        io,
        log_format,
        log_level,
        max_connections,
        dns_upstream,
        stun_rate,
        config: _,
    } = args;
    if let Some(v) = udp {
        config.udp = v;
    }
    if let Some(v) = http {
        config.http = v;
    }
    if let Some(v) = data_dir {
        config.data_dir = v;
    }
    if let Some(v) = threads {
        config.threads = v;
    }
    if let Some(v) = cpus {
        config.cpus = v;
    }
    if no_pin {
        config.pin = false;
    }
    if let Some(v) = io {
        config.io = v;
    }
    if let Some(v) = log_format {
        config.log_format = v;
    }
    if let Some(v) = log_level {
        config.log_level = v;
    }
    if let Some(v) = max_connections {
        config.max_connections = v;
    }
    if let Some(v) = dns_upstream {
        config.dns_upstream = Some(v);
    }
    if let Some(v) = stun_rate {
        config.stun_rate_per_sec = v;
    }
    config.validate()?;
    Ok(config)
}

fn init_logging(config: &NodeConfig) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| format!("invalid log level {:?}: {e}", config.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))
}

fn run(args: RunArgs) -> ExitCode {
    let config = match build_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mppd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = init_logging(&config) {
        eprintln!("mppd: {e}");
        return ExitCode::from(2);
    }
    let node = match mpp::server::start(&config, true) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("mppd: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "mppd: listening udp={} http={} shards={} io={} data-dir={}",
        node.udp,
        node.http,
        node.shards,
        node.backend.name(),
        config.data_dir.display()
    );
    println!(
        "mppd: issue a credential with: mppd credential issue --data-dir {} --account alice@example.com --device phone --endpoint {}",
        config.data_dir.display(),
        mpp::server::public_endpoints(&config, node.udp).join(" --endpoint ")
    );
    match node.wait() {
        Ok(()) => {
            println!("mppd: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mppd: {e}");
            ExitCode::FAILURE
        }
    }
}
