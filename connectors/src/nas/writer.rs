//! Writing and recovering the Parquet archive.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use chrono::{DateTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use primespark_schemas::columnar;
use primespark_schemas::rows::{
    Agg, AggRow, InferenceRow, InferenceStatsRow, MetricAggRow, RawRow, RoutingStatsRow,
    TelemetryRow,
};

/// Archive failures.
#[derive(Debug, thiserror::Error)]
pub enum NasError {
    /// File system error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Arrow or Parquet encoding failed.
    #[error("encoding parquet: {0}")]
    Encode(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NasError + '_ {
    move |source| NasError::Io {
        path: path.to_owned(),
        source,
    }
}

fn encode(e: impl std::fmt::Display) -> NasError {
    NasError::Encode(e.to_string())
}

fn times(values: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from_iter_values(values).with_timezone("UTC"))
}

/// Builds the Arrow batch of raw rows of one stream (all rows of one kind, as a topic's rolls
/// are).
pub fn raw_batch(rows: &[RawRow]) -> Result<RecordBatch, NasError> {
    let mut telemetry = Vec::new();
    let mut inference = Vec::new();
    for r in rows {
        match r {
            RawRow::Telemetry(t) => telemetry.push(t),
            RawRow::Inference(i) => inference.push(i),
        }
    }
    match (telemetry.is_empty(), inference.is_empty()) {
        (_, true) => telemetry_batch(&telemetry),
        (true, false) => inference_batch(&inference),
        (false, false) => Err(NasError::Encode(
            "a roll mixes telemetry and inference rows".into(),
        )),
    }
}

/// Builds the Arrow batch of raw inference rows.
pub fn inference_batch(rows: &[&InferenceRow]) -> Result<RecordBatch, NasError> {
    let e = |f: fn(&InferenceRow) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from(
            rows.iter().map(|r| f(r)).collect::<Vec<_>>(),
        ))
    };
    RecordBatch::try_new(
        columnar::inference_raw(),
        vec![
            times(rows.iter().map(|r| r.event.time_us)),
            e(|r| Some(r.event.model.as_str())),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| i64::from(r.event.prompt_length)),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| i64::from(r.event.response_length)),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.event.latency_ms),
            )),
            e(|r| Some(r.event.source.as_str())),
            e(|r| Some(r.event.status.as_str())),
            e(|r| r.event.device_id.as_deref()),
            e(|r| r.event.request_id.as_deref()),
            e(|r| r.event.routing_strategy.map(|s| s.as_str())),
            Arc::new(BooleanArray::from(
                rows.iter().map(|r| r.event.fallback).collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.partition),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of `inference_stats_1m` rows.
pub fn inference_stats_batch(rows: &[&InferenceStatsRow]) -> Result<RecordBatch, NasError> {
    let f = |g: fn(&InferenceStatsRow) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| g(r))))
    };
    RecordBatch::try_new(
        columnar::inference_stats_1m(),
        vec![
            times(rows.iter().map(|r| r.bucket_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.model.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.source.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.count))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.errors))),
            f(|r| r.latency_p50_ms),
            f(|r| r.latency_p95_ms),
            f(|r| r.latency_p99_ms),
            f(|r| r.avg_input_tokens),
            f(|r| r.avg_output_tokens),
            Arc::new(Float64Array::from(
                rows.iter()
                    .map(|r| r.output_tokens_per_s)
                    .collect::<Vec<_>>(),
            )),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of `routing_stats_1m` rows.
pub fn routing_stats_batch(rows: &[&RoutingStatsRow]) -> Result<RecordBatch, NasError> {
    let opt = |g: fn(&RoutingStatsRow) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(
            rows.iter().map(|r| g(r)).collect::<Vec<_>>(),
        ))
    };
    RecordBatch::try_new(
        columnar::routing_stats_1m(),
        vec![
            times(rows.iter().map(|r| r.bucket_us)),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.routing_strategy.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.edge_requests),
            )),
            Arc::new(Int64Array::from_iter_values(
                rows.iter().map(|r| r.cloud_requests),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.edge_share),
            )),
            opt(|r| r.cloud_fallback_rate),
            opt(|r| r.edge_success_rate),
            opt(|r| r.cloud_success_rate),
            opt(|r| r.edge_p95_ms),
            opt(|r| r.cloud_p95_ms),
        ],
    )
    .map_err(encode)
}

/// Builds the Arrow batch of aggregate rows of one table.
pub fn agg_batch(rows: &[AggRow]) -> Result<RecordBatch, NasError> {
    let mut metrics = Vec::new();
    let mut inference = Vec::new();
    let mut routing = Vec::new();
    for r in rows {
        match &r.row {
            Agg::Metrics(m) => metrics.push(m),
            Agg::Inference(i) => inference.push(i),
            Agg::Routing(x) => routing.push(x),
        }
    }
    match (metrics.is_empty(), inference.is_empty(), routing.is_empty()) {
        (false, true, true) | (true, true, true) => aggregate_batch(&metrics),
        (true, false, true) => inference_stats_batch(&inference),
        (true, true, false) => routing_stats_batch(&routing),
        _ => Err(NasError::Encode("an aggregate file mixes tables".into())),
    }
}

/// Builds the Arrow batch of raw telemetry rows.
pub fn telemetry_batch(rows: &[&TelemetryRow]) -> Result<RecordBatch, NasError> {
    let time = TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.time_us))
        .with_timezone("UTC");
    let device = StringArray::from_iter_values(rows.iter().map(|r| r.device_id.as_str()));
    let metric = StringArray::from_iter_values(rows.iter().map(|r| r.metric_name.as_str()));
    let value = Float64Array::from_iter_values(rows.iter().map(|r| r.value));
    let partition = Int32Array::from_iter_values(rows.iter().map(|r| r.partition));
    let offset = Int64Array::from_iter_values(rows.iter().map(|r| r.offset));
    RecordBatch::try_new(
        columnar::telemetry_raw(),
        vec![
            Arc::new(time),
            Arc::new(device),
            Arc::new(metric),
            Arc::new(value),
            Arc::new(partition),
            Arc::new(offset),
        ],
    )
    .map_err(|e| NasError::Encode(e.to_string()))
}

/// Builds the Arrow batch of 1-minute aggregate rows.
pub fn aggregate_batch(rows: &[&MetricAggRow]) -> Result<RecordBatch, NasError> {
    let bucket = TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.bucket_us))
        .with_timezone("UTC");
    let device = StringArray::from_iter_values(rows.iter().map(|r| r.device_id.as_str()));
    let metric = StringArray::from_iter_values(rows.iter().map(|r| r.metric_name.as_str()));
    let count = Int64Array::from_iter_values(rows.iter().map(|r| r.count));
    let sum = Float64Array::from_iter_values(rows.iter().map(|r| r.sum));
    let min = Float64Array::from_iter_values(rows.iter().map(|r| r.min));
    let max = Float64Array::from_iter_values(rows.iter().map(|r| r.max));
    let avg = Float64Array::from_iter_values(rows.iter().map(|r| r.sum / r.count as f64));
    RecordBatch::try_new(
        columnar::device_metrics_1m(),
        vec![
            Arc::new(bucket),
            Arc::new(device),
            Arc::new(metric),
            Arc::new(count),
            Arc::new(sum),
            Arc::new(min),
            Arc::new(max),
            Arc::new(avg),
        ],
    )
    .map_err(|e| NasError::Encode(e.to_string()))
}

/// Writes closed windows under `<root>/table=<table>/date=YYYY-MM-DD/`, one file per table and
/// bucket named by the bucket start: a replayed window rewrites the same file with the same rows.
pub fn write_aggregate_files(
    root: &Path,
    rows: &[AggRow],
    row_group_rows: usize,
) -> Result<Vec<PathBuf>, NasError> {
    let mut by_bucket: BTreeMap<(&'static str, i64), Vec<AggRow>> = BTreeMap::new();
    for r in rows {
        by_bucket
            .entry((r.table(), r.bucket_us()))
            .or_default()
            .push(r.clone());
    }
    let mut written = Vec::new();
    for ((table, bucket), mut rows) in by_bucket {
        // Same rows, same bytes: sort by the table's key.
        rows.sort_by(|a, b| agg_key(a).cmp(&agg_key(b)));
        let start =
            DateTime::<Utc>::from_timestamp_micros(bucket).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let dir = root
            .join(format!("table={table}"))
            .join(format!("date={}", start.format("%Y-%m-%d")));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let name = format!("part-b{bucket:020}.parquet");
        let final_path = dir.join(&name);
        let tmp_path = dir.join(format!(".{name}.inprogress"));
        write_batch_file(&tmp_path, &agg_batch(&rows)?, row_group_rows)?;
        fs::rename(&tmp_path, &final_path).map_err(io(&final_path))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        written.push(final_path);
    }
    Ok(written)
}

fn agg_key(r: &AggRow) -> (&str, &str) {
    match &r.row {
        Agg::Metrics(m) => (m.device_id.as_str(), m.metric_name.as_str()),
        Agg::Inference(i) => (i.model.as_str(), i.source.as_str()),
        Agg::Routing(x) => (x.routing_strategy.as_str(), ""),
    }
}

fn write_batch_file(
    path: &Path,
    batch: &RecordBatch,
    row_group_rows: usize,
) -> Result<(), NasError> {
    let file = fs::File::create(path).map_err(io(path))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(|e| NasError::Encode(e.to_string()))?,
        ))
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props))
        .map_err(|e| NasError::Encode(e.to_string()))?;
    writer
        .write(batch)
        .map_err(|e| NasError::Encode(e.to_string()))?;
    let file = writer
        .into_inner()
        .map_err(|e| NasError::Encode(e.to_string()))?;
    file.sync_all().map_err(io(path))?;
    Ok(())
}

/// The Parquet archive of one topic.
#[derive(Debug, Clone)]
pub struct ParquetArchive {
    topic_dir: PathBuf,
    row_group_rows: usize,
}

/// Parses `part-pPPP-oFIRST-LAST.parquet` into (partition, first offset).
fn parse_name(name: &str) -> Option<(i32, i64)> {
    let rest = name.strip_prefix("part-p")?.strip_suffix(".parquet")?;
    let (p, rest) = rest.split_once("-o")?;
    let (first, _last) = rest.split_once('-')?;
    Some((p.parse().ok()?, first.parse().ok()?))
}

impl ParquetArchive {
    /// The archive of `topic` under `root`.
    pub fn new(root: &Path, topic: &str, row_group_rows: usize) -> Self {
        Self {
            topic_dir: root.join(format!("topic={topic}")),
            row_group_rows,
        }
    }

    /// `<root>/topic=<topic>`, the table path for SQL.
    pub fn topic_dir(&self) -> &Path {
        &self.topic_dir
    }

    /// Removes temporary files and rolls at or beyond the committed offsets (left by a crash
    /// between rename and offset commit); they are rewritten by the replay. Returns how many
    /// files were removed.
    ///
    /// Only partitions for which `owned` is true are touched: in a cluster each process
    /// recovers the partitions its workers read, never files another process is writing.
    pub fn recover(
        &self,
        committed: &HashMap<i32, i64>,
        owned: &dyn Fn(i32) -> bool,
    ) -> Result<usize, NasError> {
        fs::create_dir_all(&self.topic_dir).map_err(io(&self.topic_dir))?;
        let mut removed = 0;
        let mut stack = vec![self.topic_dir.clone()];
        while let Some(dir) = stack.pop() {
            for entry in fs::read_dir(&dir).map_err(io(&dir))? {
                let entry = entry.map_err(io(&dir))?;
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let in_progress = name
                    .strip_prefix('.')
                    .and_then(|n| n.strip_suffix(".inprogress"));
                let orphan = if let Some(inner) = in_progress {
                    // Unparsable temp names are ours too (nobody else writes `.inprogress`).
                    parse_name(inner).is_none_or(|(partition, _)| owned(partition))
                } else if let Some((partition, first)) = parse_name(&name) {
                    owned(partition) && first >= committed.get(&partition).copied().unwrap_or(0)
                } else {
                    false
                };
                if orphan {
                    fs::remove_file(&path).map_err(io(&path))?;
                    tracing::info!(path = %path.display(), "removed uncommitted parquet file");
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Writes one roll of `partition` covering offsets `first..=last`, one file per hour of
    /// event time, each atomically visible. Returns the files written.
    pub fn write_roll(
        &self,
        partition: i32,
        first: i64,
        last: i64,
        rows: &[RawRow],
    ) -> Result<Vec<PathBuf>, NasError> {
        let mut by_hour: BTreeMap<i64, Vec<RawRow>> = BTreeMap::new();
        for r in rows {
            by_hour
                .entry(r.time_us().div_euclid(3_600_000_000))
                .or_default()
                .push(r.clone());
        }
        let mut written = Vec::with_capacity(by_hour.len());
        for (hour, rows) in by_hour {
            let start =
                DateTime::<Utc>::from_timestamp(hour * 3600, 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
            let dir = self
                .topic_dir
                .join(format!("date={}", start.format("%Y-%m-%d")))
                .join(format!("hour={}", start.format("%H")));
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            let name = format!("part-p{partition:03}-o{first:020}-{last:020}.parquet");
            let final_path = dir.join(&name);
            // Not `*.parquet`, so SQL listings and globs skip it until the rename.
            let tmp_path = dir.join(format!(".{name}.inprogress"));
            self.write_file(&tmp_path, &rows)?;
            fs::rename(&tmp_path, &final_path).map_err(io(&final_path))?;
            // Make the rename itself durable.
            fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&dir))?;
            written.push(final_path);
        }
        Ok(written)
    }

    fn write_file(&self, path: &Path, rows: &[RawRow]) -> Result<(), NasError> {
        write_batch_file(path, &raw_batch(rows)?, self.row_group_rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time_us: i64, offset: i64) -> RawRow {
        RawRow::Telemetry(TelemetryRow {
            time_us,
            device_id: "d".into(),
            metric_name: "m".into(),
            value: offset as f64,
            partition: 1,
            offset,
        })
    }

    #[test]
    fn rolls_split_by_hour_and_recover_removes_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let archive = ParquetArchive::new(dir.path(), "edge.telemetry", 1024);
        let t0 = 1_762_351_387_000_000; // 2025-11-05T14:03:07Z
        let files = archive
            .write_roll(
                1,
                10,
                12,
                &[row(t0, 10), row(t0 + 3_600_000_000, 11), row(t0, 12)],
            )
            .unwrap();
        assert_eq!(files.len(), 2);
        assert!(files[0]
            .to_string_lossy()
            .contains("topic=edge.telemetry/date=2025-11-05/hour=14/part-p001-o"));
        let later = archive.write_roll(1, 13, 13, &[row(t0, 13)]).unwrap();
        // Offsets committed up to 13: the roll starting at 13 is an orphan.
        let removed = archive
            .recover(&HashMap::from([(1, 13)]), &|_| true)
            .unwrap();
        assert_eq!(removed, 1);
        assert!(!later[0].exists());
        assert!(files.iter().all(|f| f.exists()));
    }

    #[test]
    fn names_parse() {
        assert_eq!(
            parse_name("part-p003-o00000000000000000042-00000000000000000997.parquet"),
            Some((3, 42))
        );
        assert_eq!(parse_name("other.parquet"), None);
    }
}
