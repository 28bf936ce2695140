//! What only `primespark backfill` does at start-up: list the archive's rolls around the range
//! and clear the range in PostgreSQL, so the same dataflow can write it again.

use std::collections::BTreeSet;
use std::sync::Arc;

use primespark_connectors::archive::{self, RollFile, TieredStore};
use primespark_connectors::postgres;
use primespark_schemas::streams::StreamDef;

use super::RunError;
use crate::config::Config;
use crate::plan::micros;

/// What `primespark backfill` rebuilds and from where.
#[derive(Debug, Clone)]
pub struct BackfillRange {
    /// Where the archive is read.
    pub from: ArchiveFrom,
    /// First event time, microseconds (`None`: the archive's beginning).
    pub since_us: Option<i64>,
    /// End of the range, exclusive (`None`: the archive's end).
    pub until_us: Option<i64>,
}

impl BackfillRange {
    /// The range as closed bounds, `[since, until)`.
    pub fn bounds(&self) -> (i64, i64) {
        (
            self.since_us.unwrap_or(i64::MIN),
            self.until_us.unwrap_or(i64::MAX),
        )
    }
}

/// Which copy of the archive a backfill reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveFrom {
    /// `nas.path`.
    Nas,
    /// The bucket (`[s3]`), where tiering moved the older files.
    S3,
    /// Both: the NAS first, then the bucket (a file in both is read once).
    All,
}

/// The archive's tiers a backfill of `range` reads (none for a streaming run).
pub fn archive_stores(
    config: &Config,
    range: Option<&BackfillRange>,
) -> Result<Arc<TieredStore>, RunError> {
    let Some(range) = range else {
        return Ok(Arc::new(TieredStore::from_tiers(Vec::new())));
    };
    let nas = matches!(range.from, ArchiveFrom::Nas | ArchiveFrom::All)
        .then_some(config.nas.path.as_path());
    let bucket = matches!(range.from, ArchiveFrom::S3 | ArchiveFrom::All)
        .then(|| primespark_connectors::s3::archive_bucket(&config.s3))
        .transpose()?;
    Ok(Arc::new(archive::tiers(nas, bucket)?))
}

/// Lists `stream`'s rolls around `range` and clears the range in PostgreSQL. Returns the
/// partitions found and their files.
pub async fn prepare(
    config: &Config,
    stream: &'static StreamDef,
    topic: &str,
    stores: &TieredStore,
    range: &BackfillRange,
) -> Result<(Vec<i32>, Vec<RollFile>), RunError> {
    // Records before the range still set the watermark its first records are judged by, and
    // records after it (lower offsets, later times) too: read an hour plus the lateness bounds
    // around it.
    let margin = 3_600_000_000i64
        .saturating_add(micros(config.windows.max_out_of_orderness))
        .saturating_add(micros(config.windows.allowed_lateness));
    let from = range
        .since_us
        .map_or(i64::MIN, |s| s.saturating_sub(margin));
    let to = range
        .until_us
        .map_or(i64::MAX, |u| u.saturating_add(margin));
    let files = archive::list_rolls(stores, topic, from, to).await?;
    let partitions: Vec<i32> = files
        .iter()
        .map(|f| f.partition)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    tracing::info!(dataflow = stream.name, topic, files = files.len(), partitions = partitions.len(), tiers = ?stores.names(), "backfill: archive listed");
    let raw: Vec<&str> = stream.raw_tables.iter().map(|t| t.name).collect();
    let ranged = range.since_us.is_some();
    if ranged && stream.aggregates.iter().any(|f| f.whole_history) {
        tracing::warn!(dataflow = stream.name, "backfill --since: tables of the task lifecycle join are left as they are (the join needs the archive from its beginning); the others are rebuilt");
    }
    // Tasks created before the range are unknown to the join: its tables are rebuilt by full
    // backfills only.
    let aggregates: Vec<(&str, i64)> = stream
        .aggregates
        .iter()
        .filter(|f| !(ranged && f.whole_history))
        .flat_map(|f| f.tables())
        .map(|(rollup, table)| (table, rollup.width_us() / 1_000_000))
        .collect();
    let mut client = postgres::connect(&config.postgres.config.url).await?;
    postgres::backfill::clear_range(
        &mut client,
        postgres::backfill::StreamTables {
            topic,
            raw: &raw,
            aggregates: &aggregates,
        },
        range.since_us,
        range.until_us,
    )
    .await?;
    Ok((partitions, files))
}
