//! Anomaly scoring of telemetry inside the dataflow: the model table (which model scores which
//! device) and the timely operator that micro-batches samples to a [`Scorer`] thread.
//!
//! ```text
//! KafkaSource ─> Score ─┬─> RawSink (device_metrics + anomaly_scores/anomalies, one transaction)
//!                       └─> windows (device metrics + `anomaly_score` / `anomalies` per device)
//! ```
//!
//! The operator keeps every input batch, in order, until the scores of its samples are back,
//! then emits the batch followed by one [`ScoreRow`] point per sample, at the batch's own
//! timestamp. Holding the batch's capability meanwhile keeps the frontier (the watermark) from
//! passing samples still being scored, and emitting in arrival order keeps each partition's
//! offsets in order for the raw sink's commits. A score inherits the delivery of its sample, so
//! a replay after a restart scores exactly the records the sinks still need.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use primespark_schemas::flow::{Point, RawItem};
use primespark_schemas::rows::{RawRow, ScoreRow, TelemetryRow};
use primespark_schemas::telemetry::Metric;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::CapabilitySet;
use timely::dataflow::StreamVec;

use crate::inference::batcher::Batcher;
use crate::inference::config::{default_threshold, InferenceConfig};
use crate::inference::cpu::CpuModel;
use crate::inference::executor::{Job, Scorer, ScorerConfig};
use crate::inference::features::FeatureSpec;
use crate::inference::{Backend, InferenceError, ModelSource, ModelSpec, BUILTIN_MODEL_ONNX};
use crate::metrics::AnomaliesDetected;
use crate::record::SinkSet;
use crate::{EventTime, FastMap};

/// Metric names under which scores enter the per-device windows (`device_metrics_1m/1h`):
/// `anomaly_score` (count = samples scored, min/max/avg of the score) and `anomalies`
/// (1 per anomaly, 0 otherwise: `sum` is the anomaly count).
pub const SCORE_METRIC: &str = "anomaly_score";
/// See [`SCORE_METRIC`].
pub const ANOMALY_METRIC: &str = "anomalies";

/// A model with its feature mapping and threshold.
#[derive(Debug)]
pub struct ModelEntry {
    /// What the backends load.
    pub spec: Arc<ModelSpec>,
    /// Metric -> input mapping and normalization.
    pub features: FeatureSpec,
    /// Anomaly threshold.
    pub threshold: f32,
}

/// Which model scores which device.
#[derive(Debug, Clone)]
pub struct ModelTable {
    default: Arc<ModelEntry>,
    /// Longest prefix first.
    prefixes: Vec<(String, Arc<ModelEntry>)>,
}

impl ModelTable {
    /// Builds the table, loading every model once on the CPU so a missing file or a model that
    /// does not take `[N, features]` fails start-up with its name, not the first batch.
    pub fn load(config: &InferenceConfig) -> Result<Self, InferenceError> {
        let mut entries: BTreeMap<String, Arc<ModelEntry>> = BTreeMap::new();
        let mut names: Vec<&String> = config.devices.values().collect();
        names.push(&config.model);
        for name in names {
            if entries.contains_key(name) {
                continue;
            }
            let (onnx, hef, features, threshold) = match config.models.get(name) {
                Some(m) => (
                    m.path
                        .clone()
                        .map_or(ModelSource::Builtin(BUILTIN_MODEL_ONNX), ModelSource::Path),
                    m.hef.clone(),
                    m.feature_spec(),
                    m.threshold,
                ),
                None => (
                    ModelSource::Builtin(BUILTIN_MODEL_ONNX),
                    None,
                    FeatureSpec::builtin(),
                    default_threshold(),
                ),
            };
            let spec = Arc::new(ModelSpec {
                name: Arc::from(name.as_str()),
                onnx,
                hef,
                inputs: features.len(),
            });
            CpuModel::load(&spec)?;
            entries.insert(
                name.clone(),
                Arc::new(ModelEntry {
                    spec,
                    features,
                    threshold,
                }),
            );
        }
        let default = entries
            .get(&config.model)
            .cloned()
            .ok_or_else(|| InferenceError::Load {
                model: config.model.clone(),
                backend: "cpu",
                reason: "not configured".into(),
            })?;
        let mut prefixes: Vec<(String, Arc<ModelEntry>)> = config
            .devices
            .iter()
            .filter_map(|(p, m)| entries.get(m).map(|e| (p.clone(), e.clone())))
            .collect();
        prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Self { default, prefixes })
    }

    /// The model that scores `device_id`.
    pub fn model_for(&self, device_id: &str) -> &Arc<ModelEntry> {
        self.prefixes
            .iter()
            .find(|(p, _)| device_id.starts_with(p.as_str()))
            .map_or(&self.default, |(_, e)| e)
    }
}

/// What one worker's scoring operator needs.
pub struct ScoringSpec {
    /// Which model scores which device.
    pub models: ModelTable,
    /// Batching and queue settings.
    pub config: InferenceConfig,
    /// The NPU, if in use.
    pub primary: Option<Box<dyn Backend>>,
    /// The CPU.
    pub fallback: Box<dyn Backend>,
}

/// A sample waiting for its score.
struct SampleMeta {
    segment: u64,
    model: Arc<ModelEntry>,
    device_id: Arc<str>,
    time_us: i64,
    partition: i32,
    offset: i64,
    delivery: SinkSet,
    late: bool,
    late_by_us: i64,
    /// The model's input metrics as the sample carried them, in the model's order (`None`:
    /// missing); named only for the anomalies that keep them.
    features: Vec<Option<f64>>,
}

struct Sample {
    meta: SampleMeta,
    features: Vec<f32>,
}

/// One input batch held until its samples are scored.
struct Segment {
    id: u64,
    cap: CapabilitySet<EventTime>,
    items: Vec<RawItem>,
    pending: usize,
}

/// The scoring operator, on a telemetry stream of raw items.
pub trait ScoreTelemetry<'s> {
    /// Scores every telemetry sample a sink still needs; see the module documentation.
    /// `drained` is true while the operator holds no sample.
    ///
    /// ```
    /// use primespark_operators::inference::config::InferenceConfig;
    /// use primespark_operators::inference::cpu::CpuBackend;
    /// use primespark_operators::scoring::{ModelTable, ScoreTelemetry, ScoringSpec};
    /// use primespark_schemas::flow::{Point, RawItem, SinkSet};
    /// use primespark_schemas::rows::{RawRow, TelemetryRow};
    /// use timely::dataflow::operators::capture::{Capture, Event};
    /// use timely::dataflow::operators::ToStream;
    ///
    /// let config = InferenceConfig::default();
    /// let models = ModelTable::load(&config).unwrap();
    /// let items = timely::example(move |scope| {
    ///     let metric = |name: &str, value| RawItem::Point(Point { delivery: SinkSet::EMPTY.with(primespark_schemas::flow::SinkId::WINDOWS),
    ///         late: false, late_by_us: 0, row: RawRow::Telemetry(TelemetryRow { time_us: 0,
    ///         device_id: "pi".into(), metric_name: name.into(), value, partition: 0, offset: 7 }) });
    ///     let spec = ScoringSpec { models, config, primary: None, fallback: Box::new(CpuBackend) };
    ///     vec![metric("cpu_percent", 40.0), metric("temperature", 55.0)]
    ///         .to_stream(scope).container::<Vec<_>>()
    ///         .score_telemetry(spec, Default::default())
    ///         .capture()
    /// });
    /// let items: Vec<RawItem> = items.try_iter()
    ///     .flat_map(|e| match e { Event::Messages(_, v) => v, _ => Vec::new() })
    ///     .collect();
    /// // The two metrics, then the sample's score.
    /// assert_eq!(items.len(), 3);
    /// assert!(matches!(&items[2], RawItem::Point(p) if matches!(p.row, RawRow::Score(_))));
    /// ```
    fn score_telemetry(
        self,
        spec: ScoringSpec,
        drained: Rc<Cell<bool>>,
    ) -> StreamVec<'s, EventTime, RawItem>;
}

impl<'s> ScoreTelemetry<'s> for StreamVec<'s, EventTime, RawItem> {
    fn score_telemetry(
        self,
        spec: ScoringSpec,
        drained: Rc<Cell<bool>>,
    ) -> StreamVec<'s, EventTime, RawItem> {
        let stream = self;
        let scope = stream.scope();
        let worker = scope.index();
        stream.unary_frontier(Pipeline, "Score", move |_cap, info| {
            let activator = scope.activator_for(info.address.clone());
            let sync = scope.worker().sync_activator_for(info.address.to_vec());
            let ScoringSpec {
                models,
                config,
                primary,
                fallback,
            } = spec;
            let scorer = Scorer::<Vec<SampleMeta>>::spawn(
                primary,
                fallback,
                ScorerConfig {
                    queue: config.queue,
                    retry_after: config.retry_after,
                    cache_size: config.cache_size,
                    worker,
                },
                Box::new(move || {
                    // The operator may be gone at shutdown; nothing left to wake then.
                    let _ = sync.activate();
                }),
            );
            let mut scorer = match scorer {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(worker, error = %e, "inference disabled on this worker");
                    None
                }
            };
            let mut batchers: FastMap<Arc<str>, Batcher<Sample>> = FastMap::default();
            let mut segments: VecDeque<Segment> = VecDeque::new();
            let mut next_segment = 0u64;
            let mut features_buf: Vec<f32> = Vec::new();
            move |(input, frontier), output| {
                let now = Instant::now();
                let mut full: Vec<(Arc<ModelEntry>, Vec<Sample>)> = Vec::new();
                // The source gives all points of a record in one activation under one capability,
                // but its session may cut them into several containers: consecutive containers
                // with the same stamp are joined first, so a record is never split between two
                // segments (a raw flush between them could commit the record's offset with only
                // part of it stored).
                let mut incoming: Vec<(Option<EventTime>, CapabilitySet<EventTime>, Vec<RawItem>)> =
                    Vec::new();
                input.for_each(|cap, data| {
                    let time = cap.least().copied();
                    match incoming.last_mut() {
                        Some((t, _, items)) if *t == time => items.append(data),
                        _ => incoming.push((time, cap.retain_stamp(0), std::mem::take(data))),
                    }
                });
                for (_, cap, mut data) in incoming {
                    let id = next_segment;
                    next_segment += 1;
                    let mut pending = 0usize;
                    if scorer.is_some() {
                        for_each_sample(&data, |rows, first| {
                            let entry = models.model_for(&rows[0].device_id);
                            features_buf.clear();
                            // Looked up once: normalized for the model, kept raw for `anomalies`.
                            let raw = entry.features.raw(|name| {
                                rows.iter()
                                    .find(|r| &*r.metric_name == name)
                                    .map(|r| r.value)
                            });
                            entry.features.normalize_raw_into(&raw, &mut features_buf);
                            let sample = Sample {
                                meta: SampleMeta {
                                    segment: id,
                                    model: entry.clone(),
                                    device_id: rows[0].device_id.clone(),
                                    time_us: rows[0].time_us,
                                    partition: rows[0].partition,
                                    offset: rows[0].offset,
                                    delivery: first.delivery,
                                    late: first.late,
                                    late_by_us: first.late_by_us,
                                    features: raw,
                                },
                                features: features_buf.clone(),
                            };
                            pending += 1;
                            let batcher =
                                batchers.entry(entry.spec.name.clone()).or_insert_with(|| {
                                    Batcher::new(config.batch_size, config.max_wait)
                                });
                            if let Some(batch) = batcher.push(sample, now) {
                                full.push((entry.clone(), batch));
                            }
                        });
                    }
                    if pending == 0 && segments.is_empty() {
                        // Nothing to wait for and nothing ahead: straight through.
                        output.session(&cap).give_container(&mut data);
                    } else {
                        segments.push_back(Segment {
                            id,
                            cap,
                            items: data,
                            pending,
                        });
                    }
                }
                // End of input: every open batch goes now, and the results are waited for.
                let ended = frontier.is_empty();
                for batcher in batchers.values_mut() {
                    let batch = if ended {
                        batcher.flush()
                    } else {
                        batcher.poll(now)
                    };
                    if let Some(batch) = batch {
                        let entry = batch[0].meta.model.clone();
                        full.push((entry, batch));
                    }
                }
                if let Some(s) = scorer.as_mut() {
                    for (entry, batch) in full {
                        let rows = batch.len();
                        let mut features = Vec::with_capacity(rows * entry.spec.inputs);
                        let mut metas = Vec::with_capacity(rows);
                        for sample in batch {
                            features.extend_from_slice(&sample.features);
                            metas.push(sample.meta);
                        }
                        let job = Job {
                            model: entry.spec.clone(),
                            features,
                            rows,
                            tag: metas,
                        };
                        if let Err(e) = s.submit(job) {
                            tracing::error!(worker, error = %e, "inference thread gone");
                        }
                    }
                    loop {
                        let done = if ended && segments.iter().any(|g| g.pending > 0) {
                            s.wait_done()
                        } else {
                            s.try_done()
                        };
                        let Some(done) = done else { break };
                        // An error was logged and counted by the scorer: the samples pass on
                        // unscored.
                        let scores = done.scores.ok();
                        // One shared name for the batch's scores.
                        let backend = primespark_schemas::intern::name(done.backend);
                        let mut anomalies = 0u64;
                        for (i, meta) in done.tag.into_iter().enumerate() {
                            let Some(front) = segments.front() else { break };
                            let Some(seg) = meta
                                .segment
                                .checked_sub(front.id)
                                .and_then(|i| segments.get_mut(i as usize))
                            else {
                                continue;
                            };
                            seg.pending -= 1;
                            if let Some(&score) = scores.as_ref().and_then(|s| s.get(i)) {
                                anomalies += u64::from(score >= meta.model.threshold);
                                seg.items
                                    .push(RawItem::Point(score_point(meta, score, &backend)));
                            }
                        }
                        if anomalies > 0 {
                            AnomaliesDetected {
                                backend: done.backend,
                                model: &done.model,
                                count: anomalies,
                            }
                            .emit();
                        }
                    }
                }
                let mut emitted = false;
                while segments.front().is_some_and(|g| g.pending == 0) {
                    if let Some(mut seg) = segments.pop_front() {
                        output.session(&seg.cap).give_container(&mut seg.items);
                        emitted = true;
                    }
                }
                // Drained once empty for a whole activation: what was emitted last time has
                // reached the raw sink, whose own flag then covers it.
                drained.set(
                    !emitted && segments.is_empty() && batchers.values().all(Batcher::is_empty),
                );
                if emitted {
                    activator.activate();
                }
                if let Some(deadline) = batchers.values().filter_map(|b| b.deadline()).min() {
                    activator.activate_after(deadline.saturating_duration_since(Instant::now()));
                }
            }
        })
    }
}

/// Calls `f` with the rows of every telemetry record in `items` that a sink still needs (a
/// record's points are consecutive, one per metric) and its first point.
fn for_each_sample(items: &[RawItem], mut f: impl FnMut(&[&TelemetryRow], &Point)) {
    let mut rows: Vec<&TelemetryRow> = Vec::new();
    let mut first: Option<&Point> = None;
    for item in items {
        let RawItem::Point(p) = item else { continue };
        let RawRow::Telemetry(t) = &p.row else {
            continue;
        };
        if let Some(f0) = first {
            if f0.row.position() != (t.partition, t.offset) {
                f(&rows, f0);
                rows.clear();
                first = None;
            }
        }
        if first.is_none() {
            if p.delivery.is_empty() {
                continue;
            }
            first = Some(p);
        }
        rows.push(t);
    }
    if let Some(f0) = first {
        f(&rows, f0);
    }
}

/// The score of one sample, with the sample's delivery, for the raw sink and the windows.
fn score_point(meta: SampleMeta, score: f32, backend: &Arc<str>) -> Point {
    let threshold = meta.model.threshold;
    // Only anomalies keep their inputs (`anomalies.features`).
    let anomalous = score >= threshold;
    if anomalous {
        crate::recent::record_anomaly(crate::recent::RecentAnomaly {
            at_us: crate::recent::now_us(),
            event_time_us: meta.time_us,
            device_id: meta.device_id.to_string(),
            model: meta.model.spec.name.to_string(),
            score,
            threshold,
            backend: backend.to_string(),
            partition: meta.partition,
            offset: meta.offset,
        });
    }
    let features = if anomalous {
        meta.model
            .features
            .names
            .iter()
            .zip(meta.features)
            .filter_map(|(name, value)| {
                value.map(|value| Metric {
                    name: name.clone(),
                    value,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    Point {
        row: RawRow::Score(Box::new(ScoreRow {
            time_us: meta.time_us,
            device_id: meta.device_id,
            model: meta.model.spec.name.clone(),
            score,
            threshold,
            backend: backend.clone(),
            features,
            partition: meta.partition,
            offset: meta.offset,
        })),
        delivery: meta.delivery,
        late: meta.late,
        late_by_us: meta.late_by_us,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::config::{default_features, default_mean, default_std, ModelConfig};
    use crate::inference::{Model, BUILTIN_MODEL_NAME};
    use crate::record::DeadLetter;
    use primespark_schemas::rows::DeadLetterRow;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use timely::dataflow::operators::capture::{Capture, Event};
    use timely::dataflow::operators::Input;
    use timely::dataflow::InputHandleVec;

    /// Scores a sample as its first normalized feature plus 10; the NPU stand-in fails every
    /// batch from its `fail_from`-th on.
    struct Plus10 {
        batches: Arc<AtomicUsize>,
        fail_from: usize,
    }
    impl Model for Plus10 {
        fn name(&self) -> &str {
            BUILTIN_MODEL_NAME
        }
        fn inputs(&self) -> usize {
            5
        }
        fn run(&mut self, f: &[f32], rows: usize, s: &mut Vec<f32>) -> Result<(), InferenceError> {
            if self.batches.fetch_add(1, Ordering::SeqCst) >= self.fail_from {
                return Err(InferenceError::NoDevice("unplugged".into()));
            }
            s.extend((0..rows).map(|r| f[r * 5] + 10.0));
            Ok(())
        }
    }
    struct Double {
        name: &'static str,
        batches: Arc<AtomicUsize>,
        fail_from: usize,
    }
    impl Backend for Double {
        fn name(&self) -> &'static str {
            self.name
        }
        fn load(&self, _: &ModelSpec) -> Result<Box<dyn Model>, InferenceError> {
            Ok(Box::new(Plus10 {
                batches: self.batches.clone(),
                fail_from: self.fail_from,
            }))
        }
    }

    fn point(partition: i32, offset: i64, device: &str, metric: &str, value: f64) -> RawItem {
        RawItem::Point(Point {
            row: RawRow::Telemetry(TelemetryRow {
                time_us: offset * 1000,
                device_id: device.into(),
                metric_name: metric.into(),
                value,
                partition,
                offset,
            }),
            delivery: SinkSet::of([primespark_schemas::flow::SinkId::WINDOWS]),
            late: false,
            late_by_us: 0,
        })
    }

    /// Containers of samples (several metrics each), dead letters and samples no sink needs,
    /// through batches of 3 with the NPU failing from its 3rd batch: every input item comes out
    /// once in input order, followed within its container by one score per needed sample,
    /// scored by whichever backend ran its batch.
    #[test]
    fn every_item_passes_in_order_and_every_sample_is_scored_once() {
        let (tx, rx) = std::sync::mpsc::channel();
        timely::execute_directly(move |worker| {
            let mut input: InputHandleVec<EventTime, RawItem> = InputHandleVec::new();
            let captured = worker.dataflow(|scope| {
                let config = InferenceConfig {
                    batch_size: 3,
                    max_wait: Duration::from_millis(1),
                    queue: 1,
                    ..InferenceConfig::default()
                };
                let spec = ScoringSpec {
                    models: ModelTable::load(&config).expect("builtin model"),
                    config,
                    primary: Some(Box::new(Double {
                        name: "hailo",
                        batches: Arc::new(AtomicUsize::new(0)),
                        fail_from: 2,
                    })),
                    fallback: Box::new(Double {
                        name: "cpu",
                        batches: Arc::new(AtomicUsize::new(0)),
                        fail_from: usize::MAX,
                    }),
                };
                scope
                    .input_from(&mut input)
                    .score_telemetry(spec, Rc::new(Cell::new(false)))
                    .capture()
            });
            let mut sent = Vec::new();
            let mut offset = 0i64;
            for round in 0..6u64 {
                input.advance_to(round);
                for _ in 0..(1 + round % 3) {
                    // Each metric in a container of its own, as the source's session may cut
                    // a record: still one sample.
                    for (m, v) in [("cpu_percent", 40.1292 + offset as f64), ("load_avg", 1.0)] {
                        let item = point((offset % 2) as i32, offset, "pi", m, v);
                        sent.push(item.clone());
                        input.send_batch(&mut vec![item]);
                    }
                    offset += 1;
                }
                let dead = RawItem::Dead(DeadLetter {
                    row: DeadLetterRow {
                        partition: 0,
                        offset: 1000 + round as i64,
                        reason: "malformed_json".into(),
                        error: "x".into(),
                        payload: b"{".to_vec(),
                    },
                    delivery: SinkSet::of([primespark_schemas::flow::SinkId::WINDOWS]),
                });
                sent.push(dead.clone());
                input.send(dead);
                // Already stored everywhere: passes through, not scored.
                let mut stored = point(0, 2000 + round as i64, "old", "cpu_percent", 1.0);
                if let RawItem::Point(p) = &mut stored {
                    p.delivery = SinkSet::EMPTY;
                }
                sent.push(stored.clone());
                input.send(stored);
                worker.step();
            }
            input.close();
            while worker.step() {}
            let out: Vec<RawItem> = captured
                .try_iter()
                .flat_map(|e| match e {
                    Event::Messages(_, items) => items,
                    Event::Progress(_) => Vec::new(),
                })
                .collect();
            tx.send((sent, out, offset)).expect("receiver alive");
        });
        let (sent, out, samples) = rx.recv().expect("items");
        let (passed, scores): (Vec<RawItem>, Vec<RawItem>) = out.into_iter().partition(|i| {
            !matches!(
                i,
                RawItem::Point(Point {
                    row: RawRow::Score(_),
                    ..
                })
            )
        });
        assert_eq!(passed, sent, "input items, once each, in order");
        let scores: Vec<ScoreRow> = scores
            .into_iter()
            .filter_map(|i| match i {
                RawItem::Point(Point {
                    row: RawRow::Score(s),
                    ..
                }) => Some(*s),
                _ => None,
            })
            .collect();
        let offsets: Vec<i64> = scores.iter().map(|s| s.offset).collect();
        assert_eq!(
            offsets,
            (0..samples).collect::<Vec<_>>(),
            "one score per sample"
        );
        for s in &scores {
            // cpu normalized: (40.1292 + offset - mean) / std = offset / std.
            let want = s.offset as f32 / 20.3349 + 10.0;
            assert!((s.score - want).abs() < 1e-4, "{s:?}");
            assert!(s.is_anomaly(), "score over 10 is over the threshold");
            assert_eq!(
                s.features.len(),
                2,
                "both metrics of the record, in one sample"
            );
        }
        let backends: Vec<&str> = scores.iter().map(|s| &*s.backend).collect();
        assert_eq!(
            &backends[..6],
            &["hailo"; 6],
            "first two batches of 3 on the NPU"
        );
        assert!(backends[6..].iter().all(|b| *b == "cpu"), "{backends:?}");
    }

    #[test]
    fn devices_pick_the_longest_matching_prefix_and_config_errors_name_the_key() {
        let mut config = InferenceConfig::default();
        config.models.insert(
            "edge".into(),
            ModelConfig {
                path: None,
                hef: None,
                features: default_features(),
                mean: default_mean(),
                std: default_std(),
                threshold: 0.9,
            },
        );
        config.devices.insert("pi-".into(), "edge".into());
        config
            .devices
            .insert("pi-gpu-".into(), BUILTIN_MODEL_NAME.into());
        assert!(
            config.validate().is_err(),
            "non-builtin model without a path"
        );
        config.models.get_mut("edge").expect("edge").path =
            Some(PathBuf::from("/nonexistent.onnx"));
        config.validate().expect("valid");
        assert!(matches!(
            ModelTable::load(&config),
            Err(InferenceError::Load { model, .. }) if model == "edge"
        ));
        // The shipped graph from its file, under another name and threshold.
        let edge = config.models.remove("edge").expect("edge");
        config.models.insert("edge2".into(), edge);
        config.devices.insert("pi-".into(), "edge2".into());
        config.models.get_mut("edge2").expect("edge2").path = Some(PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../operators/models/anomaly_detector.onnx"
        )));
        let table = ModelTable::load(&config).expect("loads");
        assert_eq!(&*table.model_for("pi-gpu-3").spec.name, BUILTIN_MODEL_NAME);
        assert_eq!(&*table.model_for("pi-7").spec.name, "edge2");
        assert_eq!(table.model_for("pi-7").threshold, 0.9);
        assert_eq!(&*table.model_for("vm-1").spec.name, BUILTIN_MODEL_NAME);

        for (mutate, key) in [
            (
                Box::new(|c: &mut InferenceConfig| c.batch_size = 0)
                    as Box<dyn Fn(&mut InferenceConfig)>,
                "inference.batch_size",
            ),
            (Box::new(|c| c.model = "nope".into()), "inference.model"),
            (
                Box::new(|c| {
                    c.devices.insert("x".into(), "nope".into());
                }),
                "inference.devices.x",
            ),
            (
                Box::new(|c| c.models.get_mut("edge2").expect("edge2").std[1] = 0.0),
                "inference.models.edge2.features",
            ),
        ] {
            let mut c = config.clone();
            mutate(&mut c);
            let err = c.validate().expect_err(key).to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
