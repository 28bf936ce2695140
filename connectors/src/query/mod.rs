//! The SQL endpoint: DataFusion over the Parquet archive, over HTTP.
//!
//! `POST /v1/sql` with `{"sql": "..."}` answers `{"columns": [...], "rows": [[...], ...]}`; a
//! query DataFusion rejects is a 400 with DataFusion's message.

mod config;
mod http;

pub use config::QueryConfig;
pub use http::{batches_to_json, router, serve, session, QueryError};
