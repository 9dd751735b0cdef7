use super::*;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

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

fn rfc_v4() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), 32853)
}

fn rfc_v6() -> SocketAddr {
    let ip = Ipv6Addr::new(0x2001, 0xdb8, 0x1234, 0x5678, 0x11, 0x2233, 0x4455, 0x6677);
    SocketAddr::new(ip.into(), 32853)
}

/// A Binding request with the given attributes (values padded here) and,
/// optionally, a correct FINGERPRINT.
fn request(txid: [u8; 12], attrs: &[(u16, &[u8])], with_fingerprint: bool) -> Vec<u8> {
    let mut m = vec![0x00, 0x01, 0, 0, 0x21, 0x12, 0xa4, 0x42];
    m.extend_from_slice(&txid);
    for (kind, value) in attrs {
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&(value.len() as u16).to_be_bytes());
        m.extend_from_slice(value);
        while m.len() % 4 != 0 {
            m.push(0);
        }
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

/// Decodes a Binding success response without the module's code paths
/// (except `crc32`, itself checked against known values): checks the header
/// and returns the mapped address and the XOR-MAPPED-ADDRESS attribute bytes,
/// and whether a (verified) FINGERPRINT was present.
fn decode(resp: &[u8], txid: &[u8; 12]) -> (SocketAddr, Vec<u8>, bool) {
    assert!(resp.len() <= MAX_RESPONSE_LEN, "amplification bound");
    assert_eq!(&resp[0..2], &[0x01, 0x01], "Binding success response");
    assert_eq!(
        usize::from(u16::from_be_bytes([resp[2], resp[3]])),
        resp.len() - 20
    );
    assert_eq!(&resp[4..8], &[0x21, 0x12, 0xa4, 0x42], "cookie");
    assert_eq!(&resp[8..20], txid, "transaction id");
    assert!(is_stun(resp));

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

    let rest = &resp[24 + len..];
    let has_fp = match rest.len() {
        0 => false,
        8 => {
            assert_eq!(&rest[0..4], &[0x80, 0x28, 0x00, 0x04]);
            let at = resp.len() - 8;
            let want = crc32(&resp[..at]) ^ 0x5354_554E;
            assert_eq!(&rest[4..8], &want.to_be_bytes(), "response FINGERPRINT");
            true
        }
        n => panic!("unexpected {n} trailing bytes"),
    };
    (SocketAddr::new(ip, port), xma, has_fp)
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

#[test]
fn rfc5769_request_is_refused_for_auth() {
    assert!(is_stun(&RFC5769_REQUEST));
    let mut out = [0u8; MAX_RESPONSE_LEN];
    assert_eq!(
        binding_response(&RFC5769_REQUEST, rfc_v4(), &mut out),
        Err(StunError::AuthNotSupported)
    );
}

#[test]
fn auth_attributes_are_refused() {
    for kind in [0x0006u16, 0x0008, 0x001C] {
        for fp in [false, true] {
            let req = request([7; 12], &[(kind, &[1; 20])], fp);
            let mut out = [0u8; MAX_RESPONSE_LEN];
            assert_eq!(
                binding_response(&req, rfc_v4(), &mut out),
                Err(StunError::AuthNotSupported),
                "attribute {kind:#06x}"
            );
        }
    }
}

#[test]
fn ipv4_without_fingerprint() {
    let req = request(RFC5769_TXID, &[], false);
    let mut out = [0xAAu8; MAX_RESPONSE_LEN];
    let n = binding_response(&req, rfc_v4(), &mut out).unwrap();
    assert_eq!(n, 32);
    let (addr, xma, fp) = decode(&out[..n], &RFC5769_TXID);
    assert_eq!(addr, rfc_v4());
    assert_eq!(xma, RFC5769_XMA_V4);
    assert!(!fp);
}

#[test]
fn ipv4_with_fingerprint() {
    // Unknown attributes, both comprehension-required and optional, are ignored.
    let attrs: [(u16, &[u8]); 2] = [(0x0024, &[0x6e, 0, 1, 0xff]), (0x8022, b"test vector")];
    let req = request(RFC5769_TXID, &attrs, true);
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let n = binding_response(&req, rfc_v4(), &mut out).unwrap();
    assert_eq!(n, 40);
    let (addr, xma, fp) = decode(&out[..n], &RFC5769_TXID);
    assert_eq!(addr, rfc_v4());
    assert_eq!(xma, RFC5769_XMA_V4);
    assert!(fp);
}

#[test]
fn ipv6_without_fingerprint() {
    let req = request(RFC5769_TXID, &[], false);
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let n = binding_response(&req, rfc_v6(), &mut out).unwrap();
    assert_eq!(n, 44);
    let (addr, xma, fp) = decode(&out[..n], &RFC5769_TXID);
    assert_eq!(addr, rfc_v6());
    assert_eq!(xma, RFC5769_XMA_V6);
    assert!(!fp);
}

#[test]
fn ipv6_with_fingerprint_is_the_largest_response() {
    let req = request(RFC5769_TXID, &[(0x8022, b"x")], true);
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let n = binding_response(&req, rfc_v6(), &mut out).unwrap();
    assert_eq!(n, 52);
    assert!(
        n <= MAX_RESPONSE_LEN,
        "docs/PROTOCOL.md §7 amplification rule"
    );
    assert!(n <= 64);
    let (addr, xma, fp) = decode(&out[..n], &RFC5769_TXID);
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
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let n = binding_response(&req, mapped, &mut out).unwrap();
    let (addr, xma, _) = decode(&out[..n], &RFC5769_TXID);
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
        let mut out = [0u8; MAX_RESPONSE_LEN];
        let n = binding_response(&req, from, &mut out).unwrap();
        let (addr, _, had_fp) = decode(&out[..n], &txid);
        assert_eq!(addr, from);
        assert_eq!(had_fp, fp);
    }
}

#[test]
fn bad_fingerprint_is_refused() {
    let good = request(RFC5769_TXID, &[(0x8022, b"abc")], true);
    let mut out = [0u8; MAX_RESPONSE_LEN];
    assert!(binding_response(&good, rfc_v4(), &mut out).is_ok());
    // Transaction id, SOFTWARE value, fingerprint value: flips that keep the
    // message well-formed.
    let fp_value = good.len() - 4..good.len();
    for byte in (8..20).chain(24..28).chain(fp_value) {
        let mut bad = good.clone();
        bad[byte] ^= 0x01;
        assert_eq!(
            binding_response(&bad, rfc_v4(), &mut out),
            Err(StunError::BadFingerprint),
            "byte {byte}"
        );
    }
}

#[test]
fn fingerprint_must_be_last_and_four_bytes() {
    let mut req = request(RFC5769_TXID, &[], true);
    // An attribute after FINGERPRINT.
    req.extend_from_slice(&[0x80, 0x22, 0x00, 0x00]);
    let len = (req.len() - 20) as u16;
    req[2..4].copy_from_slice(&len.to_be_bytes());
    let mut out = [0u8; MAX_RESPONSE_LEN];
    assert_eq!(
        binding_response(&req, rfc_v4(), &mut out),
        Err(StunError::Malformed)
    );
    // A FINGERPRINT of the wrong length.
    let req = request(RFC5769_TXID, &[(0x8028, &[0; 8])], false);
    assert_eq!(
        binding_response(&req, rfc_v4(), &mut out),
        Err(StunError::Malformed)
    );
}

#[test]
fn header_checks() {
    let good = request(RFC5769_TXID, &[(0x8022, b"abcd")], false);
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let answer = |m: &[u8], out: &mut [u8]| binding_response(m, rfc_v4(), out);

    assert_eq!(answer(&good[..19], &mut out), Err(StunError::NotStun));
    let mut m = good.clone();
    m[0] |= 0x40;
    assert!(!is_stun(&m));
    assert_eq!(answer(&m, &mut out), Err(StunError::NotStun));
    let mut m = good.clone();
    m[7] ^= 1;
    assert_eq!(answer(&m, &mut out), Err(StunError::NotStun));

    // Binding indication, Binding success response, Allocate request.
    for kind in [0x0011u16, 0x0101, 0x0003] {
        let mut m = good.clone();
        m[0..2].copy_from_slice(&kind.to_be_bytes());
        assert_eq!(answer(&m, &mut out), Err(StunError::NotBindingRequest));
    }

    // Length field not matching the datagram, or not a multiple of 4.
    for delta in [-4i32, -1, 1, 4] {
        let mut m = good.clone();
        let len = (m.len() as i32 - 20 + delta) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(answer(&m, &mut out), Err(StunError::Malformed));
    }
    let mut m = good.clone();
    m.push(0);
    assert_eq!(answer(&m, &mut out), Err(StunError::Malformed));

    // An attribute running past the end (its padding missing).
    let mut m = good.clone();
    m[22..24].copy_from_slice(&5u16.to_be_bytes());
    assert_eq!(answer(&m, &mut out), Err(StunError::Malformed));
    let mut m = good.clone();
    m[22..24].copy_from_slice(&0xFFFFu16.to_be_bytes());
    assert_eq!(answer(&m, &mut out), Err(StunError::Malformed));

    assert_eq!(answer(&good, &mut out), Ok(32));
}

#[test]
fn small_buffer_is_an_error() {
    let req = request(RFC5769_TXID, &[], true);
    let mut out = [0u8; 64];
    for size in 0..52 {
        assert_eq!(
            binding_response(&req, rfc_v6(), &mut out[..size]),
            Err(StunError::BufferTooSmall)
        );
    }
    assert_eq!(binding_response(&req, rfc_v6(), &mut out[..52]), Ok(52));
}

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
fn every_prefix_is_handled_without_panic() {
    let mut out = [0u8; MAX_RESPONSE_LEN];
    let full = request(RFC5769_TXID, &[(0x8022, b"hello"), (0x0024, &[1; 4])], true);
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
                m[2..4].copy_from_slice(&((end - 20) as u16).to_be_bytes());
                let _ = binding_response(&m, rfc_v6(), &mut out);
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
        &[(0x8022, b"software"), (0x0024, &[1; 4])],
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
            let (addr, _, _) = decode(&out[..n], &txid);
            assert_eq!(addr, from);
        }
    }
}

fn v4(last: u8) -> IpAddr {
    Ipv4Addr::new(198, 51, 100, last).into()
}

#[test]
fn limiter_burst_then_refuse_then_refill() {
    let mut lim = SourceRateLimiter::new(2, 3, DEFAULT_BUCKETS);
    let t0 = UnixMillis(1_700_000_000_000);
    let ip = v4(1);
    assert!(lim.allow(t0, ip));
    assert!(lim.allow(t0, ip));
    assert!(lim.allow(t0, ip));
    assert!(!lim.allow(t0, ip), "burst spent");
    // 2 tokens/s: one token every 500 ms.
    assert!(!lim.allow(t0.plus_millis(499), ip));
    assert!(lim.allow(t0.plus_millis(500), ip));
    assert!(!lim.allow(t0.plus_millis(500), ip));
    assert!(lim.allow(t0.plus_millis(1000), ip));
    // A long pause refills to the burst, not beyond.
    let later = t0.plus_millis(60_000);
    for _ in 0..3 {
        assert!(lim.allow(later, ip));
    }
    assert!(!lim.allow(later, ip));
}

#[test]
fn has_token_follows_the_charges_without_taking_any() {
    // 4 tokens/s, burst 2: a drawn-down bucket is at one token 250 ms later.
    let mut lim = SourceRateLimiter::new(4, 2, DEFAULT_BUCKETS);
    let t0 = UnixMillis(1_700_000_000_000);
    let (a, b) = (v4(1), v4(2));
    // Nothing charged yet: every source has a token, asking takes none.
    for _ in 0..10 {
        assert!(lim.has_token(t0, a));
    }
    assert!(lim.allow(t0, a));
    assert!(lim.has_token(t0, a), "one token of two left");
    assert!(lim.allow(t0, a));
    assert!(!lim.has_token(t0, a), "burst spent");
    assert!(
        lim.has_token(t0, b),
        "another source is not charged for a's"
    );
    assert!(!lim.has_token(t0.plus_millis(249), a));
    assert!(lim.has_token(t0.plus_millis(250), a), "refilled one token");
    // Charged again late: the limit holds past the earlier refill time.
    assert!(lim.allow(t0.plus_millis(250), a));
    assert!(!lim.has_token(t0.plus_millis(260), a));
    assert!(lim.has_token(t0.plus_millis(500), a));
    assert!(lim.has_token(t0.plus_millis(10_000), a));
}

#[test]
fn limiter_partial_tokens_accumulate() {
    // 1 token/s, asked every 250 ms: answered once a second.
    let mut lim = SourceRateLimiter::new(1, 1, 16);
    let ip = v4(2);
    let mut allowed = 0;
    for step in 0..=40u64 {
        if lim.allow(UnixMillis(step * 250), ip) {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 11, "t = 0 plus one per second over 10 s");
}

#[test]
fn limiter_sources_are_independent() {
    let mut lim = SourceRateLimiter::new(1, 2, DEFAULT_BUCKETS);
    let a = v4(1);
    // Pick sources whose buckets differ (the hash keys are random).
    let others: Vec<IpAddr> = (2..=255)
        .map(v4)
        .filter(|&ip| lim.bucket_index(ip) != lim.bucket_index(a))
        .take(2)
        .collect();
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    let t = UnixMillis(5_000);
    assert!(lim.allow(t, a));
    assert!(lim.allow(t, a));
    assert!(!lim.allow(t, a));
    for ip in others {
        assert!(lim.allow(t, ip));
        assert!(lim.allow(t, ip));
        assert!(!lim.allow(t, ip));
    }
    if lim.bucket_index(v6) != lim.bucket_index(a) {
        assert!(lim.allow(t, v6));
    }
}

#[test]
fn limiter_groups_ipv6_by_64_and_mapped_ipv4_with_ipv4() {
    let mut lim = SourceRateLimiter::new(1, 1, DEFAULT_BUCKETS);
    let t = UnixMillis(0);
    let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
    assert_eq!(lim.bucket_index(a), lim.bucket_index(b));
    assert!(lim.allow(t, a));
    assert!(!lim.allow(t, b), "same /64, same bucket");

    let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped().into();
    let plain: IpAddr = Ipv4Addr::new(192, 0, 2, 9).into();
    assert_eq!(lim.bucket_index(mapped), lim.bucket_index(plain));
}

#[test]
fn limiter_collisions_share_a_bucket() {
    let mut lim = SourceRateLimiter::new(1, 1, 1);
    let t = UnixMillis(0);
    assert!(lim.allow(t, v4(1)));
    assert!(!lim.allow(t, v4(2)));
}

#[test]
fn limiter_bucket_count_is_a_power_of_two() {
    assert_eq!(SourceRateLimiter::new(1, 1, 0).buckets.len(), 1);
    assert_eq!(SourceRateLimiter::new(1, 1, 1000).buckets.len(), 1024);
    assert_eq!(SourceRateLimiter::new(1, 1, 4096).buckets.len(), 4096);
    assert_eq!(
        SourceRateLimiter::new(1, 1, usize::MAX).buckets.len(),
        MAX_BUCKETS
    );
    assert_eq!(std::mem::size_of::<Bucket>(), 8);
}

#[test]
fn limiter_unlimited_mode() {
    let mut lim = SourceRateLimiter::new(0, 1, DEFAULT_BUCKETS);
    for i in 0..10_000u64 {
        assert!(lim.allow(UnixMillis(i / 100), v4(1)));
    }
}

#[test]
fn limiter_extreme_arguments() {
    let mut lim = SourceRateLimiter::new(u32::MAX, u32::MAX, 4);
    let t = UnixMillis(0);
    for _ in 0..1000 {
        assert!(lim.allow(t, v4(1)));
    }
    // Burst 0 is taken as 1.
    let mut lim = SourceRateLimiter::new(1, 0, 4);
    assert!(lim.allow(t, v4(1)));
    assert!(!lim.allow(t, v4(1)));
    // Time going backwards does not mint tokens.
    let mut lim = SourceRateLimiter::new(1, 1, 4);
    assert!(lim.allow(UnixMillis(10_000), v4(1)));
    assert!(!lim.allow(UnixMillis(0), v4(1)));
    assert!(!lim.allow(UnixMillis(10_999), v4(1)));
    assert!(lim.allow(UnixMillis(11_000), v4(1)));
}

#[test]
fn limiter_survives_long_uptime() {
    let mut lim = SourceRateLimiter::new(1, 2, 8);
    let mut t = UnixMillis(1_000);
    let day = 86_400_000;
    // Drain, then come back after more than 2^32 ms (≈ 49.7 days).
    assert!(lim.allow(t, v4(1)));
    assert!(lim.allow(t, v4(1)));
    assert!(!lim.allow(t, v4(1)));
    t = t.plus_millis(60 * day);
    assert!(lim.allow(t, v4(1)));
    assert!(lim.allow(t, v4(1)));
    assert!(!lim.allow(t, v4(1)));
    // Step across the rebase point in small steps; the rate stays exact.
    let mut allowed = 0;
    for _ in 0..(30 * 24) {
        t = t.plus_millis(3_600_000);
        // Drain this source each hour; each hour earns the full burst of 2.
        while lim.allow(t, v4(1)) {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 30 * 24 * 2);
    // A bucket drained just before a rebase keeps its exact partial refill.
    let mut lim = SourceRateLimiter::new(1, 5, 8);
    let src = v4(3);
    let other = (4..=255)
        .map(v4)
        .find(|&ip| lim.bucket_index(ip) != lim.bucket_index(src))
        .unwrap();
    assert!(lim.allow(UnixMillis(0), other), "sets the epoch");
    let t1 = UnixMillis((1 << 31) - 500);
    for _ in 0..5 {
        assert!(lim.allow(t1, src));
    }
    assert!(!lim.allow(t1, src));
    // Another source triggers the rebase 500 ms later; `src` has half a token.
    let t2 = UnixMillis(1 << 31);
    assert!(lim.allow(t2, other));
    assert!(!lim.allow(t2.plus_millis(499), src));
    assert!(lim.allow(t2.plus_millis(500), src));
    assert!(!lim.allow(t2.plus_millis(500), src));
}
