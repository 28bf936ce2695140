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

/// `/metrics` and `/healthz`.
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
}
