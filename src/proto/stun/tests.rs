//! Unit tests of the STUN responder, one or more per line of the RFC 8489
//! checklist in the module documentation, and of the source rate limiter.
//! Answers are decoded here without the module's code paths (except `crc32`,
//! itself checked against known values).

use super::fingerprint::{crc32, fingerprint};
use super::*;
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

/// RFC 5769 §2.1 sample request: SOFTWARE, PRIORITY, ICE-CONTROLLED,
/// USERNAME, MESSAGE-INTEGRITY, FINGERPRINT.
const RFC5769_REQUEST: [u8; 108] = [
    0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73,
    0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff,
    0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09,
    0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14,
    0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49,
    0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
];

/// Transaction id of the RFC 5769 samples.
const RFC5769_TXID: [u8; 12] = [
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
];

/// XOR-MAPPED-ADDRESS of 192.0.2.1:32853 in the RFC 5769 §2.2 sample response.
const RFC5769_XMA_V4: [u8; 12] = [
    0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43,
];

/// XOR-MAPPED-ADDRESS of [2001:db8:1234:5678:11:2233:4455:6677]:32853 in the
/// RFC 5769 §2.3 sample response.
const RFC5769_XMA_V6: [u8; 24] = [
    0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79,
    0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
];

/// Attribute types used below (RFC 8489 §18.3, RFC 8445 §16.1, RFC 5780 §9).
const MAPPED_ADDRESS: u16 = 0x0001;
const CHANGE_REQUEST: u16 = 0x0003;
const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const ERROR_CODE: u16 = 0x0009;
const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
const REALM: u16 = 0x0014;
const NONCE: u16 = 0x0015;
const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const PASSWORD_ALGORITHM: u16 = 0x001D;
const USERHASH: u16 = 0x001E;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const PRIORITY: u16 = 0x0024;
const USE_CANDIDATE: u16 = 0x0025;
const SOFTWARE: u16 = 0x8022;
const ALTERNATE_SERVER: u16 = 0x8023;
const FINGERPRINT: u16 = 0x8028;
const ICE_CONTROLLED: u16 = 0x8029;

fn rfc_v4() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), 32853)
}

fn rfc_v6() -> SocketAddr {
    let ip = Ipv6Addr::new(0x2001, 0xdb8, 0x1234, 0x5678, 0x11, 0x2233, 0x4455, 0x6677);
    SocketAddr::new(ip.into(), 32853)
}

/// A STUN message of type `kind` with the given attributes (values padded
/// here with `pad` bytes) and, optionally, a correct FINGERPRINT.
fn message_padded(
    kind: u16,
    txid: [u8; 12],
    attrs: &[(u16, &[u8])],
    with_fingerprint: bool,
    pad: u8,
) -> Vec<u8> {
    let mut m = kind.to_be_bytes().to_vec();
    m.extend_from_slice(&[0, 0, 0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&txid);
    for (kind, value) in attrs {
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(value.len() as u16).to_be_bytes());
        m.extend_from_slice(value);
        m.resize(m.len().next_multiple_of(4), pad);
    }
    let body = m.len() - 20 + if with_fingerprint { 8 } else { 0 };
    m[2..4].copy_from_slice(&(body as u16).to_be_bytes());
    if with_fingerprint {
        let fp = crc32(&m) ^ 0x5354_554E;
        m.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
        m.extend_from_slice(&fp.to_be_bytes());
    }
    m
}

/// A Binding request with the given attributes and, optionally, a correct
/// FINGERPRINT.
fn request(txid: [u8; 12], attrs: &[(u16, &[u8])], with_fingerprint: bool) -> Vec<u8> {
    message_padded(0x0001, txid, attrs, with_fingerprint, 0)
}

/// Sets the length field to what follows the header.
fn fix_length(m: &mut [u8]) {
    let len = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
}

/// The answer to `m` from `from`, as bytes.
fn answer(m: &[u8], from: SocketAddr) -> Result<Vec<u8>, StunError> {
    let mut out = [0xAAu8; MAX_RESPONSE_LEN];
    let n = binding_response(m, from, &mut out)?;
    assert!(n <= MAX_RESPONSE_LEN, "amplification bound");
    Ok(out[..n].to_vec())
}

/// Checks the header of an answer to a request with `txid` and returns its
/// message type.
fn check_header(resp: &[u8], txid: &[u8; 12]) -> u16 {
    assert!(resp.len() <= MAX_RESPONSE_LEN, "amplification bound");
    assert!(resp.len() >= 20);
    assert_eq!(
        usize::from(u16::from_be_bytes([resp[2], resp[3]])),
        resp.len() - 20,
        "length field"
    );
    assert_eq!(&resp[4..8], &[0x21, 0x12, 0xa4, 0x42], "cookie");
    assert_eq!(&resp[8..20], txid, "transaction id");
    assert!(is_stun(resp));
    u16::from_be_bytes([resp[0], resp[1]])
}

/// Checks a trailing FINGERPRINT at `at` (the rest of `resp`): absent, or
/// last, 4 bytes, and correct.
fn check_fingerprint(resp: &[u8], at: usize) -> bool {
    match resp.len() - at {
        0 => false,
        8 => {
            assert_eq!(&resp[at..at + 4], &[0x80, 0x28, 0x00, 0x04]);
            let want = crc32(&resp[..at]) ^ 0x5354_554E;
            assert_eq!(&resp[at + 4..], &want.to_be_bytes(), "response FINGERPRINT");
            true
        }
        n => panic!("unexpected {n} trailing bytes"),
    }
}

/// Decodes a Binding success response: the mapped address, the
/// XOR-MAPPED-ADDRESS attribute bytes, and whether a (verified) FINGERPRINT
/// was present. Nothing else may be in it (no SOFTWARE, no
/// MESSAGE-INTEGRITY).
fn decode(resp: &[u8], txid: &[u8; 12]) -> (SocketAddr, Vec<u8>, bool) {
    assert_eq!(check_header(resp, txid), 0x0101, "Binding success response");
    assert_eq!(&resp[20..22], &[0x00, 0x20], "XOR-MAPPED-ADDRESS first");
    let len = usize::from(u16::from_be_bytes([resp[22], resp[23]]));
    let xma = resp[20..24 + len].to_vec();
    assert_eq!(xma[4], 0, "reserved byte");
    let port = u16::from_be_bytes([xma[6], xma[7]]) ^ 0x2112;
    let mut key = vec![0x21, 0x12, 0xa4, 0x42];
    key.extend_from_slice(txid);
    let ip: IpAddr = match (xma[5], len) {
        (1, 8) => {
            let a: [u8; 4] = std::array::from_fn(|i| xma[8 + i] ^ key[i]);
            Ipv4Addr::from(a).into()
        }
        (2, 20) => {
            let a: [u8; 16] = std::array::from_fn(|i| xma[8 + i] ^ key[i]);
            Ipv6Addr::from(a).into()
        }
        other => panic!("bad family/length {other:?}"),
    };
    let has_fp = check_fingerprint(resp, 24 + len);
    (SocketAddr::new(ip, port), xma, has_fp)
}

/// A decoded Binding error response.
#[derive(Debug, PartialEq, Eq)]
struct ErrorAnswer {
    code: u16,
    reason: String,
    /// UNKNOWN-ATTRIBUTES, if present.
    unknown: Option<Vec<u16>>,
    fingerprint: bool,
}

/// Decodes a Binding error response: ERROR-CODE first (reserved bits zero,
/// class 3–6, number 0–99, UTF-8 reason of fewer than 128 characters, zero
/// padding), then UNKNOWN-ATTRIBUTES in a 420 and only there (zero padding),
/// then an optional verified FINGERPRINT, and nothing else.
fn decode_error(resp: &[u8], txid: &[u8; 12]) -> ErrorAnswer {
    assert_eq!(check_header(resp, txid), 0x0111, "Binding error response");
    assert_eq!(&resp[20..22], &[0x00, 0x09], "ERROR-CODE first");
    let len = usize::from(u16::from_be_bytes([resp[22], resp[23]]));
    assert!(len >= 4);
    let v = &resp[24..24 + len];
    assert_eq!(&v[..2], &[0, 0], "reserved bits");
    assert_eq!(v[2] & 0xF8, 0, "reserved bits");
    let class = v[2] & 0x07;
    assert!((3..=6).contains(&class), "class {class}");
    assert!(v[3] <= 99, "number {}", v[3]);
    let code = u16::from(class) * 100 + u16::from(v[3]);
    let reason = String::from_utf8(v[4..].to_vec()).expect("UTF-8 reason phrase");
    assert!(reason.chars().count() < 128);
    let mut at = 24 + len;
    while at % 4 != 0 {
        assert_eq!(resp[at], 0, "ERROR-CODE padding");
        at += 1;
    }
    let mut unknown = None;
    if resp.len() >= at + 4 && resp[at..at + 2] == [0x00, 0x0A] {
        assert_eq!(code, 420, "UNKNOWN-ATTRIBUTES only in a 420");
        let len = usize::from(u16::from_be_bytes([resp[at + 2], resp[at + 3]]));
        assert_eq!(len % 2, 0);
        let types = resp[at + 4..at + 4 + len]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        unknown = Some(types);
        at += 4 + len;
        while at % 4 != 0 {
            assert_eq!(resp[at], 0, "UNKNOWN-ATTRIBUTES padding");
            at += 1;
        }
    }
    if code == 420 {
        assert!(unknown.is_some(), "a 420 MUST carry UNKNOWN-ATTRIBUTES");
    }
    let fingerprint = check_fingerprint(resp, at);
    ErrorAnswer {
        code,
        reason,
        unknown,
        fingerprint,
    }
}

/// Any answer: a success response or an error response, checked.
fn decode_any(resp: &[u8], txid: &[u8; 12], from: SocketAddr) {
    match check_header(resp, txid) {
        0x0101 => assert_eq!(
            decode(resp, txid).0,
            SocketAddr::new(from.ip().to_canonical(), from.port())
        ),
        0x0111 => {
            let e = decode_error(resp, txid);
            assert!(e.code == 400 || e.code == 420, "{e:?}");
        }
        other => panic!("answered with type {other:#06x}"),
    }
}

/// What a 420 for `unknown` should look like: reason phrase and list.
fn expect_420(resp: &[u8], txid: &[u8; 12], unknown: &[u16], fingerprint: bool) {
    let e = decode_error(resp, txid);
    assert_eq!(
        e,
        ErrorAnswer {
            code: 420,
            reason: "Unknown Attribute".into(),
            unknown: Some(unknown.to_vec()),
            fingerprint,
        }
    );
}

/// What a 400 should look like.
fn expect_400(resp: &[u8], txid: &[u8; 12]) {
    let e = decode_error(resp, txid);
    assert_eq!(
        e,
        ErrorAnswer {
            code: 400,
            reason: "Bad Request".into(),
            unknown: None,
            fingerprint: false,
        }
    );
    assert_eq!(resp.len(), 40);
}

/// Deterministic xorshift64* for the garbage tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------
// FINGERPRINT's CRC
// ---------------------------------------------------------------------------

#[test]
fn crc32_known_values() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
    assert_eq!(
        crc32(b"The quick brown fox jumps over the lazy dog"),
        0x414F_A339
    );
}

#[test]
fn rfc5769_request_fingerprint_matches_our_crc() {
    let at = RFC5769_REQUEST.len() - 8;
    let fp = u32::from_be_bytes([
        RFC5769_REQUEST[at + 4],
        RFC5769_REQUEST[at + 5],
        RFC5769_REQUEST[at + 6],
        RFC5769_REQUEST[at + 7],
    ]);
    assert_eq!(fingerprint(&RFC5769_REQUEST[..at]), fp);
}

// ---------------------------------------------------------------------------
// Header and class (§5, §6.3)
// ---------------------------------------------------------------------------

#[test]
fn is_stun_rules() {
    assert!(!is_stun(&[]));
    assert!(!is_stun(&[0; 19]));
    let mut m = [0u8; 20];
    assert!(!is_stun(&m));
    m[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    assert!(is_stun(&m));
    for top in [0x40u8, 0x80, 0xC0] {
        m[0] = top;
        assert!(!is_stun(&m));
    }
    m[0] = 0x3F;
    assert!(is_stun(&m));
}

#[test]
fn header_checks() {
    let good = request(RFC5769_TXID, &[(SOFTWARE, b"abcd")], false);
    assert_eq!(answer(&good[..19], rfc_v4()), Err(StunError::NotStun));
    // First two bits.
    for top in [0x40u8, 0x80, 0xC0] {
        let mut m = good.clone();
        m[0] |= top;
        assert!(!is_stun(&m));
        assert_eq!(answer(&m, rfc_v4()), Err(StunError::NotStun));
    }
    // Magic cookie, every byte.
    for byte in 4..8 {
        let mut m = good.clone();
        m[byte] ^= 1;
        assert_eq!(answer(&m, rfc_v4()), Err(StunError::NotStun), "byte {byte}");
    }
    assert_eq!(answer(&good, rfc_v4()).map(|r| r.len()), Ok(32));
}

#[test]
fn length_must_be_sensible() {
    let good = request(RFC5769_TXID, &[(SOFTWARE, b"abcd")], false);
    // Length field not matching the datagram, or not a multiple of 4.
    for delta in [-8i32, -4, -1, 1, 2, 3, 4, 8] {
        let mut m = good.clone();
        let len = (m.len() as i32 - 20 + delta) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(answer(&m, rfc_v4()), Err(StunError::Malformed), "{delta}");
    }
    // Trailing bytes after the message, aligned or not.
    for extra in 1..=4 {
        let mut m = good.clone();
        m.extend(std::iter::repeat_n(0, extra));
        assert_eq!(answer(&m, rfc_v4()), Err(StunError::Malformed), "{extra}");
    }
    // A length that is a multiple of 4 and matches, but cuts no attribute
    // boundary, is a malformed request (see `truncated_attribute_gets_400`).
}

#[test]
fn only_binding_requests_are_answered() {
    let attrs: [(u16, &[u8]); 1] = [(SOFTWARE, b"x")];
    // Binding indication: never answered, with or without unknown
    // comprehension-required attributes or a FINGERPRINT.
    for (attrs, fp) in [
        (&attrs[..], false),
        (&attrs[..], true),
        (&[(CHANGE_REQUEST, &[0u8; 4][..])][..], true),
        (&[][..], false),
    ] {
        let m = message_padded(0x0011, RFC5769_TXID, attrs, fp, 0);
        assert_eq!(answer(&m, rfc_v4()), Err(StunError::Indication));
    }
    // Binding success and error responses: no transaction of ours.
    // Requests and indications of other methods (Shared Secret, Allocate,
    // Refresh, Send, Data, CreatePermission, ChannelBind, the largest
    // method): not supported.
    for kind in [
        0x0101u16, 0x0111, 0x0002, 0x0003, 0x0004, 0x0008, 0x0009, 0x0016, 0x0017, 0x0103, 0x0113,
        0x3EEF, 0x3EFF, 0x3FFF,
    ] {
        for fp in [false, true] {
            let m = message_padded(kind, RFC5769_TXID, &attrs, fp, 0);
            assert_eq!(
                answer(&m, rfc_v4()),
                Err(StunError::NotBindingRequest),
                "{kind:#06x}"
            );
        }
    }
    // Our own answers, sent back to us, are not answered.
    let ok = answer(&request(RFC5769_TXID, &[], true), rfc_v4()).unwrap();
    assert_eq!(answer(&ok, rfc_v4()), Err(StunError::NotBindingRequest));
    let e420 = answer(
        &request(RFC5769_TXID, &[(CHANGE_REQUEST, &[0; 4])], true),
        rfc_v4(),
    )
    .unwrap();
    assert_eq!(answer(&e420, rfc_v4()), Err(StunError::NotBindingRequest));
}

#[test]
fn indications_and_responses_need_a_sensible_length_too() {
    // §6.3 checks the length before the method and class: a Binding
    // indication, a response or another method's request whose length field
    // does not match the datagram is malformed, not an indication or an
    // unsupported message.
    for kind in [0x0011u16, 0x0101, 0x0111, 0x0002] {
        let good = message_padded(kind, RFC5769_TXID, &[(SOFTWARE, b"abcd")], false, 0);
        for delta in [-8i32, -4, -1, 1, 2, 4] {
            let mut m = good.clone();
            let len = (m.len() as i32 - 20 + delta) as u16;
            m[2..4].copy_from_slice(&len.to_be_bytes());
            assert_eq!(
                answer(&m, rfc_v4()),
                Err(StunError::Malformed),
                "{kind:#06x} {delta}"
            );
        }
        let mut m = good.clone();
        m.extend_from_slice(&[0; 4]);
        assert_eq!(
            answer(&m, rfc_v4()),
            Err(StunError::Malformed),
            "{kind:#06x}"
        );
    }
}

// ---------------------------------------------------------------------------
// Attributes (§14) and FINGERPRINT (§7, §14.7)
// ---------------------------------------------------------------------------

#[test]
fn truncated_attribute_gets_400() {
    let good = request(RFC5769_TXID, &[(SOFTWARE, b"abcd")], false);
    // The attribute's length runs past the end: one byte (its padding
    // missing), four, or the largest length.
    for len in [5u16, 8, 0xFFFF] {
        let mut m = good.clone();
        m[22..24].copy_from_slice(&len.to_be_bytes());
        expect_400(&answer(&m, rfc_v4()).unwrap(), &RFC5769_TXID);
    }
    // An attribute header with nothing after it but a length of 4.
    let mut m = request(RFC5769_TXID, &[], false);
    m.extend_from_slice(&[0x80, 0x22, 0x00, 0x04]);
    fix_length(&mut m);
    expect_400(&answer(&m, rfc_v6()).unwrap(), &RFC5769_TXID);
    // The same with a request that had a FINGERPRINT: the broken attribute
    // hides it, so the 400 carries none.
    let mut m = request(RFC5769_TXID, &[(SOFTWARE, b"abcd")], true);
    m[22..24].copy_from_slice(&13u16.to_be_bytes());
    expect_400(&answer(&m, rfc_v4()).unwrap(), &RFC5769_TXID);
    // (A length that swallows the FINGERPRINT exactly leaves a well-formed
    // request without one: answered.)
    m[22..24].copy_from_slice(&12u16.to_be_bytes());
    let (_, _, had_fp) = decode(&answer(&m, rfc_v4()).unwrap(), &RFC5769_TXID);
    assert!(!had_fp);
    // Unknown comprehension-required attributes before the broken one do
    // not turn the 400 into a 420.
    let mut m = request(RFC5769_TXID, &[(CHANGE_REQUEST, &[0; 4])], false);
    m.extend_from_slice(&[0x00, 0x24, 0x00, 0x09, 0, 0, 0, 0]);
    fix_length(&mut m);
    expect_400(&answer(&m, rfc_v4()).unwrap(), &RFC5769_TXID);
}

#[test]
fn padding_bytes_are_ignored() {
    // Values of 1, 2 and 3 bytes, padded with 0xFF rather than zeros.
    for fp in [false, true] {
        let m = message_padded(
            0x0001,
            RFC5769_TXID,
            &[(SOFTWARE, b"a"), (SOFTWARE, b"ab"), (USERNAME, b"abc")],
            fp,
            0xFF,
        );
        let (addr, _, had_fp) = decode(&answer(&m, rfc_v4()).unwrap(), &RFC5769_TXID);
        assert_eq!((addr, had_fp), (rfc_v4(), fp));
    }
}

#[test]
fn bad_fingerprint_is_discarded() {
    let good = request(RFC5769_TXID, &[(SOFTWARE, b"abc")], true);
    assert!(answer(&good, rfc_v4()).is_ok());
    // Transaction id, SOFTWARE value, fingerprint value: flips that keep the
    // message well-formed.
    let fp_value = good.len() - 4..good.len();
    for byte in (8..20).chain(24..28).chain(fp_value) {
        let mut bad = good.clone();
        bad[byte] ^= 0x01;
        assert_eq!(
            answer(&bad, rfc_v4()),
            Err(StunError::BadFingerprint),
            "byte {byte}"
        );
    }
    // A bad FINGERPRINT wins over an unknown attribute: silence, not 420.
    let mut m = request(RFC5769_TXID, &[(CHANGE_REQUEST, &[0; 4])], true);
    let last = m.len() - 1;
    m[last] ^= 0x80;
    assert_eq!(answer(&m, rfc_v4()), Err(StunError::BadFingerprint));
    // The RFC 5769 request with its FINGERPRINT broken.
    let mut m = RFC5769_REQUEST;
    m[107] ^= 1;
    assert_eq!(answer(&m, rfc_v4()), Err(StunError::BadFingerprint));
}

#[test]
fn fingerprint_must_be_last_and_four_bytes() {
    // An attribute after FINGERPRINT, optional or required.
    for kind in [0x8022u16, 0x0003] {
        let mut req = request(RFC5769_TXID, &[], true);
        req.extend_from_slice(&kind.to_be_bytes());
        req.extend_from_slice(&[0x00, 0x00]);
        fix_length(&mut req);
        assert_eq!(answer(&req, rfc_v4()), Err(StunError::BadFingerprint));
    }
    // Two FINGERPRINTs, the second one correct for what precedes it.
    let mut req = request(RFC5769_TXID, &[], true);
    req[2..4].copy_from_slice(&16u16.to_be_bytes());
    let fp = crc32(&req) ^ 0x5354_554E;
    req.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
    req.extend_from_slice(&fp.to_be_bytes());
    assert_eq!(answer(&req, rfc_v4()), Err(StunError::BadFingerprint));
    // A FINGERPRINT of the wrong length.
    for len in [0usize, 3, 8] {
        let value = vec![0u8; len];
        let req = request(RFC5769_TXID, &[(FINGERPRINT, &value)], false);
        assert_eq!(
            answer(&req, rfc_v4()),
            Err(StunError::BadFingerprint),
            "{len}"
        );
    }
}

#[test]
fn comprehension_optional_attributes_are_ignored() {
    for kind in [
        0x8000u16,
        SOFTWARE,
        ALTERNATE_SERVER,
        ICE_CONTROLLED,
        0x802A,
        0xC001,
        0xFFFF,
    ] {
        for fp in [false, true] {
            let req = request(RFC5769_TXID, &[(kind, b"optional")], fp);
            let (addr, _, had_fp) = decode(&answer(&req, rfc_v4()).unwrap(), &RFC5769_TXID);
            assert_eq!((addr, had_fp), (rfc_v4(), fp), "{kind:#06x}");
        }
    }
}

#[test]
fn known_but_unexpected_attributes_are_ignored() {
    let addr = [0, 1, 0x80, 0x55, 192, 0, 2, 1];
    let attrs: [(u16, &[u8]); 11] = [
        (MAPPED_ADDRESS, &addr),
        (XOR_MAPPED_ADDRESS, &addr),
        (ERROR_CODE, &[0, 0, 4, 20]),
        (UNKNOWN_ATTRIBUTES, &[0, 3]),
        (USERNAME, b"user"),
        (USERHASH, &[7; 32]),
        (REALM, b"example.org"),
        (NONCE, b"obMatJos2AAAB"),
        (PASSWORD_ALGORITHM, &[0, 2, 0, 0]),
        (MESSAGE_INTEGRITY_SHA256, &[1; 32]),
        (MESSAGE_INTEGRITY, &[1; 20]),
    ];
    // One at a time, and all together.
    for fp in [false, true] {
        for one in &attrs {
            let req = request(RFC5769_TXID, &[*one], fp);
            let (a, _, had_fp) = decode(&answer(&req, rfc_v6()).unwrap(), &RFC5769_TXID);
            assert_eq!((a, had_fp), (rfc_v6(), fp), "{:#06x}", one.0);
        }
        let req = request(RFC5769_TXID, &attrs, fp);
        let (a, _, had_fp) = decode(&answer(&req, rfc_v4()).unwrap(), &RFC5769_TXID);
        assert_eq!((a, had_fp), (rfc_v4(), fp));
    }
}

// ---------------------------------------------------------------------------
// 420 (§6.3.1, §14.8, §14.13)
// ---------------------------------------------------------------------------

#[test]
fn unknown_attribute_gets_420() {
    // CHANGE-REQUEST (RFC 3489's, reserved in RFC 8489; RFC 5780 expects a
    // 420 from a server without it), ICE's PRIORITY and USE-CANDIDATE, the
    // reserved 0x0000, and the ends of the range.
    for kind in [
        CHANGE_REQUEST,
        PRIORITY,
        USE_CANDIDATE,
        0x0000,
        0x0002,
        0x0007,
        0x000B,
        0x0021,
        0x003F,
        0x0040,
        0x7FFF,
    ] {
        for fp in [false, true] {
            let req = request(
                RFC5769_TXID,
                &[(SOFTWARE, b"client"), (kind, &[0, 0, 0, 6])],
                fp,
            );
            let resp = answer(&req, rfc_v4()).unwrap();
            expect_420(&resp, &RFC5769_TXID, &[kind], fp);
            // 20 + ERROR-CODE 28 + UNKNOWN-ATTRIBUTES 8 (+ FINGERPRINT 8).
            assert_eq!(resp.len(), if fp { 64 } else { 56 }, "{kind:#06x}");
        }
    }
}

#[test]
fn rfc5769_request_gets_420_for_priority() {
    // SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY,
    // FINGERPRINT: an ICE connectivity check. USERNAME and
    // MESSAGE-INTEGRITY are ignored (no credentials, D26), ICE-CONTROLLED is
    // comprehension-optional, PRIORITY is not understood by a STUN server.
    let resp = answer(&RFC5769_REQUEST, rfc_v4()).unwrap();
    expect_420(&resp, &RFC5769_TXID, &[PRIORITY], true);
}

#[test]
fn duplicate_unknown_attributes_are_listed_once() {
    let attrs: [(u16, &[u8]); 6] = [
        (CHANGE_REQUEST, &[0; 4]),
        (PRIORITY, &[1; 4]),
        (CHANGE_REQUEST, &[0; 4]),
        (SOFTWARE, b"x"),
        (0x7FFF, &[]),
        (PRIORITY, &[2; 4]),
    ];
    let want = [CHANGE_REQUEST, PRIORITY, 0x7FFF];
    let resp = answer(&request(RFC5769_TXID, &attrs, false), rfc_v4()).unwrap();
    expect_420(&resp, &RFC5769_TXID, &want, false);
    // With a FINGERPRINT, three types and the reason phrase do not fit: the
    // reason phrase goes, the list stays whole.
    let resp = answer(&request(RFC5769_TXID, &attrs, true), rfc_v4()).unwrap();
    let e = decode_error(&resp, &RFC5769_TXID);
    assert_eq!((e.code, e.reason.as_str()), (420, ""));
    assert_eq!(e.unknown.as_deref(), Some(&want[..]));
    assert!(e.fingerprint);
}

#[test]
fn many_unknown_attributes_stay_within_64_bytes() {
    for n in 1..=40u16 {
        let types: Vec<u16> = (0..n).map(|i| 0x4000 + i).collect();
        let attrs: Vec<(u16, &[u8])> = types.iter().map(|&t| (t, &[][..])).collect();
        for fp in [false, true] {
            let resp = answer(&request(RFC5769_TXID, &attrs, fp), rfc_v6()).unwrap();
            let e = decode_error(&resp, &RFC5769_TXID);
            let listed = e.unknown.clone().unwrap();
            let (with_phrase, most) = if fp { (2, 12) } else { (6, 16) };
            let n = usize::from(n);
            assert_eq!(
                listed,
                types[..n.min(most)],
                "n={n} fp={fp}: the first ones"
            );
            let phrase = if n <= with_phrase {
                "Unknown Attribute"
            } else {
                ""
            };
            assert_eq!(e.reason, phrase, "n={n} fp={fp}");
            assert_eq!(e.fingerprint, fp);
            assert!(resp.len() <= 64);
            if n >= most {
                assert_eq!(resp.len(), 64, "a full list fills the bound exactly");
            }
        }
    }
}

#[test]
fn layout_420_tiers() {
    use super::response::layout_420;
    assert_eq!(layout_420(1, false, false), ("Unknown Attribute", 1));
    assert_eq!(layout_420(6, false, false), ("Unknown Attribute", 6));
    assert_eq!(layout_420(7, false, false), ("", 7));
    assert_eq!(layout_420(16, false, false), ("", 16));
    assert_eq!(layout_420(16, true, false), ("", 16));
    assert_eq!(layout_420(2, false, true), ("Unknown Attribute", 2));
    assert_eq!(layout_420(3, false, true), ("", 3));
    assert_eq!(layout_420(16, false, true), ("", 12));
    // Overflow means more than the 16 kept: never the phrase.
    assert_eq!(layout_420(1, true, false).0, "");
    assert_eq!(super::request::MAX_UNKNOWN, 16);
}

#[test]
fn unknown_attributes_keeps_sixteen_types_and_flags_more() {
    use super::request::{unknown_attributes, MAX_UNKNOWN};
    for n in [1u16, 15, 16, 17, 40] {
        let types: Vec<u16> = (0..n).map(|i| 0x4000 + i).collect();
        // Each type twice: listed once.
        let attrs: Vec<(u16, &[u8])> = types.iter().chain(&types).map(|&t| (t, &[][..])).collect();
        let list = unknown_attributes(&request(RFC5769_TXID, &attrs, false));
        let n = usize::from(n);
        assert_eq!(list.as_slice(), &types[..n.min(MAX_UNKNOWN)], "n={n}");
        assert_eq!(list.overflowed(), n > MAX_UNKNOWN, "n={n}");
    }
}

#[test]
fn error_code_encoding() {
    // A 420 listing CHANGE-REQUEST, byte for byte (RFC 8489 §5, §14.8, §14.13).
    let txid = [0x11; 12];
    let resp = answer(
        &request(txid, &[(CHANGE_REQUEST, &[0, 0, 0, 6])], false),
        rfc_v4(),
    )
    .unwrap();
    let mut want = vec![0x01, 0x11, 0x00, 0x24, 0x21, 0x12, 0xa4, 0x42];
    want.extend_from_slice(&txid);
    want.extend_from_slice(&[0x00, 0x09, 0x00, 0x15, 0x00, 0x00, 0x04, 0x14]);
    want.extend_from_slice(b"Unknown Attribute\0\0\0");
    want.extend_from_slice(&[0x00, 0x0A, 0x00, 0x02, 0x00, 0x03, 0x00, 0x00]);
    assert_eq!(resp, want);
    // A 400, byte for byte.
    let mut m = request(txid, &[(SOFTWARE, b"abcd")], false);
    m[22..24].copy_from_slice(&9u16.to_be_bytes());
    let resp = answer(&m, rfc_v4()).unwrap();
    let mut want = vec![0x01, 0x11, 0x00, 0x14, 0x21, 0x12, 0xa4, 0x42];
    want.extend_from_slice(&txid);
    want.extend_from_slice(&[0x00, 0x09, 0x00, 0x0F, 0x00, 0x00, 0x04, 0x00]);
    want.extend_from_slice(b"Bad Request\0");
    assert_eq!(resp, want);
}

#[test]
fn error_responses_echo_the_transaction_id() {
    let mut rng = Rng(0x0BAD_5EED_1234_5678);
    for i in 0..100 {
        let txid: [u8; 12] = std::array::from_fn(|_| rng.next() as u8);
        let fp = i % 2 == 0;
        let req = request(txid, &[(PRIORITY, &[1; 4])], fp);
        expect_420(&answer(&req, rfc_v6()).unwrap(), &txid, &[PRIORITY], fp);
        let mut bad = request(txid, &[(SOFTWARE, b"abcd")], false);
        bad[22..24].copy_from_slice(&7u16.to_be_bytes());
        expect_400(&answer(&bad, rfc_v6()).unwrap(), &txid);
    }
}

// ---------------------------------------------------------------------------
// Authentication attributes with no credentials (§9, D26)
// ---------------------------------------------------------------------------

#[test]
fn authentication_attributes_are_ignored() {
    // Each of them alone, and a short-term-credential request (USERNAME,
    // MESSAGE-INTEGRITY-SHA256, MESSAGE-INTEGRITY, FINGERPRINT) and a
    // long-term one (USERNAME, REALM, NONCE, MESSAGE-INTEGRITY).
    let sets: [&[(u16, &[u8])]; 8] = [
        &[(USERNAME, b"evtj:h6vY")],
        &[(MESSAGE_INTEGRITY, &[9; 20])],
        &[(MESSAGE_INTEGRITY_SHA256, &[9; 32])],
        &[(USERHASH, &[9; 32])],
        &[(REALM, b"example.org"), (NONCE, b"obMatJos2AAAB")],
        &[(PASSWORD_ALGORITHM, &[0, 2, 0, 0])],
        &[
            (USERNAME, b"evtj:h6vY"),
            (MESSAGE_INTEGRITY_SHA256, &[9; 32]),
            (MESSAGE_INTEGRITY, &[9; 20]),
        ],
        &[
            (USERNAME, b"user"),
            (REALM, b"example.org"),
            (NONCE, b"obMatJos2AAAB"),
            (MESSAGE_INTEGRITY, &[9; 20]),
        ],
    ];
    for attrs in sets {
        for fp in [false, true] {
            for from in [rfc_v4(), rfc_v6()] {
                let req = request(RFC5769_TXID, attrs, fp);
                // `decode` allows nothing but XOR-MAPPED-ADDRESS and
                // FINGERPRINT: no MESSAGE-INTEGRITY in the answer.
                let (addr, _, had_fp) = decode(&answer(&req, from).unwrap(), &RFC5769_TXID);
                assert_eq!((addr, had_fp), (from, fp));
            }
        }
    }
}

#[test]
fn attributes_after_message_integrity_are_ignored() {
    let unknown: (u16, &[u8]) = (CHANGE_REQUEST, &[0, 0, 0, 6]);
    for fp in [false, true] {
        // After MESSAGE-INTEGRITY, and after MESSAGE-INTEGRITY-SHA256.
        for integrity in [
            (MESSAGE_INTEGRITY, &[1u8; 20][..]),
            (MESSAGE_INTEGRITY_SHA256, &[1; 32]),
        ] {
            let req = request(RFC5769_TXID, &[(USERNAME, b"u"), integrity, unknown], fp);
            let (addr, _, had_fp) = decode(&answer(&req, rfc_v4()).unwrap(), &RFC5769_TXID);
            assert_eq!((addr, had_fp), (rfc_v4(), fp));
        }
        // Before it, the attribute counts.
        let req = request(RFC5769_TXID, &[unknown, (MESSAGE_INTEGRITY, &[1; 20])], fp);
        expect_420(
            &answer(&req, rfc_v4()).unwrap(),
            &RFC5769_TXID,
            &[CHANGE_REQUEST],
            fp,
        );
        // MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, then unknown ones.
        let req = request(
            RFC5769_TXID,
            &[
                (MESSAGE_INTEGRITY, &[1; 20]),
                (MESSAGE_INTEGRITY_SHA256, &[1; 32]),
                (PRIORITY, &[0; 4]),
                unknown,
            ],
            fp,
        );
        assert!(decode(&answer(&req, rfc_v4()).unwrap(), &RFC5769_TXID).0 == rfc_v4());
    }
    // The FINGERPRINT after MESSAGE-INTEGRITY is still checked.
    let mut req = request(RFC5769_TXID, &[(MESSAGE_INTEGRITY, &[1; 20])], true);
    let last = req.len() - 1;
    req[last] ^= 1;
    assert_eq!(answer(&req, rfc_v4()), Err(StunError::BadFingerprint));
}

// ---------------------------------------------------------------------------
// Success responses (§6.3.1.1, §14.2)
// ---------------------------------------------------------------------------

#[test]
fn ipv4_without_fingerprint() {
    let req = request(RFC5769_TXID, &[], false);
    let resp = answer(&req, rfc_v4()).unwrap();
    assert_eq!(resp.len(), 32);
    let (addr, xma, fp) = decode(&resp, &RFC5769_TXID);
    assert_eq!(addr, rfc_v4());
    assert_eq!(xma, RFC5769_XMA_V4);
    assert!(!fp);
}

#[test]
fn ipv4_with_fingerprint() {
    let attrs: [(u16, &[u8]); 2] = [(ICE_CONTROLLED, &[1; 8]), (SOFTWARE, b"test vector")];
    let req = request(RFC5769_TXID, &attrs, true);
    let resp = answer(&req, rfc_v4()).unwrap();
    assert_eq!(resp.len(), 40);
    let (addr, xma, fp) = decode(&resp, &RFC5769_TXID);
    assert_eq!(addr, rfc_v4());
    assert_eq!(xma, RFC5769_XMA_V4);
    assert!(fp);
}

#[test]
fn ipv6_without_fingerprint() {
    let req = request(RFC5769_TXID, &[], false);
    let resp = answer(&req, rfc_v6()).unwrap();
    assert_eq!(resp.len(), 44);
    let (addr, xma, fp) = decode(&resp, &RFC5769_TXID);
    assert_eq!(addr, rfc_v6());
    assert_eq!(xma, RFC5769_XMA_V6);
    assert!(!fp);
}

#[test]
fn ipv6_with_fingerprint_is_the_largest_success() {
    let req = request(RFC5769_TXID, &[(SOFTWARE, b"x")], true);
    let resp = answer(&req, rfc_v6()).unwrap();
    assert_eq!(resp.len(), 52);
    let (addr, xma, fp) = decode(&resp, &RFC5769_TXID);
    assert_eq!(addr, rfc_v6());
    assert_eq!(xma, RFC5769_XMA_V6);
    assert!(fp);
}

#[test]
fn ipv4_mapped_source_is_answered_as_ipv4() {
    let mapped = SocketAddr::V6(SocketAddrV6::new(
        Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(),
        32853,
        0,
        0,
    ));
    let req = request(RFC5769_TXID, &[], true);
    let (addr, xma, _) = decode(&answer(&req, mapped).unwrap(), &RFC5769_TXID);
    assert_eq!(addr, rfc_v4());
    assert_eq!(xma, RFC5769_XMA_V4);
}

#[test]
fn other_transaction_ids_and_ports() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for i in 0..200 {
        let txid: [u8; 12] = std::array::from_fn(|_| rng.next() as u8);
        let port = rng.next() as u16;
        let from = if i % 2 == 0 {
            SocketAddr::new(Ipv4Addr::from(rng.next() as u32).into(), port)
        } else {
            SocketAddr::new(
                Ipv6Addr::from(u128::from(rng.next()) << 64 | 1).into(),
                port,
            )
        };
        let fp = i % 3 == 0;
        let req = request(txid, &[], fp);
        let (addr, _, had_fp) = decode(&answer(&req, from).unwrap(), &txid);
        assert_eq!(addr, from);
        assert_eq!(had_fp, fp);
    }
}

#[test]
fn a_retransmission_gets_the_same_answer() {
    let mut broken = request(RFC5769_TXID, &[(SOFTWARE, b"abcd")], false);
    broken[22..24].copy_from_slice(&6u16.to_be_bytes());
    for req in [
        request(RFC5769_TXID, &[], false),
        request(RFC5769_TXID, &[(USERNAME, b"u")], true),
        RFC5769_REQUEST.to_vec(),
        broken,
    ] {
        for from in [rfc_v4(), rfc_v6()] {
            let first = answer(&req, from).unwrap();
            for _ in 0..3 {
                assert_eq!(answer(&req, from).unwrap(), first);
            }
        }
    }
}

#[test]
fn small_buffer_is_an_error() {
    let mut out = [0u8; 64];
    let unknown = request(RFC5769_TXID, &[(PRIORITY, &[0; 4])], true);
    let mut broken = request(RFC5769_TXID, &[(SOFTWARE, b"abcd")], false);
    broken[22..24].copy_from_slice(&6u16.to_be_bytes());
    for (req, size) in [
        (request(RFC5769_TXID, &[], true), 52),
        (unknown, 64),
        (broken, 40),
    ] {
        for short in 0..size {
            assert_eq!(
                binding_response(&req, rfc_v6(), &mut out[..short]),
                Err(StunError::BufferTooSmall)
            );
        }
        assert_eq!(binding_response(&req, rfc_v6(), &mut out[..size]), Ok(size));
    }
}

// ---------------------------------------------------------------------------
// No input panics or breaks the bound (docs/PROTOCOL.md §7.6)
// ---------------------------------------------------------------------------

#[test]
fn every_prefix_is_handled_without_panic() {
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let full = request(
        RFC5769_TXID,
        &[(SOFTWARE, b"hello"), (PRIORITY, &[1; 4])],
        true,
    );
    for source in [&full[..], &RFC5769_REQUEST[..]] {
        for end in 0..source.len() {
            let prefix = &source[..end];
            assert!(
                binding_response(prefix, rfc_v6(), &mut out).is_err(),
                "{end}"
            );
            // Also with the length field fixed up, so the attribute walk runs.
            if end >= 20 {
                let mut m = prefix.to_vec();
                fix_length(&mut m);
                if let Ok(n) = binding_response(&m, rfc_v6(), &mut out) {
                    decode_any(&out[..n], &RFC5769_TXID, rfc_v6());
                }
            }
        }
    }
}

#[test]
fn garbage_is_handled_without_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let good = request(
        RFC5769_TXID,
        &[(SOFTWARE, b"software"), (PRIORITY, &[1; 4])],
        true,
    );
    for i in 0..5000 {
        let len = (rng.next() % 120) as usize;
        let mut m = rng.bytes(len);
        match i % 3 {
            // Pure noise.
            0 => {}
            // A plausible Binding request header over random attributes.
            1 if len >= 20 => {
                m[0..2].copy_from_slice(&[0x00, 0x01]);
                m[2..4].copy_from_slice(&((len - 20) as u16).to_be_bytes());
                m[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
            }
            // A valid request with a few random bytes changed.
            _ => {
                m = good.clone();
                for _ in 0..1 + rng.next() % 3 {
                    let at = (rng.next() as usize) % m.len();
                    m[at] = rng.next() as u8;
                }
            }
        }
        let from = if i % 2 == 0 { rfc_v4() } else { rfc_v6() };
        let out_len = (rng.next() % 65) as usize;
        if let Ok(n) = binding_response(&m, from, &mut out[..out_len]) {
            let txid: [u8; 12] = m[8..20].try_into().unwrap();
            decode_any(&out[..n], &txid, from);
        }
    }
}

/// A Binding request of arbitrary attributes, optionally with FINGERPRINT.
fn arb_request() -> impl Strategy<Value = Vec<u8>> {
    let kind = prop_oneof![
        any::<u16>(),
        prop::sample::select(vec![
            0x0000u16, 0x0001, 0x0003, 0x0006, 0x0008, 0x0009, 0x000A, 0x001C, 0x0020, 0x0024,
            0x7FFF, 0x8000, 0x8022, 0x8028, 0xFFFF,
        ]),
    ];
    let attr = (kind, prop::collection::vec(any::<u8>(), 0..24));
    (
        any::<[u8; 12]>(),
        prop::collection::vec(attr, 0..24),
        any::<bool>(),
    )
        .prop_map(|(txid, attrs, fp)| {
            let attrs: Vec<(u16, &[u8])> = attrs.iter().map(|(k, v)| (*k, &v[..])).collect();
            request(txid, &attrs, fp)
        })
}

/// One change to a message: a byte set, a cut, bytes added, the length
/// field fixed up or not.
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Cut(usize),
    Extend(Vec<u8>),
    FixLength,
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => any::<usize>().prop_map(Mutation::Cut),
        1 => prop::collection::vec(any::<u8>(), 1..12).prop_map(Mutation::Extend),
        2 => Just(Mutation::FixLength),
    ]
}

/// Runs `m` through the responder from both families into an output buffer
/// of each interesting size: no panic, every answer at most 64 bytes and
/// well-formed.
fn bounded(m: &[u8]) -> Result<(), TestCaseError> {
    for from in [rfc_v4(), rfc_v6()] {
        for size in [MAX_RESPONSE_LEN, 40, 0, 1500] {
            let mut out = vec![0u8; size];
            if let Ok(n) = binding_response(m, from, &mut out) {
                prop_assert!(n <= MAX_RESPONSE_LEN && n <= size);
                let txid: [u8; 12] = m[8..20].try_into().unwrap();
                decode_any(&out[..n], &txid, from);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes, bare or behind a Binding request header.
    #[test]
    fn prop_no_panic_and_bounded(bytes in prop::collection::vec(any::<u8>(), 0..200), header in any::<bool>()) {
        let mut m = bytes;
        if header && m.len() >= 20 {
            m[0..2].copy_from_slice(&[0x00, 0x01]);
            fix_length(&mut m);
            m[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        }
        bounded(&m)?;
    }

    /// Valid requests of any attributes, then mutated.
    #[test]
    fn prop_mutated_requests_stay_bounded(req in arb_request(), mutations in prop::collection::vec(arb_mutation(), 0..4)) {
        bounded(&req)?;
        let mut m = req;
        for mutation in mutations {
            match mutation {
                Mutation::Set(i, b) => {
                    if !m.is_empty() {
                        let i = i % m.len();
                        m[i] = b;
                    }
                }
                Mutation::Cut(at) => m.truncate(at % (m.len() + 1)),
                Mutation::Extend(bytes) => m.extend_from_slice(&bytes),
                Mutation::FixLength => {
                    if m.len() >= 20 {
                        fix_length(&mut m);
                    }
                }
            }
            bounded(&m)?;
        }
    }
}
