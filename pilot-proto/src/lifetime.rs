//! Lifetimes as operators type them (`30d`, `24h`, `90m`, `45s`) and unix
//! times as people read them (UTC, RFC 3339). Every expiry in certificates,
//! rules and grants is a unix time in seconds, because it must mean the same
//! on every host and across restarts.

use std::fmt::Write;

/// Seconds in a minute.
pub const MINUTE: u64 = 60;
/// Seconds in an hour.
pub const HOUR: u64 = 60 * MINUTE;
/// Seconds in a day.
pub const DAY: u64 = 24 * HOUR;

/// A lifetime could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum LifetimeError {
    /// Nothing given.
    #[error("empty lifetime (expected a number and a unit, e.g. 30d, 24h, 90m, 45s)")]
    Empty,
    /// Not `<digits><unit>`.
    #[error("'{0}' is not a lifetime (expected a number and a unit: s, m, h or d; e.g. 24h)")]
    Malformed(String),
    /// Zero: nothing that lives for no time is worth granting.
    #[error("a lifetime of zero grants nothing; give at least 1s")]
    Zero,
    /// Too many seconds to count.
    #[error("lifetime '{0}' is too long")]
    Overflow(String),
}

/// Parses `<digits><s|m|h|d>` into seconds.
pub fn parse(text: &str) -> Result<u64, LifetimeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(LifetimeError::Empty);
    }
    let malformed = || LifetimeError::Malformed(s.to_string());
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(malformed)?;
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(malformed());
    }
    let unit = match unit {
        "s" => 1,
        "m" => MINUTE,
        "h" => HOUR,
        "d" => DAY,
        _ => return Err(malformed()),
    };
    let overflow = || LifetimeError::Overflow(s.to_string());
    let n: u64 = digits.parse().map_err(|_| overflow())?;
    let secs = n.checked_mul(unit).ok_or_else(overflow)?;
    if secs == 0 {
        return Err(LifetimeError::Zero);
    }
    Ok(secs)
}

/// Prints seconds in the largest unit that divides them (`30d`, `36h`, `61s`),
/// the inverse of [`parse`].
pub fn format(secs: u64) -> String {
    for (unit, name) in [(DAY, 'd'), (HOUR, 'h'), (MINUTE, 'm')] {
        if secs != 0 && secs % unit == 0 {
            return format!("{}{name}", secs / unit);
        }
    }
    format!("{secs}s")
}

/// A unix time as RFC 3339 UTC, e.g. `2025-07-01T12:00:00Z`.
pub fn utc(unix: u64) -> String {
    let (days, rem) = (unix / DAY, unix % DAY);
    let (y, m, d) = civil_from_days(days);
    let mut out = String::with_capacity(20);
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / HOUR,
        rem % HOUR / MINUTE,
        rem % MINUTE
    );
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01: shift the
/// year to start in March (so the leap day is last), split into 400-year eras
/// of 146 097 days, then into years of the era and days of the year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // 0..=365, from March 1
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit_and_prints_back() {
        assert_eq!(parse("30d"), Ok(30 * DAY));
        assert_eq!(parse(" 24h "), Ok(24 * HOUR));
        assert_eq!(parse("90m"), Ok(90 * MINUTE));
        assert_eq!(parse("45s"), Ok(45));
        assert_eq!(format(30 * DAY), "30d");
        assert_eq!(format(36 * HOUR), "36h");
        assert_eq!(format(90 * MINUTE), "90m");
        assert_eq!(format(61), "61s");
        for s in ["1s", "59s", "2m", "7h", "365d"] {
            assert_eq!(format(parse(s).unwrap()), s);
        }
    }

    #[test]
    fn refuses_what_is_not_a_lifetime() {
        assert_eq!(parse(""), Err(LifetimeError::Empty));
        assert_eq!(parse("0h"), Err(LifetimeError::Zero));
        for bad in ["30", "d", "30x", "3 0d", "-1d", "1.5h", "30dd", "１d"] {
            assert!(
                matches!(parse(bad), Err(LifetimeError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("99999999999999999999d"),
            Err(LifetimeError::Overflow(_))
        ));
        assert!(matches!(
            parse("999999999999999999d"),
            Err(LifetimeError::Overflow(_))
        ));
    }

    #[test]
    fn utc_dates_match_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(utc(1_735_689_600), "2025-01-01T00:00:00Z");
        assert_eq!(utc(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}
