//! Benchmarks live in `benches/benches`; this library holds the workloads several of them
//! share.

use primespark_schemas::rows::{RawRow, TelemetryRow};

/// 2025-11-05T14:00:00Z, the first event time of the shared workloads.
pub const T0_US: i64 = 1_762_351_200_000_000;

/// The metrics every device reports.
pub const METRICS: [&str; 5] = [
    "cpu_percent",
    "memory_percent",
    "disk_percent",
    "temperature",
    "load_avg",
];

/// `rows` raw telemetry rows of `devices` devices: each reports its five metrics every second,
/// devices staggered by 1 ms, so event time only increases; offsets `0..rows` on partition 0.
pub fn telemetry_rows(rows: usize, devices: usize) -> Vec<RawRow> {
    (0..rows)
        .map(|i| {
            let sample = i / METRICS.len();
            let device = sample % devices;
            let tick = (sample / devices) as i64;
            RawRow::Telemetry(TelemetryRow {
                time_us: T0_US + tick * 1_000_000 + device as i64 * 1_000,
                device_id: format!("pi-{device:05}"),
                metric_name: METRICS[i % METRICS.len()].to_owned(),
                value: ((i * 7_919) % 100_000) as f64 / 100.0,
                partition: 0,
                offset: i as i64,
            })
        })
        .collect()
}
