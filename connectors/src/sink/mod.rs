//! The sink contract: how every sink keeps its data exactly once, and the runtime that drives
//! the sinks of a dataflow.
//!
//! Modelled on Arroyo's `TwoPhaseCommitter` (one exactly-once protocol for many sinks) and
//! Vector's `SinkConfig::build -> (Sink, Healthcheck)` (pure validation, then I/O):
//!
//! 1. **Validate** (pure, `check-config`): each connector's config section has `validate()`.
//! 2. **Build** ([`registry`]): for each worker and stream, the registry builds the sinks the
//!    configuration asks for, each with its [`SinkId`] and a health check run once at start-up.
//! 3. **Resume** ([`Sink::resume`]): per partition, the first offset the sink still needs (what
//!    it stored with its data), or `None` when it has stored nothing. The source reads each
//!    partition from the least of them and tags each record with the sinks that still need it
//!    (`primespark_schemas::flow::SinkSet`): a sink never sees a record twice and never misses
//!    one.
//! 4. **Recover** ([`Sink::recover`]): removes what was written but never committed (a crash
//!    between the two), before anything is read.
//! 5. **Write** ([`Sink::write`]): a transactional sink writes the batch and its positions in
//!    one transaction; a rolling sink buffers it.
//! 6. **Commit** ([`Sink::commit`]): a rolling sink publishes what is due (a roll by rows, bytes
//!    or age; everything at shutdown) and then stores its positions.
//!
//! Every failure is a [`SinkError`] with one [`ErrorClass`]; the runtime's one retry loop
//! ([`retrying!`](crate::retrying)) backs off on `Retry`, turns the records of a `Quarantine`
//! into dead letters (`sink_rejected`, [`quarantine`]) and writes the rest, and stops the
//! pipeline on `Fatal` with the exit code of its [`Domain`].
//!
//! # Adding a sink
//!
//! 1. Make a folder for the connector under `connectors/src/` (or use the connector's existing
//!    one) with `config.rs` (serde, `deny_unknown_fields`, a pure `validate()`), and
//!    `<what>_sink.rs` implementing [`Sink`] for `Input = RawBatch` (raw rows and dead letters)
//!    or `Input = AggCommit` (closed windows).
//! 2. Take only the items your id marks: `batch.rows_for(self.id)` / `batch.letters_for(..)`.
//!    Store positions with the data (same transaction), or after the data is durable and then
//!    make [`Sink::recover`] remove whatever lies at or beyond the stored positions.
//! 3. Classify your errors ([`Classify`]): an outage is `Retry`, a record the service can never
//!    take is `Quarantine`, a setting or invariant is `Fatal`.
//! 4. Emit `SinkRowsWritten` per durable write (rows, duration); the runtime emits the failure,
//!    recovery and stop events.
//! 5. Add one line to [`registry::RAW_SINKS`] (or the aggregate list) saying when the
//!    configuration wants it and how to build it.
//! 6. Add it to the compliance suite (`tests/src/compliance.rs`, run by
//!    `tests/tests/sink_compliance.rs` against the real service): resume, recovery after a crash
//!    between write and commit, retries and metrics, backpressure, shutdown flush.

mod error;
pub mod fence;
pub mod quarantine;
pub mod registry;
mod retry;
pub mod runtime;

use async_trait::async_trait;
use futures::future::BoxFuture;
pub use primespark_schemas::flow::{AggCommit, RawBatch, SinkId, SinkSet};
use primespark_schemas::rows::PartitionOffset;

pub use error::{io_class, Classify, Domain, ErrorClass, Refused, SinkError};
pub use retry::{Backoff, Target};

/// How much a [`Sink::commit`] must publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// What is due by the sink's own policy (rows, bytes, age).
    Due,
    /// Everything it holds: the input ended or the process is shutting down.
    All,
}

/// A sink's progress on one partition ([`Sink::committed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The sink keeps no positions of its own (a relay, or files rewritten from the replay).
    NotTracked,
    /// It has made nothing of the partition durable yet.
    Nothing,
    /// Every record below this offset is durable in it.
    Below(i64),
}

/// The first offset of `partition` not yet durable in every sink that tracks positions:
/// `None` while one of them has made nothing durable, or when none tracks any.
pub fn committed_everywhere<I: Send + Sync>(
    sinks: &[Box<dyn Sink<Input = I>>],
    partition: i32,
) -> Option<i64> {
    let mut least: Option<i64> = None;
    for sink in sinks {
        match sink.committed(partition) {
            Committed::NotTracked => {}
            Committed::Nothing => return None,
            Committed::Below(next) => least = Some(least.map_or(next, |l| l.min(next))),
        }
    }
    least
}

/// A sink of one dataflow on one worker. See the module documentation for the protocol.
#[async_trait]
pub trait Sink: Send {
    /// What it consumes: [`RawBatch`] or [`AggCommit`].
    type Input: Send + Sync;

    /// Its bit in the records' [`SinkSet`].
    fn id(&self) -> SinkId;

    /// Its name in `source_offsets` (and logs).
    fn name(&self) -> &'static str;

    /// The `sink`/`table` labels of its metrics.
    fn target(&self) -> Target<'static>;

    /// Whether [`Sink::resume`] is a position it stores (false for a sink that rewrites its
    /// output idempotently and needs no records of its own, like the aggregate files).
    fn stores_positions(&self) -> bool {
        true
    }

    /// Whether dead letters another sink refused must reach it too (the dead-letter topic).
    fn relays_letters(&self) -> bool {
        false
    }

    /// Where it needs `partition` from: the first offset it has not stored (with the
    /// partition's highest event time before it, for sinks that track one), or `None` when it
    /// has stored nothing for the partition.
    fn resume(&self, partition: i32) -> Option<PartitionOffset>;

    /// How far it has made `partition` durable as of now (after its last commit), for
    /// progress reports such as the Kafka consumer group's offsets. Default
    /// [`Committed::NotTracked`]: a sink that stores no positions of its own.
    fn committed(&self, _partition: i32) -> Committed {
        Committed::NotTracked
    }

    /// Removes what it wrote but never committed. Returns how many objects it removed.
    async fn recover(&mut self) -> Result<usize, SinkError>;

    /// Takes a batch: writes it (with its positions) or buffers it.
    async fn write(&mut self, input: &Self::Input) -> Result<(), SinkError>;

    /// Publishes what is due (or everything) and stores its positions.
    async fn commit(&mut self, flush: Flush) -> Result<(), SinkError>;
}

/// A raw sink (raw rows and dead letters), boxed.
pub type BoxRawSink = Box<dyn Sink<Input = RawBatch>>;

/// An aggregate sink (closed windows), boxed.
pub type BoxAggSink = Box<dyn Sink<Input = AggCommit>>;

/// A sink's check of its service, run once at start-up.
pub type Healthcheck = BoxFuture<'static, Result<(), SinkError>>;

/// A health check that always passes (a sink with nothing to check before it writes).
pub fn healthy() -> Healthcheck {
    Box::pin(async { Ok(()) })
}
