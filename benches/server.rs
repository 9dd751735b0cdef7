//! A full server `handle_datagram` for one heartbeat — key derivation, AEAD
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn
//! open, decode, replay window, then the `PresenceStatus` reply encoded and
//! sealed by `poll_transmit` — with one connection held, and with 100,000.

use std::net::SocketAddr;

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion};

#[path = "support/server_setup.rs"]
mod server_setup;

use server_setup::{heartbeat, server_with, FIRST_HEARTBEAT_SERIAL, NOW};

fn bench(c: &mut Criterion) {
    for devices in [1usize, 100_000] {
        let (mut server, creds) = server_with(devices);
        let mut serial = FIRST_HEARTBEAT_SERIAL - 1;
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
