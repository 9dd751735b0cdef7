//! Writing the three answers a Binding request can get (RFC 8489 §6.3.1.1):
//! the success response with XOR-MAPPED-ADDRESS, the 420 (Unknown
//! Attribute) error response with UNKNOWN-ATTRIBUTES, and the 400 (Bad
//! Request) error response, each with the request's transaction id and,
//! when asked, a FINGERPRINT.
//!
//! It exists to keep every answer within the amplification bound of
//! docs/PROTOCOL.md §7.6: nothing written here is longer than
//! [`MAX_RESPONSE_LEN`]. The one answer that could grow, the 420, gives up
//! its reason phrase and then the tail of its list to stay within it. It
//! must not decide which answer a request gets (that is `request`), and it
//! must not allocate or panic: a short output buffer is an error.

use std::net::{IpAddr, SocketAddr};

use super::fingerprint::fingerprint;
use super::request::UnknownAttributes;
use super::{
    StunError, ATTR_FINGERPRINT, ATTR_HEADER_LEN, FINGERPRINT_ATTR_LEN, FINGERPRINT_VALUE_LEN,
    HEADER_LEN, MAGIC_COOKIE, MAX_RESPONSE_LEN,
};

/// Message type of a Binding success response (RFC 8489 §5, §18.2).
const BINDING_SUCCESS_RESPONSE: u16 = 0x0101;
/// Message type of a Binding error response (RFC 8489 §5, §18.2).
const BINDING_ERROR_RESPONSE: u16 = 0x0111;

/// XOR-MAPPED-ADDRESS (RFC 8489 §14.2, §18.3.1).
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// ERROR-CODE (RFC 8489 §14.8, §18.3.1).
const ATTR_ERROR_CODE: u16 = 0x0009;
/// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13, §18.3.1).
const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;

/// Address family of an IPv4 XOR-MAPPED-ADDRESS (RFC 8489 §14.1).
const FAMILY_IPV4: u8 = 0x01;
/// Address family of an IPv6 XOR-MAPPED-ADDRESS (RFC 8489 §14.1).
const FAMILY_IPV6: u8 = 0x02;

/// Length of the fixed part of an ERROR-CODE value: 21 reserved bits, the
/// class (hundreds digit) and the number (the rest), RFC 8489 §14.8.
const ERROR_CODE_FIXED_LEN: usize = 4;
/// Reason phrase of 420, the one IANA recommends (RFC 8489 §14.8).
pub(super) const REASON_UNKNOWN_ATTRIBUTE: &str = "Unknown Attribute";
/// Reason phrase of 400, the one IANA recommends (RFC 8489 §14.8).
pub(super) const REASON_BAD_REQUEST: &str = "Bad Request";

/// Writes the Binding success response to a request with transaction id
/// `txid` received from `from`; returns its length (32 to 52 bytes).
///
/// An IPv4-mapped IPv6 `from` (as seen on a dual-stack socket) is reported
/// as the IPv4 address it stands for, which is what the client sent from.
#[inline(always)]
pub(super) fn success(
    out: &mut [u8],
    txid: &[u8; 12],
    from: SocketAddr,
    with_fingerprint: bool,
) -> Result<usize, StunError> {
    let ip = from.ip().to_canonical();
    let xma_value_len = match ip {
        IpAddr::V4(_) => 8,
        IpAddr::V6(_) => 20,
    };
    let fp_len = if with_fingerprint {
        FINGERPRINT_ATTR_LEN
    } else {
        0
    };
    let total = HEADER_LEN + ATTR_HEADER_LEN + xma_value_len + fp_len;
    debug_assert!(total <= MAX_RESPONSE_LEN);
    let out = out.get_mut(..total).ok_or(StunError::BufferTooSmall)?;
    put_header(out, BINDING_SUCCESS_RESPONSE, txid);

    // XOR-MAPPED-ADDRESS (RFC 8489 §14.2): port XOR the cookie's top 16 bits,
    // address XOR the cookie (IPv4) or cookie ‖ transaction id (IPv6).
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let xma = &mut out[HEADER_LEN..HEADER_LEN + ATTR_HEADER_LEN + xma_value_len];
    put_attr_header(xma, ATTR_XOR_MAPPED_ADDRESS, xma_value_len);
    xma[4] = 0;
    let x_port = from.port() ^ (MAGIC_COOKIE >> 16) as u16;
    xma[6..8].copy_from_slice(&x_port.to_be_bytes());
    match ip {
        IpAddr::V4(v4) => {
            xma[5] = FAMILY_IPV4;
            let x = u32::from(v4) ^ MAGIC_COOKIE;
            xma[8..12].copy_from_slice(&x.to_be_bytes());
        }
        IpAddr::V6(v6) => {
            xma[5] = FAMILY_IPV6;
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&cookie);
            key[4..].copy_from_slice(txid);
            let x = u128::from(v6) ^ u128::from_be_bytes(key);
            xma[8..24].copy_from_slice(&x.to_be_bytes());
        }
    }
    if with_fingerprint {
        put_fingerprint(out);
    }
    Ok(total)
}

/// Writes the 420 (Unknown Attribute) Binding error response listing
/// `unknown`; returns its length (at most [`MAX_RESPONSE_LEN`]).
///
/// The list comes whole with the reason phrase "Unknown Attribute" when both
/// fit in [`MAX_RESPONSE_LEN`]: up to 6 types, or 2 with a FINGERPRINT.
/// Otherwise the reason phrase is left empty, which makes room for 16 types
/// (12 with a FINGERPRINT), and a longer list is cut to its first ones:
/// RFC 8489 §14.8 wants each unknown type listed (a MUST) and only a
/// suitable reason phrase (a SHOULD), and the bound comes first.
pub(super) fn unknown_attributes(
    out: &mut [u8],
    txid: &[u8; 12],
    unknown: &UnknownAttributes,
    with_fingerprint: bool,
) -> Result<usize, StunError> {
    let (reason, listed) = layout_420(
        unknown.as_slice().len(),
        unknown.overflowed(),
        with_fingerprint,
    );
    let types = &unknown.as_slice()[..listed];
    let ua_value_len = 2 * types.len();
    let ec_total = ATTR_HEADER_LEN + ERROR_CODE_FIXED_LEN + reason.len().next_multiple_of(4);
    let fp_len = if with_fingerprint {
        FINGERPRINT_ATTR_LEN
    } else {
        0
    };
    let total = HEADER_LEN + ec_total + ATTR_HEADER_LEN + ua_value_len.next_multiple_of(4) + fp_len;
    debug_assert!(total <= MAX_RESPONSE_LEN);
    let out = out.get_mut(..total).ok_or(StunError::BufferTooSmall)?;
    put_header(out, BINDING_ERROR_RESPONSE, txid);
    put_error_code(&mut out[HEADER_LEN..HEADER_LEN + ec_total], 420, reason);

    // UNKNOWN-ATTRIBUTES (§14.13): 16-bit types, padded with zeros as any
    // attribute is (not by repeating the last type, as RFC 3489 did).
    let ua = &mut out[HEADER_LEN + ec_total..total - fp_len];
    put_attr_header(ua, ATTR_UNKNOWN_ATTRIBUTES, ua_value_len);
    let (values, padding) = ua[ATTR_HEADER_LEN..].split_at_mut(ua_value_len);
    for (o, kind) in values.chunks_exact_mut(2).zip(types) {
        o.copy_from_slice(&kind.to_be_bytes());
    }
    padding.fill(0);
    if with_fingerprint {
        put_fingerprint(out);
    }
    Ok(total)
}

/// The reason phrase of a 420 listing `n` distinct types (`overflowed`:
/// more came than were kept) and how many of them fit in
/// [`MAX_RESPONSE_LEN`] (see [`unknown_attributes`]).
pub(super) fn layout_420(
    n: usize,
    overflowed: bool,
    with_fingerprint: bool,
) -> (&'static str, usize) {
    let fp_len = if with_fingerprint {
        FINGERPRINT_ATTR_LEN
    } else {
        0
    };
    // Room for the reason phrase and the list's values, both padded.
    let room = MAX_RESPONSE_LEN
        - HEADER_LEN
        - fp_len
        - (ATTR_HEADER_LEN + ERROR_CODE_FIXED_LEN)
        - ATTR_HEADER_LEN;
    let phrase = REASON_UNKNOWN_ATTRIBUTE.len().next_multiple_of(4);
    if !overflowed && phrase + (2 * n).next_multiple_of(4) <= room {
        (REASON_UNKNOWN_ATTRIBUTE, n)
    } else {
        ("", n.min(room / 2))
    }
}

/// Writes the 400 (Bad Request) Binding error response; returns its length
/// (40 bytes). It never carries a FINGERPRINT: the request's attributes
/// could not be read, so whether it had one is unknown.
pub(super) fn bad_request(out: &mut [u8], txid: &[u8; 12]) -> Result<usize, StunError> {
    let ec_total =
        ATTR_HEADER_LEN + ERROR_CODE_FIXED_LEN + REASON_BAD_REQUEST.len().next_multiple_of(4);
    let total = HEADER_LEN + ec_total;
    let out = out.get_mut(..total).ok_or(StunError::BufferTooSmall)?;
    put_header(out, BINDING_ERROR_RESPONSE, txid);
    put_error_code(&mut out[HEADER_LEN..], 400, REASON_BAD_REQUEST);
    Ok(total)
}

/// The STUN header (RFC 8489 §5) at the start of `out`, which is the whole
/// message: type, length of everything after the header, magic cookie, the
/// request's transaction id.
#[inline(always)]
fn put_header(out: &mut [u8], message_type: u16, txid: &[u8; 12]) {
    let body_len = (out.len() - HEADER_LEN) as u16;
    out[0..2].copy_from_slice(&message_type.to_be_bytes());
    out[2..4].copy_from_slice(&body_len.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..20].copy_from_slice(txid);
}

/// Type and value length at the start of `attr` (RFC 8489 §14).
#[inline(always)]
fn put_attr_header(attr: &mut [u8], kind: u16, value_len: usize) {
    attr[0..2].copy_from_slice(&kind.to_be_bytes());
    attr[2..4].copy_from_slice(&(value_len as u16).to_be_bytes());
}

/// An ERROR-CODE attribute (RFC 8489 §14.8) filling `attr`: reserved bits
/// zero, class (3 to 6) and number (0 to 99), the reason phrase padded with
/// zeros.
fn put_error_code(attr: &mut [u8], code: u16, reason: &str) {
    debug_assert!((300..700).contains(&code));
    put_attr_header(attr, ATTR_ERROR_CODE, ERROR_CODE_FIXED_LEN + reason.len());
    attr[4..6].fill(0);
    attr[6] = (code / 100) as u8;
    attr[7] = (code % 100) as u8;
    let (phrase, padding) = attr[8..].split_at_mut(reason.len());
    phrase.copy_from_slice(reason.as_bytes());
    padding.fill(0);
}

/// FINGERPRINT (RFC 8489 §14.7) in the last 8 bytes of `out`, which is the
/// whole message with its length field already counting the attribute.
#[inline(always)]
fn put_fingerprint(out: &mut [u8]) {
    let at = out.len() - FINGERPRINT_ATTR_LEN;
    let fp = fingerprint(&out[..at]);
    put_attr_header(&mut out[at..], ATTR_FINGERPRINT, FINGERPRINT_VALUE_LEN);
    out[at + ATTR_HEADER_LEN..].copy_from_slice(&fp.to_be_bytes());
}
