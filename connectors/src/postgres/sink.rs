//! The PostgreSQL sink's runtime: connection, migrations, transactional writes.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::pin_mut;
use primespark_schemas::analytics::{AnalyticsEvent, TaskEvent, TaskEventKind};
use primespark_schemas::ddl::{seed_views, timescale_setup, MIGRATIONS};
use primespark_schemas::rows::{
    latest_rows, AgentLoadRow, Agg, AggRow, ApiEventsRow, DeadLetterRow, InferenceStatsRow,
    LateEventRow, MetricAggRow, PartitionOffset, RawRow, RoutingStatsRow, ScoreRow,
    TaskStateChange, TaskStatsRow,
};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use tokio_postgres::{Client, Transaction};

use crate::metrics::{DeadLettersWritten, SinkRowsWritten};
use crate::sink::fence::Fence;

/// PostgreSQL failures.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// Connecting failed (the service may be down: retry).
    #[error("connecting to PostgreSQL: {}", super::tls::error_chain(.0))]
    Connect(tokio_postgres::Error),
    /// The connection string's TLS settings cannot work (a setting: stop).
    #[error("postgres.url: {0}")]
    Settings(#[source] super::tls::PgTlsError),
    /// A statement failed.
    #[error("{what}: {source}")]
    Statement {
        /// What we were doing.
        what: &'static str,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A stored row cannot be turned back into its type (written by another version or edited
    /// by hand): someone must fix or remove the row.
    #[error("{0}")]
    InvalidRow(String),
    /// A test's failpoint failed the statement (see `crate::failpoint`).
    #[error("{0}")]
    Injected(String),
    /// The writer lease check refused the transaction (see `crate::sink::fence`).
    #[error(transparent)]
    Fenced(Box<crate::sink::SinkError>),
}

/// Fails with [`PostgresError::Injected`] where a test armed the failpoint `name`.
fn failpoint(name: &'static str) -> Result<(), PostgresError> {
    crate::failpoint::hit(name).map_err(|e| PostgresError::Injected(e.to_string()))
}

/// The writer lease check at the start of a commit transaction: its row stays locked until
/// the transaction ends.
async fn fence_in(
    fence: &Fence,
    tx: &tokio_postgres::Transaction<'_>,
    dataflow: &str,
) -> Result<(), PostgresError> {
    fence
        .check_in(tx, dataflow)
        .await
        .map_err(|e| PostgresError::Fenced(Box::new(e)))
}

pub(super) fn stmt(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PostgresError {
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
    let target = super::tls::PgTarget::parse(url).map_err(PostgresError::Settings)?;
    target.connect().await.map_err(PostgresError::Connect)
}

/// Applies pending migrations (idempotent; serialized across processes by an advisory lock) and,
/// when the server can run the `timescaledb` extension, makes the time-series tables
/// hypertables (see `timescale_decision` for when it tries). Plain tables otherwise, with a
/// log line saying why.
///
/// On a server where TimescaleDB is installed but not preloaded, `CREATE EXTENSION` is a FATAL
/// that ends the connection, so it is never attempted there. If setting it up fails anyway, the
/// migrations (already committed) stay and the tables stay plain; if that failure ended the
/// connection, `client` is closed ([`Client::is_closed`]) when this returns [`Backend::Plain`],
/// and a caller that still needs it must connect again.
pub async fn migrate(client: &mut Client) -> Result<Backend, PostgresError> {
    apply_migrations(client).await?;
    let probe = probe_timescale(client).await?;
    let decision = timescale_decision(probe.created, probe.available, probe.preloaded);
    let backend = match decision {
        TimescaleDecision::Plain(why) => {
            why.log();
            Backend::Plain
        }
        TimescaleDecision::Use | TimescaleDecision::Create => match setup_timescale(client).await {
            Ok(()) => {
                tracing::info!(
                    created = decision == TimescaleDecision::Create,
                    "timescaledb found: device_metrics is a hypertable"
                );
                Backend::Timescale
            }
            Err(e) if client.is_closed() => {
                tracing::warn!(error = %e, "setting up timescaledb ended the connection: plain tables (the migration client is closed)");
                Backend::Plain
            }
            Err(e) => {
                tracing::warn!(error = %e, "timescaledb is available but could not be set up; using plain tables");
                Backend::Plain
            }
        },
    };
    Ok(backend)
}

/// The migrations in one transaction, under the migration lock.
async fn apply_migrations(client: &mut Client) -> Result<(), PostgresError> {
    let tx = client
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
    for sql in seed_views() {
        tx.batch_execute(&sql)
            .await
            .map_err(stmt("creating the seeds' views"))?;
    }
    tx.commit().await.map_err(stmt("committing migrations"))
}

/// What the server says about TimescaleDB.
#[derive(Debug, Clone, Copy)]
struct TimescaleProbe {
    /// In this database's `pg_extension`.
    created: bool,
    /// In `pg_available_extensions` (its files are installed on the server).
    available: bool,
    /// Loaded at server start (`shared_preload_libraries`).
    preloaded: bool,
}

/// Reads the inputs of [`timescale_decision`] without touching the extension (which would load
/// it). `shared_preload_libraries` comes from `pg_settings`, not `SHOW`: only superusers and
/// `pg_read_all_settings` may see it, and `SHOW` is an error for anyone else where `pg_settings`
/// just has no row. Without the row, the loader's own setting `timescaledb.disable_load`
/// answers: it exists only when the loader was preloaded.
async fn probe_timescale(client: &Client) -> Result<TimescaleProbe, PostgresError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                    (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'),
                    current_setting('timescaledb.disable_load', true) IS NOT NULL",
            &[],
        )
        .await
        .map_err(stmt("looking for timescaledb"))?;
    let preload_list: Option<String> = row.get(2);
    let loader_present: bool = row.get(3);
    Ok(TimescaleProbe {
        created: row.get(0),
        available: row.get(1),
        preloaded: preload_list.map_or(loader_present, |l| preloads_timescaledb(&l)),
    })
}

/// Whether a `shared_preload_libraries` value (`'pg_stat_statements, timescaledb'`,
/// `'$libdir/timescaledb.so'`, ...) names TimescaleDB's loader.
pub(crate) fn preloads_timescaledb(list: &str) -> bool {
    list.split(',')
        .map(|lib| lib.trim().trim_matches('"'))
        .map(|lib| lib.rsplit('/').next().unwrap_or(lib))
        .any(|lib| lib.strip_suffix(".so").unwrap_or(lib) == "timescaledb")
}

/// What [`migrate`] does about TimescaleDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimescaleDecision {
    /// The extension is created in this database and loaded: make the hypertables.
    Use,
    /// Installed and preloaded but not created here yet: `CREATE EXTENSION`, then as `Use`.
    Create,
    /// Plain tables, and why.
    Plain(PlainReason),
}

/// Why the tables stay plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PlainReason {
    /// Not installed on the server.
    NotInstalled,
    /// Installed but not in `shared_preload_libraries`: `CREATE EXTENSION` would be a FATAL.
    NotPreloaded,
    /// Created in this database (so it was preloaded once) but not preloaded now: every call
    /// into it would be that FATAL too.
    CreatedNotPreloaded,
}

impl PlainReason {
    fn log(self) {
        match self {
            PlainReason::NotInstalled => tracing::info!(
                "timescaledb not installed: plain PostgreSQL tables with the same indexes"
            ),
            PlainReason::NotPreloaded => tracing::warn!(
                "timescaledb installed but not preloaded: plain tables (add timescaledb to shared_preload_libraries and restart PostgreSQL to use it)"
            ),
            PlainReason::CreatedNotPreloaded => tracing::warn!(
                "timescaledb is created in this database but not preloaded: plain tables; hypertables refuse writes until timescaledb is in shared_preload_libraries again"
            ),
        }
    }
}

/// Look before you create: whether the extension is `created` in this database, `available`
/// on the server, and `preloaded` decide, without ever running a statement that could end the
/// connection.
pub(crate) fn timescale_decision(
    created: bool,
    available: bool,
    preloaded: bool,
) -> TimescaleDecision {
    match (created, available, preloaded) {
        (true, _, true) => TimescaleDecision::Use,
        (true, _, false) => TimescaleDecision::Plain(PlainReason::CreatedNotPreloaded),
        (false, true, true) => TimescaleDecision::Create,
        (false, true, false) => TimescaleDecision::Plain(PlainReason::NotPreloaded),
        (false, false, _) => TimescaleDecision::Plain(PlainReason::NotInstalled),
    }
}

/// `CREATE EXTENSION IF NOT EXISTS timescaledb` and the hypertables, in one transaction under
/// the migration lock (so cluster processes do not race), after the migrations committed.
async fn setup_timescale(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7262)", &[])
        .await?;
    for sql in timescale_setup() {
        tx.batch_execute(&sql).await?;
    }
    tx.commit().await
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

/// JSON text sent as `jsonb` (or `json`) without parsing it here: the server validates it, so
/// text that is not JSON fails the statement instead of panicking.
#[derive(Debug, Clone, Copy)]
struct JsonText<'a>(&'a str);

impl ToSql for JsonText<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary form is a version byte (1) followed by the text; json's is the text.
        if *ty == Type::JSONB {
            out.extend_from_slice(&[1]);
        }
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }

    to_sql_checked!();
}

/// The kind of a stored `task_state` row, or an error naming the row.
fn stored_kind(dataflow: &str, task_id: &str, kind: &str) -> Result<TaskEventKind, PostgresError> {
    TaskEventKind::from_event_type(kind).ok_or_else(|| {
        PostgresError::InvalidRow(format!(
            "task_state row (dataflow \"{dataflow}\", task_id \"{task_id}\", kind \"{kind}\"): \
             kind is not a task lifecycle type (task_created, task_assigned, task_started, \
             task_completed, task_failed)"
        ))
    })
}

/// Loads the task lifecycle join's state of `dataflow` (the `task_state` rows committed with
/// its windows), ordered by task and kind, so a restarted dataflow rebuilds the join exactly.
/// A row whose `kind` is not a task lifecycle type is an error naming the row.
pub async fn load_task_state(
    client: &Client,
    dataflow: &str,
) -> Result<Vec<TaskEvent>, PostgresError> {
    let rows = client
        .query(
            "SELECT task_id, kind, time, task_type, priority, agent_id FROM task_state
             WHERE dataflow = $1 ORDER BY task_id, kind",
            &[&dataflow],
        )
        .await
        .map_err(stmt("reading task_state"))?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let task_id: String = row.try_get(0).map_err(stmt("reading task_state"))?;
        let kind: String = row.try_get(1).map_err(stmt("reading task_state"))?;
        let at: DateTime<Utc> = row.try_get(2).map_err(stmt("reading task_state"))?;
        let kind = stored_kind(dataflow, &task_id, &kind)?;
        events.push(TaskEvent {
            kind,
            task_id,
            task_type: row.try_get(3).map_err(stmt("reading task_state"))?,
            priority: row.try_get(4).map_err(stmt("reading task_state"))?,
            agent_id: row.try_get(5).map_err(stmt("reading task_state"))?,
            time_us: at.timestamp_micros(),
        });
    }
    Ok(events)
}

async fn upsert_offsets(
    tx: &Transaction<'_>,
    dataflow: &str,
    sink: &str,
    topic: &str,
    offsets: &[PartitionOffset],
    monotonic: bool,
) -> Result<(), PostgresError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = offsets.iter().map(|o| o.partition).collect();
    let next: Vec<i64> = offsets.iter().map(|o| o.next_offset).collect();
    let wm: Vec<i64> = offsets.iter().map(|o| o.max_event_us).collect();
    // A raw sink's position only moves forward: a batch of records replayed for another sink
    // (below this sink's position) must not move it back, or the next restart would store
    // them twice.
    let sql = if monotonic {
        "INSERT INTO source_offsets (dataflow, sink, topic, partition, next_offset, watermark_us, updated_at)
         SELECT $1, $2, $3, p, n, w, now() FROM UNNEST($4::int4[], $5::int8[], $6::int8[]) AS u(p, n, w)
         ON CONFLICT (dataflow, sink, topic, partition) DO UPDATE
           SET next_offset = GREATEST(source_offsets.next_offset, EXCLUDED.next_offset),
               watermark_us = EXCLUDED.watermark_us, updated_at = now()"
    } else {
        "INSERT INTO source_offsets (dataflow, sink, topic, partition, next_offset, watermark_us, updated_at)
         SELECT $1, $2, $3, p, n, w, now() FROM UNNEST($4::int4[], $5::int8[], $6::int8[]) AS u(p, n, w)
         ON CONFLICT (dataflow, sink, topic, partition) DO UPDATE
           SET next_offset = EXCLUDED.next_offset, watermark_us = EXCLUDED.watermark_us, updated_at = now()"
    };
    tx.execute(sql, &[&dataflow, &sink, &topic, &partitions, &next, &wm])
        .await
        .map_err(stmt("storing source offsets"))?;
    Ok(())
}

/// Copies anomaly scores into `anomaly_scores`, and the anomalies among them (with the
/// metrics the model saw) into `anomalies`. Returns how many anomalies.
async fn copy_scores(
    tx: &tokio_postgres::Transaction<'_>,
    scores: &[&ScoreRow],
) -> Result<u64, PostgresError> {
    if scores.is_empty() {
        return Ok(0);
    }
    let copy = tx
        .copy_in(
            "COPY anomaly_scores (time, device_id, model, score, anomaly, backend) FROM STDIN (FORMAT binary)",
        )
        .await
        .map_err(stmt("starting COPY into anomaly_scores"))?;
    let writer = BinaryCopyInWriter::new(
        copy,
        &[
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TEXT,
            Type::FLOAT4,
            Type::BOOL,
            Type::TEXT,
        ],
    );
    pin_mut!(writer);
    for r in scores {
        writer
            .as_mut()
            .write(&[
                &time(r.time_us),
                &&*r.device_id,
                &&*r.model,
                &r.score,
                &r.is_anomaly(),
                &&*r.backend,
            ])
            .await
            .map_err(stmt("copying into anomaly_scores"))?;
    }
    writer
        .finish()
        .await
        .map_err(stmt("finishing COPY into anomaly_scores"))?;
    let anomalies: Vec<&&ScoreRow> = scores.iter().filter(|r| r.is_anomaly()).collect();
    if anomalies.is_empty() {
        return Ok(0);
    }
    let copy = tx
        .copy_in(
            "COPY anomalies (time, device_id, model, score, threshold, features) FROM STDIN (FORMAT binary)",
        )
        .await
        .map_err(stmt("starting COPY into anomalies"))?;
    let writer = BinaryCopyInWriter::new(
        copy,
        &[
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TEXT,
            Type::FLOAT4,
            Type::FLOAT4,
            Type::JSONB,
        ],
    );
    pin_mut!(writer);
    for r in &anomalies {
        let features: serde_json::Map<String, serde_json::Value> = r
            .features
            .iter()
            .map(|m| (m.name.clone(), serde_json::Value::from(m.value)))
            .collect();
        let features = serde_json::Value::Object(features);
        writer
            .as_mut()
            .write(&[
                &time(r.time_us),
                &&*r.device_id,
                &&*r.model,
                &r.score,
                &r.threshold,
                &features,
            ])
            .await
            .map_err(stmt("copying into anomalies"))?;
    }
    writer
        .finish()
        .await
        .map_err(stmt("finishing COPY into anomalies"))?;
    Ok(anomalies.len() as u64)
}

/// Rows COPYed per table by [`copy_raw`].
#[derive(Debug, Default, Clone, Copy)]
struct Copied {
    telemetry: u64,
    inference: u64,
    analytics: u64,
    scores: u64,
    anomalies: u64,
}

/// COPYs raw rows of every stream (and scores with their anomalies) inside `tx`.
/// `rows` are owned or borrowed (`&[RawRow]` or `&[&RawRow]`): the sink borrows them from the
/// batch, so no row is copied on its way to the database.
async fn copy_raw<R: Borrow<RawRow> + Sync>(
    tx: &Transaction<'_>,
    rows: &[R],
) -> Result<Copied, PostgresError> {
    let telemetry = rows.iter().filter_map(|r| match r.borrow() {
        RawRow::Telemetry(t) => Some(t),
        _ => None,
    });
    let inference = rows.iter().filter_map(|r| match r.borrow() {
        RawRow::Inference(i) => Some(&**i),
        _ => None,
    });
    let analytics = rows.iter().filter_map(|r| match r.borrow() {
        RawRow::Analytics(a) => Some(&**a),
        _ => None,
    });
    let scores: Vec<&ScoreRow> = rows
        .iter()
        .filter_map(|r| match r.borrow() {
            RawRow::Score(s) => Some(&**s),
            _ => None,
        })
        .collect();
    let (mut telemetry_rows, mut inference_rows, mut analytics_rows) = (0u64, 0u64, 0u64);
    if rows
        .iter()
        .any(|r| matches!(r.borrow(), RawRow::Telemetry(_)))
    {
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
                .write(&[&time(r.time_us), &&*r.device_id, &&*r.metric_name, &r.value])
                .await
                .map_err(stmt("copying into device_metrics"))?;
        }
        writer
            .finish()
            .await
            .map_err(stmt("finishing COPY into device_metrics"))?;
    }
    if rows
        .iter()
        .any(|r| matches!(r.borrow(), RawRow::Inference(_)))
    {
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
    if rows
        .iter()
        .any(|r| matches!(r.borrow(), RawRow::Analytics(_)))
    {
        let copy = tx
            .copy_in(
                "COPY analytics_events (time, event_type, task_id, task_type, priority, agent_id, endpoint, \
                 user_id, data) FROM STDIN (FORMAT binary)",
            )
            .await
            .map_err(stmt("starting COPY into analytics_events"))?;
        let writer = BinaryCopyInWriter::new(
            copy,
            &[
                Type::TIMESTAMPTZ,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::TEXT,
                Type::JSONB,
            ],
        );
        pin_mut!(writer);
        let none: Option<&str> = None;
        for r in analytics {
            analytics_rows += 1;
            match &r.event {
                AnalyticsEvent::Task(e) => {
                    writer
                        .as_mut()
                        .write(&[
                            &time(e.time_us),
                            &e.kind.as_str(),
                            &e.task_id,
                            &e.task_type,
                            &e.priority,
                            &e.agent_id,
                            &none,
                            &none,
                            &None::<JsonText<'_>>,
                        ])
                        .await
                }
                AnalyticsEvent::Api(e) => {
                    writer
                        .as_mut()
                        .write(&[
                            &time(e.time_us),
                            &e.event_type,
                            &none,
                            &none,
                            &none,
                            &none,
                            &e.endpoint,
                            &e.user_id,
                            &e.data.as_deref().map(JsonText),
                        ])
                        .await
                }
            }
            .map_err(stmt("copying into analytics_events"))?;
        }
        writer
            .finish()
            .await
            .map_err(stmt("finishing COPY into analytics_events"))?;
    }
    let anomalies = copy_scores(tx, &scores).await?;
    Ok(Copied {
        telemetry: telemetry_rows,
        inference: inference_rows,
        analytics: analytics_rows,
        scores: scores.len() as u64,
        anomalies,
    })
}

impl PostgresError {
    /// PostgreSQL refused the data itself (SQLSTATE class 22, data exception, or 23, integrity
    /// constraint violation): the same rows fail again however often they are retried, so the
    /// records at fault must leave the batch ([`rejected_records`]).
    pub fn is_rejected_data(&self) -> bool {
        let PostgresError::Statement { source, .. } = self else {
            return false;
        };
        source
            .code()
            .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
    }
}

/// A record PostgreSQL refused: its position and the database's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// PostgreSQL's message and SQLSTATE.
    pub reason: String,
}

/// The records among `rows` whose rows PostgreSQL refuses, found by bisection in a transaction
/// that is rolled back: each half of a failing group is tried in a savepoint, groups that pass
/// stay (so a record refused only next to an earlier one, such as a unique violation, is still
/// found), until single records are left. `k` bad records among `n` cost about `k log n`
/// COPYs. Empty when the rows pass together (the failure was not the data's).
pub async fn rejected_records<R: Borrow<RawRow> + Sync>(
    client: &mut Client,
    rows: &[R],
) -> Result<Vec<Rejected>, PostgresError> {
    // A record's rows (a telemetry record's points and their scores) stand or fall together.
    let mut by_record: BTreeMap<(i32, i64), Vec<&RawRow>> = BTreeMap::new();
    for r in rows {
        let r = r.borrow();
        by_record.entry(r.position()).or_default().push(r);
    }
    let records: Vec<((i32, i64), Vec<&RawRow>)> = by_record.into_iter().collect();
    let mut tx = client
        .transaction()
        .await
        .map_err(stmt("beginning the search for refused records"))?;
    let mut rejected = Vec::new();
    // Ranges still to try, the leftmost on top: earlier records are settled first.
    let mut pending: Vec<std::ops::Range<usize>> = Vec::new();
    pending.push(0..records.len());
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        let group: Vec<&RawRow> = records[range.clone()]
            .iter()
            .flat_map(|(_, rows)| rows.iter().copied())
            .collect();
        failpoint("postgres.bisect")?;
        let sp = tx
            .savepoint("probe")
            .await
            .map_err(stmt("setting a savepoint"))?;
        match copy_raw(&sp, &group).await {
            Ok(_) => sp.commit().await.map_err(stmt("releasing a savepoint"))?,
            Err(e) if e.is_rejected_data() => {
                sp.rollback()
                    .await
                    .map_err(stmt("rolling back a savepoint"))?;
                // ROLLBACK TO keeps the savepoint: release it, or they nest with every probe.
                tx.batch_execute("RELEASE SAVEPOINT probe")
                    .await
                    .map_err(stmt("releasing a savepoint"))?;
                if range.len() == 1 {
                    let ((partition, offset), _) = &records[range.start];
                    rejected.push(Rejected {
                        partition: *partition,
                        offset: *offset,
                        reason: db_reason(&e),
                    });
                } else {
                    let mid = range.start + range.len() / 2;
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                }
            }
            Err(e) => return Err(e),
        }
    }
    tx.rollback()
        .await
        .map_err(stmt("ending the search for refused records"))?;
    Ok(rejected)
}

/// PostgreSQL's own message and SQLSTATE, for a dead letter.
fn db_reason(e: &PostgresError) -> String {
    match e {
        PostgresError::Statement { what, source } => match source.as_db_error() {
            Some(db) => format!("{what}: {} (SQLSTATE {})", db.message(), db.code().code()),
            None => format!("{what}: {source}"),
        },
        other => other.to_string(),
    }
}

/// TimescaleDB's setting for COPY straight into the columnstore (2.21 and later).
pub const DIRECT_COMPRESS_COPY: &str = "timescaledb.enable_direct_compress_copy";

/// Whether the database behind `client` has [`DIRECT_COMPRESS_COPY`] (a TimescaleDB that knows
/// it, loaded): setting an unknown `timescaledb.*` name is an error, so it is asked first.
pub async fn has_direct_compress_copy(client: &Client) -> Result<bool, PostgresError> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_settings WHERE name = $1)",
            &[&DIRECT_COMPRESS_COPY],
        )
        .await
        .map_err(stmt("asking for direct-to-columnstore COPY"))?;
    Ok(row.get(0))
}

/// Writes raw rows (binary COPY) and dead letters, and stores `offsets` for `sink`, in one
/// transaction: after a crash either all of it is there or none. With `direct_compress` (see
/// [`has_direct_compress_copy`]) the COPYs go straight into TimescaleDB's columnstore.
// Everything of one transaction is passed explicitly, so the atomicity is visible here.
#[allow(clippy::too_many_arguments)]
pub async fn write_raw<R: Borrow<RawRow> + Sync>(
    client: &mut Client,
    dataflow: &str,
    sink: &str,
    topic: &str,
    rows: &[R],
    dead: &[DeadLetterRow],
    late: &[LateEventRow],
    offsets: &[PartitionOffset],
    fence: &Fence,
    direct_compress: bool,
) -> Result<(), PostgresError> {
    let started = Instant::now();
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning raw batch"))?;
    fence_in(fence, &tx, dataflow).await?;
    if direct_compress {
        // For this transaction only: its COPYs write compressed batches into the columnstore.
        tx.batch_execute(&format!("SET LOCAL {DIRECT_COMPRESS_COPY} = on"))
            .await
            .map_err(stmt("turning on direct-to-columnstore COPY"))?;
    }
    let copied = copy_raw(&tx, rows).await?;
    if !dead.is_empty() {
        let partitions: Vec<i32> = dead.iter().map(|d| d.partition).collect();
        let offs: Vec<i64> = dead.iter().map(|d| d.offset).collect();
        // Whoever made a letter, a NUL in its text must not make the letter itself refused.
        let text = |s: &str| s.replace('\0', "\\u0000");
        let reasons: Vec<String> = dead.iter().map(|d| text(&d.reason)).collect();
        let errors: Vec<String> = dead.iter().map(|d| text(&d.error)).collect();
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
    upsert_offsets(&tx, dataflow, sink, topic, offsets, true).await?;
    failpoint("postgres.raw_before_commit")?;
    tx.commit().await.map_err(stmt("committing raw batch"))?;
    for (table, rows) in [
        ("device_metrics", copied.telemetry),
        ("ai_inference_results", copied.inference),
        ("analytics_events", copied.analytics),
        ("anomaly_scores", copied.scores),
        ("anomalies", copied.anomalies),
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

/// Upserts closed windows of every aggregate table, applies the task lifecycle join's state
/// changes (`task_state`: keeps first, then retires) and, in the same transaction, the
/// dataflow's committed watermark and the resume offsets of its windows (`None` and no
/// offsets for a backfill: it stores no resume state).
// Everything of one transaction is passed explicitly, as in `write_raw`.
#[allow(clippy::too_many_arguments)]
pub async fn write_aggregates(
    client: &mut Client,
    dataflow: &str,
    sink: &str,
    topic: &str,
    rows: &[AggRow],
    committed_watermark_us: Option<i64>,
    offsets: &[PartitionOffset],
    fence: &Fence,
) -> Result<(), PostgresError> {
    let started = Instant::now();
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning aggregate batch"))?;
    fence_in(fence, &tx, dataflow).await?;
    // A window updated by a late event can appear more than once: the last row wins (one
    // upsert statement must not touch a row twice).
    let rows = latest_rows(rows);
    let rows = rows.as_slice();
    // Table -> rows, so each table gets one batched upsert.
    let mut metrics: BTreeMap<&'static str, Vec<&MetricAggRow>> = BTreeMap::new();
    let mut inference: BTreeMap<&'static str, Vec<&InferenceStatsRow>> = BTreeMap::new();
    let mut routing: BTreeMap<&'static str, Vec<&RoutingStatsRow>> = BTreeMap::new();
    let mut tasks: BTreeMap<&'static str, Vec<&TaskStatsRow>> = BTreeMap::new();
    let mut agents: BTreeMap<&'static str, Vec<&AgentLoadRow>> = BTreeMap::new();
    let mut api: BTreeMap<&'static str, Vec<&ApiEventsRow>> = BTreeMap::new();
    let mut keeps: Vec<&TaskEvent> = Vec::new();
    let mut retires: Vec<&str> = Vec::new();
    for r in rows {
        match &r.row {
            Agg::Metrics(m) => metrics.entry(r.table()).or_default().push(m),
            Agg::Inference(i) => inference.entry(r.table()).or_default().push(i),
            Agg::Routing(x) => routing.entry(r.table()).or_default().push(x),
            Agg::Task(t) => tasks.entry(r.table()).or_default().push(t),
            Agg::Agent(a) => agents.entry(r.table()).or_default().push(a),
            Agg::Api(a) => api.entry(r.table()).or_default().push(a),
            Agg::TaskState(TaskStateChange::Keep(e)) => keeps.push(e),
            Agg::TaskState(TaskStateChange::Retire(id)) => retires.push(id),
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
    for (table, rows) in &tasks {
        upsert_task_stats(&tx, table, rows).await?;
    }
    for (table, rows) in &agents {
        upsert_agent_load(&tx, table, rows).await?;
    }
    for (table, rows) in &api {
        upsert_api_events(&tx, table, rows).await?;
    }
    // Keeps before retires: a task kept and retired in one batch is gone afterwards.
    keep_task_state(&tx, dataflow, &keeps).await?;
    retire_task_state(&tx, dataflow, &retires).await?;
    if let Some(committed_watermark_us) = committed_watermark_us {
        tx.execute(
            "INSERT INTO dataflow_state (dataflow, committed_watermark_us, updated_at) VALUES ($1, $2, now())
             ON CONFLICT (dataflow) DO UPDATE SET committed_watermark_us = EXCLUDED.committed_watermark_us, updated_at = now()",
            &[&dataflow, &committed_watermark_us],
        )
        .await
        .map_err(stmt("storing the committed watermark"))?;
    }
    upsert_offsets(&tx, dataflow, sink, topic, offsets, false).await?;
    tx.commit()
        .await
        .map_err(stmt("committing aggregate batch"))?;
    let written = metrics
        .iter()
        .map(|(t, r)| (*t, r.len()))
        .chain(inference.iter().map(|(t, r)| (*t, r.len())))
        .chain(routing.iter().map(|(t, r)| (*t, r.len())))
        .chain(tasks.iter().map(|(t, r)| (*t, r.len())))
        .chain(agents.iter().map(|(t, r)| (*t, r.len())))
        .chain(api.iter().map(|(t, r)| (*t, r.len())))
        .chain(Some(("task_state", keeps.len() + retires.len())).filter(|(_, n)| *n > 0));
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
    let mean: Vec<f64> = rows.iter().map(|r| r.avg_latency_ms).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, model_name, source, count, errors, latency_p50_ms, latency_p95_ms,
                                         latency_p99_ms, avg_input_tokens, avg_output_tokens, output_tokens_per_s,
                                         avg_latency_ms)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::float8[],
                              $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[], $12::float8[])
         ON CONFLICT (model_name, source, bucket) DO UPDATE
           SET count = EXCLUDED.count, errors = EXCLUDED.errors, latency_p50_ms = EXCLUDED.latency_p50_ms,
               latency_p95_ms = EXCLUDED.latency_p95_ms, latency_p99_ms = EXCLUDED.latency_p99_ms,
               avg_input_tokens = EXCLUDED.avg_input_tokens, avg_output_tokens = EXCLUDED.avg_output_tokens,
               output_tokens_per_s = EXCLUDED.output_tokens_per_s, avg_latency_ms = EXCLUDED.avg_latency_ms"),
        &[&buckets, &models, &sources, &counts, &errors, &p50, &p95, &p99, &input, &output, &tps, &mean],
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
    let tried: Vec<i64> = rows.iter().map(|r| r.tried_edge_first).collect();
    let fallbacks: Vec<i64> = rows.iter().map(|r| r.fallbacks).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, routing_strategy, edge_requests, cloud_requests, edge_share,
                                       cloud_fallback_rate, edge_success_rate, cloud_success_rate, edge_p95_ms, cloud_p95_ms,
                                       tried_edge_first, fallbacks)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::int8[], $4::int8[], $5::float8[], $6::float8[],
                              $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::int8[], $12::int8[])
         ON CONFLICT (routing_strategy, bucket) DO UPDATE
           SET edge_requests = EXCLUDED.edge_requests, cloud_requests = EXCLUDED.cloud_requests,
               edge_share = EXCLUDED.edge_share, cloud_fallback_rate = EXCLUDED.cloud_fallback_rate,
               edge_success_rate = EXCLUDED.edge_success_rate, cloud_success_rate = EXCLUDED.cloud_success_rate,
               edge_p95_ms = EXCLUDED.edge_p95_ms, cloud_p95_ms = EXCLUDED.cloud_p95_ms,
               tried_edge_first = EXCLUDED.tried_edge_first, fallbacks = EXCLUDED.fallbacks"),
        &[&buckets, &slices, &edge, &cloud, &share, &fallback, &edge_ok, &cloud_ok, &edge_p95, &cloud_p95, &tried, &fallbacks],
    )
    .await
    .map_err(stmt("upserting routing statistics windows"))?;
    Ok(())
}

async fn upsert_task_stats(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&TaskStatsRow],
) -> Result<(), PostgresError> {
    if rows.is_empty() {
        return Ok(());
    }
    let buckets: Vec<DateTime<Utc>> = rows.iter().map(|r| time(r.bucket_us)).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.task_type.as_str()).collect();
    let created: Vec<i64> = rows.iter().map(|r| r.created).collect();
    let assigned: Vec<i64> = rows.iter().map(|r| r.assigned).collect();
    let started: Vec<i64> = rows.iter().map(|r| r.started).collect();
    let completed: Vec<i64> = rows.iter().map(|r| r.completed).collect();
    let failed: Vec<i64> = rows.iter().map(|r| r.failed).collect();
    let wait_p50: Vec<Option<f64>> = rows.iter().map(|r| r.wait_p50_ms).collect();
    let wait_p95: Vec<Option<f64>> = rows.iter().map(|r| r.wait_p95_ms).collect();
    let run_p50: Vec<Option<f64>> = rows.iter().map(|r| r.run_p50_ms).collect();
    let run_p95: Vec<Option<f64>> = rows.iter().map(|r| r.run_p95_ms).collect();
    let backlog: Vec<i64> = rows.iter().map(|r| r.backlog).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, task_type, created, assigned, started, completed, failed,
                                       wait_p50_ms, wait_p95_ms, run_p50_ms, run_p95_ms, backlog)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                              $7::int8[], $8::float8[], $9::float8[], $10::float8[], $11::float8[], $12::int8[])
         ON CONFLICT (task_type, bucket) DO UPDATE
           SET created = EXCLUDED.created, assigned = EXCLUDED.assigned, started = EXCLUDED.started,
               completed = EXCLUDED.completed, failed = EXCLUDED.failed,
               wait_p50_ms = EXCLUDED.wait_p50_ms, wait_p95_ms = EXCLUDED.wait_p95_ms,
               run_p50_ms = EXCLUDED.run_p50_ms, run_p95_ms = EXCLUDED.run_p95_ms,
               backlog = EXCLUDED.backlog"),
        &[
            &buckets, &types, &created, &assigned, &started, &completed, &failed, &wait_p50,
            &wait_p95, &run_p50, &run_p95, &backlog,
        ],
    )
    .await
    .map_err(stmt("upserting task statistics windows"))?;
    Ok(())
}

async fn upsert_agent_load(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&AgentLoadRow],
) -> Result<(), PostgresError> {
    if rows.is_empty() {
        return Ok(());
    }
    let buckets: Vec<DateTime<Utc>> = rows.iter().map(|r| time(r.bucket_us)).collect();
    let agents: Vec<&str> = rows.iter().map(|r| r.agent_id.as_str()).collect();
    let assigned: Vec<i64> = rows.iter().map(|r| r.assigned).collect();
    let completed: Vec<i64> = rows.iter().map(|r| r.completed).collect();
    let failed: Vec<i64> = rows.iter().map(|r| r.failed).collect();
    let active: Vec<i64> = rows.iter().map(|r| r.active).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, agent_id, assigned, completed, failed, active)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])
         ON CONFLICT (agent_id, bucket) DO UPDATE
           SET assigned = EXCLUDED.assigned, completed = EXCLUDED.completed,
               failed = EXCLUDED.failed, active = EXCLUDED.active"),
        &[&buckets, &agents, &assigned, &completed, &failed, &active],
    )
    .await
    .map_err(stmt("upserting agent load windows"))?;
    Ok(())
}

async fn upsert_api_events(
    tx: &Transaction<'_>,
    table: &str,
    rows: &[&ApiEventsRow],
) -> Result<(), PostgresError> {
    if rows.is_empty() {
        return Ok(());
    }
    let buckets: Vec<DateTime<Utc>> = rows.iter().map(|r| time(r.bucket_us)).collect();
    let types: Vec<&str> = rows.iter().map(|r| r.event_type.as_str()).collect();
    let endpoints: Vec<&str> = rows.iter().map(|r| r.endpoint.as_str()).collect();
    let counts: Vec<i64> = rows.iter().map(|r| r.count).collect();
    let users: Vec<i64> = rows.iter().map(|r| r.distinct_users).collect();
    let anonymous: Vec<i64> = rows.iter().map(|r| r.anonymous).collect();
    tx.execute(
        &format!("INSERT INTO {table} (bucket, event_type, endpoint, count, distinct_users, anonymous)
         SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[])
         ON CONFLICT (event_type, endpoint, bucket) DO UPDATE
           SET count = EXCLUDED.count, distinct_users = EXCLUDED.distinct_users,
               anonymous = EXCLUDED.anonymous"),
        &[&buckets, &types, &endpoints, &counts, &users, &anonymous],
    )
    .await
    .map_err(stmt("upserting API event windows"))?;
    Ok(())
}

/// Stores the first event of each kind of each task; an event of a kind already stored is
/// ignored (the first one wins, also within `events`).
async fn keep_task_state(
    tx: &Transaction<'_>,
    dataflow: &str,
    events: &[&TaskEvent],
) -> Result<(), PostgresError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    let events: Vec<&TaskEvent> = events
        .iter()
        .copied()
        .filter(|e| seen.insert((e.task_id.as_str(), e.kind)))
        .collect();
    let ids: Vec<&str> = events.iter().map(|e| e.task_id.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| time(e.time_us)).collect();
    let types: Vec<Option<&str>> = events.iter().map(|e| e.task_type.as_deref()).collect();
    let priorities: Vec<Option<&str>> = events.iter().map(|e| e.priority.as_deref()).collect();
    let agents: Vec<Option<&str>> = events.iter().map(|e| e.agent_id.as_deref()).collect();
    tx.execute(
        "INSERT INTO task_state (dataflow, task_id, kind, time, task_type, priority, agent_id)
         SELECT $1, i, k, t, ty, p, a
         FROM UNNEST($2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[])
           AS u(i, k, t, ty, p, a)
         ON CONFLICT (dataflow, task_id, kind) DO NOTHING",
        &[
            &dataflow,
            &ids,
            &kinds,
            &times,
            &types,
            &priorities,
            &agents,
        ],
    )
    .await
    .map_err(stmt("storing task state"))?;
    Ok(())
}

/// Forgets every stored event of the tasks `task_ids`.
async fn retire_task_state(
    tx: &Transaction<'_>,
    dataflow: &str,
    task_ids: &[&str],
) -> Result<(), PostgresError> {
    if task_ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        "DELETE FROM task_state WHERE dataflow = $1 AND task_id = ANY($2)",
        &[&dataflow, &task_ids],
    )
    .await
    .map_err(stmt("retiring task state"))?;
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
    fence: &Fence,
) -> Result<(), PostgresError> {
    let tx = client
        .transaction()
        .await
        .map_err(stmt("beginning offset commit"))?;
    fence_in(fence, &tx, dataflow).await?;
    upsert_offsets(&tx, dataflow, sink, topic, offsets, true).await?;
    tx.commit().await.map_err(stmt("committing offsets"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three states a server can be in, plus a database created on a server that no
    /// longer preloads the extension. The stack has two of them live: its `postgres` cluster
    /// preloads TimescaleDB (when the shared build is installed) and `postgres_plain` has it
    /// installed but not preloaded (`tests/tests/timescale_e2e.rs`). The third, absent, is a
    /// machine without the shared TimescaleDB folder, where neither cluster has it installed:
    /// no end-to-end test can run there with the extension, so this covers the decision.
    #[test]
    fn timescale_is_only_created_where_it_is_preloaded() {
        use PlainReason::*;
        use TimescaleDecision::*;
        // (created in the database, available on the server, preloaded) -> decision
        let cases = [
            ((false, false, false), Plain(NotInstalled)),
            // A preload entry without the files: postgres would not start, but never create.
            ((false, false, true), Plain(NotInstalled)),
            ((false, true, false), Plain(NotPreloaded)),
            ((false, true, true), Create),
            ((true, true, true), Use),
            ((true, false, true), Use),
            ((true, true, false), Plain(CreatedNotPreloaded)),
            ((true, false, false), Plain(CreatedNotPreloaded)),
        ];
        for ((created, available, preloaded), want) in cases {
            assert_eq!(
                timescale_decision(created, available, preloaded),
                want,
                "created {created}, available {available}, preloaded {preloaded}"
            );
        }
    }

    #[test]
    fn preload_lists_are_read_like_postgres_does() {
        for yes in [
            "timescaledb",
            "pg_stat_statements,timescaledb",
            "pg_stat_statements, timescaledb ",
            "\"timescaledb\"",
            "$libdir/timescaledb",
            "$libdir/timescaledb.so",
        ] {
            assert!(preloads_timescaledb(yes), "{yes:?}");
        }
        for no in [
            "",
            "pg_stat_statements",
            "timescaledb_toolkit",
            "timescaledb-2.28.3",
        ] {
            assert!(!preloads_timescaledb(no), "{no:?}");
        }
    }

    #[test]
    fn json_text_is_sent_as_jsonb_without_parsing() {
        let mut out = bytes::BytesMut::new();
        JsonText(r#"{"model":"m"}"#)
            .to_sql(&Type::JSONB, &mut out)
            .unwrap();
        assert_eq!(&out[..], b"\x01{\"model\":\"m\"}");
        let mut out = bytes::BytesMut::new();
        JsonText("{}").to_sql(&Type::JSON, &mut out).unwrap();
        assert_eq!(&out[..], b"{}");
        assert!(JsonText::accepts(&Type::JSONB));
        assert!(!JsonText::accepts(&Type::TEXT));
    }

    #[test]
    fn stored_kinds_round_trip_and_unknown_ones_name_the_row() {
        for kind in [
            TaskEventKind::Created,
            TaskEventKind::Assigned,
            TaskEventKind::Started,
            TaskEventKind::Completed,
            TaskEventKind::Failed,
        ] {
            assert_eq!(stored_kind("d", "t", kind.as_str()).unwrap(), kind);
        }
        let e = stored_kind("telemetry", "t-9", "task_exploded").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                r#"task_state row (dataflow "telemetry", task_id "t-9", kind "task_exploded"): "#
            ),
            "{msg}"
        );
    }
}
