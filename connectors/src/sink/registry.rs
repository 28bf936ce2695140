//! The one place that knows which sinks exist: for a stream on a worker, it builds the sinks the
//! configuration asks for, gives each its [`SinkId`], and returns them with their health checks.
//! A new sink is one line in [`RAW_SINKS`] or [`AGGREGATE_SINKS`].

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use primespark_schemas::streams::{StreamDef, StreamKind};

use super::{BoxAggSink, BoxRawSink, Domain, Healthcheck, SinkError, SinkId};
use crate::kafka::KafkaConfig;
use crate::nas::NasConfig;
use crate::postgres::{PostgresConfig, StoredState};
use crate::s3::S3Config;

/// What the sinks of a run are configured with (the enabled sections only).
#[derive(Debug, Clone)]
pub struct SinkSettings {
    /// `[postgres]`, when enabled.
    pub postgres: Option<PostgresConfig>,
    /// `[nas]`, when enabled.
    pub nas: Option<NasConfig>,
    /// `[s3]`, when enabled.
    pub s3: Option<S3Config>,
    /// `tier.after` (the uploader of direct mode is also a tierer).
    pub tier_after: Duration,
    /// `[kafka]` (the dead-letter topic's producer).
    pub kafka: KafkaConfig,
    /// `windows.allowed_lateness`, microseconds: how long aggregate buckets stay rewritable.
    pub allowed_lateness_us: i64,
    /// `[routes]`: streams whose rows skip an enabled sink (the others get every one).
    pub routes: Vec<(StreamKind, Route)>,
}

/// Which of the enabled sinks get one stream's rows (`[routes.<stream>]`); everything by
/// default. Dead letters, late events, anomalies and the stream's positions go to PostgreSQL
/// whenever it is enabled, whatever the route: they are the pipeline's own record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Raw rows (and anomaly scores) into PostgreSQL's raw tables.
    pub raw_postgres: bool,
    /// Raw rows into the Parquet archive (the NAS, or the bucket in direct mode).
    pub raw_archive: bool,
    /// Window rows into PostgreSQL's aggregate tables (which also hold the windows' position).
    pub aggregates_postgres: bool,
    /// Window rows into the archive's aggregate files.
    pub aggregates_archive: bool,
}

impl Route {
    /// The PostgreSQL tables of `stream` this route leaves empty while the archive holds their
    /// rows (a route of enabled sinks, as [`SinkSettings::route`] gives): SQL reads these from
    /// the archive alone.
    pub fn archive_only_tables(&self, stream: &StreamDef) -> Vec<&'static str> {
        let mut tables = Vec::new();
        if !self.raw_postgres && self.raw_archive {
            tables.extend(
                stream
                    .raw_tables
                    .iter()
                    .filter(|t| t.archive.is_some())
                    .map(|t| t.name),
            );
        }
        if !self.aggregates_postgres && self.aggregates_archive {
            tables.extend(stream.aggregate_tables().map(|(_, table)| table));
        }
        tables
    }
}

impl Default for Route {
    fn default() -> Self {
        Self {
            raw_postgres: true,
            raw_archive: true,
            aggregates_postgres: true,
            aggregates_archive: true,
        }
    }
}

impl SinkSettings {
    /// The route of `stream`.
    pub fn route(&self, stream: StreamKind) -> Route {
        self.routes
            .iter()
            .find(|(kind, _)| *kind == stream)
            .map(|(_, route)| *route)
            .unwrap_or_default()
    }

    /// Whether the raw archive goes straight to the bucket (`s3.direct`).
    pub fn direct(&self) -> bool {
        self.nas.is_some() && self.s3.as_ref().is_some_and(|s| s.direct)
    }
}

/// The stream, worker and stored state sinks are built for.
#[derive(Debug, Clone)]
pub struct SinkContext {
    /// The stream.
    pub stream: &'static StreamDef,
    /// Its topic.
    pub topic: String,
    /// Global index of the worker whose raw sinks these are (0 for aggregate sinks).
    pub worker: usize,
    /// The partitions this worker reads (recovery touches only these).
    pub partitions: Vec<i32>,
    /// How many partitions the topic has (the dead-letter topic gets as many).
    pub topic_partitions: usize,
    /// What earlier runs stored (`source_offsets`, `dataflow_state`); empty without PostgreSQL.
    pub stored: Arc<StoredState>,
    /// A backfill of event times `[since, until)`: sinks store no positions, and only
    /// PostgreSQL is written.
    pub backfill: Option<(i64, i64)>,
    /// The writer lease this process writes under ([`crate::sink::fence`]).
    pub fence: crate::sink::fence::Fence,
}

impl SinkContext {
    /// Whether `partition` is read by this worker.
    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.contains(&partition)
    }

    /// What decides which sinks it gets.
    pub fn scope(&self) -> StreamScope {
        StreamScope {
            stream: self.stream,
            backfill: self.backfill.is_some(),
        }
    }
}

/// What decides which sinks a stream gets (besides the settings): known before any I/O.
#[derive(Debug, Clone, Copy)]
pub struct StreamScope {
    /// The stream.
    pub stream: &'static StreamDef,
    /// Whether this is a backfill (PostgreSQL only, no positions).
    pub backfill: bool,
}

/// A sink and its health check.
pub type Built<S> = (S, Healthcheck);

/// How a raw sink kind is built: with its settings, context and id.
pub type BuildRaw = for<'a> fn(
    &'a SinkSettings,
    &'a SinkContext,
    SinkId,
) -> BoxFuture<'a, Result<Built<BoxRawSink>, SinkError>>;

/// How an aggregate sink kind is built.
pub type BuildAgg = for<'a> fn(
    &'a SinkSettings,
    &'a SinkContext,
) -> BoxFuture<'a, Result<Built<BoxAggSink>, SinkError>>;

/// One kind of raw sink: when the configuration wants it and how to build it.
pub struct RawSinkKind {
    /// Its name (in `source_offsets` and logs).
    pub name: &'static str,
    /// Whether this run wants it for this stream.
    pub wanted: fn(&SinkSettings, &StreamScope) -> bool,
    /// Builds it with its id.
    pub build: BuildRaw,
}

/// One kind of aggregate sink.
pub struct AggSinkKind {
    /// Its name.
    pub name: &'static str,
    /// Whether this run wants it for this stream.
    pub wanted: fn(&SinkSettings, &StreamScope) -> bool,
    /// Builds it.
    pub build: BuildAgg,
}

/// Every raw sink, in the order a batch is written to them: the dead-letter topic first (a
/// letter is published before any sink commits the offset it covers), then PostgreSQL, then
/// the archive (on the NAS, or straight to the bucket).
pub const RAW_SINKS: &[RawSinkKind] = &[
    crate::kafka::DEAD_LETTER_TOPIC,
    crate::postgres::RAW_ROWS,
    crate::nas::RAW_ROLLS,
    crate::s3::DIRECT_ROLLS,
];

/// Every aggregate sink, in write order: the files before the PostgreSQL transaction whose
/// committed watermark makes them final.
pub const AGGREGATE_SINKS: &[AggSinkKind] =
    &[crate::nas::AGGREGATE_FILES, crate::postgres::AGGREGATE_ROWS];

/// Builds the raw sinks `settings` asks for, ids in registry order.
pub async fn raw_sinks(
    settings: &SinkSettings,
    ctx: &SinkContext,
) -> Result<Vec<Built<BoxRawSink>>, SinkError> {
    let mut built = Vec::new();
    let scope = ctx.scope();
    for kind in RAW_SINKS.iter().filter(|k| (k.wanted)(settings, &scope)) {
        let id = SinkId::raw(built.len()).ok_or_else(|| {
            SinkError::fatal(Domain::Internal, "more raw sinks than a SinkSet holds")
        })?;
        built.push((kind.build)(settings, ctx, id).await?);
    }
    Ok(built)
}

/// The names of the raw sinks `settings` asks for, in id order (without building them).
pub fn raw_sink_names(settings: &SinkSettings, scope: &StreamScope) -> Vec<&'static str> {
    RAW_SINKS
        .iter()
        .filter(|k| (k.wanted)(settings, scope))
        .map(|k| k.name)
        .collect()
}

/// Builds the aggregate sinks `settings` asks for.
pub async fn aggregate_sinks(
    settings: &SinkSettings,
    ctx: &SinkContext,
) -> Result<Vec<Built<BoxAggSink>>, SinkError> {
    let mut built = Vec::new();
    let scope = ctx.scope();
    for kind in AGGREGATE_SINKS
        .iter()
        .filter(|k| (k.wanted)(settings, &scope))
    {
        built.push((kind.build)(settings, ctx).await?);
    }
    Ok(built)
}

/// What earlier runs of `stream` reading `topic` stored (positions, committed watermark) and,
/// for streams with a lifecycle join, the join's state; nothing without PostgreSQL, and no
/// windows' state when the stream's aggregates are routed away from it.
pub async fn stored_state(
    settings: &SinkSettings,
    stream: &StreamDef,
    topic: &str,
) -> Result<(StoredState, Vec<primespark_schemas::analytics::TaskEvent>), SinkError> {
    let Some(pg) = &settings.postgres else {
        return Ok(Default::default());
    };
    let load = async {
        let client = crate::postgres::connect(&pg.url).await?;
        let state = crate::postgres::load_state(&client, stream.name, topic).await?;
        let tasks = if stream.kind == primespark_schemas::streams::StreamKind::Analytics {
            crate::postgres::load_task_state(&client, stream.name).await?
        } else {
            Vec::new()
        };
        Ok::<_, crate::postgres::PostgresError>((state, tasks))
    };
    let (mut state, mut tasks) = load.await.map_err(super::Classify::into_sink_error)?;
    if !settings.route(stream.kind).aggregates_postgres {
        // The windows' state is the aggregate sink's: one an earlier route left behind would
        // be stale by the first window this run writes elsewhere.
        state.committed_watermark_us = None;
        tasks.clear();
    }
    Ok((state, tasks))
}
