//! Encrypted wires outward: the pipeline reads a Kafka listener that speaks TLS only (the
//! stack's stunnel in front of a Tansu of its own, certificate from the stack's test CA) and
//! writes to PostgreSQL as a role the server refuses in plain text, with
//! `sslmode=verify-full`; the records are zstd-compressed batches. Checked from outside: every row arrives, the server's `pg_stat_ssl`
//! shows the pipeline's sessions encrypted, and the same pipeline with `sslmode=disable`, or
//! with a CA that did not sign the server's certificate, writes nothing and says why.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use primespark_tests::{connect, count, free_port, fresh_database, stack, unique, wait_until};
use primespark_tests::{Pipeline, Stack};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use serde_json::json;

const EVENTS: i64 = 240;
const T0_MS: i64 = 1_762_351_200_000; // 2025-11-05T14:00:00Z

fn tls_client(stack: &Stack) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &stack.kafka_tls_brokers)
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", &stack.tls_ca);
    c
}

/// A topic on the TLS listener with `EVENTS` telemetry events, one metric each.
async fn tls_topic(stack: &Stack, topic: &str) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = tls_client(stack).create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        if let Err((t, e)) = r {
            bail!("creating {t}: {e}");
        }
    }
    // zstd batches: the pipeline's librdkafka must decompress them too.
    let producer: BaseProducer = tls_client(stack)
        .set("linger.ms", "5")
        .set("compression.type", "zstd")
        .create()?;
    for i in 0..EVENTS {
        let payload = json!({
            "device_id": format!("tls-dev-{}", i % 4),
            "timestamp": T0_MS + i * 250,
            "metrics": {"cpu_percent": (i % 100) as f64},
        })
        .to_string();
        let record = BaseRecord::<(), str>::to(topic)
            .partition(0)
            .payload(&payload);
        if let Err((e, _)) = producer.send(record) {
            bail!("producing over TLS: {e}");
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// The TLS-only role's URL for database `db`, with `params`.
fn tls_only_url(stack: &Stack, db: &str, params: &str) -> String {
    let base = stack
        .postgres_tls_only_url
        .rsplit_once('/')
        .map_or(stack.postgres_tls_only_url.as_str(), |(b, _)| b);
    format!("{base}/{db}?{params}")
}

fn write_config(dir: &Path, stack: &Stack, topic: &str, url: &str) -> Result<std::path::PathBuf> {
    let path = dir.join("pipeline.toml");
    std::fs::write(
        &path,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\n[kafka.topics]\ntelemetry = \"{topic}\"\n\
             [kafka.properties]\n\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{ca}\"\n\
             [postgres]\nurl = \"{url}\"\nflush_interval = \"200ms\"\n\
             [nas]\nenabled = false\n\
             [query]\nhttp_addr = \"127.0.0.1:{port}\"\n\
             [dataflows]\ninference = false\nanalytics = false\n",
            brokers = stack.kafka_tls_brokers,
            ca = stack.tls_ca,
            port = free_port(),
        ),
    )?;
    Ok(path)
}

/// A CA of the test's own: it signed nothing the stack serves.
fn other_ca(dir: &Path) -> Result<String> {
    let (ca, key) = (dir.join("other-ca.pem"), dir.join("other-ca.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=not the stack's CA"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&ca)
        .output()?;
    if !out.status.success() {
        bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(ca.display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_a_tls_listener_and_writes_over_verified_tls() -> Result<()> {
    let stack = stack();
    if stack.kafka_tls_brokers.is_empty() {
        bail!("the stack has no kafka_tls service: run deploy/dev/stack.sh down, then up");
    }
    let db = unique("tls_out");
    let admin_url = fresh_database(stack, &db).await?;
    let topic = format!("edge.telemetry.{db}");
    tls_topic(stack, &topic).await?;
    let work = tempfile::tempdir()?;
    let url = tls_only_url(
        stack,
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", stack.tls_ca),
    );
    let config = write_config(work.path(), stack, &topic, &url)?;
    let log = work.path().join("pipeline.log");
    let pipeline = Pipeline::start(&config, &[], &log)?;
    let observer = connect(&admin_url).await?;
    let counted = wait_until(
        Duration::from_secs(90),
        "every event in device_metrics",
        || async { Ok(count(&observer, "SELECT count(*) FROM device_metrics").await == EVENTS) },
    )
    .await;
    if let Err(e) = counted {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    // The server's view: the pipeline's sessions of this database are all TLS.
    let sessions = observer
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'primespark_tls' AND a.datname = $1",
            &[&db],
        )
        .await?;
    assert!(!sessions.is_empty(), "the pipeline has sessions open");
    assert!(
        sessions.iter().all(|r| r.get::<_, bool>(0)),
        "every session of the TLS-only role is encrypted"
    );
    pipeline.kill()?;

    // The same role in plain text is refused by the server: the pipeline stops at start-up
    // with the server's reason, well before its 30 s connect deadline.
    let plain = tls_only_url(stack, &db, "sslmode=disable");
    let config = write_config(work.path(), stack, &topic, &plain)?;
    let log = work.path().join("plain.log");
    let mut refused = Pipeline::start(&config, &[], &log)?;
    wait_until(
        Duration::from_secs(20),
        "the plain-text pipeline to exit",
        || {
            let exited = refused.exit_status().is_some();
            async move { Ok(exited) }
        },
    )
    .await?;
    let text = std::fs::read_to_string(&log)?;
    assert!(
        text.contains("no encryption") && text.contains("pg_hba.conf rejects"),
        "{text}"
    );

    // verify-full against a CA that did not sign the server's certificate: no session is
    // opened, and the log says the certificate was refused.
    let wrong = tls_only_url(
        stack,
        &db,
        &format!("sslmode=verify-full&sslrootcert={}", other_ca(work.path())?),
    );
    let config = write_config(work.path(), stack, &topic, &wrong)?;
    let log = work.path().join("wrong-ca.log");
    let unverified = Pipeline::start(&config, &[], &log)?;
    let said = wait_until(
        Duration::from_secs(20),
        "the certificate refusal in the log",
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move { Ok(text.contains("invalid peer certificate: UnknownIssuer")) }
        },
    )
    .await;
    unverified.kill()?;
    if let Err(e) = said {
        bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    Ok(())
}
