//! Clearing a time range before a backfill re-inserts it from the archive, so a backfill run
//! twice (or after one cut short) leaves the same tables.

use std::time::Instant;

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;

use super::sink::PostgresError;

/// The tables one stream's backfill rebuilds.
#[derive(Debug, Clone, Copy)]
pub struct StreamTables<'a> {
    /// Topic (for `late_events`).
    pub topic: &'a str,
    /// Raw tables, with a `time` column.
    pub raw: &'a [&'a str],
    /// Aggregate tables with their window width in seconds, with a `bucket` column.
    pub aggregates: &'a [(&'a str, i64)],
}

fn time(us: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(us)
}

/// Deletes, in one transaction, the stream's raw rows and late events with event time in
/// `[since, until)` and its windows lying wholly inside it (the ones a backfill of that range
/// writes again). `None` bounds are open. Returns the rows deleted.
pub async fn clear_range(
    client: &mut Client,
    tables: StreamTables<'_>,
    since_us: Option<i64>,
    until_us: Option<i64>,
) -> Result<u64, PostgresError> {
    let started = Instant::now();
    let since = since_us.and_then(time);
    let until = until_us.and_then(time);
    let tx = client
        .transaction()
        .await
        .map_err(|source| PostgresError::Statement {
            what: "beginning the backfill's clear",
            source,
        })?;
    let mut deleted = 0;
    // (table, time column, width of its rows' extent in seconds, topic filter)
    let mut targets: Vec<(&str, &str, i64, bool)> =
        tables.raw.iter().map(|t| (*t, "time", 0, false)).collect();
    targets.push(("late_events", "event_time", 0, true));
    targets.extend(
        tables
            .aggregates
            .iter()
            .map(|(t, w)| (*t, "bucket", *w, false)),
    );
    for (table, column, width_s, by_topic) in targets {
        let mut clauses = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        if by_topic {
            params.push(&tables.topic);
            clauses.push(format!("topic = ${}", params.len()));
        }
        if let Some(since) = &since {
            params.push(since);
            clauses.push(format!("{column} >= ${}", params.len()));
        }
        if let Some(until) = &until {
            params.push(until);
            clauses.push(format!(
                "{column} + make_interval(secs => {width_s}) {} ${}",
                if width_s == 0 { "<" } else { "<=" },
                params.len()
            ));
        }
        let sql = if clauses.is_empty() {
            format!("DELETE FROM {table}")
        } else {
            format!("DELETE FROM {table} WHERE {}", clauses.join(" AND "))
        };
        let n =
            tx.execute(sql.as_str(), &params)
                .await
                .map_err(|source| PostgresError::Statement {
                    what: "clearing the backfill's range",
                    source,
                })?;
        tracing::debug!(table, rows = n, "cleared for backfill");
        deleted += n;
    }
    tx.commit()
        .await
        .map_err(|source| PostgresError::Statement {
            what: "committing the backfill's clear",
            source,
        })?;
    tracing::info!(
        topic = tables.topic,
        rows = deleted,
        duration_ms = started.elapsed().as_millis() as u64,
        "cleared the backfill's range"
    );
    Ok(deleted)
}

/// After a backfill to the archive's end: stores `ends` (per partition, the offset after the
/// archive's last roll) as the PostgreSQL raw sink's positions where it has none (a new
/// database), so the streaming run that follows starts its raw rows where the archive ends
/// instead of writing Kafka's copy of them a second time. Positions already stored (a live
/// database) are left alone. Returns how many were stored.
pub async fn seed_raw_positions(
    client: &Client,
    dataflow: &str,
    topic: &str,
    ends: &[(i32, i64)],
) -> Result<u64, PostgresError> {
    if ends.is_empty() {
        return Ok(0);
    }
    let partitions: Vec<i32> = ends.iter().map(|e| e.0).collect();
    let next: Vec<i64> = ends.iter().map(|e| e.1).collect();
    client
        .execute(
            "INSERT INTO source_offsets (dataflow, sink, topic, partition, next_offset, watermark_us, updated_at)
             SELECT $1, $2, $3, p, n, 0, now() FROM UNNEST($4::int4[], $5::int8[]) AS u(p, n)
             ON CONFLICT (dataflow, sink, topic, partition) DO NOTHING",
            &[&dataflow, &super::raw_sink::NAME, &topic, &partitions, &next],
        )
        .await
        .map_err(|source| PostgresError::Statement {
            what: "storing the raw positions a backfill reached",
            source,
        })
}
