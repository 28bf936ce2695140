//! Async writers: they own the I/O, retry with exponential backoff and jitter while a service is
//! down (the bounded channels in front of them turn that into backpressure), and commit offsets
//! only after the rows they cover are durable.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use primespark_connectors::metrics::{SinkFailed, SinkRecovered, SinkRowsWritten};
use primespark_connectors::nas::{write_aggregate_files, ParquetArchive};
use primespark_connectors::postgres;
use primespark_schemas::rows::{Agg, AggRow, LateEventRow, PartitionOffset, RawRow};
use rand::Rng;
use tokio::sync::mpsc::Receiver;
use tokio_postgres::Client;

use crate::sinks::{AggCommit, RawBatch};
use crate::source::RawItem;

/// Sink names in `source_offsets`.
pub mod sink_names {
    /// Raw rows and dead letters in PostgreSQL.
    pub const POSTGRES_RAW: &str = "postgres_raw";
    /// Raw Parquet files.
    pub const PARQUET_RAW: &str = "parquet_raw";
    /// Windowed aggregates.
    pub const AGGREGATES: &str = "aggregates";
}

/// Where a writer's PostgreSQL output goes.
#[derive(Clone)]
pub struct PgTarget {
    /// Connection URL (never logged).
    pub url: String,
    /// Dataflow name.
    pub dataflow: String,
    /// Topic.
    pub topic: String,
    /// A backfill of event times `[since, until)`: no resume positions or watermark are
    /// stored, and only windows inside the range are written.
    pub backfill: Option<(i64, i64)>,
}

/// Where dead letters are published besides the tables: `<topic>.dlq`.
#[derive(Clone)]
pub struct DlqTarget {
    /// The source topic (the DLQ is `<topic>.dlq`).
    pub topic: String,
    /// A shared producer.
    pub producer: rdkafka::producer::FutureProducer,
}

/// Where a writer's Parquet output goes.
#[derive(Clone)]
pub struct ParquetTarget {
    /// The topic.
    pub topic: String,
    /// SQL name of the raw files (`telemetry_raw`, `inference_raw`), for metrics and logs.
    pub table: &'static str,
    /// The topic's archive.
    pub archive: ParquetArchive,
    /// NAS root (aggregate files).
    pub root: PathBuf,
    /// Roll at this many rows per partition.
    pub roll_rows: usize,
    /// Roll at least this often.
    pub roll_interval: Duration,
    /// Row group size.
    pub row_group_rows: usize,
    /// Committed next offsets per partition at start.
    pub committed: HashMap<i32, i64>,
    /// Direct mode (`s3.direct`): each raw roll goes to the bucket, verified, before its
    /// offsets are committed; the NAS only stages it.
    pub upload: Option<std::sync::Arc<primespark_connectors::s3::Tierer>>,
}

/// Retries `op` with exponential backoff (100 ms doubling to 10 s) and jitter until it succeeds.
pub async fn retry<T, E, F, Fut>(sink: &str, table: &str, mut op: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => {
                if attempt > 0 {
                    SinkRecovered { sink, table }.emit();
                }
                return v;
            }
            Err(e) => {
                attempt += 1;
                SinkFailed {
                    sink,
                    table,
                    error: &e,
                    attempt,
                }
                .emit();
                backoff(&mut delay).await;
            }
        }
    }
}

async fn backoff(delay: &mut Duration) {
    let jitter = rand::rng().random_range(0.5..1.5);
    tokio::time::sleep(delay.mul_f64(jitter)).await;
    *delay = (*delay * 2).min(Duration::from_secs(10));
}

/// Runs `$body` (a future using the client `$c`) until it succeeds, reconnecting and backing
/// off after each failure. A macro because the body borrows both the client and the batch.
macro_rules! pg_retry {
    ($pg:expr, $table:expr, |$c:ident| $body:expr) => {{
        let mut attempt = 0u32;
        let mut delay = Duration::from_millis(100);
        loop {
            let result = match $pg.client().await {
                Ok($c) => $body.await,
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => {
                    if attempt > 0 {
                        SinkRecovered {
                            sink: "postgres",
                            table: $table,
                        }
                        .emit();
                    }
                    break v;
                }
                Err(e) => {
                    attempt += 1;
                    SinkFailed {
                        sink: "postgres",
                        table: $table,
                        error: &e,
                        attempt,
                    }
                    .emit();
                    $pg.client = None;
                    backoff(&mut delay).await;
                }
            }
        }
    }};
}

/// A PostgreSQL client that reconnects after failures.
struct Pg {
    target: PgTarget,
    client: Option<Client>,
}

impl Pg {
    async fn client(&mut self) -> Result<&mut Client, postgres::PostgresError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(postgres::connect(&self.target.url).await?);
        }
        match self.client.as_mut() {
            Some(c) => Ok(c),
            None => unreachable!("client was just set"),
        }
    }
}

#[derive(Default)]
struct PartitionRoll {
    rows: Vec<RawRow>,
    first: Option<i64>,
    next: i64,
    committed: Option<i64>,
    opened: Option<Instant>,
}

/// One worker's raw writer: raw rows and dead letters into PostgreSQL (with offsets, one
/// transaction per batch), raw rows into Parquet rolls (offsets committed after the rename).
pub async fn raw_writer(
    mut rx: Receiver<RawBatch>,
    pg: Option<PgTarget>,
    parquet: Option<ParquetTarget>,
    dlq: Option<DlqTarget>,
) {
    let mut pg = pg.map(|target| Pg {
        target,
        client: None,
    });
    let mut rolls: BTreeMap<i32, PartitionRoll> = BTreeMap::new();
    if let Some(pq) = &parquet {
        for (p, next) in &pq.committed {
            rolls.entry(*p).or_default().committed = Some(*next);
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        let batch = tokio::select! {
            b = rx.recv() => b,
            _ = tick.tick() => {
                if let (Some(pq), Some(pg)) = (&parquet, pg.as_mut()) {
                    roll_due(pq, pg, &mut rolls, false).await;
                } else if let Some(pq) = &parquet {
                    roll_due_no_pg(pq, &mut rolls, false).await;
                }
                continue;
            }
        };
        let Some(batch) = batch else { break };
        if let Some(dlq) = &dlq {
            // Before the offsets are committed below: a crash in between publishes the
            // letters again (same key), never loses one.
            publish_dlq(dlq, &batch, pg.is_some()).await;
        }
        match (pg.as_mut(), &parquet) {
            (Some(pg), _) => write_pg_batch(pg, &batch).await,
            (None, Some(pq)) => write_dead_letters_file(pq, &batch),
            (None, None) => {}
        }
        if let Some(pq) = &parquet {
            for item in &batch.items {
                let (partition, offset) = item.position();
                let roll = rolls.entry(partition).or_default();
                if roll.committed.is_some_and(|c| offset < c) {
                    // Replayed for another sink: already in a committed roll.
                    continue;
                }
                if roll.first.is_none() {
                    // A roll covers offsets from the committed one: during a replay the first
                    // items are below it (needed by another sink only), and naming the roll
                    // after them would let it survive `recover` and be written twice.
                    roll.first = Some(roll.committed.unwrap_or(offset));
                    roll.opened = Some(Instant::now());
                }
                roll.next = roll.next.max(offset + 1);
                if let RawItem::Point(p) = item {
                    if p.delivery.parquet {
                        roll.rows.push(p.row.clone());
                    }
                }
            }
            match pg.as_mut() {
                Some(pg) => roll_due(pq, pg, &mut rolls, false).await,
                None => roll_due_no_pg(pq, &mut rolls, false).await,
            }
        }
    }
    // Channel closed: the dataflow is shutting down; roll everything buffered.
    if let Some(pq) = &parquet {
        match pg.as_mut() {
            Some(pg) => roll_due(pq, pg, &mut rolls, true).await,
            None => roll_due_no_pg(pq, &mut rolls, true).await,
        }
    }
}

/// Publishes the batch's dead letters that the raw sink has not stored yet to `<topic>.dlq`,
/// retrying with backoff (the writer, and with it the source, waits meanwhile).
async fn publish_dlq(dlq: &DlqTarget, batch: &RawBatch, pg: bool) {
    let letters: Vec<primespark_connectors::kafka::DeadLetterMessage<'_>> = batch
        .items
        .iter()
        .filter_map(|i| match i {
            RawItem::Dead(d) if (pg && d.delivery.postgres) || (!pg && d.delivery.parquet) => {
                Some(primespark_connectors::kafka::DeadLetterMessage {
                    topic: &dlq.topic,
                    partition: d.row.partition,
                    offset: d.row.offset,
                    reason: &d.row.reason,
                    error: &d.row.error,
                    payload: &d.row.payload,
                })
            }
            _ => None,
        })
        .collect();
    if letters.is_empty() {
        return;
    }
    retry("kafka", "dead_letter_topic", || {
        primespark_connectors::kafka::publish_dead_letters(&dlq.producer, &letters)
    })
    .await;
}

/// Without PostgreSQL (the demo), dead letters go to `<nas>/dead_letters.jsonl`.
fn write_dead_letters_file(pq: &ParquetTarget, batch: &RawBatch) {
    use std::io::Write;
    let dead: Vec<_> = batch
        .items
        .iter()
        .filter_map(|i| match i {
            RawItem::Dead(d) => Some(&d.row),
            _ => None,
        })
        .collect();
    if dead.is_empty() {
        return;
    }
    let path = pq.root.join("dead_letters.jsonl");
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| {
            for d in &dead {
                let line = serde_json::json!({
                    "topic": pq.topic,
                    "partition": d.partition,
                    "offset": d.offset,
                    "reason": d.reason,
                    "error": d.error,
                    "payload": String::from_utf8_lossy(&d.payload),
                });
                writeln!(f, "{line}")?;
            }
            Ok(())
        });
    match result {
        Ok(()) => {
            for d in dead {
                primespark_connectors::metrics::DeadLettersWritten {
                    topic: &pq.topic,
                    partition: d.partition,
                    count: 1,
                }
                .emit();
            }
        }
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "writing dead letters failed")
        }
    }
}

async fn write_pg_batch(pg: &mut Pg, batch: &RawBatch) {
    let rows: Vec<RawRow> = batch
        .items
        .iter()
        .filter_map(|i| match i {
            RawItem::Point(p) if p.delivery.postgres => Some(p.row.clone()),
            _ => None,
        })
        .collect();
    let dead: Vec<_> = batch
        .items
        .iter()
        .filter_map(|i| match i {
            RawItem::Dead(d) if d.delivery.postgres => Some(d.row.clone()),
            _ => None,
        })
        .collect();
    // One late_events row per late record (a telemetry record is several points).
    let mut late: Vec<LateEventRow> = Vec::new();
    for item in &batch.items {
        if let RawItem::Point(p) = item {
            let (partition, offset) = p.row.position();
            if p.late
                && p.delivery.postgres
                && !matches!(p.row, RawRow::Score(_))
                && late
                    .last()
                    .is_none_or(|l| (l.partition, l.offset) != (partition, offset))
            {
                late.push(LateEventRow {
                    partition,
                    offset,
                    event_time_us: p.row.time_us(),
                    late_by_us: p.late_by_us,
                });
            }
        }
    }
    // A backfill stores no positions: they belong to the streaming run.
    let positions = if pg.target.backfill.is_some() {
        None
    } else {
        Some(&batch.next_offsets)
    };
    let offsets: Vec<PartitionOffset> = positions
        .into_iter()
        .flatten()
        .map(|(p, n)| PartitionOffset {
            partition: *p,
            next_offset: *n,
            max_event_us: 0,
        })
        .collect();
    let (dataflow, topic) = (pg.target.dataflow.clone(), pg.target.topic.clone());
    pg_retry!(pg, "raw", |client| postgres::write_raw(
        client,
        &dataflow,
        sink_names::POSTGRES_RAW,
        &topic,
        &rows,
        &dead,
        &late,
        &offsets
    ));
}

fn take_due(
    pq: &ParquetTarget,
    rolls: &mut BTreeMap<i32, PartitionRoll>,
    all: bool,
) -> Vec<(i32, i64, i64, Vec<RawRow>)> {
    let mut due = Vec::new();
    for (p, roll) in rolls.iter_mut() {
        let Some(first) = roll.first else { continue };
        let aged = roll.opened.is_some_and(|o| o.elapsed() >= pq.roll_interval);
        if all || aged || roll.rows.len() >= pq.roll_rows {
            due.push((*p, first, roll.next, std::mem::take(&mut roll.rows)));
            roll.first = None;
            roll.opened = None;
        }
    }
    due
}

async fn write_rolls(
    pq: &ParquetTarget,
    due: Vec<(i32, i64, i64, Vec<RawRow>)>,
) -> Vec<PartitionOffset> {
    let mut committed = Vec::new();
    for (partition, first, next, rows) in due {
        if !rows.is_empty() {
            let archive = pq.archive.clone();
            let started = Instant::now();
            let count = rows.len() as u64;
            let rows = std::sync::Arc::new(rows);
            let files = retry("parquet", pq.table, || {
                let archive = archive.clone();
                let rows = rows.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        archive.write_roll(partition, first, next - 1, &rows)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
                }
            })
            .await;
            if let Some(bucket) = &pq.upload {
                // Uploaded and verified before the offsets below are committed: S3 down
                // holds the writer here (and the source behind it), like PostgreSQL down.
                for file in &files {
                    retry("s3", pq.table, || bucket.upload(file)).await;
                }
            }
            SinkRowsWritten {
                sink: "parquet",
                table: pq.table,
                rows: count,
                duration: started.elapsed(),
            }
            .emit();
        }
        committed.push(PartitionOffset {
            partition,
            next_offset: next,
            max_event_us: 0,
        });
    }
    committed
}

async fn roll_due(
    pq: &ParquetTarget,
    pg: &mut Pg,
    rolls: &mut BTreeMap<i32, PartitionRoll>,
    all: bool,
) {
    let due = take_due(pq, rolls, all);
    if due.is_empty() {
        return;
    }
    let offsets = write_rolls(pq, due).await;
    let (dataflow, topic) = (pg.target.dataflow.clone(), pg.target.topic.clone());
    pg_retry!(pg, "source_offsets", |client| postgres::commit_offsets(
        client,
        &dataflow,
        sink_names::PARQUET_RAW,
        &topic,
        &offsets
    ));
    for o in offsets {
        rolls.entry(o.partition).or_default().committed = Some(o.next_offset);
    }
}

/// Without PostgreSQL (the demo) there is nowhere to keep offsets: files are written, and a
/// restart starts over.
async fn roll_due_no_pg(pq: &ParquetTarget, rolls: &mut BTreeMap<i32, PartitionRoll>, all: bool) {
    let due = take_due(pq, rolls, all);
    if !due.is_empty() {
        let offsets = write_rolls(pq, due).await;
        for o in offsets {
            rolls.entry(o.partition).or_default().committed = Some(o.next_offset);
        }
    }
}

/// The aggregate writer: Parquet files per bucket (deterministic names), then the PostgreSQL
/// transaction of rows, committed watermark and resume offsets.
///
/// A Parquet file holds a whole (table, bucket). Windows updated by late events arrive as the
/// updated keys only, so the writer keeps each bucket's rows until the bucket is final (its
/// end plus `allowed_lateness_us` at or below the committed watermark) and rewrites the whole
/// file from them.
pub async fn agg_writer(
    mut rx: Receiver<AggCommit>,
    pg: Option<PgTarget>,
    parquet: Option<ParquetTarget>,
    allowed_lateness_us: i64,
) {
    let mut pg = pg.map(|target| Pg {
        target,
        client: None,
    });
    // (table, bucket) -> key -> the key's latest row.
    type Bucket = BTreeMap<(String, String), AggRow>;
    let mut recent: BTreeMap<(&'static str, i64), Bucket> = BTreeMap::new();
    while let Some(commit) = rx.recv().await {
        let committed = i64::try_from(commit.checkpoint.committed_watermark_us).unwrap_or(i64::MAX);
        if let Some(pq) = &parquet {
            if !commit.rows.is_empty() {
                let mut touched = std::collections::BTreeSet::new();
                for r in &commit.rows {
                    if matches!(r.row, Agg::TaskState(_)) {
                        // Join state, not a window: PostgreSQL only.
                        continue;
                    }
                    let (table, bucket, a, b) = r.identity();
                    touched.insert((table, bucket));
                    recent
                        .entry((table, bucket))
                        .or_default()
                        .insert((a.to_owned(), b.to_owned()), r.clone());
                }
                let rows: Vec<AggRow> = touched
                    .iter()
                    .filter_map(|k| recent.get(k))
                    .flat_map(|rows| rows.values().cloned())
                    .collect();
                let rows = std::sync::Arc::new(rows);
                let started = Instant::now();
                retry("parquet", "aggregates", || {
                    let rows = rows.clone();
                    let root = pq.root.clone();
                    let rg = pq.row_group_rows;
                    async move {
                        tokio::task::spawn_blocking(move || write_aggregate_files(&root, &rows, rg))
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())
                    }
                })
                .await;
                SinkRowsWritten {
                    sink: "parquet",
                    table: "aggregates",
                    rows: rows.len() as u64,
                    duration: started.elapsed(),
                }
                .emit();
            }
            // Final buckets can no longer change: forget them.
            recent.retain(|(_, bucket), rows| {
                let width = rows.values().next().map_or(0, |r| r.rollup.width_us());
                bucket
                    .saturating_add(width)
                    .saturating_add(allowed_lateness_us)
                    > committed
            });
        }
        if let Some(pg) = pg.as_mut() {
            let (dataflow, topic) = (pg.target.dataflow.clone(), pg.target.topic.clone());
            let (rows, committed, positions) = match pg.target.backfill {
                // Windows cut by the range's edges are partial: the ones inside only, and
                // no resume state (the join's included).
                Some((since, until)) => (
                    commit
                        .rows
                        .iter()
                        .filter(|r| {
                            let (_, bucket, _, _) = r.identity();
                            // The task join needs each task's whole life: from the
                            // archive's beginning only.
                            let join_complete =
                                since == i64::MIN || !matches!(r.row, Agg::Task(_) | Agg::Agent(_));
                            !matches!(r.row, Agg::TaskState(_))
                                && join_complete
                                && bucket >= since
                                && bucket.saturating_add(r.rollup.width_us()) <= until
                        })
                        .cloned()
                        .collect(),
                    None,
                    &[][..],
                ),
                None => (
                    commit.rows,
                    Some(committed),
                    commit.checkpoint.partitions.as_slice(),
                ),
            };
            pg_retry!(pg, "aggregates", |client| postgres::write_aggregates(
                client,
                &dataflow,
                sink_names::AGGREGATES,
                &topic,
                &rows,
                committed,
                positions
            ));
        }
    }
}
