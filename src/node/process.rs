//! The standard Prometheus process metrics (`process_resident_memory_bytes`,
//! `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), read from `/proc/self` at scrape time.
//!
//! They exist so that dashboards and alerts written for any Prometheus
//! exporter work on `mppd` unchanged. Reading happens on the control
//! thread, only when `/metrics` is scraped, never on a shard; a value that
//! cannot be read (no `/proc`) is left out rather than reported as 0.

use crate::control::metrics::{Exposition, Kind};

/// What `/proc/self` says of the process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// Resident set size, bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<u64>,
    /// User and system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Start time since the Unix epoch, seconds.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads the current process's figures; what cannot be read is `None`.
    pub fn read() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let ticks = clock_ticks();
        let page = page_size();
        let field = |i: usize| fields.as_ref().and_then(|f| f.get(i)?.parse::<u64>().ok());
        // Fields after the command, 0-based from field 3 ("state"):
        // utime 14, stime 15, starttime 22, vsize 23, rss 24 (1-based).
        let utime = field(14 - 3);
        let stime = field(15 - 3);
        let start_ticks = field(22 - 3);
        let cpu_seconds = match (utime, stime, ticks) {
            (Some(u), Some(s), Some(t)) => Some((u + s) as f64 / t as f64),
            _ => None,
        };
        let start_time_seconds = match (start_ticks, ticks, boot_time()) {
            (Some(st), Some(t), Some(boot)) => Some(boot as f64 + st as f64 / t as f64),
            _ => None,
        };
        ProcessStats {
            resident_bytes: field(24 - 3).zip(page).map(|(p, size)| p * size),
            virtual_bytes: field(23 - 3),
            cpu_seconds,
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: max_fds(),
            start_time_seconds,
        }
    }

    /// Writes the families that could be read.
    pub fn render(&self, out: &mut Exposition) {
        let mut gauge = |name: &str, kind: Kind, help: &str, value: Option<f64>| {
            if let Some(v) = value {
                out.family(name, kind, help);
                out.sample_f64(name, &[], v);
            }
        };
        gauge(
            "process_cpu_seconds_total",
            Kind::Counter,
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds,
        );
        gauge(
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes.",
            self.resident_bytes.map(|v| v as f64),
        );
        gauge(
            "process_virtual_memory_bytes",
            Kind::Gauge,
            "Virtual memory size in bytes.",
            self.virtual_bytes.map(|v| v as f64),
        );
        gauge(
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors.",
            self.open_fds.map(|v| v as f64),
        );
        gauge(
            "process_max_fds",
            Kind::Gauge,
            "Maximum number of open file descriptors (the soft RLIMIT_NOFILE).",
            self.max_fds.map(|v| v as f64),
        );
        gauge(
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds,
        );
    }
}

/// The fields of `/proc/self/stat` after the command name (which may hold
/// spaces and parentheses: everything up to the last `)` is skipped).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().collect())
}

fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|&t| t > 0)
}

fn page_size() -> Option<u64> {
    // SAFETY: sysconf reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0)
}

/// The boot time, seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    // rlim_t is u64 on 64-bit Linux only.
    #[allow(clippy::unnecessary_cast)]
    Some(limit.rlim_cur as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_process_reads_back_plausible_figures() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes.is_some_and(|b| b > 0), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        assert!(p.cpu_seconds.is_some_and(|s| s >= 0.0), "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        // Started before now, and after 2020.
        assert!(
            p.start_time_seconds
                .is_some_and(|s| s <= now + 1.0 && s > 1_577_836_800.0),
            "{p:?}"
        );
        let mut out = Exposition::new();
        p.render(&mut out);
        let text = out.into_string();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{text}");
        }
    }

    #[test]
    fn a_command_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let stat = "42 (my (odd) cmd) S 1 2 3";
        assert_eq!(stat_fields(stat), Some(vec!["S", "1", "2", "3"]));
        assert_eq!(stat_fields("garbage"), None);
    }
}
