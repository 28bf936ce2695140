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
                device_id: primespark_schemas::intern::name(&format!("pi-{device:05}")),
                metric_name: primespark_schemas::intern::name(METRICS[i % METRICS.len()]),
                value: ((i * 7_919) % 100_000) as f64 / 100.0,
                partition: 0,
                offset: i as i64,
            })
        })
        .collect()
}

/// `url` pointing at database `db` (URL or `key=value` connection string).
pub fn with_dbname(url: &str, db: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname={db}");
    };
    let rest = &url[scheme_end + 3..];
    let query = rest.find('?').map_or("", |q| &rest[q..]);
    let authority = rest[..rest.len() - query.len()]
        .split('/')
        .next()
        .unwrap_or_default();
    format!("{}{authority}/{db}{query}", &url[..scheme_end + 3])
}

/// The `psql` to compare with: `PRIMESPARK_STACK_PSQL`, Debian's PostgreSQL 15, or the PATH's.
pub fn psql_path() -> String {
    if let Ok(p) = std::env::var("PRIMESPARK_STACK_PSQL") {
        return p;
    }
    let debian = "/usr/lib/postgresql/15/bin/psql";
    if std::path::Path::new(debian).exists() {
        debian.to_owned()
    } else {
        "psql".to_owned()
    }
}

/// The peak resident set (`VmHWM`) of process `pid` (`"self"` for this one) so far, in MB;
/// NaN when `/proc` does not say.
pub fn peak_rss_mb(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
