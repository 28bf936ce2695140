//! Dashboard queries over the Parquet archive: one day of 1-minute aggregates of 1,000 devices
//! (`device_metrics_1m`, 1.44M rows) through our DataFusion session (`query::session`, the
//! `time_bucket` function, the `date` partition column) against DuckDB on the same files and
//! query, measured in the same run.
//!
//! Three layouts of the same rows: one file per hour written with a plain `ArrowWriter` (24
//! files); the pipeline's own while windows may still change (`nas::write_aggregate_files`: one
//! file per 1-minute window, 1,440 files; only the last hour or so looks like this); and the
//! pipeline's layout of final hours (`nas::compact::compact` merges each hour's minute files
//! into one: 24 files), which is what a day of history is. Two queries: the
//! "CPU by device" panel over 6 hours in 5-minute buckets, and the whole day in 1-hour buckets.
//! Each engine warms up 5 times, then 50 runs are timed (planning, execution and collecting the
//! result); the report gives p50, p95 and max and checks that the engines agree.
//!
//! DuckDB runs in one Python process: `$PRIMESPARK_STACK_PYTHON`, else
//! `$HOME/.cache/primespark-tools/venv/bin/python` (`deploy/dev` installs `duckdb` there).
//! Without it the baseline is skipped and the report says why. Python cannot fetch a
//! `TIMESTAMPTZ` without `pytz`, so DuckDB's timed statement wraps the query in
//! `SELECT epoch_us(time), cpu FROM (...)`, a projection of at most 72 rows.
//!
//! `PRIMESPARK_BENCH_DATAFUSION_SET` may hold `;`-separated statements run on our session
//! before measuring (e.g. `SET datafusion.execution.target_partitions = 1`), to try settings;
//! a non-empty `PRIMESPARK_BENCH_EXPLAIN` prints each query's `EXPLAIN ANALYZE` after its runs.
//!
//! Run with `cargo bench -p primespark-benches --bench dashboard_query`.

use std::error::Error;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, TimeUnit, TimestampMicrosecondType};
use datafusion::arrow::util::pretty::pretty_format_batches;
use datafusion::prelude::SessionContext;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use primespark_connectors::nas::compact::compact;
use primespark_connectors::nas::{aggregate_batch, write_aggregate_files};
use primespark_schemas::rows::{Agg, AggRow, MetricAggRow, Rollup};
use serde_json::{json, Value};
use tokio::runtime::Runtime;

// The allocator the `primespark` binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: usize = 1_000;
const MINUTES: i64 = 1_440;
/// 2025-11-05T00:00:00Z.
const DAY_US: i64 = 1_762_300_800_000_000;
const DATE: &str = "2025-11-05";
const MINUTE_US: i64 = 60_000_000;
/// `nas.row_group_rows` default.
const ROW_GROUP_ROWS: usize = 128 * 1024;
/// The query endpoint's default memory pool.
const MEMORY_LIMIT: usize = 512 << 20;
const WARMUPS: usize = 5;
const RUNS: usize = 50;
/// The issue's targets: p95 at most this, and at most `TARGET_RATIO` times DuckDB's p95.
const TARGET_P95_MS: f64 = 50.0;
const TARGET_RATIO: f64 = 1.5;
/// Largest relative difference of a bucket's value between the engines.
const TOLERANCE: f64 = 1e-9;

type BoxError = Box<dyn Error>;

/// One dashboard query, written for both engines from the same parts.
struct Query {
    name: &'static str,
    width: &'static str,
    filter: &'static str,
}

const QUERIES: [Query; 2] = [
    Query {
        name: "6 h, 5-min buckets",
        width: "5 minutes",
        filter: " AND bucket >= TIMESTAMPTZ '2025-11-05T12:00:00Z' \
                 AND bucket < TIMESTAMPTZ '2025-11-05T18:00:00Z'",
    },
    Query {
        name: "24 h, 1-hour buckets",
        width: "1 hour",
        filter: "",
    },
];

impl Query {
    fn sql(&self, width: &str, from: &str) -> String {
        format!(
            "SELECT time_bucket({width}, bucket) AS time, avg(avg) AS cpu FROM {from} \
             WHERE metric_name = 'cpu_percent'{} GROUP BY 1 ORDER BY 1",
            self.filter
        )
    }

    /// Ours, as the dashboards send it.
    fn datafusion(&self) -> String {
        self.sql(&format!("'{}'", self.width), "device_metrics_1m")
    }

    fn duckdb(&self, root: &Path) -> String {
        let glob = root
            .join("table=device_metrics_1m")
            .join("**")
            .join("*.parquet");
        self.sql(
            &format!("INTERVAL '{}'", self.width),
            &format!(
                "read_parquet('{}', hive_partitioning = true)",
                glob.display()
            ),
        )
    }
}

/// The 1-minute CPU aggregate of `device` in `minute` of the day.
fn metric_row(device: usize, minute: i64) -> MetricAggRow {
    let avg = ((device as i64 * 7_919 + minute * 104_729) % 10_000) as f64 / 100.0;
    MetricAggRow {
        bucket_us: DAY_US + minute * MINUTE_US,
        device_id: format!("pi-{device:05}"),
        metric_name: "cpu_percent".to_owned(),
        count: 6,
        sum: avg * 6.0,
        min: avg * 0.8,
        max: (avg * 1.2).min(100.0),
    }
}

/// One file per hour under `<root>/table=device_metrics_1m/date=...`, written like the
/// pipeline's aggregate files (zstd level 1, `ROW_GROUP_ROWS`-row groups).
fn write_hourly(root: &Path) -> Result<(), BoxError> {
    let dir = root
        .join("table=device_metrics_1m")
        .join(format!("date={DATE}"));
    fs::create_dir_all(&dir)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    for hour in 0..MINUTES / 60 {
        let rows: Vec<MetricAggRow> = (hour * 60..(hour + 1) * 60)
            .flat_map(|m| (0..DEVICES).map(move |d| metric_row(d, m)))
            .collect();
        let batch = aggregate_batch(&rows.iter().collect::<Vec<_>>())?;
        let file = fs::File::create(dir.join(format!("part-h{hour:02}.parquet")))?;
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props.clone()))?;
        writer.write(&batch)?;
        writer.close()?;
    }
    Ok(())
}

/// The pipeline's layout: `write_aggregate_files` once per closed 1-minute window.
fn write_pipeline(root: &Path) -> Result<(), BoxError> {
    for minute in 0..MINUTES {
        let rows: Vec<AggRow> = (0..DEVICES)
            .map(|d| AggRow {
                rollup: Rollup::Minute,
                row: Agg::Metrics(metric_row(d, minute)),
            })
            .collect();
        write_aggregate_files(root, &rows, ROW_GROUP_ROWS)?;
    }
    Ok(())
}

/// The pipeline's layout of a final day: its minute files, compacted into one file per hour
/// by `nas::compact` as the aggregate writer does once the hours are final.
fn write_compacted(root: &Path) -> Result<(), BoxError> {
    write_pipeline(root)?;
    let end_of_day = DAY_US + MINUTES * MINUTE_US;
    let report = compact(root, end_of_day, ROW_GROUP_ROWS)?;
    if report.hours != 24 {
        return Err(format!("compacted {} hours, expected 24", report.hours).into());
    }
    Ok(())
}

/// Files and bytes of the `*.parquet` files under `dir`.
fn disk_usage(dir: &Path) -> Result<(usize, u64), BoxError> {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                files += 1;
                bytes += fs::metadata(&path)?.len();
            }
        }
    }
    Ok((files, bytes))
}

/// Per-run milliseconds and the result (bucket start in µs, value), sorted by bucket.
#[derive(Default)]
struct Measured {
    ms: Vec<f64>,
    rows: Vec<(i64, f64)>,
}

/// Nearest-rank percentile of `ms`.
fn percentile(ms: &[f64], p: f64) -> f64 {
    let mut sorted = ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

fn result_rows(batches: &[RecordBatch]) -> Result<Vec<(i64, f64)>, BoxError> {
    let mut rows = Vec::new();
    for b in batches {
        let time = cast(
            b.column(0),
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )?;
        let time = time.as_primitive::<TimestampMicrosecondType>();
        let cpu = cast(b.column(1), &DataType::Float64)?;
        let cpu = cpu.as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            let v = if cpu.is_null(i) {
                f64::NAN
            } else {
                cpu.value(i)
            };
            rows.push((time.value(i), v));
        }
    }
    rows.sort_by_key(|r| r.0);
    Ok(rows)
}

async fn run_once(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, BoxError> {
    Ok(ctx.sql(sql).await?.collect().await?)
}

fn measure_datafusion(rt: &Runtime, ctx: &SessionContext, sql: &str) -> Result<Measured, BoxError> {
    let mut m = Measured::default();
    for _ in 0..WARMUPS {
        rt.block_on(run_once(ctx, sql))?;
    }
    for _ in 0..RUNS {
        let started = Instant::now();
        let batches = rt.block_on(run_once(ctx, sql))?;
        m.ms.push(started.elapsed().as_secs_f64() * 1e3);
        m.rows = result_rows(&batches)?;
    }
    Ok(m)
}

/// Reads `{"queries": [sql, ...], "warmups": n, "runs": n}` on stdin; prints
/// `{"version", "threads", "results": [{"ms": [...], "rows": [[us, cpu], ...]}, ...]}` or
/// `{"error": "..."}`.
const DUCKDB_SCRIPT: &str = r#"
import json, sys, time
spec = json.load(sys.stdin)
try:
    import duckdb
except ImportError as e:
    print(json.dumps({"error": "cannot import duckdb: %s" % e}))
    sys.exit(0)
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
out = {
    "version": duckdb.__version__,
    "threads": con.execute("SELECT current_setting('threads')").fetchone()[0],
    "results": [],
}
for q in spec["queries"]:
    sql = "SELECT epoch_us(time) AS time, cpu FROM (" + q + ")"
    for _ in range(spec["warmups"]):
        con.execute(sql).fetchall()
    ms = []
    for _ in range(spec["runs"]):
        started = time.perf_counter()
        rows = con.execute(sql).fetchall()
        ms.append((time.perf_counter() - started) * 1e3)
    out["results"].append({"ms": ms, "rows": rows})
print(json.dumps(out))
"#;

struct DuckDb {
    version: String,
    threads: String,
    /// Per query, in the order given.
    results: Vec<Measured>,
}

fn python_path() -> PathBuf {
    match std::env::var_os("PRIMESPARK_STACK_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/primespark-tools/venv/bin/python"),
    }
}

/// DuckDB on `queries`, or why it could not run.
fn measure_duckdb(python: &Path, queries: &[String]) -> Result<DuckDb, String> {
    if !python.exists() {
        return Err(format!(
            "{} not found (set PRIMESPARK_STACK_PYTHON)",
            python.display()
        ));
    }
    let spec = json!({"queries": queries, "warmups": WARMUPS, "runs": RUNS});
    let mut child = Command::new(python)
        .args(["-c", DUCKDB_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", python.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(spec.to_string().as_bytes())
            .map_err(|e| format!("writing to {}: {e}", python.display()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or("").to_owned();
        return Err(format!(
            "{} exited with {}: {last}",
            python.display(),
            out.status
        ));
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("reading DuckDB's report: {e}"))?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Err(e.to_owned());
    }
    let results = v["results"]
        .as_array()
        .ok_or("DuckDB's report has no results")?
        .iter()
        .map(|r| {
            let ms = r["ms"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let mut rows: Vec<(i64, f64)> = r["rows"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|row| {
                            Some((row[0].as_i64()?, row[1].as_f64().unwrap_or(f64::NAN)))
                        })
                        .collect()
                })
                .unwrap_or_default();
            rows.sort_by_key(|r| r.0);
            Measured { ms, rows }
        })
        .collect();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Ok(DuckDb {
        version: text(&v["version"]),
        threads: text(&v["threads"]),
        results,
    })
}

/// Why the two results differ, if they do.
fn mismatch(ours: &[(i64, f64)], theirs: &[(i64, f64)]) -> Option<String> {
    if ours.len() != theirs.len() {
        return Some(format!(
            "{} result rows from DataFusion, {} from DuckDB",
            ours.len(),
            theirs.len()
        ));
    }
    ours.iter().zip(theirs).find_map(|(a, b)| {
        let close = (a.1 - b.1).abs() <= TOLERANCE * a.1.abs().max(b.1.abs()).max(1.0);
        (a.0 != b.0 || !close).then(|| {
            format!(
                "bucket {} = {} from DataFusion, bucket {} = {} from DuckDB",
                a.0, a.1, b.0, b.1
            )
        })
    })
}

/// One layout of the day's rows.
struct Layout {
    name: &'static str,
    root: PathBuf,
    files: usize,
    bytes: u64,
}

fn main() {
    let mut out = std::io::stdout().lock();
    let tmp = tempfile::tempdir().expect("creating a temporary folder");
    let mut layouts = Vec::new();
    for (name, write) in [
        (
            "hourly (24 files)",
            write_hourly as fn(&Path) -> Result<(), BoxError>,
        ),
        ("pipeline (1 file/min)", write_pipeline),
        ("pipeline, compacted", write_compacted),
    ] {
        let root = tmp.path().join(layouts.len().to_string());
        let started = Instant::now();
        write(&root).expect("writing the Parquet files");
        let (files, bytes) =
            disk_usage(&root.join("table=device_metrics_1m")).expect("listing the Parquet files");
        let _ = writeln!(
            out,
            "dashboard_query: wrote {name}: {files} files, {:.1} MB in {:.1} s",
            bytes as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
        layouts.push(Layout {
            name,
            root,
            files,
            bytes,
        });
    }

    // Like the query endpoint's runtime on a 2-core node.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let settings: Vec<String> = std::env::var("PRIMESPARK_BENCH_DATAFUSION_SET")
        .unwrap_or_default()
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();

    let explain = std::env::var_os("PRIMESPARK_BENCH_EXPLAIN").is_some_and(|v| !v.is_empty());

    // DataFusion, then DuckDB, each over every layout and query.
    let mut ours: Vec<Measured> = Vec::new();
    let mut target_partitions = 0;
    for layout in &layouts {
        let ctx = primespark_connectors::query::session(
            &layout.root,
            None,
            "edge.telemetry",
            "edge.ai.inference",
            "analytics.events",
            MEMORY_LIMIT,
        )
        .expect("opening the query session");
        for s in &settings {
            rt.block_on(run_once(&ctx, s))
                .unwrap_or_else(|e| panic!("{s}: {e}"));
        }
        target_partitions = ctx.state().config().target_partitions();
        for q in &QUERIES {
            ours.push(
                measure_datafusion(&rt, &ctx, &q.datafusion())
                    .unwrap_or_else(|e| panic!("DataFusion, {}, {}: {e}", layout.name, q.name)),
            );
            if explain {
                let plan = rt
                    .block_on(run_once(
                        &ctx,
                        &format!("EXPLAIN ANALYZE {}", q.datafusion()),
                    ))
                    .and_then(|b| Ok(pretty_format_batches(&b)?.to_string()))
                    .unwrap_or_else(|e| format!("EXPLAIN ANALYZE failed: {e}"));
                let _ = writeln!(out, "dashboard_query: {}, {}:\n{plan}", layout.name, q.name);
            }
        }
    }
    let duck_queries: Vec<String> = layouts
        .iter()
        .flat_map(|l| QUERIES.iter().map(|q| q.duckdb(&l.root)))
        .collect();
    let duck = measure_duckdb(&python_path(), &duck_queries);

    let _ = writeln!(
        out,
        "dashboard_query: device_metrics_1m, 1 day x {DEVICES} devices x cpu_percent = {} rows; \
         {WARMUPS} warm-ups, then {RUNS} timed runs per query and engine",
        MINUTES as usize * DEVICES
    );
    for l in &layouts {
        let _ = writeln!(
            out,
            "  layout {:<22} {:>5} files {:>7.1} MB",
            l.name,
            l.files,
            l.bytes as f64 / 1e6
        );
    }
    let _ = writeln!(
        out,
        "  DataFusion {} (target_partitions {target_partitions}, 2 tokio workers){}",
        datafusion::DATAFUSION_VERSION,
        if settings.is_empty() {
            String::new()
        } else {
            format!(", with: {}", settings.join("; "))
        }
    );
    match &duck {
        Ok(d) => {
            let _ = writeln!(
                out,
                "  DuckDB {} (threads {}), baseline",
                d.version, d.threads
            );
        }
        Err(why) => {
            let _ = writeln!(out, "  DuckDB baseline skipped: {why}");
        }
    }
    let _ = writeln!(
        out,
        "  {:<22} {:<22} {:<11} {:>7} {:>7} {:>7} {:>5}",
        "query", "layout", "engine", "p50 ms", "p95 ms", "max ms", "rows"
    );
    let line = |out: &mut std::io::StdoutLock<'_>, q: &str, l: &str, e: &str, m: &Measured| {
        let max = m.ms.iter().copied().fold(f64::NAN, f64::max);
        let _ = writeln!(
            out,
            "  {q:<22} {l:<22} {e:<11} {:>7.2} {:>7.2} {:>7.2} {:>5}",
            percentile(&m.ms, 50.0),
            percentile(&m.ms, 95.0),
            max,
            m.rows.len()
        );
    };
    let yes = |ok: bool| if ok { "yes" } else { "no" };
    let mut k = 0;
    for l in &layouts {
        for q in &QUERIES {
            let m = &ours[k];
            line(&mut out, q.name, l.name, "DataFusion", m);
            let p95 = percentile(&m.ms, 95.0);
            let theirs = duck.as_ref().ok().and_then(|d| d.results.get(k));
            match theirs {
                Some(d) => {
                    line(&mut out, "", "", "DuckDB", d);
                    let ratio = p95 / percentile(&d.ms, 95.0);
                    let _ = writeln!(
                        out,
                        "    p95 DataFusion / DuckDB {ratio:.2}x; p95 <= {TARGET_P95_MS} ms: {}, \
                         ratio <= {TARGET_RATIO}: {}; meets target: {}",
                        yes(p95 <= TARGET_P95_MS),
                        yes(ratio <= TARGET_RATIO),
                        yes(p95 <= TARGET_P95_MS && ratio <= TARGET_RATIO)
                    );
                    match mismatch(&m.rows, &d.rows) {
                        None => {
                            let _ = writeln!(
                                out,
                                "    results agree: {} rows, values within {TOLERANCE:e}",
                                m.rows.len()
                            );
                        }
                        Some(why) => {
                            let _ = writeln!(out, "    !!! RESULTS DIFFER: {why}");
                        }
                    }
                }
                None => {
                    let _ = writeln!(
                        out,
                        "    p95 <= {TARGET_P95_MS} ms: {}; ratio to DuckDB not measured; \
                         meets target: unknown",
                        yes(p95 <= TARGET_P95_MS)
                    );
                }
            }
            k += 1;
        }
    }
}
