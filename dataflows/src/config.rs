//! The pipeline's configuration: TOML, then `PRIMESPARK_<SECTION>__<KEY>` environment overrides,
//! then pure validation (no I/O) that names the wrong key.

use std::path::Path;
use std::time::Duration;

use primespark_connectors::config::duration;
use primespark_connectors::kafka::KafkaConfig;
use primespark_connectors::nas::NasConfig;
use primespark_connectors::postgres::PostgresConfig;
use primespark_connectors::query::QueryConfig;
use primespark_connectors::s3::{S3Config, TierConfig};
use primespark_connectors::sink::registry::Route;
use primespark_connectors::InvalidConfig;
use primespark_operators::decode::StreamKind;
use primespark_schemas::time::NaiveZone;
use serde::{Deserialize, Serialize};

/// Configuration errors, each naming the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML (after environment overrides) does not fit the schema.
    #[error("{origin}: {message}")]
    Parse {
        /// File name or `environment`.
        origin: String,
        /// What is wrong, with the key.
        message: String,
    },
    /// A value is invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
}

/// `[windows]`: event-time settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowsConfig {
    /// How far out of order events may arrive: the watermark trails the highest event time seen
    /// by this much. Default `5s`.
    #[serde(default = "default_ooo", with = "duration")]
    pub max_out_of_orderness: Duration,
    /// A partition that delivered nothing for this long stops holding the watermark back.
    /// Default `30s`.
    #[serde(default = "default_idle", with = "duration")]
    pub idle_timeout: Duration,
    /// How far behind the watermark an event may arrive and still update its (already
    /// written) window; later events go to the raw tables and `late_events` only. Default `0s`.
    #[serde(default, with = "duration")]
    pub allowed_lateness: Duration,
    /// An event stamped further ahead of the pipeline's wall clock than this is a dead letter
    /// (reason `future_timestamp`) and never moves a watermark. Default `5m`.
    #[serde(default = "default_max_future", with = "duration")]
    pub max_future: Duration,
    /// The zone a timestamp without an offset is read in: `UTC` (default) or an IANA name such
    /// as `Europe/Berlin` (the platform's Python producers send naive local time).
    #[serde(default = "default_zone")]
    pub naive_timezone: String,
    /// Per-stream zones overriding `naive_timezone`, keyed by stream (`telemetry`,
    /// `inference`, `analytics`) or by its topic name.
    #[serde(default)]
    pub naive_timezones: std::collections::BTreeMap<String, String>,
}

fn default_ooo() -> Duration {
    Duration::from_secs(5)
}
fn default_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_max_future() -> Duration {
    Duration::from_secs(300)
}
fn default_zone() -> String {
    "UTC".into()
}

impl Default for WindowsConfig {
    fn default() -> Self {
        Self {
            max_out_of_orderness: default_ooo(),
            idle_timeout: default_idle(),
            allowed_lateness: Duration::ZERO,
            max_future: default_max_future(),
            naive_timezone: default_zone(),
            naive_timezones: std::collections::BTreeMap::new(),
        }
    }
}

impl WindowsConfig {
    /// The zone naive timestamps of `kind`'s stream (read from `topic`) are read in.
    pub fn naive_zone_of(&self, kind: StreamKind, topic: &str) -> Result<NaiveZone, InvalidConfig> {
        let (key, name) = match self
            .naive_timezones
            .get(kind.name())
            .map(|z| (format!("windows.naive_timezones.{}", kind.name()), z))
            .or_else(|| {
                self.naive_timezones
                    .get(topic)
                    .map(|z| (format!("windows.naive_timezones.\"{topic}\""), z))
            }) {
            Some(found) => found,
            None => ("windows.naive_timezone".to_owned(), &self.naive_timezone),
        };
        name.parse().map_err(|e: String| InvalidConfig::new(key, e))
    }

    fn validate(
        &self,
        topics: &primespark_connectors::kafka::TopicsConfig,
    ) -> Result<(), InvalidConfig> {
        if self.max_out_of_orderness > Duration::from_secs(3600) {
            return Err(InvalidConfig::new(
                "windows.max_out_of_orderness",
                "must be at most 1h",
            ));
        }
        if self.allowed_lateness > Duration::from_secs(24 * 3600) {
            return Err(InvalidConfig::new(
                "windows.allowed_lateness",
                "must be at most 24h (windows and their replay range stay open that long)",
            ));
        }
        if self.idle_timeout.is_zero() {
            return Err(InvalidConfig::new(
                "windows.idle_timeout",
                "must be positive",
            ));
        }
        if self.max_future.is_zero() {
            return Err(InvalidConfig::new(
                "windows.max_future",
                "must be positive (device clocks are never exactly right; a few minutes is usual)",
            ));
        }
        self.naive_timezone
            .parse::<NaiveZone>()
            .map_err(|e| InvalidConfig::new("windows.naive_timezone", e))?;
        for key in self.naive_timezones.keys() {
            let known = StreamKind::ALL
                .iter()
                .any(|k| k.name() == key || topics.of(*k) == key);
            if !known {
                return Err(InvalidConfig::new(
                    format!("windows.naive_timezones.{key}"),
                    "is neither a stream (telemetry, inference, analytics) nor one of kafka.topics",
                ));
            }
        }
        for kind in StreamKind::ALL {
            self.naive_zone_of(kind, topics.of(kind))?;
        }
        Ok(())
    }
}

/// `[runtime]`: timely workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Timely worker threads in this process. Default 1.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Largest accepted message, bytes. Default 1048576.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How long a shutdown may take to flush sinks before giving up. Default `30s`.
    #[serde(default = "default_grace", with = "duration")]
    pub shutdown_grace: Duration,
    /// Processes in the timely cluster (each runs `workers` threads). Default 1.
    #[serde(default = "default_processes")]
    pub processes: usize,
    /// This process's index in the cluster, `0..processes`. Default 0.
    #[serde(default)]
    pub process_id: usize,
    /// File with one `host:port` per line, one line per process in process-id order: where
    /// the processes of the cluster reach each other. Required when `processes > 1` unless
    /// `addresses` is set.
    #[serde(default)]
    pub hostfile: Option<std::path::PathBuf>,
    /// The same as `hostfile`, inline. Default empty.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Start with the sources paused: partitions are assigned and their consumer lag is
    /// reported, nothing is read until SIGUSR1 (`run --paused`). Default false.
    #[serde(default)]
    pub start_paused: bool,
}

fn default_processes() -> usize {
    1
}

fn default_workers() -> usize {
    1
}
fn default_max_message_bytes() -> usize {
    1024 * 1024
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            workers: default_workers(),
            max_message_bytes: default_max_message_bytes(),
            shutdown_grace: default_grace(),
            processes: default_processes(),
            process_id: 0,
            hostfile: None,
            addresses: Vec::new(),
            start_paused: false,
        }
    }
}

/// `[dataflows]`: which streams run. A disabled stream's topic is not read (and need not exist).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataflowsConfig {
    /// `edge.telemetry` -> `device_metrics`, `device_metrics_1m`. Default true.
    #[serde(default = "default_true")]
    pub telemetry: bool,
    /// `edge.ai.inference` -> `ai_inference_results`, `inference_stats_1m`, `routing_stats_1m`.
    /// Default true.
    #[serde(default = "default_true")]
    pub inference: bool,
    /// `analytics.events` -> `analytics_events`, `task_stats_1m`, `agent_load_1m`,
    /// `api_events_1m`. Default true.
    #[serde(default = "default_true")]
    pub analytics: bool,
}

impl Default for DataflowsConfig {
    fn default() -> Self {
        Self {
            telemetry: true,
            inference: true,
            analytics: true,
        }
    }
}

impl DataflowsConfig {
    /// The enabled streams, in a fixed order.
    pub fn enabled(&self) -> Vec<StreamKind> {
        let mut kinds = Vec::new();
        if self.telemetry {
            kinds.push(StreamKind::Telemetry);
        }
        if self.inference {
            kinds.push(StreamKind::Inference);
        }
        if self.analytics {
            kinds.push(StreamKind::Analytics);
        }
        kinds
    }
}

/// `[routes]`: which of the enabled sinks get each stream's rows. A stream not listed, or a
/// list left out, gets every enabled sink (the default of earlier releases):
///
/// ```toml
/// [routes.telemetry]
/// raw = ["parquet"]                    # raw rows to the archive only
/// aggregates = ["postgres", "parquet"]
/// ```
///
/// `postgres` is PostgreSQL's raw or aggregate tables; `parquet` the archive (the NAS, or the
/// bucket with `s3.direct`; files tier to `[s3]` either way). SQL's unified tables then answer
/// the stream's raw rows from the archive alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoutesConfig {
    /// `edge.telemetry` (raw: `device_metrics` and `anomaly_scores`).
    #[serde(default)]
    pub telemetry: StreamRoutes,
    /// `edge.ai.inference` (raw: `ai_inference_results`).
    #[serde(default)]
    pub inference: StreamRoutes,
    /// `analytics.events` (raw: `analytics_events`).
    #[serde(default)]
    pub analytics: StreamRoutes,
}

/// One stream's `[routes.<stream>]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamRoutes {
    /// Sinks of its raw rows. Default: every enabled sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Vec<RouteSink>>,
    /// Sinks of its window rows. Default: every enabled sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregates: Option<Vec<RouteSink>>,
}

/// A sink a route can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteSink {
    /// PostgreSQL (`[postgres]`).
    Postgres,
    /// The Parquet archive (`[nas]`, and `[s3]` behind it).
    Parquet,
}

impl RouteSink {
    fn key(self) -> &'static str {
        match self {
            RouteSink::Postgres => "postgres",
            RouteSink::Parquet => "parquet",
        }
    }
}

impl RoutesConfig {
    fn streams(&self) -> [(StreamKind, &'static str, &StreamRoutes); 3] {
        [
            (StreamKind::Telemetry, "telemetry", &self.telemetry),
            (StreamKind::Inference, "inference", &self.inference),
            (StreamKind::Analytics, "analytics", &self.analytics),
        ]
    }

    /// Checks every list: known sinks, each once, each enabled, and something stored.
    fn validate(&self, postgres: bool, nas: bool) -> Result<(), InvalidConfig> {
        for (_, name, routes) in self.streams() {
            for (field, list) in [("raw", &routes.raw), ("aggregates", &routes.aggregates)] {
                let Some(list) = list else { continue };
                let key = format!("routes.{name}.{field}");
                for (i, sink) in list.iter().enumerate() {
                    if list[..i].contains(sink) {
                        return Err(InvalidConfig::new(
                            key,
                            format!("names {} twice", sink.key()),
                        ));
                    }
                    let (enabled, section) = match sink {
                        RouteSink::Postgres => (postgres, "postgres.enabled"),
                        RouteSink::Parquet => (nas, "nas.enabled"),
                    };
                    if !enabled {
                        return Err(InvalidConfig::new(
                            key,
                            format!(
                                "names {}, but {section} = false; enable it or leave it out",
                                sink.key()
                            ),
                        ));
                    }
                }
            }
            if routes.raw.as_ref().is_some_and(Vec::is_empty)
                && routes.aggregates.as_ref().is_some_and(Vec::is_empty)
            {
                return Err(InvalidConfig::new(
                    format!("routes.{name}"),
                    format!(
                        "stores nothing of the stream; to stop it, set dataflows.{name} = false"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The sinks' view: a route per stream that skips an enabled sink.
    pub fn resolved(&self, postgres: bool, nas: bool) -> Vec<(StreamKind, Route)> {
        let has = |list: &Option<Vec<RouteSink>>, sink: RouteSink, enabled: bool| {
            enabled && list.as_ref().is_none_or(|l| l.contains(&sink))
        };
        self.streams()
            .into_iter()
            .map(|(kind, _, r)| {
                let route = Route {
                    raw_postgres: has(&r.raw, RouteSink::Postgres, postgres),
                    raw_archive: has(&r.raw, RouteSink::Parquet, nas),
                    aggregates_postgres: has(&r.aggregates, RouteSink::Postgres, postgres),
                    aggregates_archive: has(&r.aggregates, RouteSink::Parquet, nas),
                };
                (kind, route)
            })
            .filter(|(_, route)| *route != Route::default())
            .collect()
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Broker and topics.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// PostgreSQL / TimescaleDB sink; `enabled = false` (the demo) keeps no database.
    #[serde(default)]
    pub postgres: PostgresSection,
    /// Parquet on the NAS.
    #[serde(default)]
    pub nas: NasConfig,
    /// SQL endpoint.
    #[serde(default)]
    pub query: QueryConfig,
    /// Event time.
    #[serde(default)]
    pub windows: WindowsConfig,
    /// Workers and limits.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Which streams run.
    #[serde(default)]
    pub dataflows: DataflowsConfig,
    /// Which sinks get each stream's rows.
    #[serde(default)]
    pub routes: RoutesConfig,
    /// S3-compatible object storage: the cold tier of the Parquet archive.
    #[serde(default)]
    pub s3: S3Config,
    /// When NAS files move to `s3`.
    #[serde(default)]
    pub tier: TierConfig,
    /// Anomaly scoring of telemetry.
    #[serde(default)]
    pub inference: primespark_operators::inference::config::InferenceConfig,
}

/// `[postgres]` with an on/off switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// Write to PostgreSQL at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Connection and flushing.
    #[serde(flatten)]
    pub config: PostgresConfig,
}

fn default_true() -> bool {
    true
}

impl Default for PostgresSection {
    fn default() -> Self {
        Self {
            enabled: true,
            config: PostgresConfig::default(),
        }
    }
}

impl Config {
    /// Reads `path` (if any) and applies overrides from `env` (`PRIMESPARK_KAFKA__BROKERS=...`).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?,
                p.display().to_string(),
            ),
            None => (String::new(), "defaults".to_owned()),
        };
        Self::from_toml(&text, &origin, env)
    }

    /// Parses TOML text with environment overrides.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        let mut overridden = Vec::new();
        for (key, value) in env {
            let Some(rest) = key.strip_prefix("PRIMESPARK_") else {
                continue;
            };
            if !rest.contains("__") {
                continue;
            }
            let mut path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            let value = if is_string_key(&path) {
                // `"1000"` for librdkafka, a topic named `2024`: text, whatever it looks like.
                toml::Value::String(value)
            } else {
                parse_env_value(&value)
            };
            if let [section, map, key] = path.as_mut_slice() {
                // Few environments allow dots in variable names: `SECURITY_PROTOCOL` is
                // librdkafka's `security.protocol` (its string properties have no `_`).
                if section == "kafka" && map == "properties" && !key.contains('.') {
                    *key = key.replace('_', ".");
                }
            }
            set_path(&mut table, &path, value);
            overridden.push(path.join("."));
        }
        let origin = if overridden.is_empty() {
            origin.to_owned()
        } else {
            format!(
                "{origin} with environment overrides of {}",
                overridden.join(", ")
            )
        };
        // The path of the offending key, which deserializing from a table would lose.
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
            |e: serde_path_to_error::Error<toml::de::Error>| ConfigError::Parse {
                origin,
                message: if e.path().iter().next().is_none() {
                    e.inner().message().to_owned()
                } else {
                    format!("{}: {}", e.path(), e.inner().message())
                },
            },
        )?;
        config.validate()?;
        Ok(config)
    }

    /// Pure validation of every section.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        self.kafka.validate()?;
        if self.postgres.enabled {
            self.postgres.config.validate()?;
        }
        self.nas.validate()?;
        self.query.validate()?;
        self.s3.validate()?;
        self.tier.validate()?;
        self.inference.validate()?;
        if self.s3.enabled && !self.nas.enabled {
            return Err(InvalidConfig::new(
                "s3.enabled",
                "tiering moves NAS files: it needs nas.enabled = true",
            ));
        }
        if self.nas.enabled && self.nas.compaction_grace < self.query.timeout {
            return Err(InvalidConfig::new(
                "nas.compaction_grace",
                "must be at least query.timeout (a query that listed merged minute files must still find them)",
            ));
        }
        if self.s3.enabled && self.tier.after <= self.windows.allowed_lateness {
            return Err(InvalidConfig::new(
                "tier.after",
                "must be longer than windows.allowed_lateness (aggregate files are rewritten while a late event can still change them)",
            ));
        }
        self.windows.validate(&self.kafka.topics)?;
        if !(1..=256).contains(&self.runtime.workers) {
            return Err(InvalidConfig::new(
                "runtime.workers",
                "must be between 1 and 256",
            ));
        }
        if !(1..=1024).contains(&self.runtime.processes) {
            return Err(InvalidConfig::new(
                "runtime.processes",
                "must be between 1 and 1024",
            ));
        }
        if self.runtime.process_id >= self.runtime.processes {
            return Err(InvalidConfig::new(
                "runtime.process_id",
                format!(
                    "is {} but must be below runtime.processes ({})",
                    self.runtime.process_id, self.runtime.processes
                ),
            ));
        }
        if self.runtime.processes > 1 {
            match (&self.runtime.hostfile, self.runtime.addresses.len()) {
                (Some(_), 0) => {}
                (None, n) if n == self.runtime.processes => {
                    if let Some(bad) = self.runtime.addresses.iter().find(|a| !is_host_port(a)) {
                        return Err(InvalidConfig::new(
                            "runtime.addresses",
                            format!("{bad:?} is not host:port"),
                        ));
                    }
                }
                (Some(_), _) => {
                    return Err(InvalidConfig::new(
                        "runtime.hostfile",
                        "set either hostfile or addresses, not both",
                    ))
                }
                (None, n) => {
                    return Err(InvalidConfig::new(
                        "runtime.addresses",
                        format!(
                            "a cluster of {} processes needs a hostfile or {} addresses, got {n}",
                            self.runtime.processes, self.runtime.processes
                        ),
                    ))
                }
            }
        }
        if self.runtime.max_message_bytes < 64 {
            return Err(InvalidConfig::new(
                "runtime.max_message_bytes",
                "must be at least 64",
            ));
        }
        if self.dataflows.enabled().is_empty() {
            return Err(InvalidConfig::new(
                "dataflows",
                "every stream is disabled; enable telemetry, inference or analytics",
            ));
        }
        self.routes
            .validate(self.postgres.enabled, self.nas.enabled)?;
        if !self.postgres.enabled && !self.nas.enabled {
            return Err(InvalidConfig::new(
                "nas.enabled",
                "with postgres disabled too, nothing would be stored",
            ));
        }
        Ok(())
    }
}

fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
}

impl RuntimeConfig {
    /// The cluster's addresses, one per process, from `addresses` or the hostfile (reads the
    /// file: call at start-up, not in `check-config`'s pure validation).
    pub fn cluster_addresses(&self) -> Result<Vec<String>, InvalidConfig> {
        let Some(path) = &self.hostfile else {
            return Ok(self.addresses.clone());
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            InvalidConfig::new(
                "runtime.hostfile",
                format!("reading {}: {e}", path.display()),
            )
        })?;
        let addresses: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        if addresses.len() != self.processes {
            return Err(InvalidConfig::new(
                "runtime.hostfile",
                format!(
                    "{} lists {} addresses for {} processes",
                    path.display(),
                    addresses.len(),
                    self.processes
                ),
            ));
        }
        if let Some(bad) = addresses.iter().find(|a| !is_host_port(a)) {
            return Err(InvalidConfig::new(
                "runtime.hostfile",
                format!("{}: {bad:?} is not host:port", path.display()),
            ));
        }
        Ok(addresses)
    }

    /// The timely configuration: threads in one process, or this process of a cluster.
    pub fn timely(&self) -> Result<timely::Config, InvalidConfig> {
        if self.processes <= 1 {
            return Ok(timely::Config::process(self.workers));
        }
        Ok(timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process_id,
                addresses: self.cluster_addresses()?,
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        })
    }
}

/// Environment values are TOML scalars when they parse as one (`20000`, `true`), else strings.
/// Keys whose values are text even when they look like numbers or booleans.
fn is_string_key(path: &[String]) -> bool {
    matches!(
        path.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice(),
        ["kafka", "properties", _]
            | ["kafka", "topics", _]
            | ["kafka", "brokers" | "consumer_group"]
    )
}

fn parse_env_value(raw: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => match t.remove("v") {
            // Arrays too (`PRIMESPARK_ROUTES__TELEMETRY__RAW='["parquet"]'`); a string in one
            // is quoted, so no plain text reads as an array by accident.
            Some(
                v @ (toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_)
                | toml::Value::Array(_)),
            ) => v,
            _ => toml::Value::String(raw.to_owned()),
        },
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = entry {
                set_path(t, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_local_config_parses() {
        let text = include_str!("../../deploy/config/local.toml");
        let c = Config::from_toml(text, "local.toml", []).unwrap();
        assert_eq!(c.kafka.topics.telemetry, "edge.telemetry");
    }

    #[test]
    fn env_overrides_files() {
        let c = Config::from_toml(
            "[kafka]\nbrokers = \"a:1\"",
            "t",
            [
                ("PRIMESPARK_KAFKA__BROKERS".to_owned(), "b:2".to_owned()),
                ("PRIMESPARK_RUNTIME__WORKERS".to_owned(), "3".to_owned()),
                (
                    "PRIMESPARK_WINDOWS__MAX_OUT_OF_ORDERNESS".to_owned(),
                    "2s".to_owned(),
                ),
                (
                    "PRIMESPARK_KAFKA__TOPICS__TELEMETRY".to_owned(),
                    "t.x".to_owned(),
                ),
                ("UNRELATED".to_owned(), "x".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "b:2");
        assert_eq!(c.runtime.workers, 3);
        assert_eq!(c.windows.max_out_of_orderness, Duration::from_secs(2));
        assert_eq!(c.kafka.topics.telemetry, "t.x");
    }

    #[test]
    fn env_overrides_of_librdkafka_properties_stay_text() {
        let c = Config::from_toml(
            "",
            "t",
            [
                (
                    "PRIMESPARK_KAFKA__PROPERTIES__reconnect.backoff.max.ms".to_owned(),
                    "1000".to_owned(),
                ),
                (
                    "PRIMESPARK_KAFKA__PROPERTIES__SECURITY_PROTOCOL".to_owned(),
                    "SASL_SSL".to_owned(),
                ),
                (
                    "PRIMESPARK_KAFKA__PROPERTIES__ENABLE_IDEMPOTENCE".to_owned(),
                    "true".to_owned(),
                ),
                (
                    "PRIMESPARK_KAFKA__TOPICS__EVENTS".to_owned(),
                    "2024".to_owned(),
                ),
            ],
        )
        .unwrap();
        let props = &c.kafka.properties;
        assert_eq!(props["reconnect.backoff.max.ms"], "1000");
        assert_eq!(props["security.protocol"], "SASL_SSL");
        assert_eq!(props["enable.idempotence"], "true");
        assert_eq!(c.kafka.topics.events, "2024");
    }

    #[test]
    fn cluster_settings_are_checked() {
        let ok = Config::from_toml(
            "[runtime]\nprocesses = 2\nprocess_id = 1\naddresses = [\"127.0.0.1:2101\", \"127.0.0.1:2102\"]",
            "t",
            [],
        )
        .unwrap();
        assert_eq!(ok.runtime.cluster_addresses().unwrap().len(), 2);
        let e = Config::from_toml("[runtime]\nprocesses = 2\nprocess_id = 2", "t", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("runtime.process_id"), "{e}");
        let e = Config::from_toml("[runtime]\nprocesses = 2", "t", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("runtime.addresses"), "{e}");
        let e = Config::from_toml(
            "[runtime]\nprocesses = 2\naddresses = [\"a:1\", \"b\"]",
            "t",
            [],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"b\" is not host:port"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "# pis\npi-1:2101\npi-2:2101\npi-3:2101\n").unwrap();
        let c = Config::from_toml(
            &format!(
                "[runtime]\nprocesses = 3\nhostfile = {:?}",
                hosts.display().to_string()
            ),
            "t",
            [],
        )
        .unwrap();
        assert_eq!(c.runtime.cluster_addresses().unwrap()[2], "pi-3:2101");
    }

    #[test]
    fn routes_default_to_every_enabled_sink_and_are_checked() {
        let plain = Config::from_toml("", "t", []).unwrap();
        assert!(plain.routes.resolved(true, true).is_empty());
        let c = Config::from_toml(
            "[routes.telemetry]\nraw = [\"parquet\"]\n[routes.analytics]\naggregates = [\"postgres\"]",
            "t",
            [],
        )
        .unwrap();
        let routes = c.routes.resolved(true, true);
        let of = |kind| routes.iter().find(|(k, _)| *k == kind).map(|(_, r)| *r);
        let telemetry = of(StreamKind::Telemetry).unwrap();
        assert!(!telemetry.raw_postgres && telemetry.raw_archive);
        assert!(telemetry.aggregates_postgres && telemetry.aggregates_archive);
        assert_eq!(
            telemetry.archive_only_tables(StreamKind::Telemetry.def()),
            ["device_metrics", "anomaly_scores"]
        );
        let analytics = of(StreamKind::Analytics).unwrap();
        assert!(analytics.raw_postgres && !analytics.aggregates_archive);
        assert!(analytics
            .archive_only_tables(StreamKind::Analytics.def())
            .is_empty());
        assert_eq!(of(StreamKind::Inference), None);
        // From the environment too.
        let c = Config::from_toml(
            "",
            "t",
            [(
                "PRIMESPARK_ROUTES__INFERENCE__RAW".to_owned(),
                "[\"parquet\"]".to_owned(),
            )],
        )
        .unwrap();
        assert_eq!(c.routes.inference.raw, Some(vec![RouteSink::Parquet]));

        for (toml, key, says) in [
            (
                "[routes.telemetry]\nraw = [\"kafka\"]",
                "raw",
                "unknown variant",
            ),
            (
                "[routes.telemetry]\nraw = [\"parquet\", \"parquet\"]",
                "routes.telemetry.raw",
                "twice",
            ),
            (
                "[postgres]\nenabled = false\n[routes.inference]\naggregates = [\"postgres\"]",
                "routes.inference.aggregates",
                "postgres.enabled = false",
            ),
            (
                "[nas]\nenabled = false\n[routes.analytics]\nraw = [\"parquet\"]",
                "routes.analytics.raw",
                "nas.enabled = false",
            ),
            (
                "[routes.telemetry]\nraw = []\naggregates = []",
                "routes.telemetry",
                "dataflows.telemetry = false",
            ),
            ("[routes.telemetry]\nsinks = []", "sinks", "unknown field"),
            (
                "[nas]\ncompaction_grace = \"10s\"\n[query]\ntimeout = \"30s\"",
                "nas.compaction_grace",
                "query.timeout",
            ),
        ] {
            let e = Config::from_toml(toml, "f.toml", [])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(says), "{toml}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[kafka]\nbrokrs = \"a:1\"", "f.toml", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("brokrs"), "{e}");
        let e = Config::from_toml("[windows]\nmax_out_of_orderness = \"soon\"", "f.toml", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("soon"), "{e}");
        let e = Config::from_toml("[runtime]\nworkers = 0", "f.toml", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("runtime.workers"), "{e}");
        let e = Config::from_toml("[query]\nhttp_addr = \"nowhere\"", "f.toml", [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("query.http_addr"), "{e}");
    }

    #[test]
    fn clock_settings_are_checked() {
        let err = |toml: &str| {
            Config::from_toml(toml, "f.toml", [])
                .unwrap_err()
                .to_string()
        };
        let e = err("[windows]\nnaive_timezone = \"Europe/Berln\"");
        assert!(
            e.contains("windows.naive_timezone") && e.contains("Europe/Berln"),
            "{e}"
        );
        let e = err("[windows.naive_timezones]\ntelemetry = \"CEST\"");
        assert!(e.contains("windows.naive_timezones.telemetry"), "{e}");
        let e = err("[windows.naive_timezones]\ntelemtry = \"Europe/Berlin\"");
        assert!(e.contains("windows.naive_timezones.telemtry"), "{e}");
        let e = err("[windows]\nmax_future = \"0s\"");
        assert!(e.contains("windows.max_future"), "{e}");
        // By stream or by topic; the stream's entry wins.
        let c = Config::from_toml(
            "[windows]\nnaive_timezone = \"Asia/Tokyo\"\n[windows.naive_timezones]\n\
             \"edge.ai.inference\" = \"Europe/Berlin\"\ntelemetry = \"America/New_York\"",
            "f.toml",
            [],
        )
        .unwrap();
        let zone = |k| {
            c.windows
                .naive_zone_of(k, c.kafka.topics.of(k))
                .unwrap()
                .to_string()
        };
        assert_eq!(zone(StreamKind::Telemetry), "America/New_York");
        assert_eq!(zone(StreamKind::Inference), "Europe/Berlin");
        assert_eq!(zone(StreamKind::Analytics), "Asia/Tokyo");
    }
}
