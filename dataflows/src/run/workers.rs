//! The timely workers: each builds one dataflow per stream over the partitions it owns, then
//! steps them until a shutdown has flushed everything (or a backfill has written everything).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use primespark_connectors::archive::{ArchiveReader, TieredStore};
use primespark_connectors::kafka::{self, KafkaConfig, StartFrom};
use primespark_operators::checkpoint::CheckpointTracker;
use primespark_operators::control::{Control, Drained};
use primespark_operators::inference::cpu::CpuBackend;
use primespark_operators::scoring::ScoringSpec;
use primespark_operators::sink::FlushPolicy;
use primespark_operators::source::{Backfill, EventTimeSpec, PartitionResume, SourceSpec};
use primespark_operators::EventTime;
use primespark_schemas::flow::Feed;
use primespark_schemas::rows::Rollup;
use primespark_schemas::DecodeLimits;
use timely::worker::Worker;

use super::streams::StreamRun;
use super::{Fatal, Scoring};
use crate::dataflow::{self, DataflowSpec};

/// The widest window: the checkpoint keeps every partition's records from the first record of
/// its oldest open window of this width, so a restart can rebuild every open window.
pub const WINDOW_US: i64 = Rollup::WIDEST.width_us();

/// The global worker that reads `partition` among `peers` workers: `p mod peers`.
pub fn owner_worker(partition: i32, peers: usize) -> usize {
    partition.unsigned_abs() as usize % peers.max(1)
}

/// The process whose workers read `partition`: process `i` runs global workers
/// `i * workers .. (i + 1) * workers`.
pub fn owner_process(partition: i32, workers: usize, processes: usize) -> usize {
    owner_worker(partition, workers * processes) / workers.max(1)
}

/// What every worker shares.
pub struct Shared {
    /// The broker.
    pub kafka: KafkaConfig,
    /// Event-time settings (the committed watermark is each stream's own).
    pub time: EventTimeSpec,
    /// Decode limits.
    pub limits: DecodeLimits,
    /// When the raw sink operator hands a batch off.
    pub raw_flush: FlushPolicy,
    /// When the commit operator commits.
    pub commit: FlushPolicy,
    /// Raised to stop this epoch's dataflows: by a shutdown, or by the partition watcher
    /// (then the run builds them again on the topic's new layout).
    pub stop: Arc<AtomicBool>,
    /// Raised when the process shuts down.
    pub shutdown: Arc<AtomicBool>,
    /// Raised while the sources are paused.
    pub paused: Arc<AtomicBool>,
    /// Raised when a sink failed for good.
    pub fatal: Fatal,
    /// The I/O runtime (archive readers run on it).
    pub handle: tokio::runtime::Handle,
    /// The archive a backfill reads.
    pub archive: Arc<TieredStore>,
    /// A backfill's range.
    pub backfill: Option<Backfill>,
    /// Set by worker 0 once its last windows are handed off (backfill).
    pub backfill_done: Arc<AtomicBool>,
    /// Anomaly scoring, when on.
    pub scoring: Option<Arc<Scoring>>,
    /// Local workers per process.
    pub workers: usize,
    /// This process's index.
    pub process_id: usize,
}

/// Runs the workers of this process until they stop; the error of each worker that failed.
pub fn execute(
    timely_config: timely::Config,
    streams: Vec<StreamRun>,
    shared: Shared,
) -> Result<Vec<String>, String> {
    let guards = timely::execute(timely_config, move |worker| -> Result<(), String> {
        let barrier = Barrier::build(worker);
        let mut drained = Vec::with_capacity(streams.len());
        for stream in &streams {
            drained.push(build_stream(worker, stream, &shared)?);
        }
        step(worker, &drained, &shared);
        if !shared.shutdown.load(Ordering::SeqCst) {
            // A new layout: every process rebuilds, none may leave while the others still
            // exchange with it.
            barrier.wait(worker, &shared);
        }
        // Open windows are deliberately not completed: the next run replays them.
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
        Ok(())
    })?;
    Ok(guards
        .join()
        .into_iter()
        .filter_map(|r| match r {
            Ok(Ok(())) => None,
            Ok(Err(e)) | Err(e) => Some(e),
        })
        .collect())
}

/// Builds this worker's dataflow of `stream`.
fn build_stream(
    worker: &mut Worker,
    stream: &StreamRun,
    shared: &Shared,
) -> Result<Drained, String> {
    let (index, peers) = (worker.index(), worker.peers());
    let mine: BTreeMap<i32, PartitionResume> = stream
        .resumes
        .iter()
        .filter(|(p, _)| owner_worker(**p, peers) == index)
        .map(|(p, r)| (*p, r.clone()))
        .collect();
    let feed = feed(stream, &mine, shared, index)?;
    let raw_tx = stream
        .raw_txs
        .lock()
        .map_err(|_| "sink registry poisoned".to_owned())?
        .get_mut(index - shared.process_id * shared.workers)
        .and_then(Option::take)
        .ok_or_else(|| format!("no raw sinks for worker {index}"))?;
    let kind = stream.plan.def.kind;
    let spec = DataflowSpec {
        source: SourceSpec {
            topic: stream.plan.topic.clone(),
            kind,
            partitions: mine,
            time: EventTimeSpec {
                committed_watermark_us: stream.committed_watermark_us,
                ..shared.time
            },
            limits: DecodeLimits {
                naive_zone: stream.plan.naive_zone,
                ..shared.limits
            },
            control: Control::new(shared.stop.clone(), shared.paused.clone()),
            backfill: shared.backfill.clone(),
        },
        feed,
        tracker: CheckpointTracker::new(WINDOW_US, stream.restored_windows.clone())
            .with_allowed_lateness(shared.time.allowed_lateness_us),
        raw_tx,
        agg_tx: stream.agg_tx.clone(),
        raw_flush: shared.raw_flush,
        commit: shared.commit,
        // Every process loaded the whole task state: each worker takes its share, the join
        // exchanges it by task id.
        restored_tasks: stream
            .restored_tasks
            .iter()
            .enumerate()
            .filter(|(i, _)| i % peers == index)
            .map(|(_, t)| t.clone())
            .collect(),
        scoring: shared
            .scoring
            .as_ref()
            .filter(|_| stream.plan.def.writes_scores())
            .map(|s| ScoringSpec {
                models: s.models.clone(),
                config: s.config.clone(),
                primary: s.primary.as_ref().map(|make| make()),
                fallback: Box::new(CpuBackend),
            }),
    };
    let drained = Drained::default();
    worker.dataflow::<EventTime, _, _>(|scope| dataflow::build(scope, spec, &drained));
    Ok(drained)
}

/// Where this worker's source of `stream` reads: its archive files (backfill) or its Kafka
/// partitions, assigned from their resume points.
fn feed(
    stream: &StreamRun,
    mine: &BTreeMap<i32, PartitionResume>,
    shared: &Shared,
    index: usize,
) -> Result<Option<Box<dyn Feed>>, String> {
    if mine.is_empty() {
        return Ok(None);
    }
    let (dataflow, topic) = (stream.plan.def.name, &stream.plan.topic);
    if shared.backfill.is_some() {
        let files = stream
            .archived
            .iter()
            .filter(|f| mine.contains_key(&f.partition))
            .cloned()
            .collect();
        let reader = ArchiveReader::spawn(
            &shared.handle,
            shared.archive.clone(),
            files,
            mine.keys().copied().collect(),
        );
        return Ok(Some(Box::new(reader)));
    }
    let reader = kafka::reader(
        &shared.kafka,
        topic,
        &format!("primespark-{dataflow}-{index}"),
    )
    .map_err(|e| e.to_string())?;
    // A partition nothing has stored while others of the topic have is one added since the
    // topic was first read: it is read from its beginning whatever `kafka.start` says, or
    // `latest` would skip the backlog it gathered before this run saw it.
    let seen_before = stream.resumes.values().any(PartitionResume::has_stored);
    let assignment: Vec<(i32, Option<i64>, StartFrom)> = mine
        .iter()
        .map(|(p, r)| {
            let start = if seen_before && !r.has_stored() {
                StartFrom::Earliest
            } else {
                shared.kafka.start
            };
            (*p, r.start(), start)
        })
        .collect();
    for (p, offset, start) in &assignment {
        tracing::info!(dataflow, topic = %topic, partition = p, offset = ?offset, start = ?start, worker = index, "assigned partition");
    }
    reader.assign(&assignment).map_err(|e| e.to_string())?;
    if shared.paused.load(Ordering::Relaxed) {
        // Lag counts records not stored yet: from the raw sinks' resume offsets, not from the
        // earlier offset the windows' replay starts at.
        let stored: Vec<(i32, Option<i64>)> = mine
            .iter()
            .map(|(p, r)| (*p, r.stored().or_else(|| r.start())))
            .collect();
        kafka::watch_paused_lag(
            &shared.kafka,
            topic,
            stored,
            Duration::from_secs(2),
            shared.paused.clone(),
        )
        .map_err(|e| e.to_string())?;
    }
    crate::ops::source_assigned(dataflow);
    Ok(Some(Box::new(reader)))
}

/// Steps the worker until its dataflows are done: a streaming run until shutdown has flushed
/// everything, a backfill until worker 0 has committed last; at once when a sink failed for
/// good (nothing will take the rest).
fn step(worker: &mut Worker, drained: &[Drained], shared: &Shared) {
    let all_drained = || drained.iter().all(Drained::all);
    if shared.backfill.is_some() {
        // Worker 0 commits last (every window goes through it); the others keep stepping
        // until then, or their part of the exchanges would be gone.
        loop {
            let done = all_drained();
            if worker.index() == 0 && done {
                shared.backfill_done.store(true, Ordering::SeqCst);
            }
            if done && shared.backfill_done.load(Ordering::SeqCst) {
                break;
            }
            if shared.stop.load(Ordering::Relaxed) {
                // Interrupted: what was handed off is written; a rerun clears and redoes the
                // range.
                break;
            }
            worker.step_or_park(Some(Duration::from_millis(20)));
        }
        return;
    }
    let finished = || shared.stop.load(Ordering::Relaxed) && all_drained();
    while !(shared.fatal.is_raised() || finished()) {
        worker.step_or_park(Some(Duration::from_millis(50)));
    }
}

/// A dataflow every worker of every process closes when it is ready to leave: its frontier
/// is empty once all have.
struct Barrier {
    input: timely::dataflow::InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<()>>>,
    probe: timely::dataflow::ProbeHandle<u64>,
}

impl Barrier {
    fn build(worker: &mut Worker) -> Self {
        use timely::dataflow::operators::{Input, Probe};
        let mut input = timely::dataflow::InputHandle::new();
        let probe = worker.dataflow::<u64, _, _>(|scope| scope.input_from(&mut input).probe().0);
        Self { input, probe }
    }

    /// Closes this worker's side and steps until every worker closed theirs (or the process
    /// shuts down, or a sink failed for good).
    fn wait(self, worker: &mut Worker, shared: &Shared) {
        let Self { input, probe } = self;
        drop(input);
        while !probe.done() {
            if shared.shutdown.load(Ordering::Relaxed) || shared.fatal.is_raised() {
                return;
            }
            worker.step_or_park(Some(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::owner_process;

    #[test]
    fn partitions_spread_over_every_worker_of_every_process() {
        // 2 processes x 2 workers: partitions 0..8 go to workers 0,1,2,3,0,1,2,3.
        let owners: Vec<usize> = (0..8).map(|p| owner_process(p, 2, 2)).collect();
        assert_eq!(owners, [0, 0, 1, 1, 0, 0, 1, 1]);
        assert!((0..5).all(|p| owner_process(p, 4, 1) == 0));
    }
}
