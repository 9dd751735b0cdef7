//! The cross-shard router: one bounded inbox per shard, woken by an eventfd.
//!
//! A shard owns whole accounts (conn id bytes 4..8 = the account's affinity,
//! docs/PROTOCOL.md §4 and §8), so every publish, every web-transport request and
//! every datagram that reached the wrong socket goes to exactly one shard's
//! inbox. Inboxes are bounded: when one is full the message is refused, the
//! refusal is counted (`router_overflows`) and the caller reports it (HTTP
//! 503, or a dropped misrouted datagram the client will resend). Nothing
//! queues without limit.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::net::Waker;
use crate::packet::account_affinity;
use crate::proto::ResolveToken;

/// Index of a shard.
pub type ShardId = usize;

/// What one shard can be asked to do.
#[derive(Debug)]
pub enum ShardMessage {
    /// Publish to an account this shard owns.
    Publish {
        /// The account.
        account: String,
        /// The bitmask (1..=32 bytes, checked by the sender).
        bitmask: Vec<u8>,
    },
    /// A datagram that arrived at another shard's socket.
    Forward {
        /// Its source.
        from: SocketAddr,
        /// Its bytes.
        datagram: Box<[u8]>,
    },
    /// A client packet from the web-service transport; the replies go back on `reply`.
    Web {
        /// The HTTP peer.
        peer: SocketAddr,
        /// The client packet.
        packet: Vec<u8>,
        /// Where the reply packets go.
        reply: tokio::sync::oneshot::Sender<Vec<Vec<u8>>>,
    },
    /// The upstream DNS answer (or failure status) for a resolve.
    ResolveAnswer {
        /// The resolve it answers.
        token: ResolveToken,
        /// DNS response bytes, or 502/504.
        answer: Result<Vec<u8>, u16>,
    },
    /// Stop: flush pending sends and exit.
    Shutdown,
}

/// The inbox was full; the message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shard inbox full")]
pub struct InboxFull;

struct Inbox {
    sender: Sender<ShardMessage>,
    waker: Arc<Waker>,
    forwarded: AtomicU64,
    overflows: AtomicU64,
}

/// Routes messages to shards. Shared (`Arc`) by the shards and the control plane.
pub struct Router {
    inboxes: Vec<Inbox>,
}

impl Router {
    /// A router with `shards` inboxes of `capacity` messages each; returns
    /// the receiving ends, one per shard, in order.
    pub fn new(
        wakers: Vec<Arc<Waker>>,
        capacity: usize,
    ) -> (Arc<Router>, Vec<Receiver<ShardMessage>>) {
        let mut receivers = Vec::with_capacity(wakers.len());
        let inboxes = wakers
            .into_iter()
            .map(|waker| {
                let (sender, receiver) = crossbeam_channel::bounded(capacity);
                receivers.push(receiver);
                Inbox {
                    sender,
                    waker,
                    forwarded: AtomicU64::new(0),
                    overflows: AtomicU64::new(0),
                }
            })
            .collect();
        (Arc::new(Router { inboxes }), receivers)
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// The shard owning the accounts with this affinity (docs/PROTOCOL.md §8: affinity mod N).
    pub fn shard_of_affinity(&self, affinity: u32) -> ShardId {
        crate::net::steer::shard_of(affinity, self.inboxes.len() as u32) as ShardId
    }

    /// The shard owning `account`.
    pub fn shard_of_account(&self, account: &str) -> ShardId {
        self.shard_of_affinity(account_affinity(account))
    }

    /// Queues `message` for `shard` and wakes it; refuses (and counts) when full.
    pub fn send(&self, shard: ShardId, message: ShardMessage) -> Result<(), InboxFull> {
        let Some(inbox) = self.inboxes.get(shard) else {
            return Err(InboxFull);
        };
        match inbox.sender.try_send(message) {
            Ok(()) => {
                inbox.forwarded.fetch_add(1, Ordering::Relaxed);
                inbox.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                inbox.overflows.fetch_add(1, Ordering::Relaxed);
                Err(InboxFull)
            }
        }
    }

    /// Asks every shard to stop. Shutdown is retried until it fits, so a full
    /// inbox delays it only until the shard drains its next batch.
    pub fn shutdown_all(&self) {
        for (i, inbox) in self.inboxes.iter().enumerate() {
            loop {
                match inbox.sender.try_send(ShardMessage::Shutdown) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                    Err(TrySendError::Full(_)) => {
                        inbox.waker.wake();
                        std::thread::yield_now();
                    }
                }
            }
            inbox.waker.wake();
            tracing::debug!(shard = i, "shutdown requested");
        }
    }

    /// Messages delivered to `shard`'s inbox so far.
    pub fn forwarded(&self, shard: ShardId) -> u64 {
        self.inboxes
            .get(shard)
            .map_or(0, |i| i.forwarded.load(Ordering::Relaxed))
    }

    /// Messages refused because `shard`'s inbox was full.
    pub fn overflows(&self, shard: ShardId) -> u64 {
        self.inboxes
            .get(shard)
            .map_or(0, |i| i.overflows.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_counted() {
        let wakers = (0..2)
            .map(|_| Arc::new(Waker::new().expect("eventfd")))
            .collect();
        let (router, receivers) = Router::new(wakers, 2);
        let publish = || ShardMessage::Publish {
            account: "a".into(),
            bitmask: vec![1],
        };
        assert!(router.send(1, publish()).is_ok());
        assert!(router.send(1, publish()).is_ok());
        assert_eq!(router.send(1, publish()), Err(InboxFull));
        assert_eq!(router.send(7, publish()), Err(InboxFull), "no such shard");
        assert_eq!(router.forwarded(1), 2);
        assert_eq!(router.overflows(1), 1);
        assert_eq!(receivers[1].len(), 2);
        assert!(receivers[0].is_empty());
    }

    #[test]
    fn accounts_map_to_affinity_mod_n() {
        let wakers = (0..3)
            .map(|_| Arc::new(Waker::new().expect("eventfd")))
            .collect();
        let (router, _rx) = Router::new(wakers, 1);
        // affinity("alice@example.com") = 0xff8d9819 (docs/PROTOCOL.md test vector)
        assert_eq!(router.shard_of_account("alice@example.com"), 0xff8d9819 % 3);
    }
}
