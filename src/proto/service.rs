//! The server shard's state machine (docs/PROTOCOL.md §3–§7).
//!
//! One [`Service`] owns the connections of the accounts its shard owns. It
//! opens every datagram with keys derived from the master key and the
//! datagram's conn id (nothing per connection is stored to do so), decodes
//! the message, applies the replay window, and queues the answer; it turns a
//! publish into notifies for every device of the account and retransmits them
//! with backoff until they are acknowledged. Anything that fails to parse or
//! authenticate is counted and otherwise ignored: no answer, no state change.
//!
//! Answers are queued as *intents* (who, which conn id, what kind) and only
//! encoded and sealed in [`Service::poll_transmit`], straight into the I/O
//! layer's buffer, so the hot path neither allocates nor copies twice. Queues
//! are bounded: a reply that does not fit is dropped and counted (the client
//! retries), a notify is never dropped because each connection is queued at
//! most once and its state lives in its record until acknowledged.

use std::collections::VecDeque;
use std::net::SocketAddr;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::limit::{RateLimiter, DEFAULT_BUCKETS};
use super::revocation::Revocations;
use super::{
    stun, Freshness, ReplayWindow, Transmit, CONNECTION_TIMEOUT_MS, MAX_BITMASK,
    RETRANSMIT_INITIAL_MS, RETRANSMIT_TRIES,
};
use crate::codec::{
    Message, PresenceConnectResponse, PresenceDisconnectResponse, PresenceEndpointResponse,
    PresenceErrorInvalidSerial, PresenceErrorRefused, PresenceNotify, PresenceResolveResponse,
    PresenceStatus, ServiceHeader,
};
use crate::packet::{
    fragment_count, open_in_place, seal_in_place, write_fragment, BindingError, BindingKey, ConnId,
    Direction, MasterKey, PacketKey, FRAGMENT_HEADER_LEN, HEADER_LEN, MAX_FRAGMENT_DATA,
    MAX_PACKET, MAX_PLAINTEXT,
};
use crate::table::{
    Account, AccountKey, AccountSlot, CatchUp, Connection, Slot, Table, TimerWheel, MAX_TRIES,
};
use crate::time::{UnixMillis, UnixSeconds};

/// Tunables of one shard.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// ConnectionTimeout announced to clients (ms); idle connections are
    /// dropped after twice this.
    pub connection_timeout_ms: u32,
    /// Connections this shard holds at most; connects beyond get 503.
    pub max_connections: usize,
    /// First notify retransmission delay (ms), doubled each time.
    pub retransmit_initial_ms: u64,
    /// Notify retransmissions before waiting for the next heartbeat.
    pub retransmit_tries: u8,
    /// Replies that may wait for `poll_transmit`; more are dropped and counted.
    pub max_queued_replies: usize,
    /// DNS queries that may wait for the upstream at once.
    pub max_pending_resolves: usize,
    /// How long a DNS query may wait for the upstream (ms) before a 504.
    pub resolve_timeout_ms: u64,
    /// STUN Binding requests answered per second per source address
    /// (docs/PROTOCOL.md §7); 0 = unlimited, for benchmarks only.
    pub stun_rate_per_sec: u32,
    /// Burst of STUN requests allowed per source address.
    pub stun_burst: u32,
    /// How long (s) an account's catch-up state is kept after its last
    /// device left or its last publish (docs/PROTOCOL.md §6, "Catch-up"),
    /// and how often at most the catch-up union restarts.
    pub catch_up_window_secs: u32,
    /// Account-affinity partitions of the cluster this node belongs to
    /// (docs/PROTOCOL.md §10); 0: a node on its own. In a cluster, a new
    /// connection whose mark this node cannot place asks the other nodes
    /// ([`ServiceEvent::CatchUpRequest`]) before it is answered.
    pub cluster_partitions: u32,
    /// How long a connect waits for the other nodes' catch-up answer (ms)
    /// before it is answered with a resync.
    pub catch_up_timeout_ms: u64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            connection_timeout_ms: CONNECTION_TIMEOUT_MS,
            max_connections: 10_000_000,
            retransmit_initial_ms: RETRANSMIT_INITIAL_MS,
            retransmit_tries: RETRANSMIT_TRIES,
            max_queued_replies: 65_536,
            max_pending_resolves: 1024,
            resolve_timeout_ms: 5_000,
            stun_rate_per_sec: 100,
            stun_burst: 200,
            catch_up_window_secs: DEFAULT_CATCH_UP_WINDOW_SECS,
            cluster_partitions: 0,
            catch_up_timeout_ms: 500,
        }
    }
}

/// Counters of one shard; the node sums them across shards for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Datagrams handed to `handle_datagram`.
    pub datagrams_in: u64,
    /// Datagrams produced by `poll_transmit`.
    pub datagrams_out: u64,
    /// Dropped: too short, reserved conn id, or not a message after decryption.
    pub dropped_malformed: u64,
    /// Dropped: failed authentication (AEAD).
    pub dropped_auth: u64,
    /// Dropped: Serial already seen or below the window.
    pub dropped_replay: u64,
    /// Dropped: a service → client message sent to the service.
    pub dropped_unexpected: u64,
    /// Replies dropped because the reply queue was full.
    pub dropped_queue_full: u64,
    /// Connections accepted (new or replaced).
    pub connects: u64,
    /// Connects refused (invalid binding, expired, node full).
    pub refused: u64,
    /// Connections removed by a disconnect request.
    pub disconnects: u64,
    /// Connections removed for idleness or credential expiry.
    pub expired: u64,
    /// Endpoint moves on authenticated fresh packets.
    pub migrations: u64,
    /// Publishes handled.
    pub publishes: u64,
    /// Notifies sent for the first time.
    pub notifies_sent: u64,
    /// Notify retransmissions.
    pub notifies_retransmitted: u64,
    /// Notifies acknowledged.
    pub notifies_acked: u64,
    /// DNS queries handed to the upstream.
    pub resolves: u64,
    /// Heartbeats answered.
    pub heartbeats: u64,
    /// STUN Binding requests answered.
    pub stun_answered: u64,
    /// STUN datagrams refused: malformed, unsupported or over the rate limit.
    pub stun_dropped: u64,
    /// Refusals not sent because their source exceeded its rate.
    pub refusals_rate_limited: u64,
    /// Dropped before decryption: the source failed authentication too often.
    pub dropped_auth_limited: u64,
    /// New connections told what was published while their device was away.
    pub catch_ups: u64,
    /// New connections told to resynchronise everything (the node could not know).
    pub resyncs: u64,
    /// Catch-ups (and resyncs) acknowledged before a publish joined them.
    pub catch_ups_acked: u64,
    /// New connects refused with 503 and a retry-after while the shard was
    /// overloaded (its socket overflowing).
    pub connects_shed: u64,
    /// Endpoints validated: a device echoed the challenge sent to it.
    pub validations: u64,
    /// Answers not sent because they would have exceeded three times the
    /// bytes received from an address not yet validated (a smaller refusal
    /// went instead, where one fits).
    pub replies_capped: u64,
    /// Notify retransmissions held back: the endpoint is not validated, so
    /// the pending state waits for the device's next packet.
    pub retransmits_held: u64,
    /// Connections dropped because a revocation named their account.
    pub revoked: u64,
    /// Resolves refused (429): the connection asked more than its rate.
    pub resolves_limited: u64,
    /// Account records whose catch-up window ran out with no device left.
    pub accounts_expired: u64,
    /// New connections whose catch-up was asked of the other nodes of the
    /// cluster (docs/PROTOCOL.md §10.4).
    pub catch_ups_asked: u64,
    /// … and answered exactly by one of them (the rest resynchronised).
    pub catch_ups_answered: u64,
    /// Catch-up questions of other nodes this shard could answer exactly.
    pub catch_up_answers_given: u64,
    /// Times the shard began hearing a partition's publishes again (start,
    /// a bus outage, new interest) and told its records so (a resync).
    pub partition_gaps: u64,
}

/// One connection as a saved state holds it (docs/PROTOCOL.md §6,
/// "Restarts"): everything its record says, with its account by key and its
/// times in seconds since the [`Service::epoch`] it was saved under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedConnection {
    /// The connection id.
    pub conn_id: ConnId,
    /// The account it belongs to.
    pub account: AccountKey,
    /// Highest client Serial seen.
    pub highest_serial: u32,
    /// Replay window below it.
    pub window: u64,
    /// Seconds since the epoch of the last authenticated packet.
    pub last_seen: u32,
    /// Credential expiry, Unix seconds.
    pub expires: u32,
    /// The UDP endpoint, if one is known.
    pub endpoint: Option<SocketAddr>,
    /// Pending bits not yet acknowledged (`pending_len` bytes of `pending`).
    pub pending: [u8; MAX_BITMASK],
    /// Length of the pending mask (0: nothing pending).
    pub pending_len: u8,
    /// Retransmissions of the current notify so far.
    pub tries: u8,
    /// The pending bits are a catch-up not yet joined by a publish.
    pub catch_up: bool,
    /// The endpoint was validated (docs/PROTOCOL.md §7.9).
    pub validated: bool,
    /// The parity of the master key the connection uses (§7.11).
    pub key_parity: u8,
}

/// What [`Service::restore`] took back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restored {
    /// Account records restored.
    pub accounts: usize,
    /// Connections restored.
    pub connections: usize,
    /// Records left out: a duplicate, an unknown account, or no room.
    pub skipped: usize,
}

/// Identifies one DNS query waiting for the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResolveToken(pub u64);

/// Identifies one connect waiting for the cluster's catch-up answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CatchUpToken(pub u64);

/// Something the I/O layer must do for the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEvent {
    /// Send `query` (DNS wire format) to the upstream resolver and hand the
    /// answer back with [`Service::handle_resolve_answer`].
    ResolveUpstream {
        /// Quote this with the answer.
        token: ResolveToken,
        /// The DNS query.
        query: Vec<u8>,
    },
    /// Ask the other nodes of the cluster what was published to `account`
    /// after the device's `mark` (docs/PROTOCOL.md §10.4), once this node
    /// hears the account's `partition`, and hand the answer back with
    /// [`Service::handle_catch_up_answer`]. The device's connect is answered
    /// only then (or with a resync after `catch_up_timeout_ms`).
    CatchUpRequest {
        /// Quote this with the answer.
        token: CatchUpToken,
        /// The account.
        account: String,
        /// The Serial the device last processed (another node's).
        mark: u32,
        /// The account's partition (affinity mod the partition count).
        partition: u32,
    },
}

/// A connect whose answer waits for the cluster's catch-up (docs/PROTOCOL.md §10.4).
struct ParkedConnect {
    token: CatchUpToken,
    /// The latest connect of the device (a retransmission replaces it).
    origin: Origin,
    deadline: UnixMillis,
    /// The account's partition: the connect is answered once this node
    /// hears it (what was published before, the answer covers).
    partition: u32,
    /// The cluster's answer once it came (`Some(None)`: nobody could
    /// tell, a resync); a connect with no mark to ask about starts with
    /// `Some(None)` and waits only for the partition to be heard.
    answer: Option<Option<Vec<u8>>>,
}

/// Connects a shard lets wait for the cluster at once; more are answered
/// with a resync at once.
const MAX_PARKED_CONNECTS: usize = 1024;

/// A mask naming every store (docs/PROTOCOL.md §6.7: a resync).
const ALL_STORES: [u8; MAX_BITMASK] = [0xFF; MAX_BITMASK];

/// Why a publish was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The bitmask is empty or longer than 32 bytes.
    #[error("bitmask must be 1 to {MAX_BITMASK} bytes")]
    BadBitmask,
    /// Every bit of the bitmask is zero: it names no store.
    #[error("bitmask names no store (every bit is zero)")]
    NoStore,
}

/// `Status` codes of refusals (docs/PROTOCOL.md §2).
mod status {
    pub(super) const UNAUTHORIZED: u16 = 401;
    pub(super) const FORBIDDEN: u16 = 403;
    pub(super) const NOT_FOUND: u16 = 404;
    pub(super) const BAD_GATEWAY: u16 = 502;
    pub(super) const UNAVAILABLE: u16 = 503;
    pub(super) const GATEWAY_TIMEOUT: u16 = 504;
    /// Too many requests: a connection's resolve rate (docs/PROTOCOL.md §7.9).
    pub(super) const TOO_MANY: u16 = 429;
    /// RFC 8470 "Too Early": the answer is withheld until the device's
    /// address is validated (docs/PROTOCOL.md §7.9); ask again.
    pub(super) const TOO_EARLY: u16 = 425;
}

#[derive(Debug)]
enum ReplyKind {
    Connected,
    Status,
    Endpoint,
    InvalidSerial(u32),
    /// A refusal: Status, StatusDescription, StatusExtended (a retry-after in ms).
    Refused(u16, &'static str, Option<i64>),
    Disconnected,
    Resolved(Result<Box<[u8]>, u16>),
}

/// Identifies a request that came over the web-service transport
/// (docs/PROTOCOL.md §9) rather than UDP; its replies are handed back with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WebRequestId(pub u64);

/// How a request reached the node, and so how its replies leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Udp,
    Web(WebRequestId),
}

#[derive(Debug)]
struct Reply {
    to: SocketAddr,
    conn_id: ConnId,
    ack: i64,
    via: Via,
    /// `k_s2c`, derived while opening the request, so the reply does not
    /// derive the connection secret a second time.
    key: [u8; 32],
    /// Where the connection was when the request was handled (checked
    /// against `conn_id` before use), to skip a second table lookup.
    slot: Option<Slot>,
    /// Bytes of the request: an address not yet validated is sent at most
    /// three times this in answer (docs/PROTOCOL.md §7.9).
    request_bytes: u16,
    kind: ReplyKind,
}

struct PendingResolve {
    token: ResolveToken,
    origin: Origin,
    deadline: UnixMillis,
}

/// An authenticated packet's circumstances, as [`Service::handle_message`]
/// takes them.
struct Arrival {
    from: SocketAddr,
    conn_id: ConnId,
    via: Via,
    /// `k_s2c`, derived while opening the packet.
    key: [u8; 32],
    /// Bytes of the datagram.
    bytes: u16,
    /// The parity of the master key that opened it.
    parity: u8,
    /// The connection of its conn id, looked up before it was opened.
    held: Option<Slot>,
}

/// Who sent an authenticated request, and what its replies need.
#[derive(Clone, Copy)]
struct Origin {
    from: SocketAddr,
    conn_id: ConnId,
    serial: u32,
    via: Via,
    /// `k_s2c`, derived while opening the request.
    key: [u8; 32],
    /// Bytes of the request datagram.
    bytes: u16,
}

impl Origin {
    fn reply(&self, kind: ReplyKind) -> Reply {
        Reply {
            to: self.from,
            conn_id: self.conn_id,
            ack: i64::from(self.serial),
            via: self.via,
            key: self.key,
            slot: None,
            request_bytes: self.bytes,
            kind,
        }
    }

    fn reply_for(&self, slot: Slot, kind: ReplyKind) -> Reply {
        Reply {
            slot: Some(slot),
            ..self.reply(kind)
        }
    }
}

/// Where a sealed message goes, and the key it is sealed with.
#[derive(Clone, Copy)]
struct Destination {
    conn_id: ConnId,
    to: SocketAddr,
    via: Via,
    /// `k_s2c` of the connection.
    key: [u8; 32],
}

/// A message too large for one packet, being sent chunk by chunk (docs/PROTOCOL.md §5).
struct FragmentedSend {
    dest: Destination,
    message: Vec<u8>,
    id: u16,
    next: usize,
    count: usize,
}

#[derive(Debug, Clone, Copy)]
struct RetransmitTimer {
    slot: u32,
    serial: u32,
    tries: u8,
}

/// A master key in use, with what the node derives from it once.
struct MasterKeyState {
    master: MasterKey,
    /// The binding key of generation 0 (nothing revoked).
    binder: BindingKey,
    /// Until then (the end of a rotation's grace period); `None`: for good.
    until: Option<UnixMillis>,
}

impl MasterKeyState {
    fn new(master: MasterKey, until: Option<UnixMillis>) -> Self {
        MasterKeyState {
            binder: BindingKey::from_master(&master),
            master,
            until,
        }
    }

    fn usable(&self, now: UnixMillis) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

/// The node's master keys (docs/PROTOCOL.md §7.11): the current one, and
/// during a rotation's grace period the previous one, whose credentials
/// still verify until then.
#[derive(Clone, Debug)]
pub struct KeySet {
    /// The master key new connections and credentials use.
    pub current: MasterKey,
    /// The current key's parity (0 or 1); each rotation flips it, so the
    /// previous key has the other one. A connection remembers the parity of
    /// the key it was opened with.
    pub parity: u8,
    /// The previous master key, and the end of its grace period.
    pub previous: Option<(MasterKey, UnixMillis)>,
}

/// A new life of an account starts its notify Serials at a random point of
/// `[FIRST_SERIAL_MIN, FIRST_SERIAL_MIN + FIRST_SERIAL_SPAN)`, leaving more
/// than 2^31 publishes before they wrap.
const FIRST_SERIAL_MIN: u32 = 1 << 20;
const FIRST_SERIAL_SPAN: u32 = 1 << 30;

/// Bytes a `PresenceResolveResponse` and its packet add to the DNS answer
/// (header fields with an IPv6 endpoint, framing), rounded up.
const RESOLVE_OVERHEAD: usize = 200;

/// Stamped publishes waiting for their notifies at most; beyond, a
/// publish goes unstamped (its latency is not recorded).
const MAX_PUBLISH_STAMPS: usize = 1 << 16;

/// A shed connect is told to come back after this long, plus as much again
/// at random (ms), so the devices it turns away come back spread out.
const SHED_RETRY_AFTER_MS: u64 = 1_000;

/// Default catch-up window: 24 hours (docs/PROTOCOL.md §6).
pub const DEFAULT_CATCH_UP_WINDOW_SECS: u32 = 86_400;

/// Failed authentications tolerated per second per source address; beyond,
/// the source's packets are dropped before decryption (docs/PROTOCOL.md §7).
const AUTH_FAILURES_PER_SEC: u32 = 100;
/// Burst of failed authentications per source address.
const AUTH_FAILURE_BURST: u32 = 200;

/// DNS resolves per second per connection (docs/PROTOCOL.md §7.9).
const RESOLVES_PER_SEC: u32 = 10;
/// Burst of resolves per connection.
const RESOLVE_BURST: u32 = 20;

/// Refusals answered per second per source address and conn id (docs/PROTOCOL.md §7.7).
const REFUSALS_PER_SEC: u32 = 10;
/// Burst of refusals per source address.
const REFUSAL_BURST: u32 = 20;

/// Sweep the whole table for idle connections once per this many ms.
const SWEEP_PERIOD_MS: u64 = 10_000;
/// … in this many steps.
const SWEEP_STEPS: u64 = 10;

/// The state of one server shard.
pub struct Service {
    config: ServiceConfig,
    /// The master keys by parity: the current one, and during a rotation's
    /// grace period the previous one (docs/PROTOCOL.md §7.11).
    keys: [Option<MasterKeyState>; 2],
    /// The parity of the current master key.
    current: u8,
    /// Revoked accounts and devices, by generation.
    revocations: std::sync::Arc<Revocations>,
    /// Resolves per connection (docs/PROTOCOL.md §7.9).
    resolve_limiter: RateLimiter,
    /// The keyed PRF behind the endpoint challenges of §7.9: SipHash with a
    /// random key of this shard's own (a challenge is only ever checked by
    /// the shard that sent it), cheap enough to compute for every answer to
    /// an address not yet validated.
    validator: std::collections::hash_map::RandomState,
    table: Table,
    rng: StdRng,
    epoch: UnixMillis,
    replies: VecDeque<Reply>,
    stun_replies: VecDeque<(SocketAddr, [u8; stun::MAX_RESPONSE_LEN], u8)>,
    stun_limiter: RateLimiter,
    /// Refusals (404, 403, InvalidSerial, ...) answer packets that are
    /// authenticated but may be replays with a forged source: rate-limited
    /// per source address like every other answer a replay could trigger.
    refusal_limiter: RateLimiter,
    /// Packets that fail authentication, per source (docs/PROTOCOL.md §7: rate
    /// limits on all unauthenticated traffic). Only failures are charged, so
    /// many honest devices behind one NAT address are never limited.
    auth_failure_limiter: RateLimiter,
    notifies: VecDeque<u32>,
    /// Notifies queued and taken from `notifies` so far (wrapping never:
    /// u64), which place a publish's stamp in that queue.
    notifies_queued: u64,
    notifies_taken: u64,
    /// Stamped publishes whose notifies are not all sealed yet: (the value
    /// of `notifies_queued` once the publish was queued, its stamp). One
    /// entry per publish, nothing per connection.
    publish_stamps: VecDeque<(u64, u64)>,
    fragmented: Option<FragmentedSend>,
    next_fragment_id: u16,
    timers: TimerWheel<RetransmitTimer>,
    due: Vec<RetransmitTimer>,
    resolves: Vec<PendingResolve>,
    next_resolve: u64,
    /// Connects waiting for the cluster's catch-up answer.
    parked: Vec<ParkedConnect>,
    next_catch_up: u64,
    /// Per partition: whether this node hears its publishes from the bus
    /// (cluster only; docs/PROTOCOL.md §10.3).
    heard: Vec<bool>,
    /// Account records created while their partition was not heard, none
    /// of whose devices was answered yet: they missed nothing a device
    /// was told about, so hearing the partition does not resync them.
    fresh: std::collections::HashSet<u32>,
    events: VecDeque<ServiceEvent>,
    next_sweep: UnixMillis,
    /// New connects are shed (503 + retry-after) until then.
    shed_until: UnixMillis,
    sweep_cursor: u32,
    account_cursor: u32,
    scratch: Vec<u8>,
    stats: ServiceStats,
}

impl Service {
    /// A shard with no connections. `seed` seeds the nonce generator: pass
    /// fresh OS randomness in production, a constant in tests.
    pub fn new(config: ServiceConfig, master: MasterKey, seed: [u8; 32], now: UnixMillis) -> Self {
        let mut table = Table::new(config.max_connections);
        table.count_partitions(config.cluster_partitions);
        Service {
            validator: std::collections::hash_map::RandomState::new(),
            keys: [Some(MasterKeyState::new(master, None)), None],
            current: 0,
            revocations: std::sync::Arc::new(Revocations::new()),
            table,
            rng: StdRng::from_seed(seed),
            epoch: now,
            replies: VecDeque::new(),
            stun_replies: VecDeque::new(),
            auth_failure_limiter: RateLimiter::new(
                AUTH_FAILURES_PER_SEC,
                AUTH_FAILURE_BURST,
                DEFAULT_BUCKETS,
            ),
            resolve_limiter: RateLimiter::new(RESOLVES_PER_SEC, RESOLVE_BURST, DEFAULT_BUCKETS),
            refusal_limiter: RateLimiter::new(REFUSALS_PER_SEC, REFUSAL_BURST, DEFAULT_BUCKETS),
            stun_limiter: RateLimiter::new(
                config.stun_rate_per_sec,
                config.stun_burst,
                DEFAULT_BUCKETS,
            ),
            notifies: VecDeque::new(),
            notifies_queued: 0,
            notifies_taken: 0,
            publish_stamps: VecDeque::new(),
            fragmented: None,
            next_fragment_id: 0,
            timers: TimerWheel::new(4, 8192),
            due: Vec::new(),
            resolves: Vec::new(),
            next_resolve: 1,
            parked: Vec::new(),
            next_catch_up: 1,
            heard: vec![false; config.cluster_partitions as usize],
            fresh: std::collections::HashSet::new(),
            events: VecDeque::new(),
            next_sweep: now.plus_millis(SWEEP_PERIOD_MS / SWEEP_STEPS),
            shed_until: now,
            sweep_cursor: 0,
            account_cursor: 0,
            scratch: Vec::with_capacity(MAX_PACKET),
            stats: ServiceStats::default(),
            config,
        }
    }

    /// The shard's counters.
    pub fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// Connections held.
    pub fn connections(&self) -> usize {
        self.table.len()
    }

    /// Datagrams waiting for [`Service::poll_transmit`]: queued replies,
    /// STUN answers and notifies (each device at most once), plus one for a
    /// fragmented message in progress. The shard stops taking publishes
    /// while this is high, so a publish burst cannot starve its receiving.
    pub fn transmit_backlog(&self) -> usize {
        self.stun_replies.len()
            + self.replies.len()
            + self.notifies.len()
            + usize::from(self.fragmented.is_some())
    }

    /// Retransmission timers armed (one per notify sent and not yet
    /// acknowledged or given up, plus stale ones not yet fired).
    pub fn armed_timers(&self) -> usize {
        self.timers.len()
    }

    /// The connection table (read-only), for metrics and tests.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The time the shard's relative times (seconds in the records) count from.
    pub fn epoch(&self) -> UnixMillis {
        self.epoch
    }

    /// Every account record, for saving (times relative to [`Service::epoch`]).
    pub fn saved_accounts(&self) -> impl Iterator<Item = (AccountSlot, Account)> + '_ {
        (0..self.table.account_bound()).filter_map(|s| {
            let a = self.table.account(AccountSlot(s)).filter(|a| a.in_use())?;
            Some((AccountSlot(s), Account { head: 0, ..*a }))
        })
    }

    /// Every connection, for saving.
    pub fn saved_connections(&self) -> impl Iterator<Item = (AccountSlot, SavedConnection)> + '_ {
        (0..self.table.slot_bound()).filter_map(|s| {
            let slot = Slot(s);
            let rec = self.table.get(slot).filter(|r| r.in_use())?;
            let account_slot = self.table.account_of(slot);
            let account = self.table.account(account_slot)?;
            let mut pending = [0u8; MAX_BITMASK];
            let mask = self.table.pending_mask(slot);
            pending[..mask.len()].copy_from_slice(mask);
            let saved = SavedConnection {
                conn_id: ConnId(rec.conn_id),
                account: AccountKey {
                    affinity: account.affinity,
                    low: account.low,
                },
                highest_serial: rec.highest_serial,
                window: rec.window(),
                last_seen: rec.last_seen,
                expires: rec.expires,
                endpoint: self.table.endpoint(slot),
                pending,
                pending_len: mask.len() as u8,
                tries: rec.tries(),
                catch_up: rec.catch_up(),
                validated: rec.validated(),
                key_parity: rec.key_parity(),
            };
            Some((account_slot, saved))
        })
    }

    /// Takes back a saved state into an empty shard: its times count from
    /// `epoch` from now on. A connection with pending bits is queued for a
    /// notify at once (its retransmission timer was not saved), so a device
    /// hears of what it has not acknowledged without waiting for a heartbeat.
    pub fn restore(
        &mut self,
        epoch: UnixMillis,
        accounts: &[Account],
        connections: &[SavedConnection],
    ) -> Restored {
        self.restore_indexed(epoch, accounts, connections, &[])
    }

    /// [`Service::restore`], told each connection's account as its index
    /// in `accounts` (`account_of[i]` for `connections[i]`; a missing or
    /// wrong index is looked up by key instead).
    pub fn restore_indexed(
        &mut self,
        epoch: UnixMillis,
        accounts: &[Account],
        connections: &[SavedConnection],
        account_of: &[u32],
    ) -> Restored {
        let mut done = Restored::default();
        if !self.table.is_empty() || self.table.accounts_len() > 0 {
            done.skipped = accounts.len() + connections.len();
            return done;
        }
        self.epoch = epoch;
        self.table.reserve(connections.len(), accounts.len());
        // The slot each of `accounts` went to (None: skipped).
        let mut slot_of = Vec::with_capacity(accounts.len());
        for a in accounts {
            let key = AccountKey {
                affinity: a.affinity,
                low: a.low,
            };
            if !a.in_use() || self.table.find_account(key).is_some() {
                done.skipped += 1;
                slot_of.push(None);
                continue;
            }
            match self.table.insert_account(Account { head: 0, ..*a }) {
                Ok(slot) => {
                    done.accounts += 1;
                    slot_of.push(Some(slot));
                }
                Err(_) => {
                    done.skipped += 1;
                    slot_of.push(None);
                }
            }
        }
        for (i, c) in connections.iter().enumerate() {
            let hinted = account_of
                .get(i)
                .and_then(|&a| slot_of.get(a as usize).copied().flatten())
                .filter(|&slot| {
                    self.table
                        .account(slot)
                        .is_some_and(|a| a.affinity == c.account.affinity && a.low == c.account.low)
                });
            let Some(account) = hinted.or_else(|| self.table.find_account(c.account)) else {
                done.skipped += 1;
                continue;
            };
            if self.table.find(&c.conn_id).is_some() {
                done.skipped += 1;
                continue;
            }
            let mut rec = Connection {
                conn_id: c.conn_id.0,
                highest_serial: c.highest_serial,
                last_seen: c.last_seen,
                expires: c.expires,
                ..Connection::default()
            };
            rec.set_window(c.window);
            rec.set_tries(c.tries);
            rec.set_validated(c.validated);
            rec.set_key_parity(c.key_parity);
            let Ok(slot) = self.table.insert(rec, account) else {
                done.skipped += 1;
                continue;
            };
            if let Some(e) = c.endpoint {
                self.table.set_endpoint(slot, e);
            }
            let n = usize::from(c.pending_len).min(MAX_BITMASK);
            if n > 0 {
                self.table.or_pending(slot, &c.pending[..n]);
                if let Some(rec) = self.table.get_mut(slot) {
                    rec.set_tries(c.tries);
                    rec.set_catch_up(c.catch_up);
                    rec.set_queued(true);
                    self.queue_notify(slot.0);
                }
            }
            done.connections += 1;
        }
        done
    }

    /// Sheds connects that would create a connection until `until`: they get
    /// `PresenceErrorRefused` 503 with a retry-after (StatusExtended, ms),
    /// so an overloaded shard turns a reconnect storm away cheaply instead of
    /// letting its socket overflow (docs/PROTOCOL.md §6). Connects of held
    /// connections and every other packet are served as usual.
    pub fn shed_connects(&mut self, until: UnixMillis) {
        self.shed_until = self.shed_until.max(until);
    }

    fn seconds_since_epoch(&self, now: UnixMillis) -> u32 {
        (now.millis_since(self.epoch) / 1000).min(u64::from(u32::MAX)) as u32
    }

    fn queue_reply(&mut self, reply: Reply) {
        if self.replies.len() >= self.config.max_queued_replies {
            self.stats.dropped_queue_full += 1;
        } else {
            self.replies.push_back(reply);
        }
    }

    /// Queues a refusal, unless its source had its share (docs/PROTOCOL.md §7:
    /// an attacker replaying captured packets with a forged source must not
    /// turn the node into an amplifier).
    fn queue_refusal(&mut self, now: UnixMillis, reply: Reply) {
        // Per source and conn id (docs/PROTOCOL.md §7.8): replays of another
        // device's packets from an address do not use up the refusals owed
        // to the devices behind it.
        let key = u64::from_ne_bytes(reply.conn_id.0);
        if self.refusal_limiter.allow_pair(now, reply.to.ip(), key) {
            self.queue_reply(reply);
        } else {
            self.stats.refusals_rate_limited += 1;
        }
    }

    /// Handles one received datagram from `from`.
    pub fn handle_datagram(&mut self, now: UnixMillis, from: SocketAddr, datagram: &[u8]) {
        self.stats.datagrams_in += 1;
        // docs/PROTOCOL.md §8: STUN shares the port; its first bits and cookie tell it apart.
        if stun::is_stun(datagram) {
            self.handle_stun(now, from, datagram);
            return;
        }
        self.handle_packet(now, from, datagram, Via::Udp);
    }

    /// Handles one client packet that arrived over the web-service transport
    /// (docs/PROTOCOL.md §9) from `peer`. Its replies come out of
    /// [`Service::poll_transmit`] with [`Transmit::web`] set to `id`. Such a
    /// request never moves a connection's UDP endpoint: notifies are UDP only.
    pub fn handle_web_request(
        &mut self,
        now: UnixMillis,
        peer: SocketAddr,
        packet: &[u8],
        id: WebRequestId,
    ) {
        self.stats.datagrams_in += 1;
        self.handle_packet(now, peer, packet, Via::Web(id));
    }

    fn handle_packet(&mut self, now: UnixMillis, from: SocketAddr, datagram: &[u8], via: Via) {
        let Some(conn_id) = crate::packet::peek_conn_id(datagram) else {
            self.stats.dropped_malformed += 1;
            return;
        };
        if datagram.len() > MAX_PACKET {
            self.stats.dropped_malformed += 1;
            return;
        }
        // docs/PROTOCOL.md §7.8: a packet for a connection the node holds is
        // always opened, whatever else its source address sends, so garbage
        // from (or spoofed as) a device's address cannot cut the device off.
        // Only packets for unknown conn ids — new connects, or garbage — are
        // throttled per source once that source fails authentication too
        // often.
        let held = self.table.find(&conn_id);
        if held.is_none() && !self.auth_failure_limiter.has_token(now, from.ip()) {
            self.stats.dropped_auth_limited += 1;
            return;
        }
        // The key to try first: the one the connection uses, else the
        // current one; the other (during a rotation's grace) second.
        let first = held
            .and_then(|s| self.table.get(s))
            .map_or(self.current, |r| r.key_parity());
        // Decrypt in a reused buffer (its capacity is kept, so no allocation).
        let mut scratch = std::mem::take(&mut self.scratch);
        for parity in [first, first ^ 1] {
            let Some(master) = self.keys[usize::from(parity)]
                .as_ref()
                .filter(|k| k.usable(now))
                .map(|k| &k.master)
            else {
                continue;
            };
            // docs/PROTOCOL.md §3: keys derived per packet from the master key.
            let secret = master.expanded_secret(conn_id);
            let key = secret.key(Direction::ClientToServer);
            let reply_key = secret.key_bytes(Direction::ServerToClient);
            scratch.clear();
            scratch.extend_from_slice(datagram);
            let Ok(plaintext) = open_in_place(&key, &mut scratch) else {
                continue;
            };
            match Message::decode(plaintext) {
                Ok(message) => {
                    let arrival = Arrival {
                        from,
                        conn_id,
                        via,
                        key: reply_key,
                        bytes: datagram.len() as u16,
                        parity,
                        held,
                    };
                    self.handle_message(now, arrival, message);
                }
                Err(_) => self.stats.dropped_malformed += 1,
            }
            self.scratch = scratch;
            return;
        }
        self.stats.dropped_auth += 1;
        if held.is_none() {
            self.auth_failure_limiter.allow(now, from.ip());
        }
        self.scratch = scratch;
    }

    /// Whether `datagram` is a packet sealed for its conn id under one of the
    /// node's usable master keys (without handling it): the check a shard
    /// makes before forwarding a datagram that reached the wrong socket.
    pub fn authentic(&mut self, now: UnixMillis, datagram: &[u8]) -> bool {
        let Some(conn_id) = crate::packet::peek_conn_id(datagram) else {
            return false;
        };
        if datagram.len() > MAX_PACKET {
            return false;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut ok = false;
        for k in self.keys.iter().flatten().filter(|k| k.usable(now)) {
            let key = k
                .master
                .expanded_secret(conn_id)
                .key(Direction::ClientToServer);
            scratch.clear();
            scratch.extend_from_slice(datagram);
            if open_in_place(&key, &mut scratch).is_ok() {
                ok = true;
                break;
            }
        }
        self.scratch = scratch;
        ok
    }

    /// The current master key (the one a saved state is authenticated with).
    pub fn current_master(&self) -> Option<&MasterKey> {
        self.keys[usize::from(self.current)]
            .as_ref()
            .map(|k| &k.master)
    }

    /// Takes new master keys (a rotation, docs/PROTOCOL.md §7.11): the
    /// current one for new connections, the previous one until its grace
    /// ends. Connections opened with a key the node no longer has stop
    /// authenticating, and their devices need new credentials.
    pub fn set_keys(&mut self, keys: KeySet) {
        let parity = keys.parity & 1;
        self.keys[usize::from(parity)] = Some(MasterKeyState::new(keys.current, None));
        self.keys[usize::from(parity ^ 1)] = keys
            .previous
            .map(|(master, until)| MasterKeyState::new(master, Some(until)));
        self.current = parity;
    }

    /// Takes a new table of revocations (docs/PROTOCOL.md §7.11). The held
    /// connections of every account some of whose credentials it newly
    /// revokes are dropped: each of their devices must connect again, and
    /// only those whose credentials still verify get back in (with a
    /// catch-up, so they miss nothing).
    pub fn set_revocations(&mut self, now: UnixMillis, revocations: std::sync::Arc<Revocations>) {
        let seconds = self.seconds_since_epoch(now);
        for account in revocations.newly_revoked_accounts(&self.revocations) {
            while let Some(slot) = self.table.account_head(AccountKey::of(account)) {
                self.table.remove(slot, seconds);
                self.stats.revoked += 1;
            }
        }
        self.revocations = revocations;
    }

    /// docs/PROTOCOL.md §7: the one unauthenticated answer, ≤ 64 bytes, one per
    /// request, rate-limited per source address.
    fn handle_stun(&mut self, now: UnixMillis, from: SocketAddr, datagram: &[u8]) {
        if self.stun_replies.len() >= self.config.max_queued_replies
            || !self.stun_limiter.allow(now, from.ip())
        {
            self.stats.stun_dropped += 1;
            return;
        }
        let mut out = [0u8; stun::MAX_RESPONSE_LEN];
        match stun::binding_response(datagram, from, &mut out) {
            Ok(n) => {
                self.stats.stun_answered += 1;
                self.stun_replies.push_back((from, out, n as u8));
            }
            Err(_) => self.stats.stun_dropped += 1,
        }
    }

    fn handle_message(&mut self, now: UnixMillis, arrival: Arrival, message: Message<'_>) {
        let Arrival {
            from,
            conn_id,
            via,
            key,
            bytes,
            parity,
            held,
        } = arrival;
        let Some(header) = message.client_header() else {
            self.stats.dropped_unexpected += 1;
            return;
        };
        // Serials are kept in 32 bits; anything else is not a valid request.
        let Some(serial) = header
            .serial
            .and_then(|s| u32::try_from(s).ok())
            .filter(|&s| s > 0)
        else {
            self.stats.dropped_malformed += 1;
            return;
        };
        let ack = header.acknowledge;
        let echo = header
            .id
            .as_deref()
            .and_then(|id| <[u8; 8]>::try_from(id).ok());
        let origin = Origin {
            from,
            conn_id,
            serial,
            via,
            key,
            bytes,
        };
        let reply = |kind| origin.reply(kind);

        if let Message::ConnectRequest(req) = &message {
            self.handle_connect(now, origin, req, echo, parity);
            return;
        }

        let Some(slot) = held else {
            // Authenticated, but the node holds no such connection (it
            // expired, or the node restarted): tell the client to connect.
            self.stats.refused += 1;
            self.queue_refusal(
                now,
                reply(ReplyKind::Refused(
                    status::NOT_FOUND,
                    "no such connection: connect again",
                    None,
                )),
            );
            return;
        };
        if !self.accept_fresh(now, slot, from, serial, via) {
            return;
        }
        self.validate(slot, from, via, echo);
        if let Some(ack) = ack {
            self.acknowledge(slot, ack);
        }
        let Some(rec) = self.table.get(slot) else {
            return;
        };
        if UnixSeconds(i64::from(rec.expires)) <= now.seconds() {
            self.stats.expired += 1;
            let seconds = self.seconds_since_epoch(now);
            self.table.remove(slot, seconds);
            self.queue_refusal(
                now,
                reply(ReplyKind::Refused(
                    status::FORBIDDEN,
                    "credential expired",
                    None,
                )),
            );
            return;
        }
        match message {
            Message::Heartbeat(_) => {
                self.stats.heartbeats += 1;
                self.queue_reply(origin.reply_for(slot, ReplyKind::Status));
            }
            Message::EndpointRequest(_) => self.queue_reply(reply(ReplyKind::Endpoint)),
            Message::Acknowledge(_) => {}
            Message::DisconnectRequest(_) => {
                self.stats.disconnects += 1;
                let seconds = self.seconds_since_epoch(now);
                self.table.remove(slot, seconds);
                self.queue_reply(reply(ReplyKind::Disconnected));
            }
            Message::ResolveRequest(req) => {
                // docs/PROTOCOL.md §7.9: a connection's resolves are rate-limited.
                if !self
                    .resolve_limiter
                    .allow_key(now, u64::from_ne_bytes(conn_id.0))
                {
                    self.stats.resolves_limited += 1;
                    self.queue_reply(reply(ReplyKind::Resolved(Err(status::TOO_MANY))));
                    return;
                }
                let query = req.dns_request.as_deref().unwrap_or_default();
                if query.is_empty() || self.resolves.len() >= self.config.max_pending_resolves {
                    let code = if query.is_empty() {
                        status::BAD_GATEWAY
                    } else {
                        status::UNAVAILABLE
                    };
                    self.queue_reply(reply(ReplyKind::Resolved(Err(code))));
                    return;
                }
                let token = ResolveToken(self.next_resolve);
                self.next_resolve += 1;
                self.stats.resolves += 1;
                self.resolves.push(PendingResolve {
                    token,
                    origin,
                    deadline: now.plus_millis(self.config.resolve_timeout_ms),
                });
                self.events.push_back(ServiceEvent::ResolveUpstream {
                    token,
                    query: query.to_vec(),
                });
            }
            // ConnectRequest was handled above; service messages have no client header.
            _ => self.stats.dropped_unexpected += 1,
        }
    }

    /// docs/PROTOCOL.md §7: records `serial` if fresh and moves the endpoint; false
    /// (and nothing changed) for a replay.
    fn accept_fresh(
        &mut self,
        now: UnixMillis,
        slot: Slot,
        from: SocketAddr,
        serial: u32,
        via: Via,
    ) -> bool {
        let seconds = self.seconds_since_epoch(now);
        let Some(rec) = self.table.get_mut(slot) else {
            return false;
        };
        let mut window = ReplayWindow {
            highest: rec.highest_serial,
            bits: rec.window(),
        };
        if !window.accept(serial) {
            self.stats.dropped_replay += 1;
            return false;
        }
        rec.highest_serial = window.highest;
        rec.set_window(window.bits);
        rec.last_seen = seconds;
        // Endpoint migration only on an authenticated, fresh UDP packet; the
        // new address is not validated yet (docs/PROTOCOL.md §7.9).
        if via == Via::Udp && !self.table.endpoint_is(slot, from) {
            self.table.set_endpoint(slot, from);
            if let Some(rec) = self.table.get_mut(slot) {
                rec.set_validated(false);
            }
            self.stats.migrations += 1;
        }
        true
    }

    /// The challenge the node sends to an endpoint it has not validated:
    /// eight bytes only a receiver at that address learns (the device cannot
    /// compute them: they come from the master key), to be echoed in
    /// `Request.ID` (docs/PROTOCOL.md §7.9).
    fn challenge(&self, conn_id: ConnId, to: SocketAddr) -> [u8; 8] {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.validator.build_hasher();
        h.write(&conn_id.0);
        let ip = match to.ip() {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(v6) => v6.octets(),
        };
        h.write(&ip);
        h.write_u16(to.port());
        h.finish().to_le_bytes()
    }

    /// Marks the connection's endpoint validated when a fresh packet from it
    /// echoes its challenge.
    fn validate(&mut self, slot: Slot, from: SocketAddr, via: Via, echo: Option<[u8; 8]>) {
        let (Via::Udp, Some(echo)) = (via, echo) else {
            return;
        };
        let Some(rec) = self.table.get(slot) else {
            return;
        };
        if rec.validated() || !self.table.endpoint_is(slot, from) {
            return;
        }
        let conn_id = ConnId(rec.conn_id);
        if self.challenge(conn_id, from) == echo {
            if let Some(rec) = self.table.get_mut(slot) {
                rec.set_validated(true);
            }
            self.stats.validations += 1;
        }
    }

    fn acknowledge(&mut self, slot: Slot, ack: i64) {
        let Some(rec) = self.table.get(slot) else {
            return;
        };
        // Only an acknowledgement of the latest Serial clears the pending bits (§6).
        if rec.has_pending() && ack == i64::from(self.account_serial(slot)) {
            if rec.catch_up() {
                self.stats.catch_ups_acked += 1;
            } else {
                self.stats.notifies_acked += 1;
            }
            self.table.clear_pending(slot);
        }
    }

    fn handle_connect(
        &mut self,
        now: UnixMillis,
        origin: Origin,
        req: &crate::codec::PresenceConnectRequest<'_>,
        echo: Option<[u8; 8]>,
        parity: u8,
    ) {
        let Origin {
            from,
            conn_id,
            serial,
            via,
            ..
        } = origin;
        let reply = |kind| origin.reply(kind);
        let (Some(account), Some(device), Some(expires), Some(binding)) =
            (&req.account, &req.device, req.expires, &req.binding)
        else {
            self.stats.refused += 1;
            self.queue_refusal(
                now,
                reply(ReplyKind::Refused(
                    status::UNAUTHORIZED,
                    "connect needs Account, Device, Expires and Binding",
                    None,
                )),
            );
            return;
        };
        // Shedding: a connect for a connection the node does not hold gets
        // 503 and a retry-after before the costly binding check and insert.
        if now < self.shed_until && self.table.find(&conn_id).is_none() {
            self.stats.connects_shed += 1;
            let retry_after = SHED_RETRY_AFTER_MS + self.rng.next_u64() % SHED_RETRY_AFTER_MS;
            self.queue_refusal(
                now,
                reply(ReplyKind::Refused(
                    status::UNAVAILABLE,
                    "overloaded: retry later",
                    Some(retry_after as i64),
                )),
            );
            return;
        }
        // docs/PROTOCOL.md §7.11: the binding is checked under the key the
        // packet opened with, at the device's revocation generation.
        let generation = self.revocations.generation(account, device);
        let verified = match &self.keys[usize::from(parity)] {
            None => Err(BindingError::Invalid),
            Some(k) if generation == 0 => {
                k.binder
                    .verify(conn_id, expires, account, device, binding, now.seconds())
            }
            Some(k) => BindingKey::for_generation(&k.master, generation).verify(
                conn_id,
                expires,
                account,
                device,
                binding,
                now.seconds(),
            ),
        };
        match verified {
            Ok(()) => {}
            Err(BindingError::Expired) => {
                self.stats.refused += 1;
                self.queue_refusal(
                    now,
                    reply(ReplyKind::Refused(
                        status::FORBIDDEN,
                        "credential expired",
                        None,
                    )),
                );
                return;
            }
            Err(_) => {
                self.stats.refused += 1;
                self.queue_refusal(
                    now,
                    reply(ReplyKind::Refused(
                        status::UNAUTHORIZED,
                        "invalid binding",
                        None,
                    )),
                );
                return;
            }
        }
        let key = AccountKey::of(account);
        let seconds = self.seconds_since_epoch(now);
        let expires_u32 = expires.0.clamp(0, i64::from(u32::MAX)) as u32;
        if let Some(slot) = self.table.find(&conn_id) {
            // docs/PROTOCOL.md §6/§7: an existing connection is replaced only by a fresh Connect.
            let Some(rec) = self.table.get(slot) else {
                return;
            };
            let window = ReplayWindow {
                highest: rec.highest_serial,
                bits: rec.window(),
            };
            match window.check(serial) {
                Freshness::Newest => {}
                Freshness::Replayed => {
                    self.stats.dropped_replay += 1;
                    return;
                }
                Freshness::InWindow | Freshness::Stale => {
                    self.stats.dropped_replay += 1;
                    let highest = window.highest;
                    self.queue_refusal(now, reply(ReplyKind::InvalidSerial(highest)));
                    return;
                }
            }
            let same_account = self
                .table
                .account(self.table.account_of(slot))
                .is_some_and(|a| a.affinity == key.affinity && a.low == key.low);
            if same_account {
                self.accept_fresh(now, slot, from, serial, via);
                self.validate(slot, from, via, echo);
                if let Some(rec) = self.table.get_mut(slot) {
                    rec.set_key_parity(parity);
                }
                if let Some(rec) = self.table.get_mut(slot) {
                    rec.expires = expires_u32;
                }
                if let Some(ack) = req.header.acknowledge {
                    self.acknowledge(slot, ack);
                }
                // docs/PROTOCOL.md §10.4: a connect resent while its
                // catch-up is asked of the cluster is answered with it.
                if let Some(p) = self.parked.iter_mut().find(|p| p.origin.conn_id == conn_id) {
                    p.origin = origin;
                    return;
                }
                self.stats.connects += 1;
                self.queue_reply(origin.reply_for(slot, ReplyKind::Connected));
                return;
            }
            // Same conn id bound to another account: start afresh.
            self.table.remove(slot, seconds);
        }
        // A new connection only from a recent Connect: clients keep their
        // Serials at or above the Unix time (README, "Where we decided"), so
        // an older Connect is a replay, or a device whose clock or Serial
        // lags — told to resume above now, which a real device does at once.
        let now_serial = now.seconds().0.clamp(1, i64::from(u32::MAX)) as u32;
        let oldest = now_serial.saturating_sub(2 * self.config.connection_timeout_ms / 1000);
        if serial < oldest {
            self.stats.dropped_replay += 1;
            self.queue_refusal(now, reply(ReplyKind::InvalidSerial(now_serial)));
            return;
        }
        let account_name: &str = account;
        // docs/PROTOCOL.md §6, "Catch-up": the account's record (created
        // with its first device) tells what the device missed since its mark.
        let (account, created) = match self.table.find_account(key) {
            Some(a) => (a, false),
            // A new life of the account starts its notify Serials at a random
            // point (docs/PROTOCOL.md D4), so a mark from an earlier life (a
            // node restart, all devices gone) is unlikely to equal one of
            // this life; and the device that creates the account is told to
            // resynchronise, since the node had no state for it.
            None => {
                let first = FIRST_SERIAL_MIN + (self.rng.next_u32() % FIRST_SERIAL_SPAN);
                match self
                    .table
                    .insert_account(Account::new(key.affinity, key.low, first, seconds))
                {
                    Ok(a) => {
                        let p = self.config.cluster_partitions;
                        if p > 0 && !self.hears(key.affinity % p) {
                            self.fresh.insert(a.0);
                        }
                        (a, true)
                    }
                    Err(_) => {
                        self.refuse_full(now, origin);
                        return;
                    }
                }
            }
        };
        let mark = req.header.acknowledge.and_then(|m| u32::try_from(m).ok());
        let catch_up = match self.table.account(account) {
            Some(a) if !created => a.catch_up(mark),
            _ => CatchUp::Resync,
        };
        // docs/PROTOCOL.md §10.4: in a cluster, a mark this node cannot
        // place (another node's Serial, or this node's from before it heard
        // the account's partition) is asked of the other nodes first.
        // A connect of a partition this node does not hear yet waits until
        // it does (publishes before that are covered by the answer, after
        // it by the subscription).
        let partitions = self.config.cluster_partitions;
        let ask = if partitions > 0 {
            let heard = self.heard[(key.affinity % partitions) as usize];
            match mark.filter(|&m| m != 0) {
                Some(m)
                    if created
                        || !heard
                        || self
                            .table
                            .account(account)
                            .is_none_or(|a| a.catch_up_known(m).is_none()) =>
                {
                    Some(Some(m))
                }
                _ if !heard => Some(None),
                _ => None,
            }
        } else {
            None
        };
        let mut rec = Connection {
            conn_id: conn_id.0,
            highest_serial: serial,
            last_seen: seconds,
            expires: expires_u32,
            ..Connection::default()
        };
        // docs/PROTOCOL.md §7: a new record's window starts full, so no packet
        // of the device's earlier connections is accepted again.
        rec.set_window(u64::MAX);
        rec.set_key_parity(parity);
        let slot = match self.table.insert(rec, account) {
            Ok(slot) => slot,
            Err(_) => {
                self.refuse_full(now, origin);
                return;
            }
        };
        if let Some(a) = self.table.account_mut(account) {
            a.stamp = seconds;
        }
        // Notifies are UDP only: a connection made over the web transport has
        // no UDP endpoint until its first authenticated UDP packet.
        if via == Via::Udp {
            self.table.set_endpoint(slot, from);
            self.validate(slot, from, via, echo);
        }
        let catch_up = match ask {
            Some(mark) if self.parked.len() < MAX_PARKED_CONNECTS => {
                let token = CatchUpToken(self.next_catch_up);
                self.next_catch_up += 1;
                self.stats.connects += 1;
                let partition = key.affinity % partitions;
                self.parked.push(ParkedConnect {
                    token,
                    origin,
                    deadline: now.plus_millis(self.config.catch_up_timeout_ms),
                    partition,
                    answer: if mark.is_some() { None } else { Some(None) },
                });
                if let Some(mark) = mark {
                    self.stats.catch_ups_asked += 1;
                    self.events.push_back(ServiceEvent::CatchUpRequest {
                        token,
                        account: account_name.to_owned(),
                        mark,
                        partition,
                    });
                }
                return;
            }
            // Too many connects wait already: this one resynchronises.
            Some(_) => CatchUp::Resync,
            None => catch_up,
        };
        if let Some(mask) = catch_up.mask() {
            match catch_up {
                CatchUp::Resync => self.stats.resyncs += 1,
                _ => self.stats.catch_ups += 1,
            }
            self.table.or_pending(slot, mask.as_bytes());
            if let Some(rec) = self.table.get_mut(slot) {
                rec.set_catch_up(true);
            }
        }
        self.stats.connects += 1;
        self.queue_reply(origin.reply_for(slot, ReplyKind::Connected));
    }

    fn refuse_full(&mut self, now: UnixMillis, origin: Origin) {
        self.stats.refused += 1;
        self.queue_refusal(
            now,
            origin.reply(ReplyKind::Refused(status::UNAVAILABLE, "node full", None)),
        );
    }

    /// The account Serial of a live connection (0 if the slot is not live).
    fn account_serial(&self, slot: Slot) -> u32 {
        self.table
            .account(self.table.account_of(slot))
            .map_or(0, |a| a.serial)
    }

    /// Publishes `bitmask` to every device of `account` held by this shard
    /// (docs/PROTOCOL.md §6). Returns the number of devices notified. Like every
    /// input it takes the time, though a publish arms no timer itself: each
    /// notify's retransmission timer starts when it is sent.
    pub fn handle_publish(
        &mut self,
        now: UnixMillis,
        account: &str,
        bitmask: &[u8],
    ) -> Result<usize, PublishError> {
        if bitmask.is_empty() || bitmask.len() > MAX_BITMASK {
            return Err(PublishError::BadBitmask);
        }
        if bitmask.iter().all(|&b| b == 0) {
            return Err(PublishError::NoStore);
        }
        self.stats.publishes += 1;
        // An account with no record here has no device here now and none
        // within the catch-up window: nobody to tell, and a device that
        // comes later resynchronises.
        let Some(account) = self.table.find_account(AccountKey::of(account)) else {
            return Ok(0);
        };
        let seconds = self.seconds_since_epoch(now);
        let window = self.config.catch_up_window_secs;
        let Some(record) = self.table.account_mut(account) else {
            return Ok(0);
        };
        record.publish(bitmask, seconds, window);
        Ok(self.notify_account(account, bitmask, None))
    }

    /// Queues a notify of `bitmask` for every device of `account` (but
    /// those in `skip`); how many.
    fn notify_account(
        &mut self,
        account: AccountSlot,
        bitmask: &[u8],
        skip: Option<&std::collections::HashSet<[u8; 8]>>,
    ) -> usize {
        let Some(record) = self.table.account(account) else {
            return 0;
        };
        let mut cursor = (record.head != 0).then(|| Slot(record.head - 1));
        let mut count = 0;
        while let Some(slot) = cursor {
            cursor = self.table.next_in_account(slot);
            if skip.is_some_and(|skip| {
                self.table
                    .get(slot)
                    .is_some_and(|r| skip.contains(&r.conn_id))
            }) {
                continue;
            }
            self.table.or_pending(slot, bitmask);
            let Some(rec) = self.table.get_mut(slot) else {
                continue;
            };
            rec.set_tries(0);
            rec.set_catch_up(false);
            // A device already queued gets one notify with the merged mask;
            // its retransmission timer is armed when that notify goes out.
            if !rec.queued() {
                rec.set_queued(true);
                self.queue_notify(slot.0);
            }
            self.stats.notifies_sent += 1;
            count += 1;
        }
        count
    }

    /// Hands a parked connect the cluster's answer (docs/PROTOCOL.md
    /// §10.4): `Some(bits)` from a node that could tell what was published
    /// after the device's mark (empty: nothing), `None` when no node could
    /// (or none answered in time): a resync. The connect is answered now,
    /// with this node's Serial as the device's new mark. Unknown tokens are
    /// ignored.
    pub fn handle_catch_up_answer(&mut self, token: CatchUpToken, answer: Option<&[u8]>) {
        let Some(i) = self.parked.iter().position(|p| p.token == token) else {
            return;
        };
        if !self.hears(self.parked[i].partition) {
            // Answered once the partition is heard (or at the deadline).
            self.parked[i].answer = Some(answer.map(<[u8]>::to_vec));
            return;
        }
        let parked = self.parked.swap_remove(i);
        self.answer_parked(parked, answer);
    }

    fn answer_parked(&mut self, parked: ParkedConnect, answer: Option<&[u8]>) {
        let origin = parked.origin;
        let Some(slot) = self.table.find(&origin.conn_id) else {
            return; // gone meanwhile (disconnected, replaced)
        };
        if !self.hears(parked.partition) {
            // Answered before the partition is heard (its deadline): this
            // device's mark may miss what the node has not heard yet.
            if let Some(rec) = self.table.get(slot) {
                self.fresh.remove(&rec.account);
            }
        }
        let mask = match answer {
            Some(bits) if bits.len() <= MAX_BITMASK => {
                self.stats.catch_ups_answered += 1;
                if bits.iter().all(|&b| b == 0) {
                    None
                } else {
                    self.stats.catch_ups += 1;
                    Some(bits)
                }
            }
            _ => {
                self.stats.resyncs += 1;
                Some(&ALL_STORES[..])
            }
        };
        if let Some(mask) = mask {
            let fresh = self.table.get(slot).is_some_and(|r| !r.has_pending());
            self.table.or_pending(slot, mask);
            if fresh {
                if let Some(rec) = self.table.get_mut(slot) {
                    rec.set_catch_up(true);
                }
            }
        }
        self.queue_reply(origin.reply_for(slot, ReplyKind::Connected));
    }

    /// Another node's question (docs/PROTOCOL.md §10.4): what was published
    /// to `account` after `mark`, if this shard can tell exactly (it holds
    /// the account's record, hears its partition, and `mark` is one of this
    /// record's Serials). `None`: it cannot, and stays silent.
    pub fn catch_up_since(&mut self, account: &str, mark: u32) -> Option<CatchUp> {
        let key = AccountKey::of(account);
        let partitions = self.config.cluster_partitions;
        if partitions == 0 || !self.heard[(key.affinity % partitions) as usize] {
            return None;
        }
        let slot = self.table.find_account(key)?;
        let known = self.table.account(slot)?.catch_up_known(mark)?;
        self.stats.catch_up_answers_given += 1;
        Some(known)
    }

    /// docs/PROTOCOL.md §10.3: the node now hears (`heard`) or no longer
    /// hears the bus's publishes for `partitions`. A partition heard again
    /// after a time unheard may have missed publishes, and nobody can say
    /// which: each of its account records takes a publish of every store,
    /// so its devices resynchronise and a device that comes back later with
    /// an older mark does too (connects waiting for the cluster's answer
    /// excepted: that answer covers the time before).
    pub fn set_hearing(&mut self, now: UnixMillis, partitions: &[u32], heard: bool) {
        let n = self.heard.len();
        if n == 0 {
            return;
        }
        let mut newly = vec![false; n];
        let mut any = false;
        for &p in partitions {
            let Some(h) = self.heard.get_mut(p as usize) else {
                continue;
            };
            if heard && !*h {
                newly[p as usize] = true;
                any = true;
            }
            *h = heard;
        }
        if any {
            self.gap(now, &newly);
            // Connects that waited for these partitions and have their
            // answer: answered now.
            let mut i = 0;
            while i < self.parked.len() {
                let p = &self.parked[i];
                if newly[p.partition as usize] && p.answer.is_some() {
                    let mut p = self.parked.swap_remove(i);
                    let answer = p.answer.take().flatten();
                    self.answer_parked(p, answer.as_deref());
                } else {
                    i += 1;
                }
            }
        }
    }

    /// docs/PROTOCOL.md §10.3: the bus's stream for `partition` skipped
    /// publishes (a number missing, or a publish the node could not hand
    /// over): nobody can say which, so each of the partition's account
    /// records takes a publish of every store, as when the partition is
    /// heard again. A partition not heard now is left alone: hearing it
    /// again does the same.
    pub fn bus_gap(&mut self, now: UnixMillis, partition: u32) {
        let n = self.heard.len();
        if n == 0 || !self.hears(partition) {
            return;
        }
        let mut partitions = vec![false; n];
        partitions[partition as usize % n] = true;
        self.gap(now, &partitions);
    }

    /// Whether this shard hears `partition` (cluster only).
    pub fn hears(&self, partition: u32) -> bool {
        self.heard.get(partition as usize).copied().unwrap_or(false)
    }

    fn gap(&mut self, now: UnixMillis, partitions: &[bool]) {
        let seconds = self.seconds_since_epoch(now);
        let window = self.config.catch_up_window_secs;
        let parked: std::collections::HashSet<[u8; 8]> =
            self.parked.iter().map(|p| p.origin.conn_id.0).collect();
        let n = partitions.len() as u32;
        for s in 0..self.table.account_bound() {
            let slot = AccountSlot(s);
            let Some(record) = self.table.account_mut(slot) else {
                continue;
            };
            if !record.in_use() || !partitions[(record.affinity % n) as usize] {
                continue;
            }
            if self.fresh.remove(&s) {
                continue;
            }
            record.publish(&ALL_STORES, seconds, window);
            self.stats.partition_gaps += 1;
            self.notify_account(slot, &ALL_STORES, Some(&parked));
        }
    }

    /// Partition device counts (cluster only): connections per partition.
    pub fn partition_devices(&self) -> &[u32] {
        self.table.partition_devices()
    }

    /// [`Service::handle_publish`] with a `stamp` (any monotonic time the
    /// caller keeps, e.g. nanoseconds) that [`Service::poll_published`]
    /// hands back once every notify the publish queued has been sealed by
    /// [`Service::poll_transmit`] (or found acknowledged meanwhile): the
    /// publish → send latency without a clock in the state machine. A
    /// publish that reached no device here gives nothing back.
    pub fn handle_publish_stamped(
        &mut self,
        now: UnixMillis,
        account: &str,
        bitmask: &[u8],
        stamp: u64,
    ) -> Result<usize, PublishError> {
        let count = self.handle_publish(now, account, bitmask)?;
        if count > 0 && self.publish_stamps.len() < MAX_PUBLISH_STAMPS {
            self.publish_stamps.push_back((self.notifies_queued, stamp));
        }
        Ok(count)
    }

    /// The stamp of a publish whose notifies have all left (see
    /// [`Service::handle_publish_stamped`]), oldest first.
    pub fn poll_published(&mut self) -> Option<u64> {
        match self.publish_stamps.front() {
            Some(&(end, stamp)) if end <= self.notifies_taken => {
                self.publish_stamps.pop_front();
                Some(stamp)
            }
            _ => None,
        }
    }

    fn queue_notify(&mut self, slot: u32) {
        self.notifies.push_back(slot);
        self.notifies_queued += 1;
    }

    /// Changes the STUN rate limit per source address (a reload): the
    /// buckets start full again.
    pub fn set_stun_limits(&mut self, rate_per_sec: u32, burst: u32) {
        self.config.stun_rate_per_sec = rate_per_sec;
        self.config.stun_burst = burst;
        self.stun_limiter = RateLimiter::new(rate_per_sec, burst, DEFAULT_BUCKETS);
    }

    /// Hands the upstream's answer (or failure status 502/504) to a waiting
    /// resolve. Unknown or timed-out tokens are ignored.
    pub fn handle_resolve_answer(&mut self, token: ResolveToken, answer: Result<&[u8], u16>) {
        let Some(i) = self.resolves.iter().position(|r| r.token == token) else {
            return;
        };
        let r = self.resolves.swap_remove(i);
        let result = answer.map(|a| a.to_vec().into_boxed_slice());
        self.queue_reply(r.origin.reply(ReplyKind::Resolved(result)));
    }

    /// The next thing the I/O layer must do.
    pub fn poll_event(&mut self) -> Option<ServiceEvent> {
        self.events.pop_front()
    }

    /// When [`Service::handle_timeout`] next needs calling.
    pub fn poll_timeout(&self) -> Option<UnixMillis> {
        let mut next = self.timers.next_deadline();
        let mut consider = |t: UnixMillis| next = Some(next.map_or(t, |n: UnixMillis| n.min(t)));
        if !self.table.is_empty() || self.table.accounts_len() > 0 {
            consider(self.next_sweep);
        }
        for r in &self.resolves {
            consider(r.deadline);
        }
        for p in &self.parked {
            consider(p.deadline);
        }
        next
    }

    /// Fires due retransmissions, expires idle connections and late resolves.
    pub fn handle_timeout(&mut self, now: UnixMillis) {
        let mut due = std::mem::take(&mut self.due);
        self.timers.expire(now, |t| due.push(t));
        for t in due.drain(..) {
            self.retransmit(t);
        }
        self.due = due;

        if now >= self.next_sweep {
            self.sweep(now);
            self.next_sweep = now.plus_millis(SWEEP_PERIOD_MS / SWEEP_STEPS);
        }

        // docs/PROTOCOL.md §10.4: no answer in time: a resync.
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].deadline <= now {
                let mut p = self.parked.swap_remove(i);
                let answer = p.answer.take().flatten();
                self.answer_parked(p, answer.as_deref());
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.resolves.len() {
            if self.resolves[i].deadline <= now {
                let r = self.resolves.swap_remove(i);
                self.queue_reply(
                    r.origin
                        .reply(ReplyKind::Resolved(Err(status::GATEWAY_TIMEOUT))),
                );
            } else {
                i += 1;
            }
        }
    }

    fn retransmit(&mut self, t: RetransmitTimer) {
        let slot = Slot(t.slot);
        if !self.table.get(slot).is_some_and(Connection::in_use)
            || self.account_serial(slot) != t.serial
        {
            return;
        }
        let Some(rec) = self.table.get_mut(slot) else {
            return;
        };
        // A stale timer: acknowledged, superseded by a newer publish, or the slot was reused.
        if !rec.has_pending() || rec.tries() != t.tries {
            return;
        }
        // A record counts at most MAX_TRIES retransmissions.
        if t.tries >= self.config.retransmit_tries.min(MAX_TRIES) {
            // docs/PROTOCOL.md §6: now the pending state waits for the next heartbeat.
            return;
        }
        let tries = t.tries + 1;
        rec.set_tries(tries);
        if !rec.queued() {
            rec.set_queued(true);
            self.queue_notify(t.slot);
        }
        self.stats.notifies_retransmitted += 1;
    }

    /// Removes connections silent for 2 × ConnectionTimeout or past their
    /// credential's expiry, a slice of the table per call.
    fn sweep(&mut self, now: UnixMillis) {
        let seconds = self.seconds_since_epoch(now);
        let bound = self.table.slot_bound();
        if bound > 0 {
            let chunk = bound.div_ceil(SWEEP_STEPS as u32).max(1);
            let idle_limit = (2 * u64::from(self.config.connection_timeout_ms)).div_ceil(1000);
            let unix = now.seconds().0;
            let end = self.sweep_cursor.saturating_add(chunk).min(bound);
            for s in self.sweep_cursor..end {
                let Some(rec) = self.table.get(Slot(s)) else {
                    continue;
                };
                if rec.in_use()
                    && (u64::from(seconds).saturating_sub(u64::from(rec.last_seen)) > idle_limit
                        || i64::from(rec.expires) <= unix)
                {
                    self.table.remove(Slot(s), seconds);
                    self.stats.expired += 1;
                }
            }
            self.sweep_cursor = if end >= bound { 0 } else { end };
        }
        // docs/PROTOCOL.md §6: an account with no device left keeps its
        // catch-up state for the window after its last activity, no longer.
        let bound = self.table.account_bound();
        if bound > 0 {
            let chunk = bound.div_ceil(SWEEP_STEPS as u32).max(1);
            let window = self.config.catch_up_window_secs;
            let end = self.account_cursor.saturating_add(chunk).min(bound);
            for s in self.account_cursor..end {
                let slot = AccountSlot(s);
                let Some(a) = self.table.account(slot) else {
                    continue;
                };
                if a.in_use() && a.head == 0 && seconds.saturating_sub(a.stamp) > window {
                    self.table.remove_account(slot);
                    self.stats.accounts_expired += 1;
                }
            }
            self.account_cursor = if end >= bound { 0 } else { end };
        }
    }

    /// Writes the next datagram to send into `buf` (at least
    /// [`MAX_PACKET`] bytes) and says where it goes.
    pub fn poll_transmit(&mut self, now: UnixMillis, buf: &mut [u8]) -> Option<Transmit> {
        if buf.len() < MAX_PACKET {
            return None;
        }
        let t = self.next_transmit(now, buf)?;
        self.stats.datagrams_out += 1;
        Some(t)
    }

    fn next_transmit(&mut self, now: UnixMillis, buf: &mut [u8]) -> Option<Transmit> {
        if let Some((to, bytes, n)) = self.stun_replies.pop_front() {
            let n = usize::from(n);
            buf[..n].copy_from_slice(&bytes[..n]);
            return Some(Transmit {
                destination: to,
                size: n,
                web: None,
            });
        }
        loop {
            if let Some(t) = self.next_fragment(buf) {
                return Some(t);
            }
            if let Some(reply) = self.replies.pop_front() {
                if let Some(t) = self.encode_reply(now, reply, buf) {
                    return Some(t);
                }
                continue;
            }
            let slot = self.notifies.pop_front()?;
            self.notifies_taken += 1;
            if let Some(t) = self.encode_notify(now, Slot(slot), buf) {
                return Some(t);
            }
        }
    }

    fn encode_notify(&mut self, now: UnixMillis, slot: Slot, buf: &mut [u8]) -> Option<Transmit> {
        let rec = self.table.get_mut(slot)?;
        if !rec.queued() {
            return None; // the slot was freed (and maybe reused) since it was queued
        }
        rec.set_queued(false);
        if !rec.in_use() || !rec.has_pending() {
            return None; // acknowledged meanwhile
        }
        let rec = *rec;
        // No UDP endpoint yet: the next heartbeat's Status carries it.
        let to = self.table.endpoint(slot)?;
        // docs/PROTOCOL.md §7.9: an endpoint not validated gets the notify
        // once, with the challenge; its retransmissions wait until it is.
        if !rec.validated() && rec.tries() > 0 {
            self.stats.retransmits_held += 1;
            return None;
        }
        let challenge = (!rec.validated()).then(|| self.challenge(ConnId(rec.conn_id), to));
        let serial = self.account_serial(slot);
        let mut mask = [0u8; MAX_BITMASK];
        let pending = self.table.pending_mask(slot);
        let mask_len = pending.len().min(MAX_BITMASK);
        mask[..mask_len].copy_from_slice(&pending[..mask_len]);
        let message = Message::Notify(PresenceNotify {
            bitmask: Some((&mask[..mask_len]).into()),
            serial: Some(i64::from(serial)),
            header: ServiceHeader {
                endpoint: Some(to),
                now: Some(now.seconds()),
                acknowledge: Some(i64::from(rec.highest_serial)),
                id: challenge.as_ref().map(|c| (&c[..]).into()),
                ..ServiceHeader::default()
            },
        });
        let conn_id = ConnId(rec.conn_id);
        // Sealed with the key the connection was opened with; none left (its
        // rotation's grace is over): the device needs a new credential.
        let master = &self.keys[usize::from(rec.key_parity())]
            .as_ref()
            .filter(|k| k.usable(now))?
            .master;
        let dest = Destination {
            conn_id,
            to,
            via: Via::Udp,
            key: master
                .expanded_secret(conn_id)
                .key_bytes(Direction::ServerToClient),
        };
        let sent = self.seal_message(dest, &message, buf)?;
        // docs/PROTOCOL.md §6: resend after 1 s, doubling, until acknowledged.
        // The timer starts when the notify leaves (not at the publish), so
        // publishes merged into one notify arm one timer between them.
        let tries = rec.tries();
        let delay = self.config.retransmit_initial_ms << tries.min(16);
        self.timers.insert(
            now,
            now.plus_millis(delay),
            RetransmitTimer {
                slot: slot.0,
                serial,
                tries,
            },
        );
        Some(sent)
    }

    /// The account's Serial and the connection's pending mask, copied into
    /// `mask` (no allocation; length 0 when nothing is pending); `None` when
    /// the connection is gone.
    fn pending_state(
        &self,
        conn_id: &ConnId,
        hint: Option<Slot>,
        mask: &mut [u8; MAX_BITMASK],
    ) -> Option<(i64, usize)> {
        let slot = self.live_slot(conn_id, hint)?;
        let pending = self.table.pending_mask(slot);
        let n = pending.len().min(MAX_BITMASK);
        mask[..n].copy_from_slice(&pending[..n]);
        Some((i64::from(self.account_serial(slot)), n))
    }

    fn encode_reply(
        &mut self,
        now: UnixMillis,
        mut reply: Reply,
        buf: &mut [u8],
    ) -> Option<Transmit> {
        // docs/PROTOCOL.md §7.9: to an address the node has not validated it
        // sends at most three times what it received, and the challenge
        // that validates it (when the connection exists).
        let slot = self.live_slot(&reply.conn_id, reply.slot);
        let validated = reply.via != Via::Udp
            || slot.is_some_and(|s| {
                self.table.get(s).is_some_and(|r| r.validated())
                    && self.table.endpoint_is(s, reply.to)
            });
        let budget = if validated {
            usize::MAX
        } else {
            3 * usize::from(reply.request_bytes)
        };
        let challenge =
            (!validated && slot.is_some()).then(|| self.challenge(reply.conn_id, reply.to));
        if let ReplyKind::Resolved(Ok(ref answer)) = reply.kind {
            // A DNS answer may need many packets: "validate first" instead.
            if answer.len() + RESOLVE_OVERHEAD > budget {
                self.stats.replies_capped += 1;
                reply.kind = ReplyKind::Resolved(Err(status::TOO_EARLY));
            }
        }
        let header = ServiceHeader {
            endpoint: Some(reply.to),
            now: Some(now.seconds()),
            acknowledge: Some(reply.ack),
            id: challenge.as_ref().map(|c| (&c[..]).into()),
            ..ServiceHeader::default()
        };
        let mut mask_buf = [0u8; MAX_BITMASK];
        let (serial, bitmask) = match reply.kind {
            // docs/PROTOCOL.md §6: every ConnectResponse carries the account's
            // Serial (the device's next mark), and the pending bits if any.
            ReplyKind::Connected => {
                match self.pending_state(&reply.conn_id, reply.slot, &mut mask_buf) {
                    Some((serial, 0)) => (Some(serial), None),
                    Some((serial, n)) => (Some(serial), Some(&mask_buf[..n])),
                    None => (None, None),
                }
            }
            // A Status carries the pending state only when there is one.
            ReplyKind::Status => {
                match self.pending_state(&reply.conn_id, reply.slot, &mut mask_buf) {
                    Some((serial, n)) if n > 0 => (Some(serial), Some(&mask_buf[..n])),
                    _ => (None, None),
                }
            }
            _ => (None, None),
        };
        let message = match reply.kind {
            ReplyKind::Connected => Message::ConnectResponse(PresenceConnectResponse {
                connection_timeout: Some(i64::from(self.config.connection_timeout_ms)),
                serial,
                bitmask: bitmask.map(Into::into),
                header,
            }),
            ReplyKind::Status => Message::Status(PresenceStatus {
                serial,
                bitmask: bitmask.map(Into::into),
                header,
            }),
            ReplyKind::Endpoint => Message::EndpointResponse(PresenceEndpointResponse { header }),
            ReplyKind::InvalidSerial(highest) => {
                Message::ErrorInvalidSerial(PresenceErrorInvalidSerial {
                    serial: Some(i64::from(highest)),
                    header,
                })
            }
            ReplyKind::Refused(code, why, extended) => {
                Message::ErrorRefused(PresenceErrorRefused {
                    header: ServiceHeader {
                        status: Some(i64::from(code)),
                        status_extended: extended,
                        status_description: Some(why.into()),
                        ..header
                    },
                })
            }
            ReplyKind::Disconnected => {
                Message::DisconnectResponse(PresenceDisconnectResponse { header })
            }
            ReplyKind::Resolved(ref result) => Message::ResolveResponse(PresenceResolveResponse {
                dns_response: result.as_ref().ok().map(|a| (&a[..]).into()),
                header: ServiceHeader {
                    status: result.as_ref().err().map(|&c| i64::from(c)),
                    ..header
                },
            }),
        };
        let dest = Destination {
            conn_id: reply.conn_id,
            to: reply.to,
            via: reply.via,
            key: reply.key,
        };
        let sent = self.seal_message(dest, &message, buf)?;
        if sent.size > budget || (self.fragmented.is_some() && budget != usize::MAX) {
            // Never expected (every single-packet answer fits three times
            // the smallest request), but the rule holds whatever the sizes.
            self.fragmented = None;
            self.stats.replies_capped += 1;
            return None;
        }
        Some(sent)
    }

    /// `hint` if it still holds `conn_id`, else the table's slot for it.
    fn live_slot(&self, conn_id: &ConnId, hint: Option<Slot>) -> Option<Slot> {
        hint.filter(|&s| {
            self.table
                .get(s)
                .is_some_and(|r| r.in_use() && r.conn_id == conn_id.0)
        })
        .or_else(|| self.table.find(conn_id))
    }

    /// Encodes `message` into `buf` and seals it; a message larger than one
    /// packet becomes fragments (docs/PROTOCOL.md §5), sent by later polls.
    fn seal_message(
        &mut self,
        dest: Destination,
        message: &Message<'_>,
        buf: &mut [u8],
    ) -> Option<Transmit> {
        let plain_room = (buf.len() - HEADER_LEN).min(MAX_PLAINTEXT);
        match message.encode(&mut buf[HEADER_LEN..HEADER_LEN + plain_room]) {
            Ok(n) => self.seal(dest, buf, n),
            Err(_) => {
                let bytes = message.to_vec();
                let count = fragment_count(bytes.len())?;
                let id = self.next_fragment_id;
                self.next_fragment_id = self.next_fragment_id.wrapping_add(1);
                self.fragmented = Some(FragmentedSend {
                    dest,
                    message: bytes,
                    id,
                    next: 0,
                    count,
                });
                self.next_fragment(buf)
            }
        }
    }

    fn next_fragment(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        let mut f = self.fragmented.take()?;
        if f.next >= f.count {
            return None;
        }
        let n = write_fragment(&f.message, f.id, f.next, &mut buf[HEADER_LEN..]).ok()?;
        debug_assert!(n <= MAX_FRAGMENT_DATA + FRAGMENT_HEADER_LEN);
        f.next += 1;
        let dest = f.dest;
        if f.next < f.count {
            self.fragmented = Some(f);
        }
        self.seal(dest, buf, n)
    }

    fn seal(&mut self, dest: Destination, buf: &mut [u8], n: usize) -> Option<Transmit> {
        let key = PacketKey::new(&dest.key);
        let mut nonce = [0u8; 12];
        self.rng.fill_bytes(&mut nonce);
        let size = seal_in_place(&key, dest.conn_id, nonce, buf, n).ok()?;
        Some(Transmit {
            destination: dest.to,
            size,
            web: match dest.via {
                Via::Udp => None,
                Via::Web(id) => Some(id),
            },
        })
    }
}

#[cfg(test)]
mod tests;
