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
use primespark_schemas::rows::{InferenceStatsRow, RoutingStatsRow};
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::StreamVec;

use crate::sketch::QuantileSketch;
use crate::window::{PreAggregate, TumblingWindow, WindowSpec};
use crate::EventTime;

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

impl InferenceStats {
    /// The row of a closed window.
    pub fn to_row(&self, bucket_us: i64, model: String, source: Source) -> InferenceStatsRow {
        let q = |p| self.latency.quantile(p).unwrap_or(0.0);
        InferenceStatsRow {
            bucket_us,
            model,
            source: source.as_str().to_owned(),
            count: i64::try_from(self.count).unwrap_or(i64::MAX),
            errors: i64::try_from(self.errors).unwrap_or(i64::MAX),
            latency_p50_ms: q(0.50),
            latency_p95_ms: q(0.95),
            latency_p99_ms: q(0.99),
            avg_input_tokens: self.avg_input_tokens(),
            avg_output_tokens: self.avg_output_tokens(),
            output_tokens_per_s: self.output_tokens_per_second(),
            avg_latency_ms: ratio(self.latency_ms_sum, self.count as f64),
        }
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

impl RoutingStats {
    /// The row of a closed window.
    pub fn to_row(&self, bucket_us: i64, slice: RoutingSlice) -> RoutingStatsRow {
        RoutingStatsRow {
            bucket_us,
            routing_strategy: slice.as_str().to_owned(),
            edge_requests: i64::try_from(self.edge).unwrap_or(i64::MAX),
            cloud_requests: i64::try_from(self.cloud).unwrap_or(i64::MAX),
            edge_share: self.edge_share(),
            cloud_fallback_rate: self.fallback_rate(),
            edge_success_rate: self.edge_success_rate(),
            cloud_success_rate: self.cloud_success_rate(),
            edge_p95_ms: self.edge_latency.quantile(0.95),
            cloud_p95_ms: self.cloud_latency.quantile(0.95),
            tried_edge_first: i64::try_from(self.tried_edge_first).unwrap_or(i64::MAX),
            fallbacks: i64::try_from(self.fallbacks).unwrap_or(i64::MAX),
        }
    }
}

/// Settings of [`InferenceWindows::inference_windows`].
#[derive(Debug, Clone)]
pub struct InferenceWindowSpec {
    /// Dataflow name (logs, metrics).
    pub dataflow: String,
    /// Window width, microseconds (1 minute for `*_1m`, 1 hour for `*_1h`).
    pub width_us: i64,
    /// Table-name suffix of the windows, e.g. `1m`; operators are named `inference_stats_<suffix>`
    /// and `routing_stats_<suffix>`.
    pub suffix: String,
    /// Windows ending at or before this were committed by an earlier run.
    pub committed_watermark_us: EventTime,
    /// How long past its end a window still takes records, microseconds.
    pub allowed_lateness_us: u64,
}

/// Event-time windows over inference events: per-(model, source) statistics and routing
/// statistics per slice.
pub trait InferenceWindows<'scope> {
    /// Aggregates every window and emits one row per (model, source) and one per routing slice
    /// once the watermark passes the window's end. Late events (window already closed) are
    /// counted by the window operators and left out.
    fn inference_windows(
        self,
        spec: InferenceWindowSpec,
    ) -> (
        StreamVec<'scope, EventTime, InferenceStatsRow>,
        StreamVec<'scope, EventTime, RoutingStatsRow>,
    );
}

impl<'scope> InferenceWindows<'scope> for StreamVec<'scope, EventTime, InferenceEvent> {
    fn inference_windows(
        self,
        spec: InferenceWindowSpec,
    ) -> (
        StreamVec<'scope, EventTime, InferenceStatsRow>,
        StreamVec<'scope, EventTime, RoutingStatsRow>,
    ) {
        let window = |name: &str| WindowSpec {
            name: format!("{name}_{}", spec.suffix),
            dataflow: spec.dataflow.clone(),
            width_us: spec.width_us,
            committed_watermark_us: spec.committed_watermark_us,
            allowed_lateness_us: spec.allowed_lateness_us,
        };
        // Combined per worker first: a window's requests cross the exchange as one partial per
        // key and batch, so even the `all` slice (one key per window) is cheap.
        let width = spec.width_us;
        let stats = self
            .clone()
            .map(|e: InferenceEvent| ((e.model.clone(), e.source), e.time_us, e))
            .pre_aggregate(
                "inference_stats",
                width,
                |s: &mut InferenceStats, e: InferenceEvent| s.add(&e),
            )
            .tumbling_window(
                window("inference_stats"),
                |s: &mut InferenceStats, p: InferenceStats| s.merge(&p),
            )
            .map(|w| w.agg.to_row(w.window_start_us, w.key.0, w.key.1));
        let routing = self
            .flat_map(|e: InferenceEvent| {
                let slices: Vec<RoutingSlice> = RoutingSlice::of(&e).collect();
                slices.into_iter().map(move |s| (s, e.time_us, e.clone()))
            })
            .pre_aggregate(
                "routing_stats",
                width,
                |s: &mut RoutingStats, e: InferenceEvent| s.add(&e),
            )
            .tumbling_window(
                window("routing_stats"),
                |s: &mut RoutingStats, p: RoutingStats| s.merge(&p),
            )
            .map(|w| w.agg.to_row(w.window_start_us, w.key));
        (stats, routing)
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

    /// A from-scratch reference of both tables over the same events, compared with what the
    /// window operators emit (differential's `reduce_reference.rs` style).
    fn check_against_reference(
        events: Vec<InferenceEvent>,
        width_us: i64,
    ) -> Result<(), TestCaseError> {
        use std::collections::BTreeMap;
        use timely::dataflow::operators::capture::{Capture, Event};
        use timely::dataflow::operators::ToStream;

        let input = events.clone();
        let (stats, routing) = timely::example(move |scope| {
            let spec = InferenceWindowSpec {
                dataflow: "test".into(),
                width_us,
                suffix: "1m".into(),
                committed_watermark_us: 0,
                allowed_lateness_us: 0,
            };
            let (s, r) = input
                .to_stream(scope)
                .container::<Vec<_>>()
                .inference_windows(spec);
            (s.capture(), r.capture())
        });
        fn collect<R>(rx: std::sync::mpsc::Receiver<Event<EventTime, Vec<R>>>) -> Vec<R> {
            rx.try_iter()
                .flat_map(|e| match e {
                    Event::Messages(_, rows) => rows,
                    Event::Progress(_) => Vec::new(),
                })
                .collect()
        }
        let stats: Vec<InferenceStatsRow> = collect(stats);
        let routing: Vec<RoutingStatsRow> = collect(routing);

        let bucket = |t: i64| t.div_euclid(width_us) * width_us;
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
        let lower_quantile =
            |sorted: &[f64], q: f64| sorted[(q * (sorted.len() - 1) as f64).floor() as usize];
        let near = |est: f64, exact: f64| {
            (est - exact).abs() <= crate::sketch::RELATIVE_ERROR * exact + 1e-9
        };

        // inference_stats
        let mut groups: BTreeMap<(i64, String, &str), Vec<&InferenceEvent>> = BTreeMap::new();
        for e in &events {
            groups
                .entry((bucket(e.time_us), e.model.clone(), e.source.as_str()))
                .or_default()
                .push(e);
        }
        prop_assert_eq!(stats.len(), groups.len());
        for row in &stats {
            let key = (row.bucket_us, row.model.clone(), row.source.as_str());
            let group = groups
                .get(&key)
                .ok_or_else(|| TestCaseError::fail(format!("unexpected {key:?}")))?;
            let n = group.len() as f64;
            prop_assert_eq!(row.count, group.len() as i64);
            prop_assert_eq!(
                row.errors,
                group.iter().filter(|e| e.status == Status::Error).count() as i64
            );
            let input: f64 = group.iter().map(|e| f64::from(e.prompt_length)).sum();
            let output: f64 = group.iter().map(|e| f64::from(e.response_length)).sum();
            let latency: f64 = group.iter().map(|e| e.latency_ms).sum();
            prop_assert!(close(row.avg_input_tokens, input / n));
            prop_assert!(close(row.avg_output_tokens, output / n));
            prop_assert!(close(row.avg_latency_ms, latency / n));
            match row.output_tokens_per_s {
                Some(tps) => prop_assert!(close(tps, output / (latency / 1000.0))),
                None => prop_assert!(latency == 0.0),
            }
            let mut sorted: Vec<f64> = group.iter().map(|e| e.latency_ms).collect();
            sorted.sort_by(f64::total_cmp);
            for (q, got) in [
                (0.5, row.latency_p50_ms),
                (0.95, row.latency_p95_ms),
                (0.99, row.latency_p99_ms),
            ] {
                let want = lower_quantile(&sorted, q);
                prop_assert!(
                    near(got, want),
                    "p{} of {:?}: {} vs exact {}",
                    q * 100.0,
                    key,
                    got,
                    want
                );
            }
        }

        // routing_stats
        let mut slices: BTreeMap<(i64, &str), Vec<&InferenceEvent>> = BTreeMap::new();
        for e in &events {
            slices
                .entry((bucket(e.time_us), "all"))
                .or_default()
                .push(e);
            if let Some(s) = e.routing_strategy {
                slices
                    .entry((bucket(e.time_us), s.as_str()))
                    .or_default()
                    .push(e);
            }
        }
        prop_assert_eq!(routing.len(), slices.len());
        for row in &routing {
            let key = (row.bucket_us, row.routing_strategy.as_str());
            let group = slices
                .get(&key)
                .ok_or_else(|| TestCaseError::fail(format!("unexpected {key:?}")))?;
            let side = |src: Source| group.iter().filter(move |e| e.source == src);
            let edge = side(Source::Edge).count();
            let cloud = side(Source::Cloud).count();
            prop_assert_eq!(
                (row.edge_requests, row.cloud_requests),
                (edge as i64, cloud as i64)
            );
            prop_assert!(close(row.edge_share, edge as f64 / group.len() as f64));
            let tried = group
                .iter()
                .filter(|e| {
                    e.fallback
                        || (e.source == Source::Edge
                            && e.routing_strategy != Some(RoutingStrategy::CloudFirst))
                })
                .count();
            let fallbacks = group.iter().filter(|e| e.fallback).count();
            let rate = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
            prop_assert_eq!(row.cloud_fallback_rate, rate(fallbacks, tried));
            // The rate's own counts, so that windows combine by weight.
            prop_assert_eq!(
                (row.tried_edge_first, row.fallbacks),
                (tried as i64, fallbacks as i64)
            );
            let ok = |src: Source| side(src).filter(|e| e.status == Status::Ok).count();
            prop_assert_eq!(row.edge_success_rate, rate(ok(Source::Edge), edge));
            prop_assert_eq!(row.cloud_success_rate, rate(ok(Source::Cloud), cloud));
            for (src, got) in [
                (Source::Edge, row.edge_p95_ms),
                (Source::Cloud, row.cloud_p95_ms),
            ] {
                let mut sorted: Vec<f64> = side(src).map(|e| e.latency_ms).collect();
                sorted.sort_by(f64::total_cmp);
                match got {
                    Some(got) => prop_assert!(near(got, lower_quantile(&sorted, 0.95))),
                    None => prop_assert!(sorted.is_empty()),
                }
            }
        }
        Ok(())
    }

    fn arbitrary_event() -> impl Strategy<Value = InferenceEvent> {
        (0u8..3, any::<bool>(), 0u8..10, 0u8..4, 0i64..600_000_000, 0.0f64..20_000.0, 0u32..2000, 0u32..4000).prop_map(
            |(model, edge, status, strat, dt, latency, prompt, response)| {
                let strategy = [None, Some("edge_first"), Some("cloud_first"), Some("balanced")][strat as usize];
                let fallback = !edge && strategy == Some("edge_first") && status % 2 == 0;
                let strategy = strategy.map_or("null".to_owned(), |s| format!("\"{s}\""));
                let json = format!(
                    r#"{{"model":"model-{model}","prompt_length":{prompt},"response_length":{response},
                        "latency_ms":{latency},"source":"{}","status":"{}","routing_strategy":{strategy},
                        "fallback":{fallback},"timestamp":{}}}"#,
                    if edge { "edge" } else { "cloud" },
                    if status == 0 { "error" } else { "ok" },
                    (1_762_351_200_000_000 + dt) / 1000,
                );
                InferenceEvent::decode(json.as_bytes(), &DecodeLimits::default()).expect("valid event")
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn windows_equal_the_reference(events in proptest::collection::vec(arbitrary_event(), 0..400)) {
            check_against_reference(events, 60_000_000)?;
        }

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
