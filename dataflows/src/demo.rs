//! `primespark demo`: the embedded default. No external services: an in-process
//! Kafka-protocol broker (rdkafka's mock cluster, on a loopback port outside producers can use
//! too), a synthetic fleet producing into it, Parquet under `./data`, and the SQL endpoint.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::BaseProducer;
use rdkafka::ClientConfig;

use crate::config::Config;
use crate::fleet::{produce, ExtraTopics, Fleet};
use crate::run::{run, RunError};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated devices.
    pub devices: usize,
    /// Events per second.
    pub rate: u64,
    /// Share of malformed events.
    pub bad_share: f64,
    /// Parquet folder.
    pub data: PathBuf,
    /// SQL endpoint address.
    pub http_addr: String,
    /// Stop after this long (None: until Ctrl-C).
    pub duration: Option<Duration>,
}

/// Demo failures.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded broker could not start.
    #[error("embedded broker: {0}")]
    Broker(#[from] rdkafka::error::KafkaError),
    /// The pipeline failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Runs the demo; `status` is called first with the console's address, then about once a
/// second with a one-line summary.
pub fn demo(opts: &DemoOptions, status: impl Fn(&str) + Send + 'static) -> Result<(), DemoError> {
    // First, before any log line: where to look.
    status(&format!(
        "console: http://{}/  (live overview, dead letters, SQL; ready within seconds)",
        opts.http_addr
    ));
    let cluster = MockCluster::new(1)?;
    let mut config = Config::default();
    let topic = config.kafka.topics.telemetry.clone();
    let inference_topic = config.kafka.topics.inference.clone();
    let events_topic = config.kafka.topics.events.clone();
    cluster.create_topic(&topic, 3, 1)?;
    cluster.create_topic(&inference_topic, 2, 1)?;
    cluster.create_topic(&events_topic, 2, 1)?;
    // The embedded broker has no admin API: the dead-letter topics are made here.
    for (t, n) in [(&topic, 3), (&inference_topic, 2), (&events_topic, 2)] {
        cluster.create_topic(&primespark_connectors::kafka::dlq_topic(t), n, 1)?;
    }
    let brokers = cluster.bootstrap_servers();
    tracing::info!(%brokers, topic = %topic, "embedded broker up; producers may publish here too");
    config.kafka.brokers = brokers.clone();
    config.postgres.enabled = false;
    config.nas.path = opts.data.clone();
    config.nas.roll_interval = Duration::from_secs(10);
    config.query.http_addr = opts.http_addr.clone();
    // A live demo should close windows promptly.
    config.windows.max_out_of_orderness = Duration::from_secs(2);

    let shutdown = Arc::new(AtomicBool::new(false));
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()?;
    let (devices, rate, bad) = (opts.devices, opts.rate, opts.bad_share);
    let stop = shutdown.clone();
    let producer_topic = topic.clone();
    let producer_thread = std::thread::spawn(move || {
        let mut fleet = Fleet::new(devices, bad, 42);
        produce(
            &producer,
            &producer_topic,
            ExtraTopics {
                inference: Some(&inference_topic),
                events: Some(&events_topic),
            },
            &mut fleet,
            rate,
            None,
            &stop,
        )
    });

    let stop = shutdown.clone();
    let http = opts.http_addr.clone();
    let status_thread = std::thread::spawn(move || {
        let mut last = 0u64;
        let mut ticks = 0u64;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_secs(1));
            ticks += 1;
            let total = primespark_operators::metrics::records_total();
            status(&format!(
                "[{ticks:>4}s] events/s {:>7} | consumed {:>9} | windows closed {:>7} | dead letters {:>6} | anomalies flagged {:>5} of {:>5} injected | sql: curl -s {http}/v1/sql -d '{{\"sql\":\"select count(*) from telemetry_raw\"}}' -H 'content-type: application/json'",
                total - last,
                total,
                primespark_operators::metrics::windows_closed_total(),
                primespark_connectors::metrics::dead_letters_total(),
                primespark_operators::metrics::anomalies_total(),
                crate::fleet::injected_total(),
            ));
            last = total;
        }
    });
    if let Some(d) = opts.duration {
        let stop = shutdown.clone();
        std::thread::spawn(move || {
            std::thread::sleep(d);
            stop.store(true, Ordering::SeqCst);
        });
    }
    let result = run(&config, shutdown.clone(), true);
    shutdown.store(true, Ordering::SeqCst);
    let produced = producer_thread.join().unwrap_or(0);
    let _ = status_thread.join();
    tracing::info!(produced, "demo stopped");
    drop(cluster);
    Ok(result?)
}
