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
}

impl Fleet {
    /// A fleet with a fixed seed (reproducible runs).
    pub fn new(devices: usize, bad_share: f64, seed: u64) -> Self {
        Self {
            devices: devices.max(1),
            bad_share: bad_share.clamp(0.0, 1.0),
            rng: SmallRng::seed_from_u64(seed),
            next_device: 0,
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

/// Produces `rate` telemetry events per second for `duration` (or until `stop`), to `topic`;
/// with `inference_topic`, also one inference request per five telemetry events there.
#[allow(clippy::too_many_arguments)]
pub fn produce(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    inference_topic: Option<&str>,
    fleet: &mut Fleet,
    rate: u64,
    duration: Option<Duration>,
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    use rdkafka::producer::Producer;
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    let rate = rate.max(1);
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && duration.is_none_or(|d| started.elapsed() < d)
    {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let (key, payload) = fleet.next_event(Utc::now());
            send(producer, topic, &key, &payload);
            if let Some(inference) = inference_topic.filter(|_| sent.is_multiple_of(5)) {
                let (key, payload) = fleet.next_inference(Utc::now());
                send(producer, inference, &key, &payload);
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
