//! Time values of the protocol, with no clock in sight.
//!
//! The sans-IO layers never read the clock: the I/O layer passes the current
//! time in as a [`UnixMillis`]. Wire dates (docs/PROTOCOL.md §1: DateTime is the
//! string `yyyy-MM-ddTHH:mm:ssZ`, UTC) are [`UnixSeconds`]; this module turns
//! them into and out of that text without allocating.

use std::fmt;

/// Milliseconds since the Unix epoch: the "now" every state machine is given.
///
/// The I/O layer derives it from a monotonic clock anchored at start-up, so it
/// never goes backwards within one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// This instant plus `ms` milliseconds (saturating).
    pub fn plus_millis(self, ms: u64) -> Self {
        UnixMillis(self.0.saturating_add(ms))
    }

    /// Whole seconds since the epoch.
    pub fn seconds(self) -> UnixSeconds {
        UnixSeconds((self.0 / 1000) as i64)
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn millis_since(self, earlier: UnixMillis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The wall clock of this process, for binaries and tests that need a real time.
    pub fn from_system_clock() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(d.as_millis() as u64)
    }
}

/// Seconds since the Unix epoch, the resolution of a wire DateTime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct UnixSeconds(pub i64);

/// Length of the wire form `yyyy-MM-ddTHH:mm:ssZ`.
pub const DATETIME_LEN: usize = 20;

/// Smallest and largest seconds representable with a four-digit year.
const MIN_SECONDS: i64 = -62_167_219_200; // 0000-01-01T00:00:00Z
const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

/// Why a DateTime text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a UTC date-time of the form yyyy-MM-ddTHH:mm:ssZ")]
pub struct DateTimeError;

impl UnixSeconds {
    /// The wire form, `yyyy-MM-ddTHH:mm:ssZ`. Years outside 0..=9999 are clamped.
    ///
    /// Every reply carries `Now`, so the last second formatted is remembered
    /// per thread and reused.
    pub fn to_wire(self) -> [u8; DATETIME_LEN] {
        thread_local! {
            static LAST: std::cell::Cell<(i64, [u8; DATETIME_LEN])> =
                const { std::cell::Cell::new((0, *b"1970-01-01T00:00:00Z")) };
        }
        LAST.with(|last| {
            let (secs, wire) = last.get();
            if secs == self.0 {
                return wire;
            }
            let wire = self.format();
            last.set((self.0, wire));
            wire
        })
    }

    fn format(self) -> [u8; DATETIME_LEN] {
        let secs = self.0.clamp(MIN_SECONDS, MAX_SECONDS);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let (hh, mm, ss) = (rem / 3600, (rem / 60) % 60, rem % 60);
        let mut out = *b"0000-00-00T00:00:00Z";
        put_digits(&mut out[0..4], y);
        put_digits(&mut out[5..7], m);
        put_digits(&mut out[8..10], d);
        put_digits(&mut out[11..13], hh);
        put_digits(&mut out[14..16], mm);
        put_digits(&mut out[17..19], ss);
        out
    }

    /// Parses the wire form strictly (fixed widths, `T` and `Z`, valid calendar date).
    /// RFC 3339 texts of that same shape are accepted too, which covers credentials.
    pub fn parse(text: &[u8]) -> Result<Self, DateTimeError> {
        if text.len() != DATETIME_LEN
            || text[4] != b'-'
            || text[7] != b'-'
            || !(text[10] == b'T' || text[10] == b't')
            || text[13] != b':'
            || text[16] != b':'
            || !(text[19] == b'Z' || text[19] == b'z')
        {
            return Err(DateTimeError);
        }
        let y = digits(&text[0..4])?;
        let m = digits(&text[5..7])?;
        let d = digits(&text[8..10])?;
        let hh = digits(&text[11..13])?;
        let mm = digits(&text[14..16])?;
        let ss = digits(&text[17..19])?;
        if !(1..=12).contains(&m)
            || d < 1
            || d > days_in_month(y, m)
            || hh > 23
            || mm > 59
            || ss > 59
        {
            return Err(DateTimeError);
        }
        Ok(UnixSeconds(
            days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss,
        ))
    }
}

impl fmt::Display for UnixSeconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wire = self.to_wire();
        // The wire form is ASCII by construction.
        f.write_str(std::str::from_utf8(&wire).map_err(|_| fmt::Error)?)
    }
}

fn put_digits(out: &mut [u8], mut v: i64) {
    for b in out.iter_mut().rev() {
        *b = b'0' + (v % 10) as u8;
        v /= 10;
    }
}

fn digits(text: &[u8]) -> Result<i64, DateTimeError> {
    text.iter().try_fold(0i64, |acc, &b| {
        if b.is_ascii_digit() {
            Ok(acc * 10 + i64::from(b - b'0'))
        } else {
            Err(DateTimeError)
        }
    })
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses an operator's duration: a number followed by `s`, `m`, `h` or `d`
/// (`90s`, `12h`, `30d`); a bare number is seconds.
pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (num, mult) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1),
        Some((i, 'm')) => (&text[..i], 60),
        Some((i, 'h')) => (&text[..i], 3600),
        Some((i, 'd')) => (&text[..i], 86_400),
        _ => (text, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected a number followed by s, m, h or d, e.g. 90s, 12h, 30d"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_round_trip_known_dates() {
        for (text, secs) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2026-11-21T12:00:00Z", 1_795_262_400),
            ("2027-01-01T00:00:00Z", 1_798_761_600),
            ("2000-02-29T23:59:59Z", 951_868_799),
        ] {
            assert_eq!(
                UnixSeconds::parse(text.as_bytes()),
                Ok(UnixSeconds(secs)),
                "{text}"
            );
            assert_eq!(&UnixSeconds(secs).to_wire(), text.as_bytes());
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "2026-11-21T12:00:00",
            "2026-11-21 12:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-21T24:00:00Z",
            "2026-11-21T12:00:0xZ",
            "+026-11-21T12:00:00Z",
        ] {
            assert_eq!(
                UnixSeconds::parse(bad.as_bytes()),
                Err(DateTimeError),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_day_round_trips() {
        let mut s = MIN_SECONDS;
        while s < MAX_SECONDS {
            let w = UnixSeconds(s).to_wire();
            assert_eq!(UnixSeconds::parse(&w), Ok(UnixSeconds(s)));
            s += 86_400 * 7 + 3_601;
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90s"), Ok(90));
        assert_eq!(parse_duration_secs("12h"), Ok(43_200));
        assert_eq!(parse_duration_secs("30d"), Ok(2_592_000));
        assert_eq!(parse_duration_secs("5m"), Ok(300));
        assert_eq!(parse_duration_secs("42"), Ok(42));
        assert!(parse_duration_secs("").is_err());
        assert!(parse_duration_secs("3w").is_err());
        assert!(parse_duration_secs("-1d").is_err());
    }
}
