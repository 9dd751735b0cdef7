//! What is due in a worker's loop: connects from the paced connect queue,
//! heartbeats (a sweep once per period, or a window kept full), churn and
//! rebinding at their rates, and the timers of requests in flight (resend,
//! or connect again).
//!
//! A device never gives up because the node is silent. A connect unanswered
//! within its wait is sent again, and each wait is longer: `--timeout-ms`,
//! then twice, four times… that, capped at [`CONNECT_BACKOFF_CAP_MS`] (or
//! `--timeout-ms` when longer), each drawn at random between half and all of
//! it so that devices that lost the node together do not come back
//! together. A heartbeat is sent up to `--tries` times, `--timeout-ms`
//! apart; then the device takes its connection for lost and connects again
//! the same way. Only a refusal a retry cannot fix (401, 403) stops it.
//!
//! It must not build packets (that is [`super::requests`]) nor read them.

use std::cmp::Reverse;
use std::sync::atomic::Ordering::Relaxed;

use super::device::{ConnectTimer, DeviceState, RequestKind};
use super::worker::Worker;
use super::Mode;

/// The longest a connect waits for its answer before it is sent again
/// (unless `--timeout-ms` is longer): 4 s keeps a fleet's retries spread
/// out and a small test's connect phase within seconds.
pub(crate) const CONNECT_BACKOFF_CAP_MS: u64 = 4_000;

/// The wait before connect number `tries` (1 for the first) is given up on:
/// `timeout_ms` for the first, then doubling up to the cap (or
/// `timeout_ms` if larger), and from the second on drawn from `[w/2, w]`
/// with the random `r`.
pub(crate) fn connect_backoff_ms(timeout_ms: u64, tries: u8, r: u64) -> u64 {
    if tries <= 1 {
        return timeout_ms;
    }
    let cap = CONNECT_BACKOFF_CAP_MS.max(timeout_ms);
    let shift = u32::from(tries - 1).min(20);
    let w = timeout_ms.saturating_mul(1 << shift).min(cap);
    w - (r % (w / 2 + 1))
}

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
                || dev.state == DeviceState::Refused
                || dev.outstanding != 0
            {
                continue;
            }
            if dev.state != DeviceState::Connecting {
                self.devices[l].tries = 0;
            }
            self.set_state(l, DeviceState::Connecting);
            let dev = &mut self.devices[l];
            dev.tries = dev.tries.saturating_add(1);
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
            Mode::Window | Mode::Echo if self.shared.active.load(Relaxed) => {
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
            Mode::Window | Mode::Echo | Mode::RawReceive => {}
        }
        queued
    }

    /// How long connect number `tries` waits for its answer.
    pub(super) fn connect_wait_ms(&mut self, tries: u8) -> u64 {
        let r = self.random();
        connect_backoff_ms(self.cfg.timeout_ms, tries, r)
    }

    /// Device `l` connects again after a backoff (a 503): it stays
    /// connecting, out of the queue, until its timer fires.
    pub(super) fn connect_later(&mut self, l: usize, now_us: u64) {
        if self.devices[l].state != DeviceState::Connecting {
            self.devices[l].tries = 1;
        }
        self.set_state(l, DeviceState::Connecting);
        let tries = self.devices[l].tries.saturating_add(1);
        let wait = self.connect_wait_ms(tries);
        self.connect_timers.push(Reverse(ConnectTimer {
            due_ms: now_us / 1000 + wait,
            device: l as u32,
            serial: 0,
        }));
    }

    /// A connect in flight went unanswered within its wait: it goes out
    /// again (the queue's front, paced like the rest) with a longer wait.
    fn connect_unanswered(&mut self, l: usize) {
        self.free(l);
        self.local.timeouts += 1;
        self.local.connect_retries += 1;
        self.to_connect.push_front(l as u32);
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
        // Another socket of the device's node's group.
        let socks = self.fds.len() / self.cfg.nodes.max(1);
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
            let (group, i) = (dev.sock as usize / socks, dev.sock as usize % socks);
            dev.sock = (group * socks + (i + 1) % socks) as u16;
            dev.rebinding = true;
            dev.tries = 0;
            self.rebound += 1;
            self.local.rebinds += 1;
            self.send_request(l, RequestKind::Heartbeat, now_us);
            queued += 1;
        }
        queued
    }

    /// Requests unanswered in time: resend, or connect again. Devices not
    /// yet sure the node validated their address heartbeat to find out.
    pub(super) fn expire(&mut self, now_us: u64) {
        while let Some(&(due_ms, l)) = self.probes.front() {
            if due_ms > now_us / 1000 || self.inflight >= self.cfg.window {
                break;
            }
            self.probes.pop_front();
            let l = l as usize;
            let dev = &mut self.devices[l];
            dev.probing = false;
            // A request in flight gets an answer that re-arms the probe if
            // it still carries a challenge.
            if dev.state == DeviceState::Connected && dev.outstanding == 0 && dev.echo().is_some() {
                dev.tries = 0;
                self.send_request(l, RequestKind::Heartbeat, now_us);
            }
        }
        while let Some(&Reverse(t)) = self.connect_timers.peek() {
            if t.due_ms > now_us / 1000 {
                break;
            }
            self.connect_timers.pop();
            let l = t.device as usize;
            let dev = &self.devices[l];
            if dev.state != DeviceState::Connecting {
                continue;
            }
            if t.serial == 0 {
                // A 503's wait is over.
                if dev.outstanding == 0 {
                    self.to_connect.push_front(t.device);
                }
            } else if dev.outstanding == t.serial {
                self.connect_unanswered(l);
            }
        }
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
            if p.kind == RequestKind::Connect {
                // Connects wait in `connect_timers`; one here is the same.
                self.connect_unanswered(l);
                continue;
            }
            self.free(l);
            self.local.timeouts += 1;
            let tries = self.cfg.tries.max(1);
            match p.kind {
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
                RequestKind::Connect | RequestKind::Disconnect => {
                    self.set_state(l, DeviceState::Idle);
                    self.devices[l].tries = 0;
                    self.local.dropped += 1;
                    self.to_connect.push_back(p.device);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_waits_double_to_the_cap_with_jitter_and_never_end() {
        // The first wait is the timeout; no jitter.
        assert_eq!(connect_backoff_ms(1000, 1, 12345), 1000);
        assert_eq!(connect_backoff_ms(1000, 0, 7), 1000);
        // Then 2 s, 4 s, 4 s…: between half and all of it.
        for (tries, w) in [
            (2u8, 2000u64),
            (3, 4000),
            (4, 4000),
            (200, 4000),
            (255, 4000),
        ] {
            assert_eq!(connect_backoff_ms(1000, tries, 0), w, "tries {tries}");
            for r in [1, 999, 1_000_000, u64::from(u32::MAX)] {
                let got = connect_backoff_ms(1000, tries, r);
                assert!((w / 2..=w).contains(&got), "tries {tries}: {got}");
            }
        }
        // A timeout above the cap is the cap.
        assert_eq!(connect_backoff_ms(5000, 3, 0), 5000);
        assert_eq!(connect_backoff_ms(1, 30, 0), 4000);
    }
}
