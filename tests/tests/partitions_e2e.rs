//! Partitions and offsets an operator changes, against the stack: a partition added to a topic
//! is read from its beginning (even with `kafka.start = "latest"`, whose rule is for a topic
//! never read before), and its dead letters go out even when `<topic>.dlq` cannot grow; a
//! stored position the broker no longer has (a topic deleted and recreated) is reported on
//! `/metrics` and `/readyz` and the partition left unread, never silently skipped elsewhere.
//!
//! A partition added while the pipeline runs is picked up within
//! `kafka.partition_discovery_interval`, without a restart, on one process and on a cluster of
//! two whose processes see it seconds apart: the dataflows drain, commit and start again on the
//! new layout, and the new partition's backlog lands in the raw tables, the archive and the
//! windows once.
//!
//! On an earlier main the added partition started at `latest` (its backlog skipped), the
//! dead-letter topic kept one partition (a letter from the new one was retried forever), and a
//! position beyond the partition's end was silently reset.

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use primespark_tests::{
    connect, count, create_topic, create_topic_on, free_port, grow_topic, http_get, minute_windows,
    parquet_positions, partition_count, produce, produce_to, stack, stack_service, wait_until,
    Pipeline, Sections, TelemetryRun,
};
use serde_json::json;

const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z

fn samples(partition: i32, from: i64, n: i64) -> Vec<(i32, Vec<u8>)> {
    (from..from + n)
        .map(|i| {
            (
                partition,
                json!({"device_id": format!("pi-{partition}"), "metrics": {"cpu_percent": (i % 100) as f64},
                       "timestamp": T0_MS + i * 1000})
                .to_string()
                .into_bytes(),
            )
        })
        .collect()
}

/// A telemetry-only run of `partitions` partitions without scoring, flushing often.
async fn run_of(prefix: &str, partitions: i32) -> Result<TelemetryRun> {
    TelemetryRun::new(
        prefix,
        partitions,
        Sections {
            postgres: "flush_rows = 100\nflush_interval = \"100ms\"",
            extra: "[inference]\nenabled = false\n",
            ..Sections::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_partition_is_read_from_its_beginning_and_its_letters_reach_the_dlq() -> Result<()>
{
    let run = run_of("partitions", 2).await?;
    let stack = stack();
    let client = connect(&run.url).await?;
    let raw = "SELECT count(*) FROM device_metrics";
    // The dead-letter topic as a run before the source grew made it: one partition. (Tansu
    // cannot add partitions to a topic, so the grown source is a partition nothing was ever
    // stored for, and the dead-letter topic cannot grow: its letters must still go out.)
    let dlq = format!("{}.dlq", run.topic);
    create_topic(stack, &dlq, 1).await?;

    // A first run sees records on partition 0 only: nothing is stored for partition 1.
    produce(stack, &run.topic, &samples(0, 0, 50))?;
    let first = run.start(&[])?;
    wait_until(Duration::from_secs(60), "partition 0", || async {
        Ok(count(&client, raw).await == 50)
    })
    .await?;
    first.terminate(Duration::from_secs(60))?;
    ensure!(
        count(
            &client,
            "SELECT count(*) FROM source_offsets WHERE partition = 1"
        )
        .await
            == 0,
        "partition 1 has stored positions: the test would not show the rule"
    );

    // Partition 1 gathers a backlog (one letter in it) while the pipeline is down; the restart
    // says `latest`, whose rule is for a topic never read before, not for a partition added
    // to one that was.
    let mut backlog = samples(1, 100, 30);
    backlog.push((1, b"{\"device_id\": \"pi-1\", \"metrics\": {".to_vec()));
    produce(stack, &run.topic, &backlog)?;
    let _second = run.start(&[("PRIMESPARK_KAFKA__START", "latest")])?;
    let waited = wait_until(
        Duration::from_secs(90),
        "the new partition's backlog",
        || async {
            Ok(count(&client, raw).await == 80
                && count(&client, "SELECT count(*) FROM dead_letters").await == 1)
        },
    )
    .await;
    if let Err(e) = waited {
        bail!(
            "{e}: {} raw rows (want 80), {} letters\n{}",
            count(&client, raw).await,
            count(&client, "SELECT count(*) FROM dead_letters").await,
            run.log_text()
        );
    }
    ensure!(partition_count(stack, &dlq)? >= 1, "{dlq} is gone");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_beyond_the_partition_is_reported_not_skipped() -> Result<()> {
    let run = run_of("positions", 1).await?;
    let stack = stack();
    let client = connect(&run.url).await?;
    let raw = "SELECT count(*) FROM device_metrics";
    produce(stack, &run.topic, &samples(0, 0, 40))?;
    let first = run.start(&[])?;
    wait_until(Duration::from_secs(60), "the first records", || async {
        Ok(count(&client, raw).await == 40)
    })
    .await?;
    first.terminate(Duration::from_secs(60))?;

    // What a topic deleted and recreated looks like from the stored side: every position is
    // beyond what the partition holds.
    client
        .execute(
            "UPDATE source_offsets SET next_offset = next_offset + 1000000",
            &[],
        )
        .await?;
    produce(stack, &run.topic, &samples(0, 40, 10))?;
    let _second = run.start(&[])?;
    let waited = wait_until(
        Duration::from_secs(60),
        "the lost position reported",
        || async {
            let metrics = http_get(&run.http, "/metrics").unwrap_or_default();
            let readyz = http_get(&run.http, "/readyz").unwrap_or_default();
            Ok(metrics.lines().any(|l| {
                l.starts_with("primespark_source_position_lost_total") && !l.ends_with(" 0")
            }) && readyz.starts_with("HTTP/1.1 503")
                && readyz.contains("position out of range"))
        },
    )
    .await;
    if let Err(e) = waited {
        bail!(
            "{e}: {}\n{}",
            http_get(&run.http, "/readyz").unwrap_or_default(),
            run.log_text()
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        count(&client, raw).await,
        40,
        "nothing read from a position the operator did not choose"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_added_while_running_is_read_without_a_restart() -> Result<()> {
    // Growing a topic edits the durable broker's metadata in its bucket: a fresh one, since
    // an earlier test may have restarted the S3 server under it.
    stack_service("stop-service", "kafka_durable")?;
    stack_service("start-service", "kafka_durable")?;
    // One process, then a cluster of two (whose processes must rebuild together).
    grown_while_running(1).await?;
    grown_while_running(2).await
}

/// The growth test on `processes` processes of one worker each.
async fn grown_while_running(processes: usize) -> Result<()> {
    let stack = stack();
    let brokers = stack.durable_brokers.clone();
    let run = TelemetryRun::new(
        &format!("growing{processes}x"),
        1,
        Sections {
            postgres: "flush_rows = 100\nflush_interval = \"100ms\"",
            extra: "[inference]\nenabled = false\n[windows]\nmax_out_of_orderness = \"5s\"\n",
            ..Sections::default()
        },
    )
    .await?;
    create_topic_on(&brokers, &run.topic, 2).await?;
    let dlq = format!("{}.dlq", run.topic);
    create_topic_on(&brokers, &dlq, 2).await?;
    let client = connect(&run.url).await?;
    let raw = "SELECT count(*) FROM device_metrics";
    let send = |records: Vec<(i32, Vec<u8>)>| {
        produce_to(&brokers, &run.topic, &records, Duration::from_secs(30))
    };
    let env = |process: usize| {
        vec![
            ("PRIMESPARK_KAFKA__BROKERS", brokers.clone()),
            // Process 1 of a cluster sees the new partition seconds after process 0: process
            // 0 must wait for it before it builds anew.
            (
                "PRIMESPARK_KAFKA__PARTITION_DISCOVERY_INTERVAL",
                format!("{}s", 1 + 4 * process),
            ),
            // The rule for a topic never read before; an added partition is read from its
            // beginning all the same.
            ("PRIMESPARK_KAFKA__START", "latest".to_owned()),
        ]
    };
    let mut pipelines = cluster(&run, processes, env)?;
    let logs = || pipelines_logs(&run, processes);
    for (_, http) in &pipelines {
        let waited = wait_until(Duration::from_secs(60), "the sources assigned", || async {
            Ok(http_get(http, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")))
        })
        .await;
        if let Err(e) = waited {
            bail!("{e}\n{}", logs());
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    send([samples(0, 0, 100), samples(1, 0, 100)].concat())?;
    wait_until(Duration::from_secs(60), "the first 200 rows", || async {
        Ok(count(&client, raw).await == 200)
    })
    .await?;

    // The topic grows under the running pipeline; the new partition has a backlog, with one
    // malformed record, before the pipeline sees it. The dead-letter topic cannot grow on
    // this broker: the letter must go out all the same.
    grow_topic(stack, &run.topic, 3)?;
    let grown = std::time::Instant::now();
    let mut backlog = samples(2, 100, 60);
    backlog.push((2, b"{\"device_id\": \"pi-2\", \"metrics\": {".to_vec()));
    send(backlog)?;
    let letter = "SELECT count(*) FROM dead_letters WHERE partition = 2 AND \"offset\" = 60";
    let waited = wait_until(
        Duration::from_secs(60),
        "the new partition's backlog",
        || async { Ok(count(&client, raw).await == 260 && count(&client, letter).await == 1) },
    )
    .await;
    if let Err(e) = waited {
        bail!(
            "{e}: {} raw rows (want 260), {} letters\n{}",
            count(&client, raw).await,
            count(&client, letter).await,
            logs()
        );
    }
    // For the record (not a bound): grow_topic returns once the broker shows the partition.
    eprintln!(
        "the added partition's backlog was stored {:.1} s after the broker showed it",
        grown.elapsed().as_secs_f64()
    );
    for (pipeline, http) in &mut pipelines {
        ensure!(pipeline.is_running(), "a process stopped:\n{}", logs());
        let metrics = http_get(http, "/metrics")?;
        ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("primespark_source_relayouts_total")
                    && l.contains("reason=\"partitions_added\"")
                    && !l.ends_with(" 0")),
            "no re-layout counted:\n{metrics}"
        );
    }

    // All three partitions go on; every window below the last open one is exact.
    send(
        [
            samples(0, 100, 140),
            samples(1, 100, 140),
            samples(2, 160, 80),
        ]
        .concat(),
    )?;
    let expected = |device: &str| -> std::collections::BTreeMap<i64, (i64, f64)> {
        let (from, to) = if device == "pi-2" {
            (100, 240)
        } else {
            (0, 240)
        };
        let mut w = std::collections::BTreeMap::new();
        for i in (from..to).filter(|i| *i < 180) {
            let e = w.entry(T0_MS + i / 60 * 60_000).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += (i % 100) as f64;
        }
        w
    };
    let windows = |device: &'static str| {
        let client = &client;
        async move {
            minute_windows(
                client,
                &format!("WHERE device_id = '{device}' AND metric_name = 'cpu_percent' AND bucket < to_timestamp({})", (T0_MS + 180_000) / 1000),
            )
            .await
        }
    };
    let waited = wait_until(Duration::from_secs(60), "every window", || async {
        Ok(count(&client, raw).await == 620
            && windows("pi-0").await? == expected("pi-0")
            && windows("pi-1").await? == expected("pi-1")
            && windows("pi-2").await? == expected("pi-2"))
    })
    .await;
    if let Err(e) = waited {
        bail!(
            "{e}: {} raw rows (want 620); pi-2's windows {:?}, want {:?}\n{}",
            count(&client, raw).await,
            windows("pi-2").await?,
            expected("pi-2"),
            logs()
        );
    }
    ensure!(
        count(
            &client,
            "SELECT count(*) FROM (SELECT DISTINCT device_id, time FROM device_metrics) d"
        )
        .await
            == 620,
        "a raw row doubled"
    );
    for (pipeline, _) in &mut pipelines {
        ensure!(pipeline.is_running(), "a process stopped:\n{}", logs());
    }
    // A cluster stops together: each process's communication waits for its peers.
    for (pipeline, _) in &pipelines {
        pipeline.signal("TERM")?;
    }
    for (pipeline, _) in pipelines {
        let status = pipeline.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit {status}:\n{}", logs());
    }
    let positions = parquet_positions(&run.nas.join(format!("topic={}", run.topic)))?;
    let mut distinct = positions.clone();
    distinct.dedup();
    ensure!(
        positions.len() == 620 && distinct.len() == 620,
        "{} archived rows, {} distinct (want 620)",
        positions.len(),
        distinct.len()
    );
    Ok(())
}

/// The run's pipeline on `processes` processes of one worker each (process `i` serves SQL on
/// its own port, logs to its own file); with their SQL addresses.
fn cluster(
    run: &TelemetryRun,
    processes: usize,
    env: impl Fn(usize) -> Vec<(&'static str, String)>,
) -> Result<Vec<(Pipeline, String)>> {
    let env_of = |process: usize| env(process);
    if processes == 1 {
        let env = env_of(0);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        return Ok(vec![(run.start(&env)?, run.http.clone())]);
    }
    let hostfile = run.work.path().join("hosts");
    let hosts: Vec<String> = (0..processes)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    std::fs::write(&hostfile, hosts.join("\n"))?;
    let base = std::fs::read_to_string(&run.config)?;
    let mut started = Vec::new();
    for process in 0..processes {
        let http = match process {
            0 => run.http.clone(),
            _ => format!("127.0.0.1:{}", free_port()),
        };
        let config = run.work.path().join(format!("pipeline-{process}.toml"));
        std::fs::write(
            &config,
            format!(
                "{}\n[runtime]\nworkers = 1\nprocesses = {processes}\nprocess_id = {process}\nhostfile = \"{}\"\n",
                base.replace(&run.http, &http),
                hostfile.display()
            ),
        )?;
        let log = run.work.path().join(format!("pipeline-{process}.log"));
        let env = env_of(process);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        started.push((Pipeline::start(&config, &env, &log)?, http));
    }
    Ok(started)
}

/// Every process's log.
fn pipelines_logs(run: &TelemetryRun, processes: usize) -> String {
    if processes == 1 {
        return run.log_text();
    }
    (0..processes)
        .map(|p| {
            std::fs::read_to_string(run.work.path().join(format!("pipeline-{p}.log")))
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}
