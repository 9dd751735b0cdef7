//! The state machine's publish → send stamps (`Service::handle_publish_stamped`,
//! `Service::poll_published`), behind the node's `mpp_publish_send_seconds`
//! histogram: a publish's stamp comes back once every notify it queued has
//! been sealed, in order, merged publishes included, and a publish that
//! reached nobody gives nothing back. Virtual time, no sockets.

mod sim;

use mpp::proto::{ClientConfig, ServiceConfig};
use sim::{Knobs, Sim};

/// Seals the next datagram the node has to send; whether there was one.
fn seal_one(sim: &mut Sim) -> bool {
    let mut buf = vec![0u8; 2048];
    let now = sim.now;
    sim.server.poll_transmit(now, &mut buf).is_some()
}

#[test]
fn a_stamp_returns_once_the_last_notify_of_its_publish_is_sealed() {
    let mut sim = Sim::new(7, Knobs::default(), ServiceConfig::default());
    sim.add_device("alice", ClientConfig::default());
    sim.add_device("alice", ClientConfig::default());
    sim.add_device("bob", ClientConfig::default());
    sim.run_for(500);
    assert_eq!(sim.server.transmit_backlog(), 0, "settled");
    let now = sim.now;
    assert_eq!(
        sim.server.handle_publish_stamped(now, "alice", &[1], 11),
        Ok(2)
    );
    // Merged into alice's queued notifies: done when they are.
    assert_eq!(
        sim.server.handle_publish_stamped(now, "alice", &[2], 12),
        Ok(2)
    );
    assert_eq!(
        sim.server.handle_publish_stamped(now, "bob", &[1], 22),
        Ok(1)
    );
    assert_eq!(
        sim.server.handle_publish_stamped(now, "carol", &[1], 33),
        Ok(0),
        "nobody to notify"
    );
    assert_eq!(sim.server.poll_published(), None, "nothing sealed yet");
    assert!(seal_one(&mut sim));
    assert_eq!(
        sim.server.poll_published(),
        None,
        "alice has a second device"
    );
    assert!(seal_one(&mut sim));
    assert_eq!(sim.server.poll_published(), Some(11));
    assert_eq!(sim.server.poll_published(), Some(12));
    assert_eq!(sim.server.poll_published(), None);
    assert!(seal_one(&mut sim));
    assert_eq!(sim.server.poll_published(), Some(22));
    assert_eq!(
        sim.server.poll_published(),
        None,
        "carol's publish left no stamp"
    );
    assert!(!seal_one(&mut sim));
}
