//! How long rows stay in PostgreSQL: `[postgres.retention]`.
//!
//! With TimescaleDB the database does it: [`timescale_statements`] installs a retention policy
//! per table and compression of raw chunks (segmented by their natural key) after
//! `compress_after`, replacing earlier policies so a changed horizon takes effect. Plain
//! PostgreSQL has no policies, so the pipeline deletes expired rows itself
//! ([`delete_expired`], run every `interval` by process 0), in small batches so a large backlog
//! never holds a long lock or a huge transaction. The Parquet archive keeps everything: these
//! horizons bound the hot tier only.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use primespark_schemas::streams::{aggregate_families, StreamKind, STREAMS};

use super::sink::PostgresError;
use crate::InvalidConfig;

/// `[postgres.retention]`: horizons per table group (the platform's defaults).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Apply retention at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Raw telemetry (`device_metrics`, `anomaly_scores`, `anomalies`), dead letters and late
    /// events.
    #[serde(default = "d30", with = "crate::config::duration")]
    pub raw_telemetry: Duration,
    /// Raw inference requests (`ai_inference_results`) and raw task/API events.
    #[serde(default = "d90", with = "crate::config::duration")]
    pub raw_inference: Duration,
    /// 1-minute aggregates (`*_1m`).
    #[serde(default = "y1", with = "crate::config::duration")]
    pub aggregates_1m: Duration,
    /// 1-hour aggregates (`*_1h`).
    #[serde(default = "y3", with = "crate::config::duration")]
    pub aggregates_1h: Duration,
    /// 1-day aggregates (`*_1d`, the seeds' `daily_inference_stats`: 3 years).
    #[serde(default = "y3", with = "crate::config::duration")]
    pub aggregates_1d: Duration,
    /// TimescaleDB: compress raw chunks older than this.
    #[serde(default = "d7", with = "crate::config::duration")]
    pub compress_after: Duration,
    /// Plain PostgreSQL: how often the pipeline deletes expired rows.
    #[serde(default = "h1", with = "crate::config::duration")]
    pub interval: Duration,
    /// Plain PostgreSQL: rows per delete statement.
    #[serde(default = "default_batch")]
    pub batch_rows: i64,
}

fn default_true() -> bool {
    true
}
const DAY: u64 = 86_400;
fn d7() -> Duration {
    Duration::from_secs(7 * DAY)
}
fn d30() -> Duration {
    Duration::from_secs(30 * DAY)
}
fn d90() -> Duration {
    Duration::from_secs(90 * DAY)
}
fn y1() -> Duration {
    Duration::from_secs(365 * DAY)
}
fn y3() -> Duration {
    Duration::from_secs(3 * 365 * DAY)
}
fn h1() -> Duration {
    Duration::from_secs(3600)
}
fn default_batch() -> i64 {
    50_000
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            raw_telemetry: d30(),
            raw_inference: d90(),
            aggregates_1m: y1(),
            aggregates_1h: y3(),
            aggregates_1d: y3(),
            compress_after: d7(),
            interval: h1(),
            batch_rows: default_batch(),
        }
    }
}

/// One table under retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retained {
    /// Table name.
    pub table: &'static str,
    /// Its time column.
    pub time_column: &'static str,
    /// Rows older than this go.
    pub keep: Duration,
    /// Raw tables: compressed on TimescaleDB, segmented by this column.
    pub compress_segment_by: Option<&'static str>,
}

impl RetentionConfig {
    /// Checks values; keys are named as in the file.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        for (key, d) in [
            ("raw_telemetry", self.raw_telemetry),
            ("raw_inference", self.raw_inference),
            ("aggregates_1m", self.aggregates_1m),
            ("aggregates_1h", self.aggregates_1h),
            ("aggregates_1d", self.aggregates_1d),
            ("compress_after", self.compress_after),
            ("interval", self.interval),
        ] {
            if d < Duration::from_secs(60) {
                return Err(InvalidConfig::new(
                    format!("postgres.retention.{key}"),
                    "must be at least 1m",
                ));
            }
        }
        if self.aggregates_1h < self.aggregates_1m {
            return Err(InvalidConfig::new(
                "postgres.retention.aggregates_1h",
                "must be at least aggregates_1m (dashboards fall back to the hourly rollup for long ranges)",
            ));
        }
        if self.aggregates_1d < self.aggregates_1h {
            return Err(InvalidConfig::new(
                "postgres.retention.aggregates_1d",
                "must be at least aggregates_1h (the daily rollup is what long ranges read)",
            ));
        }
        if self.batch_rows < 1 {
            return Err(InvalidConfig::new(
                "postgres.retention.batch_rows",
                "must be positive",
            ));
        }
        Ok(())
    }

    /// Every table and how long it keeps rows.
    pub fn tables(&self) -> Vec<Retained> {
        let raw = |table, time_column, keep, seg| Retained {
            table,
            time_column,
            keep,
            compress_segment_by: seg,
        };
        // Telemetry's tables keep `raw_telemetry`; the other streams' raw tables keep
        // `raw_inference` (its key predates the analytics stream).
        let mut tables: Vec<Retained> = STREAMS
            .iter()
            .flat_map(|stream| {
                let keep = match stream.kind {
                    StreamKind::Telemetry => self.raw_telemetry,
                    StreamKind::Inference | StreamKind::Analytics => self.raw_inference,
                };
                stream
                    .raw_tables
                    .iter()
                    .map(move |t| raw(t.name, t.time_column, keep, Some(t.segment_by)))
            })
            .collect();
        tables.push(raw("dead_letters", "received_at", self.raw_telemetry, None));
        tables.push(raw("late_events", "received_at", self.raw_telemetry, None));
        for family in aggregate_families() {
            tables.push(raw(family.minute, "bucket", self.aggregates_1m, None));
            tables.push(raw(family.hour, "bucket", self.aggregates_1h, None));
            tables.push(raw(family.day, "bucket", self.aggregates_1d, None));
        }
        tables
    }
}

fn interval(d: Duration) -> String {
    format!("INTERVAL '{} seconds'", d.as_secs())
}

/// The TimescaleDB statements (2.x API) that install `config`'s policies; each replaces an
/// earlier policy of the same kind. Dead letters and late events are plain tables (no
/// hypertable): the pipeline's own deletion covers them on both backends.
pub fn timescale_statements(config: &RetentionConfig) -> Vec<String> {
    let mut out = Vec::new();
    for t in config.tables() {
        if t.time_column == "received_at" {
            continue;
        }
        out.push(format!(
            "SELECT remove_retention_policy('{}', if_exists => TRUE)",
            t.table
        ));
        out.push(format!(
            "SELECT add_retention_policy('{}', {})",
            t.table,
            interval(t.keep)
        ));
        if let Some(seg) = t.compress_segment_by {
            out.push(format!(
                "ALTER TABLE {} SET (timescaledb.compress, timescaledb.compress_segmentby = '{seg}', \
                 timescaledb.compress_orderby = '{} DESC')",
                t.table, t.time_column
            ));
            out.push(format!(
                "SELECT remove_compression_policy('{}', if_exists => TRUE)",
                t.table
            ));
            out.push(format!(
                "SELECT add_compression_policy('{}', {})",
                t.table,
                interval(config.compress_after)
            ));
        }
    }
    out
}

/// Installs the TimescaleDB policies.
pub async fn apply_timescale_policies(
    client: &Client,
    config: &RetentionConfig,
) -> Result<(), PostgresError> {
    for sql in timescale_statements(config) {
        client
            .batch_execute(&sql)
            .await
            .map_err(|source| PostgresError::Statement {
                what: "installing a TimescaleDB retention or compression policy",
                source,
            })?;
    }
    tracing::info!(
        raw_telemetry_days = config.raw_telemetry.as_secs() / DAY,
        raw_inference_days = config.raw_inference.as_secs() / DAY,
        aggregates_1m_days = config.aggregates_1m.as_secs() / DAY,
        aggregates_1h_days = config.aggregates_1h.as_secs() / DAY,
        aggregates_1d_days = config.aggregates_1d.as_secs() / DAY,
        compress_after_days = config.compress_after.as_secs() / DAY,
        "timescaledb retention and compression policies installed"
    );
    Ok(())
}

/// Deletes rows older than each table's horizon, in batches of `batch_rows`: every table on
/// plain PostgreSQL, only the tables that are not hypertables (dead letters, late events) when
/// `hypertables_have_policies`. Tables that do not exist (yet) are skipped. Returns rows
/// deleted per table.
pub async fn delete_expired(
    client: &Client,
    config: &RetentionConfig,
    hypertables_have_policies: bool,
) -> Result<Vec<(&'static str, u64)>, PostgresError> {
    let mut deleted = Vec::new();
    for t in config.tables() {
        if hypertables_have_policies && t.time_column != "received_at" {
            continue;
        }
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&t.table])
            .await
            .map_err(|source| PostgresError::Statement {
                what: "looking up a table for retention",
                source,
            })?
            .get(0);
        if !exists {
            continue;
        }
        // Cut-off computed by the server (its clock is the one `time` is compared with).
        let sql = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} \
             WHERE {col} < now() - make_interval(secs => $1) LIMIT $2))",
            table = t.table,
            col = t.time_column
        );
        let secs = t.keep.as_secs_f64();
        let started = Instant::now();
        let mut total = 0u64;
        loop {
            let n = client
                .execute(&sql, &[&secs, &config.batch_rows])
                .await
                .map_err(|source| PostgresError::Statement {
                    what: "deleting expired rows",
                    source,
                })?;
            total += n;
            if n < config.batch_rows as u64 {
                break;
            }
        }
        if total > 0 {
            crate::metrics::RetentionDeleted {
                table: t.table,
                rows: total,
                duration: started.elapsed(),
            }
            .emit();
        }
        deleted.push((t.table, total));
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_has_a_horizon_and_raw_ones_compress() {
        let c = RetentionConfig::default();
        let tables = c.tables();
        assert_eq!(tables.len(), 7 + 18);
        assert!(tables.iter().all(|t| !t.table.is_empty()));
        let keep = |name: &str| tables.iter().find(|t| t.table == name).map(|t| t.keep);
        assert_eq!(keep("device_metrics"), Some(Duration::from_secs(30 * DAY)));
        assert_eq!(
            keep("ai_inference_results"),
            Some(Duration::from_secs(90 * DAY))
        );
        assert_eq!(keep("task_stats_1m"), Some(Duration::from_secs(365 * DAY)));
        assert_eq!(
            keep("api_events_1h"),
            Some(Duration::from_secs(3 * 365 * DAY))
        );
        assert_eq!(
            keep("inference_stats_1d"),
            Some(Duration::from_secs(3 * 365 * DAY))
        );
        let sql = timescale_statements(&c);
        assert!(sql.contains(
            &"SELECT add_retention_policy('device_metrics', INTERVAL '2592000 seconds')".to_owned()
        ));
        assert!(sql.contains(
            &"SELECT add_compression_policy('device_metrics', INTERVAL '604800 seconds')"
                .to_owned()
        ));
        assert!(sql.iter().any(|s| s.starts_with("ALTER TABLE ai_inference_results SET (timescaledb.compress, timescaledb.compress_segmentby = 'model_name'")));
        assert!(!sql.iter().any(|s| s.contains("dead_letters")));
        assert!(!sql
            .iter()
            .any(|s| s.contains("compression_policy('device_metrics_1m'")));
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = RetentionConfig {
            aggregates_1h: Duration::from_secs(3600),
            ..RetentionConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("postgres.retention.aggregates_1h"));
        c = RetentionConfig {
            aggregates_1d: Duration::from_secs(30 * DAY),
            ..RetentionConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("postgres.retention.aggregates_1d"));
        c = RetentionConfig {
            raw_telemetry: Duration::from_secs(1),
            ..RetentionConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("postgres.retention.raw_telemetry"));
    }
}
