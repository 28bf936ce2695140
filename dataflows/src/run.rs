//! Process start-up and shutdown of the pipeline.
//!
//! Start-up: migrations, committed state (resume offsets, committed watermark), partition
//! discovery, Parquet recovery, writers, the HTTP endpoint, then the timely workers. Shutdown
//! (SIGINT/SIGTERM or the caller's flag): sources stop reading but keep their capabilities, so
//! open windows are not emitted partial; sinks hand off their buffers; writers flush, commit
//! their offsets and exit within `runtime.shutdown_grace`.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use primespark_connectors::kafka::{self, KafkaError};
use primespark_connectors::nas::{NasError, ParquetArchive};
use primespark_connectors::postgres::{self, PostgresError, StoredState};
use primespark_connectors::query::{self, QueryError};
use primespark_connectors::InvalidConfig;
use primespark_operators::checkpoint::CheckpointTracker;
use primespark_operators::EventTime;
use primespark_schemas::DecodeLimits;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::dataflow::{self, dataflow_name, Drained, WINDOW_US};
use crate::scoring::{self, ModelTable, ScoringSpec};
use crate::sinks::FlushPolicy;
use crate::source::{Feed, Resume, SourceSpec};
use crate::writers::{agg_writer, raw_writer, sink_names, DlqTarget, ParquetTarget, PgTarget};
use primespark_connectors::archive::ArchiveReader;
use primespark_operators::decode::StreamKind;
use primespark_operators::inference::cpu::CpuBackend;
use primespark_operators::inference::InferenceError;

/// Why the pipeline could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] InvalidConfig),
    /// PostgreSQL unreachable or failing at start-up.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// Kafka unreachable, or the topic missing.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The Parquet archive could not be recovered.
    #[error(transparent)]
    Nas(#[from] NasError),
    /// The SQL endpoint could not start.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The object store could not be set up.
    #[error(transparent)]
    S3(#[from] primespark_connectors::s3::S3Error),
    /// An inference model could not be loaded, or the NPU asked for is missing.
    #[error(transparent)]
    Inference(#[from] primespark_operators::inference::InferenceError),
    /// The async runtime could not start.
    #[error("starting the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Timely failed.
    #[error("timely: {0}")]
    Timely(String),
    /// The archive could not be listed or read (backfill).
    #[error(transparent)]
    Archive(#[from] primespark_connectors::archive::ArchiveError),
    /// A backfill's source failed mid-way; the tables hold part of the range (run it again).
    #[error("backfill failed: {0}; run it again, it is idempotent")]
    Backfill(String),
    /// Writers did not finish within the grace period.
    #[error(
        "sinks did not flush within {0:?}; the next run resumes from the last committed offsets"
    )]
    ShutdownTimeout(Duration),
}

impl RunError {
    /// The process exit code that says why the run ended: 2 configuration, 3 a service
    /// (PostgreSQL, Kafka, the NAS, the SQL port) failing at start-up, 4 the shutdown grace
    /// exceeded (the next run resumes from the last commit), 5 a timely worker failed,
    /// 1 anything else. Supervisors can tell "fix the config" (do not restart) from "a
    /// dependency is down" (restart with backoff).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) => 2,
            RunError::Postgres(_)
            | RunError::Kafka(_)
            | RunError::Nas(_)
            | RunError::Query(_)
            | RunError::S3(_)
            | RunError::Archive(_) => 3,
            RunError::Backfill(_) => 1,
            RunError::Inference(e) => match e {
                InferenceError::Load { .. } | InferenceError::Shape { .. } => 2,
                InferenceError::NoDevice(_) | InferenceError::Hailo { .. } => 3,
                InferenceError::Run { .. } | InferenceError::Stopped => 1,
            },
            RunError::ShutdownTimeout(_) => 4,
            RunError::Timely(_) => 5,
            RunError::Runtime(_) => 1,
        }
    }
}

/// How often committed aggregates and their checkpoint are written at most.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

async fn connect_with_retry(
    url: &str,
    deadline: Duration,
) -> Result<tokio_postgres::Client, PostgresError> {
    let started = Instant::now();
    loop {
        match postgres::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() < deadline => {
                tracing::warn!(error = %e, "postgres not reachable yet, retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn resume_of(state: &StoredState, partition: i32, pg: bool, parquet: bool) -> Resume {
    Resume {
        postgres: pg
            .then(|| {
                state
                    .offset(sink_names::POSTGRES_RAW, partition)
                    .map(|o| o.next_offset)
            })
            .flatten(),
        parquet: parquet
            .then(|| {
                state
                    .offset(sink_names::PARQUET_RAW, partition)
                    .map(|o| o.next_offset)
            })
            .flatten(),
        window: state
            .offset(sink_names::AGGREGATES, partition)
            .map(|o| (o.next_offset, o.max_event_us)),
    }
}

/// The resume offsets of the enabled raw sinks (None where a sink has stored nothing).
fn raw_resumes(resume: &Resume, pg: bool, parquet: bool) -> Vec<Option<i64>> {
    let mut needed = Vec::new();
    if pg {
        needed.push(resume.postgres);
    }
    if parquet {
        needed.push(resume.parquet);
    }
    needed
}

/// The least of `needed`, or None when any is None.
fn least(needed: impl IntoIterator<Item = Option<i64>>) -> Option<i64> {
    needed
        .into_iter()
        .try_fold(i64::MAX, |acc, o| o.map(|o| acc.min(o)))
}

/// Where a partition's consumer starts: the lowest offset any enabled sink still needs, or the
/// configured start when some sink has nothing stored.
fn start_offset(resume: &Resume, pg: bool, parquet: bool) -> Option<i64> {
    let mut needed = raw_resumes(resume, pg, parquet);
    needed.push(resume.window.map(|w| w.0));
    least(needed)
}

/// The first offset of a partition some enabled raw sink has not stored (None: a raw sink has
/// stored nothing, or none is enabled).
fn stored_position(resume: &Resume, pg: bool, parquet: bool) -> Option<i64> {
    let needed = raw_resumes(resume, pg, parquet);
    if needed.is_empty() {
        return None;
    }
    least(needed)
}

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
/// same dataflow (scoring, windows, raw and aggregate writers) as a streaming run's. Stores no
/// resume positions; runs in one process. Returns when everything is written.
pub fn backfill(config: &Config, range: &BackfillRange) -> Result<(), RunError> {
    run_mode(config, Arc::new(AtomicBool::new(false)), true, Some(range))
}

/// What `primespark backfill` rebuilds and from where.
#[derive(Debug, Clone)]
pub struct BackfillRange {
    /// Where the archive is read.
    pub from: ArchiveFrom,
    /// First event time, microseconds (`None`: the archive's beginning).
    pub since_us: Option<i64>,
    /// End of the range, exclusive (`None`: the archive's end).
    pub until_us: Option<i64>,
}

/// Which copy of the archive a backfill reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArchiveFrom {
    /// `nas.path`.
    Nas,
    /// The bucket (`[s3]`), where tiering moved the older files.
    S3,
    /// Both: the NAS first, then the bucket (a file in both is read once).
    All,
}

/// The tables a stream's backfill rebuilds.
fn backfill_tables(kind: StreamKind) -> (&'static [&'static str], &'static [(&'static str, i64)]) {
    match kind {
        StreamKind::Telemetry => (
            &["device_metrics", "anomaly_scores", "anomalies"],
            &[("device_metrics_1m", 60), ("device_metrics_1h", 3600)],
        ),
        StreamKind::Inference => (
            &["ai_inference_results"],
            &[
                ("inference_stats_1m", 60),
                ("inference_stats_1h", 3600),
                ("routing_stats_1m", 60),
                ("routing_stats_1h", 3600),
            ],
        ),
        StreamKind::Analytics => (
            &["analytics_events"],
            &[
                ("task_stats_1m", 60),
                ("task_stats_1h", 3600),
                ("agent_load_1m", 60),
                ("agent_load_1h", 3600),
                ("api_events_1m", 60),
                ("api_events_1h", 3600),
            ],
        ),
    }
}

fn run_mode(
    config: &Config,
    shutdown: Arc<AtomicBool>,
    handle_signals: bool,
    backfill: Option<&BackfillRange>,
) -> Result<(), RunError> {
    config.validate()?;
    if backfill.is_some() {
        if !config.postgres.enabled {
            return Err(InvalidConfig::new(
                "postgres.enabled",
                "a backfill rebuilds PostgreSQL tables: enable [postgres]",
            )
            .into());
        }
        if config.runtime.processes > 1 {
            return Err(InvalidConfig::new(
                "runtime.processes",
                "a backfill runs in one process: use --workers for parallelism",
            )
            .into());
        }
    }
    // Anomaly scoring: every model is loaded once now, so a bad file fails start-up.
    let scoring = if config.inference.enabled && config.dataflows.telemetry {
        let models = ModelTable::load(&config.inference)?;
        // Asked-for hardware must be there before any worker starts; opened once, shared.
        let primary = scoring::primary_backend(config.inference.backend)?;
        Some((models, config.inference.clone(), primary))
    } else {
        None
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("primespark-io")
        .build()
        .map_err(RunError::Runtime)?;
    let paused = Arc::new(AtomicBool::new(config.runtime.start_paused));
    if handle_signals {
        let flag = shutdown.clone();
        rt.spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: draining");
            flag.store(true, Ordering::SeqCst);
        });
        if config.runtime.start_paused {
            let flag = paused.clone();
            rt.spawn(async move {
                wait_for_resume().await;
                tracing::info!("SIGUSR1: sources resume reading");
                flag.store(false, Ordering::SeqCst);
            });
        }
    }
    if config.runtime.start_paused {
        tracing::warn!("sources start paused: partitions are assigned and their lag reported, nothing is read until SIGUSR1");
    }
    let pg_enabled = config.postgres.enabled;
    // A backfill reads the archive: it never writes it.
    let parquet_enabled = config.nas.enabled && backfill.is_none();
    let archive_stores = match backfill {
        Some(range) => {
            let nas = matches!(range.from, ArchiveFrom::Nas | ArchiveFrom::All)
                .then_some(config.nas.path.as_path());
            let bucket = if matches!(range.from, ArchiveFrom::S3 | ArchiveFrom::All) {
                if !config.s3.enabled {
                    return Err(InvalidConfig::new(
                        "s3.enabled",
                        "backfill --from s3|all reads the bucket: configure and enable [s3]",
                    )
                    .into());
                }
                Some(primespark_connectors::s3::archive_bucket(&config.s3)?)
            } else {
                None
            };
            Arc::new(primespark_connectors::archive::tiers(nas, bucket)?)
        }
        None => Arc::new(primespark_connectors::archive::TieredStore::from_tiers(
            Vec::new(),
        )),
    };
    let backfill_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let workers = config.runtime.workers;
    let process_id = config.runtime.process_id;
    let timely_config = config.runtime.timely()?;
    let owned = |p: i32| owner_process(p, workers, config.runtime.processes) == process_id;
    let lateness_us =
        i64::try_from(config.windows.allowed_lateness.as_micros()).unwrap_or(i64::MAX);

    let mut pg_backend = None;
    if pg_enabled {
        let retention = &config.postgres.config.retention;
        pg_backend = Some(rt.block_on(async {
            let mut client =
                connect_with_retry(&config.postgres.config.url, Duration::from_secs(30)).await?;
            let backend = postgres::migrate(&mut client).await?;
            if backend == postgres::Backend::Timescale && retention.enabled && process_id == 0 {
                postgres::retention::apply_timescale_policies(&client, retention).await?;
            }
            Ok::<_, PostgresError>(backend)
        })?);
    }

    // Direct mode: raw rolls go to the bucket before their offsets are committed.
    let uploader = if config.s3.enabled && config.s3.direct && parquet_enabled {
        tracing::info!(bucket = %config.s3.bucket, prefix = %config.s3.prefix, "raw archive written to object storage directly");
        Some(Arc::new(primespark_connectors::s3::Tierer::new(
            &config.s3,
            &config.nas.path,
            config.tier.after,
        )?))
    } else {
        None
    };

    // One dataflow per enabled stream, each with its own topic, resume state and writers.
    let mut writer_handles = Vec::new();
    let mut plans = Vec::new();
    for kind in config.dataflows.enabled() {
        let dataflow = dataflow_name(kind);
        let topic = match kind {
            StreamKind::Telemetry => config.kafka.topics.telemetry.clone(),
            StreamKind::Inference => config.kafka.topics.inference.clone(),
            StreamKind::Analytics => config.kafka.topics.events.clone(),
        };
        let (state, restored_tasks) = if backfill.is_some() {
            // A backfill starts from nothing: the archive is the whole input.
            (StoredState::default(), Vec::new())
        } else if pg_enabled {
            rt.block_on(async {
                let client = postgres::connect(&config.postgres.config.url).await?;
                let state = postgres::load_state(&client, dataflow, &topic).await?;
                let tasks = if kind == StreamKind::Analytics {
                    postgres::load_task_state(&client, dataflow).await?
                } else {
                    Vec::new()
                };
                Ok::<_, PostgresError>((state, tasks))
            })?
        } else {
            (StoredState::default(), Vec::new())
        };
        if !restored_tasks.is_empty() {
            tracing::info!(
                dataflow,
                tasks = restored_tasks.len(),
                "restored task lifecycle state"
            );
        }
        let committed_watermark_us: EventTime = state
            .committed_watermark_us
            .and_then(|w| u64::try_from(w).ok())
            .unwrap_or(0);
        let (partitions, archived) = match backfill {
            Some(range) => {
                // Records before the range still set the watermark its first records are
                // judged by, and records after it (lower offsets, later times) too: read an hour
                // plus the lateness bounds around it.
                let margin = 3_600_000_000i64
                    .saturating_add(
                        i64::try_from(config.windows.max_out_of_orderness.as_micros())
                            .unwrap_or(i64::MAX),
                    )
                    .saturating_add(lateness_us);
                let from = range
                    .since_us
                    .map_or(i64::MIN, |s| s.saturating_sub(margin));
                let to = range
                    .until_us
                    .map_or(i64::MAX, |u| u.saturating_add(margin));
                let files = rt.block_on(primespark_connectors::archive::list_rolls(
                    &archive_stores,
                    &topic,
                    from,
                    to,
                ))?;
                let partitions: Vec<i32> = files
                    .iter()
                    .map(|f| f.partition)
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                tracing::info!(dataflow, topic = %topic, files = files.len(), partitions = partitions.len(), tiers = ?archive_stores.names(), "backfill: archive listed");
                let (raw, mut aggregates) = backfill_tables(kind);
                let kept: Vec<(&str, i64)>;
                if kind == StreamKind::Analytics && range.since_us.is_some() {
                    // Tasks created before the range are unknown to the join: its tables
                    // (task_stats, agent_load) are rebuilt by full backfills only.
                    tracing::warn!("backfill --since: task_stats and agent_load are left as they are (the lifecycle join needs the archive from its beginning); api_events is rebuilt");
                    kept = aggregates
                        .iter()
                        .copied()
                        .filter(|(t, _)| {
                            !t.starts_with("task_stats") && !t.starts_with("agent_load")
                        })
                        .collect();
                    aggregates = &kept;
                }
                rt.block_on(async {
                    let mut client = postgres::connect(&config.postgres.config.url).await?;
                    postgres::backfill::clear_range(
                        &mut client,
                        postgres::backfill::StreamTables {
                            topic: &topic,
                            raw,
                            aggregates,
                        },
                        range.since_us,
                        range.until_us,
                    )
                    .await
                })?;
                (partitions, Arc::new(files))
            }
            None => (discover_partitions(config, &topic)?, Arc::new(Vec::new())),
        };
        tracing::info!(dataflow, topic = %topic, partitions = partitions.len(), committed_watermark_us, "starting dataflow");

        let parquet_target = if parquet_enabled {
            let mut archive =
                ParquetArchive::new(&config.nas.path, &topic, config.nas.row_group_rows);
            if kind == StreamKind::Telemetry {
                archive = archive.with_scores();
            }
            let committed: HashMap<i32, i64> = state
                .offsets
                .get(sink_names::PARQUET_RAW)
                .map(|v| v.iter().map(|o| (o.partition, o.next_offset)).collect())
                .unwrap_or_default();
            let mut removed = archive.recover(&committed, &owned)?;
            if let Some(bucket) = &uploader {
                let uncommitted =
                    |name: &str| ParquetArchive::uncommitted(name, &committed, &owned);
                removed += rt.block_on(bucket.remove_uncommitted(&archive.dirs(), &uncommitted))?;
            }
            if removed > 0 {
                tracing::info!(
                    dataflow,
                    removed,
                    "removed parquet files of uncommitted rolls"
                );
            }
            Some(ParquetTarget {
                topic: topic.clone(),
                table: match kind {
                    StreamKind::Telemetry => "telemetry_raw",
                    StreamKind::Inference => "inference_raw",
                    StreamKind::Analytics => "analytics_raw",
                },
                archive,
                root: config.nas.path.clone(),
                roll_rows: config.nas.roll_rows,
                roll_bytes: config.nas.roll_bytes,
                roll_interval: config.nas.roll_interval,
                row_group_rows: config.nas.row_group_rows,
                committed,
                upload: uploader.clone(),
            })
        } else {
            None
        };
        let pg_target = pg_enabled.then(|| PgTarget {
            url: config.postgres.config.url.clone(),
            dataflow: dataflow.into(),
            topic: topic.clone(),
            backfill: backfill.map(|r| {
                (
                    r.since_us.unwrap_or(i64::MIN),
                    r.until_us.unwrap_or(i64::MAX),
                )
            }),
        });
        // Dead letters also go to `<topic>.dlq`, same partitioning as the topic.
        let dlq_target = if config.kafka.dead_letter_topics && backfill.is_none() {
            let dlq = kafka::dlq_topic(&topic);
            let n = i32::try_from(partitions.len()).unwrap_or(i32::MAX).max(1);
            rt.block_on(kafka::create_topics(&config.kafka, &[(&dlq, n)]))?;
            Some(DlqTarget {
                topic: topic.clone(),
                producer: kafka::producer(&config.kafka)?,
            })
        } else {
            None
        };
        // Writers: one raw writer per local worker, one aggregate writer.
        let mut raw_txs = Vec::new();
        for _ in 0..workers {
            let (tx, rx) = mpsc::channel(2);
            raw_txs.push(Some(tx));
            writer_handles.push(rt.spawn(raw_writer(
                rx,
                pg_target.clone(),
                parquet_target.clone(),
                dlq_target.clone(),
            )));
        }
        let (agg_tx, agg_rx) = mpsc::channel(4);
        writer_handles.push(rt.spawn(agg_writer(agg_rx, pg_target, parquet_target, lateness_us)));
        // Local workers that read at least one partition of this topic.
        let peers = workers * config.runtime.processes;
        let readers = partitions
            .iter()
            .map(|p| owner_worker(*p, peers))
            .filter(|w| w / workers == process_id)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        crate::ops::source_expected(dataflow, readers);
        plans.push(StreamPlan {
            kind,
            topic,
            state: Arc::new(state),
            committed_watermark_us,
            partitions,
            raw_txs: Arc::new(Mutex::new(raw_txs)),
            agg_tx,
            restored_tasks: Arc::new(restored_tasks),
            archived,
        });
    }

    // SQL and ops endpoint (not for a backfill: a batch job next to the running pipeline).
    let server = if backfill.is_none() {
        let addr = config.query.validate()?;
        // The bucket's tier of the archive too, when there is one: files tiering moved (or
        // direct mode wrote) stay in SQL.
        let bucket = config
            .s3
            .enabled
            .then(|| primespark_connectors::s3::archive_bucket(&config.s3))
            .transpose()?;
        let ctx = query::session(
            &config.nas.path,
            bucket,
            &config.kafka.topics.telemetry,
            &config.kafka.topics.inference,
            &config.kafka.topics.events,
            config.query.memory_limit_mb.saturating_mul(1 << 20),
        )?;
        if pg_enabled {
            // Hot rows from PostgreSQL, older ones from the archive, under the same names.
            rt.block_on(query::catalog::attach_postgres(
                &ctx,
                &config.postgres.config.url,
            ))?;
        }
        if config.query.api_keys.is_empty() {
            tracing::warn!(%addr, "no [[query.api_keys]]: the SQL endpoint is open to local callers as reader");
        }
        let service = Arc::new(query::QueryService::new(ctx, &config.query)?);
        // Both doors serve the same certificate (validated: both paths or neither).
        let tls_files = config
            .query
            .tls_cert
            .as_deref()
            .zip(config.query.tls_key.as_deref());
        if let Some(pg_addr) = &config.query.pg_addr {
            // Validated at start-up: an ip:port.
            let pg_addr: std::net::SocketAddr = pg_addr
                .parse()
                .map_err(|e| InvalidConfig::new("query.pg_addr", format!("{e}")))?;
            let tls = tls_files
                .map(|(cert, key)| {
                    query::pgwire::tls_acceptor(cert, key)
                        .map_err(|e| InvalidConfig::new("query.tls_cert", tls_reason(&e)))
                })
                .transpose()?;
            let backend: Arc<dyn query::pgwire::SqlBackend> =
                Arc::new(query::service::WireBackend(service.clone()));
            let stop = shutdown.clone();
            rt.spawn(async move {
                let served = query::pgwire::serve(pg_addr, backend, tls, async move {
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
                .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "postgres wire endpoint failed");
                }
            });
        }
        let router =
            query::router(service, config.query.max_body_bytes).merge(crate::ops::routes());
        let server_shutdown = shutdown.clone();
        let http_tls = tls_files
            .map(|(cert, key)| {
                query::tls::http_acceptor(cert, key)
                    .map_err(|e| InvalidConfig::new("query.tls_cert", tls_reason(&e)))
            })
            .transpose()?;
        Some(rt.spawn(query::serve(addr, router, http_tls, async move {
            while !server_shutdown.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })))
    } else {
        None
    };

    // Cold tier: NAS files older than tier.after move to the bucket, on the I/O runtime.
    let tier_task = if config.s3.enabled && backfill.is_none() {
        let tierer = primespark_connectors::s3::Tierer::new(
            &config.s3,
            &config.nas.path,
            config.tier.after,
        )?;
        let (interval, stop) = (config.tier.interval, shutdown.clone());
        tracing::info!(bucket = %config.s3.bucket, prefix = %config.s3.prefix, after = ?config.tier.after, "tiering the NAS to object storage");
        Some(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let report = tierer.tier_once(std::time::SystemTime::now()).await;
                if report.moved + report.failed > 0 {
                    tracing::info!(
                        moved = report.moved,
                        bytes = report.bytes,
                        failed = report.failed,
                        "tiering pass"
                    );
                }
                let until = Instant::now() + interval;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }))
    } else {
        None
    };

    // Retention on plain PostgreSQL: the pipeline deletes expired rows itself (process 0
    // only; on TimescaleDB the policies installed above do it). Dead letters and late events
    // are plain tables on both backends.
    let retention_task = if pg_backend.is_some()
        && backfill.is_none()
        && config.postgres.config.retention.enabled
        && process_id == 0
    {
        let (url, retention, stop) = (
            config.postgres.config.url.clone(),
            config.postgres.config.retention.clone(),
            shutdown.clone(),
        );
        let plain = pg_backend == Some(postgres::Backend::Plain);
        Some(rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let pass = async {
                    let client = postgres::connect(&url).await?;
                    // With TimescaleDB the hypertables have policies: only plain tables left.
                    postgres::retention::delete_expired(&client, &retention, !plain).await
                };
                if let Err(e) = pass.await {
                    tracing::warn!(error = %e, "retention pass failed; retried at the next interval");
                }
                let until = Instant::now() + retention.interval;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }))
    } else {
        None
    };

    let kafka_cfg = config.kafka.clone();
    let flush = FlushPolicy {
        rows: config.postgres.config.flush_rows,
        interval: config.postgres.config.flush_interval,
    };
    let windows = config.windows.clone();
    let limits = DecodeLimits {
        max_message_bytes: config.runtime.max_message_bytes,
    };
    let worker_shutdown = shutdown.clone();
    let handle = rt.handle().clone();
    let backfill_spec = backfill.map(|r| crate::source::Backfill {
        since_us: r.since_us.unwrap_or(i64::MIN),
        until_us: r.until_us.unwrap_or(i64::MAX),
        failure: backfill_failure.clone(),
    });
    // Set by worker 0 once its last windows are handed off: every worker's data is in by then.
    let backfill_done = Arc::new(AtomicBool::new(false));
    let guards = timely::execute(timely_config, move |worker| -> Result<(), String> {
        let index = worker.index();
        let peers = worker.peers();
        let mut all_drained = Vec::new();
        for plan in &plans {
            let dataflow = dataflow_name(plan.kind);
            let topic = &plan.topic;
            let mine: BTreeMap<i32, Resume> = plan
                .partitions
                .iter()
                .filter(|p| owner_worker(**p, peers) == index)
                .map(|p| (*p, resume_of(&plan.state, *p, pg_enabled, parquet_enabled)))
                .collect();
            let reader = if mine.is_empty() {
                None
            } else if backfill_spec.is_some() {
                let files = plan
                    .archived
                    .iter()
                    .filter(|f| mine.contains_key(&f.partition))
                    .cloned()
                    .collect();
                Some(Feed::Archive(ArchiveReader::spawn(
                    &handle,
                    archive_stores.clone(),
                    files,
                    mine.keys().copied().collect(),
                )))
            } else {
                let reader = kafka::reader(&kafka_cfg, topic, &format!("primespark-{dataflow}-{index}"))
                    .map_err(|e| e.to_string())?;
                let assignment: Vec<(i32, Option<i64>)> = mine
                    .iter()
                    .map(|(p, r)| (*p, start_offset(r, pg_enabled, parquet_enabled)))
                    .collect();
                for (p, start) in &assignment {
                    tracing::info!(dataflow, topic = %topic, partition = p, start = ?start, worker = index, "assigned partition");
                }
                reader.assign(&assignment, kafka_cfg.start).map_err(|e| e.to_string())?;
                if paused.load(Ordering::Relaxed) {
                    // Lag counts records not stored yet: from the raw sinks' resume offsets, not
                    // from the earlier offset the windows' replay starts at.
                    let stored: Vec<(i32, Option<i64>)> = mine
                        .iter()
                        .map(|(p, r)| (*p, stored_position(r, pg_enabled, parquet_enabled).or_else(|| start_offset(r, pg_enabled, parquet_enabled))))
                        .collect();
                    kafka::watch_paused_lag(&kafka_cfg, topic, stored, Duration::from_secs(2), paused.clone())
                        .map_err(|e| e.to_string())?;
                }
                crate::ops::source_assigned(dataflow);
                Some(Feed::Kafka(reader))
            };
            let restored: Vec<_> = plan.state.offsets.get(sink_names::AGGREGATES).cloned().unwrap_or_default();
            let tracker = CheckpointTracker::new(WINDOW_US, restored).with_allowed_lateness(lateness_us);
            let raw_tx = plan
                .raw_txs
                .lock()
                .map_err(|_| "writer registry poisoned".to_owned())?
                .get_mut(index - process_id * workers)
                .and_then(Option::take)
                .ok_or_else(|| format!("no raw writer for worker {index}"))?;
            let drained = Drained::default();
            let spec = SourceSpec {
                topic: topic.clone(),
                kind: plan.kind,
                partitions: mine,
                postgres_enabled: pg_enabled,
                parquet_enabled,
                out_of_orderness_us: i64::try_from(windows.max_out_of_orderness.as_micros()).unwrap_or(i64::MAX),
                allowed_lateness_us: lateness_us,
                width_us: WINDOW_US,
                idle_timeout: windows.idle_timeout,
                committed_watermark_us: plan.committed_watermark_us,
                limits,
                shutdown: worker_shutdown.clone(),
                pressure: Rc::new(Cell::new(false)),
                paused: paused.clone(),
                backfill: backfill_spec.clone(),
            };
            let agg_tx = plan.agg_tx.clone();
            // Every process loaded the whole task state: each worker takes its share, the
            // join exchanges it by task id.
            let restored_tasks: Vec<_> = plan
                .restored_tasks
                .iter()
                .enumerate()
                .filter(|(i, _)| i % peers == index)
                .map(|(_, t)| t.clone())
                .collect();
            let scoring_spec = match (&scoring, plan.kind) {
                (Some((models, inference, primary)), StreamKind::Telemetry) => Some(ScoringSpec {
                    models: models.clone(),
                    config: inference.clone(),
                    primary: primary.as_ref().map(|make| make()),
                    fallback: Box::new(CpuBackend),
                }),
                _ => None,
            };
            worker.dataflow::<EventTime, _, _>(|scope| {
                dataflow::build(scope, spec, reader, tracker, raw_tx, agg_tx, flush, COMMIT_INTERVAL, &drained, restored_tasks, scoring_spec);
            });
            all_drained.push(drained);
        }
        if backfill_spec.is_some() {
            // Worker 0 commits last (every window goes through it); the others keep stepping
            // until then, or their part of the exchanges would be gone.
            loop {
                let drained = all_drained.iter().all(Drained::all);
                if index == 0 && drained {
                    backfill_done.store(true, Ordering::SeqCst);
                }
                if drained && backfill_done.load(Ordering::SeqCst) {
                    break;
                }
                if worker_shutdown.load(Ordering::Relaxed) {
                    // Interrupted: what was handed off is written; a rerun clears and redoes
                    // the range.
                    break;
                }
                worker.step_or_park(Some(Duration::from_millis(20)));
            }
        } else {
            while !(worker_shutdown.load(Ordering::Relaxed) && all_drained.iter().all(Drained::all)) {
                worker.step_or_park(Some(Duration::from_millis(50)));
            }
        }
        // Open windows are deliberately not completed: the next run replays them.
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
        Ok(())
    })
    .map_err(RunError::Timely)?;
    let mut failure = None;
    for result in guards.join() {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                tracing::error!(error = %e, "worker failed");
                shutdown.store(true, Ordering::SeqCst);
                failure = Some(e);
            }
        }
    }
    let interrupted = backfill.is_some() && shutdown.load(Ordering::SeqCst);
    // The worker closure (and with it every sender) is gone: writers drain and exit.
    let grace = config.runtime.shutdown_grace;
    let finished = rt.block_on(async {
        tokio::time::timeout(grace, async {
            for h in writer_handles {
                let _ = h.await;
            }
        })
        .await
    });
    shutdown.store(true, Ordering::SeqCst);
    if let Some(server) = server {
        let _ = rt.block_on(server);
    }
    if let Some(task) = tier_task {
        // A pass in flight finishes its current file at most; files are moved whole or not.
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await });
    }
    if let Some(task) = retention_task {
        // Deletes are batched and idempotent: a pass cut short continues next run.
        task.abort();
        let _ = rt.block_on(task);
    }
    if let Some(e) = failure {
        return Err(RunError::Timely(e));
    }
    if let Some(e) = backfill_failure.lock().ok().and_then(|mut f| f.take()) {
        return Err(RunError::Backfill(e));
    }
    if interrupted {
        return Err(RunError::Backfill("interrupted".into()));
    }
    finished.map_err(|_| RunError::ShutdownTimeout(grace))?;
    tracing::info!("pipeline stopped cleanly");
    Ok(())
}

/// Everything a worker needs to build one stream's dataflow.
struct StreamPlan {
    kind: StreamKind,
    topic: String,
    state: Arc<StoredState>,
    committed_watermark_us: EventTime,
    partitions: Vec<i32>,
    raw_txs: Arc<Mutex<Vec<Option<mpsc::Sender<crate::sinks::RawBatch>>>>>,
    agg_tx: mpsc::Sender<crate::sinks::AggCommit>,
    /// `task_state` of the analytics dataflow (empty for the others).
    restored_tasks: Arc<Vec<primespark_schemas::analytics::TaskEvent>>,
    /// A backfill's archive files of this topic.
    archived: Arc<Vec<primespark_connectors::archive::RollFile>>,
}

/// A TLS error for a config message: what is unusable and why (the source is the reason the
/// operator needs; `Display` alone names only the files).
fn tls_reason(e: &dyn std::error::Error) -> String {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

/// The global worker that reads `partition` among `peers` workers: `p mod peers`.
pub fn owner_worker(partition: i32, peers: usize) -> usize {
    partition.unsigned_abs() as usize % peers.max(1)
}

/// The process whose workers read `partition`: process `i` runs global workers
/// `i * workers .. (i + 1) * workers`.
pub fn owner_process(partition: i32, workers: usize, processes: usize) -> usize {
    owner_worker(partition, workers * processes) / workers.max(1)
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
