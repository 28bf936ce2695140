//! `edge.telemetry`: one device's metrics at one time.
//!
//! ```json
//! {"device_id": "control-pc-1",
//!  "metrics": {"cpu_percent": 45.2, "memory_percent": 65.1, "disk_percent": 18.0,
//!              "temperature": 55.3, "load_avg": 1.25},
//!  "timestamp": "2025-11-05T14:03:07.123456"}
//! ```
//! Every metric with a numeric value is a metric; `null` values are skipped (temperature is
//! null on hosts without a sensor). Metrics named `*_percent` must lie in `0..=100`.

use std::borrow::Cow;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{DecodeError, ErrorKind};
use crate::json;
use crate::time::Micros;
use crate::DecodeLimits;

/// Longest metric name, in bytes.
pub const MAX_METRIC_NAME_LEN: usize = 128;
/// Most metrics in one event.
pub const MAX_METRICS_PER_EVENT: usize = 256;

/// A decoded, validated telemetry event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryEvent {
    /// The reporting device.
    pub device_id: String,
    /// Event time, microseconds since the epoch (UTC).
    pub time_us: Micros,
    /// Numeric metrics sorted by name; nulls already skipped.
    pub metrics: Vec<Metric>,
}

/// One named metric value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Metric name, e.g. `cpu_percent`.
    pub name: String,
    /// Its value; always finite.
    pub value: f64,
}

/// The fast path's shape: the three fields typed, borrowed where serde can.
struct FastEvent<'a> {
    device_id: Cow<'a, str>,
    metrics: FastMetrics<'a>,
    timestamp: serde_json::Value,
}

/// The metrics object in payload order, names borrowed where they have no escapes (a map type
/// would allocate a node per event and, through `Cow`'s own `Deserialize`, a `String` per name).
struct FastMetrics<'a>(Vec<(Cow<'a, str>, Option<f64>)>);

/// A string borrowed from the payload when it has no escapes.
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for FastMetrics<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = FastMetrics<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a metrics object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8).min(16));
                while let Some(Borrowed(name)) = map.next_key()? {
                    if entries.len() == MAX_METRICS_PER_EVENT {
                        // The checked path names the error.
                        return Err(de::Error::custom("too many metrics"));
                    }
                    entries.push((name, map.next_value()?));
                }
                Ok(FastMetrics(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

impl<'de> Deserialize<'de> for FastEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = FastEvent<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a telemetry object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut device_id, mut metrics, mut timestamp) = (None, None, None);
                while let Some(Borrowed(key)) = map.next_key()? {
                    match key.as_ref() {
                        "device_id" if device_id.is_none() => {
                            device_id = Some(map.next_value::<Borrowed<'de>>()?.0);
                        }
                        "metrics" if metrics.is_none() => metrics = Some(map.next_value()?),
                        "timestamp" if timestamp.is_none() => {
                            timestamp = Some(map.next_value()?);
                        }
                        // A repeated field is left to the checked path (the last one wins).
                        "device_id" | "metrics" | "timestamp" => {
                            return Err(de::Error::custom("repeated field"));
                        }
                        // Unknown fields are parsed as strictly as the checked path parses
                        // them (number range, escapes), not skipped: both paths accept the same
                        // payloads.
                        _ => {
                            map.next_value::<serde_json::Value>()?;
                        }
                    }
                }
                Ok(FastEvent {
                    device_id: device_id.ok_or_else(|| de::Error::missing_field("device_id"))?,
                    metrics: metrics.ok_or_else(|| de::Error::missing_field("metrics"))?,
                    timestamp: timestamp.ok_or_else(|| de::Error::missing_field("timestamp"))?,
                })
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A well-formed event as the fast path reads it, borrowed from its payload: what
/// [`TelemetryEvent::decode`] would give, without owning its strings.
#[derive(Debug)]
pub struct BorrowedEvent<'a> {
    /// The reporting device, checked like [`TelemetryEvent::device_id`].
    pub device_id: Cow<'a, str>,
    /// Event time, microseconds since the epoch (UTC).
    pub time_us: Micros,
    /// Numeric metrics sorted by name, nulls skipped, each checked.
    pub metrics: Vec<(Cow<'a, str>, f64)>,
}

impl TelemetryEvent {
    /// Decodes and validates one message.
    pub fn decode(payload: &[u8], limits: &DecodeLimits) -> Result<Self, DecodeError> {
        limits.check(payload)?;
        // Well-formed events take the typed fast path; anything it does not accept is decoded
        // again by the generic path below, which owns every error message.
        if let Some(event) = Self::decode_fast(payload, limits) {
            return Ok(event);
        }
        Self::decode_checked(payload, limits)
    }

    /// Both decoding paths, for the differential fuzz target (`tests/fuzz`): the fast path's
    /// answer must be `None` or equal the checked path's `Ok`.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    pub fn decode_both(
        payload: &[u8],
        limits: &DecodeLimits,
    ) -> (Option<Self>, Result<Self, DecodeError>) {
        (
            Self::decode_fast(payload, limits),
            Self::decode_checked(payload, limits),
        )
    }

    /// Straight into typed fields (borrowed strings, no intermediate `serde_json::Value` map):
    /// `Some` only for an event the checked path accepts, with the same result.
    fn decode_fast(payload: &[u8], limits: &DecodeLimits) -> Option<Self> {
        let event = Self::decode_borrowed(payload, limits)?;
        Some(Self {
            device_id: event.device_id.into_owned(),
            time_us: event.time_us,
            metrics: event
                .metrics
                .into_iter()
                .map(|(name, value)| Metric {
                    name: name.into_owned(),
                    value,
                })
                .collect(),
        })
    }

    /// The fast path without owning anything: `Some` only for an event the checked path
    /// ([`TelemetryEvent::decode`] after the size check) accepts, with the same fields. Events it
    /// does not take (a repeated metric, anything invalid) are left to the checked path, which
    /// names the error.
    pub fn decode_borrowed<'a>(
        payload: &'a [u8],
        limits: &DecodeLimits,
    ) -> Option<BorrowedEvent<'a>> {
        let fast: FastEvent<'a> = serde_json::from_slice(payload).ok()?;
        json::check_ident(&fast.device_id, "device_id").ok()?;
        if fast.timestamp.is_null() {
            return None;
        }
        let time_us = limits.event_time(&fast.timestamp, "timestamp").ok()?;
        let mut entries = fast.metrics.0;
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if entries.windows(2).any(|w| w[0].0 == w[1].0) {
            // JSON leaves a repeated name's meaning open; the checked path decides it.
            return None;
        }
        let mut metrics = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            let Some(value) = value else { continue };
            if !value.is_finite()
                || validate_metric_name(&name, "").is_err()
                || (name.ends_with("_percent") && !(0.0..=100.0).contains(&value))
            {
                return None;
            }
            metrics.push((name, value));
        }
        if metrics.is_empty() {
            return None;
        }
        Some(BorrowedEvent {
            device_id: fast.device_id,
            time_us,
            metrics,
        })
    }

    /// The generic path: a JSON value checked field by field, every failure a named error.
    pub(crate) fn decode_checked(
        payload: &[u8],
        limits: &DecodeLimits,
    ) -> Result<Self, DecodeError> {
        let obj = json::parse_object(payload, limits)?;
        let device_id = json::required_ident(&obj, "device_id")?;
        let time_us = limits.event_time(json::required(&obj, "timestamp")?, "timestamp")?;
        let metrics_value = json::required(&obj, "metrics")?;
        let map = metrics_value.as_object().ok_or_else(|| {
            DecodeError::field(
                ErrorKind::WrongType,
                "metrics",
                format!("expected an object, got {}", json::type_name(metrics_value)),
            )
        })?;
        if map.len() > MAX_METRICS_PER_EVENT {
            return Err(DecodeError::field(
                ErrorKind::OutOfRange,
                "metrics",
                format!("{} metrics, more than {MAX_METRICS_PER_EVENT}", map.len()),
            ));
        }
        let mut metrics = Vec::with_capacity(map.len());
        for (name, value) in map {
            if value.is_null() {
                continue;
            }
            let field = format!("metrics.{}", json::truncate(name, MAX_METRIC_NAME_LEN));
            validate_metric_name(name, &field)?;
            let value = json::number(value, &field)?;
            if name.ends_with("_percent") && !(0.0..=100.0).contains(&value) {
                return Err(DecodeError::field(
                    ErrorKind::OutOfRange,
                    &field,
                    format!("{value} is outside 0..=100"),
                ));
            }
            metrics.push(Metric {
                name: name.clone(),
                value,
            });
        }
        // Sorted by name whatever the JSON map's order (serde_json's `preserve_order`).
        metrics.sort_by(|a, b| a.name.cmp(&b.name));
        if metrics.is_empty() {
            return Err(DecodeError::field(
                ErrorKind::MissingField,
                "metrics",
                "has no numeric metric",
            ));
        }
        Ok(Self {
            device_id,
            time_us,
            metrics,
        })
    }
}

fn validate_metric_name(name: &str, field: &str) -> Result<(), DecodeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_METRIC_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DecodeError::field(
            ErrorKind::InvalidValue,
            field,
            "metric names are 1-128 characters of [A-Za-z0-9_.:-]",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::format_micros;

    fn decode(s: &str) -> Result<TelemetryEvent, DecodeError> {
        TelemetryEvent::decode(s.as_bytes(), &DecodeLimits::default())
    }

    /// Found by the `event_decoders` fuzz target: the typed path skipped unknown fields
    /// unchecked (invalid UTF-8, a number out of range) and accepted events that the checked
    /// path refuses as not JSON.
    #[test]
    fn unknown_fields_are_checked_like_the_rest() {
        let event = |note: &[u8]| {
            let mut payload = br#"{"device_id": "pc-1", "note": "#.to_vec();
            payload.extend_from_slice(note);
            payload.extend_from_slice(
                br#", "metrics": {"cpu_percent": 4.0}, "timestamp": "2025-11-05T14:03:07Z"}"#,
            );
            TelemetryEvent::decode(&payload, &DecodeLimits::default())
        };
        for bad in [
            &b"\"ab\x9a\""[..],
            b"1e328",
            br#""\ud800""#,
            br#"{"x": [1e400]}"#,
        ] {
            let error = event(bad).unwrap_err();
            assert!(error.to_string().contains("not valid JSON"), "{error}");
        }
        for good in [
            &b"\"ab\""[..],
            b"1e300",
            br#"{"x": [null, true, "\u00e9"]}"#,
        ] {
            assert!(event(good).is_ok(), "{}", String::from_utf8_lossy(good));
        }
    }

    #[test]
    fn platform_shape() {
        let e = decode(
            r#"{"device_id": "control-pc-1", "metrics": {"cpu_percent": 45.2, "memory_percent": 65.1,
                "disk_percent": 18.0, "temperature": 55.3, "load_avg": 1.25},
                "timestamp": "2025-11-05T14:03:07.123456"}"#,
        )
        .unwrap();
        assert_eq!(e.device_id, "control-pc-1");
        assert_eq!(format_micros(e.time_us), "2025-11-05T14:03:07.123456Z");
        let names: Vec<_> = e.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cpu_percent",
                "disk_percent",
                "load_avg",
                "memory_percent",
                "temperature"
            ]
        );
        assert_eq!(e.metrics[2].value, 1.25);
    }

    #[test]
    fn null_metrics_are_skipped() {
        let e = decode(r#"{"device_id":"pi-1","metrics":{"cpu_percent":1,"temperature":null},"timestamp":1762351387123}"#)
            .unwrap();
        assert_eq!(e.metrics.len(), 1);
        assert_eq!(e.time_us, 1_762_351_387_123_000);
    }

    #[test]
    fn offset_timestamps() {
        let e = decode(
            r#"{"device_id":"pi-1","metrics":{"x":1},"timestamp":"2025-11-05T15:03:07+01:00"}"#,
        )
        .unwrap();
        assert_eq!(format_micros(e.time_us), "2025-11-05T14:03:07.000000Z");
    }

    fn kind_and_message(s: &str) -> (ErrorKind, String) {
        let e = decode(s).unwrap_err();
        (e.kind, e.to_string())
    }

    #[test]
    fn bad_inputs_name_the_field() {
        let (k, m) = kind_and_message("{not json");
        assert_eq!(k, ErrorKind::MalformedJson, "{m}");
        let (k, _) = kind_and_message("[1,2]");
        assert_eq!(k, ErrorKind::MalformedJson);
        let (k, m) = kind_and_message(r#"{"metrics":{"x":1},"timestamp":1762351387123}"#);
        assert_eq!(
            (k, m.as_str()),
            (
                ErrorKind::MissingField,
                "field \"device_id\": required field is missing"
            )
        );
        let (k, m) =
            kind_and_message(r#"{"device_id":7,"metrics":{"x":1},"timestamp":1762351387123}"#);
        assert_eq!(k, ErrorKind::WrongType, "{m}");
        assert!(m.contains("device_id"));
        let (k, m) = kind_and_message(
            r#"{"device_id":"a","metrics":{"cpu_percent":"high"},"timestamp":1762351387123}"#,
        );
        assert_eq!(k, ErrorKind::WrongType);
        assert!(m.contains("metrics.cpu_percent"), "{m}");
        let (k, m) = kind_and_message(
            r#"{"device_id":"a","metrics":{"cpu_percent":140},"timestamp":1762351387123}"#,
        );
        assert_eq!(k, ErrorKind::OutOfRange);
        assert_eq!(m, "field \"metrics.cpu_percent\": 140 is outside 0..=100");
        let (k, _) =
            kind_and_message(r#"{"device_id":"a","metrics":{"t":null},"timestamp":1762351387123}"#);
        assert_eq!(k, ErrorKind::MissingField);
        let (k, m) =
            kind_and_message(r#"{"device_id":"a","metrics":[1],"timestamp":1762351387123}"#);
        assert_eq!(k, ErrorKind::WrongType, "{m}");
        // The fast path and the checked path both refuse NUL (PostgreSQL text cannot hold it).
        let (k, m) = kind_and_message(
            r#"{"device_id":"pi\u0000","metrics":{"x":1},"timestamp":1762351387123}"#,
        );
        assert_eq!(k, ErrorKind::InvalidValue, "{m}");
        assert!(m.contains("device_id") && m.contains("NUL"), "{m}");
        let (k, _) = kind_and_message(r#"{"device_id":"a","metrics":{"x":1},"timestamp":"soon"}"#);
        assert_eq!(k, ErrorKind::BadTimestamp);
        let (k, _) =
            kind_and_message(r#"{"device_id":"","metrics":{"x":1},"timestamp":1762351387123}"#);
        assert_eq!(k, ErrorKind::InvalidValue);
    }

    #[test]
    fn nan_and_overflow_are_rejected() {
        // JSON has no NaN literal; producers that write one send invalid JSON.
        let (k, _) =
            kind_and_message(r#"{"device_id":"a","metrics":{"x":NaN},"timestamp":1762351387123}"#);
        assert_eq!(k, ErrorKind::MalformedJson);
        let (k, _) = kind_and_message(
            r#"{"device_id":"a","metrics":{"x":1e999},"timestamp":1762351387123}"#,
        );
        assert_eq!(k, ErrorKind::MalformedJson);
    }

    #[test]
    fn oversize() {
        let limits = DecodeLimits {
            max_message_bytes: 64,
            ..DecodeLimits::default()
        };
        let big = format!(
            r#"{{"device_id":"{}","metrics":{{"x":1}},"timestamp":1}}"#,
            "a".repeat(100)
        );
        let e = TelemetryEvent::decode(big.as_bytes(), &limits).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Oversize);
    }

    #[test]
    fn well_formed_events_take_the_fast_path() {
        let p = br#"{"device_id":"pi-1","metrics":{"cpu_percent":1.5,"temperature":null,"load_avg":2},"timestamp":"2025-11-05T14:03:07"}"#;
        let fast = TelemetryEvent::decode_fast(p, &DecodeLimits::default()).unwrap();
        assert_eq!(
            fast,
            TelemetryEvent::decode_checked(p, &DecodeLimits::default()).unwrap()
        );
        // Anything doubtful is left to the checked path.
        assert!(TelemetryEvent::decode_fast(
            br#"{"device_id":"pi-1","metrics":{"cpu_percent":101},"timestamp":1}"#,
            &DecodeLimits::default()
        )
        .is_none());
        assert!(TelemetryEvent::decode_fast(
            br#"{"device_id":"","metrics":{"x":1},"timestamp":1762351387123}"#,
            &DecodeLimits::default()
        )
        .is_none());
    }

    #[test]
    fn the_borrowed_path_owns_nothing_and_leaves_repeated_metrics_to_the_checked_path() {
        let limits = DecodeLimits::default();
        let p = br#"{"device_id":"pi-1","metrics":{"temperature":55.5,"cpu_percent":1.5},"timestamp":1762351387123}"#;
        let event = TelemetryEvent::decode_borrowed(p, &limits).unwrap();
        assert!(matches!(event.device_id, Cow::Borrowed("pi-1")));
        let names: Vec<&str> = event.metrics.iter().map(|(n, _)| n.as_ref()).collect();
        assert_eq!(names, ["cpu_percent", "temperature"]);
        assert!(event
            .metrics
            .iter()
            .all(|(n, _)| matches!(n, Cow::Borrowed(_))));
        // A name with an escape is still read, as an owned string.
        let escaped =
            br#"{"device_id":"pi-1","metrics":{"cpu_percent":1.5},"timestamp":1762351387123}"#;
        let event = TelemetryEvent::decode_borrowed(escaped, &limits).unwrap();
        assert_eq!(event.metrics[0].0, "cpu_percent");
        // JSON leaves a repeated name open: the checked path decides, and both paths of
        // `decode` agree with it.
        let repeated = br#"{"device_id":"pi-1","metrics":{"cpu_percent":1.5,"cpu_percent":2.5},"timestamp":1762351387123}"#;
        assert!(TelemetryEvent::decode_borrowed(repeated, &limits).is_none());
        assert_eq!(
            TelemetryEvent::decode(repeated, &limits),
            TelemetryEvent::decode_checked(repeated, &limits)
        );
        // More metrics than an event may carry are refused by name, not read past.
        let many: Vec<String> = (0..=MAX_METRICS_PER_EVENT)
            .map(|i| format!(r#""m{i}":1"#))
            .collect();
        let too_many = format!(
            r#"{{"device_id":"pi-1","metrics":{{{}}},"timestamp":1762351387123}}"#,
            many.join(",")
        );
        assert!(TelemetryEvent::decode_borrowed(too_many.as_bytes(), &limits).is_none());
        let (kind, _) = kind_and_message(&too_many);
        assert_eq!(kind, ErrorKind::OutOfRange);
    }

    /// Payload fragments, valid and not, that the fast and the checked path must agree on.
    fn fragment() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let device = prop_oneof![
            Just(r#""device_id":"pi-1""#.to_owned()),
            Just(r#""device_id":"""#.to_owned()),
            Just(r#""device_id":7"#.to_owned()),
            Just(r#""device_id":"p\u00e9""#.to_owned()),
            Just(String::new()),
        ];
        let metric = prop_oneof![
            (0.0f64..=100.0).prop_map(|v| format!(r#""cpu_percent":{v}"#)),
            (-1e6f64..1e6).prop_map(|v| format!(r#""load_avg":{v}"#)),
            (90.0f64..200.0).prop_map(|v| format!(r#""memory_percent":{v}"#)),
            Just(r#""temperature":null"#.to_owned()),
            Just(r#""bad name":1"#.to_owned()),
            Just(r#""cpu_percent":"high""#.to_owned()),
            Just(r#""x":1e999"#.to_owned()),
        ];
        let metrics = proptest::collection::vec(metric, 0..4)
            .prop_map(|m| format!(r#""metrics":{{{}}}"#, m.join(",")));
        let ts = prop_oneof![
            Just(r#""timestamp":1762351387123"#.to_owned()),
            Just(r#""timestamp":"2025-11-05T14:03:07.5""#.to_owned()),
            Just(r#""timestamp":"2025-11-05T15:03:07+01:00""#.to_owned()),
            Just(r#""timestamp":"soon""#.to_owned()),
            Just(r#""timestamp":null"#.to_owned()),
        ];
        (device, metrics, ts, proptest::bool::ANY).prop_map(|(d, m, t, dup)| {
            let mut parts: Vec<String> = [d, m, t].into_iter().filter(|p| !p.is_empty()).collect();
            if dup {
                parts.push(r#""device_id":"again""#.to_owned());
            }
            format!("{{{}}}", parts.join(","))
        })
    }

    proptest::proptest! {
        #[test]
        fn fast_and_checked_paths_agree(payload in fragment()) {
            let checked = TelemetryEvent::decode_checked(payload.as_bytes(), &DecodeLimits::default());
            if let Some(fast) = TelemetryEvent::decode_fast(payload.as_bytes(), &DecodeLimits::default()) {
                proptest::prop_assert_eq!(Ok(fast), checked, "{}", payload);
            }
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = TelemetryEvent::decode(&bytes, &DecodeLimits::default());
        }

        #[test]
        fn valid_percentages_round_trip(v in 0.0f64..=100.0, ms in 1_000_000_000_000i64..4_000_000_000_000i64) {
            let s = format!(r#"{{"device_id":"d","metrics":{{"cpu_percent":{v}}},"timestamp":{ms}}}"#);
            let e = TelemetryEvent::decode(s.as_bytes(), &DecodeLimits::default()).unwrap();
            proptest::prop_assert_eq!(e.metrics[0].value, v);
            proptest::prop_assert_eq!(e.time_us, ms * 1000);
        }
    }
}
