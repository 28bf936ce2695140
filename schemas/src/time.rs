//! Event timestamps: RFC 3339 with or without an offset, or integer epoch milliseconds.
//!
//! A naive time (no offset: the platform's Python producers send `datetime.now().isoformat()`,
//! the device's local time) is read in a configured [`NaiveZone`], UTC by default. An event time
//! further ahead of the wall clock than a [`ClockBound`] allows is refused with its own reason
//! ([`ErrorKind::FutureTimestamp`]): one device whose clock says 2099 must not move its
//! partition's watermark and make every later event late.
//!
//! Internally every time is `i64` microseconds since the Unix epoch (UTC), the precision of
//! Python's `isoformat()` and of PostgreSQL's `timestamptz`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

use crate::error::{DecodeError, ErrorKind};

/// The zone a timestamp without an offset is read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NaiveZone {
    /// UTC (the default).
    #[default]
    Utc,
    /// An IANA zone, e.g. `Europe/Berlin`: daylight saving applies; an ambiguous time (the hour
    /// repeated when clocks go back) is read as the earlier instant.
    Iana(chrono_tz::Tz),
}

impl FromStr for NaiveZone {
    type Err = String;

    /// `UTC` or an IANA zone name (`Europe/Berlin`, `America/New_York`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("utc") {
            return Ok(NaiveZone::Utc);
        }
        chrono_tz::Tz::from_str(s)
            .map(NaiveZone::Iana)
            .map_err(|_| {
                format!("{s:?} is not \"UTC\" or an IANA zone name such as \"Europe/Berlin\"")
            })
    }
}

impl fmt::Display for NaiveZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NaiveZone::Utc => f.write_str("UTC"),
            NaiveZone::Iana(tz) => f.write_str(tz.name()),
        }
    }
}

impl NaiveZone {
    /// The instant of a naive local time, `None` for a time the zone skips (a daylight-saving
    /// gap).
    fn resolve(self, naive: &NaiveDateTime) -> Option<Micros> {
        match self {
            NaiveZone::Utc => Some(Utc.from_utc_datetime(naive).timestamp_micros()),
            NaiveZone::Iana(tz) => match tz.from_local_datetime(naive) {
                LocalResult::Single(t) => Some(t.timestamp_micros()),
                LocalResult::Ambiguous(earliest, _) => Some(earliest.timestamp_micros()),
                LocalResult::None => None,
            },
        }
    }
}

/// How far an event time may run ahead of the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockBound {
    /// The wall clock when the record was read, microseconds since the epoch.
    pub now_us: Micros,
    /// The allowance (`windows.max_future`), microseconds.
    pub max_future_us: Micros,
}

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// Earliest accepted event time: 2000-01-01T00:00:00Z. Anything earlier is a broken clock.
pub const MIN_EVENT_TIME_US: Micros = 946_684_800_000_000;
/// Latest accepted event time: 2100-01-01T00:00:00Z.
pub const MAX_EVENT_TIME_US: Micros = 4_102_444_800_000_000;

/// Parses the value of a timestamp field named `field`, a naive time as UTC, with no bound
/// against the wall clock.
pub fn parse_timestamp(v: &Value, field: &str) -> Result<Micros, DecodeError> {
    parse_event_time(v, field, NaiveZone::Utc, None)
}

/// Parses an event's timestamp field under the decoder's zone and clock bound.
pub fn parse_event_time(
    v: &Value,
    field: &str,
    zone: NaiveZone,
    clock: Option<ClockBound>,
) -> Result<Micros, DecodeError> {
    let us = match v {
        Value::String(s) => parse_str(s, zone, field)?.ok_or_else(|| {
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
    if let Some(c) = clock {
        let ahead = us.saturating_sub(c.now_us);
        if ahead > c.max_future_us {
            return Err(DecodeError::field(
                ErrorKind::FutureTimestamp,
                field,
                format!(
                    "{} is {} ahead of the pipeline's clock ({}), more than windows.max_future ({})",
                    format_micros(us),
                    format_span(ahead),
                    format_micros(c.now_us),
                    format_span(c.max_future_us)
                ),
            ));
        }
    }
    Ok(us)
}

/// `Ok(None)`: not a timestamp; `Err`: a naive time the zone skips.
fn parse_str(s: &str, zone: NaiveZone, field: &str) -> Result<Option<Micros>, DecodeError> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(dt.with_timezone(&Utc).timestamp_micros()));
    }
    // Naive times: `isoformat()` uses 'T'; some producers use a space.
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, fmt) {
            return zone.resolve(&naive).map(Some).ok_or_else(|| {
                DecodeError::field(
                    ErrorKind::BadTimestamp,
                    field,
                    format!(
                        "\"{}\" does not exist in {zone} (clocks skip it for daylight saving)",
                        crate::json::truncate(s, 64)
                    ),
                )
            });
        }
    }
    Ok(None)
}

/// A span like `73y 12d`, `4m 10s` or `250ms`, for messages.
fn format_span(us: Micros) -> String {
    let s = us / 1_000_000;
    match s {
        0 => format!("{}ms", us / 1000),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => {
            let d = s / 86_400;
            if d >= 365 {
                format!("{}y {}d", d / 365, d % 365)
            } else {
                format!("{d}d {}h", (s % 86_400) / 3600)
            }
        }
    }
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
    fn naive_times_in_a_zone() {
        let berlin: NaiveZone = "Europe/Berlin".parse().unwrap();
        // Winter: UTC+1; summer: UTC+2.
        let w = parse_event_time(&json!("2025-01-10T13:00:00"), "t", berlin, None).unwrap();
        assert_eq!(format_micros(w), "2025-01-10T12:00:00.000000Z");
        let s = parse_event_time(&json!("2025-07-10T13:00:00.5"), "t", berlin, None).unwrap();
        assert_eq!(format_micros(s), "2025-07-10T11:00:00.500000Z");
        // An explicit offset wins over the zone.
        let z = parse_event_time(&json!("2025-07-10T13:00:00Z"), "t", berlin, None).unwrap();
        assert_eq!(format_micros(z), "2025-07-10T13:00:00.000000Z");
        // Clocks go back at 03:00 on 2025-10-26: 02:30 happens twice; the earlier is taken.
        let a = parse_event_time(&json!("2025-10-26T02:30:00"), "t", berlin, None).unwrap();
        assert_eq!(format_micros(a), "2025-10-26T00:30:00.000000Z");
        // Clocks go forward at 02:00 on 2025-03-30: 02:30 never happens.
        let gap = parse_event_time(&json!("2025-03-30T02:30:00"), "t", berlin, None).unwrap_err();
        assert_eq!(gap.kind, ErrorKind::BadTimestamp);
        assert!(gap.to_string().contains("Europe/Berlin"), "{gap}");
        assert!("Mars/Olympus".parse::<NaiveZone>().is_err());
        assert_eq!("utc".parse::<NaiveZone>().unwrap(), NaiveZone::Utc);
    }

    #[test]
    fn the_clock_bound() {
        let now = parse_timestamp(&json!("2026-12-04T12:00:00Z"), "t").unwrap();
        let clock = Some(ClockBound {
            now_us: now,
            max_future_us: 300_000_000,
        });
        let at = |s: &str| parse_event_time(&json!(s), "timestamp", NaiveZone::Utc, clock);
        assert!(at("2026-12-04T12:05:00Z").is_ok(), "exactly the allowance");
        assert!(
            at("2020-01-01T00:00:00Z").is_ok(),
            "the past is history, not an error"
        );
        let e = at("2026-12-04T12:05:00.000001Z").unwrap_err();
        assert_eq!(e.kind, ErrorKind::FutureTimestamp);
        let e = at("2099-01-01T00:00:00Z").unwrap_err();
        assert_eq!(e.kind, ErrorKind::FutureTimestamp);
        assert!(
            e.to_string().contains("72y") && e.to_string().contains("max_future (5m 0s)"),
            "{e}"
        );
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
