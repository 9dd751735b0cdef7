//! The control plane's TCP connections: accepted under a cap, and closed
//! when their client is too slow or idle (docs/PROTOCOL.md §9, D24).
//!
//! It exists so that no client, however slow, holds the control plane: axum's
//! own `serve` has no timeouts and no limit, so a client that opens
//! connections and sends nothing (or half a request) would keep them, and
//! their descriptors, forever. Here every accepted connection holds one permit
//! of its listener's cap (a connection beyond the cap is accepted and closed
//! at once, before anything is read), and its socket is wrapped so that a
//! read waiting longer than its phase allows fails and hyper closes the
//! connection:
//!
//! * **head**: from the accept (or from the first byte after an answer) until
//!   the request head is complete — the header timeout;
//! * **body**: from the end of the head until the handler has the whole body
//!   — the body timeout;
//! * **idle**: from an answer until the next request's first byte — the idle
//!   (keep-alive) timeout;
//! * a write that makes no progress for the body timeout (a client that does
//!   not read its answers) fails too.
//!
//! While a handler works on a request whose body it has, reads have no
//! deadline: every handler's own wait is bounded (the web transport's by
//! `WEB_REPLY_TIMEOUT`). This module parses no HTTP: it learns the phases
//! from the request middleware ([`track_request`]) and the body extractor
//! ([`BodyBytes`]), and must stay below hyper, never in a request's path.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::Connected;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequest, Request};
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::middleware::Next;
use axum::response::Response;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::metrics::{Exposition, Kind};

/// The limits of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a request head may take to arrive, from the accept or from
    /// its first byte.
    pub header_timeout: Duration,
    /// How long a request body may take to arrive after its head; also how
    /// long a write may make no progress.
    pub body_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections open at once at most; more are closed as soon as they
    /// are accepted.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    /// The defaults of the `http_*` settings.
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
        }
    }
}

/// Why a connection was closed by a timeout (the `phase` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeout {
    Header,
    Body,
    Idle,
    Write,
}

impl Timeout {
    const ALL: [Timeout; 4] = [
        Timeout::Header,
        Timeout::Body,
        Timeout::Idle,
        Timeout::Write,
    ];

    fn name(self) -> &'static str {
        match self {
            Timeout::Header => "header",
            Timeout::Body => "body",
            Timeout::Idle => "idle",
            Timeout::Write => "write",
        }
    }

    fn error(self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("HTTP client too slow: {} timeout", self.name()),
        )
    }
}

/// The counters of one listener, for `GET /metrics`.
#[derive(Debug)]
pub struct ListenerStats {
    name: &'static str,
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    timeouts: [AtomicU64; 4],
}

impl ListenerStats {
    /// Counters for the listener labelled `name` (`control` or `web`).
    pub fn new(name: &'static str) -> Self {
        ListenerStats {
            name,
            open: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timeouts: Default::default(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn timed_out(&self, t: Timeout) {
        let i = Timeout::ALL.iter().position(|x| *x == t).unwrap_or(0);
        self.timeouts[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes the HTTP families of every listener.
pub(super) fn render(listeners: &[Arc<ListenerStats>], out: &mut Exposition) {
    type Value = fn(&ListenerStats) -> u64;
    let families: [(&str, Kind, &str, Value); 3] = [
        (
            "mpp_http_connections",
            Kind::Gauge,
            "HTTP connections open, by listener.",
            |s| s.open(),
        ),
        (
            "mpp_http_connections_accepted_total",
            Kind::Counter,
            "HTTP connections accepted under the listener's cap.",
            |s| s.accepted.load(Ordering::Relaxed),
        ),
        (
            "mpp_http_connections_refused_total",
            Kind::Counter,
            "HTTP connections closed at once because the listener's cap was reached.",
            |s| s.refused(),
        ),
    ];
    for (name, kind, help, value) in families {
        out.family(name, kind, help);
        for s in listeners {
            out.sample(name, &[("listener", s.name)], value(s));
        }
    }
    let name = "mpp_http_timeouts_total";
    out.family(
        name,
        Kind::Counter,
        "HTTP connections closed because the client was too slow, by listener and phase (header, body, idle, write).",
    );
    for s in listeners {
        for (i, t) in Timeout::ALL.iter().enumerate() {
            let labels = [("listener", s.name), ("phase", t.name())];
            out.sample(name, &labels, s.timeouts[i].load(Ordering::Relaxed));
        }
    }
}

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for (the rest of) a request head since then.
    Head(Instant),
    /// Waiting for a request body since its head was complete.
    Body(Instant),
    /// A handler has the request; no read deadline.
    Handling,
    /// Answered; waiting for the next request since then.
    Idle(Instant),
}

/// One connection's phase, shared by its socket wrapper and the requests on it.
#[derive(Debug)]
pub(super) struct ConnState {
    phase: Mutex<Phase>,
}

impl ConnState {
    fn set(&self, phase: Phase) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
    }

    fn get(&self) -> Phase {
        self.phase.lock().map_or(Phase::Handling, |p| *p)
    }

    /// Bytes arrived: on an idle connection, a new request head starts.
    fn bytes_arrived(&self) {
        if let Ok(mut p) = self.phase.lock() {
            if let Phase::Idle(_) = *p {
                *p = Phase::Head(Instant::now());
            }
        }
    }

    /// The deadline of a read that waits now, and which timeout it is.
    fn read_deadline(&self, limits: &HttpLimits) -> Option<(Instant, Timeout)> {
        match self.get() {
            Phase::Head(since) => Some((since + limits.header_timeout, Timeout::Header)),
            Phase::Body(since) => Some((since + limits.body_timeout, Timeout::Body)),
            Phase::Idle(since) => Some((since + limits.idle_timeout, Timeout::Idle)),
            Phase::Handling => None,
        }
    }
}

/// The peer of a request, as the handlers see it
/// (`ConnectInfo<Peer>`): its address, and its connection's phase.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    conn: Arc<ConnState>,
}

impl Connected<IncomingStream<'_, LimitedListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, LimitedListener>) -> Self {
        stream.io().peer.clone()
    }
}

/// Middleware over every route: the head is complete when it runs; the
/// connection is idle again when it returns.
pub(super) async fn track_request(request: Request, next: Next) -> Response {
    let conn = request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| Arc::clone(&c.0.conn));
    if let Some(conn) = &conn {
        let headers = request.headers();
        let has_body = headers.contains_key(TRANSFER_ENCODING)
            || headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim() != "0");
        conn.set(if has_body {
            Phase::Body(Instant::now())
        } else {
            Phase::Handling
        });
    }
    let response = next.run(request).await;
    if let Some(conn) = conn {
        conn.set(Phase::Idle(Instant::now()));
    }
    response
}

/// The whole request body, like `Bytes`; once it is read, the body timeout
/// no longer runs.
pub(super) struct BodyBytes(pub(super) Bytes);

impl<S: Send + Sync> FromRequest<S> for BodyBytes {
    type Rejection = BytesRejection;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let conn = request
            .extensions()
            .get::<ConnectInfo<Peer>>()
            .map(|c| Arc::clone(&c.0.conn));
        let body = Bytes::from_request(request, state).await;
        if let Some(conn) = conn {
            conn.set(Phase::Handling);
        }
        body.map(BodyBytes)
    }
}

/// A TCP listener that holds at most `max_connections` connections and
/// wraps each in a [`LimitedIo`].
pub struct LimitedListener {
    tcp: TcpListener,
    limits: HttpLimits,
    permits: Arc<Semaphore>,
    stats: Arc<ListenerStats>,
}

impl LimitedListener {
    /// Wraps `tcp`; `stats` counts its connections.
    pub fn new(tcp: TcpListener, limits: HttpLimits, stats: Arc<ListenerStats>) -> Self {
        let permits = Arc::new(Semaphore::new(
            limits.max_connections.min(Semaphore::MAX_PERMITS),
        ));
        LimitedListener {
            tcp,
            limits,
            permits,
            stats,
        }
    }
}

/// Errors of `accept` that concern one connection only (it went away before
/// it was accepted): try the next at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (LimitedIo, SocketAddr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of descriptors or memory: the cap keeps us below the
                    // limit checked at start, so this is someone else's doing.
                    // Wait, instead of spinning on the error.
                    tracing::warn!(listener = self.stats.name, %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                // At the cap: closed at once, nothing read.
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                drop(tcp);
                continue;
            };
            // Publishes are small requests on kept-alive connections: answer
            // each without waiting for Nagle's algorithm to coalesce.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(%e, "could not set TCP_NODELAY on a control connection");
            }
            self.stats.accepted.fetch_add(1, Ordering::Relaxed);
            self.stats.open.fetch_add(1, Ordering::Relaxed);
            let io = LimitedIo::new(tcp, addr, self.limits, Arc::clone(&self.stats), permit);
            return (io, addr);
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// One accepted connection: the socket, its deadlines and its permit.
pub struct LimitedIo {
    tcp: TcpStream,
    peer: Peer,
    limits: HttpLimits,
    stats: Arc<ListenerStats>,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    /// Since when writes have made no progress.
    write_stalled: Option<Instant>,
    /// Set once a deadline passed: every later read or write fails.
    timed_out: Option<Timeout>,
    _permit: OwnedSemaphorePermit,
}

impl LimitedIo {
    fn new(
        tcp: TcpStream,
        addr: SocketAddr,
        limits: HttpLimits,
        stats: Arc<ListenerStats>,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        let now = Instant::now();
        LimitedIo {
            tcp,
            peer: Peer {
                addr,
                conn: Arc::new(ConnState {
                    phase: Mutex::new(Phase::Head(now)),
                }),
            },
            limits,
            stats,
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            write_stalled: None,
            timed_out: None,
            _permit: permit,
        }
    }

    fn expire(&mut self, t: Timeout) -> io::Error {
        if self.timed_out.is_none() {
            self.timed_out = Some(t);
            self.stats.timed_out(t);
            tracing::debug!(peer = %self.peer.addr, phase = t.name(), "closing a slow HTTP connection");
        }
        t.error()
    }

    /// A write's outcome, with the stall deadline applied to `Pending`.
    fn write_progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.write_stalled = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let since = *self.write_stalled.get_or_insert_with(Instant::now);
                let deadline = since + self.limits.body_timeout;
                if self.write_timer.deadline() != deadline {
                    self.write_timer.as_mut().reset(deadline);
                }
                if self.write_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(self.expire(Timeout::Write)));
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for LimitedIo {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(t) = this.timed_out {
            return Poll::Ready(Err(t.error()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.peer.conn.bytes_arrived();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((deadline, which)) = this.peer.conn.read_deadline(&this.limits) else {
                    return Poll::Pending;
                };
                if this.read_timer.deadline() != deadline {
                    this.read_timer.as_mut().reset(deadline);
                }
                if this.read_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(this.expire(which)));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(t) = this.timed_out {
            return Poll::Ready(Err(t.error()));
        }
        let r = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.write_progress(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(t) = this.timed_out {
            return Poll::Ready(Err(t.error()));
        }
        let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.write_progress(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_flush(cx);
        this.write_progress(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
