//! STUN on the MPP port (docs/PROTOCOL.md §7–§8): answered through the server
//! state machine, at most 64 bytes, rate-limited per source address.

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
