//! What is due in a worker's loop: connects from the paced connect queue,
//! heartbeats (a sweep once per period, or a window kept full), churn and
//! rebinding at their rates, and the timers of requests in flight (resend,
//! give up, or connect again).
//!
//! It must not build packets (that is [`super::requests`]) nor read them.

use super::device::{DeviceState, RequestKind};
use super::worker::Worker;
use super::Mode;

impl Worker {
    /// Connects, heartbeats, churn: whatever is due. Returns requests queued.
    pub(super) fn generate(&mut self, now_us: u64) -> usize {
        let now_ms = now_us / 1000;
        let mut queued = 0;
        // Connect queue, paced.
        let allowed =
            (self.cfg.connect_rate * (now_ms - self.connect_start_ms) as f64 / 1000.0) as u64 + 64;
        while self.connects_issued < allowed && self.inflight < self.cfg.window {
            let Some(l) = self.to_connect.pop_front() else {
                break;
            };
            let l = l as usize;
            let dev = &self.devices[l];
            if dev.state == DeviceState::Connected
                || dev.state == DeviceState::Dead
                || dev.outstanding != 0
            {
                continue;
            }
            if dev.state != DeviceState::Connecting {
                self.devices[l].tries = 0;
            }
            self.set_state(l, DeviceState::Connecting);
            self.devices[l].tries += 1;
            self.connects_issued += 1;
            self.send_request(l, RequestKind::Connect, now_us);
            queued += 1;
        }
        if self.connects_issued >= allowed && self.to_connect.is_empty() {
            // Keep the bucket from banking a burst while idle.
            self.connect_start_ms = now_ms;
            self.connects_issued = 0;
        }
        let n = self.devices.len();
        if n == 0 {
            return queued;
        }
        match self.cfg.mode {
            Mode::Window | Mode::Echo => {
                let mut scanned = 0;
                while self.inflight < self.cfg.window && scanned < n {
                    let l = self.cursor;
                    self.cursor = if l + 1 == n { 0 } else { l + 1 };
                    scanned += 1;
                    let dev = &self.devices[l];
                    if dev.state != DeviceState::Connected || dev.outstanding != 0 {
                        continue;
                    }
                    scanned = 0;
                    self.devices[l].tries = 1;
                    self.send_request(l, RequestKind::Heartbeat, now_us);
                    queued += 1;
                }
            }
            Mode::Sweep { heartbeat_ms } => queued += self.sweep(now_ms, heartbeat_ms, now_us),
            Mode::Churn {
                heartbeat_ms,
                rate,
                rebind_rate,
            } => {
                queued += self.sweep(now_ms, heartbeat_ms, now_us);
                if self.connect_reported {
                    queued += self.churn(now_ms, rate, now_us);
                    queued += self.rebind(now_ms, rebind_rate, now_us);
                }
            }
            Mode::RawReceive => {}
        }
        queued
    }

    /// Visits devices so each gets one heartbeat per period.
    pub(super) fn sweep(&mut self, now_ms: u64, heartbeat_ms: u64, now_us: u64) -> usize {
        let n = self.devices.len() as u64;
        let due = (now_ms - self.sweep_start_ms) * n / heartbeat_ms.max(1);
        let mut queued = 0;
        while self.swept < due && self.inflight < self.cfg.window && queued < 4096 {
            let l = (self.swept % n) as usize;
            self.swept += 1;
            let dev = &self.devices[l];
            if dev.state == DeviceState::Connected && dev.outstanding == 0 {
                self.devices[l].tries = 0;
                self.send_request(l, RequestKind::Heartbeat, now_us);
                queued += 1;
            }
        }
        queued
    }

    /// Disconnects `rate` devices per second; each reconnects when answered.
    pub(super) fn churn(&mut self, now_ms: u64, rate: u64, now_us: u64) -> usize {
        let per_worker = rate as f64 / self.cfg.threads as f64;
        let due = ((now_ms - self.mode_start_ms) as f64 * per_worker / 1000.0) as u64;
        let n = self.devices.len();
        let mut queued = 0;
        let mut scanned = 0;
        while self.churned < due && self.inflight < self.cfg.window && scanned < n {
            let l = self.churn_cursor;
            self.churn_cursor = (l + 1) % n;
            scanned += 1;
            let dev = &mut self.devices[l];
            if dev.state != DeviceState::Connected || dev.outstanding != 0 {
                continue;
            }
            dev.state = DeviceState::Disconnecting;
            self.churned += 1;
            self.send_request(l, RequestKind::Disconnect, now_us);
            queued += 1;
        }
        queued
    }

    /// Moves `rate` devices per second to another socket (a new source port,
    /// as after a NAT rebinding) and heartbeats from there.
    pub(super) fn rebind(&mut self, now_ms: u64, rate: u64, now_us: u64) -> usize {
        let socks = self.fds.len();
        if socks < 2 {
            return 0;
        }
        let per_worker = rate as f64 / self.cfg.threads as f64;
        let due = ((now_ms - self.mode_start_ms) as f64 * per_worker / 1000.0) as u64;
        let n = self.devices.len();
        let mut queued = 0;
        let mut scanned = 0;
        while self.rebound < due && self.inflight < self.cfg.window && scanned < n {
            let l = self.rebind_cursor;
            self.rebind_cursor = (l + 7919) % n;
            scanned += 1;
            let dev = &mut self.devices[l];
            if dev.state != DeviceState::Connected || dev.outstanding != 0 {
                continue;
            }
            dev.sock = ((dev.sock as usize + 1) % socks) as u16;
            dev.rebinding = true;
            dev.tries = 0;
            self.rebound += 1;
            self.local.rebinds += 1;
            self.send_request(l, RequestKind::Heartbeat, now_us);
            queued += 1;
        }
        queued
    }

    /// Requests unanswered for the timeout: resend, give up, or reconnect.
    pub(super) fn expire(&mut self, now_us: u64) {
        let now_ms = (now_us / 1000) as u32;
        let timeout = self.cfg.timeout_ms as u32;
        while let Some(&p) = self.pending.front() {
            let dev = &self.devices[p.device as usize];
            if dev.outstanding != p.serial {
                self.pending.pop_front();
                continue;
            }
            if now_ms.wrapping_sub(p.at_ms) < timeout {
                break;
            }
            self.pending.pop_front();
            let l = p.device as usize;
            self.free(l);
            self.local.timeouts += 1;
            let tries = self.cfg.tries.max(1);
            match p.kind {
                RequestKind::Connect => {
                    if self.devices[l].tries < tries {
                        self.to_connect.push_front(p.device);
                    } else {
                        self.set_state(l, DeviceState::Dead);
                        self.local.connect_failed += 1;
                    }
                }
                RequestKind::Heartbeat if self.cfg.mode == Mode::Window => {
                    // The maximum-rate scenario does not resend: a heartbeat
                    // unanswered in time is lost and the device is free again.
                    self.local.lost += 1;
                }
                RequestKind::Heartbeat => {
                    self.devices[l].tries += 1;
                    if self.devices[l].tries < tries {
                        self.send_request(l, RequestKind::Heartbeat, now_us);
                    } else {
                        // docs/PROTOCOL.md §6: heartbeats unanswered: connect again.
                        self.local.lost += 1;
                        self.set_state(l, DeviceState::Idle);
                        self.devices[l].tries = 0;
                        self.local.dropped += 1;
                        self.to_connect.push_back(p.device);
                    }
                }
                _ => {
                    self.set_state(l, DeviceState::Idle);
                    self.devices[l].tries = 0;
                    self.local.dropped += 1;
                    self.to_connect.push_back(p.device);
                }
            }
        }
    }
}
