//! Row types the sinks write: what a decoded event becomes in PostgreSQL and Parquet.

use serde::{Deserialize, Serialize};

/// One metric of one device at one time, with its Kafka provenance (`device_metrics`,
/// `telemetry_raw`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRow {
    /// Event time, microseconds since the epoch.
    pub time_us: i64,
    /// Reporting device.
    pub device_id: String,
    /// Metric name.
    pub metric_name: String,
    /// Value, always finite.
    pub value: f64,
    /// Kafka partition it came from.
    pub partition: i32,
    /// Kafka offset it came from.
    pub offset: i64,
}

/// A record that could not become an event (`dead_letters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRow {
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// Stable reason code (`malformed_json`, `out_of_range`, ...).
    pub reason: String,
    /// One-line error naming the field.
    pub error: String,
    /// Original bytes.
    pub payload: Vec<u8>,
}

/// One closed 1-minute window of one (device, metric) (`device_metrics_1m`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricAggRow {
    /// Window start, microseconds since the epoch.
    pub bucket_us: i64,
    /// Device.
    pub device_id: String,
    /// Metric.
    pub metric_name: String,
    /// Number of samples.
    pub count: i64,
    /// Sum of values.
    pub sum: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

/// Where a sink resumes one Kafka partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    /// Kafka partition.
    pub partition: i32,
    /// First offset the sink still needs.
    pub next_offset: i64,
    /// Highest event time in the partition before `next_offset` (`i64::MIN` for none).
    pub max_event_us: i64,
}
