//! Set-up shared by `benches/server.rs` and `examples/heartbeat_cost.rs`
//! (included by `#[path]`): a server holding N connections, and the sealed
//! client packets that drive it.

use std::net::SocketAddr;

use mpp::codec::{
    ClientHeader, Message, PresenceAcknowledge, PresenceConnectRequest, PresenceHeartbeat,
};
use mpp::packet::{open, seal, Credential, Direction, MasterKey};
use mpp::proto::{Service, ServiceConfig};
use mpp::time::{UnixMillis, UnixSeconds};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The clock every packet and the server share.
pub(crate) const NOW: UnixMillis = UnixMillis(1_795_262_400_000);

/// `message` sealed as a client packet of `cred`, nonce = `nonce`.
fn packet(cred: &Credential, message: &Message<'_>, nonce: u64) -> Vec<u8> {
    let key = cred.secret.key(Direction::ClientToServer, cred.conn_id);
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&nonce.to_be_bytes());
    seal(&key, cred.conn_id, n, &message.to_vec()).expect("seal")
}

/// A `PresenceConnectRequest` of `cred` with Serial = `NOW` in seconds.
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

/// The first Serial the benches' heartbeats may use: the connect took
/// `NOW` in seconds, the acknowledgement that settles it the next one.
pub(crate) const FIRST_HEARTBEAT_SERIAL: i64 = NOW.0 as i64 / 1000 + 2;

/// What a device does after its connect is answered: acknowledge the
/// catch-up (a resync: the bench devices have no mark) and echo the node's
/// challenge, so its address is validated (docs/PROTOCOL.md §6.7, §7.9) and
/// the heartbeats measured are a settled device's.
fn settle(cred: &Credential, answer: &[u8]) -> Vec<u8> {
    let key = cred.secret.key(Direction::ServerToClient, cred.conn_id);
    let plain = open(&key, answer).expect("the connect answer opens");
    let Ok(Message::ConnectResponse(r)) = Message::decode(&plain) else {
        panic!("not a connect answer");
    };
    let m = Message::Acknowledge(PresenceAcknowledge {
        header: ClientHeader {
            serial: Some(FIRST_HEARTBEAT_SERIAL - 1),
            acknowledge: r.serial,
            id: r.header.id.clone(),
            ..ClientHeader::default()
        },
    });
    packet(cred, &m, 1)
}

/// A `PresenceHeartbeat` of `cred` with `serial` (also its nonce).
pub(crate) fn heartbeat(cred: &Credential, serial: i64) -> Vec<u8> {
    let m = Message::Heartbeat(PresenceHeartbeat {
        header: ClientHeader {
            serial: Some(serial),
            ..ClientHeader::default()
        },
    });
    packet(cred, &m, serial as u64)
}

/// A server holding `devices` connections, one per account, connected
/// from 127.0.0.1 ports 1024 + i (mod 60,000); their credentials.
pub(crate) fn server_with(devices: usize) -> (Service, Vec<Credential>) {
    let master = MasterKey::new([7; 32]);
    let mut rng = StdRng::seed_from_u64(1);
    let mut server = Service::new(
        ServiceConfig::default(),
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
        let t = server
            .poll_transmit(NOW, &mut buf)
            .expect("a connect answer");
        let ack = settle(c, &buf[..t.size]);
        while server.poll_transmit(NOW, &mut buf).is_some() {}
        server.handle_datagram(NOW, from, &ack);
        while server.poll_transmit(NOW, &mut buf).is_some() {}
    }
    assert_eq!(
        server.stats().validations,
        devices as u64,
        "every address validated"
    );
    (server, creds)
}
