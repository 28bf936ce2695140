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

/// Produces `rate` events per second for `duration` (or until `stop`), to `topic`.
pub fn produce(
    producer: &rdkafka::producer::BaseProducer,
    topic: &str,
    fleet: &mut Fleet,
    rate: u64,
    duration: Option<Duration>,
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    use rdkafka::producer::{BaseRecord, Producer};
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    let rate = rate.max(1);
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && duration.is_none_or(|d| started.elapsed() < d)
    {
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while sent < due {
            let (key, payload) = fleet.next_event(Utc::now());
            let mut record = BaseRecord::to(topic).key(&key).payload(&payload);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, r)) => {
                        tracing::debug!(error = %e, "producer queue full, waiting");
                        producer.poll(Duration::from_millis(10));
                        record = r;
                    }
                }
            }
            sent += 1;
        }
        producer.poll(Duration::from_millis(5));
    }
    let _ = producer.flush(Duration::from_secs(10));
    sent
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
}
