//! Why a run could not start or stop cleanly, and the exit code that tells a supervisor what to
//! do about it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use primespark_connectors::archive::ArchiveError;
use primespark_connectors::kafka::KafkaError;
use primespark_connectors::nas::NasError;
use primespark_connectors::postgres::PostgresError;
use primespark_connectors::query::QueryError;
use primespark_connectors::s3::S3Error;
use primespark_connectors::sink::{Classify, ErrorClass, SinkError};
use primespark_connectors::InvalidConfig;
use primespark_operators::inference::InferenceError;

/// Why the pipeline could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] InvalidConfig),
    /// PostgreSQL unreachable or failing at start-up.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// Kafka unreachable, or the topic missing.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The Parquet archive could not be recovered.
    #[error(transparent)]
    Nas(#[from] NasError),
    /// The SQL endpoint could not start.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The object store could not be set up.
    #[error(transparent)]
    S3(#[from] S3Error),
    /// A sink failed at start-up (its build, health check or recovery) or for good while
    /// running.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// An inference model could not be loaded, or the NPU asked for is missing.
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// The async runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Timely failed.
    #[error("timely: {0}")]
    Timely(String),
    /// The archive could not be listed or read (backfill).
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A backfill's source failed mid-way; the tables hold part of the range (run it again).
    #[error("backfill failed: {0}; run it again, it is idempotent")]
    Backfill(String),
    /// Another process writes the same archive (without PostgreSQL, the NAS folder lock).
    #[error("{0}")]
    Busy(String),
    /// Writers did not finish within the grace period.
    #[error(
        "sinks did not flush within {0:?}; the next run resumes from the last committed offsets"
    )]
    ShutdownTimeout(Duration),
}

/// The exit code of an error by its class, when it ends a start-up: a fatal error by who must
/// act; anything retryable means a service is not there yet (restart with backoff, 3); a
/// refusal of data someone must look at (2).
fn code_of(class: ErrorClass) -> u8 {
    match class {
        ErrorClass::Fatal(domain) => domain.exit_code(),
        ErrorClass::Retry => 3,
        ErrorClass::Quarantine(_) => 2,
    }
}

impl RunError {
    /// The process exit code that says why the run ended: 2 configuration or something an
    /// operator must fix (a setting, a permission, a stored row), 3 a service or resource
    /// (unreachable at start-up, a full disk), 4 the shutdown grace exceeded (the next run
    /// resumes from the last commit), 5 a timely worker failed, 1 anything else. Supervisors
    /// can tell "fix it" (do not restart) from "a dependency is down" (restart with backoff).
    /// Errors are sorted by their class, never by the crate they come from.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Busy(_) => 2,
            RunError::Postgres(e) => code_of(e.class()),
            RunError::Kafka(e) => code_of(e.class()),
            RunError::Nas(e) => code_of(e.class()),
            RunError::S3(e) => code_of(e.class()),
            RunError::Sink(e) => code_of(e.class().clone()),
            RunError::Query(_) | RunError::Archive(_) => 3,
            RunError::Backfill(_) => 1,
            RunError::Inference(e) => match e {
                InferenceError::Load { .. } | InferenceError::Shape { .. } => 2,
                InferenceError::NoDevice(_) | InferenceError::Hailo { .. } => 3,
                InferenceError::Run { .. } | InferenceError::Stopped => 1,
            },
            RunError::ShutdownTimeout(_) => 4,
            RunError::Timely(_) => 5,
            RunError::Runtime(_) => 1,
        }
    }
}

/// Where a sink runtime reports the error that stops the pipeline: the first one is kept, the
/// shutdown flag is raised, and the workers stop without waiting for a flush that cannot come.
#[derive(Debug, Clone)]
pub struct Fatal {
    error: Arc<Mutex<Option<SinkError>>>,
    raised: Arc<AtomicBool>,
    shutdown: Arc<AtomicBool>,
}

impl Fatal {
    /// A slot that raises `shutdown` when something is reported.
    pub fn new(shutdown: Arc<AtomicBool>) -> Self {
        Self {
            error: Arc::default(),
            raised: Arc::default(),
            shutdown,
        }
    }

    /// Reports `error`; the pipeline stops.
    pub fn report(&self, error: SinkError) {
        tracing::error!(error = %error, "a sink failed for good; stopping");
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(error);
        }
        self.raised.store(true, Ordering::SeqCst);
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Whether something was reported.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Relaxed)
    }

    /// The reported error, taken.
    pub fn take(&self) -> Option<SinkError> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use primespark_connectors::sink::Domain;

    #[test]
    fn exit_codes_follow_the_class_not_the_crate() {
        // A stored row someone must fix: not "restart".
        assert_eq!(
            RunError::Postgres(PostgresError::InvalidRow("task_state: bad".into())).exit_code(),
            2
        );
        assert_eq!(
            RunError::Sink(SinkError::fatal(Domain::External, "disk full")).exit_code(),
            3
        );
        assert_eq!(
            RunError::Sink(SinkError::fatal(Domain::User, "permission denied")).exit_code(),
            2
        );
        assert_eq!(
            RunError::Nas(NasError::Io {
                path: "/nas".into(),
                source: std::io::ErrorKind::PermissionDenied.into(),
            })
            .exit_code(),
            2
        );
        assert_eq!(
            RunError::Kafka(KafkaError::UnknownTopic("t".into())).exit_code(),
            3
        );
    }
}
