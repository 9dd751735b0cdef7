//! `mppd`: the Mesh Presence Protocol node.
//!
//! `mppd` with no arguments runs a node on its embedded defaults (UDP and
//! HTTP on port 15099, data in `./mppd-data`). `mppd credential issue` prints
//! a device credential offline from the data directory.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use mpp::config::{ConfigFlags, LogFormat, NodeConfig};

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

fn init_logging(config: &NodeConfig) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .map_err(|e| anyhow::anyhow!("invalid log_level {:?}: {e}", config.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

fn run(flags: ConfigFlags) -> ExitCode {
    let config = match flags.layers().and_then(|l| l.resolve()) {
        Ok(resolved) => resolved.config,
        Err(e) => return usage_error(e),
    };
    if let Err(e) = init_logging(&config) {
        return usage_error(e);
    }
    let node = match mpp::node::start(&config, true) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("mppd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let web = node.web.map(|w| format!(" web={w}")).unwrap_or_default();
    println!(
        "mppd: listening udp={} http={}{web} shards={} io={} data-dir={}",
        node.udp,
        node.http,
        node.shards,
        node.backend.name(),
        config.data_dir.display()
    );
    println!(
        "mppd: issue a credential with: mppd credential issue --data-dir {} --account alice@example.com --device phone --endpoint {}",
        config.data_dir.display(),
        mpp::node::public_endpoints(&config, node.udp).join(" --endpoint ")
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
