//! `mpp`: the Mesh Presence Protocol client tool.
//!
//! It subscribes to a node and prints what arrives (`subscribe`), asks for the
//! address the node sees (`endpoint`), publishes (`notify`), and converts
//! single messages between their two forms (docs/PROTOCOL.md §1): the JSON-B wire
//! bytes and the JSON text form people read and type. Each subcommand is one
//! variant of [`Command`] with its own argument struct and `run` method.
//!
//! Errors are one line on stderr, `mpp: <reason>`. Invalid input exits with
//! status 2, like clap's own usage errors; any other failure (such as stdout
//! being closed) with status 1. Nothing here panics on user input.

use std::fmt;
use std::io::{self, Read, Write};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, CommandFactory, Parser, Subcommand};
use mpp::codec::Message;

mod http;
mod live;
mod resolve;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for input that is not valid (the same as clap's usage errors).
const EXIT_INVALID_INPUT: u8 = 2;
/// Exit status for every other failure.
const EXIT_FAILURE: u8 = 1;

/// The argument that stands for standard input.
const STDIN_ARG: &str = "-";

const EXAMPLES: &str = "\
Examples:
  # JSON-B (hex) to JSON text
  mpp decode 7bb41150726573656e63654865617274626561747bb40653657269616ca005b40b41636b6e6f776c65646765a0037d7d
  # JSON text to JSON-B (hex)
  mpp encode '{\"PresenceHeartbeat\":{\"Serial\":5,\"Acknowledge\":3}}'
  # raw bytes from a file or a capture
  mpp decode - < heartbeat.bin

Exit status: 0 on success, 2 on invalid input or usage, 1 on any other failure.";

const DECODE_EXAMPLES: &str = "\
Examples:
  mpp decode 7bb41150726573656e63654865617274626561747bb40653657269616ca005b40b41636b6e6f776c65646765a0037d7d
  mpp decode '0x 7b b4 11 50726573656e6365 4865617274626561747b b4 06 53657269616c a0 05 7d 7d'
  mpp decode --pretty - < notify.bin
  mpp encode '{\"PresenceHeartbeat\":{\"Serial\":1}}' | xxd -r -p | mpp decode -";

const ENCODE_EXAMPLES: &str = "\
Examples:
  mpp encode '{\"PresenceHeartbeat\":{\"Serial\":5,\"Acknowledge\":3}}'
  mpp encode - < tests/vectors/notify.json
  mpp encode '{\"PresenceStatus\":{\"Bitmask\":\"BQ\",\"EndPoint\":{\"IpAddress\":\"fwAAAQ\",\"Port\":15099}}}'";

const SUBSCRIBE_EXAMPLES: &str = "\
Examples:
  mpp subscribe --credential phone.json
  mpp subscribe --credential phone.json --node 127.0.0.1:15099 --duration 60s

Output, one JSON object per line:
  {\"event\":\"connected\",\"endpoint\":\"127.0.0.1:40000\"}
  {\"event\":\"notify\",\"serial\":1,\"bitmask\":\"05\"}
  {\"event\":\"disconnected\",\"reason\":\"requested\",...}";

const RESOLVE_EXAMPLES: &str = "\
Examples:
  mpp resolve --credential phone.json example.com
  mpp resolve --credential phone.json example.com TXT --json
  mpp resolve --credential phone.json --transport http --web http://127.0.0.1:15099 example.com AAAA

Exit status: 0 with the answer (an NXDOMAIN prints nothing, as dig +short),
2 for a bad name or type, 1 when the resolve failed (the node's Status:
502 no upstream or it failed, 504 upstream timeout, 425 address not yet
validated, 429 too many resolves).";

const NOTIFY_EXAMPLES: &str = "\
Examples:
  mpp notify --account alice@example.com --bitmask 01
  mpp notify --account alice@example.com --bitmask 0500 --control http://127.0.0.1:15099 --data-dir ./mppd-data";

/// Mesh Presence Protocol client tool.
#[derive(Parser)]
#[command(
    name = "mpp",
    version,
    about = "Mesh Presence Protocol client tool",
    long_about = "Mesh Presence Protocol client tool.\n\n\
        Subscribes to a node and prints notifications, asks for the public \
        endpoint, publishes through the control plane, and converts protocol \
        messages between their JSON-B wire form (shown as hex) and their JSON \
        text form, e.g. {\"PresenceHeartbeat\":{\"Serial\":5,\"Acknowledge\":3}}. \
        Binary fields are unpadded base64url in the text form and DateTimes are \
        yyyy-MM-ddTHH:mm:ssZ (docs/PROTOCOL.md §1).",
    after_help = EXAMPLES
)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands; each variant's arguments know how to run it.
#[derive(Subcommand)]
enum Command {
    /// Print the JSON text form of a JSON-B message
    #[command(
        long_about = "Print the JSON text form of one JSON-B message, on one line.\n\n\
            HEX may contain whitespace anywhere and start with 0x. With `-`, the raw \
            message bytes (not hex) are read from standard input.",
        after_help = DECODE_EXAMPLES
    )]
    Decode(DecodeArgs),
    /// Print the JSON-B form of a message given as JSON text, as hex
    #[command(
        long_about = "Print the JSON-B wire form of one message given as JSON text, as \
            lowercase hex on one line.\n\n\
            With `-`, the JSON text is read from standard input. Unknown message \
            types and unknown fields are refused.",
        after_help = ENCODE_EXAMPLES
    )]
    Encode(EncodeArgs),
    /// Connect to a node and print one JSON line per event until interrupted
    #[command(after_help = SUBSCRIBE_EXAMPLES)]
    Subscribe(live::SubscribeArgs),
    /// Print the address (IP:port) the node sees this device at
    Endpoint(live::EndpointArgs),
    /// Publish a notification to every device of an account (control plane)
    #[command(after_help = NOTIFY_EXAMPLES)]
    Notify(live::NotifyArgs),
    /// Look a name up through the node's DNS proxy; prints like dig +short
    #[command(after_help = RESOLVE_EXAMPLES)]
    Resolve(resolve::ResolveArgs),
    /// Write the man pages (mpp.1 and one per subcommand) into DIR
    Manpage {
        /// Where to write them (created if missing).
        dir: std::path::PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

impl Command {
    fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Command::Decode(args) => args.run(out),
            Command::Encode(args) => args.run(out),
            Command::Subscribe(args) => args.run(out),
            Command::Endpoint(args) => args.run(out),
            Command::Notify(args) => args.run(out),
            Command::Resolve(args) => args.run(out),
            Command::Manpage { dir } => std::fs::create_dir_all(&dir)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir))
                .with_context(|| format!("cannot write man pages into {}", dir.display())),
            Command::Completions { shell } => {
                clap_complete::generate(shell, &mut Cli::command(), "mpp", out);
                Ok(())
            }
        }
    }
}

/// Arguments of `mpp decode`.
#[derive(Args)]
struct DecodeArgs {
    /// The message as hex, or `-` to read its raw bytes from stdin
    #[arg(value_name = "HEX|-")]
    input: String,

    /// Indent the JSON over several lines, as in tests/vectors/*.json
    #[arg(long)]
    pretty: bool,
}

impl DecodeArgs {
    fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let bytes = if self.input == STDIN_ARG {
            let mut bytes = Vec::new();
            io::stdin()
                .lock()
                .read_to_end(&mut bytes)
                .context("cannot read standard input")?;
            bytes
        } else {
            parse_hex(&self.input)?
        };
        // Liberal: a tool reads whatever a node or the reference wrote.
        let message = Message::decode_liberal(&bytes)
            .map_err(|e| InvalidInput(format!("cannot decode message: {e}")))?;
        let text = if self.pretty {
            message.to_json_pretty()
        } else {
            message.to_json_string()
        };
        writeln!(out, "{text}").context("cannot write standard output")
    }
}

/// Arguments of `mpp encode`.
#[derive(Args)]
struct EncodeArgs {
    /// The message as JSON text, or `-` to read it from stdin
    #[arg(value_name = "JSON|-")]
    input: String,
}

impl EncodeArgs {
    fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let text = if self.input == STDIN_ARG {
            let mut bytes = Vec::new();
            io::stdin()
                .lock()
                .read_to_end(&mut bytes)
                .context("cannot read standard input")?;
            String::from_utf8(bytes)
                .map_err(|_| InvalidInput("standard input is not UTF-8 text".into()))?
        } else {
            self.input
        };
        let message = Message::from_json_str(&text)
            .map_err(|e| InvalidInput(format!("cannot encode message: {e}")))?;
        writeln!(out, "{}", hex::encode(message.to_vec())).context("cannot write standard output")
    }
}

/// Hex digits with any whitespace in or around them and an optional `0x` prefix.
fn parse_hex(text: &str) -> Result<Vec<u8>, InvalidInput> {
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let digits = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
        .unwrap_or(&digits);
    if digits.is_empty() {
        return Err(InvalidInput("no hex digits given".into()));
    }
    hex::decode(digits).map_err(|e| InvalidInput(format!("invalid hex: {e}")))
}

/// The user's input is not valid: exit with [`EXIT_INVALID_INPUT`].
#[derive(Debug)]
pub(crate) struct InvalidInput(pub(crate) String);

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidInput {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    let result = cli
        .command
        .run(&mut stdout.lock())
        .and_then(|()| io::stdout().flush().context("cannot write standard output"));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, whatever the error's own text holds.
            let reason = format!("{e:#}").replace(['\n', '\r'], " ");
            eprintln!("mpp: {reason}");
            if e.is::<InvalidInput>() {
                ExitCode::from(EXIT_INVALID_INPUT)
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}
