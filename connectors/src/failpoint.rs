//! Named points where a test makes the pipeline fail on purpose: between a roll's rename and
//! its offset commit, inside the refused-record bisection, between the aggregate files and the
//! PostgreSQL transaction, and so on. Crash tests arm them to kill the process at exactly the
//! moment the exactly-once protocol is most delicate; the compliance suite arms them to fail a
//! sink operation once.
//!
//! Compiled in only with the `failpoints` feature (the test suites turn it on): without it
//! [`hit`] is an empty inline function and nothing can be armed.
//!
//! Armed from code ([`arm`]) or, for a child process, from the environment at the first hit:
//! `PRIMESPARK_FAILPOINTS="nas.roll_renamed=abort@3,postgres.bisect=error"` (`@N`: on the Nth
//! hit, default the first; `abort` ends the process as SIGKILL would, `error` fails the
//! operation once with a retryable error).

use crate::sink::SinkError;

/// What an armed point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fail the operation once with a retryable error.
    Error,
    /// End the process at once, without unwinding or flushing (a crash).
    Abort,
}

/// Passes the point `name`: `Err` when it is armed with [`Action::Error`]; ends the process
/// when armed with [`Action::Abort`]; `Ok` otherwise.
#[inline]
pub fn hit(name: &'static str) -> Result<(), SinkError> {
    #[cfg(feature = "failpoints")]
    return armed::hit(name);
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        Ok(())
    }
}

#[cfg(feature = "failpoints")]
pub use armed::{arm, disarm, hits};

#[cfg(feature = "failpoints")]
mod armed {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use super::Action;
    use crate::sink::SinkError;

    /// name -> (action, on which hit, hits so far).
    type Points = HashMap<String, (Action, u64, u64)>;

    fn points() -> &'static Mutex<Points> {
        static POINTS: OnceLock<Mutex<Points>> = OnceLock::new();
        POINTS.get_or_init(|| Mutex::new(from_env()))
    }

    fn from_env() -> Points {
        let mut points = Points::new();
        let Ok(spec) = std::env::var("PRIMESPARK_FAILPOINTS") else {
            return points;
        };
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let Some((name, action)) = entry.split_once('=') else {
                continue;
            };
            let (action, nth) = action.split_once('@').unwrap_or((action, "1"));
            let action = match action {
                "abort" => Action::Abort,
                _ => Action::Error,
            };
            points.insert(name.to_owned(), (action, nth.parse().unwrap_or(1), 0));
        }
        points
    }

    /// Arms `name` to act on its `nth` hit from now (1: the next).
    pub fn arm(name: &str, action: Action, nth: u64) {
        if let Ok(mut p) = points().lock() {
            p.insert(name.to_owned(), (action, nth.max(1), 0));
        }
    }

    /// Disarms `name`.
    pub fn disarm(name: &str) {
        if let Ok(mut p) = points().lock() {
            p.remove(name);
        }
    }

    /// How often armed `name` was passed.
    pub fn hits(name: &str) -> u64 {
        points()
            .lock()
            .ok()
            .and_then(|p| p.get(name).map(|(_, _, hits)| *hits))
            .unwrap_or(0)
    }

    pub(super) fn hit(name: &'static str) -> Result<(), SinkError> {
        let action = {
            let Ok(mut p) = points().lock() else {
                return Ok(());
            };
            let Some((action, nth, hits)) = p.get_mut(name) else {
                return Ok(());
            };
            *hits += 1;
            if *hits != *nth {
                return Ok(());
            }
            *action
        };
        match action {
            Action::Abort => {
                tracing::error!(failpoint = name, "failpoint: aborting the process");
                std::process::abort()
            }
            Action::Error => Err(SinkError::retry(format!("failpoint {name}"))),
        }
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;

    #[test]
    fn an_armed_point_fails_once_on_its_hit() {
        arm("test.point", Action::Error, 2);
        assert!(hit("test.point").is_ok());
        assert!(hit("test.point").is_err());
        assert!(hit("test.point").is_ok());
        assert_eq!(hits("test.point"), 3);
        disarm("test.point");
        assert!(hit("unarmed").is_ok());
    }
}
