//! The process's Prometheus registry and operational HTTP routes.

use std::sync::OnceLock;
use std::time::Instant;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

struct Process {
    registry: Registry,
}

fn process() -> &'static Process {
    static P: OnceLock<Process> = OnceLock::new();
    P.get_or_init(|| {
        let mut registry = Registry::default();
        primespark_operators::metrics::register(&mut registry);
        primespark_connectors::metrics::register(&mut registry);
        crate::fleet::register(&mut registry);
        crate::console::register(&mut registry);
        let started = Instant::now();
        let uptime = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "primespark_start_time_seconds",
            "Process start, seconds since the epoch",
            {
                let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
                g.set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
                g
            },
        );
        registry.register(
            "primespark_uptime_seconds",
            "Seconds since start",
            uptime.clone(),
        );
        UPTIME.get_or_init(|| (started, uptime));
        Process { registry }
    })
}

static UPTIME: OnceLock<(Instant, Gauge<f64, std::sync::atomic::AtomicU64>)> = OnceLock::new();

/// The metrics in Prometheus text format.
pub fn encode_metrics() -> String {
    let p = process();
    primespark_operators::metrics::refresh_watermark_lag(chrono::Utc::now().timestamp_micros());
    if let Some((started, gauge)) = UPTIME.get() {
        gauge.set(started.elapsed().as_secs_f64());
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &p.registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

fn sources() -> &'static std::sync::Mutex<std::collections::BTreeMap<String, usize>> {
    static S: OnceLock<std::sync::Mutex<std::collections::BTreeMap<String, usize>>> =
        OnceLock::new();
    S.get_or_init(Default::default)
}

/// Declares a dataflow's source (it is not ready until every worker that reads a partition of
/// it has its assignment).
pub fn source_expected(dataflow: &str, readers: usize) {
    if let Ok(mut s) = sources().lock() {
        s.insert(dataflow.to_owned(), readers);
    }
}

/// One reader of `dataflow` has its partitions assigned.
pub fn source_assigned(dataflow: &str) {
    if let Ok(mut s) = sources().lock() {
        if let Some(left) = s.get_mut(dataflow) {
            *left = left.saturating_sub(1);
        }
    }
}

/// The readiness report: sources assigned, sinks not degraded.
pub fn readiness() -> (bool, serde_json::Value) {
    let sources: serde_json::Map<String, serde_json::Value> = sources()
        .lock()
        .map(|s| {
            s.iter()
                .map(|(d, left)| {
                    let state = if *left == 0 { "assigned" } else { "starting" };
                    (d.clone(), serde_json::Value::from(state))
                })
                .collect()
        })
        .unwrap_or_default();
    let degraded: Vec<serde_json::Value> = primespark_connectors::metrics::degraded_sinks()
        .into_iter()
        .map(|(sink, table, error)| serde_json::json!({"sink": sink, "table": table, "error": error}))
        .collect();
    let writer = primespark_connectors::metrics::writer_lease();
    let writing = writer
        .as_ref()
        .is_none_or(|(s, _)| *s == primespark_connectors::metrics::WriterLeaseState::Held);
    let ready = writing
        && !sources.is_empty()
        && sources.values().all(|v| v == "assigned")
        && degraded.is_empty();
    let mut report =
        serde_json::json!({"ready": ready, "sources": sources, "degraded_sinks": degraded});
    if let Some((_, detail)) = writer {
        report["writer"] = serde_json::Value::from(detail);
    }
    (ready, report)
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn routes() -> Router {
    // Register everything before the first scrape.
    let _ = process();
    Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    encode_metrics(),
                )
                    .into_response()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|| async {
                let (ready, body) = readiness();
                let status = if ready {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                };
                (status, axum::Json(body))
            }),
        )
}
