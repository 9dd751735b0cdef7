//! A deterministic in-memory network with a virtual clock, driving the
//! sans-IO server and clients (s2n-quic style knobs: loss, delay jitter,
//! reordering, duplication, corruption; fixed seeds).
//!
//! Addresses are plain values here: no packet leaves the process.

#![allow(dead_code)]

use std::net::SocketAddr;

use mpp::packet::{Credential, MasterKey};
use mpp::proto::{Client, ClientConfig, ClientEvent, Service, ServiceConfig, Transmit};
use mpp::time::{UnixMillis, UnixSeconds};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Network impairments.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Knobs {
    /// Probability a datagram is lost.
    pub(crate) loss: f64,
    /// Probability a datagram is delivered twice.
    pub(crate) duplicate: f64,
    /// Probability one byte of a datagram is flipped.
    pub(crate) corrupt: f64,
    /// Base one-way delay (ms).
    pub(crate) delay_ms: u64,
    /// Extra random delay up to this (ms): reorders datagrams.
    pub(crate) jitter_ms: u64,
}

pub(crate) const SERVER_ADDR: &str = "127.0.0.1:15099";
pub(crate) const START: UnixMillis = UnixMillis(1_795_262_400_000); // 2026-11-21T12:00:00Z

pub(crate) struct Device {
    pub(crate) client: Client,
    pub(crate) addr: SocketAddr,
    pub(crate) events: Vec<ClientEvent>,
    /// When false the device neither sends nor receives (powered off).
    pub(crate) online: bool,
}

struct InFlight {
    at: UnixMillis,
    seq: u64,
    to_server: bool,
    device: usize,
    from: SocketAddr,
    bytes: Vec<u8>,
}

pub(crate) struct Sim {
    pub(crate) now: UnixMillis,
    pub(crate) knobs: Knobs,
    pub(crate) rng: StdRng,
    pub(crate) master: MasterKey,
    pub(crate) server: Service,
    pub(crate) devices: Vec<Device>,
    flight: Vec<InFlight>,
    seq: u64,
    /// Every datagram the server received, with its source: for replay attacks.
    pub(crate) captured_to_server: Vec<(SocketAddr, Vec<u8>)>,
    pub(crate) capture: bool,
}

/// The simulated node's address.
pub(crate) fn server_addr() -> SocketAddr {
    SERVER_ADDR.parse().expect("addr")
}

impl Sim {
    pub(crate) fn new(seed: u64, knobs: Knobs, config: ServiceConfig) -> Self {
        let master = MasterKey::new([7; 32]);
        let server = Service::new(config, MasterKey::new([7; 32]), [seed as u8; 32], START);
        Sim {
            now: START,
            knobs,
            rng: StdRng::seed_from_u64(seed),
            master,
            server,
            devices: Vec::new(),
            flight: Vec::new(),
            seq: 0,
            captured_to_server: Vec::new(),
            capture: false,
        }
    }

    pub(crate) fn credential(&mut self, account: &str, device: &str, ttl_secs: i64) -> Credential {
        let expires = UnixSeconds(self.now.seconds().0 + ttl_secs);
        Credential::issue(
            &self.master,
            account,
            device,
            expires,
            vec![SERVER_ADDR.into()],
            &mut self.rng,
        )
        .expect("valid credential")
    }

    /// Adds a device for `account`; returns its index.
    pub(crate) fn add_device(&mut self, account: &str, config: ClientConfig) -> usize {
        let i = self.devices.len();
        let cred = self.credential(account, &format!("device{i}"), 86_400);
        self.add_device_with(&cred, config)
    }

    pub(crate) fn add_device_with(&mut self, cred: &Credential, config: ClientConfig) -> usize {
        let i = self.devices.len();
        let seed: [u8; 32] = self.rng.gen();
        self.devices.push(Device {
            client: Client::new(cred, server_addr(), config, self.now, seed),
            addr: SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16)),
            events: Vec::new(),
            online: true,
        });
        i
    }

    fn send(&mut self, to_server: bool, device: usize, from: SocketAddr, bytes: Vec<u8>) {
        let k = self.knobs;
        if self.rng.gen_bool(k.loss) {
            return;
        }
        let copies = if self.rng.gen_bool(k.duplicate) { 2 } else { 1 };
        for _ in 0..copies {
            let mut b = bytes.clone();
            if self.rng.gen_bool(k.corrupt) && !b.is_empty() {
                let i = self.rng.gen_range(0..b.len());
                b[i] ^= 1 << self.rng.gen_range(0..8);
            }
            let jitter = if k.jitter_ms > 0 {
                self.rng.gen_range(0..=k.jitter_ms)
            } else {
                0
            };
            self.seq += 1;
            self.flight.push(InFlight {
                at: self.now.plus_millis(k.delay_ms + jitter),
                seq: self.seq,
                to_server,
                device,
                from,
                bytes: b,
            });
        }
    }

    /// Loses every datagram on its way to the node right now.
    pub(crate) fn lose_in_flight_to_server(&mut self) -> usize {
        let before = self.flight.len();
        self.flight.retain(|p| !p.to_server);
        before - self.flight.len()
    }

    /// Moves every queued datagram onto the network.
    pub(crate) fn flush(&mut self) {
        let mut buf = vec![0u8; 2048];
        for i in 0..self.devices.len() {
            while let Some(t) = self.devices[i].client.poll_transmit(&mut buf) {
                if self.devices[i].online {
                    let from = self.devices[i].addr;
                    self.send(true, i, from, buf[..t.size].to_vec());
                }
            }
            while let Some(e) = self.devices[i].client.poll_event() {
                self.devices[i].events.push(e);
            }
        }
        let server_addr: SocketAddr = SERVER_ADDR.parse().expect("addr");
        while let Some(Transmit {
            destination, size, ..
        }) = self.server.poll_transmit(self.now, &mut buf)
        {
            let device = self.devices.iter().position(|d| d.addr == destination);
            if let Some(d) = device {
                self.send(false, d, server_addr, buf[..size].to_vec());
            }
        }
    }

    fn next_time(&self) -> Option<UnixMillis> {
        let mut t = self.server.poll_timeout();
        let mut consider = |x: Option<UnixMillis>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for d in &self.devices {
            consider(d.client.poll_timeout());
        }
        consider(self.flight.iter().map(|p| p.at).min());
        t
    }

    /// Runs the simulation until `until` (virtual time).
    pub(crate) fn run_until(&mut self, until: UnixMillis) {
        self.flush();
        let mut steps = 0u64;
        while let Some(t) = self.next_time() {
            if t > until {
                break;
            }
            steps += 1;
            assert!(steps < 5_000_000, "simulation did not settle");
            self.now = self.now.max(t);
            self.step();
        }
        self.now = self.now.max(until);
        self.step();
    }

    pub(crate) fn run_for(&mut self, ms: u64) {
        let until = self.now.plus_millis(ms);
        self.run_until(until);
    }

    fn step(&mut self) {
        let now = self.now;
        // Deliver due datagrams in (time, sequence) order.
        let mut due: Vec<InFlight> = Vec::new();
        let mut i = 0;
        while i < self.flight.len() {
            if self.flight[i].at <= now {
                due.push(self.flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|p| (p.at, p.seq));
        for p in due {
            if p.to_server {
                if self.capture {
                    self.captured_to_server.push((p.from, p.bytes.clone()));
                }
                self.server.handle_datagram(now, p.from, &p.bytes);
            } else if self.devices[p.device].online {
                self.devices[p.device].client.handle_datagram(now, &p.bytes);
            }
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        for d in &mut self.devices {
            if d.client.poll_timeout().is_some_and(|t| t <= now) {
                d.client.handle_timeout(now);
            }
        }
        self.flush();
    }

    pub(crate) fn publish(&mut self, account: &str, mask: &[u8]) -> usize {
        let n = self
            .server
            .handle_publish(self.now, account, mask)
            .expect("valid mask");
        self.flush();
        n
    }

    /// Notify events a device has seen, catch-ups at connect left out: (serial, mask).
    pub(crate) fn notifies(&self, device: usize) -> Vec<(i64, Vec<u8>)> {
        self.devices[device]
            .events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Notify {
                    serial,
                    bitmask,
                    catch_up: false,
                    ..
                } => Some((*serial, bitmask.clone())),
                _ => None,
            })
            .collect()
    }

    /// Catch-ups a device was given at connect: (serial, mask, resync).
    pub(crate) fn catch_ups(&self, device: usize) -> Vec<(i64, Vec<u8>, bool)> {
        self.devices[device]
            .events
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Notify {
                    serial,
                    bitmask,
                    catch_up: true,
                    resync,
                } => Some((*serial, bitmask.clone(), *resync)),
                _ => None,
            })
            .collect()
    }

    /// The bitmasks of the notify events a device has seen, in order.
    pub(crate) fn masks(&self, device: usize) -> Vec<Vec<u8>> {
        self.notifies(device).into_iter().map(|(_, m)| m).collect()
    }

    /// True when no connection has unacknowledged notify state.
    pub(crate) fn all_acknowledged(&self) -> bool {
        let t = self.server.table();
        (0..t.slot_bound()).all(|s| {
            let slot = mpp::table::Slot(s);
            t.get(slot).is_none_or(|r| !r.in_use()) || t.pending_mask(slot).is_empty()
        })
    }
}

/// A node's answer to a device, opened and decoded.
pub(crate) type Answer = mpp::codec::Message<'static>;

impl Sim {
    /// Hands the node, from device `d`'s address and conn id, a packet
    /// holding `json` (a client message in its JSON text form), as a client
    /// that builds its own messages would; what the node sends back at once.
    pub(crate) fn send_raw(&mut self, d: usize, json: &str) -> Vec<Answer> {
        let message = mpp::codec::Message::from_json_str(json).expect("a message");
        let conn_id = self.devices[d].client.conn_id();
        let key = self
            .master
            .secret(conn_id)
            .key(mpp::packet::Direction::ClientToServer, conn_id);
        let nonce: [u8; 12] = self.rng.gen();
        let packet = mpp::packet::seal(&key, conn_id, nonce, &message.to_vec()).expect("sealed");
        let from = self.devices[d].addr;
        self.server.handle_datagram(self.now, from, &packet);
        self.answers(d)
    }

    /// Everything the node has queued, which must all be for device `d`,
    /// opened and decoded (taken off the node, not delivered).
    pub(crate) fn answers(&mut self, d: usize) -> Vec<Answer> {
        let conn_id = self.devices[d].client.conn_id();
        let key = self
            .master
            .secret(conn_id)
            .key(mpp::packet::Direction::ServerToClient, conn_id);
        let mut buf = vec![0u8; 2048];
        let mut out = Vec::new();
        while let Some(t) = self.server.poll_transmit(self.now, &mut buf) {
            assert_eq!(t.destination, self.devices[d].addr, "an answer to another");
            let plain = mpp::packet::open(&key, &buf[..t.size]).expect("sealed for the device");
            let m = mpp::codec::Message::decode_liberal(&plain).expect("a message");
            out.push(mpp::codec::Message::from_json(&m.to_json()).expect("round trip"));
        }
        out
    }
}
