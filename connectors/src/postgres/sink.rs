//! The PostgreSQL sink's runtime: connection, migrations, transactional writes.

use std::collections::HashMap;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::pin_mut;
use primespark_schemas::ddl::{MIGRATIONS, TIMESCALE_SETUP};
use primespark_schemas::rows::{DeadLetterRow, MetricAggRow, PartitionOffset, TelemetryRow};
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
pub async fn write_raw(
    client: &mut Client,
    dataflow: &str,
    sink: &str,
    topic: &str,
    rows: &[TelemetryRow],
    dead: &[DeadLetterRow],
    offsets: &[PartitionOffset],
) -> Result<(), PostgresError> {
    let started = Instant::now();
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning raw batch"))?;
    if !rows.is_empty() {
        let copy = tx
            .copy_in("COPY device_metrics (time, device_id, metric_name, value) FROM STDIN (FORMAT binary)")
            .await
            .map_err(stmt("starting COPY into device_metrics"))?;
        let writer = BinaryCopyInWriter::new(
            copy,
            &[Type::TIMESTAMPTZ, Type::TEXT, Type::TEXT, Type::FLOAT8],
        );
        pin_mut!(writer);
        for r in rows {
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
    upsert_offsets(&tx, dataflow, sink, topic, offsets).await?;
    tx.commit().await.map_err(stmt("committing raw batch"))?;
    SinkRowsWritten {
        sink: "postgres",
        table: "device_metrics",
        rows: rows.len() as u64,
        duration: started.elapsed(),
    }
    .emit();
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

/// Upserts closed windows and, in the same transaction, the dataflow's committed watermark and
/// the resume offsets of its windows.
pub async fn write_aggregates(
    client: &mut Client,
    dataflow: &str,
    sink: &str,
    topic: &str,
    rows: &[MetricAggRow],
    committed_watermark_us: i64,
    offsets: &[PartitionOffset],
) -> Result<(), PostgresError> {
    let started = Instant::now();
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning aggregate batch"))?;
    if !rows.is_empty() {
        let buckets: Vec<DateTime<Utc>> = rows.iter().map(|r| time(r.bucket_us)).collect();
        let devices: Vec<&str> = rows.iter().map(|r| r.device_id.as_str()).collect();
        let metrics: Vec<&str> = rows.iter().map(|r| r.metric_name.as_str()).collect();
        let counts: Vec<i64> = rows.iter().map(|r| r.count).collect();
        let sums: Vec<f64> = rows.iter().map(|r| r.sum).collect();
        let mins: Vec<f64> = rows.iter().map(|r| r.min).collect();
        let maxs: Vec<f64> = rows.iter().map(|r| r.max).collect();
        tx.execute(
            "INSERT INTO device_metrics_1m (bucket, device_id, metric_name, count, sum, min, max, avg)
             SELECT b, d, m, c, s, mn, mx, s / c
             FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::int8[], $5::float8[], $6::float8[], $7::float8[])
               AS u(b, d, m, c, s, mn, mx)
             ON CONFLICT (device_id, metric_name, bucket) DO UPDATE
               SET count = EXCLUDED.count, sum = EXCLUDED.sum, min = EXCLUDED.min,
                   max = EXCLUDED.max, avg = EXCLUDED.avg",
            &[&buckets, &devices, &metrics, &counts, &sums, &mins, &maxs],
        )
        .await
        .map_err(stmt("upserting device_metrics_1m"))?;
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
    if !rows.is_empty() {
        SinkRowsWritten {
            sink: "postgres",
            table: "device_metrics_1m",
            rows: rows.len() as u64,
            duration: started.elapsed(),
        }
        .emit();
    }
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
