//! The raw archive as a sink: raw rows in Parquet rolls, one roll per partition at a time, cut
//! by rows, bytes or age, written under a temporary name and renamed into place, then published
//! ([`Publish`]: nothing more on the NAS, an upload to the bucket in direct mode) and only then
//! its offsets stored (`source_offsets`, sink `parquet_raw`). The rolls in place are the
//! archive's own record: a crash in between, a new database or a lost `source_offsets` row
//! leaves whole rolls beyond the stored offset, and [`Sink::recover`] keeps them (completing a
//! half-renamed one) and resumes after the last, so none is deleted, rewritten or doubled.
//!
//! Without PostgreSQL (the demo) nothing is stored, dead letters go to
//! `<nas>/dead_letters.jsonl`, and a restart resumes after the archive's last roll.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use primespark_schemas::flow::{RawBatch, RawItem, SinkId};
use primespark_schemas::rows::{DeadLetterRow, PartitionOffset, RawRow};

use super::writer::{hour_of, RollRows, TelemetryColumns};
use super::{NasConfig, NasError, ParquetArchive, Recovered};
use crate::metrics::SinkRowsWritten;
use crate::postgres::OffsetStore;
use crate::sink::registry::{Built, RawSinkKind, SinkContext, SinkSettings};
use crate::sink::{
    BoxRawSink, Classify, Domain, ErrorClass, Flush, Healthcheck, Sink, SinkError, Target,
};

/// Its name in `source_offsets`: the raw archive's position, wherever its rolls end up.
pub const NAME: &str = "parquet_raw";

/// The registry entry: the NAS archive, unless rolls go straight to the bucket or the stream's
/// route keeps its raw rows out of the archive.
pub const RAW_ROLLS: RawSinkKind = RawSinkKind {
    name: NAME,
    wanted: |settings, scope| {
        settings.nas.is_some()
            && !settings.direct()
            && !scope.backfill
            && settings.route(scope.stream.kind).raw_archive
    },
    build: |settings, ctx, id| async move { build_rolls(settings, ctx, id, OnTheNas) }.boxed(),
};

/// What happens to a roll's files once they are renamed into place, before its offsets are
/// stored; and how far the destination holds each partition at start-up.
#[async_trait]
pub trait Publish: Send + Sync + 'static {
    /// The `sink` label of publishing failures.
    fn label(&self) -> &'static str;
    /// Makes the files durable where they belong.
    async fn publish(&self, files: &[PathBuf]) -> Result<(), SinkError>;
    /// Finishes publishing what the local recovery found whole (`local`) and returns, per
    /// partition of `partitions`, the offset after the last roll the destination holds.
    async fn recover(
        &self,
        archive: &ParquetArchive,
        partitions: &[i32],
        local: &Recovered,
    ) -> Result<HashMap<i32, i64>, SinkError>;
    /// Checks the destination once at start-up.
    fn healthcheck(&self) -> Healthcheck;
}

/// Rolls stay on the NAS.
pub struct OnTheNas;

#[async_trait]
impl Publish for OnTheNas {
    fn label(&self) -> &'static str {
        "parquet"
    }
    async fn publish(&self, _files: &[PathBuf]) -> Result<(), SinkError> {
        Ok(())
    }
    async fn recover(
        &self,
        _: &ParquetArchive,
        _: &[i32],
        local: &Recovered,
    ) -> Result<HashMap<i32, i64>, SinkError> {
        // The rolls on the NAS are the published ones.
        Ok(local.ends.clone())
    }
    fn healthcheck(&self) -> Healthcheck {
        crate::sink::healthy()
    }
}

/// Builds a rolling archive sink publishing through `publish`.
pub fn build_rolls<P: Publish>(
    settings: &SinkSettings,
    ctx: &SinkContext,
    id: SinkId,
    publish: P,
) -> Result<Built<BoxRawSink>, SinkError> {
    let Some(nas) = &settings.nas else {
        return Err(SinkError::fatal(
            Domain::Internal,
            "archive sink without [nas]",
        ));
    };
    let mut archive = ParquetArchive::new(&nas.path, &ctx.topic, nas.row_group_rows)
        .with_fence(ctx.fence.clone());
    if ctx.stream.writes_scores() {
        archive = archive.with_scores();
    }
    let committed: HashMap<i32, i64> = ctx
        .stored
        .offsets_of(NAME)
        .map(|o| (o.partition, o.next_offset))
        .collect();
    let mut rolls: BTreeMap<i32, PartitionRoll> = BTreeMap::new();
    for (p, next) in &committed {
        rolls.entry(*p).or_default().committed = Some(*next);
    }
    let writable = writable(nas.path.clone());
    let published = publish.healthcheck();
    let sink = RollSink {
        id,
        table: ctx.stream.archive_table(),
        topic: ctx.topic.clone(),
        archive,
        root: nas.path.clone(),
        limits: RollLimits::of(nas),
        rolls,
        pending: Vec::new(),
        published: Vec::new(),
        partitions: ctx.partitions.clone(),
        committed,
        offsets: settings.postgres.as_ref().map(|pg| {
            OffsetStore::new(&pg.url, ctx.stream.name, &ctx.topic).with_fence(ctx.fence.clone())
        }),
        // With PostgreSQL the letters are its sink's; without, they go to a file here.
        letters_to_file: settings.postgres.is_none(),
        publish,
    };
    let check: Healthcheck = Box::pin(async move {
        writable.await?;
        published.await
    });
    Ok((Box::new(sink), check))
}

/// The health check of the NAS: the folder exists (or can be made) and takes a file.
fn writable(root: PathBuf) -> Healthcheck {
    Box::pin(async move {
        tokio::task::spawn_blocking(move || probe_writable(&root))
            .await
            .map_err(|e| SinkError::fatal(Domain::Internal, e))?
    })
}

/// Writes and removes a probe file under `root`. The probe's name is this call's own (process id
/// and a random part): the streams' sinks and a cluster's processes share one root and check it
/// at the same moment, and with one fixed name one check removed another's probe under it.
fn probe_writable(root: &std::path::Path) -> Result<(), SinkError> {
    let probe = root.join(format!(
        ".primespark-probe-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(root)
        .and_then(|()| std::fs::write(&probe, b"ok"))
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|source| {
            NasError::Io {
                path: root.to_owned(),
                source,
            }
            .into_sink_error()
        })
}

/// When a roll is cut.
#[derive(Debug, Clone, Copy)]
struct RollLimits {
    rows: usize,
    bytes: usize,
    interval: Duration,
}

impl RollLimits {
    fn of(nas: &NasConfig) -> Self {
        Self {
            rows: nas.roll_rows,
            bytes: nas.roll_bytes,
            interval: nas.roll_interval,
        }
    }
}

/// The open roll of one partition.
#[derive(Debug, Default)]
struct PartitionRoll {
    /// Rows of the other streams, and scores.
    rows: Vec<RawRow>,
    /// Telemetry rows as columns, by hour of event time.
    telemetry: BTreeMap<i64, TelemetryColumns>,
    /// Rows in `rows` and `telemetry`.
    count: usize,
    /// [`RawRow::approx_bytes`] of the roll's rows.
    bytes: usize,
    first: Option<i64>,
    next: i64,
    committed: Option<i64>,
    opened: Option<Instant>,
}

/// A roll cut and waiting to be written and published.
#[derive(Debug)]
struct Due {
    partition: i32,
    first: i64,
    next: i64,
    rows: Arc<RollRows>,
}

/// The raw archive of one worker.
pub struct RollSink<P: Publish> {
    id: SinkId,
    table: &'static str,
    topic: String,
    archive: ParquetArchive,
    root: PathBuf,
    limits: RollLimits,
    rolls: BTreeMap<i32, PartitionRoll>,
    /// Cut rolls not yet published (a failed commit continues with these).
    pending: Vec<Due>,
    /// Published rolls whose offsets are not stored yet.
    published: Vec<PartitionOffset>,
    partitions: Vec<i32>,
    committed: HashMap<i32, i64>,
    offsets: Option<OffsetStore>,
    letters_to_file: bool,
    publish: P,
}

impl<P: Publish> RollSink<P> {
    /// Cuts the rolls that are due (or all).
    fn cut(&mut self, all: bool) -> Result<(), NasError> {
        for (p, roll) in &mut self.rolls {
            let Some(first) = roll.first else { continue };
            let aged = roll
                .opened
                .is_some_and(|o| o.elapsed() >= self.limits.interval);
            if all || aged || roll.count >= self.limits.rows || roll.bytes >= self.limits.bytes {
                let telemetry = std::mem::take(&mut roll.telemetry)
                    .into_iter()
                    .map(|(hour, columns)| Ok((hour, columns.finish()?)))
                    .collect::<Result<_, NasError>>()?;
                self.pending.push(Due {
                    partition: *p,
                    first,
                    next: roll.next,
                    rows: Arc::new(RollRows {
                        rows: std::mem::take(&mut roll.rows),
                        telemetry,
                    }),
                });
                roll.first = None;
                roll.opened = None;
                roll.bytes = 0;
                roll.count = 0;
            }
        }
        Ok(())
    }

    /// Writes and publishes the first pending roll.
    async fn write_roll(&self, due: &Due) -> Result<(), SinkError> {
        if due.rows.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let (archive, rows) = (self.archive.clone(), due.rows.clone());
        let (partition, first, last) = (due.partition, due.first, due.next - 1);
        let files = tokio::task::spawn_blocking(move || {
            archive.write_roll_rows(partition, first, last, &rows)
        })
        .await
        .map_err(|e| SinkError::fatal(Domain::Internal, e))?
        .map_err(Classify::into_sink_error)?;
        self.publish.publish(&files).await.map_err(|e| {
            e.at(Target {
                sink: self.publish.label(),
                table: self.table,
            })
        })?;
        SinkRowsWritten {
            sink: "parquet",
            table: self.table,
            rows: due.rows.len() as u64,
            duration: started.elapsed(),
        }
        .emit();
        Ok(())
    }

    /// Adds the batch's rows to their partitions' rolls.
    fn append(&mut self, batch: &RawBatch) {
        for item in &batch.items {
            let (partition, offset) = item.position();
            let roll = self.rolls.entry(partition).or_default();
            if roll.committed.is_some_and(|c| offset < c) {
                // Replayed for another sink: already in a committed roll.
                continue;
            }
            if roll.first.is_none() {
                // A roll covers offsets from the committed one: during a replay the first
                // items are below it (needed by another sink only), and naming the roll after
                // them would let it survive `recover` and be written twice.
                roll.first = Some(roll.committed.unwrap_or(offset));
                roll.opened = Some(Instant::now());
            }
            roll.next = roll.next.max(offset + 1);
            if let RawItem::Point(p) = item {
                if p.delivery.contains(self.id) {
                    roll.bytes += p.row.approx_bytes();
                    roll.count += 1;
                    match &p.row {
                        RawRow::Telemetry(t) => roll
                            .telemetry
                            .entry(hour_of(t.time_us))
                            .or_default()
                            .push(t),
                        row => roll.rows.push(row.clone()),
                    }
                }
            }
        }
    }
}

#[async_trait]
impl<P: Publish> Sink for RollSink<P> {
    type Input = RawBatch;

    fn id(&self) -> SinkId {
        self.id
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn target(&self) -> Target<'static> {
        Target {
            sink: "parquet",
            table: self.table,
        }
    }

    fn resume(&self, partition: i32) -> Option<PartitionOffset> {
        self.committed.get(&partition).map(|next| PartitionOffset {
            partition,
            next_offset: *next,
            max_event_us: i64::MIN,
        })
    }

    fn committed(&self, partition: i32) -> crate::sink::Committed {
        match self.committed.get(&partition) {
            Some(next) => crate::sink::Committed::Below(*next),
            None => crate::sink::Committed::Nothing,
        }
    }

    async fn recover(&mut self) -> Result<usize, SinkError> {
        let (archive, mine) = (self.archive.clone(), self.partitions.clone());
        let local = tokio::task::spawn_blocking(move || archive.recover(&|p| mine.contains(&p)))
            .await
            .map_err(|e| SinkError::fatal(Domain::Internal, e))?
            .map_err(Classify::into_sink_error)?;
        let ends = self
            .publish
            .recover(&self.archive, &self.partitions, &local)
            .await?;
        // The archive's own record wins over a lower (or missing) stored offset: a roll in
        // place is never rewritten, so a new database or a lost `source_offsets` row neither
        // deletes nor doubles it.
        for (p, end) in ends {
            let stored = self.committed.get(&p).copied();
            if stored.is_none_or(|s| end > s) {
                tracing::info!(
                    topic = %self.topic,
                    partition = p,
                    stored = ?stored,
                    archive_end = end,
                    "the archive holds more than the stored offset: resuming after its last roll"
                );
                self.committed.insert(p, end);
                self.rolls.entry(p).or_default().committed = Some(end);
                // Stored with the next commit, so `source_offsets` and the consumer group
                // show it too.
                self.published.push(PartitionOffset {
                    partition: p,
                    next_offset: end,
                    max_event_us: 0,
                });
            }
        }
        Ok(local.removed + local.completed)
    }

    async fn write(&mut self, batch: &RawBatch) -> Result<(), SinkError> {
        if self.letters_to_file {
            let letters: Vec<&DeadLetterRow> = batch.letters_for(self.id).collect();
            write_dead_letters_file(&self.root, &self.topic, &letters)?;
        }
        self.append(batch);
        Ok(())
    }

    async fn commit(&mut self, flush: Flush) -> Result<(), SinkError> {
        self.cut(flush == Flush::All)
            .map_err(Classify::into_sink_error)?;
        while let Some(due) = self.pending.first() {
            let due = Due {
                partition: due.partition,
                first: due.first,
                next: due.next,
                rows: due.rows.clone(),
            };
            self.write_roll(&due).await?;
            self.pending.remove(0);
            self.published.push(PartitionOffset {
                partition: due.partition,
                next_offset: due.next,
                max_event_us: 0,
            });
        }
        if self.published.is_empty() {
            return Ok(());
        }
        // The delicate moment: the rolls are in place, their offsets not stored yet.
        crate::failpoint::hit("archive.roll_published")?;
        if let Some(store) = self.offsets.as_mut() {
            store.commit(NAME, &self.published).await.map_err(|e| {
                e.at(Target {
                    sink: "postgres",
                    table: "source_offsets",
                })
            })?;
        }
        for o in self.published.drain(..) {
            self.rolls.entry(o.partition).or_default().committed = Some(o.next_offset);
            self.committed.insert(o.partition, o.next_offset);
        }
        Ok(())
    }
}

/// Without PostgreSQL (the demo), dead letters go to `<nas>/dead_letters.jsonl`.
fn write_dead_letters_file(
    root: &std::path::Path,
    topic: &str,
    letters: &[&DeadLetterRow],
) -> Result<(), SinkError> {
    use std::io::Write;
    if letters.is_empty() {
        return Ok(());
    }
    let path = root.join("dead_letters.jsonl");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| {
            for d in letters {
                let line = serde_json::json!({
                    "topic": topic,
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
    match written {
        Ok(()) => {
            for d in letters {
                crate::metrics::DeadLettersWritten {
                    topic,
                    partition: d.partition,
                    count: 1,
                }
                .emit();
            }
            Ok(())
        }
        Err(source) => Err(NasError::Io { path, source }.into_sink_error()),
    }
}

impl Classify for NasError {
    fn class(&self) -> ErrorClass {
        match self {
            NasError::Io { source, .. } => crate::sink::io_class(source),
            // Our own encoder refusing our own rows is a bug.
            NasError::Encode(_) => ErrorClass::Fatal(Domain::Internal),
            NasError::Refused(e) => e.class().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use primespark_schemas::flow::{Point, SinkSet};
    use primespark_schemas::rows::TelemetryRow;

    fn sink(dir: &std::path::Path, rows: usize, bytes: usize) -> RollSink<OnTheNas> {
        RollSink {
            id: SinkId::raw(0).unwrap(),
            table: "telemetry_raw",
            topic: "edge.telemetry".into(),
            archive: ParquetArchive::new(dir, "edge.telemetry", 1024),
            root: dir.to_owned(),
            limits: RollLimits {
                rows,
                bytes,
                interval: Duration::from_secs(3600),
            },
            rolls: BTreeMap::new(),
            pending: Vec::new(),
            published: Vec::new(),
            partitions: vec![0],
            committed: HashMap::new(),
            offsets: None,
            letters_to_file: false,
            publish: OnTheNas,
        }
    }

    #[test]
    fn concurrent_health_checks_on_one_root_all_pass() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("nas");
        let checks: Vec<_> = (0..16)
            .map(|_| {
                let root = root.clone();
                std::thread::spawn(move || {
                    (0..50).try_for_each(|_| probe_writable(&root).map_err(|e| e.to_string()))
                })
            })
            .collect();
        for check in checks {
            check.join().unwrap().unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
        assert!(left.is_empty(), "probes left behind: {left:?}");
    }

    fn batch(rows: usize, device: &str) -> RawBatch {
        let mut batch = RawBatch::default();
        for i in 0..rows {
            batch.push(RawItem::Point(Point {
                row: RawRow::Telemetry(TelemetryRow {
                    time_us: 0,
                    device_id: device.into(),
                    metric_name: "cpu_percent".into(),
                    value: 1.0,
                    partition: 0,
                    offset: i as i64,
                }),
                delivery: SinkSet::of([SinkId::raw(0).unwrap()]),
                late: false,
                late_by_us: 0,
            }));
        }
        batch
    }

    /// Every row of every Parquet file under `dir`, as text, sorted (file name included).
    fn archived(dir: &std::path::Path) -> Vec<String> {
        use arrow::util::display::{ArrayFormatter, FormatOptions};
        let mut out = Vec::new();
        let mut stack = vec![dir.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                let file = std::fs::File::open(&path).unwrap();
                let reader =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
                        .unwrap()
                        .build()
                        .unwrap();
                for batch in reader {
                    let batch = batch.unwrap();
                    let options = FormatOptions::default();
                    let columns: Vec<_> = batch
                        .columns()
                        .iter()
                        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
                        .collect();
                    for i in 0..batch.num_rows() {
                        let cells: Vec<String> =
                            columns.iter().map(|c| c.value(i).to_string()).collect();
                        out.push(format!("{rel}: {}", cells.join(",")));
                    }
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_roll_kept_as_columns_writes_what_its_rows_would() {
        use primespark_schemas::rows::ScoreRow;
        let hour = 3_600_000_000i64;
        let mut rows = Vec::new();
        for i in 0..40i64 {
            // Three hours of event time, out of order, and a score per fourth sample.
            let time_us = 1_762_351_387_000_000 + (i % 3) * hour + i;
            rows.push(RawRow::Telemetry(TelemetryRow {
                time_us,
                device_id: format!("pi-{}", i % 5).into(),
                metric_name: if i % 2 == 0 { "cpu_percent" } else { "temp_c" }.into(),
                value: i as f64 / 4.0,
                partition: 0,
                offset: i,
            }));
            if i % 4 == 0 {
                rows.push(RawRow::Score(Box::new(ScoreRow {
                    time_us,
                    device_id: format!("pi-{}", i % 5).into(),
                    model: "iforest".into(),
                    score: 0.25,
                    threshold: 0.5,
                    backend: "cpu".into(),
                    features: Vec::new(),
                    partition: 0,
                    offset: i,
                })));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(&dir.path().join("columns"), 1 << 20, 1 << 30);
        s.archive = s.archive.clone().with_scores();
        let mut batch = RawBatch::default();
        for row in &rows {
            batch.push(RawItem::Point(Point {
                row: row.clone(),
                delivery: SinkSet::of([SinkId::raw(0).unwrap()]),
                late: false,
                late_by_us: 0,
            }));
        }
        s.append(&batch);
        s.cut(true).unwrap();
        assert_eq!(s.pending.len(), 1);
        let due = &s.pending[0];
        assert_eq!(due.rows.len(), rows.len());
        assert_eq!(due.rows.telemetry.len(), 3, "three hours of telemetry");
        s.archive
            .write_roll_rows(0, due.first, due.next - 1, &due.rows)
            .unwrap();
        let by_rows = ParquetArchive::new(&dir.path().join("rows"), "edge.telemetry", 1024);
        by_rows.write_roll(0, 0, 39, &rows).unwrap();
        let columns = archived(&dir.path().join("columns"));
        assert_eq!(columns.len(), rows.len());
        assert_eq!(columns, archived(&dir.path().join("rows")));
    }

    #[test]
    fn rolls_are_cut_by_rows_or_bytes_whichever_comes_first() {
        let dir = tempfile::tempdir().unwrap();
        // 10 small rows: under both limits, not due.
        let mut s = sink(dir.path(), 100, 10_000);
        s.append(&batch(10, "pi"));
        s.cut(false).unwrap();
        assert!(s.pending.is_empty());
        // The same rows with long device ids pass the byte limit first.
        let mut s = sink(dir.path(), 100, 10_000);
        s.append(&batch(10, &"d".repeat(1000)));
        s.cut(false).unwrap();
        assert_eq!(s.pending.len(), 1);
        assert_eq!(s.pending[0].rows.len(), 10);
        assert_eq!(s.rolls[&0].bytes, 0, "a cut roll starts empty");
        // The row limit still applies.
        let mut s = sink(dir.path(), 5, 1 << 30);
        s.append(&batch(10, "pi"));
        s.cut(false).unwrap();
        assert_eq!(s.pending.len(), 1);
    }
}
