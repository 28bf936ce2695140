//! The command line: `run`, `demo`, `produce`, `check-config`, `migrate`, `backfill`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use rdkafka::producer::BaseProducer;
use rdkafka::ClientConfig;

use crate::config::Config;

/// primespark: Kafka -> timely dataflow -> TimescaleDB, Parquet and SQL.
#[derive(Parser, Debug)]
#[command(name = "primespark", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline with a configuration file (environment overrides apply).
    Run {
        /// TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// Timely worker threads in this process (overrides runtime.workers).
        #[arg(long)]
        workers: Option<usize>,
        /// Processes in the timely cluster (overrides runtime.processes).
        #[arg(long)]
        processes: Option<usize>,
        /// This process's index in the cluster (overrides runtime.process_id).
        #[arg(long)]
        process_id: Option<usize>,
        /// One `host:port` per line, per process (overrides runtime.hostfile).
        #[arg(long)]
        hostfile: Option<PathBuf>,
        /// Assign partitions and report consumer lag, but read nothing until SIGUSR1
        /// (sets runtime.start_paused).
        #[arg(long)]
        paused: bool,
    },
    /// The embedded demo: in-process broker, synthetic fleet, Parquet under ./data, SQL endpoint.
    Demo {
        /// Simulated devices.
        #[arg(long, default_value_t = 50)]
        devices: usize,
        /// Events per second.
        #[arg(long, default_value_t = 500)]
        rate: u64,
        /// Share of malformed events (0..1).
        #[arg(long, default_value_t = 0.01)]
        bad_share: f64,
        /// Parquet folder.
        #[arg(long, default_value = "./data")]
        data: PathBuf,
        /// SQL endpoint address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: String,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        duration_secs: Option<u64>,
    },
    /// Publish a synthetic fleet's telemetry to a real broker.
    Produce {
        /// Bootstrap servers.
        #[arg(
            long,
            env = "PRIMESPARK_KAFKA__BROKERS",
            default_value = "127.0.0.1:9092"
        )]
        brokers: String,
        /// Topic.
        #[arg(long, default_value = "edge.telemetry")]
        topic: String,
        /// Devices.
        #[arg(long, default_value_t = 100)]
        devices: usize,
        /// Events per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds to run (default 10; without a limit when only --count is given).
        #[arg(long)]
        duration_secs: Option<u64>,
        /// Stop after this many telemetry events (and the inference and analytics events
        /// sent with them); with --duration-secs, whichever comes first.
        #[arg(long)]
        count: Option<u64>,
        /// Share of malformed events (0..1).
        #[arg(long, default_value_t = 0.0)]
        bad_share: f64,
        /// Also publish one inference request per five telemetry events to this topic
        /// (e.g. `edge.ai.inference`).
        #[arg(long)]
        inference_topic: Option<String>,
        /// Also publish one task or API event per five telemetry events to this topic
        /// (e.g. `analytics.events`).
        #[arg(long)]
        events_topic: Option<String>,
    },
    /// Hash a secret read from stdin for the configuration: an API token's SHA-256 for
    /// `[[query.api_keys]] sha256`, or with `--password` a SCRAM-SHA-256 verifier for
    /// `[[query.users]] password_hash`. The secret is never echoed.
    HashSecret {
        /// Hash a wire-protocol password (a SCRAM-SHA-256 verifier) instead of an API token (SHA-256).
        #[arg(long)]
        password: bool,
    },
    /// Validate a configuration file without touching any service.
    CheckConfig {
        /// TOML configuration.
        file: PathBuf,
    },
    /// Apply database migrations and exit.
    Migrate {
        /// TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Rebuild the PostgreSQL raw and aggregate tables of a time range from the Parquet
    /// archive (idempotent: the range is cleared first). Stores no resume offsets.
    Backfill {
        /// TOML configuration (PostgreSQL, the NAS path, the bucket).
        #[arg(long)]
        config: PathBuf,
        /// Which copy of the archive to read.
        #[arg(long, value_enum, default_value = "nas")]
        from: crate::run::ArchiveFrom,
        /// First event time (RFC 3339, e.g. 2025-11-05T14:00:00Z, or a date 2025-11-05).
        /// Default: the archive's beginning.
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// End of the range, exclusive (same forms). Default: the archive's end.
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// Timely worker threads (overrides runtime.workers).
        #[arg(long)]
        workers: Option<usize>,
    },
}

/// An RFC 3339 time or a UTC date, as microseconds since the epoch.
fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_micros());
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_micros())
        .ok_or_else(|| {
            format!(
                "{s:?} is neither an RFC 3339 time (2025-11-05T14:00:00Z) nor a date (2025-11-05)"
            )
        })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,rdkafka=warn,datafusion=warn")
    });
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Ok(Config::load(Some(path), std::env::vars())?)
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            workers,
            processes,
            process_id,
            hostfile,
            paused,
        } => {
            let mut config = load(&config)?;
            config.runtime.start_paused |= paused;
            if let Some(w) = workers {
                config.runtime.workers = w;
            }
            if let Some(p) = processes {
                config.runtime.processes = p;
            }
            if let Some(p) = process_id {
                config.runtime.process_id = p;
            }
            if let Some(h) = hostfile {
                config.runtime.hostfile = Some(h);
                config.runtime.addresses.clear();
            }
            config
                .validate()
                .map_err(crate::config::ConfigError::from)?;
            crate::run::run(&config, Arc::new(AtomicBool::new(false)), true)?;
        }
        Command::Demo {
            devices,
            rate,
            bad_share,
            data,
            http_addr,
            duration_secs,
        } => {
            let opts = crate::demo::DemoOptions {
                devices,
                rate,
                bad_share,
                data,
                http_addr,
                duration: duration_secs.map(Duration::from_secs),
            };
            crate::demo::demo(&opts, |line| {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{line}");
            })?;
        }
        Command::Produce {
            brokers,
            topic,
            devices,
            rate,
            duration_secs,
            count,
            bad_share,
            inference_topic,
            events_topic,
        } => {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "5")
                .create()
                .context("creating producer")?;
            let mut fleet = crate::fleet::Fleet::new(devices, bad_share, rand::random());
            let stop = AtomicBool::new(false);
            let sent = crate::fleet::produce_counted(
                &producer,
                &topic,
                crate::fleet::ExtraTopics {
                    inference: inference_topic.as_deref(),
                    events: events_topic.as_deref(),
                },
                &mut fleet,
                rate,
                match (duration_secs, count) {
                    (Some(secs), _) => Some(Duration::from_secs(secs)),
                    (None, Some(_)) => None,
                    (None, None) => Some(Duration::from_secs(10)),
                },
                count,
                &stop,
            );
            tracing::info!(sent, topic, "produced");
        }
        Command::HashSecret { password } => {
            let mut secret = String::new();
            std::io::stdin().read_line(&mut secret)?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!secret.is_empty(), "no secret on stdin");
            let hashed = if password {
                primespark_connectors::query::hash_password(secret)?
            } else {
                primespark_connectors::query::sha256_hex(secret)
            };
            writeln!(std::io::stdout().lock(), "{hashed}")?;
        }
        Command::CheckConfig { file } => {
            let config = load(&file)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}: ok", file.display())?;
            writeln!(out, "{config:#?}")?;
        }
        Command::Backfill {
            config,
            from,
            since,
            until,
            workers,
        } => {
            let mut config = load(&config)?;
            if let Some(w) = workers {
                config.runtime.workers = w;
            }
            if let (Some(s), Some(u)) = (since, until) {
                anyhow::ensure!(s < u, "--since must be before --until");
            }
            let started = std::time::Instant::now();
            crate::run::backfill(
                &config,
                &crate::run::BackfillRange {
                    from,
                    since_us: since,
                    until_us: until,
                },
            )?;
            tracing::info!(
                duration_ms = started.elapsed().as_millis() as u64,
                "backfill finished"
            );
        }
        Command::Migrate { config } => {
            let config = load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut client =
                    primespark_connectors::postgres::connect(&config.postgres.config.url).await?;
                let backend = primespark_connectors::postgres::migrate(&mut client).await?;
                let retention = &config.postgres.config.retention;
                if backend == primespark_connectors::postgres::Backend::Timescale
                    && retention.enabled
                {
                    primespark_connectors::postgres::retention::apply_timescale_policies(
                        &client, retention,
                    )
                    .await?;
                }
                tracing::info!(?backend, "migrations applied");
                anyhow::Ok(())
            })?;
        }
    }
    Ok(())
}

/// Why a run ended, as its exit code (see [`crate::run::RunError::exit_code`]).
fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<crate::config::ConfigError>().is_some() {
        return 2;
    }
    let run = e.downcast_ref::<crate::run::RunError>().or_else(|| {
        match e.downcast_ref::<crate::demo::DemoError>() {
            Some(crate::demo::DemoError::Run(r)) => Some(r),
            _ => None,
        }
    });
    run.map_or(1, crate::run::RunError::exit_code)
}

/// Entry point of the `primespark` binary. Exit codes: 0 stopped cleanly, 1 other failure,
/// 2 bad usage or configuration, 3 a service unreachable or a topic missing, 4 the shutdown
/// did not flush within its grace period, 5 a timely worker failed.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}
