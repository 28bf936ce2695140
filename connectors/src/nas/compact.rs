//! Compaction of the 1-minute aggregate files: once an hour of windows is final, its sixty
//! `part-b<bucket>.parquet` files (one per window, as the aggregate writer rewrites them while
//! late events may still change a window) become one `part-h<hour>.parquet` in the same folder.
//! A day of a `*_1m` table is then 24 files instead of 1,440: a dashboard query over a day
//! opens 24 files, and the NAS and the bucket do not fill with small objects.
//!
//! The switch is safe for readers at every step: an hour file hides the minute files of its
//! hour from every listing ([`hidden_by_hour_files`], applied by the archive's
//! [`crate::archive::TieredStore`]), so between the rename of the hour file and the removal of
//! the minute files nothing is counted twice, and before the rename the minute files are
//! whole. A query that listed the minute files just before the rename still reads them: a
//! running pipeline removes merged minute files only `nas.compaction_grace` later (at least
//! `query.timeout`, so no query that could have listed them is still running; the pass returns
//! them in [`CompactReport::merged`] and skips them while they wait). Offline, [`compact`]
//! removes them at once. A crash before the removal leaves minute files beside their hour
//! file; the next pass merges them again (a minute file's rows replace its window's rows in
//! the hour file, so the pass is idempotent) and returns them for removal. An hour file with
//! minute files beside it stays on the NAS (the tierer skips it), so that pass always finds it.
//!
//! Only final hours are compacted: every window of the hour ends at least
//! `windows.allowed_lateness` before the committed watermark, so no late event or replay
//! rewrites one of its minute files again. Minute files never tier to the bucket
//! ([`is_minute_file`]); hour files tier like any other file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::{Array, RecordBatch, RecordBatchReader, TimestampMicrosecondArray};
use arrow::compute::concat_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::writer::{io, publish_batch, sync_dir};
use super::NasError;
use crate::metrics::AggregatesCompacted;

/// An hour, in microseconds.
const HOUR_US: i64 = 3_600_000_000;

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Hour files written.
    pub hours: u64,
    /// Minute files merged into them and removed.
    pub minute_files: u64,
    /// Rows in the hour files written.
    pub rows: u64,
    /// The minute files merged, still in place: the caller removes them with
    /// [`remove_merged`] once no reader can still be reading them.
    pub merged: Vec<PathBuf>,
}

/// The window start of a minute file name `part-b<bucket>.parquet`.
pub fn minute_file_bucket(name: &str) -> Option<i64> {
    name.strip_prefix("part-b")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

/// The hour start of an hour file name `part-h<hour>.parquet`.
pub fn hour_file_start(name: &str) -> Option<i64> {
    name.strip_prefix("part-h")?
        .strip_suffix(".parquet")?
        .parse()
        .ok()
}

/// The name of the minute file of the window starting at `bucket_us`.
pub fn minute_file_name(bucket_us: i64) -> String {
    format!("part-b{bucket_us:020}.parquet")
}

/// The start of the hour `us` lies in.
pub fn hour_start(us: i64) -> i64 {
    us.saturating_sub(us.rem_euclid(HOUR_US))
}

/// The name of the hour file of the hour starting at `hour_us`.
pub fn hour_file_name(hour_us: i64) -> String {
    format!("part-h{hour_us:020}.parquet")
}

/// Whether `relative` (a path under the archive root) is a minute file of a 1-minute aggregate
/// table: compacted on the NAS, never tiered as it is.
pub fn is_minute_file(relative: &str) -> bool {
    let mut parts = relative.rsplit('/');
    let Some(name) = parts.next() else {
        return false;
    };
    let _date = parts.next();
    let table = parts.next().unwrap_or("");
    minute_file_bucket(name).is_some() && minute_table(table)
}

/// `table=<name>` folders of 1-minute tables.
fn minute_table(folder: &str) -> bool {
    folder.starts_with("table=") && folder.ends_with("_1m")
}

/// For each listed path, whether an hour file in the same folder covers it: a minute file
/// whose window lies in the hour of a `part-h` file listed beside it. Such a file has been
/// compacted (it is about to be removed) and must not be read again.
pub fn hidden_by_hour_files<'a>(paths: impl IntoIterator<Item = &'a str> + Clone) -> Vec<bool> {
    let hours: BTreeSet<(&str, i64)> = paths
        .clone()
        .into_iter()
        .filter_map(|p| {
            let (folder, name) = p.rsplit_once('/').unwrap_or(("", p));
            Some((folder, hour_file_start(name)?))
        })
        .collect();
    paths
        .into_iter()
        .map(|p| {
            let (folder, name) = p.rsplit_once('/').unwrap_or(("", p));
            minute_file_bucket(name).is_some_and(|b| hours.contains(&(folder, hour_start(b))))
        })
        .collect()
}

fn read_file(path: &Path) -> Result<Option<RecordBatch>, NasError> {
    let file = fs::File::open(path).map_err(io(path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| NasError::Encode(format!("{}: {e}", path.display())))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NasError::Encode(format!("{}: {e}", path.display())))?;
    if batches.is_empty() {
        return Ok(None);
    }
    concat_batches(&schema, &batches)
        .map(Some)
        .map_err(|e| NasError::Encode(format!("{}: {e}", path.display())))
}

/// The rows of `batch` by window start, as contiguous slices (the files are written sorted by
/// window, then key).
fn by_bucket(batch: &RecordBatch, path: &Path) -> Result<Vec<(i64, RecordBatch)>, NasError> {
    let buckets = batch
        .column_by_name("bucket")
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
        .ok_or_else(|| NasError::Encode(format!("{}: no bucket column", path.display())))?;
    let mut out: Vec<(i64, RecordBatch)> = Vec::new();
    let mut start = 0;
    for i in 1..=buckets.len() {
        if i == buckets.len() || buckets.value(i) != buckets.value(start) {
            out.push((buckets.value(start), batch.slice(start, i - start)));
            start = i;
        }
    }
    Ok(out)
}

/// One hour of one table folder: its minute files and its hour file, if any.
#[derive(Default)]
struct Hour {
    minutes: BTreeMap<i64, PathBuf>,
    hour_file: Option<PathBuf>,
}

/// Compacts every hour of every 1-minute table under `root` that ends at or before
/// `final_before_us` and still has minute files, and removes the merged minute files at once:
/// for an archive no query reads meanwhile (a backfill, a bench). See the module docs.
pub fn compact(
    root: &Path,
    final_before_us: i64,
    row_group_rows: usize,
) -> Result<CompactReport, NasError> {
    let report = compact_tables(
        root,
        None,
        final_before_us,
        row_group_rows,
        &BTreeSet::new(),
    )?;
    remove_merged(&report.merged)?;
    Ok(report)
}

/// One pass over the 1-minute tables named in `only` (`None`: all): a stream compacts its own
/// tables with its own watermark, never another stream's hours before they are final. Minute
/// files in `waiting` (merged by an earlier pass, not yet removed) are skipped; the files this
/// pass merges are left in place and returned in [`CompactReport::merged`].
pub fn compact_tables(
    root: &Path,
    only: Option<&[&str]>,
    final_before_us: i64,
    row_group_rows: usize,
    waiting: &BTreeSet<PathBuf>,
) -> Result<CompactReport, NasError> {
    let mut report = CompactReport::default();
    let Ok(tables) = fs::read_dir(root) else {
        return Ok(report);
    };
    for table in tables.flatten() {
        let table_name = table.file_name().to_string_lossy().into_owned();
        if !minute_table(&table_name) || !table.path().is_dir() {
            continue;
        }
        let named = table_name.strip_prefix("table=").unwrap_or_default();
        if only.is_some_and(|t| !t.contains(&named)) {
            continue;
        }
        for date in fs::read_dir(table.path())
            .map_err(io(&table.path()))?
            .flatten()
        {
            let dir = date.path();
            if !dir.is_dir() {
                continue;
            }
            let mut hours: BTreeMap<i64, Hour> = BTreeMap::new();
            for f in fs::read_dir(&dir).map_err(io(&dir))?.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Some(b) = minute_file_bucket(&name) {
                    if waiting.contains(&f.path()) {
                        continue;
                    }
                    hours
                        .entry(hour_start(b))
                        .or_default()
                        .minutes
                        .insert(b, f.path());
                } else if let Some(h) = hour_file_start(&name) {
                    hours.entry(h).or_default().hour_file = Some(f.path());
                }
            }
            for (hour_us, hour) in hours {
                if hour.minutes.is_empty() || hour_us.saturating_add(HOUR_US) > final_before_us {
                    continue;
                }
                let started = Instant::now();
                let rows = compact_hour(&dir, hour_us, &hour, row_group_rows)?;
                AggregatesCompacted {
                    table: table_name.trim_start_matches("table="),
                    hour_us,
                    minute_files: hour.minutes.len() as u64,
                    rows,
                    duration: started.elapsed(),
                }
                .emit();
                report.hours += 1;
                report.minute_files += hour.minutes.len() as u64;
                report.rows += rows;
                report.merged.extend(hour.minutes.into_values());
            }
        }
    }
    Ok(report)
}

/// Writes the hour file of `hour` from its minute files (and the windows of an earlier hour
/// file that no minute file replaces). Returns its rows; the minute files stay.
fn compact_hour(
    dir: &Path,
    hour_us: i64,
    hour: &Hour,
    row_group_rows: usize,
) -> Result<u64, NasError> {
    // Window start -> its rows: an existing hour file first, minute files replacing windows.
    let mut windows: BTreeMap<i64, RecordBatch> = BTreeMap::new();
    if let Some(path) = &hour.hour_file {
        if let Some(batch) = read_file(path)? {
            windows.extend(by_bucket(&batch, path)?);
        }
    }
    for (bucket, path) in &hour.minutes {
        match read_file(path)? {
            Some(batch) => windows.insert(*bucket, batch),
            None => windows.remove(bucket),
        };
    }
    let name = hour_file_name(hour_us);
    let rows: u64 = windows.values().map(|b| b.num_rows() as u64).sum();
    if let Some(first) = windows.values().next() {
        let batch = concat_batches(&first.schema(), windows.values())
            .map_err(|e| NasError::Encode(format!("{}: {e}", dir.join(&name).display())))?;
        publish_batch(dir, &name, &batch, row_group_rows)?;
    }
    if crate::failpoint::hit("compact.published").is_err() {
        return Err(NasError::Encode("failpoint compact.published".into()));
    }
    Ok(rows)
}

/// Removes minute files a pass merged (their hour file hides them already, so this is tidying
/// up) and makes the removals durable. Files already gone are fine. Returns how many it removed.
pub fn remove_merged(paths: &[PathBuf]) -> Result<u64, NasError> {
    let mut removed = 0;
    let mut dirs = BTreeSet::new();
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path)(e)),
        }
        if let Some(dir) = path.parent() {
            dirs.insert(dir.to_owned());
        }
    }
    for dir in &dirs {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// For each hour file name in `names` (one folder's entries), whether minute files of its hour
/// are still beside it: its compaction is not finished, and a restarted pass must find the
/// hour file here to merge into, so it does not tier yet.
pub fn hour_files_with_minutes<'a>(names: impl IntoIterator<Item = &'a str> + Clone) -> Vec<bool> {
    let minute_hours: BTreeSet<i64> = names
        .clone()
        .into_iter()
        .filter_map(|n| minute_file_bucket(n).map(hour_start))
        .collect();
    names
        .into_iter()
        .map(|n| hour_file_start(n).is_some_and(|h| minute_hours.contains(&h)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use primespark_schemas::rows::{Agg, AggRow, MetricAggRow, Rollup};

    use super::*;
    use crate::nas::write_aggregate_files;

    const H14: i64 = 1_762_351_200_000_000; // 2025-11-05T14:00:00Z
    const MINUTE: i64 = 60_000_000;

    fn window(bucket_us: i64, device: &str, sum: f64, rollup: Rollup) -> AggRow {
        AggRow {
            rollup,
            row: Agg::Metrics(MetricAggRow {
                bucket_us,
                device_id: device.into(),
                metric_name: "cpu_percent".into(),
                count: 2,
                sum,
                min: 0.0,
                max: sum,
            }),
        }
    }

    /// (bucket, device, sum) of every row of the table's files, and the file names.
    fn contents(root: &Path, table: &str) -> (Vec<(i64, String, f64)>, Vec<String>) {
        let dir = root.join(format!("table={table}/date=2025-11-05"));
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut rows = Vec::new();
        for n in &names {
            let batch = read_file(&dir.join(n)).unwrap().unwrap();
            let b = batch
                .column_by_name("bucket")
                .unwrap()
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .unwrap();
            let d = batch
                .column_by_name("device_id")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            let s = batch
                .column_by_name("sum")
                .unwrap()
                .as_any()
                .downcast_ref::<arrow::array::Float64Array>()
                .unwrap();
            for i in 0..batch.num_rows() {
                rows.push((b.value(i), d.value(i).to_owned(), s.value(i)));
            }
        }
        (rows, names)
    }

    #[test]
    fn final_hours_become_one_file_and_open_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // 14:00-14:59 (sixty windows, two devices) and 15:00-15:01, plus a 1-hour window.
        let mut windows = Vec::new();
        for m in 0..62 {
            for d in ["pi-2", "pi-1"] {
                windows.push(window(H14 + m * MINUTE, d, m as f64, Rollup::Minute));
            }
        }
        windows.push(window(H14, "pi-1", 1.0, Rollup::Hour));
        write_aggregate_files(root, &windows, 1024).unwrap();
        let (before, files) = contents(root, "device_metrics_1m");
        assert_eq!(files.len(), 62);

        // 15:00 is not final yet: nothing happens before it.
        let not_yet = compact(root, H14 + 60 * MINUTE - 1, 1024).unwrap();
        assert_eq!(not_yet, CompactReport::default());
        let report = compact(root, H14 + 60 * MINUTE + 30 * MINUTE, 1024).unwrap();
        assert_eq!(
            (report.hours, report.minute_files, report.rows),
            (1, 60, 120)
        );
        assert_eq!(report.merged.len(), 60);
        let (after, files) = contents(root, "device_metrics_1m");
        assert_eq!(
            files,
            [
                minute_file_name(H14 + 60 * MINUTE),
                minute_file_name(H14 + 61 * MINUTE),
                hour_file_name(H14),
            ]
        );
        // The same rows, in window then key order.
        let mut sorted_before = before.clone();
        sorted_before.sort_by(|a, b| (a.0, &a.1).partial_cmp(&(b.0, &b.1)).unwrap());
        let mut sorted_after = after.clone();
        sorted_after.sort_by(|a, b| (a.0, &a.1).partial_cmp(&(b.0, &b.1)).unwrap());
        assert_eq!(sorted_before, sorted_after);
        let hour_rows: Vec<_> = after.iter().skip(4).cloned().collect();
        assert!(hour_rows
            .windows(2)
            .all(|w| (w[0].0, &w[0].1) < (w[1].0, &w[1].1)));
        // The 1-hour table is not compacted.
        assert_eq!(contents(root, "device_metrics_1h").1.len(), 1);
        // Again: nothing left to do.
        assert_eq!(
            compact(root, H14 + 90 * MINUTE, 1024).unwrap(),
            CompactReport::default()
        );
    }

    #[test]
    fn a_pass_cut_short_is_finished_by_the_next_with_minute_files_winning() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let windows: Vec<AggRow> = (0..3)
            .map(|m| window(H14 + m * MINUTE, "pi-1", 1.0, Rollup::Minute))
            .collect();
        write_aggregate_files(root, &windows, 1024).unwrap();
        compact(root, H14 + 2 * 60 * MINUTE, 1024).unwrap();
        // As if the pass died before removing the minute files, one of which was newer.
        write_aggregate_files(
            root,
            &[window(H14 + MINUTE, "pi-1", 7.0, Rollup::Minute)],
            1024,
        )
        .unwrap();
        let listed = [
            format!(
                "table=device_metrics_1m/date=2025-11-05/{}",
                hour_file_name(H14)
            ),
            format!(
                "table=device_metrics_1m/date=2025-11-05/{}",
                minute_file_name(H14 + MINUTE)
            ),
            format!(
                "table=device_metrics_1m/date=2025-11-05/{}",
                minute_file_name(H14 + 60 * MINUTE)
            ),
            format!("table=device_metrics_1h/date=2025-11-05/part-b{H14:020}.parquet"),
        ];
        assert_eq!(
            hidden_by_hour_files(listed.iter().map(String::as_str)),
            [false, true, false, false],
            "readers skip the covered minute file, nothing else"
        );
        let report = compact(root, H14 + 2 * 60 * MINUTE, 1024).unwrap();
        assert_eq!(report.minute_files, 1);
        let (rows, files) = contents(root, "device_metrics_1m");
        assert_eq!(files, [hour_file_name(H14)]);
        assert_eq!(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            [1.0, 7.0, 1.0]
        );
    }

    /// The race a query runs with a running pipeline: it lists the archive, a compaction pass
    /// merges the hour, then the query reads what it listed.
    #[tokio::test]
    async fn a_listing_taken_before_a_pass_reads_whole_until_the_merged_files_are_removed() {
        use futures::TryStreamExt;
        use object_store::local::LocalFileSystem;
        use object_store::{ObjectStore, ObjectStoreExt};

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let windows: Vec<AggRow> = (0..5)
            .map(|m| window(H14 + m * MINUTE, "pi-1", m as f64, Rollup::Minute))
            .collect();
        write_aggregate_files(root, &windows, 1024).unwrap();
        let nas: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(root).unwrap());
        let store = crate::archive::TieredStore::from_tiers(vec![("nas", nas)]);
        let list = |store: &crate::archive::TieredStore| {
            let listed = store.list(Some(&object_store::path::Path::from(
                "table=device_metrics_1m",
            )));
            async move { listed.try_collect::<Vec<_>>().await.unwrap() }
        };
        let before = list(&store).await;
        assert_eq!(before.len(), 5);

        let pass =
            compact_tables(root, None, H14 + 2 * 60 * MINUTE, 1024, &BTreeSet::new()).unwrap();
        assert_eq!((pass.hours, pass.merged.len()), (1, 5));
        // Every file the earlier listing named still reads, as it was.
        for meta in &before {
            let bytes = store
                .get(&meta.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(bytes.len() as u64, meta.size, "{}", meta.location);
        }
        // A new listing names the hour file only.
        let after = list(&store).await;
        let names: Vec<String> = after.iter().map(|m| m.location.to_string()).collect();
        assert_eq!(
            names,
            [format!(
                "table=device_metrics_1m/date=2025-11-05/{}",
                hour_file_name(H14)
            )]
        );
        // A pass while they wait merges nothing again (the hour file is not rewritten).
        let hour_path = root.join(format!(
            "table=device_metrics_1m/date=2025-11-05/{}",
            hour_file_name(H14)
        ));
        let written = fs::metadata(&hour_path).unwrap().modified().unwrap();
        let waiting: BTreeSet<PathBuf> = pass.merged.iter().cloned().collect();
        let again = compact_tables(root, None, H14 + 2 * 60 * MINUTE, 1024, &waiting).unwrap();
        assert_eq!(again, CompactReport::default());
        assert_eq!(
            fs::metadata(&hour_path).unwrap().modified().unwrap(),
            written
        );
        // After the grace: removed, and the files are gone for good.
        assert_eq!(remove_merged(&pass.merged).unwrap(), 5);
        assert_eq!(remove_merged(&pass.merged).unwrap(), 0);
        let (rows, files) = contents(root, "device_metrics_1m");
        assert_eq!(files, [hour_file_name(H14)]);
        assert_eq!(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            [0.0, 1.0, 2.0, 3.0, 4.0]
        );
        // Without the wait a reader of the old listing would have failed.
        assert!(store.get(&before[0].location).await.is_err());
    }

    #[test]
    fn hour_files_with_minute_files_beside_them_are_unsettled() {
        let names = [
            hour_file_name(H14),
            minute_file_name(H14 + MINUTE),
            hour_file_name(H14 + 60 * MINUTE),
            "part-p000-o1-2.parquet".to_owned(),
        ];
        assert_eq!(
            hour_files_with_minutes(names.iter().map(String::as_str)),
            [true, false, false, false]
        );
    }

    #[test]
    fn only_minute_files_of_minute_tables_stay_on_the_nas() {
        assert!(is_minute_file(
            "table=device_metrics_1m/date=2025-11-05/part-b00000001762351200000000.parquet"
        ));
        assert!(!is_minute_file(
            "table=device_metrics_1m/date=2025-11-05/part-h00000001762351200000000.parquet"
        ));
        assert!(!is_minute_file(
            "table=device_metrics_1h/date=2025-11-05/part-b00000001762351200000000.parquet"
        ));
        assert!(!is_minute_file(
            "topic=edge.telemetry/date=2025-11-05/hour=14/part-p000-o1-2.parquet"
        ));
    }
}
