//! STUN on the MPP port (docs/PROTOCOL.md §7–§8): answered through the server
//! state machine, at most 64 bytes and one answer per request, error
//! responses included, rate-limited per source address.

use std::net::SocketAddr;

use mpp::packet::MasterKey;
use mpp::proto::{Service, ServiceConfig};
use mpp::time::UnixMillis;

const NOW: UnixMillis = UnixMillis(1_795_262_400_000);

fn binding_request(txid: u8) -> Vec<u8> {
    let mut r = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    r.extend([txid; 12]);
    r
}

/// A Binding request with one attribute (value padded to 4 bytes) and no
/// FINGERPRINT.
fn request_with(txid: u8, kind: u16, value: &[u8]) -> Vec<u8> {
    let mut r = binding_request(txid);
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&(value.len() as u16).to_be_bytes());
    r.extend_from_slice(value);
    r.resize(r.len().next_multiple_of(4), 0);
    let len = (r.len() - 20) as u16;
    r[2..4].copy_from_slice(&len.to_be_bytes());
    r
}

/// Every answer the service has queued, drained.
fn drain(s: &mut Service) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut buf = vec![0u8; 1500];
    let mut answers = Vec::new();
    while let Some(t) = s.poll_transmit(NOW, &mut buf) {
        answers.push((t.destination, buf[..t.size].to_vec()));
    }
    answers
}

fn server(rate: u32, burst: u32) -> Service {
    let config = ServiceConfig {
        stun_rate_per_sec: rate,
        stun_burst: burst,
        ..ServiceConfig::default()
    };
    Service::new(config, MasterKey::new([1; 32]), [2; 32], NOW)
}

#[test]
fn binding_request_gets_xor_mapped_address() {
    let mut s = server(100, 10);
    let from: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    s.handle_datagram(NOW, from, &binding_request(7));
    let mut buf = vec![0u8; 1500];
    let t = s.poll_transmit(NOW, &mut buf).expect("answered");
    assert_eq!(t.destination, from);
    assert!(t.size <= 64);
    let resp = &buf[..t.size];
    assert_eq!(&resp[..2], &[0x01, 0x01], "Binding success response");
    assert_eq!(&resp[4..8], &[0x21, 0x12, 0xA4, 0x42]);
    assert_eq!(&resp[8..20], &[7; 12], "same transaction id");
    // XOR-MAPPED-ADDRESS: type 0x0020, IPv4, port and address XOR the cookie.
    assert_eq!(&resp[20..22], &[0x00, 0x20]);
    let port = u16::from_be_bytes([resp[26], resp[27]]) ^ 0x2112;
    let ip: Vec<u8> = resp[28..32]
        .iter()
        .zip([0x21, 0x12, 0xA4, 0x42])
        .map(|(a, b)| a ^ b)
        .collect();
    assert_eq!(port, 40000);
    assert_eq!(ip, [127, 0, 0, 1]);
    assert!(
        s.poll_transmit(NOW, &mut buf).is_none(),
        "one answer per request"
    );
    assert_eq!(s.stats().stun_answered, 1);
}

#[test]
fn stun_is_rate_limited_per_source() {
    let mut s = server(10, 5);
    let a: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
    let mut buf = vec![0u8; 1500];
    let mut answered = 0;
    for i in 0..50u8 {
        s.handle_datagram(NOW, a, &binding_request(i));
        while s.poll_transmit(NOW, &mut buf).is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 5, "the burst, then nothing");
    assert_eq!(s.stats().stun_dropped, 45);
    // A second later, ten more tokens.
    let later = NOW.plus_millis(1000);
    for i in 0..50u8 {
        s.handle_datagram(later, a, &binding_request(i));
        while s.poll_transmit(later, &mut buf).is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 10);
}

#[test]
fn malformed_stun_gets_no_answer() {
    let mut s = server(0, 0);
    let from: SocketAddr = "127.0.0.1:1000".parse().expect("addr");
    let mut bad = binding_request(1);
    bad[3] = 4; // claims 4 bytes of attributes that are not there
    s.handle_datagram(NOW, from, &bad);
    let mut not_request = binding_request(1);
    not_request[1] = 0x11; // an indication, not a request
    s.handle_datagram(NOW, from, &not_request);
    let mut buf = vec![0u8; 1500];
    assert!(s.poll_transmit(NOW, &mut buf).is_none());
    assert_eq!(s.stats().stun_dropped, 2);
}

#[test]
fn unknown_attribute_gets_one_420_of_at_most_64_bytes() {
    let mut s = server(100, 10);
    let from: SocketAddr = "127.0.0.1:40001".parse().expect("addr");
    // CHANGE-REQUEST (0x0003): comprehension-required, not understood.
    s.handle_datagram(NOW, from, &request_with(9, 0x0003, &[0, 0, 0, 6]));
    let answers = drain(&mut s);
    assert_eq!(answers.len(), 1, "one answer per request");
    let (to, resp) = &answers[0];
    assert_eq!(*to, from);
    assert!(resp.len() <= 64);
    assert_eq!(&resp[..2], &[0x01, 0x11], "Binding error response");
    assert_eq!(&resp[8..20], &[9; 12], "same transaction id");
    assert_eq!(&resp[20..22], &[0x00, 0x09], "ERROR-CODE");
    assert_eq!(&resp[26..28], &[4, 20], "420");
    assert_eq!(s.stats().stun_answered, 1);
}

#[test]
fn request_with_credentials_we_do_not_hold_is_answered() {
    // docs/PROTOCOL.md D26: USERNAME and MESSAGE-INTEGRITY are ignored.
    let mut s = server(100, 10);
    let from: SocketAddr = "127.0.0.1:40002".parse().expect("addr");
    let mut r = request_with(5, 0x0006, b"alice:bob");
    r.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    r.extend_from_slice(&[0xAB; 20]);
    let len = (r.len() - 20) as u16;
    r[2..4].copy_from_slice(&len.to_be_bytes());
    s.handle_datagram(NOW, from, &r);
    let answers = drain(&mut s);
    assert_eq!(answers.len(), 1);
    let resp = &answers[0].1;
    assert_eq!(&resp[..2], &[0x01, 0x01], "Binding success response");
    assert_eq!(
        resp.len(),
        32,
        "XOR-MAPPED-ADDRESS only, no MESSAGE-INTEGRITY"
    );
}

#[test]
fn error_responses_are_rate_limited_like_success_responses() {
    let mut s = server(10, 5);
    let a: SocketAddr = "127.0.0.1:1001".parse().expect("addr");
    let mut answered = 0;
    for i in 0..30u8 {
        // Alternate 420s, 400s (an attribute running past the end) and
        // successes: one bucket for all of them.
        let req = match i % 3 {
            0 => request_with(i, 0x0024, &[0; 4]),
            1 => {
                let mut r = request_with(i, 0x8022, b"abcd");
                r[22..24].copy_from_slice(&9u16.to_be_bytes());
                r
            }
            _ => binding_request(i),
        };
        s.handle_datagram(NOW, a, &req);
        for (_, resp) in drain(&mut s) {
            assert!(resp.len() <= 64);
            answered += 1;
        }
    }
    assert_eq!(answered, 5, "the burst, then nothing");
    assert_eq!(s.stats().stun_dropped, 25);
}

#[test]
fn every_stun_datagram_gets_at_most_one_answer_of_at_most_64_bytes() {
    let mut s = server(0, 0);
    let from: SocketAddr = "[2001:db8::7]:5000".parse().expect("addr");
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..3000u32 {
        // A Binding request header over random attributes.
        let n = 20 + 4 * (next() % 12) as usize;
        let mut r: Vec<u8> = (0..n).map(|_| next() as u8).collect();
        r[0..2].copy_from_slice(&[0x00, 0x01]);
        r[2..4].copy_from_slice(&((n - 20) as u16).to_be_bytes());
        r[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        if i % 4 == 0 {
            // Plausible attribute types, lengths that fit.
            let mut at = 20;
            while at + 4 <= n {
                let kind: u16 = [0x0003, 0x0024, 0x8022, 0x0006, 0x0008][(next() % 5) as usize];
                let len = (next() % 8) as usize;
                r[at..at + 2].copy_from_slice(&kind.to_be_bytes());
                r[at + 2..at + 4].copy_from_slice(&(len as u16).to_be_bytes());
                at += 4 + len.next_multiple_of(4);
            }
        }
        s.handle_datagram(NOW, from, &r);
        let answers = drain(&mut s);
        assert!(answers.len() <= 1, "one answer per request");
        for (to, resp) in answers {
            assert_eq!(to, from);
            assert!(resp.len() <= 64, "{} bytes", resp.len());
            assert_eq!(&resp[8..20], &r[8..20], "same transaction id");
        }
    }
}
