//! I/O of primespark: everything that talks to a service or a file system.
//!
//! One module per connector, each with the same shape (`config.rs`: typed, validated without
//! I/O; the runtime piece; its tests):
//! - [`kafka`]: consumers with explicit partition assignment, producers, topic creation.
//! - [`postgres`]: migrations (TimescaleDB when present, plain PostgreSQL otherwise), binary
//!   COPY of raw rows, batched upserts of aggregates, dead letters and source offsets in the
//!   same transaction as the rows they cover.
//! - [`nas`]: Parquet files on the NAS, partitioned by topic/date/hour, made visible atomically.
//! - [`archive`]: reading the Parquet archive (NAS or bucket) back as records, for backfills.
//! - [`s3`]: S3-compatible object storage, the cold tier the NAS files move to.
//! - [`query`]: the DataFusion SQL endpoint over HTTP and the PostgreSQL wire protocol.
//! - [`sink`]: the sink contract every sink above implements, its registry and runtime.
//!
//! Connectors know the row and flow types of `primespark-schemas` and nothing of timely.

// Tests may unwrap: a panic there is a failed test with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod archive;
pub mod config;
pub mod failpoint;
pub mod kafka;
pub mod metrics;
pub mod nas;
pub mod postgres;
pub mod query;
pub mod s3;
pub mod sink;

pub use config::InvalidConfig;
