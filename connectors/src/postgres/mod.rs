//! PostgreSQL / TimescaleDB: migrations, raw rows by binary COPY, aggregates by batched upsert,
//! dead letters and source offsets, each batch in one transaction with the offsets it covers.
//! Its sinks: [`RAW_ROWS`] (raw rows and dead letters) and [`AGGREGATE_ROWS`] (windows).

mod aggregate_sink;
pub mod backfill;
mod config;
mod connection;
mod error;
pub mod lease;
mod raw_sink;
pub mod retention;
mod sink;
pub mod tls;

pub use aggregate_sink::{AggregateRowsSink, AGGREGATE_ROWS};
pub use connection::{Connection, OffsetStore};
pub use error::{classify_sqlstate, SqlClass};
pub use raw_sink::{RawRowsSink, RAW_ROWS};

pub use config::PostgresConfig;
pub use retention::RetentionConfig;
pub use sink::{
    commit_offsets, connect, has_direct_compress_copy, load_state, load_task_state, migrate,
    rejected_records, write_aggregates, write_raw, Backend, PostgresError, Rejected, StoredState,
    DIRECT_COMPRESS_COPY,
};
