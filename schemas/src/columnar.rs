//! Arrow schemas of the rows primespark writes to Parquet and serves over SQL.
//!
//! Raw rows carry their Kafka provenance (`kafka_partition`, `kafka_offset`) so an archive can
//! be deduplicated and replayed (backfill) without the broker.

use std::sync::{Arc, OnceLock};

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};

/// Timestamp type of every time column: microseconds, UTC.
pub fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Raw telemetry, one row per (device, metric, time): the Parquet files under
/// `topic=edge.telemetry/` and the SQL table `telemetry_raw`.
pub fn telemetry_raw() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("time", time_type(), false),
                Field::new("device_id", DataType::Utf8, false),
                Field::new("metric_name", DataType::Utf8, false),
                Field::new("value", DataType::Float64, false),
                Field::new("kafka_partition", DataType::Int32, false),
                Field::new("kafka_offset", DataType::Int64, false),
            ]))
        })
        .clone()
}

/// Anomaly scores, one row per scored telemetry sample: the Parquet files under
/// `table=anomaly_scores/` and the SQL table `anomaly_scores_archive`.
pub fn anomaly_scores() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("time", time_type(), false),
                Field::new("device_id", DataType::Utf8, false),
                Field::new("model", DataType::Utf8, false),
                Field::new("score", DataType::Float32, false),
                Field::new("anomaly", DataType::Boolean, false),
                Field::new("backend", DataType::Utf8, false),
                Field::new("kafka_partition", DataType::Int32, false),
                Field::new("kafka_offset", DataType::Int64, false),
            ]))
        })
        .clone()
}

/// 1-minute aggregates, one row per (device, metric, bucket): the Parquet files under
/// `table=device_metrics_1m/` and the SQL table `device_metrics_1m`.
pub fn device_metrics_1m() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("bucket", time_type(), false),
                Field::new("device_id", DataType::Utf8, false),
                Field::new("metric_name", DataType::Utf8, false),
                Field::new("count", DataType::Int64, false),
                Field::new("sum", DataType::Float64, false),
                Field::new("min", DataType::Float64, false),
                Field::new("max", DataType::Float64, false),
                Field::new("avg", DataType::Float64, false),
            ]))
        })
        .clone()
}

/// Raw inference requests, one row per request: the Parquet files under
/// `topic=edge.ai.inference/` and the SQL table `inference_raw`.
pub fn inference_raw() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("time", time_type(), false),
                Field::new("model_name", DataType::Utf8, false),
                Field::new("input_tokens", DataType::Int64, false),
                Field::new("output_tokens", DataType::Int64, false),
                Field::new("latency_ms", DataType::Float64, false),
                Field::new("source", DataType::Utf8, false),
                Field::new("status", DataType::Utf8, false),
                Field::new("device_id", DataType::Utf8, true),
                Field::new("request_id", DataType::Utf8, true),
                Field::new("routing_strategy", DataType::Utf8, true),
                Field::new("fallback", DataType::Boolean, false),
                Field::new("kafka_partition", DataType::Int32, false),
                Field::new("kafka_offset", DataType::Int64, false),
            ]))
        })
        .clone()
}

/// Per-(model, source) inference windows: `table=inference_stats_1m/`.
pub fn inference_stats_1m() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("bucket", time_type(), false),
                Field::new("model_name", DataType::Utf8, false),
                Field::new("source", DataType::Utf8, false),
                Field::new("count", DataType::Int64, false),
                Field::new("errors", DataType::Int64, false),
                Field::new("latency_p50_ms", DataType::Float64, false),
                Field::new("latency_p95_ms", DataType::Float64, false),
                Field::new("latency_p99_ms", DataType::Float64, false),
                Field::new("avg_input_tokens", DataType::Float64, false),
                Field::new("avg_output_tokens", DataType::Float64, false),
                Field::new("output_tokens_per_s", DataType::Float64, true),
                // Nullable: files written before it was added do not have it.
                Field::new("avg_latency_ms", DataType::Float64, true),
            ]))
        })
        .clone()
}

/// Routing-statistics windows per slice: `table=routing_stats_1m/`.
pub fn routing_stats_1m() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("bucket", time_type(), false),
                Field::new("routing_strategy", DataType::Utf8, false),
                Field::new("edge_requests", DataType::Int64, false),
                Field::new("cloud_requests", DataType::Int64, false),
                Field::new("edge_share", DataType::Float64, false),
                Field::new("cloud_fallback_rate", DataType::Float64, true),
                Field::new("edge_success_rate", DataType::Float64, true),
                Field::new("cloud_success_rate", DataType::Float64, true),
                Field::new("edge_p95_ms", DataType::Float64, true),
                Field::new("cloud_p95_ms", DataType::Float64, true),
                // Nullable: files written before they were added do not have them.
                Field::new("tried_edge_first", DataType::Int64, true),
                Field::new("fallbacks", DataType::Int64, true),
            ]))
        })
        .clone()
}

/// Raw `analytics.events`, one row per task or API event: the Parquet files under
/// `topic=analytics.events/` and the SQL table `analytics_raw`. Task events fill `task_id` (and
/// `task_type`, `priority`, `agent_id` when sent); API events fill `endpoint`, `user_id` and
/// `data` (the `data` object as compact JSON text).
pub fn analytics_raw() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("time", time_type(), false),
                Field::new("event_type", DataType::Utf8, false),
                Field::new("task_id", DataType::Utf8, true),
                Field::new("task_type", DataType::Utf8, true),
                Field::new("priority", DataType::Utf8, true),
                Field::new("agent_id", DataType::Utf8, true),
                Field::new("endpoint", DataType::Utf8, true),
                Field::new("user_id", DataType::Utf8, true),
                Field::new("data", DataType::Utf8, true),
                Field::new("kafka_partition", DataType::Int32, false),
                Field::new("kafka_offset", DataType::Int64, false),
            ]))
        })
        .clone()
}

/// Task lifecycle windows per task type: `table=task_stats_1m/` (and `task_stats_1h`).
pub fn task_stats_1m() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("bucket", time_type(), false),
                Field::new("task_type", DataType::Utf8, false),
                Field::new("created", DataType::Int64, false),
                Field::new("assigned", DataType::Int64, false),
                Field::new("started", DataType::Int64, false),
                Field::new("completed", DataType::Int64, false),
                Field::new("failed", DataType::Int64, false),
                Field::new("wait_p50_ms", DataType::Float64, true),
                Field::new("wait_p95_ms", DataType::Float64, true),
                Field::new("run_p50_ms", DataType::Float64, true),
                Field::new("run_p95_ms", DataType::Float64, true),
                Field::new("backlog", DataType::Int64, false),
            ]))
        })
        .clone()
}

/// Per-agent load windows: `table=agent_load_1m/` (and `agent_load_1h`).
pub fn agent_load_1m() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("bucket", time_type(), false),
                Field::new("agent_id", DataType::Utf8, false),
                Field::new("assigned", DataType::Int64, false),
                Field::new("completed", DataType::Int64, false),
                Field::new("failed", DataType::Int64, false),
                Field::new("active", DataType::Int64, false),
            ]))
        })
        .clone()
}

/// API event windows per (event type, endpoint): `table=api_events_1m/` (and `api_events_1h`).
pub fn api_events_1m() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("bucket", time_type(), false),
                Field::new("event_type", DataType::Utf8, false),
                Field::new("endpoint", DataType::Utf8, false),
                Field::new("count", DataType::Int64, false),
                Field::new("distinct_users", DataType::Int64, false),
                Field::new("anonymous", DataType::Int64, false),
            ]))
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_columns() {
        let s = telemetry_raw();
        let names: Vec<_> = s.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            [
                "time",
                "device_id",
                "metric_name",
                "value",
                "kafka_partition",
                "kafka_offset"
            ]
        );
        assert_eq!(s.field(0).data_type(), &time_type());
    }

    #[test]
    fn analytics_columns_match_the_tables() {
        let names =
            |s: SchemaRef| -> Vec<String> { s.fields().iter().map(|f| f.name().clone()).collect() };
        assert_eq!(
            names(analytics_raw()),
            [
                "time",
                "event_type",
                "task_id",
                "task_type",
                "priority",
                "agent_id",
                "endpoint",
                "user_id",
                "data",
                "kafka_partition",
                "kafka_offset"
            ]
        );
        let raw = analytics_raw();
        // Nullable exactly where `analytics_events` is.
        let nullable: Vec<&str> = raw
            .fields()
            .iter()
            .filter(|f| f.is_nullable())
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(
            nullable,
            [
                "task_id",
                "task_type",
                "priority",
                "agent_id",
                "endpoint",
                "user_id",
                "data"
            ]
        );
        // Each window schema has the columns of its PostgreSQL table, bucket first.
        for (schema, table) in [
            (task_stats_1m(), "task_stats_1m"),
            (agent_load_1m(), "agent_load_1m"),
            (api_events_1m(), "api_events_1m"),
        ] {
            let cols: Vec<(String, bool)> = schema
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.is_nullable()))
                .collect();
            assert_eq!(schema.field(0).name(), "bucket", "{table}");
            assert_eq!(schema.field(0).data_type(), &time_type(), "{table}");
            let ddl = crate::ddl::MIGRATIONS
                .iter()
                .map(|m| m.sql)
                .find(|sql| sql.contains(&format!("CREATE TABLE IF NOT EXISTS {table} (\n")))
                .unwrap();
            let body = ddl
                .split(&format!("CREATE TABLE IF NOT EXISTS {table} (\n"))
                .nth(1)
                .unwrap();
            let body = body.split("PRIMARY KEY").next().unwrap();
            let ddl_cols: Vec<(String, bool)> = body
                .lines()
                .filter_map(|l| {
                    let name = l.split_whitespace().next()?;
                    Some((name.to_owned(), !l.contains("NOT NULL")))
                })
                .collect();
            assert_eq!(cols, ddl_cols, "{table}");
        }
    }
}
