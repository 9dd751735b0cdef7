//! What the node sent a worker's devices: receiving a batch per socket,
//! opening each packet with its device's key (found from the conn id, no
//! hash table), and acting on the answer: a connect or heartbeat answered,
//! a notify counted against its publish and acknowledged, a refusal.
//!
//! It must not decide what to send next beyond the acknowledgement and the
//! reconnect an answer asks for.

use std::sync::atomic::Ordering::Relaxed;

use mpp::codec::{Message, PresenceNotify, ServiceHeader};
use mpp::net::mmsg::MmsgBatch;
use mpp::packet::open_in_place;

use super::content;
use super::device::DeviceState;
use super::worker::Worker;
use super::{Mode, RING};

impl Worker {
    /// Receives and handles what is waiting on every socket.
    pub(super) fn receive(&mut self, now_us: u64) -> usize {
        let mut total = 0;
        // The batch is taken out while its packets are handled in place.
        let mut inb = std::mem::replace(&mut self.inb, MmsgBatch::new(0));
        for s in 0..self.fds.len() {
            for _ in 0..8 {
                let n = match inb.recv(self.fds[s]) {
                    Ok(n) => n,
                    Err(_) => {
                        self.local.recv_errors += 1;
                        0
                    }
                };
                for i in 0..n {
                    match inb.payload_mut(i) {
                        Some(packet) => self.handle(s, packet, now_us),
                        // Longer than any packet of the protocol.
                        None => self.local.other += 1,
                    }
                }
                total += n;
                if n < inb.capacity() {
                    break;
                }
            }
        }
        self.inb = inb;
        total
    }

    pub(super) fn handle(&mut self, s: usize, packet: &mut [u8], now_us: u64) {
        self.local.received += 1;
        if self.lose() {
            return;
        }
        let Some(g) = self.ident.index_of(packet, self.cfg.devices) else {
            self.local.unknown += 1;
            return;
        };
        let threads = self.cfg.threads as u64;
        if g % threads != self.cfg.index as u64 {
            self.local.unknown += 1;
            return;
        }
        let l = (g / threads) as usize;
        let Some(dev) = self.devices.get_mut(l) else {
            self.local.unknown += 1;
            return;
        };
        let key = if self.cfg.mode == Mode::Echo {
            &dev.keys.c2s
        } else {
            &dev.keys.s2c
        };
        let Ok(plain) = open_in_place(key, packet) else {
            self.local.unauthentic += 1;
            return;
        };
        let Ok(message) = Message::decode(plain) else {
            self.local.other += 1;
            return;
        };
        // docs/PROTOCOL.md §7.9: keep the node's challenge to echo (an
        // answer without one: the address is validated).
        let mut probe = false;
        if let Some(h) = message.service_header() {
            dev.echo =
                h.id.as_deref()
                    .and_then(|id| <[u8; 8]>::try_from(id).ok())
                    .unwrap_or([0; 8]);
            // The echo rides on the device's next packet, which may be
            // lost; until an answer comes without a challenge the node holds
            // its notify retransmissions, so the device asks: a heartbeat
            // (with the echo) --timeout-ms from now (docs/PROTOCOL.md §7.9).
            probe = dev.echo().is_some() && !dev.probing;
            dev.probing |= probe;
        }
        if probe {
            let due = now_us / 1000 + self.cfg.timeout_ms;
            self.probes.push_back((due, l as u32));
        }
        match message {
            Message::Heartbeat(h) if self.cfg.mode == Mode::Echo => {
                if dev.outstanding != 0 && h.header.serial == Some(i64::from(dev.outstanding)) {
                    self.answered(l, now_us);
                    self.local.replies += 1;
                }
            }
            Message::Notify(n) if self.cfg.mode == Mode::RawReceive => {
                self.local.delivered += 1;
                if let Some(serial) = n.serial {
                    self.send_ack(l, serial, now_us);
                }
            }
            Message::ConnectResponse(r) => {
                let ours = self.is_answer(l, &r.header);
                if ours && self.devices[l].state == DeviceState::Connecting {
                    self.answered(l, now_us);
                    self.set_state(l, DeviceState::Connected);
                    self.devices[l].tries = 0;
                    self.local.connected += 1;
                }
                match (r.serial, r.bitmask.as_deref()) {
                    // docs/PROTOCOL.md §6.7: a connect answer carries the
                    // account's current Serial even with nothing pending.
                    (Some(serial), None | Some([])) => self.learn_serial(l, serial),
                    (serial, bitmask) => self.pending_notify(l, serial, bitmask, now_us),
                }
            }
            Message::Status(r) => {
                if self.is_answer(l, &r.header) {
                    let was_rebinding = self.devices[l].rebinding;
                    self.answered(l, now_us);
                    self.local.replies += 1;
                    let dev = &mut self.devices[l];
                    dev.tries = 0;
                    if was_rebinding {
                        dev.rebinding = false;
                        if dev.sock as usize == s {
                            self.local.rebinds_confirmed += 1;
                        }
                    }
                }
                self.pending_notify(l, r.serial, r.bitmask.as_deref(), now_us);
            }
            Message::Notify(PresenceNotify {
                serial, bitmask, ..
            }) => {
                self.pending_notify(l, serial, bitmask.as_deref(), now_us);
            }
            Message::DisconnectResponse(r) => {
                if self.is_answer(l, &r.header)
                    && self.devices[l].state == DeviceState::Disconnecting
                {
                    self.free(l);
                    self.set_state(l, DeviceState::Idle);
                    self.devices[l].tries = 0;
                    self.local.dropped += 1;
                    self.local.disconnects += 1;
                    self.to_connect.push_front(l as u32);
                }
            }
            Message::ErrorInvalidSerial(e) => {
                self.local.invalid_serial += 1;
                let dev = &mut self.devices[l];
                if let Some(h) = e.serial.and_then(|s| u32::try_from(s).ok()) {
                    dev.serial = dev.serial.max(h);
                }
                if dev.outstanding != 0 && self.is_answer(l, &e.header) {
                    let state = self.devices[l].state;
                    self.free(l);
                    if state == DeviceState::Connecting {
                        self.to_connect.push_front(l as u32);
                    }
                }
            }
            Message::ErrorRefused(e) => {
                let status = e.header.status.unwrap_or(0);
                let state = self.devices[l].state;
                self.free(l);
                if state == DeviceState::Connected || state == DeviceState::Disconnecting {
                    self.local.dropped += 1;
                }
                match status {
                    404 => {
                        self.set_state(l, DeviceState::Idle);
                        self.devices[l].tries = 0;
                        self.to_connect.push_back(l as u32);
                    }
                    503 => {
                        // The node is full: ask again later, as after an
                        // unanswered connect (docs/PROTOCOL.md §6.9).
                        self.local.refused_full += 1;
                        self.connect_later(l, now_us);
                    }
                    _ => {
                        self.local.refused += 1;
                        if state != DeviceState::Refused {
                            self.local.refused_devices += 1;
                            self.set_state(l, DeviceState::Refused);
                        }
                    }
                }
                if status != 404 {
                    if let Ok(mut first) = self.shared.first_refusal.lock() {
                        if first.is_none() {
                            *first = Some(format!(
                                "{status} {}",
                                e.header.status_description.as_deref().unwrap_or("")
                            ));
                        }
                    }
                }
            }
            _ => self.local.other += 1,
        }
    }

    pub(super) fn is_answer(&self, l: usize, header: &ServiceHeader<'_>) -> bool {
        let dev = &self.devices[l];
        dev.outstanding != 0 && header.acknowledge == Some(i64::from(dev.outstanding))
    }

    /// The request in flight got its answer.
    pub(super) fn answered(&mut self, l: usize, now_us: u64) {
        let sent = self.devices[l].sent_us;
        self.free(l);
        if self.shared.measuring.load(Relaxed) {
            let rtt = (now_us as u32).wrapping_sub(sent).max(1);
            let _ = self.rtt.record(u64::from(rtt));
        }
    }

    /// The account's Serial from a connect answer with nothing pending
    /// (docs/PROTOCOL.md §6.7): the device's first mark, if it has none.
    /// Nothing pending is itself checked: a Serial above the device's mark
    /// with publishes recorded in between is `wrong` ([`super::content`]).
    fn learn_serial(&mut self, l: usize, serial: i64) {
        match u32::try_from(serial) {
            Ok(s) if s > 0 => {
                if self.devices[l].last_notify == 0 {
                    self.first_serial(l, s);
                }
                let mark = self.devices[l].last_notify;
                self.check_content(l, mark, s, &[]);
            }
            _ => self.local.other += 1,
        }
    }

    /// The content check of a message with Serial `s` and `bitmask` to
    /// device `l`, whose mark is `mark` ([`super::content`]).
    fn check_content(&mut self, l: usize, mark: u32, s: u32, bitmask: &[u8]) {
        let account = self.ident.clock_of(self.global(l));
        let Some(clock) = self.shared.accounts.get(account) else {
            return;
        };
        let c = content::check(&clock.sent, mark, s, bitmask);
        if c.publishes > 0 {
            self.local.content_checked += 1;
        }
        if c.missing {
            self.local.content_mismatches += 1;
            clock.wrong.fetch_add(1, Relaxed);
        }
    }

    /// The first account Serial device `l` learns: with catch-up
    /// (docs/PROTOCOL.md §6.7) the one its first connect answer carries, from
    /// an older node the priming publish's. Deliveries count from its
    /// account's base, the first such Serial any of its devices saw: the
    /// publisher waits until every account has one before publishing, so
    /// counting from it also counts publishes whose own notify this device
    /// missed (it sees a later, merged one).
    fn first_serial(&mut self, l: usize, s: u32) {
        let account = self.ident.clock_of(self.global(l));
        self.local.primed += 1;
        self.devices[l].last_notify = match self.shared.accounts.get(account) {
            Some(c) => match c.base.compare_exchange(0, s, Relaxed, Relaxed) {
                Ok(_) => s,
                Err(base) => base.min(s),
            },
            None => s,
        };
    }

    /// A notify (or pending state in a response): check its bitmask
    /// against what was published ([`super::content`]), count it once per
    /// publish, time it against its publish, acknowledge it every time.
    pub(super) fn pending_notify(
        &mut self,
        l: usize,
        serial: Option<i64>,
        bitmask: Option<&[u8]>,
        now_us: u64,
    ) {
        let Some(serial) = serial else {
            return;
        };
        let Ok(s) = u32::try_from(serial) else {
            self.local.other += 1;
            return;
        };
        let bitmask = bitmask.unwrap_or(&[]);
        if bitmask.is_empty() {
            // A Serial with nothing pending: not a delivery, but checked
            // (nothing may be pending when something was published).
            let mark = self.devices[l].last_notify;
            if mark != 0 {
                self.check_content(l, mark, s, &[]);
            }
            return;
        }
        let first = self.devices[l].last_notify == 0;
        if first {
            self.first_serial(l, s);
        }
        let mark = self.devices[l].last_notify;
        self.check_content(l, mark, s, bitmask);
        let account = self.ident.clock_of(self.global(l));
        let remote = self.ident.is_remote(self.global(l));
        let clock = self.shared.accounts.get(account);
        let dev = &mut self.devices[l];
        if s > dev.last_notify {
            let delta = s - dev.last_notify;
            let measuring = self.shared.measuring.load(Relaxed);
            if let Some(c) = clock {
                for j in (dev.last_notify + 1..=s).rev().take(RING) {
                    let t = c.ring[j as usize % RING].load(Relaxed);
                    if measuring && t != 0 && t <= now_us {
                        let _ = self.notify.record((now_us - t).max(1));
                        if remote {
                            let _ = self.remote.record((now_us - t).max(1));
                        }
                    }
                }
                if c.add_delivered(u64::from(delta)) {
                    if let Some(publisher) = self.shared.publisher.get() {
                        publisher.unpark();
                    }
                }
            }
            dev.last_notify = s;
            self.local.delivered += u64::from(delta);
            self.local.notifications += 1;
        } else if !first {
            self.local.duplicates += 1;
        }
        self.send_ack(l, serial, now_us);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Release;
    use std::sync::Arc;

    use mpp::codec::{Message, PresenceConnectResponse, PresenceNotify, ServiceHeader};
    use mpp::packet::{seal_in_place, MasterKey, HEADER_LEN, MAX_PACKET, MAX_PLAINTEXT};

    use super::super::content::record;
    use super::super::{Mode, Shared, WorkerConfig, RING};
    use super::*;
    use crate::ident::{Identity, Space};

    /// The account Serial the devices learn at their connect.
    const BASE: u32 = 1 << 20;

    /// One worker with 4 devices in 2 accounts (devices 0 and 1 are account
    /// 0's), fanout clocks for both, and a socket to a peer that reads
    /// nothing (the acknowledgements are only queued).
    fn worker() -> (Worker, Arc<Identity>, std::net::UdpSocket) {
        let ident = Arc::new(Identity::new(MasterKey::new([3; 32]), Space::new(4, 2)).unwrap());
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = WorkerConfig {
            index: 0,
            threads: 1,
            devices: 4,
            sockets: vec![crate::io::connected_socket(peer.local_addr().unwrap()).unwrap()],
            nodes: 1,
            batch: 8,
            cpu: None,
            mode: Mode::Sweep {
                heartbeat_ms: 60_000,
            },
            window: 16,
            connect_rate: 1.0,
            timeout_ms: 1000,
            tries: 3,
            loss: 0.0,
        };
        let w = Worker::new(cfg, ident.clone(), Shared::new(2)).unwrap();
        (w, ident, peer)
    }

    /// `message` to device `g`, sealed as the node seals it, handed to the
    /// worker as if received.
    fn receive(w: &mut Worker, ident: &Identity, g: u64, message: Message<'_>) {
        let mut buf = vec![0u8; MAX_PACKET];
        let n = message
            .encode(&mut buf[HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT])
            .unwrap();
        let keys = ident.keys(g).unwrap();
        let len = seal_in_place(
            &keys.s2c,
            ident.conn_id(g).unwrap(),
            [g as u8; 12],
            &mut buf,
            n,
        )
        .unwrap();
        w.handle(0, &mut buf[..len], 1_000);
    }

    fn connected(serial: u32, bitmask: Option<&[u8]>) -> Message<'_> {
        Message::ConnectResponse(PresenceConnectResponse {
            connection_timeout: Some(60_000),
            serial: Some(i64::from(serial)),
            bitmask: bitmask.map(Into::into),
            header: ServiceHeader::default(),
        })
    }

    fn notify(serial: u32, bitmask: &[u8]) -> Message<'_> {
        Message::Notify(PresenceNotify {
            serial: Some(i64::from(serial)),
            bitmask: Some(bitmask.into()),
            header: ServiceHeader::default(),
        })
    }

    /// Publishes of account `a` as the publisher records them: Serial
    /// `BASE + 1 + i` set store `bits[i]`.
    fn published(w: &Worker, a: usize, bits: &[u8]) {
        let clock = &w.shared.accounts[a];
        for (i, &bit) in bits.iter().enumerate() {
            let s = BASE + 1 + i as u32;
            clock.sent[s as usize % RING].store(record(s, bit), Release);
        }
    }

    #[test]
    fn a_notify_missing_a_published_bit_counts_wrong_though_no_serial_is_lost() {
        let (mut w, ident, _peer) = worker();
        // Devices 0 and 1 connect (no mark: a resync, all FF), then their
        // account is published to twice: stores 0 and 1.
        for g in [0, 1] {
            receive(&mut w, &ident, g, connected(BASE, Some(&[0xFF; 32])));
        }
        assert_eq!(w.shared.accounts[0].base.load(Relaxed), BASE);
        published(&w, 0, &[0, 1]);
        // Device 0 gets both merged without store 1; device 1 right.
        receive(&mut w, &ident, 0, notify(BASE + 2, &[0b01]));
        receive(&mut w, &ident, 1, notify(BASE + 2, &[0b11]));
        // By Serials both publishes reached both devices: nothing lost.
        assert_eq!((w.local.delivered, w.local.notifications), (4, 2));
        assert_eq!(w.local.content_checked, 2);
        assert_eq!(w.local.content_mismatches, 1, "device 0's notify");
        let wrong = w.shared.wrong();
        assert_eq!((wrong.wrong, wrong.unverifiable), (1, 0));
        // A retransmission of the same Serial is not checked again.
        receive(&mut w, &ident, 0, notify(BASE + 2, &[0b01]));
        assert_eq!(w.local.content_mismatches, 1);
        assert_eq!(w.local.duplicates, 1);
        // An account whose records may be off reports apart.
        w.shared.accounts[0].unverifiable.store(true, Relaxed);
        let wrong = w.shared.wrong();
        assert_eq!(
            (wrong.wrong, wrong.unverifiable, wrong.unverifiable_accounts),
            (0, 1, 1)
        );
    }

    #[test]
    fn a_connect_answer_with_nothing_pending_after_a_publish_counts_wrong() {
        let (mut w, ident, _peer) = worker();
        receive(&mut w, &ident, 0, connected(BASE, Some(&[0xFF; 32])));
        receive(&mut w, &ident, 1, connected(BASE, Some(&[0xFF; 32])));
        published(&w, 0, &[4]);
        // Device 0 connects again with its mark BASE: the node owes it
        // store 4 (the catch-up), and says nothing is pending.
        receive(&mut w, &ident, 0, connected(BASE + 1, None));
        // Device 1's answer carries it, in a superset (the catch-up union).
        receive(&mut w, &ident, 1, connected(BASE + 1, Some(&[0x31])));
        // Device 2 (account 1, nothing published) learns its Serial.
        receive(&mut w, &ident, 2, connected(BASE + 7, None));
        receive(&mut w, &ident, 2, connected(BASE + 7, None));
        assert_eq!(w.local.content_checked, 2);
        assert_eq!(w.local.content_mismatches, 1);
        assert_eq!(w.shared.wrong().wrong, 1);
    }
}
