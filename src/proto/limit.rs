//! Token-bucket rate limits in bounded memory: per source address for the
//! answers a spoofed source could trigger (STUN, refusals) and for the
//! authentication failures of unknown connections, and per any other key
//! (a source and a conn id, a connection) where one address must not speak
//! for another (docs/PROTOCOL.md §7.7, §7.8).
//!
//! A fixed number of buckets, each key hashed to one: memory never grows
//! with the number of sources an attacker can forge. Two keys may share a
//! bucket; that only ever makes a limit stricter for them. Time comes in as
//! an argument; nothing here reads a clock.

use std::net::IpAddr;

use crate::time::UnixMillis;

/// Default number of buckets of a [`RateLimiter`].
pub const DEFAULT_BUCKETS: usize = 4096;
/// Most buckets a [`RateLimiter`] will allocate (8 MiB of state).
pub const MAX_BUCKETS: usize = 1 << 20;
/// Token amounts are kept in thousandths of a token, so a refill of
/// `elapsed_ms × rate_per_sec` thousandths is exact.
const MILLI_TOKENS: u32 = 1000;
/// Bucket timestamps are milliseconds since an epoch held by the limiter; once
/// that offset reaches this value every bucket is brought up to date and the
/// epoch moves to now, so the offsets always fit in a `u32`.
const REBASE_AFTER_MS: u64 = 1 << 31;

/// One token bucket: 8 bytes.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens available, in thousandths of a token.
    milli_tokens: u32,
    /// Time of the last refill, in milliseconds since the limiter's epoch.
    last_ms: u32,
}

impl Bucket {
    /// Adds the tokens earned up to `now_ms` (since the epoch), capped at `cap`.
    fn refill(&mut self, now_ms: u64, rate_per_sec: u32, cap: u32) {
        let elapsed = now_ms.saturating_sub(u64::from(self.last_ms));
        // tokens/s is the same number as thousandths of a token per ms.
        let earned = elapsed.saturating_mul(u64::from(rate_per_sec));
        let total = u64::from(self.milli_tokens).saturating_add(earned);
        self.milli_tokens = total.min(u64::from(cap)) as u32;
    }
}

/// Per-source-address token buckets in fixed memory, for the rate limit on
/// unauthenticated answers (docs/PROTOCOL.md §7), STUN Binding responses first.
///
/// Buckets are found by a keyed hash (random keys per limiter) of the source:
/// an IPv4 address, or the /64 prefix of an IPv6 address, since one host
/// usually holds a whole /64 and a spoofer could otherwise cycle through it.
/// Sources whose hashes collide share a bucket, which can only make the limit
/// stricter for them; memory never grows with the number of sources.
pub struct RateLimiter {
    /// The buckets; the length is a power of two.
    buckets: Box<[Bucket]>,
    /// Keys of the hash from source to bucket.
    hasher: ahash::RandomState,
    /// Tokens added per second; 0 means unlimited.
    rate_per_sec: u32,
    /// Bucket capacity in thousandths of a token.
    cap: u32,
    /// Origin of the bucket timestamps, set on the first call.
    epoch: Option<UnixMillis>,
    /// From this time on every bucket holds at least one token: a token
    /// taken at `t` leaves its bucket at ≥ 0 and one token's refill time
    /// later it holds ≥ 1 again. Lets [`has_token`](Self::has_token), which
    /// a node asks for every packet, answer without hashing the source while
    /// nothing has been charged lately.
    every_bucket_has_token_from: UnixMillis,
}

impl RateLimiter {
    /// A limiter allowing each source `burst` answers at once and `rate_per_sec`
    /// more per second, with `buckets` buckets (rounded up to a power of two,
    /// at least 1 and at most [`MAX_BUCKETS`]; [`DEFAULT_BUCKETS`] is a good
    /// size). `burst` is at least 1 and at most 4 294 967.
    ///
    /// `rate_per_sec == 0` means unlimited: every call to
    /// [`allow`](Self::allow) says yes. That is meant for benchmarks and load
    /// tests only; a node facing the Internet must set a rate.
    pub fn new(rate_per_sec: u32, burst: u32, buckets: usize) -> Self {
        // Clamped first, so the rounding cannot overflow.
        let n = buckets.clamp(1, MAX_BUCKETS).next_power_of_two();
        let cap = burst.clamp(1, u32::MAX / MILLI_TOKENS) * MILLI_TOKENS;
        let full = Bucket {
            milli_tokens: cap,
            last_ms: 0,
        };
        RateLimiter {
            buckets: vec![full; if rate_per_sec == 0 { 1 } else { n }].into_boxed_slice(),
            hasher: ahash::RandomState::new(),
            rate_per_sec,
            cap,
            epoch: None,
            every_bucket_has_token_from: UnixMillis(0),
        }
    }

    /// Whether `ip` may be answered at `now`: refills its bucket for the time
    /// elapsed (up to the burst) and takes one token if there is one.
    pub fn allow(&mut self, now: UnixMillis, ip: IpAddr) -> bool {
        self.allow_at(now, source_key(ip))
    }

    /// Whether `key` may have one more at `now` (a key of the caller's own:
    /// a connection, a source and a conn id), taking a token if so.
    pub fn allow_key(&mut self, now: UnixMillis, key: u64) -> bool {
        self.allow_at(now, (0, key))
    }

    /// Whether the pair of `ip` and `key` (a conn id, say) may have one more
    /// at `now`: a limit per source *and* per what it speaks for, so one
    /// address cannot use up the share of another key behind it.
    pub fn allow_pair(&mut self, now: UnixMillis, ip: IpAddr, key: u64) -> bool {
        let (_, source) = source_key(ip);
        self.allow_at(now, (5, source ^ key.rotate_left(29)))
    }

    fn allow_at(&mut self, now: UnixMillis, key: (u8, u64)) -> bool {
        let refill_ms = u64::from(MILLI_TOKENS.div_ceil(self.rate_per_sec.max(1)));
        match self.bucket_at(now, key) {
            None => true,
            Some(bucket) if bucket.milli_tokens >= MILLI_TOKENS => {
                bucket.milli_tokens -= MILLI_TOKENS;
                let full_again = now.plus_millis(refill_ms);
                if full_again > self.every_bucket_has_token_from {
                    self.every_bucket_has_token_from = full_again;
                }
                true
            }
            Some(_) => false,
        }
    }

    /// Whether `ip` has a token at `now`, without taking it: for limits
    /// that only charge what went wrong (a failed authentication).
    pub fn has_token(&mut self, now: UnixMillis, ip: IpAddr) -> bool {
        if now >= self.every_bucket_has_token_from {
            return true;
        }
        self.bucket_at(now, source_key(ip))
            .is_none_or(|bucket| bucket.milli_tokens >= MILLI_TOKENS)
    }

    /// `ip`'s bucket refilled up to `now`; `None` when unlimited.
    fn bucket_at(&mut self, now: UnixMillis, key: (u8, u64)) -> Option<&mut Bucket> {
        if self.rate_per_sec == 0 {
            return None;
        }
        let epoch = *self.epoch.get_or_insert(now);
        let mut now_ms = now.millis_since(epoch);
        if now_ms >= REBASE_AFTER_MS {
            self.rebase(now, now_ms);
            now_ms = 0;
        }
        let (rate, cap) = (self.rate_per_sec, self.cap);
        let i = self.index_of(key);
        let bucket = &mut self.buckets[i];
        bucket.refill(now_ms, rate, cap);
        // now_ms < REBASE_AFTER_MS < 2^32 here; never move a bucket's clock back.
        bucket.last_ms = bucket.last_ms.max(now_ms as u32);
        Some(bucket)
    }

    /// Brings every bucket up to `now` (`now_ms` after the old epoch) and makes
    /// `now` the epoch. Refilling in two steps gives the same tokens as in one.
    fn rebase(&mut self, now: UnixMillis, now_ms: u64) {
        let (rate, cap) = (self.rate_per_sec, self.cap);
        for bucket in self.buckets.iter_mut() {
            bucket.refill(now_ms, rate, cap);
            bucket.last_ms = 0;
        }
        self.epoch = Some(now);
    }

    /// The bucket of a source: IPv4 address or IPv6 /64, canonicalised so an
    /// IPv4-mapped IPv6 address shares the bucket of its IPv4 address.
    #[cfg(test)]
    fn bucket_index(&self, ip: IpAddr) -> usize {
        self.index_of(source_key(ip))
    }

    fn index_of(&self, key: (u8, u64)) -> usize {
        (self.hasher.hash_one(key) as usize) & (self.buckets.len() - 1)
    }
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rate_per_sec", &self.rate_per_sec)
            .field("burst", &(self.cap / MILLI_TOKENS))
            .field("buckets", &self.buckets.len())
            .finish_non_exhaustive()
    }
}

/// A source address as a key: an IPv4 address, or an IPv6 address's /64
/// (one subscriber's prefix), so an IPv6 host cannot escape its limit by
/// changing the low bits.
fn source_key(ip: IpAddr) -> (u8, u64) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (4, u64::from(u32::from(v4))),
        IpAddr::V6(v6) => (6, (u128::from(v6) >> 64) as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    // ---------------------------------------------------------------------------
    // The source rate limiter
    // ---------------------------------------------------------------------------

    fn v4(last: u8) -> IpAddr {
        Ipv4Addr::new(198, 51, 100, last).into()
    }

    #[test]
    fn limiter_burst_then_refuse_then_refill() {
        let mut lim = RateLimiter::new(2, 3, DEFAULT_BUCKETS);
        let t0 = UnixMillis(1_700_000_000_000);
        let ip = v4(1);
        assert!(lim.allow(t0, ip));
        assert!(lim.allow(t0, ip));
        assert!(lim.allow(t0, ip));
        assert!(!lim.allow(t0, ip), "burst spent");
        // 2 tokens/s: one token every 500 ms.
        assert!(!lim.allow(t0.plus_millis(499), ip));
        assert!(lim.allow(t0.plus_millis(500), ip));
        assert!(!lim.allow(t0.plus_millis(500), ip));
        assert!(lim.allow(t0.plus_millis(1000), ip));
        // A long pause refills to the burst, not beyond.
        let later = t0.plus_millis(60_000);
        for _ in 0..3 {
            assert!(lim.allow(later, ip));
        }
        assert!(!lim.allow(later, ip));
    }

    #[test]
    fn has_token_follows_the_charges_without_taking_any() {
        // 4 tokens/s, burst 2: a drawn-down bucket is at one token 250 ms later.
        let mut lim = RateLimiter::new(4, 2, DEFAULT_BUCKETS);
        let t0 = UnixMillis(1_700_000_000_000);
        let (a, b) = (v4(1), v4(2));
        // Nothing charged yet: every source has a token, asking takes none.
        for _ in 0..10 {
            assert!(lim.has_token(t0, a));
        }
        assert!(lim.allow(t0, a));
        assert!(lim.has_token(t0, a), "one token of two left");
        assert!(lim.allow(t0, a));
        assert!(!lim.has_token(t0, a), "burst spent");
        assert!(
            lim.has_token(t0, b),
            "another source is not charged for a's"
        );
        assert!(!lim.has_token(t0.plus_millis(249), a));
        assert!(lim.has_token(t0.plus_millis(250), a), "refilled one token");
        // Charged again late: the limit holds past the earlier refill time.
        assert!(lim.allow(t0.plus_millis(250), a));
        assert!(!lim.has_token(t0.plus_millis(260), a));
        assert!(lim.has_token(t0.plus_millis(500), a));
        assert!(lim.has_token(t0.plus_millis(10_000), a));
    }

    #[test]
    fn limiter_partial_tokens_accumulate() {
        // 1 token/s, asked every 250 ms: answered once a second.
        let mut lim = RateLimiter::new(1, 1, 16);
        let ip = v4(2);
        let mut allowed = 0;
        for step in 0..=40u64 {
            if lim.allow(UnixMillis(step * 250), ip) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 11, "t = 0 plus one per second over 10 s");
    }

    #[test]
    fn limiter_sources_are_independent() {
        let mut lim = RateLimiter::new(1, 2, DEFAULT_BUCKETS);
        let a = v4(1);
        // Pick sources whose buckets differ (the hash keys are random).
        let others: Vec<IpAddr> = (2..=255)
            .map(v4)
            .filter(|&ip| lim.bucket_index(ip) != lim.bucket_index(a))
            .take(2)
            .collect();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let t = UnixMillis(5_000);
        assert!(lim.allow(t, a));
        assert!(lim.allow(t, a));
        assert!(!lim.allow(t, a));
        for ip in others {
            assert!(lim.allow(t, ip));
            assert!(lim.allow(t, ip));
            assert!(!lim.allow(t, ip));
        }
        if lim.bucket_index(v6) != lim.bucket_index(a) {
            assert!(lim.allow(t, v6));
        }
    }

    #[test]
    fn limiter_groups_ipv6_by_64_and_mapped_ipv4_with_ipv4() {
        let mut lim = RateLimiter::new(1, 1, DEFAULT_BUCKETS);
        let t = UnixMillis(0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        assert_eq!(lim.bucket_index(a), lim.bucket_index(b));
        assert!(lim.allow(t, a));
        assert!(!lim.allow(t, b), "same /64, same bucket");

        let mapped: IpAddr = Ipv4Addr::new(192, 0, 2, 9).to_ipv6_mapped().into();
        let plain: IpAddr = Ipv4Addr::new(192, 0, 2, 9).into();
        assert_eq!(lim.bucket_index(mapped), lim.bucket_index(plain));
    }

    #[test]
    fn limiter_collisions_share_a_bucket() {
        let mut lim = RateLimiter::new(1, 1, 1);
        let t = UnixMillis(0);
        assert!(lim.allow(t, v4(1)));
        assert!(!lim.allow(t, v4(2)));
    }

    #[test]
    fn limiter_bucket_count_is_a_power_of_two() {
        assert_eq!(RateLimiter::new(1, 1, 0).buckets.len(), 1);
        assert_eq!(RateLimiter::new(1, 1, 1000).buckets.len(), 1024);
        assert_eq!(RateLimiter::new(1, 1, 4096).buckets.len(), 4096);
        assert_eq!(
            RateLimiter::new(1, 1, usize::MAX).buckets.len(),
            MAX_BUCKETS
        );
        assert_eq!(std::mem::size_of::<Bucket>(), 8);
    }

    #[test]
    fn limiter_unlimited_mode() {
        let mut lim = RateLimiter::new(0, 1, DEFAULT_BUCKETS);
        for i in 0..10_000u64 {
            assert!(lim.allow(UnixMillis(i / 100), v4(1)));
        }
    }

    #[test]
    fn limiter_extreme_arguments() {
        let mut lim = RateLimiter::new(u32::MAX, u32::MAX, 4);
        let t = UnixMillis(0);
        for _ in 0..1000 {
            assert!(lim.allow(t, v4(1)));
        }
        // Burst 0 is taken as 1.
        let mut lim = RateLimiter::new(1, 0, 4);
        assert!(lim.allow(t, v4(1)));
        assert!(!lim.allow(t, v4(1)));
        // Time going backwards does not mint tokens.
        let mut lim = RateLimiter::new(1, 1, 4);
        assert!(lim.allow(UnixMillis(10_000), v4(1)));
        assert!(!lim.allow(UnixMillis(0), v4(1)));
        assert!(!lim.allow(UnixMillis(10_999), v4(1)));
        assert!(lim.allow(UnixMillis(11_000), v4(1)));
    }

    #[test]
    fn limiter_survives_long_uptime() {
        let mut lim = RateLimiter::new(1, 2, 8);
        let mut t = UnixMillis(1_000);
        let day = 86_400_000;
        // Drain, then come back after more than 2^32 ms (≈ 49.7 days).
        assert!(lim.allow(t, v4(1)));
        assert!(lim.allow(t, v4(1)));
        assert!(!lim.allow(t, v4(1)));
        t = t.plus_millis(60 * day);
        assert!(lim.allow(t, v4(1)));
        assert!(lim.allow(t, v4(1)));
        assert!(!lim.allow(t, v4(1)));
        // Step across the rebase point in small steps; the rate stays exact.
        let mut allowed = 0;
        for _ in 0..(30 * 24) {
            t = t.plus_millis(3_600_000);
            // Drain this source each hour; each hour earns the full burst of 2.
            while lim.allow(t, v4(1)) {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 30 * 24 * 2);
        // A bucket drained just before a rebase keeps its exact partial refill.
        let mut lim = RateLimiter::new(1, 5, 8);
        let src = v4(3);
        let other = (4..=255)
            .map(v4)
            .find(|&ip| lim.bucket_index(ip) != lim.bucket_index(src))
            .unwrap();
        assert!(lim.allow(UnixMillis(0), other), "sets the epoch");
        let t1 = UnixMillis((1 << 31) - 500);
        for _ in 0..5 {
            assert!(lim.allow(t1, src));
        }
        assert!(!lim.allow(t1, src));
        // Another source triggers the rebase 500 ms later; `src` has half a token.
        let t2 = UnixMillis(1 << 31);
        assert!(lim.allow(t2, other));
        assert!(!lim.allow(t2.plus_millis(499), src));
        assert!(lim.allow(t2.plus_millis(500), src));
        assert!(!lim.allow(t2.plus_millis(500), src));
    }

    #[test]
    fn pair_limits_are_per_source_and_per_conn_id() {
        // Fixed hash keys and the largest table, so the pairs below land in
        // distinct buckets every run (checked: no collision with these seeds).
        let mut lim = RateLimiter::new(1, 1, MAX_BUCKETS);
        lim.hasher = ahash::RandomState::with_seeds(1, 2, 3, 4);
        let t = UnixMillis(0);
        // One address speaking for seven conn ids: each id has its own share.
        // Rotated left by 29, keys 1..=7 set only bits 29..=31, which the
        // address 255.255.255.255 already has: OR-ing key into source
        // instead of XOR-ing would merge them into one bucket.
        let all_ones: IpAddr = Ipv4Addr::BROADCAST.into();
        let per_key = (1..=7u64)
            .filter(|&key| lim.allow_pair(t, all_ones, key))
            .count();
        assert_eq!(per_key, 7, "each conn id behind one address has a share");
        for key in 1..=7u64 {
            assert!(!lim.allow_pair(t, all_ones, key), "conn id {key} spent");
        }
        // Seven addresses speaking for one conn id (0): each address has its
        // own share (AND-ing would map every source to the same key).
        let per_source = (1..=7u8)
            .filter(|&last| lim.allow_pair(t, v4(last), 0))
            .count();
        assert_eq!(
            per_source, 7,
            "each address has a share for the same conn id"
        );
    }

    #[test]
    fn ipv6_sources_in_different_64s_are_independent() {
        // Fixed hash keys: the two /64s below get different buckets.
        let mut lim = RateLimiter::new(1, 1, MAX_BUCKETS);
        lim.hasher = ahash::RandomState::with_seeds(1, 2, 3, 4);
        let t = UnixMillis(0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let c: IpAddr = "2001:db9::1".parse().unwrap();
        assert_ne!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        assert!(lim.allow(t, a));
        assert!(!lim.allow(t, a), "a's burst spent");
        assert!(lim.allow(t, b), "another /64 is not charged for a's");
        assert!(lim.allow(t, c), "another prefix is not charged for a's");
    }

    #[test]
    fn debug_shows_rate_burst_and_buckets() {
        let lim = RateLimiter::new(7, 3, 1000);
        assert_eq!(
            format!("{lim:?}"),
            "RateLimiter { rate_per_sec: 7, burst: 3, buckets: 1024, .. }"
        );
    }
}
