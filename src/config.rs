//! The node's settings, each declared once.
//!
//! One line of the [`settings!`] table below is one setting: its name, type,
//! default, a value name for `--help`, an optional check, and its
//! documentation. From that line come its TOML key (`max_connections`), its
//! environment variable (`MPPD_MAX_CONNECTIONS`), its flag
//! (`--max-connections`), its line in `mppd config show` and in
//! `mppd.example.toml`, so the three sources cannot drift apart.
//!
//! Precedence: embedded defaults < the TOML file (`--config`, or
//! `MPPD_CONFIG`) < `MPPD_*` variables < flags. Unknown TOML keys and unknown
//! `MPPD_*` variables are errors, as is any value that does not parse or
//! fails its check: everything is validated before a socket is opened, so a
//! bad setting is one clear line at start-up, never a surprise later.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Which I/O backend the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// io_uring where it works, recvmmsg/sendmmsg otherwise.
    #[default]
    Auto,
    /// io_uring (fails at start if unavailable).
    Uring,
    /// recvmmsg / sendmmsg.
    Mmsg,
}

impl std::str::FromStr for IoChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoChoice::Auto),
            "uring" => Ok(IoChoice::Uring),
            "mmsg" => Ok(IoChoice::Mmsg),
            _ => Err(format!(
                "invalid io backend {s:?}: expected uring, mmsg or auto"
            )),
        }
    }
}

impl fmt::Display for IoChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoChoice::Auto => "auto",
            IoChoice::Uring => "uring",
            IoChoice::Mmsg => "mmsg",
        })
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("invalid log format {s:?}: expected json or text")),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// A list of CPUs such as `0,2-5`; empty means "every CPU".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Ranges longer than this in a CPU list are refused (a typo, not a machine).
const MAX_CPU_RANGE: usize = 4096;

impl std::str::FromStr for CpuList {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("invalid CPU list {text:?}: expected e.g. 0,2-5");
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let a: usize = a.trim().parse().map_err(|_| bad())?;
                    let b: usize = b.trim().parse().map_err(|_| bad())?;
                    if a > b || b - a > MAX_CPU_RANGE {
                        return Err(bad());
                    }
                    out.extend(a..=b);
                }
                None => out.push(part.parse().map_err(|_| bad())?),
            }
        }
        Ok(CpuList(out))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, cpu) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{cpu}")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A setting's type: how it reads from a flag or variable (text), from the
/// TOML file, and how `config show` writes it back.
pub trait SettingValue: Sized {
    /// Parses the text of a flag or an `MPPD_*` variable.
    fn parse_text(text: &str) -> Result<Self, String>;
    /// Reads the value of a TOML key.
    fn from_toml(value: toml::Value) -> Result<Self, String>;
    /// The TOML form (`None`: the setting is unset and its key is left out).
    fn to_toml(&self) -> Option<toml::Value>;
    /// A yes/no setting: its flag may stand alone, and `--no-FLAG` exists.
    const IS_BOOL: bool = false;
    /// A list: its flag may be repeated, the values joined.
    const IS_LIST: bool = false;
}

macro_rules! text_setting {
    ($($t:ty => $to:expr;)*) => {$(
        impl SettingValue for $t {
            fn parse_text(text: &str) -> Result<Self, String> {
                text.trim().parse::<$t>().map_err(|e| e.to_string())
            }
            fn from_toml(value: toml::Value) -> Result<Self, String> {
                <$t>::deserialize(value).map_err(|e| e.to_string())
            }
            fn to_toml(&self) -> Option<toml::Value> {
                #[allow(clippy::redundant_closure_call)]
                Some(($to)(self))
            }
        }
    )*};
}

text_setting! {
    u8 => |v: &u8| toml::Value::Integer(i64::from(*v));
    u32 => |v: &u32| toml::Value::Integer(i64::from(*v));
    u64 => |v: &u64| toml::Value::Integer(i64::try_from(*v).unwrap_or(i64::MAX));
    usize => |v: &usize| toml::Value::Integer(i64::try_from(*v).unwrap_or(i64::MAX));
    String => |v: &String| toml::Value::String(v.clone());
    SocketAddr => |v: &SocketAddr| toml::Value::String(v.to_string());
    IoChoice => |v: &IoChoice| toml::Value::String(v.to_string());
    LogFormat => |v: &LogFormat| toml::Value::String(v.to_string());
    CpuList => |v: &CpuList| toml::Value::String(v.to_string());
}

impl SettingValue for bool {
    fn parse_text(text: &str) -> Result<Self, String> {
        match text.trim() {
            "true" | "yes" | "1" | "on" => Ok(true),
            "false" | "no" | "0" | "off" => Ok(false),
            t => Err(format!("expected true or false, not {t:?}")),
        }
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        bool::deserialize(value).map_err(|e| e.to_string())
    }
    fn to_toml(&self) -> Option<toml::Value> {
        Some(toml::Value::Boolean(*self))
    }
    const IS_BOOL: bool = true;
}

impl SettingValue for PathBuf {
    fn parse_text(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("a path cannot be empty".into());
        }
        Ok(PathBuf::from(text))
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        PathBuf::deserialize(value).map_err(|e| e.to_string())
    }
    fn to_toml(&self) -> Option<toml::Value> {
        Some(toml::Value::String(self.display().to_string()))
    }
}

/// Unset by an empty text (`MPPD_DNS_UPSTREAM=`) or by leaving the TOML key out.
impl SettingValue for Option<SocketAddr> {
    fn parse_text(text: &str) -> Result<Self, String> {
        match text.trim() {
            "" => Ok(None),
            t => SocketAddr::parse_text(t).map(Some),
        }
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        SocketAddr::from_toml(value).map(Some)
    }
    fn to_toml(&self) -> Option<toml::Value> {
        self.as_ref().and_then(SettingValue::to_toml)
    }
}

/// A comma-separated list in a flag or variable, an array in TOML.
impl SettingValue for Vec<String> {
    fn parse_text(text: &str) -> Result<Self, String> {
        Ok(text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }
    fn from_toml(value: toml::Value) -> Result<Self, String> {
        Vec::<String>::deserialize(value).map_err(|e| e.to_string())
    }
    fn to_toml(&self) -> Option<toml::Value> {
        Some(toml::Value::Array(
            self.iter().cloned().map(toml::Value::String).collect(),
        ))
    }
    const IS_LIST: bool = true;
}

/// One setting's names and documentation, as `--help`, `config show` and
/// the tests see it.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The TOML key, e.g. `max_connections`.
    pub key: &'static str,
    /// The value's name in `--help`, e.g. `N`.
    pub value_name: &'static str,
    /// The documentation lines.
    pub doc: &'static [&'static str],
    /// True for a yes/no setting (its flag may stand alone, and `--no-KEY` exists).
    pub is_bool: bool,
    /// True for a list (its flag may be repeated).
    pub is_list: bool,
}

impl Setting {
    /// The environment variable: `MPPD_` and the key in capitals.
    pub fn env(&self) -> String {
        format!("MPPD_{}", self.key.to_ascii_uppercase())
    }

    /// The flag's long name, without dashes: the key with `-` for `_`.
    pub fn flag(&self) -> String {
        self.key.replace('_', "-")
    }

    /// The documentation as one line.
    pub fn help(&self) -> String {
        self.doc
            .iter()
            .map(|l| l.trim())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Declares every setting: the [`NodeConfig`] struct, its defaults, the
/// [`SETTINGS`] table and the by-name accessors the layers use.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $key:ident : $ty:ty = $default:expr, $value_name:literal $(, check $check:expr)?;
    )*) => {
        /// Every setting of a running node (see [`SETTINGS`] for the names).
        #[derive(Debug, Clone, PartialEq)]
        pub struct NodeConfig {
            $( $(#[doc = $doc])* pub $key: $ty, )*
        }

        impl Default for NodeConfig {
            fn default() -> Self {
                NodeConfig { $( $key: $default, )* }
            }
        }

        /// Every setting, in declaration order.
        pub const SETTINGS: &[Setting] = &[
            $( Setting {
                key: stringify!($key),
                value_name: $value_name,
                doc: &[$($doc),*],
                is_bool: <$ty as SettingValue>::IS_BOOL,
                is_list: <$ty as SettingValue>::IS_LIST,
            }, )*
        ];

        impl NodeConfig {
            /// Sets `key` from the text of a flag or variable.
            fn set_text(&mut self, key: &str, text: &str) -> Result<(), String> {
                match key {
                    $( stringify!($key) => self.$key = <$ty as SettingValue>::parse_text(text)?, )*
                    _ => return Err(format!("unknown setting {key:?}")),
                }
                Ok(())
            }

            /// Sets `key` from a TOML value.
            fn set_toml(&mut self, key: &str, value: toml::Value) -> Result<(), String> {
                match key {
                    $( stringify!($key) => self.$key = <$ty as SettingValue>::from_toml(value)?, )*
                    _ => return Err(format!("unknown key {key:?}")),
                }
                Ok(())
            }

            /// The TOML form of `key`'s value (`None`: unset).
            pub fn value_toml(&self, key: &str) -> Option<toml::Value> {
                match key {
                    $( stringify!($key) => SettingValue::to_toml(&self.$key), )*
                    _ => None,
                }
            }

            /// Checks every value against its setting's rule.
            pub fn validate(&self) -> Result<(), ConfigError> {
                $($(
                    #[allow(clippy::redundant_closure_call)]
                    ($check)(&self.$key).map_err(|message| ConfigError::Invalid {
                        key: stringify!($key),
                        message,
                    })?;
                )?)*
                Ok(())
            }
        }
    };
}

fn at_most<T: PartialOrd + fmt::Display + Copy>(max: T) -> impl Fn(&T) -> Result<(), String> {
    move |v| {
        if *v > max {
            Err(format!("must be at most {max}, not {v}"))
        } else {
            Ok(())
        }
    }
}

/// CPUs a CPU set can name (`CPU_SETSIZE`): pinning to one beyond is
/// impossible, whatever the machine.
pub const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

fn cpus_fit_a_cpu_set(cpus: &CpuList) -> Result<(), String> {
    match cpus.0.iter().find(|&&c| c >= MAX_CPUS) {
        Some(cpu) => Err(format!(
            "names CPU {cpu}, beyond the {MAX_CPUS} a CPU set can hold"
        )),
        None => Ok(()),
    }
}

fn within<T: PartialOrd + fmt::Display + Copy>(
    min: T,
    max: T,
) -> impl Fn(&T) -> Result<(), String> {
    move |v| {
        if *v < min || *v > max {
            Err(format!("must be {min}..={max}, not {v}"))
        } else {
            Ok(())
        }
    }
}

settings! {
    /// UDP address devices talk to (MPP and STUN); port 0 picks a free port.
    udp: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 15099)), "ADDR";
    /// HTTP control address (publish, credentials, metrics, web transport);
    /// port 0 picks a free port.
    http: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 15099)), "ADDR";
    /// Public HTTP address for the web transport alone (POST
    /// /.well-known/mmmpresence/); unset = served on the http address.
    web: Option<SocketAddr> = None, "ADDR";
    /// How long an HTTP client may take to send a request head (ms), from
    /// its connection or its first byte; slower connections are closed.
    http_header_timeout_ms: u64 = 5_000, "MS", check within(100, 600_000);
    /// How long an HTTP client may take to send a request body after its
    /// head, and a write to it may stall (ms); then the connection is closed.
    http_body_timeout_ms: u64 = 10_000, "MS", check within(100, 600_000);
    /// How long a kept-alive HTTP connection may wait for its next request (ms).
    http_idle_timeout_ms: u64 = 30_000, "MS", check within(100, 3_600_000);
    /// HTTP connections the control address holds at once; more are closed
    /// as soon as they are accepted.
    http_max_connections: usize = 1024, "N", check within(1, 1 << 20);
    /// HTTP connections the web address holds at once (when web is set);
    /// more are closed as soon as they are accepted.
    web_max_connections: usize = 1024, "N", check within(1, 1 << 20);
    /// Data directory: master.key and admin.token, created on first start.
    data_dir: PathBuf = PathBuf::from("./mppd-data"), "DIR";
    /// Shards (threads); 0 = one per available core.
    threads: usize = 0, "N", check at_most(1024);
    /// CPUs to pin shard i to (the i-th listed), e.g. 0,2-5; empty = all.
    cpus: CpuList = CpuList::default(), "LIST", check cpus_fit_a_cpu_set;
    /// Pin shard threads to CPUs.
    pin: bool = true, "BOOL";
    /// CPUs the control thread (HTTP API, DNS relay, cluster bus) may run
    /// on, e.g. 2-3; empty = the shards' CPUs when they are pinned (a node
    /// given --cpus stays on them), else any.
    control_cpus: CpuList = CpuList::default(), "LIST", check cpus_fit_a_cpu_set;
    /// I/O backend: uring, mmsg or auto (auto: the faster one measured on
    /// this kernel, recvmmsg/sendmmsg; see docs/BENCHMARKS.md).
    io: IoChoice = IoChoice::Auto, "BACKEND";
    /// Log line format: text or json.
    log_format: LogFormat = LogFormat::Text, "FORMAT";
    /// Log filter, e.g. info, debug, info,mpp::node=trace.
    log_level: String = "info".into(), "FILTER";
    /// Connections the node holds at most (split evenly across shards);
    /// connects beyond get PresenceErrorRefused 503.
    max_connections: usize = 10_000_000, "N", check within(1, u32::MAX as usize);
    /// SO_RCVBUF and SO_SNDBUF of each shard socket, in bytes.
    socket_buffer: usize = 8 << 20, "BYTES", check at_most(1 << 30);
    /// Datagrams per receive/send batch.
    batch: usize = 64, "N", check within(1, 1024);
    /// Microseconds a shard keeps polling after its last datagram before it
    /// sleeps; 0 = sleep at once.
    spin_us: u64 = 0, "US", check at_most(100_000);
    /// Start even when the cBPF steering program cannot be attached: the
    /// kernel then spreads datagrams by flow hash and shards forward, once
    /// authenticated, those of other shards' accounts (slower).
    allow_fallback_steering: bool = false, "BOOL";
    /// Upstream DNS server for the resolve proxy; unset = resolves answer 502.
    dns_upstream: Option<SocketAddr> = None, "ADDR";
    /// host:port endpoints written into issued credentials (comma-separated);
    /// empty = derived from udp.
    public_endpoints: Vec<String> = Vec::new(), "LIST";
    /// ConnectionTimeout announced to devices (ms); idle ones are dropped
    /// after twice this.
    connection_timeout_ms: u32 = crate::proto::CONNECTION_TIMEOUT_MS, "MS",
        check within(1_000, 3_600_000);
    /// STUN answers per second per source address; 0 = unlimited (benchmarks only).
    stun_rate: u32 = 100, "N";
    /// STUN burst per source address.
    stun_burst: u32 = 200, "N", check within(1, 1_000_000);
    /// Capacity of each shard's router inbox (messages).
    inbox_capacity: usize = 65_536, "N", check within(1, 1 << 24);
    /// First retransmission delay of an unacknowledged notify (ms), doubled
    /// at each try.
    retransmit_initial_ms: u64 = crate::proto::RETRANSMIT_INITIAL_MS, "MS",
        check within(10, 60_000);
    /// Notify retransmissions before the pending state waits for the next
    /// heartbeat (at most 7: a connection record counts them in 3 bits).
    retransmit_tries: u8 = crate::proto::RETRANSMIT_TRIES, "N", check at_most(crate::table::MAX_TRIES);
    /// Replies a shard keeps queued for sending at most; more are dropped
    /// and counted (the client retries).
    max_queued_replies: usize = 65_536, "N", check within(1, 1 << 24);
    /// DNS queries one shard lets wait for the upstream at once.
    max_pending_resolves: usize = 1024, "N", check within(1, 1 << 20);
    /// How long a DNS query may wait for the upstream (ms) before a 504.
    resolve_timeout_ms: u64 = 5_000, "MS", check within(100, 60_000);
    /// How long (s) an account's catch-up state outlives its last device or
    /// publish: a device away for less is told what changed, one away longer
    /// resynchronises everything.
    catch_up_window_secs: u32 = crate::proto::DEFAULT_CATCH_UP_WINDOW_SECS, "SECS",
        check within(1, 30 * 86_400);
    /// Save the connections and catch-up state on a graceful stop and take
    /// them back on the next start (in data_dir/state/).
    keep_state: bool = true, "BOOL";
    /// NATS servers of the cluster this node joins, nats://HOST:PORT
    /// (comma-separated); empty = a node on its own.
    cluster: Vec<String> = Vec::new(), "URLS", check |v: &Vec<String>| v.iter().try_for_each(|u| crate::node::cluster::check_url(u));
    /// This node's name in the cluster (letters, digits, - and _); empty =
    /// derived from the host name and the UDP port.
    node_id: String = String::new(), "ID", check |v: &String| if v.is_empty() { Ok(()) } else { crate::node::cluster::check_node_id(v) };
    /// Account-affinity partitions of the cluster (the same on every node):
    /// a node hears the partitions where it holds devices.
    cluster_partitions: u32 = 256, "N", check within(1, 65_536);
    /// How long a connect waits for the cluster's catch-up answer (ms)
    /// before the device is told to resynchronise.
    cluster_catch_up_timeout_ms: u64 = 500, "MS", check within(10, 10_000);
    /// How long a publish for other nodes is retried while the bus is away
    /// (ms); then it is counted failed and reported to the publisher.
    cluster_publish_timeout_ms: u64 = 2_000, "MS", check within(100, 600_000);
}

/// The file-path variable, read before every other setting.
pub const CONFIG_ENV: &str = "MPPD_CONFIG";

/// Why the configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML, or a key or value in it is wrong.
    #[error("invalid config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong, on one line.
        message: String,
    },
    /// An `MPPD_*` variable names no setting.
    #[error("unknown environment setting {0} (see mppd --help for the MPPD_* variables)")]
    UnknownEnv(String),
    /// An `MPPD_*` variable's value does not parse.
    #[error("invalid {name}={value:?}: {message}")]
    Env {
        /// The variable.
        name: String,
        /// Its value.
        value: String,
        /// Why it does not parse.
        message: String,
    },
    /// A flag's value does not parse.
    #[error("invalid --{flag} {value:?}: {message}")]
    Flag {
        /// The flag, without dashes.
        flag: String,
        /// Its value.
        value: String,
        /// Why it does not parse.
        message: String,
    },
    /// A value parsed but breaks its setting's rule.
    #[error("{key} {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// The rule it breaks.
        message: String,
    },
}

/// Where a setting's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The embedded default.
    Default,
    /// The configuration file.
    File(PathBuf),
    /// An `MPPD_*` variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(name) => write!(f, "env {name}"),
            Source::Flag(flag) => write!(f, "flag --{flag}"),
        }
    }
}

/// A configuration with the source of each setting (in [`SETTINGS`] order).
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The effective settings.
    pub config: NodeConfig,
    /// Where each came from, in [`SETTINGS`] order.
    pub sources: Vec<Source>,
}

/// The inputs of one configuration: a file, the environment, the flags.
#[derive(Debug, Clone, Default)]
pub struct Layers {
    /// The configuration file's path and text, if one was named.
    pub file: Option<(PathBuf, String)>,
    /// `MPPD_*` variables (others are ignored), as (name, value).
    pub env: Vec<(String, String)>,
    /// Flags given, as (setting key, text), in the order given.
    pub flags: Vec<(String, String)>,
}

impl Layers {
    /// The file named by `path` (or by `MPPD_CONFIG` among `env` when `path`
    /// is `None`), read from disk, with `env` and `flags` over it.
    pub fn read(
        path: Option<&Path>,
        env: Vec<(String, String)>,
        flags: Vec<(String, String)>,
    ) -> Result<Layers, ConfigError> {
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("MPPD_"))
            .collect();
        let path = path.map(Path::to_path_buf).or_else(|| {
            env.iter()
                .find(|(k, v)| k == CONFIG_ENV && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
        });
        let file = match path {
            Some(path) => {
                let text =
                    std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                Some((path, text))
            }
            None => None,
        };
        Ok(Layers { file, env, flags })
    }

    /// Applies the layers over the defaults, in precedence order, and
    /// validates the result.
    pub fn resolve(&self) -> Result<Resolved, ConfigError> {
        let mut config = NodeConfig::default();
        let mut sources = vec![Source::Default; SETTINGS.len()];
        let index = |key: &str| SETTINGS.iter().position(|s| s.key == key);
        if let Some((path, text)) = &self.file {
            let bad = |message: String| ConfigError::File {
                path: path.clone(),
                message: message.replace('\n', " "),
            };
            let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
            for (key, value) in table {
                let Some(i) = index(&key) else {
                    return Err(bad(format!("unknown key {key:?}")));
                };
                config
                    .set_toml(&key, value)
                    .map_err(|e| bad(format!("{key}: {e}")))?;
                sources[i] = Source::File(path.clone());
            }
        }
        for (name, value) in &self.env {
            if name == CONFIG_ENV {
                continue;
            }
            let Some(i) = SETTINGS.iter().position(|s| &s.env() == name) else {
                return Err(ConfigError::UnknownEnv(name.clone()));
            };
            config
                .set_text(SETTINGS[i].key, value)
                .map_err(|message| ConfigError::Env {
                    name: name.clone(),
                    value: value.clone(),
                    message,
                })?;
            sources[i] = Source::Env(name.clone());
        }
        for (key, value) in &self.flags {
            let Some(i) = index(key) else {
                return Err(ConfigError::Flag {
                    flag: key.replace('_', "-"),
                    value: value.clone(),
                    message: "no such setting".into(),
                });
            };
            config
                .set_text(key, value)
                .map_err(|message| ConfigError::Flag {
                    flag: SETTINGS[i].flag(),
                    value: value.clone(),
                    message,
                })?;
            sources[i] = Source::Flag(SETTINGS[i].flag());
        }
        config.validate()?;
        Ok(Resolved { config, sources })
    }
}

impl NodeConfig {
    /// Reads a TOML file over the defaults and validates it (no environment,
    /// no flags): what `mppd config check FILE` runs.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(Layers::read(Some(path), Vec::new(), Vec::new())?
            .resolve()?
            .config)
    }

    /// Shard count: `threads`, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The configuration as TOML, one commented line per setting: its
    /// documentation above it and, when `sources` is given, where its value
    /// came from. An unset optional setting is written commented out.
    pub fn to_toml_text(&self, sources: Option<&[Source]>) -> String {
        let mut out = String::new();
        for (i, s) in SETTINGS.iter().enumerate() {
            for line in s.doc {
                out.push('#');
                out.push_str(line);
                out.push('\n');
            }
            let env = s.env();
            let flag = s.flag();
            match sources.and_then(|all| all.get(i)) {
                Some(source) => out.push_str(&format!("# from: {source}\n")),
                None => out.push_str(&format!("# also: {env}, --{flag}\n")),
            }
            match self.value_toml(s.key) {
                Some(v) => out.push_str(&format!("{} = {v}\n\n", s.key)),
                None => out.push_str(&format!("# {} = (unset)\n\n", s.key)),
            }
        }
        out
    }
}

/// The node's flags on the command line: `--config FILE` and one flag per
/// setting, made from [`SETTINGS`] (so `mppd --help` lists every setting
/// with its default and its variable).
#[derive(Debug, Clone, Default)]
pub struct ConfigFlags {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// The settings given as flags: (key, text), in [`SETTINGS`] order.
    pub values: Vec<(String, String)>,
}

/// How a default looks in `--help`.
fn default_text(key: &str) -> String {
    match NodeConfig::default().value_toml(key) {
        None => "unset".into(),
        Some(toml::Value::String(s)) if s.is_empty() => "\"\"".into(),
        Some(toml::Value::String(s)) => s,
        Some(toml::Value::Array(a)) if a.is_empty() => "none".into(),
        Some(v) => v.to_string(),
    }
}

impl clap::Args for ConfigFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::{Arg, ArgAction};
        let mut cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help(format!(
                    "TOML file of settings (see mppd.example.toml) [env: {CONFIG_ENV}]"
                )),
        );
        for s in SETTINGS {
            let help = format!(
                "{} [default: {}] [env: {}]",
                s.help(),
                default_text(s.key),
                s.env()
            );
            let mut arg = Arg::new(s.key)
                .long(s.flag())
                .value_name(s.value_name)
                .help(help)
                .action(ArgAction::Append);
            if s.is_bool {
                arg = arg.num_args(0..=1).default_missing_value("true");
                cmd = cmd.arg(
                    Arg::new(format!("no_{}", s.key))
                        .long(format!("no-{}", s.flag()))
                        .action(ArgAction::SetTrue)
                        .help(format!("The same as --{} false", s.flag())),
                );
            }
            cmd = cmd.arg(arg);
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ConfigFlags {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut flags = ConfigFlags {
            config: m.get_one::<PathBuf>("config").cloned(),
            values: Vec::new(),
        };
        for s in SETTINGS {
            let given: Vec<String> = m
                .get_many::<String>(s.key)
                .map(|v| v.cloned().collect())
                .unwrap_or_default();
            // `--no-x` and `--x V` both given: the later one wins, as
            // with any flag given twice (`--no-pin --pin true` pins).
            // (A `SetTrue` flag has an index even when absent: its default.)
            let negated = format!("no_{}", s.key);
            let negated_last = if s.is_bool && m.get_flag(&negated) {
                m.indices_of(&negated).and_then(|mut i| i.next_back())
            } else {
                None
            };
            let given_last = m.indices_of(s.key).and_then(|mut i| i.next_back());
            if negated_last.is_some_and(|n| given_last.is_none_or(|g| n > g)) {
                flags.values.push((s.key.into(), "false".into()));
            } else if s.is_list && !given.is_empty() {
                flags.values.push((s.key.into(), given.join(",")));
            } else if let Some(last) = given.last() {
                flags.values.push((s.key.into(), last.clone()));
            }
        }
        Ok(flags)
    }

    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl ConfigFlags {
    /// The layers these flags name: their file (or `MPPD_CONFIG`'s), the
    /// process environment, the flags.
    pub fn layers(&self) -> Result<Layers, ConfigError> {
        Layers::read(
            self.config.as_deref(),
            std::env::vars().collect(),
            self.values.clone(),
        )
    }
}

/// The text of `mppd.example.toml`: every setting with its default.
pub fn example_file() -> String {
    let mut out = String::from(
        "# mppd configuration. Every key is optional; the values below are the defaults.\n\
         # Precedence: defaults < this file < MPPD_* environment variables < flags.\n\
         # Regenerate with: mppd config example > mppd.example.toml\n\n",
    );
    out.push_str(&NodeConfig::default().to_toml_text(None));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        let parse = |t: &str| t.parse::<CpuList>().map(|c| c.0);
        assert_eq!(parse("0,2-5"), Ok(vec![0, 2, 3, 4, 5]));
        assert_eq!(parse(""), Ok(vec![]), "empty = every CPU");
        assert_eq!(parse(" 1 , 3 "), Ok(vec![1, 3]));
        assert!(parse("5-2").is_err());
        assert!(parse("a").is_err());
        assert!(parse("1-").is_err());
        assert!(parse("0-99999").is_err());
        let beyond = NodeConfig {
            cpus: CpuList(vec![0, 5000]),
            ..NodeConfig::default()
        };
        let e = beyond.validate().expect_err("CPU 5000 cannot be pinned to");
        assert!(e.to_string().contains("CPU 5000"), "{e}");
        let last = NodeConfig {
            cpus: CpuList(vec![MAX_CPUS - 1]),
            ..NodeConfig::default()
        };
        assert!(last.validate().is_ok());
        assert_eq!(CpuList(vec![0, 2, 3]).to_string(), "0,2,3");
    }

    /// A value different from the default, valid for the setting, as text.
    fn example(key: &str) -> &'static str {
        match key {
            "udp" => "127.0.0.1:4000",
            "http" => "127.0.0.1:4001",
            "web" => "0.0.0.0:8443",
            "http_header_timeout_ms" => "2000",
            "http_body_timeout_ms" => "3000",
            "http_idle_timeout_ms" => "4000",
            "http_max_connections" => "100",
            "web_max_connections" => "5000",
            "allow_fallback_steering" => "true",
            "data_dir" => "/tmp/mppd-example",
            "threads" => "3",
            "cpus" => "0,2-3",
            "pin" => "false",
            "control_cpus" => "1",
            "io" => "mmsg",
            "log_format" => "json",
            "log_level" => "debug",
            "max_connections" => "1000",
            "socket_buffer" => "1048576",
            "batch" => "32",
            "spin_us" => "50",
            "dns_upstream" => "127.0.0.1:53",
            "public_endpoints" => "a.example:1,b.example:2",
            "connection_timeout_ms" => "30000",
            "stun_rate" => "7",
            "stun_burst" => "9",
            "inbox_capacity" => "100",
            "retransmit_initial_ms" => "500",
            "retransmit_tries" => "3",
            "max_queued_replies" => "10",
            "max_pending_resolves" => "11",
            "resolve_timeout_ms" => "2000",
            "catch_up_window_secs" => "3600",
            "keep_state" => "false",
            "cluster" => "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
            "node_id" => "node-a",
            "cluster_partitions" => "64",
            "cluster_catch_up_timeout_ms" => "250",
            "cluster_publish_timeout_ms" => "5000",
            other => panic!("no example for setting {other}: add one"),
        }
    }

    /// The same value in TOML syntax.
    fn example_toml(key: &str) -> String {
        let mut c = NodeConfig::default();
        c.set_text(key, example(key)).expect("example parses");
        format!("{key} = {}", c.value_toml(key).expect("set"))
    }

    #[test]
    fn every_setting_is_reachable_from_file_env_and_flag() {
        let default = NodeConfig::default();
        for s in SETTINGS {
            let mut expected = NodeConfig::default();
            expected.set_text(s.key, example(s.key)).expect("parses");
            assert_ne!(
                expected.value_toml(s.key),
                default.value_toml(s.key),
                "{}: example equals the default",
                s.key
            );
            let from_file = Layers {
                file: Some(("f.toml".into(), example_toml(s.key))),
                ..Layers::default()
            }
            .resolve()
            .unwrap_or_else(|e| panic!("{}: {e}", s.key));
            let from_env = Layers {
                env: vec![(s.env(), example(s.key).into())],
                ..Layers::default()
            }
            .resolve()
            .unwrap_or_else(|e| panic!("{}: {e}", s.key));
            let from_flag = Layers {
                flags: vec![(s.key.into(), example(s.key).into())],
                ..Layers::default()
            }
            .resolve()
            .unwrap_or_else(|e| panic!("{}: {e}", s.key));
            for (what, r) in [
                ("file", &from_file),
                ("env", &from_env),
                ("flag", &from_flag),
            ] {
                assert_eq!(r.config, expected, "{} from {what}", s.key);
            }
            let i = SETTINGS
                .iter()
                .position(|x| x.key == s.key)
                .expect("listed");
            assert_eq!(from_file.sources[i], Source::File("f.toml".into()));
            assert_eq!(from_env.sources[i], Source::Env(s.env()));
            assert_eq!(from_flag.sources[i], Source::Flag(s.flag()));
        }
    }

    #[test]
    fn every_setting_has_a_working_flag() {
        use clap::{Args, FromArgMatches};
        let cmd = ConfigFlags::augment_args(clap::Command::new("mppd"));
        cmd.clone().debug_assert();
        for s in SETTINGS {
            let flag = format!("--{}", s.flag());
            let m = cmd
                .clone()
                .try_get_matches_from(["mppd", &flag, example(s.key)])
                .unwrap_or_else(|e| panic!("{flag}: {e}"));
            let flags = ConfigFlags::from_arg_matches(&m).expect("flags");
            assert_eq!(
                flags.values,
                vec![(s.key.to_string(), example(s.key).to_string())]
            );
        }
        let m = cmd
            .clone()
            .try_get_matches_from([
                "mppd",
                "--no-pin",
                "--public-endpoints",
                "a:1",
                "--public-endpoints",
                "b:2",
            ])
            .expect("parses");
        let flags = ConfigFlags::from_arg_matches(&m).expect("flags");
        let r = Layers {
            flags: flags.values,
            ..Layers::default()
        }
        .resolve()
        .expect("valid");
        assert!(!r.config.pin);
        assert_eq!(r.config.public_endpoints, ["a:1", "b:2"]);
        let m = cmd.try_get_matches_from(["mppd", "--pin"]).expect("parses");
        assert_eq!(
            ConfigFlags::from_arg_matches(&m).expect("flags").values,
            vec![("pin".to_string(), "true".to_string())]
        );
    }

    #[test]
    fn precedence_is_default_file_env_flag() {
        let layers = |file: bool, env: bool, flag: bool| Layers {
            file: file.then(|| ("f.toml".into(), "threads = 3\n".to_string())),
            env: if env {
                vec![("MPPD_THREADS".into(), "5".into())]
            } else {
                vec![]
            },
            flags: if flag {
                vec![("threads".into(), "7".into())]
            } else {
                vec![]
            },
        };
        let threads = |l: Layers| l.resolve().expect("valid").config.threads;
        assert_eq!(threads(layers(false, false, false)), 0);
        assert_eq!(threads(layers(true, false, false)), 3);
        assert_eq!(threads(layers(true, true, false)), 5);
        assert_eq!(threads(layers(true, true, true)), 7);
        assert_eq!(threads(layers(false, true, true)), 7);
        assert_eq!(threads(layers(true, false, true)), 7);
    }

    #[test]
    fn bad_inputs_are_errors_naming_their_source() {
        let err = |l: Layers| l.resolve().expect_err("refused").to_string();
        let file = |t: &str| Layers {
            file: Some(("f.toml".into(), t.into())),
            ..Layers::default()
        };
        assert!(err(file("thread = 3")).contains("unknown key \"thread\""));
        assert!(err(file("threads = \"x\"")).contains("threads"));
        assert!(err(file("batch = 0")).contains("batch must be 1..=1024"));
        assert!(err(file("[")).contains("f.toml"));
        let env = |k: &str, v: &str| Layers {
            env: vec![(k.into(), v.into())],
            ..Layers::default()
        };
        assert!(err(env("MPPD_BOGUS", "1")).contains("unknown environment setting MPPD_BOGUS"));
        assert!(err(env("MPPD_IO", "epoll")).contains("MPPD_IO"));
        let flag = Layers {
            flags: vec![("spin_us".into(), "1000000".into())],
            ..Layers::default()
        };
        assert!(err(flag).contains("spin_us must be at most 100000"));
        let cluster = Layers {
            flags: vec![("cluster".into(), "nats://a:1,http://b:2".into())],
            ..Layers::default()
        };
        assert!(err(cluster).contains("cluster invalid cluster URL \"http://b:2\""));
    }

    #[test]
    fn shown_configuration_reads_back_as_the_same_configuration() {
        let mut c = NodeConfig::default();
        for s in SETTINGS {
            c.set_text(s.key, example(s.key)).expect("parses");
        }
        let text = c.to_toml_text(None);
        let back = Layers {
            file: Some(("shown.toml".into(), text)),
            ..Layers::default()
        }
        .resolve()
        .expect("shown text is a valid file");
        assert_eq!(back.config, c);
    }

    #[test]
    fn the_example_file_is_the_generated_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/mppd.example.toml");
        let text = std::fs::read_to_string(path).expect("mppd.example.toml");
        assert_eq!(
            text,
            example_file(),
            "mppd.example.toml is out of date: regenerate it with `mppd config example > mppd.example.toml`"
        );
    }

    #[test]
    fn readme_counts_every_setting() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let text = std::fs::read_to_string(path).expect("README.md");
        let said = format!(
            "`mppd --help` lists all {} with their defaults",
            SETTINGS.len()
        );
        assert!(text.contains(&said), "README.md should say: {said}");
    }
}
