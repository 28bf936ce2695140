//! The pipeline on the three TimescaleDB states a server can be in.
//!
//! - Preloaded (the stack's `postgres` when it found the shared TimescaleDB build): every table
//!   `timescale_setup` (schemas/src/ddl.rs) names is a hypertable, the retention and
//!   compression policies of `[postgres.retention]` are TimescaleDB jobs, chunks compress with
//!   `compress_chunk`, and a pipeline restarted after compression keeps committing: COPY into
//!   compressed raw chunks, and upserts (late events re-emitting a window) into compressed
//!   aggregate chunks. Skipped, with a message on stderr saying why, when the stack reports
//!   TimescaleDB inactive.
//! - Installed but not preloaded (the stack's `postgres_plain`: the same binaries without
//!   `shared_preload_libraries`): `CREATE EXTENSION timescaledb` there is a FATAL that ends the
//!   connection; `migrate` must not try it, and every stream commits into plain tables.
//! - Absent: the state of a machine without the shared TimescaleDB folder (neither cluster has
//!   the extension installed). It is the `postgres_plain` test above on such a machine, and the
//!   decision itself (installed? available? preloaded?) is unit-tested as a pure function in
//!   `connectors/src/postgres/sink.rs` (`timescale_is_only_created_where_it_is_preloaded`).

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{TimeZone, Utc};
use primespark_connectors::postgres::RetentionConfig;
use primespark_dataflows::fleet::Fleet;
use primespark_tests::{
    connect, count, create_topic, free_port, fresh_database_on, http_get, produce, stack, unique,
    wait_until, Pipeline, Sections, TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z
const DEVICES: i64 = 4;
/// Rows per device and minute in `device_metrics_1m`: the two sent metrics and the two the
/// anomaly scores add (`anomaly_score`, `anomalies`).
const METRICS: i64 = 4;
const PI_WINDOWS: &str = "SELECT count(*) FROM device_metrics_1m WHERE device_id LIKE 'pi-%'";
const PI_SCORES: &str = "SELECT count(*) FROM anomaly_scores WHERE device_id LIKE 'pi-%'";

/// Tells the reader of the test output (captured output is not shown for passing tests, so
/// this goes to stderr directly) why a test did not run.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// One sample per device every second from `from_s` to `to_s` (seconds after T0), two metrics.
fn samples(from_s: i64, to_s: i64) -> Vec<(i32, Vec<u8>)> {
    (from_s..to_s)
        .flat_map(|s| (0..DEVICES).map(move |d| (s, d)))
        .map(|(s, d)| {
            let e = json!({"device_id": format!("pi-{d}"), "timestamp": T0_MS + s * 1000,
                           "metrics": {"cpu_percent": (s % 100) as f64, "load_avg": 0.5}});
            (0, e.to_string().into_bytes())
        })
        .collect()
}

/// An event of one more device at `at_s` that moves the watermark past every earlier window.
fn sentinel(at_s: i64) -> (i32, Vec<u8>) {
    let e =
        json!({"device_id": "sentinel", "timestamp": T0_MS + at_s * 1000, "metrics": {"up": 1.0}});
    (0, e.to_string().into_bytes())
}

/// The tables `timescale_setup` (schemas/src/ddl.rs) makes hypertables.
fn setup_hypertables() -> Result<BTreeSet<String>> {
    let tables: BTreeSet<String> = primespark_schemas::ddl::timescale_setup()
        .iter()
        .filter_map(|sql| sql.split("create_hypertable('").nth(1))
        .filter_map(|s| s.split('\'').next())
        .map(str::to_owned)
        .collect();
    if tables.len() < 10 {
        bail!("timescale_setup names only {tables:?}");
    }
    Ok(tables)
}

async fn strings(client: &tokio_postgres::Client, sql: &str) -> Result<BTreeSet<String>> {
    Ok(client
        .query(sql, &[])
        .await
        .with_context(|| sql.to_owned())?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Sink errors the pipeline counted (`primespark_sink_errors_total`), from `/metrics`.
fn sink_errors(http: &str) -> Result<f64> {
    let metrics = http_get(http, "/metrics")?;
    Ok(metrics
        .lines()
        .filter(|l| l.starts_with("primespark_sink_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypertables_policies_and_compressed_chunks_on_preloaded_timescaledb() -> Result<()> {
    let stack = stack();
    if !stack.timescaledb {
        skip(
            "hypertables_policies_and_compressed_chunks_on_preloaded_timescaledb",
            "the stack reports TimescaleDB inactive (PRIMESPARK_STACK_TIMESCALEDB != 1: no shared \
             TimescaleDB build at PRIMESPARK_TIMESCALEDB_DIR, default <repo>/../shared/timescaledb)",
        );
        return Ok(());
    }
    // Horizons far beyond the 2025 event times, so the policies exist but delete nothing;
    // an hour of allowed lateness, so late events re-emit windows already stored.
    let run = TelemetryRun::new(
        "timescale",
        1,
        Sections {
            postgres: "flush_rows = 500\nflush_interval = \"200ms\"\n\
                       [postgres.retention]\nraw_telemetry = \"3650d\"\nraw_inference = \"3650d\"\n\
                       aggregates_1m = \"3650d\"\naggregates_1h = \"3650d\"\naggregates_1d = \"3650d\"\ncompress_after = \"7d\"",
            extra: "[windows]\nallowed_lateness = \"1h\"\nidle_timeout = \"10m\"",
            ..Sections::default()
        },
    )
    .await?;
    let retention = [("PRIMESPARK_POSTGRES__RETENTION__ENABLED", "true")];
    let client = connect(&run.url).await?;

    // Phase 1: ten minutes of samples, a sentinel at T0+30 min.
    let mut first = samples(0, 600);
    first.push(sentinel(1800));
    produce(stack, &run.topic, &first)?;
    let points_1 = 600 * DEVICES * 2 + 1;
    let pipeline = run.start(&retention)?;
    let done = wait_until(Duration::from_secs(180), "phase 1 committed", || async {
        Ok(
            count(&client, "SELECT count(*) FROM device_metrics").await == points_1
                && count(&client, PI_SCORES).await == 600 * DEVICES
                && count(&client, PI_WINDOWS).await == 10 * DEVICES * METRICS,
        )
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", run.log_text());
    }
    let log = run.log_text();
    assert!(
        log.contains("timescaledb found: device_metrics is a hypertable"),
        "{log}"
    );

    // Every table the setup names is a hypertable.
    let hypertables = strings(
        &client,
        "SELECT hypertable_name::text FROM timescaledb_information.hypertables",
    )
    .await?;
    let wanted = setup_hypertables()?;
    let missing: Vec<_> = wanted.difference(&hypertables).collect();
    assert!(missing.is_empty(), "not hypertables: {missing:?}");

    // A retention policy per hypertable under retention, compression for the raw ones.
    let retained: BTreeSet<String> = RetentionConfig::default()
        .tables()
        .iter()
        .filter(|t| t.time_column != "received_at")
        .map(|t| t.table.to_owned())
        .collect();
    let compressed: BTreeSet<String> = RetentionConfig::default()
        .tables()
        .iter()
        .filter(|t| t.compress_segment_by.is_some())
        .map(|t| t.table.to_owned())
        .collect();
    assert!(compressed.contains("device_metrics") && compressed.len() >= 4);
    let retention_jobs = strings(
        &client,
        "SELECT hypertable_name::text FROM timescaledb_information.jobs WHERE proc_name = 'policy_retention'",
    )
    .await?;
    assert_eq!(retention_jobs, retained, "retention policies");
    let compression_jobs = strings(
        &client,
        "SELECT hypertable_name::text FROM timescaledb_information.jobs WHERE proc_name = 'policy_compression'",
    )
    .await?;
    assert_eq!(compression_jobs, compressed, "compression policies");
    assert!(retained.is_subset(&wanted), "{retained:?} vs {wanted:?}");

    let status = pipeline.terminate(Duration::from_secs(60))?;
    assert!(status.success(), "{status}\n{}", run.log_text());

    // Raw rows went straight into the columnstore (`postgres.direct_compress_copy`, on by
    // default, on a TimescaleDB that has it): device_metrics' chunks are compressed already,
    // and hold every row (checked below).
    let direct: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_settings \
             WHERE name = 'timescaledb.enable_direct_compress_copy')",
            &[],
        )
        .await?
        .get(0);
    if direct {
        let compressed_now = count(
            &client,
            "SELECT count(*) FROM timescaledb_information.chunks \
             WHERE hypertable_name = 'device_metrics' AND is_compressed",
        )
        .await;
        assert!(
            compressed_now > 0,
            "direct-to-columnstore COPY left device_metrics uncompressed"
        );
    }

    // Compress every chunk of the raw telemetry tables, and of device_metrics_1m (no policy
    // compresses aggregates; a DBA might), so phase 2 writes into compressed chunks.
    client
        .batch_execute(
            "ALTER TABLE device_metrics_1m SET (timescaledb.compress, \
             timescaledb.compress_segmentby = 'device_id, metric_name', \
             timescaledb.compress_orderby = 'bucket DESC')",
        )
        .await?;
    for table in ["device_metrics", "anomaly_scores", "device_metrics_1m"] {
        client
            .batch_execute(&format!(
                "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks('{table}') c"
            ))
            .await
            .with_context(|| format!("compressing {table}"))?;
        let chunks = count(
            &client,
            &format!(
                "SELECT count(*) FROM timescaledb_information.chunks \
                 WHERE hypertable_name = '{table}' AND NOT is_compressed"
            ),
        )
        .await;
        assert_eq!(chunks, 0, "{table} has uncompressed chunks left");
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM device_metrics").await,
        points_1
    );
    let minute5 = "SELECT count FROM device_metrics_1m WHERE device_id = 'pi-0' \
                   AND metric_name = 'cpu_percent' AND bucket = to_timestamp(1762351500)";
    assert_eq!(count(&client, minute5).await, 60);

    // Phase 2, restarted on the compressed chunks: late samples for minute 5 (within the
    // allowed lateness: the stored window is updated in its compressed chunk), five more
    // minutes after the sentinel, and a second sentinel.
    let mut second: Vec<(i32, Vec<u8>)> = (0..DEVICES)
        .map(|d| {
            let e = json!({"device_id": format!("pi-{d}"), "timestamp": T0_MS + 330_500,
                           "metrics": {"cpu_percent": 99.0, "load_avg": 0.5}});
            (0, e.to_string().into_bytes())
        })
        .collect();
    second.extend(samples(1800, 2100));
    second.push(sentinel(3000));
    produce(stack, &run.topic, &second)?;
    let points_2 = points_1 + DEVICES * 2 + 300 * DEVICES * 2 + 1;
    let _pipeline = run.start(&retention)?;
    let done = wait_until(Duration::from_secs(180), "phase 2 committed", || async {
        Ok(
            count(&client, "SELECT count(*) FROM device_metrics").await == points_2
                && count(&client, minute5).await == 61
                && count(
                    &client,
                    &format!("{PI_WINDOWS} AND bucket >= to_timestamp(1762353000)"),
                )
                .await
                    == 5 * DEVICES * METRICS,
        )
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", run.log_text());
    }
    // The updated window holds the late sample, the rest of its rows are untouched.
    let row = client
        .query_one(
            "SELECT count, max, sum FROM device_metrics_1m WHERE device_id = 'pi-0' \
             AND metric_name = 'cpu_percent' AND bucket = to_timestamp(1762351500)",
            &[],
        )
        .await?;
    let (n, max, sum): (i64, f64, f64) = (row.get(0), row.get(1), row.get(2));
    let want_sum: f64 = (300..360).map(|s| (s % 100) as f64).sum::<f64>() + 99.0;
    assert_eq!((n, max), (61, 99.0));
    assert!((sum - want_sum).abs() < 1e-9, "{sum} vs {want_sum}");
    assert_eq!(
        count(&client, PI_WINDOWS).await,
        (10 + 5) * DEVICES * METRICS
    );
    assert_eq!(count(&client, PI_SCORES).await, (600 + 1 + 300) * DEVICES);
    // Nothing was retried: no write failed on the compressed chunks.
    assert_eq!(sink_errors(&run.http)?, 0.0, "{}", run.log_text());
    Ok(())
}

/// What a fleet sends to one stream's topic.
struct Stream {
    topic: String,
    records: Vec<(i32, Vec<u8>)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_commits_on_installed_but_not_preloaded_timescaledb() -> Result<()> {
    let stack = stack();
    let db = unique("tsplain");
    let url = fresh_database_on(&stack.plain_postgres_url, &db).await?;
    let client = connect(&url).await?;
    let available = count(
        &client,
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'",
    )
    .await
        == 1;
    assert_eq!(
        available, stack.timescaledb,
        "postgres_plain has the same binaries as postgres: TimescaleDB installed iff the stack has it"
    );
    if available {
        // The state this covers: creating the extension here ends the connection.
        let probe = connect(&url).await?;
        let e = probe
            .batch_execute("CREATE EXTENSION timescaledb")
            .await
            .expect_err("CREATE EXTENSION without the preload");
        let message = e.as_db_error().map(|d| d.message().to_owned());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("must be preloaded")),
            "{e:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(probe.is_closed(), "the FATAL ends the connection");
    } else {
        skip(
            "every_stream_commits_on_installed_but_not_preloaded_timescaledb",
            "TimescaleDB is not installed on this stack: this run covers the absent state",
        );
    }

    // All three streams, 1500 telemetry events and 300 of each other kind, in November 2025;
    // then one event per stream an hour later, closing every window.
    let mut fleet = Fleet::new(20, 0.0, 19);
    let time = |i: i64| Utc.timestamp_millis_opt(T0_MS + i * 200).single();
    let mut streams: Vec<Stream> = ["telemetry", "inference", "events"]
        .iter()
        .map(|kind| Stream {
            topic: format!("{kind}.{db}"),
            records: Vec::new(),
        })
        .collect();
    for i in 0..1500 {
        let t = time(i).context("time")?;
        streams[0].records.push((0, fleet.next_event(t).1));
        if i % 5 == 0 {
            streams[1].records.push((0, fleet.next_inference(t).1));
            streams[2].records.push((0, fleet.next_analytics(t).1));
        }
    }
    let later = time(1500 + 18_000).context("time")?;
    streams[0].records.push((0, fleet.next_event(later).1));
    streams[1].records.push((0, fleet.next_inference(later).1));
    streams[2].records.push((0, fleet.next_analytics(later).1));
    // One row per numeric metric (temperature is null on some devices).
    let points: i64 = streams[0]
        .records
        .iter()
        .map(|(_, p)| {
            let v: serde_json::Value = serde_json::from_slice(p).unwrap_or_default();
            v["metrics"]
                .as_object()
                .map_or(0, |m| m.values().filter(|x| x.is_number()).count() as i64)
        })
        .sum();
    for s in &streams {
        create_topic(stack, &s.topic, 1).await?;
        produce(stack, &s.topic, &s.records)?;
    }

    let work = tempfile::tempdir()?;
    let config = work.path().join("pipeline.toml");
    let http = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{}\"\ninference = \"{}\"\n\
             events = \"{}\"\n[postgres]\nurl = \"{url}\"\n[nas]\npath = \"{}\"\n\
             [query]\nhttp_addr = \"{http}\"\n[inference]\nenabled = false\n",
            stack.brokers,
            streams[0].topic,
            streams[1].topic,
            streams[2].topic,
            work.path().join("nas").display(),
        ),
    )?;
    let log = work.path().join("pipeline.log");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let pipeline = Pipeline::start(&config, &[], &log)?;
    let offsets = |dataflow: &str, sink: &str| {
        format!(
            "SELECT COALESCE(sum(next_offset), 0)::bigint FROM source_offsets \
             WHERE dataflow = '{dataflow}' AND sink = '{sink}'"
        )
    };
    let done = wait_until(
        Duration::from_secs(180),
        "every stream committed",
        || async {
            let mut all = true;
            for (dataflow, s) in ["telemetry", "inference", "analytics"].iter().zip(&streams) {
                all &= count(&client, &offsets(dataflow, "postgres_raw")).await
                    == s.records.len() as i64;
            }
            Ok(all
                && count(&client, "SELECT count(*) FROM device_metrics").await >= points
                && count(&client, "SELECT count(*) FROM device_metrics_1m").await > 0
                && count(&client, "SELECT count(*) FROM inference_stats_1m").await > 0
                && count(&client, "SELECT count(*) FROM api_events_1m").await > 0)
        },
    )
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", log_text());
    }
    // Every record of every stream is a row: nothing was refused or lost.
    assert_eq!(
        count(&client, "SELECT count(*) FROM device_metrics").await,
        points
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM ai_inference_results").await,
        streams[1].records.len() as i64
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM analytics_events").await,
        streams[2].records.len() as i64
    );
    assert_eq!(count(&client, "SELECT count(*) FROM dead_letters").await, 0);
    // Plain tables, and the log says why.
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        )
        .await,
        0
    );
    let text = log_text();
    let why = if available {
        "timescaledb installed but not preloaded: plain tables"
    } else {
        "timescaledb not installed: plain PostgreSQL tables"
    };
    assert!(text.contains(why), "no {why:?} in the log:\n{text}");
    assert!(!text.contains("must be preloaded"), "{text}");
    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}
