//! The node's settings: embedded defaults, then a TOML file, then `MPPD_*`
//! environment variables, then command-line flags, each overriding the last.
//!
//! Everything here is validated before a socket is opened, so a bad setting is
//! one clear line at start-up, never a surprise later.

use std::net::SocketAddr;
use std::path::PathBuf;

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

/// Every setting of a running node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// UDP address devices talk to (MPP and STUN).
    pub udp: SocketAddr,
    /// HTTP control address (publish, credentials, metrics, web transport).
    pub http: SocketAddr,
    /// Where `master.key` and `admin.token` live.
    pub data_dir: PathBuf,
    /// Shards (threads); 0 = one per available core.
    pub threads: usize,
    /// CPUs to pin shard i to (the i-th listed), e.g. "0,2-5"; empty = all.
    pub cpus: String,
    /// Pin shard threads to CPUs.
    pub pin: bool,
    /// I/O backend.
    pub io: IoChoice,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `mpp=trace`, ...).
    pub log_level: String,
    /// Connections the node holds at most (split evenly across shards).
    pub max_connections: usize,
    /// SO_RCVBUF / SO_SNDBUF of each shard socket, bytes.
    pub socket_buffer: usize,
    /// Datagrams per receive/send batch.
    pub batch: usize,
    /// How long (µs) a shard keeps polling after its last datagram before
    /// it sleeps; 0 (the default) = sleep at once. Measured on the 2-core VM
    /// (tuning/RESULTS.md §6) a 100 µs spin bought no throughput and no
    /// latency and cost ~10 % of a core at half load; kept for hosts where
    /// wake-ups are slower.
    pub spin_us: u64,
    /// Upstream DNS server for the resolve proxy; none = resolves answer 502.
    pub dns_upstream: Option<SocketAddr>,
    /// `host:port` written into issued credentials; empty = derived from `udp`.
    pub public_endpoints: Vec<String>,
    /// ConnectionTimeout announced to devices (ms).
    pub connection_timeout_ms: u32,
    /// STUN answers per second per source address (0 = unlimited).
    pub stun_rate_per_sec: u32,
    /// STUN burst per source address.
    pub stun_burst: u32,
    /// Capacity of each shard's router inbox.
    pub inbox_capacity: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            udp: SocketAddr::from(([0, 0, 0, 0], 15099)),
            http: SocketAddr::from(([127, 0, 0, 1], 15099)),
            data_dir: PathBuf::from("./mppd-data"),
            threads: 0,
            cpus: String::new(),
            pin: true,
            io: IoChoice::Auto,
            log_format: LogFormat::Text,
            log_level: "info".into(),
            max_connections: 10_000_000,
            socket_buffer: 8 << 20,
            batch: 64,
            spin_us: 0,
            dns_upstream: None,
            public_endpoints: Vec::new(),
            connection_timeout_ms: crate::proto::CONNECTION_TIMEOUT_MS,
            stun_rate_per_sec: 100,
            stun_burst: 200,
            inbox_capacity: 65_536,
        }
    }
}

impl NodeConfig {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            format!(
                "invalid config file {}: {}",
                path.display(),
                e.to_string().replace('\n', " ")
            )
        })
    }

    /// Applies `MPPD_<SETTING>` environment variables (e.g. `MPPD_UDP`,
    /// `MPPD_THREADS`, `MPPD_IO`) from `vars`.
    pub fn apply_env(
        &mut self,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<(), String> {
        for (k, v) in vars {
            let Some(name) = k.strip_prefix("MPPD_") else {
                continue;
            };
            let bad = |e: &dyn std::fmt::Display| format!("invalid {k}={v:?}: {e}");
            match name {
                "UDP" => self.udp = v.parse().map_err(|e| bad(&e))?,
                "HTTP" => self.http = v.parse().map_err(|e| bad(&e))?,
                "DATA_DIR" => self.data_dir = PathBuf::from(&v),
                "THREADS" => self.threads = v.parse().map_err(|e| bad(&e))?,
                "CPUS" => self.cpus = v,
                "PIN" => self.pin = v.parse().map_err(|e| bad(&e))?,
                "IO" => self.io = v.parse().map_err(|e: String| bad(&e))?,
                "LOG_FORMAT" => self.log_format = v.parse().map_err(|e: String| bad(&e))?,
                "LOG_LEVEL" => self.log_level = v,
                "MAX_CONNECTIONS" => self.max_connections = v.parse().map_err(|e| bad(&e))?,
                "SOCKET_BUFFER" => self.socket_buffer = v.parse().map_err(|e| bad(&e))?,
                "SPIN_US" => self.spin_us = v.parse().map_err(|e| bad(&e))?,
                "DNS_UPSTREAM" => self.dns_upstream = Some(v.parse().map_err(|e| bad(&e))?),
                "CONFIG" => {}
                _ => return Err(format!("unknown environment setting {k}")),
            }
        }
        Ok(())
    }

    /// Checks the settings that parsing alone cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.spin_us > 100_000 {
            return Err(format!(
                "spin_us must be at most 100000, not {}",
                self.spin_us
            ));
        }
        if self.batch == 0 || self.batch > 1024 {
            return Err(format!("batch must be 1..=1024, not {}", self.batch));
        }
        if self.inbox_capacity == 0 {
            return Err("inbox_capacity must be at least 1".into());
        }
        if self.connection_timeout_ms < 1000 {
            return Err("connection_timeout_ms must be at least 1000".into());
        }
        parse_cpu_list(&self.cpus)?;
        Ok(())
    }

    /// Shard count: `threads`, or one per available core.
    pub fn shard_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Parses a CPU list such as `0,2-5` into `[0, 2, 3, 4, 5]`.
pub fn parse_cpu_list(text: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid CPU list {text:?}: expected e.g. 0,2-5");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0,2-5"), Ok(vec![0, 2, 3, 4, 5]));
        assert_eq!(parse_cpu_list(""), Ok(vec![]));
        assert_eq!(parse_cpu_list(" 1 , 3 "), Ok(vec![1, 3]));
        assert!(parse_cpu_list("5-2").is_err());
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("1-").is_err());
    }

    #[test]
    fn file_env_and_errors() {
        let c: NodeConfig =
            toml::from_str("udp = \"127.0.0.1:0\"\nthreads = 3\nio = \"mmsg\"\n").expect("valid");
        assert_eq!(c.threads, 3);
        assert_eq!(c.io, IoChoice::Mmsg);
        assert!(
            toml::from_str::<NodeConfig>("thread = 3").is_err(),
            "unknown keys refused"
        );
        let mut c = NodeConfig::default();
        c.apply_env(
            [
                ("MPPD_THREADS".to_string(), "5".to_string()),
                ("HOME".into(), "/x".into()),
            ]
            .into_iter(),
        )
        .expect("valid");
        assert_eq!(c.threads, 5);
        assert!(c
            .apply_env([("MPPD_IO".to_string(), "epoll".to_string())].into_iter())
            .is_err());
        assert!(c
            .apply_env([("MPPD_BOGUS".to_string(), "1".to_string())].into_iter())
            .is_err());
    }
}
