//! Instructions per heartbeat, for `valgrind --tool=callgrind`: the same work
//! as `benches/server.rs` (one connection; `Service::handle_datagram` of a
//! sealed `PresenceHeartbeat`, then `poll_transmit` of the sealed
//! `PresenceStatus`), over heartbeats sealed in advance.
//!
//! ```sh
//! cargo build --release --example heartbeat_cost
//! valgrind --tool=callgrind --toggle-collect='*run_heartbeats*' \
//!     target/release/examples/heartbeat_cost 20000
//! ```
//!
//! Instructions per heartbeat = the reported `Collected` count / N. Only
//! `run_heartbeats` is counted, so set-up and the client-side sealing are
//! excluded. Without valgrind it prints the wall-clock time per heartbeat.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use mpp::proto::Service;

#[path = "../benches/support/server_setup.rs"]
mod server_setup;

use server_setup::{heartbeat, server_with, NOW};

#[inline(never)]
fn run_heartbeats(server: &mut Service, from: SocketAddr, packets: &[Vec<u8>], buf: &mut [u8]) {
    for p in packets {
        server.handle_datagram(NOW, from, black_box(p));
        let t = server.poll_transmit(NOW, buf).expect("a reply");
        black_box(t.size);
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N: number of heartbeats"))
        .unwrap_or(20_000);
    let (mut server, creds) = server_with(1);
    let cred = &creds[0];
    let from = SocketAddr::from(([127, 0, 0, 1], 1024));
    let mut buf = vec![0u8; 1232];
    let first_serial = NOW.0 as i64 / 1000;
    let packets: Vec<Vec<u8>> = (1..=n as i64)
        .map(|i| heartbeat(cred, first_serial + i))
        .collect();
    let start = Instant::now();
    run_heartbeats(&mut server, from, &packets, &mut buf);
    let elapsed = start.elapsed();
    assert_eq!(server.stats().dropped_replay, 0);
    println!(
        "{n} heartbeats, {:.0} ns each (wall clock)",
        elapsed.as_nanos() as f64 / n as f64
    );
}
