//! What can go wrong with a query, and what each failure means to the HTTP door (status), the
//! wire door (SQLSTATE) and the audit line (outcome).

use std::net::SocketAddr;
use std::time::Duration;

use datafusion::error::DataFusionError;

/// Query endpoint failures.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// DataFusion rejected or failed the query (the user's to fix).
    #[error("{0}")]
    DataFusion(#[from] DataFusionError),
    /// No or unknown credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but the statement is not allowed for the caller's role (or for anyone).
    #[error("{0}")]
    Forbidden(String),
    /// The caller's rate limit is used up.
    #[error("rate limit reached; retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until a query is allowed again.
        retry_after_secs: u64,
    },
    /// The query ran longer than `query.timeout` and was cancelled.
    #[error("query cancelled: it ran longer than {0:?} (query.timeout)")]
    Timeout(Duration),
    /// Encoding the result failed.
    #[error("encoding result: {0}")]
    Encode(String),
    /// Binding or serving failed.
    #[error("serving on {addr}: {source}")]
    Serve {
        /// Address.
        addr: SocketAddr,
        /// Error.
        #[source]
        source: std::io::Error,
    },
}

/// Whether `e` is a failure to read the stored files (the archive's object store, a local
/// file, a Parquet file that would not decode) rather than a fault of the statement.
fn storage_failure(e: &DataFusionError) -> bool {
    match e {
        DataFusionError::ObjectStore(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ParquetError(_) => true,
        DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
            storage_failure(inner)
        }
        DataFusionError::Shared(inner) => storage_failure(inner),
        DataFusionError::Collection(all) => all.iter().any(storage_failure),
        DataFusionError::External(inner) => {
            inner.downcast_ref::<object_store::Error>().is_some()
                || inner
                    .downcast_ref::<parquet::errors::ParquetError>()
                    .is_some()
                || inner.downcast_ref::<std::io::Error>().is_some()
                || inner
                    .downcast_ref::<DataFusionError>()
                    .is_some_and(storage_failure)
        }
        _ => false,
    }
}

impl QueryError {
    /// Whether reading the stored files failed (the query itself was fine): a file listed by
    /// the plan changed or went away before it was read, or the store failed. Such a query is
    /// planned and run once more (a new listing sees the archive as it is now), and a second
    /// failure is the server's error (HTTP 500, SQLSTATE 58030), not the caller's.
    pub fn is_storage(&self) -> bool {
        matches!(self, QueryError::DataFusion(e) if storage_failure(e))
    }

    /// The audit/metric outcome of an error.
    pub fn outcome(&self) -> &'static str {
        if self.is_storage() {
            return "storage";
        }
        match self {
            QueryError::Unauthenticated(_) => "unauthenticated",
            QueryError::Forbidden(_) => "forbidden",
            QueryError::RateLimited { .. } => "rate_limited",
            QueryError::Timeout(_) => "timeout",
            QueryError::DataFusion(DataFusionError::ResourcesExhausted(_)) => "resources_exhausted",
            QueryError::DataFusion(_) => "error",
            QueryError::Encode(_) | QueryError::Serve { .. } => "internal",
        }
    }

    /// The PostgreSQL SQLSTATE of an error (wire endpoint).
    pub fn sqlstate(&self) -> &'static str {
        if self.is_storage() {
            // io_error
            return "58030";
        }
        match self {
            QueryError::Unauthenticated(_) => "28P01",
            QueryError::Forbidden(_) => "42501",
            QueryError::RateLimited { .. } => "53400",
            QueryError::Timeout(_) => "57014",
            QueryError::DataFusion(DataFusionError::ResourcesExhausted(_)) => "53200",
            QueryError::DataFusion(DataFusionError::SQL(..)) => "42601",
            QueryError::DataFusion(DataFusionError::Plan(_)) => "42P01",
            QueryError::DataFusion(_) => "XX000",
            QueryError::Encode(_) | QueryError::Serve { .. } => "XX000",
        }
    }
}
