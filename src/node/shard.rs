//! One shard: a pinned thread that owns a socket, a driver, a server state
//! machine and an inbox, and runs the loop that connects them.
//!
//! The loop, per turn: wait for datagrams, the inbox's eventfd or the next
//! timer; feed every received datagram to the state machine (or forward one
//! that belongs to another shard); drain the inbox (publishes, forwarded
//! datagrams, web-transport requests, DNS answers); fire due timers; then
//! write every resulting datagram into the driver's send slots and submit the
//! whole batch at once. The shard parses nothing itself beyond the conn id
//! that says which shard owns a datagram.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::router::{Router, ShardId, ShardMessage};
use super::Clock;
use crate::control::dns::DnsQuery;
use crate::net::{self, Driver, IoBackend, Waker};
use crate::packet::{peek_conn_id, MasterKey};
use crate::proto::{stun, Service, ServiceConfig, ServiceEvent, WebRequestId};
use crate::time::UnixMillis;

/// Inbox messages handled per loop turn at most, so receiving stays fair.
const INBOX_PER_TURN: usize = 4096;
/// Datagrams sent per loop turn at most before the shard reads its socket
/// again: a publish to a large account (or many publishes) must not keep
/// acknowledgements and heartbeats waiting until the socket overflows.
const SEND_PER_TURN: usize = 1024;
/// While more datagrams than this wait to be sent, the shard takes no more
/// messages from its inbox: publishes wait there (the inbox is bounded, so
/// the router then refuses them and the publisher hears 503), instead of
/// piling retransmission timers onto notifies that cannot go out yet.
const BACKLOG_HIGH: usize = 16 * SEND_PER_TURN;
/// How long a shard sheds new connects after it saw its socket overflow.
const SHED_FOR_MS: u64 = 1_000;
/// How often a shard publishes its counters for `/metrics`.
const METRICS_PERIOD: Duration = Duration::from_millis(200);

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
    /// The shard's inbox.
    pub inbox: Receiver<ShardMessage>,
    /// The eventfd that wakes this shard.
    pub waker: Arc<Waker>,
    /// The router, to forward misrouted datagrams.
    pub router: Arc<Router>,
    /// State machine settings.
    pub server: ServiceConfig,
    /// The node's master key.
    pub master: [u8; 32],
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
}

/// Where a stopping shard writes its state (docs/PROTOCOL.md §6, "Restarts").
#[derive(Debug, Clone)]
pub struct SaveTarget {
    /// The node's data directory.
    pub data_dir: std::path::PathBuf,
    /// The save this shard's file belongs to.
    pub id: super::snapshot::SaveId,
}

/// Runs a shard until it is told to shut down. Errors only at set-up.
pub fn run(setup: ShardSetup) -> std::io::Result<()> {
    if let Some(cpu) = setup.cpu {
        if !super::pin_current_thread(cpu) {
            tracing::warn!(shard = setup.id, cpu, "could not pin the shard thread");
        }
    }
    let socket_fd = std::os::fd::AsRawFd::as_raw_fd(&setup.socket);
    let mut driver = net::open_driver(setup.backend, setup.socket, setup.waker.fd(), setup.batch)?;
    let mut socket_drops = SocketDrops::new(socket_fd);
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let now = setup.clock.now();
    let mut server = Service::new(setup.server, MasterKey::new(setup.master), seed, now);
    if let Some((epoch, state)) = &setup.restore {
        let started = Instant::now();
        let done = server.restore(*epoch, &state.accounts, &state.connections);
        tracing::info!(
            shard = setup.id,
            accounts = done.accounts,
            connections = done.connections,
            skipped = done.skipped,
            ms = started.elapsed().as_millis() as u64,
            "state restored"
        );
    }
    drop(setup.restore);
    let mut shard = Shard {
        id: setup.id,
        server,
        router: setup.router,
        dns: setup.dns,
        web: HashMap::new(),
        next_web: 0,
        stopping: false,
    };
    tracing::info!(shard = shard.id, cpu = ?setup.cpu, io = driver.backend().name(), "shard started");
    let mut last_metrics = Instant::now();
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
        let backlog = shard.server.transmit_backlog();
        let inbox_ready = !setup.inbox.is_empty() && backlog < BACKLOG_HIGH;
        let timeout = if !inbox_ready && backlog == 0 && last_work.elapsed() >= setup.spin {
            shard
                .server
                .poll_timeout()
                .map(|t| Duration::from_millis(t.millis_since(now)))
                .map_or(METRICS_PERIOD, |t| t.min(METRICS_PERIOD))
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
        let mut taken = 0;
        while taken < INBOX_PER_TURN && shard.server.transmit_backlog() < BACKLOG_HIGH {
            let Ok(message) = setup.inbox.try_recv() else {
                break;
            };
            shard.on_message(now, message);
            taken += 1;
        }
        if taken > 0 {
            last_work = Instant::now();
        }
        if shard.server.poll_timeout().is_some_and(|t| t <= now) {
            shard.server.handle_timeout(now);
        }
        shard.handle_events();
        send_errors.check(shard.id, "send", shard.transmit(now, driver.as_mut()))?;
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
                shard.save(target, setup.clock.now(), MasterKey::new(setup.master));
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

/// A web-transport request's reply channel and the packets gathered for it.
type WebReplies = (tokio::sync::oneshot::Sender<Vec<Vec<u8>>>, Vec<Vec<u8>>);

struct Shard {
    id: ShardId,
    server: Service,
    router: Arc<Router>,
    dns: Option<tokio::sync::mpsc::Sender<DnsQuery>>,
    /// Web-transport requests answered in this turn: their replies so far.
    web: HashMap<u64, WebReplies>,
    next_web: u64,
    stopping: bool,
}

impl Shard {
    /// Writes the shard's state for the next start; a failure is logged (the
    /// next start then finds an incomplete save and starts empty).
    fn save(&self, target: &SaveTarget, now: UnixMillis, master: MasterKey) {
        let started = Instant::now();
        match super::snapshot::save_shard(
            &target.data_dir,
            &master,
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
        // docs/PROTOCOL.md §8: a datagram on the wrong socket (fallback mode) goes
        // to its owner through the router. STUN is answered by any shard.
        if self.router.shards() > 1 && !stun::is_stun(bytes) {
            if let Some(id) = peek_conn_id(bytes) {
                let owner = self.router.shard_of_affinity(id.affinity());
                if owner != self.id {
                    let message = ShardMessage::Forward {
                        from,
                        datagram: bytes.into(),
                    };
                    // A full inbox drops it (counted by the router); the client resends.
                    let _ = self.router.send(owner, message);
                    return;
                }
            }
        }
        self.server.handle_datagram(now, from, bytes);
    }

    fn on_message(&mut self, now: UnixMillis, message: ShardMessage) {
        match message {
            ShardMessage::Publish { account, bitmask } => {
                if let Err(e) = self.server.handle_publish(now, &account, &bitmask) {
                    tracing::warn!(shard = self.id, %e, "publish refused");
                }
            }
            ShardMessage::Forward { from, datagram } => {
                self.server.handle_datagram(now, from, &datagram);
            }
            ShardMessage::Web {
                peer,
                packet,
                reply,
            } => {
                self.next_web += 1;
                let id = self.next_web;
                self.web.insert(id, (reply, Vec::new()));
                self.server
                    .handle_web_request(now, peer, &packet, WebRequestId(id));
            }
            ShardMessage::ResolveAnswer { token, answer } => {
                self.server
                    .handle_resolve_answer(token, answer.as_deref().map_err(|&c| c));
            }
            ShardMessage::Shutdown => self.stopping = true,
        }
    }

    fn handle_events(&mut self) {
        while let Some(event) = self.server.poll_event() {
            match event {
                ServiceEvent::ResolveUpstream { token, query } => {
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
                    }
                }
            }
        }
    }

    /// Moves every pending datagram into the driver and submits the batch(es);
    /// then answers this turn's web-transport requests, whatever happened.
    fn transmit(&mut self, now: UnixMillis, driver: &mut dyn Driver) -> std::io::Result<()> {
        let result = self.fill_and_flush(now, driver);
        // Web requests get what their turn produced (a resolve answered later
        // by the upstream is not waited for; its late packets are dropped).
        for (_, (reply, packets)) in self.web.drain() {
            let _ = reply.send(packets);
        }
        result
    }

    /// Sends up to [`SEND_PER_TURN`] datagrams (more while a web-transport
    /// request of this turn still waits for its answer, which is queued
    /// ahead of any notify); the rest wait for the next turn.
    fn fill_and_flush(&mut self, now: UnixMillis, driver: &mut dyn Driver) -> std::io::Result<()> {
        let mut produced = 0;
        loop {
            if produced >= SEND_PER_TURN && self.web.is_empty() {
                break;
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
            match t.web {
                None => driver.commit_send(t.destination, t.size),
                Some(WebRequestId(id)) => {
                    if let Some((_, replies)) = self.web.get_mut(&id) {
                        replies.push(slot[..t.size].to_vec());
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
        };
        if let Ok(mut guard) = sink.lock() {
            *guard = m;
        }
    }
}
