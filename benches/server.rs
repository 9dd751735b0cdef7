//! A full server `handle_datagram` for one heartbeat — key derivation, AEAD
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn
//! open, decode, replay window, then the `PresenceStatus` reply encoded and
//! sealed by `poll_transmit` — with one connection held, and with 100,000.

use std::net::SocketAddr;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};
use mpp::codec::{ClientHeader, Message, PresenceConnectRequest, PresenceHeartbeat};
use mpp::packet::{seal, Credential, Direction, MasterKey};
use mpp::proto::{Server, ServerConfig};
use mpp::time::{UnixMillis, UnixSeconds};
use rand::rngs::StdRng;
use rand::SeedableRng;

const NOW: UnixMillis = UnixMillis(1_795_262_400_000);

fn packet(cred: &Credential, message: &Message<'_>, nonce: u64) -> Vec<u8> {
    let key = cred.secret.key(Direction::ClientToServer, cred.conn_id);
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&nonce.to_be_bytes());
    seal(&key, cred.conn_id, n, &message.to_vec()).expect("seal")
}

fn connect(cred: &Credential) -> Vec<u8> {
    let m = Message::ConnectRequest(PresenceConnectRequest {
        account: Some(cred.account.as_str().into()),
        device: Some(cred.device.as_str().into()),
        expires: Some(cred.expires),
        binding: Some((&cred.binding[..]).into()),
        header: ClientHeader {
            serial: Some(NOW.0 as i64 / 1000),
            ..ClientHeader::default()
        },
    });
    packet(cred, &m, 0)
}

fn heartbeat(cred: &Credential, serial: i64) -> Vec<u8> {
    let m = Message::Heartbeat(PresenceHeartbeat {
        header: ClientHeader {
            serial: Some(serial),
            ..ClientHeader::default()
        },
    });
    packet(cred, &m, serial as u64)
}

fn server_with(devices: usize) -> (Server, Vec<Credential>) {
    let master = MasterKey::new([7; 32]);
    let mut rng = StdRng::seed_from_u64(1);
    let mut server = Server::new(
        ServerConfig::default(),
        MasterKey::new([7; 32]),
        [3; 32],
        NOW,
    );
    let mut buf = vec![0u8; 1232];
    let creds: Vec<Credential> = (0..devices)
        .map(|i| {
            Credential::issue(
                &master,
                &format!("account{i}"),
                "phone",
                UnixSeconds(1_900_000_000),
                vec![],
                &mut rng,
            )
            .expect("credential")
        })
        .collect();
    for (i, c) in creds.iter().enumerate() {
        let from = SocketAddr::from(([127, 0, 0, 1], 1024 + (i % 60_000) as u16));
        server.handle_datagram(NOW, from, &connect(c));
        while server.poll_transmit(NOW, &mut buf).is_some() {}
    }
    (server, creds)
}

fn bench(c: &mut Criterion) {
    for devices in [1usize, 100_000] {
        let (mut server, creds) = server_with(devices);
        let mut serial = NOW.0 as i64 / 1000;
        let mut buf = vec![0u8; 1232];
        let mut which = 0usize;
        c.bench_function(
            &format!("server/heartbeat_round_trip/{devices}_connections"),
            |b| {
                b.iter_batched(
                    || {
                        serial += 1;
                        which = (which + 7919) % creds.len();
                        let cred = &creds[which];
                        let from =
                            SocketAddr::from(([127, 0, 0, 1], 1024 + (which % 60_000) as u16));
                        (from, heartbeat(cred, serial))
                    },
                    |(from, datagram)| {
                        server.handle_datagram(NOW, from, black_box(&datagram));
                        let t = server.poll_transmit(NOW, &mut buf).expect("a reply");
                        black_box(t.size)
                    },
                    BatchSize::SmallInput,
                )
            },
        );
        assert_eq!(server.stats().dropped_replay, 0);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
