//! Closed windows as Parquet files on the NAS: one file per (table, bucket) with deterministic
//! names, rewritten whole while late events may still change the bucket, and compacted into
//! one file per hour once the hour is final.
//!
//! Windows updated by late events arrive as the updated keys only, so the sink keeps each
//! bucket's rows until the bucket is final (its end plus `allowed_lateness` at or below the
//! committed watermark) and rewrites the whole file from them. The files are written before the
//! PostgreSQL transaction whose watermark makes them final (registry order), and compaction
//! runs at commit, after it. The minute files a compaction merged stay (hidden by their hour
//! file) until `nas.compaction_grace` has passed, then a later commit removes them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use primespark_schemas::flow::{AggCommit, SinkId};
use primespark_schemas::rows::{Agg, AggRow, PartitionOffset};

use super::compact;
use super::write_aggregate_files;
use crate::metrics::{MergedFilesWaiting, SinkRowsWritten};
use crate::sink::fence::Fence;
use crate::sink::registry::{AggSinkKind, Built, SinkContext, SinkSettings};
use crate::sink::{BoxAggSink, Classify, Domain, Flush, Sink, SinkError, Target};

/// Its name in logs.
pub const NAME: &str = "aggregate_files";

/// The registry entry: wanted whenever the NAS is (not for a backfill, nor for a stream whose
/// route keeps its aggregates out of the archive).
pub const AGGREGATE_FILES: AggSinkKind = AggSinkKind {
    name: NAME,
    wanted: |settings, scope| {
        settings.nas.is_some()
            && !scope.backfill
            && settings.route(scope.stream.kind).aggregates_archive
    },
    build: |settings, ctx| async move { build(settings, ctx) }.boxed(),
};

fn build(settings: &SinkSettings, ctx: &SinkContext) -> Result<Built<BoxAggSink>, SinkError> {
    let Some(nas) = &settings.nas else {
        return Err(SinkError::fatal(
            Domain::Internal,
            "aggregate files without [nas]",
        ));
    };
    let sink = AggregateFilesSink {
        root: nas.path.clone(),
        row_group_rows: nas.row_group_rows,
        allowed_lateness_us: settings.allowed_lateness_us,
        recent: BTreeMap::new(),
        committed: i64::MIN,
        compacted_before: None,
        grace: nas.compaction_grace,
        removals: VecDeque::new(),
        minute_tables: ctx.stream.aggregates.iter().map(|f| f.minute).collect(),
        fence: ctx.fence.clone(),
    };
    Ok((Box::new(sink), crate::sink::healthy()))
}

/// (table, bucket) -> key -> the key's latest row.
type Buckets = BTreeMap<(&'static str, i64), BTreeMap<(String, String), AggRow>>;

/// The aggregate files of one dataflow.
pub struct AggregateFilesSink {
    root: PathBuf,
    row_group_rows: usize,
    allowed_lateness_us: i64,
    /// Buckets that may still change.
    recent: Buckets,
    /// The committed watermark of the last commit written.
    committed: i64,
    /// Hours before this were compacted by this sink (none yet after a start: the first
    /// commit finishes whatever an earlier run left).
    compacted_before: Option<i64>,
    /// How long merged minute files stay before they are removed (`nas.compaction_grace`).
    grace: Duration,
    /// Merged minute files not removed yet (compaction skips them), by when they may go,
    /// oldest first.
    removals: VecDeque<(Instant, Vec<PathBuf>)>,
    /// This stream's 1-minute tables: the only ones its watermark may compact.
    minute_tables: Vec<&'static str>,
    /// The writer lease, checked before files are written or compacted.
    fence: Fence,
}

impl AggregateFilesSink {
    /// Every row of the buckets `commit` touches, with earlier rows of those buckets.
    fn touched(&mut self, commit: &AggCommit) -> Vec<AggRow> {
        let mut touched = BTreeSet::new();
        for r in &commit.rows {
            if matches!(r.row, Agg::TaskState(_)) {
                // Join state, not a window: PostgreSQL only.
                continue;
            }
            let (table, bucket, a, b) = r.identity();
            touched.insert((table, bucket));
            self.recent
                .entry((table, bucket))
                .or_default()
                .insert((a.to_owned(), b.to_owned()), r.clone());
        }
        touched
            .iter()
            .filter_map(|k| self.recent.get(k))
            .flat_map(|rows| rows.values().cloned())
            .collect()
    }

    /// Removes the merged minute files whose grace has passed. A failure leaves them waiting
    /// another grace (they are hidden meanwhile; a restart's pass merges and queues them again).
    async fn remove_due(&mut self) -> Result<(), SinkError> {
        let now = Instant::now();
        let mut due = Vec::new();
        while self.removals.front().is_some_and(|(at, _)| *at <= now) {
            if let Some((_, paths)) = self.removals.pop_front() {
                due.extend(paths);
            }
        }
        if due.is_empty() {
            return Ok(());
        }
        self.fence.check()?;
        let paths = Arc::new(due);
        let files = paths.clone();
        let done = tokio::task::spawn_blocking(move || compact::remove_merged(&files))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match done {
            Ok(removed) => MergedFilesWaiting {
                queued: 0,
                released: paths.len() as u64,
                removed,
            }
            .emit(),
            Err(e) => {
                tracing::warn!(error = %e, files = paths.len(), "removing merged minute files failed");
                self.removals
                    .push_back((now + self.grace, paths.as_ref().clone()));
            }
        }
        Ok(())
    }

    /// Forgets buckets that can no longer change.
    fn forget_final(&mut self) {
        let (committed, lateness) = (self.committed, self.allowed_lateness_us);
        self.recent.retain(|(_, bucket), rows| {
            let width = rows.values().next().map_or(0, |r| r.rollup.width_us());
            bucket.saturating_add(width).saturating_add(lateness) > committed
        });
    }
}

impl Drop for AggregateFilesSink {
    fn drop(&mut self) {
        // Files still waiting are this sink's no more (a restart's pass queues them again).
        let waiting: usize = self.removals.iter().map(|(_, paths)| paths.len()).sum();
        if waiting > 0 {
            MergedFilesWaiting {
                queued: 0,
                released: waiting as u64,
                removed: 0,
            }
            .emit();
        }
    }
}

#[async_trait]
impl Sink for AggregateFilesSink {
    type Input = AggCommit;

    fn id(&self) -> SinkId {
        SinkId::WINDOWS
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn target(&self) -> Target<'static> {
        Target {
            sink: "parquet",
            table: "aggregates",
        }
    }

    fn resume(&self, _partition: i32) -> Option<PartitionOffset> {
        None
    }

    fn stores_positions(&self) -> bool {
        // Files are rewritten whole from the replay: the windows' position is PostgreSQL's.
        false
    }

    async fn recover(&mut self) -> Result<usize, SinkError> {
        Ok(0)
    }

    async fn write(&mut self, commit: &AggCommit) -> Result<(), SinkError> {
        self.committed =
            i64::try_from(commit.checkpoint.committed_watermark_us).unwrap_or(i64::MAX);
        if !commit.rows.is_empty() {
            self.fence.check()?;
            let rows = Arc::new(self.touched(commit));
            let started = Instant::now();
            let (root, rg, files) = (self.root.clone(), self.row_group_rows, rows.clone());
            tokio::task::spawn_blocking(move || write_aggregate_files(&root, &files, rg))
                .await
                .map_err(|e| SinkError::fatal(Domain::Internal, e))?
                .map_err(Classify::into_sink_error)?;
            SinkRowsWritten {
                sink: "parquet",
                table: "aggregates",
                rows: rows.len() as u64,
                duration: started.elapsed(),
            }
            .emit();
        }
        self.forget_final();
        // Files written, the PostgreSQL transaction that makes them final not yet.
        crate::failpoint::hit("aggregates.files_written")
    }

    async fn commit(&mut self, _flush: Flush) -> Result<(), SinkError> {
        self.remove_due().await?;
        if self.committed == i64::MIN {
            // No commit written yet (a tick before the first windows): nothing is final.
            return Ok(());
        }
        // Hours of 1-minute windows that are final now (committed, beyond the allowed
        // lateness) become one file each; once per hour of watermark progress.
        let final_before = self.committed.saturating_sub(self.allowed_lateness_us);
        let hour = compact::hour_start(final_before);
        if self.compacted_before.is_some_and(|done| done >= hour) {
            return Ok(());
        }
        self.fence.check()?;
        let (root, rg, tables, waiting) = (
            self.root.clone(),
            self.row_group_rows,
            self.minute_tables.clone(),
            self.removals
                .iter()
                .flat_map(|(_, paths)| paths.iter().cloned())
                .collect::<BTreeSet<PathBuf>>(),
        );
        let done = tokio::task::spawn_blocking(move || {
            compact::compact_tables(&root, Some(&tables), final_before, rg, &waiting)
        })
        .await;
        match done {
            Ok(Ok(report)) => {
                if !report.merged.is_empty() {
                    MergedFilesWaiting {
                        queued: report.merged.len() as u64,
                        released: 0,
                        removed: 0,
                    }
                    .emit();
                    self.removals
                        .push_back((Instant::now() + self.grace, report.merged));
                }
                if report.hours > 0 {
                    tracing::info!(
                        hours = report.hours,
                        minute_files = report.minute_files,
                        rows = report.rows,
                        "aggregate hours compacted"
                    );
                }
                self.compacted_before = Some(hour);
            }
            // Left for the next hour's pass; readers are unaffected meanwhile.
            Ok(Err(e)) => tracing::warn!(error = %e, "compacting aggregate files failed"),
            Err(e) => tracing::warn!(error = %e, "compacting aggregate files failed"),
        }
        Ok(())
    }
}
