//! A synthetic fleet: telemetry in the platform's shape, with a chosen share of bad records.
//! Used by `primespark demo`, `primespark produce`, tests and benchmarks.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Generates telemetry events for `devices` devices.
pub struct Fleet {
    devices: usize,
    bad_share: f64,
    rng: SmallRng,
    next_device: usize,
    /// Tasks in flight for [`Fleet::next_analytics`]: (id, type, agent, steps done).
    tasks: Vec<(String, &'static str, String, u8)>,
    next_task: u64,
}

impl Fleet {
    /// A fleet with a fixed seed (reproducible runs).
    pub fn new(devices: usize, bad_share: f64, seed: u64) -> Self {
        Self {
            devices: devices.max(1),
            bad_share: bad_share.clamp(0.0, 1.0),
            rng: SmallRng::seed_from_u64(seed),
            next_device: 0,
            tasks: Vec::new(),
            next_task: 0,
        }
    }

    /// The next event at `time`: the Kafka key (device id) and the JSON payload. Devices take
    /// turns; `temperature` is null on every fifth device (no sensor), as on real hosts.
    pub fn next_event(&mut self, time: DateTime<Utc>) -> (String, Vec<u8>) {
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
            return (device_id, bad);
        }
        let temperature = if device % 5 == 4 {
            serde_json::Value::Null
        } else {
            json!(self.rng.random_range(35.0..80.0_f64))
        };
        let payload = json!({
            "device_id": device_id,
            "metrics": {
                "cpu_percent": self.rng.random_range(0.0..100.0_f64),
                "memory_percent": self.rng.random_range(10.0..95.0_f64),
                "disk_percent": self.rng.random_range(5.0..90.0_f64),
                "temperature": temperature,
                "load_avg": self.rng.random_range(0.0..4.0_f64),
            },
            // Naive isoformat, as the platform's Python producers send.
            "timestamp": time.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        });
        (device_id, payload.to_string().into_bytes())
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
    stop: &std::sync::atomic::AtomicBool,
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
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    use rdkafka::producer::Producer;
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    let rate = rate.max(1);
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && duration.is_none_or(|d| started.elapsed() < d)
        && count.is_none_or(|c| sent < c)
    {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        let due = count.map_or(due, |c| due.min(c));
        while sent < due {
            let (key, payload) = fleet.next_event(Utc::now());
            send(producer, topic, &key, &payload);
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
