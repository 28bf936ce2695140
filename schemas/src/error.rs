//! Decode and validation errors: each names the field at fault and a stable reason code that
//! metrics and the dead-letter table use.

use std::fmt;

/// Why a message was rejected; stable, lower-case names via [`ErrorKind::as_str`] label metrics
/// and the `reason` column of `dead_letters`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Larger than [`crate::DecodeLimits::max_message_bytes`].
    Oversize,
    /// Not JSON, or not a JSON object.
    MalformedJson,
    /// A required field is absent or `null`.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A number is NaN or infinite.
    NonFinite,
    /// A value is outside its allowed range (percentages, latencies, lengths, dates).
    OutOfRange,
    /// A string is not one of the allowed values, or is empty or too long.
    InvalidValue,
    /// A timestamp is neither RFC 3339 nor integer epoch milliseconds.
    BadTimestamp,
    /// The event time is further ahead of the pipeline's clock than `windows.max_future`.
    FutureTimestamp,
}

impl ErrorKind {
    /// The stable reason code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Oversize => "oversize",
            ErrorKind::MalformedJson => "malformed_json",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::WrongType => "wrong_type",
            ErrorKind::NonFinite => "non_finite",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::BadTimestamp => "bad_timestamp",
            ErrorKind::FutureTimestamp => "future_timestamp",
        }
    }
}

/// A message that cannot become an event. `Display` is one line naming the field, e.g.
/// `field "metrics.cpu_percent": 140 is outside 0..=100`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Why.
    pub kind: ErrorKind,
    /// Dotted path of the offending field, `None` for whole-message errors.
    pub field: Option<String>,
    /// Human-readable detail.
    pub detail: String,
}

impl DecodeError {
    /// Builds an error.
    pub fn new(kind: ErrorKind, field: Option<&str>, detail: impl Into<String>) -> Self {
        Self {
            kind,
            field: field.map(str::to_owned),
            detail: detail.into(),
        }
    }

    /// Builds an error about `field`.
    pub fn field(kind: ErrorKind, field: &str, detail: impl Into<String>) -> Self {
        Self::new(kind, Some(field), detail)
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field \"{field}\": {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for DecodeError {}
