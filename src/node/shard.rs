//! One shard: a pinned thread that owns a socket, a driver, a server state
//! machine and an inbox, and runs the loop that connects them.
//!
//! The loop, per turn: wait for datagrams, the inbox's eventfd or the next
//! timer; feed every received datagram to the state machine (or forward one
//! that belongs to another shard, once it authenticated); drain the
//! forwarded datagrams and the inbox (publishes, web-transport requests, DNS
//! answers); fire due timers; then write every resulting datagram into the
//! driver's send slots and submit the whole batch at once, and answer the
//! web-transport requests whose replies are complete. The shard parses
//! nothing itself beyond the conn id that says which shard owns a datagram.
//!
//! A shard that ends other than by being told to stop (its thread panics, or
//! its I/O keeps failing) reports it in [`ShardHealth`], so that the node
//! says so on `/healthz` and exits instead of running on half alive.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cluster::{CatchUpQuestion, Interest};
use super::latency::PublishLatency;
use super::router::{Fault, Router, ShardId, ShardInbox, ShardMessage};
use super::Clock;
use crate::control::dns::DnsQuery;
use crate::net::{self, Driver, IoBackend, Waker};
use crate::packet::peek_conn_id;
use crate::proto::{stun, ResolveToken, Service, ServiceConfig, ServiceEvent, WebRequestId};
use crate::time::UnixMillis;

/// Inbox messages handled per loop turn at most (and as many forwarded
/// datagrams), so receiving stays fair.
const INBOX_PER_TURN: usize = 4096;
/// Datagrams sent per loop turn at most before the shard reads its socket
/// again: a publish to a large account (or many publishes) must not keep
/// acknowledgements and heartbeats waiting until the socket overflows.
const SEND_PER_TURN: usize = 1024;
/// A turn's first datagrams are submitted as soon as this many are sealed
/// (then each time as many again have been sealed, doubling, until the
/// driver's batch is full): the first devices of a large account need not
/// wait for the whole batch's seals, while a busy turn still sends in full
/// batches (a few more submissions per turn, out of `SEND_PER_TURN`).
const FIRST_FLUSH: usize = 8;
/// While more datagrams than this wait to be sent, the shard takes no more
/// messages from its inbox: publishes wait there (the inbox is bounded, so
/// the router then refuses them and the publisher hears 503), instead of
/// piling retransmission timers onto notifies that cannot go out yet.
const BACKLOG_HIGH: usize = 16 * SEND_PER_TURN;
/// How long a shard sheds new connects after it saw its socket overflow.
const SHED_FOR_MS: u64 = 1_000;
/// How often a shard publishes its counters for `/metrics`.
const METRICS_PERIOD: Duration = Duration::from_millis(200);
/// How often a shard in a cluster publishes its device counts per
/// partition (docs/PROTOCOL.md §10.3).
const INTEREST_PERIOD: Duration = Duration::from_millis(100);
/// Web-transport requests a shard keeps open at most while they wait for a
/// late answer (a resolve's upstream); beyond, a new web request is refused
/// (the control plane answers 503).
pub const MAX_OPEN_WEB_REQUESTS: usize = 1024;

/// Whether each shard is running. The shard threads report when their loop
/// is ready and how it ended; the node waits for every shard to be ready
/// before [`start`](super::start) returns, reads it for `/healthz` and
/// `mpp_shard_up`, and waits on it to exit when a shard dies
/// (docs/PROTOCOL.md §9).
#[derive(Debug)]
pub struct ShardHealth {
    states: Vec<AtomicU8>,
    failure: Mutex<Option<String>>,
    failed: tokio::sync::Notify,
}

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPED: u8 = 2;
const FAILED: u8 = 3;

impl ShardHealth {
    /// `shards` shards, all starting.
    pub fn new(shards: usize) -> Arc<ShardHealth> {
        Arc::new(ShardHealth {
            states: (0..shards).map(|_| AtomicU8::new(STARTING)).collect(),
            failure: Mutex::new(None),
            failed: tokio::sync::Notify::new(),
        })
    }

    /// Whether `shard` is running: its loop is ready and has not ended.
    pub fn is_up(&self, shard: ShardId) -> bool {
        self.states
            .get(shard)
            .is_some_and(|s| s.load(Ordering::Acquire) == RUNNING)
    }

    /// How many shards are running.
    pub fn running(&self) -> usize {
        (0..self.states.len()).filter(|&i| self.is_up(i)).count()
    }

    /// The first failure, `shard i: reason`, if a shard failed.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Waits (polling, at most `within`) until no shard is starting any
    /// more; the first failure, or the shard that is still starting.
    pub fn wait_started(&self, within: Duration) -> Result<(), String> {
        let until = Instant::now() + within;
        loop {
            if let Some(failure) = self.failure() {
                return Err(failure);
            }
            let starting = self
                .states
                .iter()
                .position(|s| s.load(Ordering::Acquire) == STARTING);
            let Some(shard) = starting else {
                return Ok(());
            };
            if Instant::now() >= until {
                return Err(format!("shard {shard}: not ready within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until a shard failed; its failure.
    pub async fn wait_failure(&self) -> String {
        loop {
            // A failure reported between the check and the wait left a
            // permit in `failed` (notify_one), so none is missed.
            if let Some(failure) = self.failure() {
                return failure;
            }
            self.failed.notified().await;
        }
    }

    /// Records that `shard`'s loop is ready (its driver is open).
    pub fn started(&self, shard: ShardId) {
        if let Some(state) = self.states.get(shard) {
            let _ = state.compare_exchange(STARTING, RUNNING, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Records how `shard`'s loop ended: `Ok` (it was told to stop) or the
    /// error that ended it.
    pub fn report(&self, shard: ShardId, result: &std::io::Result<()>) {
        let Some(state) = self.states.get(shard) else {
            return;
        };
        match result {
            Ok(()) => state.store(STOPPED, Ordering::Release),
            Err(e) => {
                tracing::error!(shard, error = %e, "shard down");
                state.store(FAILED, Ordering::Release);
                if let Ok(mut failure) = self.failure.lock() {
                    failure.get_or_insert_with(|| format!("shard {shard}: {e}"));
                }
                self.failed.notify_one();
            }
        }
    }
}

/// The counters of one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardMetrics {
    /// The shard's id.
    pub shard: usize,
    /// The core the shard's thread is pinned to, if any.
    pub cpu: Option<usize>,
    /// Connections the shard holds.
    pub connections: u64,
    /// Account records the shard holds.
    pub accounts: u64,
    /// The shard state machine's counters.
    pub service: crate::proto::ServiceStats,
    /// Datagrams read from the socket.
    pub datagrams_received: u64,
    /// Datagrams written to the socket.
    pub datagrams_sent: u64,
    /// Sends the kernel refused.
    pub send_errors: u64,
    /// Datagrams lost on receive (no buffer, truncated).
    pub receive_drops: u64,
    /// Datagrams the kernel dropped at the shard's socket, its receive
    /// buffer full (the shard fell behind).
    pub socket_drops: u64,
    /// Batches of sends submitted (one syscall each).
    pub send_batches: u64,
    /// Publishes this shard forwarded to another shard's inbox.
    pub router_forwarded: u64,
    /// Publishes refused because a destination inbox was full.
    pub router_overflows: u64,
    /// Whether the shard is running (set by the node when it reports).
    pub up: bool,
    /// Datagrams that reached this shard's socket for another shard,
    /// authenticated and forwarded to their owner (fallback steering).
    pub misrouted_forwarded: u64,
    /// Datagrams that reached this shard's socket for another shard and were
    /// dropped: they failed authentication, or the owner's forward queue was
    /// full.
    pub misrouted_dropped: u64,
    /// Datagrams other shards forwarded to this one.
    pub forwarded_in: u64,
    /// Publish → send latency (see [`super::latency`]).
    pub publish_latency: super::latency::LatencySnapshot,
    /// Publish → pick-up latency: from the router to the shard taking the
    /// publish from its inbox (its wake-up and the turn in progress).
    pub publish_pickup: super::latency::LatencySnapshot,
}

/// Everything a shard thread needs.
pub struct ShardSetup {
    /// This shard's index.
    pub id: ShardId,
    /// CPU to pin to, if any.
    pub cpu: Option<usize>,
    /// I/O backend.
    pub backend: IoBackend,
    /// Datagrams per batch.
    pub batch: usize,
    /// Keep polling this long after the last datagram before sleeping.
    pub spin: Duration,
    /// The shard's socket of the SO_REUSEPORT group.
    pub socket: UdpSocket,
    /// The shard's inboxes.
    pub inbox: ShardInbox,
    /// The eventfd that wakes this shard.
    pub waker: Arc<Waker>,
    /// The router, to forward misrouted datagrams.
    pub router: Arc<Router>,
    /// State machine settings.
    pub server: ServiceConfig,
    /// The node's master keys (the previous one during a rotation's grace).
    pub keys: crate::proto::KeySet,
    /// The revoked accounts and devices.
    pub revocations: Arc<crate::proto::revocation::Revocations>,
    /// Revocations changed since the saved state being restored was written:
    /// its connections of revoked accounts are dropped after the restore.
    pub revocations_changed_since_save: bool,
    /// Where DNS queries go (None: resolves answer 502 at once).
    pub dns: Option<tokio::sync::mpsc::Sender<DnsQuery>>,
    /// Where the shard publishes its counters.
    pub metrics: Arc<Mutex<ShardMetrics>>,
    /// Wall-clock anchor shared by all shards.
    pub clock: Clock,
    /// State saved by the last graceful stop, to take back before the first
    /// datagram (times relative to the epoch given).
    pub restore: Option<(UnixMillis, super::snapshot::ShardState)>,
    /// Where to save the state when told to stop (None: `keep_state` off).
    pub save: Option<SaveTarget>,
    /// Where the shard reports how it ended (see [`run`]).
    pub health: Arc<ShardHealth>,
    /// A test's hold on sending (see `TestHooks::hold_sends`): while it is
    /// `true` the shard sends nothing.
    pub hold_sends: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// In a cluster: where the shard's catch-up questions go, and where it
    /// reports its device counts per partition.
    pub cluster: Option<ShardCluster>,
}

/// A shard's side of the cluster bus (docs/PROTOCOL.md §10).
pub struct ShardCluster {
    /// Catch-up questions for the bus (bounded; a full channel is a resync).
    pub questions: tokio::sync::mpsc::Sender<CatchUpQuestion>,
    /// Device counts per partition, for the control thread.
    pub interest: Arc<Interest>,
}

/// Where a stopping shard writes its state (docs/PROTOCOL.md §6, "Restarts").
#[derive(Debug, Clone)]
pub struct SaveTarget {
    /// The node's data directory.
    pub data_dir: std::path::PathBuf,
    /// The save this shard's file belongs to.
    pub id: super::snapshot::SaveId,
}

/// Runs a shard until it is told to shut down; `Err` when it could not be
/// set up, its I/O kept failing, or it panicked. Either way the end is
/// reported in the setup's [`ShardHealth`] before this returns.
pub fn run(setup: ShardSetup) -> std::io::Result<()> {
    let id = setup.id;
    let health = Arc::clone(&setup.health);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loop(setup)))
        .unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("no message");
            Err(std::io::Error::other(format!(
                "the shard's thread panicked: {message}"
            )))
        });
    health.report(id, &result);
    result
}

fn run_loop(setup: ShardSetup) -> std::io::Result<()> {
    if let Some(cpu) = setup.cpu {
        if !super::pin_current_thread(cpu) {
            tracing::warn!(shard = setup.id, cpu, "could not pin the shard thread");
        }
    }
    let socket_fd = std::os::fd::AsRawFd::as_raw_fd(&setup.socket);
    let mut driver = net::open_driver(setup.backend, setup.socket, setup.waker.fd(), setup.batch)?;
    setup.health.started(setup.id);
    let mut socket_drops = SocketDrops::new(socket_fd);
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let now = setup.clock.now();
    let resolve_timeout_ms = setup.server.resolve_timeout_ms;
    let mut server = Service::new(setup.server, setup.keys.current.clone(), seed, now);
    server.set_keys(setup.keys.clone());
    if !setup.revocations_changed_since_save {
        server.set_revocations(now, Arc::clone(&setup.revocations));
    }
    if let Some((epoch, state)) = &setup.restore {
        let started = Instant::now();
        let done = server.restore_indexed(
            *epoch,
            &state.accounts,
            &state.connections,
            &state.account_of,
        );
        tracing::info!(
            shard = setup.id,
            accounts = done.accounts,
            connections = done.connections,
            skipped = done.skipped,
            ms = started.elapsed().as_millis() as u64,
            "state restored"
        );
    }
    if setup.restore.is_some() {
        drop(setup.restore);
        // The restore's temporary records (a GB at 10M) go back to the OS.
        super::release_freed_memory();
    }
    if setup.revocations_changed_since_save {
        // A revocation made while the node was stopped: the restored
        // connections of every account with a revocation reconnect, and
        // only credentials that still verify get back in.
        server.set_revocations(now, Arc::clone(&setup.revocations));
    }
    let mut shard = Shard {
        id: setup.id,
        server,
        router: setup.router,
        dns: setup.dns,

        resolve_timeout_ms,
        web: HashMap::new(),
        web_resolves: HashMap::new(),
        next_web: 0,
        misrouted_forwarded: 0,
        misrouted_dropped: 0,
        stopping: false,
        fault: None,
        cluster: setup.cluster,
        clock: setup.clock,
        latency: PublishLatency::new(),
        pickup: PublishLatency::new(),
    };
    tracing::info!(shard = shard.id, cpu = ?setup.cpu, io = driver.backend().name(), "shard started");
    let mut last_metrics = Instant::now();
    let mut last_interest = Instant::now();
    let idle_wait = if shard.cluster.is_some() {
        INTEREST_PERIOD
    } else {
        METRICS_PERIOD
    };
    let (mut wait_errors, mut recv_errors, mut send_errors) = (
        IoErrors::default(),
        IoErrors::default(),
        IoErrors::default(),
    );
    let mut last_work = Instant::now();
    let mut last_drops = 0u64;
    loop {
        let now = setup.clock.now();
        // Messages left in the inbox (more than one turn takes) and datagrams
        // left over from the last turn's send budget have already used up
        // their wake-up: do not sleep on them. Shortly after work, poll
        // without sleeping (`spin`).
        let held = setup
            .hold_sends
            .as_ref()
            .is_some_and(|h| h.load(std::sync::atomic::Ordering::Relaxed));
        let backlog = shard.server.transmit_backlog();
        let inbox_ready = !setup.inbox.forwarded.is_empty()
            || (!setup.inbox.messages.is_empty() && backlog < BACKLOG_HIGH);
        let idle = backlog == 0 || held;
        let timeout = if !inbox_ready && idle && last_work.elapsed() >= setup.spin {
            shard
                .server
                .poll_timeout()
                .map(|t| Duration::from_millis(t.millis_since(now)))
                .map_or(idle_wait, |t| t.min(idle_wait))
        } else {
            Duration::ZERO
        };
        wait_errors.check(shard.id, "wait", driver.wait(Some(timeout)))?;
        let now = setup.clock.now();
        let received = driver.recv(&mut |from, bytes| shard.on_datagram(now, from, bytes));
        if matches!(received, Ok(n) if n > 0) {
            last_work = Instant::now();
        }
        recv_errors.check(shard.id, "receive", received.map(drop))?;
        // Datagrams other shards forwarded (fallback steering): handled like
        // received ones, within their own budget.
        let mut forwarded = 0;
        while forwarded < INBOX_PER_TURN {
            let Ok(f) = setup.inbox.forwarded.try_recv() else {
                break;
            };
            shard.server.handle_datagram(now, f.from, &f.datagram);
            forwarded += 1;
        }
        let mut taken = 0;
        while taken < INBOX_PER_TURN && shard.server.transmit_backlog() < BACKLOG_HIGH {
            let Ok(message) = setup.inbox.messages.try_recv() else {
                break;
            };
            shard.on_message(now, message);
            taken += 1;
        }
        if taken + forwarded > 0 {
            last_work = Instant::now();
        }
        if let Some(fault) = shard.fault.take() {
            return Err(fault);
        }
        if shard.server.poll_timeout().is_some_and(|t| t <= now) {
            shard.server.handle_timeout(now);
        }
        shard.web_timeouts(now);
        shard.handle_events(None);
        if !held {
            send_errors.check(shard.id, "send", shard.transmit(now, driver.as_mut()))?;
        }
        if let Some(cluster) = &shard.cluster {
            if last_interest.elapsed() >= INTEREST_PERIOD {
                last_interest = Instant::now();
                cluster
                    .interest
                    .store(shard.id, shard.server.partition_devices());
            }
        }
        if last_metrics.elapsed() >= METRICS_PERIOD || shard.stopping {
            last_metrics = Instant::now();
            let drops = socket_drops.total();
            // docs/PROTOCOL.md §6 (crash recovery): the kernel dropped
            // datagrams at our socket, or replies pile up: shed new connects
            // for a while with a 503 that says when to come back, instead
            // of letting the socket overflow silently.
            if drops > last_drops || shard.server.transmit_backlog() >= BACKLOG_HIGH {
                shard
                    .server
                    .shed_connects(setup.clock.now().plus_millis(SHED_FOR_MS));
            }
            last_drops = drops;
            shard.publish_metrics(driver.as_ref(), drops, &setup.metrics, setup.cpu);
        }
        if shard.stopping {
            if let Some(target) = &setup.save {
                // docs/PROTOCOL.md §9: a node that exits because a shard died
                // saves nothing (the dead shard's state is gone, and a save is
                // all or nothing); its next start begins empty.
                match setup.health.failure() {
                    None => shard.save(target, setup.clock.now()),
                    Some(failure) => tracing::warn!(
                        shard = shard.id,
                        %failure,
                        "state not saved: the node exits on a shard failure"
                    ),
                }
            }
            tracing::info!(shard = shard.id, "shard stopped");
            return Ok(());
        }
    }
}

/// Consecutive errors of one kind of I/O call: each is logged and survived
/// (the datagrams of that turn are lost, as on a lossy network); only a long
/// unbroken run — a socket or ring that is really broken — stops the shard.
#[derive(Default)]
struct IoErrors {
    consecutive: u32,
}

impl IoErrors {
    const FATAL_AFTER: u32 = 1000;

    fn check(&mut self, shard: ShardId, what: &str, r: std::io::Result<()>) -> std::io::Result<()> {
        match r {
            Ok(()) => {
                self.consecutive = 0;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => {
                self.consecutive += 1;
                if self.consecutive == 1 || self.consecutive.is_power_of_two() {
                    tracing::warn!(shard, %e, count = self.consecutive, "{what} failed");
                }
                if self.consecutive >= Self::FATAL_AFTER {
                    tracing::error!(shard, %e, "{what} keeps failing: stopping the shard");
                    return Err(e);
                }
                Ok(())
            }
        }
    }
}

/// The kernel's count of datagrams dropped at the shard's socket (receive
/// buffer full), widened from its wrapping 32 bits.
struct SocketDrops {
    fd: std::os::fd::RawFd,
    last: Option<u32>,
    total: u64,
}

impl SocketDrops {
    fn new(fd: std::os::fd::RawFd) -> Self {
        SocketDrops {
            fd,
            last: net::socket::kernel_drops(fd),
            total: 0,
        }
    }

    fn total(&mut self) -> u64 {
        if let Some(now) = net::socket::kernel_drops(self.fd) {
            if let Some(last) = self.last {
                self.total += u64::from(now.wrapping_sub(last));
            }
            self.last = Some(now);
        }
        self.total
    }
}

/// A web-transport request not yet answered.
struct WebRequest {
    /// Where its replies go.
    reply: tokio::sync::oneshot::Sender<Vec<Vec<u8>>>,
    /// The reply packets so far.
    packets: Vec<Vec<u8>>,
    /// Resolves it started that wait for the upstream, each with the time
    /// the state machine gives up on it (and answers 504 itself).
    waiting: Vec<(ResolveToken, UnixMillis)>,
}

struct Shard {
    id: ShardId,
    server: Service,
    router: Arc<Router>,
    dns: Option<tokio::sync::mpsc::Sender<DnsQuery>>,
    /// The state machine's resolve timeout (when it answers 504 itself).
    resolve_timeout_ms: u64,
    /// Web-transport requests not yet answered: this turn's, and those
    /// waiting for a late answer (at most [`MAX_OPEN_WEB_REQUESTS`]).
    web: HashMap<u64, WebRequest>,
    /// Which web request each waiting resolve belongs to.
    web_resolves: HashMap<ResolveToken, u64>,
    next_web: u64,
    misrouted_forwarded: u64,
    misrouted_dropped: u64,
    stopping: bool,
    /// A failure injected by a test, ending the loop at once.
    fault: Option<std::io::Error>,
    /// The cluster bus, in a cluster.
    cluster: Option<ShardCluster>,
    /// The node's clock, whose [`Clock::mono_nanos`] stamps publishes.
    clock: Clock,
    /// Publish → send latency.
    latency: PublishLatency,
    /// Publish → pick-up latency (router to this shard's turn).
    pickup: PublishLatency,
}

impl Shard {
    /// Writes the shard's state for the next start; a failure is logged (the
    /// next start then finds an incomplete save and starts empty).
    fn save(&self, target: &SaveTarget, now: UnixMillis) {
        let started = Instant::now();
        let Some(master) = self.server.current_master() else {
            tracing::error!(shard = self.id, "state not saved: no master key");
            return;
        };
        match super::snapshot::save_shard(
            &target.data_dir,
            master,
            target.id,
            self.id,
            &self.server,
            now,
        ) {
            Ok(bytes) => tracing::info!(
                shard = self.id,
                connections = self.server.connections(),
                bytes,
                ms = started.elapsed().as_millis() as u64,
                "state saved"
            ),
            Err(e) => tracing::error!(shard = self.id, %e, "state not saved"),
        }
    }

    fn on_datagram(&mut self, now: UnixMillis, from: SocketAddr, bytes: &[u8]) {
        // docs/PROTOCOL.md §8.3: a datagram on the wrong socket (fallback mode)
        // goes to its owner through the router, in the owner's queue of
        // forwarded datagrams, and only once it authenticated: garbage
        // claiming another shard's affinity costs the owner nothing and never
        // takes the room of publishes. STUN is answered by any shard.
        if self.router.shards() > 1 && !stun::is_stun(bytes) {
            if let Some(id) = peek_conn_id(bytes) {
                let owner = self.router.shard_of_affinity(id.affinity());
                if owner != self.id {
                    let forwarded = self.server.authentic(now, bytes)
                        && self.router.forward(owner, from, bytes).is_ok();
                    // A dropped one is resent by its client (or was garbage).
                    if forwarded {
                        self.misrouted_forwarded += 1;
                    } else {
                        self.misrouted_dropped += 1;
                    }
                    return;
                }
            }
        }
        self.server.handle_datagram(now, from, bytes);
    }

    fn on_message(&mut self, now: UnixMillis, message: ShardMessage) {
        match message {
            ShardMessage::Publish {
                account,
                bitmask,
                stamp,
            } => {
                self.pickup
                    .record(self.clock.mono_nanos().saturating_sub(stamp));
                let published = self
                    .server
                    .handle_publish_stamped(now, &account, &bitmask, stamp);
                if let Err(e) = published {
                    tracing::warn!(shard = self.id, %e, "publish refused");
                }
            }
            ShardMessage::Web {
                peer,
                packet,
                reply,
            } => self.on_web_request(now, peer, &packet, reply),
            ShardMessage::ResolveAnswer { token, answer } => {
                self.server
                    .handle_resolve_answer(token, answer.as_deref().map_err(|&c| c));
                self.resolve_done(token);
            }
            ShardMessage::Shutdown => self.stopping = true,
            ShardMessage::Keys(keys) => self.server.set_keys(*keys),
            ShardMessage::StunLimits { rate, burst } => self.server.set_stun_limits(rate, burst),
            ShardMessage::Revocations(revocations) => {
                self.server.set_revocations(now, revocations);
            }
            ShardMessage::Fault(Fault::Panic) => {
                panic!("shard {}: failure injected by a test", self.id)
            }
            ShardMessage::Fault(Fault::IoError) => {
                self.fault = Some(std::io::Error::other("I/O failure injected by a test"));
            }
            ShardMessage::CatchUpAnswer { token, answer } => {
                self.server.handle_catch_up_answer(token, answer.as_deref());
            }
            ShardMessage::CatchUpQuery {
                account,
                mark,
                reply,
            } => {
                let known = self
                    .server
                    .catch_up_since(&account, mark)
                    .map(|c| c.mask().map(|m| m.as_bytes().to_vec()).unwrap_or_default());
                let _ = reply.send(known);
            }
            ShardMessage::Hearing { partitions, heard } => {
                self.server.set_hearing(now, &partitions, heard);
            }
            ShardMessage::BusGap { partition } => {
                self.server.bus_gap(now, partition);
            }
        }
    }

    /// docs/PROTOCOL.md §9 (D22): a web request stays open until its
    /// replies are complete — what its packet produces at once, and the
    /// answer of any resolve it started (the upstream's, or the state
    /// machine's 502/504).
    fn on_web_request(
        &mut self,
        now: UnixMillis,
        peer: SocketAddr,
        packet: &[u8],
        reply: tokio::sync::oneshot::Sender<Vec<Vec<u8>>>,
    ) {
        if self.web_resolves.len() >= MAX_OPEN_WEB_REQUESTS {
            // Dropping `reply` answers 503 on the control side.
            tracing::debug!(shard = self.id, "too many open web requests: refused");
            return;
        }
        // Events queued so far belong to earlier requests; those the state
        // machine queues now belong to this one.
        self.handle_events(None);
        self.next_web += 1;
        let id = self.next_web;
        self.web.insert(
            id,
            WebRequest {
                reply,
                packets: Vec::new(),
                waiting: Vec::new(),
            },
        );
        self.server
            .handle_web_request(now, peer, packet, WebRequestId(id));
        self.handle_events(Some((id, now)));
    }

    /// A resolve was answered (its reply is queued): the web request that
    /// waited for it, if any, waits no more for it.
    fn resolve_done(&mut self, token: ResolveToken) {
        if let Some(id) = self.web_resolves.remove(&token) {
            if let Some(w) = self.web.get_mut(&id) {
                w.waiting.retain(|(t, _)| *t != token);
            }
        }
    }

    /// Resolves the state machine gave up on (it answered 504 in this turn's
    /// `handle_timeout`) no longer hold their web request.
    fn web_timeouts(&mut self, now: UnixMillis) {
        if self.web_resolves.is_empty() {
            return;
        }
        let mut done = Vec::new();
        for w in self.web.values() {
            done.extend(
                w.waiting
                    .iter()
                    .filter(|(_, deadline)| *deadline <= now)
                    .map(|(t, _)| *t),
            );
        }
        for token in done {
            self.resolve_done(token);
        }
    }

    /// Hands the state machine's events to the DNS forwarder. `web`: the
    /// events come from this web request (handled at `now`), which then
    /// waits for the resolves they start.
    fn handle_events(&mut self, web: Option<(u64, UnixMillis)>) {
        while let Some(event) = self.server.poll_event() {
            match event {
                ServiceEvent::ResolveUpstream { token, query } => {
                    if let Some((id, now)) = web {
                        if let Some(w) = self.web.get_mut(&id) {
                            let deadline = now.plus_millis(self.resolve_timeout_ms);
                            w.waiting.push((token, deadline));
                            self.web_resolves.insert(token, id);
                        }
                    }
                    let sent = self.dns.as_ref().is_some_and(|dns| {
                        dns.try_send(DnsQuery {
                            shard: self.id,
                            token,
                            query,
                        })
                        .is_ok()
                    });
                    if !sent {
                        // No upstream configured, or the forwarder is overloaded.
                        self.server.handle_resolve_answer(token, Err(502));
                        self.resolve_done(token);
                    }
                }
                ServiceEvent::CatchUpRequest {
                    token,
                    account,
                    mark,
                    partition,
                } => {
                    // docs/PROTOCOL.md §10.4: never wait on the bus; a full
                    // channel (or no bus) answers with a resync at once.
                    let question = CatchUpQuestion {
                        shard: self.id,
                        token,
                        account,
                        mark,
                        partition,
                    };
                    let sent = self
                        .cluster
                        .as_ref()
                        .is_some_and(|c| c.questions.try_send(question).is_ok());
                    if !sent {
                        self.server.handle_catch_up_answer(token, None);
                    }
                }
            }
        }
    }

    /// Moves every pending datagram into the driver and submits the batch(es);
    /// then answers the web-transport requests whose replies are complete,
    /// whatever happened, and forgets those the control plane gave up on.
    fn transmit(&mut self, now: UnixMillis, driver: &mut dyn Driver) -> std::io::Result<()> {
        let answering = self.web.values().any(|w| w.waiting.is_empty());
        let result = self.fill_and_flush(now, driver, answering);
        if !self.web.is_empty() {
            let complete: Vec<u64> = self
                .web
                .iter()
                .filter(|(_, w)| w.waiting.is_empty())
                .map(|(&id, _)| id)
                .collect();
            for id in complete {
                if let Some(w) = self.web.remove(&id) {
                    let _ = w.reply.send(w.packets);
                }
            }
            // The control plane answered 504 and went: late packets of these
            // requests are dropped.
            let abandoned: Vec<u64> = self
                .web
                .iter()
                .filter(|(_, w)| w.reply.is_closed())
                .map(|(&id, _)| id)
                .collect();
            for id in abandoned {
                if let Some(w) = self.web.remove(&id) {
                    for (token, _) in w.waiting {
                        self.web_resolves.remove(&token);
                    }
                }
            }
        }
        result
    }

    /// Sends up to [`SEND_PER_TURN`] datagrams (all that are queued while
    /// `answering`: a web-transport request is to be answered this turn and
    /// its replies, queued ahead of any notify, must come out); the rest
    /// wait for the next turn.
    fn fill_and_flush(
        &mut self,
        now: UnixMillis,
        driver: &mut dyn Driver,
        answering: bool,
    ) -> std::io::Result<()> {
        let mut produced = 0;
        let mut early = FIRST_FLUSH;
        loop {
            if produced >= SEND_PER_TURN && !answering {
                break;
            }
            if produced == early {
                early *= 2;
                driver.flush()?;
            }
            let Some(slot) = driver.send_slot() else {
                // Full batch: submit it. If that fails, the rest waits in the
                // state machine's queues for the next turn.
                driver.flush()?;
                if driver.send_slot().is_none() {
                    break;
                }
                continue;
            };
            let Some(t) = self.server.poll_transmit(now, slot) else {
                break;
            };
            produced += 1;
            // Publishes whose last notify this was: their latency ends here.
            while let Some(stamp) = self.server.poll_published() {
                let ns = self.clock.mono_nanos().saturating_sub(stamp);
                self.latency.record(ns);
            }
            match t.web {
                None => driver.commit_send(t.destination, t.size),
                Some(WebRequestId(id)) => {
                    if let Some(w) = self.web.get_mut(&id) {
                        w.packets.push(slot[..t.size].to_vec());
                    }
                }
            }
        }
        driver.flush()
    }

    fn publish_metrics(
        &self,
        driver: &dyn Driver,
        socket_drops: u64,
        sink: &Mutex<ShardMetrics>,
        cpu: Option<usize>,
    ) {
        let d = driver.stats();
        let m = ShardMetrics {
            shard: self.id,
            cpu,
            connections: self.server.connections() as u64,
            accounts: self.server.table().accounts_len() as u64,
            service: self.server.stats().clone(),
            datagrams_received: d.received,
            datagrams_sent: d.sent,
            send_errors: d.send_errors,
            receive_drops: d.receive_drops,
            socket_drops,
            send_batches: d.send_batches,
            router_forwarded: self.router.forwarded(self.id),
            router_overflows: self.router.overflows(self.id),
            up: true,
            misrouted_forwarded: self.misrouted_forwarded,
            misrouted_dropped: self.misrouted_dropped,
            forwarded_in: self.router.forwarded_datagrams(self.id),
            publish_latency: self.latency.snapshot(),
            publish_pickup: self.pickup.snapshot(),
        };
        if let Ok(mut guard) = sink.lock() {
            *guard = m;
        }
    }
}
