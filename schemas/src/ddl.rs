//! Table definitions of the PostgreSQL/TimescaleDB sink, as versioned migrations.
//!
//! Plain-PostgreSQL DDL is the base; when the `timescaledb` extension is available the sink
//! additionally runs [`timescale_setup`] to turn the time-series tables into hypertables. Table
//! and column names match what the platform's Grafana panels already query.

use crate::streams::{raw_tables, StreamDef, STREAMS};

/// One schema migration. Versions are applied in order, once, and recorded in
/// `primespark_migrations`.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Monotonic version.
    pub version: i32,
    /// Short name for logs.
    pub name: &'static str,
    /// SQL, possibly several statements.
    pub sql: &'static str,
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "telemetry, dead letters and source offsets",
        sql: r#"
CREATE TABLE IF NOT EXISTS device_metrics (
    time        TIMESTAMPTZ      NOT NULL,
    device_id   TEXT             NOT NULL,
    metric_name TEXT             NOT NULL,
    value       DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS device_metrics_device_time_idx ON device_metrics (device_id, time DESC);
CREATE INDEX IF NOT EXISTS device_metrics_time_idx ON device_metrics (time DESC);

CREATE TABLE IF NOT EXISTS device_metrics_1m (
    bucket      TIMESTAMPTZ      NOT NULL,
    device_id   TEXT             NOT NULL,
    metric_name TEXT             NOT NULL,
    count       BIGINT           NOT NULL,
    sum         DOUBLE PRECISION NOT NULL,
    min         DOUBLE PRECISION NOT NULL,
    max         DOUBLE PRECISION NOT NULL,
    avg         DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (device_id, metric_name, bucket)
);
CREATE INDEX IF NOT EXISTS device_metrics_1m_bucket_idx ON device_metrics_1m (bucket DESC);

CREATE TABLE IF NOT EXISTS dead_letters (
    id          BIGSERIAL   PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    topic       TEXT        NOT NULL,
    partition   INTEGER     NOT NULL,
    "offset"    BIGINT      NOT NULL,
    reason      TEXT        NOT NULL,
    error       TEXT        NOT NULL,
    payload     BYTEA       NOT NULL,
    UNIQUE (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS dead_letters_received_idx ON dead_letters (received_at DESC);

-- Where each sink of each dataflow resumes: written in the same transaction as the rows it covers.
CREATE TABLE IF NOT EXISTS source_offsets (
    dataflow     TEXT        NOT NULL,
    sink         TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    partition    INTEGER     NOT NULL,
    next_offset  BIGINT      NOT NULL,
    watermark_us BIGINT      NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (dataflow, sink, topic, partition)
);

-- Event-time progress of each dataflow's aggregates: windows ending at or before it are final.
CREATE TABLE IF NOT EXISTS dataflow_state (
    dataflow           TEXT        PRIMARY KEY,
    committed_watermark_us BIGINT  NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);
"#,
    },
    Migration {
        version: 2,
        name: "inference results, inference and routing statistics",
        sql: r#"
-- The table the platform's Grafana panels already query.
CREATE TABLE IF NOT EXISTS ai_inference_results (
    time             TIMESTAMPTZ      NOT NULL,
    model_name       TEXT             NOT NULL,
    input_tokens     BIGINT           NOT NULL,
    output_tokens    BIGINT           NOT NULL,
    latency_ms       DOUBLE PRECISION NOT NULL,
    source           TEXT             NOT NULL,
    status           TEXT             NOT NULL,
    device_id        TEXT,
    request_id       TEXT,
    routing_strategy TEXT,
    fallback         BOOLEAN          NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS ai_inference_results_model_time_idx ON ai_inference_results (model_name, time DESC);
CREATE INDEX IF NOT EXISTS ai_inference_results_source_time_idx ON ai_inference_results (source, time DESC);
CREATE INDEX IF NOT EXISTS ai_inference_results_time_idx ON ai_inference_results (time DESC);

CREATE TABLE IF NOT EXISTS inference_stats_1m (
    bucket              TIMESTAMPTZ      NOT NULL,
    model_name          TEXT             NOT NULL,
    source              TEXT             NOT NULL,
    count               BIGINT           NOT NULL,
    errors              BIGINT           NOT NULL,
    latency_p50_ms      DOUBLE PRECISION NOT NULL,
    latency_p95_ms      DOUBLE PRECISION NOT NULL,
    latency_p99_ms      DOUBLE PRECISION NOT NULL,
    avg_input_tokens    DOUBLE PRECISION NOT NULL,
    avg_output_tokens   DOUBLE PRECISION NOT NULL,
    output_tokens_per_s DOUBLE PRECISION,
    PRIMARY KEY (model_name, source, bucket)
);
CREATE INDEX IF NOT EXISTS inference_stats_1m_bucket_idx ON inference_stats_1m (bucket DESC);

CREATE TABLE IF NOT EXISTS routing_stats_1m (
    bucket              TIMESTAMPTZ      NOT NULL,
    routing_strategy    TEXT             NOT NULL,
    edge_requests       BIGINT           NOT NULL,
    cloud_requests      BIGINT           NOT NULL,
    edge_share          DOUBLE PRECISION NOT NULL,
    cloud_fallback_rate DOUBLE PRECISION,
    edge_success_rate   DOUBLE PRECISION,
    cloud_success_rate  DOUBLE PRECISION,
    edge_p95_ms         DOUBLE PRECISION,
    cloud_p95_ms        DOUBLE PRECISION,
    PRIMARY KEY (routing_strategy, bucket)
);
CREATE INDEX IF NOT EXISTS routing_stats_1m_bucket_idx ON routing_stats_1m (bucket DESC);
"#,
    },
    Migration {
        version: 3,
        name: "1-hour rollups",
        // Same columns, keys and indexes as the 1-minute tables.
        sql: r#"
CREATE TABLE IF NOT EXISTS device_metrics_1h (LIKE device_metrics_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS inference_stats_1h (LIKE inference_stats_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS routing_stats_1h (LIKE routing_stats_1m INCLUDING ALL);
"#,
    },
    Migration {
        version: 4,
        name: "late events",
        sql: r#"
-- Events later than the watermark minus windows.allowed_lateness: in the raw tables, never
-- aggregated, and listed here with how late they were.
CREATE TABLE IF NOT EXISTS late_events (
    received_at TIMESTAMPTZ      NOT NULL DEFAULT now(),
    topic       TEXT             NOT NULL,
    partition   INTEGER          NOT NULL,
    "offset"    BIGINT           NOT NULL,
    event_time  TIMESTAMPTZ      NOT NULL,
    late_by_ms  DOUBLE PRECISION NOT NULL,
    UNIQUE (topic, partition, "offset")
);
CREATE INDEX IF NOT EXISTS late_events_received_idx ON late_events (received_at DESC);
"#,
    },
    Migration {
        version: 5,
        name: "analytics events, task lifecycle, agent load and API windows",
        sql: r#"
-- Raw analytics.events: task lifecycle (task_id set) and API events (endpoint set).
CREATE TABLE IF NOT EXISTS analytics_events (
    time       TIMESTAMPTZ NOT NULL,
    event_type TEXT        NOT NULL,
    task_id    TEXT,
    task_type  TEXT,
    priority   TEXT,
    agent_id   TEXT,
    endpoint   TEXT,
    user_id    TEXT,
    data       JSONB
);
CREATE INDEX IF NOT EXISTS analytics_events_time_idx ON analytics_events (time DESC);
CREATE INDEX IF NOT EXISTS analytics_events_type_time_idx ON analytics_events (event_type, time DESC);
CREATE INDEX IF NOT EXISTS analytics_events_task_idx ON analytics_events (task_id, time DESC) WHERE task_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS task_stats_1m (
    bucket      TIMESTAMPTZ      NOT NULL,
    task_type   TEXT             NOT NULL,
    created     BIGINT           NOT NULL,
    assigned    BIGINT           NOT NULL,
    started     BIGINT           NOT NULL,
    completed   BIGINT           NOT NULL,
    failed      BIGINT           NOT NULL,
    wait_p50_ms DOUBLE PRECISION,
    wait_p95_ms DOUBLE PRECISION,
    run_p50_ms  DOUBLE PRECISION,
    run_p95_ms  DOUBLE PRECISION,
    backlog     BIGINT           NOT NULL,
    PRIMARY KEY (task_type, bucket)
);
CREATE INDEX IF NOT EXISTS task_stats_1m_bucket_idx ON task_stats_1m (bucket DESC);

CREATE TABLE IF NOT EXISTS agent_load_1m (
    bucket    TIMESTAMPTZ NOT NULL,
    agent_id  TEXT        NOT NULL,
    assigned  BIGINT      NOT NULL,
    completed BIGINT      NOT NULL,
    failed    BIGINT      NOT NULL,
    active    BIGINT      NOT NULL,
    PRIMARY KEY (agent_id, bucket)
);
CREATE INDEX IF NOT EXISTS agent_load_1m_bucket_idx ON agent_load_1m (bucket DESC);

CREATE TABLE IF NOT EXISTS api_events_1m (
    bucket         TIMESTAMPTZ NOT NULL,
    event_type     TEXT        NOT NULL,
    endpoint       TEXT        NOT NULL,
    count          BIGINT      NOT NULL,
    distinct_users BIGINT      NOT NULL,
    anonymous      BIGINT      NOT NULL,
    PRIMARY KEY (event_type, endpoint, bucket)
);
CREATE INDEX IF NOT EXISTS api_events_1m_bucket_idx ON api_events_1m (bucket DESC);

CREATE TABLE IF NOT EXISTS task_stats_1h (LIKE task_stats_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS agent_load_1h (LIKE agent_load_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS api_events_1h (LIKE api_events_1m INCLUDING ALL);

-- The task lifecycle join's state: the first event of each kind of every task that is open or
-- finished too recently to forget. Written in the same transaction as the windows and offsets,
-- so a restart rebuilds the join exactly; a task leaves once it finished longer ago than the
-- widest window plus the allowed lateness.
CREATE TABLE IF NOT EXISTS task_state (
    dataflow  TEXT        NOT NULL,
    task_id   TEXT        NOT NULL,
    kind      TEXT        NOT NULL,
    time      TIMESTAMPTZ NOT NULL,
    task_type TEXT,
    priority  TEXT,
    agent_id  TEXT,
    PRIMARY KEY (dataflow, task_id, kind)
);
"#,
    },
    Migration {
        version: 6,
        name: "anomaly scores and anomalies",
        sql: r#"
-- One row per scored telemetry sample, written with the raw rows and offsets of the same
-- records (one transaction), so a replay never doubles a score.
CREATE TABLE IF NOT EXISTS anomaly_scores (
    time      TIMESTAMPTZ NOT NULL,
    device_id TEXT        NOT NULL,
    model     TEXT        NOT NULL,
    score     REAL        NOT NULL,
    anomaly   BOOLEAN     NOT NULL,
    backend   TEXT        NOT NULL
);
CREATE INDEX IF NOT EXISTS anomaly_scores_device_time_idx ON anomaly_scores (device_id, time DESC);
CREATE INDEX IF NOT EXISTS anomaly_scores_time_idx ON anomaly_scores (time DESC);

-- The samples at or over their model's threshold, with the metrics the model saw.
CREATE TABLE IF NOT EXISTS anomalies (
    time      TIMESTAMPTZ NOT NULL,
    device_id TEXT        NOT NULL,
    model     TEXT        NOT NULL,
    score     REAL        NOT NULL,
    threshold REAL        NOT NULL,
    features  JSONB       NOT NULL
);
CREATE INDEX IF NOT EXISTS anomalies_device_time_idx ON anomalies (device_id, time DESC);
CREATE INDEX IF NOT EXISTS anomalies_time_idx ON anomalies (time DESC);
"#,
    },
    Migration {
        version: 7,
        name: "mean inference latency, fallback counts, 1-day rollups",
        // Nullable: windows closed before this version have no mean. The 1-day tables are
        // created after the new column so that they have it too.
        sql: r#"
ALTER TABLE inference_stats_1m ADD COLUMN IF NOT EXISTS avg_latency_ms DOUBLE PRECISION;
ALTER TABLE inference_stats_1h ADD COLUMN IF NOT EXISTS avg_latency_ms DOUBLE PRECISION;
ALTER TABLE routing_stats_1m ADD COLUMN IF NOT EXISTS tried_edge_first BIGINT;
ALTER TABLE routing_stats_1m ADD COLUMN IF NOT EXISTS fallbacks BIGINT;
ALTER TABLE routing_stats_1h ADD COLUMN IF NOT EXISTS tried_edge_first BIGINT;
ALTER TABLE routing_stats_1h ADD COLUMN IF NOT EXISTS fallbacks BIGINT;
CREATE TABLE IF NOT EXISTS device_metrics_1d (LIKE device_metrics_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS inference_stats_1d (LIKE inference_stats_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS routing_stats_1d (LIKE routing_stats_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS task_stats_1d (LIKE task_stats_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS agent_load_1d (LIKE agent_load_1m INCLUDING ALL);
CREATE TABLE IF NOT EXISTS api_events_1d (LIKE api_events_1m INCLUDING ALL);
"#,
    },
    Migration {
        version: 8,
        name: "writer leases",
        // One row per (dataflow, process id): who may write it, under which epoch. A new holder
        // takes a new epoch from the sequence; every commit checks its own is still there.
        sql: r#"
CREATE SEQUENCE IF NOT EXISTS writer_lease_epochs;
CREATE TABLE IF NOT EXISTS writer_leases (
    dataflow   TEXT        NOT NULL,
    process_id INTEGER     NOT NULL,
    epoch      BIGINT      NOT NULL,
    holder     TEXT        NOT NULL,
    renewed_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (dataflow, process_id)
);
"#,
    },
];

/// A view under a name the platform's documents use for an aggregate (seed 000, bottleneck #5
/// and section 3.4), over the rollup that holds its rows.
#[derive(Debug, Clone, Copy)]
pub struct SeedView {
    /// View name.
    pub name: &'static str,
    /// Its `SELECT`, valid in PostgreSQL and in the SQL endpoint (DataFusion) alike.
    pub select: &'static str,
}

/// The seeds' aggregate names. `hourly_metrics` has the seed's columns (`hour`, `device_id`,
/// `avg_value`) per metric, since a mean across different metrics means nothing;
/// `hourly_device_metrics` is the whole 1-hour row; `daily_inference_stats` the 1-day inference
/// windows. Views, not copies: their rows and retention are those of the rollup tables.
pub const SEED_VIEWS: &[SeedView] = &[
    SeedView {
        name: "hourly_metrics",
        select: "SELECT bucket AS hour, device_id, metric_name, avg AS avg_value, \
                 min AS min_value, max AS max_value, count AS sample_count FROM device_metrics_1h",
    },
    SeedView {
        name: "hourly_device_metrics",
        select: "SELECT bucket AS hour, device_id, metric_name, count, sum, min, max, avg \
                 FROM device_metrics_1h",
    },
    SeedView {
        name: "daily_inference_stats",
        select: "SELECT bucket AS day, model_name, source, count, errors, avg_latency_ms, \
                 latency_p50_ms, latency_p95_ms, latency_p99_ms, avg_input_tokens, \
                 avg_output_tokens, output_tokens_per_s FROM inference_stats_1d",
    },
];

/// Run at the end of the migrations' transaction on every start: the [`SEED_VIEWS`], replaced
/// so that a new version's definition wins (views of hypertables need no TimescaleDB step).
pub fn seed_views() -> Vec<String> {
    SEED_VIEWS
        .iter()
        .map(|v| format!("CREATE OR REPLACE VIEW {} AS {}", v.name, v.select))
        .collect()
}

/// Run once after the migrations when the `timescaledb` extension is available: hypertables
/// for the time-series tables of [`STREAMS`] (every raw table on its time column, every
/// aggregate table on `bucket`; TimescaleDB 2.x `create_hypertable` with `migrate_data`, so it is
/// safe on tables that already hold rows and on every restart).
pub fn timescale_setup() -> Vec<String> {
    let hypertable = |table: &str, column: &str| {
        format!(
            "SELECT create_hypertable('{table}', '{column}', if_not_exists => TRUE, migrate_data => TRUE)"
        )
    };
    let raw = raw_tables().map(|t| hypertable(t.name, t.time_column));
    let aggregates = STREAMS
        .iter()
        .flat_map(StreamDef::aggregate_tables)
        .map(|(_, table)| hypertable(table, "bucket"));
    std::iter::once("CREATE EXTENSION IF NOT EXISTS timescaledb".to_owned())
        .chain(raw)
        .chain(aggregates)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase() {
        let versions: Vec<_> = MIGRATIONS.iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
    }

    /// Every table the table of streams names is created by a migration, and becomes a
    /// hypertable on TimescaleDB.
    #[test]
    fn every_stream_table_is_created_and_a_hypertable() {
        let ddl: String = MIGRATIONS.iter().map(|m| m.sql).collect();
        let setup = timescale_setup().join("\n");
        let tables = raw_tables().map(|t| t.name).chain(
            STREAMS
                .iter()
                .flat_map(|s| s.aggregate_tables().map(|(_, t)| t)),
        );
        let mut n = 0;
        for table in tables {
            assert!(
                ddl.contains(&format!("CREATE TABLE IF NOT EXISTS {table} (")),
                "no migration creates {table}"
            );
            assert!(
                setup.contains(&format!("create_hypertable('{table}',")),
                "{table} is not made a hypertable"
            );
            n += 1;
        }
        assert_eq!(n, 5 + 18);
    }
}
