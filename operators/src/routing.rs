//! Window aggregates of the `edge.ai.inference` stream: per-(model, source) inference statistics
//! and edge-vs-cloud routing statistics.
//!
//! Both are folds over [`InferenceEvent`]s that merge exactly (counts add, sketches merge), so a
//! window may be aggregated in parts on many workers and combined. The definitions, which the
//! dashboards and the oracle tests share:
//!
//! - **tokens**: `prompt_length` is the input, `response_length` the output;
//!   *output tokens per second* is `sum(output) / sum(latency seconds)` over the window
//!   (throughput of the serving side, not the mean of per-request rates, which a few tiny
//!   requests would dominate).
//! - **tried the edge first**: served at the edge without a `cloud_first` strategy, or a
//!   `fallback` (the edge was tried and the request went to the cloud). The *cloud fallback
//!   rate* is fallbacks among those.
//! - **edge share**: edge requests among all requests.
//! - **success rate** per side: `status = ok` among that side's requests.
//! - percentiles come from [`QuantileSketch`] (0.5% relative error).

use primespark_schemas::inference::{InferenceEvent, RoutingStrategy, Source, Status};
use serde::{Deserialize, Serialize};

use crate::sketch::QuantileSketch;

/// Running statistics of one (model, source) in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceStats {
    /// Requests.
    pub count: u64,
    /// Requests with `status = error`.
    pub errors: u64,
    /// Sum of `prompt_length`.
    pub input_tokens: u64,
    /// Sum of `response_length`.
    pub output_tokens: u64,
    /// Sum of latencies, milliseconds.
    pub latency_ms_sum: f64,
    /// Latency distribution, milliseconds.
    pub latency: QuantileSketch,
}

impl InferenceStats {
    /// Folds in one request.
    pub fn add(&mut self, e: &InferenceEvent) {
        self.count += 1;
        self.errors += u64::from(e.status == Status::Error);
        self.input_tokens += u64::from(e.prompt_length);
        self.output_tokens += u64::from(e.response_length);
        self.latency_ms_sum += e.latency_ms;
        self.latency.add(e.latency_ms);
    }

    /// Adds another partial aggregate of the same key and window.
    pub fn merge(&mut self, other: &InferenceStats) {
        self.count += other.count;
        self.errors += other.errors;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.latency_ms_sum += other.latency_ms_sum;
        self.latency.merge(&other.latency);
    }

    /// Mean input tokens per request (0 when empty).
    pub fn avg_input_tokens(&self) -> f64 {
        ratio(self.input_tokens as f64, self.count as f64)
    }

    /// Mean output tokens per request (0 when empty).
    pub fn avg_output_tokens(&self) -> f64 {
        ratio(self.output_tokens as f64, self.count as f64)
    }

    /// `sum(output tokens) / sum(latency seconds)`; `None` when no time was spent.
    pub fn output_tokens_per_second(&self) -> Option<f64> {
        (self.latency_ms_sum > 0.0)
            .then(|| self.output_tokens as f64 / (self.latency_ms_sum / 1000.0))
    }
}

/// Which slice of the routing statistics a row describes: every request, or one strategy
/// (requests without a strategy count only in `All`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RoutingSlice {
    /// All requests.
    All,
    /// Requests routed with this strategy.
    Strategy(StrategyKey),
}

/// [`RoutingStrategy`] with an order, as a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StrategyKey {
    /// `edge_first`.
    EdgeFirst,
    /// `cloud_first`.
    CloudFirst,
    /// `balanced`.
    Balanced,
}

impl From<RoutingStrategy> for StrategyKey {
    fn from(s: RoutingStrategy) -> Self {
        match s {
            RoutingStrategy::EdgeFirst => StrategyKey::EdgeFirst,
            RoutingStrategy::CloudFirst => StrategyKey::CloudFirst,
            RoutingStrategy::Balanced => StrategyKey::Balanced,
        }
    }
}

impl RoutingSlice {
    /// The `routing_strategy` column value: `all`, or the strategy's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutingSlice::All => "all",
            RoutingSlice::Strategy(StrategyKey::EdgeFirst) => "edge_first",
            RoutingSlice::Strategy(StrategyKey::CloudFirst) => "cloud_first",
            RoutingSlice::Strategy(StrategyKey::Balanced) => "balanced",
        }
    }

    /// The slices an event counts in: always `All`, plus its strategy when it has one.
    pub fn of(e: &InferenceEvent) -> impl Iterator<Item = RoutingSlice> {
        std::iter::once(RoutingSlice::All)
            .chain(e.routing_strategy.map(|s| RoutingSlice::Strategy(s.into())))
    }
}

/// Running routing statistics of one slice in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingStats {
    /// Requests served at the edge.
    pub edge: u64,
    /// Requests served in the cloud.
    pub cloud: u64,
    /// Edge requests with `status = ok`.
    pub edge_ok: u64,
    /// Cloud requests with `status = ok`.
    pub cloud_ok: u64,
    /// Requests that tried the edge first (see the module docs).
    pub tried_edge_first: u64,
    /// Of those, requests that fell back to the cloud.
    pub fallbacks: u64,
    /// Edge latency distribution, milliseconds.
    pub edge_latency: QuantileSketch,
    /// Cloud latency distribution, milliseconds.
    pub cloud_latency: QuantileSketch,
}

impl RoutingStats {
    /// Folds in one request.
    pub fn add(&mut self, e: &InferenceEvent) {
        let ok = u64::from(e.status == Status::Ok);
        match e.source {
            Source::Edge => {
                self.edge += 1;
                self.edge_ok += ok;
                self.edge_latency.add(e.latency_ms);
            }
            Source::Cloud => {
                self.cloud += 1;
                self.cloud_ok += ok;
                self.cloud_latency.add(e.latency_ms);
            }
        }
        let tried_edge = e.fallback
            || (e.source == Source::Edge
                && e.routing_strategy != Some(RoutingStrategy::CloudFirst));
        self.tried_edge_first += u64::from(tried_edge);
        self.fallbacks += u64::from(e.fallback);
    }

    /// Adds another partial aggregate of the same slice and window.
    pub fn merge(&mut self, other: &RoutingStats) {
        self.edge += other.edge;
        self.cloud += other.cloud;
        self.edge_ok += other.edge_ok;
        self.cloud_ok += other.cloud_ok;
        self.tried_edge_first += other.tried_edge_first;
        self.fallbacks += other.fallbacks;
        self.edge_latency.merge(&other.edge_latency);
        self.cloud_latency.merge(&other.cloud_latency);
    }

    /// All requests.
    pub fn requests(&self) -> u64 {
        self.edge + self.cloud
    }

    /// Edge requests among all (0 when empty).
    pub fn edge_share(&self) -> f64 {
        ratio(self.edge as f64, self.requests() as f64)
    }

    /// Fallbacks among requests that tried the edge first; `None` when none did.
    pub fn fallback_rate(&self) -> Option<f64> {
        (self.tried_edge_first > 0).then(|| self.fallbacks as f64 / self.tried_edge_first as f64)
    }

    /// Successful edge requests among edge requests; `None` without edge requests.
    pub fn edge_success_rate(&self) -> Option<f64> {
        (self.edge > 0).then(|| self.edge_ok as f64 / self.edge as f64)
    }

    /// Successful cloud requests among cloud requests; `None` without cloud requests.
    pub fn cloud_success_rate(&self) -> Option<f64> {
        (self.cloud > 0).then(|| self.cloud_ok as f64 / self.cloud as f64)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use primespark_schemas::DecodeLimits;
    use proptest::prelude::*;

    fn event(
        source: &str,
        status: &str,
        strategy: Option<&str>,
        fallback: bool,
        latency: f64,
    ) -> InferenceEvent {
        let strategy = strategy.map_or("null".to_owned(), |s| format!("\"{s}\""));
        let json = format!(
            r#"{{"model":"m","prompt_length":10,"response_length":40,"latency_ms":{latency},"source":"{source}",
                "status":"{status}","routing_strategy":{strategy},"fallback":{fallback},"timestamp":1762351387123}}"#
        );
        InferenceEvent::decode(json.as_bytes(), &DecodeLimits::default()).expect("valid event")
    }

    #[test]
    fn routing_definitions() {
        let mut s = RoutingStats::default();
        s.add(&event("edge", "ok", Some("edge_first"), false, 100.0));
        s.add(&event("edge", "error", Some("edge_first"), false, 200.0));
        s.add(&event("cloud", "ok", Some("edge_first"), true, 900.0));
        s.add(&event("cloud", "ok", Some("cloud_first"), false, 800.0));
        assert_eq!((s.edge, s.cloud), (2, 2));
        assert_eq!(s.edge_share(), 0.5);
        // Tried edge first: both edge requests and the fallback.
        assert_eq!(s.fallback_rate(), Some(1.0 / 3.0));
        assert_eq!(s.edge_success_rate(), Some(0.5));
        assert_eq!(s.cloud_success_rate(), Some(1.0));
        assert_eq!(s.edge_latency.quantile(1.0), Some(200.0));
    }

    #[test]
    fn inference_stats_and_throughput() {
        let mut s = InferenceStats::default();
        s.add(&event("edge", "ok", None, false, 500.0));
        s.add(&event("edge", "error", None, false, 1500.0));
        assert_eq!((s.count, s.errors), (2, 1));
        assert_eq!(s.avg_input_tokens(), 10.0);
        assert_eq!(s.avg_output_tokens(), 40.0);
        // 80 tokens in 2 seconds.
        assert_eq!(s.output_tokens_per_second(), Some(40.0));
        assert_eq!(InferenceStats::default().output_tokens_per_second(), None);
    }

    #[test]
    fn slices() {
        let e = event("edge", "ok", Some("balanced"), false, 1.0);
        let slices: Vec<_> = RoutingSlice::of(&e).map(RoutingSlice::as_str).collect();
        assert_eq!(slices, ["all", "balanced"]);
        let e = event("edge", "ok", None, false, 1.0);
        assert_eq!(RoutingSlice::of(&e).count(), 1);
    }

    proptest! {
        #[test]
        fn merging_parts_equals_folding_all(
            spec in proptest::collection::vec((any::<bool>(), any::<bool>(), 0u8..4, 0.0f64..10_000.0), 0..200),
            cut in 0usize..200,
        ) {
            let events: Vec<InferenceEvent> = spec
                .iter()
                .map(|(edge, ok, strat, lat)| {
                    let strategy = [None, Some("edge_first"), Some("cloud_first"), Some("balanced")][*strat as usize];
                    let fallback = !edge && strategy == Some("edge_first");
                    event(if *edge { "edge" } else { "cloud" }, if *ok { "ok" } else { "error" }, strategy, fallback, *lat)
                })
                .collect();
            let cut = cut.min(events.len());
            let (mut all_r, mut a_r, mut b_r) = (RoutingStats::default(), RoutingStats::default(), RoutingStats::default());
            let (mut all_i, mut a_i, mut b_i) = (InferenceStats::default(), InferenceStats::default(), InferenceStats::default());
            for (i, e) in events.iter().enumerate() {
                all_r.add(e);
                all_i.add(e);
                if i < cut { a_r.add(e); a_i.add(e); } else { b_r.add(e); b_i.add(e); }
            }
            a_r.merge(&b_r);
            a_i.merge(&b_i);
            prop_assert_eq!(&a_r.edge_latency, &all_r.edge_latency);
            prop_assert_eq!((a_r.edge, a_r.cloud, a_r.fallbacks, a_r.tried_edge_first), (all_r.edge, all_r.cloud, all_r.fallbacks, all_r.tried_edge_first));
            prop_assert_eq!((a_i.count, a_i.errors, a_i.output_tokens), (all_i.count, all_i.errors, all_i.output_tokens));
            prop_assert_eq!(&a_i.latency, &all_i.latency);
        }
    }
}
