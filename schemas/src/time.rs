//! Event timestamps: RFC 3339 with or without an offset (a naive time is UTC, as the platform's
//! Python producers send `datetime.now().isoformat()`), or integer epoch milliseconds.
//!
//! Internally every time is `i64` microseconds since the Unix epoch (UTC), the precision of
//! Python's `isoformat()` and of PostgreSQL's `timestamptz`.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

use crate::error::{DecodeError, ErrorKind};

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// Earliest accepted event time: 2000-01-01T00:00:00Z. Anything earlier is a broken clock.
pub const MIN_EVENT_TIME_US: Micros = 946_684_800_000_000;
/// Latest accepted event time: 2100-01-01T00:00:00Z.
pub const MAX_EVENT_TIME_US: Micros = 4_102_444_800_000_000;

/// Parses the value of a timestamp field named `field`.
pub fn parse_timestamp(v: &Value, field: &str) -> Result<Micros, DecodeError> {
    let us = match v {
        Value::String(s) => parse_str(s).ok_or_else(|| {
            DecodeError::field(
                ErrorKind::BadTimestamp,
                field,
                format!(
                    "\"{}\" is not RFC 3339 (e.g. 2025-11-05T14:03:07.123456 or ...+00:00)",
                    crate::json::truncate(s, 64)
                ),
            )
        })?,
        Value::Number(n) => {
            let ms = n.as_i64().ok_or_else(|| {
                DecodeError::field(
                    ErrorKind::BadTimestamp,
                    field,
                    format!("{n} is not integer epoch milliseconds"),
                )
            })?;
            ms.checked_mul(1000).ok_or_else(|| {
                DecodeError::field(
                    ErrorKind::OutOfRange,
                    field,
                    format!("{ms} is out of range"),
                )
            })?
        }
        other => {
            return Err(DecodeError::field(
                ErrorKind::WrongType,
                field,
                format!(
                    "expected an RFC 3339 string or epoch milliseconds, got {}",
                    crate::json::type_name(other)
                ),
            ))
        }
    };
    if !(MIN_EVENT_TIME_US..MAX_EVENT_TIME_US).contains(&us) {
        return Err(DecodeError::field(
            ErrorKind::OutOfRange,
            field,
            format!("{} is outside 2000-01-01..2100-01-01", format_micros(us)),
        ));
    }
    Ok(us)
}

fn parse_str(s: &str) -> Option<Micros> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc).timestamp_micros());
    }
    // Naive times: `isoformat()` uses 'T'; some producers use a space. No offset means UTC.
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(Utc.from_utc_datetime(&naive).timestamp_micros());
        }
    }
    None
}

/// RFC 3339 rendering of a time, for messages and logs.
pub fn format_micros(us: Micros) -> String {
    match DateTime::<Utc>::from_timestamp_micros(us) {
        Some(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        None => format!("{us}us"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn naive_isoformat_is_utc() {
        let us = parse_timestamp(&json!("2025-11-05T14:03:07.123456"), "timestamp").unwrap();
        assert_eq!(format_micros(us), "2025-11-05T14:03:07.123456Z");
    }

    #[test]
    fn offsets_are_applied() {
        let a = parse_timestamp(&json!("2025-11-05T16:03:07+02:00"), "t").unwrap();
        let b = parse_timestamp(&json!("2025-11-05T14:03:07Z"), "t").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn epoch_millis() {
        let us = parse_timestamp(&json!(1_762_351_387_123_i64), "t").unwrap();
        assert_eq!(us, 1_762_351_387_123_000);
    }

    #[test]
    fn rejects_garbage_floats_and_far_dates() {
        let e = parse_timestamp(&json!("yesterday"), "timestamp").unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadTimestamp);
        assert!(e.to_string().starts_with("field \"timestamp\""), "{e}");
        assert_eq!(
            parse_timestamp(&json!(1.5), "t").unwrap_err().kind,
            ErrorKind::BadTimestamp
        );
        assert_eq!(
            parse_timestamp(&json!(true), "t").unwrap_err().kind,
            ErrorKind::WrongType
        );
        assert_eq!(
            parse_timestamp(&json!(5), "t").unwrap_err().kind,
            ErrorKind::OutOfRange
        );
        assert_eq!(
            parse_timestamp(&json!("2150-01-01T00:00:00Z"), "t")
                .unwrap_err()
                .kind,
            ErrorKind::OutOfRange
        );
    }
}
