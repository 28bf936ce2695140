//! Start-up of one stream: what earlier runs stored, its partitions, its sinks on every local
//! worker (built by the registry, health-checked, recovered) and their runtimes, and where each
//! of its partitions resumes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use primespark_connectors::archive::{RollFile, TieredStore};
use primespark_connectors::kafka;
use primespark_connectors::sink::registry::{self, SinkContext};
use primespark_connectors::sink::runtime::{AggRuntime, RawRuntime};
use primespark_connectors::sink::{BoxAggSink, BoxRawSink, Healthcheck, SinkError};
use primespark_operators::source::PartitionResume;
use primespark_operators::EventTime;
use primespark_schemas::analytics::TaskEvent;
use primespark_schemas::flow::{AggCommit, RawBatch};
use primespark_schemas::rows::PartitionOffset;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::workers::owner_worker;
use super::{backfill, Fatal, RunError};
use crate::config::Config;
use crate::plan::{Plan, StreamPlan};

/// Everything the workers need of one started stream.
pub struct StreamRun {
    /// The stream's plan.
    pub plan: StreamPlan,
    /// Where each partition this process reads resumes.
    pub resumes: BTreeMap<i32, PartitionResume>,
    /// Windows ending at or before this are committed.
    pub committed_watermark_us: EventTime,
    /// The windows' resume points, for the checkpoint tracker.
    pub restored_windows: Vec<PartitionOffset>,
    /// `task_state` (the analytics join's; empty for the others).
    pub restored_tasks: Vec<TaskEvent>,
    /// The raw sinks' channels, one per local worker (each taken by its worker).
    pub raw_txs: Mutex<Vec<Option<mpsc::Sender<RawBatch>>>>,
    /// The aggregate sinks' channel.
    pub agg_tx: mpsc::Sender<AggCommit>,
    /// A backfill's archive files of this topic.
    pub archived: Vec<RollFile>,
    /// Every partition of the topic when the stream started (all processes').
    pub partitions: std::collections::BTreeSet<i32>,
}

/// What starting a stream needs from the run.
pub struct Start<'a> {
    /// The I/O runtime.
    pub rt: &'a Runtime,
    /// The writer lease every sink writes under.
    pub fence: &'a primespark_connectors::sink::fence::Fence,
    /// The configuration.
    pub config: &'a Config,
    /// The run's plan.
    pub plan: &'a Plan,
    /// The archive a backfill reads.
    pub archive: &'a TieredStore,
    /// Where sink runtimes report a fatal error.
    pub fatal: &'a Fatal,
    /// Where raw sink runtimes report committed positions (none in a backfill, or when
    /// `kafka.commit_group_offsets` is off).
    pub group: Option<&'a kafka::GroupOffsets>,
}

/// Starts `stream`: its sinks' runtimes are pushed to `writers`.
pub fn start(
    env: &Start<'_>,
    stream: &StreamPlan,
    writers: &mut Vec<JoinHandle<()>>,
) -> Result<StreamRun, RunError> {
    let (rt, plan, def) = (env.rt, env.plan, stream.def);
    let (stored, restored_tasks) =
        rt.block_on(registry::stored_state(&plan.sinks, def, &stream.topic))?;
    if !restored_tasks.is_empty() {
        tracing::info!(
            dataflow = def.name,
            tasks = restored_tasks.len(),
            "restored task lifecycle state"
        );
    }
    let committed_watermark_us: EventTime = stored
        .committed_watermark_us
        .and_then(|w| u64::try_from(w).ok())
        .unwrap_or(0);
    let (partitions, archived) = match &plan.backfill {
        Some(range) => rt.block_on(backfill::prepare(
            env.config,
            def,
            &stream.topic,
            env.archive,
            range,
        ))?,
        None => (discover_partitions(env.config, &stream.topic)?, Vec::new()),
    };
    tracing::info!(dataflow = def.name, topic = %stream.topic, partitions = partitions.len(), committed_watermark_us, sinks = ?stream.raw_sinks, "starting dataflow");
    let ctx = SinkContext {
        stream: def,
        topic: stream.topic.clone(),
        worker: 0,
        partitions: partitions.clone(),
        topic_partitions: partitions.len(),
        stored: Arc::new(stored),
        backfill: plan.backfill.as_ref().map(|r| r.bounds()),
        fence: env.fence.clone(),
    };
    let aggregates = rt.block_on(registry::aggregate_sinks(&plan.sinks, &ctx))?;
    let aggregates = checked(rt, aggregates, true)?;
    let restored_windows = partitions
        .iter()
        .filter_map(|p| {
            window_resume(&aggregates, *p).map(|(next_offset, max_event_us)| PartitionOffset {
                partition: *p,
                next_offset,
                max_event_us,
            })
        })
        .collect();
    let runtime = &env.config.runtime;
    let peers = runtime.workers * runtime.processes;
    let mut resumes = BTreeMap::new();
    let mut raw_txs = Vec::new();
    for local in 0..runtime.workers {
        let worker = runtime.process_id * runtime.workers + local;
        let mine: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| owner_worker(*p, peers) == worker)
            .collect();
        let ctx = SinkContext {
            worker,
            partitions: mine.clone(),
            ..ctx.clone()
        };
        let built = rt.block_on(registry::raw_sinks(&plan.sinks, &ctx))?;
        let mut raw = RawRuntime::new(&stream.topic, checked(rt, built, local == 0)?);
        if let Some(group) = env.group {
            raw = raw.with_progress(group.clone());
        }
        let removed = rt.block_on(recover(raw.sinks_mut()))?;
        if removed > 0 {
            tracing::info!(
                dataflow = def.name,
                worker,
                removed,
                "removed what sinks wrote but never committed"
            );
        }
        for p in mine {
            resumes.insert(p, resume(raw.sinks_mut(), &aggregates, p));
        }
        let (tx, rx) = mpsc::channel(2);
        raw_txs.push(Some(tx));
        writers.push(supervised(rt, env.fatal, raw.run(rx)));
    }
    if plan.backfill.is_none() {
        check_positions(env.config, &stream.topic, &mut resumes);
    }
    let (agg_tx, agg_rx) = mpsc::channel(4);
    writers.push(supervised(
        rt,
        env.fatal,
        AggRuntime::new(aggregates).run(agg_rx),
    ));
    // Local workers that read at least one partition of this topic.
    let readers = resumes
        .keys()
        .map(|p| owner_worker(*p, peers))
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    crate::ops::source_expected(def.name, readers);
    Ok(StreamRun {
        plan: stream.clone(),
        resumes,
        committed_watermark_us,
        restored_windows,
        restored_tasks,
        raw_txs: Mutex::new(raw_txs),
        agg_tx,
        archived,
        partitions: partitions.iter().copied().collect(),
    })
}

/// The sinks, after running their health checks (only `check`: once per stream is enough).
fn checked<S>(rt: &Runtime, built: Vec<(S, Healthcheck)>, check: bool) -> Result<Vec<S>, RunError> {
    let mut sinks = Vec::with_capacity(built.len());
    for (sink, health) in built {
        if check {
            rt.block_on(health)?;
        }
        sinks.push(sink);
    }
    Ok(sinks)
}

/// Removes what the sinks wrote but never committed.
async fn recover(sinks: &mut [BoxRawSink]) -> Result<usize, SinkError> {
    let mut removed = 0;
    for sink in sinks {
        removed += sink.recover().await.map_err(|e| e.context(sink.name()))?;
    }
    Ok(removed)
}

/// Where the consumers of `partition` resume: each raw sink, and the windows.
fn resume(raw: &[BoxRawSink], aggregates: &[BoxAggSink], partition: i32) -> PartitionResume {
    PartitionResume {
        raw: raw
            .iter()
            .map(|s| (s.id(), s.resume(partition).map(|o| o.next_offset)))
            .collect(),
        window: window_resume(aggregates, partition),
    }
}

/// The windows' resume point of `partition`: the least of the aggregate sinks that store one
/// (`None`: none stores positions, or one has stored nothing for it).
fn window_resume(aggregates: &[BoxAggSink], partition: i32) -> Option<(i64, i64)> {
    let mut least: Option<PartitionOffset> = None;
    for sink in aggregates.iter().filter(|s| s.stores_positions()) {
        let stored = sink.resume(partition)?;
        if least.is_none_or(|l| stored.next_offset < l.next_offset) {
            least = Some(stored);
        }
    }
    least.map(|o| (o.next_offset, o.max_event_us))
}

/// Runs a sink runtime; its fatal error stops the pipeline.
fn supervised(
    rt: &Runtime,
    fatal: &Fatal,
    run: impl std::future::Future<Output = Result<(), SinkError>> + Send + 'static,
) -> JoinHandle<()> {
    let fatal = fatal.clone();
    rt.spawn(async move {
        if let Err(e) = run.await {
            fatal.report(e);
        }
    })
}

/// The topic's partitions, waiting up to `kafka.metadata_timeout_ms` for it to appear.
/// Compares each partition's stored position with what the broker holds, by the documented
/// rule (ARCHITECTURE.md, "Partitions and offsets"): a position below the partition's first
/// offset (records expired before they were stored) continues from that first offset, a
/// position beyond its end (the topic was deleted and recreated) leaves the partition unread;
/// both are reported (`primespark_source_position_lost_total`, the log, `/readyz`), never
/// silent.
fn check_positions(config: &Config, topic: &str, resumes: &mut BTreeMap<i32, PartitionResume>) {
    let Ok(reader) = kafka::reader(&config.kafka, topic, "primespark-positions") else {
        return;
    };
    let timeout = Duration::from_secs(5);
    let mut lost = Vec::new();
    for (p, resume) in resumes.iter_mut() {
        let Some(start) = resume.start() else {
            continue;
        };
        let Ok((low, high)) = reader.watermarks(*p, timeout) else {
            continue;
        };
        if start < low {
            kafka_position_lost(
                topic,
                &format!("partition {p}: stored position {start} is below the partition's first offset {low} (records expired before they were stored); continuing from {low}"),
            );
            resume.clamp_to(low);
        } else if start > high && start > 0 && !reader.holds(*p, start - 1, timeout).unwrap_or(true)
        {
            // Some brokers report the end a batch short: only a missing record proves it.
            kafka_position_lost(
                topic,
                &format!("partition {p}: stored position {start} is beyond the partition's end {high} (the topic was deleted and recreated?); the partition is not read until its rows in source_offsets are removed"),
            );
            lost.push(*p);
        }
    }
    for p in lost {
        resumes.remove(&p);
    }
}

fn kafka_position_lost(topic: &str, why: &str) {
    primespark_connectors::metrics::SourcePositionLost { topic, error: &why }.emit();
}

fn discover_partitions(config: &Config, topic: &str) -> Result<Vec<i32>, RunError> {
    let reader = kafka::reader(&config.kafka, topic, "primespark-metadata")?;
    let deadline = Instant::now() + Duration::from_millis(config.kafka.metadata_timeout_ms);
    loop {
        match reader.partitions(Duration::from_secs(5)) {
            Ok(p) => return Ok(p),
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(topic, error = %e, "waiting for topic metadata");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
