//! The one retry loop of every sink: exponential backoff (100 ms doubling to 10 s) with jitter
//! while an operation fails with [`ErrorClass::Retry`], the sink marked degraded meanwhile;
//! any other class ends the loop and goes back to the caller (the runtime quarantines or stops).
//!
//! Written as a macro, [`retrying!`](crate::retrying), because the retried expression borrows
//! the sink mutably and a closure returning such a future cannot be called twice.

use std::time::Duration;

use rand::Rng;

use super::error::{ErrorClass, SinkError};
use crate::metrics::{SinkFailed, SinkRecovered, SinkStopped};

/// Where a retried operation writes: the `sink` and `table` labels of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// Sink label (`postgres`, `parquet`, `s3`, `kafka`).
    pub sink: &'a str,
    /// Table label (`raw`, `aggregates`, `telemetry_raw`, ...).
    pub table: &'a str,
}

/// The state of one operation's retry loop.
#[derive(Debug)]
pub struct Backoff<'a> {
    target: Target<'a>,
    attempt: u32,
    delay: Duration,
    /// Every target marked degraded by this loop (cleared when the operation succeeds).
    degraded: Vec<Target<'a>>,
}

impl<'a> Backoff<'a> {
    /// A loop for an operation on `target`.
    pub fn new(target: Target<'a>) -> Self {
        Self {
            target,
            attempt: 0,
            delay: Duration::from_millis(100),
            degraded: Vec::new(),
        }
    }

    /// The operation succeeded: clears the degraded flag if it had failed before.
    pub fn succeeded(&self) {
        for target in &self.degraded {
            SinkRecovered {
                sink: target.sink,
                table: target.table,
            }
            .emit();
        }
    }

    /// The operation failed: for [`ErrorClass::Retry`] counts it, marks the sink degraded and
    /// waits before the next attempt (`Ok`); any other class is handed back (`Err`).
    pub async fn failed(&mut self, error: SinkError) -> Result<(), SinkError> {
        let target = error.target().unwrap_or(self.target);
        let again = match error.class() {
            ErrorClass::Retry => true,
            // A quarantine that names no record cannot take anything out of the batch.
            ErrorClass::Quarantine(refused) => refused.is_empty(),
            ErrorClass::Fatal(_) => false,
        };
        if !again {
            if matches!(error.class(), ErrorClass::Fatal(_)) {
                SinkStopped {
                    sink: target.sink,
                    table: target.table,
                    error: &error,
                }
                .emit();
            }
            return Err(error);
        }
        self.attempt += 1;
        if !self.degraded.contains(&target) {
            self.degraded.push(target);
        }
        SinkFailed {
            sink: target.sink,
            table: target.table,
            error: &error,
            attempt: self.attempt,
        }
        .emit();
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::time::sleep(self.delay.mul_f64(jitter)).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(10));
        Ok(())
    }
}

/// Runs `$op` (an expression giving a `Future<Output = Result<T, SinkError>>`, evaluated anew
/// for every attempt) until it succeeds or fails with a class other than retry, backing off in
/// between: `Ok(T)`, or `Err(SinkError)` to quarantine or stop.
#[macro_export]
macro_rules! retrying {
    ($target:expr, $op:expr) => {{
        let mut backoff = $crate::sink::Backoff::new($target);
        loop {
            match $op.await {
                Ok(value) => {
                    backoff.succeeded();
                    break Ok(value);
                }
                Err(error) => {
                    if let Err(stop) = backoff.failed(error).await {
                        break Err(stop);
                    }
                }
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::error::{Domain, Refused};

    #[tokio::test]
    async fn outages_are_retried_other_classes_come_back() {
        let target = Target {
            sink: "test",
            table: "retry",
        };
        let mut attempts = 0;
        let result: Result<u32, SinkError> = retrying!(target, async {
            attempts += 1;
            if attempts < 4 {
                Err(SinkError::retry("down"))
            } else {
                Ok(attempts)
            }
        });
        assert_eq!(result.unwrap(), 4);

        let refused = Refused {
            partition: 0,
            offset: 1,
            reason: "no".into(),
        };
        let result: Result<(), SinkError> = retrying!(target, async {
            Err(SinkError::quarantine(vec![refused.clone()], "refused"))
        });
        assert_eq!(result.unwrap_err().into_refused(), vec![refused]);

        let mut fatal_attempts = 0;
        let result: Result<(), SinkError> = retrying!(target, async {
            fatal_attempts += 1;
            Err(SinkError::fatal(Domain::User, "permission denied"))
        });
        assert_eq!(result.unwrap_err().exit_code(), Some(2));
        assert_eq!(fatal_attempts, 1, "a fatal error is not retried");
    }
}
