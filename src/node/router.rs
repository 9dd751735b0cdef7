//! The cross-shard router: two bounded inboxes per shard, woken by an eventfd.
//!
//! A shard owns whole accounts (conn id bytes 4..8 = the account's affinity,
//! docs/PROTOCOL.md §4 and §8), so every publish, every web-transport request and
//! every datagram that reached the wrong socket goes to exactly one shard.
//! Messages from the control plane (publishes, web requests, DNS answers)
//! share one inbox; datagrams forwarded from another shard's socket
//! (fallback steering, docs/PROTOCOL.md §8.3) have a small queue of their
//! own, so that traffic arriving from the network can never fill the inbox
//! publishes need. Both are bounded: when one is full the message is refused,
//! the refusal is counted (`router_overflows`, `forward_overflows`) and the
//! caller reports it (HTTP 503, or a dropped misrouted datagram the client
//! will resend). Nothing queues without limit.

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
        /// When the control plane handed it over ([`super::Clock::mono_nanos`]):
        /// the start of the publish → send latency.
        stamp: u64,
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
    /// New master keys (a rotation, docs/PROTOCOL.md §7.11).
    Keys(Box<crate::proto::KeySet>),
    /// A new table of revocations (docs/PROTOCOL.md §7.11).
    Revocations(Arc<crate::proto::revocation::Revocations>),
    /// New STUN rate limits per source address (a reload).
    StunLimits {
        /// Answers per second (0: unlimited).
        rate: u32,
        /// Burst.
        burst: u32,
    },
    /// Fail on purpose (tests of the node's health; never sent otherwise).
    #[doc(hidden)]
    Fault(Fault),
    /// The cluster's answer to one of this shard's catch-up questions
    /// (docs/PROTOCOL.md §10.4): the stores published after the device's
    /// mark (empty: none), or `None` when no node could tell.
    CatchUpAnswer {
        /// The parked connect it answers.
        token: crate::proto::CatchUpToken,
        /// The answer.
        answer: Option<Vec<u8>>,
    },
    /// Another node's catch-up question: what was published to `account`
    /// after `mark`, if this shard can tell (`None` on `reply` otherwise).
    CatchUpQuery {
        /// The account.
        account: String,
        /// The device's mark.
        mark: u32,
        /// Where the answer goes (the mask; empty: nothing published).
        reply: tokio::sync::oneshot::Sender<Option<Vec<u8>>>,
    },
    /// The node now hears (or no longer hears) the cluster's publishes for
    /// these partitions (docs/PROTOCOL.md §10.3).
    Hearing {
        /// Partitions (account affinity mod the partition count).
        partitions: Arc<[u32]>,
        /// Heard from now on, or not.
        heard: bool,
    },
    /// The bus's stream of publishes for `partition` skipped some (a
    /// numbered publish missing, or one this node could not hand to the
    /// shard): the partition's account records resynchronise
    /// (docs/PROTOCOL.md §10.3).
    BusGap {
        /// The partition (account affinity mod the partition count).
        partition: u32,
    },
}

/// A failure a test makes a shard suffer, to check that the node notices.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The shard's thread panics.
    Panic,
    /// The shard's loop ends with an I/O error, as after 1,000 failed calls
    /// in a row.
    IoError,
}

/// A datagram that arrived at another shard's socket (fallback steering).
#[derive(Debug)]
pub struct Forwarded {
    /// Its source.
    pub from: SocketAddr,
    /// Its bytes.
    pub datagram: Box<[u8]>,
}

/// The receiving ends of one shard's inboxes.
#[derive(Debug)]
pub struct ShardInbox {
    /// Publishes, web requests, DNS answers, shutdown.
    pub messages: Receiver<ShardMessage>,
    /// Datagrams forwarded from other shards' sockets.
    pub forwarded: Receiver<Forwarded>,
}

impl ShardInbox {
    /// Whether nothing waits in either inbox.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.forwarded.is_empty()
    }
}

/// Capacity of each shard's queue of forwarded datagrams, at most (it is
/// never larger than the message inbox).
pub const FORWARD_CAPACITY: usize = 4096;

/// The inbox was full; the message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shard inbox full")]
pub struct InboxFull;

struct Inbox {
    sender: Sender<ShardMessage>,
    forward: Sender<Forwarded>,
    waker: Arc<Waker>,
    forwarded: AtomicU64,
    overflows: AtomicU64,
    datagrams: AtomicU64,
    datagram_overflows: AtomicU64,
}

/// Routes messages to shards. Shared (`Arc`) by the shards and the control plane.
pub struct Router {
    inboxes: Vec<Inbox>,
}

impl Router {
    /// A router with one inbox of `capacity` messages per waker (and a
    /// queue of at most [`FORWARD_CAPACITY`] forwarded datagrams); returns
    /// the receiving ends, one per shard, in order.
    pub fn new(wakers: Vec<Arc<Waker>>, capacity: usize) -> (Arc<Router>, Vec<ShardInbox>) {
        let mut receivers = Vec::with_capacity(wakers.len());
        let inboxes = wakers
            .into_iter()
            .map(|waker| {
                let (sender, messages) = crossbeam_channel::bounded(capacity);
                let (forward, forwarded) =
                    crossbeam_channel::bounded(capacity.min(FORWARD_CAPACITY));
                receivers.push(ShardInbox {
                    messages,
                    forwarded,
                });
                Inbox {
                    sender,
                    forward,
                    waker,
                    forwarded: AtomicU64::new(0),
                    overflows: AtomicU64::new(0),
                    datagrams: AtomicU64::new(0),
                    datagram_overflows: AtomicU64::new(0),
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

    /// Queues a datagram that reached another shard's socket for its owner
    /// `shard`, in the owner's queue of forwarded datagrams (never in its
    /// message inbox); refuses (and counts) when that queue is full.
    pub fn forward(
        &self,
        shard: ShardId,
        from: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), InboxFull> {
        let Some(inbox) = self.inboxes.get(shard) else {
            return Err(InboxFull);
        };
        let forwarded = Forwarded {
            from,
            datagram: datagram.into(),
        };
        match inbox.forward.try_send(forwarded) {
            Ok(()) => {
                inbox.datagrams.fetch_add(1, Ordering::Relaxed);
                inbox.waker.wake();
                Ok(())
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                inbox.datagram_overflows.fetch_add(1, Ordering::Relaxed);
                Err(InboxFull)
            }
        }
    }

    /// Asks every shard to stop. Shutdown is retried until it fits, so a full
    /// inbox delays it only until the shard drains its next batch.
    pub fn shutdown_all(&self) {
        self.broadcast(|| ShardMessage::Shutdown);
        tracing::debug!("shutdown requested");
    }

    /// Gives every shard the message `make` builds, retried until each
    /// inbox has room (a full one only delays it until its shard drains its
    /// next batch): for the few messages that must not be lost (stop, new
    /// keys, new revocations).
    pub fn broadcast(&self, make: impl Fn() -> ShardMessage) {
        for inbox in &self.inboxes {
            let mut message = make();
            loop {
                match inbox.sender.try_send(message) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                    Err(TrySendError::Full(back)) => {
                        message = back;
                        inbox.waker.wake();
                        std::thread::yield_now();
                    }
                }
            }
            inbox.waker.wake();
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

    /// Datagrams queued for `shard` by other shards so far.
    pub fn forwarded_datagrams(&self, shard: ShardId) -> u64 {
        self.inboxes
            .get(shard)
            .map_or(0, |i| i.datagrams.load(Ordering::Relaxed))
    }

    /// Datagrams for `shard` dropped because its forward queue was full.
    pub fn forward_overflows(&self, shard: ShardId) -> u64 {
        self.inboxes
            .get(shard)
            .map_or(0, |i| i.datagram_overflows.load(Ordering::Relaxed))
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
            stamp: 0,
        };
        assert!(router.send(1, publish()).is_ok());
        assert!(router.send(1, publish()).is_ok());
        assert_eq!(router.send(1, publish()), Err(InboxFull));
        assert_eq!(router.send(7, publish()), Err(InboxFull), "no such shard");
        assert_eq!(router.forwarded(1), 2);
        assert_eq!(router.overflows(1), 1);
        assert_eq!(receivers[1].messages.len(), 2);
        assert!(receivers[0].is_empty());
    }

    #[test]
    fn forwarded_datagrams_never_take_the_inbox_of_publishes() {
        let wakers = (0..2)
            .map(|_| Arc::new(Waker::new().expect("eventfd")))
            .collect();
        let (router, receivers) = Router::new(wakers, 2);
        let from: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        assert!(router.forward(1, from, b"one").is_ok());
        assert!(router.forward(1, from, b"two").is_ok());
        assert_eq!(router.forward(1, from, b"three"), Err(InboxFull));
        assert_eq!(router.forwarded_datagrams(1), 2);
        assert_eq!(router.forward_overflows(1), 1);
        // The message inbox is untouched: publishes still fit.
        let publish = ShardMessage::Publish {
            account: "a".into(),
            bitmask: vec![1],
            stamp: 0,
        };
        assert!(router.send(1, publish).is_ok());
        assert_eq!(router.overflows(1), 0);
        assert_eq!(receivers[1].messages.len(), 1);
        assert_eq!(receivers[1].forwarded.len(), 2);
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
