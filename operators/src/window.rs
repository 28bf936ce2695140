//! Event-time tumbling windows.
//!
//! Records are exchanged by key, so each (key, window) is aggregated on exactly one worker of the
//! cluster. A window `[start, end)` is emitted, at timely time `end`, once the input frontier
//! (the watermark) reaches `end`; state is therefore bounded by the open windows.

use std::collections::BTreeMap;
use std::hash::Hash;

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::Concat;
use timely::dataflow::StreamVec;
use timely::ExchangeData;

use primespark_schemas::rows::Rollup;

use crate::metrics::{LateEvents, WindowsClosed};
use crate::record::window_start;
use crate::{stable_hash, EventTime, FastMap, FastSet};

/// A closed window's aggregate for one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowResult<K, A> {
    /// The key.
    pub key: K,
    /// Window start, microseconds since the epoch.
    pub window_start_us: i64,
    /// The aggregate.
    pub agg: A,
}

/// Settings of a [`TumblingWindow`] operator.
#[derive(Debug, Clone)]
pub struct WindowSpec {
    /// Operator name (shows in logs and metrics), e.g. `device_metrics_1m`.
    pub name: String,
    /// Dataflow name.
    pub dataflow: String,
    /// Window width in microseconds.
    pub width_us: i64,
    /// Windows ending at or before this (less the allowed lateness) were final in an earlier
    /// run: records for them are replays and are skipped.
    pub committed_watermark_us: EventTime,
    /// How long past its end a window still takes records (`windows.allowed_lateness`),
    /// microseconds. Late records re-emit their keys' updated aggregates at their timely time,
    /// once the frontier has passed it (sinks upsert; a later time's aggregate holds more).
    pub allowed_lateness_us: u64,
}

/// Tumbling event-time windows over `(key, event_time_us, value)` records.
pub trait TumblingWindow<'scope, K, V> {
    /// Folds each record into its (key, window) aggregate and emits closed windows.
    ///
    /// Records whose window already closed (its end is at or below the time they arrive at) are
    /// late: within `allowed_lateness_us` they update the emitted window, at their time and
    /// once that time is complete, so for each (key, window) the aggregate emitted at the
    /// greatest time is the final one whatever order workers' records arrive in; beyond it
    /// they are counted and left out.
    ///
    /// ```
    /// use timely::dataflow::operators::{ToStream, Capture, capture::Event};
    /// use primespark_operators::window::{TumblingWindow, WindowSpec};
    ///
    /// let out = timely::example(|scope| {
    ///     let spec = WindowSpec { name: "w".into(), dataflow: "d".into(), width_us: 10, committed_watermark_us: 0, allowed_lateness_us: 0 };
    ///     vec![("a".to_string(), 1i64, 2u64), ("a".to_string(), 5, 3), ("a".to_string(), 12, 4)]
    ///         .to_stream(scope).container::<Vec<_>>()
    ///         .tumbling_window(spec, |sum: &mut u64, v| *sum += v)
    ///         .capture()
    /// });
    /// let mut rows: Vec<_> = out.try_iter()
    ///     .flat_map(|e| match e { Event::Messages(_, rows) => rows, _ => Vec::new() })
    ///     .collect();
    /// rows.sort_by_key(|r| r.window_start_us);
    /// assert_eq!((rows[0].window_start_us, rows[0].agg), (0, 5));
    /// assert_eq!((rows[1].window_start_us, rows[1].agg), (10, 4));
    /// ```
    fn tumbling_window<A, F>(
        self,
        spec: WindowSpec,
        fold: F,
    ) -> StreamVec<'scope, EventTime, WindowResult<K, A>>
    where
        A: Default + ExchangeData + Clone,
        F: FnMut(&mut A, V) + 'static;
}

impl<'scope, K, V> TumblingWindow<'scope, K, V> for StreamVec<'scope, EventTime, (K, i64, V)>
where
    K: ExchangeData + Hash + Eq + Clone,
    V: ExchangeData,
{
    fn tumbling_window<A, F>(
        self,
        spec: WindowSpec,
        mut fold: F,
    ) -> StreamVec<'scope, EventTime, WindowResult<K, A>>
    where
        A: Default + ExchangeData + Clone,
        F: FnMut(&mut A, V) + 'static,
    {
        let name = spec.name.clone();
        let width = spec.width_us;
        let lateness = spec.allowed_lateness_us;
        let committed = spec.committed_watermark_us;
        self.unary_frontier(
            Exchange::new(|record: &(K, i64, V)| stable_hash(&record.0)),
            &name,
            move |_cap, _info| {
                // Open windows by end time, each with the capability to emit it.
                let mut open: BTreeMap<EventTime, (Capability<EventTime>, FastMap<K, A>)> =
                    BTreeMap::new();
                // Emitted windows still within the allowed lateness, by end time.
                let mut closed: BTreeMap<EventTime, FastMap<K, A>> = BTreeMap::new();
                // Late records of emitted windows by their timely time, until the frontier
                // passes that time. Applying them at once would let records of two workers,
                // arriving in either order, emit a fuller aggregate at an earlier time than a
                // partial one: downstream (the commit operator orders by time) the partial one
                // would be the last word. Applied in time order once their time is complete,
                // each update holds every record up to its time and later times hold more.
                let mut waiting: BTreeMap<EventTime, LateBatch<K, V>> = BTreeMap::new();
                move |(input, frontier), output| {
                    let mut late = 0u64;
                    input.for_each(|cap, data| {
                        let Some(&now) = cap.least() else {
                            return;
                        };
                        for (key, time_us, value) in data.drain(..) {
                            let start = window_start(time_us, width);
                            let Ok(end) = EventTime::try_from(start.saturating_add(width)) else {
                                late += 1;
                                continue;
                            };
                            let final_at = end.saturating_add(lateness);
                            if final_at <= committed {
                                // Replayed record of a window an earlier run made final.
                                continue;
                            }
                            if final_at <= now {
                                late += 1;
                                continue;
                            }
                            if let Some((_, aggs)) = open.get_mut(&end) {
                                // Not emitted yet (late or not): the emission will hold it.
                                fold(aggs.entry(key).or_default(), value);
                            } else if end <= now {
                                // Late but allowed: it updates the emitted window once the
                                // frontier passes `now`. (After a restart the replay rebuilds
                                // the state of such windows this way, record by record.) A
                                // window is in `closed` only once the frontier reached its end,
                                // so no record of it can arrive at a time before its end.
                                waiting
                                    .entry(now)
                                    .or_insert_with(|| (cap.delayed(&now, 0), Vec::new()))
                                    .1
                                    .push((key, end, value));
                            } else {
                                let (_, aggs) = open
                                    .entry(end)
                                    .or_insert_with(|| (cap.delayed(&end, 0), FastMap::default()));
                                fold(aggs.entry(key).or_default(), value);
                            }
                        }
                    });
                    if late > 0 {
                        LateEvents {
                            dataflow: &spec.dataflow,
                            operator: &spec.name,
                            count: late,
                        }
                        .emit();
                    }
                    while let Some(entry) = open.first_entry() {
                        let end = *entry.key();
                        if frontier.frontier().less_than(&end) {
                            break;
                        }
                        let (cap, mut aggs) = entry.remove();
                        let count = aggs.len() as u64;
                        let window_start_us = end as i64 - width;
                        if lateness > 0 {
                            let results = aggs.iter().map(|(key, agg)| WindowResult {
                                key: key.clone(),
                                window_start_us,
                                agg: agg.clone(),
                            });
                            output.session(&cap).give_iterator(results);
                        } else {
                            let results = aggs.drain().map(|(key, agg)| WindowResult {
                                key,
                                window_start_us,
                                agg,
                            });
                            output.session(&cap).give_iterator(results);
                        }
                        WindowsClosed {
                            dataflow: &spec.dataflow,
                            operator: &spec.name,
                            count,
                            window_end_us: end,
                        }
                        .emit();
                        if lateness > 0 {
                            closed.insert(end, aggs);
                        }
                    }
                    // Late records whose time the frontier has passed: every record of that
                    // time (and of every earlier one) is in, and their windows were emitted
                    // above, so each updated aggregate is emitted once, at that time, and holds
                    // everything up to it.
                    while let Some(entry) = waiting.first_entry() {
                        if frontier.frontier().less_equal(entry.key()) {
                            break;
                        }
                        let (cap, records) = entry.remove();
                        let mut updated: FastSet<(EventTime, K)> = FastSet::default();
                        for (key, end, value) in records {
                            let aggs = closed.entry(end).or_default();
                            fold(aggs.entry(key.clone()).or_default(), value);
                            updated.insert((end, key));
                        }
                        let mut session = output.session(&cap);
                        for (end, key) in updated {
                            if let Some(agg) = closed.get(&end).and_then(|a| a.get(&key)) {
                                session.give(WindowResult {
                                    key,
                                    window_start_us: end as i64 - width,
                                    agg: agg.clone(),
                                });
                            }
                        }
                    }
                    // Windows past their lateness are final: drop their state.
                    while let Some(entry) = closed.first_entry() {
                        if frontier
                            .frontier()
                            .less_than(&entry.key().saturating_add(lateness))
                        {
                            break;
                        }
                        entry.remove();
                    }
                }
            },
        )
    }
}

/// Late records of one timely time, `(key, window end, value)`, with the capability to emit
/// their windows' updates.
type LateBatch<K, V> = (Capability<EventTime>, Vec<(K, EventTime, V)>);

/// Partials of one timely time, with the capability to emit them.
type Held<K, A> = (Capability<EventTime>, FastMap<(K, i64), A>);

/// Per-worker pre-aggregation in front of [`TumblingWindow`]: the combiner of a two-phase
/// aggregation (Flink's local-global aggregation).
///
/// Each batch is folded per (key, window) on the worker that holds it, and only the partial
/// aggregates are exchanged: a window operator then merges partials instead of folding raw
/// records, which cuts the records crossing the exchange from one per event to at most one per
/// key, window and batch. Partials keep their batch's timely time, so lateness is decided
/// exactly as without the combiner. The aggregate must merge exactly (counts add, sketches
/// merge).
pub trait PreAggregate<'scope, K, V> {
    /// Folds each batch into `(key, window_start_us, partial)` records for windows of
    /// `width_us`; feed the result to `tumbling_window` with a merging fold.
    ///
    /// ```
    /// use timely::dataflow::operators::{ToStream, Capture, capture::Event};
    /// use primespark_operators::window::{PreAggregate, TumblingWindow, WindowSpec};
    ///
    /// let out = timely::example(|scope| {
    ///     let spec = WindowSpec { name: "w".into(), dataflow: "d".into(), width_us: 10, committed_watermark_us: 0, allowed_lateness_us: 0 };
    ///     vec![("a".to_string(), 1i64, 2u64), ("a".to_string(), 5, 3), ("a".to_string(), 12, 4)]
    ///         .to_stream(scope).container::<Vec<_>>()
    ///         .pre_aggregate("w", 10, |sum: &mut u64, v| *sum += v)
    ///         .tumbling_window(spec, |sum: &mut u64, partial: u64| *sum += partial)
    ///         .capture()
    /// });
    /// let mut rows: Vec<_> = out.try_iter()
    ///     .flat_map(|e| match e { Event::Messages(_, rows) => rows, _ => Vec::new() })
    ///     .collect();
    /// rows.sort_by_key(|r| r.window_start_us);
    /// assert_eq!((rows[0].window_start_us, rows[0].agg), (0, 5));
    /// assert_eq!((rows[1].window_start_us, rows[1].agg), (10, 4));
    /// ```
    fn pre_aggregate<A, F>(
        self,
        name: &str,
        width_us: i64,
        fold: F,
    ) -> StreamVec<'scope, EventTime, (K, i64, A)>
    where
        A: Default + ExchangeData + Clone,
        F: FnMut(&mut A, V) + 'static;
}

impl<'scope, K, V> PreAggregate<'scope, K, V> for StreamVec<'scope, EventTime, (K, i64, V)>
where
    K: ExchangeData + Hash + Eq + Clone,
    V: ExchangeData,
{
    fn pre_aggregate<A, F>(
        self,
        name: &str,
        width_us: i64,
        mut fold: F,
    ) -> StreamVec<'scope, EventTime, (K, i64, A)>
    where
        A: Default + ExchangeData + Clone,
        F: FnMut(&mut A, V) + 'static,
    {
        // Partials are held per timely time until the frontier passes it: inputs arrive in
        // small containers (timely's buffers hold ~8 KiB), so combining only within one
        // container would combine almost nothing. Holding the capability keeps the windows
        // downstream from closing before the partials arrive.
        self.unary_frontier(
            timely::dataflow::channels::pact::Pipeline,
            &format!("PreAggregate({name})"),
            move |_cap, _info| {
                let mut held: BTreeMap<EventTime, Held<K, A>> = BTreeMap::new();
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        let Some(&time) = cap.least() else {
                            return;
                        };
                        let (_, partial) = held
                            .entry(time)
                            .or_insert_with(|| (cap.delayed(&time, 0), FastMap::default()));
                        for (key, time_us, value) in data.drain(..) {
                            let start = window_start(time_us, width_us);
                            fold(partial.entry((key, start)).or_default(), value);
                        }
                    });
                    while let Some(entry) = held.first_entry() {
                        if frontier.less_equal(entry.key()) {
                            break;
                        }
                        let (cap, partial) = entry.remove();
                        output.session(&cap).give_iterator(
                            partial
                                .into_iter()
                                .map(|((key, start), agg)| (key, start, agg)),
                        );
                    }
                }
            },
        )
    }
}

/// A `device_metrics_*` window's key: (device, metric), the rows' shared names
/// ([`primespark_schemas::intern`]), so that pre-aggregation and both rollups move them by a
/// reference count.
pub type MetricKey = (std::sync::Arc<str>, std::sync::Arc<str>);

/// One closed window of one (device, metric).
pub type MetricWindow = WindowResult<MetricKey, Stats>;

/// The `device_metrics_*` windows: count, sum, min and max per (device, metric) for every
/// [`Rollup`], each a two-phase aggregation ([`PreAggregate`] then [`TumblingWindow`]).
/// The dataflow and the benchmarks build them here, so both run the same operators.
///
/// Only the narrowest rollup pre-aggregates the points; each wider one pre-aggregates the
/// partials of the one before it (a minute lies in one hour and an hour in one UTC day: all are
/// aligned to the epoch). Each point is therefore folded once, not once per rollup, and the
/// points are not cloned for three consumers. Partials keep their records' timely time, so
/// every rollup decides lateness exactly as from the points; counts, minima and maxima are
/// the same, sums are added in another order.
pub fn metric_windows<'scope>(
    points: StreamVec<'scope, EventTime, (MetricKey, i64, f64)>,
    dataflow: &str,
    committed_watermark_us: EventTime,
    allowed_lateness_us: u64,
) -> StreamVec<'scope, EventTime, (Rollup, MetricWindow)> {
    let window =
        |rollup: Rollup, partials: StreamVec<'scope, EventTime, (MetricKey, i64, Stats)>| {
            let name = format!("device_metrics_{}", rollup.suffix());
            partials
                .tumbling_window(
                    WindowSpec {
                        name,
                        dataflow: dataflow.to_owned(),
                        width_us: rollup.width_us(),
                        committed_watermark_us,
                        allowed_lateness_us,
                    },
                    |stats: &mut Stats, partial: Stats| stats.merge(partial),
                )
                .map(move |w| (rollup, w))
        };
    let [narrowest, wider @ ..] = Rollup::ALL;
    let mut partials = points.pre_aggregate(
        &format!("device_metrics_{}", narrowest.suffix()),
        narrowest.width_us(),
        |stats: &mut Stats, value: f64| stats.add(value),
    );
    let mut all = window(narrowest, partials.clone());
    for rollup in wider {
        partials = partials.pre_aggregate(
            &format!("device_metrics_{}", rollup.suffix()),
            rollup.width_us(),
            |stats: &mut Stats, partial: Stats| stats.merge(partial),
        );
        all = all.concat(window(rollup, partials.clone()));
    }
    all
}

/// count, sum, min and max of a window's values: the `device_metrics_1m` aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of values.
    pub count: u64,
    /// Sum.
    pub sum: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Stats {
    /// Adds a partial aggregate of the same key and window.
    pub fn merge(&mut self, other: Stats) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Adds one value.
    pub fn add(&mut self, v: f64) {
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Mean, `NaN` when empty.
    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use timely::dataflow::operators::capture::{Capture, Event};
    use timely::dataflow::operators::Input;
    use timely::dataflow::InputHandleVec;

    /// Feeds `(send_at, key, time, value)` batches, advancing the input to `send_at` first, and
    /// returns every emitted `(window_start, sum)` in order.
    fn run(lateness: u64, batches: Vec<(u64, &'static str, i64, u64)>) -> Vec<(i64, u64)> {
        let (tx, rx) = std::sync::mpsc::channel();
        timely::execute_directly(move |worker| {
            let mut input: InputHandleVec<u64, (String, i64, u64)> = InputHandleVec::new();
            let captured = worker.dataflow(|scope| {
                scope
                    .input_from(&mut input)
                    .tumbling_window(sum_spec(lateness), |sum: &mut u64, v| *sum += v)
                    .capture()
            });
            for (at, key, time, value) in batches {
                input.advance_to(at);
                input.send((key.to_owned(), time, value));
                for _ in 0..10 {
                    worker.step();
                }
            }
            input.close();
            while worker.step() {}
            let rows: Vec<(i64, u64)> = captured
                .try_iter()
                .flat_map(|e| match e {
                    Event::Messages(_, rows) => rows,
                    Event::Progress(_) => Vec::new(),
                })
                .map(|r| (r.window_start_us, r.agg))
                .collect();
            tx.send(rows).expect("receiver alive");
        });
        rx.recv().expect("rows")
    }

    #[test]
    fn late_records_within_the_lateness_update_the_window() {
        let rows = run(
            5,
            vec![
                (0, "a", 1, 1),
                // Watermark 12: window [0, 10) was emitted with 1; 3 is late but allowed.
                (12, "a", 3, 2),
                // Watermark 16: [0, 10) is final; this one is too late and dropped.
                (16, "a", 4, 5),
            ],
        );
        assert_eq!(rows, vec![(0, 1), (0, 3)]);
    }

    #[test]
    fn without_lateness_late_records_are_dropped() {
        let rows = run(0, vec![(0, "a", 1, 1), (12, "a", 3, 2), (13, "a", 15, 7)]);
        assert_eq!(rows, vec![(0, 1), (10, 7)]);
    }

    /// Each `(key, window start)`'s aggregate emitted at the greatest timely time (among equal
    /// times, the last emitted): what the commit operator, which orders by time, hands off last.
    fn last_by_time(mut rows: Vec<(u64, String, i64, u64)>) -> BTreeMap<(String, i64), u64> {
        rows.sort_by_key(|r| r.0);
        rows.into_iter().map(|(_, k, s, a)| ((k, s), a)).collect()
    }

    /// Every captured `(time, key, window start, sum)`, in the order emitted.
    fn timed_sums(
        captured: &std::sync::mpsc::Receiver<Event<u64, Vec<WindowResult<String, u64>>>>,
    ) -> Vec<(u64, String, i64, u64)> {
        captured
            .try_iter()
            .flat_map(|e| match e {
                Event::Messages(t, rows) => {
                    // Captured messages carry one time.
                    let t = t.as_singleton().copied().expect("one time per batch");
                    rows.into_iter()
                        .map(|r| (t, r.key, r.window_start_us, r.agg))
                        .collect()
                }
                Event::Progress(_) => Vec::new(),
            })
            .collect()
    }

    /// The tests' window: width 10, nothing committed, `lateness` allowed.
    fn sum_spec(lateness: u64) -> WindowSpec {
        WindowSpec {
            name: "w".into(),
            dataflow: "d".into(),
            width_us: 10,
            committed_watermark_us: 0,
            allowed_lateness_us: lateness,
        }
    }

    #[test]
    fn a_late_update_is_not_overtaken_by_an_earlier_time_arriving_after_it() {
        // Two inputs stand for two workers: the one at watermark 12 sends a late record of
        // window [0, 10) before the one still at 0 sends an on-time record of it.
        let (tx, rx) = std::sync::mpsc::channel();
        timely::execute_directly(move |worker| {
            let mut behind: InputHandleVec<u64, (String, i64, u64)> = InputHandleVec::new();
            let mut ahead: InputHandleVec<u64, (String, i64, u64)> = InputHandleVec::new();
            let captured = worker.dataflow(|scope| {
                scope
                    .input_from(&mut behind)
                    .concat(scope.input_from(&mut ahead))
                    .tumbling_window(sum_spec(5), |sum: &mut u64, v| *sum += v)
                    .capture()
            });
            ahead.advance_to(12);
            ahead.send(("a".to_owned(), 3, 2));
            ahead.flush();
            for _ in 0..10 {
                worker.step();
            }
            behind.send(("a".to_owned(), 1, 1));
            behind.flush();
            for _ in 0..10 {
                worker.step();
            }
            behind.close();
            ahead.close();
            while worker.step() {}
            tx.send(timed_sums(&captured)).expect("receiver alive");
        });
        let rows = rx.recv().expect("rows");
        // Emitted at 10 with the on-time record, then updated at 12 with both.
        assert_eq!(
            rows,
            vec![(10, "a".to_owned(), 0, 1), (12, "a".to_owned(), 0, 3)]
        );
    }

    /// A record `(worker, send_at, key, time, value)` for [`final_sums`].
    type Sent = (usize, u64, String, i64, u64);

    /// Runs a summing `tumbling_window` on `workers` workers; each record is sent by worker
    /// `worker % workers` once that worker's input is at `send_at`. Worker 1 starts late and
    /// pauses now and then, so that worker 0's late records tend to reach a window's worker
    /// before worker 1's on-time ones (the outcome must not depend on it).
    fn final_sums(
        workers: usize,
        lateness: u64,
        records: &std::sync::Arc<Vec<Sent>>,
    ) -> BTreeMap<(String, i64), u64> {
        let records = std::sync::Arc::clone(records);
        let guards = timely::execute(timely::Config::process(workers), move |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let mut input: InputHandleVec<u64, (String, i64, u64)> = InputHandleVec::new();
            let captured = worker.dataflow(|scope| {
                scope
                    .input_from(&mut input)
                    .tumbling_window(sum_spec(lateness), |sum: &mut u64, v| *sum += v)
                    .capture()
            });
            let mine = records.iter().filter(|r| r.0 % peers == index);
            for (n, (_, at, key, time, value)) in mine.enumerate() {
                if index == 1 && n % 40 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                input.advance_to(*at);
                input.send((key.clone(), *time, *value));
                input.flush();
                worker.step();
            }
            input.close();
            while worker.step() {}
            timed_sums(&captured)
        })
        .expect("timely starts");
        let rows = guards
            .join()
            .into_iter()
            .flat_map(|rows| rows.expect("worker ran"))
            .collect();
        last_by_time(rows)
    }

    #[test]
    fn on_two_workers_the_last_aggregate_by_time_is_exact_whatever_the_arrival_order() {
        let (width, lateness) = (10i64, 15u64);
        let mut records: Vec<Sent> = Vec::new();
        for i in 0..400i64 {
            let worker = (i % 2) as usize;
            let at = match (worker, i % 8) {
                // Late but within the lateness: updates an emitted window.
                (0, 0 | 2 | 4) => i + 12,
                // Beyond it: dropped.
                (0, 6) => i + 40,
                (1, 7) => i + 13,
                _ => i,
            };
            records.push((
                worker,
                at as u64,
                format!("k{}", i % 3),
                i,
                (i % 7 + 1) as u64,
            ));
        }
        // Each worker's input only moves forward.
        records.sort_by_key(|r| r.1);
        let mut expected: BTreeMap<(String, i64), u64> = BTreeMap::new();
        for (_, at, key, time, value) in &records {
            let start = window_start(*time, width);
            if (start + width) as u64 + lateness > *at {
                *expected.entry((key.clone(), start)).or_default() += value;
            }
        }
        let records = std::sync::Arc::new(records);
        assert_eq!(final_sums(1, lateness, &records), expected, "one worker");
        for run in 0..10 {
            assert_eq!(final_sums(2, lateness, &records), expected, "run {run}");
        }
    }

    type Emitted = Vec<(Rollup, String, i64, Stats)>;
    type Build = for<'s> fn(
        StreamVec<'s, EventTime, (MetricKey, i64, f64)>,
    ) -> StreamVec<'s, EventTime, (Rollup, MetricWindow)>;

    /// Runs `build` over `(send_at, device, event time, value)` records and returns each
    /// window's last emitted aggregate, sorted.
    fn windows_of(records: Vec<(u64, &'static str, i64, f64)>, build: Build) -> Emitted {
        let (tx, rx) = std::sync::mpsc::channel();
        timely::execute_directly(move |worker| {
            let mut input: InputHandleVec<u64, (MetricKey, i64, f64)> = InputHandleVec::new();
            let captured = worker.dataflow(|scope| build(scope.input_from(&mut input)).capture());
            for (at, device, time, value) in records {
                input.advance_to(at);
                input.send(((device.into(), "cpu".into()), time, value));
                for _ in 0..5 {
                    worker.step();
                }
            }
            input.close();
            while worker.step() {}
            let rows: Emitted = captured
                .try_iter()
                .flat_map(|e| match e {
                    Event::Messages(_, rows) => rows,
                    Event::Progress(_) => Vec::new(),
                })
                .map(|(r, w)| (r, w.key.0.to_string(), w.window_start_us, w.agg))
                .collect();
            tx.send(rows).expect("receiver alive");
        });
        let mut last: BTreeMap<(Rollup, String, i64), Stats> = BTreeMap::new();
        for (rollup, key, start, agg) in rx.try_iter().flatten() {
            last.insert((rollup, key, start), agg);
        }
        last.into_iter()
            .map(|((r, k, s), a)| (r, k, s, a))
            .collect()
    }

    #[test]
    fn wider_rollups_folded_from_narrower_partials_equal_rollups_folded_from_the_points() {
        const MIN: i64 = 60_000_000;
        const HOUR: i64 = 60 * MIN;
        let lateness = 2 * MIN as u64;
        // Each record is sent once the watermark (the input's time) is at `send_at`: some on
        // time, some late but within the lateness (they update emitted windows), some beyond it
        // for the minute but not for the hour or day, and some beyond it for every rollup.
        let mut records = Vec::new();
        for i in 0..400i64 {
            let time = HOUR * 10 + i * 17_000_000;
            let watermark = match i % 7 {
                0 => time + MIN + MIN / 2,
                1 => time + 4 * MIN,
                2 => time + 2 * HOUR,
                _ => time,
            };
            let device = if i % 3 == 0 { "pi-a" } else { "pi-b" };
            records.push((watermark.max(0) as u64, device, time, (i % 11) as f64 * 0.1));
        }
        records.sort_by_key(|r| r.0);
        let chained = windows_of(records.clone(), |points| {
            metric_windows(points, "d", 0, 2 * 60_000_000)
        });
        let chained2 = windows_of(records.clone(), |points| {
            metric_windows(points, "d", 0, 2 * 60_000_000)
        });
        for (a, b) in chained.iter().zip(&chained2) {
            assert_eq!(a, b, "self");
        }
        let from_points = windows_of(records, |points| {
            let mut all = Vec::new();
            for rollup in Rollup::ALL {
                let name = format!("device_metrics_{}", rollup.suffix());
                all.push(
                    points
                        .clone()
                        .pre_aggregate(&name, rollup.width_us(), |s: &mut Stats, v: f64| s.add(v))
                        .tumbling_window(
                            WindowSpec {
                                name,
                                dataflow: "d".into(),
                                width_us: rollup.width_us(),
                                committed_watermark_us: 0,
                                allowed_lateness_us: 2 * 60_000_000,
                            },
                            |s: &mut Stats, p: Stats| s.merge(p),
                        )
                        .map(move |w| (rollup, w)),
                );
            }
            let first = all.remove(0);
            all.into_iter().fold(first, |a, b| a.concat(b))
        });
        assert!(lateness > 0);
        assert_eq!(chained.len(), from_points.len());
        assert!(chained.iter().any(|w| w.0 == Rollup::Day));
        for (a, b) in chained.iter().zip(&from_points) {
            assert_eq!((a.0, &a.1, a.2), (b.0, &b.1, b.2));
            assert_eq!(
                (a.3.count, a.3.min, a.3.max),
                (b.3.count, b.3.min, b.3.max),
                "{a:?}"
            );
            assert!(
                (a.3.sum - b.3.sum).abs() <= 1e-9 * b.3.sum.abs().max(1.0),
                "{a:?} {b:?}"
            );
        }
    }
}
