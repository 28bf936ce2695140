//! The plan of a run, from its configuration alone (no I/O): which streams run, where each
//! reads, which sinks each gets, and the settings every worker shares. `check-config` can
//! print it; start-up carries it out.

use std::time::Duration;

use primespark_connectors::sink::registry::{raw_sink_names, SinkSettings, StreamScope};
use primespark_connectors::InvalidConfig;
use primespark_operators::sink::FlushPolicy;
use primespark_schemas::streams::StreamDef;
use primespark_schemas::time::NaiveZone;
use primespark_schemas::DecodeLimits;

use crate::config::Config;
use crate::run::{ArchiveFrom, BackfillRange};

/// How often committed aggregates and their checkpoint are written at most.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

/// One stream of the run.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    /// The stream's entry in the table of streams.
    pub def: &'static StreamDef,
    /// The topic it reads.
    pub topic: String,
    /// Its raw sinks, in write order (their ids follow this order).
    pub raw_sinks: Vec<&'static str>,
    /// The zone its naive timestamps are read in.
    pub naive_zone: NaiveZone,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The enabled streams, in the order of the table of streams.
    pub streams: Vec<StreamPlan>,
    /// What the sinks are configured with.
    pub sinks: SinkSettings,
    /// A backfill instead of a streaming run.
    pub backfill: Option<BackfillRange>,
    /// When the raw sink operator hands a batch off.
    pub raw_flush: FlushPolicy,
    /// When the commit operator commits.
    pub commit: FlushPolicy,
    /// Decode limits.
    pub limits: DecodeLimits,
}

impl Plan {
    /// The plan of `config` (validated first), for a streaming run or a backfill of `range`.
    pub fn of(config: &Config, backfill: Option<&BackfillRange>) -> Result<Self, InvalidConfig> {
        config.validate()?;
        if let Some(range) = backfill {
            check_backfill(config, range)?;
        }
        let sinks = SinkSettings {
            postgres: config
                .postgres
                .enabled
                .then(|| config.postgres.config.clone()),
            nas: config.nas.enabled.then(|| config.nas.clone()),
            s3: config.s3.enabled.then(|| config.s3.clone()),
            tier_after: config.tier.after,
            kafka: config.kafka.clone(),
            allowed_lateness_us: micros(config.windows.allowed_lateness),
            routes: config
                .routes
                .resolved(config.postgres.enabled, config.nas.enabled),
        };
        let streams = config
            .dataflows
            .enabled()
            .into_iter()
            .map(|kind| {
                let scope = StreamScope {
                    stream: kind.def(),
                    backfill: backfill.is_some(),
                };
                let topic = config.kafka.topics.of(kind);
                Ok(StreamPlan {
                    def: kind.def(),
                    topic: topic.to_owned(),
                    raw_sinks: raw_sink_names(&sinks, &scope),
                    naive_zone: config.windows.naive_zone_of(kind, topic)?,
                })
            })
            .collect::<Result<_, InvalidConfig>>()?;
        let flush_rows = config.postgres.config.flush_rows;
        Ok(Self {
            streams,
            sinks,
            backfill: backfill.cloned(),
            raw_flush: FlushPolicy {
                rows: flush_rows,
                interval: config.postgres.config.flush_interval,
            },
            commit: FlushPolicy {
                rows: flush_rows,
                interval: COMMIT_INTERVAL,
            },
            limits: DecodeLimits {
                max_message_bytes: config.runtime.max_message_bytes,
                ..DecodeLimits::default()
            },
        })
    }
}

/// What a backfill needs of the configuration.
fn check_backfill(config: &Config, range: &BackfillRange) -> Result<(), InvalidConfig> {
    if !config.postgres.enabled {
        return Err(InvalidConfig::new(
            "postgres.enabled",
            "a backfill rebuilds PostgreSQL tables: enable [postgres]",
        ));
    }
    if config.runtime.processes > 1 {
        return Err(InvalidConfig::new(
            "runtime.processes",
            "a backfill runs in one process: use --workers for parallelism",
        ));
    }
    if matches!(range.from, ArchiveFrom::S3 | ArchiveFrom::All) && !config.s3.enabled {
        return Err(InvalidConfig::new(
            "s3.enabled",
            "backfill --from s3|all reads the bucket: configure and enable [s3]",
        ));
    }
    Ok(())
}

/// A duration in microseconds, saturating.
pub fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_plan_runs_every_stream_into_postgres_and_the_archive() {
        let plan = Plan::of(&Config::default(), None).unwrap();
        let names: Vec<&str> = plan.streams.iter().map(|s| s.def.name).collect();
        assert_eq!(names, ["telemetry", "inference", "analytics"]);
        assert_eq!(
            plan.streams[0].raw_sinks,
            ["dead_letter_topic", "postgres_raw", "parquet_raw"]
        );
        assert_eq!(plan.streams[0].topic, "edge.telemetry");
    }

    #[test]
    fn a_backfill_writes_postgres_only() {
        let range = BackfillRange {
            from: ArchiveFrom::Nas,
            since_us: None,
            until_us: None,
        };
        let plan = Plan::of(&Config::default(), Some(&range)).unwrap();
        assert_eq!(plan.streams[0].raw_sinks, ["postgres_raw"]);
        let mut config = Config::default();
        config.postgres.enabled = false;
        let e = Plan::of(&config, Some(&range)).unwrap_err();
        assert_eq!(e.key, "postgres.enabled");
    }
}
