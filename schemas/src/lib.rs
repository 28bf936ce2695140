//! The event contract of primespark.
//!
//! Producers on the platform publish JSON to three Kafka topics; this crate says what those
//! messages must look like and what they become: typed events ([`telemetry`], [`inference`],
//! [`analytics`]), the validation that turns bytes into them with errors that name the offending
//! field ([`error`]), the Arrow schemas of the rows we write ([`columnar`]) and the DDL of the
//! tables the sinks fill ([`ddl`]). [`streams`] is the one table of streams (topic, key,
//! decoder, raw and aggregate tables) everything else reads its names from; [`flow`] is what
//! moves from the dataflows' operators to their sinks; [`config`] the validation error and
//! duration syntax every configuration section shares.
//!
//! It does no I/O: `connectors` and `operators` depend on it, never the other way round.

// Tests may unwrap: a panic there is a failed test with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod analytics;
pub mod columnar;
pub mod config;
pub mod ddl;
pub mod error;
pub mod flow;
pub mod inference;
pub mod intern;
mod json;
pub mod rows;
pub mod streams;
pub mod telemetry;
pub mod time;

pub use error::{DecodeError, ErrorKind};

/// Limits applied while decoding; a message that breaks one is an error, not a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted message, in bytes. Default 1 MiB (Kafka's default `message.max.bytes`).
    pub max_message_bytes: usize,
    /// How a timestamp without an offset is read. Default UTC.
    pub naive_zone: time::NaiveZone,
    /// The wall clock an event time may not run ahead of by more than a bound; `None` (the
    /// default, for tools and tests) checks only the fixed 2000..2100 range.
    pub clock: Option<time::ClockBound>,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 1024 * 1024,
            naive_zone: time::NaiveZone::Utc,
            clock: None,
        }
    }
}

impl DecodeLimits {
    /// Parses the event time in `v` (the field `field`) under these limits' zone and clock
    /// bound.
    pub fn event_time(
        &self,
        v: &serde_json::Value,
        field: &str,
    ) -> Result<time::Micros, DecodeError> {
        time::parse_event_time(v, field, self.naive_zone, self.clock)
    }

    /// Fails with [`ErrorKind::Oversize`] when `payload` is larger than the limit.
    pub fn check(&self, payload: &[u8]) -> Result<(), DecodeError> {
        if payload.len() > self.max_message_bytes {
            return Err(DecodeError::new(
                ErrorKind::Oversize,
                None,
                format!(
                    "message is {} bytes, over the limit of {} bytes",
                    payload.len(),
                    self.max_message_bytes
                ),
            ));
        }
        Ok(())
    }
}
