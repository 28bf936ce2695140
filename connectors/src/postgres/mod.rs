//! PostgreSQL / TimescaleDB: migrations, raw rows by binary COPY, aggregates by batched upsert,
//! dead letters and source offsets, each batch in one transaction with the offsets it covers.

pub mod backfill;
mod config;
pub mod retention;
mod sink;

pub use config::PostgresConfig;
pub use retention::RetentionConfig;
pub use sink::{
    commit_offsets, connect, load_state, load_task_state, migrate, rejected_records,
    write_aggregates, write_raw, Backend, PostgresError, Rejected, StoredState,
};
