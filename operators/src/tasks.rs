//! `analytics.events` windows: the task lifecycle (a differential-dataflow join of each task's
//! events by `task_id`) and API event counts.
//!
//! ```text
//! task events ─> TaskIndex (by task_id) ─┬─ updates ─> differential: created ⋈ assigned/started/finished
//!   (+ task_state on restart)            │               created ▷ finished (backlog), assigned ▷ finished (active)
//!                                        └─ task_state changes ─> commit (same transaction as windows)
//! facts + backlog samples ─> task_stats_* / agent_load_* windows;  API events ─> api_events_* windows
//! ```
//!
//! Why differential here: a task's events arrive in any order, from any partition, minutes or
//! hours apart. The join, the antijoin and their retractions are maintained incrementally, so a
//! `task_completed` read before its `task_created` still yields the right run time, and the
//! backlog (created, not finished) is a maintained count rather than a scan.
//!
//! **Time.** Each event enters the collections at the end of its 1-minute bucket
//! (`bucket_end - 1`; event time, not processing time), so the collections change once per
//! minute and "backlog at the window's end" is the count as of that time. An event read late
//! (behind the watermark but within the allowed lateness) enters at the bucket of the watermark
//! instead: its own window still gets its counts, the backlog counts it from when it was read.
//!
//! **State.** [`TaskIndex`] keeps, per task, the first event of each kind (a second
//! `task_created` for a task is a duplicate and is ignored). A task leaves once it finished
//! longer ago than [`retention_us`] (widest window + allowed lateness + one minute): its events
//! are retracted from the collections, so arrangements hold only open and recently finished
//! tasks. The kept events are also emitted as [`TaskStateChange`]s, which the commit operator
//! writes to `task_state` in the same transaction as the windows and offsets; a restart feeds
//! them back in ([`TaskInput::restored`]) before the replay, so the join is rebuilt exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hash;

use differential_dataflow::{AsCollection, VecCollection};
use primespark_schemas::analytics::{ApiEvent, TaskEvent, TaskEventKind};
use primespark_schemas::rows::{AgentLoadRow, ApiEventsRow, Rollup, TaskStateChange, TaskStatsRow};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, Concat};
use timely::dataflow::StreamVec;
use timely::ExchangeData;

use crate::metrics::{TaskEventsIgnored, TasksRetired};
use crate::record::window_start;
use crate::sketch::QuantileSketch;
use crate::window::{PreAggregate, TumblingWindow, WindowSpec};
use crate::{stable_hash, EventTime, FastMap, FastSet};

/// Granularity of the lifecycle collections' time: one minute, the narrowest rollup.
const STEP_US: i64 = Rollup::Minute.width_us();

/// How long a finished task stays in the join: the widest window plus the allowed lateness
/// plus the out-of-orderness bound plus one minute, so every window that can still change sees
/// all of the task's events, and a restart's replay (which starts at the oldest open window,
/// less the bound) never meets an event of a task already forgotten.
pub fn retention_us(allowed_lateness_us: u64, out_of_orderness_us: u64) -> i64 {
    let us = |v: u64| i64::try_from(v).unwrap_or(i64::MAX / 4);
    Rollup::WIDEST
        .width_us()
        .saturating_add(us(allowed_lateness_us))
        .saturating_add(us(out_of_orderness_us))
        .saturating_add(STEP_US)
}

/// The collection time of an event at `time_us`: the last microsecond of its minute.
fn step_end(time_us: i64) -> EventTime {
    let end = window_start(time_us, STEP_US).saturating_add(STEP_US - 1);
    EventTime::try_from(end).unwrap_or(0)
}

/// A task event on its way into the lifecycle join.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInput {
    /// The event.
    pub event: TaskEvent,
    /// Read back from `task_state` at start-up (already stored: not emitted again).
    pub restored: bool,
}

/// What the join keeps of an event: its kind, time and the one label the join needs
/// (task type of `task_created`, agent of `task_assigned`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskRec {
    /// Which step.
    pub kind: TaskEventKind,
    /// Event time, microseconds.
    pub time_us: i64,
    /// Task type or agent.
    pub label: String,
}

impl TaskRec {
    fn of(e: &TaskEvent) -> Self {
        let label = match e.kind {
            TaskEventKind::Created => e.task_type.clone(),
            _ => e.agent_id.clone(),
        };
        TaskRec {
            kind: e.kind,
            time_us: e.time_us,
            label: label.unwrap_or_default(),
        }
    }
}

/// A change to the lifecycle collections: `((task_id, event), time, diff)`.
pub type TaskUpdate = ((String, TaskRec), EventTime, isize);

/// What [`TaskIndex`] emits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum IndexOutput {
    /// A change to the collections.
    Update(TaskUpdate),
    /// A change to `task_state`.
    State(TaskStateChange),
}

/// Deduplicates task events per (task, kind), retires finished tasks, and reports what to keep
/// in `task_state`.
pub trait TaskIndex<'scope> {
    /// Exchanges events by `task_id` and emits collection updates and state changes; finished
    /// tasks are retracted and retired `retention_us` after their finish.
    fn task_index(
        self,
        dataflow: &str,
        retention_us: i64,
    ) -> StreamVec<'scope, EventTime, IndexOutput>;
}

fn kind_slot(kind: TaskEventKind) -> usize {
    match kind {
        TaskEventKind::Created => 0,
        TaskEventKind::Assigned => 1,
        TaskEventKind::Started => 2,
        TaskEventKind::Completed => 3,
        TaskEventKind::Failed => 4,
    }
}

impl<'scope> TaskIndex<'scope> for StreamVec<'scope, EventTime, TaskInput> {
    fn task_index(
        self,
        dataflow: &str,
        retention_us: i64,
    ) -> StreamVec<'scope, EventTime, IndexOutput> {
        let dataflow = dataflow.to_owned();
        let retention = u64::try_from(retention_us).unwrap_or(0);
        self.unary_frontier(
            Exchange::new(|i: &TaskInput| stable_hash(&i.event.task_id)),
            "TaskIndex",
            move |cap, _info| {
                // Held at the end of the watermark's minute: the collections downstream change
                // once per minute, so their frontier only needs to move once per minute too
                // (instead of at every watermark step, each of which costs every differential
                // operator a batch).
                let mut hold = Some(cap);
                let mut tasks: FastMap<String, [Option<TaskRec>; 5]> = FastMap::default();
                // Retirement times of finished tasks, each with the capability to retract them.
                let mut retire: BTreeMap<EventTime, (Capability<EventTime>, Vec<String>)> =
                    BTreeMap::new();
                move |(input, frontier), output| {
                    let mut duplicates = 0u64;
                    input.for_each(|cap, data| {
                        let Some(&now) = cap.least() else {
                            return;
                        };
                        let mut updates: BTreeMap<EventTime, Vec<IndexOutput>> = BTreeMap::new();
                        let mut session = output.session(&cap);
                        for TaskInput { event, restored } in data.drain(..) {
                            let slots = tasks.entry(event.task_id.clone()).or_default();
                            let slot = &mut slots[kind_slot(event.kind)];
                            if slot.is_some() {
                                duplicates += 1;
                                continue;
                            }
                            let rec = TaskRec::of(&event);
                            *slot = Some(rec.clone());
                            // Never before the batch's own time (an event read late).
                            let at = step_end(event.time_us).max(step_end(now as i64));
                            if matches!(
                                event.kind,
                                TaskEventKind::Completed | TaskEventKind::Failed
                            ) {
                                let when = at.saturating_add(retention);
                                retire
                                    .entry(when)
                                    .or_insert_with(|| (cap.delayed(&when, 0), Vec::new()))
                                    .1
                                    .push(event.task_id.clone());
                            }
                            updates.entry(at).or_default().push(IndexOutput::Update((
                                (event.task_id.clone(), rec),
                                at,
                                1,
                            )));
                            if !restored {
                                session.give(IndexOutput::State(TaskStateChange::Keep(event)));
                            }
                        }
                        drop(session);
                        for (at, batch) in updates {
                            output
                                .session(&cap.delayed(&at, 0))
                                .give_iterator(batch.into_iter());
                        }
                    });
                    if duplicates > 0 {
                        TaskEventsIgnored {
                            dataflow: &dataflow,
                            reason: "duplicate",
                            count: duplicates,
                        }
                        .emit();
                    }
                    let mut retired = 0u64;
                    while let Some(entry) = retire.first_entry() {
                        let when = *entry.key();
                        if frontier.frontier().less_than(&when) {
                            break;
                        }
                        let (cap, ids) = entry.remove();
                        let mut session = output.session(&cap);
                        for id in ids {
                            // A task with both a completion and a failure is retired once.
                            let Some(slots) = tasks.remove(&id) else {
                                continue;
                            };
                            retired += 1;
                            for rec in slots.into_iter().flatten() {
                                session.give(IndexOutput::Update(((id.clone(), rec), when, -1)));
                            }
                            session.give(IndexOutput::State(TaskStateChange::Retire(id)));
                        }
                    }
                    match frontier.frontier().iter().min() {
                        Some(&f) => {
                            let end = step_end(f as i64).max(f);
                            if let Some(h) = hold.as_mut() {
                                if *h.time() < end {
                                    h.downgrade(&end);
                                }
                            }
                        }
                        None => hold = None,
                    }
                    if retired > 0 {
                        TasksRetired {
                            dataflow: &dataflow,
                            count: retired,
                        }
                        .emit();
                    }
                }
            },
        )
    }
}

/// A task-type fact: something that happened to a task of a type, at an event time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskFact {
    /// Created.
    Created,
    /// Assigned to an agent.
    Assigned,
    /// Started after waiting this long, milliseconds.
    Started(f64),
    /// Completed (`false`) or failed (`true`).
    Finished(bool),
    /// Finished after running this long, milliseconds.
    Ran(f64),
    /// The count at the end of the minute starting at `bucket_us` (backlog, or active tasks).
    Sample {
        /// Start of the minute sampled.
        bucket_us: i64,
        /// The count.
        value: i64,
    },
}

/// Windowed state of one task type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskStats {
    /// Created.
    pub created: u64,
    /// Assigned.
    pub assigned: u64,
    /// Started.
    pub started: u64,
    /// Completed.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
    /// Wait times, milliseconds.
    pub wait: QuantileSketch,
    /// Run times, milliseconds.
    pub run: QuantileSketch,
    /// The latest backlog sample in the window: (minute start, value).
    pub backlog: Option<(i64, i64)>,
}

fn latest(a: Option<(i64, i64)>, b: Option<(i64, i64)>) -> Option<(i64, i64)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 > x.0 { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

impl TaskStats {
    /// Folds one fact in.
    pub fn add(&mut self, fact: TaskFact) {
        match fact {
            TaskFact::Created => self.created += 1,
            TaskFact::Assigned => self.assigned += 1,
            TaskFact::Started(wait) => {
                self.started += 1;
                self.wait.add(wait);
            }
            TaskFact::Finished(false) => self.completed += 1,
            TaskFact::Finished(true) => self.failed += 1,
            TaskFact::Ran(run) => self.run.add(run),
            TaskFact::Sample { bucket_us, value } => {
                self.backlog = latest(self.backlog, Some((bucket_us, value)))
            }
        }
    }

    /// Merges a partial aggregate of the same window.
    pub fn merge(&mut self, other: &TaskStats) {
        self.created += other.created;
        self.assigned += other.assigned;
        self.started += other.started;
        self.completed += other.completed;
        self.failed += other.failed;
        self.wait.merge(&other.wait);
        self.run.merge(&other.run);
        self.backlog = latest(self.backlog, other.backlog);
    }

    /// The table row.
    pub fn to_row(&self, bucket_us: i64, task_type: String) -> TaskStatsRow {
        TaskStatsRow {
            bucket_us,
            task_type,
            created: self.created as i64,
            assigned: self.assigned as i64,
            started: self.started as i64,
            completed: self.completed as i64,
            failed: self.failed as i64,
            wait_p50_ms: self.wait.quantile(0.5),
            wait_p95_ms: self.wait.quantile(0.95),
            run_p50_ms: self.run.quantile(0.5),
            run_p95_ms: self.run.quantile(0.95),
            backlog: self.backlog.map_or(0, |b| b.1),
        }
    }
}

/// Windowed state of one agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentLoad {
    /// Tasks assigned.
    pub assigned: u64,
    /// Its tasks completed.
    pub completed: u64,
    /// Its tasks failed.
    pub failed: u64,
    /// The latest sample of its unfinished tasks: (minute start, value).
    pub active: Option<(i64, i64)>,
}

impl AgentLoad {
    /// Folds one fact in (only assignment, finish and sample facts mean anything here).
    pub fn add(&mut self, fact: TaskFact) {
        match fact {
            TaskFact::Assigned => self.assigned += 1,
            TaskFact::Finished(false) => self.completed += 1,
            TaskFact::Finished(true) => self.failed += 1,
            TaskFact::Sample { bucket_us, value } => {
                self.active = latest(self.active, Some((bucket_us, value)))
            }
            TaskFact::Created | TaskFact::Started(_) | TaskFact::Ran(_) => {}
        }
    }

    /// Merges a partial aggregate.
    pub fn merge(&mut self, other: &AgentLoad) {
        self.assigned += other.assigned;
        self.completed += other.completed;
        self.failed += other.failed;
        self.active = latest(self.active, other.active);
    }

    /// The table row.
    pub fn to_row(&self, bucket_us: i64, agent_id: String) -> AgentLoadRow {
        AgentLoadRow {
            bucket_us,
            agent_id,
            assigned: self.assigned as i64,
            completed: self.completed as i64,
            failed: self.failed as i64,
            active: self.active.map_or(0, |a| a.1),
        }
    }
}

/// Windowed state of one (event type, endpoint). Users are kept exactly (a set): windows are
/// short and API users few; the union merges partials exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiStats {
    /// Events.
    pub count: u64,
    /// Distinct users.
    pub users: BTreeSet<String>,
    /// Events without a user.
    pub anonymous: u64,
}

impl ApiStats {
    /// Folds one event's user in.
    pub fn add(&mut self, user: Option<String>) {
        self.count += 1;
        match user {
            Some(u) => {
                self.users.insert(u);
            }
            None => self.anonymous += 1,
        }
    }

    /// Merges a partial aggregate.
    pub fn merge(&mut self, other: ApiStats) {
        self.count += other.count;
        self.anonymous += other.anonymous;
        self.users.extend(other.users);
    }

    /// The table row.
    pub fn to_row(&self, bucket_us: i64, event_type: String, endpoint: String) -> ApiEventsRow {
        ApiEventsRow {
            bucket_us,
            event_type,
            endpoint,
            count: self.count as i64,
            distinct_users: self.users.len() as i64,
            anonymous: self.anonymous as i64,
        }
    }
}

/// Samples a count per key at the end of every minute: the accumulated diffs of a
/// differential collection of keys, as of each `step_end`. Emits `(key, minute_start, value)`
/// for every key whose count is not zero at that minute's end or was not zero at the previous
/// one (so a backlog that drains shows its zero). Samples of minutes an earlier run committed
/// are dropped by the windows downstream, like any replayed record. When the input ends (an
/// empty frontier, only in tests and batch runs) it stops at the last change instead of
/// sampling forever.
trait SampleCounts<'scope, K> {
    fn sample_counts(self, name: &str) -> StreamVec<'scope, EventTime, (K, i64, i64)>;
}

impl<'scope, K> SampleCounts<'scope, K> for StreamVec<'scope, EventTime, (K, EventTime, isize)>
where
    K: ExchangeData + Hash + Eq + Ord + Clone,
{
    fn sample_counts(self, name: &str) -> StreamVec<'scope, EventTime, (K, i64, i64)> {
        self.unary_frontier(
            Exchange::new(|u: &(K, EventTime, isize)| stable_hash(&u.0)),
            name,
            move |_cap, _info| {
                let mut pending: BTreeMap<EventTime, FastMap<K, i64>> = BTreeMap::new();
                let mut counts: FastMap<K, i64> = FastMap::default();
                let mut nonzero_before: FastSet<K> = FastSet::default();
                // The next minute end to sample, with the capability to emit it.
                let mut next: Option<(EventTime, Capability<EventTime>)> = None;
                move |(input, frontier), output| {
                    input.for_each(|cap, data| {
                        for (key, time, diff) in data.drain(..) {
                            *pending.entry(time).or_default().entry(key).or_insert(0) +=
                                diff as i64;
                            let end = step_end(time as i64);
                            match &mut next {
                                Some((at, c)) if end < *at => {
                                    *at = end;
                                    *c = cap.delayed(&end, 0);
                                }
                                Some(_) => {}
                                None => next = Some((end, cap.delayed(&end, 0))),
                            }
                        }
                    });
                    // Net-zero changes (a retired task leaves the count as it was) are no
                    // changes: they must not extend sampling past the last real change.
                    for changes in pending.values_mut() {
                        changes.retain(|_, d| *d != 0);
                    }
                    pending.retain(|_, changes| !changes.is_empty());
                    let done = frontier.frontier().is_empty();
                    while let Some((at, _)) = next.as_ref() {
                        let at = *at;
                        if frontier.frontier().less_equal(&at) {
                            break;
                        }
                        if done && pending.is_empty() {
                            next = None;
                            break;
                        }
                        let later = pending.split_off(&(at + 1));
                        for (key, d) in std::mem::replace(&mut pending, later)
                            .into_values()
                            .flatten()
                        {
                            *counts.entry(key).or_insert(0) += d;
                        }
                        counts.retain(|_, c| *c != 0);
                        let bucket = at as i64 + 1 - STEP_US;
                        let mut keys: BTreeSet<&K> = counts.keys().collect();
                        keys.extend(nonzero_before.iter());
                        if !keys.is_empty() {
                            let rows: Vec<(K, i64, i64)> = keys
                                .into_iter()
                                .map(|k| (k.clone(), bucket, counts.get(k).copied().unwrap_or(0)))
                                .collect();
                            if let Some((_, cap)) = next.as_ref() {
                                output.session(cap).give_iterator(rows.into_iter());
                            }
                        }
                        nonzero_before = counts.keys().cloned().collect();
                        // Next minute to sample: the following one while anything is counted,
                        // else the minute of the next change (nothing to say in between).
                        let following = if counts.is_empty() {
                            pending.keys().next().map(|t| step_end(*t as i64))
                        } else {
                            Some(at.saturating_add(STEP_US as u64))
                        };
                        match following {
                            Some(t) => {
                                if let Some((at_ref, cap)) = next.as_mut() {
                                    cap.downgrade(&t);
                                    *at_ref = t;
                                }
                            }
                            None => next = None,
                        }
                    }
                }
            },
        )
    }
}

/// Settings of [`task_windows`].
#[derive(Debug, Clone)]
pub struct TaskWindowSpec {
    /// Dataflow name (logs, metrics).
    pub dataflow: String,
    /// Windows ending at or before this were committed by an earlier run.
    pub committed_watermark_us: EventTime,
    /// How long past its end a window still takes records, microseconds.
    pub allowed_lateness_us: u64,
    /// The sources' out-of-orderness bound, microseconds (it lengthens the retention).
    pub out_of_orderness_us: u64,
}

/// Everything the `analytics.events` dataflow emits: per rollup, the windows of the three
/// tables, and the `task_state` changes to commit with them.
pub struct TaskOutputs<'scope> {
    /// `task_stats_*` rows.
    pub task_stats: StreamVec<'scope, EventTime, (Rollup, TaskStatsRow)>,
    /// `agent_load_*` rows.
    pub agent_load: StreamVec<'scope, EventTime, (Rollup, AgentLoadRow)>,
    /// `api_events_*` rows.
    pub api_events: StreamVec<'scope, EventTime, (Rollup, ApiEventsRow)>,
    /// `task_state` changes.
    pub state: StreamVec<'scope, EventTime, TaskStateChange>,
}

/// Turns a differential collection into facts: only insertions count. Retractions happen only
/// when a task retires, long after every window its facts fell into was committed (a fact,
/// once its events are there, never changes: the first event of each kind wins).
fn facts<'scope, D, K, F>(
    collection: VecCollection<'scope, EventTime, D, isize>,
    mut fact: F,
) -> StreamVec<'scope, EventTime, (K, i64, TaskFact)>
where
    D: Clone + 'static,
    K: Clone + 'static,
    F: FnMut(D) -> Option<(K, i64, TaskFact)> + 'static,
{
    collection.inner.flat_map(move |(d, _t, diff)| {
        let n = usize::try_from(diff).unwrap_or(0);
        let f = if n > 0 { fact(d) } else { None };
        f.into_iter().flat_map(move |f| std::iter::repeat_n(f, n))
    })
}

/// What a task-type window learns from a task (integers, so that facts are ordered data).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TypeFact {
    /// Created.
    Created,
    /// Assigned.
    Assigned,
    /// Started after waiting this long, microseconds.
    Started(i64),
    /// Completed (`false`) or failed (`true`).
    Finished(bool),
    /// Finished after running this long, microseconds.
    Ran(i64),
}

impl From<TypeFact> for TaskFact {
    fn from(f: TypeFact) -> Self {
        let ms = |us: i64| us.max(0) as f64 / 1000.0;
        match f {
            TypeFact::Created => TaskFact::Created,
            TypeFact::Assigned => TaskFact::Assigned,
            TypeFact::Started(wait) => TaskFact::Started(ms(wait)),
            TypeFact::Finished(failed) => TaskFact::Finished(failed),
            TypeFact::Ran(run) => TaskFact::Ran(ms(run)),
        }
    }
}

/// What an agent window learns from a task.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AgentFact {
    /// Assigned to the agent.
    Assigned,
    /// The agent's task completed (`false`) or failed (`true`).
    Finished(bool),
}

impl From<AgentFact> for TaskFact {
    fn from(f: AgentFact) -> Self {
        match f {
            AgentFact::Assigned => TaskFact::Assigned,
            AgentFact::Finished(failed) => TaskFact::Finished(failed),
        }
    }
}

/// A fact about one task, derived from all of its events.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LifeFact {
    /// For the task's type (needs its `task_created`), at an event time.
    Type {
        /// Task type.
        ty: String,
        /// Event time of the step, microseconds.
        at: i64,
        /// The step.
        fact: TypeFact,
    },
    /// For the agent it was assigned to (needs its `task_assigned`).
    Agent {
        /// Agent.
        agent: String,
        /// Event time of the step, microseconds.
        at: i64,
        /// The step.
        fact: AgentFact,
    },
    /// Created and not finished: counts in its type's backlog.
    Open(String),
    /// Assigned and not finished: counts in its agent's active tasks.
    Active(String),
}

/// Every fact the events of one task support (the join, per task).
pub fn lifecycle_facts(recs: &[&TaskRec]) -> Vec<LifeFact> {
    let of = |k: TaskEventKind| recs.iter().find(|r| r.kind == k).copied();
    let created = of(TaskEventKind::Created);
    let assigned = of(TaskEventKind::Assigned);
    let started = of(TaskEventKind::Started);
    let finished: Vec<&TaskRec> = recs
        .iter()
        .filter(|r| matches!(r.kind, TaskEventKind::Completed | TaskEventKind::Failed))
        .copied()
        .collect();
    let mut out = Vec::new();
    if let Some(c) = created {
        let ty = |at: i64, fact: TypeFact| LifeFact::Type {
            ty: c.label.clone(),
            at,
            fact,
        };
        out.push(ty(c.time_us, TypeFact::Created));
        if let Some(a) = assigned {
            out.push(ty(a.time_us, TypeFact::Assigned));
        }
        if let Some(s) = started {
            out.push(ty(s.time_us, TypeFact::Started(s.time_us - c.time_us)));
        }
        for f in &finished {
            let failed = f.kind == TaskEventKind::Failed;
            out.push(ty(f.time_us, TypeFact::Finished(failed)));
            if let Some(s) = started {
                out.push(ty(f.time_us, TypeFact::Ran(f.time_us - s.time_us)));
            }
        }
        if finished.is_empty() {
            out.push(LifeFact::Open(c.label.clone()));
        }
    }
    if let Some(a) = assigned {
        let agent = |at: i64, fact: AgentFact| LifeFact::Agent {
            agent: a.label.clone(),
            at,
            fact,
        };
        out.push(agent(a.time_us, AgentFact::Assigned));
        for f in &finished {
            out.push(agent(
                f.time_us,
                AgentFact::Finished(f.kind == TaskEventKind::Failed),
            ));
        }
        if finished.is_empty() {
            out.push(LifeFact::Active(a.label.clone()));
        }
    }
    out
}

/// Builds the lifecycle join and every window of `analytics.events`.
///
/// `tasks` are on-time task events (and, at start-up, the restored `task_state`); `api` are
/// on-time API events.
pub fn task_windows<'scope>(
    tasks: StreamVec<'scope, EventTime, TaskInput>,
    api: StreamVec<'scope, EventTime, ApiEvent>,
    spec: TaskWindowSpec,
) -> TaskOutputs<'scope> {
    let indexed = tasks.task_index(
        &spec.dataflow,
        retention_us(spec.allowed_lateness_us, spec.out_of_orderness_us),
    );
    let state = indexed.clone().flat_map(|o| match o {
        IndexOutput::State(s) => Some(s),
        IndexOutput::Update(_) => None,
    });
    let events: VecCollection<'scope, EventTime, (String, TaskRec), isize> = indexed
        .flat_map(|o| match o {
            IndexOutput::Update(u) => Some(u),
            IndexOutput::State(_) => None,
        })
        .as_collection();
    // One arrangement of every task's events and one reduce per task: when any event of a
    // task arrives, its facts are recomputed from all of its events and only the difference
    // comes out (a fact appears when the events it needs are all there).
    let lifecycle = events.reduce_named("TaskLifecycle", |_id, input, output| {
        let recs: Vec<&TaskRec> = input
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, _)| *r)
            .collect();
        // Sorted and counted, as the reduce's output is a consolidated list.
        let mut facts = lifecycle_facts(&recs);
        facts.sort();
        for fact in facts {
            match output.last_mut() {
                Some((last, n)) if *last == fact => *n += 1,
                _ => output.push((fact, 1)),
            }
        }
    });
    let by_type = facts(lifecycle.clone(), |(_, f)| match f {
        LifeFact::Type { ty, at, fact } => Some((ty, at, fact.into())),
        _ => None,
    })
    .concat(
        lifecycle
            .clone()
            .flat_map(|(_, f)| match f {
                LifeFact::Open(ty) => Some(ty),
                _ => None,
            })
            .inner
            .sample_counts("Backlog")
            .map(|(ty, bucket_us, value)| (ty, bucket_us, TaskFact::Sample { bucket_us, value })),
    );
    let by_agent = facts(lifecycle.clone(), |(_, f)| match f {
        LifeFact::Agent { agent, at, fact } => Some((agent, at, fact.into())),
        _ => None,
    })
    .concat(
        lifecycle
            .flat_map(|(_, f)| match f {
                LifeFact::Active(agent) => Some(agent),
                _ => None,
            })
            .inner
            .sample_counts("ActiveTasks")
            .map(|(agent, bucket_us, value)| {
                (agent, bucket_us, TaskFact::Sample { bucket_us, value })
            }),
    );
    let api = api.map(|e| ((e.event_type, e.endpoint), e.time_us, e.user_id));

    let window = |name: &str, rollup: Rollup| WindowSpec {
        name: format!("{name}_{}", rollup.suffix()),
        dataflow: spec.dataflow.clone(),
        width_us: rollup.width_us(),
        committed_watermark_us: spec.committed_watermark_us,
        allowed_lateness_us: spec.allowed_lateness_us,
    };
    let mut task_stats = Vec::new();
    let mut agent_load = Vec::new();
    let mut api_events = Vec::new();
    for rollup in Rollup::ALL {
        let width = rollup.width_us();
        task_stats.push(
            by_type
                .clone()
                .pre_aggregate("task_stats", width, |s: &mut TaskStats, f| s.add(f))
                .tumbling_window(window("task_stats", rollup), |s: &mut TaskStats, p| {
                    s.merge(&p)
                })
                .map(move |w| (rollup, w.agg.to_row(w.window_start_us, w.key))),
        );
        agent_load.push(
            by_agent
                .clone()
                .pre_aggregate("agent_load", width, |s: &mut AgentLoad, f| s.add(f))
                .tumbling_window(window("agent_load", rollup), |s: &mut AgentLoad, p| {
                    s.merge(&p)
                })
                .map(move |w| (rollup, w.agg.to_row(w.window_start_us, w.key))),
        );
        api_events.push(
            api.clone()
                .pre_aggregate("api_events", width, |s: &mut ApiStats, u| s.add(u))
                .tumbling_window(window("api_events", rollup), |s: &mut ApiStats, p| {
                    s.merge(p)
                })
                .map(move |w| (rollup, w.agg.to_row(w.window_start_us, w.key.0, w.key.1))),
        );
    }
    fn all<'s, D: Clone + 'static>(
        v: Vec<StreamVec<'s, EventTime, D>>,
    ) -> StreamVec<'s, EventTime, D> {
        let mut v = v.into_iter();
        let first = v.next().expect("Rollup::ALL is not empty");
        v.fold(first, |a, b| a.concat(b))
    }
    TaskOutputs {
        task_stats: all(task_stats),
        agent_load: all(agent_load),
        api_events: all(api_events),
        state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::TestCaseError;
    use std::collections::BTreeMap;
    use timely::dataflow::operators::capture::{Capture, Event};
    use timely::dataflow::operators::Input;

    /// 2025-11-05T14:00:00Z, on a minute and hour boundary.
    const T0: i64 = 1_762_351_200_000_000;
    /// (agent, minute) -> ([assigned, completed, failed], latest active sample).
    type AgentWant = BTreeMap<(String, i64), ([i64; 3], Option<(i64, i64)>)>;
    /// (event type, endpoint, minute) -> (count, users, anonymous).
    type ApiWant = BTreeMap<(String, String, i64), (i64, BTreeSet<String>, i64)>;

    fn task(kind: TaskEventKind, id: &str, time_us: i64, label: &str) -> TaskEvent {
        TaskEvent {
            kind,
            task_id: id.to_owned(),
            task_type: (kind == TaskEventKind::Created).then(|| label.to_owned()),
            priority: None,
            agent_id: (kind != TaskEventKind::Created).then(|| label.to_owned()),
            time_us,
        }
    }

    type Outputs = (
        Vec<(Rollup, TaskStatsRow)>,
        Vec<(Rollup, AgentLoadRow)>,
        Vec<(Rollup, ApiEventsRow)>,
        Vec<TaskStateChange>,
    );

    /// Where the generated cases' watermark stops: past every generated event and past the
    /// close of the day window they fall in (T0 is 14:00 UTC, midnight is ten hours on), short
    /// of the retirements (a day and a minute after a finish).
    const T_END: u64 = (T0 + 11 * 3_600_000_000) as u64;

    /// Sends every event at time 0, advances the watermark to `end` and returns what was
    /// emitted by then.
    fn run(tasks: Vec<TaskEvent>, api: Vec<ApiEvent>, end: u64) -> Outputs {
        use timely::dataflow::operators::Probe;
        use timely::dataflow::{InputHandleVec, ProbeHandle};
        let (tx, rx) = std::sync::mpsc::channel();
        timely::execute_directly(move |worker| {
            let mut task_input: InputHandleVec<u64, TaskInput> = InputHandleVec::new();
            let mut api_input: InputHandleVec<u64, ApiEvent> = InputHandleVec::new();
            let probe = ProbeHandle::new();
            let captured = worker.dataflow(|scope| {
                let out = task_windows(
                    scope.input_from(&mut task_input),
                    scope.input_from(&mut api_input),
                    TaskWindowSpec {
                        dataflow: "test".into(),
                        committed_watermark_us: 0,
                        allowed_lateness_us: 0,
                        out_of_orderness_us: 0,
                    },
                );
                (
                    out.task_stats.probe_with(&probe).capture(),
                    out.agent_load.probe_with(&probe).capture(),
                    out.api_events.probe_with(&probe).capture(),
                    out.state.probe_with(&probe).capture(),
                )
            });
            for event in tasks {
                task_input.send(TaskInput {
                    event,
                    restored: false,
                });
            }
            for e in api {
                api_input.send(e);
            }
            task_input.advance_to(end);
            api_input.advance_to(end);
            while probe.less_than(&end) {
                worker.step();
            }
            // What a running pipeline has emitted at this watermark (closing the inputs would
            // run the frontier on through the retirement times, sampling past the watermark).
            tx.send((
                collect(captured.0),
                collect(captured.1),
                collect(captured.2),
                collect(captured.3),
            ))
            .expect("receiver alive");
        });
        fn collect<R>(rx: std::sync::mpsc::Receiver<Event<EventTime, Vec<R>>>) -> Vec<R> {
            rx.try_iter()
                .flat_map(|e| match e {
                    Event::Messages(_, rows) => rows,
                    Event::Progress(_) => Vec::new(),
                })
                .collect()
        }
        rx.recv().expect("outputs")
    }

    #[test]
    fn one_task_through_its_life() {
        let m = 60_000_000;
        let events = vec![
            // Completion read first: the join does not care about arrival order.
            task(TaskEventKind::Completed, "t1", T0 + 3 * m + 500_000, "a1"),
            task(TaskEventKind::Created, "t1", T0 + 1_000_000, "voice"),
            task(TaskEventKind::Assigned, "t1", T0 + 2_000_000, "a1"),
            task(TaskEventKind::Started, "t1", T0 + m + 2_000_000, "a1"),
            // A duplicate creation is ignored.
            task(TaskEventKind::Created, "t1", T0 + 9_000_000, "voice"),
            task(TaskEventKind::Created, "t2", T0 + 5_000_000, "voice"),
        ];
        // Past t1's retirement: a day and a minute after its finish.
        let end = (T0 + 25 * 3_600_000_000) as u64;
        let (stats, agents, _, state) = run(events, Vec::new(), end);
        let minute: BTreeMap<i64, TaskStatsRow> = stats
            .into_iter()
            .filter(|(r, _)| *r == Rollup::Minute)
            .map(|(_, row)| (row.bucket_us, row))
            .collect();
        let first = &minute[&T0];
        assert_eq!((first.created, first.assigned, first.backlog), (2, 1, 2));
        let second = &minute[&(T0 + m)];
        assert_eq!(second.started, 1);
        assert_eq!(second.wait_p50_ms, Some(m as f64 / 1000.0 + 1000.0));
        assert_eq!(second.backlog, 2);
        let fourth = &minute[&(T0 + 3 * m)];
        assert_eq!((fourth.completed, fourth.backlog), (1, 1));
        let run_ms = (2 * m - 1_500_000) as f64 / 1000.0;
        assert!(
            (fourth.run_p50_ms.unwrap() - run_ms).abs() <= run_ms * crate::sketch::RELATIVE_ERROR
        );
        let agent: Vec<_> = agents
            .iter()
            .filter(|(r, _)| *r == Rollup::Minute)
            .map(|(_, a)| (a.bucket_us, a.assigned, a.completed, a.active))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            agent,
            vec![
                (T0, 1, 0, 1),
                (T0 + m, 0, 0, 1),
                (T0 + 2 * m, 0, 0, 1),
                (T0 + 3 * m, 0, 1, 0)
            ]
        );
        // t2 stays open: its backlog is sampled every minute up to the watermark.
        let last = &minute[&(end as i64 - m)];
        assert_eq!((last.created, last.backlog), (0, 1));
        // Kept: 5 distinct events; the finished task retires, the open one stays.
        let keeps = state
            .iter()
            .filter(|s| matches!(s, TaskStateChange::Keep(_)))
            .count();
        assert_eq!(keeps, 5);
        assert!(state.contains(&TaskStateChange::Retire("t1".into())));
        assert!(!state.contains(&TaskStateChange::Retire("t2".into())));
    }

    /// Generated lifecycles: each task stops after a random number of steps; events shuffled;
    /// some creations duplicated.
    fn arbitrary_input() -> impl Strategy<Value = (Vec<TaskEvent>, Vec<ApiEvent>)> {
        let one_task = (
            0u8..3,
            0u8..4,
            0i64..5_400_000_000,
            0i64..600_000_000,
            0i64..900_000_000,
            0i64..1_800_000_000,
            0u8..6,
            any::<bool>(),
        );
        let one_api = (0u8..3, 0u8..2, 0i64..5_400_000_000, 0u8..5);
        (
            proptest::collection::vec(one_task, 1..40),
            proptest::collection::vec(one_api, 0..40),
            any::<u64>(),
        )
            .prop_map(|(tasks, api, seed)| {
                let mut events = Vec::new();
                for (i, (ty, agent, tc, wait_a, wait_s, run, steps, failed)) in
                    tasks.into_iter().enumerate()
                {
                    let id = format!("t{i}");
                    let ty = format!("type-{ty}");
                    let agent = format!("agent-{agent}");
                    let (tc, ta) = (T0 + tc, T0 + tc + wait_a);
                    let ts = ta + wait_s;
                    let tf = ts + run;
                    events.push(task(TaskEventKind::Created, &id, tc, &ty));
                    if steps >= 1 {
                        events.push(task(TaskEventKind::Assigned, &id, ta, &agent));
                    }
                    if steps >= 2 {
                        events.push(task(TaskEventKind::Started, &id, ts, &agent));
                    }
                    if steps >= 3 {
                        let kind = if failed {
                            TaskEventKind::Failed
                        } else {
                            TaskEventKind::Completed
                        };
                        events.push(task(kind, &id, tf, &agent));
                    }
                    if steps == 5 {
                        // A duplicate creation later on: ignored.
                        events.push(task(TaskEventKind::Created, &id, tc + 1, &ty));
                    }
                }
                // Deterministic shuffle.
                let mut x = seed | 1;
                for i in (1..events.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    events.swap(i, (x % (i as u64 + 1)) as usize);
                }
                let api = api
                    .into_iter()
                    .map(|(ty, ep, t, user)| ApiEvent {
                        event_type: format!("event-{ty}"),
                        endpoint: format!("/api/{ep}"),
                        user_id: (user > 0).then(|| format!("user-{user}")),
                        data: None,
                        time_us: T0 + t,
                    })
                    .collect();
                (events, api)
            })
    }

    /// A from-scratch reference of the three tables (differential's `reduce_reference.rs`
    /// style), compared with what the dataflow emits.
    fn check_against_reference(
        events: Vec<TaskEvent>,
        api: Vec<ApiEvent>,
    ) -> Result<(), TestCaseError> {
        let (stats, agents, api_rows, _) = run(events.clone(), api.clone(), T_END);
        let step = STEP_US;
        let minute = |t: i64| window_start(t, step);
        // First event of each kind per task, in input order.
        let mut first: BTreeMap<(String, usize), TaskEvent> = BTreeMap::new();
        for e in &events {
            first
                .entry((e.task_id.clone(), kind_slot(e.kind)))
                .or_insert_with(|| e.clone());
        }
        let get = |id: &str, k: TaskEventKind| first.get(&(id.to_owned(), kind_slot(k)));
        let ids: BTreeSet<String> = first.keys().map(|(id, _)| id.clone()).collect();
        let finished_at = |id: &str| {
            [TaskEventKind::Completed, TaskEventKind::Failed]
                .iter()
                .filter_map(|k| get(id, *k).map(|e| minute(e.time_us)))
                .min()
        };

        // Count samples: per key, value at the end of each minute, emitted where it or the
        // previous minute's is non-zero, from the sampler's first change up to the watermark.
        let samples = |items: Vec<(String, i64, Option<i64>)>| -> BTreeMap<(String, i64), i64> {
            // (key, minute in, minute out)
            let mut changes: BTreeSet<i64> = BTreeSet::new();
            for (_, a, b) in &items {
                if b != &Some(*a) {
                    changes.insert(*a);
                    if let Some(b) = b {
                        changes.insert(*b);
                    }
                }
            }
            let mut out = BTreeMap::new();
            let Some(&lo) = changes.first() else {
                return out;
            };
            let hi = T_END as i64 - step;
            let keys: BTreeSet<&String> = items.iter().map(|i| &i.0).collect();
            for k in keys {
                let value = |m: i64| {
                    items
                        .iter()
                        .filter(|(key, a, b)| key == k && *a <= m && b.is_none_or(|b| b > m))
                        .count() as i64
                };
                let mut m = lo;
                while m <= hi {
                    let (v, prev) = (value(m), value(m - step));
                    if v != 0 || (prev != 0 && m > lo) {
                        out.insert((k.clone(), m), v);
                    }
                    m += step;
                }
            }
            out
        };

        for rollup in Rollup::ALL {
            let width = rollup.width_us();
            let bucket = |t: i64| window_start(t, width);
            // task_stats
            #[derive(Default, Debug)]
            struct Want {
                n: [i64; 5],
                wait: Vec<f64>,
                run: Vec<f64>,
                backlog: Option<(i64, i64)>,
            }
            let mut want: BTreeMap<(String, i64), Want> = BTreeMap::new();
            let mut backlog_items = Vec::new();
            for id in &ids {
                let Some(c) = get(id, TaskEventKind::Created) else {
                    continue;
                };
                let ty = c.task_type.clone().unwrap_or_default();
                backlog_items.push((ty.clone(), minute(c.time_us), finished_at(id)));
                want.entry((ty.clone(), bucket(c.time_us))).or_default().n[0] += 1;
                if let Some(a) = get(id, TaskEventKind::Assigned) {
                    want.entry((ty.clone(), bucket(a.time_us))).or_default().n[1] += 1;
                }
                let s = get(id, TaskEventKind::Started);
                if let Some(s) = s {
                    let w = want.entry((ty.clone(), bucket(s.time_us))).or_default();
                    w.n[2] += 1;
                    w.wait.push((s.time_us - c.time_us).max(0) as f64 / 1000.0);
                }
                for (slot, k) in [(3, TaskEventKind::Completed), (4, TaskEventKind::Failed)] {
                    if let Some(f) = get(id, k) {
                        let w = want.entry((ty.clone(), bucket(f.time_us))).or_default();
                        w.n[slot] += 1;
                        if let Some(s) = s {
                            w.run.push((f.time_us - s.time_us).max(0) as f64 / 1000.0);
                        }
                    }
                }
            }
            // Only windows the watermark has closed are emitted: the day that starts while
            // the sampler runs on is still open at the end.
            let closed = |m: i64| bucket(m) + width <= T_END as i64;
            for ((ty, m), v) in samples(backlog_items) {
                if !closed(m) {
                    continue;
                }
                let w = want.entry((ty, bucket(m))).or_default();
                w.backlog = latest(w.backlog, Some((m, v)));
            }
            let got: Vec<&TaskStatsRow> = stats
                .iter()
                .filter(|(r, _)| *r == rollup)
                .map(|(_, row)| row)
                .collect();
            let got_keys: BTreeSet<(String, i64)> = got
                .iter()
                .map(|r| (r.task_type.clone(), r.bucket_us))
                .collect();
            let want_keys: BTreeSet<(String, i64)> = want.keys().cloned().collect();
            prop_assert_eq!(got.len(), got_keys.len(), "one row per key");
            prop_assert_eq!(
                &got_keys,
                &want_keys,
                "{:?}: unexpected {:?}, missing {:?}",
                rollup,
                got_keys.difference(&want_keys).collect::<Vec<_>>(),
                want_keys.difference(&got_keys).collect::<Vec<_>>()
            );
            let lower = |v: &[f64], q: f64| {
                let mut v = v.to_vec();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| v[(q * (v.len() - 1) as f64).floor() as usize])
            };
            let near = |got: Option<f64>, want: Option<f64>| match (got, want) {
                (Some(g), Some(w)) => {
                    (g - w).abs() <= crate::sketch::RELATIVE_ERROR * w.abs() + 1e-9
                }
                (None, None) => true,
                _ => false,
            };
            for row in got {
                let w = want
                    .get(&(row.task_type.clone(), row.bucket_us))
                    .ok_or_else(|| TestCaseError::fail(format!("unexpected {row:?}")))?;
                prop_assert_eq!(
                    [
                        row.created,
                        row.assigned,
                        row.started,
                        row.completed,
                        row.failed
                    ],
                    w.n,
                    "{:?}",
                    row
                );
                prop_assert_eq!(row.backlog, w.backlog.map_or(0, |b| b.1), "{:?}", row);
                prop_assert!(
                    near(row.wait_p50_ms, lower(&w.wait, 0.5)),
                    "{:?} {:?}",
                    row,
                    w
                );
                prop_assert!(
                    near(row.wait_p95_ms, lower(&w.wait, 0.95)),
                    "{:?} {:?}",
                    row,
                    w
                );
                prop_assert!(
                    near(row.run_p50_ms, lower(&w.run, 0.5)),
                    "{:?} {:?}",
                    row,
                    w
                );
                prop_assert!(
                    near(row.run_p95_ms, lower(&w.run, 0.95)),
                    "{:?} {:?}",
                    row,
                    w
                );
            }

            // agent_load
            let mut want: AgentWant = BTreeMap::new();
            let mut active_items = Vec::new();
            for id in &ids {
                let Some(a) = get(id, TaskEventKind::Assigned) else {
                    continue;
                };
                let agent = a.agent_id.clone().unwrap_or_default();
                active_items.push((agent.clone(), minute(a.time_us), finished_at(id)));
                want.entry((agent.clone(), bucket(a.time_us)))
                    .or_default()
                    .0[0] += 1;
                for (slot, k) in [(1, TaskEventKind::Completed), (2, TaskEventKind::Failed)] {
                    if let Some(f) = get(id, k) {
                        want.entry((agent.clone(), bucket(f.time_us)))
                            .or_default()
                            .0[slot] += 1;
                    }
                }
            }
            for ((agent, m), v) in samples(active_items) {
                if !closed(m) {
                    continue;
                }
                let w = want.entry((agent, bucket(m))).or_default();
                w.1 = latest(w.1, Some((m, v)));
            }
            let got: Vec<&AgentLoadRow> = agents
                .iter()
                .filter(|(r, _)| *r == rollup)
                .map(|(_, row)| row)
                .collect();
            prop_assert_eq!(
                got.len(),
                want.len(),
                "{:?} agent rows: {:?} want {:?}",
                rollup,
                got,
                want
            );
            for row in got {
                let (n, active) = want
                    .get(&(row.agent_id.clone(), row.bucket_us))
                    .ok_or_else(|| TestCaseError::fail(format!("unexpected {row:?}")))?;
                prop_assert_eq!([row.assigned, row.completed, row.failed], *n, "{:?}", row);
                prop_assert_eq!(row.active, active.map_or(0, |a| a.1), "{:?}", row);
            }

            // api_events
            let mut want: ApiWant = BTreeMap::new();
            for e in &api {
                let w = want
                    .entry((e.event_type.clone(), e.endpoint.clone(), bucket(e.time_us)))
                    .or_default();
                w.0 += 1;
                match &e.user_id {
                    Some(u) => {
                        w.1.insert(u.clone());
                    }
                    None => w.2 += 1,
                }
            }
            let got: Vec<&ApiEventsRow> = api_rows
                .iter()
                .filter(|(r, _)| *r == rollup)
                .map(|(_, row)| row)
                .collect();
            prop_assert_eq!(got.len(), want.len());
            for row in got {
                let w = &want[&(row.event_type.clone(), row.endpoint.clone(), row.bucket_us)];
                prop_assert_eq!(
                    (row.count, row.distinct_users, row.anonymous),
                    (w.0, w.1.len() as i64, w.2)
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn windows_match_a_reference((events, api) in arbitrary_input()) {
            check_against_reference(events, api)?;
        }
    }
}
