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
//!
//! `heartbeat_cost N crypto` runs only the node's per-packet crypto of a
//! heartbeat round trip instead (`run_crypto`: derive `S`, `k_c2s` and
//! `k_s2c`, open the 84-byte heartbeat, expand `k_s2c` and seal a 136-byte
//! reply), to count that part alone:
//!
//! ```sh
//! valgrind --tool=callgrind --toggle-collect='*run_crypto*' \
//!     target/release/examples/heartbeat_cost 20000 crypto
//! ```
//!
//! Either count depends on which AES-GCM the process runs (`MPP_CRYPTO`,
//! `src/packet/mod.rs`); it prints which.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use mpp::packet::{
    open_in_place, seal_in_place, ConnId, Direction, MasterKey, PacketKey, OVERHEAD,
};
use mpp::proto::Service;

#[path = "../benches/support/server_setup.rs"]
mod server_setup;

use server_setup::{heartbeat, server_with, FIRST_HEARTBEAT_SERIAL, NOW};

#[inline(never)]
fn run_heartbeats(server: &mut Service, from: SocketAddr, packets: &[Vec<u8>], buf: &mut [u8]) {
    for p in packets {
        server.handle_datagram(NOW, from, black_box(p));
        let t = server.poll_transmit(NOW, buf).expect("a reply");
        black_box(t.size);
    }
}

/// The node's crypto for each heartbeat, as `Service` does it: one packet
/// opened, one reply sealed, every key derived afresh.
#[inline(never)]
fn run_crypto(master: &MasterKey, conn_id: ConnId, packets: &[Vec<u8>], reply_len: usize) {
    let mut scratch = [0u8; 1232];
    let mut out = [0u8; 1232];
    for p in packets {
        let secret = master.expanded_secret(black_box(conn_id));
        let key = secret.key(Direction::ClientToServer);
        let reply_key = secret.key_bytes(Direction::ServerToClient);
        let packet = &mut scratch[..p.len()];
        packet.copy_from_slice(p);
        let opened = open_in_place(&key, packet).map(|t| t.len());
        black_box(opened.expect("authentic"));
        let key = PacketKey::new(&reply_key);
        let size = seal_in_place(&key, conn_id, [5; 12], &mut out, black_box(reply_len));
        black_box(size.expect("sealed"));
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("N: number of heartbeats"))
        .unwrap_or(20_000);
    if std::env::args().nth(2).as_deref() == Some("crypto") {
        let master = MasterKey::new([7; 32]);
        let conn_id = ConnId([1, 2, 3, 4, 0xff, 0x8d, 0x98, 0x19]);
        let key = master.packet_key(conn_id, Direction::ClientToServer);
        // A heartbeat's plaintext is 48 bytes (tests/vectors/crypto.json),
        // the PresenceStatus reply's about 100 (7 blocks).
        let packets: Vec<Vec<u8>> = (0..n as u64)
            .map(|i| {
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&i.to_be_bytes());
                mpp::packet::seal(&key, conn_id, nonce, &[0x5a; 48]).expect("seal")
            })
            .collect();
        let start = Instant::now();
        run_crypto(&master, conn_id, &packets, 100);
        let elapsed = start.elapsed();
        println!(
            "{n} heartbeats' crypto ({}), {:.0} ns each (wall clock), reply {} bytes",
            mpp::packet::aes_gcm_implementation(),
            elapsed.as_nanos() as f64 / n as f64,
            100 + OVERHEAD
        );
        return;
    }
    let (mut server, creds) = server_with(1);
    let cred = &creds[0];
    let from = SocketAddr::from(([127, 0, 0, 1], 1024));
    let mut buf = vec![0u8; 1232];
    let first_serial = FIRST_HEARTBEAT_SERIAL;
    let packets: Vec<Vec<u8>> = (1..=n as i64)
        .map(|i| heartbeat(cred, first_serial + i))
        .collect();
    let start = Instant::now();
    run_heartbeats(&mut server, from, &packets, &mut buf);
    let elapsed = start.elapsed();
    assert_eq!(server.stats().dropped_replay, 0);
    println!(
        "{n} heartbeats ({}), {:.0} ns each (wall clock)",
        mpp::packet::aes_gcm_implementation(),
        elapsed.as_nanos() as f64 / n as f64
    );
}
