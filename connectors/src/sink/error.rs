//! The one error every sink returns, classified by what must happen next: retry (an outage),
//! quarantine (these records can never be written: dead-letter them), or fatal (configuration
//! or an invariant: stop with the exit code that tells the supervisor what to do).
//!
//! Each connector classifies its own errors once (`PostgresError::class`, `NasError::class`,
//! `S3Error::class`, `KafkaError::class`), and the sink runtime's one retry loop acts on the
//! class, never on the error's origin.

use std::fmt;

/// Who must act on a fatal error; decides the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// The operator: a setting, a permission, a table or row someone changed. Restarting does
    /// not help (exit code 2).
    User,
    /// A service or resource outside the process (a full disk, an unreachable service at
    /// start-up): restart with backoff (exit code 3).
    External,
    /// A broken invariant of the pipeline itself: a bug (exit code 1).
    Internal,
}

impl Domain {
    /// The process exit code of a run that stopped on this error.
    pub fn exit_code(self) -> u8 {
        match self {
            Domain::User => 2,
            Domain::External => 3,
            Domain::Internal => 1,
        }
    }
}

/// A record a sink refused: its position and the sink's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Kafka partition.
    pub partition: i32,
    /// Kafka offset.
    pub offset: i64,
    /// The service's own message (PostgreSQL's, with its SQLSTATE).
    pub reason: String,
}

/// What the runtime does with a failed operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorClass {
    /// The service is down or failing for now: back off and try the same operation again.
    Retry,
    /// These records can never be written by this sink: they leave its batch as dead letters
    /// (`sink_rejected`), and the rest is written again. An empty list means the data was
    /// refused but the sink could not tell which records: the batch is retried like an outage.
    Quarantine(Vec<Refused>),
    /// Stop the pipeline.
    Fatal(Domain),
}

/// A failed sink operation: its class and one message naming what failed.
#[derive(Debug)]
pub struct SinkError {
    class: ErrorClass,
    message: String,
    /// The part of the sink that failed, when it is not the sink itself (the bucket of a
    /// roll, the offset store): its metrics labels.
    target: Option<super::Target<'static>>,
}

impl SinkError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            target: None,
        }
    }

    /// The same error, counted against `target` instead of the sink's own labels.
    #[must_use]
    pub fn at(mut self, target: super::Target<'static>) -> Self {
        self.target = Some(target);
        self
    }

    /// The part of the sink that failed, if it says.
    pub fn target(&self) -> Option<super::Target<'static>> {
        self.target
    }

    /// A transient failure: retry.
    pub fn retry(message: impl fmt::Display) -> Self {
        Self::new(ErrorClass::Retry, message.to_string())
    }

    /// A fatal failure.
    pub fn fatal(domain: Domain, message: impl fmt::Display) -> Self {
        Self::new(ErrorClass::Fatal(domain), message.to_string())
    }

    /// Records the sink refuses.
    pub fn quarantine(refused: Vec<Refused>, message: impl fmt::Display) -> Self {
        Self::new(ErrorClass::Quarantine(refused), message.to_string())
    }

    /// What to do about it.
    pub fn class(&self) -> &ErrorClass {
        &self.class
    }

    /// The records to quarantine, taken out of the error.
    pub fn into_refused(self) -> Vec<Refused> {
        match self.class {
            ErrorClass::Quarantine(r) => r,
            _ => Vec::new(),
        }
    }

    /// The exit code of a run this error stops, or `None` if it does not stop it.
    pub fn exit_code(&self) -> Option<u8> {
        match self.class {
            ErrorClass::Fatal(d) => Some(d.exit_code()),
            _ => None,
        }
    }

    /// The same error with `context` in front of its message.
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SinkError {}

/// Errors that know their class.
pub trait Classify: std::error::Error {
    /// What a sink runtime does about this error.
    fn class(&self) -> ErrorClass;

    /// The error as a [`SinkError`].
    fn into_sink_error(self) -> SinkError
    where
        Self: Sized,
    {
        SinkError::new(self.class(), self.to_string())
    }
}

/// The class of an I/O error on the NAS or the staging folder: a full disk, a permission or a
/// read-only file system will not go away by retrying; anything else (a stale NFS handle, a
/// timeout) may.
pub fn io_class(e: &std::io::Error) -> ErrorClass {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => {
            ErrorClass::Fatal(Domain::User)
        }
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
            ErrorClass::Fatal(Domain::External)
        }
        _ => ErrorClass::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_and_a_permission_stop_while_a_timeout_is_retried() {
        let io = |kind| std::io::Error::from(kind);
        assert_eq!(
            io_class(&io(std::io::ErrorKind::StorageFull)),
            ErrorClass::Fatal(Domain::External)
        );
        assert_eq!(
            io_class(&io(std::io::ErrorKind::PermissionDenied)),
            ErrorClass::Fatal(Domain::User)
        );
        assert_eq!(
            io_class(&std::io::Error::from_raw_os_error(30)),
            ErrorClass::Fatal(Domain::User),
            "EROFS"
        );
        assert_eq!(
            io_class(&io(std::io::ErrorKind::TimedOut)),
            ErrorClass::Retry
        );
        assert_eq!(Domain::User.exit_code(), 2);
        assert_eq!(
            SinkError::fatal(Domain::External, "disk full").exit_code(),
            Some(3)
        );
        assert_eq!(SinkError::retry("down").exit_code(), None);
    }
}
