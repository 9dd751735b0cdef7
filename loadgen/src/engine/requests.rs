//! Building and sealing a device's requests into its socket's batch: the
//! connect, heartbeat and disconnect of `proto::seal_request` (the library's
//! own code, as `mpp` and the `Client` use), acknowledgements, and the raw
//! fan-out sender's notifies.
//!
//! It must not decide when a request is due (that is [`super::schedule`])
//! nor read answers.

use mpp::codec::{Message, PresenceNotify, ServiceHeader};
use mpp::packet::{seal_in_place, ConnId, HEADER_LEN, MAX_PACKET, MAX_PLAINTEXT};
use mpp::proto::{seal_request_with, Request, RequestHeader};

use std::cmp::Reverse;

use super::device::{ConnectTimer, Pending, RequestKind};
use super::worker::Worker;
use crate::ident::Identity;

impl Worker {
    pub(super) fn next_nonce(&mut self) -> [u8; 12] {
        self.nonce += 1;
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.nonce_salt);
        n[4..].copy_from_slice(&self.nonce.to_be_bytes());
        n
    }

    /// Seals request `kind` of device `l` into its socket's batch and marks
    /// it in flight.
    pub(super) fn send_request(&mut self, l: usize, kind: RequestKind, now_us: u64) {
        let g = self.global(l);
        let Some(conn_id) = self.ident.conn_id(g) else {
            return;
        };
        let nonce = self.next_nonce();
        let s = self.devices[l].sock as usize;
        if self.out[s].is_full() {
            self.flush(s, now_us);
        }
        let unix_now = (self.shared.epoch_unix_s + now_us / 1_000_000) as u32;
        let dev = &mut self.devices[l];
        if kind == RequestKind::Connect {
            // docs/PROTOCOL.md §6: a connect's Serial is at least the Unix time,
            // or the node takes it for a replay of an old one.
            dev.serial = dev.serial.max(unix_now);
        }
        dev.serial = dev.serial.wrapping_add(1).max(1);
        let serial = dev.serial;
        let (account, device, binding);
        let request = match kind {
            RequestKind::Connect => {
                account = self.ident.account_name(self.ident.account_of(g));
                device = self.ident.device_name(g);
                binding = self.ident.binding(g).unwrap_or([0; 32]);
                Request::Connect {
                    account: &account,
                    device: &device,
                    expires: self.ident.expires,
                    binding: &binding,
                }
            }
            RequestKind::Disconnect => Request::Disconnect,
            _ => Request::Heartbeat,
        };
        let Some(slot) = self.out[s].send_slot() else {
            return;
        };
        let buf = &mut slot[..MAX_PACKET];
        let header = RequestHeader {
            serial: i64::from(serial),
            // docs/PROTOCOL.md §6.7: a connect carries the device's mark.
            acknowledge: (kind == RequestKind::Connect && dev.last_notify != 0)
                .then_some(i64::from(dev.last_notify)),
            echo: dev.echo(),
        };
        let Ok(size) = seal_request_with(&dev.keys.c2s, conn_id, nonce, &header, &request, buf)
        else {
            self.local.other += 1;
            return;
        };
        dev.outstanding = serial;
        dev.sent_us = now_us as u32;
        let tries = dev.tries;
        self.inflight += 1;
        if kind == RequestKind::Connect {
            // Each connect waits a backoff of its own (schedule.rs).
            let wait = self.connect_wait_ms(tries);
            self.connect_timers.push(Reverse(ConnectTimer {
                due_ms: now_us / 1000 + wait,
                device: l as u32,
                serial,
            }));
        } else {
            self.pending.push_back(Pending {
                device: l as u32,
                serial,
                at_ms: (now_us / 1000) as u32,
                kind,
            });
        }
        if !self.lose() {
            self.out[s].commit(size);
        }
        match kind {
            RequestKind::Connect => self.local.connects_sent += 1,
            RequestKind::Heartbeat => self.local.heartbeats_sent += 1,
            _ => {}
        }
    }

    /// Acknowledges notify `serial` for device `l` (no answer expected).
    pub(super) fn send_ack(&mut self, l: usize, serial: i64, now_us: u64) {
        let Some(conn_id) = self.ident.conn_id(self.global(l)) else {
            return;
        };
        let nonce = self.next_nonce();
        let s = self.devices[l].sock as usize;
        if self.out[s].is_full() {
            self.flush(s, now_us);
        }
        let dev = &mut self.devices[l];
        dev.serial = dev.serial.wrapping_add(1).max(1);
        let Some(slot) = self.out[s].send_slot() else {
            return;
        };
        let buf = &mut slot[..MAX_PACKET];
        let header = RequestHeader {
            serial: i64::from(dev.serial),
            acknowledge: None,
            echo: dev.echo(),
        };
        if let Ok(size) = seal_request_with(
            &dev.keys.c2s,
            conn_id,
            nonce,
            &header,
            &Request::Acknowledge(serial),
            buf,
        ) {
            self.local.acks_sent += 1;
            if !self.lose() {
                self.out[s].commit(size);
            }
        }
    }
}

/// Seals a `PresenceNotify` for device `g` (the raw fan-out sender's packets).
pub(crate) fn seal_notify(
    ident: &Identity,
    g: u64,
    serial: i64,
    bitmask: &[u8],
    nonce: [u8; 12],
    buf: &mut [u8],
) -> Option<usize> {
    let conn_id: ConnId = ident.conn_id(g)?;
    let keys = ident.keys(g)?;
    let message = Message::Notify(PresenceNotify {
        bitmask: Some(bitmask.into()),
        serial: Some(serial),
        header: ServiceHeader::default(),
    });
    let n = message
        .encode(&mut buf[HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT])
        .ok()?;
    seal_in_place(&keys.s2c, conn_id, nonce, buf, n).ok()
}
