//! Process-level helpers: pinning a thread (through the library's
//! `pin_current_thread`), CPU time, the node's RSS, the open-files limit.
//!
//! It reads and adjusts the process from outside the scenarios; it must not
//! parse CPU lists (that is `mpp::config::CpuList`) nor set CPU affinity by
//! itself.

use anyhow::{bail, Result};

/// CPUs a CPU set can name (`CPU_SETSIZE`): `--cpus` refuses larger numbers.
pub(crate) const MAX_CPUS: usize = libc::CPU_SETSIZE as usize;

/// Pins the calling thread to `cpu` with the node's own
/// [`mpp::node::pin_current_thread`].
pub(crate) fn pin(cpu: usize) -> Result<()> {
    // The library indexes a CPU set with `cpu`: keep it inside.
    if cpu >= MAX_CPUS {
        bail!(
            "cannot pin to CPU {cpu}: a CPU set holds CPUs 0 to {}",
            MAX_CPUS - 1
        );
    }
    if !mpp::node::pin_current_thread(cpu) {
        bail!(
            "cannot pin to CPU {cpu}: the system refused (no such CPU, or not one this \
             process may run on: see `nproc` and `taskset -p $$`)"
        );
    }
    Ok(())
}

/// CPU seconds (user + system).
pub(crate) fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A process's CPU seconds (utime + stime) from /proc/PID/stat.
pub(crate) fn proc_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU seconds (utime + stime) of thread `tid` of this process, from
/// /proc/self/task/TID/stat: what an in-process baseline server used.
pub(crate) fn thread_cpu_seconds(tid: u32) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

/// The calling thread's id (for [`thread_cpu_seconds`]).
pub(crate) fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}

fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let user = f.get(11)?.parse::<u64>().ok()? as f64;
    let sys = f.get(12)?.parse::<u64>().ok()? as f64;
    Some((user + sys) / hz)
}

/// A process's resident set size in bytes (VmRSS of /proc/PID/status).
pub(crate) fn proc_rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The CPU seconds of all of `pids` (the nodes of a cluster), or `None`
/// when there are none or one is unreadable.
pub(crate) fn procs_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| proc_cpu_seconds(p)).sum()
}

/// The resident set sizes of all of `pids`, summed, or `None` when there
/// are none or one is unreadable.
pub(crate) fn procs_rss_bytes(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| proc_rss_bytes(p)).sum()
}

/// Raises the open-files limit to at least `need`.
pub(crate) fn raise_nofile(need: u64) -> Result<()> {
    // SAFETY: getrlimit/setrlimit read and write a plain struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Ok(());
        }
        if lim.rlim_cur >= need {
            return Ok(());
        }
        let want = libc::rlimit {
            rlim_cur: need.max(lim.rlim_cur),
            rlim_max: need.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return Ok(());
        }
        let soft = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        if lim.rlim_max < need {
            bail!(
                "{need} file descriptors needed but the limit is {} (raise it with ulimit -n)",
                lim.rlim_max
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_outside_a_cpu_set_is_an_error_not_a_panic() {
        let e = pin(MAX_CPUS).unwrap_err().to_string();
        assert!(e.contains("a CPU set holds"), "{e}");
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(proc_rss_bytes(pid).unwrap() > 0);
        assert!(proc_cpu_seconds(pid).is_some());
    }

    #[test]
    fn a_busy_thread_is_charged_its_own_cpu() {
        let (tx, rx) = std::sync::mpsc::channel();
        let busy = std::thread::spawn(move || {
            tx.send(current_tid()).unwrap();
            // Spin until the kernel has charged this thread a clock tick
            // (10 s at most, so a starved host fails instead of hanging).
            let t = std::time::Instant::now();
            let mut x = 0u64;
            loop {
                for _ in 0..100_000 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
                let spent = thread_cpu_seconds(current_tid()).unwrap();
                if spent > 0.0 || t.elapsed() > std::time::Duration::from_secs(10) {
                    return spent;
                }
            }
        });
        let tid = rx.recv().unwrap();
        assert_ne!(tid, current_tid());
        assert!(busy.join().unwrap() > 0.0);
        assert!(thread_cpu_seconds(current_tid()).is_some());
        assert!(thread_cpu_seconds(tid).is_none(), "the thread is gone");
    }
}
