//! `mppd`: the Mesh Presence Protocol node.
//!
//! `mppd` with no arguments runs a node on its embedded defaults (UDP and
//! HTTP on port 15099, data in `./mppd-data`). `mppd credential issue` prints
//! a device credential offline from the data directory; `mppd manpage` and
//! `mppd completions` write its own documentation from these definitions.
//!
//! Running, it is a well-behaved service: logs on stderr (colour only on a
//! terminal, or JSON), `READY=1`/`STOPPING=1` to systemd when started by it,
//! SIGHUP reloads what can change live, SIGTERM stops it in order. It must
//! not die or hang because its stdout or stderr went away: every write of
//! its own ignores a closed pipe, and so does the log writer.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use clap::{Args, CommandFactory, Parser, Subcommand};
use mpp::config::{ConfigFlags, LogFormat, NodeConfig};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{reload, EnvFilter, Registry};

const EXAMPLES: &str = "\
Examples:
  mppd                                   # run on the defaults (UDP and HTTP on 15099)
  mppd --threads 2 --cpus 0,1 --io uring # two shards pinned to CPUs 0 and 1
  mppd --config /etc/mppd/mppd.toml      # settings from a file (MPPD_* variables and flags override it)
  mppd config show --threads 4           # the effective settings and where each comes from
  mppd credential issue --account alice@example.com --device phone --ttl 30d

Every setting can come from the file (its key), an MPPD_* variable or a flag;
precedence: defaults < file < MPPD_* < flags.";

/// The Mesh Presence Protocol node.
#[derive(Parser, Debug)]
#[command(name = "mppd", version, about = "The Mesh Presence Protocol node", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: ConfigFlags,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node (the default).
    Run(ConfigFlags),
    /// Credentials for devices.
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The master key: rotate it, or show the rotation in force.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Write the man pages (mppd.1 and one per subcommand) into DIR.
    Manpage {
        /// Where to write them (created if missing).
        dir: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Make a new master key current; credentials of the old one keep
    /// verifying for the grace period. A running node picks it up within
    /// seconds; new credentials use the new key.
    Rotate {
        /// How long credentials of the old key still verify, e.g. 7d, 12h.
        #[arg(long, default_value = "7d", value_parser = mpp::time::parse_duration_secs)]
        grace: u64,
        /// Data directory holding master.key.
        #[arg(long, default_value = "./mppd-data")]
        data_dir: PathBuf,
    },
    /// Print the key parity and the end of a grace period, as JSON.
    Status {
        /// Data directory holding master.key.
        #[arg(long, default_value = "./mppd-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CredentialCommand {
    /// Print a new credential (JSON) for a device, from the data directory's master key.
    Issue(IssueArgs),
    /// Revoke every credential issued so far for a device (or, without
    /// --device, for every device of the account). A running node drops the
    /// account's connections within seconds; credentials issued afterwards work.
    Revoke {
        /// The Mesh account.
        #[arg(long)]
        account: String,
        /// The device; absent: every device of the account.
        #[arg(long)]
        device: Option<String>,
        /// Data directory holding master.key.
        #[arg(long, default_value = "./mppd-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a TOML configuration file: prints "FILE: ok", or the error and exits 2.
    Check {
        /// The file.
        file: PathBuf,
    },
    /// Print the effective configuration (defaults, file, MPPD_* variables and
    /// flags applied) as TOML, with where each value came from.
    Show(ConfigFlags),
    /// Print a configuration file with every setting at its default (mppd.example.toml).
    Example,
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
        Some(Command::Credential(CredentialCommand::Revoke {
            account,
            device,
            data_dir,
        })) => revoke(&data_dir, &account, device.as_deref()),
        Some(Command::Key(command)) => key(command),
        Some(Command::Config(command)) => config(command),
        Some(Command::Manpage { dir }) => manpage(&dir),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut Cli::command(), "mppd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(Command::Run(flags)) => run(flags),
        None => run(cli.run),
    }
}

/// Prints `mppd: <error>` and returns the exit status for bad input (2).
fn usage_error(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("mppd: {e}");
    ExitCode::from(2)
}

fn config(command: ConfigCommand) -> ExitCode {
    match command {
        ConfigCommand::Check { file } => match NodeConfig::from_file(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(e),
        },
        ConfigCommand::Show(flags) => match flags.layers().and_then(|l| l.resolve()) {
            Ok(resolved) => {
                print!("{}", resolved.config.to_toml_text(Some(&resolved.sources)));
                ExitCode::SUCCESS
            }
            Err(e) => usage_error(e),
        },
        ConfigCommand::Example => {
            print!("{}", mpp::config::example_file());
            ExitCode::SUCCESS
        }
    }
}

fn issue(args: IssueArgs) -> ExitCode {
    let result = (|| -> anyhow::Result<String> {
        mpp::node::data_dir::open_existing_data_dir(&args.data_dir)?;
        let keys = mpp::node::keyring::load_keys(&args.data_dir)?;
        let generation = mpp::node::keyring::load_revocations(&args.data_dir)?
            .generation(&args.account, &args.device);
        let now = mpp::time::UnixMillis::from_system_clock().seconds();
        let expires =
            mpp::time::UnixSeconds(now.0.saturating_add(args.ttl.min(i64::MAX as u64) as i64));
        let endpoints = if args.endpoints.is_empty() {
            vec!["127.0.0.1:15099".to_string()]
        } else {
            args.endpoints
        };
        let cred = mpp::packet::Credential::issue_at_generation(
            &keys.current,
            generation,
            &args.account,
            &args.device,
            expires,
            endpoints,
            &mut rand::rngs::OsRng,
        )?;
        Ok(cred.to_json())
    })();
    match result {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(e),
    }
}

fn revoke(data_dir: &std::path::Path, account: &str, device: Option<&str>) -> ExitCode {
    let result = (|| -> anyhow::Result<u32> {
        mpp::node::data_dir::open_existing_data_dir(data_dir)?;
        if account.is_empty() || device.is_some_and(str::is_empty) {
            anyhow::bail!("the account and the device must not be empty");
        }
        Ok(mpp::node::keyring::revoke(data_dir, account, device)?)
    })();
    match result {
        Ok(generation) => {
            let line = serde_json::json!({
                "revoked": {"account": account, "device": device},
                "generation": generation,
            });
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(e),
    }
}

fn key(command: KeyCommand) -> ExitCode {
    let result = (|| -> anyhow::Result<serde_json::Value> {
        let keys = match &command {
            KeyCommand::Rotate { grace, data_dir } => {
                mpp::node::data_dir::open_existing_data_dir(data_dir)?;
                let now = mpp::time::UnixMillis::from_system_clock().seconds();
                mpp::node::keyring::rotate(data_dir, now, *grace, &mut rand::rngs::OsRng)?
            }
            KeyCommand::Status { data_dir } => {
                mpp::node::data_dir::open_existing_data_dir(data_dir)?;
                mpp::node::keyring::load_keys(data_dir)?
            }
        };
        let now = mpp::time::UnixMillis::from_system_clock();
        let until = mpp::node::keyring::grace_end(&keys, now);
        Ok(serde_json::json!({
            "parity": keys.parity,
            "previous_key_until": until.map(|u| u.seconds().to_string()),
        }))
    })();
    match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => usage_error(e),
    }
}

/// Writes the man pages of `mppd` and its subcommands into `dir`.
fn manpage(dir: &std::path::Path) -> ExitCode {
    let written =
        std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(Cli::command(), dir));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mppd: cannot write man pages into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// A line on stdout; a closed or broken stdout is ignored (the node must
/// run and stop the same whether anyone still reads it).
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line).and_then(|()| out.write_all(b"\n"));
    let _ = out.flush();
}

/// A line on stderr, likewise.
fn complain(line: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(line).and_then(|()| err.write_all(b"\n"));
}

/// Log lines go to stderr through this writer: a failed write (a closed
/// pipe, a full disk) loses the line and nothing else.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::io::stderr().write(buf) {
            Ok(n) => Ok(n),
            // Pretend it was written: the logger must not retry, report or
            // panic (tracing-subscriber prints internal errors with
            // eprintln!, which panics on a closed stderr).
            Err(_) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The log filter in force, changeable by a reload.
type LogHandle = reload::Handle<EnvFilter, Registry>;

/// The filter of `log_level`. The NATS client logs every failed connect
/// attempt at info (several a second while a cluster's server is away); the
/// node logs the outage once itself (src/node/cluster.rs), so the client's
/// lines show at warn unless `log_level` names `async_nats`.
fn log_filter(level: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let filter = EnvFilter::try_new(level)?;
    if level.contains("async_nats") {
        return Ok(filter);
    }
    Ok(filter.add_directive("async_nats=warn".parse()?))
}

/// Sets up logging on stderr: colour only when stderr is a terminal; JSON
/// with the field names README documents (`timestamp`, `level`, `target`,
/// `message`, `threadName`, then the event's own fields).
fn init_logging(config: &NodeConfig) -> anyhow::Result<LogHandle> {
    let filter = log_filter(&config.log_level)
        .map_err(|e| anyhow::anyhow!("invalid log_level {:?}: {e}", config.log_level))?;
    let (filter, handle) = reload::Layer::new(filter);
    let writer = || Stderr;
    let (json, text) = match config.log_format {
        LogFormat::Json => (
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_thread_names(true)
                    .with_writer(writer)
                    .log_internal_errors(false),
            ),
            None,
        ),
        LogFormat::Text => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(writer)
                    .log_internal_errors(false),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(text)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    Ok(handle)
}

/// What a running node may ask of this process: its configuration again
/// (SIGHUP), a new log filter, and telling systemd it stops.
struct MppdOperator {
    flags: ConfigFlags,
    log: LogHandle,
}

impl mpp::node::Operator for MppdOperator {
    fn reload_config(&self) -> Result<NodeConfig, String> {
        self.flags
            .layers()
            .and_then(|l| l.resolve())
            .map(|r| r.config)
            .map_err(|e| e.to_string())
    }

    fn set_log_level(&self, filter: &str) -> Result<(), String> {
        let filter =
            log_filter(filter).map_err(|e| format!("invalid log_level {filter:?}: {e}"))?;
        self.log.reload(filter).map_err(|e| e.to_string())
    }

    fn stopping(&self) {
        // systemd (Type=notify): the stop has begun. Without NOTIFY_SOCKET
        // this does nothing.
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
}

fn run(flags: ConfigFlags) -> ExitCode {
    let config = match flags.layers().and_then(|l| l.resolve()) {
        Ok(resolved) => resolved.config,
        Err(e) => return usage_error(e),
    };
    let log = match init_logging(&config) {
        Ok(handle) => handle,
        Err(e) => return usage_error(e),
    };
    let operator = Arc::new(MppdOperator { flags, log });
    let node = match mpp::node::start_with_operator(&config, true, operator) {
        Ok(node) => node,
        Err(e) => {
            complain(format_args!("mppd: {e}"));
            // A configuration error will not go away by itself: 2, which
            // the systemd unit's RestartPreventExitStatus names.
            return match e {
                mpp::node::StartError::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            };
        }
    };
    let web = node.web.map(|w| format!(" web={w}")).unwrap_or_default();
    say(format_args!(
        "mppd: listening udp={} http={}{web} shards={} io={} data-dir={}",
        node.udp,
        node.http,
        node.shards,
        node.backend.name(),
        config.data_dir.display()
    ));
    say(format_args!(
        "mppd: issue a credential with: mppd credential issue --data-dir {} --account alice@example.com --device phone --endpoint {}",
        config.data_dir.display(),
        mpp::node::public_endpoints(&config, node.udp).join(" --endpoint ")
    ));
    // Every shard is bound and running: tell systemd (Type=notify).
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("listening"),
    ]);
    match node.wait() {
        Ok(()) => {
            say(format_args!("mppd: stopped"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            complain(format_args!("mppd: {e}"));
            ExitCode::FAILURE
        }
    }
}
