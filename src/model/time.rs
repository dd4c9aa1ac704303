//! Millisecond timestamps: parsing RFC 3339 / epoch-ms input and formatting the output `at`.
//!
//! Time is an `i64` count of milliseconds since the Unix epoch everywhere in segmenter; this module
//! is the only place that converts it to and from text.

use std::fmt::Write as _;

/// Milliseconds since 1970-01-01T00:00:00Z.
pub type Millis = i64;

/// The latest instant segmenter accepts: 9999-12-31T23:59:59.999Z.
pub const MAX_MILLIS: Millis = 253_402_300_799_999;

/// Why a timestamp could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("timestamp {0:?} is not RFC 3339")]
    NotRfc3339(String),
    #[error("timestamp {0} is outside 1970..9999")]
    OutOfRange(String),
    #[error("timestamp must be an RFC 3339 string or epoch milliseconds")]
    WrongType,
}

/// Parses an RFC 3339 timestamp, truncating sub-millisecond digits.
pub fn parse_rfc3339(text: &str) -> Result<Millis, TimeError> {
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| TimeError::NotRfc3339(text.to_string()))?;
    let nanos = parsed.unix_timestamp_nanos();
    let millis = nanos.div_euclid(1_000_000);
    check_range(millis).ok_or_else(|| TimeError::OutOfRange(text.to_string()))
}

/// Reads epoch milliseconds from a JSON number (a fraction is floored).
pub fn from_epoch_number(number: &serde_json::Number) -> Result<Millis, TimeError> {
    let millis = if let Some(int) = number.as_i64() {
        i128::from(int)
    } else {
        let float = number.as_f64().ok_or(TimeError::WrongType)?;
        if !float.is_finite() || float.abs() > 1e17 {
            return Err(TimeError::OutOfRange(number.to_string()));
        }
        float.floor() as i128
    };
    check_range(millis).ok_or_else(|| TimeError::OutOfRange(number.to_string()))
}

/// Reads a command-line time: RFC 3339 or plain epoch milliseconds.
pub fn parse_cli_time(text: &str) -> Result<Millis, TimeError> {
    if let Ok(millis) = text.trim().parse::<i64>() {
        return check_range(i128::from(millis)).ok_or_else(|| TimeError::OutOfRange(text.into()));
    }
    parse_rfc3339(text.trim())
}

fn check_range(millis: i128) -> Option<Millis> {
    if (0..=i128::from(MAX_MILLIS)).contains(&millis) {
        Some(millis as Millis)
    } else {
        None
    }
}

/// Formats as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC, always three decimals).
pub fn format_rfc3339(millis: Millis) -> String {
    let mut out = String::with_capacity(24);
    write_rfc3339(&mut out, millis);
    out
}

/// Appends the RFC 3339 form of `millis` to `out`.
pub fn write_rfc3339(out: &mut String, millis: Millis) {
    let days = millis.div_euclid(86_400_000);
    let ms_of_day = millis.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let hour = ms_of_day / 3_600_000;
    let minute = ms_of_day / 60_000 % 60;
    let second = ms_of_day / 1000 % 60;
    let milli = ms_of_day % 1000;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z"
    );
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Milliseconds in one duration unit: `ms`, `s`, `m`, `h`, `d` or `w`.
pub fn duration_unit(unit: &str) -> Option<i64> {
    match unit {
        "ms" => Some(1),
        "s" => Some(1000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        "d" => Some(86_400_000),
        "w" => Some(604_800_000),
        _ => None,
    }
}

/// Formats a duration in the rule language's units, e.g. `90s`, `1h`, `30d`, or `1234ms`.
pub fn format_duration(millis: i64) -> String {
    const UNITS: [(i64, &str); 5] = [
        (604_800_000, "w"),
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    for (size, unit) in UNITS {
        if millis != 0 && millis % size == 0 {
            return format!("{}{unit}", millis / size);
        }
    }
    format!("{millis}ms")
}

/// Milliseconds from `earlier` to `later`, saturating at the ends of `i64` instead of
/// overflowing: Kafka timestamps are set by producers and can be anything.
pub fn millis_since(earlier: Millis, later: Millis) -> i64 {
    later.saturating_sub(earlier)
}

/// Seconds from `earlier` to `later`, never negative (latency and lateness histograms).
pub fn seconds_since(earlier: Millis, later: Millis) -> f64 {
    millis_since(earlier, later).max(0) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(1_764_547_200_000),
            "2025-12-01T00:00:00.000Z"
        );
        assert_eq!(format_rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(format_rfc3339(MAX_MILLIS), "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn parses_offsets_and_truncates_sub_millis() {
        let utc = parse_rfc3339("2026-11-01T10:00:00.000Z").expect("utc");
        let offset = parse_rfc3339("2026-11-01T12:00:00.000999+02:00").expect("offset");
        assert_eq!(utc, offset);
        assert_eq!(format_rfc3339(utc), "2026-11-01T10:00:00.000Z");
        assert!(parse_rfc3339("2026-11-01 10:00").is_err());
        assert!(parse_rfc3339("1969-12-31T23:59:59Z").is_err());
    }

    #[test]
    fn epoch_numbers() {
        let n: serde_json::Number = serde_json::from_str("1762000000123").expect("number");
        assert_eq!(from_epoch_number(&n), Ok(1_762_000_000_123));
        let f: serde_json::Number = serde_json::from_str("1762000000123.9").expect("number");
        assert_eq!(from_epoch_number(&f), Ok(1_762_000_000_123));
        let neg: serde_json::Number = serde_json::from_str("-5").expect("number");
        assert!(from_epoch_number(&neg).is_err());
    }

    #[test]
    fn round_trips_every_day_boundary_sample() {
        for day in (0..2_932_896).step_by(997) {
            let millis = day * 86_400_000 + 12_345;
            let text = format_rfc3339(millis);
            assert_eq!(parse_rfc3339(&text), Ok(millis), "{text}");
        }
    }

    #[test]
    fn durations_pick_the_largest_unit() {
        assert_eq!(format_duration(90_000), "90s");
        assert_eq!(format_duration(3_600_000), "1h");
        assert_eq!(format_duration(1_209_600_000), "2w");
        assert_eq!(format_duration(1500), "1500ms");
    }

    #[test]
    fn differences_of_extreme_timestamps_saturate() {
        assert_eq!(millis_since(i64::MIN, 1_000), i64::MAX);
        assert_eq!(millis_since(i64::MAX, -1_000), i64::MIN);
        assert_eq!(millis_since(1_000, 4_000), 3_000);
        assert_eq!(seconds_since(i64::MIN, 0), i64::MAX as f64 / 1000.0);
        assert_eq!(
            seconds_since(i64::MAX, 0),
            0.0,
            "from the future: no time has passed"
        );
        assert_eq!(seconds_since(1_000, 3_500), 2.5);
    }
}
