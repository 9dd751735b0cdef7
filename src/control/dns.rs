//! The DNS proxy's upstream side (docs/PROTOCOL.md §2 `PresenceResolveRequest`):
//! runs on the control-plane runtime, never on a shard thread.
//!
//! Each query a shard hands over is sent to the configured upstream from a
//! fresh ephemeral socket (so answers cannot be confused between queries),
//! and the answer — or 504 on timeout, 502 on any other failure — goes back
//! to the shard through the callback the node gives (its router). At most `MAX_IN_FLIGHT` queries wait at
//! once; the shard-side channel is bounded too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::proto::ResolveToken;

/// One query a shard hands to the forwarder.
#[derive(Debug)]
pub struct DnsQuery {
    /// The shard that asked (its answer goes back there).
    pub shard: usize,
    /// The resolve it belongs to.
    pub token: ResolveToken,
    /// The DNS query, wire format.
    pub query: Vec<u8>,
}

/// The upstream's answer to a [`DnsQuery`], or 502/504.
#[derive(Debug)]
pub struct DnsAnswer {
    /// The shard that asked.
    pub shard: usize,
    /// The resolve it belongs to.
    pub token: ResolveToken,
    /// The DNS response, or the status to report (502 failure, 504 timeout).
    pub answer: Result<Vec<u8>, u16>,
}

/// Queries waiting for the upstream at once, at most (each holds a socket).
pub const MAX_IN_FLIGHT: usize = 256;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Forwards queries to `upstream` until the channel closes, handing each
/// answer to `answered` (which must not block: it queues the answer for
/// its shard).
pub async fn forward(
    upstream: SocketAddr,
    mut queries: tokio::sync::mpsc::Receiver<DnsQuery>,
    answered: impl Fn(DnsAnswer) + Clone + Send + 'static,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    while let Some(DnsQuery {
        shard,
        token,
        query,
    }) = queries.recv().await
    {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let answered = answered.clone();
        tokio::spawn(async move {
            let answer = ask(upstream, &query).await;
            if let Err(code) = &answer {
                tracing::debug!(%upstream, code, "DNS upstream failed");
            }
            answered(DnsAnswer {
                shard,
                token,
                answer,
            });
            drop(permit);
        });
    }
}

async fn ask(upstream: SocketAddr, query: &[u8]) -> Result<Vec<u8>, u16> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let socket = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|_| 502u16)?;
    socket.connect(upstream).await.map_err(|_| 502u16)?;
    socket.send(query).await.map_err(|_| 502u16)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buf))
            .await
            .map_err(|_| 504u16)?
            .map_err(|_| 502u16)?;
        // The DNS id (first two bytes) must match the query's.
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}
