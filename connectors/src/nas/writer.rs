//! Writing and recovering the Parquet archive.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Float64Array, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use chrono::{DateTime, Utc};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use primespark_schemas::columnar;
use primespark_schemas::rows::{MetricAggRow, TelemetryRow};

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

/// Builds the Arrow batch of raw telemetry rows.
pub fn telemetry_batch(rows: &[TelemetryRow]) -> Result<RecordBatch, NasError> {
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
pub fn aggregate_batch(rows: &[MetricAggRow]) -> Result<RecordBatch, NasError> {
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

/// Writes closed windows under `<root>/table=<table>/date=YYYY-MM-DD/`, one file per bucket
/// named by the bucket start: a replayed window rewrites the same file with the same rows.
pub fn write_aggregate_files(
    root: &Path,
    table: &str,
    rows: &[MetricAggRow],
    row_group_rows: usize,
) -> Result<Vec<PathBuf>, NasError> {
    let mut by_bucket: BTreeMap<i64, Vec<MetricAggRow>> = BTreeMap::new();
    for r in rows {
        by_bucket.entry(r.bucket_us).or_default().push(r.clone());
    }
    let mut written = Vec::new();
    for (bucket, mut rows) in by_bucket {
        rows.sort_by(|a, b| (&a.device_id, &a.metric_name).cmp(&(&b.device_id, &b.metric_name)));
        let start =
            DateTime::<Utc>::from_timestamp_micros(bucket).unwrap_or(DateTime::<Utc>::MIN_UTC);
        let dir = root
            .join(format!("table={table}"))
            .join(format!("date={}", start.format("%Y-%m-%d")));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let name = format!("part-b{bucket:020}.parquet");
        let final_path = dir.join(&name);
        let tmp_path = dir.join(format!(".{name}.inprogress"));
        write_batch_file(&tmp_path, &aggregate_batch(&rows)?, row_group_rows)?;
        fs::rename(&tmp_path, &final_path).map_err(io(&final_path))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))?;
        written.push(final_path);
    }
    Ok(written)
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
        rows: &[TelemetryRow],
    ) -> Result<Vec<PathBuf>, NasError> {
        let mut by_hour: BTreeMap<i64, Vec<TelemetryRow>> = BTreeMap::new();
        for r in rows {
            by_hour
                .entry(r.time_us.div_euclid(3_600_000_000))
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

    fn write_file(&self, path: &Path, rows: &[TelemetryRow]) -> Result<(), NasError> {
        write_batch_file(path, &telemetry_batch(rows)?, self.row_group_rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(time_us: i64, offset: i64) -> TelemetryRow {
        TelemetryRow {
            time_us,
            device_id: "d".into(),
            metric_name: "m".into(),
            value: offset as f64,
            partition: 1,
            offset,
        }
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
