//! Instructions per heartbeat, for `valgrind --tool=callgrind`: the same work
//! as `benches/server.rs` (one connection; `Server::handle_datagram` of a
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

#[inline(never)]
fn run_heartbeats(server: &mut Server, from: SocketAddr, packets: &[Vec<u8>], buf: &mut [u8]) {
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
    let master = MasterKey::new([7; 32]);
    let mut rng = StdRng::seed_from_u64(1);
    let mut server = Server::new(
        ServerConfig::default(),
        MasterKey::new([7; 32]),
        [3; 32],
        NOW,
    );
    let cred = Credential::issue(
        &master,
        "account0",
        "phone",
        UnixSeconds(1_900_000_000),
        vec![],
        &mut rng,
    )
    .expect("credential");
    let from = SocketAddr::from(([127, 0, 0, 1], 1024));
    let mut buf = vec![0u8; 1232];
    let first_serial = NOW.0 as i64 / 1000;
    let connect = Message::ConnectRequest(PresenceConnectRequest {
        account: Some(cred.account.as_str().into()),
        device: Some(cred.device.as_str().into()),
        expires: Some(cred.expires),
        binding: Some((&cred.binding[..]).into()),
        header: ClientHeader {
            serial: Some(first_serial),
            ..ClientHeader::default()
        },
    });
    server.handle_datagram(NOW, from, &packet(&cred, &connect, 0));
    while server.poll_transmit(NOW, &mut buf).is_some() {}

    let packets: Vec<Vec<u8>> = (1..=n as i64)
        .map(|i| {
            let serial = first_serial + i;
            let m = Message::Heartbeat(PresenceHeartbeat {
                header: ClientHeader {
                    serial: Some(serial),
                    ..ClientHeader::default()
                },
            });
            packet(&cred, &m, serial as u64)
        })
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
