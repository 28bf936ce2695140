//! Helpers for primespark's end-to-end suites: the service stack (started through
//! `deploy/dev/stack.sh` when the environment does not already describe one), per-test
//! databases and topics, producers, and the pipeline as a child process.

pub mod compliance;
pub mod grafana;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

/// Addresses of the running stack.
#[derive(Debug, Clone)]
pub struct Stack {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// PostgreSQL URL of the stack's main database.
    pub postgres_url: String,
    /// Python interpreter with confluent-kafka, pyarrow and duckdb.
    pub python: String,
    /// `promtool`.
    pub promtool: String,
    /// The Prometheus server binary.
    pub prometheus: String,
    /// The S3-compatible server (moto), `http://127.0.0.1:PORT`.
    pub s3_endpoint: String,
    /// The broker whose log lives in the S3 server, so it survives its own restart.
    pub durable_brokers: String,
    /// Whether the main PostgreSQL (`postgres_url`) preloads TimescaleDB: the stack found the
    /// shared TimescaleDB build (`PRIMESPARK_STACK_TIMESCALEDB=1`).
    pub timescaledb: bool,
    /// PostgreSQL URL of the stack's second cluster, `postgres_plain`: the same binaries
    /// without the preload, so TimescaleDB is installed (when `timescaledb`) but not preloaded.
    /// Tests of the plain-PostgreSQL path run here. Empty when the stack predates it.
    pub plain_postgres_url: String,
    /// The stack's test CA (PEM): it signed the certificates of `kafka_tls_brokers` and of
    /// both PostgreSQL clusters (`localhost`, `127.0.0.1`).
    pub tls_ca: String,
    /// The Kafka listener that speaks TLS only (stunnel in front of a Tansu of its own).
    pub kafka_tls_brokers: String,
    /// The main PostgreSQL as a role refused on plain-text connections (`hostnossl ... reject`),
    /// by host name `localhost`; no `sslmode` in it.
    pub postgres_tls_only_url: String,
}

/// The repository root. Read at run time (cargo sets `CARGO_MANIFEST_DIR` for test runs):
/// clones of the repository share one target dir, and a library built in another clone would
/// otherwise point at that clone's files.
pub fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.join("..")
}

/// The stack, brought up once per test process if the environment does not name one.
pub fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let mut vars: HashMap<String, String> = std::env::vars().collect();
        if !vars.contains_key("PRIMESPARK_KAFKA__BROKERS") {
            let script = repo_root().join("deploy/dev/stack.sh");
            let up = Command::new("bash")
                .arg(&script)
                .arg("up")
                .status()
                .expect("running stack.sh up");
            assert!(up.success(), "stack.sh up failed");
            let out = Command::new("bash")
                .arg(&script)
                .arg("env")
                .output()
                .expect("running stack.sh env");
            assert!(out.status.success(), "stack.sh env failed");
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                    vars.insert(
                        k.to_owned(),
                        v.trim_matches(|c| c == '"' || c == '\'').to_owned(),
                    );
                }
            }
        }
        Stack {
            brokers: vars["PRIMESPARK_KAFKA__BROKERS"].clone(),
            postgres_url: vars["PRIMESPARK_POSTGRES__URL"].clone(),
            python: vars
                .get("PRIMESPARK_STACK_PYTHON")
                .cloned()
                .unwrap_or_else(|| "python3".into()),
            promtool: vars
                .get("PRIMESPARK_STACK_PROMTOOL")
                .cloned()
                .unwrap_or_else(|| "promtool".into()),
            prometheus: vars
                .get("PRIMESPARK_STACK_PROMETHEUS")
                .cloned()
                .unwrap_or_else(|| "prometheus".into()),
            s3_endpoint: vars
                .get("PRIMESPARK_STACK_S3_ENDPOINT")
                .cloned()
                .unwrap_or_default(),
            durable_brokers: vars
                .get("PRIMESPARK_STACK_DURABLE_BROKERS")
                .cloned()
                .unwrap_or_default(),
            timescaledb: vars
                .get("PRIMESPARK_STACK_TIMESCALEDB")
                .is_some_and(|v| v == "1"),
            plain_postgres_url: vars
                .get("PRIMESPARK_STACK_PLAIN_POSTGRES_URL")
                .cloned()
                .unwrap_or_default(),
            tls_ca: vars
                .get("PRIMESPARK_STACK_TLS_CA")
                .cloned()
                .unwrap_or_default(),
            kafka_tls_brokers: vars
                .get("PRIMESPARK_STACK_KAFKA_TLS_BROKERS")
                .cloned()
                .unwrap_or_default(),
            postgres_tls_only_url: vars
                .get("PRIMESPARK_STACK_POSTGRES_TLS_ONLY_URL")
                .cloned()
                .unwrap_or_default(),
        }
    })
}

/// A unique lower-case suffix for per-test names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Creates a fresh database for one test on the stack's main PostgreSQL and returns its URL.
pub async fn fresh_database(stack: &Stack, name: &str) -> Result<String> {
    fresh_database_on(&stack.postgres_url, name).await
}

/// Creates a fresh database `name` on the server of `url` (e.g. [`Stack::plain_postgres_url`])
/// and returns its URL.
pub async fn fresh_database_on(url: &str, name: &str) -> Result<String> {
    if url.is_empty() {
        bail!("no PostgreSQL URL (a stack from before postgres_plain? run deploy/dev/stack.sh down, then up)");
    }
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let (base, _) = url
        .rsplit_once('/')
        .context("postgres url has no database")?;
    Ok(format!("{base}/{name}"))
}

/// Connects to `url`.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Keys added to a [`TelemetryRun`]'s configuration.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sections<'a> {
    /// Appended to `[postgres]` (e.g. `flush_rows = 50`).
    pub postgres: &'a str,
    /// Appended to `[nas]` (which has `roll_interval = "1s"` already).
    pub nas: &'a str,
    /// Appended to `[query]`.
    pub query: &'a str,
    /// Whole sections at the end.
    pub extra: &'a str,
}

/// One telemetry-only test run: its own database, topic, work folder (NAS under `nas/`), SQL
/// endpoint address and configuration file. Most suites start from it.
pub struct TelemetryRun {
    /// Database (and bucket) name, unique to the test.
    pub db: String,
    /// The database's URL.
    pub url: String,
    /// The telemetry topic.
    pub topic: String,
    /// The test's folder; removed when the run is dropped.
    pub work: tempfile::TempDir,
    /// The NAS root inside it.
    pub nas: PathBuf,
    /// `127.0.0.1:PORT` of the SQL endpoint (and `/metrics`).
    pub http: String,
    /// The configuration file.
    pub config: PathBuf,
    /// Where [`TelemetryRun::start`] sends the pipeline's log.
    pub log: PathBuf,
}

impl TelemetryRun {
    /// A fresh database and a topic of `partitions` partitions named after `prefix`, and a
    /// configuration for the telemetry dataflow alone (anomaly scoring on, as by default, unless
    /// `extra` has `[inference] enabled = false`), with `sections` added.
    pub async fn new(prefix: &str, partitions: i32, sections: Sections<'_>) -> Result<Self> {
        let Sections {
            postgres,
            nas: nas_keys,
            query,
            extra,
        } = sections;
        let stack = stack();
        let db = unique(prefix);
        let url = fresh_database(stack, &db).await?;
        let topic = format!("edge.telemetry.{db}");
        create_topic(stack, &topic, partitions).await?;
        let work = tempfile::tempdir()?;
        let nas = work.path().join("nas");
        let http = format!("127.0.0.1:{}", free_port());
        let config = work.path().join("pipeline.toml");
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
                 [postgres]\nurl = \"{url}\"\n{postgres}\n\
                 [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n{nas_keys}\n\
                 [query]\nhttp_addr = \"{http}\"\n{query}\n\
                 [dataflows]\ninference = false\nanalytics = false\n{extra}\n",
                stack.brokers,
                nas.display(),
            ),
        )?;
        let log = work.path().join("pipeline.log");
        Ok(Self {
            db,
            url,
            topic,
            work,
            nas,
            http,
            config,
            log,
        })
    }

    /// Starts the pipeline on the configuration with `env` added.
    pub fn start(&self, env: &[(&str, &str)]) -> Result<Pipeline> {
        Pipeline::start(&self.config, env, &self.log)
    }

    /// The pipeline's log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The `i64` that `sql` (e.g. a `count(*)`) returns; 0 while it fails, e.g. before the pipeline
/// has run its migrations.
pub async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(0)
}

/// `device_metrics_1m` as bucket start (epoch milliseconds) -> (count, sum), for the rows that
/// `filter` (a `WHERE ...` clause, or empty) keeps.
pub async fn minute_windows(
    client: &tokio_postgres::Client,
    filter: &str,
) -> Result<std::collections::BTreeMap<i64, (i64, f64)>> {
    let rows = client
        .query(
            &format!(
                "SELECT (extract(epoch FROM bucket) * 1000)::int8, count, sum FROM device_metrics_1m {filter}"
            ),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}

/// Creates a topic.
pub async fn create_topic(stack: &Stack, topic: &str, partitions: i32) -> Result<()> {
    create_topic_on(&stack.brokers, topic, partitions).await
}

/// Creates a topic on the broker at `brokers`.
pub async fn create_topic_on(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let res = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        if let Err((t, e)) = r {
            bail!("creating {t}: {e}");
        }
    }
    Ok(())
}

/// How many partitions `topic` has.
pub fn partition_count(stack: &Stack, topic: &str) -> Result<usize> {
    partition_count_on(&stack.brokers, topic)
}

/// How many partitions `topic` has on the broker at `brokers`.
pub fn partition_count_on(brokers: &str, topic: &str) -> Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len()))
}

/// Gives `topic` on the stack's durable broker `partitions` partitions while it runs. Tansu
/// 0.6 refuses CreatePartitions, so this does what the request would: it raises the topic's
/// partition count in the cluster metadata Tansu keeps in its bucket (`DURABLE_BUCKET` in
/// `deploy/dev/stack.sh`), which the broker reads again once its cache of it expires. Returns
/// once the broker reports the new count.
pub fn grow_topic(stack: &Stack, topic: &str, partitions: i32) -> Result<()> {
    let script = format!(
        "import json, boto3\n\
         s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='testing', aws_secret_access_key='testing')\n\
         key = 'clusters/tansu_cluster/meta.json'\n\
         meta = json.loads(s3.get_object(Bucket='tansu-durable', Key=key)['Body'].read())\n\
         meta['topics']['{topic}']['topic']['num_partitions'] = {partitions}\n\
         s3.put_object(Bucket='tansu-durable', Key=key, Body=json.dumps(meta).encode())\n",
        stack.s3_endpoint,
    );
    let out = Command::new(&stack.python).args(["-c", &script]).output()?;
    if !out.status.success() {
        bail!("growing {topic}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // The broker caches its metadata for a few seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if partition_count_on(&stack.durable_brokers, topic)? == partitions as usize {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("the broker does not report {partitions} partitions for {topic}")
}

/// Produces `(partition, payload)` records in order and waits for delivery.
pub fn produce(stack: &Stack, topic: &str, records: &[(i32, Vec<u8>)]) -> Result<()> {
    produce_to(&stack.brokers, topic, records, Duration::from_secs(30))
}

/// Produces to the broker at `brokers`; waits up to `flush` for delivery (records queue in
/// the client while the broker is away).
pub fn produce_to(
    brokers: &str,
    topic: &str,
    records: &[(i32, Vec<u8>)],
    flush: Duration,
) -> Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()?;
    for (partition, payload) in records {
        let mut record = BaseRecord::<(), [u8]>::to(topic)
            .partition(*partition)
            .payload(payload.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    producer.poll(Duration::from_millis(10));
                    record = r;
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(flush)?;
    Ok(())
}

/// The `primespark-under-test` binary. Cargo builds it with the integration tests and puts it
/// in `target/<profile>/`, one level above the test executables in `deps/`
/// (`CARGO_BIN_EXE_*` is only set for the test crates, not for this library).
/// `PRIMESPARK_TEST_BINARY` overrides.
pub fn pipeline_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PRIMESPARK_TEST_BINARY") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("test executable has no folder")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps folder has no parent")?;
    }
    let bin = dir.join("primespark-under-test");
    if !bin.exists() {
        bail!(
            "{} not found; build it with `cargo test -p primespark-tests`",
            bin.display()
        );
    }
    Ok(bin)
}

/// A command for the binary under test with none of the stack's `PRIMESPARK_*` exports: the
/// test names every address itself, and an export would override it.
///
/// Retention is off: the suites replay event times from 2025, which a 30-day horizon would
/// delete at every start. `retention_e2e` turns it on through `env`.
pub fn pipeline_command() -> Result<Command> {
    let mut cmd = Command::new(pipeline_binary()?);
    for (k, _) in std::env::vars() {
        if k.starts_with("PRIMESPARK_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("PRIMESPARK_POSTGRES__RETENTION__ENABLED", "false");
    Ok(cmd)
}

/// `GET path` on `addr`; the whole response, status line and headers included.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp)
}

/// Status, headers (lower-case names) and body of an HTTP response.
pub type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// A raw HTTP/1.1 exchange: `method path` with extra `headers` and `body`; returns the status,
/// the response headers (lower-case names) and the body bytes (responses with a length).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    // A server may answer (413) before reading the whole body and close: not an error here.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP response from {addr}{path}"))?;
    let text = String::from_utf8_lossy(&resp[..split]).into_owned();
    let mut lines = text.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("0")
        .parse()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, resp[split + 4..].to_vec()))
}

/// The first row of `sql`'s result on the SQL endpoint at `http` (`POST /v1/sql`); an error
/// for any status but 200.
pub fn sql_first_row(http: &str, sql: &str) -> Result<Vec<serde_json::Value>> {
    let body = serde_json::json!({ "sql": sql }).to_string();
    let (status, text) = http_post(http, "/v1/sql", &body)?;
    if status != 200 {
        bail!("{sql}: {status} {text}");
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["rows"][0].as_array().cloned().unwrap_or_default())
}

/// POSTs `body` as JSON; returns the status and the body (a chunked body cut to its JSON).
pub fn http_post(addr: &str, path: &str, body: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status: u16 = resp.split_whitespace().nth(1).unwrap_or("0").parse()?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Chunked bodies: keep only the JSON.
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => body[a..=b].to_owned(),
        _ => body,
    };
    Ok((status, body))
}

/// `curl -sS --fail ARGS`: the body, or an error with curl's message.
pub fn curl(args: &[&str]) -> Result<String> {
    let out = Command::new("curl")
        .args(["-sS", "--fail"])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Keys under `prefix` in `bucket` of the stack's S3 server (ListObjectsV2, every page).
pub fn bucket_keys(stack: &Stack, bucket: &str, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut url = format!("{}/{bucket}?list-type=2&prefix={prefix}", stack.s3_endpoint);
        if let Some(t) = &token {
            url.push_str(&format!("&continuation-token={t}"));
        }
        let xml = curl(&[&url])?;
        keys.extend(
            xml.split("<Key>")
                .skip(1)
                .filter_map(|s| s.split("</Key>").next())
                .map(str::to_owned),
        );
        token = xml
            .split("<NextContinuationToken>")
            .nth(1)
            .and_then(|s| s.split("</NextContinuationToken>").next())
            .map(str::to_owned);
        if token.is_none() {
            return Ok(keys);
        }
    }
}

/// Rows, and distinct (kafka_partition, kafka_offset), of the Parquet objects under `prefix` in
/// the stack's S3 server, as pyarrow reads them from the bucket.
pub fn bucket_rows(stack: &Stack, bucket: &str, prefix: &str) -> Result<(u64, u64)> {
    let host = stack.s3_endpoint.trim_start_matches("http://");
    let script = format!(
        "import pyarrow.dataset as ds, pyarrow.fs as fs\n\
         s3 = fs.S3FileSystem(endpoint_override='{host}', scheme='http', access_key='testing', secret_key='testing', region='us-east-1')\n\
         t = ds.dataset('{bucket}/{prefix}', filesystem=s3, format='parquet', partitioning='hive').to_table()\n\
         print(t.num_rows, len(set(zip(t['kafka_partition'].to_pylist(), t['kafka_offset'].to_pylist()))))\n",
    );
    let out = Command::new(&stack.python).args(["-c", &script]).output()?;
    if !out.status.success() {
        bail!("pyarrow: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(rows)), Some(Ok(distinct))) => Ok((rows, distinct)),
        _ => bail!("pyarrow printed {text:?}"),
    }
}

/// `deploy/dev/stack.sh stop-service|start-service NAME`: one service of the stack down or up
/// again (outage tests).
pub fn stack_service(action: &str, service: &str) -> Result<()> {
    let status = Command::new(repo_root().join("deploy/dev/stack.sh"))
        .arg(action)
        .arg(service)
        .status()?;
    if !status.success() {
        bail!("stack.sh {action} {service} failed");
    }
    Ok(())
}

/// Files under `dir` (recursively) whose name ends in `.{extension}`.
pub fn count_files(dir: &Path, extension: &str) -> usize {
    let mut n = 0;
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == extension) {
                n += 1;
            }
        }
    }
    n
}

/// Rows in the finished (renamed) Parquet files under `dir`.
pub fn parquet_rows(dir: &Path) -> Result<i64> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let mut rows = 0;
    for path in parquet_files(dir)? {
        let reader = SerializedFileReader::new(std::fs::File::open(&path)?)?;
        rows += reader.metadata().file_metadata().num_rows();
    }
    Ok(rows)
}

/// The finished Parquet files under `dir` (temporary names end in `.inprogress`).
pub fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The `(kafka_partition, kafka_offset)` of every raw row archived under `dir`, sorted: equal
/// to the topic's positions when the archive holds each record once.
pub fn parquet_positions(dir: &Path) -> Result<Vec<(i32, i64)>> {
    use arrow::array::{Array, Int32Array, Int64Array};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut positions = Vec::new();
    for path in parquet_files(dir)? {
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path)?)?.build()?;
        for batch in reader {
            let batch = batch?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .with_context(|| format!("{}: no {name}", path.display()))
            };
            let p = column("kafka_partition")?;
            let o = column("kafka_offset")?;
            let (p, o) = (
                p.as_any()
                    .downcast_ref::<Int32Array>()
                    .context("kafka_partition is not int32")?,
                o.as_any()
                    .downcast_ref::<Int64Array>()
                    .context("kafka_offset is not int64")?,
            );
            positions.extend((0..batch.num_rows()).map(|i| (p.value(i), o.value(i))));
        }
    }
    positions.sort_unstable();
    Ok(positions)
}

/// The pipeline as a child process.
pub struct Pipeline {
    child: Child,
}

impl Pipeline {
    /// Starts `primespark run --config <config>` with `env` added.
    pub fn start(config: &Path, env: &[(&str, &str)], log: &Path) -> Result<Self> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = pipeline_command()?;
        cmd.arg("run").arg("--config").arg(config);
        cmd.envs(env.iter().copied())
            .env("RUST_LOG", "info,primespark_connectors=debug")
            .stdout(Stdio::null())
            .stderr(log_file);
        Ok(Self {
            child: cmd.spawn()?,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").arg("-TERM").arg(&pid).status()?;
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > timeout {
                self.child.kill()?;
                bail!("pipeline did not exit within {timeout:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends a signal by name (`USR1`, `TERM`, ...).
    pub fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{name} failed: {status}");
        }
        Ok(())
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit status, once it has exited on its own.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (it is its own test CA) and its key,
/// made by openssl in `dir`: `(cert.pem, key.pem)`.
pub fn self_signed_cert(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()?;
    if !made.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&made.stderr));
    }
    Ok((cert, key))
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18080)
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
