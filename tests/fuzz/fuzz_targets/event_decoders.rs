//! The three event decoders on any bytes: no panic, no error without a kind, and for
//! telemetry two properties a producer relies on:
//! - the fast path (typed fields) and the checked path (field by field) agree: the fast one
//!   answers `None` or exactly what the checked one accepts;
//! - an accepted event written back as JSON decodes to the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use primespark_schemas::analytics::AnalyticsEvent;
use primespark_schemas::inference::InferenceEvent;
use primespark_schemas::telemetry::TelemetryEvent;
use primespark_schemas::DecodeLimits;

fuzz_target!(|data: &[u8]| {
    let limits = DecodeLimits::default();
    let (fast, checked) = TelemetryEvent::decode_both(data, &limits);
    match (&fast, &checked) {
        (Some(f), Ok(c)) => assert_eq!(f, c, "fast and checked paths disagree"),
        (Some(f), Err(e)) => panic!("fast path accepted {f:?}, checked path refused: {e}"),
        (None, _) => {}
    }
    let decoded = TelemetryEvent::decode(data, &limits);
    assert_eq!(decoded.is_ok(), checked.is_ok() || fast.is_some());
    if let Ok(event) = decoded {
        let time = chrono::DateTime::from_timestamp_micros(event.time_us)
            .expect("an accepted time is representable");
        let metrics: serde_json::Map<String, serde_json::Value> = event
            .metrics
            .iter()
            .map(|m| (m.name.clone(), serde_json::json!(m.value)))
            .collect();
        let again = serde_json::json!({
            "device_id": event.device_id,
            "timestamp": time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "metrics": metrics,
        })
        .to_string();
        match TelemetryEvent::decode(again.as_bytes(), &limits) {
            Ok(back) => assert_eq!(back, event, "written back as {again}"),
            Err(e) => panic!("{event:?} written back as {again} is refused: {e}"),
        }
    }
    let _ = InferenceEvent::decode(data, &limits);
    let _ = AnalyticsEvent::decode(data, &limits);
});
