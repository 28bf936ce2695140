//! Reading the Parquet archive back: the raw rolls of a topic, from the NAS or the bucket, as
//! the records they were written from, in offset order per partition. `primespark backfill`
//! replays them through the same dataflow as Kafka records, so the tables it rebuilds are the
//! ones the live run wrote.
//!
//! A roll `part-p<P>-o<FIRST>-<LAST>.parquet` is split into one file per hour of event time;
//! the files of one roll are read together and their rows ordered by offset, so records come
//! out in the order the partition held them (which is what makes lateness decisions replay the
//! same way).

mod tiers;

pub use tiers::TieredStore;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    Array, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use bytes::Bytes;
use chrono::NaiveDate;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use primespark_schemas::analytics::{AnalyticsEvent, ApiEvent, TaskEvent, TaskEventKind};
use primespark_schemas::inference::{InferenceEvent, RoutingStrategy, Source, Status};
use primespark_schemas::rows::{AnalyticsRow, InferenceRow, RawRow, TelemetryRow};
use tokio::sync::mpsc;

use crate::metrics::ArchiveFileRead;

/// Failures reading the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Listing or reading a file failed.
    #[error("reading the archive at {location}: {reason}")]
    Read {
        /// The file or folder.
        location: String,
        /// Why.
        reason: String,
    },
    /// A file is not a raw roll of a known stream, or a value does not parse.
    #[error("archive file {location}: {reason}")]
    Schema {
        /// The file.
        location: String,
        /// What is wrong.
        reason: String,
    },
}

/// One file of a raw roll.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RollFile {
    /// Kafka partition.
    pub partition: i32,
    /// First offset of the roll.
    pub first: i64,
    /// Start of the hour of event time the file holds, microseconds.
    pub hour_us: i64,
    /// Last offset of the roll.
    pub last: i64,
    /// Path relative to the archive root (`topic=<t>/date=<d>/hour=<h>/part-...parquet`).
    pub relative: String,
}

/// Parses `topic=<t>/date=YYYY-MM-DD/hour=HH/part-pPPP-oFIRST-LAST.parquet` into (partition,
/// first offset, last offset, hour).
fn parse_roll_path(relative: &str) -> Option<(i32, i64, i64, i64)> {
    let mut parts = relative.rsplit('/');
    let (partition, first, last) = crate::nas::parse_roll_range(parts.next()?)?;
    let hour: i64 = parts.next()?.strip_prefix("hour=")?.parse().ok()?;
    let date = NaiveDate::parse_from_str(parts.next()?.strip_prefix("date=")?, "%Y-%m-%d").ok()?;
    let day_us = date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_micros();
    Some((partition, first, last, day_us + hour * 3_600_000_000))
}

fn read_err(location: impl Into<String>) -> impl FnOnce(String) -> ArchiveError {
    let location = location.into();
    move |reason| ArchiveError::Read { location, reason }
}

/// The raw roll files of `topic` in the archive's tiers (each file once, wherever tiering has
/// put it: see [`TieredStore`]), for the hours in `[from_us, to_us)`.
pub async fn list_rolls(
    store: &TieredStore,
    topic: &str,
    from_us: i64,
    to_us: i64,
) -> Result<Vec<RollFile>, ArchiveError> {
    let top = format!("topic={topic}");
    let listed: Vec<_> = store
        .list(Some(&ObjectPath::from(top.as_str())))
        .try_collect()
        .await
        .map_err(|e| read_err(format!("{top} in {store}"))(e.to_string()))?;
    let mut files: Vec<RollFile> = listed
        .into_iter()
        .filter_map(|meta| {
            let relative = meta.location.to_string();
            let (partition, first, last, hour_us) = parse_roll_path(&relative)?;
            let last_us = hour_us.saturating_add(3_600_000_000);
            (last_us > from_us && hour_us < to_us).then_some(RollFile {
                partition,
                first,
                hour_us,
                last,
                relative,
            })
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The bytes of one file, from the first tier that has it.
async fn read_file(store: &TieredStore, relative: &str) -> Result<Bytes, ArchiveError> {
    let fail = read_err(relative);
    match store.get(&ObjectPath::from(relative)).await {
        Ok(got) => got.bytes().await.map_err(|e| fail(e.to_string())),
        Err(e) => Err(fail(e.to_string())),
    }
}

pub use primespark_schemas::flow::ArchivedRecord;

/// What the archive reader hands the source.
#[derive(Debug)]
pub enum ArchiveItem {
    /// The next record of a partition.
    Record(ArchivedRecord),
    /// The partition has no more records.
    Done(i32),
    /// Reading failed: the backfill stops with this error.
    Failed(ArchiveError),
}

fn column<'b, A: 'static>(
    batch: &'b RecordBatch,
    name: &str,
    location: &str,
) -> Result<&'b A, ArchiveError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<A>())
        .ok_or_else(|| ArchiveError::Schema {
            location: location.to_owned(),
            reason: format!("no column {name} of the expected type"),
        })
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    a.is_valid(i).then(|| a.value(i).to_owned())
}

fn bad_value(location: &str, what: &str, value: &str) -> ArchiveError {
    ArchiveError::Schema {
        location: location.to_owned(),
        reason: format!("{what} {value:?} is not a known value"),
    }
}

/// Rows of a raw batch (telemetry, inference or analytics, told apart by their columns): the
/// inverse of the writer's `raw_batch`.
pub fn rows_from_batch(batch: &RecordBatch, location: &str) -> Result<Vec<RawRow>, ArchiveError> {
    let n = batch.num_rows();
    let time = column::<TimestampMicrosecondArray>(batch, "time", location)?;
    let partition = column::<Int32Array>(batch, "kafka_partition", location)?;
    let offset = column::<Int64Array>(batch, "kafka_offset", location)?;
    let schema = batch.schema();
    let mut rows = Vec::with_capacity(n);
    if schema.column_with_name("metric_name").is_some() {
        let device = column::<StringArray>(batch, "device_id", location)?;
        let metric = column::<StringArray>(batch, "metric_name", location)?;
        let value = column::<Float64Array>(batch, "value", location)?;
        for i in 0..n {
            rows.push(RawRow::Telemetry(TelemetryRow {
                time_us: time.value(i),
                device_id: primespark_schemas::intern::name(device.value(i)),
                metric_name: primespark_schemas::intern::name(metric.value(i)),
                value: value.value(i),
                partition: partition.value(i),
                offset: offset.value(i),
            }));
        }
    } else if schema.column_with_name("model_name").is_some() {
        let model = column::<StringArray>(batch, "model_name", location)?;
        let input = column::<Int64Array>(batch, "input_tokens", location)?;
        let output = column::<Int64Array>(batch, "output_tokens", location)?;
        let latency = column::<Float64Array>(batch, "latency_ms", location)?;
        let source = column::<StringArray>(batch, "source", location)?;
        let status = column::<StringArray>(batch, "status", location)?;
        let device = column::<StringArray>(batch, "device_id", location)?;
        let request = column::<StringArray>(batch, "request_id", location)?;
        let routing = column::<StringArray>(batch, "routing_strategy", location)?;
        let fallback = column::<BooleanArray>(batch, "fallback", location)?;
        for i in 0..n {
            let source = Source::from_name(source.value(i))
                .ok_or_else(|| bad_value(location, "source", source.value(i)))?;
            let status = Status::from_name(status.value(i))
                .ok_or_else(|| bad_value(location, "status", status.value(i)))?;
            let routing_strategy = match opt_str(routing, i) {
                Some(s) => Some(
                    RoutingStrategy::from_name(&s)
                        .ok_or_else(|| bad_value(location, "routing_strategy", &s))?,
                ),
                None => None,
            };
            let tokens = |a: &Int64Array| u32::try_from(a.value(i)).unwrap_or(u32::MAX);
            rows.push(RawRow::Inference(Box::new(InferenceRow {
                event: InferenceEvent {
                    model: model.value(i).to_owned(),
                    prompt_length: tokens(input),
                    response_length: tokens(output),
                    latency_ms: latency.value(i),
                    source,
                    time_us: time.value(i),
                    device_id: opt_str(device, i),
                    request_id: opt_str(request, i),
                    status,
                    routing_strategy,
                    fallback: fallback.value(i),
                },
                partition: partition.value(i),
                offset: offset.value(i),
            })));
        }
    } else if schema.column_with_name("event_type").is_some() {
        let event_type = column::<StringArray>(batch, "event_type", location)?;
        let task_id = column::<StringArray>(batch, "task_id", location)?;
        let task_type = column::<StringArray>(batch, "task_type", location)?;
        let priority = column::<StringArray>(batch, "priority", location)?;
        let agent = column::<StringArray>(batch, "agent_id", location)?;
        let endpoint = column::<StringArray>(batch, "endpoint", location)?;
        let user = column::<StringArray>(batch, "user_id", location)?;
        let data = column::<StringArray>(batch, "data", location)?;
        for i in 0..n {
            let kind = event_type.value(i);
            let event = match TaskEventKind::from_event_type(kind) {
                Some(kind) => AnalyticsEvent::Task(TaskEvent {
                    kind,
                    task_id: opt_str(task_id, i).unwrap_or_default(),
                    task_type: opt_str(task_type, i),
                    priority: opt_str(priority, i),
                    agent_id: opt_str(agent, i),
                    time_us: time.value(i),
                }),
                None => AnalyticsEvent::Api(ApiEvent {
                    event_type: kind.to_owned(),
                    endpoint: opt_str(endpoint, i).unwrap_or_default(),
                    user_id: opt_str(user, i),
                    data: opt_str(data, i),
                    time_us: time.value(i),
                }),
            };
            rows.push(RawRow::Analytics(Box::new(AnalyticsRow {
                event,
                partition: partition.value(i),
                offset: offset.value(i),
            })));
        }
    } else {
        return Err(ArchiveError::Schema {
            location: location.to_owned(),
            reason: "not a raw telemetry, inference or analytics file".into(),
        });
    }
    Ok(rows)
}

/// All rows of one Parquet file.
pub fn rows_from_parquet(bytes: Bytes, location: &str) -> Result<Vec<RawRow>, ArchiveError> {
    let schema_err = |e: &dyn std::fmt::Display| ArchiveError::Schema {
        location: location.to_owned(),
        reason: e.to_string(),
    };
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| schema_err(&e))?
        .build()
        .map_err(|e| schema_err(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| schema_err(&e))?;
        rows.extend(rows_from_batch(&batch, location)?);
    }
    Ok(rows)
}

/// Reads the rolls of some partitions in the background and hands their records out in offset
/// order per partition, one roll per partition in turn (so the partitions' watermarks advance
/// together), through a bounded channel: the reader waits while the dataflow is busy.
pub struct ArchiveReader {
    rx: mpsc::Receiver<ArchiveItem>,
}

impl ArchiveReader {
    /// Starts reading `files` (of the partitions this reader serves; each partition in
    /// `partitions` gets a `Done`, even without files) on the runtime of `handle`.
    pub fn spawn(
        handle: &tokio::runtime::Handle,
        store: Arc<TieredStore>,
        files: Vec<RollFile>,
        partitions: Vec<i32>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(16_384);
        // partition -> roll (first offset) -> its files.
        let mut rolls: BTreeMap<i32, BTreeMap<i64, Vec<RollFile>>> =
            partitions.iter().map(|p| (*p, BTreeMap::new())).collect();
        for f in files {
            if let Some(by_first) = rolls.get_mut(&f.partition) {
                by_first.entry(f.first).or_default().push(f);
            }
        }
        handle.spawn(async move {
            let mut queues: Vec<(
                i32,
                std::collections::btree_map::IntoIter<i64, Vec<RollFile>>,
            )> = rolls.into_iter().map(|(p, r)| (p, r.into_iter())).collect();
            while !queues.is_empty() {
                let mut next_round = Vec::with_capacity(queues.len());
                for (partition, mut queue) in queues {
                    let Some((_, files)) = queue.next() else {
                        if tx.send(ArchiveItem::Done(partition)).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    match read_roll(&store, &files).await {
                        Ok(records) => {
                            for r in records {
                                if tx.send(ArchiveItem::Record(r)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(ArchiveItem::Failed(e)).await;
                            return;
                        }
                    }
                    next_round.push((partition, queue));
                }
                queues = next_round;
            }
        });
        Self { rx }
    }

    /// The next item, without waiting.
    pub fn poll(&mut self) -> Option<ArchiveItem> {
        self.rx.try_recv().ok()
    }
}

impl primespark_schemas::flow::Feed for ArchiveReader {
    fn poll(&mut self) -> primespark_schemas::flow::Polled {
        use primespark_schemas::flow::Polled;
        match ArchiveReader::poll(self) {
            None => Polled::Empty,
            Some(ArchiveItem::Record(r)) => Polled::Rows(r),
            Some(ArchiveItem::Done(p)) => Polled::Done(p),
            Some(ArchiveItem::Failed(e)) => Polled::Failed(e.to_string()),
        }
    }

    fn kind(&self) -> &'static str {
        "archive"
    }
}

/// The records of one roll (all its hour files), in offset order.
async fn read_roll(
    store: &TieredStore,
    files: &[RollFile],
) -> Result<Vec<ArchivedRecord>, ArchiveError> {
    let mut rows = Vec::new();
    for f in files {
        let started = std::time::Instant::now();
        let bytes = read_file(store, &f.relative).await?;
        let size = bytes.len() as u64;
        let location = f.relative.clone();
        let file_rows = tokio::task::spawn_blocking(move || rows_from_parquet(bytes, &location))
            .await
            .map_err(|e| ArchiveError::Read {
                location: f.relative.clone(),
                reason: e.to_string(),
            })??;
        ArchiveFileRead {
            file: &f.relative,
            rows: file_rows.len() as u64,
            bytes: size,
            duration: started.elapsed(),
        }
        .emit();
        rows.extend(file_rows);
    }
    // Stable: the rows of one record keep their order.
    rows.sort_by_key(|r| r.position().1);
    let mut records: Vec<ArchivedRecord> = Vec::new();
    for row in rows {
        let (partition, offset) = row.position();
        match records.last_mut() {
            Some(r) if r.offset == offset => r.rows.push(row),
            _ => records.push(ArchivedRecord {
                partition,
                offset,
                time_us: row.time_us(),
                rows: vec![row],
            }),
        }
    }
    Ok(records)
}

/// The archive's tiers (SQL, backfill): the NAS folder `nas` (skipped when it does not exist: nothing
/// was archived there) and the `bucket` (rooted at `s3.prefix`), in that order.
pub fn tiers(
    nas: Option<&Path>,
    bucket: Option<Arc<dyn ObjectStore>>,
) -> Result<TieredStore, ArchiveError> {
    let mut tiers: Vec<(&'static str, Arc<dyn ObjectStore>)> = Vec::new();
    if let Some(root) = nas.filter(|r| r.exists()) {
        let local = LocalFileSystem::new_with_prefix(root)
            .map_err(|e| read_err(root.display().to_string())(e.to_string()))?;
        tiers.push(("nas", Arc::new(local)));
    }
    tiers.extend(bucket.map(|b| ("bucket", b)));
    Ok(TieredStore::from_tiers(tiers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nas::{raw_batch, ParquetArchive};

    fn telemetry(offset: i64, metric: &str, time_us: i64) -> RawRow {
        RawRow::Telemetry(TelemetryRow {
            time_us,
            device_id: "pi-1".into(),
            metric_name: metric.into(),
            value: offset as f64 + 0.5,
            partition: 2,
            offset,
        })
    }

    fn inference(offset: i64) -> RawRow {
        RawRow::Inference(Box::new(InferenceRow {
            event: InferenceEvent {
                model: "llama".into(),
                prompt_length: 12,
                response_length: 40,
                latency_ms: 81.5,
                source: Source::Edge,
                time_us: 1_762_351_387_000_000,
                device_id: Some("pi-1".into()),
                request_id: None,
                status: Status::Error,
                routing_strategy: Some(RoutingStrategy::CloudFirst),
                fallback: true,
            },
            partition: 0,
            offset,
        }))
    }

    fn analytics(offset: i64) -> Vec<RawRow> {
        let t = 1_762_351_387_000_000;
        vec![
            RawRow::Analytics(Box::new(AnalyticsRow {
                event: AnalyticsEvent::Task(TaskEvent {
                    kind: TaskEventKind::Assigned,
                    task_id: "t-9".into(),
                    task_type: Some("ocr".into()),
                    priority: None,
                    agent_id: Some("agent-2".into()),
                    time_us: t,
                }),
                partition: 1,
                offset,
            })),
            RawRow::Analytics(Box::new(AnalyticsRow {
                event: AnalyticsEvent::Api(ApiEvent {
                    event_type: "api_request".into(),
                    endpoint: "/v1/x".into(),
                    user_id: Some("u".into()),
                    data: Some(r#"{"a":1}"#.into()),
                    time_us: t + 1,
                }),
                partition: 1,
                offset: offset + 1,
            })),
        ]
    }

    #[test]
    fn every_raw_batch_reads_back_as_the_rows_written() {
        let t = 1_762_351_387_000_000;
        for rows in [
            vec![telemetry(4, "cpu", t), telemetry(4, "mem", t)],
            vec![inference(7)],
            analytics(3),
        ] {
            let batch = raw_batch(&rows).unwrap();
            assert_eq!(rows_from_batch(&batch, "x").unwrap(), rows);
        }
    }

    #[test]
    fn roll_paths_parse_and_others_do_not() {
        let (p, first, last, hour) = parse_roll_path(
            "topic=edge.telemetry/date=2025-11-05/hour=14/part-p003-o00000000000000000010-00000000000000000012.parquet",
        )
        .unwrap();
        assert_eq!((p, first, last), (3, 10, 12));
        assert_eq!(hour, 1_762_351_200_000_000);
        assert!(parse_roll_path(
            "topic=x/date=2025-11-05/hour=14/.part-p003-o1-2.parquet.inprogress"
        )
        .is_none());
        assert!(
            parse_roll_path("table=device_metrics_1m/date=2025-11-05/part-b1.parquet").is_none()
        );
    }

    #[tokio::test]
    async fn rolls_split_over_hours_come_back_as_whole_records_in_offset_order() {
        let dir = tempfile::tempdir().unwrap();
        let archive = ParquetArchive::new(dir.path(), "edge.telemetry", 1024);
        let t = 1_762_351_387_000_000;
        let hour = 3_600_000_000;
        // Offsets 10..=13 over two hours; the roll 14..=14 after it.
        archive
            .write_roll(
                2,
                10,
                13,
                &[
                    telemetry(10, "cpu", t),
                    telemetry(10, "mem", t),
                    telemetry(11, "cpu", t + hour),
                    telemetry(12, "cpu", t - 5),
                    telemetry(13, "cpu", t + hour + 1),
                ],
            )
            .unwrap();
        archive
            .write_roll(2, 14, 14, &[telemetry(14, "cpu", t + 2)])
            .unwrap();
        let stores = Arc::new(tiers(Some(dir.path()), None).unwrap());
        let files = list_rolls(&stores, "edge.telemetry", i64::MIN, i64::MAX)
            .await
            .unwrap();
        assert_eq!(files.len(), 3);
        // Only the first hour: offsets 10, 12, 14.
        let first_hour = list_rolls(&stores, "edge.telemetry", t - 1, t + 10)
            .await
            .unwrap();
        assert_eq!(first_hour.len(), 2);

        let mut reader = ArchiveReader::spawn(
            &tokio::runtime::Handle::current(),
            stores,
            files,
            vec![2, 5],
        );
        let mut records = Vec::new();
        let mut done = Vec::new();
        while done.len() < 2 {
            match reader.poll() {
                Some(ArchiveItem::Record(r)) => records.push(r),
                Some(ArchiveItem::Done(p)) => done.push(p),
                Some(ArchiveItem::Failed(e)) => panic!("{e}"),
                None => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
        done.sort();
        assert_eq!(done, vec![2, 5]);
        let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![10, 11, 12, 13, 14]);
        assert_eq!(records[0].rows.len(), 2);
        assert_eq!(records[2].time_us, t - 5);
    }

    #[tokio::test]
    async fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("topic=t/date=2025-11-05/hour=14");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("part-p000-o1-2.parquet"), b"not parquet").unwrap();
        let stores = Arc::new(tiers(Some(dir.path()), None).unwrap());
        let files = list_rolls(&stores, "t", i64::MIN, i64::MAX).await.unwrap();
        let mut reader =
            ArchiveReader::spawn(&tokio::runtime::Handle::current(), stores, files, vec![0]);
        loop {
            match reader.poll() {
                Some(ArchiveItem::Failed(e)) => {
                    assert!(e.to_string().contains("part-p000-o1-2.parquet"), "{e}");
                    break;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
    }
}
