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
/// `drained` becomes true once shutdown was requested (or the input finished) and everything
/// buffered was handed off.
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
            move |(input, frontier), _output| {
                input.for_each(|_cap, data| {
                    for item in data.drain(..) {
                        let (partition, offset) = item.position();
                        let next = buffer.next_offsets.entry(partition).or_insert(offset + 1);
                        *next = (*next).max(offset + 1);
                        buffer.items.push(item);
                    }
                });
                // A finished input (a backfill read everything) flushes like a shutdown.
                let stopping = shutdown.load(Ordering::Relaxed) || frontier.frontier().is_empty();
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
/// hands the final windows and the checkpoint that covers them to the aggregate writer: at most
/// once per `interval` (age), or at once when `max_rows` final windows wait (size). Other
/// workers only forward to worker 0.
#[allow(clippy::too_many_arguments)]
pub fn commit_aggregates<'s>(
    aggregates: StreamVec<'s, EventTime, AggRow>,
    marks: StreamVec<'s, EventTime, SourceMark>,
    mut tracker: CheckpointTracker,
    tx: Sender<AggCommit>,
    interval: Duration,
    max_rows: usize,
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
                let stopping = shutdown.load(Ordering::Relaxed) || frontier == EventTime::MAX;
                if frontier > last_frontier {
                    let since = last_commit.elapsed();
                    let ready = || {
                        pending
                            .range(..frontier)
                            .map(|(_, rows)| rows.len())
                            .sum::<usize>()
                    };
                    if since >= interval || stopping || ready() >= max_rows {
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

#[cfg(test)]
mod tests {
    use super::*;
    use primespark_schemas::rows::{Agg, MetricAggRow, Rollup};
    use timely::dataflow::operators::{Input, Probe};
    use timely::dataflow::{InputHandleVec, ProbeHandle};

    fn window(i: i64) -> AggRow {
        AggRow {
            rollup: Rollup::Minute,
            row: Agg::Metrics(MetricAggRow {
                bucket_us: 0,
                device_id: format!("d{i}"),
                metric_name: "m".into(),
                count: 1,
                sum: 1.0,
                min: 1.0,
                max: 1.0,
            }),
        }
    }

    /// Runs the commit operator with a one-hour interval: only the size can make it commit.
    fn commits_within_the_interval(max_rows: usize, windows: i64) -> usize {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        timely::execute_directly(move |worker| {
            let mut aggs: InputHandleVec<EventTime, AggRow> = InputHandleVec::new();
            let mut marks: InputHandleVec<EventTime, SourceMark> = InputHandleVec::new();
            let probe = ProbeHandle::new();
            worker.dataflow::<EventTime, _, _>(|scope| {
                let a = scope.input_from(&mut aggs);
                let m = scope.input_from(&mut marks);
                commit_aggregates(
                    a.clone(),
                    m,
                    CheckpointTracker::new(60_000_000, Vec::new()),
                    tx,
                    Duration::from_secs(3600),
                    max_rows,
                    Arc::new(AtomicBool::new(false)),
                    Rc::default(),
                );
                a.probe_with(&probe);
            });
            for i in 0..windows {
                aggs.send(window(i));
            }
            aggs.advance_to(1);
            marks.advance_to(1);
            while probe.less_than(&1) {
                worker.step();
            }
            for _ in 0..50 {
                worker.step();
            }
            for i in 0..windows {
                aggs.send(window(i));
            }
            aggs.advance_to(2);
            marks.advance_to(2);
            for _ in 0..200 {
                worker.step();
            }
            // Not closing the inputs (that flushes, as at the end of a backfill): the dataflow
            // is dropped instead.
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
            drop((aggs, marks));
        });
        let mut commits = 0;
        while rx.try_recv().is_ok() {
            commits += 1;
        }
        commits
    }

    #[test]
    fn aggregates_flush_by_size_before_the_interval() {
        // The hour-long interval never passes: 5 waiting windows commit at each advance when
        // the size limit is 5, never when it is 1000.
        assert_eq!(commits_within_the_interval(5, 5), 2);
        assert_eq!(commits_within_the_interval(1000, 5), 0);
    }
}
