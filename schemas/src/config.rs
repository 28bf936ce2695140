//! Shared pieces of configuration: the validation error every section returns and duration
//! parsing. Pure: checking a configuration never touches a service.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A configuration value that cannot work, found without touching any service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {reason}")]
pub struct InvalidConfig {
    /// Dotted key, e.g. `kafka.brokers`.
    pub key: String,
    /// Why it is wrong.
    pub reason: String,
}

impl InvalidConfig {
    /// Builds the error.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Parses `"250ms"`, `"5s"`, `"2m"`, `"1h"`, `"7d"` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("\"{s}\" is not a duration like 500ms, 5s, 2m, 1h or 7d"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "unknown duration unit \"{other}\" in \"{s}\" (use ms, s, m, h or d)"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("\"{s}\" is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Serde adapter for durations written as strings (`"5s"`) or numbers of seconds.
pub mod duration {
    use super::*;

    /// Deserializes a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Text(String),
            Secs(f64),
        }
        match Repr::deserialize(d)? {
            Repr::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
            Repr::Secs(n) => parse_duration(&n.to_string()).map_err(serde::de::Error::custom),
        }
    }

    /// Serializes a duration as a string of milliseconds (`"1500ms"`).
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
