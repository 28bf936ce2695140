//! The async side of a dataflow's sinks: one raw runtime per worker (its raw sinks, in registry
//! order) and one aggregate runtime per dataflow, each fed by a bounded channel from its timely
//! operator. A slow or failing sink holds its runtime in the retry loop, the channel fills, and
//! the operator pauses the source: backpressure, never memory growth.
//!
//! Per raw batch: every sink's [`Sink::write`](super::Sink::write) in order (the dead-letter topic first, so a
//! letter is out before any sink commits its offset), then every sink's [`Sink::commit`](super::Sink::commit) of
//! what is due; every 500 ms a commit of what became due by age; at the end, a commit of
//! everything. A sink's quarantine takes the refused records out of its share of the batch as
//! dead letters (also handed to the sinks that relay letters, the dead-letter topic) and writes
//! it again. A fatal error ends the runtime with that error. After each commit, a partition's
//! position committed by every sink that tracks positions goes to the Kafka consumer group
//! (when one is given: monitoring only).

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::mpsc::Receiver;

use super::quarantine::quarantine;
use super::{
    committed_everywhere, BoxAggSink, BoxRawSink, Domain, ErrorClass, Flush, RawBatch, SinkError,
    SinkSet,
};
use crate::kafka::GroupOffsets;
use crate::retrying;

/// How often rolling sinks are asked to publish what became due by age.
pub const TICK: Duration = Duration::from_millis(500);

/// One worker's raw sinks.
pub struct RawRuntime {
    topic: String,
    sinks: Vec<BoxRawSink>,
    /// The sinks that also take the letters another sink refused.
    relays: SinkSet,
    /// Where positions committed by every sink are reported (the Kafka consumer group).
    progress: Option<GroupOffsets>,
    /// Per partition seen, the position last reported.
    reported: BTreeMap<i32, Option<i64>>,
}

impl RawRuntime {
    /// The runtime of `sinks` (in the order they are written) for `topic`.
    pub fn new(topic: impl Into<String>, sinks: Vec<BoxRawSink>) -> Self {
        let relays = SinkSet::of(sinks.iter().filter(|s| s.relays_letters()).map(|s| s.id()));
        Self {
            topic: topic.into(),
            sinks,
            relays,
            progress: None,
            reported: BTreeMap::new(),
        }
    }

    /// Reports what every sink has committed to `group` after each commit.
    pub fn with_progress(mut self, group: GroupOffsets) -> Self {
        self.progress = Some(group);
        self
    }

    /// Reports each seen partition's position committed by every sink, if it moved.
    fn report_progress(&mut self) {
        let Some(group) = &self.progress else { return };
        for (partition, last) in &mut self.reported {
            let now = committed_everywhere(&self.sinks, *partition);
            if now.is_some() && now != *last {
                if let Some(next) = now {
                    group.report(&self.topic, *partition, next);
                }
                *last = now;
            }
        }
    }

    /// The sinks, for recovery and resume positions before the run.
    pub fn sinks_mut(&mut self) -> &mut [BoxRawSink] {
        &mut self.sinks
    }

    /// Runs until `rx` closes, then commits everything. `Err` is fatal: the pipeline stops.
    pub async fn run(mut self, mut rx: Receiver<RawBatch>) -> Result<(), SinkError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = rx.recv() => match batch {
                    Some(batch) => self.deliver(batch).await?,
                    None => break,
                },
                _ = tick.tick() => {
                    commit_all(&mut self.sinks, Flush::Due).await?;
                    self.report_progress();
                }
            }
        }
        commit_all(&mut self.sinks, Flush::All).await?;
        self.report_progress();
        Ok(())
    }

    /// Writes one batch to every sink, quarantining what a sink refuses, then commits what is
    /// due.
    pub async fn deliver(&mut self, mut batch: RawBatch) -> Result<(), SinkError> {
        if self.progress.is_some() {
            for p in batch.next_offsets.keys() {
                self.reported.entry(*p).or_insert(None);
            }
        }
        let mut i = 0;
        while i < self.sinks.len() {
            let sink = &mut self.sinks[i];
            let target = sink.target();
            match retrying!(target, sink.write(&batch)) {
                Ok(()) => i += 1,
                Err(e) if matches!(e.class(), ErrorClass::Quarantine(_)) => {
                    let (id, refused) = (sink.id(), e.into_refused());
                    let letters = quarantine(
                        &self.topic,
                        &mut batch,
                        id,
                        target.sink,
                        &refused,
                        self.relays,
                    );
                    // Relays written before this sink get the new letters now: still before
                    // any offset they cover is committed.
                    let extra = RawBatch {
                        items: letters.clone(),
                        next_offsets: Default::default(),
                    };
                    for earlier in &mut self.sinks[..i] {
                        if self.relays.contains(earlier.id()) {
                            let target = earlier.target();
                            retrying!(target, earlier.write(&extra)).map_err(unexpected)?;
                        }
                    }
                    batch.items.extend(letters);
                }
                Err(e) => return Err(e),
            }
        }
        commit_all(&mut self.sinks, Flush::Due).await?;
        self.report_progress();
        Ok(())
    }
}

/// A dataflow's aggregate sinks (on the committing worker's runtime).
pub struct AggRuntime {
    sinks: Vec<BoxAggSink>,
}

impl AggRuntime {
    /// The runtime of `sinks`, written in order (files before the PostgreSQL transaction whose
    /// committed watermark makes them final).
    pub fn new(sinks: Vec<BoxAggSink>) -> Self {
        Self { sinks }
    }

    /// The sinks, for resume positions before the run.
    pub fn sinks(&self) -> &[BoxAggSink] {
        &self.sinks
    }

    /// Runs until `rx` closes. `Err` is fatal: the pipeline stops. Between commits a tick lets
    /// the sinks do what is due by time alone (removing merged minute files once their grace
    /// has passed, also when no more windows come).
    pub async fn run(mut self, mut rx: Receiver<super::AggCommit>) -> Result<(), SinkError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                commit = rx.recv() => match commit {
                    Some(commit) => {
                        for sink in &mut self.sinks {
                            let target = sink.target();
                            // A window cannot be dead-lettered (it is no record): a refusal
                            // is fatal.
                            retrying!(target, sink.write(&commit)).map_err(unexpected)?;
                        }
                        commit_all(&mut self.sinks, Flush::Due).await?;
                    }
                    None => break,
                },
                _ = tick.tick() => commit_all(&mut self.sinks, Flush::Due).await?,
            }
        }
        commit_all(&mut self.sinks, Flush::All).await
    }
}

async fn commit_all<I: Send + Sync>(
    sinks: &mut [Box<dyn super::Sink<Input = I>>],
    flush: Flush,
) -> Result<(), SinkError> {
    for sink in sinks {
        let target = sink.target();
        retrying!(target, sink.commit(flush)).map_err(unexpected)?;
    }
    Ok(())
}

/// A quarantine where none can be honoured (a commit, a window, a relayed letter) stops the
/// pipeline: someone must look at the data.
fn unexpected(e: SinkError) -> SinkError {
    match e.class() {
        ErrorClass::Quarantine(_) => SinkError::fatal(Domain::User, e),
        _ => e,
    }
}
