//! The one SQLSTATE classifier: what a sink (or a query) does about a PostgreSQL failure.

use tokio_postgres::error::SqlState;

use super::PostgresError;
use crate::sink::{Classify, Domain, ErrorClass};

/// What a PostgreSQL error means for whoever issued the statement.
///
/// - no SQLSTATE (the connection broke, a timeout), class 08 (connection), 40 (rolled back:
///   serialization, deadlock), 53 (insufficient resources), 57 (operator intervention: the
///   server restarting), 58 (system error), XX (internal): the service, for now: retry.
/// - 22 (data exception), 23 (integrity constraint): the rows themselves are refused.
/// - 28 (authorization), 42 (syntax, undefined table or column, insufficient privilege),
///   3D/3F (no such database or schema), 25 (read-only transaction on a replica): someone
///   changed the database or the settings: stop, a restart does not help.
pub fn classify_sqlstate(code: Option<&SqlState>) -> SqlClass {
    let Some(code) = code else {
        return SqlClass::Transient;
    };
    match code.code().get(..2) {
        Some("22" | "23") => SqlClass::Data,
        Some("28" | "42" | "3D" | "3F" | "25" | "0A") => SqlClass::Setup,
        _ => SqlClass::Transient,
    }
}

/// The classes of [`classify_sqlstate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlClass {
    /// The service, for now: retry.
    Transient,
    /// The data is refused: the same rows fail again.
    Data,
    /// A setting, a permission or the schema: stop.
    Setup,
}

impl Classify for PostgresError {
    fn class(&self) -> ErrorClass {
        match self {
            PostgresError::Connect(e) => match e.code().map(|c| classify_sqlstate(Some(c))) {
                // A wrong password or database is a setting.
                Some(SqlClass::Setup) => ErrorClass::Fatal(Domain::User),
                _ => ErrorClass::Retry,
            },
            PostgresError::Statement { source, .. } => match classify_sqlstate(source.code()) {
                SqlClass::Transient => ErrorClass::Retry,
                // The caller finds the refused records (bisection) and quarantines them.
                SqlClass::Data => ErrorClass::Quarantine(Vec::new()),
                SqlClass::Setup => ErrorClass::Fatal(Domain::User),
            },
            PostgresError::Settings(_) => ErrorClass::Fatal(Domain::User),
            // A stored row someone must fix or remove.
            PostgresError::InvalidRow(_) => ErrorClass::Fatal(Domain::User),
            PostgresError::Injected(_) => ErrorClass::Retry,
            PostgresError::Fenced(e) => e.class().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_sort_into_outages_data_and_setup() {
        assert_eq!(classify_sqlstate(None), SqlClass::Transient);
        assert_eq!(
            classify_sqlstate(Some(&SqlState::ADMIN_SHUTDOWN)),
            SqlClass::Transient
        );
        assert_eq!(
            classify_sqlstate(Some(&SqlState::T_R_SERIALIZATION_FAILURE)),
            SqlClass::Transient
        );
        assert_eq!(
            classify_sqlstate(Some(&SqlState::DISK_FULL)),
            SqlClass::Transient
        );
        assert_eq!(
            classify_sqlstate(Some(&SqlState::CHECK_VIOLATION)),
            SqlClass::Data
        );
        assert_eq!(
            classify_sqlstate(Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE)),
            SqlClass::Data
        );
        assert_eq!(
            classify_sqlstate(Some(&SqlState::UNDEFINED_TABLE)),
            SqlClass::Setup
        );
        assert_eq!(
            classify_sqlstate(Some(&SqlState::INSUFFICIENT_PRIVILEGE)),
            SqlClass::Setup
        );
        assert_eq!(
            classify_sqlstate(Some(&SqlState::INVALID_PASSWORD)),
            SqlClass::Setup
        );
        assert_eq!(
            PostgresError::InvalidRow("x".into()).class(),
            ErrorClass::Fatal(Domain::User)
        );
    }
}
