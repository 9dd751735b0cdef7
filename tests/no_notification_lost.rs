//! No notification lost (docs/PROTOCOL.md §6 "Catch-up" and "Restarts", §7
//! replay window of a new record): a device learns of every change to its
//! account across its own absence, a graceful restart of the node, and a
//! restart that lost the node's state — on real loopback sockets, once per
//! I/O driver.
//!
//! Each case is what a user saw before it was fixed: a phone away for a
//! while reconnected and was told nothing; `systemctl restart` made every
//! device reconnect and lose its unacknowledged bits; a heartbeat captured
//! before a reconnect, replayed from another port, moved the connection.

#[macro_use]
mod node;

use std::net::UdpSocket;
use std::time::Duration;

use mpp::config::IoChoice;
use mpp::packet::Credential;
use mpp::proto::{ClientConfig, ClientEvent, ClientState, DisconnectReason};

use node::{catch_ups, deadline, notifies, now, receives_within, Device, TestNode};

on_both_drivers!(
    absence_then_catch_up,
    absence_beyond_the_window_gets_a_resync,
    graceful_restart_keeps_connections_and_pending_bits,
    restart_without_state_gets_a_resync,
    corrupted_state_is_set_aside_and_devices_resync,
    replay_after_reconnect_is_not_answered,
);

/// A connected device whose first catch-up (a resync: it had no mark) is
/// processed; its mark is the account's Serial.
fn phone(node: &TestNode, credential: &Credential, mark: Option<i64>) -> Device {
    let config = ClientConfig {
        mark,
        ..ClientConfig::default()
    };
    let mut d = Device::with_config(credential, node.udp, config);
    d.connect();
    d
}

/// Disconnects politely and waits for the node to confirm.
fn leave(d: &mut Device) {
    d.client.disconnect(now());
    assert!(
        d.pump_until(|d| d.client.state() == ClientState::Aborted, deadline()),
        "no disconnect confirmation: {:?}",
        d.events
    );
    assert!(
        d.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Disconnected(DisconnectReason::Requested))),
        "{:?}",
        d.events
    );
}

/// The phone is away (disconnected) while two publishes happen; coming back
/// with its mark, it is told exactly what changed.
fn absence_then_catch_up(io: IoChoice) {
    let node = TestNode::start(io);
    let credential = node.credential("ann@example.com", "phone");
    let mut first = phone(&node, &credential, None);
    assert_eq!(catch_ups(&first.events).len(), 1, "no mark: resync first");
    let mark = first.client.mark().expect("the connect answer gave a mark");
    leave(&mut first);

    node.publish("ann@example.com", "05");
    node.publish("ann@example.com", "10");
    // 202 means the publish is queued for its shard; wait until it is applied.
    node.wait_metrics("both publishes applied", |m| {
        m.sum("mpp_publishes_total", &[]) >= 2
    });

    let back = phone(&node, &credential, Some(mark));
    let got = catch_ups(&back.events);
    assert_eq!(got.len(), 1, "{:?}", back.events);
    let (serial, bitmask, resync) = got[0].clone();
    assert!(!resync, "the node held the account: no resync");
    assert_eq!(bitmask, [0x15], "both publishes, nothing else");
    assert_eq!(serial, mark + 2, "the account's Serial after two publishes");
    assert_eq!(back.client.mark(), Some(mark + 2), "the new mark");
    let m = node.wait_metrics("one catch-up acknowledged", |m| {
        m.sum("mpp_catch_ups_acked_total", &[]) >= 2
    });
    assert_eq!(m.sum("mpp_catch_ups_total", &[]), 1);
    assert_eq!(m.sum("mpp_resyncs_total", &[]), 1, "the first connect's");
}

/// Away longer than the catch-up window: the account's record is gone, and
/// the device is told to resynchronise everything, never nothing.
fn absence_beyond_the_window_gets_a_resync(io: IoChoice) {
    let node = TestNode::start_with(io, |c| c.catch_up_window_secs = 1);
    let credential = node.credential("bob@example.com", "phone");
    let mut first = phone(&node, &credential, None);
    let mark = first.client.mark().expect("mark");
    leave(&mut first);
    node.wait_metrics("the account's record expired", |m| {
        m.sum("mpp_accounts_expired_total", &[]) >= 1
    });
    node.publish("bob@example.com", "02");
    node.wait_metrics("the publish applied", |m| {
        m.sum("mpp_publishes_total", &[]) >= 1
    });
    let back = phone(&node, &credential, Some(mark));
    let got = catch_ups(&back.events);
    assert_eq!(got.len(), 1, "{:?}", back.events);
    assert!(got[0].2, "a resync: {got:?}");
    assert_eq!(got[0].1, [0xFF; 32]);
}

/// SIGTERM and start (as `systemctl restart` does): the device keeps its
/// connection (no 404, no reconnect), and a notify it never received is
/// sent again by the new node.
fn graceful_restart_keeps_connections_and_pending_bits(io: IoChoice) {
    let mut node = TestNode::start(io);
    let credential = node.credential("cat@example.com", "phone");
    let mut d = phone(&node, &credential, None);
    node.publish("cat@example.com", "07");
    // The notify is lost: read from the device's socket and dropped, so the
    // node keeps the bit pending, unacknowledged.
    let mut buf = [0u8; 2048];
    d.socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    d.socket.recv(&mut buf).expect("the notify arrives");

    let down = node.restart(|_| {});
    assert!(down < Duration::from_secs(10), "restart took {down:?}");

    // The restored node resends the pending notify at once.
    let got = d.wait_notify();
    assert_eq!(got.len(), 1, "{:?}", d.events);
    assert_eq!(got[0].1, [0x07]);
    // A heartbeat is answered by the new node: the connection survived.
    d.client.request_status(now());
    assert!(
        d.pump_until(|d| d.client.state() == ClientState::Connected, deadline()),
        "{:?}",
        d.events
    );
    assert!(
        !d.events
            .iter()
            .any(|e| matches!(e, ClientEvent::Disconnected(_))),
        "the device never noticed the restart: {:?}",
        d.events
    );
    let m = node.wait_metrics("the notify acknowledged on the new node", |m| {
        m.sum("mpp_notifies_acked_total", &[]) >= 1
    });
    assert_eq!(m.sum("mpp_connections", &[]), 1);
    assert_eq!(m.sum("mpp_connects_total", &[]), 0, "no reconnect");
    assert_eq!(m.sum("mpp_refused_total", &[]), 0, "no 404");
}

/// A restart that lost the node's state (as a crash does): the device's next
/// packet gets 404, it connects again after a short random delay, and is told
/// to resynchronise — which covers a publish accepted before it was back.
fn restart_without_state_gets_a_resync(io: IoChoice) {
    let mut node = TestNode::start(io);
    let credential = node.credential("dan@example.com", "phone");
    let mut d = phone(&node, &credential, None);
    node.restart(|c| c.keep_state = false);
    node.publish("dan@example.com", "01");
    node.wait_metrics("the publish applied", |m| {
        m.sum("mpp_publishes_total", &[]) >= 1
    });
    d.client.request_status(now());
    assert!(
        d.pump(|e| catch_ups(e).len() >= 2, deadline()),
        "no reconnect and resync: {:?}",
        d.events
    );
    let refused = d.events.iter().any(|e| {
        matches!(
            e,
            ClientEvent::Disconnected(DisconnectReason::Refused { status: 404, .. })
        )
    });
    assert!(refused, "the node said it forgot us: {:?}", d.events);
    let last = catch_ups(&d.events).pop().expect("a catch-up");
    assert!(last.2, "a resync: {last:?}");
    assert!(notifies(&d.events).is_empty());
}

/// A state file changed on disk: the node starts empty (the file moved
/// aside, one warning), and its devices reconnect and resynchronise.
fn corrupted_state_is_set_aside_and_devices_resync(io: IoChoice) {
    let mut node = TestNode::start(io);
    let credential = node.credential("eve@example.com", "phone");
    let mut d = phone(&node, &credential, None);
    let (result, _) = node.stop();
    result.expect("stopped");
    let file = node.dir.path().join("state").join("shard-0.bin");
    let mut bytes = std::fs::read(&file).expect("a saved state");
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&file, &bytes).expect("write");
    node.start_again();
    assert!(
        node.dir
            .path()
            .join("state.rejected")
            .join("shard-0.bin")
            .exists(),
        "the rejected state is kept for inspection"
    );
    d.client.request_status(now());
    assert!(
        d.pump(|e| catch_ups(e).len() >= 2, deadline()),
        "no reconnect and resync: {:?}",
        d.events
    );
    assert!(catch_ups(&d.events).pop().expect("catch-up").2);
}

/// docs/PROTOCOL.md §7: a heartbeat captured in the device's earlier
/// connection, replayed from another port after the device reconnected, gets
/// no answer and does not move the connection.
fn replay_after_reconnect_is_not_answered(io: IoChoice) {
    let node = TestNode::start(io);
    let credential = node.credential("fay@example.com", "phone");
    let mut first = phone(&node, &credential, None);
    let heartbeat = first.sent.last().expect("the status request").clone();
    leave(&mut first);
    // The device comes back as a new client that kept its mark and its last
    // Serial (as `mpp subscribe --state` keeps them).
    let config = ClientConfig {
        mark: first.client.mark(),
        first_serial: Some(first.client.highest_serial_sent() + 1),
        ..ClientConfig::default()
    };
    let mut back = Device::with_config(&credential, node.udp, config);
    back.connect();

    let before = node.metrics();
    let replays = before.drops("replay");
    let attacker = UdpSocket::bind("127.0.0.1:0").expect("bind");
    attacker.send_to(&heartbeat, node.udp).expect("send");
    assert_eq!(
        receives_within(&attacker, Duration::from_secs(1)),
        None,
        "the node answered a heartbeat of an earlier connection"
    );
    let m = node.wait_metrics("the replay dropped", |m| m.drops("replay") > replays);
    assert_eq!(m.drops("replay"), replays + 1);
    assert_eq!(
        m.sum("mpp_migrations_total", &[]),
        0,
        "the endpoint did not move"
    );
    // The device is still served where it is.
    node.publish("fay@example.com", "03");
    assert_eq!(back.wait_notify()[0].1, [0x03]);
}
