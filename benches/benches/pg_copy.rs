//! Raw telemetry rows into PostgreSQL: the pipeline's writer (`postgres::write_raw`: binary COPY
//! into `device_metrics` plus the offsets upsert, one transaction per 20,000-row flush) against
//! `psql \copy` of the same rows from a CSV file, measured in the same run on a fresh database.
//!
//! Needs a PostgreSQL server: `deploy/dev/stack.sh up && eval "$(deploy/dev/stack.sh env)"`, then
//! `cargo bench -p primespark-benches --bench pg_copy`. The URL comes from
//! `PRIMESPARK_BENCH_PG_URL` or else `PRIMESPARK_POSTGRES__URL`; without either the bench says so
//! and exits without measuring.

use std::error::Error;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use primespark_benches::{psql_path, telemetry_rows, with_dbname, METRICS};
use primespark_connectors::postgres::{self, Backend};
use primespark_schemas::rows::{PartitionOffset, RawRow};
use tokio::runtime::Runtime;
use tokio_postgres::Client;

// The allocator the `primespark` binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROWS: usize = 1_000_000;
const DEVICES: usize = 1_000;
/// The PostgreSQL sink's default `flush_rows`.
const BATCH: usize = 20_000;
/// Measured runs per variant; the best one is reported (the first warms the caches).
const RUNS: usize = 2;
/// The targets.
const TARGET_ROWS_PER_S: f64 = 150_000.0;
const TARGET_RATIO: f64 = 0.80;

const COLUMNS: &str = "device_metrics (time, device_id, metric_name, value)";

type BoxError = Box<dyn Error>;

/// RFC 3339 in UTC with microseconds: `2025-11-05T14:00:00.000000Z`.
fn rfc3339_us(time_us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(time_us)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
        .unwrap_or_default()
}

fn write_csv(rows: &[RawRow], path: &Path) -> Result<u64, BoxError> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        if let RawRow::Telemetry(t) = r {
            // Device and metric names need no quoting; `{}` of an f64 round-trips exactly.
            writeln!(
                out,
                "{},{},{},{}",
                rfc3339_us(t.time_us),
                t.device_id,
                t.metric_name,
                t.value
            )?;
        }
    }
    out.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// What a run left in `device_metrics`: row count, first and last time, exact sum of values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Contents {
    rows: i64,
    first: String,
    last: String,
    sum: String,
}

async fn contents(client: &Client) -> Result<Contents, BoxError> {
    let row = client
        .query_one(
            "SELECT count(*), min(time)::text, max(time)::text, sum(value::numeric)::text \
             FROM device_metrics",
            &[],
        )
        .await?;
    Ok(Contents {
        rows: row.try_get(0)?,
        first: row.try_get::<_, Option<String>>(1)?.unwrap_or_default(),
        last: row.try_get::<_, Option<String>>(2)?.unwrap_or_default(),
        sum: row.try_get::<_, Option<String>>(3)?.unwrap_or_default(),
    })
}

/// Empties the tables a run writes, and checkpoints so one run's dirty pages are not flushed
/// during the next (best effort: CHECKPOINT needs superuser or `pg_checkpoint`).
async fn reset(client: &Client) -> Result<(), BoxError> {
    client
        .batch_execute("TRUNCATE device_metrics, source_offsets")
        .await?;
    let _ = client.batch_execute("CHECKPOINT").await;
    Ok(())
}

async fn run_pipeline(client: &mut Client, rows: &[RawRow]) -> Result<Duration, BoxError> {
    let started = Instant::now();
    for chunk in rows.chunks(BATCH) {
        let last = chunk.last().map_or((0, 0), |r| r.position());
        let offsets = [PartitionOffset {
            partition: last.0,
            next_offset: last.1 + 1,
            max_event_us: chunk.last().map_or(i64::MIN, RawRow::time_us),
        }];
        postgres::write_raw(
            client,
            "bench",
            "postgres_raw",
            "edge.telemetry",
            chunk,
            &[],
            &[],
            &offsets,
            &primespark_connectors::sink::fence::Fence::unfenced(),
            // The row store, as `psql \copy` beside it: the same work on both sides.
            false,
        )
        .await?;
    }
    Ok(started.elapsed())
}

fn run_psql(psql: &str, url: &str, csv: &Path) -> Result<Duration, BoxError> {
    let copy = format!(
        "\\copy {COLUMNS} FROM '{}' WITH (FORMAT csv)",
        csv.display()
    );
    let started = Instant::now();
    let out = Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", &copy])
        .output()
        .map_err(|e| format!("running {psql}: {e}"))?;
    let took = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{psql} \\copy failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(took)
}

struct Report {
    backend: Backend,
    server: String,
    csv_bytes: u64,
    pipeline: Vec<Duration>,
    psql: Vec<Duration>,
}

fn measure(rt: &Runtime, url: &str, rows: &[RawRow], psql: &str) -> Result<Report, BoxError> {
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("device_metrics.csv");
    let csv_bytes = write_csv(rows, &csv)?;

    let mut client = rt.block_on(postgres::connect(url))?;
    let backend = rt.block_on(postgres::migrate(&mut client))?;
    let server: String = rt
        .block_on(client.query_one("SHOW server_version", &[]))?
        .try_get(0)?;

    let mut report = Report {
        backend,
        server,
        csv_bytes,
        pipeline: Vec::new(),
        psql: Vec::new(),
    };
    let mut expected: Option<Contents> = None;
    let mut check = |variant: &str, got: Contents| -> Result<(), BoxError> {
        if got.rows != ROWS as i64 {
            return Err(format!(
                "{variant}: {} rows in device_metrics, expected {ROWS}",
                got.rows
            )
            .into());
        }
        match &expected {
            None => expected = Some(got),
            Some(want) if *want != got => {
                return Err(format!("{variant}: table contents differ: {got:?} vs {want:?}").into())
            }
            Some(_) => {}
        }
        Ok(())
    };
    for _ in 0..RUNS {
        rt.block_on(reset(&client))?;
        let took = rt.block_on(run_pipeline(&mut client, rows))?;
        check("write_raw", rt.block_on(contents(&client))?)?;
        report.pipeline.push(took);

        rt.block_on(reset(&client))?;
        let took = run_psql(psql, url, &csv)?;
        check("psql \\copy", rt.block_on(contents(&client))?)?;
        report.psql.push(took);
    }
    Ok(report)
}

fn main() {
    let mut out = std::io::stdout().lock();
    let Some(url) = ["PRIMESPARK_BENCH_PG_URL", "PRIMESPARK_POSTGRES__URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
    else {
        let _ = writeln!(
            out,
            "pg_copy: skipped, no PostgreSQL URL (PRIMESPARK_BENCH_PG_URL or PRIMESPARK_POSTGRES__URL).\n  \
             Start one with: deploy/dev/stack.sh up && eval \"$(deploy/dev/stack.sh env)\""
        );
        return;
    };
    // Like the pipeline's I/O runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let psql = psql_path();
    let rows = telemetry_rows(ROWS, DEVICES);

    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let db = format!("primespark_bench_pg_copy_{}_{stamp}", std::process::id());
    let admin = rt
        .block_on(postgres::connect(&url))
        .expect("connecting to PostgreSQL (is the stack up?)");
    rt.block_on(admin.batch_execute(&format!("CREATE DATABASE {db}")))
        .expect("creating the bench database");
    let result = measure(&rt, &with_dbname(&url, &db), &rows, &psql);
    let dropped =
        rt.block_on(admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")));
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "pg_copy: failed: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = dropped {
        let _ = writeln!(out, "pg_copy: warning: could not drop database {db}: {e}");
    }

    let best = |d: &[Duration]| d.iter().min().copied().unwrap_or_default();
    let (ours, base) = (best(&report.pipeline), best(&report.psql));
    let rate = |d: Duration| ROWS as f64 / d.as_secs_f64();
    let ratio = base.as_secs_f64() / ours.as_secs_f64();
    let runs = |d: &[Duration]| {
        d.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "pg_copy: {ROWS} telemetry rows ({DEVICES} devices x {} metrics) into device_metrics, \
         PostgreSQL {} ({:?} tables), best of {RUNS}",
        METRICS.len(),
        report.server,
        report.backend
    );
    let _ = writeln!(
        out,
        "  {:<36} {:>9} {:>9} {:>11} {:>9}",
        "variant", "rows", "seconds", "rows/s", "vs psql"
    );
    let _ = writeln!(
        out,
        "  {:<36} {:>9} {:>9.3} {:>11.0} {:>8.2}x",
        "psql \\copy CSV (baseline)",
        ROWS,
        base.as_secs_f64(),
        rate(base),
        1.0
    );
    let _ = writeln!(
        out,
        "  {:<36} {:>9} {:>9.3} {:>11.0} {:>8.2}x",
        format!("write_raw, {BATCH}-row transactions"),
        ROWS,
        ours.as_secs_f64(),
        rate(ours),
        ratio
    );
    let _ = writeln!(
        out,
        "  runs (s): write_raw [{}], psql [{}]; CSV {:.1} MB",
        runs(&report.pipeline),
        runs(&report.psql),
        report.csv_bytes as f64 / 1e6
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "  target >= {TARGET_ROWS_PER_S:.0} rows/s: {}; target >= {:.0}% of psql \\copy: {} ({:.0}%)",
        verdict(rate(ours) >= TARGET_ROWS_PER_S),
        TARGET_RATIO * 100.0,
        verdict(ratio >= TARGET_RATIO),
        ratio * 100.0
    );
}
