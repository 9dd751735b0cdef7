//! The client's state machine (docs/PROTOCOL.md §6), shared by the `mpp` CLI, the
//! load generator and the tests.
//!
//! States follow the reference: `Connecting` (the connect is retried 3 times,
//! 1 s apart) → `Connected` → `Unacknowledged` while a heartbeat waits for its
//! answer (resent every 1 s, 3 tries) → back to `Connecting` when the node
//! stops answering, or `Disconnected` (waiting `reconnect_ms`, 60 s, before
//! the next round of connects). `Aborted` is final: the node refused the
//! credential (401/403) or the application disconnected.
//!
//! A notify is reported once per Serial and acknowledged every time it
//! arrives (the first acknowledgement may have been lost). The pending state
//! carried by `PresenceConnectResponse` and `PresenceStatus` is treated the
//! same way, which is how a notify lost five times is still recovered at the
//! next heartbeat.
//!
//! The client keeps the device's *mark* (docs/PROTOCOL.md §6, "Catch-up"):
//! the last notify Serial it processed. Every connect carries it as
//! `Acknowledge`, so a node that held the account while the device was away
//! answers with what changed meanwhile (a catch-up), or with all-ones (a
//! resync) when it cannot know. The application persists [`Client::mark`]
//! across its own restarts and hands it back in [`ClientConfig::mark`].
//!
//! Replies are accepted once: each must acknowledge a request this client
//! sent recently and that has not been answered yet (a 64-wide window over
//! its own Serials, like the node's over the client's), so a captured reply
//! replayed later — a 503 that would take the device offline, say — is
//! dropped (docs/PROTOCOL.md §7).

use std::collections::VecDeque;
use std::net::SocketAddr;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::{Transmit, MAX_BITMASK};
use crate::codec::{
    ClientHeader, Message, PresenceAcknowledge, PresenceConnectRequest, PresenceDisconnectRequest,
    PresenceEndpointRequest, PresenceHeartbeat, PresenceResolveRequest,
};
use crate::packet::{
    open_in_place, seal_in_place, ConnId, Credential, Direction, PacketKey, Reassembler,
    FRAGMENT_MARKER, HEADER_LEN, MAX_PACKET, MAX_PLAINTEXT,
};
use crate::time::{UnixMillis, UnixSeconds};

/// Client timers and retry counts (docs/PROTOCOL.md §6 defaults).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Heartbeat period (ms); `None` uses the ConnectionTimeout the node announces.
    pub heartbeat_ms: Option<u64>,
    /// Delay before resending an unanswered connect or heartbeat (ms).
    pub retry_ms: u64,
    /// Connect attempts per round.
    pub connect_tries: u8,
    /// Heartbeat attempts before the connection is considered lost.
    pub heartbeat_tries: u8,
    /// Wait between rounds of connect attempts (ms).
    pub reconnect_ms: u64,
    /// Serial of the first packet; `None` starts at the current Unix time in
    /// seconds, so a restarted device is above the Serials it used before.
    pub first_serial: Option<i64>,
    /// The device's mark from its last run: the last notify Serial it
    /// processed (`None`: no history, e.g. a first start).
    pub mark: Option<i64>,
    /// Reconnects after the node forgot the connection (404) or shed it
    /// (503) wait a random delay below this (ms), so a million devices do
    /// not come back in the same millisecond.
    pub reconnect_jitter_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            heartbeat_ms: None,
            retry_ms: 1_000,
            connect_tries: 3,
            heartbeat_tries: 3,
            reconnect_ms: 60_000,
            first_serial: None,
            mark: None,
            reconnect_jitter_ms: 1_000,
        }
    }
}

/// Where the client is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Sending connects, waiting for the answer.
    Connecting,
    /// Subscribed; heartbeats answered.
    Connected,
    /// A heartbeat is waiting for its answer.
    Unacknowledged,
    /// Connects went unanswered; waiting before the next round.
    Disconnected,
    /// Will not reconnect: refused credential or disconnected on request.
    Aborted,
}

/// Why the client stopped being connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The application asked (and the node confirmed, or did not answer).
    Requested,
    /// The node stopped answering.
    Timeout,
    /// The node refused the connection.
    Refused {
        /// `Status` (401 invalid binding, 403 expired, 404 unknown, 503 full).
        status: i64,
        /// `StatusDescription`.
        description: String,
    },
}

/// What the application learns from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The node accepted the connect.
    Connected {
        /// The address the node sees.
        endpoint: SocketAddr,
    },
    /// Stores of the account changed (reported once per Serial).
    Notify {
        /// The notify's Serial.
        serial: i64,
        /// Which stores changed (bit i = store i).
        bitmask: Vec<u8>,
        /// Carried by a connect's answer: what changed while the device was
        /// away (or not yet acknowledged).
        catch_up: bool,
        /// The node could not know what changed: every store must be
        /// synchronised (a catch-up of 32 bytes of `FF`).
        resync: bool,
    },
    /// Answer to [`Client::request_endpoint`].
    Endpoint(SocketAddr),
    /// Answer to [`Client::resolve`]: the DNS response, or the Status of the failure.
    Resolved(Result<Vec<u8>, i64>),
    /// No longer connected.
    Disconnected(DisconnectReason),
}

#[derive(Debug)]
enum Outgoing {
    Connect,
    Heartbeat,
    Acknowledge(i64),
    /// A `PresenceAcknowledge` of the mark, sent to echo a challenge.
    Echo,
    Endpoint,
    Resolve(Vec<u8>),
    Disconnect,
}

/// Counters for tools and the load generator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Datagrams produced.
    pub sent: u64,
    /// Datagrams accepted (authenticated and decoded).
    pub received: u64,
    /// Datagrams dropped: failed authentication or decoding.
    pub dropped: u64,
    /// Notifies received, including repeats of one Serial.
    pub notifies_received: u64,
    /// Replies dropped because they answered no outstanding request (replays).
    pub replays_dropped: u64,
}

/// One request a device sends, borrowed: what [`seal_request`] encodes.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// `PresenceConnectRequest` with the credential's fields.
    Connect {
        /// The credential's account.
        account: &'a str,
        /// The credential's device.
        device: &'a str,
        /// The credential's expiry.
        expires: UnixSeconds,
        /// The credential's binding.
        binding: &'a [u8; 32],
    },
    /// `PresenceHeartbeat`.
    Heartbeat,
    /// `PresenceAcknowledge` of a notify Serial.
    Acknowledge(i64),
    /// `PresenceEndpointRequest`.
    Endpoint,
    /// `PresenceResolveRequest` carrying a DNS query.
    Resolve(&'a [u8]),
    /// `PresenceDisconnectRequest`.
    Disconnect,
}

/// Why [`seal_request`] wrote nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealRequestError {
    /// The message does not fit in one packet (only a large DNS query can).
    #[error("request does not fit in one packet")]
    TooLarge,
    /// The buffer is shorter than [`MAX_PACKET`] or the conn id is reserved.
    #[error("packet could not be sealed")]
    Packet,
}

/// Encodes `request` with `serial` in its header and seals it for the node
/// into `buf` (at least [`MAX_PACKET`] bytes), returning the datagram's
/// length. This is the one place a device's request is built: [`Client`]
/// uses it, and so does the load generator, which keeps its own compact
/// per-device state instead of a `Client` per device.
pub fn seal_request(
    key: &PacketKey,
    conn_id: ConnId,
    nonce: [u8; 12],
    serial: i64,
    request: &Request<'_>,
    buf: &mut [u8],
) -> Result<usize, SealRequestError> {
    seal_request_acknowledging(key, conn_id, nonce, serial, None, request, buf)
}

/// [`seal_request`] with `Acknowledge` set in the request's header: any
/// request may acknowledge a notify Serial (docs/PROTOCOL.md, D8), and a
/// connect carries the device's mark there (§6, "Catch-up"). For
/// [`Request::Acknowledge`] the request's own Serial wins.
pub fn seal_request_acknowledging(
    key: &PacketKey,
    conn_id: ConnId,
    nonce: [u8; 12],
    serial: i64,
    acknowledge: Option<i64>,
    request: &Request<'_>,
    buf: &mut [u8],
) -> Result<usize, SealRequestError> {
    let header = RequestHeader {
        serial,
        acknowledge,
        echo: None,
    };
    seal_request_with(key, conn_id, nonce, &header, request, buf)
}

/// The inherited fields of a request that [`seal_request_with`] sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// The request's Serial.
    pub serial: i64,
    /// A notify Serial to acknowledge (or, in a connect, the device's mark).
    pub acknowledge: Option<i64>,
    /// The node's endpoint challenge to echo in `ID` (docs/PROTOCOL.md §7.9).
    pub echo: Option<[u8; 8]>,
}

/// Encodes `request` with `header` and seals it for the node: the general
/// form of [`seal_request`].
pub fn seal_request_with(
    key: &PacketKey,
    conn_id: ConnId,
    nonce: [u8; 12],
    header: &RequestHeader,
    request: &Request<'_>,
    buf: &mut [u8],
) -> Result<usize, SealRequestError> {
    if buf.len() < MAX_PACKET {
        return Err(SealRequestError::Packet);
    }
    let header = ClientHeader {
        serial: Some(header.serial),
        acknowledge: header.acknowledge,
        id: header.echo.as_ref().map(|e| (&e[..]).into()),
        ..ClientHeader::default()
    };
    let message = match *request {
        Request::Connect {
            account,
            device,
            expires,
            binding,
        } => Message::ConnectRequest(PresenceConnectRequest {
            account: Some(account.into()),
            device: Some(device.into()),
            expires: Some(expires),
            binding: Some((&binding[..]).into()),
            header,
        }),
        Request::Heartbeat => Message::Heartbeat(PresenceHeartbeat { header }),
        Request::Acknowledge(serial) => Message::Acknowledge(PresenceAcknowledge {
            header: ClientHeader {
                acknowledge: Some(serial),
                ..header
            },
        }),
        Request::Endpoint => Message::EndpointRequest(PresenceEndpointRequest { header }),
        Request::Resolve(q) => Message::ResolveRequest(PresenceResolveRequest {
            dns_request: Some(q.into()),
            header,
        }),
        Request::Disconnect => Message::DisconnectRequest(PresenceDisconnectRequest { header }),
    };
    let n = message
        .encode(&mut buf[HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT])
        .map_err(|_| SealRequestError::TooLarge)?;
    seal_in_place(key, conn_id, nonce, buf, n).map_err(|_| SealRequestError::Packet)
}

/// A device's MPP client.
pub struct Client {
    config: ClientConfig,
    node: SocketAddr,
    /// Every node the device may use, `node` among them (docs/PROTOCOL.md
    /// §10.5): the credential's endpoints, tried in turn.
    nodes: Vec<SocketAddr>,
    /// Nodes that stopped answering since the last connect was answered.
    unanswered: usize,
    /// Times the client moved to another node.
    failovers: u64,
    conn_id: ConnId,
    c2s: PacketKey,
    s2c: PacketKey,
    account: String,
    device: String,
    expires: UnixSeconds,
    binding: [u8; 32],
    rng: StdRng,
    state: ClientState,
    serial: i64,
    tries: u8,
    deadline: Option<UnixMillis>,
    heartbeat_ms: u64,
    disconnecting: bool,
    /// The last notify Serial processed (docs/PROTOCOL.md §6).
    mark: Option<i64>,
    /// The highest Serial sent.
    sent_high: i64,
    /// The node's challenge for our current address, echoed in every request
    /// until a reply comes without one (docs/PROTOCOL.md §7.9).
    echo: Option<[u8; 8]>,
    /// Our own Serials the node has answered: bit i = `sent_high - i` was
    /// answered (or never sent).
    answered: u64,
    endpoint: Option<SocketAddr>,
    outgoing: VecDeque<Outgoing>,
    events: VecDeque<ClientEvent>,
    reassembler: Reassembler,
    scratch: Vec<u8>,
    stats: ClientStats,
}

/// Bound on queued outgoing messages; beyond it the oldest acknowledgements
/// are dropped (the node retransmits, and the next one acknowledges again).
const MAX_OUTGOING: usize = 64;

impl Client {
    /// A client for `credential` talking to the node at `node`, starting to
    /// connect at `now`. `seed` seeds the nonce generator and the reconnect
    /// jitter (OS randomness in production).
    pub fn new(
        credential: &Credential,
        node: SocketAddr,
        config: ClientConfig,
        now: UnixMillis,
        seed: [u8; 32],
    ) -> Self {
        let conn_id = credential.conn_id;
        let first_serial = config
            .first_serial
            .unwrap_or(now.seconds().0)
            .clamp(1, i64::from(u32::MAX));
        let mark = config.mark.filter(|&m| m > 0);
        let mut client = Client {
            c2s: credential.secret.key(Direction::ClientToServer, conn_id),
            s2c: credential.secret.key(Direction::ServerToClient, conn_id),
            conn_id,
            node,
            nodes: vec![node],
            unanswered: 0,
            failovers: 0,
            account: credential.account.clone(),
            device: credential.device.clone(),
            expires: credential.expires,
            binding: credential.binding,
            rng: StdRng::from_seed(seed),
            heartbeat_ms: config
                .heartbeat_ms
                .unwrap_or(u64::from(super::CONNECTION_TIMEOUT_MS)),
            config,
            state: ClientState::Connecting,
            serial: first_serial - 1,
            tries: 0,
            deadline: None,
            disconnecting: false,
            mark,
            sent_high: first_serial - 1,
            echo: None,
            answered: u64::MAX,
            endpoint: None,
            outgoing: VecDeque::new(),
            events: VecDeque::new(),
            reassembler: Reassembler::new(),
            scratch: Vec::with_capacity(MAX_PACKET),
            stats: ClientStats::default(),
        };
        client.start_connect(now);
        client
    }

    /// The current state.
    pub fn state(&self) -> ClientState {
        self.state
    }

    /// The address the node last reported seeing us at.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint
    }

    /// The connection id.
    pub fn conn_id(&self) -> ConnId {
        self.conn_id
    }

    /// The device's mark: the last notify Serial it processed. Persist it
    /// and hand it back in [`ClientConfig::mark`] after a restart.
    pub fn mark(&self) -> Option<i64> {
        self.mark
    }

    /// The highest Serial sent so far. A device that persists it (with its
    /// mark) and starts above it after a restart never reuses a Serial,
    /// whatever its clock (docs/PROTOCOL.md §6.2): a packet captured from its
    /// earlier connection then finds a full replay window.
    pub fn highest_serial_sent(&self) -> i64 {
        self.sent_high
    }

    /// The node this client talks to.
    pub fn node(&self) -> SocketAddr {
        self.node
    }

    /// Talks to another node from now on (failover); the next connect goes there.
    pub fn set_node(&mut self, node: SocketAddr) {
        self.node = node;
    }

    /// The nodes this client may use, in order (the credential's
    /// endpoints, resolved; docs/PROTOCOL.md §10.5). When the current node
    /// stops answering (a round of connects, or of heartbeats, unanswered)
    /// the client moves to the next one after a random delay below
    /// `reconnect_jitter_ms`, and connects there with its mark; only after
    /// every node failed in a row does it wait `reconnect_ms`. The current
    /// node is kept (added first if missing). An empty list changes nothing.
    pub fn set_nodes(&mut self, nodes: &[SocketAddr]) {
        let mut list = vec![self.node];
        list.extend(nodes.iter().copied().filter(|&n| n != self.node));
        self.nodes = list;
    }

    /// Times the client moved to another node because its node stopped answering.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// The current node stopped answering: with other nodes to try, move
    /// to the next one and connect after a random delay (true); false when
    /// there is none, or every node failed in a row (the caller waits).
    fn fail_over(&mut self, now: UnixMillis) -> bool {
        if self.nodes.len() < 2 {
            return false;
        }
        self.unanswered += 1;
        let i = self.nodes.iter().position(|&n| n == self.node).unwrap_or(0);
        self.node = self.nodes[(i + 1) % self.nodes.len()];
        self.failovers += 1;
        if self.unanswered >= self.nodes.len() {
            self.unanswered = 0;
            return false;
        }
        self.state = ClientState::Disconnected;
        self.echo = None;
        let jitter = self.rng.next_u64() % self.config.reconnect_jitter_ms.max(1);
        self.deadline = Some(now.plus_millis(jitter));
        true
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    fn push(&mut self, o: Outgoing) {
        if self.outgoing.len() >= MAX_OUTGOING {
            if let Some(i) = self
                .outgoing
                .iter()
                .position(|o| matches!(o, Outgoing::Acknowledge(_)))
            {
                self.outgoing.remove(i);
            } else {
                return;
            }
        }
        self.outgoing.push_back(o);
    }

    fn start_connect(&mut self, now: UnixMillis) {
        // Keep Serials at or above the Unix time: the node only creates a
        // connection from a recent Connect (replay defence). An explicit
        // `first_serial` is honoured for the very first packet.
        if self.serial > 0 || self.config.first_serial.is_none() {
            self.serial = self
                .serial
                .max(now.seconds().0.min(i64::from(u32::MAX)) - 1);
        }
        self.state = ClientState::Connecting;
        self.tries = 1;
        self.push(Outgoing::Connect);
        self.deadline = Some(now.plus_millis(self.config.retry_ms));
    }

    /// Sends a heartbeat now instead of at the next period (a status request,
    /// docs/PROTOCOL.md §2): the answer carries any pending state, and the
    /// state returns to `Connected` when it arrives. Only while connected.
    pub fn request_status(&mut self, now: UnixMillis) {
        if self.state == ClientState::Connected && !self.disconnecting {
            self.state = ClientState::Unacknowledged;
            self.tries = 1;
            self.push(Outgoing::Heartbeat);
            self.deadline = Some(now.plus_millis(self.config.retry_ms));
        }
    }

    /// Asks the node for the address it sees (answered by [`ClientEvent::Endpoint`]).
    pub fn request_endpoint(&mut self) {
        self.push(Outgoing::Endpoint);
    }

    /// Sends a DNS query through the node's proxy (answered by [`ClientEvent::Resolved`]).
    pub fn resolve(&mut self, query: Vec<u8>) {
        self.push(Outgoing::Resolve(query));
    }

    /// Unsubscribes; the client ends in `Aborted` with reason `Requested`.
    pub fn disconnect(&mut self, now: UnixMillis) {
        if self.state == ClientState::Aborted {
            return;
        }
        self.disconnecting = true;
        self.tries = 1;
        self.push(Outgoing::Disconnect);
        self.deadline = Some(now.plus_millis(self.config.retry_ms));
    }

    /// The next event for the application.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When [`Client::handle_timeout`] next needs calling.
    pub fn poll_timeout(&self) -> Option<UnixMillis> {
        match (self.deadline, self.reassembler.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Retries, heartbeats and reconnects that are due.
    pub fn handle_timeout(&mut self, now: UnixMillis) {
        self.reassembler.expire(now);
        let Some(deadline) = self.deadline else {
            return;
        };
        if now < deadline {
            return;
        }
        let retry = now.plus_millis(self.config.retry_ms);
        if self.disconnecting {
            if self.tries < self.config.connect_tries {
                self.tries += 1;
                self.push(Outgoing::Disconnect);
                self.deadline = Some(retry);
            } else {
                self.abort(DisconnectReason::Requested);
            }
            return;
        }
        match self.state {
            ClientState::Connecting if self.tries < self.config.connect_tries => {
                self.tries += 1;
                self.push(Outgoing::Connect);
                self.deadline = Some(retry);
            }
            ClientState::Connecting => {
                self.events
                    .push_back(ClientEvent::Disconnected(DisconnectReason::Timeout));
                if !self.fail_over(now) {
                    self.state = ClientState::Disconnected;
                    self.deadline = Some(now.plus_millis(self.config.reconnect_ms));
                }
            }
            ClientState::Disconnected => {
                // Connects of the last round may have reused Serials the node
                // had seen (and so dropped as replays): jump past its window.
                self.serial += 64;
                self.start_connect(now);
            }
            ClientState::Connected => {
                self.state = ClientState::Unacknowledged;
                self.tries = 1;
                self.push(Outgoing::Heartbeat);
                self.deadline = Some(retry);
            }
            ClientState::Unacknowledged if self.tries < self.config.heartbeat_tries => {
                self.tries += 1;
                self.push(Outgoing::Heartbeat);
                self.deadline = Some(retry);
            }
            ClientState::Unacknowledged => {
                // docs/PROTOCOL.md §6: heartbeats unanswered: reconnect
                // (§10.5: to the next node, when there is one).
                self.events
                    .push_back(ClientEvent::Disconnected(DisconnectReason::Timeout));
                if !self.fail_over(now) {
                    self.start_connect(now);
                }
            }
            ClientState::Aborted => self.deadline = None,
        }
    }

    fn abort(&mut self, reason: DisconnectReason) {
        self.state = ClientState::Aborted;
        self.deadline = None;
        self.disconnecting = false;
        self.outgoing.clear();
        self.events.push_back(ClientEvent::Disconnected(reason));
    }

    /// Writes the next datagram for the node into `buf` (at least
    /// [`MAX_PACKET`] bytes) and says where it goes: always the node, by UDP
    /// (the same [`Transmit`] the node's [`super::Service::poll_transmit`] gives).
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        if buf.len() < MAX_PACKET {
            return None;
        }
        while let Some(o) = self.outgoing.pop_front() {
            if self.state == ClientState::Aborted {
                self.outgoing.clear();
                return None;
            }
            self.serial += 1;
            let request = match o {
                Outgoing::Connect => Request::Connect {
                    account: &self.account,
                    device: &self.device,
                    expires: self.expires,
                    binding: &self.binding,
                },
                Outgoing::Heartbeat => Request::Heartbeat,
                Outgoing::Acknowledge(serial) => Request::Acknowledge(serial),
                Outgoing::Echo => Request::Acknowledge(self.mark.unwrap_or(0)),
                Outgoing::Endpoint => Request::Endpoint,
                Outgoing::Resolve(ref q) => Request::Resolve(q),
                Outgoing::Disconnect => Request::Disconnect,
            };
            // docs/PROTOCOL.md §6: a connect carries the device's mark.
            let acknowledge = match o {
                Outgoing::Connect => self.mark,
                _ => None,
            };
            let mut nonce = [0u8; 12];
            self.rng.fill_bytes(&mut nonce);
            let header = RequestHeader {
                serial: self.serial,
                acknowledge,
                echo: self.echo,
            };
            let sealed = seal_request_with(&self.c2s, self.conn_id, nonce, &header, &request, buf);
            match sealed {
                Ok(size) => {
                    self.stats.sent += 1;
                    self.record_sent(self.serial);
                    return Some(Transmit {
                        destination: self.node,
                        size,
                        web: None,
                    });
                }
                // Only an oversize DNS query can fail here; report it as a failed resolve.
                Err(SealRequestError::TooLarge) => {
                    self.events.push_back(ClientEvent::Resolved(Err(413)));
                }
                Err(SealRequestError::Packet) => {}
            }
        }
        None
    }

    /// Moves the window of answered Serials up to `sent`; Serials skipped
    /// on the way were never sent and count as answered.
    fn record_sent(&mut self, sent: i64) {
        let shift = (sent - self.sent_high).clamp(1, 64) as u32;
        if shift >= 64 {
            self.answered = !1;
        } else {
            let skipped = ((1u64 << shift) - 1) & !1;
            self.answered = (self.answered << shift) | skipped;
        }
        self.sent_high = sent;
    }

    /// True (and recorded) the first time a reply acknowledges `ack`, one of
    /// the last 64 Serials sent; a replay, or a reply to nothing we sent
    /// lately, is false.
    fn fresh_reply(&mut self, ack: Option<i64>) -> bool {
        let Some(delta) = ack.map(|a| self.sent_high - a) else {
            return false;
        };
        if !(0..64).contains(&delta) {
            return false;
        }
        let bit = 1u64 << delta;
        if self.answered & bit != 0 {
            return false;
        }
        self.answered |= bit;
        true
    }

    /// Handles a datagram from the node.
    pub fn handle_datagram(&mut self, now: UnixMillis, datagram: &[u8]) {
        if datagram.len() > MAX_PACKET || datagram.get(..8) != Some(&self.conn_id.0[..]) {
            self.stats.dropped += 1;
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(datagram);
        match open_in_place(&self.s2c, &mut scratch) {
            Ok(plain) if plain.first() == Some(&FRAGMENT_MARKER) => {
                match self.reassembler.push(now, plain) {
                    Ok(Some(whole)) => self.handle_plaintext(now, &whole),
                    Ok(None) => {}
                    Err(_) => self.stats.dropped += 1,
                }
            }
            Ok(plain) => self.handle_plaintext(now, plain),
            Err(_) => self.stats.dropped += 1,
        }
        self.scratch = scratch;
    }

    fn handle_plaintext(&mut self, now: UnixMillis, plain: &[u8]) {
        // Liberal: the service may be the reference implementation or an
        // older node (a DateTime as `80 14 …`, strings as JSON text).
        let Ok(message) = Message::decode_liberal(plain) else {
            self.stats.dropped += 1;
            return;
        };
        let Some(header) = message.service_header() else {
            self.stats.dropped += 1;
            return;
        };
        // docs/PROTOCOL.md §7: a reply counts once, and only for a request of
        // ours; a notify answers nothing (and repeats are harmless).
        if !matches!(message, Message::Notify(_)) && !self.fresh_reply(header.acknowledge) {
            self.stats.replays_dropped += 1;
            return;
        }
        self.stats.received += 1;
        if self.state == ClientState::Aborted {
            return;
        }
        // docs/PROTOCOL.md §7.9: a challenge means the node has not validated
        // our address yet: echo it at once (and in every request until a
        // reply comes without one).
        let new_challenge = match header.id.as_deref().map(<[u8; 8]>::try_from) {
            Some(Ok(id)) if self.echo != Some(id) => {
                self.echo = Some(id);
                true
            }
            Some(_) => false,
            None => {
                self.echo = None;
                false
            }
        };
        self.handle_message(now, message);
        if new_challenge && self.outgoing.is_empty() && self.state != ClientState::Aborted {
            self.push(Outgoing::Echo);
        }
        // docs/PROTOCOL.md §7.9 (D35): the echo may be lost, and the node
        // holds its retransmissions until it has it; while answers still
        // carry a challenge, heartbeat after the retry timeout to find out.
        if self.echo.is_some() && self.state == ClientState::Connected {
            let probe = now.plus_millis(self.config.retry_ms);
            self.deadline = Some(self.deadline.map_or(probe, |d| d.min(probe)));
        }
    }

    fn handle_message(&mut self, now: UnixMillis, message: Message<'_>) {
        let Some(header) = message.service_header() else {
            return;
        };
        if let Some(e) = header.endpoint {
            self.endpoint = Some(e);
        }
        let status = header.status;
        let description = header
            .status_description
            .as_deref()
            .unwrap_or("")
            .to_owned();
        match message {
            Message::ConnectResponse(r) => {
                if self.state != ClientState::Connecting || self.disconnecting {
                    self.pending(r.serial, r.bitmask.as_deref(), false);
                    return;
                }
                self.state = ClientState::Connected;
                if let Some(t) = r.connection_timeout.filter(|&t| t > 0) {
                    if self.config.heartbeat_ms.is_none() {
                        self.heartbeat_ms = t as u64;
                    }
                }
                self.deadline = Some(now.plus_millis(self.heartbeat_ms));
                self.unanswered = 0;
                let endpoint = r.header.endpoint.or(self.endpoint);
                if let Some(endpoint) = endpoint {
                    self.events.push_back(ClientEvent::Connected { endpoint });
                }
                // docs/PROTOCOL.md §6: the answer to a new connect carries the
                // account's Serial, the device's next mark (the node may be a
                // new life of the account whose Serials are lower), and what
                // changed since the mark we sent.
                self.pending(r.serial, r.bitmask.as_deref(), true);
                if let Some(serial) = r.serial.filter(|&s| s > 0) {
                    self.mark = Some(serial);
                }
            }
            Message::Status(r) => {
                if self.state == ClientState::Unacknowledged && !self.disconnecting {
                    self.state = ClientState::Connected;
                    self.deadline = Some(now.plus_millis(self.heartbeat_ms));
                }
                self.pending(r.serial, r.bitmask.as_deref(), false);
            }
            Message::Notify(n) => {
                self.stats.notifies_received += 1;
                self.pending(n.serial, n.bitmask.as_deref(), false);
            }
            Message::EndpointResponse(r) => {
                if let Some(e) = r.header.endpoint {
                    self.events.push_back(ClientEvent::Endpoint(e));
                }
            }
            Message::ResolveResponse(r) => {
                let result = match r.dns_response {
                    Some(a) => Ok(a.into_owned()),
                    None => Err(status.unwrap_or(502)),
                };
                self.events.push_back(ClientEvent::Resolved(result));
            }
            Message::ErrorInvalidSerial(e) => {
                // docs/PROTOCOL.md §6: resume above the highest Serial the node has seen.
                if let Some(highest) = e.serial {
                    self.serial = self.serial.max(highest);
                }
                if self.state == ClientState::Connecting {
                    self.push(Outgoing::Connect);
                }
            }
            Message::DisconnectResponse(_) => {
                if self.disconnecting {
                    self.abort(DisconnectReason::Requested);
                }
            }
            Message::ErrorRefused(_) => {
                let code = status.unwrap_or(0);
                let reason = DisconnectReason::Refused {
                    status: code,
                    description,
                };
                let jitter = self.jitter();
                match code {
                    404 if self.disconnecting => self.abort(DisconnectReason::Requested),
                    404 => {
                        // The node forgot us (restart, crash or expiry):
                        // connect again at once, give or take the jitter that
                        // keeps a million devices from arriving together.
                        self.state = ClientState::Disconnected;
                        self.events.push_back(ClientEvent::Disconnected(reason));
                        self.deadline = Some(now.plus_millis(jitter));
                    }
                    503 => {
                        // Shed: wait as long as the node asks (StatusExtended,
                        // ms), or a reconnect period, plus the jitter.
                        let wait = header
                            .status_extended
                            .and_then(|ms| u64::try_from(ms).ok())
                            .filter(|&ms| ms > 0)
                            .unwrap_or(self.config.reconnect_ms);
                        self.state = ClientState::Disconnected;
                        self.events.push_back(ClientEvent::Disconnected(reason));
                        self.deadline = Some(now.plus_millis(wait.saturating_add(jitter)));
                    }
                    _ => self.abort(reason),
                }
            }
            _ => self.stats.dropped += 1,
        }
    }

    /// A random delay below [`ClientConfig::reconnect_jitter_ms`].
    fn jitter(&mut self) -> u64 {
        match self.config.reconnect_jitter_ms {
            0 => 0,
            j => self.rng.next_u64() % j,
        }
    }

    /// Pending notify state from a notify, status or connect response:
    /// report it once (a Serial above the mark, or any catch-up a new
    /// connection brings), acknowledge it every time.
    fn pending(&mut self, serial: Option<i64>, bitmask: Option<&[u8]>, catch_up: bool) {
        let (Some(serial), Some(bitmask)) = (serial, bitmask) else {
            return;
        };
        if bitmask.is_empty() || bitmask.len() > MAX_BITMASK {
            return;
        }
        if catch_up || self.mark.is_none_or(|m| serial > m) {
            self.mark = Some(serial);
            let resync = bitmask.len() == MAX_BITMASK && bitmask.iter().all(|&b| b == 0xFF);
            self.events.push_back(ClientEvent::Notify {
                serial,
                bitmask: bitmask.to_vec(),
                catch_up,
                resync,
            });
        }
        self.push(Outgoing::Acknowledge(serial));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::MasterKey;

    fn credential() -> Credential {
        let mut rng = StdRng::seed_from_u64(1);
        Credential::issue(
            &MasterKey::new([7; 32]),
            "alice",
            "phone",
            UnixSeconds(2_000_000_000),
            Vec::new(),
            &mut rng,
        )
        .expect("valid credential")
    }

    /// `seal_request_with` needs a buffer of `MAX_PACKET` bytes: exactly
    /// that is enough, one byte less is refused (not sliced into).
    #[test]
    fn seal_request_needs_max_packet_bytes() {
        let cred = credential();
        let key = cred.secret.key(Direction::ClientToServer, cred.conn_id);
        let mut buf = vec![0u8; MAX_PACKET];
        let n = seal_request(
            &key,
            cred.conn_id,
            [1; 12],
            5,
            &Request::Heartbeat,
            &mut buf,
        )
        .expect("a MAX_PACKET buffer is enough");
        assert!(n > HEADER_LEN && n <= MAX_PACKET);
        for short in [0, 16, MAX_PACKET - 1] {
            let mut buf = vec![0u8; short];
            assert_eq!(
                seal_request(
                    &key,
                    cred.conn_id,
                    [1; 12],
                    5,
                    &Request::Heartbeat,
                    &mut buf
                ),
                Err(SealRequestError::Packet),
                "a buffer of {short} bytes"
            );
        }
    }

    fn client(config: ClientConfig) -> Client {
        let node: SocketAddr = "127.0.0.1:15099".parse().expect("addr");
        Client::new(&credential(), node, config, T0, [3; 32])
    }

    /// `mark` gives back the mark the application handed in (a positive one).
    #[test]
    fn mark_is_the_configured_mark() {
        let c = client(ClientConfig {
            mark: Some(42),
            ..ClientConfig::default()
        });
        assert_eq!(c.mark(), Some(42));
        assert_eq!(client(ClientConfig::default()).mark(), None);
    }

    const T0: UnixMillis = UnixMillis(1_795_262_400_000);

    /// Runs `client`'s timers until `done`, dropping every datagram it
    /// sends (a node that does not answer); returns their destinations and
    /// the time of the last timeout handled.
    fn unanswered(
        client: &mut Client,
        done: impl Fn(&Client) -> bool,
    ) -> (Vec<SocketAddr>, UnixMillis) {
        let mut buf = vec![0u8; MAX_PACKET];
        let mut sent = Vec::new();
        let mut now = T0;
        for _ in 0..100 {
            while let Some(t) = client.poll_transmit(&mut buf) {
                sent.push(t.destination);
            }
            if done(client) {
                return (sent, now);
            }
            now = client.poll_timeout().expect("a timer runs");
            client.handle_timeout(now);
        }
        panic!("not done after 100 timeouts");
    }

    /// `set_node` moves the client: `node` says so and the next connect goes there.
    #[test]
    fn set_node_sends_the_next_connect_there() {
        let mut c = client(ClientConfig::default());
        let other: SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        c.set_node(other);
        assert_eq!(c.node(), other);
        let (sent, _) = unanswered(&mut c, |c| c.stats().sent >= 2);
        assert!(sent.iter().all(|&d| d == other), "{sent:?}");
    }

    /// With `set_nodes`, a node whose connects go unanswered is left for
    /// the next one in the list.
    #[test]
    fn set_nodes_fails_over_to_the_next_node() {
        let mut c = client(ClientConfig::default());
        let first = c.node();
        let second: SocketAddr = "192.0.2.8:5000".parse().expect("addr");
        c.set_nodes(&[first, second]);
        assert_eq!(c.failovers(), 0);
        let (sent, now) = unanswered(&mut c, |c| c.failovers() == 1);
        assert_eq!(sent, vec![first; 3]);
        assert_eq!(c.node(), second);
        assert_eq!(c.state(), ClientState::Disconnected);
        // The next connect waits a random delay below reconnect_jitter_ms.
        let at = c.poll_timeout().expect("a timer runs");
        assert!(
            at >= now && at < now.plus_millis(1_000),
            "{at:?} after {now:?}"
        );
        let (sent, _) = unanswered(&mut c, |c| c.stats().sent == 4);
        assert_eq!(sent, vec![second]);
    }

    /// Once every node failed in a row the client is back at the first and
    /// waits `reconnect_ms` (not the jitter) before connecting again.
    #[test]
    fn every_node_failing_in_a_row_waits_reconnect_ms() {
        let mut c = client(ClientConfig::default());
        let first = c.node();
        let second: SocketAddr = "192.0.2.8:5000".parse().expect("addr");
        c.set_nodes(&[first, second]);
        let (sent, now) = unanswered(&mut c, |c| c.stats().sent == 6 && c.failovers() == 2);
        assert_eq!(&sent[3..], &[second; 3]);
        assert_eq!(c.node(), first);
        assert_eq!(c.state(), ClientState::Disconnected);
        assert_eq!(c.poll_timeout(), Some(now.plus_millis(60_000)));
    }

    /// A single node is never failed over from: the client waits and
    /// connects to it again.
    #[test]
    fn one_node_is_no_failover() {
        let mut c = client(ClientConfig::default());
        let (_, now) = unanswered(&mut c, |c| c.state() == ClientState::Disconnected);
        assert_eq!(c.failovers(), 0);
        assert_eq!(c.poll_timeout(), Some(now.plus_millis(60_000)));
    }

    /// `request_status` does nothing before the client is connected: no
    /// heartbeat, and the client keeps connecting.
    #[test]
    fn request_status_only_while_connected() {
        let mut c = client(ClientConfig::default());
        c.request_status(T0);
        assert_eq!(c.state(), ClientState::Connecting);
        let mut buf = vec![0u8; MAX_PACKET];
        assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
        assert!(c.poll_transmit(&mut buf).is_none(), "no heartbeat");
    }

    /// An unanswered disconnect is sent `connect_tries` times, then the
    /// client gives up waiting and ends `Aborted` (`Requested`).
    #[test]
    fn unanswered_disconnect_is_sent_three_times_then_aborts() {
        let mut c = client(ClientConfig::default());
        let mut buf = vec![0u8; MAX_PACKET];
        assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
        c.disconnect(T0);
        let (sent, _) = unanswered(&mut c, |c| c.state() == ClientState::Aborted);
        assert_eq!(sent.len(), 3, "three disconnects");
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Disconnected(DisconnectReason::Requested))
        );
    }

    /// `poll_transmit` with a buffer shorter than `MAX_PACKET` writes
    /// nothing and keeps the request for a full buffer.
    #[test]
    fn poll_transmit_needs_max_packet_bytes() {
        let mut c = client(ClientConfig::default());
        let mut short = vec![0u8; MAX_PACKET - 1];
        assert!(c.poll_transmit(&mut short).is_none());
        let mut buf = vec![0u8; MAX_PACKET];
        assert!(
            c.poll_transmit(&mut buf).is_some(),
            "the connect, still queued"
        );
        assert_eq!(c.stats().sent, 1);
    }

    /// Seals `message` as the node would for `c` (the keys its credential gives).
    fn from_node(c: &Client, message: &Message<'_>) -> Vec<u8> {
        let mut plain = vec![0u8; MAX_PLAINTEXT];
        let n = message.encode(&mut plain).expect("encodes");
        crate::packet::seal(&c.s2c, c.conn_id, [9; 12], &plain[..n]).expect("seals")
    }

    /// What `c` sent in `datagram` (opened with its own key).
    fn sent_name(c: &Client, datagram: &[u8]) -> &'static str {
        let mut packet = datagram.to_vec();
        let plain = open_in_place(&c.c2s, &mut packet).expect("opens");
        Message::decode(plain).expect("decodes").name()
    }

    /// A client whose connect the node answered at `T0`.
    fn connected(config: ClientConfig) -> Client {
        let mut c = client(config);
        let mut buf = vec![0u8; MAX_PACKET];
        let t = c.poll_transmit(&mut buf).expect("the connect");
        assert_eq!(sent_name(&c, &buf[..t.size]), "PresenceConnectRequest");
        let answer = from_node(
            &c,
            &Message::ConnectResponse(crate::codec::PresenceConnectResponse {
                connection_timeout: Some(30_000),
                header: crate::codec::ServiceHeader {
                    acknowledge: Some(c.highest_serial_sent()),
                    endpoint: Some("198.51.100.1:4000".parse().expect("addr")),
                    ..Default::default()
                },
                ..Default::default()
            }),
        );
        c.handle_datagram(T0, &answer);
        assert_eq!(c.state(), ClientState::Connected);
        assert!(matches!(
            c.poll_event(),
            Some(ClientEvent::Connected { .. })
        ));
        c
    }

    /// docs/PROTOCOL.md §6: a connected client whose node goes silent sends
    /// `heartbeat_tries` (3) heartbeats, `retry_ms` apart, then reports a
    /// `Timeout` and connects again; not a fourth heartbeat.
    #[test]
    fn silent_node_gets_three_heartbeats_then_a_connect() {
        let mut c = connected(ClientConfig::default());
        let mut buf = vec![0u8; MAX_PACKET];
        let mut now;
        let mut heartbeats = Vec::new();
        loop {
            now = c.poll_timeout().expect("a timer runs");
            c.handle_timeout(now);
            if let Some(event) = c.poll_event() {
                assert_eq!(event, ClientEvent::Disconnected(DisconnectReason::Timeout));
                break;
            }
            let t = c.poll_transmit(&mut buf).expect("a heartbeat");
            assert_eq!(sent_name(&c, &buf[..t.size]), "PresenceHeartbeat");
            heartbeats.push(now);
            assert!(heartbeats.len() <= 3, "a fourth heartbeat at {now:?}");
        }
        let first = T0.plus_millis(30_000);
        assert_eq!(
            heartbeats,
            vec![first, first.plus_millis(1_000), first.plus_millis(2_000)]
        );
        assert_eq!(now, first.plus_millis(3_000));
        assert_eq!(c.state(), ClientState::Connecting);
        let t = c.poll_transmit(&mut buf).expect("a connect");
        assert_eq!(sent_name(&c, &buf[..t.size]), "PresenceConnectRequest");
    }

    /// The node's answer to `c`'s request `ack`: an endpoint response.
    fn endpoint_answer(c: &Client, ack: i64) -> Vec<u8> {
        from_node(
            c,
            &Message::EndpointResponse(crate::codec::PresenceEndpointResponse {
                header: crate::codec::ServiceHeader {
                    acknowledge: Some(ack),
                    endpoint: Some("198.51.100.1:4000".parse().expect("addr")),
                    ..Default::default()
                },
            }),
        )
    }

    /// docs/PROTOCOL.md §7: a reply counts once, also after later
    /// requests moved the window of answered Serials on (`record_sent`
    /// keeps the bits of earlier Serials; `fresh_reply` tests the
    /// reply's own bit).
    #[test]
    fn a_reply_counts_once_after_later_requests() {
        let mut c = connected(ClientConfig::default());
        let connect = c.highest_serial_sent();
        let connect_answer = from_node(
            &c,
            &Message::ConnectResponse(crate::codec::PresenceConnectResponse {
                header: crate::codec::ServiceHeader {
                    acknowledge: Some(connect),
                    ..Default::default()
                },
                ..Default::default()
            }),
        );
        c.request_endpoint();
        c.request_endpoint();
        let mut buf = vec![0u8; MAX_PACKET];
        assert!(c.poll_transmit(&mut buf).is_some());
        assert!(c.poll_transmit(&mut buf).is_some());
        assert_eq!(c.highest_serial_sent(), connect + 2);
        let endpoint: SocketAddr = "198.51.100.1:4000".parse().expect("addr");
        c.handle_datagram(T0, &endpoint_answer(&c, connect + 1));
        assert_eq!(c.poll_event(), Some(ClientEvent::Endpoint(endpoint)));
        c.handle_datagram(T0, &endpoint_answer(&c, connect + 1));
        assert_eq!(c.poll_event(), None);
        assert_eq!(c.stats().replays_dropped, 1);
        c.handle_datagram(T0, &connect_answer);
        assert_eq!(c.stats().replays_dropped, 2, "the connect's answer again");
        c.handle_datagram(T0, &endpoint_answer(&c, connect + 2));
        assert_eq!(c.poll_event(), Some(ClientEvent::Endpoint(endpoint)));
        assert_eq!(c.stats().replays_dropped, 2);
    }

    /// Seals `plain` as the node would for `c`, under the conn id `conn_id`.
    fn sealed_for(c: &Client, conn_id: ConnId, plain: &[u8]) -> Vec<u8> {
        crate::packet::seal(&c.s2c, conn_id, [9; 12], plain).expect("seals")
    }

    /// A packet sealed with the client's key but under another conn id is
    /// dropped before it is opened (the conn id is the AAD, so it would
    /// authenticate): the conn id must be the client's own.
    #[test]
    fn a_packet_under_another_conn_id_is_dropped() {
        let mut c = connected(ClientConfig::default());
        c.request_endpoint();
        let mut buf = vec![0u8; MAX_PACKET];
        assert!(c.poll_transmit(&mut buf).is_some());
        let mut plain = vec![0u8; MAX_PLAINTEXT];
        let n = Message::EndpointResponse(crate::codec::PresenceEndpointResponse {
            header: crate::codec::ServiceHeader {
                acknowledge: Some(c.highest_serial_sent()),
                endpoint: Some("198.51.100.1:4000".parse().expect("addr")),
                ..Default::default()
            },
        })
        .encode(&mut plain)
        .expect("encodes");
        let mut other = c.conn_id();
        other.0[0] ^= 1;
        c.handle_datagram(T0, &sealed_for(&c, other, &plain[..n]));
        assert_eq!(c.poll_event(), None);
        assert_eq!((c.stats().dropped, c.stats().received), (1, 1));
        c.handle_datagram(T0, &sealed_for(&c, c.conn_id(), &plain[..n]));
        assert!(matches!(c.poll_event(), Some(ClientEvent::Endpoint(_))));
        assert_eq!((c.stats().dropped, c.stats().received), (1, 2));
    }

    /// Every datagram the client cannot use counts once in `dropped`:
    /// too long, not authentic, a bad fragment, not a message, not a
    /// message from a node.
    #[test]
    fn unusable_datagrams_count_as_dropped() {
        let mut c = connected(ClientConfig::default());
        let id = c.conn_id();
        let mut too_long = vec![0u8; MAX_PACKET + 1];
        too_long[..8].copy_from_slice(&id.0);
        let mut forged = sealed_for(&c, id, b"{}");
        let last = forged.len() - 1;
        forged[last] ^= 1;
        let mut heartbeat = vec![0u8; MAX_PLAINTEXT];
        let n = Message::Heartbeat(PresenceHeartbeat::default())
            .encode(&mut heartbeat)
            .expect("encodes");
        let datagrams = [
            too_long,
            forged,
            sealed_for(&c, id, &[FRAGMENT_MARKER, 0, 1, 0, 0]),
            sealed_for(&c, id, b"not a message"),
            sealed_for(&c, id, &heartbeat[..n]),
        ];
        for (i, d) in datagrams.iter().enumerate() {
            c.handle_datagram(T0, d);
            assert_eq!(c.stats().dropped, i as u64 + 1, "datagram {i}");
        }
        assert_eq!(c.stats().received, 1, "only the connect's answer");
        assert_eq!(c.poll_event(), None);
    }

    /// What `c` sent in `datagram`: the message's name and its `ID`.
    fn sent_id(c: &Client, datagram: &[u8]) -> (&'static str, Option<Vec<u8>>) {
        let mut packet = datagram.to_vec();
        let plain = open_in_place(&c.c2s, &mut packet).expect("opens");
        let m = Message::decode(plain).expect("decodes");
        let id = m
            .client_header()
            .and_then(|h| h.id.as_deref().map(<[u8]>::to_vec));
        (m.name(), id)
    }

    /// docs/PROTOCOL.md §7.9: a reply carrying a new challenge, with
    /// nothing else to send, is echoed at once in an acknowledgement; the
    /// same challenge again is not echoed again (it rides in the next
    /// request), and a reply without one ends the echoing.
    #[test]
    fn a_new_challenge_is_echoed_once() {
        let mut c = connected(ClientConfig::default());
        let mut buf = vec![0u8; MAX_PACKET];
        let challenge = [5u8; 8];
        let answer = |c: &mut Client, id: Option<[u8; 8]>| {
            c.request_endpoint();
            let mut buf = vec![0u8; MAX_PACKET];
            assert!(c.poll_transmit(&mut buf).is_some(), "the request");
            let mut plain = vec![0u8; MAX_PLAINTEXT];
            let n = Message::EndpointResponse(crate::codec::PresenceEndpointResponse {
                header: crate::codec::ServiceHeader {
                    acknowledge: Some(c.highest_serial_sent()),
                    endpoint: Some("198.51.100.1:4000".parse().expect("addr")),
                    id: id.as_ref().map(|i| (&i[..]).into()),
                    ..Default::default()
                },
            })
            .encode(&mut plain)
            .expect("encodes");
            let d = sealed_for(c, c.conn_id(), &plain[..n]);
            c.handle_datagram(T0, &d);
            assert!(matches!(c.poll_event(), Some(ClientEvent::Endpoint(_))));
        };
        answer(&mut c, Some(challenge));
        let t = c.poll_transmit(&mut buf).expect("the echo");
        assert_eq!(
            sent_id(&c, &buf[..t.size]),
            ("PresenceAcknowledge", Some(challenge.to_vec()))
        );
        assert!(c.poll_transmit(&mut buf).is_none());
        answer(&mut c, Some(challenge));
        assert!(c.poll_transmit(&mut buf).is_none(), "no second echo");
        c.request_endpoint();
        let t = c.poll_transmit(&mut buf).expect("a request");
        assert_eq!(
            sent_id(&c, &buf[..t.size]),
            ("PresenceEndpointRequest", Some(challenge.to_vec()))
        );
        answer(&mut c, None);
        assert!(c.poll_transmit(&mut buf).is_none());
        c.request_endpoint();
        let t = c.poll_transmit(&mut buf).expect("a request");
        assert_eq!(
            sent_id(&c, &buf[..t.size]),
            ("PresenceEndpointRequest", None)
        );
    }

    /// A node's reply header acknowledging `ack`.
    fn answering(ack: i64) -> crate::codec::ServiceHeader<'static> {
        crate::codec::ServiceHeader {
            acknowledge: Some(ack),
            endpoint: Some("198.51.100.1:4000".parse().expect("addr")),
            ..Default::default()
        }
    }

    /// Seals `m` for `c` and hands it to `c` at `now`.
    fn deliver(c: &mut Client, now: UnixMillis, m: Message<'_>) {
        let d = from_node(c, &m);
        c.handle_datagram(now, &d);
    }

    /// The answer to `c`'s last request: a `PresenceConnectResponse` with
    /// `connection_timeout` and `serial`.
    fn connect_answer(c: &mut Client, connection_timeout: Option<i64>, serial: Option<i64>) {
        let m = Message::ConnectResponse(crate::codec::PresenceConnectResponse {
            connection_timeout,
            serial,
            header: answering(c.highest_serial_sent()),
            ..Default::default()
        });
        deliver(c, T0, m);
    }

    /// When a connect was sent twice and both are answered, the second
    /// answer only carries pending state: one `Connected`, not two.
    #[test]
    fn a_retried_connect_answered_twice_connects_once() {
        let mut c = client(ClientConfig::default());
        let mut buf = vec![0u8; MAX_PACKET];
        assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
        let first = c.highest_serial_sent();
        c.handle_timeout(T0.plus_millis(1_000));
        assert!(c.poll_transmit(&mut buf).is_some(), "the connect again");
        connect_answer(&mut c, None, None);
        assert!(matches!(
            c.poll_event(),
            Some(ClientEvent::Connected { .. })
        ));
        let late = Message::ConnectResponse(crate::codec::PresenceConnectResponse {
            header: answering(first),
            ..Default::default()
        });
        deliver(&mut c, T0.plus_millis(1_100), late);
        assert_eq!(c.stats().received, 2);
        assert_eq!(c.poll_event(), None);
        assert_eq!(c.state(), ClientState::Connected);
        assert_eq!(c.poll_timeout(), Some(T0.plus_millis(60_000)));
    }

    /// A connect answered after the application asked to disconnect does
    /// not connect; the disconnect's answer then ends the client at once.
    #[test]
    fn a_connect_answered_while_disconnecting_does_not_connect() {
        let mut c = client(ClientConfig::default());
        let mut buf = vec![0u8; MAX_PACKET];
        assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
        let connect = c.highest_serial_sent();
        c.disconnect(T0);
        assert!(c.poll_transmit(&mut buf).is_some(), "the disconnect");
        let late = Message::ConnectResponse(crate::codec::PresenceConnectResponse {
            header: answering(connect),
            ..Default::default()
        });
        deliver(&mut c, T0, late);
        assert_eq!(c.state(), ClientState::Connecting);
        assert_eq!(c.poll_event(), None);
        let done = Message::DisconnectResponse(crate::codec::PresenceDisconnectResponse {
            header: answering(c.highest_serial_sent()),
        });
        deliver(&mut c, T0, done);
        assert_eq!(c.state(), ClientState::Aborted);
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Disconnected(DisconnectReason::Requested))
        );
        assert_eq!(c.poll_timeout(), None);
    }

    /// A 404 answering a disconnect (the node had already forgotten us)
    /// ends the disconnect as requested; no reconnect.
    #[test]
    fn a_404_while_disconnecting_is_the_end() {
        let mut c = connected(ClientConfig::default());
        let mut buf = vec![0u8; MAX_PACKET];
        c.disconnect(T0);
        assert!(c.poll_transmit(&mut buf).is_some(), "the disconnect");
        let refused = Message::ErrorRefused(crate::codec::PresenceErrorRefused {
            header: crate::codec::ServiceHeader {
                status: Some(404),
                ..answering(c.highest_serial_sent())
            },
        });
        deliver(&mut c, T0, refused);
        assert_eq!(c.state(), ClientState::Aborted);
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Disconnected(DisconnectReason::Requested))
        );
        assert_eq!(c.poll_timeout(), None);
    }

    /// The heartbeat period is the ConnectionTimeout the node announces,
    /// when positive; otherwise the protocol's default.
    #[test]
    fn connection_timeout_sets_the_heartbeat_period() {
        for (announced, period) in [
            (Some(12_000), 12_000),
            (Some(0), 60_000),
            (Some(-5), 60_000),
            (None, 60_000),
        ] {
            let mut c = client(ClientConfig::default());
            let mut buf = vec![0u8; MAX_PACKET];
            assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
            connect_answer(&mut c, announced, None);
            assert_eq!(c.state(), ClientState::Connected);
            assert_eq!(
                c.poll_timeout(),
                Some(T0.plus_millis(period)),
                "ConnectionTimeout {announced:?}"
            );
        }
    }

    /// docs/PROTOCOL.md §6: the Serial in a connect's answer is the
    /// device's next mark, when positive.
    #[test]
    fn a_connect_answers_serial_becomes_the_mark() {
        for (mark, serial, after) in [
            (None, Some(77), Some(77)),
            (Some(42), Some(77), Some(77)),
            (Some(42), Some(0), Some(42)),
            (Some(42), Some(-3), Some(42)),
            (None, Some(0), None),
            (Some(42), None, Some(42)),
        ] {
            let mut c = client(ClientConfig {
                mark,
                ..ClientConfig::default()
            });
            let mut buf = vec![0u8; MAX_PACKET];
            assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
            connect_answer(&mut c, None, serial);
            assert_eq!(c.state(), ClientState::Connected);
            assert_eq!(c.mark(), after, "mark {mark:?}, Serial {serial:?}");
        }
    }

    /// `notifies_received` counts every notify, repeats of a Serial too;
    /// the application hears of the Serial once.
    #[test]
    fn notifies_received_counts_repeats() {
        let mut c = connected(ClientConfig::default());
        let notify = || {
            Message::Notify(crate::codec::PresenceNotify {
                serial: Some(5),
                bitmask: Some((&[1u8][..]).into()),
                header: crate::codec::ServiceHeader::default(),
            })
        };
        deliver(&mut c, T0, notify());
        deliver(&mut c, T0, notify());
        assert_eq!(c.stats().notifies_received, 2);
        assert!(matches!(
            c.poll_event(),
            Some(ClientEvent::Notify { serial: 5, .. })
        ));
        assert_eq!(c.poll_event(), None);
    }

    /// A 503 (node full) waits the StatusExtended the node asks for, when
    /// positive, or else `reconnect_ms` (no jitter configured here).
    #[test]
    fn a_503_waits_status_extended_or_reconnect_ms() {
        for (extended, wait) in [
            (Some(5_000), 5_000),
            (Some(0), 60_000),
            (Some(-1), 60_000),
            (None, 60_000),
        ] {
            let mut c = client(ClientConfig {
                reconnect_jitter_ms: 0,
                ..ClientConfig::default()
            });
            let mut buf = vec![0u8; MAX_PACKET];
            assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
            let refused = Message::ErrorRefused(crate::codec::PresenceErrorRefused {
                header: crate::codec::ServiceHeader {
                    status: Some(503),
                    status_extended: extended,
                    ..answering(c.highest_serial_sent())
                },
            });
            deliver(&mut c, T0, refused);
            assert_eq!(c.state(), ClientState::Disconnected);
            assert!(matches!(
                c.poll_event(),
                Some(ClientEvent::Disconnected(DisconnectReason::Refused {
                    status: 503,
                    ..
                }))
            ));
            assert_eq!(
                c.poll_timeout(),
                Some(T0.plus_millis(wait)),
                "StatusExtended {extended:?}"
            );
        }
    }

    /// A 404 (the node forgot the connection) reconnects after a random
    /// delay below `reconnect_jitter_ms`: spread over the range, not one
    /// fixed value.
    #[test]
    fn a_404_reconnects_after_a_random_delay() {
        let node: SocketAddr = "127.0.0.1:15099".parse().expect("addr");
        let mut delays = Vec::new();
        for seed in 0..8u8 {
            let mut c = Client::new(&credential(), node, ClientConfig::default(), T0, [seed; 32]);
            let mut buf = vec![0u8; MAX_PACKET];
            assert!(c.poll_transmit(&mut buf).is_some(), "the connect");
            let refused = Message::ErrorRefused(crate::codec::PresenceErrorRefused {
                header: crate::codec::ServiceHeader {
                    status: Some(404),
                    ..answering(c.highest_serial_sent())
                },
            });
            deliver(&mut c, T0, refused);
            assert_eq!(c.state(), ClientState::Disconnected);
            let at = c.poll_timeout().expect("a reconnect");
            delays.push(at.millis_since(T0));
        }
        assert!(delays.iter().all(|&d| d < 1_000), "{delays:?}");
        assert!(delays.iter().any(|&d| d > 1), "{delays:?}");
        assert!(delays.windows(2).any(|w| w[0] != w[1]), "{delays:?}");
    }

    /// A notify whose bitmask is empty or longer than `MAX_BITMASK` is
    /// ignored: not reported, not acknowledged.
    #[test]
    fn a_notify_with_an_empty_or_oversize_bitmask_is_ignored() {
        let mut c = connected(ClientConfig::default());
        let mut buf = vec![0u8; MAX_PACKET];
        for (serial, len) in [(5, 0), (6, MAX_BITMASK + 1)] {
            let bitmask = vec![1u8; len];
            deliver(
                &mut c,
                T0,
                Message::Notify(crate::codec::PresenceNotify {
                    serial: Some(serial),
                    bitmask: Some((&bitmask[..]).into()),
                    header: crate::codec::ServiceHeader::default(),
                }),
            );
            assert_eq!(c.poll_event(), None, "a bitmask of {len} bytes");
            assert!(c.poll_transmit(&mut buf).is_none(), "no acknowledgement");
        }
        assert_eq!(c.stats().notifies_received, 2);
        assert_eq!(c.mark(), None);
    }

    /// `resync` is a catch-up of exactly `MAX_BITMASK` bytes of `FF`: a
    /// shorter all-ones bitmask, or a full-length one with a bit clear, is
    /// not.
    #[test]
    fn resync_is_max_bitmask_bytes_of_ff() {
        let mut c = connected(ClientConfig::default());
        let mut short_ff = vec![0xFFu8; MAX_BITMASK];
        short_ff.pop();
        let mut full_but_one = vec![0xFFu8; MAX_BITMASK];
        full_but_one[7] = 0xFE;
        let cases = [
            (short_ff, false),
            (full_but_one, false),
            (vec![0xFFu8; MAX_BITMASK], true),
        ];
        for (serial, (bitmask, resync)) in (10..).zip(cases) {
            deliver(
                &mut c,
                T0,
                Message::Notify(crate::codec::PresenceNotify {
                    serial: Some(serial),
                    bitmask: Some((&bitmask[..]).into()),
                    header: crate::codec::ServiceHeader::default(),
                }),
            );
            match c.poll_event() {
                Some(ClientEvent::Notify { resync: r, .. }) => {
                    assert_eq!(r, resync, "{} bytes", bitmask.len())
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
