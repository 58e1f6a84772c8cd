//! The times `audit show --since` takes: an RFC 3339 time
//! (`2025-07-01T12:00:00Z`, `2025-07-01T14:00:00+02:00`) or an age back
//! from now (`10m`, `2h`, `7d`).

use pilot_proto::lifetime::{self, DAY};

/// A `--since` that is neither a time nor an age.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is neither an RFC 3339 time (e.g. 2025-07-01T12:00:00Z) nor an age (e.g. 10m, 2h, 7d)"
)]
pub struct BadSince(pub String);

/// The unix time `text` names, `now` being the current unix time.
pub fn parse_since(text: &str, now: u64) -> Result<u64, BadSince> {
    let s = text.trim();
    let bad = || BadSince(s.to_string());
    if s.len() < 10 && s.ends_with(|c: char| c.is_ascii_alphabetic()) {
        let age = lifetime::parse(s).map_err(|_| bad())?;
        return Ok(now.saturating_sub(age));
    }
    parse_rfc3339(s).ok_or_else(bad)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` as unix seconds (the
/// fraction is dropped); None for anything else or a time before 1970.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())
            .flatten()
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let r = rest.as_bytes();
            if r.len() != 6 || r[3] != b':' || !matches!(r[0], b'+' | b'-') {
                return None;
            }
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if r[0] == b'-' {
                -o
            } else {
                o
            }
        }
    };
    let days = days_from_civil(y, mo, d);
    let t = days * DAY as i64 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(t).ok()
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

/// Days from 1970-01-01 to the given date (proleptic Gregorian calendar),
/// counted through eras of 400 years (146 097 days), each starting on
/// 1 March so that the leap day falls at the end of a year.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let month_from_march = (m + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_with_the_printed_form() {
        for t in [
            0u64,
            951_782_400,
            1_750_000_000,
            4_102_444_800,
            1_709_164_800,
        ] {
            let text = lifetime::utc(t);
            assert_eq!(parse_rfc3339(&text), Some(t), "{text}");
        }
        assert_eq!(parse_rfc3339("2025-06-15T14:46:40Z"), Some(1_749_998_800));
        assert_eq!(
            parse_rfc3339("2025-06-15T16:46:40.123+02:00"),
            Some(1_749_998_800)
        );
        assert_eq!(
            parse_rfc3339("2025-06-15t09:46:40-05:00"),
            Some(1_749_998_800)
        );
        assert_eq!(parse_rfc3339("2024-02-29T00:00:00Z"), Some(1_709_164_800));
    }

    #[test]
    fn ages_count_back_from_now() {
        let now = 1_750_000_000;
        assert_eq!(parse_since("10m", now), Ok(now - 600));
        assert_eq!(parse_since("2h", now), Ok(now - 7200));
        assert_eq!(parse_since("7d", now), Ok(now - 7 * 86_400));
        assert_eq!(parse_since("2025-06-15T14:46:40Z", now), Ok(1_749_998_800));
    }

    #[test]
    fn anything_else_is_refused() {
        for bad in [
            "",
            "10",
            "10x",
            "yesterday",
            "2025-06-15",
            "2025-06-15T14:46:40",
            "2025-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-06-15T24:00:00Z",
            "2025-06-15T14:46:40+2:00",
            "2025-06-15T14:46:40.Z",
            "1969-12-31T23:59:59Z",
            "+025-06-15T14:46:40Z",
        ] {
            assert!(parse_since(bad, 1_750_000_000).is_err(), "{bad:?}");
        }
    }
}
