//! The built-in web console, served by the query endpoint at `/`: an overview of streams,
//! partitions, sinks and inference (live, from the numbers `/metrics` exports), the latest dead
//! letters and anomalies, and a SQL box that runs through the same service as `/v1/sql`
//! (limits, roles, audit).
//!
//! The page is three static files compiled into the binary (no CDN, no build step: it works
//! offline) and two JSON routes. The endpoint's keys guard all of it
//! ([`primespark_connectors::query::guard_console`]); every response forbids framing, inline
//! script and foreign connections, and the script writes data only as text, never as markup.

pub mod overview;

use std::sync::Arc;

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::json;

pub use overview::StreamInfo;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// What the page may load and where it may connect: only its own origin, no inline script,
/// no framing, no forms to elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PageLabels {
    page: String,
}

fn served() -> &'static Family<PageLabels, Counter> {
    static S: std::sync::OnceLock<Family<PageLabels, Counter>> = std::sync::OnceLock::new();
    S.get_or_init(Family::default)
}

/// Registers `primespark_console_requests_total{page}`.
pub fn register(registry: &mut prometheus_client::registry::Registry) {
    registry.register(
        "primespark_console_requests",
        "Console pages and API calls served, by route",
        served().clone(),
    );
}

fn count(page: &str) {
    tracing::debug!(page, "console request");
    served()
        .get_or_create(&PageLabels {
            page: page.to_owned(),
        })
        .inc();
}

fn with_headers(content_type: &'static str, body: impl IntoResponse) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// The console's routes (unguarded: the caller wraps them in the endpoint's keys).
pub fn routes(streams: Vec<StreamInfo>) -> Router {
    let streams = Arc::new(streams);
    Router::new()
        .route(
            "/",
            get(|| async {
                count("index");
                with_headers("text/html; charset=utf-8", INDEX)
            }),
        )
        .route(
            "/console/console.js",
            get(|| async {
                count("script");
                with_headers("text/javascript; charset=utf-8", SCRIPT)
            }),
        )
        .route(
            "/console/console.css",
            get(|| async {
                count("style");
                with_headers("text/css; charset=utf-8", STYLE)
            }),
        )
        .route(
            "/console/api/overview",
            get(move || {
                let streams = streams.clone();
                async move {
                    count("overview");
                    let text = crate::ops::encode_metrics();
                    let doc = overview::build(
                        &text,
                        &streams,
                        crate::ops::readiness(),
                        &primespark_connectors::metrics::sink_last_errors(),
                        chrono::Utc::now().timestamp_micros(),
                    );
                    with_headers("application/json", Json(doc))
                }
            }),
        )
        .route(
            "/console/api/recent",
            get(|| async {
                count("recent");
                let doc = json!({
                    "dead_letters": primespark_operators::recent::dead_letters(),
                    "anomalies": primespark_operators::recent::anomalies(),
                    "capacity": primespark_operators::recent::CAPACITY,
                });
                with_headers("application/json", Json(doc))
            }),
        )
}
