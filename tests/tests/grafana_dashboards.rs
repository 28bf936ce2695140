//! The shipped Grafana dashboards (deploy/grafana/dashboards) work on what the pipeline writes:
//! they follow the conventions (uids, tags, UTC, the TimescaleDB data source, raw SQL in code
//! mode, aggregate tables rather than raw ones), their PromQL parses with `promtool` and uses
//! series the pipeline exports, and every SQL panel query, expanded exactly as Grafana's
//! PostgreSQL data source expands it (`primespark_tests::grafana`), runs on PostgreSQL after a
//! pipeline has consumed telemetry, inference and analytics events, and returns rows.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use chrono::{DateTime, Utc};
use primespark_dataflows::fleet::Fleet;
use primespark_schemas::streams::{SHARED_TABLES, STREAMS};
use primespark_tests::grafana::{
    panel_exprs, panel_queries, panels, substitute_variables, try_expand_macros, MacroContext,
};
use primespark_tests::{
    connect, count, create_topic, free_port, fresh_database, produce, repo_root, stack, unique,
    wait_until, Pipeline,
};
use serde_json::{json, Value};

/// The dashboards of this suite (pipeline-health.json is checked by deploy_files.rs).
const DASHBOARDS: [(&str, &str); 4] = [
    ("system-overview", "primespark: System Overview"),
    ("kafka-streams", "primespark: Kafka Streams"),
    ("edge-vs-cloud", "primespark: Edge vs Cloud"),
    ("tasks", "primespark: Tasks"),
];
/// The TimescaleDB data source of deploy/grafana/provisioning/datasources/primespark.yml.
const SQL_DATASOURCE: &str = "primespark-timescaledb";
/// Raw tables that have aggregates (each stream's own events): panels read the aggregates
/// instead.
fn raw_with_aggregates() -> Vec<&'static str> {
    STREAMS
        .iter()
        .filter(|s| !s.aggregates.is_empty())
        .filter_map(|s| s.raw_tables.first().map(|t| t.name))
        .collect()
}

/// Tables a panel may read, from the table of streams: every aggregate table, the raw tables
/// without aggregates of their own (scores, anomalies) and the shared tables.
fn panel_tables() -> Vec<&'static str> {
    let with_aggregates = raw_with_aggregates();
    STREAMS
        .iter()
        .flat_map(|s| s.aggregate_tables().map(|(_, t)| t))
        .chain(
            primespark_schemas::streams::raw_tables()
                .map(|t| t.name)
                .filter(|t| !with_aggregates.contains(t)),
        )
        .chain(SHARED_TABLES.iter().copied())
        .collect()
}

/// TimescaleDB's `time_bucket(interval, timestamptz)` for PostgreSQL without the extension:
/// fixed-width buckets from TimescaleDB's default origin, Monday 2000-01-03 00:00 UTC (the
/// origin of the SQL endpoint's `time_bucket` too); for widths that divide a day that is the
/// same as aligning to the epoch. Month widths are not calendar months here.
const TIME_BUCKET_FN: &str = "CREATE FUNCTION time_bucket(bucket_width interval, ts timestamptz)
RETURNS timestamptz LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT to_timestamp(floor((extract(epoch from ts) - 946857600) / extract(epoch from bucket_width))
    * extract(epoch from bucket_width) + 946857600)
$$";

fn dashboards() -> Result<Vec<(String, Value)>> {
    DASHBOARDS
        .iter()
        .map(|(name, _)| {
            let path = repo_root().join(format!("deploy/grafana/dashboards/{name}.json"));
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let json: Value = serde_json::from_slice(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            Ok(((*name).to_owned(), json))
        })
        .collect()
}

/// Identifier-like words of `sql`, lower case.
fn words(sql: &str) -> Vec<String> {
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// The tables after FROM and JOIN (not `extract(epoch from ..)`, not subqueries).
fn tables_read(sql: &str) -> Vec<String> {
    let w = words(sql);
    w.iter()
        .enumerate()
        .filter(|(i, word)| {
            (*word == "from" || *word == "join") && (*i == 0 || w[i - 1] != "epoch")
        })
        .filter_map(|(i, _)| w.get(i + 1).cloned())
        .filter(|t| t != "select")
        .collect()
}

#[test]
fn dashboards_follow_the_conventions() -> Result<()> {
    let provisioning = std::fs::read_to_string(
        repo_root().join("deploy/grafana/provisioning/datasources/primespark.yml"),
    )?;
    let (raw_with_aggregates, panel_tables) = (raw_with_aggregates(), panel_tables());
    for uid in [
        "uid: primespark-prometheus",
        "uid: primespark-timescaledb",
        "uid: primespark-sql",
    ] {
        assert!(provisioning.contains(uid), "no data source with {uid}");
    }
    let now = Utc::now();
    for (name, dashboard) in dashboards()? {
        let title = DASHBOARDS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .unwrap_or_default();
        assert_eq!(
            dashboard["uid"],
            json!(format!("primespark-{name}")),
            "{name}"
        );
        assert_eq!(dashboard["title"], json!(title), "{name}");
        assert_eq!(dashboard["tags"], json!(["primespark"]), "{name}");
        assert_eq!(dashboard["timezone"], json!("utc"), "{name}");
        assert_eq!(dashboard["time"]["from"], json!("now-6h"), "{name}");
        let all = panels(&dashboard);
        assert!(all.len() >= 6, "{name}: only {} panels", all.len());
        let ids: BTreeSet<i64> = all.iter().filter_map(|p| p["id"].as_i64()).collect();
        assert_eq!(
            ids.len(),
            all.len(),
            "{name}: panel ids missing or repeated"
        );
        for panel in &all {
            let title = panel["title"].as_str().unwrap_or_default();
            assert!(!title.is_empty(), "{name}: a panel without a title");
            let pos = &panel["gridPos"];
            assert!(
                ["x", "y", "w", "h"].iter().all(|k| pos[k].is_u64()),
                "{name} / {title}: gridPos {pos}"
            );
            assert!(
                pos["x"].as_u64().unwrap_or(99) + pos["w"].as_u64().unwrap_or(99) <= 24,
                "{name} / {title}: wider than the grid"
            );
            for target in panel["targets"].as_array().into_iter().flatten() {
                if target.get("rawSql").is_none() {
                    assert!(
                        target["expr"].is_string(),
                        "{name} / {title}: neither SQL nor PromQL"
                    );
                    continue;
                }
                for (key, want) in [("rawQuery", json!(true)), ("editorMode", json!("code"))] {
                    assert_eq!(target[key], want, "{name} / {title}: {key}");
                }
                let format = target["format"].as_str().unwrap_or_default();
                assert!(
                    format == "time_series" || format == "table",
                    "{name} / {title}: format {format:?}"
                );
                let sql = target["rawSql"].as_str().unwrap_or_default();
                let expanded = expand(sql, &dashboard, now, false)
                    .with_context(|| format!("{name} / {title}"))?;
                if format == "time_series" {
                    assert!(
                        expanded.contains("AS \"time\""),
                        "{name} / {title}: a time series needs a \"time\" column"
                    );
                    assert_eq!(panel["type"], json!("timeseries"), "{name} / {title}");
                }
                let read = tables_read(sql);
                assert!(!read.is_empty(), "{name} / {title}: reads no table");
                for table in read {
                    assert!(
                        !raw_with_aggregates.contains(&table.as_str()),
                        "{name} / {title}: reads {table}; use its aggregate table"
                    );
                    assert!(
                        panel_tables.contains(&table.as_str()),
                        "{name} / {title}: reads {table}, which the pipeline does not create"
                    );
                }
            }
        }
        for (title, _, uid) in panel_queries(&dashboard) {
            assert_eq!(uid, SQL_DATASOURCE, "{name} / {title}");
        }
    }
    Ok(())
}

/// `sql` with the dashboard's variables and Grafana's macros expanded for the 6 hours up to
/// `to`, a 1-minute interval, and a data source with or without `timescaledb`.
fn expand(sql: &str, dashboard: &Value, to: DateTime<Utc>, timescaledb: bool) -> Result<String> {
    let ctx = MacroContext {
        from: to - chrono::Duration::hours(6),
        to,
        interval: Duration::from_secs(60),
        timescaledb,
    };
    Ok(try_expand_macros(
        &substitute_variables(sql, dashboard),
        &ctx,
    )?)
}

/// The names the pipeline registers, from the sources that register them.
fn exported_metric_names() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for file in [
        "connectors/src/metrics.rs",
        "operators/src/metrics.rs",
        "dataflows/src/ops.rs",
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).context(file)?;
        for piece in text.split('"').skip(1).step_by(2) {
            if piece.starts_with("primespark_")
                && piece.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                names.insert(piece.to_owned());
            }
        }
    }
    Ok(names)
}

#[test]
fn prometheus_panels_parse_and_use_exported_series() -> Result<()> {
    let mut exprs = Vec::new();
    for (name, dashboard) in dashboards()? {
        for (title, expr, uid) in panel_exprs(&dashboard) {
            assert_eq!(uid, "primespark-prometheus", "{name} / {title}");
            exprs.push(expr);
        }
    }
    assert!(!exprs.is_empty());
    // promtool checks them as recording rules (JSON is YAML).
    let rules = json!({"groups": [{"name": "dashboards", "rules": exprs
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"record": format!("dashboard:panel_{i}"), "expr": e}))
        .collect::<Vec<_>>()}]});
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, rules.to_string())?;
    let out = Command::new(&stack().promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()?;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let exported = exported_metric_names()?;
    for expr in &exprs {
        for word in words(expr).iter().filter(|w| w.starts_with("primespark_")) {
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .unwrap_or(word);
            assert!(
                exported.contains(base),
                "{word} in {expr:?} is not exported"
            );
        }
    }
    Ok(())
}

/// Runs every SQL panel query of `dashboards` (expanded for `ctx`) on `client`, with the simple
/// query protocol (text results, as `psql` does). Returns the rows of each query, named
/// `dashboard / panel`, in order. Fails with every failing query: errors, and time series
/// without a `time` column or not sorted by it (Grafana refuses those).
async fn run_all_panels(
    client: &tokio_postgres::Client,
    dashboards: &[(String, Value)],
    ctx: &MacroContext,
) -> Result<Vec<(String, usize)>> {
    let mut rows_per_panel = Vec::new();
    let mut failures = Vec::new();
    for (name, dashboard) in dashboards {
        let formats: Vec<String> = panels(dashboard)
            .iter()
            .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
            .filter(|t| t.get("rawSql").is_some())
            .map(|t| t["format"].as_str().unwrap_or_default().to_owned())
            .collect();
        for ((title, sql, _), format) in panel_queries(dashboard).into_iter().zip(formats) {
            let label = format!("{name} / {title}");
            let sql = match try_expand_macros(&substitute_variables(&sql, dashboard), ctx) {
                Ok(sql) => sql,
                Err(e) => {
                    failures.push(format!("{label}: {e}"));
                    continue;
                }
            };
            let messages = match client.simple_query(&sql).await {
                Ok(m) => m,
                Err(e) => {
                    let detail = e
                        .as_db_error()
                        .map(|d| d.message().to_owned())
                        .unwrap_or_else(|| e.to_string());
                    failures.push(format!("{label}: {detail}\n{sql}"));
                    continue;
                }
            };
            let rows: Vec<_> = messages
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                })
                .collect();
            if format == "time_series" {
                if let Some(problem) = time_series_problem(&rows) {
                    failures.push(format!("{label}: {problem}\n{sql}"));
                }
            }
            rows_per_panel.push((label, rows.len()));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of the panel queries failed:\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(rows_per_panel)
}

/// Why Grafana would not draw these rows as a time series, if it would not.
fn time_series_problem(rows: &[&tokio_postgres::SimpleQueryRow]) -> Option<String> {
    let first = rows.first()?;
    let Some(at) = first.columns().iter().position(|c| c.name() == "time") else {
        return Some("no \"time\" column".into());
    };
    let times: Vec<&str> = rows.iter().map(|r| r.get(at).unwrap_or_default()).collect();
    let before = |a: &str, b: &str| match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x <= y,
        _ => a <= b,
    };
    times
        .windows(2)
        .find(|w| !before(w[0], w[1]))
        .map(|w| format!("not sorted by time: {} before {}", w[0], w[1]))
}

fn partition_of(key: &str, partitions: i32) -> i32 {
    (key.bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        % partitions as u32) as i32
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default()
}

/// (partition, payload) of one topic, in produce order.
type Records = Vec<(i32, Vec<u8>)>;

/// Twenty minutes of each stream from `t0_ms`: every 40th telemetry event three minutes
/// behind (late), about 1% malformed (dead letters), the anomaly model's golden anomalies, and
/// per partition a sentinel two hours on that closes every window. Returns (telemetry,
/// inference, analytics).
fn workload(t0_ms: i64, partitions: i32) -> Result<(Records, Records, Records)> {
    let mut fleet = Fleet::new(12, 0.01, 7);
    let (mut telemetry, mut inference, mut events) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..6_000i64 {
        let t = t0_ms + i * 200;
        let behind = if i % 40 == 7 { 180_000 } else { 0 };
        let (key, payload) = fleet.next_event(at(t - behind));
        telemetry.push((partition_of(&key, partitions), payload));
        if i % 3 == 0 {
            let (key, payload) = fleet.next_inference(at(t));
            inference.push((partition_of(&key, partitions), payload));
            let (key, payload) = fleet.next_analytics(at(t));
            events.push((partition_of(&key, partitions), payload));
        }
    }
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(
        repo_root().join("operators/models/anomaly_detector.golden.json"),
    )?)?;
    let features = [
        "cpu_percent",
        "memory_percent",
        "disk_percent",
        "temperature",
        "load_avg",
    ];
    let threshold = golden["threshold"].as_f64().unwrap_or(0.5);
    let mut anomalies = 0;
    for (i, case) in golden["cases"].as_array().into_iter().flatten().enumerate() {
        if case["score"].as_f64().unwrap_or(0.0) < threshold {
            continue;
        }
        let metrics: serde_json::Map<String, Value> = features
            .iter()
            .zip(case["raw"].as_array().into_iter().flatten())
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let device = format!("gold-{i:02}");
        let time = t0_ms + 600_000 + i as i64 * 1000;
        telemetry.push((
            partition_of(&device, partitions),
            json!({"device_id": device, "metrics": metrics, "timestamp": time})
                .to_string()
                .into_bytes(),
        ));
        anomalies += 1;
    }
    ensure!(anomalies > 0, "the golden file has no anomalies");
    let sentinel = t0_ms + 2 * 3_600_000;
    for p in 0..partitions {
        telemetry.push((
            p,
            json!({"device_id": "sentinel", "metrics": {"up": 1.0}, "timestamp": sentinel})
                .to_string()
                .into_bytes(),
        ));
        inference.push((
            p,
            json!({"model": "sentinel", "prompt_length": 1, "response_length": 1,
                   "latency_ms": 1.0, "source": "edge", "status": "ok", "timestamp": sentinel})
            .to_string()
            .into_bytes(),
        ));
        events.push((
            p,
            json!({"event_type": "sentinel", "endpoint": "/", "timestamp": sentinel})
                .to_string()
                .into_bytes(),
        ));
    }
    Ok((telemetry, inference, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_panel_returns_rows_on_pipeline_output() -> Result<()> {
    let stack = stack();
    let db = unique("grafana");
    let url = fresh_database(stack, &db).await?;
    let partitions = 2;
    let topics = [
        format!("edge.telemetry.{db}"),
        format!("edge.ai.inference.{db}"),
        format!("analytics.events.{db}"),
    ];
    for t in &topics {
        create_topic(stack, t, partitions).await?;
    }
    let work = tempfile::tempdir()?;
    let config = work.path().join("pipeline.toml");
    // Our wire endpoint, as Grafana's primespark-sql data source reaches it.
    let wire_port = free_port();
    let password_hash = primespark_connectors::query::hash_password(WIRE_PASSWORD)?;
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{}\"\ninference = \"{}\"\nevents = \"{}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_rows = 2000\nflush_interval = \"200ms\"\n\
             [nas]\npath = \"{}\"\nroll_interval = \"1s\"\n[query]\nhttp_addr = \"127.0.0.1:{}\"\n\
             pg_addr = \"127.0.0.1:{wire_port}\"\nrate_limit_per_second = 1000\nrate_limit_burst = 1000\n\
             [[query.users]]\nname = \"grafana\"\nrole = \"reader\"\npassword_hash = \"{password_hash}\"\n\
             [windows]\nmax_out_of_orderness = \"30s\"\nmax_future = \"3h\"\n[runtime]\nworkers = 2\n\
             [inference]\nbackend = \"cpu\"\n",
            stack.brokers,
            topics[0],
            topics[1],
            topics[2],
            work.path().join("nas").display(),
            free_port(),
        ),
    )?;

    // Event times from 40 minutes ago: inside `now-6h`, the dashboards' default range. The
    // sentinels that close the last hour are stamped 80 minutes ahead of the clock, hence
    // `windows.max_future = "3h"` above.
    let t0_ms = (Utc::now().timestamp_millis() / 60_000 - 40) * 60_000;
    let (telemetry, inference, events) = workload(t0_ms, partitions)?;
    let total = (telemetry.len() + inference.len() + events.len()) as i64;
    let log = work.path().join("pipeline.log");
    let pipeline = Pipeline::start(&config, &[], &log)?;
    for (topic, records) in topics.iter().zip([&telemetry, &inference, &events]) {
        produce(stack, topic, records)?;
    }
    let client = connect(&url).await?;
    // Every record stored, and every window up to 90 minutes on (the last hour) committed.
    let cut_us = (t0_ms + 90 * 60_000) * 1000;
    let done = wait_until(Duration::from_secs(300), "the pipeline stored everything", || {
        let client = &client;
        async move {
            let stored = count(
                client,
                "SELECT coalesce(sum(next_offset), 0)::int8 FROM source_offsets WHERE sink = 'postgres_raw'",
            )
            .await;
            let committed = count(
                client,
                &format!("SELECT count(*) FROM dataflow_state WHERE committed_watermark_us >= {cut_us}"),
            )
            .await;
            Ok(stored == total && committed == 3)
        }
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    for (table, least) in [("late_events", 10), ("dead_letters", 10), ("anomalies", 1)] {
        let n = count(&client, &format!("SELECT count(*) FROM {table}")).await;
        ensure!(n >= least, "the workload put {n} rows in {table}");
    }

    // Plain PostgreSQL (the stack's has no TimescaleDB): the dashboards' time_bucket.
    let has_time_bucket = count(
        &client,
        "SELECT count(*) FROM pg_proc WHERE proname = 'time_bucket'",
    )
    .await
        > 0;
    if !has_time_bucket {
        client.batch_execute(TIME_BUCKET_FN).await?;
    }

    let dashboards = dashboards()?;
    let to = Utc::now();
    // As the TimescaleDB data source (`timescaledb: true`, `$__timeGroup` -> time_bucket) and
    // as one without it (`floor(extract(epoch ..))`, the SQL endpoint's data source).
    for timescaledb in [true, false] {
        let ctx = MacroContext {
            from: to - chrono::Duration::hours(6),
            to,
            interval: Duration::from_secs(60),
            timescaledb,
        };
        let rows = run_all_panels(&client, &dashboards, &ctx).await?;
        let expected: usize = dashboards.iter().map(|(_, d)| panel_queries(d).len()).sum();
        assert_eq!(rows.len(), expected);
        let empty: Vec<&str> = rows
            .iter()
            .filter(|(_, n)| *n == 0)
            .map(|(label, _)| label.as_str())
            .collect();
        assert!(
            empty.is_empty(),
            "timescaledb = {timescaledb}: no rows from {}",
            empty.join(", ")
        );
        eprintln!("timescaledb = {timescaledb}: rows per panel {rows:?}");
    }

    // The same panels through our PostgreSQL wire endpoint (DataFusion over PostgreSQL and
    // the archive), expanded as for the primespark-sql data source (no TimescaleDB macros).
    let (wire, connection) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={wire_port} user=grafana password={WIRE_PASSWORD} dbname=primespark"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(connection);
    let ctx = MacroContext {
        from: to - chrono::Duration::hours(6),
        to,
        interval: Duration::from_secs(60),
        timescaledb: false,
    };
    let rows = run_all_panels(&wire, &dashboards, &ctx).await?;
    let empty: Vec<&str> = rows
        .iter()
        .filter(|(_, n)| *n == 0)
        .map(|(label, _)| label.as_str())
        .collect();
    assert!(
        empty.is_empty(),
        "wire endpoint: no rows from {}",
        empty.join(", ")
    );
    eprintln!("wire endpoint: rows per panel {rows:?}");
    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}

/// The wire user's password in this test.
const WIRE_PASSWORD: &str = "grafana-test-password";
