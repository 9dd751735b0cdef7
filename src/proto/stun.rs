//! The STUN Binding responder that shares the node's UDP port with MPP
//! (docs/PROTOCOL.md §8), plus the per-source rate limiter that keeps it from being
//! an amplifier (docs/PROTOCOL.md §7).
//!
//! It exists so that stock STUN clients and ICE agents can learn their
//! server-reflexive address from any node without a separate STUN server. The
//! Binding response is the one answer the node gives to unauthenticated
//! traffic, so this module must stay small and strict: it answers only a
//! well-formed Binding request (RFC 8489 §6.3.1), with a response no larger than
//! [`MAX_RESPONSE_LEN`] bytes, and the caller must pass every request through a
//! [`SourceRateLimiter`] first.
//!
//! It must not do I/O or read the clock (time comes in as [`UnixMillis`]), must
//! not allocate per datagram, and must never panic on any input: every bad
//! datagram is a [`StunError`] and gets no answer.
//!
//! What it deliberately leaves out: we hold no STUN credentials, so a request
//! carrying USERNAME, MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 is refused
//! with [`StunError::AuthNotSupported`] and not answered: its sender expects
//! the authentication of RFC 8489 §9, which we cannot give, and an error
//! response would be one more unauthenticated answer. Other unknown
//! attributes, comprehension-required or not, are ignored rather than answered
//! with 420 (RFC 8489 §6.3.1.1). No SOFTWARE attribute is added to responses.

use std::net::{IpAddr, SocketAddr};

use crate::time::UnixMillis;

#[cfg(test)]
mod tests;

/// The magic cookie in bytes 4..8 of every STUN message (RFC 8489 §5, docs/PROTOCOL.md §8).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the fixed STUN header (RFC 8489 §5).
pub const HEADER_LEN: usize = 20;
/// Largest Binding response this module writes: the amplification bound of
/// docs/PROTOCOL.md §7. The largest actual response (IPv6 with FINGERPRINT) is
/// 20 + 24 + 8 = 52 bytes.
pub const MAX_RESPONSE_LEN: usize = 64;

/// Message type of a Binding request: method 0x001, class request (RFC 8489 §5, §18.2).
const BINDING_REQUEST: u16 = 0x0001;
/// Message type of a Binding success response (RFC 8489 §5, §18.2).
const BINDING_SUCCESS_RESPONSE: u16 = 0x0101;

/// Attribute header: type and length, two bytes each (RFC 8489 §14).
const ATTR_HEADER_LEN: usize = 4;
/// USERNAME (RFC 8489 §14.3, §18.3.1).
const ATTR_USERNAME: u16 = 0x0006;
/// MESSAGE-INTEGRITY (RFC 8489 §14.5, §18.3.1).
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
/// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6, §18.3.1).
const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
/// XOR-MAPPED-ADDRESS (RFC 8489 §14.2, §18.3.1).
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// FINGERPRINT (RFC 8489 §14.7, §18.3.2).
const ATTR_FINGERPRINT: u16 = 0x8028;
/// Value length of FINGERPRINT: one CRC-32 (RFC 8489 §14.7).
const FINGERPRINT_VALUE_LEN: usize = 4;
/// Whole FINGERPRINT attribute, header included.
const FINGERPRINT_ATTR_LEN: usize = ATTR_HEADER_LEN + FINGERPRINT_VALUE_LEN;
/// XORed into the CRC-32 to make FINGERPRINT (RFC 8489 §14.7: "STUN" in ASCII).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Address family of an IPv4 XOR-MAPPED-ADDRESS (RFC 8489 §14.1).
const FAMILY_IPV4: u8 = 0x01;
/// Address family of an IPv6 XOR-MAPPED-ADDRESS (RFC 8489 §14.1).
const FAMILY_IPV6: u8 = 0x02;

/// Why a datagram got no Binding response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Not a STUN message: too short, first two bits not zero, or no magic cookie.
    #[error("not a STUN message")]
    NotStun,
    /// A STUN message, but not a Binding request (another method or class).
    #[error("not a STUN Binding request")]
    NotBindingRequest,
    /// Length field wrong, or the attributes are not well-formed padded TLVs, or
    /// FINGERPRINT is not the last attribute or has the wrong length.
    #[error("malformed STUN message")]
    Malformed,
    /// The FINGERPRINT attribute does not match the message (RFC 8489 §14.7).
    #[error("STUN FINGERPRINT does not verify")]
    BadFingerprint,
    /// The request carries USERNAME or MESSAGE-INTEGRITY(-SHA256); this node holds
    /// no STUN credentials and does not answer authenticated requests.
    #[error("STUN authentication is not supported")]
    AuthNotSupported,
    /// The output buffer cannot hold the response.
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

/// Checks that `request` is a Binding request we answer and writes the Binding
/// success response for a request received from `from` into `out`, returning
/// its length (at most [`MAX_RESPONSE_LEN`]).
///
/// The response carries the request's transaction id, an XOR-MAPPED-ADDRESS of
/// `from` (RFC 8489 §14.2) and, if and only if the request had one, a
/// FINGERPRINT (RFC 8489 §14.7). An IPv4-mapped IPv6 `from` (as seen on a
/// dual-stack socket) is reported as the IPv4 address it stands for, which is
/// what the client sent from. The caller is responsible for rate limiting
/// (docs/PROTOCOL.md §7, [`SourceRateLimiter`]).
pub fn binding_response(
    request: &[u8],
    from: SocketAddr,
    out: &mut [u8],
) -> Result<usize, StunError> {
    let had_fingerprint = check_binding_request(request)?;

    let ip = from.ip().to_canonical();
    let xma_value_len = match ip {
        IpAddr::V4(_) => 8,
        IpAddr::V6(_) => 20,
    };
    let fp_len = if had_fingerprint {
        FINGERPRINT_ATTR_LEN
    } else {
        0
    };
    let total = HEADER_LEN + ATTR_HEADER_LEN + xma_value_len + fp_len;
    debug_assert!(total <= MAX_RESPONSE_LEN);
    let out = out.get_mut(..total).ok_or(StunError::BufferTooSmall)?;

    // Header (RFC 8489 §5): type, length of everything after the header,
    // magic cookie, the request's transaction id.
    let cookie = MAGIC_COOKIE.to_be_bytes();
    out[0..2].copy_from_slice(&BINDING_SUCCESS_RESPONSE.to_be_bytes());
    out[2..4].copy_from_slice(&((total - HEADER_LEN) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&cookie);
    out[8..20].copy_from_slice(&request[8..20]);

    // XOR-MAPPED-ADDRESS (RFC 8489 §14.2): port XOR the cookie's top 16 bits,
    // address XOR the cookie (IPv4) or cookie ‖ transaction id (IPv6).
    let xma = &mut out[HEADER_LEN..HEADER_LEN + ATTR_HEADER_LEN + xma_value_len];
    xma[0..2].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    xma[2..4].copy_from_slice(&(xma_value_len as u16).to_be_bytes());
    xma[4] = 0;
    let x_port = from.port() ^ (MAGIC_COOKIE >> 16) as u16;
    xma[6..8].copy_from_slice(&x_port.to_be_bytes());
    match ip {
        IpAddr::V4(v4) => {
            xma[5] = FAMILY_IPV4;
            for (o, (a, k)) in xma[8..12].iter_mut().zip(v4.octets().iter().zip(&cookie)) {
                *o = a ^ k;
            }
        }
        IpAddr::V6(v6) => {
            xma[5] = FAMILY_IPV6;
            let key = cookie.iter().chain(&request[8..20]);
            for (o, (a, k)) in xma[8..24].iter_mut().zip(v6.octets().iter().zip(key)) {
                *o = a ^ k;
            }
        }
    }

    // FINGERPRINT last, over everything before it with the length field
    // already counting it (RFC 8489 §14.7).
    if had_fingerprint {
        let at = total - FINGERPRINT_ATTR_LEN;
        let fp = fingerprint(&out[..at]);
        out[at..at + 2].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
        out[at + 2..at + 4].copy_from_slice(&(FINGERPRINT_VALUE_LEN as u16).to_be_bytes());
        out[at + 4..total].copy_from_slice(&fp.to_be_bytes());
    }
    Ok(total)
}

/// Validates a Binding request; returns whether it carried a FINGERPRINT.
fn check_binding_request(request: &[u8]) -> Result<bool, StunError> {
    if !is_stun(request) {
        return Err(StunError::NotStun);
    }
    if u16::from_be_bytes([request[0], request[1]]) != BINDING_REQUEST {
        return Err(StunError::NotBindingRequest);
    }
    // RFC 8489 §5: the length field counts the bytes after the header and is a
    // multiple of 4, since every attribute is padded to 4 bytes.
    let declared = usize::from(u16::from_be_bytes([request[2], request[3]]));
    if declared != request.len() - HEADER_LEN || declared % 4 != 0 {
        return Err(StunError::Malformed);
    }

    let mut wants_auth = false;
    let mut fingerprint_at = None;
    let mut at = HEADER_LEN;
    while at < request.len() {
        // RFC 8489 §15: FINGERPRINT, when present, is the last attribute.
        if fingerprint_at.is_some() {
            return Err(StunError::Malformed);
        }
        let header = request
            .get(at..at + ATTR_HEADER_LEN)
            .ok_or(StunError::Malformed)?;
        let kind = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        // RFC 8489 §14: the value is padded to a multiple of 4 bytes, and the
        // padding is part of the message.
        let next = at + ATTR_HEADER_LEN + len.next_multiple_of(4);
        if next > request.len() {
            return Err(StunError::Malformed);
        }
        match kind {
            ATTR_USERNAME | ATTR_MESSAGE_INTEGRITY | ATTR_MESSAGE_INTEGRITY_SHA256 => {
                wants_auth = true;
            }
            ATTR_FINGERPRINT => {
                if len != FINGERPRINT_VALUE_LEN {
                    return Err(StunError::Malformed);
                }
                fingerprint_at = Some(at);
            }
            // Everything else is ignored (see the module doc).
            _ => {}
        }
        at = next;
    }

    if let Some(fp_at) = fingerprint_at {
        // The value is the CRC over everything before the attribute, with the
        // length field as sent, which already counts the FINGERPRINT (§14.7).
        let value = &request[fp_at + ATTR_HEADER_LEN..fp_at + FINGERPRINT_ATTR_LEN];
        let sent = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
        if sent != fingerprint(&request[..fp_at]) {
            return Err(StunError::BadFingerprint);
        }
    }
    if wants_auth {
        return Err(StunError::AuthNotSupported);
    }
    Ok(fingerprint_at.is_some())
}

/// FINGERPRINT value of the message bytes before the attribute (RFC 8489 §14.7).
fn fingerprint(message: &[u8]) -> u32 {
    crc32(message) ^ FINGERPRINT_XOR
}

/// Lookup table of the reflected CRC-32 polynomial 0xEDB88320.
const CRC32_TABLE: [u32; 256] = crc32_table();

/// Builds [`CRC32_TABLE`] at compile time.
const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32/ISO-HDLC, the zlib and Ethernet CRC that FINGERPRINT uses (RFC 8489 §14.7).
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
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
