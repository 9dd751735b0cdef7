//! The MQTT workers: each owns a share of the `--devices` subscriber
//! connections on one epoll instance (worker 0 also drives the publisher),
//! opens them within the handshake and rate limits, walks each through
//! CONNECT → CONNACK → SUBSCRIBE → SUBACK, and counts every PUBLISH it
//! receives (latency, and settling the publisher's window); at QoS 1 it
//! PUBACKs each one.
//!
//! It must not publish (that is [`super::publisher`]) nor decide phases
//! (the controller in [`super::run`] does).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;

use super::epoll::{connection_events, epoll_ctl, epoll_new, TOKEN_PUBLISHER, TOKEN_WAKE};
use super::publisher::Publisher;
use super::wire::{
    check_connack, check_suback, connect_frame, kind_name, publish_packet_id, publish_payload,
    put_puback, subscribe_frame, FrameStream, CONNACK, DISCONNECT, KEEPALIVE_S, PINGREQ, PINGRESP,
    PUBLISH, SUBACK, SUBSCRIBE_ID,
};
use super::{new_histogram, write_available, Config, Shared, MEASURED, STOP};

/// A subscriber's handshake must be done within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Non-blocking connect under way.
    Connecting,
    AwaitConnack,
    AwaitSuback,
    Ready,
    Closed,
}

impl State {
    fn waiting_for(self) -> &'static str {
        match self {
            State::Connecting => "TCP connection",
            State::AwaitConnack => "CONNACK",
            State::AwaitSuback => "SUBACK",
            State::Ready | State::Closed => "nothing",
        }
    }
}

/// One subscriber connection.
struct Sub {
    /// Subscriber number over all workers.
    id: u64,
    sock: Option<TcpStream>,
    state: State,
    stream: FrameStream,
    /// Highest sequence number received.
    last_seq: u64,
    since: Instant,
    /// PUBACKs not yet written (QoS 1).
    acks: Vec<u8>,
    /// EPOLLOUT is registered: `acks` waits for room in the socket.
    want_out: bool,
}

/// What a worker hands back.
pub(super) struct WorkerOut {
    pub(super) hist: Histogram<u64>,
}

/// Delivery bookkeeping of one worker (kept apart from its sockets).
struct Sink {
    shared: Arc<Shared>,
    hist: Histogram<u64>,
    delivered: u64,
    delivered_measured: u64,
    malformed: u64,
    /// Payloads that differ from what was published.
    wrong: u64,
    /// Bytes of every published payload.
    payload_bytes: usize,
    now_ns: u64,
    /// Signal worker 0 when a publish settles (other workers only).
    signal: bool,
    subscribers: u32,
}

impl Sink {
    fn deliver(&mut self, last_seq: &mut u64, payload: &[u8]) {
        let (Some(ts), Some(raw)) = (read_u64(payload, 0), read_u64(payload, 8)) else {
            self.malformed += 1;
            return;
        };
        let seq = raw & !MEASURED;
        self.delivered += 1;
        let published = self.shared.published.load(Ordering::Acquire);
        if payload.len() != self.payload_bytes
            || seq == 0
            || seq > published
            || payload
                .iter()
                .enumerate()
                .skip(16)
                .any(|(i, &b)| b != super::filler(i))
        {
            self.wrong += 1;
        }
        if raw & MEASURED != 0 {
            self.delivered_measured += 1;
            self.hist
                .saturating_record(self.now_ns.saturating_sub(ts) / 1000);
        }
        if seq > *last_seq {
            let s = &*self.shared;
            let from = (*last_seq + 1).max(seq.saturating_sub(s.ring_mask));
            for q in from..=seq {
                let n = s.ring[(q & s.ring_mask) as usize].fetch_add(1, Ordering::AcqRel) + 1;
                if self.signal
                    && n >= self.subscribers
                    && s.publisher_waiting.swap(false, Ordering::AcqRel)
                {
                    s.wake();
                }
            }
            *last_seq = seq;
        }
    }

    fn flush(&mut self) {
        let s = &self.shared;
        if self.delivered > 0 {
            s.delivered.fetch_add(self.delivered, Ordering::AcqRel);
            self.delivered = 0;
        }
        if self.delivered_measured > 0 {
            s.delivered_measured
                .fetch_add(self.delivered_measured, Ordering::AcqRel);
            self.delivered_measured = 0;
        }
        if self.malformed > 0 {
            s.malformed.fetch_add(self.malformed, Ordering::AcqRel);
            self.malformed = 0;
        }
        if self.wrong > 0 {
            s.wrong.fetch_add(self.wrong, Ordering::AcqRel);
            self.wrong = 0;
        }
    }
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One worker thread: its share of the subscribers (and, for worker 0,
/// the publisher) on one epoll instance.
pub(super) struct Worker {
    id: usize,
    shared: Arc<Shared>,
    cfg: Arc<Config>,
    ep: OwnedFd,
    subs: Vec<Sub>,
    /// Subscribers not yet started (index into `subs`).
    next_start: usize,
    in_progress: usize,
    connect_tokens: f64,
    last_refill: Instant,
    last_deadline_check: Instant,
    publisher: Option<Publisher>,
    sink: Sink,
    scratch: Vec<u8>,
    next_ping: Instant,
}

impl Worker {
    pub(super) fn new(
        id: usize,
        shared: Arc<Shared>,
        cfg: Arc<Config>,
        ids: Vec<u64>,
        publisher: Option<Publisher>,
    ) -> Result<Worker> {
        let ep = epoll_new()?;
        if let Some(p) = &publisher {
            epoll_ctl(
                &ep,
                libc::EPOLL_CTL_ADD,
                p.sock.as_raw_fd(),
                connection_events(false),
                TOKEN_PUBLISHER,
            )?;
            epoll_ctl(
                &ep,
                libc::EPOLL_CTL_ADD,
                shared.wake.as_raw_fd(),
                libc::EPOLLIN as u32,
                TOKEN_WAKE,
            )?;
        }
        let now = Instant::now();
        let subs = ids
            .into_iter()
            .map(|id| Sub {
                id,
                sock: None,
                state: State::Connecting,
                stream: FrameStream::default(),
                last_seq: 0,
                since: now,
                acks: Vec::new(),
                want_out: false,
            })
            .collect();
        let sink = Sink {
            shared: Arc::clone(&shared),
            hist: new_histogram(),
            delivered: 0,
            delivered_measured: 0,
            malformed: 0,
            wrong: 0,
            payload_bytes: cfg.payload_bytes,
            now_ns: 0,
            signal: id != 0,
            subscribers: u32::try_from(cfg.subscribers).unwrap_or(u32::MAX),
        };
        Ok(Worker {
            id,
            shared,
            ep,
            subs,
            next_start: 0,
            in_progress: 0,
            connect_tokens: 1.0,
            last_refill: now,
            last_deadline_check: now,
            publisher,
            sink,
            scratch: vec![0; 256 << 10],
            next_ping: now + Duration::from_secs(u64::from(KEEPALIVE_S) / 2),
            cfg,
        })
    }

    /// The thread's body: a worker error is handed to the controller.
    pub(super) fn run(mut self) -> Option<WorkerOut> {
        match self.event_loop() {
            Ok(()) => {
                self.say_goodbye();
                Some(WorkerOut {
                    hist: std::mem::replace(&mut self.sink.hist, new_histogram()),
                })
            }
            Err(e) => {
                self.shared.fail(e);
                None
            }
        }
    }

    fn event_loop(&mut self) -> Result<()> {
        if let Some(cpus) = &self.cfg.cpus {
            crate::sys::pin(cpus[self.id % cpus.len()])?;
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        loop {
            let phase = self.shared.phase.load(Ordering::Acquire);
            if phase == STOP || self.shared.failed.load(Ordering::Acquire) {
                return Ok(());
            }
            self.start_connects()?;
            let mut timeout = if self.next_start < self.subs.len() || self.in_progress > 0 {
                10
            } else {
                100
            };
            if let Some(p) = &mut self.publisher {
                timeout = timeout.min(p.pump(&self.shared, &self.cfg, &self.ep)?);
            }
            // SAFETY: events is a live buffer of events.len() entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("epoll_wait");
            }
            for ev in &events[..n as usize] {
                let (flags, token) = (ev.events, ev.u64);
                match token {
                    TOKEN_WAKE => {
                        let mut buf = [0u8; 8];
                        // SAFETY: reads 8 bytes into a live buffer.
                        unsafe {
                            libc::read(self.shared.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8);
                        }
                    }
                    TOKEN_PUBLISHER => {
                        if let Some(p) = &mut self.publisher {
                            p.on_event(flags, &mut self.scratch, &self.ep, &self.shared)?;
                        }
                    }
                    idx => self.on_sub_event(idx as usize, flags)?,
                }
            }
            self.sink.flush();
            let now = Instant::now();
            if self.in_progress > 0
                && now.duration_since(self.last_deadline_check) >= Duration::from_millis(100)
            {
                self.last_deadline_check = now;
                self.check_deadlines(now)?;
            }
            if now >= self.next_ping {
                self.next_ping = now + Duration::from_secs(u64::from(KEEPALIVE_S) / 2);
                self.ping();
            }
        }
    }

    /// Opens subscriber connections, within the handshake and rate limits.
    fn start_connects(&mut self) -> Result<()> {
        if self.next_start >= self.subs.len() {
            return Ok(());
        }
        if self.cfg.connect_rate > 0.0 {
            let now = Instant::now();
            let dt = now.duration_since(self.last_refill).as_secs_f64();
            self.last_refill = now;
            self.connect_tokens = (self.connect_tokens + dt * self.cfg.connect_rate)
                .min(self.cfg.connect_rate / 10.0 + 1.0);
        }
        while self.next_start < self.subs.len() && self.in_progress < self.cfg.handshakes {
            if self.cfg.connect_rate > 0.0 {
                if self.connect_tokens < 1.0 {
                    break;
                }
                self.connect_tokens -= 1.0;
            }
            let idx = self.next_start;
            self.next_start += 1;
            self.in_progress += 1;
            self.start_connect(idx)?;
        }
        Ok(())
    }

    fn start_connect(&mut self, idx: usize) -> Result<()> {
        let broker = self.cfg.broker;
        let sub = &mut self.subs[idx];
        let who = format!("subscriber {}", sub.id);
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(broker),
            socket2::Type::STREAM,
            None,
        )
        .with_context(|| format!("{who}: creating a socket"))?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        let connected = match sock.connect(&broker.into()) {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => false,
            Err(e) => {
                return Err(e).with_context(|| format!("{who}: cannot connect to broker {broker}"))
            }
        };
        let stream: TcpStream = sock.into();
        epoll_ctl(
            &self.ep,
            libc::EPOLL_CTL_ADD,
            stream.as_raw_fd(),
            connection_events(true),
            idx as u64,
        )?;
        sub.sock = Some(stream);
        sub.since = Instant::now();
        sub.state = State::Connecting;
        if connected {
            self.send_connect(idx)?;
        }
        Ok(())
    }

    /// The TCP connection is up: CONNECT, then wait for CONNACK.
    fn send_connect(&mut self, idx: usize) -> Result<()> {
        let sub = &mut self.subs[idx];
        let Some(sock) = &sub.sock else {
            return Ok(());
        };
        let frame = connect_frame(&format!("lg{}s{}", self.cfg.pid, sub.id), KEEPALIVE_S)?;
        write_small(sock, &frame)
            .with_context(|| format!("subscriber {}: sending CONNECT", sub.id))?;
        epoll_ctl(
            &self.ep,
            libc::EPOLL_CTL_MOD,
            sock.as_raw_fd(),
            connection_events(false),
            idx as u64,
        )?;
        sub.state = State::AwaitConnack;
        Ok(())
    }

    fn on_sub_event(&mut self, idx: usize, flags: u32) -> Result<()> {
        if flags & libc::EPOLLOUT as u32 != 0 && self.subs.get(idx).is_some_and(|s| s.want_out) {
            self.write_acks(idx)?;
        }
        let Some(sub) = self.subs.get_mut(idx) else {
            return Ok(());
        };
        let Some(sock) = &sub.sock else {
            return Ok(());
        };
        if sub.state == State::Connecting {
            if let Some(e) = sock.take_error()? {
                bail!(
                    "subscriber {}: cannot connect to broker {}: {e}",
                    sub.id,
                    self.cfg.broker
                );
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                return self.send_connect(idx);
            }
            if flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                bail!(
                    "subscriber {}: cannot connect to broker {}: connection failed",
                    sub.id,
                    self.cfg.broker
                );
            }
            return Ok(());
        }
        let n = match (&*sock).read(&mut self.scratch) {
            Ok(0) => return self.lost(idx, "the broker closed the connection".into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return self.lost(idx, e.to_string()),
        };
        self.sink.now_ns = self.shared.now_ns();
        let cfg = &*self.cfg;
        let sink = &mut self.sink;
        let mut stream = std::mem::take(&mut sub.stream);
        let mut became_ready = false;
        let result = stream.feed(&self.scratch[..n], |frame| {
            match (sub.state, frame.kind()) {
                (State::Ready, PUBLISH) => {
                    match publish_payload(&frame) {
                        Some(p) => sink.deliver(&mut sub.last_seq, p),
                        None => bail!("broker sent a malformed PUBLISH"),
                    }
                    if let Some(id) = publish_packet_id(&frame) {
                        put_puback(&mut sub.acks, id);
                    }
                }
                (_, PINGRESP) => {}
                (State::AwaitConnack, CONNACK) => {
                    check_connack(&frame, &format!("subscriber {}", sub.id), cfg.broker)?;
                    let subscribe = subscribe_frame(SUBSCRIBE_ID, &cfg.topic, cfg.qos)?;
                    if let Some(sock) = &sub.sock {
                        write_small(sock, &subscribe).context("sending SUBSCRIBE")?;
                    }
                    sub.state = State::AwaitSuback;
                }
                (State::AwaitSuback, SUBACK) => {
                    check_suback(
                        &frame,
                        &format!("subscriber {}", sub.id),
                        &cfg.topic,
                        cfg.qos,
                    )?;
                    sub.state = State::Ready;
                    became_ready = true;
                }
                (state, kind) => bail!(
                    "unexpected {} from the broker while waiting for {}",
                    kind_name(kind),
                    state.waiting_for()
                ),
            }
            Ok(())
        });
        sub.stream = stream;
        let acks = !sub.acks.is_empty() && !sub.want_out;
        if became_ready {
            self.in_progress -= 1;
            self.shared.ready.fetch_add(1, Ordering::AcqRel);
        }
        result.with_context(|| format!("subscriber {}", self.subs[idx].id))?;
        if acks {
            self.write_acks(idx)?;
        }
        Ok(())
    }

    /// Writes what the socket takes of a subscriber's PUBACKs; the rest
    /// waits for EPOLLOUT.
    fn write_acks(&mut self, idx: usize) -> Result<()> {
        let sub = &mut self.subs[idx];
        let Some(sock) = &sub.sock else {
            sub.acks.clear();
            return Ok(());
        };
        let done = match write_available(sock, &sub.acks) {
            Ok(n) => n,
            Err(e) => {
                sub.acks.clear();
                return self.lost(idx, e.to_string());
            }
        };
        sub.acks.drain(..done);
        let want_out = !sub.acks.is_empty();
        if want_out != sub.want_out {
            sub.want_out = want_out;
            epoll_ctl(
                &self.ep,
                libc::EPOLL_CTL_MOD,
                sock.as_raw_fd(),
                connection_events(want_out),
                idx as u64,
            )?;
        }
        Ok(())
    }

    /// A subscriber's connection ended: fatal before its SUBACK, counted after.
    fn lost(&mut self, idx: usize, why: String) -> Result<()> {
        let sub = &mut self.subs[idx];
        let state = sub.state;
        if let Some(sock) = sub.sock.take() {
            // SAFETY: removes an fd we registered; the fd is still open.
            unsafe {
                libc::epoll_ctl(
                    self.ep.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                );
            }
        }
        sub.state = State::Closed;
        match state {
            State::Ready => {
                if self.shared.phase.load(Ordering::Acquire) < STOP {
                    self.shared.dropped.fetch_add(1, Ordering::AcqRel);
                    if let Ok(mut first) = self.shared.first_drop.lock() {
                        first.get_or_insert_with(|| format!("subscriber {}: {why}", sub.id));
                    }
                }
                Ok(())
            }
            State::Closed => Ok(()),
            waiting => bail!(
                "subscriber {}: {why} while waiting for {} (broker {})",
                sub.id,
                waiting.waiting_for(),
                self.cfg.broker
            ),
        }
    }

    fn check_deadlines(&self, now: Instant) -> Result<()> {
        for sub in &self.subs[..self.next_start] {
            if matches!(
                sub.state,
                State::Connecting | State::AwaitConnack | State::AwaitSuback
            ) && now.duration_since(sub.since) > HANDSHAKE_TIMEOUT
            {
                bail!(
                    "subscriber {}: no {} from broker {} within {} s",
                    sub.id,
                    sub.state.waiting_for(),
                    self.cfg.broker,
                    HANDSHAKE_TIMEOUT.as_secs()
                );
            }
        }
        Ok(())
    }

    fn ping(&mut self) {
        let ping = [PINGREQ << 4, 0];
        for sub in &self.subs {
            if let (State::Ready, Some(sock)) = (sub.state, &sub.sock) {
                let _ = (&*sock).write(&ping);
            }
        }
        if let Some(p) = &mut self.publisher {
            p.out.extend_from_slice(&ping);
        }
    }

    /// DISCONNECT on every connection, best effort.
    fn say_goodbye(&mut self) {
        let bye = [DISCONNECT << 4, 0];
        for sub in &mut self.subs {
            if let Some(sock) = sub.sock.take() {
                if sub.state == State::Ready {
                    let _ = (&sock).write(&bye);
                }
            }
        }
        if let Some(p) = &mut self.publisher {
            p.out.extend_from_slice(&bye);
            let _ = p.flush(&self.ep);
        }
    }
}

/// Writes a handshake frame that must go out whole (a fresh socket's buffer
/// always takes a few dozen bytes).
fn write_small(sock: &TcpStream, frame: &[u8]) -> Result<()> {
    match (&*sock).write(frame) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(n) => bail!("only {n} of {} bytes written", frame.len()),
        Err(e) => Err(e.into()),
    }
}
