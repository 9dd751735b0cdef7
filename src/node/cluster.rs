//! The cluster bus: several nodes sharing one master key exchange publishes
//! and catch-up questions over NATS (docs/PROTOCOL.md §10).
//!
//! It exists so that a publish accepted by any node reaches the account's
//! devices on every node, and a device that moves between nodes learns what
//! it missed. Everything here runs on the control thread (async-nats on its
//! tokio runtime) and reaches the shards only through the router, like the
//! HTTP API: a shard never waits on the bus. Shards report their device
//! counts per partition in atomics ([`Interest`]) and ask their catch-up
//! questions through a bounded channel; a full channel, a dead bus or a
//! silent cluster end in a resync for the device, never in a blocked shard.
//!
//! * Interest: the node subscribes to `mpp.*.<p>` for each partition `p`
//!   (account affinity mod `cluster_partitions`) where it holds devices,
//!   sampled every 100 ms, and lets a partition go once it held none for a
//!   second. A partition is *heard* once the server has the subscription
//!   (a round trip confirms it); the shards are told when a partition is
//!   heard or no longer heard, and every account record of a partition
//!   heard again takes a resync (what was published meanwhile is unknown).
//! * Publishes: `mpp.pub.<p>` with [`wire::numbered_publish`]: each node
//!   numbers its publishes per partition (a stream id drawn at start, then
//!   1, 2, …), so a receiver drops one it already had (a batch sent again)
//!   and resynchronises the partition's records when a number is missing
//!   (NATS core delivers at most once). About once a second the node
//!   announces, on each partition it published to since its last
//!   announcement, the number of its last publish there
//!   ([`wire::last`]), so a receiver that lost the last publishes of a
//!   stream (no later publish shows the gap) resynchronises too; an idle
//!   node announces nothing. The node's own messages are not
//!   echoed back to it (`no_echo`). A batch counts as handed over once a
//!   round trip after it returns; while the bus is away it is retried
//!   until `cluster_publish_timeout_ms`, then counted failed.
//! * Catch-up: `mpp.catchup.<p>`, a NATS request with [`wire::question`];
//!   only a node whose own Serials contain the mark answers.

pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Request, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;

use super::router::{Router, ShardId, ShardMessage};
use crate::packet::account_affinity;
use crate::proto::CatchUpToken;

/// How often the control thread samples the shards' interest and the bus's state.
const SAMPLE: Duration = Duration::from_millis(100);
/// A partition whose devices all left is kept this long before it is let go
/// (devices come and go; resubscribing costs a resync).
const LINGER: Duration = Duration::from_secs(1);
/// Catch-up questions the shards may have waiting for the bus at once.
pub const MAX_QUESTIONS: usize = 1024;
/// How long one confirming round trip to the server may take.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);
/// A publish from the bus that finds its shard's inbox full is retried this
/// many times, 5 ms apart, then counted as dropped (and its partition
/// resynchronised).
const INBOX_RETRIES: u32 = 20;
/// Senders' streams a partition's receiver remembers (a node that
/// restarts starts a new stream; the least recently heard is forgotten).
const MAX_STREAMS: usize = 64;
/// How often a node announces the last number of its stream on each
/// partition it published to since its previous announcement.
const ANNOUNCE: Duration = Duration::from_secs(1);

/// The cluster's settings, from the node's configuration.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`).
    pub urls: Vec<String>,
    /// This node's name on the bus.
    pub node_id: String,
    /// Account-affinity partitions.
    pub partitions: u32,
    /// How long a catch-up question waits for an answer.
    pub catch_up_timeout: Duration,
    /// How long a publish is retried while the bus is away.
    pub publish_timeout: Duration,
}

/// The subject of partition `p`'s publishes.
pub fn publish_subject(p: u32) -> String {
    format!("mpp.pub.{p}")
}

/// The subject of partition `p`'s catch-up questions.
pub fn catch_up_subject(p: u32) -> String {
    format!("mpp.catchup.{p}")
}

/// The partition of an account affinity.
pub fn partition_of(affinity: u32, partitions: u32) -> u32 {
    affinity % partitions.max(1)
}

/// Checks a cluster URL: `nats://HOST[:PORT]` (one line for the
/// configuration error when it is not).
pub fn check_url(url: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid cluster URL {url:?}: {why}"));
    let Some(rest) = url.strip_prefix("nats://") else {
        return bad("expected nats://HOST:PORT");
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (rest, None),
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@' | ','))
    {
        return bad("expected nats://HOST:PORT");
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return bad("the port must be 1 to 65535"),
        }
    }
    if url.parse::<async_nats::ServerAddr>().is_err() {
        return bad("not a NATS server address");
    }
    Ok(())
}

/// Checks a node id: 1 to 64 letters, digits, `-` or `_` (it names the
/// node's connection and a subject token).
pub fn check_node_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > 64
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "invalid node id {id:?}: 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// Each shard's device count per partition, written by the shard every
/// 100 ms and summed by the control thread.
pub struct Interest {
    shards: Vec<Box<[AtomicU32]>>,
}

impl Interest {
    /// Counts of `shards` shards over `partitions` partitions, all zero.
    pub fn new(shards: usize, partitions: u32) -> Arc<Interest> {
        Arc::new(Interest {
            shards: (0..shards)
                .map(|_| (0..partitions).map(|_| AtomicU32::new(0)).collect())
                .collect(),
        })
    }

    /// Shard `shard`'s counts now.
    pub fn store(&self, shard: ShardId, counts: &[u32]) {
        if let Some(row) = self.shards.get(shard) {
            for (cell, &n) in row.iter().zip(counts) {
                if cell.load(Relaxed) != n {
                    cell.store(n, Relaxed);
                }
            }
        }
    }

    /// Whether any shard holds a device of partition `p`.
    fn any(&self, p: usize) -> bool {
        self.shards
            .iter()
            .any(|row| row.get(p).is_some_and(|c| c.load(Relaxed) > 0))
    }
}

/// A shard's catch-up question for the bus (docs/PROTOCOL.md §10.4).
#[derive(Debug)]
pub struct CatchUpQuestion {
    /// The shard that asks (the answer goes back to it).
    pub shard: ShardId,
    /// The parked connect's token.
    pub token: CatchUpToken,
    /// The account.
    pub account: String,
    /// The device's mark.
    pub mark: u32,
    /// The account's partition.
    pub partition: u32,
}

/// What the bus did with a batch of publishes: handed to the server
/// (`remote`), or not within `cluster_publish_timeout_ms` (`failed`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteOutcome {
    /// Publishes the bus accepted for the other nodes.
    pub remote: usize,
    /// Publishes that could not be handed to the bus in time.
    pub failed: usize,
}

/// The bus's counters for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterMetrics {
    /// Whether the node is connected to a NATS server.
    pub connected: bool,
    /// Partitions subscribed.
    pub partitions: u64,
    /// Partitions heard (subscription confirmed).
    pub heard: u64,
    /// Publishes handed to the bus (confirmed by a round trip).
    pub published: u64,
    /// Publishes not handed over within the bound (reported to the publisher).
    pub publish_failed: u64,
    /// Times a batch of publishes was sent again after the bus went away.
    pub publish_retries: u64,
    /// Publishes received from the bus and routed to a shard.
    pub received: u64,
    /// Publishes received from the bus and dropped: the shard's inbox
    /// stayed full, or the payload was malformed.
    pub received_dropped: u64,
    /// Publishes received a second time (a batch sent again) and dropped.
    pub received_duplicates: u64,
    /// Times a sender's numbered stream skipped publishes (lost on the
    /// way): the partition's account records resynchronised.
    pub sequence_gaps: u64,
    /// Catch-up questions asked of the cluster.
    pub questions: u64,
    /// … answered by a node that could tell.
    pub answered: u64,
    /// Catch-up questions of other nodes answered by this one.
    pub answers_given: u64,
    /// Times the connection to the bus was lost.
    pub disconnects: u64,
    /// Attempts to connect to a NATS server that failed (the host did not
    /// resolve, the server refused or did not answer).
    pub connect_errors: u64,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    publish_failed: AtomicU64,
    publish_retries: AtomicU64,
    received: AtomicU64,
    received_dropped: AtomicU64,
    received_duplicates: AtomicU64,
    sequence_gaps: AtomicU64,
    questions: AtomicU64,
    answered: AtomicU64,
    answers_given: AtomicU64,
    disconnects: AtomicU64,
    connect_errors: AtomicU64,
    reconnects: AtomicU64,
    partitions: AtomicU64,
    heard: AtomicU64,
}

/// The node's connection to the bus, shared by the HTTP handlers (remote
/// publishes) and the cluster task.
pub struct Bus {
    client: Client,
    config: ClusterConfig,
    router: Arc<Router>,
    counters: Arc<Counters>,
    /// A subject nobody subscribes to: a request to it comes back at once
    /// as "no responders", after everything sent before it was processed.
    sync_subject: String,
    /// The node's clock: a publish from the bus is stamped when it arrives
    /// (the start of its publish → send latency here).
    clock: super::Clock,
    /// This node's stream id: its publishes are numbered per partition
    /// within it ([`wire::Number`]).
    stream: u64,
    /// The number of this node's last publish to each partition. Held
    /// while a batch is numbered and queued, so the numbers reach the
    /// server in order.
    numbers: tokio::sync::Mutex<Vec<u64>>,
}

impl Bus {
    /// Connects (in the background: the node runs, and delivers locally,
    /// while no server answers; the client keeps trying).
    pub async fn connect(
        config: ClusterConfig,
        router: Arc<Router>,
        clock: super::Clock,
    ) -> Result<Arc<Bus>, String> {
        let counters = Arc::new(Counters::default());
        let k = Arc::clone(&counters);
        let warned = Arc::new(AtomicBool::new(false));
        let node_id = config.node_id.clone();
        let options = ConnectOptions::new()
            .name(format!("mppd-{node_id}"))
            .no_echo()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .client_capacity(65_536)
            .subscription_capacity(65_536)
            .reconnect_delay_callback(|attempts| {
                // 100 ms, 200 ms, … up to 1 s, with jitter.
                let base = (attempts.max(1) as u64 * 100).min(1_000);
                Duration::from_millis(base / 2 + rand::random::<u64>() % (base / 2 + 1))
            })
            .event_callback(move |event| {
                let (k, node_id) = (Arc::clone(&k), node_id.clone());
                let warned = Arc::clone(&warned);
                async move {
                    match event {
                        // Once per outage (the client retries up to every
                        // second): the reason, e.g. a host that does not
                        // resolve or a server that refuses.
                        async_nats::Event::ClientError(e) => {
                            k.connect_errors.fetch_add(1, Relaxed);
                            if !warned.swap(true, Relaxed) {
                                tracing::warn!(
                                    node_id,
                                    error = %e,
                                    "cluster bus: cannot reach a NATS server; retrying, local delivery goes on"
                                );
                            } else {
                                tracing::debug!(node_id, error = %e, "cluster bus: connect failed again");
                            }
                        }
                        async_nats::Event::Connected => {
                            warned.store(false, Relaxed);
                            k.reconnects.fetch_add(1, Relaxed);
                            tracing::info!(node_id, "cluster bus connected");
                        }
                        async_nats::Event::Disconnected => {
                            k.disconnects.fetch_add(1, Relaxed);
                            tracing::warn!(
                                node_id,
                                "cluster bus disconnected: local delivery goes on, remote publishes are retried"
                            );
                        }
                        // The client dropped a message its subscription's
                        // queue had no room for (the numbered streams see
                        // the gap and resynchronise the partition).
                        async_nats::Event::SlowConsumer(sid) => {
                            tracing::warn!(node_id, sid, "cluster bus: a subscription fell behind and the client dropped messages");
                        }
                        other => tracing::debug!(node_id, event = %other, "cluster bus event"),
                    }
                }
            });
        let urls: Vec<async_nats::ServerAddr> = config
            .urls
            .iter()
            .map(|u| u.parse().map_err(|e| format!("{u}: {e}")))
            .collect::<Result<_, _>>()?;
        let client = options
            .connect(urls)
            .await
            .map_err(|e| format!("cannot start the cluster client: {e}"))?;
        let sync_subject = format!("mpp-sync.{}", config.node_id);
        let numbers = tokio::sync::Mutex::new(vec![0; config.partitions.max(1) as usize]);
        Ok(Arc::new(Bus {
            stream: rand::random(),
            numbers,
            client,
            config,
            router,
            counters,
            sync_subject,
            clock,
        }))
    }

    /// Whether the client is connected to a server now (its own state,
    /// not the event callback's, which may lag or miss an event).
    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Connections the client made so far (the first and every reconnect):
    /// subscriptions confirmed on an earlier one may have missed messages.
    fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Relaxed)
    }

    /// The bus's counters.
    pub fn metrics(&self) -> ClusterMetrics {
        let k = &self.counters;
        ClusterMetrics {
            connected: self.is_connected(),
            partitions: k.partitions.load(Relaxed),
            heard: k.heard.load(Relaxed),
            published: k.published.load(Relaxed),
            publish_failed: k.publish_failed.load(Relaxed),
            publish_retries: k.publish_retries.load(Relaxed),
            received: k.received.load(Relaxed),
            received_dropped: k.received_dropped.load(Relaxed),
            received_duplicates: k.received_duplicates.load(Relaxed),
            sequence_gaps: k.sequence_gaps.load(Relaxed),
            questions: k.questions.load(Relaxed),
            answered: k.answered.load(Relaxed),
            answers_given: k.answers_given.load(Relaxed),
            disconnects: k.disconnects.load(Relaxed),
            connect_errors: k.connect_errors.load(Relaxed),
        }
    }

    /// One round trip to the server: true once everything this client sent
    /// before it has been processed there.
    async fn confirm(&self, within: Duration) -> bool {
        let request = Request::new().timeout(Some(within));
        let asked = self.client.send_request(self.sync_subject.clone(), request);
        match tokio::time::timeout(within, asked).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => e.kind() == RequestErrorKind::NoResponders,
            Err(_) => false,
        }
    }

    /// Sends numbered messages in order.
    async fn send_all(&self, messages: &[(String, Bytes)]) -> Result<(), ()> {
        for (subject, payload) in messages {
            self.client
                .publish(subject.clone(), payload.clone())
                .await
                .map_err(|_| ())?;
        }
        Ok(())
    }

    /// Numbers a batch (the next number of each publish's partition in
    /// this node's stream) and queues it, under the lock, so that every
    /// partition's numbers reach the server in order.
    async fn number_and_send(
        &self,
        batch: &[(String, Vec<u8>)],
        within: Duration,
    ) -> (Vec<(String, Bytes)>, bool) {
        let mut numbers = self.numbers.lock().await;
        let messages: Vec<(String, Bytes)> = batch
            .iter()
            .map(|(account, bitmask)| {
                let p = partition_of(account_affinity(account), self.config.partitions);
                let len = numbers.len();
                let n = &mut numbers[p as usize % len];
                *n += 1;
                let number = wire::Number {
                    sender: self.stream,
                    seq: *n,
                };
                (
                    publish_subject(p),
                    wire::numbered_publish(number, account, bitmask),
                )
            })
            .collect();
        let sent = tokio::time::timeout(within, self.send_all(&messages)).await;
        (messages, matches!(sent, Ok(Ok(()))))
    }

    /// Hands publishes to the other nodes (docs/PROTOCOL.md §10.3): each to
    /// its partition's subject, numbered; the batch counts as handed over
    /// once a round trip after it came back. A round trip that does not
    /// come back in time on the same connection is only asked again (what
    /// the client queued is still on its way); a batch is sent again only
    /// after the connection broke, with the same numbers, so a receiver
    /// that had it drops the copy. That goes on until
    /// `cluster_publish_timeout_ms`; what is left then is counted failed
    /// and logged.
    pub async fn publish_remote(&self, batch: &[(String, Vec<u8>)]) -> RemoteOutcome {
        if batch.is_empty() {
            return RemoteOutcome::default();
        }
        let deadline = Instant::now() + self.config.publish_timeout;
        let mut connection = self.connects();
        let (messages, mut sent) = self
            .number_and_send(batch, self.config.publish_timeout)
            .await;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if !sent {
                self.counters.publish_retries.fetch_add(1, Relaxed);
                connection = self.connects();
                sent = matches!(
                    tokio::time::timeout(left, self.send_all(&messages)).await,
                    Ok(Ok(()))
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if sent && self.confirm(left.min(CONFIRM_TIMEOUT)).await {
                self.counters
                    .published
                    .fetch_add(messages.len() as u64, Relaxed);
                return RemoteOutcome {
                    remote: messages.len(),
                    failed: 0,
                };
            }
            // The bus is away: wait for it (bounded), then send again if
            // the connection the batch went out on broke meanwhile.
            while !self.is_connected() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if self.connects() != connection {
                sent = false;
            }
        }
        self.counters
            .publish_failed
            .fetch_add(messages.len() as u64, Relaxed);
        tracing::error!(
            publishes = messages.len(),
            timeout_ms = self.config.publish_timeout.as_millis() as u64,
            "publishes not handed to the cluster bus in time: devices on other nodes miss them (reported to the publisher)"
        );
        RemoteOutcome {
            remote: 0,
            failed: messages.len(),
        }
    }

    /// Routes a message to shard `shard`, retrying a full inbox briefly.
    async fn route(&self, shard: ShardId, mut make: impl FnMut() -> ShardMessage) -> bool {
        for _ in 0..INBOX_RETRIES {
            if self.router.send(shard, make()).is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Tells the shards that partition `p`'s stream skipped publishes:
    /// its account records resynchronise (docs/PROTOCOL.md §10.3). Never
    /// dropped (the router waits for room in each inbox).
    fn gap(&self, p: u32) {
        self.router
            .broadcast(|| ShardMessage::BusGap { partition: p });
    }

    /// A message on partition `p`'s subjects; `streams` is what this
    /// subscription heard of each sender's stream.
    async fn on_message(
        self: &Arc<Self>,
        p: u32,
        streams: &mut Streams,
        message: async_nats::Message,
    ) {
        match wire::decode(&message.payload) {
            Ok(wire::BusMessage::Publish {
                account,
                bitmask,
                number,
            }) => {
                let gap = match number.map(|n| streams.place(n)) {
                    Some(Place::Again) => {
                        self.counters.received_duplicates.fetch_add(1, Relaxed);
                        return;
                    }
                    Some(Place::After { missing }) => {
                        self.counters.sequence_gaps.fetch_add(1, Relaxed);
                        tracing::warn!(
                            partition = p,
                            missing,
                            "cluster bus: publishes of another node missing on the way; the partition's devices resynchronise"
                        );
                        true
                    }
                    Some(Place::Next) | None => false,
                };
                let shard = self.router.shard_of_account(account);
                let routed = self
                    .route(shard, || ShardMessage::Publish {
                        account: account.to_owned(),
                        bitmask: bitmask.to_vec(),
                        stamp: self.clock.mono_nanos(),
                    })
                    .await;
                let counter = if routed {
                    &self.counters.received
                } else {
                    &self.counters.received_dropped
                };
                counter.fetch_add(1, Relaxed);
                if gap || !routed {
                    self.gap(p);
                }
            }
            Ok(wire::BusMessage::Last { number }) => {
                if let Some(missing) = streams.announced(number) {
                    self.counters.sequence_gaps.fetch_add(1, Relaxed);
                    tracing::warn!(
                        partition = p,
                        missing,
                        "cluster bus: the last publishes of another node missing on the way (its announced number is ahead); the partition's devices resynchronise"
                    );
                    self.gap(p);
                }
            }
            Ok(wire::BusMessage::Question { account, mark }) => {
                let Some(reply) = message.reply.clone() else {
                    return;
                };
                let (tx, rx) = tokio::sync::oneshot::channel();
                let shard = self.router.shard_of_account(account);
                let query = ShardMessage::CatchUpQuery {
                    account: account.to_owned(),
                    mark,
                    reply: tx,
                };
                if self.router.send(shard, query).is_err() {
                    return;
                }
                let bus = Arc::clone(self);
                tokio::spawn(async move {
                    let within = bus.config.catch_up_timeout;
                    if let Ok(Ok(Some(bits))) = tokio::time::timeout(within, rx).await {
                        bus.counters.answers_given.fetch_add(1, Relaxed);
                        let _ = bus.client.publish(reply, wire::answer(&bits)).await;
                    }
                });
            }
            Ok(wire::BusMessage::Answer { .. }) => {}
            Err(e) => {
                self.counters.received_dropped.fetch_add(1, Relaxed);
                tracing::debug!(%e, subject = %message.subject, "malformed cluster payload dropped");
            }
        }
    }

    /// Announces, about once a second, the last number of this node's
    /// stream on each partition it published to since its previous
    /// announcement (docs/PROTOCOL.md §10.3); nothing while idle or while
    /// the bus is away (then after it is back). Each announcement is
    /// queued after the publishes it counts (they are queued under the
    /// lock it reads the numbers under), so it reaches a receiver after them.
    async fn announce(self: Arc<Self>) {
        let mut announced = vec![0u64; self.config.partitions.max(1) as usize];
        let mut tick = tokio::time::interval(ANNOUNCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.is_connected() {
                continue;
            }
            let due = {
                let numbers = self.numbers.lock().await;
                due(&numbers, &mut announced)
            };
            for (p, seq) in due {
                let number = wire::Number {
                    sender: self.stream,
                    seq,
                };
                if self
                    .client
                    .publish(publish_subject(p), wire::last(number))
                    .await
                    .is_err()
                {
                    // Announced again at the next tick.
                    announced[p as usize] = 0;
                }
            }
        }
    }

    /// Asks the cluster a shard's question and hands the answer back to it.
    async fn ask(self: Arc<Self>, q: CatchUpQuestion) {
        self.counters.questions.fetch_add(1, Relaxed);
        let within = self.config.catch_up_timeout;
        let request = Request::new()
            .payload(wire::question(&q.account, q.mark))
            .timeout(Some(within));
        let asked = self
            .client
            .send_request(catch_up_subject(q.partition), request);
        let answer = match tokio::time::timeout(within, asked).await {
            Ok(Ok(m)) => match wire::decode(&m.payload) {
                Ok(wire::BusMessage::Answer { bitmask }) => Some(bitmask.to_vec()),
                _ => None,
            },
            _ => None,
        };
        if answer.is_some() {
            self.counters.answered.fetch_add(1, Relaxed);
        }
        let token = q.token;
        // A full inbox: the shard answers with a resync at its own deadline.
        let _ = self
            .route(q.shard, || ShardMessage::CatchUpAnswer {
                token,
                answer: answer.clone(),
            })
            .await;
    }
}

/// The partitions whose last number moved since it was last announced,
/// with that number; `announced` is brought up to date.
fn due(numbers: &[u64], announced: &mut [u64]) -> Vec<(u32, u64)> {
    numbers
        .iter()
        .zip(announced.iter_mut())
        .enumerate()
        .filter(|(_, (&n, a))| n != **a)
        .map(|(p, (&n, a))| {
            *a = n;
            (p as u32, n)
        })
        .collect()
}

/// Where a numbered publish falls in its sender's stream, as one
/// partition subscription heard it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The next one (or the first heard of the stream).
    Next,
    /// A number already heard (or older): a copy, dropped.
    Again,
    /// Past the next one: `missing` publishes were lost on the way.
    After { missing: u64 },
}

/// The last number heard of each sender's stream on one partition
/// subscription (a new subscription starts empty: what was published
/// before it is heard is covered by the resync of hearing the partition).
#[derive(Default)]
struct Streams {
    last: HashMap<u64, (u64, u64)>,
    clock: u64,
}

impl Streams {
    /// Makes room for a new sender's stream (the least recently heard is
    /// forgotten); the clock now.
    fn tick(&mut self, sender: u64) -> u64 {
        self.clock += 1;
        if !self.last.contains_key(&sender) && self.last.len() >= MAX_STREAMS {
            if let Some(oldest) = self.last.iter().min_by_key(|(_, v)| v.1).map(|(&k, _)| k) {
                self.last.remove(&oldest);
            }
        }
        self.clock
    }

    /// Takes the announcement that `n` is its stream's last number so far:
    /// how many publishes were lost on the way when it is beyond the last
    /// heard (the first heard of a stream is taken as it comes, as in
    /// [`Streams::place`]).
    fn announced(&mut self, n: wire::Number) -> Option<u64> {
        let clock = self.tick(n.sender);
        let (last, seen) = self.last.entry(n.sender).or_insert((n.seq, clock));
        *seen = clock;
        if n.seq > *last {
            let missing = n.seq - *last;
            *last = n.seq;
            Some(missing)
        } else {
            None
        }
    }

    /// Places `n` and remembers it.
    fn place(&mut self, n: wire::Number) -> Place {
        let clock = self.tick(n.sender);
        match self.last.get_mut(&n.sender) {
            None => {
                self.last.insert(n.sender, (n.seq, clock));
                Place::Next
            }
            Some((last, _)) if n.seq <= *last => Place::Again,
            Some((last, seen)) => {
                let missing = n.seq - *last - 1;
                *last = n.seq;
                *seen = clock;
                if missing == 0 {
                    Place::Next
                } else {
                    Place::After { missing }
                }
            }
        }
    }
}

/// One partition subscription.
struct Partition {
    receiver: tokio::task::JoinHandle<()>,
    /// The server has the subscription (confirmed) and the shards know.
    heard: bool,
    /// Kept at least until then.
    keep_until: Instant,
}

/// What the cluster task learns from the tasks it starts.
enum Note {
    /// A round trip on the client's `connection`-th connection confirmed
    /// the subscriptions to `partitions`.
    Confirmed {
        connection: u64,
        partitions: Vec<u32>,
    },
}

/// Subscribes to partition `p` unless it is already (then only keeps it
/// at least `keep` longer); true when it subscribed now. The subscription
/// is handed to the client before this returns, so a request sent after it
/// reaches the server after it (docs/PROTOCOL.md §10.4).
async fn subscribe(
    bus: &Arc<Bus>,
    p: u32,
    subs: &mut HashMap<u32, Partition>,
    keep: Duration,
) -> bool {
    if let Some(s) = subs.get_mut(&p) {
        s.keep_until = s.keep_until.max(Instant::now() + keep);
        return false;
    }
    let mut sub = match bus.client.subscribe(format!("mpp.*.{p}")).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(%e, partition = p, "cannot subscribe to a cluster partition");
            return false;
        }
    };
    let bus2 = Arc::clone(bus);
    let receiver = tokio::spawn(async move {
        let mut streams = Streams::default();
        while let Some(m) = sub.next().await {
            bus2.on_message(p, &mut streams, m).await;
        }
    });
    subs.insert(
        p,
        Partition {
            receiver,
            heard: false,
            keep_until: Instant::now() + keep,
        },
    );
    true
}

/// Runs the cluster until the node stops: interest, subscriptions, the
/// shards' catch-up questions, and the bus's outages.
pub async fn run(
    bus: Arc<Bus>,
    interest: Arc<Interest>,
    mut questions: tokio::sync::mpsc::Receiver<CatchUpQuestion>,
) {
    let partitions = bus.config.partitions;
    tokio::spawn(Arc::clone(&bus).announce());
    let mut subs: HashMap<u32, Partition> = HashMap::new();
    let (notes_tx, mut notes) = tokio::sync::mpsc::channel::<Note>(64);
    let mut tick = tokio::time::interval(SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The client's connection the heard partitions were confirmed on
    // (its count of connections, from the client's own statistics: the
    // event callback may run late or miss an event). When it changes, or
    // the client is disconnected, what was heard may have missed messages.
    let mut connection = 0u64;

    let confirm = |partitions: Vec<u32>| {
        let (bus, notes) = (Arc::clone(&bus), notes_tx.clone());
        tokio::spawn(async move {
            // Retried while the bus is away: a partition is heard only once
            // the server has its subscription.
            for _ in 0..600 {
                let before = bus.connects();
                if bus.confirm(CONFIRM_TIMEOUT).await && bus.connects() == before {
                    let _ = notes
                        .send(Note::Confirmed {
                            connection: before,
                            partitions,
                        })
                        .await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    };
    // The bus went away or came back on another connection: every
    // partition is unheard until the server has its subscriptions again.
    let check = |subs: &mut HashMap<u32, Partition>, connection: &mut u64| {
        let connected = bus.is_connected();
        let now = bus.connects();
        if connected && now == *connection {
            return;
        }
        let deaf: Vec<u32> = subs
            .iter_mut()
            .filter_map(|(&p, s)| std::mem::replace(&mut s.heard, false).then_some(p))
            .collect();
        if !deaf.is_empty() {
            tracing::info!(
                partitions = deaf.len(),
                "cluster bus: subscriptions to be confirmed again (the connection changed)"
            );
            let deaf: Arc<[u32]> = deaf.into();
            bus.router.broadcast(|| ShardMessage::Hearing {
                partitions: Arc::clone(&deaf),
                heard: false,
            });
        }
        if connected && now != *connection {
            *connection = now;
            if !subs.is_empty() {
                confirm(subs.keys().copied().collect());
            }
        }
    };

    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(q) = questions.recv() => {
                // docs/PROTOCOL.md §10.4: subscribe before asking, so that a
                // publish after the question reaches this node, and one
                // before it the node that answers.
                if subscribe(&bus, q.partition, &mut subs, LINGER).await {
                    confirm(vec![q.partition]);
                }
                tokio::spawn(Arc::clone(&bus).ask(q));
                continue;
            }
            Some(note) = notes.recv() => {
                let Note::Confirmed { connection: c, partitions: ps } = note;
                // A confirmation on a connection that has since been
                // replaced no longer counts (all are confirmed again).
                check(&mut subs, &mut connection);
                if c != connection || !bus.is_connected() {
                    continue;
                }
                let newly: Vec<u32> = ps
                    .into_iter()
                    .filter(|p| subs.get_mut(p).is_some_and(|s| !std::mem::replace(&mut s.heard, true)))
                    .collect();
                if !newly.is_empty() {
                    let newly: Arc<[u32]> = newly.into();
                    bus.router.broadcast(|| ShardMessage::Hearing {
                        partitions: Arc::clone(&newly),
                        heard: true,
                    });
                }
                continue;
            }
        }
        check(&mut subs, &mut connection);
        // Interest: subscribe where devices are, let go where none were
        // for LINGER.
        let mut added = Vec::new();
        for p in 0..partitions {
            if interest.any(p as usize) && subscribe(&bus, p, &mut subs, LINGER).await {
                added.push(p);
            }
        }
        if !added.is_empty() {
            confirm(added);
        }
        let now = Instant::now();
        let idle: Vec<u32> = subs
            .iter()
            .filter(|(&p, s)| s.keep_until <= now && !interest.any(p as usize))
            .map(|(&p, _)| p)
            .collect();
        if !idle.is_empty() {
            let deaf: Vec<u32> = idle
                .iter()
                .copied()
                .filter(|p| subs.get(p).is_some_and(|s| s.heard))
                .collect();
            if !deaf.is_empty() {
                let deaf: Arc<[u32]> = deaf.into();
                bus.router.broadcast(|| ShardMessage::Hearing {
                    partitions: Arc::clone(&deaf),
                    heard: false,
                });
            }
            for p in idle {
                if let Some(s) = subs.remove(&p) {
                    // Dropping the subscriber unsubscribes.
                    s.receiver.abort();
                }
            }
        }
        for p in 0..partitions {
            if interest.any(p as usize) {
                if let Some(s) = subs.get_mut(&p) {
                    s.keep_until = s.keep_until.max(now + LINGER);
                }
            }
        }
        bus.counters.partitions.store(subs.len() as u64, Relaxed);
        bus.counters
            .heard
            .store(subs.values().filter(|s| s.heard).count() as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_are_checked() {
        for good in [
            "nats://127.0.0.1:4222",
            "nats://localhost",
            "nats://bus.example:4222",
            "nats://[::1]:4222",
        ] {
            assert_eq!(check_url(good), Ok(()), "{good}");
        }
        for bad in [
            "127.0.0.1:4222",
            "http://x:1",
            "nats://",
            "nats://:4222",
            "nats://host:0",
            "nats://host:99999",
            "nats://host:x",
            "nats://ho st:1",
            "nats://a/b:1",
        ] {
            let e = check_url(bad).expect_err(bad);
            assert!(e.contains(bad) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn node_ids_are_subject_tokens() {
        assert!(check_node_id("node-1_a").is_ok());
        for bad in ["", "a.b", "a b", "*", ">", &"x".repeat(65)] {
            assert!(check_node_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_partitions_published_to_since_are_announced() {
        let mut announced = vec![0; 4];
        assert_eq!(due(&[0, 0, 0, 0], &mut announced), vec![]);
        assert_eq!(due(&[0, 3, 0, 1], &mut announced), vec![(1, 3), (3, 1)]);
        // Idle: nothing.
        assert_eq!(due(&[0, 3, 0, 1], &mut announced), vec![]);
        assert_eq!(due(&[0, 5, 0, 1], &mut announced), vec![(1, 5)]);
        assert_eq!(announced, vec![0, 5, 0, 1]);
    }

    #[test]
    fn an_announced_number_beyond_the_last_heard_is_a_gap() {
        let n = |seq| wire::Number { sender: 9, seq };
        let mut s = Streams::default();
        // The first heard of a stream is its start.
        assert_eq!(s.announced(n(4)), None);
        assert_eq!(s.place(n(5)), Place::Next);
        assert_eq!(s.announced(n(5)), None);
        assert_eq!(s.announced(n(4)), None);
        // 6 and 7 never came.
        assert_eq!(s.announced(n(7)), Some(2));
        assert_eq!(s.announced(n(7)), None);
        // A late copy of 7 is dropped; 8 goes on as usual.
        assert_eq!(s.place(n(7)), Place::Again);
        assert_eq!(s.place(n(8)), Place::Next);
    }

    #[test]
    fn interest_is_any_shard_holding_a_device() {
        let i = Interest::new(2, 4);
        assert!(!i.any(1));
        i.store(1, &[0, 3, 0, 0]);
        assert!(i.any(1) && !i.any(0));
        i.store(1, &[0, 0, 0, 0]);
        assert!(!i.any(1));
    }
}
