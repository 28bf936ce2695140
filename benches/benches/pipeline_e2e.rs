//! The pipeline as users run it, with the broker: publishes N telemetry events (1,000 devices,
//! five metrics, one event per device per second) to a fresh 3-partition topic of the stack's
//! Kafka-compatible broker with its own producer, then in one run measures
//! - raw rdkafka consume of the topic (no processing): the baseline;
//! - the release `primespark` binary reading the topic from the beginning, by profile:
//!   `aggregates-only` (raw rows to Parquet, windows to PostgreSQL: `[routes]`), `every-sink`
//!   (raw rows to PostgreSQL and Parquet, windows to both), `every-sink+scoring` (and the
//!   anomaly model on every sample), each on a fresh database and NAS folder;
//! - `psql \copy` of the same raw rows into the same `device_metrics` table;
//! - the peer: bytewax 0.21 doing the aggregates-only job (`benches/peers/bytewax_aggregates.py`,
//!   the stack's virtualenv), its windows checked for exactness.
//!
//! For each profile: events/s until every window is visible in PostgreSQL and every raw position
//! is stored, the ratios to raw consume and (raw rows/s) to `psql \copy`, time to the last
//! window, time until the archive holds every row, and the binary's peak RSS (`VmHWM`).
//!
//! `cargo bench -p primespark-benches --bench pipeline_e2e` (the README's bench command runs it
//! with the others): brings the stack up through `deploy/dev/stack.sh` unless the environment
//! names one (`eval "$(deploy/dev/stack.sh env)"`), builds the release binary, and prints the
//! report. `PRIMESPARK_BENCH_EVENTS` sets N (default 1,000,000); `PRIMESPARK_BENCH_PROFILES`
//! picks profiles (comma-separated; `bytewax` is the peer); `PRIMESPARK_BENCH_OVERRIDES` passes configuration
//! overrides to every profile's pipeline, space-separated `PRIMESPARK_SECTION__KEY=VALUE`
//! (for example the catch-up bounds of an older default, to compare in one build).

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use primespark_benches::{peak_rss_mb, psql_path, with_dbname};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::runtime::Runtime;

// The allocator the `primespark` binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BoxError = Box<dyn Error>;

const DEVICES: usize = 1_000;
const PARTITIONS: i32 = 3;
const METRICS: [&str; 5] = [
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "temperature",
    "load_avg",
];
const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
/// How long one profile may take before the bench gives up on it.
const PROFILE_TIMEOUT: Duration = Duration::from_secs(900);

/// A way the pipeline is configured.
struct Profile {
    name: &'static str,
    /// Sections added to the common configuration.
    extra: &'static str,
    /// Whether raw rows go to PostgreSQL (compared with `psql \copy` then).
    raw_to_postgres: bool,
}

/// The peer's name in the report and in `PRIMESPARK_BENCH_PROFILES`.
const BYTEWAX: &str = "bytewax";

const PROFILES: &[Profile] = &[
    Profile {
        name: "aggregates-only",
        extra: "[inference]\nenabled = false\n[routes.telemetry]\nraw = [\"parquet\"]\n",
        raw_to_postgres: false,
    },
    Profile {
        name: "every-sink",
        extra: "[inference]\nenabled = false\n",
        raw_to_postgres: true,
    },
    Profile {
        name: "every-sink+scoring",
        extra: "[inference]\nenabled = true\n",
        raw_to_postgres: true,
    },
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The stack's addresses: from the environment, or `stack.sh up` and its `env`.
fn stack_env() -> Result<HashMap<String, String>, BoxError> {
    let mut vars: HashMap<String, String> = std::env::vars().collect();
    if vars.contains_key("PRIMESPARK_KAFKA__BROKERS") {
        return Ok(vars);
    }
    let script = repo_root().join("deploy/dev/stack.sh");
    let up = Command::new("bash").arg(&script).arg("up").status()?;
    if !up.success() {
        return Err("deploy/dev/stack.sh up failed".into());
    }
    let out = Command::new("bash").arg(&script).arg("env").output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
            vars.insert(
                k.to_owned(),
                v.trim_matches(|c| c == '"' || c == '\'').to_owned(),
            );
        }
    }
    Ok(vars)
}

/// Builds the release binary into its own target folder (`<target>/pipeline-e2e`): built in
/// the bench's folder, its different feature set would rebuild the bench's dependencies on
/// every run, and theirs on the next.
fn pipeline_binary() -> Result<PathBuf, BoxError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().ok_or("bench has no folder")?;
    if dir.ends_with("deps") {
        dir = dir.parent().ok_or("deps has no parent")?;
    }
    // `<target>/release` -> `<target>/pipeline-e2e`.
    let target = dir
        .parent()
        .ok_or("the profile folder has no parent")?
        .join("pipeline-e2e");
    let status = Command::new(cargo)
        .current_dir(repo_root())
        .args([
            "build",
            "--release",
            "-p",
            "primespark-dataflows",
            "--bin",
            "primespark",
            "--target-dir",
        ])
        .arg(&target)
        .status()?;
    if !status.success() {
        return Err("building the release binary failed".into());
    }
    Ok(target.join("release").join("primespark"))
}

/// Event `i`: device `i % DEVICES`, one event per device per second.
fn event(i: usize) -> (i32, Vec<u8>) {
    let device = i % DEVICES;
    let tick = (i / DEVICES) as i64;
    let ts = T0_MS + tick * 1000 + device as i64;
    let v = |k: usize| ((i * 7_919 + k * 31) % 10_000) as f64 / 100.0;
    let payload = format!(
        r#"{{"device_id":"pi-{device:05}","metrics":{{"cpu_percent":{},"memory_percent":{},"disk_percent":{},"temperature":{},"load_avg":{}}},"timestamp":{ts}}}"#,
        v(0),
        v(1),
        v(2),
        v(3),
        v(4)
    );
    ((device % PARTITIONS as usize) as i32, payload.into_bytes())
}

/// A sentinel an hour after the last event on each partition closes every window.
fn sentinel(events: usize, partition: i32) -> (i32, Vec<u8>) {
    let ts = T0_MS + (events / DEVICES) as i64 * 1000 + 3_600_000;
    let payload =
        format!(r#"{{"device_id":"sentinel-{partition}","metrics":{{"up":1}},"timestamp":{ts}}}"#);
    (partition, payload.into_bytes())
}

/// The 1-minute windows the events make (device, metric, minute), sentinels' excluded.
fn expected_windows(events: usize) -> usize {
    let mut minutes: HashSet<(usize, i64)> = HashSet::new();
    for i in 0..events {
        let device = i % DEVICES;
        let ts = T0_MS + (i / DEVICES) as i64 * 1000 + device as i64;
        minutes.insert((device, ts / 60_000));
    }
    minutes.len() * METRICS.len()
}

fn create_topic(rt: &Runtime, brokers: &str, topic: &str) -> Result<(), BoxError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    let results = rt.block_on(admin.create_topics([&new], &AdminOptions::new()))?;
    for r in results {
        r.map_err(|(t, e)| format!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// Publishes every event and the sentinels; returns how many records each partition got.
fn publish(brokers: &str, topic: &str, events: usize) -> Result<(Duration, Vec<i64>), BoxError> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "zstd")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let mut per_partition = vec![0i64; PARTITIONS as usize];
    let started = Instant::now();
    let records = (0..events)
        .map(event)
        .chain((0..PARTITIONS).map(|p| sentinel(events, p)));
    for (partition, payload) in records {
        let mut record = BaseRecord::<(), [u8]>::to(topic)
            .payload(&payload)
            .partition(partition);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, back)) => {
                    if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::QueueFull) {
                        return Err(format!("producing: {e}").into());
                    }
                    producer.poll(Duration::from_millis(10));
                    record = back;
                }
            }
        }
        per_partition[partition as usize] += 1;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(120))?;
    Ok((started.elapsed(), per_partition))
}

/// How many times raw consume runs; the report takes the fastest (the broker's ceiling on a
/// shared machine, where any one run may lose the cores to the database's background work).
const RAW_RUNS: usize = 3;

/// Reads every record of the topic from the beginning, as fast as rdkafka delivers them.
fn raw_consume(brokers: &str, topic: &str, total: i64) -> Result<Duration, BoxError> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "primespark-bench-raw")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        // librdkafka's default (one second) idles the consumer whenever a fetch response
        // overfills its queue, which Tansu's large responses do every time.
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut seen = 0i64;
    let mut bytes = 0usize;
    while seen < total {
        if started.elapsed() > PROFILE_TIMEOUT {
            return Err(format!("raw consume saw {seen} of {total} records").into());
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                seen += 1;
                bytes += m.payload().map_or(0, <[u8]>::len);
            }
            Some(Err(e)) => return Err(format!("consuming: {e}").into()),
            None => {}
        }
    }
    std::hint::black_box(bytes);
    Ok(started.elapsed())
}

async fn fresh_database(url: &str, db: &str) -> Result<String, BoxError> {
    let admin = primespark_connectors::postgres::connect(url).await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    Ok(with_dbname(url, db))
}

/// Drops a bench database (best effort: the report does not depend on it).
fn drop_database(rt: &Runtime, url: &str, db: &str) {
    let dropped = rt.block_on(async {
        let admin = primespark_connectors::postgres::connect(url).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await?;
        Ok::<_, BoxError>(())
    });
    if let Err(e) = dropped {
        let _ = writeln!(std::io::stderr(), "pipeline_e2e: dropping {db}: {e}");
    }
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .ok()
        .and_then(|r| r.try_get::<_, i64>(0).ok())
        .unwrap_or(0)
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Rows in the finished Parquet files under `dir`.
fn parquet_rows(dir: &Path) -> i64 {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut rows = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                if let Ok(reader) = std::fs::File::open(&path).map(SerializedFileReader::new) {
                    rows += reader.map_or(0, |r| r.metadata().file_metadata().num_rows());
                }
            }
        }
    }
    rows
}

struct Measured {
    processed: Duration,
    last_window: Duration,
    archived: Option<Duration>,
    peak_rss_mb: f64,
}

struct Workload<'a> {
    brokers: &'a str,
    pg_url: &'a str,
    topic: &'a str,
    records: &'a [i64],
    windows: i64,
    raw_points: i64,
    /// `PRIMESPARK_*` overrides for every profile's pipeline.
    overrides: &'a [(String, String)],
}

fn run_profile(
    rt: &Runtime,
    binary: &Path,
    work: &Workload<'_>,
    profile: &Profile,
) -> Result<Measured, BoxError> {
    let db = format!(
        "bench_{}_{}",
        profile.name.replace(['-', '+'], "_"),
        std::process::id()
    );
    let url = rt.block_on(fresh_database(work.pg_url, &db))?;
    let dir = tempfile::tempdir()?;
    let nas = dir.path().join("nas");
    let config = dir.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\ndead_letter_topics = false\ncommit_group_offsets = false\n\
             [kafka.topics]\ntelemetry = \"{}\"\n\
             [postgres]\nurl = \"{url}\"\n[postgres.retention]\nenabled = false\n\
             [nas]\npath = \"{}\"\nroll_interval = \"5s\"\n\
             [query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             [runtime]\nworkers = 2\n\
             [dataflows]\ninference = false\nanalytics = false\n{}",
            work.brokers,
            work.topic,
            nas.display(),
            free_port()?,
            profile.extra
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("pipeline.log"))?;
    let mut cmd = Command::new(binary);
    for (k, _) in std::env::vars() {
        if k.starts_with("PRIMESPARK_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in work.overrides {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let child = cmd
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut child = Guard(child);
    let pid = child.0.id().to_string();
    let client = rt.block_on(async {
        loop {
            if let Ok(c) = primespark_connectors::postgres::connect(&url).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let total: i64 = work.records.iter().sum();
    let archive_dir = nas.join(format!("topic={}", work.topic));
    let (mut last_window, mut processed, mut archived) = (None, None, None);
    let mut peak = 0f64;
    while processed.is_none() || archived.is_none() {
        if started.elapsed() > PROFILE_TIMEOUT {
            let text = std::fs::read_to_string(dir.path().join("pipeline.log")).unwrap_or_default();
            let tail: String = text.lines().rev().take(20).collect::<Vec<_>>().join("\n");
            return Err(format!(
                "{}: not done after {PROFILE_TIMEOUT:?}\n{tail}",
                profile.name
            )
            .into());
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            let text = std::fs::read_to_string(dir.path().join("pipeline.log")).unwrap_or_default();
            return Err(
                format!("{}: the pipeline exited ({status}):\n{text}", profile.name).into(),
            );
        }
        peak = peak.max(peak_rss_mb(&pid));
        let (windows, positions) = rt.block_on(async {
            (
                count(&client, "SELECT count(*) FROM device_metrics_1m").await,
                count(
                    &client,
                    "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = 'postgres_raw'",
                )
                .await,
            )
        });
        if last_window.is_none() && windows >= work.windows {
            last_window = Some(started.elapsed());
        }
        if processed.is_none() && last_window.is_some() && positions >= total {
            processed = Some(started.elapsed());
        }
        if archived.is_none() && parquet_rows(&archive_dir) >= work.raw_points {
            archived = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    peak = peak.max(peak_rss_mb(&pid));
    drop(child);
    drop(client);
    drop_database(rt, work.pg_url, &db);
    Ok(Measured {
        processed: processed.unwrap_or_default(),
        last_window: last_window.unwrap_or_default(),
        archived,
        peak_rss_mb: peak,
    })
}

/// The bytewax peer (`benches/peers/bytewax_aggregates.py`, bytewax 0.21 from the stack's
/// virtualenv): the aggregates-only job's 1-minute windows from the same topic, COPYed to a
/// fresh database. Measured like a profile: from the spawn until every window is visible,
/// then checked for exactness (a peer that drops samples would not be doing the same job).
fn bytewax_peer(rt: &Runtime, python: &str, work: &Workload<'_>) -> Result<Measured, BoxError> {
    let db = format!("bench_bytewax_{}", std::process::id());
    let url = rt.block_on(fresh_database(work.pg_url, &db))?;
    let client = rt.block_on(async {
        let c = primespark_connectors::postgres::connect(&url).await?;
        c.batch_execute(
            "CREATE TABLE bytewax_1m (bucket timestamptz NOT NULL, device_id text NOT NULL, \
             metric_name text NOT NULL, count int8 NOT NULL, sum float8 NOT NULL, \
             min float8 NOT NULL, max float8 NOT NULL)",
        )
        .await?;
        Ok::<_, BoxError>(c)
    })?;
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("bytewax.log");
    let script = repo_root().join("benches/peers/bytewax_aggregates.py");
    let started = Instant::now();
    let child = Command::new(python)
        .args(["-m", "bytewax.run"])
        .arg(format!("{}:flow", script.display()))
        .env("BENCH_BROKERS", work.brokers)
        .env("BENCH_TOPIC", work.topic)
        .env("BENCH_PG_URL", &url)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let mut child = Guard(child);
    let pid = child.0.id().to_string();
    let devices = "FROM bytewax_1m WHERE device_id NOT LIKE 'sentinel-%'";
    let mut peak = 0f64;
    let last_window = loop {
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        if started.elapsed() > PROFILE_TIMEOUT {
            return Err(format!("bytewax: not done after {PROFILE_TIMEOUT:?}\n{}", log()).into());
        }
        peak = peak.max(peak_rss_mb(&pid));
        let windows = rt.block_on(count(&client, &format!("SELECT count(*) {devices}")));
        if windows >= work.windows {
            break started.elapsed();
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            return Err(format!(
                "bytewax exited ({status}) after {windows} of {} windows:\n{}",
                work.windows,
                log()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let samples = rt.block_on(count(
        &client,
        &format!("SELECT coalesce(sum(count), 0)::int8 {devices}"),
    ));
    let windows = rt.block_on(count(&client, &format!("SELECT count(*) {devices}")));
    let want_samples = work.raw_points - i64::from(PARTITIONS);
    if (windows, samples) != (work.windows, want_samples) {
        return Err(format!(
            "bytewax wrote {windows} windows of {samples} samples, not {} of {want_samples}",
            work.windows
        )
        .into());
    }
    drop(child);
    drop(client);
    drop_database(rt, work.pg_url, &db);
    Ok(Measured {
        processed: last_window,
        last_window,
        archived: None,
        peak_rss_mb: peak,
    })
}

/// Kills the pipeline when dropped (also when the bench fails).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `psql \copy` of the events' raw rows (as the pipeline writes them) into `device_metrics` of
/// a fresh, migrated database: rows/s.
fn psql_copy(rt: &Runtime, pg_url: &str, events: usize) -> Result<(f64, i64), BoxError> {
    let db = format!("bench_psql_{}", std::process::id());
    let url = rt.block_on(fresh_database(pg_url, &db))?;
    let mut client = rt.block_on(primespark_connectors::postgres::connect(&url))?;
    rt.block_on(primespark_connectors::postgres::migrate(&mut client))?;
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("device_metrics.csv");
    let mut out = BufWriter::new(std::fs::File::create(&csv)?);
    let mut rows = 0i64;
    for i in 0..events {
        let device = i % DEVICES;
        let ts = T0_MS + (i / DEVICES) as i64 * 1000 + device as i64;
        let time = chrono::DateTime::from_timestamp_millis(ts)
            .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
            .unwrap_or_default();
        for (k, metric) in METRICS.iter().enumerate() {
            let v = ((i * 7_919 + k * 31) % 10_000) as f64 / 100.0;
            writeln!(out, "{time},pi-{device:05},{metric},{v}")?;
            rows += 1;
        }
    }
    out.flush()?;
    drop(out);
    let copy = format!(
        "\\copy device_metrics (time, device_id, metric_name, value) FROM '{}' WITH (FORMAT csv)",
        csv.display()
    );
    let started = Instant::now();
    let status = Command::new(psql_path())
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &url, "-c", &copy])
        .status()?;
    let took = started.elapsed();
    if !status.success() {
        return Err("psql \\copy failed".into());
    }
    drop(client);
    drop_database(rt, pg_url, &db);
    Ok((rows as f64 / took.as_secs_f64(), rows))
}

fn main() -> Result<(), BoxError> {
    // `cargo bench` passes `--bench`; a filter argument picks nothing here.
    let events: usize = std::env::var("PRIMESPARK_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let wanted: Option<Vec<String>> = std::env::var("PRIMESPARK_BENCH_PROFILES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect());
    let overrides: Vec<(String, String)> = std::env::var("PRIMESPARK_BENCH_OVERRIDES")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let mut out = std::io::stdout().lock();
    let env = stack_env()?;
    let brokers = env
        .get("PRIMESPARK_KAFKA__BROKERS")
        .ok_or("no PRIMESPARK_KAFKA__BROKERS")?
        .clone();
    let pg_url = env
        .get("PRIMESPARK_POSTGRES__URL")
        .ok_or("no PRIMESPARK_POSTGRES__URL")?
        .clone();
    let binary = pipeline_binary()?;
    let rt = Runtime::new()?;
    let topic = format!("bench.telemetry.{}", std::process::id());
    create_topic(&rt, &brokers, &topic)?;
    let (published, records) = publish(&brokers, &topic, events)?;
    let total: i64 = records.iter().sum();
    writeln!(
        out,
        "pipeline_e2e: {events} telemetry events ({DEVICES} devices, {} metrics) in {PARTITIONS} partitions of {topic}, published in {:.1} s",
        METRICS.len(),
        published.as_secs_f64()
    )?;
    let mut raw_runs = Vec::with_capacity(RAW_RUNS);
    for _ in 0..RAW_RUNS {
        let took = raw_consume(&brokers, &topic, total)?;
        raw_runs.push(total as f64 / took.as_secs_f64());
    }
    let raw_eps = raw_runs.iter().copied().fold(0f64, f64::max);
    let shown: Vec<String> = raw_runs.iter().map(|r| format!("{r:.0}")).collect();
    writeln!(
        out,
        "  raw rdkafka consume            : {raw_eps:>10.0} events/s (fastest of {})",
        shown.join(", ")
    )?;
    let (psql_rows_per_s, raw_rows) = psql_copy(&rt, &pg_url, events)?;
    writeln!(
        out,
        "  psql \\copy of the raw rows     : {psql_rows_per_s:>10.0} rows/s ({raw_rows} rows)"
    )?;
    let work = Workload {
        brokers: &brokers,
        pg_url: &pg_url,
        topic: &topic,
        records: &records,
        windows: expected_windows(events) as i64,
        raw_points: raw_rows + i64::from(PARTITIONS),
        overrides: &overrides,
    };
    if !overrides.is_empty() {
        let shown: Vec<String> = overrides.iter().map(|(k, v)| format!("{k}={v}")).collect();
        writeln!(out, "  overrides: {}", shown.join(" "))?;
    }
    writeln!(
        out,
        "  {:<20} {:>10} {:>8} {:>9} {:>12} {:>12} {:>10}",
        "profile", "events/s", "vs raw", "vs psql", "last window", "archived", "peak RSS"
    )?;
    let picked = |name: &str| wanted.as_ref().is_none_or(|w| w.iter().any(|n| n == name));
    let mut bytewax_eps = None;
    if picked(BYTEWAX) {
        let python = env
            .get("PRIMESPARK_STACK_PYTHON")
            .ok_or("no PRIMESPARK_STACK_PYTHON (the stack's virtualenv, with bytewax)")?;
        let m = bytewax_peer(&rt, python, &work)?;
        let eps = events as f64 / m.processed.as_secs_f64();
        bytewax_eps = Some(eps);
        writeln!(
            out,
            "  {:<20} {:>10.0} {:>7.2}x {:>9} {:>11.1}s {:>12} {:>7.0} MB",
            BYTEWAX,
            eps,
            eps / raw_eps,
            "-",
            m.last_window.as_secs_f64(),
            "-",
            m.peak_rss_mb
        )?;
    }
    let mut aggregates_eps = None;
    for profile in PROFILES {
        if !picked(profile.name) {
            continue;
        }
        let m = run_profile(&rt, &binary, &work, profile)?;
        let eps = events as f64 / m.processed.as_secs_f64();
        if profile.name == "aggregates-only" {
            aggregates_eps = Some(eps);
        }
        let vs_psql = if profile.raw_to_postgres {
            let rows_per_s = raw_rows as f64 / m.processed.as_secs_f64();
            format!("{:.2}x", rows_per_s / psql_rows_per_s)
        } else {
            "-".to_owned()
        };
        writeln!(
            out,
            "  {:<20} {:>10.0} {:>7.2}x {:>9} {:>11.1}s {:>12} {:>7.0} MB",
            profile.name,
            eps,
            eps / raw_eps,
            vs_psql,
            m.last_window.as_secs_f64(),
            m.archived
                .map_or("-".to_owned(), |a| format!("{:.1}s", a.as_secs_f64())),
            m.peak_rss_mb
        )?;
    }
    if let (Some(ours), Some(peer)) = (aggregates_eps, bytewax_eps) {
        writeln!(
            out,
            "  aggregates-only / bytewax      : {:>10.2}x",
            ours / peer
        )?;
    }
    writeln!(
        out,
        "  targets (issue 18): aggregates-only >= 0.40x raw and >= 5x bytewax, <= 300 MB; every-sink >= 0.90x psql; every-sink+scoring <= 400 MB"
    )?;
    Ok(())
}
