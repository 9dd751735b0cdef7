//! The STUN Binding responder that shares the node's UDP port with MPP
//! (docs/PROTOCOL.md §8), plus the per-source rate limiter that keeps it from being
//! an amplifier (docs/PROTOCOL.md §7).
//!
//! It exists so that stock STUN clients and ICE agents can learn their
//! server-reflexive address from any node without a separate STUN server. It
//! is a STUN server for Binding requests with no authentication, answering as
//! RFC 8489 §6.3 requires, error responses included, with every answer no
//! larger than [`MAX_RESPONSE_LEN`] bytes; the caller must pass every request
//! through a [`super::limit::RateLimiter`] first. `request` decides what a datagram
//! gets, `response` writes it, `fingerprint` is the CRC both need.
//!
//! It must not do I/O or read the clock (time comes in as [`UnixMillis`]), must
//! not allocate per datagram, must keep no state per request (Binding is
//! idempotent, so a retransmission is answered by answering it again,
//! §6.3.1), and must never panic on any input: a datagram that gets no answer
//! is a [`StunError`].
//!
//! # RFC 8489 checklist
//!
//! Every MUST of §6.3 that applies to a server answering Binding requests over
//! UDP with no authentication configured, and the rules of §5, §9 and §14 it
//! relies on; SHOULDs where we chose. Tests are in `stun/tests.rs` unless
//! named with a file.
//!
//! | RFC 8489 | rule | what we do | test |
//! | --- | --- | --- | --- |
//! | §5, §6.3 | the first two bits MUST be 0 | otherwise not STUN ([`is_stun`]: an MPP packet, docs/PROTOCOL.md §8.1) | `is_stun_rules`, `header_checks` |
//! | §5, §6.3 | the magic cookie MUST be `0x2112A442` | otherwise not STUN (same) | `is_stun_rules`, `header_checks` |
//! | §5, §6.3 | the length MUST count the bytes after the header, a multiple of 4; "the message length is sensible" | a length that is not a multiple of 4 or does not end at the end of the datagram: silently discarded ([`StunError::Malformed`]) | `length_must_be_sensible` |
//! | §6.3 | the method must be supported and the class allowed for it, else silently discarded | only method Binding: a request of any other method (Shared Secret, Allocate, ...) is discarded ([`StunError::NotBindingRequest`]) | `only_binding_requests_are_answered` |
//! | §6.3 | a success or error response must match a transaction in progress, else silently discarded | the node sends no STUN requests: every response is discarded ([`StunError::NotBindingRequest`]) | `only_binding_requests_are_answered` |
//! | §6.3.2 | no response is generated for an indication (one with unknown comprehension-required attributes is discarded) | a Binding indication is never answered ([`StunError::Indication`]); processing it is nothing | `only_binding_requests_are_answered` |
//! | §14 | each attribute MUST be TLV encoded and end on a 32-bit boundary; its length is the value's, before padding | the walk steps over value and padding; an attribute that runs past the end: 400 Bad Request (the header passed every check that §6.3 answers with silence; 400 is "the request was malformed", §14.8) | `truncated_attribute_gets_400` |
//! | §14 | padding bits MUST be ignored by the receiver | not read | `padding_bytes_are_ignored` |
//! | §6.3, §7, §14.7 | a FINGERPRINT that is present MUST be correct (CRC-32 of the message before it, XOR `0x5354554E`), else silently discarded | discarded ([`StunError::BadFingerprint`]) | `bad_fingerprint_is_discarded`, `rfc5769_request_fingerprint_matches_our_crc` |
//! | §14.7 | FINGERPRINT, when present, MUST be the last attribute | one of another length, or followed by anything: discarded ([`StunError::BadFingerprint`]) | `fingerprint_must_be_last_and_four_bytes` |
//! | §12, §7 | a basic server MAY use FINGERPRINT but MUST NOT require it | a request without it is answered | `ipv4_without_fingerprint`, `ipv6_without_fingerprint` |
//! | §7, §14.7 | (usage: FINGERPRINT in what we send when the peer uses it) | every response, success or 420, to a request with a FINGERPRINT ends with one, computed with the length field counting it; none otherwise; a 400 has none (its request could not be read) | `ipv4_with_fingerprint`, `unknown_attribute_gets_420`, `truncated_attribute_gets_400` |
//! | §6.3 | unknown comprehension-optional attributes (0x8000–0xFFFF) MUST be ignored | ignored | `comprehension_optional_attributes_are_ignored` |
//! | §6.3 | known-but-unexpected attributes SHOULD be ignored | ignored: every comprehension-required type RFC 8489 defines (USERNAME, USERHASH, MESSAGE-INTEGRITY(-SHA256), REALM, NONCE, PASSWORD-ALGORITHM, MAPPED-ADDRESS, XOR-MAPPED-ADDRESS, ERROR-CODE, UNKNOWN-ATTRIBUTES) | `known_but_unexpected_attributes_are_ignored` |
//! | §6.3.1 | unknown comprehension-required attributes (0x0000–0x7FFF not in RFC 8489, the reserved RFC 3489 types such as CHANGE-REQUEST, and other documents' such as ICE's PRIORITY) get a 420 error response with UNKNOWN-ATTRIBUTES listing them | 420, each type once, in order of first appearance | `unknown_attribute_gets_420`, `duplicate_unknown_attributes_are_listed_once`, `rfc5769_request_gets_420_for_priority` |
//! | §14.8 | 420: the server MUST put the unknown attribute in UNKNOWN-ATTRIBUTES | all of them when they fit in [`MAX_RESPONSE_LEN`] (see the last line) | `many_unknown_attributes_stay_within_64_bytes` |
//! | §9, §9.1.3, §9.2 | authentication is used only when the usage says so; a server with none configured has no §9 checks to run (no 400 or 401 from §9) | a request with USERNAME, MESSAGE-INTEGRITY(-SHA256), REALM, NONCE, USERHASH is answered as one without them, and the answer carries no MESSAGE-INTEGRITY (docs/PROTOCOL.md **D26**) | `authentication_attributes_are_ignored`, `rfc5769_request_gets_420_for_priority` |
//! | §9 | agents MUST ignore all attributes after MESSAGE-INTEGRITY but MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, and after MESSAGE-INTEGRITY-SHA256 all but FINGERPRINT | ignored: an unknown comprehension-required attribute there gets no 420; the FINGERPRINT there is still checked | `attributes_after_message_integrity_are_ignored` |
//! | §6.3.1 | responses to retransmissions: recomputing the answer is allowed only for idempotent requests; Binding is one | no state: the same request gets the same bytes | `a_retransmission_gets_the_same_answer` |
//! | §5, §6.3.1.1 | the response has the request's method and class success or error response, and MUST carry the request's transaction id | type `0x0101` or `0x0111`, the transaction id copied | `decode` in every answered test, `error_responses_echo_the_transaction_id` |
//! | §6.3.1.1, §14.8 | an error response MUST carry ERROR-CODE: class 3–6, number 0–99, a UTF-8 reason phrase of fewer than 128 characters that SHOULD suit the code | `04 14` "Unknown Attribute", `04 00` "Bad Request"; reserved bits and padding zero | `error_code_encoding` |
//! | §14.13 | UNKNOWN-ATTRIBUTES only in a 420, with the normal padding | only there; zero padding | `unknown_attribute_gets_420`, `decode` |
//! | §6.3.1.1, §14.2 | the success response carries XOR-MAPPED-ADDRESS, the request's source address and port: port XOR the cookie's top half, IPv4 address XOR the cookie, IPv6 address XOR cookie ‖ transaction id; first byte 0 | as written (an IPv4-mapped source as IPv4) | `ipv4_without_fingerprint` (RFC 5769 §2.2), `ipv6_without_fingerprint` (§2.3), `ipv4_mapped_source_is_answered_as_ipv4`, `other_transaction_ids_and_ports`, `tests/stun_interop.rs` |
//! | §6.3.1.2 | over UDP the response goes to the request's source, from the address it came to | the caller sends to `from` on the socket it read from | `tests/stun_port_sharing.rs`, `tests/stun_interop.rs` |
//! | §6.3.1.1, §14.14 | the server SHOULD add SOFTWARE | not added: no bytes to spare under the bound, none on the hot path, and no version to tell an attacker (§16.1.2) | `decode` (no attribute but those listed) |
//! | §6.1 | messages over UDP SHOULD be smaller than the path MTU | at most 64 bytes | every test |
//! | docs/PROTOCOL.md §7.6 | one answer of at most 64 bytes per request, rate-limited per source | success 32 (IPv4), 44 (IPv6), +8 with FINGERPRINT; 400 is 40; 420 at most 64: its reason phrase is dropped, then the list cut to its first 16 types (12 with FINGERPRINT), when it would not fit | `many_unknown_attributes_stay_within_64_bytes`, `layout_420_tiers`, `prop_no_panic_and_bounded`, `prop_mutated_requests_stay_bounded`, `tests/stun_port_sharing.rs` |
//!
//! Left out on purpose: RFC 3489 clients (§11, optional) send no magic cookie,
//! which on this port makes their datagrams MPP packets; the §12 basic server's
//! TCP transport (this is a UDP port).

use std::net::SocketAddr;

mod fingerprint;
mod request;
mod response;
#[cfg(test)]
mod tests;

/// The magic cookie in bytes 4..8 of every STUN message (RFC 8489 §5, docs/PROTOCOL.md §8).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the fixed STUN header (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;
/// Largest answer this module writes: the amplification bound of
/// docs/PROTOCOL.md §7.6. A success response is at most 52 bytes (IPv6 with
/// FINGERPRINT), a 400 is 40, a 420 is cut to fit.
pub const MAX_RESPONSE_LEN: usize = 64;

/// Message type of a Binding request: method 0x001, class request (RFC 8489 §5, §18.2).
const BINDING_REQUEST: u16 = 0x0001;
/// Message type of a Binding indication (RFC 8489 §5, §18.2).
const BINDING_INDICATION: u16 = 0x0011;

/// Attribute header: type and length, two bytes each (RFC 8489 §14).
const ATTR_HEADER_LEN: usize = 4;
/// MESSAGE-INTEGRITY (RFC 8489 §14.5, §18.3.1).
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
/// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6, §18.3.1).
const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
/// FINGERPRINT (RFC 8489 §14.7, §18.3.2).
const ATTR_FINGERPRINT: u16 = 0x8028;
/// Value length of FINGERPRINT: one CRC-32 (RFC 8489 §14.7).
const FINGERPRINT_VALUE_LEN: usize = 4;
/// Whole FINGERPRINT attribute, header included.
const FINGERPRINT_ATTR_LEN: usize = ATTR_HEADER_LEN + FINGERPRINT_VALUE_LEN;

/// Why a datagram that looks like STUN gets no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Not a STUN message: too short, first two bits not zero, or no magic cookie.
    #[error("not a STUN message")]
    NotStun,
    /// A STUN message, but not a Binding request or indication: another
    /// method, or a response (RFC 8489 §6.3: silently discarded).
    #[error("not a STUN Binding request")]
    NotBindingRequest,
    /// A Binding indication: processed, which is nothing, and never answered
    /// (RFC 8489 §6.3.2).
    #[error("STUN Binding indication (never answered)")]
    Indication,
    /// The length field is not a multiple of 4 or does not match the
    /// datagram (RFC 8489 §5, §6.3: silently discarded).
    #[error("STUN message length does not match the datagram")]
    Malformed,
    /// A FINGERPRINT that does not verify, is not 4 bytes long, or is not
    /// the last attribute (RFC 8489 §6.3, §14.7: silently discarded).
    #[error("STUN FINGERPRINT does not verify")]
    BadFingerprint,
    /// The output buffer cannot hold the answer.
    #[error("buffer too small for the STUN response")]
    BufferTooSmall,
}

/// Whether `datagram` is STUN rather than MPP (docs/PROTOCOL.md §8): at least a
/// header long, first two bits zero, magic cookie in bytes 4..8 (RFC 8489 §5).
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN
        && datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// Checks `request`, received from `from`, as RFC 8489 §6.3 says and writes
/// its answer into `out`, returning the answer's length (at most
/// [`MAX_RESPONSE_LEN`]), or says why it gets none.
///
/// A Binding request is answered with a Binding success response carrying
/// an XOR-MAPPED-ADDRESS of `from` (an IPv4-mapped IPv6 `from`, as seen on a
/// dual-stack socket, as the IPv4 address it stands for), with a 420 error
/// response if it carries unknown comprehension-required attributes, or
/// with a 400 if its attributes are not well-formed. Every answer echoes the
/// transaction id and, if the request carried a FINGERPRINT, ends with one.
/// The module documentation lists each rule. The caller is responsible for
/// rate limiting (docs/PROTOCOL.md §7, [`super::limit::RateLimiter`]).
pub fn binding_response(
    request: &[u8],
    from: SocketAddr,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let checked = request::check(request)?;
    // `check` made sure of the header; this cannot fail.
    let txid: &[u8; 12] = request[8..HEADER_LEN]
        .try_into()
        .map_err(|_| StunError::NotStun)?;
    match checked.answer {
        request::Answer::Success => response::success(out, txid, from, checked.fingerprint),
        answer => error_response(request, answer, checked.fingerprint, out),
    }
}

/// The 420 or 400 answer to `request`: out of the success path, which stays
/// small.
#[cold]
#[inline(never)]
fn error_response(
    request: &[u8],
    answer: request::Answer,
    with_fingerprint: bool,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let txid: &[u8; 12] = request
        .get(8..HEADER_LEN)
        .and_then(|t| t.try_into().ok())
        .ok_or(StunError::NotStun)?;
    match answer {
        request::Answer::UnknownAttributes => {
            let unknown = request::unknown_attributes(request);
            response::unknown_attributes(out, txid, &unknown, with_fingerprint)
        }
        _ => response::bad_request(out, txid),
    }
}
