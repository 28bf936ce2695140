//! The query service: DataFusion SQL over the archive and PostgreSQL, over HTTP and the
//! PostgreSQL wire protocol, behind API keys, roles and limits.
//!
//! `POST /v1/sql` with `{"sql": "..."}` answers `{"columns": [...], "rows": [[...], ...]}`
//! (or CSV, or an Arrow IPC stream, by `Accept`); `GET /v1/tables` lists the catalog. Errors:
//! 400 (DataFusion's message), 401 (no or unknown key), 403 (not allowed for the role, or for
//! anyone: DDL, DML, COPY, external tables, file readers), 408 (cancelled at `query.timeout`),
//! 413 (body over `query.max_body_bytes`), 429 (rate limit; `Retry-After`), 500 (reading the
//! stored files failed twice: a query whose file changed or went away under it is planned and
//! run once more first, counted in `primespark_query_retries_total`).
//!
//! The files: `service.rs` (who may run what, within which limits, audited: both doors go
//! through it), `context.rs` (the DataFusion session and the archive's tables), `catalog.rs`
//! (PostgreSQL's tables and the unified ones), `unified.rs`, `functions.rs` (`time_bucket`),
//! `http.rs` (the HTTP door), [`wire`] (the PostgreSQL wire door), [`pg_table`] (PostgreSQL
//! tables for DataFusion), `tls.rs`, `config.rs` and `error.rs`.

pub mod catalog;
mod config;
mod context;
mod error;
pub mod functions;
mod http;
pub(crate) mod limiter;
pub mod pg_table;
pub mod secrets;
mod serve;
pub mod service;
pub mod tls;
pub mod unified;
pub mod wire;

/// The PostgreSQL table under its former name.
pub use pg_table as postgres_table;
/// The wire endpoint under its former name, for callers (`dataflows`) that use it.
pub use wire as pgwire;

pub use config::{ApiKey, QueryConfig, Role, WireUser};
pub use context::session;
pub use error::QueryError;
pub use functions::cap_functions;
pub use http::{batches_to_json, guard_console, guard_host, guard_ops, router};
pub use serve::{serve, serve_listener, HttpOptions};
pub use service::{hash_password, sha256_hex, Principal, QueryOutput, QueryService};
