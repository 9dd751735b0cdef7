//! The node: the threads that run the protocol, and starting and stopping
//! them.
//!
//! * [`shard`] — one pinned thread per shard owning a socket, a driver, the
//!   [`crate::proto::Service`] state machine and an inbox;
//! * [`router`] — the bounded inboxes through which anything reaches a shard;
//! * [`cluster`] — the NATS bus between the nodes of a cluster (on the
//!   control thread);
//! * [`data_dir`] — the key files;
//! * [`metrics`] — what the shards count, named for `GET /metrics`;
//! * this file — [`start`], the running [`Node`], and the [`NodeHandle`]
//!   through which the control plane reaches the shards.
//!
//! [`start`] does everything that can fail before any thread runs (reading
//! the keys, binding UDP and HTTP, attaching the steering program, checking
//! the open-file limit, probing io_uring), and returns only once every
//! shard's driver is open, so a bad setting is reported once, clearly, as a
//! [`StartError`], and nothing is left half-started. A
//! node never runs half alive either: when a shard dies, `/healthz` says
//! so, and after a short grace the node stops and [`Node::wait`] returns the
//! error (`mppd` exits 1, for its supervisor to restart it). This layer
//! parses no packet: it moves datagrams and messages between the sockets,
//! the state machines and the control plane.

pub mod cluster;
pub mod data_dir;
pub mod keyring;
pub mod latency;
pub mod metrics;
pub mod process;
mod reload;
pub mod router;
pub mod shard;
mod signals;
pub mod snapshot;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::config::{ConfigError, IoChoice, NodeConfig};
use crate::control::dns::{DnsAnswer, DnsQuery};
use crate::control::{
    Exposition, HttpLimits, HttpListener, NodeApi, Overloaded, RemoteOutcome, Routes,
};
use crate::net::{self, IoBackend, Waker};
use crate::packet::{Credential, CredentialError};
use crate::proto::revocation::Revocations;
use crate::proto::{KeySet, ServiceConfig};
use crate::time::{UnixMillis, UnixSeconds};
pub use data_dir::{open_data_dir, DataDir, DataDirError, ADMIN_TOKEN_FILE, MASTER_KEY_FILE};
use metrics::NodeMetrics;
pub use reload::{Operator, ReloadReport, LIVE_SETTINGS};
use router::{Fault, InboxFull, Router, ShardMessage};
use shard::{ShardHealth, ShardMetrics, ShardSetup};
use signals::Signals;

/// How long start-up waits for a UDP port still held by a node that stopped
/// or was killed a moment ago.
pub const BIND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a node whose shard died keeps answering (`/healthz` 503, the
/// metrics with `mpp_shard_up` 0) before it stops and exits.
pub const SHARD_FAILURE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long start-up waits for every shard to open its driver.
pub const SHARD_START_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Descriptors the node may open besides its HTTP connections: the DNS
/// forwarder's sockets, per shard its socket, eventfd and ring, the
/// listeners, the data files, the runtime.
fn descriptors_besides_http(shards: usize) -> u64 {
    crate::control::dns::MAX_IN_FLIGHT as u64 + 4 * shards as u64 + 64
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory or a key file could not be used.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// The key rotation or revocation files could not be used.
    #[error(transparent)]
    Keyring(#[from] keyring::KeyringError),
    /// `--io uring` was asked for and io_uring does not work here.
    #[error("io_uring is not available here ({0}); use --io mmsg or --io auto")]
    UringUnavailable(io::Error),
    /// The UDP socket group could not be bound (port taken, no permission).
    #[error("cannot bind UDP {addr}: {source}")]
    BindUdp {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The HTTP control listener (or the web listener) could not be bound.
    #[error("cannot bind HTTP {addr}: {source}")]
    BindHttp {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The cBPF steering program could not be attached, and
    /// `allow_fallback_steering` is off.
    #[error(
        "cannot attach the cBPF steering program ({0}); \
         set allow_fallback_steering = true to run without it (slower: shards forward datagrams to each other)"
    )]
    Steering(io::Error),
    /// A shard could not start (its driver did not open).
    #[error("cannot start {0}")]
    Shard(String),
    /// The HTTP connection caps do not fit the process's open-file limit.
    #[error(
        "the HTTP connection caps need {needed} open files (http_max_connections + \
         web_max_connections + {reserve} for the rest of the node) but the open-file limit \
         (RLIMIT_NOFILE) is {limit}: lower the caps or raise the limit (LimitNOFILE= in systemd, ulimit -n)"
    )]
    FdLimit {
        /// Descriptors needed.
        needed: u64,
        /// Of which the node needs besides HTTP connections.
        reserve: u64,
        /// The hard limit.
        limit: u64,
    },
    /// A resource of the process could not be set up (eventfd, thread,
    /// runtime, signal handler).
    #[error("cannot {what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

impl StartError {
    fn setup(what: &'static str) -> impl FnOnce(io::Error) -> StartError {
        move |source| StartError::Setup { what, source }
    }
}

/// A monotonic clock reporting Unix milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    start_unix: UnixMillis,
}

impl Clock {
    /// Anchors the clock now.
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
            start_unix: UnixMillis::from_system_clock(),
        }
    }

    /// The current time.
    pub fn now(&self) -> UnixMillis {
        self.start_unix
            .plus_millis(self.start.elapsed().as_millis() as u64)
    }

    /// Nanoseconds since the clock was anchored, monotonic: the stamps of
    /// the publish → send latency (shared by the control plane and shards).
    pub fn mono_nanos(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// Returns memory freed on this thread to the OS now, when the allocator is
/// mimalloc (as in `mppd`). mimalloc keeps freed pages for reuse and
/// returns them only on later allocator activity, which a shard that has
/// just dropped a restore's temporary gigabyte may not have for hours: its
/// RSS would stay 2.6 times what it holds (a 10M restore: 2.5 GB instead
/// of 0.97 GB). Harmless under another allocator.
pub fn release_freed_memory() {
    // SAFETY: mi_collect takes no pointer and may be called from any thread
    // at any time; with no mimalloc heap in use it does nothing.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Pins the calling thread to `cpu`; false when the OS refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// The CPUs the control thread is confined to: `control_cpus` when given,
/// else the CPUs the shards are pinned to when `cpus` names them (a node
/// given CPUs stays on them: on a shared machine its HTTP and DNS work then
/// neither lands on another program's core nor wakes a shard across cores),
/// else none (any CPU).
fn control_cpus(config: &NodeConfig, shards: usize) -> Vec<usize> {
    if !config.control_cpus.0.is_empty() {
        return config.control_cpus.0.clone();
    }
    if !config.pin {
        return Vec::new();
    }
    let mut cpus: Vec<usize> = config.cpus.0.iter().copied().take(shards).collect();
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// Confines the calling thread (and the threads it starts later) to `cpus`;
/// false when the list is empty, names a CPU beyond a CPU set, or the OS
/// refused.
pub fn confine_current_thread(cpus: &[usize]) -> bool {
    if cpus.is_empty() || cpus.iter().any(|&c| c >= crate::config::MAX_CPUS) {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET is given CPUs
    // below CPU_SETSIZE (checked above); sched_setaffinity(0, …) reads the
    // set we own and applies to the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The CPUs of the calling thread's affinity mask (empty when unknown).
pub fn current_thread_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity(0, …) fills the set we own for the calling
    // thread; CPU_ISSET reads it below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..crate::config::MAX_CPUS)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// The `host:port` endpoints written into credentials.
pub fn public_endpoints(config: &NodeConfig, udp: SocketAddr) -> Vec<String> {
    if !config.public_endpoints.is_empty() {
        return config.public_endpoints.clone();
    }
    let ip = if udp.ip().is_unspecified() {
        match udp {
            SocketAddr::V4(_) => "127.0.0.1".to_string(),
            SocketAddr::V6(_) => "[::1]".to_string(),
        }
    } else {
        match udp {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    vec![format!("{ip}:{}", udp.port())]
}

/// The master keys and revocations the node runs with (docs/PROTOCOL.md §7.11).
struct Keyring {
    keys: KeySet,
    revocations: Arc<Revocations>,
}

/// How often the control thread looks at the key and revocation files.
const KEYRING_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// The control plane's view of the running node.
pub struct NodeHandle {
    router: Arc<Router>,
    /// The keys and revocations in force (the watcher updates them).
    keyring: Mutex<Keyring>,
    endpoints: Vec<String>,
    metrics: Vec<Arc<Mutex<ShardMetrics>>>,
    health: Arc<ShardHealth>,
    backend: IoBackend,
    clock: Clock,
    started: UnixMillis,
    /// The cluster bus, once the control thread started it (cluster only).
    cluster: std::sync::OnceLock<Arc<cluster::Bus>>,
}

impl NodeApi for NodeHandle {
    fn publish_remote(
        &self,
        batch: Vec<(String, Vec<u8>)>,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = RemoteOutcome> + Send>>> {
        let bus = Arc::clone(self.cluster.get()?);
        Some(Box::pin(async move {
            let outcome = bus.publish_remote(&batch).await;
            RemoteOutcome {
                remote: outcome.remote,
                failed: outcome.failed,
            }
        }))
    }

    fn publish(&self, account: &str, bitmask: &[u8]) -> Result<(), Overloaded> {
        let shard = self.router.shard_of_account(account);
        let message = ShardMessage::Publish {
            account: account.to_owned(),
            bitmask: bitmask.to_vec(),
            stamp: self.clock.mono_nanos(),
        };
        self.router.send(shard, message).map_err(|_| Overloaded)
    }

    fn issue_credential(
        &self,
        account: &str,
        device: &str,
        ttl_secs: u64,
    ) -> Result<Credential, CredentialError> {
        let now = self.clock.now().seconds();
        let expires = UnixSeconds(now.0.saturating_add(ttl_secs.min(i64::MAX as u64) as i64));
        let (master, generation) = match self.keyring.lock() {
            Ok(k) => (
                k.keys.current.clone(),
                k.revocations.generation(account, device),
            ),
            Err(poisoned) => {
                let k = poisoned.into_inner();
                (
                    k.keys.current.clone(),
                    k.revocations.generation(account, device),
                )
            }
        };
        Credential::issue_at_generation(
            &master,
            generation,
            account,
            device,
            expires,
            self.endpoints.clone(),
            &mut rand::rngs::OsRng,
        )
    }

    fn web_request(
        &self,
        peer: SocketAddr,
        packet: Vec<u8>,
    ) -> Result<tokio::sync::oneshot::Receiver<Vec<Vec<u8>>>, Overloaded> {
        let shard = crate::packet::peek_conn_id(&packet)
            .map_or(0, |id| self.router.shard_of_affinity(id.affinity()));
        let (reply, receiver) = tokio::sync::oneshot::channel();
        self.router
            .send(
                shard,
                ShardMessage::Web {
                    peer,
                    packet,
                    reply,
                },
            )
            .map_err(|_| Overloaded)?;
        Ok(receiver)
    }

    fn metrics(&self, out: &mut Exposition) {
        let now = self.clock.now();
        let (key_parity, key_grace_secs, revocations) = {
            let k = match self.keyring.lock() {
                Ok(k) => k,
                Err(poisoned) => poisoned.into_inner(),
            };
            let grace = keyring::grace_end(&k.keys, now).map_or(0, |u| u.millis_since(now) / 1000);
            (k.keys.parity, grace, k.revocations.entries().count())
        };
        let snapshot = NodeMetrics {
            aes_gcm: crate::packet::aes_gcm_implementation().name(),
            process: process::ProcessStats::read(),
            key_parity,
            key_grace_secs,
            revocations,
            io_backend: self.backend.name(),
            threads: self.health.running(),
            uptime_secs: self.clock.now().millis_since(self.started) / 1000,
            shards: self
                .metrics
                .iter()
                .filter_map(|m| m.lock().ok().map(|g| g.clone()))
                .map(|mut m| {
                    // A dead shard's last snapshot says nothing of its death.
                    m.up = self.health.is_up(m.shard);
                    m
                })
                .collect(),
            cluster: self.cluster.get().map(|bus| bus.metrics()),
        };
        metrics::render(&snapshot, out);
    }

    fn health(&self) -> Result<(), String> {
        if let Some(failure) = self.health.failure() {
            return Err(format!("{failure}; the node is exiting"));
        }
        let running = self.health.running();
        if running < self.metrics.len() {
            return Err(format!(
                "stopping: {} of {} shards stopped",
                self.metrics.len() - running,
                self.metrics.len()
            ));
        }
        Ok(())
    }
}

/// A started node.
pub struct Node {
    /// The UDP address actually bound (port 0 resolved).
    pub udp: SocketAddr,
    /// The HTTP address actually bound.
    pub http: SocketAddr,
    /// The web-transport address actually bound, when `web` is set.
    pub web: Option<SocketAddr>,
    /// The I/O backend in use.
    pub backend: IoBackend,
    /// Shard count.
    pub shards: usize,
    /// The admin token.
    pub admin_token: String,
    shard_threads: Vec<JoinHandle<io::Result<()>>>,
    control_thread: Option<JoinHandle<io::Result<()>>>,
    stop: Arc<tokio::sync::Notify>,
    router: Arc<Router>,
    reload: tokio::sync::mpsc::UnboundedSender<ReloadRequest>,
}

/// A reload asked for: by SIGHUP (no one waits for the report) or by
/// [`Node::reload`] (the report goes back).
type ReloadRequest = Option<std::sync::mpsc::SyncSender<ReloadReport>>;

/// How long [`Node::reload`] waits for the control thread's report.
const RELOAD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl Node {
    /// Asks the node to stop (as SIGTERM does).
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }

    /// Reloads what can change live, as SIGHUP does, and says what it did
    /// (see [`Operator`]); `None` if the control thread did not answer (it
    /// stopped).
    pub fn reload(&self) -> Option<ReloadReport> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.reload.send(Some(tx)).ok()?;
        rx.recv_timeout(RELOAD_PATIENCE).ok()
    }

    /// Waits for every thread to finish: `Ok` after [`Node::shutdown`] or a
    /// signal; the error when a shard died (the node stops by itself
    /// [`SHARD_FAILURE_GRACE`] later) or the control plane failed.
    pub fn wait(mut self) -> io::Result<()> {
        let mut result = Ok(());
        for (i, t) in self.shard_threads.drain(..).enumerate() {
            let ended = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the shard's thread panicked")));
            if let Err(e) = ended {
                let e = io::Error::new(e.kind(), format!("shard {i}: {e}"));
                result = result.and(Err(e));
            }
        }
        if let Some(t) = self.control_thread.take() {
            let ended = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the control thread panicked")));
            result = result.and(ended);
        }
        result
    }

    /// Makes shard `shard` fail as `fault` says (tests of the node's health).
    #[doc(hidden)]
    pub fn inject_fault(&self, shard: usize, fault: Fault) -> Result<(), InboxFull> {
        self.router.send(shard, ShardMessage::Fault(fault))
    }
}

fn choose_backend(choice: IoChoice) -> Result<IoBackend, StartError> {
    match choice {
        IoChoice::Mmsg => Ok(IoBackend::Mmsg),
        IoChoice::Uring => net::uring::probe()
            .map(|()| IoBackend::Uring)
            .map_err(StartError::UringUnavailable),
        // docs/BENCHMARKS.md (io_uring against mmsg): measured interleaved
        // on Linux 6.x, io_uring was the slower backend in every scenario
        // (heartbeat 0.85–0.91 of mmsg per node CPU-second, fan-out
        // 0.92–1.0), so `auto` never picks it; `--io uring` still does.
        IoChoice::Auto => Ok(IoBackend::Mmsg),
    }
}

/// Makes sure the process may open `needed` files: raises the soft
/// RLIMIT_NOFILE up to the hard limit if it is lower; an error if the hard
/// limit is lower still.
fn ensure_open_files(needed: u64, reserve: u64) -> Result<(), StartError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(StartError::Setup {
            what: "read the open-file limit",
            source: io::Error::last_os_error(),
        });
    }
    // rlim_t is u64 on 64-bit Linux only.
    #[allow(clippy::unnecessary_cast)]
    let (soft, hard) = (limit.rlim_cur as u64, limit.rlim_max as u64);
    if soft >= needed {
        return Ok(());
    }
    if hard < needed {
        return Err(StartError::FdLimit {
            needed,
            reserve,
            limit: hard,
        });
    }
    limit.rlim_cur = needed as libc::rlim_t;
    // SAFETY: setrlimit reads the rlimit we pass; the soft limit stays at or
    // below the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(StartError::Setup {
            what: "raise the open-file limit",
            source: io::Error::last_os_error(),
        });
    }
    tracing::info!(
        from = soft,
        to = needed,
        "raised the open-file limit for the HTTP connection caps"
    );
    Ok(())
}

/// Ways to make a node misbehave, for tests of how it copes.
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Behave as if the steering program could not be attached.
    pub fail_steering: bool,
    /// While this holds `true`, the shards send nothing: their datagrams
    /// wait in their queues as behind a socket that takes no more (for the
    /// backpressure test, docs/PROTOCOL.md D25).
    pub hold_sends: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Starts a node: binds everything, then spawns the shards and the control
/// plane. `stop_on_signals` makes SIGINT/SIGTERM stop it (the `mppd` binary);
/// tests call [`Node::shutdown`] instead.
pub fn start(config: &NodeConfig, stop_on_signals: bool) -> Result<Node, StartError> {
    start_with_hooks(config, stop_on_signals, TestHooks::default())
}

/// [`start`], with the process's [`Operator`]: a reload (SIGHUP when
/// `stop_on_signals`, or [`Node::reload`]) reads the configuration again
/// through it and applies what can change live; it is told when the node
/// begins to stop.
pub fn start_with_operator(
    config: &NodeConfig,
    stop_on_signals: bool,
    operator: Arc<dyn Operator>,
) -> Result<Node, StartError> {
    start_inner(
        config,
        stop_on_signals,
        TestHooks::default(),
        Some(operator),
    )
}

/// [`start`], with faults a test asks for.
#[doc(hidden)]
pub fn start_with_hooks(
    config: &NodeConfig,
    stop_on_signals: bool,
    hooks: TestHooks,
) -> Result<Node, StartError> {
    start_inner(config, stop_on_signals, hooks, None)
}

fn start_inner(
    config: &NodeConfig,
    stop_on_signals: bool,
    hooks: TestHooks,
    operator: Option<Arc<dyn Operator>>,
) -> Result<Node, StartError> {
    config.validate()?;
    let data = open_data_dir(&config.data_dir)?;
    let shards = config.shard_count();
    // A CPU the process may not run on (absent, offline, outside its
    // cpuset) cannot be pinned to: a configuration error, said at once.
    let allowed: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    let runnable = |key: &'static str, list: &[usize]| match list
        .iter()
        .find(|c| !allowed.is_empty() && !allowed.contains(c))
    {
        Some(cpu) => Err(StartError::Config(ConfigError::Invalid {
            key,
            message: format!(
                "names CPU {cpu}, which this process may not run on (it may run on {})",
                crate::config::CpuList(allowed.clone())
            ),
        })),
        None => Ok(()),
    };
    if config.pin {
        runnable("cpus", &config.cpus.0)?;
    }
    runnable("control_cpus", &config.control_cpus.0)?;
    let control_cpus = control_cpus(config, shards);
    let cpus = if config.cpus.0.is_empty() {
        allowed.clone()
    } else {
        config.cpus.0.clone()
    };
    let backend = choose_backend(config.io)?;
    // Every HTTP connection the caps allow must be able to exist.
    let reserve = descriptors_besides_http(shards);
    let web_connections = config.web.map_or(0, |_| config.web_max_connections as u64);
    ensure_open_files(
        config.http_max_connections as u64 + web_connections + reserve,
        reserve,
    )?;
    // docs/PROTOCOL.md §8 (one node per port): a port held by a live process
    // is refused; one still held by a node stopped a moment ago (its sockets
    // in teardown) is waited for, up to BIND_PATIENCE.
    let sockets =
        net::socket::bind_group_retrying(config.udp, shards, config.socket_buffer, BIND_PATIENCE)
            .map_err(|source| StartError::BindUdp {
            addr: config.udp,
            source,
        })?;
    let udp = sockets
        .first()
        .ok_or_else(|| io::Error::other("no UDP socket bound"))
        .and_then(|s| s.local_addr())
        .map_err(|source| StartError::BindUdp {
            addr: config.udp,
            source,
        })?;
    if let Some(first) = sockets.first() {
        // docs/PROTOCOL.md §8.3: without the program the kernel spreads
        // datagrams by flow hash; that mode is slower and must be asked for.
        let attached = if hooks.fail_steering && shards > 1 {
            Err(io::Error::other("steering disabled by a test hook"))
        } else {
            net::steer::attach_steering(first, shards as u32)
        };
        match attached {
            Ok(()) => {}
            Err(e) if config.allow_fallback_steering => tracing::warn!(
                %e,
                "cBPF steering unavailable: running in fallback mode (shards forward authenticated datagrams to each other)"
            ),
            Err(e) => return Err(StartError::Steering(e)),
        }
    }
    let bind = |addr: SocketAddr| {
        let fail = move |source| StartError::BindHttp { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
        listener.set_nonblocking(true).map_err(fail)?;
        let bound = listener.local_addr().map_err(fail)?;
        Ok::<_, StartError>((listener, bound))
    };
    let (http_listener, http) = bind(config.http)?;
    let web_listener = config.web.map(bind).transpose()?;
    let web = web_listener.as_ref().map(|(_, addr)| *addr);
    let limits = |max_connections| HttpLimits {
        header_timeout: std::time::Duration::from_millis(config.http_header_timeout_ms),
        body_timeout: std::time::Duration::from_millis(config.http_body_timeout_ms),
        idle_timeout: std::time::Duration::from_millis(config.http_idle_timeout_ms),
        max_connections,
    };
    let mut listeners = vec![(
        http_listener,
        if web.is_some() {
            Routes::Admin
        } else {
            Routes::All
        },
        limits(config.http_max_connections),
    )];
    if let Some((listener, _)) = web_listener {
        listeners.push((listener, Routes::Web, limits(config.web_max_connections)));
    }

    let wakers: Vec<Arc<Waker>> = (0..shards)
        .map(|_| Waker::new().map(Arc::new))
        .collect::<io::Result<_>>()
        .map_err(StartError::setup("create an eventfd"))?;
    let (router, inboxes) = Router::new(wakers.clone(), config.inbox_capacity);
    let clock = Clock::new();
    let (dns_tx, dns_rx) = tokio::sync::mpsc::channel::<DnsQuery>(1024);
    let dns = config.dns_upstream.map(|_| dns_tx);
    let server_config = ServiceConfig {
        connection_timeout_ms: config.connection_timeout_ms,
        max_connections: config.max_connections.div_ceil(shards).max(1),
        retransmit_initial_ms: config.retransmit_initial_ms,
        retransmit_tries: config.retransmit_tries,
        max_queued_replies: config.max_queued_replies,
        max_pending_resolves: config.max_pending_resolves,
        resolve_timeout_ms: config.resolve_timeout_ms,
        stun_rate_per_sec: config.stun_rate,
        stun_burst: config.stun_burst,
        catch_up_window_secs: config.catch_up_window_secs,
        cluster_partitions: if config.cluster.is_empty() {
            0
        } else {
            config.cluster_partitions
        },
        // The bus's own wait, and a margin for its answer to reach the shard.
        catch_up_timeout_ms: config.cluster_catch_up_timeout_ms + 250,
    };
    // docs/PROTOCOL.md §10: the cluster's channels, when there is one.
    let cluster_setup = (!config.cluster.is_empty()).then(|| {
        let (questions, asked) = tokio::sync::mpsc::channel(cluster::MAX_QUESTIONS);
        let interest = cluster::Interest::new(shards, config.cluster_partitions);
        let node_id = if config.node_id.is_empty() {
            default_node_id(udp)
        } else {
            config.node_id.clone()
        };
        let settings = cluster::ClusterConfig {
            urls: config.cluster.clone(),
            node_id,
            partitions: config.cluster_partitions,
            catch_up_timeout: std::time::Duration::from_millis(config.cluster_catch_up_timeout_ms),
            publish_timeout: std::time::Duration::from_millis(config.cluster_publish_timeout_ms),
        };
        (questions, asked, interest, settings)
    });
    // docs/PROTOCOL.md §7.11: the master keys (the previous one during a
    // rotation's grace period) and the revocations.
    let keys = keyring::load_keys(&config.data_dir)?;
    let revocations = Arc::new(keyring::load_revocations(&config.data_dir)?);
    if let Some(until) = keyring::grace_end(&keys, clock.now()) {
        tracing::info!(
            until_unix = until.seconds().0,
            "a master key rotation is in its grace period: credentials of the previous key still verify"
        );
    }
    // docs/PROTOCOL.md §6, "Restarts": take back what the last graceful
    // stop saved, split by this node's shard count; anything wrong with it
    // is one log line and an empty start.
    let mut restored: Vec<Option<snapshot::ShardState>> = (0..shards).map(|_| None).collect();
    let mut restored_epoch = clock.now();
    let mut revocations_changed_since_save = false;
    if config.keep_state {
        let owner = |affinity| router.shard_of_affinity(affinity);
        let now = clock.now();
        let started = std::time::Instant::now();
        match snapshot::load(
            &config.data_dir,
            &keys,
            shards,
            owner,
            now,
            config.catch_up_window_secs,
        ) {
            Ok(Some(state)) => {
                let (accounts, connections) = state.shards.iter().fold((0, 0), |(a, c), s| {
                    (a + s.accounts.len(), c + s.connections.len())
                });
                tracing::info!(
                    accounts,
                    connections,
                    bytes = state.bytes,
                    age_ms = now.millis_since(state.saved),
                    ms = started.elapsed().as_millis() as u64,
                    "saved state read"
                );
                restored_epoch = state.epoch;
                revocations_changed_since_save =
                    keyring::revocations_changed_after(&config.data_dir, state.saved);
                restored = state.shards.into_iter().map(Some).collect();
                // The files' bytes, freed in `load`, go back to the OS.
                release_freed_memory();
                if let Err(e) = snapshot::discard(&config.data_dir) {
                    tracing::warn!(%e, "could not remove the state files once read");
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "saved state not used: starting empty (devices reconnect and resynchronise)");
                if let Err(e) = snapshot::set_aside(&config.data_dir) {
                    tracing::warn!(%e, "could not move the rejected state aside");
                }
            }
        }
    }
    let save = config.keep_state.then(|| snapshot::SaveId {
        generation: rand::random(),
        count: shards as u32,
    });
    let metrics: Vec<Arc<Mutex<ShardMetrics>>> = (0..shards)
        .map(|i| {
            Arc::new(Mutex::new(ShardMetrics {
                shard: i,
                ..ShardMetrics::default()
            }))
        })
        .collect();
    let health = ShardHealth::new(shards);

    let mut shard_threads = Vec::with_capacity(shards);
    for (i, ((socket, inbox), restore)) in
        sockets.into_iter().zip(inboxes).zip(restored).enumerate()
    {
        let setup = ShardSetup {
            id: i,
            cpu: if config.pin && !cpus.is_empty() {
                Some(cpus[i % cpus.len()])
            } else {
                None
            },
            backend,
            batch: config.batch,
            spin: std::time::Duration::from_micros(config.spin_us),
            socket,
            inbox,
            waker: wakers[i].clone(),
            router: router.clone(),
            server: server_config.clone(),
            keys: keys.clone(),
            revocations: Arc::clone(&revocations),
            revocations_changed_since_save,
            dns: dns.clone(),
            metrics: metrics[i].clone(),
            clock,
            restore: restore.map(|state| (restored_epoch, state)),
            save: save.map(|id| shard::SaveTarget {
                data_dir: config.data_dir.clone(),
                id,
            }),
            health: Arc::clone(&health),
            hold_sends: hooks.hold_sends.clone(),
            cluster: cluster_setup.as_ref().map(|(questions, _, interest, _)| {
                shard::ShardCluster {
                    questions: questions.clone(),
                    interest: Arc::clone(interest),
                }
            }),
        };
        let t = std::thread::Builder::new()
            .name(format!("mpp-shard-{i}"))
            .spawn(move || shard::run(setup))
            .map_err(StartError::setup("start a shard thread"))?;
        shard_threads.push(t);
    }
    // A shard whose driver does not open is a start-up error, not a node
    // that runs without it.
    if let Err(why) = health.wait_started(SHARD_START_PATIENCE) {
        // The others stop; a shard stuck in its set-up is not waited for.
        router.shutdown_all();
        drop(shard_threads);
        return Err(StartError::Shard(why));
    }

    let handle = Arc::new(NodeHandle {
        router: router.clone(),
        keyring: Mutex::new(Keyring { keys, revocations }),
        endpoints: public_endpoints(config, udp),
        metrics,
        health: Arc::clone(&health),
        backend,
        clock,
        started: clock.now(),
        cluster: std::sync::OnceLock::new(),
    });
    let stop = Arc::new(tokio::sync::Notify::new());
    let (reload, reload_requests) = tokio::sync::mpsc::unbounded_channel();
    let control_thread = spawn_control(Control {
        reloader: reload::Reloader {
            running: config.clone(),
            operator,
        },
        reload_requests,
        listeners,
        node: handle,
        data_dir: config.data_dir.clone(),
        admin_token: data.admin_token.clone(),
        router: router.clone(),
        stop: stop.clone(),
        stop_on_signals,
        dns: config.dns_upstream.map(|up| (up, dns_rx)),
        cluster: cluster_setup.map(|(_, asked, interest, settings)| (settings, interest, asked)),
        cpus: control_cpus,
    })?;
    Ok(Node {
        udp,
        http,
        web,
        backend,
        shards,
        admin_token: data.admin_token,
        shard_threads,
        control_thread: Some(control_thread),
        stop,
        router,
        reload,
    })
}

/// What the control thread runs with.
struct Control {
    listeners: Vec<(std::net::TcpListener, Routes, HttpLimits)>,
    node: Arc<NodeHandle>,
    data_dir: std::path::PathBuf,
    admin_token: String,
    router: Arc<Router>,
    stop: Arc<tokio::sync::Notify>,
    stop_on_signals: bool,
    dns: Option<(SocketAddr, tokio::sync::mpsc::Receiver<DnsQuery>)>,
    cluster: Option<ClusterSetup>,
    reloader: reload::Reloader,
    reload_requests: tokio::sync::mpsc::UnboundedReceiver<ReloadRequest>,
    /// CPUs the control thread is confined to; empty = any.
    cpus: Vec<usize>,
}

/// What the control thread starts the cluster bus with.
type ClusterSetup = (
    cluster::ClusterConfig,
    Arc<cluster::Interest>,
    tokio::sync::mpsc::Receiver<cluster::CatchUpQuestion>,
);

/// A node id from the host name and the UDP port (docs/PROTOCOL.md §10),
/// letters, digits and `-` only.
fn default_node_id(udp: SocketAddr) -> String {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    let host: String = if rc == 0 {
        name.iter()
            .take_while(|&&b| b != 0)
            .map(|&b| char::from(b))
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect()
    } else {
        String::new()
    };
    let host = if host.is_empty() { "mppd".into() } else { host };
    format!("{host}-{}", udp.port())
}

/// Stops every shard when dropped: whatever ends the control thread (a
/// panic included, e.g. a log write that fails), the shards stop with it
/// and [`Node::wait`] returns instead of waiting forever.
struct StopShardsOnDrop(Arc<Router>);

impl Drop for StopShardsOnDrop {
    fn drop(&mut self) {
        self.0.shutdown_all();
    }
}

fn spawn_control(control: Control) -> Result<JoinHandle<io::Result<()>>, StartError> {
    let Control {
        listeners,
        node,
        data_dir,
        admin_token,
        router,
        stop,
        stop_on_signals,
        dns,
        cluster: cluster_setup,
        mut reloader,
        mut reload_requests,
        cpus,
    } = control;
    let reloader_operator = reloader.operator.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::setup("start the control runtime"))?;
    let mut signals = if stop_on_signals {
        Some(Signals::install(&runtime)?)
    } else {
        None
    };
    let mut hangup = signals.as_mut().and_then(|s| s.hup.take());
    std::thread::Builder::new()
        .name("mpp-control".into())
        .spawn(move || {
            if !cpus.is_empty() && !confine_current_thread(&cpus) {
                tracing::warn!(cpus = %crate::config::CpuList(cpus), "could not confine the control thread");
            }
            let _stop_shards = StopShardsOnDrop(router.clone());
            runtime.block_on(async move {
                let mut http = Vec::with_capacity(listeners.len());
                for (listener, routes, limits) in listeners {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => http.push(HttpListener {
                            listener,
                            routes,
                            limits,
                        }),
                        Err(e) => {
                            tracing::error!(%e, "control listener");
                            router.shutdown_all();
                            return Err(e);
                        }
                    }
                }
                if let Some((upstream, queries)) = dns {
                    let router = router.clone();
                    let answered = move |a: DnsAnswer| {
                        let message = ShardMessage::ResolveAnswer {
                            token: a.token,
                            answer: a.answer,
                        };
                        // A full inbox drops the answer; the resolve times out with 504.
                        let _ = router.send(a.shard, message);
                    };
                    tokio::spawn(crate::control::dns::forward(upstream, queries, answered));
                }
                let watch = Arc::new(Mutex::new(keyring::Watch::new(&data_dir)));
                tokio::spawn(watch_keyring(
                    data_dir.clone(),
                    Arc::clone(&watch),
                    Arc::clone(&node),
                ));
                // SIGHUP or Node::reload: the key files at once, then the
                // configuration (docs/PROTOCOL.md §9).
                let reloading = Arc::clone(&node);
                tokio::spawn(async move {
                    loop {
                        let reply = tokio::select! {
                            request = reload_requests.recv() => match request {
                                Some(reply) => reply,
                                None => break,
                            },
                            () = signals::hangup(&mut hangup) => {
                                tracing::info!("SIGHUP: reloading");
                                None
                            }
                        };
                        let keys = poll_keyring(&data_dir, &watch, &reloading);
                        let report = reloader.reload(&reloading, keys);
                        if let Some(reply) = reply {
                            let _ = reply.try_send(report);
                        }
                    }
                });
                if let Some((settings, interest, questions)) = cluster_setup {
                    let node_id = settings.node_id.clone();
                    let urls = settings.urls.join(",");
                    match cluster::Bus::connect(settings, router.clone(), node.clock).await {
                        Ok(bus) => {
                            tracing::info!(node_id, urls, "cluster bus started");
                            let _ = node.cluster.set(Arc::clone(&bus));
                            tokio::spawn(cluster::run(bus, interest, questions));
                        }
                        Err(e) => tracing::error!(%e, "cluster bus not started: this node delivers locally only"),
                    }
                }
                let stopping = reloader_operator.clone();
                let health = Arc::clone(&node.health);
                let shutdown = {
                    let router = router.clone();
                    async move {
                        tokio::select! {
                            () = signals::wait_for_stop(stop, signals) => {
                                tracing::info!("shutting down");
                            }
                            failure = health.wait_failure() => {
                                // docs/PROTOCOL.md §9: a node with a dead shard
                                // exits (for its supervisor to restart it)
                                // rather than run on half alive; it answers
                                // /healthz 503 meanwhile.
                                tracing::error!(
                                    %failure,
                                    grace_ms = SHARD_FAILURE_GRACE.as_millis() as u64,
                                    "a shard died: the node stops, and exits with an error"
                                );
                                tokio::time::sleep(SHARD_FAILURE_GRACE).await;
                            }
                        }
                        if let Some(operator) = &stopping {
                            operator.stopping();
                        }
                        router.shutdown_all();
                    }
                };
                let api: Arc<dyn NodeApi> = node;
                let served =
                    crate::control::serve_listeners(http, api, admin_token, shutdown).await;
                if let Err(e) = &served {
                    tracing::error!(%e, "control plane stopped");
                    router.shutdown_all();
                }
                served
            })
        })
        .map_err(StartError::setup("start the control thread"))
}

/// Looks at the key and revocation files every [`KEYRING_POLL`] and hands
/// what changed to every shard (docs/PROTOCOL.md §7.11): a revocation or a
/// rotation takes effect without a restart. A file that does not read is
/// logged and looked at again; the node keeps what it had. A reload looks
/// at once, through the same `watch`.
async fn watch_keyring(
    dir: std::path::PathBuf,
    watch: Arc<Mutex<keyring::Watch>>,
    node: Arc<NodeHandle>,
) {
    let mut tick = tokio::time::interval(KEYRING_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = poll_keyring(&dir, &watch, &node) {
            tracing::error!(%e, "key or revocation file unreadable: keeping the ones in force");
        }
    }
}

/// Looks at the key and revocation files once and hands what changed to
/// every shard: (keys changed, revocations changed).
fn poll_keyring(
    dir: &std::path::Path,
    watch: &Mutex<keyring::Watch>,
    node: &NodeHandle,
) -> Result<(bool, bool), String> {
    let mut watch = match watch.lock() {
        Ok(w) => w,
        Err(poisoned) => poisoned.into_inner(),
    };
    let changes = watch.poll(dir).map_err(|e| e.to_string())?;
    let mut keyring = match node.keyring.lock() {
        Ok(k) => k,
        Err(poisoned) => poisoned.into_inner(),
    };
    let changed = (changes.keys.is_some(), changes.revocations.is_some());
    if let Some(keys) = changes.keys {
        tracing::info!(
            parity = keys.parity,
            previous_until_unix = keys.previous.as_ref().map(|(_, u)| u.seconds().0),
            "master keys changed: new credentials use the current key"
        );
        keyring.keys = keys.clone();
        node.router
            .broadcast(|| ShardMessage::Keys(Box::new(keys.clone())));
    }
    if let Some(revocations) = changes.revocations {
        let revocations = Arc::new(revocations);
        tracing::info!(
            entries = revocations.entries().count(),
            "revocations changed: the accounts concerned reconnect"
        );
        keyring.revocations = Arc::clone(&revocations);
        node.router
            .broadcast(|| ShardMessage::Revocations(Arc::clone(&revocations)));
    }
    Ok(changed)
}

#[cfg(test)]
mod control_cpu_tests {
    use super::*;
    use crate::config::CpuList;

    #[test]
    fn the_control_thread_follows_the_shards_cpus_unless_told() {
        let on = |cpus: &[usize], control: &[usize], pin: bool, shards: usize| {
            let config = NodeConfig {
                cpus: CpuList(cpus.to_vec()),
                control_cpus: CpuList(control.to_vec()),
                pin,
                ..NodeConfig::default()
            };
            control_cpus(&config, shards)
        };
        // No CPUs given: anywhere.
        assert_eq!(on(&[], &[], true, 4), Vec::<usize>::new());
        // The CPUs the shards are pinned to (only as many as there are shards).
        assert_eq!(on(&[3, 0, 2], &[], true, 2), vec![0, 3]);
        assert_eq!(on(&[1, 1], &[], true, 2), vec![1]);
        // Shards not pinned: the control thread is not either.
        assert_eq!(on(&[0], &[], false, 1), Vec::<usize>::new());
        // Told: where it was told, pinned shards or not.
        assert_eq!(on(&[0], &[1, 2], true, 1), vec![1, 2]);
        assert_eq!(on(&[], &[2], false, 1), vec![2]);
    }

    #[test]
    fn confining_names_the_cpus_it_was_given() {
        let before = current_thread_cpus();
        assert!(!before.is_empty());
        std::thread::spawn(move || {
            let one = before[before.len() - 1];
            assert!(confine_current_thread(&[one]));
            assert_eq!(current_thread_cpus(), vec![one]);
            assert!(!confine_current_thread(&[]));
            assert!(!confine_current_thread(&[crate::config::MAX_CPUS]));
            assert_eq!(
                current_thread_cpus(),
                vec![one],
                "a refused set changes nothing"
            );
        })
        .join()
        .expect("the confined thread");
    }
}
