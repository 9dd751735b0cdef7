//! What the device workers share with the monitor and the publisher: the
//! counters (added once per loop from each worker's local copy), the flags
//! that stop the workers and open the measured window, the run's clock, and
//! each account's publish clock (fanout).
//!
//! It must hold nothing a worker needs per datagram: workers keep their own
//! state and touch this once per loop.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use super::RING;

/// Counters shared with the monitor; workers add to them once per loop.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) connects_sent: AtomicU64,
    pub(crate) connected: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) connect_retries: AtomicU64,
    pub(crate) first_connects: AtomicU64,
    pub(crate) refused_devices: AtomicU64,
    pub(crate) heartbeats_sent: AtomicU64,
    pub(crate) replies: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) lost: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) primed: AtomicU64,
    pub(crate) acks_sent: AtomicU64,
    pub(crate) disconnects: AtomicU64,
    pub(crate) rebinds: AtomicU64,
    pub(crate) rebinds_confirmed: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) refused_full: AtomicU64,
    pub(crate) invalid_serial: AtomicU64,
    pub(crate) unauthentic: AtomicU64,
    pub(crate) unknown: AtomicU64,
    pub(crate) other: AtomicU64,
    pub(crate) send_errors: AtomicU64,
    pub(crate) recv_errors: AtomicU64,
    pub(crate) loss_dropped: AtomicU64,
    pub(crate) notifications: AtomicU64,
    pub(crate) content_checked: AtomicU64,
    pub(crate) content_mismatches: AtomicU64,
}

/// A plain copy of [`Counters`].
#[derive(Default, Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Snapshot {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) connects_sent: u64,
    pub(crate) connected: u64,
    pub(crate) dropped: u64,
    /// Connects sent again: unanswered within their backoff, or after a 503.
    pub(crate) connect_retries: u64,
    /// Devices connected for the first time (each counts once).
    pub(crate) first_connects: u64,
    /// Devices refused for good (401, 403…): they stop, neither held nor connecting.
    pub(crate) refused_devices: u64,
    pub(crate) heartbeats_sent: u64,
    pub(crate) replies: u64,
    pub(crate) timeouts: u64,
    pub(crate) lost: u64,
    pub(crate) delivered: u64,
    pub(crate) duplicates: u64,
    pub(crate) primed: u64,
    pub(crate) acks_sent: u64,
    pub(crate) disconnects: u64,
    pub(crate) rebinds: u64,
    pub(crate) rebinds_confirmed: u64,
    pub(crate) refused: u64,
    pub(crate) refused_full: u64,
    pub(crate) invalid_serial: u64,
    pub(crate) unauthentic: u64,
    pub(crate) unknown: u64,
    pub(crate) other: u64,
    pub(crate) send_errors: u64,
    pub(crate) recv_errors: u64,
    pub(crate) loss_dropped: u64,
    pub(crate) notifications: u64,
    /// Messages whose bitmask was checked against at least one recorded
    /// publish (fanout; [`super::content`]).
    pub(crate) content_checked: u64,
    /// Of those, messages that lacked a recorded publish's bit, on any
    /// account (the report's `wrong` leaves out the accounts whose records
    /// may be off: [`AccountClock::unverifiable`]).
    pub(crate) content_mismatches: u64,
}

macro_rules! each_counter {
    ($m:ident) => {
        $m!(
            sent,
            received,
            connects_sent,
            connected,
            dropped,
            connect_retries,
            first_connects,
            refused_devices,
            heartbeats_sent,
            replies,
            timeouts,
            lost,
            delivered,
            duplicates,
            primed,
            acks_sent,
            disconnects,
            rebinds,
            rebinds_confirmed,
            refused,
            refused_full,
            invalid_serial,
            unauthentic,
            unknown,
            other,
            send_errors,
            recv_errors,
            loss_dropped,
            notifications,
            content_checked,
            content_mismatches
        )
    };
}

impl Counters {
    /// The current values.
    pub(crate) fn snapshot(&self) -> Snapshot {
        macro_rules! load {
            ($($f:ident),*) => { Snapshot { $($f: self.$f.load(Relaxed)),* } };
        }
        each_counter!(load)
    }

    /// Adds a worker's local counts and clears them.
    pub(super) fn add(&self, local: &mut Snapshot) {
        macro_rules! add {
            ($($f:ident),*) => { $(if local.$f != 0 { self.$f.fetch_add(local.$f, Relaxed); })* };
        }
        each_counter!(add);
        *local = Snapshot::default();
    }
}

impl Snapshot {
    /// Counts since `earlier`.
    pub(crate) fn since(&self, earlier: &Snapshot) -> Snapshot {
        macro_rules! sub {
            ($($f:ident),*) => { Snapshot { $($f: self.$f.saturating_sub(earlier.$f)),* } };
        }
        each_counter!(sub)
    }

    /// The sum of two sets of counts (the slices of an interleaved run).
    pub(crate) fn plus(&self, other: &Snapshot) -> Snapshot {
        macro_rules! plus {
            ($($f:ident),*) => { Snapshot { $($f: self.$f + other.$f),* } };
        }
        each_counter!(plus)
    }

    /// Devices connected now.
    pub(crate) fn held(&self) -> u64 {
        self.connected.saturating_sub(self.dropped)
    }

    /// Of `devices`, those neither held nor refused for good: connecting
    /// (or reconnecting), however long that takes.
    pub(crate) fn connecting(&self, devices: u64) -> u64 {
        devices.saturating_sub(self.held() + self.refused_devices)
    }
}

/// One account's publish clock (fanout): the notify Serial its first
/// notify had, the time each later Serial was published, and what each
/// publish set (the content check, [`super::content`]).
pub(crate) struct AccountClock {
    /// Serial of the priming notify (0 until a device saw it).
    pub(crate) base: AtomicU32,
    /// Publish time (µs since the epoch) of Serial `s`, at `s % RING`.
    pub(crate) ring: [AtomicU64; RING],
    /// The publish of Serial `s` and the store it set
    /// ([`super::content::record`]), at `s % RING`.
    pub(crate) sent: [AtomicU64; RING],
    /// Deliveries counted by the devices (one per publish per device).
    pub(crate) delivered: AtomicU64,
    /// The `delivered` count the publisher waits for before its next
    /// publish to the account (`u64::MAX`: none): the device whose delivery
    /// reaches it wakes the publisher ([`AccountClock::add_delivered`]).
    pub(crate) wake_at: AtomicU64,
    /// Messages to the account's devices that lacked a recorded bit.
    pub(crate) wrong: AtomicU64,
    /// Set by the publisher when its Serials for the account may be off
    /// (a 503 for part of a request, a request sent twice): the account's
    /// mismatches are then not the node's for sure.
    pub(crate) unverifiable: AtomicBool,
}

impl AccountClock {
    fn new() -> Self {
        AccountClock {
            base: AtomicU32::new(0),
            ring: std::array::from_fn(|_| AtomicU64::new(0)),
            sent: std::array::from_fn(|_| AtomicU64::new(0)),
            delivered: AtomicU64::new(0),
            wake_at: AtomicU64::new(u64::MAX),
            wrong: AtomicU64::new(0),
            unverifiable: AtomicBool::new(false),
        }
    }
}

impl AccountClock {
    /// Whether `target` deliveries have been counted; if not, the
    /// delivery that reaches it will wake the publisher. The wish is
    /// written before `delivered` is read, so a delivery counted in
    /// between is not missed: it either shows in the count or sees the
    /// wish.
    pub(crate) fn delivered_or_wake_at(&self, target: u64) -> bool {
        self.wake_at.store(target, Relaxed);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.delivered.load(Relaxed) >= target
    }

    /// Counts `delta` deliveries; true when they reached the count the
    /// publisher waits for (then the wish is spent).
    pub(crate) fn add_delivered(&self, delta: u64) -> bool {
        let now = self.delivered.fetch_add(delta, Relaxed) + delta;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let want = self.wake_at.load(Relaxed);
        now >= want
            && now - delta < want
            && self
                .wake_at
                .compare_exchange(want, u64::MAX, Relaxed, Relaxed)
                .is_ok()
    }
}

/// The content check's outcome over a run's accounts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Wrong {
    /// Messages that lacked a bit the node had been given for them, on
    /// accounts whose records are exact: the report's `wrong`.
    pub(crate) wrong: u64,
    /// Mismatches on accounts whose records may be off.
    pub(crate) unverifiable: u64,
    /// Accounts whose records may be off.
    pub(crate) unverifiable_accounts: u64,
}

/// State shared by the workers and the monitor.
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    /// Workers return when set.
    pub(crate) stop: AtomicBool,
    /// Latencies are recorded while set.
    pub(crate) measuring: AtomicBool,
    /// Load is generated while set (the default). An interleaved run
    /// (`--interleave`) clears it while another side has its slice: the
    /// window scenarios send no new requests and the publisher no new
    /// publishes; connects, heartbeat sweeps and answers go on.
    pub(crate) active: AtomicBool,
    /// Workers whose devices are all held or refused for good (reported
    /// once, when the connect phase's work is done).
    pub(crate) connect_done: AtomicU64,
    /// Workers that have built their devices (key derivation takes
    /// seconds at millions of devices) and started sending.
    pub(crate) workers_ready: AtomicU64,
    /// Time zero of the run.
    pub(crate) epoch: Instant,
    /// The Unix time (seconds) at `epoch`.
    pub(crate) epoch_unix_s: u64,
    /// Per-account publish clocks (fanout only; empty otherwise).
    pub(crate) accounts: Vec<AccountClock>,
    /// The first refusal's Status and description, for the report.
    pub(crate) first_refusal: std::sync::Mutex<Option<String>>,
    /// The fanout publisher's thread, which parks while no account may be
    /// published to and is unparked by the delivery that lets one.
    pub(crate) publisher: std::sync::OnceLock<std::thread::Thread>,
}

impl Shared {
    /// Shared state; `clocks` accounts get publish clocks.
    pub(crate) fn new(clocks: u64) -> Arc<Shared> {
        Arc::new(Shared {
            counters: Counters::default(),
            stop: AtomicBool::new(false),
            measuring: AtomicBool::new(false),
            active: AtomicBool::new(true),
            connect_done: AtomicU64::new(0),
            workers_ready: AtomicU64::new(0),
            epoch: Instant::now(),
            epoch_unix_s: mpp::time::UnixMillis::from_system_clock()
                .seconds()
                .0
                .max(0) as u64,
            accounts: (0..clocks).map(|_| AccountClock::new()).collect(),
            first_refusal: std::sync::Mutex::new(None),
            publisher: std::sync::OnceLock::new(),
        })
    }

    /// The content check's outcome so far.
    pub(crate) fn wrong(&self) -> Wrong {
        let mut w = Wrong::default();
        for a in &self.accounts {
            let n = a.wrong.load(Relaxed);
            if a.unverifiable.load(Relaxed) {
                w.unverifiable += n;
                w.unverifiable_accounts += 1;
            } else {
                w.wrong += n;
            }
        }
        w
    }

    /// Microseconds since the epoch.
    pub(crate) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delivery_that_reaches_the_wished_count_wakes_once() {
        let c = AccountClock::new();
        // Nothing wished: no delivery wakes.
        assert!(!c.add_delivered(5));
        // 5 counted; a wish for 5 is met at once, one for 8 is not.
        assert!(c.delivered_or_wake_at(5));
        assert!(!c.delivered_or_wake_at(8));
        assert!(!c.add_delivered(2), "7 of 8");
        assert!(c.add_delivered(1), "the 8th wakes");
        assert!(!c.add_delivered(1), "the wish is spent");
        // A batch of deliveries that jumps over the wished count wakes too.
        assert!(!c.delivered_or_wake_at(12));
        assert!(c.add_delivered(10));
        assert_eq!(c.delivered.load(Relaxed), 19);
    }
}
