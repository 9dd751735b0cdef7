//! The fanout publisher: batches of notifications over the node's HTTP API
//! (`POST /v1/notify`), paced, with each publish's time written to its
//! account's clock so the devices can time the delivery, and the store it
//! sets so that they can check the bitmasks they get
//! ([`crate::engine::content`]): the k-th publish to an account sets store
//! `(k − 1) mod (8 × --bitmask-bytes)`.
//!
//! The batches go out pipelined on one keep-alive HTTP/1.1 connection: up to
//! `--pipeline` requests are written before the oldest answer is read, and
//! answers are read in the order the requests went out (the node's
//! axum/hyper server answers a connection's requests in order). With one
//! request in flight the publisher would wait a round trip per batch and,
//! at `--rate 0`, measure its own HTTP round trips instead of the node;
//! `--pipeline 1` is that one-at-a-time publisher.
//!
//! When the connection breaks, a request that was alone in flight is sent
//! once more on a new connection (as [`Http::post`] does); with others in
//! flight the run fails, as whether the node took their publishes is
//! unknown. When `stop` is set, the answers still due are read first, so
//! every publish the node took counts in the expected deliveries.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;

use crate::engine::content::{publish_mask, record};
use crate::engine::{Shared, RING};
use crate::ident::{account_name, Space};

/// A keep-alive HTTP/1.1 connection to the control API.
pub(crate) struct Http {
    addr: SocketAddr,
    host: String,
    token: String,
    conn: Option<BufReader<TcpStream>>,
}

/// An HTTP answer.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
}

impl Http {
    /// A client for `url` (`http://host:port`), authorized with `token`.
    pub(crate) fn new(url: &str, token: String) -> Result<Http> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--control {url:?}: expected http://HOST:PORT"))?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            bail!("--control {url:?}: expected http://HOST:PORT with no path");
        }
        let addr = host
            .to_socket_addrs()
            .with_context(|| format!("--control {url:?}"))?
            .next()
            .ok_or_else(|| anyhow!("--control {url:?}: no address"))?;
        Ok(Http {
            addr,
            host: host.to_owned(),
            token,
            conn: None,
        })
    }

    fn connect(&mut self) -> Result<&mut BufReader<TcpStream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to the control API at {}", self.addr))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::new(s));
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// `POST path` with a JSON body; reconnects once if the kept-alive
    /// connection was closed.
    pub(crate) fn post(&mut self, path: &str, body: &str) -> Result<Answer> {
        match self.post_once(path, body) {
            Ok(a) => Ok(a),
            Err(_) => {
                self.conn = None;
                self.post_once(path, body)
            }
        }
    }

    fn post_once(&mut self, path: &str, body: &str) -> Result<Answer> {
        self.send(path, body)?;
        self.receive()
    }

    /// Writes `POST path` with a JSON body without reading its answer
    /// (connecting first if there is no connection); [`Http::receive`]
    /// reads the answers in the order the requests were written.
    pub(crate) fn send(&mut self, path: &str, body: &str) -> Result<()> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            self.token,
            body.len()
        );
        let stream = self.connect()?.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        Ok(())
    }

    /// Reads the answer to the oldest request written and not yet answered.
    /// Drops the connection if the answer says `Connection: close`.
    pub(crate) fn receive(&mut self) -> Result<Answer> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| anyhow!("control API closed the connection"))?;
        let (answer, close) = read_answer(conn)?;
        if close {
            self.conn = None;
        }
        Ok(answer)
    }

    /// Drops the connection; the next [`Http::send`] opens a new one.
    pub(crate) fn disconnect(&mut self) {
        self.conn = None;
    }
}

/// Reads one HTTP/1.1 answer (status line, headers, `Content-Length` body)
/// from `r`, leaving whatever follows it (the next pipelined answer) unread.
/// Returns the answer and whether it said `Connection: close`.
fn read_answer(r: &mut impl BufRead) -> Result<(Answer, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("control API closed the connection");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {line:?}"))?;
    let mut length = 0usize;
    let mut close = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("control API closed the connection in the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                length = v.trim().parse().context("bad Content-Length")?;
            } else if k == "connection" && v.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    if length > 1 << 20 {
        bail!("control API answer of {length} bytes is too large");
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body)?;
    Ok((
        Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        close,
    ))
}

/// Publisher settings.
pub(crate) struct PublishConfig {
    /// Publishes per second; 0 = as fast as the node and the devices keep up.
    pub(crate) rate: f64,
    pub(crate) batch: usize,
    /// Bytes of each published mask (`--bitmask-bytes`, 1 to 32): each
    /// sets one store of `8 × bitmask_bytes`.
    pub(crate) bitmask_bytes: usize,
    /// The run's devices, accounts and nodes: account `a`'s publishes go
    /// to the control API of its entry node ([`Space::entry_node`]), and
    /// its name is the space's ([`Space::first_account`]).
    pub(crate) space: Space,
    /// Devices per account (the deliveries each publish owes).
    pub(crate) devices_per_account: Vec<u64>,
    /// Devices of each publish clock (account `a` on node `j` at `a·k + j`,
    /// [`Space::devices_per_clock`]): each node counts its own Serials of
    /// the account, so a publish is recorded once per node that holds
    /// devices of the account, and the in-flight guard is per node.
    pub(crate) devices_per_clock: Vec<u64>,
    /// `POST /v1/notify` requests kept in flight on each control
    /// connection (`--pipeline`; 1 = each answer read before the next
    /// request).
    pub(crate) pipeline: usize,
    /// Publishes of one account allowed in flight beyond the first
    /// (`--ahead`, at most [`MAX_AHEAD`]).
    pub(crate) ahead: u64,
}

/// Most `--ahead`: an account's clock keeps [`RING`] publish times, and
/// the publishes in flight must stay well inside it.
pub(crate) const MAX_AHEAD: u64 = (RING / 2) as u64;

/// What the publisher did.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct PublishStats {
    /// Publishes the node accepted.
    pub(crate) published: u64,
    /// Publishes accepted while measuring.
    pub(crate) published_measured: u64,
    /// Expected deliveries of all accepted publishes (publishes × devices).
    pub(crate) expected: u64,
    /// HTTP requests answered.
    pub(crate) requests: u64,
    /// 503 answers (node inboxes full).
    pub(crate) overloaded: u64,
    /// Waits because every account had too many publishes undelivered
    /// (a sleep, or with requests in flight, reading the oldest answer).
    pub(crate) throttled: u64,
    /// Round trip of one `POST /v1/notify` (request written to answer
    /// read; pipelined, that includes waiting behind the requests written
    /// before it), µs: median, 99th percentile and maximum over the run.
    /// The publish → device latency includes this leg.
    pub(crate) http_rtt_p50_us: u64,
    pub(crate) http_rtt_p99_us: u64,
    pub(crate) http_rtt_max_us: u64,
}

/// Sends one priming publish to each of `accounts` (bitmask `01`), each
/// through its entry node's control API (`https`, one per node), so each
/// device learns its account's Serial before the measured publishes (a
/// node with catch-up tells it at connect, and then no account needs one).
pub(crate) fn prime(https: &mut [Http], space: &Space, accounts: &[u64]) -> Result<()> {
    for (node, http) in https.iter_mut().enumerate() {
        let mine: Vec<u64> = accounts
            .iter()
            .copied()
            .filter(|&a| space.entry_node(a) == node)
            .collect();
        for chunk in mine.chunks(1000) {
            let names = chunk
                .iter()
                .map(|&a| (account_name(space.first_account() + a), "01"));
            let ans = http.post(NOTIFY, &batch_body(names))?;
            if ans.status != 202 {
                bail!(
                    "priming publish refused: HTTP {} {}",
                    ans.status,
                    ans.body.trim()
                );
            }
        }
    }
    Ok(())
}

/// The JSON of a batch publish: each entry's account and hex bitmask.
fn batch_body<'m>(entries: impl Iterator<Item = (String, &'m str)>) -> String {
    let mut body = String::from("{\"notifications\":[");
    for (i, (a, bitmask)) in entries.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{\"account\":\"");
        body.push_str(&a);
        body.push_str("\",\"bitmask\":\"");
        body.push_str(bitmask);
        body.push_str("\"}");
    }
    body.push_str("]}");
    body
}

/// The publish endpoint.
const NOTIFY: &str = "/v1/notify";

/// One publish of a batch: its account, the Serial the loadgen gave it
/// (on the first node holding devices of the account), and the store its
/// mask sets.
type Entry = (u64, u32, u8);

/// A `POST /v1/notify` written and not answered yet.
struct InFlight {
    /// Its publishes.
    entries: Vec<Entry>,
    /// The request body, kept to send once more on a new connection.
    body: String,
    /// When it was written (µs, [`Shared::now_us`]).
    sent_at: u64,
    /// Whether it was already sent again on a new connection.
    retried: bool,
}

/// The publisher's state between requests.
struct Publisher<'a> {
    cfg: &'a PublishConfig,
    shared: &'a Shared,
    stats: PublishStats,
    /// Publishes of each account written (accepted, or in flight).
    published: Vec<u64>,
    /// The hex mask of each store (`8 × --bitmask-bytes` of them).
    masks: Vec<String>,
    /// For each node, the next of its accounts to consider (the accounts
    /// whose publishes enter it: every k-th from its first).
    cursors: Vec<u64>,
    /// For each node's connection, the requests written and not answered,
    /// oldest first: the node answers a connection's requests in order.
    in_flight: Vec<VecDeque<InFlight>>,
    /// Publishes in `in_flight` (they count against the --rate budget).
    unanswered: u64,
    /// The node whose connection is offered the next batch.
    turn: usize,
    rtt: Histogram<u64>,
}

impl<'a> Publisher<'a> {
    fn new(cfg: &'a PublishConfig, shared: &'a Shared) -> Publisher<'a> {
        let bytes = cfg.bitmask_bytes.clamp(1, 32);
        let nodes = cfg.space.nodes.max(1) as usize;
        Publisher {
            cfg,
            shared,
            stats: PublishStats::default(),
            published: vec![0; cfg.devices_per_account.len()],
            masks: (0..bytes * 8)
                .map(|bit| hex::encode(publish_mask(bytes, bit)))
                .collect(),
            cursors: (0..nodes).map(|j| Self::first_of(cfg, j)).collect(),
            in_flight: (0..nodes)
                .map(|_| VecDeque::with_capacity(cfg.pipeline.max(1)))
                .collect(),
            unanswered: 0,
            turn: 0,
            rtt: crate::engine::histogram(),
        }
    }

    /// Node `node`'s first account (the others follow every k-th).
    fn first_of(cfg: &PublishConfig, node: usize) -> u64 {
        let k = cfg.space.nodes.max(1);
        (node as u64 + k - cfg.space.first_account() % k) % k
    }

    /// Publishes the next batch may carry: what `--rate` allows by now
    /// (minus those published or in flight), at most `--publish-batch`.
    fn budget(&self, start: u64) -> usize {
        let cfg = self.cfg;
        if cfg.rate > 0.0 {
            let now = self.shared.now_us();
            let allowed = ((now - start) as f64 * cfg.rate / 1e6) as u64;
            let sent = self.stats.published + self.unanswered;
            (allowed.saturating_sub(sent) as usize).min(cfg.batch)
        } else {
            cfg.batch
        }
    }

    /// The clocks of account `a` that have devices: (clock, devices).
    fn clocks(&self, a: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
        (0..self.cfg.space.nodes.max(1) as usize).filter_map(move |j| {
            let c = self.cfg.space.clock(a, j);
            let d = self.cfg.devices_per_clock.get(c).copied().unwrap_or(0);
            (d > 0).then_some((c, d))
        })
    }

    /// Up to `budget` publishes to accounts entering `node`, one per
    /// account, round-robin from the node's cursor over the primed
    /// accounts whose devices are not too far behind on any node; each
    /// counted as published, and its time and store written to each of
    /// its clocks under that node's Serial for it (before the request
    /// leaves, so before any device can get it).
    fn next_batch(&mut self, node: usize, budget: usize) -> Vec<Entry> {
        let shared = self.shared;
        let accounts = self.published.len() as u64;
        let k = self.cfg.space.nodes.max(1);
        let first = Self::first_of(self.cfg, node);
        let mine = if first < accounts {
            (accounts - first).div_ceil(k)
        } else {
            0
        };
        let max_ahead = self.cfg.ahead;
        let mut entries = Vec::with_capacity(budget);
        let mut scanned = 0;
        while entries.len() < budget && scanned < mine {
            let a = self.cursors[node];
            self.cursors[node] = if a + k < accounts { a + k } else { first };
            scanned += 1;
            let published = self.published[a as usize];
            // Ready when primed and its devices have all but `--ahead` of
            // the publishes so far; if not, the delivery that makes it so
            // wakes this thread (see `run`).
            let ready = self.clocks(a).all(|(c, d)| {
                let clock = &shared.accounts[c];
                clock.base.load(Relaxed) != 0
                    && clock.delivered_or_wake_at(published.saturating_sub(max_ahead) * d)
            });
            if !ready {
                continue; // not primed yet, or too far ahead
            }
            let published = published + 1;
            self.published[a as usize] = published;
            let bit = ((published - 1) % self.masks.len() as u64) as u8;
            let now = shared.now_us();
            let mut first_serial = None;
            for (c, _) in self.clocks(a) {
                let clock = &shared.accounts[c];
                let serial = clock.base.load(Relaxed).wrapping_add(published as u32);
                first_serial.get_or_insert(serial);
                clock.ring[serial as usize % RING].store(now, Relaxed);
                clock.sent[serial as usize % RING].store(record(serial, bit), Release);
            }
            entries.push((a, first_serial.unwrap_or(0), bit));
        }
        entries
    }

    /// Marks the accounts of `entries` unverifiable: the Serials the
    /// loadgen gave their publishes may not be the node's, so a mismatch
    /// on them may be the loadgen's (engine/content.rs).
    fn unverifiable(&self, entries: &[Entry]) {
        for &(a, _, _) in entries {
            for (c, _) in self.clocks(a) {
                self.shared.accounts[c].unverifiable.store(true, Relaxed);
            }
        }
    }

    /// The context of a control connection error, `n` requests in flight
    /// (counting the one that failed). With others in flight the run ends:
    /// whether the node took their publishes is unknown, so its expected
    /// deliveries would be a guess.
    fn broken(&self, http: &Http, n: usize) -> String {
        if n <= 1 {
            return format!("publishing to the control API at {}", http.addr);
        }
        format!(
            "the control API connection to {} broke with {n} publish requests in flight \
             (--pipeline {}): whether the node took them is unknown, so the run's counts \
             would be wrong",
            http.addr, self.cfg.pipeline
        )
    }

    /// Writes a request for `entries` on `node`'s connection `http`. If
    /// nothing else is in flight there, a failed write is tried once more
    /// on a new connection, as [`Http::post`] does; otherwise it ends the
    /// run.
    fn send(&mut self, http: &mut Http, node: usize, entries: Vec<Entry>) -> Result<()> {
        let first = self.cfg.space.first_account();
        let body = batch_body(
            entries
                .iter()
                .map(|&(a, _, bit)| (account_name(first + a), self.masks[bit as usize].as_str())),
        );
        let sent_at = self.shared.now_us();
        let mut retried = false;
        if let Err(e) = http.send(NOTIFY, &body) {
            let queued = self.in_flight[node].len();
            if queued > 0 {
                return Err(e.context(self.broken(http, queued + 1)));
            }
            http.disconnect();
            http.send(NOTIFY, &body)
                .with_context(|| self.broken(http, 1))?;
            retried = true;
            // The first write may have reached the node.
            self.unverifiable(&entries);
        }
        self.unanswered += entries.len() as u64;
        self.in_flight[node].push_back(InFlight {
            entries,
            body,
            sent_at,
            retried,
        });
        Ok(())
    }

    /// Reads the answer to the oldest request in flight on `node`'s
    /// connection `http` and counts it. Returns whether the node refused
    /// some of its publishes (inboxes full). If the answer cannot be read
    /// and no other request is in flight there, the request is sent once
    /// more on a new connection, as [`Http::post`] does; with others in
    /// flight it ends the run.
    fn receive(&mut self, http: &mut Http, node: usize) -> Result<bool> {
        let Some(f) = self.in_flight[node].pop_front() else {
            return Ok(false);
        };
        self.unanswered -= f.entries.len() as u64;
        let queued = self.in_flight[node].len();
        let ans = match http.receive() {
            Ok(ans) => ans,
            Err(_) if queued == 0 && !f.retried => {
                // The node may have taken the first one: its publishes
                // may now have two Serials each.
                self.unverifiable(&f.entries);
                http.disconnect();
                http.send(NOTIFY, &f.body)
                    .and_then(|()| http.receive())
                    .with_context(|| self.broken(http, 1))?
            }
            Err(e) => return Err(e.context(self.broken(http, queued + 1))),
        };
        let _ = self
            .rtt
            .record(self.shared.now_us().saturating_sub(f.sent_at));
        self.stats.requests += 1;
        let entries = &f.entries;
        let accepted = match ans.status {
            202 => entries.len(),
            503 => {
                self.stats.overloaded += 1;
                serde_json::from_str::<serde_json::Value>(&ans.body)
                    .ok()
                    .and_then(|v| v.get("accepted")?.as_u64())
                    .unwrap_or(0)
                    .min(entries.len() as u64) as usize
            }
            s => bail!("publish refused: HTTP {s} {}", ans.body.trim()),
        };
        // Entries the node did not take were not published: undo them.
        // Publishes of the same accounts in requests already in flight
        // behind this one were given Serials that count the undone ones, so
        // each is ahead of the Serial the node gives it by the publishes
        // undone before it: its devices' latency is timed from an earlier
        // publish's time (at most --pipeline - 1 requests earlier). That
        // lasts until those requests are answered (`published` is then what
        // the node took) and shifts only latency attribution, by at most the
        // in-flight depth; the counts stay right, as `expected` counts only
        // accepted publishes and `delivered` follows the node's Serials.
        // The same shift makes the content check's records of those
        // accounts unsure (engine/content.rs). (An account's publishes all
        // enter one node, on one connection, so this holds per account.)
        for &(a, _, _) in entries[accepted..].iter().rev() {
            self.published[a as usize] -= 1;
        }
        self.unverifiable(&entries[accepted..]);
        let measuring = self.shared.measuring.load(Relaxed);
        for &(a, _, _) in &entries[..accepted] {
            self.stats.published += 1;
            self.stats.expected += self.cfg.devices_per_account[a as usize];
            if measuring {
                self.stats.published_measured += 1;
            }
        }
        Ok(accepted < entries.len())
    }

    /// The node whose oldest request in flight was written first (its
    /// answer is due soonest), if any is in flight.
    fn oldest(&self) -> Option<usize> {
        (0..self.in_flight.len())
            .filter_map(|j| Some((self.in_flight[j].front()?.sent_at, j)))
            .min()
            .map(|(_, j)| j)
    }
}

/// Publishes until `stop` is set, through `https` (one control connection
/// per node, in `--node` order), with up to `cfg.pipeline` requests in
/// flight on each; the nodes are offered batches in turn, each with the
/// accounts that enter it. Then reads the answers still due, so every
/// publish the nodes took is counted.
pub(crate) fn run(
    https: &mut [Http],
    cfg: &PublishConfig,
    shared: &Arc<Shared>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<PublishStats> {
    let depth = cfg.pipeline.max(1);
    let nodes = https.len();
    if nodes == 0 || nodes as u64 != cfg.space.nodes {
        bail!("{nodes} control connections for {} nodes", cfg.space.nodes);
    }
    let mut p = Publisher::new(cfg, shared);
    let _ = shared.publisher.set(std::thread::current());
    let mut start = shared.now_us();
    let mut paused_at = None;
    while !stop.load(Relaxed) {
        if !shared.active.load(Relaxed) {
            // Another side's slice (--interleave): answers still due are
            // read, nothing new is published, and the --rate budget does
            // not bank the pause.
            if let Some(j) = p.oldest() {
                p.receive(&mut https[j], j)?;
                continue;
            }
            paused_at.get_or_insert(shared.now_us());
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        if let Some(t) = paused_at.take() {
            start += shared.now_us().saturating_sub(t);
        }
        // Each node with room in its pipeline is offered a batch, in turn.
        let mut sent = false;
        let mut throttled = false;
        for _ in 0..nodes {
            let j = p.turn;
            p.turn = (j + 1) % nodes;
            if p.in_flight[j].len() >= depth {
                continue;
            }
            let budget = p.budget(start);
            if budget == 0 {
                break;
            }
            let entries = p.next_batch(j, budget);
            if !entries.is_empty() {
                p.send(&mut https[j], j, entries)?;
                sent = true;
                break;
            }
            throttled = true;
        }
        if sent {
            continue;
        }
        if throttled {
            p.stats.throttled += 1;
        }
        // Every pipeline is full, or nothing can be sent before an answer.
        let Some(j) = p.oldest() else {
            // Nothing to send yet and no answer to wait for: wait for the
            // delivery that lets an account have its next publish (it
            // unparks this thread), or 200 µs (--rate's next publish, an
            // account being primed). A sleep alone held each round of a
            // one-account `--ahead 0` fan-out for up to 250 µs.
            std::thread::park_timeout(Duration::from_micros(200));
            continue;
        };
        if p.receive(&mut https[j], j)? {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    while let Some(j) = p.oldest() {
        p.receive(&mut https[j], j)?;
    }
    let mut stats = p.stats;
    if !p.rtt.is_empty() {
        stats.http_rtt_p50_us = p.rtt.value_at_quantile(0.5);
        stats.http_rtt_p99_us = p.rtt.value_at_quantile(0.99);
        stats.http_rtt_max_us = p.rtt.max();
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls() {
        assert!(Http::new("http://127.0.0.1:15099", "t".into()).is_ok());
        assert!(Http::new("http://127.0.0.1:15099/", "t".into()).is_ok());
        assert!(Http::new("https://127.0.0.1:1", "t".into()).is_err());
        assert!(Http::new("http://127.0.0.1:1/v1", "t".into()).is_err());
        assert!(Http::new("http://", "t".into()).is_err());
    }

    #[test]
    fn pipelined_answers_are_read_in_order() {
        let refused = r#"{"accepted":3,"error":"inbox full"}"#;
        let bytes = format!(
            "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n\
             {{\"accepted\":100}}\
             HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: {}\r\n\r\n{refused}\
             HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
            refused.len()
        );
        let mut r = bytes.as_bytes();
        let (a, close) = read_answer(&mut r).unwrap();
        assert_eq!(
            (a.status, a.body.as_str(), close),
            (202, r#"{"accepted":100}"#, false)
        );
        let (a, close) = read_answer(&mut r).unwrap();
        assert_eq!((a.status, a.body.as_str(), close), (503, refused, false));
        let (a, close) = read_answer(&mut r).unwrap();
        assert_eq!((a.status, a.body.as_str(), close), (204, "", true));
        // Nothing more: the connection is closed, not a blank answer.
        assert!(read_answer(&mut r).is_err());
    }

    #[test]
    fn bad_answers_are_errors() {
        for bytes in [
            "",
            "garbage\r\n\r\n",
            "HTTP/1.1 202 Accepted\r\ncontent-length: 10\r\n",
            "HTTP/1.1 202 Accepted\r\ncontent-length: x\r\n\r\n",
            "HTTP/1.1 202 Accepted\r\ncontent-length: 10\r\n\r\nshort",
            "HTTP/1.1 202 Accepted\r\ncontent-length: 99999999\r\n\r\n",
        ] {
            assert!(read_answer(&mut bytes.as_bytes()).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn requests_written_ahead_are_answered_in_order() {
        // A server that answers each request with its body, after all three
        // arrived: the client must have written them without waiting.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let bodies: Vec<Vec<u8>> = (0..3).map(|_| read_request(&mut r)).collect();
            let mut w = s;
            for body in bodies {
                write!(
                    w,
                    "HTTP/1.1 202 Accepted\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .unwrap();
                w.write_all(&body).unwrap();
            }
        });
        let mut http = Http::new(&url, "t".into()).unwrap();
        for i in 0..3 {
            http.send(NOTIFY, &format!("{{\"n\":{i}}}")).unwrap();
        }
        for i in 0..3 {
            let a = http.receive().unwrap();
            assert_eq!((a.status, a.body), (202, format!("{{\"n\":{i}}}")));
        }
        server.join().unwrap();
    }

    /// Reads one request from `r` and returns its body.
    fn read_request(r: &mut impl BufRead) -> Vec<u8> {
        let mut length = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.strip_prefix("Content-Length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0u8; length];
        std::io::Read::read_exact(r, &mut body).unwrap();
        body
    }

    #[test]
    fn each_publish_sets_its_store_and_a_partial_503_makes_the_rest_unverifiable() {
        use crate::engine::content::record;
        const BASE: u32 = 1 << 20;
        // A node that takes the first entry of the first request (503:
        // inbox full) and all of the second, and hands back the bodies.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut bodies = Vec::new();
            for (status, answer) in [
                (
                    "503 Service Unavailable",
                    r#"{"accepted":1,"error":"inbox full"}"#,
                ),
                ("202 Accepted", r#"{"accepted":3}"#),
            ] {
                let body = read_request(&mut r);
                bodies.push(serde_json::from_slice::<serde_json::Value>(&body).unwrap());
                let len = answer.len();
                write!(
                    w,
                    "HTTP/1.1 {status}\r\nContent-Length: {len}\r\n\r\n{answer}"
                )
                .unwrap();
            }
            bodies
        });
        let shared = Shared::new(3);
        for a in &shared.accounts {
            a.base.store(BASE, Relaxed);
        }
        let cfg = PublishConfig {
            rate: 0.0,
            batch: 3,
            bitmask_bytes: 2,
            space: Space::new(3, 3),
            devices_per_account: vec![1; 3],
            devices_per_clock: vec![1; 3],
            pipeline: 2,
            ahead: 32,
        };
        let mut p = Publisher::new(&cfg, &shared);
        let mut http = Http::new(&url, "t".into()).unwrap();
        // Two batches in flight: every account's first publish sets store
        // 0, its second store 1, each recorded under its Serial.
        for k in 0..2u32 {
            let entries = p.next_batch(0, 3);
            assert_eq!(
                entries,
                vec![
                    (0, BASE + 1 + k, k as u8),
                    (1, BASE + 1 + k, k as u8),
                    (2, BASE + 1 + k, k as u8)
                ]
            );
            for a in &shared.accounts {
                let s = BASE + 1 + k;
                assert_eq!(a.sent[s as usize % RING].load(Relaxed), record(s, k as u8));
            }
            p.send(&mut http, 0, entries).unwrap();
        }
        assert!(p.receive(&mut http, 0).unwrap(), "some refused");
        assert!(!p.receive(&mut http, 0).unwrap());
        let bodies = server.join().unwrap();
        for (k, mask) in [(0, "0100"), (1, "0200")] {
            for e in bodies[k]["notifications"].as_array().unwrap() {
                assert_eq!(e["bitmask"], mask, "{}", bodies[k]);
            }
        }
        // Account 0's publishes were all taken: its Serials are the node's.
        // Accounts 1 and 2 lost their first: the node gave their second
        // Serial BASE + 1, not BASE + 2 (records off).
        let unsure: Vec<bool> = shared
            .accounts
            .iter()
            .map(|a| a.unverifiable.load(Relaxed))
            .collect();
        assert_eq!(unsure, [false, true, true]);
        assert_eq!(p.published, [2, 1, 1]);
        assert_eq!(
            (p.stats.published, p.stats.expected, p.stats.overloaded),
            (4, 4, 1)
        );
    }

    /// Two nodes, two accounts of two devices each (one on each node):
    /// account 0's publishes enter node 0 and account 1's node 1, and each
    /// publish is recorded on both of its account's clocks, under each
    /// node's own Serial for it.
    #[test]
    fn on_two_nodes_each_account_enters_one_and_is_recorded_on_both() {
        use crate::engine::content::record;
        let space = Space {
            first: 0,
            devices: 4,
            accounts: 2,
            nodes: 2,
            shared: false,
        };
        let shared = Shared::new(space.clocks());
        // Each node has its own Serials for each account.
        let bases = [100u32, 5000, 700, 90_000];
        for (c, &b) in bases.iter().enumerate() {
            shared.accounts[c].base.store(b, Relaxed);
        }
        let cfg = PublishConfig {
            rate: 0.0,
            batch: 10,
            bitmask_bytes: 1,
            space,
            devices_per_account: space.devices_per_account(),
            devices_per_clock: space.devices_per_clock(),
            pipeline: 1,
            ahead: 32,
        };
        assert_eq!(cfg.devices_per_clock, [1, 1, 1, 1]);
        let mut p = Publisher::new(&cfg, &shared);
        assert_eq!(p.next_batch(0, 10), [(0, 101, 0)]);
        assert_eq!(p.next_batch(1, 10), [(1, 701, 0)]);
        assert_eq!(p.next_batch(0, 10), [(0, 102, 1)]);
        for (c, serials) in [(0, [101, 102]), (1, [5001, 5002])] {
            for (k, s) in serials.into_iter().enumerate() {
                let clock = &shared.accounts[c];
                assert_eq!(
                    clock.sent[s as usize % RING].load(Relaxed),
                    record(s, k as u8)
                );
                assert_ne!(clock.ring[s as usize % RING].load(Relaxed), 0);
            }
        }
        assert_eq!(
            shared.accounts[3].sent[90_001 % RING].load(Relaxed),
            record(90_001, 0)
        );
    }

    #[test]
    fn batch_bodies_are_json() {
        let masks = ["0102", "0001", "8000"];
        let body = batch_body((0..3).map(|a| (account_name(a), masks[a as usize])));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["notifications"].as_array().unwrap().len(), 3);
        assert_eq!(v["notifications"][2]["account"], "load-2@loadgen.example");
        assert_eq!(v["notifications"][0]["bitmask"], "0102");
        assert_eq!(v["notifications"][2]["bitmask"], "8000");
    }
}
