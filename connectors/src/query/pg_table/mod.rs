//! A DataFusion table over a PostgreSQL table, for the query service: SQL over the live tables
//! without copying them first.
//!
//! [`PostgresTable`] is a [`TableProvider`](datafusion::catalog::TableProvider) that hands
//! PostgreSQL as much of the query as it can answer exactly: the projected columns, the filters
//! it can translate faithfully (comparisons with literals, `AND`/`OR`/`NOT`, `IS [NOT] NULL`,
//! `BETWEEN`, `IN` lists, `LIKE`) and, when every filter went down, the `LIMIT`. Whatever it
//! cannot translate it reports as
//! [`Unsupported`](datafusion::logical_expr::TableProviderFilterPushDown::Unsupported), so
//! DataFusion applies it above the scan and the answer stays right. The generated SQL shows in `EXPLAIN` (see [`PostgresScanExec`]).
//!
//! "Faithful" means PostgreSQL selects exactly the rows DataFusion would. Three differences
//! between the two engines decide what is translated and how:
//! - Every column is read and compared through an explicit cast to the PostgreSQL type matching
//!   its Arrow type (`"x"::int8`), so `numeric` compares as the `Float64` DataFusion sees and
//!   `jsonb` as its text. PostgreSQL drops a cast to the column's own type, so indexes still
//!   serve when the Arrow schema matches the table.
//! - Text ordering uses `COLLATE "C"` (byte order, like Arrow); equality needs none.
//! - Arrow orders floats with `total_cmp` (`-0.0 < 0.0`, `NaN` equals itself), PostgreSQL with
//!   IEEE rules plus `NaN` as largest: float comparisons go down only against a finite,
//!   non-zero literal, where both agree.
//!
//! Connections come from a [`PgPool`] (deadpool-postgres) shared by the tables of one database.
//! Every session runs with `TimeZone = UTC`, so `timestamp` to `timestamptz` casts mean UTC. A
//! scan dropped before its last row (a `LIMIT` above it was met, the query was cancelled or
//! failed) sends PostgreSQL a cancel request and closes its connection instead of returning it,
//! so the cancel can never reach the next query on that connection.
//!
//! The files, one job each:
//! - `pool.rs`: the connections ([`PgPool`], deadpool-postgres);
//! - `types.rs`: how a column is read and compared (its PostgreSQL type), names in SQL;
//! - `pushdown.rs`: DataFusion filters translated to PostgreSQL SQL, or refused;
//! - `provider.rs`: the [`TableProvider`](datafusion::catalog::TableProvider) ([`PostgresTable`]);
//! - `exec.rs`: the scan ([`PostgresScanExec`]), its stream and query lifetime;
//! - `rows.rs`: PostgreSQL rows into Arrow record batches.

use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

mod exec;
mod pool;
mod provider;
mod pushdown;
mod rows;
#[cfg(test)]
mod tests;
mod types;

pub use exec::PostgresScanExec;
pub use pool::PgPool;
pub use provider::PostgresTable;

/// Rows per record batch a scan produces.
pub const BATCH_ROWS: usize = 8192;

/// Connections a pool made by [`PostgresTable::discover`] keeps at most.
pub const DEFAULT_POOL_SIZE: usize = 4;

/// Failures of the PostgreSQL table. At the DataFusion boundary they become
/// [`DataFusionError::External`].
#[derive(Debug, thiserror::Error)]
pub enum PgTableError {
    /// The connection URL does not parse: fix the configuration.
    #[error("invalid PostgreSQL URL: {0}")]
    InvalidUrl(String),
    /// Connecting failed: the server may be down (retry) or refuse the credentials (fix them).
    #[error("connecting to PostgreSQL at {target}: {message}")]
    Connect {
        /// `host:port/database`, never the password.
        target: String,
        /// The server's or the socket's message.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A statement failed (see [`PgTableError::is_transient`] for whether to retry).
    #[error("table {table}: {message}")]
    Query {
        /// The table being read.
        table: String,
        /// The server's message.
        message: String,
        /// The error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// `information_schema` knows no such table (or we may not see it).
    #[error("table {table} not found")]
    TableNotFound {
        /// The table asked for.
        table: String,
    },
    /// A column's PostgreSQL type has no Arrow mapping here.
    #[error("table {table} column {column}: PostgreSQL type {pg_type} is not supported")]
    UnsupportedPgType {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Its `udt_name`.
        pg_type: String,
    },
    /// A field of the given Arrow schema has a type this table cannot produce.
    #[error("table {table} column {column}: Arrow type {data_type} is not supported")]
    UnsupportedArrowType {
        /// The table.
        table: String,
        /// The field.
        column: String,
        /// Its type.
        data_type: DataType,
    },
    /// A value cannot be represented in Arrow (an infinite timestamp, say).
    #[error("table {table} column {column}: {message}")]
    Decode {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// What is wrong with the value.
        message: String,
    },
    /// The rows do not fit the schema (a NULL in a non-nullable field, say).
    #[error("table {table}: building a record batch: {source}")]
    Arrow {
        /// The table.
        table: String,
        /// The error.
        #[source]
        source: ArrowError,
    },
    /// The pool was closed.
    #[error("PostgreSQL connection pool closed")]
    PoolClosed,
}

impl PgTableError {
    /// Whether trying again later may succeed (connection lost, server restarting, conflict),
    /// as opposed to an error someone must fix.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            // The sinks' classifier: a server-side error it would retry. An error without a
            // SQLSTATE came from the client (a value that does not convert): not transient.
            Self::Query { source, .. } => {
                source.is_closed()
                    || source.code().is_some_and(|c| {
                        crate::postgres::classify_sqlstate(Some(c))
                            == crate::postgres::SqlClass::Transient
                    })
            }
            _ => false,
        }
    }

    pub(super) fn query(table: &str, source: tokio_postgres::Error) -> Self {
        Self::Query {
            table: table.to_owned(),
            message: pg_message(&source),
            source,
        }
    }
}

impl From<PgTableError> for DataFusionError {
    fn from(e: PgTableError) -> Self {
        DataFusionError::External(Box::new(e))
    }
}

/// The server's message for a database error, the error and its cause otherwise (tokio-postgres
/// prints only "db error" for the former).
pub(super) fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_owned();
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}
