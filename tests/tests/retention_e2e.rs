//! Retention on plain PostgreSQL: the running pipeline deletes rows past each table's horizon at
//! start-up and every `interval`, and keeps the rest; the delete works in batches. It runs on the
//! stack's `postgres_plain` cluster, since on TimescaleDB (the stack's main `postgres` when the
//! shared build is installed) the hypertables get policies instead (`timescale_e2e`) and the
//! pipeline deletes only from the plain tables.

use std::time::Duration;

use anyhow::{bail, Result};
use primespark_connectors::postgres::retention::{delete_expired, RetentionConfig};
use primespark_tests::{
    connect, create_topic, free_port, fresh_database_on, pipeline_command, stack, unique,
    wait_until, Pipeline,
};

/// Inserts into `table` one row per age in days (the rest of the columns filled per table).
async fn seed(client: &tokio_postgres::Client, table: &str, ages_days: &[i32]) -> Result<()> {
    for age in ages_days {
        let when = format!("now() - make_interval(days => {age})");
        let sql = match table {
            "device_metrics" => format!(
                "INSERT INTO device_metrics (time, device_id, metric_name, value) VALUES ({when}, 'd', 'm', 1)"
            ),
            "ai_inference_results" => format!(
                "INSERT INTO ai_inference_results (time, model_name, input_tokens, output_tokens, latency_ms, source, status, fallback) \
                 VALUES ({when}, 'm', 1, 1, 1, 'edge', 'success', false)"
            ),
            "device_metrics_1m" => format!(
                "INSERT INTO device_metrics_1m (bucket, device_id, metric_name, count, sum, min, max, avg) \
                 VALUES (date_trunc('minute', {when}), 'd{age}', 'm', 1, 1, 1, 1, 1)"
            ),
            "dead_letters" => format!(
                "INSERT INTO dead_letters (received_at, topic, partition, \"offset\", reason, error, payload) \
                 VALUES ({when}, 't', 0, {age}, 'r', 'e', '\\x00')"
            ),
            other => bail!("no seed for {other}"),
        };
        client.batch_execute(&sql).await?;
    }
    Ok(())
}

async fn count(client: &tokio_postgres::Client, table: &str) -> Result<i64> {
    Ok(client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_deletes_rows_past_their_horizon() -> Result<()> {
    let stack = stack();
    let db = unique("retention");
    let url = fresh_database_on(&stack.plain_postgres_url, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    create_topic(stack, &topic, 1).await?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("pipeline.toml");
    let http = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [postgres]\nurl = \"{url}\"\n[postgres.retention]\nraw_telemetry = \"10d\"\n\
             raw_inference = \"20d\"\naggregates_1m = \"40d\"\naggregates_1h = \"400d\"\n\
             [nas]\npath = \"{}\"\n[query]\nhttp_addr = \"{http}\"\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            stack.brokers,
            work.path().join("nas").display(),
        ),
    )?;
    let out = pipeline_command()?
        .arg("migrate")
        .arg("--config")
        .arg(&config)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = connect(&url).await?;
    seed(&client, "device_metrics", &[1, 9, 11, 50]).await?;
    seed(&client, "ai_inference_results", &[1, 19, 21]).await?;
    seed(&client, "device_metrics_1m", &[1, 39, 41, 100]).await?;
    seed(&client, "dead_letters", &[1, 12]).await?;

    let log = work.path().join("pipeline.log");
    let mut pipeline = Pipeline::start(
        &config,
        &[("PRIMESPARK_POSTGRES__RETENTION__ENABLED", "true")],
        &log,
    )?;
    let done = wait_until(Duration::from_secs(60), "expired rows gone", || async {
        Ok(count(&client, "device_metrics").await? == 2
            && count(&client, "ai_inference_results").await? == 2
            && count(&client, "device_metrics_1m").await? == 2
            && count(&client, "dead_letters").await? == 1)
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    // Exactly the young rows are left.
    let left: Vec<String> = client
        .query(
            "SELECT device_id FROM device_metrics_1m ORDER BY device_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["d1", "d39"]);
    assert!(pipeline.is_running());
    let metrics = primespark_tests::http_get(&http, "/metrics")?;
    assert!(
        metrics.contains("primespark_retention_deleted_rows_total{table=\"device_metrics\"} 2"),
        "{metrics}"
    );
    pipeline.terminate(Duration::from_secs(30))?;

    // In batches smaller than the backlog: every expired row still goes.
    seed(&client, "device_metrics", &[11, 12, 13, 14, 15, 16, 17]).await?;
    let config = RetentionConfig {
        raw_telemetry: Duration::from_secs(10 * 86_400),
        batch_rows: 3,
        ..RetentionConfig::default()
    };
    let deleted = delete_expired(&client, &config, false).await?;
    assert!(deleted.contains(&("device_metrics", 7)), "{deleted:?}");
    assert_eq!(count(&client, "device_metrics").await?, 2);
    Ok(())
}
