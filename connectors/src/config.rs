//! Shared pieces of connector configuration, defined in `primespark-schemas` so that operators'
//! configuration (inference) uses the same validation error and duration syntax.

pub use primespark_schemas::config::{duration, parse_duration, InvalidConfig};
