//! Anomaly-model inference on the CPU backend (tract), against a bare `model.run()` of the
//! same optimized plan measured in the same run:
//! - bare plan runs at batch 256 and 8 (inferences/s, one core);
//! - the operator's path at the same batches: feature mapping and normalization from a
//!   sample's metrics, the micro-batcher, the bounded queue to the inference thread, and the
//!   scores back (samples/s, and the ratio to bare);
//! - the latency a sample gains at `max_wait` 2 ms when samples trickle in (p50/p99).
//!
//! Run with `cargo bench -p primespark-benches --bench inference`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use primespark_operators::inference::batcher::Batcher;
use primespark_operators::inference::cpu::{CpuBackend, CpuModel};
use primespark_operators::inference::executor::{Job, Scorer, ScorerConfig};
use primespark_operators::inference::features::FeatureSpec;
use primespark_operators::inference::{
    ModelSource, ModelSpec, BUILTIN_MODEL_NAME, BUILTIN_MODEL_ONNX,
};
use tract_onnx::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SAMPLES: usize = 2_000_000;

fn spec() -> Arc<ModelSpec> {
    Arc::new(ModelSpec {
        name: Arc::from(BUILTIN_MODEL_NAME),
        onnx: ModelSource::Builtin(BUILTIN_MODEL_ONNX),
        hef: None,
        inputs: 5,
    })
}

/// A scorer on the CPU backend, as a worker builds it (queue of 4 batches).
fn cpu_scorer<T: Send + 'static>() -> Scorer<T> {
    Scorer::spawn(
        None,
        Box::new(CpuBackend),
        ScorerConfig {
            queue: 4,
            retry_after: Duration::from_secs(60),
            cache_size: 1,
            worker: 0,
        },
        Box::new(|| {}),
    )
    .expect("scorer")
}

/// Metrics of sample `i` as the decoder leaves them: sorted by name.
fn sample(i: usize) -> [(&'static str, f64); 5] {
    let cpu = (i % 97) as f64;
    [
        ("cpu_percent", cpu),
        ("disk_percent", 20.0 + (i % 50) as f64),
        ("load_avg", cpu / 25.0),
        ("memory_percent", 30.0 + (i % 60) as f64),
        ("temperature", 40.0 + cpu / 4.0),
    ]
}

/// Bare: the optimized plan's state run on ready tensors, nothing else.
fn bare(batch: usize) -> f64 {
    let model = CpuModel::load(&spec()).expect("shipped model loads");
    let mut state = model.plan().spawn().expect("state");
    let features: Vec<f32> = (0..batch * 5).map(|i| (i % 7) as f32 * 0.3 - 1.0).collect();
    let runs = SAMPLES / batch;
    let started = Instant::now();
    let mut sink = 0.0f32;
    for _ in 0..runs {
        let input = Tensor::from_shape(&[batch, 5], &features).expect("tensor");
        let out = state.run(tvec![input.into_tvalue()]).expect("run");
        sink += out[0]
            .to_plain_array_view::<f32>()
            .expect("f32")
            .iter()
            .next()
            .copied()
            .unwrap_or(0.0);
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(sink.is_finite());
    (runs * batch) as f64 / secs
}

/// The operator's path: metrics -> normalized features -> batcher -> scorer thread -> scores.
fn operator(batch: usize) -> f64 {
    let features = FeatureSpec::builtin();
    let mut scorer = cpu_scorer::<Vec<u64>>();
    let mut batcher: Batcher<(u64, [f32; 5])> = Batcher::new(batch, Duration::from_secs(3600));
    let model = spec();
    let mut scored = 0usize;
    let mut buf = Vec::with_capacity(5);
    let started = Instant::now();
    let now = Instant::now();
    let submit = |items: Vec<(u64, [f32; 5])>, scorer: &mut Scorer<Vec<u64>>| {
        let rows = items.len();
        let mut f = Vec::with_capacity(rows * 5);
        let mut tags = Vec::with_capacity(rows);
        for (tag, x) in items {
            f.extend_from_slice(&x);
            tags.push(tag);
        }
        scorer
            .submit(Job {
                model: model.clone(),
                features: f,
                rows,
                tag: tags,
            })
            .expect("submit");
    };
    for i in 0..SAMPLES {
        let metrics = sample(i);
        buf.clear();
        features.normalize_into(
            |n| {
                metrics
                    .binary_search_by(|(k, _)| (*k).cmp(n))
                    .ok()
                    .map(|j| metrics[j].1)
            },
            &mut buf,
        );
        let x = [buf[0], buf[1], buf[2], buf[3], buf[4]];
        if let Some(items) = batcher.push((i as u64, x), now) {
            submit(items, &mut scorer);
            while let Some(d) = scorer.try_done() {
                scored += d.scores.expect("scored").len();
            }
        }
    }
    if let Some(items) = batcher.flush() {
        submit(items, &mut scorer);
    }
    while let Some(d) = scorer.wait_done() {
        scored += d.scores.expect("scored").len();
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(scored, SAMPLES);
    SAMPLES as f64 / secs
}

/// Samples arriving every `gap` at batch 8 / `max_wait` 2 ms: time from arrival to score.
fn added_latency(gap: Duration, count: usize) -> (Duration, Duration) {
    let mut scorer = cpu_scorer::<Vec<Instant>>();
    let model = spec();
    let mut batcher: Batcher<Instant> = Batcher::new(8, Duration::from_millis(2));
    let mut latencies = Vec::with_capacity(count);
    let mut next = Instant::now();
    let mut sent = 0;
    let submit = |items: Vec<Instant>, scorer: &mut Scorer<Vec<Instant>>| {
        let rows = items.len();
        scorer
            .submit(Job {
                model: model.clone(),
                features: vec![0.1; rows * 5],
                rows,
                tag: items,
            })
            .expect("submit");
    };
    while latencies.len() < count {
        let now = Instant::now();
        if sent < count && now >= next {
            if let Some(items) = batcher.push(now, now) {
                submit(items, &mut scorer);
            }
            sent += 1;
            next += gap;
        }
        if let Some(items) = batcher.poll(now) {
            submit(items, &mut scorer);
        }
        if sent == count {
            if let Some(items) = batcher.flush() {
                submit(items, &mut scorer);
            }
        }
        while let Some(d) = scorer.try_done() {
            let done = Instant::now();
            latencies.extend(d.tag.iter().map(|t| done - *t));
        }
        std::hint::spin_loop();
    }
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    (p(0.5), p(0.99))
}

fn main() -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,"inference: shipped anomaly model (5 -> 16 -> 8 -> 1 MLP), CPU backend (tract), {SAMPLES} samples per row")?;
    writeln!(
        out,
        "{:<8} {:>16} {:>16} {:>8}",
        "batch", "bare run/s", "operator/s", "ratio"
    )?;
    for batch in [256usize, 8] {
        let b = bare(batch);
        let o = operator(batch);
        writeln!(out, "{batch:<8} {b:>16.0} {o:>16.0} {:>7.2}x", o / b)?;
    }
    for (label, gap) in [
        ("1 sample / 1 ms", Duration::from_millis(1)),
        ("1 sample / 100 us", Duration::from_micros(100)),
    ] {
        let (p50, p99) = added_latency(gap, 5_000);
        writeln!(
            out,
            "added latency at batch 8, max_wait 2 ms, {label}: p50 {:.3} ms, p99 {:.3} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        )?;
    }
    Ok(())
}
