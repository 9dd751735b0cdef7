//! Reading a datagram that looks like STUN: which of the outcomes of
//! RFC 8489 §6.3 it gets (a success response, a 420 or 400 error response,
//! or silence), following the order of §6.3: the header rules of §5, the
//! method and class, the FINGERPRINT check, then the attributes.
//!
//! It exists so that the decision is made in one place and the response
//! writer only writes. It must not write anything, allocate, or panic on
//! any input; every index is checked. The success path of a Binding request
//! without attributes is the hot path: it reads the header and does not
//! enter the attribute walk.

use super::fingerprint::fingerprint;
use super::{
    is_stun, StunError, ATTR_FINGERPRINT, ATTR_HEADER_LEN, ATTR_MESSAGE_INTEGRITY,
    ATTR_MESSAGE_INTEGRITY_SHA256, BINDING_INDICATION, BINDING_REQUEST, FINGERPRINT_VALUE_LEN,
    HEADER_LEN,
};

/// First comprehension-optional attribute type (RFC 8489 §14): types below it
/// are comprehension-required.
const COMPREHENSION_OPTIONAL: u16 = 0x8000;

/// The comprehension-required attribute types RFC 8489 defines (§18.3.1),
/// one bit per type, all below 0x40: MAPPED-ADDRESS 0x0001, USERNAME 0x0006,
/// MESSAGE-INTEGRITY 0x0008, ERROR-CODE 0x0009, UNKNOWN-ATTRIBUTES 0x000A,
/// REALM 0x0014, NONCE 0x0015, MESSAGE-INTEGRITY-SHA256 0x001C,
/// PASSWORD-ALGORITHM 0x001D, USERHASH 0x001E, XOR-MAPPED-ADDRESS 0x0020.
/// In a Binding request to a server with no authentication they are all
/// known but unexpected, and ignored (§6.3). The types RFC 8489 lists as
/// reserved (0x0000, and RFC 3489's 0x0002–0x0005, 0x0007, 0x000B, such as
/// CHANGE-REQUEST 0x0003) are not understood, and neither is any type
/// registered by another document (ICE's PRIORITY 0x0024, USE-CANDIDATE
/// 0x0025, ...).
const KNOWN_REQUIRED: u64 = 1 << 0x0001
    | 1 << 0x0006
    | 1 << 0x0008
    | 1 << 0x0009
    | 1 << 0x000A
    | 1 << 0x0014
    | 1 << 0x0015
    | 1 << 0x001C
    | 1 << 0x001D
    | 1 << 0x001E
    | 1 << 0x0020;

/// Most unknown attribute types [`UnknownAttributes`] keeps: as many as an
/// error response of [`MAX_RESPONSE_LEN`](super::MAX_RESPONSE_LEN) bytes
/// can list (no FINGERPRINT, no reason phrase: 64 − 20 − 8 − 4 = 32 bytes).
pub(super) const MAX_UNKNOWN: usize = 16;

/// The answer a Binding request that passed the checks of RFC 8489 §6.3 gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Binding success response with XOR-MAPPED-ADDRESS (§6.3.1.1).
    Success,
    /// 420 (Unknown Attribute) listing the unknown comprehension-required
    /// attributes (§6.3.1); [`unknown_attributes`] lists them.
    UnknownAttributes,
    /// 400 (Bad Request): the attributes are not well-formed TLVs (§14, §14.8).
    BadRequest,
}

/// A request that gets an answer, and whether it carried a FINGERPRINT
/// (then so does the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Checked {
    /// Which response to write.
    pub(super) answer: Answer,
    /// The request ended with a FINGERPRINT that verified.
    pub(super) fingerprint: bool,
}

/// Checks `datagram` as RFC 8489 §6.3 says for a server with no
/// authentication: the answer it gets, or why it gets none.
#[inline(always)]
pub(super) fn check(datagram: &[u8]) -> Result<Checked, StunError> {
    // §6.3: first two bits, magic cookie (§5); is_stun also makes sure the
    // header is there.
    if !is_stun(datagram) {
        return Err(StunError::NotStun);
    }
    // A Binding request first: the hot path.
    if u16::from_be_bytes([datagram[0], datagram[1]]) != BINDING_REQUEST {
        return Err(not_a_request(datagram));
    }
    if !sensible_length(datagram) {
        return Err(StunError::Malformed);
    }
    // The common case, no attributes: nothing to walk.
    if datagram.len() == HEADER_LEN {
        return Ok(Checked {
            answer: Answer::Success,
            fingerprint: false,
        });
    }
    walk(datagram, |_| {})
}

/// §5: the length field counts the bytes after the header and is a multiple
/// of 4; over UDP the datagram is the message. Anything else is not a
/// "sensible" length (§6.3): silently discarded.
#[inline(always)]
fn sensible_length(datagram: &[u8]) -> bool {
    let declared = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    declared == datagram.len() - HEADER_LEN && declared % 4 == 0
}

/// Why a STUN message other than a Binding request gets no answer.
#[cold]
#[inline(never)]
fn not_a_request(datagram: &[u8]) -> StunError {
    if datagram.len() < HEADER_LEN || !sensible_length(datagram) {
        return StunError::Malformed;
    }
    if u16::from_be_bytes([datagram[0], datagram[1]]) == BINDING_INDICATION {
        // §6.3.2: an indication is processed and never answered; for the
        // Binding method processing is nothing, so its attributes need no
        // look (with or without unknown ones, the outcome is no response).
        return StunError::Indication;
    }
    // §6.3: a success or error response matches no transaction of ours
    // (the node sends no requests); any other method is not supported.
    StunError::NotBindingRequest
}

/// The unknown comprehension-required attribute types of a Binding request
/// that [`check`] answered with [`Answer::UnknownAttributes`]: each type
/// once, in the order of first appearance.
pub(super) fn unknown_attributes(request: &[u8]) -> UnknownAttributes {
    let mut list = UnknownAttributes::default();
    // The walk already succeeded once on these bytes (see `check`).
    let _ = walk(request, |kind| list.push(kind));
    list
}

/// Walks the attributes of a Binding request whose header passed `check`,
/// calling `on_unknown` for each unknown comprehension-required attribute.
#[inline(always)]
fn walk(request: &[u8], mut on_unknown: impl FnMut(u16)) -> Result<Checked, StunError> {
    let mut at = HEADER_LEN;
    let mut fingerprint_seen = false;
    let mut after_integrity = false;
    let mut unknown = false;
    while at < request.len() {
        // §14.7: FINGERPRINT, when present, MUST be the last attribute. One
        // that is not fails the FINGERPRINT check of §6.3: discarded.
        if fingerprint_seen {
            return Err(StunError::BadFingerprint);
        }
        // Attributes start on a multiple of 4 and the message length is one,
        // so the 4-byte header always fits; checked all the same.
        let Some(header) = request.get(at..at + ATTR_HEADER_LEN) else {
            return Ok(bad_request());
        };
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        // §14: the value is padded to a multiple of 4 bytes, and the padding
        // (whatever its bytes: the receiver ignores them) is part of the
        // message. An attribute that runs past the end makes the request
        // malformed: 400.
        let next = at + ATTR_HEADER_LEN + len.next_multiple_of(4);
        if next > request.len() {
            return Ok(bad_request());
        }
        match kind {
            ATTR_FINGERPRINT => {
                // §14.7: a 32-bit CRC over everything before the attribute,
                // with the length field as sent (it counts the FINGERPRINT).
                if len != FINGERPRINT_VALUE_LEN {
                    return Err(StunError::BadFingerprint);
                }
                let Some(&[a, b, c, d]) = request.get(at + ATTR_HEADER_LEN..next) else {
                    return Err(StunError::BadFingerprint);
                };
                if u32::from_be_bytes([a, b, c, d]) != fingerprint(&request[..at]) {
                    return Err(StunError::BadFingerprint);
                }
                fingerprint_seen = true;
            }
            // §9: everything after MESSAGE-INTEGRITY(-SHA256) but FINGERPRINT
            // is ignored.
            ATTR_MESSAGE_INTEGRITY | ATTR_MESSAGE_INTEGRITY_SHA256 => after_integrity = true,
            _ if after_integrity => {}
            // §6.3, §14: comprehension-optional attributes and known ones
            // are ignored; unknown comprehension-required ones get a 420.
            kind if kind < COMPREHENSION_OPTIONAL && !is_known_required(kind) => {
                unknown = true;
                on_unknown(kind);
            }
            _ => {}
        }
        at = next;
    }
    Ok(Checked {
        answer: if unknown {
            Answer::UnknownAttributes
        } else {
            Answer::Success
        },
        fingerprint: fingerprint_seen,
    })
}

/// The answer to a request whose attributes are not well-formed. Whether it
/// carried a FINGERPRINT cannot be told, so the answer carries none.
fn bad_request() -> Checked {
    Checked {
        answer: Answer::BadRequest,
        fingerprint: false,
    }
}

/// Whether `kind` (below 0x8000) is a comprehension-required attribute RFC
/// 8489 defines.
fn is_known_required(kind: u16) -> bool {
    kind < 64 && KNOWN_REQUIRED & (1 << kind) != 0
}

/// Distinct attribute types in order of first appearance, at most
/// [`MAX_UNKNOWN`] kept; no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct UnknownAttributes {
    /// The types; the first `len` are set.
    types: [u16; MAX_UNKNOWN],
    /// How many of `types` are set.
    len: usize,
    /// More distinct types came than were kept.
    overflowed: bool,
}

impl UnknownAttributes {
    /// Adds `kind` unless it is already listed (§14: only the first
    /// occurrence of an attribute needs processing).
    fn push(&mut self, kind: u16) {
        if self.as_slice().contains(&kind) {
            return;
        }
        match self.types.get_mut(self.len) {
            Some(slot) => {
                *slot = kind;
                self.len += 1;
            }
            None => self.overflowed = true,
        }
    }

    /// The types kept, in order of first appearance.
    pub(super) fn as_slice(&self) -> &[u16] {
        &self.types[..self.len]
    }

    /// Whether more distinct types came than [`MAX_UNKNOWN`].
    pub(super) fn overflowed(&self) -> bool {
        self.overflowed
    }
}
