//! A hashed timer wheel: O(1) insert and expiry for retransmission timers.
//!
//! A publish to an account with many devices arms one timer per device, so
//! inserting must be O(1); deadlines are short (≤ 16 s for the default
//! retransmission schedule, docs/PROTOCOL.md §6), so a single-level wheel suffices.
//! Deadlines beyond the wheel's span fire at the end of the span instead;
//! callers check on expiry whether the timer is still wanted, so firing
//! early or for a cancelled timer is harmless.

use crate::time::UnixMillis;

/// Timers keyed by deadline, each carrying a `T`.
pub struct TimerWheel<T> {
    buckets: Vec<Vec<T>>,
    /// One bit per bucket: set while the bucket holds entries.
    occupied: Vec<u64>,
    tick_ms: u64,
    /// The next tick to expire.
    current: u64,
    len: usize,
}

impl<T> TimerWheel<T> {
    /// A wheel of `buckets` (rounded up to a multiple of 64) buckets of `tick_ms` each.
    pub fn new(tick_ms: u64, buckets: usize) -> Self {
        let n = buckets.max(64).div_ceil(64) * 64;
        TimerWheel {
            buckets: (0..n).map(|_| Vec::new()).collect(),
            occupied: vec![0; n / 64],
            tick_ms: tick_ms.max(1),
            current: 0,
            len: 0,
        }
    }

    /// Timers armed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn n(&self) -> u64 {
        self.buckets.len() as u64
    }

    /// Arms a timer for `deadline`; `now` anchors the wheel on first use.
    pub fn insert(&mut self, now: UnixMillis, deadline: UnixMillis, item: T) {
        if self.len == 0 {
            self.current = self.current.max(now.0 / self.tick_ms);
        }
        let tick = (deadline.0.div_ceil(self.tick_ms))
            .max(self.current)
            .min(self.current + self.n() - 1);
        let b = (tick % self.n()) as usize;
        self.buckets[b].push(item);
        self.occupied[b / 64] |= 1 << (b % 64);
        self.len += 1;
    }

    /// Fires every timer due at `now`, oldest first.
    pub fn expire(&mut self, now: UnixMillis, mut fire: impl FnMut(T)) {
        let target = now.0 / self.tick_ms;
        let mut steps = 0;
        while self.current <= target && self.len > 0 && steps <= self.n() {
            let b = (self.current % self.n()) as usize;
            if self.occupied[b / 64] & (1 << (b % 64)) != 0 {
                let items = std::mem::take(&mut self.buckets[b]);
                self.occupied[b / 64] &= !(1 << (b % 64));
                self.len -= items.len();
                let mut items = items;
                for item in items.drain(..) {
                    fire(item);
                }
                // Keep the bucket's allocation for reuse.
                if self.buckets[b].is_empty() {
                    self.buckets[b] = items;
                }
            }
            self.current += 1;
            steps += 1;
        }
        if self.len == 0 || self.current <= target {
            self.current = self.current.max(target + 1);
        }
    }

    /// When the earliest armed timer is due.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        if self.len == 0 {
            return None;
        }
        let n = self.n();
        let words = self.occupied.len();
        let start = (self.current % n) as usize;
        // Scan the occupancy bitmap from the current bucket, wrapping once.
        for step in 0..=words {
            let w = (start / 64 + step) % words;
            let mut bits = self.occupied[w];
            if step == 0 {
                bits &= !0u64 << (start % 64);
            } else if step == words {
                bits &= !(!0u64 << (start % 64));
            }
            if bits != 0 {
                let b = (w * 64 + bits.trailing_zeros() as usize) as u64;
                let ahead = (b + n - start as u64) % n;
                return Some(UnixMillis((self.current + ahead) * self.tick_ms));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_order_and_not_before() {
        let mut w = TimerWheel::new(4, 256);
        let t0 = UnixMillis(1_000_000);
        w.insert(t0, t0.plus_millis(1000), 1);
        w.insert(t0, t0.plus_millis(10), 0);
        w.insert(t0, t0.plus_millis(100_000), 2); // beyond the span: capped
        assert_eq!(w.next_deadline(), Some(t0.plus_millis(12)));
        let mut fired = Vec::new();
        w.expire(t0.plus_millis(9), |x| fired.push(x));
        assert!(fired.is_empty());
        w.expire(t0.plus_millis(12), |x| fired.push(x));
        assert_eq!(fired, [0]);
        assert_eq!(w.next_deadline(), Some(t0.plus_millis(1000)));
        w.expire(t0.plus_millis(999), |x| fired.push(x));
        assert_eq!(fired, [0]);
        w.expire(t0.plus_millis(1000), |x| fired.push(x));
        assert_eq!(fired, [0, 1]);
        let capped = w.next_deadline().expect("armed");
        assert!(capped <= t0.plus_millis(4 * 256));
        w.expire(UnixMillis(u64::MAX / 2), |x| fired.push(x));
        assert_eq!(fired, [0, 1, 2]);
        assert!(w.is_empty());
        assert_eq!(w.next_deadline(), None);
    }

    #[test]
    fn wraps_around_many_times() {
        let mut w = TimerWheel::new(1, 64);
        let mut now = UnixMillis(5);
        let mut fired = 0;
        for i in 0..10_000u64 {
            w.insert(now, now.plus_millis(i % 50 + 1), i);
            now = now.plus_millis(3);
            w.expire(now, |_| fired += 1);
            if let Some(d) = w.next_deadline() {
                assert!(d > now, "deadline {d:?} not after now {now:?}");
            }
        }
        w.expire(now.plus_millis(100), |_| fired += 1);
        assert_eq!(fired, 10_000);
    }

    #[test]
    fn len_counts_the_timers_armed() {
        let mut w = TimerWheel::new(4, 64);
        let t0 = UnixMillis(4_000);
        assert_eq!((w.len(), w.is_empty()), (0, true));
        w.insert(t0, t0.plus_millis(4), 'a');
        w.insert(t0, t0.plus_millis(4), 'b');
        w.insert(t0, t0.plus_millis(8), 'c');
        assert_eq!((w.len(), w.is_empty()), (3, false));
        let mut fired = Vec::new();
        w.expire(t0.plus_millis(4), |x| fired.push(x));
        assert_eq!(fired, ['a', 'b']);
        assert_eq!((w.len(), w.is_empty()), (1, false));
        w.expire(t0.plus_millis(8), |x| fired.push(x));
        assert_eq!(fired, ['a', 'b', 'c']);
        assert_eq!((w.len(), w.is_empty()), (0, true));
    }

    #[test]
    fn a_tick_already_expired_is_not_reopened() {
        // An expire that empties the wheel, or finds it empty, has done every
        // tick up to `now`: a timer armed then for `now` or earlier is due at
        // the next tick, not in that one again.
        let mut w = TimerWheel::new(4, 64);
        let t0 = UnixMillis(4_000);
        w.insert(t0, t0.plus_millis(8), 1);
        let mut fired = Vec::new();
        let now = t0.plus_millis(100);
        w.expire(now, |x| fired.push(x));
        assert_eq!(fired, [1]);
        w.insert(now, now, 2);
        w.insert(now, t0, 3);
        assert_eq!(w.next_deadline(), Some(now.plus_millis(4)));
        w.expire(now, |x| fired.push(x));
        assert_eq!(fired, [1]);
        w.expire(now.plus_millis(4), |x| fired.push(x));
        assert_eq!(fired, [1, 2, 3]);
        let later = now.plus_millis(40);
        w.expire(later, |x| fired.push(x));
        w.insert(later, later, 4);
        assert_eq!(w.next_deadline(), Some(later.plus_millis(4)));
    }

    #[test]
    fn next_deadline_is_exact_from_any_bucket_to_any_other() {
        // 256 buckets: four words of the occupancy bitmap. From the first, a
        // middle and the last bit of a word, a timer in every bucket ahead,
        // wrapped ones included, is found at its tick and fires then.
        for start in [0u64, 64 * 5 + 5, 1000 * 256 + 63, 7 * 256 + 200] {
            for ahead in 0..256u64 {
                let mut w = TimerWheel::new(4, 256);
                let due = UnixMillis((start + ahead) * 4);
                w.insert(UnixMillis(start * 4), due, ahead);
                assert_eq!(w.next_deadline(), Some(due), "{start} + {ahead}");
                let mut fired = Vec::new();
                if ahead > 0 {
                    w.expire(UnixMillis(due.0 - 1), |x| fired.push(x));
                    assert!(fired.is_empty(), "{start} + {ahead}: early");
                    assert_eq!(w.next_deadline(), Some(due), "{start} + {ahead}");
                }
                w.expire(due, |x| fired.push(x));
                assert_eq!(fired, [ahead], "{start} + {ahead}");
                assert_eq!((w.len(), w.next_deadline()), (0, None));
            }
        }
    }

    #[test]
    fn a_fired_bucket_is_not_reported_again() {
        // The bucket of a timer that fired is behind `current`: reached by
        // the scan only after it wraps, where a bit left set would come
        // before the timer armed since.
        let mut w = TimerWheel::new(1, 64);
        w.insert(UnixMillis(0), UnixMillis(10), 'a');
        let mut fired = Vec::new();
        w.expire(UnixMillis(20), |x| fired.push(x));
        assert_eq!(fired, ['a']);
        w.insert(UnixMillis(20), UnixMillis(80), 'b');
        assert_eq!(w.next_deadline(), Some(UnixMillis(80)));
        w.expire(UnixMillis(79), |x| fired.push(x));
        assert_eq!((fired.len(), w.next_deadline()), (1, Some(UnixMillis(80))));
        w.expire(UnixMillis(80), |x| fired.push(x));
        assert_eq!(fired, ['a', 'b']);
    }
}
