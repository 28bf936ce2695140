//! The PostgreSQL sink's runtime: connection, migrations, transactional writes.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::pin_mut;
use primespark_schemas::ddl::{MIGRATIONS, TIMESCALE_SETUP};
use primespark_schemas::rows::{
    latest_rows, Agg, AggRow, DeadLetterRow, InferenceStatsRow, LateEventRow, MetricAggRow,
    PartitionOffset, RawRow, RoutingStatsRow,
};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Transaction};

use crate::metrics::{DeadLettersWritten, SinkRowsWritten};

/// PostgreSQL failures.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// Connecting failed (the service may be down: retry).
    #[error("connecting to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// A statement failed.
    #[error("{what}: {source}")]
    Statement {
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn stmt(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PostgresError {
    move |source| PostgresError::Statement { what, source }
}

/// Which storage the tables live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// TimescaleDB hypertables.
    Timescale,
    /// Plain PostgreSQL tables with the same columns and indexes.
    Plain,
}

/// Connects and drives the connection on the current tokio runtime.
pub async fn connect(url: &str) -> Result<Client, PostgresError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(PostgresError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

/// Applies pending migrations (idempotent; serialized across processes by an advisory lock) and,
/// when the `timescaledb` extension is available, makes the time-series tables hypertables.
pub async fn migrate(client: &mut Client) -> Result<Backend, PostgresError> {
    let mut tx = client
        .transaction()
        .await
        .map_err(stmt("beginning migration"))?;
    // One migrator at a time across a cluster's processes.
    tx.execute("SELECT pg_advisory_xact_lock(7262)", &[])
        .await
        .map_err(stmt("taking the migration lock"))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS primespark_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await
    .map_err(stmt("creating primespark_migrations"))?;
    let applied: Vec<i32> = tx
        .query("SELECT version FROM primespark_migrations", &[])
        .await
        .map_err(stmt("reading primespark_migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tx.batch_execute(m.sql)
            .await
            .map_err(stmt("applying a migration"))?;
        tx.execute(
            "INSERT INTO primespark_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(stmt("recording a migration"))?;
        tracing::info!(version = m.version, name = m.name, "migration applied");
    }
    let available = tx
        .query_opt(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'",
            &[],
        )
        .await
        .map_err(stmt("looking for timescaledb"))?
        .is_some();
    // Installed but not loadable (e.g. missing from shared_preload_libraries) must not stop the
    // pipeline: the savepoint lets us fall back to the plain tables in the same transaction.
    let mut timescale = false;
    if available {
        let sp = tx
            .savepoint("timescaledb_setup")
            .await
            .map_err(stmt("setting up timescaledb"))?;
        let mut failure = None;
        for sql in TIMESCALE_SETUP {
            if let Err(e) = sp.batch_execute(sql).await {
                failure = Some(e);
                break;
            }
        }
        match failure {
            None => {
                sp.commit().await.map_err(stmt("setting up timescaledb"))?;
                timescale = true;
            }
            Some(e) => {
                tracing::warn!(error = %e, "timescaledb is available but could not be set up; using plain tables");
                sp.rollback()
                    .await
                    .map_err(stmt("setting up timescaledb"))?;
            }
        }
    }
    tx.commit().await.map_err(stmt("committing migrations"))?;
    let backend = if timescale {
        Backend::Timescale
    } else {
        Backend::Plain
    };
    match backend {
        Backend::Timescale => tracing::info!("timescaledb found: device_metrics is a hypertable"),
        Backend::Plain => tracing::info!(
            "timescaledb not installed: plain PostgreSQL tables with the same indexes"
        ),
    }
    Ok(backend)
}

/// What earlier runs committed for one dataflow and topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredState {
    /// Windows ending at or before this are final.
    pub committed_watermark_us: Option<i64>,
    /// Resume points by sink name.
    pub offsets: HashMap<String, Vec<PartitionOffset>>,
}

impl StoredState {
    /// The resume point of `sink` for `partition`.
    pub fn offset(&self, sink: &str, partition: i32) -> Option<PartitionOffset> {
        self.offsets
            .get(sink)?
            .iter()
            .find(|o| o.partition == partition)
            .copied()
    }
}

/// Loads the committed state of `dataflow` reading `topic`.
pub async fn load_state(
    client: &Client,
    dataflow: &str,
    topic: &str,
) -> Result<StoredState, PostgresError> {
    let mut state = StoredState::default();
    if let Some(row) = client
        .query_opt(
            "SELECT committed_watermark_us FROM dataflow_state WHERE dataflow = $1",
            &[&dataflow],
        )
        .await
        .map_err(stmt("reading dataflow_state"))?
    {
        state.committed_watermark_us = Some(row.get(0));
    }
    for row in client
        .query(
            "SELECT sink, partition, next_offset, watermark_us FROM source_offsets WHERE dataflow = $1 AND topic = $2",
            &[&dataflow, &topic],
        )
        .await
        .map_err(stmt("reading source_offsets"))?
    {
        state.offsets.entry(row.get(0)).or_default().push(PartitionOffset {
            partition: row.get(1),
            next_offset: row.get(2),
            max_event_us: row.get(3),
        });
    }
    Ok(state)
}

fn time(us: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

async fn upsert_offsets(
    tx: &Transaction<'_>,
    dataflow: &str,
    sink: &str,
    topic: &str,
    offsets: &[PartitionOffset],
) -> Result<(), PostgresError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
    let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
    let wm: Vec<i64> = offsets.iter().map(|o| o.max_event_us).collect();
    tx.execute(
        "INSERT INTO source_offsets (dataflow, sink, topic, partition, next_offset, watermark_us, updated_at)
         SELECT $1, $2, $3, p, n, w, now() FROM UNNEST($4::int4[], $5::int8[], $6::int8[]) AS u(p, n, w)
         ON CONFLICT (dataflow, sink, topic, partition) DO UPDATE
           SET next_offset = EXCLUDED.next_offset, watermark_us = EXCLUDED.watermark_us, updated_at = now()",
        &[&dataflow, &sink, &topic, &partitions, &next, &wm],
    )
    .await
    .map_err(stmt("storing source offsets"))?;
    Ok(())
}

/// Writes raw rows (binary COPY) and dead letters, and stores `offsets` for `sink`, in one
/// transaction: after a crash either all of it is there or none.
// Everything of one transaction is passed explicitly, so the atomicity is visible here.
#[allow(clippy::too_many_arguments)]
pub async fn write_raw(
    client: &mut Client,
    dataflow: &str,
    sink: &str,
    topic: &str,
    rows: &[RawRow],
    dead: &[DeadLetterRow],
    late: &[LateEventRow],
    offsets: &[PartitionOffset],
) -> Result<(), PostgresError> {
    let started = Instant::now();
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning raw batch"))?;
    let telemetry = rows.iter().filter_map(|r| match r {
        RawRow::Telemetry(t) => Some(t),
        RawRow::Inference(_) => None,
    });
    let inference = rows.iter().filter_map(|r| match r {
        RawRow::Inference(i) => Some(i),
        RawRow::Telemetry(_) => None,
    });
    let (mut telemetry_rows, mut inference_rows) = (0u64, 0u64);
    if rows.iter().any(|r| matches!(r, RawRow::Telemetry(_))) {
        let copy = tx
            .copy_in("COPY device_metrics (time, device_id, metric_name, value) FROM STDIN (FORMAT binary)")
            .await
            .map_err(stmt("starting COPY into device_metrics"))?;
        let writer = BinaryCopyInWriter::new(
            copy,
            &[Type::TIMESTAMPTZ, Type::TEXT, Type::TEXT, Type::FLOAT8],
        );
        pin_mut!(writer);
        for r in telemetry {
            telemetry_rows += 1;
            writer
                .as_mut()
                .write(&[&time(r.time_us), &r.device_id, &r.metric_name, &r.value])
                .await
                .map_err(stmt("copying into device_metrics"))?;
        }
        writer
            .finish()
            .await
            .map_err(stmt("finishing COPY into device_metrics"))?;
    }
    if rows.iter().any(|r| matches!(r, RawRow::Inference(_))) {
        let copy = tx
            .copy_in(
                "COPY ai_inference_results (time, model_name, input_tokens, output_tokens, latency_ms, source, status, \
                 device_id, request_id, routing_strategy, fallback) FROM STDIN (FORMAT binary)",
            )
            .await
            .map_err(stmt("starting COPY into ai_inference_results"))?;
        let writer = BinaryCopyInWriter::new(
            copy,
            &[
                Type::TIMESTAMPTZ,
                Type::TEXT,
                Type::INT8,
                Type::INT8,
                Type::FLOAT8,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::BOOL,
            ],
        );
        pin_mut!(writer);
        for r in inference {
            inference_rows += 1;
            let e = &r.event;
            writer
                .as_mut()
                .write(&[
                    &time(e.time_us),
                    &e.model,
                    &i64::from(e.prompt_length),
                    &i64::from(e.response_length),
                    &e.latency_ms,
                    &e.source.as_str(),
                    &e.status.as_str(),
                    &e.device_id,
                    &e.request_id,
                    &e.routing_strategy.map(|s| s.as_str()),
                    &e.fallback,
                ])
                .await
                .map_err(stmt("copying into ai_inference_results"))?;
        }
        writer
            .finish()
            .await
            .map_err(stmt("finishing COPY into ai_inference_results"))?;
    }
    if !dead.is_empty() {
        let partitions: Vec<i32> = dead.iter().map(|d| d.partition).collect();
        let offs: Vec<i64> = dead.iter().map(|d| d.offset).collect();
        let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
        let errors: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
        let payloads: Vec<&[u8]> = dead.iter().map(|d| d.payload.as_slice()).collect();
        tx.execute(
            "INSERT INTO dead_letters (topic, partition, \"offset\", reason, error, payload)
             SELECT $1, p, o, r, e, b FROM UNNEST($2::int4[], $3::int8[], $4::text[], $5::text[], $6::bytea[]) AS u(p, o, r, e, b)
             ON CONFLICT (topic, partition, \"offset\") DO NOTHING",
            &[&topic, &partitions, &offs, &reasons, &errors, &payloads],
        )
        .await
        .map_err(stmt("inserting dead letters"))?;
    }
    if !late.is_empty() {
        let partitions: Vec<i32> = late.iter().map(|l| l.partition).collect();
        let offs: Vec<i64> = late.iter().map(|l| l.offset).collect();
        let times: Vec<DateTime<Utc>> = late.iter().map(|l| time(l.event_time_us)).collect();
        let late_by: Vec<f64> = late.iter().map(|l| l.late_by_us as f64 / 1000.0).collect();
        tx.execute(
            "INSERT INTO late_events (topic, partition, \"offset\", event_time, late_by_ms)
             SELECT $1, p, o, t, l FROM UNNEST($2::int4[], $3::int8[], $4::timestamptz[], $5::float8[]) AS u(p, o, t, l)
             ON CONFLICT (topic, partition, \"offset\") DO NOTHING",
            &[&topic, &partitions, &offs, &times, &late_by],
        )
        .await
        .map_err(stmt("inserting late events"))?;
    }
    upsert_offsets(&tx, dataflow, sink, topic, offsets).await?;
    tx.commit().await.map_err(stmt("committing raw batch"))?;
    for (table, rows) in [
        ("device_metrics", telemetry_rows),
        ("ai_inference_results", inference_rows),
    ] {
        if rows > 0 {
            SinkRowsWritten {
                sink: "postgres",
                table,
                rows,
                duration: started.elapsed(),
            }
            .emit();
        }
    }
    let mut by_partition: HashMap<i32, u64> = HashMap::new();
    for d in dead {
        *by_partition.entry(d.partition).or_default() += 1;
    }
    for (partition, count) in by_partition {
        DeadLettersWritten {
            topic,
            partition,
            count,
        }
        .emit();
    }
    Ok(())
}

/// Upserts closed windows of every aggregate table and, in the same transaction, the
/// dataflow's committed watermark and the resume offsets of its windows.
pub async fn write_aggregates(
    client: &mut Client,
    dataflow: &str,
    sink: &str,
    topic: &str,
    rows: &[AggRow],
    committed_watermark_us: i64,
    offsets: &[PartitionOffset],
) -> Result<(), PostgresError> {
    let started = Instant::now();
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning aggregate batch"))?;
    // A window updated by a late event can appear more than once: the last row wins (one
    // upsert statement must not touch a row twice).
    let rows = latest_rows(rows);
    let rows = rows.as_slice();
    // Table -> rows, so each table gets one batched upsert.
    let mut metrics: BTreeMap<&'static str, Vec<&MetricAggRow>> = BTreeMap::new();
    let mut inference: BTreeMap<&'static str, Vec<&InferenceStatsRow>> = BTreeMap::new();
    let mut routing: BTreeMap<&'static str, Vec<&RoutingStatsRow>> = BTreeMap::new();
    for r in rows {
        match &r.row {
            Agg::Metrics(m) => metrics.entry(r.table()).or_default().push(m),
            Agg::Inference(i) => inference.entry(r.table()).or_default().push(i),
            Agg::Routing(x) => routing.entry(r.table()).or_default().push(x),
        }
    }
    for (table, rows) in &metrics {
        upsert_metrics(&tx, table, rows).await?;
    }
    for (table, rows) in &inference {
        upsert_inference_stats(&tx, table, rows).await?;
    }
    for (table, rows) in &routing {
        upsert_routing_stats(&tx, table, rows).await?;
    }
    tx.execute(
        "INSERT INTO dataflow_state (dataflow, committed_watermark_us, updated_at) VALUES ($1, $2, now())
         ON CONFLICT (dataflow) DO UPDATE SET committed_watermark_us = EXCLUDED.committed_watermark_us, updated_at = now()",
        &[&dataflow, &committed_watermark_us],
    )
    .await
    .map_err(stmt("storing the committed watermark"))?;
    upsert_offsets(&tx, dataflow, sink, topic, offsets).await?;
    tx.commit()
        .await
        .map_err(stmt("committing aggregate batch"))?;
    let written = metrics
        .iter()
        .map(|(t, r)| (*t, r.len()))
        .chain(inference.iter().map(|(t, r)| (*t, r.len())))
        .chain(routing.iter().map(|(t, r)| (*t, r.len())));
    for (table, n) in written {
        SinkRowsWritten {
            sink: "postgres",
            table,
            rows: n as u64,
            duration: started.elapsed(),
        }
        .emit();
    }
    Ok(())
}

async fn upsert_metrics(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&MetricAggRow],
) -> Result<(), PostgresError> {
    if rows.is_empty() {
        return Ok(());
    }
    let buckets: Vec<DateTime<Utc>> = rows.iter().map(|r| time(r.bucket_us)).collect();
    let devices: Vec<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
    let metrics: Vec<&str> = rows.iter().map(|r| r.metric_name.as_str()).collect();
    let counts: Vec<i64> = rows.iter().map(|r| r.count).collect();
    let sums: Vec<f64> = rows.iter().map(|r| r.sum).collect();
    let mins: Vec<f64> = rows.iter().map(|r| r.min).collect();
    let maxs: Vec<f64> = rows.iter().map(|r| r.max).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, device_id, metric_name, count, sum, min, max, avg)
         SELECT b, d, m, c, s, mn, mx, s / c
         FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::int8[], $5::float8[], $6::float8[], $7::float8[])
           AS u(b, d, m, c, s, mn, mx)
         ON CONFLICT (device_id, metric_name, bucket) DO UPDATE
           SET count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min,
               max = EXCLUDED.max, avg = EXCLUDED.avg"),
        &[&buckets, &devices, &metrics, &counts, &sums, &mins, &maxs],
    )
    .await
    .map_err(stmt("upserting device metrics windows"))?;
    Ok(())
}

async fn upsert_inference_stats(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&InferenceStatsRow],
) -> Result<(), PostgresError> {
    if rows.is_empty() {
        return Ok(());
    }
    let buckets: Vec<DateTime<Utc>> = rows.iter().map(|r| time(r.bucket_us)).collect();
    let models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    let sources: Vec<&str> = rows.iter().map(|r| r.source.as_str()).collect();
    let counts: Vec<i64> = rows.iter().map(|r| r.count).collect();
    let errors: Vec<i64> = rows.iter().map(|r| r.errors).collect();
    let p50: Vec<f64> = rows.iter().map(|r| r.latency_p50_ms).collect();
    let p95: Vec<f64> = rows.iter().map(|r| r.latency_p95_ms).collect();
    let p99: Vec<f64> = rows.iter().map(|r| r.latency_p99_ms).collect();
    let input: Vec<f64> = rows.iter().map(|r| r.avg_input_tokens).collect();
    let output: Vec<f64> = rows.iter().map(|r| r.avg_output_tokens).collect();
    let tps: Vec<Option<f64>> = rows.iter().map(|r| r.output_tokens_per_s).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, model_name, source, count, errors, latency_p50_ms, latency_p95_ms,
                                         latency_p99_ms, avg_input_tokens, avg_output_tokens, output_tokens_per_s)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::float8[],
                              $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[])
         ON CONFLICT (model_name, source, bucket) DO UPDATE
           SET count = EXCLUDED.count, errors = EXCLUDED.errors, latency_p50_ms = EXCLUDED.latency_p50_ms,
               latency_p95_ms = EXCLUDED.latency_p95_ms, latency_p99_ms = EXCLUDED.latency_p99_ms,
               avg_input_tokens = EXCLUDED.avg_input_tokens, avg_output_tokens = EXCLUDED.avg_output_tokens,
               output_tokens_per_s = EXCLUDED.output_tokens_per_s"),
        &[&buckets, &models, &sources, &counts, &errors, &p50, &p95, &p99, &input, &output, &tps],
    )
    .await
    .map_err(stmt("upserting inference statistics windows"))?;
    Ok(())
}

async fn upsert_routing_stats(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&RoutingStatsRow],
) -> Result<(), PostgresError> {
    if rows.is_empty() {
        return Ok(());
    }
    let buckets: Vec<DateTime<Utc>> = rows.iter().map(|r| time(r.bucket_us)).collect();
    let slices: Vec<&str> = rows.iter().map(|r| r.routing_strategy.as_str()).collect();
    let edge: Vec<i64> = rows.iter().map(|r| r.edge_requests).collect();
    let cloud: Vec<i64> = rows.iter().map(|r| r.cloud_requests).collect();
    let share: Vec<f64> = rows.iter().map(|r| r.edge_share).collect();
    let fallback: Vec<Option<f64>> = rows.iter().map(|r| r.cloud_fallback_rate).collect();
    let edge_ok: Vec<Option<f64>> = rows.iter().map(|r| r.edge_success_rate).collect();
    let cloud_ok: Vec<Option<f64>> = rows.iter().map(|r| r.cloud_success_rate).collect();
    let edge_p95: Vec<Option<f64>> = rows.iter().map(|r| r.edge_p95_ms).collect();
    let cloud_p95: Vec<Option<f64>> = rows.iter().map(|r| r.cloud_p95_ms).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, routing_strategy, edge_requests, cloud_requests, edge_share,
                                       cloud_fallback_rate, edge_success_rate, cloud_success_rate, edge_p95_ms, cloud_p95_ms)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::int8[], $4::int8[], $5::float8[], $6::float8[],
                              $7::float8[], $8::float8[], $9::float8[], $10::float8[])
         ON CONFLICT (routing_strategy, bucket) DO UPDATE
           SET edge_requests = EXCLUDED.edge_requests, cloud_requests = EXCLUDED.cloud_requests,
               edge_share = EXCLUDED.edge_share, cloud_fallback_rate = EXCLUDED.cloud_fallback_rate,
               edge_success_rate = EXCLUDED.edge_success_rate, cloud_success_rate = EXCLUDED.cloud_success_rate,
               edge_p95_ms = EXCLUDED.edge_p95_ms, cloud_p95_ms = EXCLUDED.cloud_p95_ms"),
        &[&buckets, &slices, &edge, &cloud, &share, &fallback, &edge_ok, &cloud_ok, &edge_p95, &cloud_p95],
    )
    .await
    .map_err(stmt("upserting routing statistics windows"))?;
    Ok(())
}

/// Stores resume offsets of a sink whose data lives outside PostgreSQL (Parquet), after that
/// data is durable.
pub async fn commit_offsets(
    client: &mut Client,
    dataflow: &str,
    sink: &str,
    topic: &str,
    offsets: &[PartitionOffset],
) -> Result<(), PostgresError> {
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning offset commit"))?;
    upsert_offsets(&tx, dataflow, sink, topic, offsets).await?;
    tx.commit().await.map_err(stmt("committing offsets"))
}
