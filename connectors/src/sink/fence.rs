//! Single-writer fencing: what a sink checks before it makes anything visible.
//!
//! A process writes only while it holds the writer lease of its (dataflow, process id) in
//! PostgreSQL (`writer_leases`, taken and renewed by [`crate::postgres::lease`]). Each holder
//! gets a new epoch. Every commit transaction checks, inside the transaction and with the lease
//! row locked `FOR SHARE`, that the row still carries this process's epoch
//! ([`Fence::check_in`]): a takeover (which updates the row) waits for a commit in flight, and
//! a zombie's next commit fails and stops it. Writes outside PostgreSQL (a roll's rename on the
//! NAS, an upload) first pass [`Fence::check`], which refuses once the lease is known lost and
//! holds writes back (retryably) when it has not been renewed for half its time to live: a
//! standby takes over only after a whole time to live without renewal, measured on the
//! database's clock.
//!
//! Without PostgreSQL (the demo) or in a backfill the fence is [`Fence::unfenced`]: nothing is
//! checked, and the NAS folder lock of the run is the only guard.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Domain, SinkError};

/// The lease this process holds, shared by every sink and the renewal task.
#[derive(Clone, Default)]
pub struct Fence(Option<Arc<Held>>);

impl std::fmt::Debug for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Fence(unfenced)"),
            Some(h) => write!(f, "Fence(epoch {}, process {})", h.epoch, h.process_id),
        }
    }
}

struct Held {
    epoch: i64,
    process_id: i32,
    ttl: Duration,
    renewed: Mutex<Instant>,
    lost: Mutex<Option<String>>,
}

impl Fence {
    /// No lease: every check passes (the demo without PostgreSQL, a backfill).
    pub fn unfenced() -> Self {
        Self(None)
    }

    /// The lease of `process_id` at `epoch`, renewed just now, valid `ttl` without renewal.
    pub fn held(epoch: i64, process_id: i32, ttl: Duration) -> Self {
        Self(Some(Arc::new(Held {
            epoch,
            process_id,
            ttl,
            renewed: Mutex::new(Instant::now()),
            lost: Mutex::new(None),
        })))
    }

    /// The epoch held (`None`: unfenced).
    pub fn epoch(&self) -> Option<i64> {
        self.0.as_ref().map(|h| h.epoch)
    }

    /// The process id the lease is for.
    pub fn process_id(&self) -> Option<i32> {
        self.0.as_ref().map(|h| h.process_id)
    }

    /// The renewal task renewed the lease.
    pub fn renewed(&self) {
        if let Some(h) = &self.0 {
            if let Ok(mut r) = h.renewed.lock() {
                *r = Instant::now();
            }
        }
    }

    /// The lease is gone (another instance holds it): every later check fails with `why`.
    pub fn lose(&self, why: String) {
        if let Some(h) = &self.0 {
            if let Ok(mut l) = h.lost.lock() {
                l.get_or_insert(why);
            }
        }
    }

    /// Why the lease is lost, if it is.
    pub fn lost(&self) -> Option<String> {
        self.0
            .as_ref()
            .and_then(|h| h.lost.lock().ok().and_then(|l| l.clone()))
    }

    /// A check without I/O, before a write outside PostgreSQL becomes visible: fatal once the
    /// lease is lost, retryable while it has not been renewed for half its time to live.
    pub fn check(&self) -> Result<(), SinkError> {
        let Some(h) = &self.0 else { return Ok(()) };
        if let Some(why) = self.lost() {
            return Err(fenced(&why));
        }
        let age = h.renewed.lock().map_or(Duration::MAX, |r| r.elapsed());
        if age > h.ttl / 2 {
            return Err(SinkError::retry(format!(
                "the writer lease was last renewed {age:?} ago (over half of postgres.lease_ttl = {:?}): holding writes until it is renewed",
                h.ttl
            )));
        }
        Ok(())
    }

    /// The check inside a commit transaction: the lease row of `dataflow` still carries this
    /// process's epoch, locked `FOR SHARE` until the transaction ends, so no takeover can
    /// commit between this check and ours.
    pub async fn check_in<C: tokio_postgres::GenericClient + Sync>(
        &self,
        tx: &C,
        dataflow: &str,
    ) -> Result<(), SinkError> {
        let Some(h) = &self.0 else { return Ok(()) };
        self.check()?;
        let row = tx
            .query_opt(
                "SELECT epoch, holder FROM writer_leases WHERE dataflow = $1 AND process_id = $2 FOR SHARE",
                &[&dataflow, &h.process_id],
            )
            .await
            .map_err(|e| SinkError::retry(format!("checking the writer lease: {e}")))?;
        match row {
            Some(r) if r.get::<_, i64>(0) == h.epoch => Ok(()),
            Some(r) => {
                let why = format!(
                    "the writer lease of {dataflow} (process {}) is held by {} at epoch {}, this process had epoch {}",
                    h.process_id,
                    r.get::<_, String>(1),
                    r.get::<_, i64>(0),
                    h.epoch
                );
                self.lose(why.clone());
                Err(fenced(&why))
            }
            None => {
                let why = format!("the writer lease of {dataflow} is gone");
                self.lose(why.clone());
                Err(fenced(&why))
            }
        }
    }
}

/// The error that stops a process whose lease another instance took: `why` says how it knows.
pub fn fenced(why: &str) -> SinkError {
    // A restart makes this process a standby behind the new holder.
    SinkError::fatal(
        Domain::External,
        format!("fenced: {why}; another instance writes now, this one stops"),
    )
}
