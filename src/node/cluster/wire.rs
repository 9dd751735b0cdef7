//! The payloads the nodes of a cluster exchange over NATS (docs/PROTOCOL.md
//! §10.2): a publish, the announcement of a stream's last number, a
//! catch-up question and its answer, each a few bytes
//! behind a version and a kind byte.
//!
//! Decoding is strict (every length checked, nothing left over) because a
//! payload comes from the network: a bad one is an error value, counted and
//! dropped by the caller, never a panic. This module knows nothing of
//! subjects, connections or shards.

use bytes::{BufMut, Bytes, BytesMut};

use crate::packet::MAX_ACCOUNT_LEN;
use crate::proto::MAX_BITMASK;

/// The payload format's version, the first byte of every payload.
pub const VERSION: u8 = 1;

const PUBLISH: u8 = b'P';
const NUMBERED: u8 = b'N';
const LAST: u8 = b'L';
const QUESTION: u8 = b'Q';
const ANSWER: u8 = b'A';

/// One decoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusMessage<'a> {
    /// A publish accepted by another node: `bitmask` for `account`.
    Publish {
        /// The account.
        account: &'a str,
        /// The stores that changed (1 to 32 bytes, not all zero).
        bitmask: &'a [u8],
        /// Where it sits in its sender's stream for the partition: the
        /// sender (a random number the node drew at start) and the
        /// publish's number in that stream (1, 2, …). Absent in the
        /// unnumbered kind `'P'` (nodes before numbering).
        number: Option<Number>,
    },
    /// The number of the sender's last publish to the partition, announced
    /// about once a second after it published there (docs/PROTOCOL.md
    /// §10.3): a receiver that heard less lost the tail of the stream.
    Last {
        /// The sender's stream and its last number there.
        number: Number,
    },
    /// "What was published to `account` after `mark`?" (a request; the
    /// answer goes to the message's reply subject).
    Question {
        /// The account.
        account: &'a str,
        /// The device's mark: a Serial of the node that last held it.
        mark: u32,
    },
    /// The answer of a node that could tell: the stores published after
    /// the mark (empty: none).
    Answer {
        /// The union of what was published after the mark (0 to 32 bytes).
        bitmask: &'a [u8],
    },
}

/// A publish's place in its sender's stream for one partition
/// (docs/PROTOCOL.md §10.3): a receiver that sees a number twice drops the
/// second, and one that sees a number skipped resynchronises the partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Number {
    /// The sending node's stream id, drawn at random when its bus started.
    pub sender: u64,
    /// 1 for the sender's first publish to the partition, then one more each.
    pub seq: u64,
}

/// Why a payload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A version this node does not speak.
    #[error("unknown payload version {0}")]
    Version(u8),
    /// An unknown kind byte.
    #[error("unknown payload kind {0:#04x}")]
    Kind(u8),
    /// The payload is cut short, too long, or a length is out of range.
    #[error("malformed payload")]
    Malformed,
}

/// A publish: `1 'P' len account len bitmask`.
pub fn publish(account: &str, bitmask: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(4 + account.len() + bitmask.len());
    b.put_u8(VERSION);
    b.put_u8(PUBLISH);
    put_short(&mut b, account.as_bytes());
    put_short(&mut b, bitmask);
    b.freeze()
}

/// A numbered publish: `1 'N' sender(u64be) seq(u64be) len account len bitmask`.
pub fn numbered_publish(number: Number, account: &str, bitmask: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + account.len() + bitmask.len());
    b.put_u8(VERSION);
    b.put_u8(NUMBERED);
    b.put_u64(number.sender);
    b.put_u64(number.seq);
    put_short(&mut b, account.as_bytes());
    put_short(&mut b, bitmask);
    b.freeze()
}

/// The announcement of a stream's last number on a partition:
/// `1 'L' sender(u64be) seq(u64be)`.
pub fn last(number: Number) -> Bytes {
    let mut b = BytesMut::with_capacity(18);
    b.put_u8(VERSION);
    b.put_u8(LAST);
    b.put_u64(number.sender);
    b.put_u64(number.seq);
    b.freeze()
}

/// A catch-up question: `1 'Q' mark(u32be) len account`.
pub fn question(account: &str, mark: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(7 + account.len());
    b.put_u8(VERSION);
    b.put_u8(QUESTION);
    b.put_u32(mark);
    put_short(&mut b, account.as_bytes());
    b.freeze()
}

/// A catch-up answer: `1 'A' len bitmask`.
pub fn answer(bitmask: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(3 + bitmask.len());
    b.put_u8(VERSION);
    b.put_u8(ANSWER);
    put_short(&mut b, bitmask);
    b.freeze()
}

/// Writes a length byte and the bytes (callers keep them ≤ 255).
fn put_short(b: &mut BytesMut, bytes: &[u8]) {
    let n = bytes.len().min(255);
    b.put_u8(n as u8);
    b.put_slice(&bytes[..n]);
}

/// Reads one payload.
pub fn decode(payload: &[u8]) -> Result<BusMessage<'_>, WireError> {
    let (&version, rest) = payload.split_first().ok_or(WireError::Malformed)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let (&kind, rest) = rest.split_first().ok_or(WireError::Malformed)?;
    match kind {
        LAST => match number(rest)? {
            (number, []) => Ok(BusMessage::Last { number }),
            _ => Err(WireError::Malformed),
        },
        PUBLISH | NUMBERED => {
            let (number, rest) = if kind == NUMBERED {
                let (number, rest) = number(rest)?;
                (Some(number), rest)
            } else {
                (None, rest)
            };
            let (account, rest) = short(rest)?;
            let (bitmask, rest) = short(rest)?;
            let account = account_name(account)?;
            if !rest.is_empty()
                || bitmask.is_empty()
                || bitmask.len() > MAX_BITMASK
                || bitmask.iter().all(|&b| b == 0)
            {
                return Err(WireError::Malformed);
            }
            Ok(BusMessage::Publish {
                account,
                bitmask,
                number,
            })
        }
        QUESTION => {
            let (mark, rest) = rest.split_at_checked(4).ok_or(WireError::Malformed)?;
            let mark = u32::from_be_bytes([mark[0], mark[1], mark[2], mark[3]]);
            let (account, rest) = short(rest)?;
            if !rest.is_empty() || mark == 0 {
                return Err(WireError::Malformed);
            }
            Ok(BusMessage::Question {
                account: account_name(account)?,
                mark,
            })
        }
        ANSWER => {
            let (bitmask, rest) = short(rest)?;
            if !rest.is_empty() || bitmask.len() > MAX_BITMASK {
                return Err(WireError::Malformed);
            }
            Ok(BusMessage::Answer { bitmask })
        }
        other => Err(WireError::Kind(other)),
    }
}

/// A stream id and a number (not 0); the rest.
fn number(bytes: &[u8]) -> Result<(Number, &[u8]), WireError> {
    let (head, rest) = bytes.split_at_checked(16).ok_or(WireError::Malformed)?;
    let sender = u64::from_be_bytes(head[..8].try_into().expect("8 bytes"));
    let seq = u64::from_be_bytes(head[8..].try_into().expect("8 bytes"));
    if seq == 0 {
        return Err(WireError::Malformed);
    }
    Ok((Number { sender, seq }, rest))
}

/// A length byte and that many bytes; the rest.
fn short(bytes: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let (&n, rest) = bytes.split_first().ok_or(WireError::Malformed)?;
    rest.split_at_checked(usize::from(n))
        .ok_or(WireError::Malformed)
}

fn account_name(bytes: &[u8]) -> Result<&str, WireError> {
    if bytes.is_empty() || bytes.len() > MAX_ACCOUNT_LEN {
        return Err(WireError::Malformed);
    }
    std::str::from_utf8(bytes).map_err(|_| WireError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let p = publish("alice@example.com", &[0x05, 0x00, 0x80]);
        assert_eq!(&p[..4], &[1, b'P', 17, b'a']);
        assert_eq!(
            decode(&p),
            Ok(BusMessage::Publish {
                account: "alice@example.com",
                bitmask: &[0x05, 0x00, 0x80],
                number: None,
            })
        );
        let number = Number {
            sender: 0x0102_0304_0506_0708,
            seq: 9,
        };
        let n = numbered_publish(number, "a", &[0x10]);
        assert_eq!(
            &n[..],
            &[1, b'N', 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 9, 1, b'a', 1, 0x10]
        );
        assert_eq!(
            decode(&n),
            Ok(BusMessage::Publish {
                account: "a",
                bitmask: &[0x10],
                number: Some(number),
            })
        );
        let l = last(number);
        assert_eq!(
            &l[..],
            &[1, b'L', 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        assert_eq!(decode(&l), Ok(BusMessage::Last { number }));
        let q = question("a", 0x0102_0304);
        assert_eq!(&q[..], &[1, b'Q', 1, 2, 3, 4, 1, b'a']);
        assert_eq!(
            decode(&q),
            Ok(BusMessage::Question {
                account: "a",
                mark: 0x0102_0304
            })
        );
        assert_eq!(
            decode(&answer(&[])),
            Ok(BusMessage::Answer { bitmask: &[] })
        );
        assert_eq!(
            decode(&answer(&[0xFF; 32])),
            Ok(BusMessage::Answer {
                bitmask: &[0xFF; 32]
            })
        );
    }

    #[test]
    fn bad_payloads_are_errors() {
        let good = publish("a", &[1]);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.to_vec();
        longer.push(0);
        assert_eq!(decode(&longer), Err(WireError::Malformed));
        assert_eq!(decode(&[2, b'P']), Err(WireError::Version(2)));
        assert_eq!(decode(&[1, b'X']), Err(WireError::Kind(b'X')));
        assert_eq!(decode(&publish("a", &[0, 0])), Err(WireError::Malformed));
        assert_eq!(decode(&publish("", &[1])), Err(WireError::Malformed));
        assert_eq!(decode(&publish("a", &[1; 33])), Err(WireError::Malformed));
        assert_eq!(decode(&question("a", 0)), Err(WireError::Malformed));
        assert_eq!(decode(&[1, b'P', 1, 0xFF, 1, 1]), Err(WireError::Malformed));
        assert_eq!(decode(&answer(&[1; 33])), Err(WireError::Malformed));
        let number = Number { sender: 7, seq: 1 };
        let good = numbered_publish(number, "a", &[1]);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "numbered cut at {cut}");
        }
        let zero = numbered_publish(Number { sender: 7, seq: 0 }, "a", &[1]);
        assert_eq!(decode(&zero), Err(WireError::Malformed));
        let good = last(number);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "last cut at {cut}");
        }
        let mut longer = good.to_vec();
        longer.push(0);
        assert_eq!(decode(&longer), Err(WireError::Malformed));
        let zero = last(Number { sender: 7, seq: 0 });
        assert_eq!(decode(&zero), Err(WireError::Malformed));
    }
}
