//! Revocation and master-key rotation under a running node
//! (docs/PROTOCOL.md §7.11), on real loopback sockets, once per I/O driver:
//! changes made to the data directory (as `mppd credential revoke` and
//! `mppd key rotate` make them) take effect on every shard without a
//! restart, and survive restarts.

#[macro_use]
mod node;

use mpp::config::IoChoice;
use mpp::node::keyring;
use mpp::proto::{ClientEvent, ClientState, DisconnectReason};
use mpp::time::UnixMillis;

use node::{deadline, now, Device, TestNode};

on_both_drivers!(
    revoking_a_device_takes_effect_without_restart,
    revocations_survive_a_restart,
    a_key_rotation_keeps_old_credentials_for_the_grace_only,
);

fn refused_with(d: &Device, status: i64) -> bool {
    d.events.iter().any(|e| {
        matches!(
            e,
            ClientEvent::Disconnected(DisconnectReason::Refused { status: s, .. }) if *s == status
        )
    })
}

/// Revoking the phone: the account's connections are dropped within
/// seconds, the laptop comes back at once, the phone's credential is refused
/// with 401, and a credential issued afterwards works.
fn revoking_a_device_takes_effect_without_restart(io: IoChoice) {
    let node = TestNode::start(io);
    let mut phone = node.device("rita@example.com", "phone");
    let mut laptop = node.device("rita@example.com", "laptop");

    let generation =
        keyring::revoke(node.dir.path(), "rita@example.com", Some("phone")).expect("revoked");
    assert_eq!(generation, 1);
    node.wait_metrics("the revocation applied", |m| {
        m.sum("mpp_connections_revoked_total", &[]) >= 2
    });
    assert_eq!(node.metrics().sum("mpp_revocations", &[]), 1);

    for d in [&mut phone, &mut laptop] {
        d.client.request_status(now());
    }
    assert!(
        phone.pump_until(|d| d.client.state() == ClientState::Aborted, deadline()),
        "{:?}",
        phone.events
    );
    assert!(
        refused_with(&phone, 404) && refused_with(&phone, 401),
        "{:?}",
        phone.events
    );
    assert!(
        laptop.pump_until(
            |d| d.client.state() == ClientState::Connected && refused_with(d, 404),
            deadline()
        ),
        "the laptop reconnects: {:?}",
        laptop.events
    );
    // The control API issues at the new generation.
    let mut again = node.device("rita@example.com", "phone");
    node.publish("rita@example.com", "09");
    assert_eq!(again.wait_notify().last().expect("a notify").1, [0x09]);
}

/// A revocation made while the node is stopped: after the restart, the
/// restored connections of that account are dropped and the revoked
/// credential is refused.
fn revocations_survive_a_restart(io: IoChoice) {
    let mut node = TestNode::start(io);
    let mut phone = node.device("sam@example.com", "phone");
    let (result, _) = node.stop();
    result.expect("stopped");
    keyring::revoke(node.dir.path(), "sam@example.com", None).expect("revoked");
    node.start_again();
    assert_eq!(
        node.metrics().sum("mpp_connections", &[]),
        0,
        "dropped at restore"
    );
    phone.client.request_status(now());
    assert!(
        phone.pump_until(|d| d.client.state() == ClientState::Aborted, deadline()),
        "{:?}",
        phone.events
    );
    assert!(refused_with(&phone, 401), "{:?}", phone.events);
    // Still in force after another restart.
    node.restart(|_| {});
    assert_eq!(node.metrics().sum("mpp_revocations", &[]), 1);
}

/// A rotation: an old-key device keeps its connection and its notifies
/// during the grace period and can reconnect with its credential; a
/// credential issued now uses the new key; when the grace ends (a second
/// rotation with no grace), the old key no longer authenticates.
fn a_key_rotation_keeps_old_credentials_for_the_grace_only(io: IoChoice) {
    let node = TestNode::start(io);
    let old_credential = node.credential("tom@example.com", "phone");
    let mut old = Device::new(&old_credential, node.udp);
    old.connect();

    let seconds = UnixMillis::from_system_clock().seconds();
    keyring::rotate(node.dir.path(), seconds, 3600, &mut rand::thread_rng()).expect("rotated");
    node.wait_metrics("the new key in force", |m| {
        m.sum("mpp_master_key_parity", &[]) == 1
    });
    let mut new = node.device("tom@example.com", "laptop");
    node.publish("tom@example.com", "02");
    for d in [&mut old, &mut new] {
        assert_eq!(d.wait_notify().last().expect("a notify").1, [0x02]);
    }
    // The old credential connects again (a second client of it, above the
    // Serials the first one used).
    let config = mpp::proto::ClientConfig {
        first_serial: Some(old.client.highest_serial_sent() + 1),
        ..mpp::proto::ClientConfig::default()
    };
    let mut old_again = Device::with_config(&old_credential, node.udp, config);
    old_again.connect();

    // A second rotation without grace: the first key is gone.
    keyring::rotate(node.dir.path(), seconds, 0, &mut rand::thread_rng()).expect("rotated");
    node.wait_metrics("the second rotation in force", |m| {
        m.sum("mpp_master_key_parity", &[]) == 0
    });
    let auth_before = node.metrics().drops("auth");
    old_again.client.request_status(now());
    old_again.pump_for(std::time::Duration::from_millis(500));
    node.wait_metrics("old-key packets no longer open", |m| {
        m.drops("auth") > auth_before
    });
    assert_eq!(
        old_again.client.state(),
        ClientState::Unacknowledged,
        "no answer"
    );
}
