//! `edge.ai.inference`: one model request, served at the edge or in the cloud.
//!
//! ```json
//! {"model": "llama3.2:latest", "prompt_length": 120, "response_length": 480,
//!  "latency_ms": 812.5, "source": "edge", "timestamp": "2025-11-05T14:03:07.123456",
//!  "device_id": "pi-1", "request_id": "r-1", "status": "ok",
//!  "routing_strategy": "edge_first", "fallback": false}
//! ```
//! `device_id`, `request_id`, `status` (default `ok`), `routing_strategy` and `fallback`
//! (default false; true when the edge was tried first and the request went to the cloud) are
//! optional.

use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, ErrorKind};
use crate::json;
use crate::time::Micros;
use crate::DecodeLimits;

/// Largest latency we accept: one day, in milliseconds. Anything longer is a broken clock.
pub const MAX_LATENCY_MS: f64 = 86_400_000.0;

/// Where a request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// On an edge node (Raspberry Pi, Hailo-8).
    Edge,
    /// On a cloud VM.
    Cloud,
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Answered.
    Ok,
    /// Failed.
    Error,
}

/// The router's policy for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingStrategy {
    /// Try the edge, fall back to the cloud.
    EdgeFirst,
    /// Try the cloud first.
    CloudFirst,
    /// Spread by load.
    Balanced,
}

macro_rules! str_enum {
    ($ty:ty { $($variant:path => $s:literal),+ $(,)? }) => {
        impl $ty {
            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self { $($variant => $s),+ }
            }
            /// The value with this wire name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $($s => Some($variant),)+ _ => None }
            }
            fn parse(v: &serde_json::Value, field: &str) -> Result<Self, DecodeError> {
                match json::one_of(v, field, &[$($s),+])? {
                    $($s => Ok($variant),)+
                    _ => unreachable!("one_of returns one of the listed names"),
                }
            }
        }
    };
}

str_enum!(Source { Source::Edge => "edge", Source::Cloud => "cloud" });
str_enum!(Status { Status::Ok => "ok", Status::Error => "error" });
str_enum!(RoutingStrategy {
    RoutingStrategy::EdgeFirst => "edge_first",
    RoutingStrategy::CloudFirst => "cloud_first",
    RoutingStrategy::Balanced => "balanced",
});

/// A decoded, validated inference event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceEvent {
    /// Model name, e.g. `llama3.2:latest`.
    pub model: String,
    /// Prompt length (tokens or characters, as the producer counts).
    pub prompt_length: u32,
    /// Response length, same unit.
    pub response_length: u32,
    /// End-to-end latency in milliseconds, `>= 0`.
    pub latency_ms: f64,
    /// Where it was served.
    pub source: Source,
    /// Event time, microseconds since the epoch (UTC).
    pub time_us: Micros,
    /// Device that served or issued it.
    pub device_id: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Outcome; `ok` when absent.
    pub status: Status,
    /// Router policy.
    pub routing_strategy: Option<RoutingStrategy>,
    /// True when the edge was tried first and the request went to the cloud.
    pub fallback: bool,
}

impl InferenceEvent {
    /// Decodes and validates one message.
    pub fn decode(payload: &[u8], limits: &DecodeLimits) -> Result<Self, DecodeError> {
        let obj = json::parse_object(payload, limits)?;
        let model = json::required_ident(&obj, "model")?;
        let prompt_length = json::count(&obj, "prompt_length")?;
        let response_length = json::count(&obj, "response_length")?;
        let latency_ms = json::number(json::required(&obj, "latency_ms")?, "latency_ms")?;
        if !(0.0..=MAX_LATENCY_MS).contains(&latency_ms) {
            return Err(DecodeError::field(
                ErrorKind::OutOfRange,
                "latency_ms",
                format!("{latency_ms} is outside 0..={MAX_LATENCY_MS}"),
            ));
        }
        let source = Source::parse(json::required(&obj, "source")?, "source")?;
        let time_us = limits.event_time(json::required(&obj, "timestamp")?, "timestamp")?;
        let status = match obj.get("status") {
            None | Some(serde_json::Value::Null) => Status::Ok,
            Some(v) => Status::parse(v, "status")?,
        };
        let routing_strategy = match obj.get("routing_strategy") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(RoutingStrategy::parse(v, "routing_strategy")?),
        };
        let fallback = json::optional_bool(&obj, "fallback")?.unwrap_or(false);
        if fallback && source == Source::Edge {
            return Err(DecodeError::field(
                ErrorKind::InvalidValue,
                "fallback",
                "is true but source is \"edge\"; a fallback is served in the cloud",
            ));
        }
        Ok(Self {
            model,
            prompt_length,
            response_length,
            latency_ms,
            source,
            time_us,
            device_id: json::optional_ident(&obj, "device_id")?,
            request_id: json::optional_ident(&obj, "request_id")?,
            status,
            routing_strategy,
            fallback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<InferenceEvent, DecodeError> {
        InferenceEvent::decode(s.as_bytes(), &DecodeLimits::default())
    }

    #[test]
    fn platform_shape_with_defaults() {
        let e = decode(
            r#"{"model": "llama3.2:latest", "prompt_length": 120, "response_length": 480,
            "latency_ms": 812.5, "source": "edge", "timestamp": "2025-11-05T14:03:07.123456"}"#,
        )
        .unwrap();
        assert_eq!(e.model, "llama3.2:latest");
        assert_eq!((e.prompt_length, e.response_length), (120, 480));
        assert_eq!(e.source, Source::Edge);
        assert_eq!(e.status, Status::Ok);
        assert_eq!(e.routing_strategy, None);
        assert!(!e.fallback);
    }

    #[test]
    fn optional_fields() {
        let e = decode(
            r#"{"model":"m","prompt_length":1,"response_length":2,"latency_ms":3,
            "source":"cloud","timestamp":1762351387123,"device_id":"pi-2","request_id":"r-9",
            "status":"error","routing_strategy":"edge_first","fallback":true}"#,
        )
        .unwrap();
        assert_eq!(e.source, Source::Cloud);
        assert_eq!(e.status, Status::Error);
        assert_eq!(e.routing_strategy, Some(RoutingStrategy::EdgeFirst));
        assert!(e.fallback);
        assert_eq!(e.device_id.as_deref(), Some("pi-2"));
    }

    #[test]
    fn bad_inputs() {
        let base = r#""model":"m","prompt_length":1,"response_length":2,"timestamp":1762351387123"#;
        let cases = [
            (format!(r#"{{{base},"latency_ms":-1,"source":"edge"}}"#), ErrorKind::OutOfRange, "latency_ms"),
            (format!(r#"{{{base},"latency_ms":1,"source":"moon"}}"#), ErrorKind::InvalidValue, "source"),
            (format!(r#"{{{base},"source":"edge"}}"#), ErrorKind::MissingField, "latency_ms"),
            (format!(r#"{{{base},"latency_ms":"1","source":"edge"}}"#), ErrorKind::WrongType, "latency_ms"),
            (format!(r#"{{{base},"latency_ms":1,"source":"edge","status":"meh"}}"#), ErrorKind::InvalidValue, "status"),
            (format!(r#"{{{base},"latency_ms":1,"source":"edge","fallback":"yes"}}"#), ErrorKind::WrongType, "fallback"),
            (format!(r#"{{{base},"latency_ms":1,"source":"edge","fallback":true}}"#), ErrorKind::InvalidValue, "fallback"),
            (r#"{"model":"m","prompt_length":-3,"response_length":2,"timestamp":1762351387123,"latency_ms":1,"source":"edge"}"#.to_owned(), ErrorKind::OutOfRange, "prompt_length"),
            (r#"{"model":"m","prompt_length":1.5,"response_length":2,"timestamp":1762351387123,"latency_ms":1,"source":"edge"}"#.to_owned(), ErrorKind::WrongType, "prompt_length"),
        ];
        for (input, kind, field) in cases {
            let e = decode(&input).unwrap_err();
            assert_eq!(
                (e.kind, e.field.as_deref()),
                (kind, Some(field)),
                "{input}: {e}"
            );
        }
    }
}
