//! Parquet files on the NAS: `<path>/topic=<topic>/date=YYYY-MM-DD/hour=HH/`, one file per roll
//! and hour, named by the Kafka partition and offset range it covers
//! (`part-p003-o00000000000000000042-00000000000000000997.parquet`). Files are written under a
//! temporary name and renamed when complete, so readers never see a partial file; a roll whose
//! offsets were not committed is deleted at start-up and rewritten, so none is doubled.

mod config;
mod writer;

pub use config::NasConfig;
pub use writer::{
    agg_batch, aggregate_batch, analytics_batch, inference_batch, raw_batch, score_batch,
    telemetry_batch, write_aggregate_files, NasError, ParquetArchive, SCORES_TABLE_DIR,
};
