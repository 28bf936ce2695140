//! Runs inference batches off the timely worker thread.
//!
//! A [`Scorer`] owns one thread with the backends and their model caches. The caller submits
//! [`Job`]s and collects [`Done`]s; at most `queue` batches are in flight (queued or running),
//! and [`Scorer::submit`] blocks while the limit is reached, so a slow model slows the caller
//! (and with it the Kafka source) instead of growing memory.
//!
//! Fallback: when the primary backend (the NPU) fails a batch, the same batch is run on the
//! CPU, the fallback is logged and counted, and the primary is tried again after
//! `retry_after`. A batch's scores come from exactly one successful run, so no sample is lost
//! or scored twice; if every backend fails, the batch comes back with its error and the caller
//! passes its samples on unscored.

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cache::ModelCache;
use super::{Backend, InferenceError, ModelSpec};
use crate::metrics::{
    InferenceBackendInUse, InferenceBatchRan, InferenceFailed, InferenceFellBack,
    InferenceQueueDepth,
};

/// Settings of a [`Scorer`].
#[derive(Debug, Clone)]
pub struct ScorerConfig {
    /// Batches in flight at most (at least 1).
    pub queue: usize,
    /// After a primary backend failure, run on the fallback this long before trying again.
    pub retry_after: Duration,
    /// Models kept loaded per backend.
    pub cache_size: usize,
    /// Global worker index, for metric labels and the thread name.
    pub worker: usize,
}

/// One batch to score.
#[derive(Debug)]
pub struct Job<T> {
    /// The model.
    pub model: Arc<ModelSpec>,
    /// `rows * model.inputs` normalized features, row-major.
    pub features: Vec<f32>,
    /// Samples in the batch.
    pub rows: usize,
    /// The caller's handle on the batch, returned in [`Done`].
    pub tag: T,
}

/// A scored (or failed) batch.
#[derive(Debug)]
pub struct Done<T> {
    /// The job's tag.
    pub tag: T,
    /// One score per sample, in order; or why no backend could score the batch.
    pub scores: Result<Vec<f32>, String>,
    /// The backend that produced the scores (or failed last).
    pub backend: &'static str,
    /// The model's name.
    pub model: Arc<str>,
    /// Features back to the caller, so the buffer is reused.
    pub features: Vec<f32>,
}

/// A handle on one scoring thread.
pub struct Scorer<T> {
    jobs: Option<SyncSender<Job<T>>>,
    done: Receiver<Done<T>>,
    ready: VecDeque<Done<T>>,
    in_flight: usize,
    max_in_flight: usize,
    worker: usize,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Scorer<T> {
    /// Starts the scoring thread: batches run on `primary` when given, on `fallback` when it
    /// fails or is absent. `wake` is called after every finished batch (the timely operator
    /// passes its activator, so it runs as soon as scores are back).
    pub fn spawn(
        primary: Option<Box<dyn Backend>>,
        fallback: Box<dyn Backend>,
        config: ScorerConfig,
        wake: Box<dyn Fn() + Send>,
    ) -> Result<Self, InferenceError> {
        let max_in_flight = config.queue.max(1);
        let (job_tx, job_rx) = mpsc::sync_channel::<Job<T>>(max_in_flight);
        let (done_tx, done_rx) = mpsc::channel::<Done<T>>();
        let worker = config.worker;
        let thread = std::thread::Builder::new()
            .name(format!("inference-{worker}"))
            .spawn(move || {
                let mut runner = Runner::new(primary, fallback, &config);
                for job in job_rx {
                    let done = runner.run(job);
                    if done_tx.send(done).is_err() {
                        break;
                    }
                    wake();
                }
            })
            .map_err(|e| InferenceError::Run {
                model: String::new(),
                backend: "cpu",
                reason: format!("starting the inference thread: {e}"),
            })?;
        Ok(Self {
            jobs: Some(job_tx),
            done: done_rx,
            ready: VecDeque::new(),
            in_flight: 0,
            max_in_flight,
            worker,
            thread: Some(thread),
        })
    }

    /// Queues a batch; blocks while `queue` batches are in flight (their results are kept for
    /// [`Scorer::try_done`]).
    pub fn submit(&mut self, job: Job<T>) -> Result<(), InferenceError> {
        while self.in_flight >= self.max_in_flight {
            let done = self.done.recv().map_err(|_| InferenceError::Stopped)?;
            self.in_flight -= 1;
            self.ready.push_back(done);
        }
        let jobs = self.jobs.as_ref().ok_or(InferenceError::Stopped)?;
        jobs.send(job).map_err(|_| InferenceError::Stopped)?;
        self.in_flight += 1;
        self.report();
        Ok(())
    }

    /// A finished batch, if one is back; never blocks.
    pub fn try_done(&mut self) -> Option<Done<T>> {
        if let Some(d) = self.ready.pop_front() {
            return Some(d);
        }
        match self.done.try_recv() {
            Ok(d) => {
                self.in_flight -= 1;
                self.report();
                Some(d)
            }
            Err(_) => None,
        }
    }

    /// The next finished batch, waiting for it; `None` when nothing is in flight.
    pub fn wait_done(&mut self) -> Option<Done<T>> {
        if let Some(d) = self.ready.pop_front() {
            return Some(d);
        }
        if self.in_flight == 0 {
            return None;
        }
        let d = self.done.recv().ok()?;
        self.in_flight -= 1;
        self.report();
        Some(d)
    }

    /// Batches submitted and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.in_flight + self.ready.len()
    }

    fn report(&self) {
        InferenceQueueDepth {
            worker: self.worker,
            depth: self.in_flight,
        }
        .emit();
    }
}

impl<T> Drop for Scorer<T> {
    fn drop(&mut self) {
        // Closing the job channel ends the thread's loop after the queued jobs.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(worker = self.worker, "inference thread panicked");
            }
        }
    }
}

/// The thread's side: backends, caches and the fallback state.
struct Runner {
    primary: Option<(Box<dyn Backend>, ModelCache)>,
    fallback: (Box<dyn Backend>, ModelCache),
    primary_down_until: Option<Instant>,
    retry_after: Duration,
    in_use: &'static str,
    worker: usize,
}

impl Runner {
    fn new(
        primary: Option<Box<dyn Backend>>,
        fallback: Box<dyn Backend>,
        config: &ScorerConfig,
    ) -> Self {
        let in_use = primary.as_ref().map_or(fallback.name(), |p| p.name());
        InferenceBackendInUse {
            worker: config.worker,
            backend: in_use,
            previous: None,
        }
        .emit();
        Self {
            primary: primary.map(|b| (b, ModelCache::new(config.cache_size))),
            fallback: (fallback, ModelCache::new(config.cache_size)),
            primary_down_until: None,
            retry_after: config.retry_after,
            in_use,
            worker: config.worker,
        }
    }

    fn switch(&mut self, to: &'static str) {
        if to != self.in_use {
            InferenceBackendInUse {
                worker: self.worker,
                backend: to,
                previous: Some(self.in_use),
            }
            .emit();
            self.in_use = to;
        }
    }

    fn run<T>(&mut self, job: Job<T>) -> Done<T> {
        let now = Instant::now();
        let mut failure: Option<(&'static str, String)> = None;
        let primary_up = self.primary_down_until.is_none_or(|t| now >= t);
        if let (Some((backend, cache)), true) = (self.primary.as_mut(), primary_up) {
            let name = backend.name();
            match attempt(backend.as_ref(), cache, &job) {
                Ok(scores) => {
                    self.primary_down_until = None;
                    self.switch(name);
                    return done(job, Ok(scores), name);
                }
                Err(e) => {
                    // The device may be in any state: reload the models on the next try.
                    cache.clear();
                    self.primary_down_until = Some(now + self.retry_after);
                    failure = Some((name, e.to_string()));
                }
            }
        }
        let (backend, cache) = &mut self.fallback;
        let name = backend.name();
        let result = attempt(backend.as_ref(), cache, &job);
        if let Some((from, error)) = &failure {
            InferenceFellBack {
                from,
                to: name,
                model: &job.model.name,
                error,
                retry_after: self.retry_after,
            }
            .emit();
        }
        self.switch(name);
        match result {
            Ok(scores) => done(job, Ok(scores), name),
            Err(e) => {
                let error = e.to_string();
                InferenceFailed {
                    backend: name,
                    model: &job.model.name,
                    rows: job.rows,
                    error: &error,
                }
                .emit();
                done(job, Err(error), name)
            }
        }
    }
}

fn attempt<T>(
    backend: &dyn Backend,
    cache: &mut ModelCache,
    job: &Job<T>,
) -> Result<Vec<f32>, InferenceError> {
    let started = Instant::now();
    let model = cache.get(backend, &job.model)?;
    // A fresh vector per attempt: a failed attempt's partial output can never leak into the
    // scores of the run that succeeds.
    let mut scores = Vec::with_capacity(job.rows);
    model.run(&job.features, job.rows, &mut scores)?;
    if scores.len() != job.rows {
        return Err(InferenceError::Shape {
            model: job.model.name.to_string(),
            reason: format!("{} scores for {} samples", scores.len(), job.rows),
        });
    }
    InferenceBatchRan {
        backend: backend.name(),
        model: &job.model.name,
        rows: job.rows,
        duration: started.elapsed(),
    }
    .emit();
    Ok(scores)
}

fn done<T>(job: Job<T>, scores: Result<Vec<f32>, String>, backend: &'static str) -> Done<T> {
    Done {
        tag: job.tag,
        scores,
        backend,
        model: job.model.name.clone(),
        features: job.features,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::{Model, ModelSource};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A model that scores a sample as its first feature, and fails every batch from the
    /// `fail_from`-th on (counting across all its loads), as a broken NPU would.
    struct Echo {
        name: String,
        batches: Arc<AtomicUsize>,
        fail_from: usize,
        partial_on_failure: bool,
    }
    impl Model for Echo {
        fn name(&self) -> &str {
            &self.name
        }
        fn inputs(&self) -> usize {
            2
        }
        fn run(&mut self, f: &[f32], rows: usize, s: &mut Vec<f32>) -> Result<(), InferenceError> {
            let n = self.batches.fetch_add(1, Ordering::SeqCst);
            if n >= self.fail_from {
                if self.partial_on_failure {
                    // Misbehaving: output appended before failing.
                    s.push(-1.0);
                }
                return Err(InferenceError::Run {
                    model: self.name.clone(),
                    backend: "flaky",
                    reason: format!("batch {n} failed"),
                });
            }
            s.extend((0..rows).map(|r| f[r * 2]));
            Ok(())
        }
    }
    struct EchoBackend {
        name: &'static str,
        batches: Arc<AtomicUsize>,
        fail_from: usize,
    }
    impl Backend for EchoBackend {
        fn name(&self) -> &'static str {
            self.name
        }
        fn load(&self, spec: &ModelSpec) -> Result<Box<dyn Model>, InferenceError> {
            Ok(Box::new(Echo {
                name: spec.name.to_string(),
                batches: self.batches.clone(),
                fail_from: self.fail_from,
                partial_on_failure: true,
            }))
        }
    }

    fn spec() -> Arc<ModelSpec> {
        Arc::new(ModelSpec {
            name: Arc::from("echo"),
            onnx: ModelSource::Builtin(&[]),
            hef: None,
            inputs: 2,
        })
    }

    fn config(queue: usize) -> ScorerConfig {
        ScorerConfig {
            queue,
            retry_after: Duration::from_secs(3600),
            cache_size: 2,
            worker: 0,
        }
    }

    /// The primary fails from its 4th batch on: every later batch is scored by the CPU
    /// stand-in, every sample exactly once, in order.
    #[test]
    fn falls_back_on_the_nth_batch_and_scores_every_sample_once() {
        let primary_batches = Arc::new(AtomicUsize::new(0));
        let cpu_batches = Arc::new(AtomicUsize::new(0));
        let mut scorer = Scorer::spawn(
            Some(Box::new(EchoBackend {
                name: "hailo",
                batches: primary_batches.clone(),
                fail_from: 3,
            })),
            Box::new(EchoBackend {
                name: "cpu",
                batches: cpu_batches.clone(),
                fail_from: usize::MAX,
            }),
            config(2),
            Box::new(|| {}),
        )
        .unwrap();
        let mut results: Vec<(u64, Vec<f32>, &'static str)> = Vec::new();
        let mut sample = 0u64;
        for batch in 0..10u64 {
            let rows = 1 + (batch as usize % 4);
            let mut features = Vec::new();
            for _ in 0..rows {
                features.extend([sample as f32, 0.5]);
                sample += 1;
            }
            scorer
                .submit(Job {
                    model: spec(),
                    features,
                    rows,
                    tag: batch,
                })
                .unwrap();
            while let Some(d) = scorer.try_done() {
                results.push((d.tag, d.scores.unwrap(), d.backend));
            }
        }
        while let Some(d) = scorer.wait_done() {
            results.push((d.tag, d.scores.unwrap(), d.backend));
        }
        assert_eq!(scorer.in_flight(), 0);
        let tags: Vec<u64> = results.iter().map(|r| r.0).collect();
        assert_eq!(tags, (0..10).collect::<Vec<_>>());
        let scores: Vec<f32> = results.iter().flat_map(|r| r.1.clone()).collect();
        assert_eq!(scores, (0..sample).map(|s| s as f32).collect::<Vec<_>>());
        let backends: Vec<&str> = results.iter().map(|r| r.2).collect();
        assert_eq!(&backends[..3], &["hailo"; 3]);
        assert!(backends[3..].iter().all(|b| *b == "cpu"));
        // The primary is not retried within `retry_after`: one failed attempt only.
        assert_eq!(primary_batches.load(Ordering::SeqCst), 4);
        assert_eq!(cpu_batches.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn a_batch_no_backend_can_score_comes_back_with_its_error() {
        let mut scorer = Scorer::spawn(
            None,
            Box::new(EchoBackend {
                name: "cpu",
                batches: Arc::new(AtomicUsize::new(0)),
                fail_from: 0,
            }),
            config(1),
            Box::new(|| {}),
        )
        .unwrap();
        scorer
            .submit(Job {
                model: spec(),
                features: vec![1.0, 2.0],
                rows: 1,
                tag: 7u8,
            })
            .unwrap();
        let d = scorer.wait_done().unwrap();
        assert_eq!(d.tag, 7);
        assert!(d.scores.unwrap_err().contains("batch 0 failed"));
    }

    /// With a model slower than the submitter, `submit` blocks at the queue limit: in flight
    /// never exceeds it.
    #[test]
    fn in_flight_is_bounded_by_the_queue() {
        struct Slow;
        impl Model for Slow {
            fn name(&self) -> &str {
                "echo"
            }
            fn inputs(&self) -> usize {
                2
            }
            fn run(
                &mut self,
                _: &[f32],
                rows: usize,
                s: &mut Vec<f32>,
            ) -> Result<(), InferenceError> {
                std::thread::sleep(Duration::from_millis(2));
                s.extend(std::iter::repeat_n(0.0, rows));
                Ok(())
            }
        }
        struct SlowBackend;
        impl Backend for SlowBackend {
            fn name(&self) -> &'static str {
                "cpu"
            }
            fn load(&self, _: &ModelSpec) -> Result<Box<dyn Model>, InferenceError> {
                Ok(Box::new(Slow))
            }
        }
        let mut scorer =
            Scorer::spawn(None, Box::new(SlowBackend), config(3), Box::new(|| {})).unwrap();
        let mut collected = 0;
        for i in 0..20u32 {
            scorer
                .submit(Job {
                    model: spec(),
                    features: vec![0.0, 0.0],
                    rows: 1,
                    tag: i,
                })
                .unwrap();
            // Queued or running at most 3, plus at most one finished batch that `submit`
            // collected while it waited.
            assert!(scorer.in_flight() <= 4, "{}", scorer.in_flight());
            while scorer.try_done().is_some() {
                collected += 1;
            }
        }
        while scorer.wait_done().is_some() {
            collected += 1;
        }
        assert_eq!(collected, 20);
    }
}
