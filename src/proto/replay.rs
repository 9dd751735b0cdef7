//! The replay window of docs/PROTOCOL.md §7: the highest client Serial seen and a
//! 64-wide bitmap below it.

/// What a Serial is, relative to a connection's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Above the highest seen: new.
    Newest,
    /// Inside the window and not seen yet (a reordered packet).
    InWindow,
    /// Seen before: a replay or a duplicate.
    Replayed,
    /// Below the window: too old to tell, treated as a replay.
    Stale,
}

/// Highest Serial seen plus a bitmap: bit i set = `highest - i` was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayWindow {
    /// Highest Serial seen.
    pub highest: u32,
    /// Bit i set when `highest - i` has been seen.
    pub bits: u64,
}

impl ReplayWindow {
    /// A window that has seen exactly `serial`.
    pub fn starting_at(serial: u32) -> Self {
        ReplayWindow {
            highest: serial,
            bits: 1,
        }
    }

    /// Classifies `serial` without recording it.
    pub fn check(&self, serial: u32) -> Freshness {
        if serial > self.highest {
            return Freshness::Newest;
        }
        let d = self.highest - serial;
        if d >= 64 {
            Freshness::Stale
        } else if self.bits & (1 << d) != 0 {
            Freshness::Replayed
        } else {
            Freshness::InWindow
        }
    }

    /// Records `serial` as seen; returns false (and changes nothing) unless it is fresh.
    pub fn accept(&mut self, serial: u32) -> bool {
        match self.check(serial) {
            Freshness::Newest => {
                let shift = serial - self.highest;
                self.bits = if shift >= 64 { 0 } else { self.bits << shift } | 1;
                self.highest = serial;
                true
            }
            Freshness::InWindow => {
                self.bits |= 1 << (self.highest - serial);
                true
            }
            Freshness::Replayed | Freshness::Stale => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_semantics() {
        let mut w = ReplayWindow::starting_at(10);
        assert!(!w.accept(10), "exact replay");
        assert!(w.accept(12));
        assert!(w.accept(11), "reordered but unseen");
        assert!(!w.accept(11));
        assert!(w.accept(100));
        assert_eq!(w.check(37), Freshness::InWindow);
        assert_eq!(w.check(36), Freshness::Stale);
        assert_eq!(w.check(12), Freshness::Stale);
        assert!(w.accept(37));
        assert!(!w.accept(37));
        assert!(w.accept(u32::MAX));
        assert_eq!(w.check(100), Freshness::Stale);
    }

    #[test]
    fn every_serial_accepted_once() {
        // Pseudo-random order within a sliding window: each accepted exactly once.
        let mut w = ReplayWindow::starting_at(0);
        let mut seen = std::collections::HashSet::new();
        let mut x: u32 = 7;
        for _ in 0..5000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let s = w.highest.saturating_sub(40) + (x >> 16) % 60;
            let fresh = w.check(s) == Freshness::Newest || w.check(s) == Freshness::InWindow;
            assert_eq!(w.accept(s), fresh);
            if fresh {
                assert!(seen.insert(s), "serial {s} accepted twice");
            }
        }
    }
}
