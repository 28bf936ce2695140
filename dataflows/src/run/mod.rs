//! Process start-up and shutdown of the pipeline.
//!
//! Start-up ([`run`], [`backfill`]): the plan from the configuration, models, the I/O runtime and
//! signals, migrations, then per stream its stored state, partitions, sinks and their runtimes
//! (`streams`), the services (`services`: SQL, tiering, retention), and the timely workers
//! (`workers`). Shutdown (SIGINT/SIGTERM or the caller's flag): sources stop reading but keep
//! their capabilities, so open windows are not emitted partial; the sink operators hand off
//! their buffers; the sink runtimes commit everything and exit within
//! `runtime.shutdown_grace`. A sink that fails for good stops the run with its error.

mod backfill;
mod error;
mod layout;
mod services;
mod streams;
mod workers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use primespark_connectors::postgres::{self, lease, Backend};
use primespark_connectors::sink::fence::{fenced, Fence};
use primespark_connectors::sink::{Classify, ErrorClass};
use primespark_operators::inference::config::InferenceConfig;
use primespark_operators::scoring::ModelTable;
use primespark_operators::source::EventTimeSpec;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

pub use backfill::{ArchiveFrom, BackfillRange};
pub use error::{Fatal, RunError};
pub use workers::{owner_process, owner_worker, WINDOW_US};

use crate::config::Config;
use crate::npu::{primary_backend, PrimaryFactory};
use crate::plan::{micros, Plan};

/// Runs the pipeline until `shutdown` is set (or SIGINT/SIGTERM when `handle_signals`).
pub fn run(
    config: &Config,
    shutdown: Arc<AtomicBool>,
    handle_signals: bool,
) -> Result<(), RunError> {
    run_mode(config, shutdown, handle_signals, None)
}

/// Rebuilds the PostgreSQL tables of every enabled stream for the event times in `range`
/// from the Parquet archive: the range is cleared, then the archived records go through the
/// same dataflow (scoring, windows, raw and aggregate sinks) as a streaming run's. Stores no
/// resume positions; runs in one process. Returns when everything is written.
pub fn backfill(config: &Config, range: &BackfillRange) -> Result<(), RunError> {
    run_mode(config, Arc::new(AtomicBool::new(false)), true, Some(range))
}

/// Anomaly scoring, loaded once at start-up so a bad model file fails it.
pub struct Scoring {
    /// Which model scores which device.
    pub models: ModelTable,
    /// Batching and queue settings.
    pub config: InferenceConfig,
    /// The NPU, if one is in use.
    pub primary: Option<PrimaryFactory>,
}

impl Scoring {
    /// Loads every model and opens the NPU the configuration asks for (`None`: scoring off or
    /// no telemetry stream).
    fn load(config: &Config) -> Result<Option<Self>, RunError> {
        if !(config.inference.enabled && config.dataflows.telemetry) {
            return Ok(None);
        }
        Ok(Some(Self {
            models: ModelTable::load(&config.inference)?,
            config: config.inference.clone(),
            // Asked-for hardware must be there before any worker starts; opened once, shared.
            primary: primary_backend(config.inference.backend)?,
        }))
    }
}

fn run_mode(
    config: &Config,
    shutdown: Arc<AtomicBool>,
    handle_signals: bool,
    backfill: Option<&BackfillRange>,
) -> Result<(), RunError> {
    let plan = Plan::of(config, backfill)?;
    // Secrets from their files and variables, and no shipped sample, before anything starts.
    let query = backfill
        .is_none()
        .then(|| config.query.resolve_secrets())
        .transpose()?;
    let scoring = Scoring::load(config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("primespark-io")
        .build()
        .map_err(RunError::Runtime)?;
    let paused = Arc::new(AtomicBool::new(config.runtime.start_paused));
    if handle_signals {
        watch_signals(&rt, &shutdown, &paused, config.runtime.start_paused);
    }
    let backend = rt.block_on(prepare_database(config))?;
    let archive = backfill::archive_stores(config, backfill)?;
    let fatal = Fatal::new(shutdown.clone());
    // Without PostgreSQL no lease can be held: the NAS folder lock keeps a second instance
    // from writing the same archive.
    let _nas_lock = (!config.postgres.enabled && backfill.is_none())
        .then(|| lock_nas(config))
        .transpose()?;
    // The SQL endpoint first: a standby answers queries and says on `/readyz` why it is not
    // ready. Not for a backfill: a batch job next to the running pipeline.
    let mut services = match &query {
        Some(query) => services::Services::start_query(&rt, config, query, &shutdown)?,
        None => services::Services::default(),
    };
    let released = Arc::new(AtomicBool::new(false));
    let (fence, keeper) = match writer_lease(&rt, config, &plan, backfill.is_some(), &shutdown)? {
        Lease::None => (Fence::unfenced(), None),
        Lease::Gave => {
            // Shut down while a standby: nothing was written.
            services.stop(&rt);
            tracing::info!("standby stopped before taking the writer lease");
            return Ok(());
        }
        Lease::Held(spec, fence) => {
            let (stop, report) = (released.clone(), fatal.clone());
            let keeper = rt.spawn(lease::keep(
                config.postgres.config.url.clone(),
                spec,
                fence.clone(),
                move || stop.load(Ordering::SeqCst),
                move |why| report.report(fenced(&why)),
            ));
            (fence, Some(keeper))
        }
    };
    // A backfill's positions are not the stream's progress.
    let group = (backfill.is_none() && config.kafka.commit_group_offsets)
        .then(|| primespark_connectors::kafka::GroupOffsets::start(&config.kafka))
        .transpose()?;
    let env = Env {
        rt: &rt,
        config,
        plan: &plan,
        fence: &fence,
        archive: &archive,
        fatal: &fatal,
        group: group.as_ref(),
        scoring: scoring.map(Arc::new),
        paused,
        shutdown: &shutdown,
        backfill,
    };
    // Each epoch runs the dataflows on the topics' layout of its start; a new layout (the
    // partition watcher) ends one and starts the next, in this process, under the same lease.
    let mut outcome = Ok(Vec::new());
    for epoch in 0u64.. {
        let stop = Arc::new(AtomicBool::new(false));
        let ended = run_epoch(&env, &stop, || {
            // Tiering and retention, in the writer only; they outlive the epochs.
            if epoch == 0 && backfill.is_none() {
                services.start_writers(&rt, config, backend, &shutdown)?;
            }
            Ok(())
        });
        match ended {
            Ok(Ended::Relayout(change)) if !shutdown.load(Ordering::SeqCst) => {
                tracing::info!(
                    epoch = epoch + 1,
                    change,
                    "dataflows drained and committed: starting them on the topics' new layout"
                );
            }
            Ok(Ended::Relayout(_)) => break,
            Ok(Ended::Stopped(seeds)) => {
                outcome = Ok(seeds);
                break;
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    shutdown.store(true, Ordering::SeqCst);
    // Only now, with every commit done, may a standby take over.
    released.store(true, Ordering::SeqCst);
    if let Some(keeper) = keeper {
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), keeper).await });
    }
    services.stop(&rt);
    let seeds = outcome?;
    if !seeds.is_empty() {
        rt.block_on(async {
            let client = postgres::connect(&config.postgres.config.url).await?;
            for (dataflow, topic, ends) in &seeds {
                let stored =
                    postgres::backfill::seed_raw_positions(&client, dataflow, topic, ends).await?;
                if stored > 0 {
                    tracing::info!(dataflow, topic, partitions = stored, "backfill: the raw positions of a new database start where the archive ends");
                }
            }
            Ok::<_, RunError>(())
        })?;
    }
    tracing::info!("pipeline stopped cleanly");
    Ok(())
}

/// What every epoch of a run shares.
struct Env<'a> {
    rt: &'a Runtime,
    config: &'a Config,
    plan: &'a Plan,
    fence: &'a Fence,
    archive: &'a Arc<primespark_connectors::archive::TieredStore>,
    fatal: &'a Fatal,
    group: Option<&'a primespark_connectors::kafka::GroupOffsets>,
    scoring: Option<Arc<Scoring>>,
    paused: Arc<AtomicBool>,
    shutdown: &'a Arc<AtomicBool>,
    backfill: Option<&'a BackfillRange>,
}

/// How an epoch of the dataflows ended, everything committed.
enum Ended {
    /// Shut down (or a backfill finished): the raw positions a backfill hands on.
    Stopped(Vec<RawSeed>),
    /// A topic changed layout (what changed).
    Relayout(String),
}

/// Starts every stream on the topics' current layout, runs the workers until `stop` (a
/// shutdown, or the partition watcher) and drains the sinks. `started_hook` runs once the
/// streams' sinks are up, before the workers.
fn run_epoch(
    env: &Env<'_>,
    stop: &Arc<AtomicBool>,
    started_hook: impl FnOnce() -> Result<(), RunError>,
) -> Result<Ended, RunError> {
    let rt = env.rt;
    // The process's shutdown ends the epoch too.
    let forward = {
        let (shutdown, stop) = (env.shutdown.clone(), stop.clone());
        rt.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if shutdown.load(Ordering::SeqCst) {
                    stop.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let result = epoch_inner(env, stop, started_hook);
    stop.store(true, Ordering::SeqCst);
    let _ = rt.block_on(forward);
    result
}

fn epoch_inner(
    env: &Env<'_>,
    stop: &Arc<AtomicBool>,
    started_hook: impl FnOnce() -> Result<(), RunError>,
) -> Result<Ended, RunError> {
    let (rt, config, plan, backfill) = (env.rt, env.config, env.plan, env.backfill);
    let mut writers = Vec::new();
    let start = streams::Start {
        rt,
        fence: env.fence,
        config,
        plan,
        archive: env.archive,
        fatal: env.fatal,
        group: env.group,
    };
    let mut started = Vec::with_capacity(plan.streams.len());
    for stream in &plan.streams {
        started.push(streams::start(&start, stream, &mut writers)?);
    }
    started_hook()?;
    let watcher = match backfill {
        None => layout::watch(
            &config.kafka,
            started
                .iter()
                .map(|s| layout::Watched {
                    topic: s.plan.topic.clone(),
                    partitions: s.partitions.clone(),
                })
                .collect(),
            stop.clone(),
        ),
        Some(_) => None,
    };
    let backfill_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let shared = workers::Shared {
        kafka: config.kafka.clone(),
        time: EventTimeSpec {
            out_of_orderness_us: micros(config.windows.max_out_of_orderness),
            allowed_lateness_us: micros(config.windows.allowed_lateness),
            width_us: WINDOW_US,
            idle_timeout: config.windows.idle_timeout,
            committed_watermark_us: 0,
            max_future_us: Some(micros(config.windows.max_future)),
        },
        limits: plan.limits,
        raw_flush: plan.raw_flush,
        commit: plan.commit,
        stop: stop.clone(),
        shutdown: env.shutdown.clone(),
        paused: env.paused.clone(),
        fatal: env.fatal.clone(),
        handle: rt.handle().clone(),
        archive: env.archive.clone(),
        backfill: backfill.map(|r| {
            let (since_us, until_us) = r.bounds();
            primespark_operators::source::Backfill {
                since_us,
                until_us,
                failure: backfill_failure.clone(),
            }
        }),
        backfill_done: Arc::default(),
        scoring: env.scoring.clone(),
        workers: config.runtime.workers,
        process_id: config.runtime.process_id,
    };
    // A backfill to the archive's end hands the streaming run its raw positions (below).
    let seeds: Vec<RawSeed> = match backfill {
        Some(range) if range.until_us.is_none() => started
            .iter()
            .map(|s| {
                (
                    s.plan.def.name,
                    s.plan.topic.clone(),
                    archive_ends(&s.archived),
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    let failed =
        workers::execute(config.runtime.timely()?, started, shared).map_err(RunError::Timely)?;
    let interrupted = backfill.is_some() && env.shutdown.load(Ordering::SeqCst);
    let finished = drain(rt, writers, config.runtime.shutdown_grace);
    stop.store(true, Ordering::SeqCst);
    let relayout = watcher.and_then(|w| w.join().ok().flatten());
    if let Some(e) = env.fatal.take() {
        return Err(RunError::Sink(e));
    }
    if let Some(e) = failed.into_iter().next() {
        tracing::error!(error = %e, "worker failed");
        return Err(RunError::Timely(e));
    }
    if let Some(e) = backfill_failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(RunError::Backfill(e));
    }
    if interrupted {
        return Err(RunError::Backfill("interrupted".into()));
    }
    finished.map_err(|_| RunError::ShutdownTimeout(config.runtime.shutdown_grace))?;
    Ok(match relayout {
        Some(change) => Ended::Relayout(change),
        None => Ended::Stopped(seeds),
    })
}

/// A stream's raw positions a backfill hands the streaming run: dataflow, topic, and per
/// partition the offset after the archive's last roll.
type RawSeed = (&'static str, String, Vec<(i32, i64)>);

/// Per partition, the offset after the last of `files`' rolls.
fn archive_ends(files: &[primespark_connectors::archive::RollFile]) -> Vec<(i32, i64)> {
    let mut ends = std::collections::HashMap::new();
    for f in files {
        primespark_connectors::nas::extend_end(&mut ends, f.partition, f.last);
    }
    ends.into_iter().collect()
}

/// The writer lease of a run.
enum Lease {
    /// None is used (no PostgreSQL, or a backfill).
    None,
    /// The run was stopped while waiting as a standby.
    Gave,
    /// Held: renew it with the spec, write under the fence.
    Held(lease::LeaseSpec, Fence),
}

/// Takes the writer lease of this process's dataflows, waiting as a standby while another live
/// instance holds it.
fn writer_lease(
    rt: &Runtime,
    config: &Config,
    plan: &Plan,
    backfill: bool,
    shutdown: &Arc<AtomicBool>,
) -> Result<Lease, RunError> {
    if !config.postgres.enabled || backfill {
        return Ok(Lease::None);
    }
    let spec = lease::LeaseSpec {
        dataflows: plan.streams.iter().map(|s| s.def.name.to_owned()).collect(),
        process_id: i32::try_from(config.runtime.process_id).unwrap_or(i32::MAX),
        holder: lease::holder_name(),
        ttl: config.postgres.config.lease_ttl,
    };
    let stop = || shutdown.load(Ordering::SeqCst);
    match rt.block_on(lease::acquire(&config.postgres.config.url, &spec, &stop))? {
        Some((fence, _predecessors)) => Ok(Lease::Held(spec, fence)),
        None => Ok(Lease::Gave),
    }
}

/// Locks `<nas.path>/.primespark.lock` for the life of the run, or says who holds it.
fn lock_nas(config: &Config) -> Result<std::fs::File, RunError> {
    let root = &config.nas.path;
    std::fs::create_dir_all(root).map_err(|source| {
        RunError::Nas(primespark_connectors::nas::NasError::Io {
            path: root.clone(),
            source,
        })
    })?;
    let path = root.join(".primespark.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| {
            RunError::Nas(primespark_connectors::nas::NasError::Io {
                path: path.clone(),
                source,
            })
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(RunError::Busy(format!(
            "another primespark process writes {} (without PostgreSQL there is no writer lease, so the folder lock is the only guard): stop it, or give this one its own nas.path",
            root.display()
        ))),
        Err(std::fs::TryLockError::Error(source)) => {
            Err(RunError::Nas(primespark_connectors::nas::NasError::Io { path, source }))
        }
    }
}

/// Waits up to `grace` for the sink runtimes to commit everything and exit (the workers are
/// gone, and with them every sender).
fn drain(rt: &Runtime, writers: Vec<JoinHandle<()>>, grace: Duration) -> Result<(), ()> {
    rt.block_on(async {
        tokio::time::timeout(grace, async {
            for h in writers {
                let _ = h.await;
            }
        })
        .await
    })
    .map_err(|_| ())
}

/// Migrations (and TimescaleDB's retention policies, by process 0) when PostgreSQL is on;
/// which backend the tables live in.
async fn prepare_database(config: &Config) -> Result<Option<Backend>, RunError> {
    if !config.postgres.enabled {
        return Ok(None);
    }
    let pg = &config.postgres.config;
    let mut client = connect_with_retry(&pg.url, Duration::from_secs(30)).await?;
    let backend = postgres::migrate(&mut client).await?;
    if backend == Backend::Timescale && pg.retention.enabled && config.runtime.process_id == 0 {
        postgres::retention::apply_timescale_policies(&client, &pg.retention).await?;
    }
    Ok(Some(backend))
}

async fn connect_with_retry(
    url: &str,
    deadline: Duration,
) -> Result<tokio_postgres::Client, postgres::PostgresError> {
    let started = std::time::Instant::now();
    loop {
        match postgres::connect(url).await {
            Ok(c) => return Ok(c),
            // A wrong password, a refused role or unusable TLS settings do not heal by waiting.
            Err(e) if matches!(e.class(), ErrorClass::Fatal(_)) => return Err(e),
            Err(e) if started.elapsed() < deadline => {
                tracing::warn!(error = %e, "postgres not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// SIGINT/SIGTERM raise `shutdown`; with a paused start, SIGUSR1 lowers `paused`.
fn watch_signals(
    rt: &Runtime,
    shutdown: &Arc<AtomicBool>,
    paused: &Arc<AtomicBool>,
    start_paused: bool,
) {
    let flag = shutdown.clone();
    rt.spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining");
        flag.store(true, Ordering::SeqCst);
    });
    if start_paused {
        tracing::warn!("sources start paused: partitions are assigned and their lag reported, nothing is read until SIGUSR1");
        let flag = paused.clone();
        rt.spawn(async move {
            wait_for_resume().await;
            tracing::info!("SIGUSR1: sources resume reading");
            flag.store(false, Ordering::SeqCst);
        });
    }
}

/// SIGUSR1 (never on other platforms: there a paused run stays paused).
async fn wait_for_resume() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::user_defined1()) {
            Ok(mut usr1) => {
                usr1.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGUSR1: the paused sources cannot be resumed");
                std::future::pending::<()>().await;
            }
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
