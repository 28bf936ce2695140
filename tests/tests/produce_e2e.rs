//! `primespark produce` against the stack's broker: a bounded run (`--count`) into fresh
//! topics, read back with an independent client (the stack's Python confluent-kafka), checked
//! against the event formats the README documents (the requested share of telemetry records
//! fails them, everything else passes), and then run through the pipeline: every valid record
//! lands in its raw table and every bad one in `dead_letters`.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use primespark_tests::{
    connect, count, create_topic, free_port, fresh_database, pipeline_command, stack, unique,
    wait_until, Pipeline,
};
use serde_json::Value;

const EVENTS: u64 = 4000;
const BAD_SHARE: f64 = 0.1;
const PARTITIONS: i32 = 2;

/// Reads every record of the topics from the beginning to their high watermarks, one JSON line
/// per record: topic, partition, offset, key, value (hex).
const READ_ALL: &str = r#"
import binascii, json, sys
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
brokers, topics = sys.argv[1], sys.argv[2:]
c = Consumer({"bootstrap.servers": brokers, "group.id": "produce-e2e-reader",
              "enable.auto.commit": False})
need = {}
for t in topics:
    for p in c.list_topics(t, timeout=10).topics[t].partitions:
        lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
        if hi > lo:
            need[(t, p)] = hi
c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for (t, p) in need])
# Tansu's latest offset can be a batch short: once every partition reached it, read on until
# the topics are quiet for 3 s.
while True:
    m = c.poll(15 if need else 3)
    if m is None:
        if need:
            sys.exit(f"timed out reading; still missing {need}")
        break
    if m.error():
        sys.exit(f"read error: {m.error()}")
    key = m.key().decode() if m.key() is not None else None
    print(json.dumps({"topic": m.topic(), "partition": m.partition(), "offset": m.offset(),
                      "key": key, "value": binascii.hexlify(m.value()).decode()}))
    if m.offset() + 1 >= need.get((m.topic(), m.partition()), 0):
        need.pop((m.topic(), m.partition()), None)
c.close()
"#;

/// One record as the independent client read it.
struct Record {
    key: Option<String>,
    value: Vec<u8>,
}

fn hex(s: &str) -> Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).context("odd hex")?, 16).map_err(Into::into))
        .collect()
}

fn read_all(topics: &[&str]) -> Result<BTreeMap<String, Vec<Record>>> {
    let stack = stack();
    let out = std::process::Command::new(&stack.python)
        .arg("-c")
        .arg(READ_ALL)
        .arg(&stack.brokers)
        .args(topics)
        .output()?;
    if !out.status.success() {
        bail!("reader: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut by_topic: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line)?;
        by_topic
            .entry(v["topic"].as_str().context("topic")?.to_owned())
            .or_default()
            .push(Record {
                key: v["key"].as_str().map(str::to_owned),
                value: hex(v["value"].as_str().context("value")?)?,
            });
    }
    Ok(by_topic)
}

/// A naive ISO timestamp (the platform's Python producers' shape), an RFC 3339 one, or epoch
/// milliseconds, within 2000..2100.
fn check_timestamp(v: &Value) -> Result<(), String> {
    let ok = match v {
        // Python's `isoformat()` and `str(datetime)` differ only in the separator.
        Value::String(s) => chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f"))
            .map(|t| t.and_utc())
            .or_else(|_| chrono::DateTime::parse_from_rfc3339(s).map(|t| t.to_utc()))
            .is_ok_and(|t| (2000..2100).contains(&chrono::Datelike::year(&t))),
        Value::Number(n) => n.as_i64().is_some_and(|ms| {
            (946_684_800_000..4_102_444_800_000).contains(&ms) // 2000-01-01 .. 2100-01-01
        }),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("timestamp {v}"))
    }
}

/// `edge.telemetry`: the README's rules. Returns the number of metric rows it makes, or the
/// README's reason code for a dead letter and what is wrong.
fn check_telemetry(bytes: &[u8]) -> Result<i64, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("malformed_json: {e}"))?;
    match &v["device_id"] {
        Value::Null => return Err("missing_field: device_id".into()),
        Value::String(d) if !d.is_empty() => {}
        other => return Err(format!("wrong_type: device_id {other}")),
    }
    check_timestamp(&v["timestamp"]).map_err(|e| format!("bad_timestamp: {e}"))?;
    let metrics = v["metrics"]
        .as_object()
        .ok_or("missing_field: metrics object")?;
    let mut rows = 0;
    for (name, value) in metrics {
        let valid_name = (1..=128).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
        if !valid_name {
            return Err(format!("invalid_value: metric name {name:?}"));
        }
        match value {
            Value::Null => {}
            Value::Number(n) => {
                let x = n.as_f64().ok_or("wrong_type: not a float")?;
                if name.ends_with("_percent") && !(0.0..=100.0).contains(&x) {
                    return Err(format!("out_of_range: {name} = {x}"));
                }
                rows += 1;
            }
            other => return Err(format!("wrong_type: {name} = {other}")),
        }
    }
    if rows == 0 {
        return Err("missing_field: no numeric metric".into());
    }
    Ok(rows)
}

/// `edge.ai.inference`: required and optional fields as documented.
fn check_inference(bytes: &[u8]) -> Result<(), String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    v["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .ok_or("model")?;
    v["prompt_length"].as_u64().ok_or("prompt_length")?;
    v["response_length"].as_u64().ok_or("response_length")?;
    let latency = v["latency_ms"].as_f64().ok_or("latency_ms")?;
    if !(0.0..=86_400_000.0).contains(&latency) {
        return Err(format!("latency_ms {latency}"));
    }
    let source = v["source"].as_str().ok_or("source")?;
    if !["edge", "cloud"].contains(&source) {
        return Err(format!("source {source}"));
    }
    check_timestamp(&v["timestamp"])?;
    if !v["status"].is_null() && !["ok", "error"].contains(&v["status"].as_str().unwrap_or("")) {
        return Err(format!("status {}", v["status"]));
    }
    let strategy = v["routing_strategy"].as_str();
    if !v["routing_strategy"].is_null()
        && !strategy.is_some_and(|s| ["edge_first", "cloud_first", "balanced"].contains(&s))
    {
        return Err(format!("routing_strategy {}", v["routing_strategy"]));
    }
    let fallback = v["fallback"].as_bool().unwrap_or(false);
    if !v["fallback"].is_null() && !v["fallback"].is_boolean() {
        return Err("fallback not a boolean".into());
    }
    if fallback && source != "cloud" {
        return Err("fallback without source = cloud".into());
    }
    Ok(())
}

/// `analytics.events`: a task lifecycle event or an API event, as documented.
fn check_analytics(bytes: &[u8]) -> Result<(), String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let kind = v["event_type"].as_str().ok_or("event_type")?;
    check_timestamp(&v["timestamp"])?;
    match kind {
        "task_created" | "task_assigned" | "task_started" | "task_completed" | "task_failed" => {
            v["task_id"]
                .as_str()
                .filter(|t| !t.is_empty())
                .ok_or("task_id")?;
            if kind == "task_created" {
                v["task_type"].as_str().ok_or("task_type")?;
            }
            if kind == "task_assigned" {
                v["agent_id"].as_str().ok_or("agent_id")?;
            }
        }
        _ => {
            let endpoint = v["endpoint"].as_str().ok_or("endpoint")?;
            if !endpoint.starts_with('/') {
                return Err(format!("endpoint {endpoint}"));
            }
            if !v["data"].is_null() && !v["data"].is_object() {
                return Err("data not an object".into());
            }
            if !v["user_id"].is_null() && !v["user_id"].is_string() {
                return Err("user_id".into());
            }
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_sends_documented_events_that_the_pipeline_stores() -> Result<()> {
    let stack = stack();
    let db = unique("produce");
    let topics = [
        format!("edge.telemetry.{db}"),
        format!("edge.ai.inference.{db}"),
        format!("analytics.events.{db}"),
    ];
    for t in &topics {
        create_topic(stack, t, PARTITIONS).await?;
    }

    // A bounded run: --count stops it (no --duration-secs: no time limit besides ours).
    let started = Instant::now();
    let mut produce = pipeline_command()?
        .args([
            "produce",
            "--brokers",
            &stack.brokers,
            "--topic",
            &topics[0],
        ])
        .args([
            "--inference-topic",
            &topics[1],
            "--events-topic",
            &topics[2],
        ])
        .args(["--devices", "25", "--rate", "4000"])
        .args(["--count", &EVENTS.to_string()])
        .args(["--bad-share", &BAD_SHARE.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let status = loop {
        if let Some(status) = produce.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            produce.kill()?;
            bail!("produce --count {EVENTS} still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    if let Some(mut e) = produce.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut stderr)?;
    }
    assert!(status.success(), "produce failed: {status}\n{stderr}");

    let read = read_all(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    let telemetry = read.get(&topics[0]).map_or(&[][..], Vec::as_slice);
    let inference = read.get(&topics[1]).map_or(&[][..], Vec::as_slice);
    let analytics = read.get(&topics[2]).map_or(&[][..], Vec::as_slice);
    // Exactly --count telemetry events, and one inference and one analytics event per five.
    assert_eq!(telemetry.len() as u64, EVENTS, "{stderr}");
    assert_eq!(inference.len() as u64, EVENTS / 5);
    assert_eq!(analytics.len() as u64, EVENTS / 5);

    let (mut bad, mut points, mut reasons) = (0i64, 0i64, BTreeMap::<String, i64>::new());
    for r in telemetry {
        match check_telemetry(&r.value) {
            Ok(rows) => {
                points += rows;
                // Keyed by device, so a device's events stay in order on one partition.
                let v: Value = serde_json::from_slice(&r.value)?;
                assert_eq!(r.key.as_deref(), v["device_id"].as_str());
            }
            Err(why) => {
                bad += 1;
                let reason = why.split(':').next().unwrap_or("").to_owned();
                *reasons.entry(reason).or_default() += 1;
            }
        }
    }
    // The requested share is bad (binomial: within five standard deviations), in every kind
    // `produce` knows: broken JSON, out of range, a missing field and a wrong type.
    let expected = EVENTS as f64 * BAD_SHARE;
    let sd = (EVENTS as f64 * BAD_SHARE * (1.0 - BAD_SHARE)).sqrt();
    assert!(
        (bad as f64 - expected).abs() < 5.0 * sd,
        "{bad} bad of {EVENTS}, expected about {expected}: {reasons:?}"
    );
    assert!(reasons.len() >= 4, "{reasons:?}");
    for r in inference {
        check_inference(&r.value).map_err(|e| anyhow::anyhow!("inference record: {e}"))?;
    }
    for r in analytics {
        check_analytics(&r.value).map_err(|e| anyhow::anyhow!("analytics record: {e}"))?;
    }

    // The pipeline stores what produce sent: every valid record a row, every bad one a dead
    // letter, every record's offset committed.
    let url = fresh_database(stack, &db).await?;
    let work = tempfile::tempdir()?;
    let config = work.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{}\"\n[kafka.topics]\ntelemetry = \"{}\"\ninference = \"{}\"\n\
             events = \"{}\"\n[postgres]\nurl = \"{url}\"\n[nas]\npath = \"{}\"\n\
             [query]\nhttp_addr = \"127.0.0.1:{}\"\n[inference]\nenabled = false\n",
            stack.brokers,
            topics[0],
            topics[1],
            topics[2],
            work.path().join("nas").display(),
            free_port(),
        ),
    )?;
    let log = work.path().join("pipeline.log");
    let pipeline = Pipeline::start(&config, &[], &log)?;
    let client = connect(&url).await?;
    let committed = |dataflow: &'static str| {
        format!(
            "SELECT COALESCE(sum(next_offset), 0)::bigint FROM source_offsets \
             WHERE dataflow = '{dataflow}' AND sink = 'postgres_raw'"
        )
    };
    let done = wait_until(Duration::from_secs(120), "every record stored", || async {
        Ok(
            count(&client, &committed("telemetry")).await == telemetry.len() as i64
                && count(&client, &committed("inference")).await == inference.len() as i64
                && count(&client, &committed("analytics")).await == analytics.len() as i64,
        )
    })
    .await;
    if let Err(e) = done {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    assert_eq!(
        count(&client, "SELECT count(*) FROM device_metrics").await,
        points
    );
    // The same records, for the same reasons, as the independent check found.
    let stored: BTreeMap<String, i64> = client
        .query(
            "SELECT topic || ' ' || reason, count(*) FROM dead_letters GROUP BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: BTreeMap<String, i64> = reasons
        .iter()
        .map(|(reason, n)| (format!("{} {reason}", topics[0]), *n))
        .collect();
    assert_eq!(stored, want, "dead letters by topic and reason");
    assert_eq!(
        count(&client, "SELECT count(*) FROM ai_inference_results").await,
        inference.len() as i64
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM analytics_events").await,
        analytics.len() as i64
    );
    pipeline.terminate(Duration::from_secs(60))?;
    Ok(())
}
