//! Timely operators that hand work to the async writers.
//!
//! Both hand off through bounded channels with `try_send`: a full channel keeps the batch in
//! the operator and raises this worker's pressure flag, which pauses the source. A slow sink
//! therefore slows reading instead of growing memory.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use primespark_operators::checkpoint::{Checkpoint, CheckpointTracker};
use primespark_operators::record::SourceMark;
use primespark_operators::EventTime;
use primespark_schemas::rows::AggRow;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use crate::source::RawItem;

/// The output of operators that emit nothing.
type UnitBuilder = timely::container::CapacityContainerBuilder<Vec<()>>;

/// A batch of raw items for one worker's raw writer.
#[derive(Debug)]
pub struct RawBatch {
    /// Points and dead letters, in read order per partition.
    pub items: Vec<RawItem>,
    /// Per partition: one past the highest offset in `items`.
    pub next_offsets: BTreeMap<i32, i64>,
}

/// Closed windows and the checkpoint that makes them final.
#[derive(Debug)]
pub struct AggCommit {
    /// Aggregates of windows ending before the checkpoint's frontier.
    pub rows: Vec<AggRow>,
    /// Resume offsets and committed watermark.
    pub checkpoint: Checkpoint,
}

/// Flush policy of the raw sink operator.
#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    /// Hand off when this many items are buffered.
    pub rows: usize,
    /// Hand off at least this often.
    pub interval: Duration,
}

/// Buffers raw items and hands batches to this worker's raw writer.
///
/// `drained` becomes true once shutdown was requested and everything buffered was handed off.
pub fn raw_sink(
    stream: StreamVec<'_, EventTime, RawItem>,
    tx: Sender<RawBatch>,
    policy: FlushPolicy,
    pressure: Rc<Cell<bool>>,
    shutdown: Arc<AtomicBool>,
    drained: Rc<Cell<bool>>,
) {
    let scope = stream.scope();
    let _: StreamVec<'_, EventTime, ()> =
        stream.unary_frontier::<UnitBuilder, _, _, _>(Pipeline, "RawSink", move |_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut buffer = RawBatch {
                items: Vec::new(),
                next_offsets: BTreeMap::new(),
            };
            let mut last_flush = Instant::now();
            move |(input, _frontier), _output| {
                input.for_each(|_cap, data| {
                    for item in data.drain(..) {
                        let (partition, offset) = item.position();
                        let next = buffer.next_offsets.entry(partition).or_insert(offset + 1);
                        *next = (*next).max(offset + 1);
                        buffer.items.push(item);
                    }
                });
                let stopping = shutdown.load(Ordering::Relaxed);
                let due = buffer.items.len() >= policy.rows
                    || (!buffer.next_offsets.is_empty()
                        && (last_flush.elapsed() >= policy.interval || stopping));
                if due {
                    let batch = std::mem::replace(
                        &mut buffer,
                        RawBatch {
                            items: Vec::new(),
                            next_offsets: BTreeMap::new(),
                        },
                    );
                    match tx.try_send(batch) {
                        Ok(()) => last_flush = Instant::now(),
                        Err(TrySendError::Full(batch)) => buffer = batch,
                        Err(TrySendError::Closed(batch)) => {
                            tracing::error!(
                                items = batch.items.len(),
                                "raw writer stopped; batch kept for the next run"
                            );
                            buffer = batch;
                        }
                    }
                }
                pressure.set(buffer.items.len() >= policy.rows.saturating_mul(2));
                drained.set(stopping && buffer.next_offsets.is_empty());
                // Come back for the age-based flush, and now and then to notice shutdown.
                let wait = if buffer.next_offsets.is_empty() {
                    Duration::from_millis(100)
                } else {
                    policy
                        .interval
                        .saturating_sub(last_flush.elapsed())
                        .min(Duration::from_millis(20))
                };
                activator.activate_after(wait.max(Duration::from_millis(1)));
            }
        });
}

/// On worker 0: collects closed windows and source marks, and whenever the watermark advances
/// (at most once per `interval`) hands the final windows and the checkpoint that covers them to
/// the aggregate writer. Other workers only forward to worker 0.
#[allow(clippy::too_many_arguments)]
pub fn commit_aggregates<'s>(
    aggregates: StreamVec<'s, EventTime, AggRow>,
    marks: StreamVec<'s, EventTime, SourceMark>,
    mut tracker: CheckpointTracker,
    tx: Sender<AggCommit>,
    interval: Duration,
    shutdown: Arc<AtomicBool>,
    drained: Rc<Cell<bool>>,
) {
    let scope = aggregates.scope();
    let is_committer = scope.index() == 0;
    let _: StreamVec<'s, EventTime, ()> = aggregates.binary_frontier::<_, UnitBuilder, _, _, _, _>(
        marks,
        Exchange::new(|_: &AggRow| 0),
        Exchange::new(|_: &SourceMark| 0),
        "CommitAggregates",
        move |_cap, info| {
            let activator = scope.activator_for(info.address);
            let mut pending: BTreeMap<EventTime, Vec<AggRow>> = BTreeMap::new();
            let mut last_frontier: EventTime = 0;
            let mut last_commit = Instant::now();
            let mut outbox: Option<AggCommit> = None;
            move |(aggs, aggs_frontier), (marks, marks_frontier), _output| {
                aggs.for_each(|cap, data| {
                    if let Some(&t) = cap.least() {
                        pending.entry(t).or_default().append(data);
                    }
                });
                marks.for_each(|cap, data| {
                    if let Some(&t) = cap.least() {
                        tracker.add_marks(t, data.drain(..));
                    }
                });
                if !is_committer {
                    drained.set(true);
                    return;
                }
                // Wake up now and then even when idle, so shutdown is noticed.
                activator.activate_after(Duration::from_millis(100));
                let frontier = [
                    aggs_frontier.frontier().first(),
                    marks_frontier.frontier().first(),
                ]
                .into_iter()
                .map(|t| t.copied().unwrap_or(EventTime::MAX))
                .min()
                .unwrap_or(EventTime::MAX);
                let stopping = shutdown.load(Ordering::Relaxed);
                if frontier > last_frontier {
                    let since = last_commit.elapsed();
                    if since >= interval || stopping {
                        let later = pending.split_off(&frontier);
                        let rows: Vec<AggRow> = std::mem::replace(&mut pending, later)
                            .into_values()
                            .flatten()
                            .collect();
                        let checkpoint = tracker.checkpoint(frontier);
                        match outbox.as_mut() {
                            Some(o) => {
                                o.rows.extend(rows);
                                o.checkpoint = checkpoint;
                            }
                            None => outbox = Some(AggCommit { rows, checkpoint }),
                        }
                        last_frontier = frontier;
                        last_commit = Instant::now();
                    } else {
                        activator.activate_after(interval - since);
                    }
                }
                if let Some(commit) = outbox.take() {
                    match tx.try_send(commit) {
                        Ok(()) => {}
                        Err(TrySendError::Full(commit)) | Err(TrySendError::Closed(commit)) => {
                            outbox = Some(commit);
                            activator.activate_after(Duration::from_millis(20));
                        }
                    }
                }
                drained.set(stopping && outbox.is_none());
            }
        },
    );
}
