//! The control plane: the node's HTTP API (docs/PROTOCOL.md §9).
//!
//! Services publish notifications, operators issue credentials, Prometheus
//! scrapes counters, and clients that cannot use UDP hand their packets over
//! the web-service transport, through one small axum application served on
//! one listener (the control port) or two (the control port, and a public
//! one for the web transport alone). It exists so that everything slow,
//! blocking or untrusted about HTTP stays on one thread of its own, away
//! from the shards that move datagrams.
//!
//! It runs on its own thread with a tokio current-thread runtime and must
//! never run on a shard thread or touch a shard's data: every request reaches
//! the node through [`NodeApi`], whose calls are non-blocking hand-offs to the
//! owning shard's inbox (or reads of counter snapshots). Back-pressure from a
//! full inbox is reported to the caller as 503, never queued here. No client
//! holds it: each listener caps its connections and closes those whose
//! client is too slow or idle ([`HttpLimits`]). Writes (`/v1/notify`,
//! `/v1/credentials`) need the admin bearer token; the token and the secrets
//! of issued credentials are never logged.

mod api;
mod auth;
pub mod dns;
mod http;
pub mod metrics;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use http::{HttpLimits, ListenerStats, Peer};
pub use metrics::Exposition;

/// Largest request body accepted on the control port, in bytes.
pub const MAX_REQUEST_BODY: usize = 1 << 20;
/// Most notifications one `POST /v1/notify` may carry.
pub const MAX_NOTIFY_BATCH: usize = 10_000;
/// Credential lifetime when a request names none: 30 days.
pub const DEFAULT_CREDENTIAL_TTL_SECS: u64 = 30 * 86_400;
/// Shortest credential lifetime a request may ask for.
pub const MIN_CREDENTIAL_TTL_SECS: u64 = 60;
/// Longest credential lifetime a request may ask for: 366 days.
pub const MAX_CREDENTIAL_TTL_SECS: u64 = 366 * 86_400;
/// How long the web-service transport waits for the shard's replies before
/// answering 504.
pub const WEB_REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// What the control plane may ask of the node. Every call must return
/// promptly: the implementation hands work to a shard's inbox or reads
/// counter snapshots, and never blocks on a shard.
pub trait NodeApi: Send + Sync + 'static {
    /// Route a publish to the shard that owns the account (non-blocking). Err
    /// when that shard's inbox is full.
    fn publish(&self, account: &str, bitmask: &[u8]) -> Result<(), Overloaded>;
    /// Issue a credential from the node's master key, with the node's public
    /// UDP endpoints in it.
    fn issue_credential(
        &self,
        account: &str,
        device: &str,
        ttl_secs: u64,
    ) -> Result<crate::packet::Credential, crate::packet::CredentialError>;
    /// Web-service transport (docs/PROTOCOL.md §9): hand one client packet to the
    /// owning shard; the receiver yields the reply packets (possibly none).
    fn web_request(
        &self,
        peer: SocketAddr,
        packet: Vec<u8>,
    ) -> Result<tokio::sync::oneshot::Receiver<Vec<Vec<u8>>>, Overloaded>;
    /// Writes every counter the node keeps (Prometheus text).
    fn metrics(&self, out: &mut Exposition);
    /// Whether every part of the node is running (`GET /healthz`): `Err`
    /// with the reason when one is not (a shard died, the node is stopping).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// In a cluster (docs/PROTOCOL.md §10.3): hands publishes this node
    /// accepted to the other nodes; the future says how many the bus took
    /// and how many it could not take within its bound. `None` for a node
    /// on its own.
    #[allow(clippy::type_complexity)]
    fn publish_remote(
        &self,
        _batch: Vec<(String, Vec<u8>)>,
    ) -> Option<std::pin::Pin<Box<dyn Future<Output = RemoteOutcome> + Send>>> {
        None
    }
}

/// What a cluster's bus did with the publishes of one `POST /v1/notify`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteOutcome {
    /// Publishes handed to the bus for the other nodes.
    pub remote: usize,
    /// Publishes the bus could not take in time (devices on other nodes miss them).
    pub failed: usize,
}

/// A shard's inbox was full, so the request was not handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node overloaded: shard inbox full")]
pub struct Overloaded;

/// Which routes a listener serves (docs/PROTOCOL.md §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// Everything: the admin API, `/metrics`, `/healthz` and the web
    /// transport (the control port when no separate web listener is set).
    All,
    /// The admin API, `/metrics` and `/healthz`; not the web transport.
    Admin,
    /// Only the web transport (`POST /.well-known/mmmpresence/`).
    Web,
}

impl Routes {
    /// The `listener` label of its metrics.
    pub fn listener_name(self) -> &'static str {
        match self {
            Routes::All | Routes::Admin => "control",
            Routes::Web => "web",
        }
    }
}

/// One HTTP listener of the control plane: its socket, what it serves and
/// its limits.
#[derive(Debug)]
pub struct HttpListener {
    /// The bound socket.
    pub listener: tokio::net::TcpListener,
    /// The routes served on it.
    pub routes: Routes,
    /// Its timeouts and connection cap.
    pub limits: HttpLimits,
}

/// Serves every route on `listener` with the default [`HttpLimits`] until
/// `shutdown` completes (see [`serve_listeners`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<dyn NodeApi>,
    admin_token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = HttpListener {
        listener,
        routes: Routes::All,
        limits: HttpLimits::default(),
    };
    serve_listeners(vec![listener], node, admin_token, shutdown).await
}

/// Serves the control API on every listener until `shutdown` completes,
/// then finishes the requests in flight (a slow client's connection ends at
/// its timeout at the latest) and returns.
///
/// Run it on the control thread's runtime (IO and time drivers enabled), never
/// on a shard thread. An empty `admin_token` refuses every write. `/metrics`
/// reports the connections of every listener.
pub async fn serve_listeners(
    listeners: Vec<HttpListener>,
    node: Arc<dyn NodeApi>,
    admin_token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stats: Vec<Arc<ListenerStats>> = listeners
        .iter()
        .map(|l| Arc::new(ListenerStats::new(l.routes.listener_name())))
        .collect();
    let all_stats: Arc<[Arc<ListenerStats>]> = stats.clone().into();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let mut tasks = tokio::task::JoinSet::new();
    for (l, stats) in listeners.into_iter().zip(stats) {
        let app = api::router_for(
            Arc::clone(&node),
            &admin_token,
            l.routes,
            Arc::clone(&all_stats),
        );
        let listener = http::LimitedListener::new(l.listener, l.limits, stats);
        let mut stopped = stopped.clone();
        let signal = async move {
            // Err: the sender is gone, which also means stop.
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        tasks.spawn(
            axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(signal)
                .into_future(),
        );
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let outcome = done.unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if result.is_ok() {
            result = outcome;
        }
    }
    result
}
