//! A synthetic fleet: telemetry in the platform's shape, with a chosen share of bad records.
//! Used by `primespark demo`, `primespark produce`, tests and benchmarks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// A failure the fleet injects into a telemetry sample, so the anomaly model has something
/// real to find and its precision and recall can be measured (the label never travels in the
/// event: the pipeline sees what a broken device would send).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Injected {
    /// Temperature 80-100 °C: a blocked fan or a Pi in the sun.
    Overheating,
    /// CPU pegged at 95-100 % with a load average of 5-14: a runaway process.
    RunawayCpu,
    /// The temperature sensor stuck at 85.0 °C whatever the CPU does: the power-on value a
    /// DS18B20 reports when a conversion fails.
    StuckSensor,
}

impl Injected {
    /// Every kind, in a fixed order.
    pub const ALL: [Injected; 3] = [
        Injected::Overheating,
        Injected::RunawayCpu,
        Injected::StuckSensor,
    ];

    /// Short name (logs, reports).
    pub fn name(self) -> &'static str {
        match self {
            Injected::Overheating => "overheating",
            Injected::RunawayCpu => "runaway_cpu",
            Injected::StuckSensor => "stuck_sensor",
        }
    }
}

/// Failures injected so far by this process's fleets, per kind, as
/// `primespark_fleet_injected_anomalies_total{kind}` (the demo compares it with
/// `primespark_anomalies_total`).
fn injected_counter() -> &'static Family<Vec<(String, String)>, Counter> {
    static C: OnceLock<Family<Vec<(String, String)>, Counter>> = OnceLock::new();
    C.get_or_init(Family::default)
}

static INJECTED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Adds the fleet's metrics to `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(
        "primespark_fleet_injected_anomalies",
        "Telemetry samples the synthetic fleet sent with a failure injected, by kind",
        injected_counter().clone(),
    );
}

/// Samples with a failure injected, all kinds, sent so far (for status lines).
pub fn injected_total() -> u64 {
    INJECTED_TOTAL.load(Ordering::Relaxed)
}

fn count_injected(kind: Injected) {
    INJECTED_TOTAL.fetch_add(1, Ordering::Relaxed);
    injected_counter()
        .get_or_create(&vec![("kind".to_owned(), kind.name().to_owned())])
        .inc();
}

/// One telemetry event as [`Fleet::next_sample`] makes it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The Kafka key (device id).
    pub key: String,
    /// The JSON payload.
    pub payload: Vec<u8>,
    /// The failure injected into this sample, if any.
    pub injected: Option<Injected>,
}

/// A device's steady state: healthy samples wander around it, inside the range the shipped
/// model was trained on (`operators/models/train_anomaly.py`, `gen_normal`).
#[derive(Debug, Clone, Copy)]
struct Baseline {
    cpu: f64,
    memory: f64,
    disk: f64,
}

/// Share of good samples with a failure injected, unless [`Fleet::with_anomaly_share`] says
/// otherwise.
pub const DEFAULT_ANOMALY_SHARE: f64 = 0.01;

/// Generates telemetry events for `devices` devices.
pub struct Fleet {
    devices: usize,
    bad_share: f64,
    anomaly_share: f64,
    rng: SmallRng,
    next_device: usize,
    baselines: Vec<Baseline>,
    /// Tasks in flight for [`Fleet::next_analytics`]: (id, type, agent, steps done).
    tasks: Vec<(String, &'static str, String, u8)>,
    next_task: u64,
}

impl Fleet {
    /// A fleet with a fixed seed (reproducible runs); [`DEFAULT_ANOMALY_SHARE`] of its good
    /// samples carry an injected failure.
    pub fn new(devices: usize, bad_share: f64, seed: u64) -> Self {
        let devices = devices.max(1);
        let mut rng = SmallRng::seed_from_u64(seed);
        let baselines = (0..devices)
            .map(|_| Baseline {
                cpu: rng.random_range(10.0..60.0),
                memory: rng.random_range(35.0..70.0),
                disk: rng.random_range(15.0..55.0),
            })
            .collect();
        Self {
            devices,
            bad_share: bad_share.clamp(0.0, 1.0),
            anomaly_share: DEFAULT_ANOMALY_SHARE,
            rng,
            next_device: 0,
            baselines,
            tasks: Vec::new(),
            next_task: 0,
        }
    }

    /// Sets the share of good samples that carry an injected failure (`0.0` for none).
    pub fn with_anomaly_share(mut self, share: f64) -> Self {
        self.anomaly_share = share.clamp(0.0, 1.0);
        self
    }

    /// The next event at `time`: the Kafka key (device id) and the JSON payload.
    pub fn next_event(&mut self, time: DateTime<Utc>) -> (String, Vec<u8>) {
        let s = self.next_sample(time);
        (s.key, s.payload)
    }

    /// The next event at `time`, with the failure injected into it if any. Devices take turns;
    /// `temperature` is null on every fifth device (no sensor), as on real hosts.
    pub fn next_sample(&mut self, time: DateTime<Utc>) -> Sample {
        let device = self.next_device;
        self.next_device = (self.next_device + 1) % self.devices;
        let device_id = format!("pi-{device:05}");
        if self.rng.random_bool(self.bad_share) {
            let bad = match self.rng.random_range(0..4) {
                0 => b"{not json".to_vec(),
                1 => json!({"device_id": device_id, "metrics": {"cpu_percent": 140.0}, "timestamp": time.naive_utc().to_string()})
                    .to_string()
                    .into_bytes(),
                2 => json!({"metrics": {"cpu_percent": 1.0}, "timestamp": time.timestamp_millis()}).to_string().into_bytes(),
                _ => json!({"device_id": device_id, "metrics": {"cpu_percent": "high"}, "timestamp": time.timestamp_millis()})
                    .to_string()
                    .into_bytes(),
            };
            return Sample {
                key: device_id,
                payload: bad,
                injected: None,
            };
        }
        let has_sensor = device % 5 != 4;
        let injected = if self.rng.random_bool(self.anomaly_share) {
            let kinds: &[Injected] = if has_sensor {
                &Injected::ALL
            } else {
                &[Injected::RunawayCpu]
            };
            Some(kinds[self.rng.random_range(0..kinds.len())])
        } else {
            None
        };
        // Healthy samples follow the training data's relations: temperature and load track
        // the CPU (uniform values over wide ranges made a third of the fleet look broken).
        let base = self.baselines[device];
        let mut cpu = (base.cpu + self.normal(8.0)).clamp(5.0, 75.0);
        let memory = (base.memory + self.normal(3.0)).clamp(30.0, 75.0);
        let disk = (base.disk + self.normal(0.5)).clamp(10.0, 60.0);
        let mut load = (cpu / 25.0 + self.normal(0.35)).max(0.0);
        let mut temperature = 40.0 + 0.25 * cpu + self.normal(3.0);
        match injected {
            Some(Injected::Overheating) => temperature = self.rng.random_range(80.0..100.0),
            Some(Injected::RunawayCpu) => {
                cpu = self.rng.random_range(95.0..100.0);
                load = self.rng.random_range(5.0..14.0);
                temperature = 40.0 + 0.25 * cpu + self.normal(3.0);
            }
            Some(Injected::StuckSensor) => temperature = 85.0,
            None => {}
        }
        let temperature = if has_sensor {
            json!(temperature)
        } else {
            serde_json::Value::Null
        };
        let payload = json!({
            "device_id": device_id,
            "metrics": {
                "cpu_percent": cpu,
                "memory_percent": memory,
                "disk_percent": disk,
                "temperature": temperature,
                "load_avg": load,
            },
            // Naive isoformat, as the platform's Python producers send.
            "timestamp": time.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        });
        Sample {
            key: device_id,
            payload: payload.to_string().into_bytes(),
            injected,
        }
    }

    /// A normal draw with mean 0 and standard deviation `sd` (Box-Muller).
    fn normal(&mut self, sd: f64) -> f64 {
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

impl Fleet {
    /// The next inference request at `time`: the Kafka key (model) and the JSON payload. Edge
    /// nodes answer most requests; `edge_first` requests that the edge fails fall back to the
    /// cloud; a few requests fail.
    pub fn next_inference(&mut self, time: DateTime<Utc>) -> (String, Vec<u8>) {
        const MODELS: [&str; 3] = ["llama3.2:latest", "whisper-small", "yolov8n"];
        let model = MODELS[self.rng.random_range(0..MODELS.len())];
        let strategy =
            ["edge_first", "edge_first", "cloud_first", "balanced"][self.rng.random_range(0..4)];
        let edge_tried = strategy != "cloud_first";
        let fallback = strategy == "edge_first" && self.rng.random_bool(0.15);
        let edge = edge_tried && !fallback && self.rng.random_bool(0.8);
        let prompt = self.rng.random_range(10..600_u32);
        let response = self.rng.random_range(20..1200_u32);
        let latency: f64 = if edge {
            self.rng.random_range(80.0..900.0)
        } else {
            self.rng.random_range(300.0..2500.0)
        };
        let device = self.rng.random_range(0..self.devices);
        let payload = json!({
            "model": model,
            "prompt_length": prompt,
            "response_length": response,
            "latency_ms": latency,
            "source": if edge { "edge" } else { "cloud" },
            "status": if self.rng.random_bool(0.03) { "error" } else { "ok" },
            "routing_strategy": strategy,
            "fallback": fallback,
            "device_id": format!("pi-{device:05}"),
            "request_id": format!("r-{}", self.rng.random::<u32>()),
            "timestamp": time.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        });
        (model.to_owned(), payload.to_string().into_bytes())
    }
}

impl Fleet {
    /// The next `analytics.events` event at `time`: the Kafka key (task id, so a task's events
    /// stay in order on one partition; or the endpoint) and the JSON payload. About a third are
    /// API events; the rest move tasks through created -> assigned -> started -> completed
    /// (or failed, one in ten), with up to 64 tasks in flight.
    pub fn next_analytics(&mut self, time: DateTime<Utc>) -> (String, Vec<u8>) {
        const TYPES: [&str; 3] = ["voice_recognition", "voice_synthesis", "llm"];
        const ENDPOINTS: [(&str, &str); 3] = [
            ("llm_generate", "/api/llm/generate"),
            ("memory_search", "/api/memory/search"),
            ("submit_task", "/api/tasks/submit"),
        ];
        let timestamp = time.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
        if self.rng.random_bool(0.33) {
            let (event_type, endpoint) = ENDPOINTS[self.rng.random_range(0..ENDPOINTS.len())];
            let user = self.rng.random_range(0..12u32);
            let user_id = (user > 0).then(|| format!("user-{user}"));
            let payload = json!({
                "event_type": event_type,
                "endpoint": endpoint,
                "data": {"request_bytes": self.rng.random_range(10..5000u32)},
                "user_id": user_id,
                "timestamp": timestamp,
            });
            return (endpoint.to_owned(), payload.to_string().into_bytes());
        }
        if self.tasks.is_empty() || (self.tasks.len() < 64 && self.rng.random_bool(0.3)) {
            self.next_task += 1;
            let id = format!("task-{}-{}", self.rng.random::<u32>(), self.next_task);
            let task_type = TYPES[self.rng.random_range(0..TYPES.len())];
            let agent = format!("spark-agent-{}", self.rng.random_range(1..4u32));
            self.tasks.push((id.clone(), task_type, agent, 0));
            let priority = ["HIGH", "MEDIUM", "LOW"][self.rng.random_range(0..3)];
            let payload = json!({
                "event_type": "task_created",
                "task_id": id,
                "task_type": task_type,
                "priority": priority,
                "timestamp": timestamp,
            });
            return (id, payload.to_string().into_bytes());
        }
        let i = self.rng.random_range(0..self.tasks.len());
        let (id, _, agent, steps) = &mut self.tasks[i];
        *steps += 1;
        let event_type = match *steps {
            1 => "task_assigned",
            2 => "task_started",
            _ if self.rng.random_bool(0.1) => "task_failed",
            _ => "task_completed",
        };
        let payload = json!({
            "event_type": event_type,
            "task_id": id,
            "agent_id": agent,
            "timestamp": timestamp,
        });
        let key = id.clone();
        if *steps >= 3 {
            self.tasks.swap_remove(i);
        }
        (key, payload.to_string().into_bytes())
    }
}

/// Where [`produce`] publishes besides telemetry: one inference request and one analytics event
/// per five telemetry events, to each topic given.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExtraTopics<'a> {
    /// `edge.ai.inference`.
    pub inference: Option<&'a str>,
    /// `analytics.events`.
    pub events: Option<&'a str>,
}

/// Produces `rate` telemetry events per second for `duration` (or until `stop`), to `topic`,
/// and to the [`ExtraTopics`].
pub fn produce(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    extra: ExtraTopics<'_>,
    fleet: &mut Fleet,
    rate: u64,
    duration: Option<Duration>,
    stop: &AtomicBool,
) -> u64 {
    produce_counted(producer, topic, extra, fleet, rate, duration, None, stop)
}

/// [`produce`], stopping also once `count` telemetry events (with their inference and analytics
/// companions) are sent. Returns the telemetry events sent.
#[allow(clippy::too_many_arguments)]
pub fn produce_counted(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    extra: ExtraTopics<'_>,
    fleet: &mut Fleet,
    rate: u64,
    duration: Option<Duration>,
    count: Option<u64>,
    stop: &AtomicBool,
) -> u64 {
    use rdkafka::producer::Producer;
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    let rate = rate.max(1);
    while !stop.load(Ordering::Relaxed)
        && duration.is_none_or(|d| started.elapsed() < d)
        && count.is_none_or(|c| sent < c)
    {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let due = count.map_or(due, |c| due.min(c));
        while sent < due {
            let sample = fleet.next_sample(Utc::now());
            if let Some(kind) = sample.injected {
                count_injected(kind);
            }
            send(producer, topic, &sample.key, &sample.payload);
            if let Some(inference) = extra.inference.filter(|_| sent.is_multiple_of(5)) {
                let (key, payload) = fleet.next_inference(Utc::now());
                send(producer, inference, &key, &payload);
            }
            if let Some(events) = extra.events.filter(|_| sent.is_multiple_of(5)) {
                let (key, payload) = fleet.next_analytics(Utc::now());
                send(producer, events, &key, &payload);
            }
            sent += 1;
        }
        producer.poll(Duration::from_millis(5));
    }
    let _ = producer.flush(Duration::from_secs(10));
    sent
}

fn send(producer: &rdkafka::producer::BaseProducer, topic: &str, key: &str, payload: &[u8]) {
    use rdkafka::producer::BaseRecord;
    let mut record = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((e, r)) => {
                tracing::debug!(error = %e, "producer queue full, waiting");
                producer.poll(std::time::Duration::from_millis(10));
                record = r;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use primespark_schemas::telemetry::TelemetryEvent;
    use primespark_schemas::DecodeLimits;

    #[test]
    fn good_events_decode_and_bad_ones_fail() {
        let mut fleet = Fleet::new(10, 0.3, 7);
        let (mut good, mut bad) = (0, 0);
        for _ in 0..1000 {
            let (_, payload) = fleet.next_event(Utc::now());
            match TelemetryEvent::decode(&payload, &DecodeLimits::default()) {
                Ok(_) => good += 1,
                Err(_) => bad += 1,
            }
        }
        assert!(bad > 200 && bad < 400, "bad {bad}");
        assert_eq!(good + bad, 1000);
    }

    /// The shipped model on the fleet's own traffic: healthy samples are rarely flagged and
    /// every injected kind is found. Prints the figures the README quotes.
    #[test]
    fn the_shipped_model_finds_injected_failures_and_spares_healthy_samples() {
        use primespark_operators::inference::cpu::CpuModel;
        use primespark_operators::inference::features::FeatureSpec;
        use primespark_operators::inference::{
            Model, ModelSource, ModelSpec, BUILTIN_MODEL_NAME, BUILTIN_MODEL_ONNX,
        };
        const THRESHOLD: f32 = 0.5;
        let spec = FeatureSpec::builtin();
        let mut model = CpuModel::load(&ModelSpec {
            name: BUILTIN_MODEL_NAME.into(),
            onnx: ModelSource::Builtin(BUILTIN_MODEL_ONNX),
            hef: None,
            inputs: spec.len(),
        })
        .unwrap();
        // 5 % injected so each kind gets hundreds of samples; 100 devices, 20 without a sensor.
        let mut fleet = Fleet::new(100, 0.0, 11).with_anomaly_share(0.05);
        let (mut features, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..40_000 {
            let sample = fleet.next_sample(Utc::now());
            let event = TelemetryEvent::decode(&sample.payload, &DecodeLimits::default()).unwrap();
            spec.normalize_into(
                |name| {
                    event
                        .metrics
                        .iter()
                        .find(|m| m.name == name)
                        .map(|m| m.value)
                },
                &mut features,
            );
            labels.push(sample.injected);
        }
        let mut scores = Vec::new();
        for chunk in features.chunks(spec.len() * 512) {
            model
                .run(chunk, chunk.len() / spec.len(), &mut scores)
                .unwrap();
        }
        let mut normal = (0usize, 0usize); // (flagged, total)
        let mut by_kind = std::collections::BTreeMap::new();
        for (label, score) in labels.iter().zip(&scores) {
            let flagged = *score >= THRESHOLD;
            let entry = match label {
                None => &mut normal,
                Some(kind) => by_kind.entry(*kind).or_insert((0usize, 0usize)),
            };
            entry.0 += usize::from(flagged);
            entry.1 += 1;
        }
        let found: usize = by_kind.values().map(|(f, _)| f).sum();
        let injected: usize = by_kind.values().map(|(_, t)| t).sum();
        let precision = found as f64 / (found + normal.0) as f64;
        let recall = found as f64 / injected as f64;
        let false_positive = normal.0 as f64 / normal.1 as f64;
        eprintln!(
            "healthy flagged {}/{} ({:.3} %); injected found {found}/{injected}: precision {precision:.3}, recall {recall:.3}",
            normal.0,
            normal.1,
            false_positive * 100.0
        );
        for (kind, (f, t)) in &by_kind {
            eprintln!(
                "  {}: {f}/{t} ({:.1} %)",
                kind.name(),
                *f as f64 * 100.0 / *t as f64
            );
        }
        assert_eq!(by_kind.len(), Injected::ALL.len(), "{by_kind:?}");
        assert!(
            false_positive < 0.02,
            "healthy samples flagged: {false_positive}"
        );
        for (kind, (f, t)) in &by_kind {
            assert!(*f as f64 >= 0.9 * *t as f64, "{kind:?} found {f} of {t}");
        }
        assert!(precision > 0.8, "precision {precision}");
    }

    #[test]
    fn analytics_events_decode_and_tasks_run_their_course() {
        use primespark_schemas::analytics::{AnalyticsEvent, TaskEventKind};
        let mut fleet = Fleet::new(10, 0.0, 7);
        let mut kinds = std::collections::BTreeMap::new();
        let mut api = 0;
        for _ in 0..2000 {
            let (_, payload) = fleet.next_analytics(Utc::now());
            match AnalyticsEvent::decode(&payload, &DecodeLimits::default()).unwrap() {
                AnalyticsEvent::Task(t) => *kinds.entry(t.kind).or_insert(0) += 1,
                AnalyticsEvent::Api(_) => api += 1,
            }
        }
        assert!(api > 400, "api {api}");
        let finished = kinds.get(&TaskEventKind::Completed).copied().unwrap_or(0)
            + kinds.get(&TaskEventKind::Failed).copied().unwrap_or(0);
        assert!(finished > 100, "{kinds:?}");
        assert!(kinds[&TaskEventKind::Created] >= finished);
    }

    #[test]
    fn inference_requests_decode() {
        let mut fleet = Fleet::new(10, 0.0, 7);
        for _ in 0..500 {
            let (_, payload) = fleet.next_inference(Utc::now());
            primespark_schemas::inference::InferenceEvent::decode(
                &payload,
                &DecodeLimits::default(),
            )
            .unwrap();
        }
    }
}
