//! The operators at the end of every dataflow: they hand work to the sinks' async runtimes
//! (`primespark_connectors::sink`) through bounded channels.
//!
//! Both hand off with `try_send`: a full channel keeps the batch in the operator and raises the
//! worker's pressure flag, which pauses the source. A slow sink therefore slows reading instead
//! of growing memory.
//! - [`RawSink::raw_sink`]: buffers raw items and hands a worker's batches to its raw sinks;
//!   [`RawSink::raw_sink_split`] also emits the windows' inputs in the same pass.
//! - [`CommitAggregates::commit_aggregates`]: on worker 0, closed windows and the checkpoint
//!   that makes them final, to the aggregate sinks.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use primespark_schemas::flow::{AggCommit, RawBatch, RawItem};
use primespark_schemas::rows::AggRow;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

use crate::checkpoint::CheckpointTracker;
use crate::control::Control;
use crate::record::SourceMark;
use crate::EventTime;

/// The output of operators that emit nothing.
type UnitBuilder = CapacityContainerBuilder<Vec<()>>;

/// When a buffer is handed off: by size or by age, and early once the source is caught up.
///
/// Once the worker's source has read everything the broker holds ([`Control::is_caught_up`]),
/// waiting out `interval` only delays rows that will not be joined by more: the buffer is
/// handed off as soon as [`FlushPolicy::caught_up_floor`] has passed since the last hand-off.
/// The floor keeps a trickle of events (each one catching the source up) from becoming one
/// COPY per event.
#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    /// Hand off when this many items (raw items, final windows) wait.
    pub rows: usize,
    /// Hand off at least this often.
    pub interval: Duration,
}

/// The least time between two hand-offs made early because the source is caught up.
pub const CAUGHT_UP_FLOOR: Duration = Duration::from_millis(100);

impl FlushPolicy {
    /// How long after the last hand-off a caught-up source's buffer is handed off: the
    /// [`CAUGHT_UP_FLOOR`], or the interval when that is shorter.
    pub fn caught_up_floor(&self) -> Duration {
        self.interval.min(CAUGHT_UP_FLOOR)
    }

    /// How old, since the last hand-off, a non-empty buffer may grow before it is due.
    fn max_age(&self, caught_up: bool) -> Duration {
        if caught_up {
            self.caught_up_floor()
        } else {
            self.interval
        }
    }
}

/// The raw sink operator, on a stream of raw items.
pub trait RawSink<'s> {
    /// Buffers raw items and hands batches to this worker's raw sinks through `tx`.
    /// `drained` becomes true once shutdown was requested (or the input finished) and
    /// everything buffered was handed off.
    ///
    /// ```
    /// use primespark_operators::control::Control;
    /// use primespark_operators::sink::{FlushPolicy, RawSink};
    /// use primespark_schemas::flow::{DeadLetter, RawItem, SinkSet};
    /// use primespark_schemas::rows::DeadLetterRow;
    /// use timely::dataflow::operators::ToStream;
    ///
    /// let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    /// timely::example(move |scope| {
    ///     let letter = |offset| RawItem::Dead(DeadLetter { delivery: SinkSet::EMPTY,
    ///         row: DeadLetterRow { partition: 0, offset, reason: "malformed_json".into(),
    ///             error: "oops".into(), payload: b"oops".to_vec() } });
    ///     let policy = FlushPolicy { rows: 2, interval: std::time::Duration::from_secs(60) };
    ///     vec![letter(7), letter(8)].to_stream(scope).container::<Vec<_>>()
    ///         .raw_sink(tx, policy, &Control::default(), Default::default());
    /// });
    /// let batch = rx.try_recv().unwrap();
    /// assert_eq!(batch.items.len(), 2);
    /// assert_eq!(batch.next_offsets[&0], 9);
    /// ```
    fn raw_sink(
        self,
        tx: Sender<RawBatch>,
        policy: FlushPolicy,
        control: &Control,
        drained: Rc<Cell<bool>>,
    );

    /// [`RawSink::raw_sink`], which also emits what `split` takes from each item by reference
    /// (the windows' inputs) before the item moves into the batch. A second consumer of the raw
    /// stream would have timely clone every batch of items for it (its fan-out clones the
    /// container for all but the last consumer); this reads the stream once.
    ///
    /// ```
    /// use primespark_operators::control::Control;
    /// use primespark_operators::sink::{FlushPolicy, RawSink};
    /// use primespark_schemas::flow::{DeadLetter, RawItem, SinkSet};
    /// use primespark_schemas::rows::DeadLetterRow;
    /// use timely::dataflow::operators::capture::{Capture, Extract};
    /// use timely::dataflow::operators::ToStream;
    ///
    /// let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    /// let (out_tx, out_rx) = std::sync::mpsc::channel();
    /// timely::example(move |scope| {
    ///     let letter = |offset| RawItem::Dead(DeadLetter { delivery: SinkSet::EMPTY,
    ///         row: DeadLetterRow { partition: 0, offset, reason: "malformed_json".into(),
    ///             error: "oops".into(), payload: b"oops".to_vec() } });
    ///     let policy = FlushPolicy { rows: 2, interval: std::time::Duration::from_secs(60) };
    ///     vec![letter(7), letter(8)].to_stream(scope).container::<Vec<_>>()
    ///         .raw_sink_split(tx, policy, &Control::default(), Default::default(),
    ///             |item, out| out.push(item.position().1))
    ///         .capture_into(out_tx);
    /// });
    /// assert_eq!(rx.try_recv().unwrap().items.len(), 2);
    /// let offsets: Vec<i64> = out_rx.extract().into_iter().flat_map(|(_, o)| o).collect();
    /// assert_eq!(offsets, [7, 8]);
    /// ```
    fn raw_sink_split<W, F>(
        self,
        tx: Sender<RawBatch>,
        policy: FlushPolicy,
        control: &Control,
        drained: Rc<Cell<bool>>,
        split: F,
    ) -> StreamVec<'s, EventTime, W>
    where
        W: Clone + 'static,
        F: FnMut(&RawItem, &mut Vec<W>) + 'static;
}

impl<'s> RawSink<'s> for StreamVec<'s, EventTime, RawItem> {
    fn raw_sink(
        self,
        tx: Sender<RawBatch>,
        policy: FlushPolicy,
        control: &Control,
        drained: Rc<Cell<bool>>,
    ) {
        let _: StreamVec<'s, EventTime, ()> =
            self.raw_sink_split(tx, policy, control, drained, |_, _| {});
    }

    fn raw_sink_split<W, F>(
        self,
        tx: Sender<RawBatch>,
        policy: FlushPolicy,
        control: &Control,
        drained: Rc<Cell<bool>>,
        mut split: F,
    ) -> StreamVec<'s, EventTime, W>
    where
        W: Clone + 'static,
        F: FnMut(&RawItem, &mut Vec<W>) + 'static,
    {
        let scope = self.scope();
        let control = control.clone();
        self.unary_frontier::<CapacityContainerBuilder<Vec<W>>, _, _, _>(
            Pipeline,
            "RawSink",
            move |_cap, info| {
                let activator = scope.activator_for(info.address);
                let mut buffer = RawBatch::default();
                let mut split_out = Vec::new();
                let mut last_flush = Instant::now();
                let mut runtime_gone = false;
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        for item in data.iter() {
                            split(item, &mut split_out);
                        }
                        if !split_out.is_empty() {
                            output.session(&cap).give_iterator(split_out.drain(..));
                        }
                        if runtime_gone {
                            data.clear();
                            return;
                        }
                        for item in data.drain(..) {
                            buffer.push(item);
                        }
                    });
                    // A finished input (a backfill read everything) flushes like a shutdown.
                    let stopping = control.is_shutting_down() || frontier.frontier().is_empty();
                    let caught_up = control.is_caught_up();
                    let due = buffer.items.len() >= policy.rows
                        || (!buffer.is_empty()
                            && (last_flush.elapsed() >= policy.max_age(caught_up) || stopping));
                    if due {
                        match tx.try_send(std::mem::take(&mut buffer)) {
                            Ok(()) => last_flush = Instant::now(),
                            Err(TrySendError::Full(batch)) => buffer = batch,
                            Err(TrySendError::Closed(batch)) => {
                                // Nothing uncommitted is lost: the next run resumes from the
                                // sinks' committed positions and reads these records again.
                                // Dropping the batch lets shutdown finish instead of waiting
                                // for a runtime that is gone.
                                tracing::error!(
                                    items = batch.items.len(),
                                    "raw sinks stopped; batch left for the next run to read again"
                                );
                                runtime_gone = true;
                            }
                        }
                    }
                    control
                        .pressure
                        .set(runtime_gone || buffer.items.len() >= policy.rows.saturating_mul(2));
                    drained.set(stopping && buffer.is_empty());
                    // Come back for the age-based flush, and now and then to notice shutdown.
                    let wait = if buffer.is_empty() {
                        Duration::from_millis(100)
                    } else {
                        policy
                            .max_age(caught_up)
                            .saturating_sub(last_flush.elapsed())
                            .min(Duration::from_millis(20))
                    };
                    activator.activate_after(wait.max(Duration::from_millis(1)));
                }
            },
        )
    }
}

/// The commit operator, on the stream of closed windows.
pub trait CommitAggregates<'s> {
    /// On worker 0: collects closed windows and source marks, and whenever the watermark
    /// advances hands the final windows and the checkpoint that covers them to the aggregate
    /// sinks: at most once per `policy.interval` (age), or at once when `policy.rows` final
    /// windows wait (size). Other workers only forward to worker 0.
    ///
    /// ```
    /// use primespark_operators::checkpoint::CheckpointTracker;
    /// use primespark_operators::record::SourceMark;
    /// use primespark_operators::sink::{CommitAggregates, FlushPolicy};
    /// use primespark_schemas::rows::{Agg, AggRow, MetricAggRow, Rollup};
    /// use timely::dataflow::operators::ToStream;
    ///
    /// let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    /// timely::example(move |scope| {
    ///     let window = AggRow { rollup: Rollup::Minute, row: Agg::Metrics(MetricAggRow {
    ///         bucket_us: 0, device_id: "pi".into(), metric_name: "cpu_percent".into(),
    ///         count: 1, sum: 5.0, min: 5.0, max: 5.0 }) };
    ///     let windows = vec![window].to_stream(scope).container::<Vec<_>>();
    ///     let marks = Vec::<SourceMark>::new().to_stream(scope).container::<Vec<_>>();
    ///     let policy = FlushPolicy { rows: 1000, interval: std::time::Duration::ZERO };
    ///     windows.commit_aggregates(marks, CheckpointTracker::new(60_000_000, []), tx, policy,
    ///         &Default::default(), Default::default());
    /// });
    /// // The input ended: everything is final and handed off.
    /// assert_eq!(rx.try_recv().unwrap().rows.len(), 1);
    /// ```
    fn commit_aggregates(
        self,
        marks: StreamVec<'s, EventTime, SourceMark>,
        tracker: CheckpointTracker,
        tx: Sender<AggCommit>,
        policy: FlushPolicy,
        control: &Control,
        drained: Rc<Cell<bool>>,
    );
}

impl<'s> CommitAggregates<'s> for StreamVec<'s, EventTime, AggRow> {
    fn commit_aggregates(
        self,
        marks: StreamVec<'s, EventTime, SourceMark>,
        tracker: CheckpointTracker,
        tx: Sender<AggCommit>,
        policy: FlushPolicy,
        control: &Control,
        drained: Rc<Cell<bool>>,
    ) {
        let scope = self.scope();
        let is_committer = scope.index() == 0;
        let control = control.clone();
        let _: StreamVec<'s, EventTime, ()> = self.binary_frontier::<_, UnitBuilder, _, _, _, _>(
            marks,
            Exchange::new(|_: &AggRow| 0),
            Exchange::new(|_: &SourceMark| 0),
            "CommitAggregates",
            move |_cap, info| {
                let activator = scope.activator_for(info.address);
                let mut committer = Committer {
                    tracker,
                    pending: BTreeMap::new(),
                    last_frontier: 0,
                    last_commit: Instant::now(),
                    outbox: None,
                };
                move |(aggs, aggs_frontier), (marks, marks_frontier), _output| {
                    aggs.for_each(|cap, data| {
                        if let Some(&t) = cap.least() {
                            committer.pending.entry(t).or_default().append(data);
                        }
                    });
                    marks.for_each(|cap, data| {
                        if let Some(&t) = cap.least() {
                            committer.tracker.add_marks(t, data.drain(..));
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
                    let stopping = control.is_shutting_down() || frontier == EventTime::MAX;
                    let caught_up = control.is_caught_up();
                    if let Some(wait) = committer.advance(frontier, stopping, caught_up, policy) {
                        activator.activate_after(wait);
                    }
                    if let Some(commit) = committer.outbox.take() {
                        match tx.try_send(commit) {
                            Ok(()) => {}
                            Err(TrySendError::Full(c)) | Err(TrySendError::Closed(c)) => {
                                committer.outbox = Some(c);
                                activator.activate_after(Duration::from_millis(20));
                            }
                        }
                    }
                    drained.set(stopping && committer.outbox.is_none());
                }
            },
        );
    }
}

/// The commit operator's state on worker 0.
struct Committer {
    tracker: CheckpointTracker,
    /// Closed windows by their timely time, not yet final.
    pending: BTreeMap<EventTime, Vec<AggRow>>,
    last_frontier: EventTime,
    last_commit: Instant,
    /// A commit the aggregate sinks have not taken yet.
    outbox: Option<AggCommit>,
}

impl Committer {
    /// Moves the windows before `frontier` to the outbox when the commit is due; otherwise
    /// says how long until it is.
    fn advance(
        &mut self,
        frontier: EventTime,
        stopping: bool,
        caught_up: bool,
        policy: FlushPolicy,
    ) -> Option<Duration> {
        if frontier <= self.last_frontier {
            return None;
        }
        let since = self.last_commit.elapsed();
        let ready = || {
            self.pending
                .range(..frontier)
                .map(|(_, rows)| rows.len())
                .sum::<usize>()
        };
        let max_age = policy.max_age(caught_up);
        if !(since >= max_age || stopping || ready() >= policy.rows) {
            return Some(max_age.saturating_sub(since));
        }
        let later = self.pending.split_off(&frontier);
        let rows: Vec<AggRow> = std::mem::replace(&mut self.pending, later)
            .into_values()
            .flatten()
            .collect();
        let checkpoint = self.tracker.checkpoint(frontier);
        match self.outbox.as_mut() {
            Some(o) => {
                o.rows.extend(rows);
                o.checkpoint = checkpoint;
            }
            None => self.outbox = Some(AggCommit { rows, checkpoint }),
        }
        self.last_frontier = frontier;
        self.last_commit = Instant::now();
        None
    }
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

    /// Steps `worker` for `d` of wall-clock time (the operators' age checks need it to pass).
    fn step_for(worker: &mut timely::worker::Worker, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            worker.step_or_park(Some(Duration::from_millis(5)));
        }
    }

    /// Runs the commit operator with a one-hour interval: only the size can make it commit.
    fn commits_within_the_interval(max_rows: usize, windows: i64) -> usize {
        commits_with(max_rows, windows, false)
    }

    /// [`commits_within_the_interval`], with the worker's source caught up or not.
    fn commits_with(max_rows: usize, windows: i64, caught_up: bool) -> usize {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        timely::execute_directly(move |worker| {
            let control = Control::default();
            control.caught_up.set(caught_up);
            let mut aggs: InputHandleVec<EventTime, AggRow> = InputHandleVec::new();
            let mut marks: InputHandleVec<EventTime, SourceMark> = InputHandleVec::new();
            let probe = ProbeHandle::new();
            worker.dataflow::<EventTime, _, _>(|scope| {
                let a = scope.input_from(&mut aggs);
                let m = scope.input_from(&mut marks);
                a.clone().commit_aggregates(
                    m,
                    CheckpointTracker::new(60_000_000, Vec::new()),
                    tx,
                    FlushPolicy {
                        rows: max_rows,
                        interval: Duration::from_secs(3600),
                    },
                    &control,
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
            step_for(worker, 3 * CAUGHT_UP_FLOOR);
            for i in 0..windows {
                aggs.send(window(i));
            }
            aggs.advance_to(2);
            marks.advance_to(2);
            step_for(worker, 3 * CAUGHT_UP_FLOOR);
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

    #[test]
    fn aggregates_commit_after_the_floor_once_the_source_is_caught_up() {
        // Neither the hour nor the size is reached: a caught-up source commits each advance
        // after the floor; a source still reading waits for the interval.
        assert_eq!(commits_with(1000, 5, true), 2);
        assert_eq!(commits_with(1000, 5, false), 0);
    }

    /// Raw batches handed off within an hour-long interval, 3 floors after two letters arrive
    /// (the input stays open, so nothing is flushed as at the end of a backfill).
    fn raw_batches_within_the_interval(caught_up: bool) -> usize {
        use primespark_schemas::flow::{DeadLetter, SinkSet};
        use primespark_schemas::rows::DeadLetterRow;
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        timely::execute_directly(move |worker| {
            let control = Control::default();
            control.caught_up.set(caught_up);
            let mut input: InputHandleVec<EventTime, RawItem> = InputHandleVec::new();
            worker.dataflow::<EventTime, _, _>(|scope| {
                scope.input_from(&mut input).raw_sink(
                    tx,
                    FlushPolicy {
                        rows: 1000,
                        interval: Duration::from_secs(3600),
                    },
                    &control,
                    Rc::default(),
                );
            });
            for offset in [7, 8] {
                input.send(RawItem::Dead(DeadLetter {
                    delivery: SinkSet::EMPTY,
                    row: DeadLetterRow {
                        partition: 0,
                        offset,
                        reason: "malformed_json".into(),
                        error: "oops".into(),
                        payload: b"oops".to_vec(),
                    },
                }));
            }
            input.advance_to(1);
            step_for(worker, 3 * CAUGHT_UP_FLOOR);
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
            drop(input);
        });
        let mut batches = 0;
        while let Ok(b) = rx.try_recv() {
            assert_eq!(b.items.len(), 2);
            batches += 1;
        }
        batches
    }

    #[test]
    fn raw_items_are_handed_off_after_the_floor_once_the_source_is_caught_up() {
        assert_eq!(raw_batches_within_the_interval(true), 1);
        assert_eq!(raw_batches_within_the_interval(false), 0);
    }
}
