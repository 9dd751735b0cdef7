//! The control plane: the node's HTTP API (docs/PROTOCOL.md §9).
//!
//! Services publish notifications, operators issue credentials, Prometheus
//! scrapes counters, and clients that cannot use UDP hand their packets over
//! the web-service transport, all through one small axum server. It exists so
//! that everything slow, blocking or untrusted about HTTP stays on one thread
//! of its own, away from the shards that move datagrams.
//!
//! It runs on its own thread with a tokio current-thread runtime and must
//! never run on a shard thread or touch a shard's data: every request reaches
//! the node through [`NodeApi`], whose calls are non-blocking hand-offs to the
//! owning shard's inbox (or reads of counter snapshots). Back-pressure from a
//! full inbox is reported to the caller as 503, never queued here. Writes
//! (`/v1/notify`, `/v1/credentials`) need the admin bearer token; the token
//! and the secrets of issued credentials are never logged.

mod api;
mod auth;
pub mod dns;
pub mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use api::router;
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
}

/// A shard's inbox was full, so the request was not handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node overloaded: shard inbox full")]
pub struct Overloaded;

/// Serves the control API on `listener` until `shutdown` completes, then
/// finishes the requests in flight and returns.
///
/// Run it on the control thread's runtime (IO and time drivers enabled), never
/// on a shard thread. An empty `admin_token` refuses every write.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<dyn NodeApi>,
    admin_token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(node, admin_token);
    // Publishes are small requests on kept-alive connections: answer each
    // without waiting for Nagle's algorithm to coalesce.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%e, "could not set TCP_NODELAY on a control connection");
        }
    });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
