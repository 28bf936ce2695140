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
use primespark_schemas::rows::{Agg, AggRow, DeadLetterRow, LateEventRow, PartitionOffset, RawRow};
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
    /// ... or at about this many bytes of rows ([`RawRow::approx_bytes`]).
    pub roll_bytes: usize,
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
    /// [`RawRow::approx_bytes`] of `rows`.
    bytes: usize,
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
            (Some(pg), _) => write_pg_batch(pg, &batch, dlq.as_ref()).await,
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
                        roll.bytes += p.row.approx_bytes();
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

/// Publishes the batch's dead letters that the raw sink has not stored yet to `<topic>.dlq`.
async fn publish_dlq(dlq: &DlqTarget, batch: &RawBatch, pg: bool) {
    let rows = batch.items.iter().filter_map(|i| match i {
        RawItem::Dead(d) if (pg && d.delivery.postgres) || (!pg && d.delivery.parquet) => {
            Some(&d.row)
        }
        _ => None,
    });
    publish_letters(dlq, rows).await;
}

/// Publishes dead letters to `<topic>.dlq`, retrying with backoff (the writer, and with it the
/// source, waits meanwhile).
async fn publish_letters<'r>(dlq: &DlqTarget, rows: impl IntoIterator<Item = &'r DeadLetterRow>) {
    let letters: Vec<primespark_connectors::kafka::DeadLetterMessage<'_>> = rows
        .into_iter()
        .map(|d| primespark_connectors::kafka::DeadLetterMessage {
            topic: &dlq.topic,
            partition: d.partition,
            offset: d.offset,
            reason: &d.reason,
            error: &d.error,
            payload: &d.payload,
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

async fn write_pg_batch(pg: &mut Pg, batch: &RawBatch, dlq: Option<&DlqTarget>) {
    let mut rows: Vec<RawRow> = batch
        .items
        .iter()
        .filter_map(|i| match i {
            RawItem::Point(p) if p.delivery.postgres => Some(p.row.clone()),
            _ => None,
        })
        .collect();
    let mut dead: Vec<_> = batch
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
    loop {
        let refused = pg_retry!(pg, "raw", |client| write_or_find_refused(
            client, &dataflow, &topic, &rows, &dead, &late, &offsets
        ));
        if refused.is_empty() {
            return;
        }
        // The refused records leave the batch as dead letters; the rest is written again.
        let letters = quarantine(&topic, &mut rows, refused);
        // A refused record is a dead letter of this sink, not one of its late events.
        late.retain(|l| {
            !letters
                .iter()
                .any(|d| (d.partition, d.offset) == (l.partition, l.offset))
        });
        if let Some(dlq) = dlq {
            publish_letters(dlq, &letters).await;
        }
        dead.extend(letters);
    }
}

/// Writes the batch; when PostgreSQL refuses its data, finds the refused records instead
/// (`Ok` with them, nothing written). An error is a failure to retry: the service, or a refusal
/// the rows alone do not reproduce (it lies in the batch's dead letters or offsets).
async fn write_or_find_refused(
    client: &mut Client,
    dataflow: &str,
    topic: &str,
    rows: &[RawRow],
    dead: &[DeadLetterRow],
    late: &[LateEventRow],
    offsets: &[PartitionOffset],
) -> Result<Vec<postgres::Rejected>, postgres::PostgresError> {
    let written = postgres::write_raw(
        client,
        dataflow,
        sink_names::POSTGRES_RAW,
        topic,
        rows,
        dead,
        late,
        offsets,
    )
    .await;
    match written {
        Ok(()) => Ok(Vec::new()),
        Err(e) if e.is_rejected_data() => {
            let refused = postgres::rejected_records(client, rows).await?;
            if refused.is_empty() {
                Err(e)
            } else {
                Ok(refused)
            }
        }
        Err(e) => Err(e),
    }
}

/// Takes the rows of `refused` records out of `rows` and returns a dead letter for each. The
/// original bytes are gone by now (decoding keeps only the fields), so a letter's payload is the
/// record's rows as JSON, and its error says so.
fn quarantine(
    topic: &str,
    rows: &mut Vec<RawRow>,
    refused: Vec<postgres::Rejected>,
) -> Vec<DeadLetterRow> {
    let mut letters = Vec::with_capacity(refused.len());
    for r in refused {
        let (mine, rest): (Vec<RawRow>, Vec<RawRow>) = std::mem::take(rows)
            .into_iter()
            .partition(|row| row.position() == (r.partition, r.offset));
        *rows = rest;
        tracing::warn!(
            topic,
            partition = r.partition,
            offset = r.offset,
            reason = %r.reason,
            "postgres refused a record; it goes to the dead letters"
        );
        letters.push(DeadLetterRow {
            partition: r.partition,
            offset: r.offset,
            reason: SINK_REJECTED.to_owned(),
            error: format!(
                "topic {topic} partition {} offset {}: PostgreSQL refused the record ({}); \
                 payload: its decoded rows as JSON",
                r.partition, r.offset, r.reason
            ),
            payload: serde_json::to_vec(&mine).unwrap_or_default(),
        });
    }
    letters
}

/// Reason code of a dead letter PostgreSQL refused after decoding and validation passed.
pub const SINK_REJECTED: &str = "sink_rejected";

fn take_due(
    pq: &ParquetTarget,
    rolls: &mut BTreeMap<i32, PartitionRoll>,
    all: bool,
) -> Vec<(i32, i64, i64, Vec<RawRow>)> {
    let mut due = Vec::new();
    for (p, roll) in rolls.iter_mut() {
        let Some(first) = roll.first else { continue };
        let aged = roll.opened.is_some_and(|o| o.elapsed() >= pq.roll_interval);
        if all || aged || roll.rows.len() >= pq.roll_rows || roll.bytes >= pq.roll_bytes {
            due.push((*p, first, roll.next, std::mem::take(&mut roll.rows)));
            roll.first = None;
            roll.opened = None;
            roll.bytes = 0;
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
    // Hours before this were compacted by this writer (none yet after a start: the first
    // commit finishes whatever an earlier run left).
    let mut compacted_before: Option<i64> = None;
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
        // Hours of 1-minute windows that are final now (committed above, beyond the allowed
        // lateness) become one file each; once per hour of watermark progress.
        if let Some(pq) = &parquet {
            let final_before = committed.saturating_sub(allowed_lateness_us);
            let hour = primespark_connectors::nas::compact::hour_start(final_before);
            if compacted_before.is_none_or(|done| done < hour) {
                let (root, rg) = (pq.root.clone(), pq.row_group_rows);
                let done = tokio::task::spawn_blocking(move || {
                    primespark_connectors::nas::compact::compact(&root, final_before, rg)
                })
                .await;
                match done {
                    Ok(Ok(report)) => {
                        if report.hours > 0 {
                            tracing::info!(
                                hours = report.hours,
                                minute_files = report.minute_files,
                                rows = report.rows,
                                "aggregate hours compacted"
                            );
                        }
                        compacted_before = Some(hour);
                    }
                    // Left for the next hour's pass; readers are unaffected meanwhile.
                    Ok(Err(e)) => tracing::warn!(error = %e, "compacting aggregate files failed"),
                    Err(e) => tracing::warn!(error = %e, "compacting aggregate files failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use primespark_schemas::rows::TelemetryRow;

    use super::*;

    fn target(dir: &std::path::Path, roll_rows: usize, roll_bytes: usize) -> ParquetTarget {
        ParquetTarget {
            topic: "edge.telemetry".into(),
            table: "telemetry_raw",
            archive: ParquetArchive::new(dir, "edge.telemetry", 1024),
            root: dir.to_owned(),
            roll_rows,
            roll_bytes,
            roll_interval: Duration::from_secs(3600),
            row_group_rows: 1024,
            committed: HashMap::new(),
            upload: None,
        }
    }

    fn roll(rows: usize, device: &str) -> PartitionRoll {
        let rows: Vec<RawRow> = (0..rows)
            .map(|i| {
                RawRow::Telemetry(TelemetryRow {
                    time_us: 0,
                    device_id: device.into(),
                    metric_name: "cpu_percent".into(),
                    value: 1.0,
                    partition: 0,
                    offset: i as i64,
                })
            })
            .collect();
        PartitionRoll {
            bytes: rows.iter().map(RawRow::approx_bytes).sum(),
            rows,
            first: Some(0),
            next: 10,
            committed: None,
            opened: Some(Instant::now()),
        }
    }

    #[test]
    fn rolls_are_cut_by_rows_or_bytes_whichever_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        // 10 small rows: under both limits, not due.
        let pq = target(dir.path(), 100, 10_000);
        let mut rolls = BTreeMap::from([(0, roll(10, "pi"))]);
        assert!(take_due(&pq, &mut rolls, false).is_empty());
        // The same rows with long device ids pass the byte limit first.
        let mut rolls = BTreeMap::from([(0, roll(10, &"d".repeat(1000)))]);
        let due = take_due(&pq, &mut rolls, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].3.len(), 10);
        assert_eq!(rolls[&0].bytes, 0, "a cut roll starts empty");
        // The row limit still applies.
        let pq = target(dir.path(), 5, 1 << 30);
        let mut rolls = BTreeMap::from([(0, roll(10, "pi"))]);
        assert_eq!(take_due(&pq, &mut rolls, false).len(), 1);
    }
}
