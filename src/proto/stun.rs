//! The STUN Binding responder that shares the node's UDP port with MPP
//! (docs/PROTOCOL.md §8), plus the per-source rate limiter that keeps it from being
//! an amplifier (docs/PROTOCOL.md §7).
//!
//! It exists so that stock STUN clients and ICE agents can learn their
//! server-reflexive address from any node without a separate STUN server. It
//! is a STUN server for Binding requests with no authentication, answering as
//! RFC 8489 §6.3 requires, error responses included, with every answer no
//! larger than [`MAX_RESPONSE_LEN`] bytes; the caller must pass every request
//! through a [`SourceRateLimiter`] first. `request` decides what a datagram
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

use std::net::{IpAddr, SocketAddr};

use crate::time::UnixMillis;

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
/// rate limiting (docs/PROTOCOL.md §7, [`SourceRateLimiter`]).
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

/// Default number of buckets of a [`SourceRateLimiter`].
pub const DEFAULT_BUCKETS: usize = 4096;
/// Most buckets a [`SourceRateLimiter`] will allocate (8 MiB of state).
pub const MAX_BUCKETS: usize = 1 << 20;
/// Token amounts are kept in thousandths of a token, so a refill of
/// `elapsed_ms × rate_per_sec` thousandths is exact.
const MILLI_TOKENS: u32 = 1000;
/// Bucket timestamps are milliseconds since an epoch held by the limiter; once
/// that offset reaches this value every bucket is brought up to date and the
/// epoch moves to now, so the offsets always fit in a `u32`.
const REBASE_AFTER_MS: u64 = 1 << 31;

/// One token bucket: 8 bytes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens available, in thousandths of a token.
    milli_tokens: u32,
    /// Time of the last refill, in milliseconds since the limiter's epoch.
    last_ms: u32,
}

impl Bucket {
    /// Adds the tokens earned up to `now_ms` (since the epoch), capped at `cap`.
    fn refill(&mut self, now_ms: u64, rate_per_sec: u32, cap: u32) {
        let elapsed = now_ms.saturating_sub(u64::from(self.last_ms));
        // tokens/s is the same number as thousandths of a token per ms.
        let earned = elapsed.saturating_mul(u64::from(rate_per_sec));
        let total = u64::from(self.milli_tokens).saturating_add(earned);
        self.milli_tokens = total.min(u64::from(cap)) as u32;
    }
}

/// Per-source-address token buckets in fixed memory, for the rate limit on
/// unauthenticated answers (docs/PROTOCOL.md §7), STUN Binding responses first.
///
/// Buckets are found by a keyed hash (random keys per limiter) of the source:
/// an IPv4 address, or the /64 prefix of an IPv6 address, since one host
/// usually holds a whole /64 and a spoofer could otherwise cycle through it.
/// Sources whose hashes collide share a bucket, which can only make the limit
/// stricter for them; memory never grows with the number of sources.
pub struct SourceRateLimiter {
    /// The buckets; the length is a power of two.
    buckets: Box<[Bucket]>,
    /// Keys of the hash from source to bucket.
    hasher: ahash::RandomState,
    /// Tokens added per second; 0 means unlimited.
    rate_per_sec: u32,
    /// Bucket capacity in thousandths of a token.
    cap: u32,
    /// Origin of the bucket timestamps, set on the first call.
    epoch: Option<UnixMillis>,
    /// From this time on every bucket holds at least one token: a token
    /// taken at `t` leaves its bucket at ≥ 0 and one token's refill time
    /// later it holds ≥ 1 again. Lets [`has_token`](Self::has_token), which
    /// a node asks for every packet, answer without hashing the source while
    /// nothing has been charged lately.
    every_bucket_has_token_from: UnixMillis,
}

impl SourceRateLimiter {
    /// A limiter allowing each source `burst` answers at once and `rate_per_sec`
    /// more per second, with `buckets` buckets (rounded up to a power of two,
    /// at least 1 and at most [`MAX_BUCKETS`]; [`DEFAULT_BUCKETS`] is a good
    /// size). `burst` is at least 1 and at most 4 294 967.
    ///
    /// `rate_per_sec == 0` means unlimited: every call to
    /// [`allow`](Self::allow) says yes. That is meant for benchmarks and load
    /// tests only; a node facing the Internet must set a rate.
    pub fn new(rate_per_sec: u32, burst: u32, buckets: usize) -> Self {
        // Clamped first, so the rounding cannot overflow.
        let n = buckets.clamp(1, MAX_BUCKETS).next_power_of_two();
        let cap = burst.clamp(1, u32::MAX / MILLI_TOKENS) * MILLI_TOKENS;
        let full = Bucket {
            milli_tokens: cap,
            last_ms: 0,
        };
        SourceRateLimiter {
            buckets: vec![full; if rate_per_sec == 0 { 1 } else { n }].into_boxed_slice(),
            hasher: ahash::RandomState::new(),
            rate_per_sec,
            cap,
            epoch: None,
            every_bucket_has_token_from: UnixMillis(0),
        }
    }

    /// Whether `ip` may be answered at `now`: refills its bucket for the time
    /// elapsed (up to the burst) and takes one token if there is one.
    pub fn allow(&mut self, now: UnixMillis, ip: IpAddr) -> bool {
        let refill_ms = u64::from(MILLI_TOKENS.div_ceil(self.rate_per_sec.max(1)));
        match self.bucket_at(now, ip) {
            None => true,
            Some(bucket) if bucket.milli_tokens >= MILLI_TOKENS => {
                bucket.milli_tokens -= MILLI_TOKENS;
                let full_again = now.plus_millis(refill_ms);
                if full_again > self.every_bucket_has_token_from {
                    self.every_bucket_has_token_from = full_again;
                }
                true
            }
            Some(_) => false,
        }
    }

    /// Whether `ip` has a token at `now`, without taking it: for limits
    /// that only charge what went wrong (a failed authentication).
    pub fn has_token(&mut self, now: UnixMillis, ip: IpAddr) -> bool {
        if now >= self.every_bucket_has_token_from {
            return true;
        }
        self.bucket_at(now, ip)
            .is_none_or(|bucket| bucket.milli_tokens >= MILLI_TOKENS)
    }

    /// `ip`'s bucket refilled up to `now`; `None` when unlimited.
    fn bucket_at(&mut self, now: UnixMillis, ip: IpAddr) -> Option<&mut Bucket> {
        if self.rate_per_sec == 0 {
            return None;
        }
        let epoch = *self.epoch.get_or_insert(now);
        let mut now_ms = now.millis_since(epoch);
        if now_ms >= REBASE_AFTER_MS {
            self.rebase(now, now_ms);
            now_ms = 0;
        }
        let (rate, cap) = (self.rate_per_sec, self.cap);
        let i = self.bucket_index(ip);
        let bucket = &mut self.buckets[i];
        bucket.refill(now_ms, rate, cap);
        // now_ms < REBASE_AFTER_MS < 2^32 here; never move a bucket's clock back.
        bucket.last_ms = bucket.last_ms.max(now_ms as u32);
        Some(bucket)
    }

    /// Brings every bucket up to `now` (`now_ms` after the old epoch) and makes
    /// `now` the epoch. Refilling in two steps gives the same tokens as in one.
    fn rebase(&mut self, now: UnixMillis, now_ms: u64) {
        let (rate, cap) = (self.rate_per_sec, self.cap);
        for bucket in self.buckets.iter_mut() {
            bucket.refill(now_ms, rate, cap);
            bucket.last_ms = 0;
        }
        self.epoch = Some(now);
    }

    /// The bucket of a source: IPv4 address or IPv6 /64, canonicalised so an
    /// IPv4-mapped IPv6 address shares the bucket of its IPv4 address.
    fn bucket_index(&self, ip: IpAddr) -> usize {
        let key: (u8, u64) = match ip.to_canonical() {
            IpAddr::V4(v4) => (4, u64::from(u32::from(v4))),
            IpAddr::V6(v6) => (6, (u128::from(v6) >> 64) as u64),
        };
        (self.hasher.hash_one(key) as usize) & (self.buckets.len() - 1)
    }
}

impl std::fmt::Debug for SourceRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRateLimiter")
            .field("rate_per_sec", &self.rate_per_sec)
            .field("burst", &(self.cap / MILLI_TOKENS))
            .field("buckets", &self.buckets.len())
            .finish_non_exhaustive()
    }
}
