//! Client and server state machines over a simulated network with a virtual
//! clock: delivery, loss, reordering, duplication, corruption, replay,
//! forgery, expiry and reconnection (docs/PROTOCOL.md §6, §7).

mod sim;

use mpp::proto::{ClientConfig, ClientEvent, ClientState, DisconnectReason, ServiceConfig};
use sim::{Knobs, Sim, SERVER_ADDR};

fn connected(sim: &Sim, d: usize) -> bool {
    sim.devices[d].client.state() == ClientState::Connected
}

#[test]
fn clean_network_delivers_and_acknowledges() {
    let mut sim = Sim::new(1, Knobs::default(), ServiceConfig::default());
    let a = sim.add_device("alice@example.com", ClientConfig::default());
    let b = sim.add_device("alice@example.com", ClientConfig::default());
    let c = sim.add_device("bob@example.com", ClientConfig::default());
    sim.run_for(100);
    assert!((0..3).all(|d| connected(&sim, d)));
    assert_eq!(sim.server.connections(), 3);

    assert_eq!(sim.publish("alice@example.com", &[0b0001]), 2);
    sim.run_for(100);
    assert_eq!(sim.masks(a), vec![vec![1]]);
    assert_eq!(sim.masks(b), vec![vec![1]]);
    // Both devices of the account got the same Serial.
    assert_eq!(sim.notifies(a)[0].0, sim.notifies(b)[0].0);
    assert!(sim.notifies(c).is_empty());
    assert!(sim.all_acknowledged());
    assert_eq!(sim.server.stats().notifies_acked, 2);
    assert_eq!(sim.server.stats().notifies_retransmitted, 0);

    // A second publish: a new Serial, only the new bits (the old ones were acknowledged).
    sim.publish("alice@example.com", &[0b0100]);
    sim.run_for(100);
    assert_eq!(sim.masks(a), vec![vec![1], vec![4]]);
    let serials: Vec<i64> = sim.notifies(a).iter().map(|n| n.0).collect();
    assert_eq!(
        serials[1],
        serials[0] + 1,
        "the account's Serial is bumped per publish"
    );
    assert!(sim.all_acknowledged());
}

#[test]
fn heartbeats_keep_connections_alive_for_hours() {
    let mut sim = Sim::new(2, Knobs::default(), ServiceConfig::default());
    sim.add_device("alice", ClientConfig::default());
    sim.run_for(3 * 3600 * 1000);
    assert!(connected(&sim, 0));
    assert_eq!(sim.server.connections(), 1);
    assert_eq!(sim.server.stats().expired, 0);
    assert!(sim.server.stats().heartbeats >= 3 * 60 - 1);
}

/// Every publish is acknowledged in the end, whatever the network does.
#[test]
fn impaired_networks_lose_no_notification() {
    let knob_sets = [
        Knobs {
            loss: 0.10,
            ..Knobs::default()
        },
        Knobs {
            loss: 0.30,
            delay_ms: 20,
            jitter_ms: 200,
            ..Knobs::default()
        },
        Knobs {
            duplicate: 0.3,
            jitter_ms: 500,
            ..Knobs::default()
        },
        Knobs {
            corrupt: 0.2,
            loss: 0.1,
            jitter_ms: 50,
            ..Knobs::default()
        },
        Knobs {
            loss: 0.2,
            duplicate: 0.2,
            corrupt: 0.05,
            delay_ms: 5,
            jitter_ms: 1500,
        },
    ];
    for (k, knobs) in knob_sets.iter().enumerate() {
        for seed in 0..6u64 {
            let mut sim = Sim::new(100 + seed * 10 + k as u64, *knobs, ServiceConfig::default());
            let accounts = ["a@x", "b@x", "c@x"];
            for i in 0..9 {
                sim.add_device(accounts[i % 3], ClientConfig::default());
            }
            // A publish reaches the devices connected at that moment: wait for all.
            for _ in 0..600 {
                if (0..9).all(|d| connected(&sim, d)) {
                    break;
                }
                sim.run_for(1_000);
            }
            assert_eq!(
                sim.server.connections(),
                9,
                "not all devices connected: {knobs:?} seed {seed}: {:?}",
                (0..9)
                    .map(|d| (sim.devices[d].client.state(), sim.devices[d].events.clone()))
                    .collect::<Vec<_>>()
            );
            let mut published = [0u8; 3];
            for round in 0..6u8 {
                for (i, account) in accounts.iter().enumerate() {
                    let bit = 1u8 << ((round + i as u8) % 8);
                    published[i] |= bit;
                    sim.publish(account, &[bit]);
                }
                sim.run_for(700);
            }
            // Long enough for retransmissions, then heartbeats, then reconnects.
            sim.run_for(15 * 60 * 1000);
            let ctx = format!("knobs {knobs:?} seed {seed}");
            assert!(sim.all_acknowledged(), "unacknowledged state left: {ctx}");
            for d in 0..9 {
                let seen = sim
                    .notifies(d)
                    .iter()
                    .fold(0u8, |acc, (_, m)| acc | m.first().copied().unwrap_or(0));
                // Every published bit reached the device; more is allowed
                // (an unacknowledged resync joins the next notify).
                assert_eq!(
                    seen & published[d % 3],
                    published[d % 3],
                    "device {d} missed bits: {ctx}; state {:?}, events {:?}",
                    sim.devices[d].client.state(),
                    sim.devices[d].events
                );
            }
            assert!(
                (0..9).all(|d| sim.devices[d].client.state() != ClientState::Aborted),
                "{ctx}"
            );
        }
    }
}

#[test]
fn notify_lost_five_times_is_recovered_by_the_next_heartbeat() {
    let mut sim = Sim::new(3, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    // Connected, and its address validated (the probe of D35 answered).
    sim.run_for(1_100);
    assert_eq!(sim.server.stats().validations, 1);
    // The device goes deaf while the node retransmits (1+2+4+8+16 s).
    sim.devices[d].online = false;
    sim.publish("alice", &[0x80]);
    sim.run_for(40_000);
    assert_eq!(sim.server.stats().notifies_retransmitted, 5);
    assert!(sim.notifies(d).is_empty());
    sim.devices[d].online = true;
    sim.run_for(61_000);
    assert_eq!(sim.masks(d), vec![vec![0x80]]);
    assert!(sim.all_acknowledged());
}

/// Publishes that reach a device before its notify goes out merge into that
/// one notify and arm one retransmission timer, started when it is sent: a
/// publish flood costs the node a mask OR per device, not a timer each.
#[test]
fn publishes_merged_into_one_notify_arm_one_timer_at_send_time() {
    let mut sim = Sim::new(4, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    sim.devices[d].online = false;
    let now = sim.now;
    for bit in [0x01, 0x02, 0x04] {
        assert_eq!(sim.server.handle_publish(now, "alice", &[bit]), Ok(1));
    }
    assert_eq!(sim.server.armed_timers(), 0, "nothing sent yet");
    assert_eq!(sim.server.transmit_backlog(), 1, "one notify queued");
    sim.run_for(10);
    assert_eq!(sim.server.armed_timers(), 1);
    assert_eq!(sim.server.transmit_backlog(), 0);
    // The device is deaf: the node resends after 1 s, then 2 s, ...
    sim.run_for(980);
    assert_eq!(sim.server.stats().notifies_retransmitted, 0);
    sim.run_for(40);
    assert_eq!(sim.server.stats().notifies_retransmitted, 1);
    sim.devices[d].online = true;
    sim.run_for(2_100);
    assert_eq!(
        sim.masks(d),
        vec![vec![0x07]],
        "one notify, the merged mask"
    );
    assert!(sim.all_acknowledged());
    // The last resend's timer finds it acknowledged, fires and is gone.
    sim.run_for(8_000);
    assert_eq!(sim.server.armed_timers(), 0);
}

#[test]
fn replayed_packets_change_nothing_and_get_no_reply() {
    let mut sim = Sim::new(4, Knobs::default(), ServiceConfig::default());
    sim.capture = true;
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    sim.publish("alice", &[1]);
    sim.run_for(100);
    sim.run_for(61_000); // a heartbeat too
    let captured = std::mem::take(&mut sim.captured_to_server);
    assert!(captured.len() >= 3, "connect, ack, heartbeat captured");
    let endpoint_before = sim.devices[d].addr;
    let stats_before = sim.server.stats().clone();
    let attacker: std::net::SocketAddr = "127.0.0.99:4444".parse().expect("addr");
    let mut buf = vec![0u8; 2048];
    for (_, bytes) in &captured {
        sim.server.handle_datagram(sim.now, attacker, bytes);
        assert!(
            sim.server.poll_transmit(sim.now, &mut buf).is_none(),
            "a replayed packet was answered"
        );
    }
    let stats = sim.server.stats();
    assert_eq!(
        stats.dropped_replay,
        stats_before.dropped_replay + captured.len() as u64
    );
    assert_eq!(stats.migrations, stats_before.migrations);
    assert_eq!(stats.connects, stats_before.connects);
    // The device's endpoint did not move: a publish still reaches it.
    sim.publish("alice", &[2]);
    sim.run_for(100);
    assert_eq!(sim.masks(d).last(), Some(&vec![2]));
    assert_eq!(sim.devices[d].addr, endpoint_before);
}

#[test]
fn forged_packets_change_nothing() {
    let mut sim = Sim::new(5, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    let conn_id = sim.devices[d].client.conn_id();
    let before = sim.server.stats().clone();
    let attacker: std::net::SocketAddr = "127.0.0.99:4444".parse().expect("addr");
    let mut buf = vec![0u8; 2048];
    for len in [0usize, 1, 7, 8, 20, 36, 37, 100, 1232, 1233, 3000] {
        let mut forged: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
        if len >= 8 {
            forged[..8].copy_from_slice(&conn_id.0);
        }
        sim.server.handle_datagram(sim.now, attacker, &forged);
        assert!(sim.server.poll_transmit(sim.now, &mut buf).is_none());
    }
    let after = sim.server.stats();
    assert_eq!(after.connects, before.connects);
    assert_eq!(after.migrations, before.migrations);
    assert_eq!(
        after.dropped_auth + after.dropped_malformed,
        before.dropped_auth + before.dropped_malformed + 11
    );
    sim.publish("alice", &[1]);
    sim.run_for(100);
    assert_eq!(sim.masks(d), vec![vec![1]]);
}

#[test]
fn nat_rebinding_moves_the_endpoint() {
    let mut sim = Sim::new(6, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    sim.devices[d].addr = "127.0.0.1:31000".parse().expect("addr");
    sim.run_for(61_000); // the next heartbeat comes from the new port
    assert_eq!(sim.server.stats().migrations, 1);
    sim.publish("alice", &[1]);
    sim.run_for(100);
    assert_eq!(sim.masks(d), vec![vec![1]]);
    assert_eq!(sim.devices[d].client.endpoint(), Some(sim.devices[d].addr));
}

#[test]
fn silent_devices_expire_and_reconnect_when_back() {
    let mut sim = Sim::new(7, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    sim.devices[d].online = false;
    sim.run_for(2 * 60_000 + 11_000);
    assert_eq!(
        sim.server.connections(),
        0,
        "dropped after 2 x ConnectionTimeout"
    );
    assert_eq!(sim.server.stats().expired, 1);
    sim.devices[d].online = true;
    // The client noticed its heartbeats failing and is reconnecting; within a
    // reconnect period it is connected again.
    sim.run_for(61_000);
    sim.run_for(1_000);
    assert!(
        connected(&sim, d),
        "state {:?}",
        sim.devices[d].client.state()
    );
    assert_eq!(sim.server.connections(), 1);
    assert!(sim.devices[d]
        .events
        .iter()
        .any(|e| matches!(e, ClientEvent::Disconnected(DisconnectReason::Timeout))));
}

#[test]
fn node_forgetting_a_connection_makes_the_client_reconnect() {
    let mut sim = Sim::new(8, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    // A restarted node: same master key, empty table.
    let fresh = mpp::proto::Service::new(
        ServiceConfig::default(),
        mpp::packet::MasterKey::new([7; 32]),
        [9; 32],
        sim.now,
    );
    sim.server = fresh;
    sim.run_for(61_000);
    assert!(connected(&sim, d));
    assert_eq!(sim.server.connections(), 1);
    assert!(sim.devices[d].events.iter().any(|e| matches!(
        e,
        ClientEvent::Disconnected(DisconnectReason::Refused { status: 404, .. })
    )));
}

#[test]
fn restarted_client_resumes_above_the_highest_serial() {
    let mut sim = Sim::new(9, Knobs::default(), ServiceConfig::default());
    let cred = sim.credential("alice", "phone", 86_400);
    let d = sim.add_device_with(&cred, ClientConfig::default());
    sim.run_for(100);
    for _ in 0..3 {
        sim.run_for(61_000);
    }
    // Burn Serials so that 1 falls below the replay window.
    for _ in 0..70 {
        sim.devices[d].client.request_endpoint();
    }
    sim.run_for(100);
    // The device reboots: same credential, Serials from 1 again.
    sim.devices[d].online = false;
    let old_addr = sim.devices[d].addr;
    sim.devices[d].addr = "127.0.0.2:1".parse().expect("addr");
    let from_one = ClientConfig {
        first_serial: Some(1),
        ..ClientConfig::default()
    };
    let e = sim.add_device_with(&cred, from_one);
    sim.devices[e].addr = old_addr;
    sim.run_for(500);
    assert!(
        connected(&sim, e),
        "state {:?}",
        sim.devices[e].client.state()
    );
    sim.publish("alice", &[3]);
    sim.run_for(100);
    assert_eq!(sim.masks(e), vec![vec![3]]);
    assert!(
        sim.server.stats().dropped_replay >= 1,
        "the stale connect was refused first"
    );
}

#[test]
fn expired_or_invalid_credentials_are_refused() {
    let mut sim = Sim::new(10, Knobs::default(), ServiceConfig::default());
    let expired = sim.credential("alice", "old", -10);
    let d = sim.add_device_with(&expired, ClientConfig::default());
    let mut forged = sim.credential("alice", "phone", 3600);
    forged.device = "laptop".into(); // binding no longer matches
    let f = sim.add_device_with(&forged, ClientConfig::default());
    sim.run_for(100);
    assert_eq!(sim.devices[d].client.state(), ClientState::Aborted);
    assert_eq!(sim.devices[f].client.state(), ClientState::Aborted);
    assert!(sim.devices[d].events.iter().any(|e| matches!(
        e,
        ClientEvent::Disconnected(DisconnectReason::Refused { status: 403, .. })
    )));
    assert!(sim.devices[f].events.iter().any(|e| matches!(
        e,
        ClientEvent::Disconnected(DisconnectReason::Refused { status: 401, .. })
    )));
    assert_eq!(sim.server.connections(), 0);
}

#[test]
fn credential_expiry_ends_a_live_connection() {
    let mut sim = Sim::new(11, Knobs::default(), ServiceConfig::default());
    let cred = sim.credential("alice", "phone", 90);
    let d = sim.add_device_with(&cred, ClientConfig::default());
    sim.run_for(100);
    assert!(connected(&sim, d));
    sim.run_for(130_000);
    assert_eq!(sim.server.connections(), 0);
    assert_eq!(sim.devices[d].client.state(), ClientState::Aborted);
}

#[test]
fn connection_limit_refuses_with_503() {
    let config = ServiceConfig {
        max_connections: 2,
        ..ServiceConfig::default()
    };
    let mut sim = Sim::new(12, Knobs::default(), config);
    for _ in 0..3 {
        sim.add_device("alice", ClientConfig::default());
    }
    sim.run_for(100);
    assert_eq!(sim.server.connections(), 2);
    assert!(sim.devices[2].events.iter().any(|e| matches!(
        e,
        ClientEvent::Disconnected(DisconnectReason::Refused { status: 503, .. })
    )));
    assert_eq!(sim.devices[2].client.state(), ClientState::Disconnected);
    // When a place frees up, the refused device gets in at its next attempt.
    sim.devices[0].client.disconnect(sim.now);
    sim.run_for(61_000);
    assert_eq!(sim.devices[0].client.state(), ClientState::Aborted);
    assert!(connected(&sim, 2));
}

#[test]
fn endpoint_and_resolve() {
    let mut sim = Sim::new(13, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    sim.devices[d].client.request_endpoint();
    sim.devices[d].client.resolve(vec![0xAB; 40]);
    sim.run_for(100);
    let addr = sim.devices[d].addr;
    assert!(sim.devices[d].events.contains(&ClientEvent::Endpoint(addr)));
    let Some(mpp::proto::ServiceEvent::ResolveUpstream { token, query }) = sim.server.poll_event()
    else {
        panic!("no upstream query");
    };
    assert_eq!(query, vec![0xAB; 40]);
    // A large answer travels as fragments (docs/PROTOCOL.md §5).
    let answer: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    sim.server.handle_resolve_answer(token, Ok(&answer));
    sim.run_for(100);
    assert!(sim.devices[d]
        .events
        .contains(&ClientEvent::Resolved(Ok(answer))));
    // An upstream that never answers: 504 after the timeout.
    sim.devices[d].client.resolve(vec![1; 20]);
    sim.run_for(6_000);
    assert!(sim.devices[d]
        .events
        .contains(&ClientEvent::Resolved(Err(504))));
}

#[test]
fn web_transport_answers_without_moving_the_endpoint() {
    let mut sim = Sim::new(14, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    // The device sends an endpoint request over HTTPS instead of UDP.
    sim.devices[d].client.request_endpoint();
    let mut buf = vec![0u8; 2048];
    let n = sim.devices[d]
        .client
        .poll_transmit(&mut buf)
        .expect("a packet")
        .size;
    let peer: std::net::SocketAddr = "127.0.0.5:443".parse().expect("addr");
    let id = mpp::proto::WebRequestId(77);
    sim.server.handle_web_request(sim.now, peer, &buf[..n], id);
    let mut out = vec![0u8; 2048];
    let t = sim
        .server
        .poll_transmit(sim.now, &mut out)
        .expect("a reply");
    assert_eq!(t.web, Some(id));
    sim.devices[d]
        .client
        .handle_datagram(sim.now, &out[..t.size]);
    assert!(sim.devices[d].client.poll_event() == Some(ClientEvent::Endpoint(peer)));
    assert_eq!(sim.server.stats().migrations, 0);
    // Notifies still go to the UDP endpoint.
    sim.publish("alice", &[9]);
    sim.run_for(100);
    assert_eq!(sim.masks(d), vec![vec![9]]);
}

#[test]
fn notifies_after_a_node_restart_are_not_taken_for_duplicates() {
    let mut sim = Sim::new(15, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    sim.publish("alice", &[1]);
    sim.run_for(100);
    // The node restarts (same master key, empty table) a little later.
    sim.run_for(5_000);
    sim.server = mpp::proto::Service::new(
        ServiceConfig::default(),
        mpp::packet::MasterKey::new([7; 32]),
        [8; 32],
        sim.now,
    );
    sim.run_for(61_000); // the heartbeat gets 404, the client reconnects
    assert!(connected(&sim, d));
    sim.publish("alice", &[0x80]);
    sim.run_for(100);
    assert_eq!(sim.masks(d), vec![vec![1], vec![0x80]]);
    let serials: Vec<i64> = sim.notifies(d).iter().map(|n| n.0).collect();
    // D4: each life of the account starts at a random point of
    // [2^20, 2^20 + 2^30), and each life saw one publish.
    let life = (1i64 << 20)..=(1i64 << 20) + (1i64 << 30);
    for s in &serials {
        assert!(life.contains(s), "Serial {s} outside {life:?}");
    }
    assert_ne!(
        serials[0], serials[1],
        "the account's Serials did not restart at a new random point"
    );
}

#[test]
fn an_old_connect_replayed_from_a_forged_source_creates_nothing() {
    let mut sim = Sim::new(16, Knobs::default(), ServiceConfig::default());
    sim.capture = true;
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    let (_, connect) = sim.captured_to_server[0].clone();
    sim.devices[d].client.disconnect(sim.now);
    sim.run_for(100);
    assert_eq!(sim.server.connections(), 0);
    // Long after (beyond 2 x ConnectionTimeout), an attacker replays the
    // Connect with the victim's address as source.
    sim.run_for(130_000);
    let victim: std::net::SocketAddr = "127.0.0.77:5000".parse().expect("addr");
    let conn_id = sim.devices[d].client.conn_id();
    let key = sim
        .master
        .secret(conn_id)
        .key(mpp::packet::Direction::ServerToClient, conn_id);
    let limited = sim.server.stats().refusals_rate_limited;
    let mut buf = vec![0u8; 2048];
    let mut answered = 0;
    for _ in 0..100 {
        sim.server.handle_datagram(sim.now, victim, &connect);
        while let Some(t) = sim.server.poll_transmit(sim.now, &mut buf) {
            assert_eq!(t.destination, victim);
            assert!(t.size <= connect.len(), "an answer larger than the replay");
            // D3: PresenceErrorInvalidSerial, with the current time as the
            // Serial to continue above.
            let plain = mpp::packet::open(&key, &buf[..t.size]).expect("sealed for the device");
            match mpp::codec::Message::decode_liberal(&plain).expect("a message") {
                mpp::codec::Message::ErrorInvalidSerial(m) => {
                    assert_eq!(m.serial, Some(sim.now.seconds().0));
                }
                other => panic!("not an invalid-Serial refusal: {other:?}"),
            }
            answered += 1;
        }
    }
    assert_eq!(
        sim.server.connections(),
        0,
        "the replay recreated the connection"
    );
    // D5: the burst of one (source, conn id), then nothing (no time passes).
    assert_eq!(answered, 20, "refusals not rate-limited to the burst");
    assert_eq!(sim.server.stats().refusals_rate_limited - limited, 80);
}

#[test]
fn replayed_packets_of_a_gone_connection_get_rate_limited_refusals() {
    let mut sim = Sim::new(17, Knobs::default(), ServiceConfig::default());
    sim.capture = true;
    sim.add_device("alice", ClientConfig::default());
    sim.run_for(61_000); // connect + a heartbeat
    let (_, heartbeat) = sim.captured_to_server.last().cloned().expect("captured");
    let conn_id = sim.devices[0].client.conn_id();
    sim.devices[0].online = false;
    sim.run_for(200_000); // the connection expires
    assert_eq!(sim.server.connections(), 0);
    let victim: std::net::SocketAddr = "127.0.0.77:5000".parse().expect("addr");
    let key = sim
        .master
        .secret(conn_id)
        .key(mpp::packet::Direction::ServerToClient, conn_id);
    let mut buf = vec![0u8; 2048];
    let mut refusals = 0;
    for _ in 0..100 {
        sim.server.handle_datagram(sim.now, victim, &heartbeat);
        while let Some(t) = sim.server.poll_transmit(sim.now, &mut buf) {
            assert_eq!(t.destination, victim);
            let plain = mpp::packet::open(&key, &buf[..t.size]).expect("sealed for the device");
            match mpp::codec::Message::decode_liberal(&plain).expect("a message") {
                mpp::codec::Message::ErrorRefused(r) => {
                    assert_eq!(r.header.status, Some(404));
                    refusals += 1;
                }
                other => panic!("not a 404: {other:?}"),
            }
        }
    }
    assert_eq!(
        refusals, 20,
        "the burst of one (source, conn id), then nothing"
    );
}

/// docs/PROTOCOL.md §7.8: refusals are limited per source *and* conn id, so
/// a host replaying one device's packets from an address does not use up
/// the refusals another device behind that address is owed.
#[test]
fn refusals_are_limited_per_source_and_conn_id() {
    let mut sim = Sim::new(41, Knobs::default(), ServiceConfig::default());
    sim.capture = true;
    let a = sim.add_device("alice", ClientConfig::default());
    let b = sim.add_device("bob", ClientConfig::default());
    sim.run_for(2_000);
    let packet_of = |sim: &Sim, d: usize| {
        let id = sim.devices[d].client.conn_id();
        sim.captured_to_server
            .iter()
            .rev()
            .find(|(_, p)| p[..8] == id.0)
            .map(|(_, p)| p.clone())
            .expect("captured")
    };
    let (pa, pb) = (packet_of(&sim, a), packet_of(&sim, b));
    // The node forgets both connections (as after a crash).
    sim.server = mpp::proto::Service::new(
        ServiceConfig::default(),
        sim.master.clone(),
        [9; 32],
        sim.now,
    );
    let nat: std::net::SocketAddr = "198.51.100.1:7000".parse().expect("addr");
    let mut buf = vec![0u8; 2048];
    let mut count = |sim: &mut Sim, packet: &[u8], n: usize| {
        let mut answered = 0;
        for _ in 0..n {
            sim.server.handle_datagram(sim.now, nat, packet);
            while sim.server.poll_transmit(sim.now, &mut buf).is_some() {
                answered += 1;
            }
        }
        answered
    };
    assert_eq!(count(&mut sim, &pa, 100), 20, "a's burst");
    assert_eq!(count(&mut sim, &pb, 1), 1, "b still gets its 404");
}

/// docs/PROTOCOL.md §7.9: a connection's resolves are rate-limited (10/s,
/// burst 20); beyond, each gets Status 429 at once.
#[test]
fn resolves_are_rate_limited_per_connection() {
    let mut sim = Sim::new(43, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(2_000);
    for _ in 0..30 {
        sim.devices[d].client.resolve(vec![0x12, 0x34, 1, 0, 0, 1]);
    }
    sim.run_for(10);
    let mut asked = 0;
    while let Some(e) = sim.server.poll_event() {
        let mpp::proto::ServiceEvent::ResolveUpstream { token, .. } = e else {
            continue;
        };
        sim.server
            .handle_resolve_answer(token, Ok(&[0x12, 0x34, 0x81, 0x80]));
        asked += 1;
    }
    sim.run_for(100);
    let statuses: Vec<_> = sim.devices[d]
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Resolved(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(asked, 20, "the burst went upstream");
    assert_eq!(statuses.iter().filter(|r| r.is_ok()).count(), 20);
    assert_eq!(statuses.iter().filter(|r| **r == Err(429)).count(), 10);
    assert_eq!(sim.server.stats().resolves_limited, 10);
}

#[test]
fn a_connect_over_the_web_transport_waits_for_udp_before_notifying() {
    let mut sim = Sim::new(18, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    // The connect goes over HTTPS instead of UDP.
    let mut buf = vec![0u8; 2048];
    let n = sim.devices[d]
        .client
        .poll_transmit(&mut buf)
        .expect("the connect")
        .size;
    let peer: std::net::SocketAddr = "127.0.0.5:443".parse().expect("addr");
    sim.server
        .handle_web_request(sim.now, peer, &buf[..n], mpp::proto::WebRequestId(1));
    let mut out = vec![0u8; 2048];
    let t = sim
        .server
        .poll_transmit(sim.now, &mut out)
        .expect("connect response");
    assert!(t.web.is_some());
    sim.devices[d]
        .client
        .handle_datagram(sim.now, &out[..t.size]);
    assert_eq!(sim.server.connections(), 1);
    // A publish now has no UDP endpoint to go to: nothing is sent…
    sim.server
        .handle_publish(sim.now, "alice", &[4])
        .expect("valid");
    assert!(sim.server.poll_transmit(sim.now, &mut out).is_none());
    assert!(!sim.all_acknowledged());
    // …and the pending state reaches the device with its first UDP
    // heartbeat: the published bit, joined with the connect's resync (the
    // device's acknowledgement of the resync names the Serial before the
    // publish, so it clears nothing).
    sim.run_for(61_000);
    let masks = sim.masks(d);
    assert_eq!(masks.len(), 1, "{masks:?}");
    assert_eq!(masks[0][0] & 4, 4, "covers the published store: {masks:?}");
    assert!(sim.all_acknowledged());
}

/// docs/PROTOCOL.md §7.8: only packets for connections the node does not
/// hold are throttled per source after too many authentication failures;
/// a packet for a held connection is always opened.
#[test]
fn a_source_failing_authentication_is_throttled_only_for_unknown_conn_ids() {
    let mut sim = Sim::new(19, Knobs::default(), ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    sim.run_for(100);
    let conn_id = sim.devices[d].client.conn_id();
    // The attacker shares the device's IP address (a NAT), not its port.
    let attacker: std::net::SocketAddr = "127.0.0.1:4444".parse().expect("addr");
    let mut unknown = vec![0x5au8; 80];
    unknown[..8].copy_from_slice(&[9, 9, 9, 9, 9, 9, 9, 9]);
    for _ in 0..1_000 {
        sim.server.handle_datagram(sim.now, attacker, &unknown);
    }
    let stats = sim.server.stats().clone();
    assert_eq!(
        stats.dropped_auth, 200,
        "the burst is decrypted, then no more"
    );
    assert_eq!(stats.dropped_auth_limited, 800);
    // Garbage carrying the device's conn id is opened every time, and never
    // makes the device's own packets wait.
    let mut known = vec![0x5au8; 80];
    known[..8].copy_from_slice(&conn_id.0);
    for _ in 0..1_000 {
        sim.server.handle_datagram(sim.now, attacker, &known);
    }
    let stats = sim.server.stats();
    assert_eq!(stats.dropped_auth, 1_200);
    assert_eq!(stats.dropped_auth_limited, 800);
    sim.publish("alice", &[1]);
    sim.run_for(100);
    assert_eq!(sim.masks(d), vec![vec![1]]);
}

/// What a user saw: a host on the same IP address as a device sent ~150
/// garbage packets a second carrying the device's conn id, and the device
/// got 0 of 30 heartbeats answered. Now every one is (docs/PROTOCOL.md §7.8:
/// honest devices keep at least 90 % of their service).
#[test]
fn a_noisy_neighbour_on_the_same_address_does_not_silence_a_device() {
    let mut sim = Sim::new(23, Knobs::default(), ServiceConfig::default());
    let config = ClientConfig {
        heartbeat_ms: Some(1_000),
        ..ClientConfig::default()
    };
    let d = sim.add_device("alice", config);
    sim.run_for(500);
    assert!(connected(&sim, d));
    let conn_id = sim.devices[d].client.conn_id();
    let neighbour: std::net::SocketAddr = "127.0.0.1:5555".parse().expect("addr");
    let heartbeats_before = sim.server.stats().heartbeats;
    let mut rng_bytes = 1u8;
    for _ in 0..30 {
        for i in 0..150u32 {
            let mut garbage = vec![rng_bytes; 70 + (i % 30) as usize];
            rng_bytes = rng_bytes.wrapping_mul(31).wrapping_add(7);
            if i % 2 == 0 {
                garbage[..8].copy_from_slice(&conn_id.0);
            }
            sim.server.handle_datagram(sim.now, neighbour, &garbage);
        }
        sim.run_for(1_000);
    }
    let answered = sim.server.stats().heartbeats - heartbeats_before;
    assert!(answered >= 29, "{answered} of 30 heartbeats answered");
    assert!(
        !sim.devices[d]
            .events
            .iter()
            .any(|e| matches!(e, mpp::proto::ClientEvent::Disconnected(_))),
        "{:?}",
        sim.devices[d].events
    );
}

/// docs/PROTOCOL.md §7.9: a credential holder spoofs the source of a fresh
/// resolve; the victim's address is not validated, so it is sent at most
/// three times the request's bytes (a small "too early" answer), not the
/// 4 KB DNS answer. The real device, back at its own address, echoes the
/// node's challenge and gets its answers whole.
#[test]
fn a_spoofed_resolve_is_not_amplified_towards_the_victim() {
    let mut sim = Sim::new(29, Knobs::default(), ServiceConfig::default());
    let cred = sim.credential("mallory@x", "phone", 3600);
    let d = sim.add_device_with(&cred, ClientConfig::default());
    sim.run_for(2_000);
    assert!(connected(&sim, d));
    assert!(
        sim.server.stats().validations >= 1,
        "the device validated its address"
    );

    // The attacker holds the credential: it seals a fresh resolve and sends
    // it with the victim's address as source.
    let victim: std::net::SocketAddr = "192.0.2.7:53000".parse().expect("addr");
    let key = cred
        .secret
        .key(mpp::packet::Direction::ClientToServer, cred.conn_id);
    let mut buf = vec![0u8; 2048];
    let query = vec![0xAB; 40];
    let n = mpp::proto::seal_request(
        &key,
        cred.conn_id,
        [3; 12],
        i64::from(u32::MAX) - 10,
        &mpp::proto::Request::Resolve(&query),
        &mut buf,
    )
    .expect("sealed");
    sim.server.handle_datagram(sim.now, victim, &buf[..n]);
    let token = match sim.server.poll_event() {
        Some(mpp::proto::ServiceEvent::ResolveUpstream { token, .. }) => token,
        other => panic!("no upstream query: {other:?}"),
    };
    sim.server.handle_resolve_answer(token, Ok(&[0x42; 4096]));
    let mut sent_to_victim = 0;
    let mut out = vec![0u8; 2048];
    while let Some(t) = sim.server.poll_transmit(sim.now, &mut out) {
        if t.destination == victim {
            sent_to_victim += t.size;
        }
    }
    assert!(
        sent_to_victim <= 3 * n,
        "{sent_to_victim} bytes to the victim for a {n}-byte request"
    );
    assert!(sent_to_victim > 0, "one small answer, with the challenge");
    assert_eq!(sim.server.stats().replies_capped, 1);
}
/// Masks a device was given (notifies and catch-ups alike) after event `from`.
fn masks_since(sim: &Sim, device: usize, from: usize) -> Vec<Vec<u8>> {
    sim.devices[device].events[from..]
        .iter()
        .filter_map(|e| match e {
            mpp::proto::ClientEvent::Notify { bitmask, .. } => Some(bitmask.clone()),
            _ => None,
        })
        .collect()
}

/// docs/PROTOCOL.md §6 ("Catch-up", "Restarts"), as an invariant over a run
/// with absences and node restarts, graceful and not: every publish the node
/// accepted is, for every device of its account, delivered or covered by a
/// later catch-up or resync. Devices go away longer than 2 × ConnectionTimeout
/// (they are dropped), come back with their mark; the node restarts keeping
/// its state, then loses it; all through 5 % loss.
#[test]
fn every_publish_is_delivered_or_caught_up_across_absence_and_restarts() {
    for seed in 0..4u64 {
        let knobs = Knobs {
            loss: 0.05,
            ..Knobs::default()
        };
        let mut sim = Sim::new(500 + seed, knobs, ServiceConfig::default());
        let accounts = ["a@x", "b@x"];
        let n = 6;
        for i in 0..n {
            sim.add_device(accounts[i % 2], ClientConfig::default());
        }
        sim.run_for(20_000);
        assert!(
            (0..n).all(|d| connected(&sim, d)),
            "seed {seed}: all connected"
        );
        // (device, event index at the publish, bits) for every publish.
        let mut owed: Vec<(usize, usize, u8)> = Vec::new();
        let publish = |sim: &mut Sim, account: usize, bit: u8, owed: &mut Vec<_>| {
            for d in (0..n).filter(|d| d % 2 == account) {
                owed.push((d, sim.devices[d].events.len(), bit));
            }
            sim.publish(accounts[account], &[bit]);
        };
        for round in 0..8u8 {
            let bit = 1u8 << round;
            match round {
                // Device 0 and 1 go out of coverage for 3 minutes: dropped.
                1 => {
                    sim.devices[0].online = false;
                    sim.devices[1].online = false;
                }
                4 => {
                    sim.devices[0].online = true;
                    sim.devices[1].online = true;
                }
                // A graceful restart: the state saved and taken back.
                5 => {
                    let accounts_saved: Vec<_> =
                        sim.server.saved_accounts().map(|(_, a)| a).collect();
                    let conns: Vec<_> = sim.server.saved_connections().map(|(_, c)| c).collect();
                    let epoch = sim.server.epoch();
                    let mut fresh = mpp::proto::Service::new(
                        ServiceConfig::default(),
                        sim.master.clone(),
                        [seed as u8 + 1; 32],
                        sim.now,
                    );
                    fresh.restore(epoch, &accounts_saved, &conns);
                    sim.server = fresh;
                }
                // A crash: the node starts empty.
                6 => {
                    sim.server = mpp::proto::Service::new(
                        ServiceConfig::default(),
                        sim.master.clone(),
                        [seed as u8 + 2; 32],
                        sim.now,
                    );
                }
                _ => {}
            }
            publish(&mut sim, 0, bit, &mut owed);
            publish(&mut sim, 1, bit, &mut owed);
            // Away for 3 minutes; back, with up to a reconnect period to notice.
            sim.run_for(match round {
                1 => 180_000,
                4 => 120_000,
                _ => 5_000,
            });
        }
        // Long enough for every device to notice, reconnect and catch up.
        sim.run_for(10 * 60 * 1000);
        for (d, from, bit) in owed {
            let union = masks_since(&sim, d, from)
                .iter()
                .fold(0u8, |acc, m| acc | m.first().copied().unwrap_or(0));
            assert_eq!(
                union & bit,
                bit,
                "seed {seed}: device {d} never learned of bit {bit:#04x}: {:?}",
                sim.devices[d].events[from..].to_vec()
            );
        }
        assert!(sim.all_acknowledged(), "seed {seed}");
        // The paths this run was for were taken: the devices that were away
        // were caught up (not resynchronised) when they came back, and after
        // the crash every device was told to resynchronise.
        for d in 0..2 {
            assert!(
                sim.catch_ups(d).iter().any(|(_, _, resync)| !resync),
                "seed {seed}: device {d} came back with a catch-up: {:?}",
                sim.catch_ups(d)
            );
        }
        for d in 0..n {
            let last = sim.catch_ups(d).pop().expect("a catch-up");
            assert!(
                last.2,
                "seed {seed}: device {d} resynchronised after the crash"
            );
        }
    }
}

/// docs/PROTOCOL.md §7.11: revoking a device drops its account's held
/// connections; the others come back, the revoked credential is refused
/// (401), and a credential issued after the revocation works.
#[test]
fn revoking_a_device_refuses_its_credential_and_only_its() {
    let mut sim = Sim::new(31, Knobs::default(), ServiceConfig::default());
    let phone = sim.credential("ann@x", "phone", 3600);
    let laptop = sim.credential("ann@x", "laptop", 3600);
    let p = sim.add_device_with(&phone, ClientConfig::default());
    let l = sim.add_device_with(&laptop, ClientConfig::default());
    sim.run_for(2_000);
    assert!(connected(&sim, p) && connected(&sim, l));

    let mut revocations = mpp::proto::revocation::Revocations::new();
    revocations.revoke_device("ann@x", "phone");
    let generation = revocations.generation("ann@x", "phone");
    sim.server
        .set_revocations(sim.now, std::sync::Arc::new(revocations));
    assert_eq!(
        sim.server.stats().revoked,
        2,
        "both of the account's connections dropped"
    );
    // Their next packets find no connection: 404, connect again.
    sim.devices[p].client.request_status(sim.now);
    sim.devices[l].client.request_status(sim.now);
    sim.run_for(10_000);
    assert!(connected(&sim, l), "the laptop's credential still verifies");
    assert_eq!(sim.devices[p].client.state(), ClientState::Aborted);
    assert!(sim.devices[p].events.iter().any(|e| matches!(
        e,
        mpp::proto::ClientEvent::Disconnected(mpp::proto::DisconnectReason::Refused {
            status: 401,
            ..
        })
    )));
    // A new credential for the phone, issued at the new generation.
    let expires = mpp::time::UnixSeconds(sim.now.seconds().0 + 3600);
    let fresh = mpp::packet::Credential::issue_at_generation(
        &sim.master,
        generation,
        "ann@x",
        "phone",
        expires,
        vec![SERVER_ADDR.into()],
        &mut sim.rng,
    )
    .expect("credential");
    let again = sim.add_device_with(&fresh, ClientConfig::default());
    sim.run_for(2_000);
    assert!(connected(&sim, again));
    sim.publish("ann@x", &[4]);
    sim.run_for(2_000);
    assert!(sim.masks(again).iter().any(|m| m[0] & 4 == 4));
    assert!(sim.masks(l).iter().any(|m| m[0] & 4 == 4));
}

/// docs/PROTOCOL.md §7.11: after a key rotation, credentials of the
/// previous master key keep working until the grace period ends (their
/// notifies sealed with their key); credentials of the new key work at
/// once; after the grace, the old ones no longer authenticate.
#[test]
fn a_key_rotation_keeps_old_credentials_for_the_grace_period_only() {
    let mut sim = Sim::new(37, Knobs::default(), ServiceConfig::default());
    let old_cred = sim.credential("bo@x", "phone", 86_400);
    let old = sim.add_device_with(&old_cred, ClientConfig::default());
    sim.run_for(2_000);
    assert!(connected(&sim, old));

    let previous = sim.master.clone();
    let new_master = mpp::packet::MasterKey::new([0x77; 32]);
    let grace_ends = sim.now.plus_millis(300_000);
    sim.server.set_keys(mpp::proto::KeySet {
        current: new_master.clone(),
        parity: 1,
        previous: Some((previous, grace_ends)),
    });
    sim.master = new_master;
    let new_cred = sim.credential("bo@x", "laptop", 86_400);
    let new = sim.add_device_with(&new_cred, ClientConfig::default());
    sim.run_for(2_000);
    assert!(connected(&sim, new), "a new-key credential connects");
    sim.publish("bo@x", &[2]);
    sim.run_for(2_000);
    for d in [old, new] {
        assert!(
            sim.masks(d).iter().any(|m| m[0] & 2 == 2),
            "device {d} notified during the grace period"
        );
    }
    // The old credential still connects (a reconnect) during the grace.
    let old_again = sim.add_device_with(&old_cred, ClientConfig::default());
    sim.run_for(2_000);
    assert!(connected(&sim, old_again));

    // Past the grace period, only the new key authenticates.
    sim.run_until(grace_ends.plus_millis(1));
    let before = sim.server.stats().dropped_auth;
    sim.publish("bo@x", &[8]);
    sim.run_for(300_000);
    assert!(
        sim.server.stats().dropped_auth > before,
        "old-key packets fail"
    );
    assert!(sim.masks(new).iter().any(|m| m[0] & 8 == 8));
    assert!(!sim.masks(old).iter().any(|m| m[0] & 8 == 8));
    assert!(!connected(&sim, old), "the old credential is out");
}

/// D35 (docs/PROTOCOL.md §7.9): the echo that validates a device's address
/// is lost, and so is the one notify the node sends before validation; its
/// retransmissions are held. The device, whose last answer still carried a
/// challenge, probes with a heartbeat after its retry timeout and gets the
/// pending bits in that heartbeat's answer: within seconds, not at its next
/// heartbeat a minute later.
#[test]
fn a_lost_echo_is_probed_for_and_the_held_notify_arrives_within_seconds() {
    let knobs = Knobs {
        delay_ms: 10,
        ..Knobs::default()
    };
    let mut sim = Sim::new(41, knobs, ServiceConfig::default());
    let d = sim.add_device("alice", ClientConfig::default());
    // t=10: the connect reaches the node; t=20: its answer (with the
    // challenge) reaches the device, which echoes it at once.
    sim.run_for(25);
    assert!(connected(&sim, d));
    assert_eq!(sim.lose_in_flight_to_server(), 1, "the echo, lost");
    assert_eq!(sim.server.stats().validations, 0);
    // The device is deaf while the one notify goes out.
    sim.devices[d].online = false;
    assert_eq!(sim.publish("alice", &[0x01]), 1);
    sim.run_for(200);
    sim.devices[d].online = true;
    sim.run_for(2_000);
    assert!(
        sim.server.stats().retransmits_held >= 1,
        "the node held the retransmission"
    );
    assert_eq!(sim.server.stats().validations, 1, "the probe validated");
    // Delivered by t < 2.3 s, merged with the resync the lost echo also
    // acknowledged (so all ones).
    assert_eq!(sim.masks(d), vec![vec![0xFF; 32]]);
    assert!(sim.all_acknowledged());
}
