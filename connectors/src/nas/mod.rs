//! Parquet files on the NAS: `<path>/topic=<topic>/date=YYYY-MM-DD/hour=HH/`, one file per roll
//! and hour, named by the Kafka partition and offset range it covers
//! (`part-p003-o00000000000000000042-00000000000000000997.parquet`). Files are written under a
//! temporary name and renamed when every file of its roll is complete, so readers never see a
//! partial file or roll; the rolls in place are the archive's own record of what it holds, so a
//! lost stored offset neither deletes nor doubles one ([`ParquetArchive::recover`]).
//! Its sinks: [`RAW_ROLLS`] (raw rows) and [`AGGREGATE_FILES`] (windows).

mod aggregate_sink;
pub mod compact;
mod config;
mod raw_sink;
mod writer;

pub use aggregate_sink::{AggregateFilesSink, AGGREGATE_FILES};
pub use config::NasConfig;
pub use raw_sink::{build_rolls, OnTheNas, Publish, RollSink, RAW_ROLLS};

/// `path` under `root` as a `/`-separated relative path (the archive's layout, and the object
/// key of the file under the bucket's prefix).
pub fn relative_path(root: &std::path::Path, path: &std::path::Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    Some(
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/"),
    )
}
pub use writer::{
    agg_batch, aggregate_batch, analytics_batch, extend_end, inference_batch, instance_tag,
    parse_roll_range, raw_batch, score_batch, telemetry_batch, temp_target, write_aggregate_files,
    NasError, ParquetArchive, Recovered, SCORES_TABLE_DIR,
};
