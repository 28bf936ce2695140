//! The sink compliance suite (Vector's `run_and_assert_sink_compliance`): every raw sink of the
//! registry passes it against the real service it writes to, built exactly as a run builds it
//! (`RawSinkKind::build`, from the stored state a restart would load):
//!
//! 1. **Fresh**: the health check passes, recovery removes nothing, no partition has a resume
//!    point.
//! 2. **Shutdown flushes**: a batch (rows and dead letters of two partitions) through the sink
//!    runtime, then the channel closes: everything the sink takes is durable once, and a
//!    rebuilt sink resumes after it.
//! 3. **Crash between write and commit**: the sink's failpoint fails the commit, the sink is
//!    dropped (the crash); a rebuilt sink recovers, resumes, takes the replay of the records it
//!    still needs, and holds every record once (at least once for at-least-once sinks).
//! 4. **Retries and metrics**: the failpoint fails one attempt; the runtime retries, the sink
//!    counts rows written and the error, and is not degraded afterwards.
//! 5. **Backpressure**: a stalled sink behind the source, the raw sink operator and the runtime
//!    pauses the source (it reads a bounded number of records, so memory stays bounded) until
//!    the sink moves again; then every record arrives once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use async_trait::async_trait;
use futures::future::BoxFuture;
use primespark_connectors::failpoint::{self, Action};
use primespark_connectors::sink::registry::{self, RawSinkKind, SinkContext, SinkSettings};
use primespark_connectors::sink::runtime::RawRuntime;
use primespark_connectors::sink::{BoxRawSink, Flush, Sink, SinkError, Target};
use primespark_schemas::flow::{DeadLetter, Point, RawBatch, RawItem, SinkId, SinkSet};
use primespark_schemas::rows::{DeadLetterRow, PartitionOffset, RawRow, TelemetryRow};
use primespark_schemas::streams::StreamKind;

/// What a sink under test holds durably: the (partition, offset) of each row and letter.
pub type ReadBack = Box<dyn Fn() -> BoxFuture<'static, Result<Vec<(i32, i64)>>> + Send + Sync>;

/// What the sink promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// Every record once.
    ExactlyOnce,
    /// Every record, repeats allowed (the dead-letter topic).
    AtLeastOnce,
}

/// What a sink takes of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// Rows and dead letters.
    RowsAndLetters,
    /// Rows only.
    Rows,
    /// Dead letters only.
    Letters,
}

/// A sink under test.
pub struct SinkUnderTest {
    /// The registry entry.
    pub kind: &'static RawSinkKind,
    /// Its settings (real services).
    pub settings: SinkSettings,
    /// Its topic (unique per test).
    pub topic: String,
    /// What it holds durably.
    pub read_back: ReadBack,
    /// Its promise.
    pub guarantee: Guarantee,
    /// What it takes.
    pub takes: Takes,
    /// Whether a rebuilt sink resumes after what it committed (it stores positions of its own).
    pub stores_positions: bool,
    /// The failpoint between its write and its commit.
    pub crash_point: &'static str,
}

const PARTITIONS: [i32; 2] = [0, 1];

impl SinkUnderTest {
    async fn build(&self) -> Result<(BoxRawSink, primespark_connectors::sink::Healthcheck)> {
        let stream = StreamKind::Telemetry.def();
        let (stored, _) = registry::stored_state(&self.settings, stream, &self.topic).await?;
        let ctx = SinkContext {
            stream,
            topic: self.topic.clone(),
            worker: 0,
            partitions: PARTITIONS.to_vec(),
            topic_partitions: PARTITIONS.len(),
            stored: Arc::new(stored),
            backfill: None,
            fence: primespark_connectors::sink::fence::Fence::unfenced(),
        };
        Ok((self.kind.build)(&self.settings, &ctx, id()).await?)
    }

    /// What the sink should hold after `batches`: each row and letter it takes, once.
    fn expected(&self, offsets: std::ops::Range<i64>) -> BTreeMap<(i32, i64), usize> {
        let mut want = BTreeMap::new();
        for item in batch(offsets, SinkSet::of([id()])).items {
            let counts = !matches!(
                (&item, self.takes),
                (RawItem::Point(_), Takes::Letters) | (RawItem::Dead(_), Takes::Rows)
            );
            if counts {
                *want.entry(item.position()).or_default() += 1;
            }
        }
        want
    }

    async fn check_holds(&self, offsets: std::ops::Range<i64>, step: &str) -> Result<()> {
        let want = self.expected(offsets);
        let mut got: BTreeMap<(i32, i64), usize> = BTreeMap::new();
        for position in (self.read_back)().await? {
            *got.entry(position).or_default() += 1;
        }
        for (position, n) in &want {
            let have = got.get(position).copied().unwrap_or(0);
            match self.guarantee {
                Guarantee::ExactlyOnce => ensure!(
                    have == *n,
                    "{}: {step}: record {position:?} stored {have} times, want {n}",
                    self.kind.name
                ),
                Guarantee::AtLeastOnce => ensure!(
                    have >= *n,
                    "{}: {step}: record {position:?} lost ({have} of {n})",
                    self.kind.name
                ),
            }
        }
        let extra: Vec<_> = got.keys().filter(|p| !want.contains_key(p)).collect();
        ensure!(
            extra.is_empty(),
            "{}: {step}: holds records it was never given: {extra:?}",
            self.kind.name
        );
        Ok(())
    }
}

/// The id the sink under test gets.
fn id() -> SinkId {
    SinkId::raw(0).expect("an id")
}

/// Records `offsets` of both partitions: two metric rows each, every fifth a dead letter.
pub fn batch(offsets: std::ops::Range<i64>, delivery: SinkSet) -> RawBatch {
    let mut batch = RawBatch::default();
    for offset in offsets {
        for partition in PARTITIONS {
            if offset % 5 == 4 {
                batch.push(RawItem::Dead(DeadLetter {
                    row: DeadLetterRow {
                        partition,
                        offset,
                        reason: "malformed_json".into(),
                        error: format!("partition {partition} offset {offset}: not JSON"),
                        payload: b"{\"device_id\": 1".to_vec(),
                    },
                    delivery,
                }));
                continue;
            }
            for metric in ["cpu_percent", "temperature"] {
                batch.push(RawItem::Point(Point {
                    row: RawRow::Telemetry(TelemetryRow {
                        // 2025-11-05T14:00:00Z plus a second per offset.
                        time_us: 1_762_351_200_000_000 + offset * 1_000_000,
                        device_id: format!("pi-{partition}").into(),
                        metric_name: metric.into(),
                        value: offset as f64,
                        partition,
                        offset,
                    }),
                    delivery,
                    late: false,
                    late_by_us: 0,
                }));
            }
        }
    }
    batch
}

/// The records of `offsets` the sink still needs by its resume points, as a source would tag
/// them after a restart.
fn replay(sink: &BoxRawSink, offsets: std::ops::Range<i64>) -> RawBatch {
    let mut replayed = batch(offsets, SinkSet::EMPTY);
    for item in &mut replayed.items {
        let (partition, offset) = item.position();
        let needed = sink
            .resume(partition)
            .is_none_or(|r: PartitionOffset| offset >= r.next_offset);
        let delivery = if needed {
            SinkSet::of([id()])
        } else {
            SinkSet::EMPTY
        };
        match item {
            RawItem::Point(p) => p.delivery = delivery,
            RawItem::Dead(d) => d.delivery = delivery,
        }
    }
    replayed
}

/// Delivers `batch` through a runtime of the one sink and closes it (a shutdown).
async fn through_runtime(topic: &str, sink: BoxRawSink, batch: RawBatch) -> Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let run = tokio::spawn(RawRuntime::new(topic, vec![sink]).run(rx));
    tx.send(batch).await.context("runtime gone")?;
    drop(tx);
    run.await??;
    Ok(())
}

/// Runs the whole suite on `sut`.
pub async fn run_sink_compliance(sut: &SinkUnderTest) -> Result<()> {
    let name = sut.kind.name;
    // 1. Fresh.
    eprintln!("{name}: step 1 fresh");
    let (mut sink, health) = sut.build().await?;
    health
        .await
        .with_context(|| format!("{name}: health check"))?;
    ensure!(
        sink.recover().await? == 0,
        "{name}: a fresh sink recovered something"
    );
    ensure!(
        PARTITIONS.iter().all(|p| sink.resume(*p).is_none()),
        "{name}: a fresh sink resumes somewhere"
    );
    // 2. A batch, then the shutdown flushes it.
    eprintln!("{name}: step 2 shutdown flush");
    through_runtime(&sut.topic, sink, batch(0..20, SinkSet::of([id()]))).await?;
    sut.check_holds(0..20, "after a shutdown").await?;
    let (sink, _) = sut.build().await?;
    if sut.stores_positions {
        for p in PARTITIONS {
            let resume = sink.resume(p).map(|r| r.next_offset);
            ensure!(
                resume == Some(20),
                "{name}: partition {p} resumes at {resume:?} after committing 0..20"
            );
        }
    }
    drop(sink);
    // 3. A crash between write and commit.
    eprintln!("{name}: step 3 crash");
    failpoint::arm(sut.crash_point, Action::Error, 1);
    let (mut sink, _) = sut.build().await?;
    let crashed = async {
        sink.write(&replay(&sink, 20..40)).await?;
        sink.commit(Flush::All).await
    }
    .await;
    failpoint::disarm(sut.crash_point);
    ensure!(
        crashed.is_err(),
        "{name}: failpoint {} was never hit between write and commit",
        sut.crash_point
    );
    drop(sink);
    let (mut sink, _) = sut.build().await?;
    sink.recover().await?;
    let replayed = replay(&sink, 20..40);
    sink.write(&replayed).await?;
    sink.commit(Flush::All).await?;
    sut.check_holds(0..40, "after a crash between write and commit and a replay")
        .await?;
    drop(sink);
    // 4. One failed attempt: retried, counted, recovered.
    eprintln!("{name}: step 4 retry");
    let (sink, _) = sut.build().await?;
    let target = sink.target();
    let before = metrics(target);
    failpoint::arm(sut.crash_point, Action::Error, 1);
    let replayed = replay(&sink, 40..50);
    through_runtime(&sut.topic, sink, replayed).await?;
    failpoint::disarm(sut.crash_point);
    sut.check_holds(0..50, "after a retried failure").await?;
    let after = metrics(target);
    ensure!(
        after.errors > before.errors,
        "{name}: a failed attempt was not counted in primespark_sink_errors_total ({target:?})"
    );
    ensure!(
        after.rows > before.rows || sut.takes == Takes::Letters && after.rows >= before.rows,
        "{name}: no rows counted in primespark_sink_rows_written_total ({target:?})"
    );
    ensure!(
        !after.degraded,
        "{name}: still degraded after the retry succeeded"
    );
    // 5. Backpressure.
    eprintln!("{name}: step 5 backpressure");
    backpressure(sut).await
}

/// The sink's series, read from the connectors' registry.
#[derive(Debug, Default, Clone, Copy)]
struct Series {
    rows: u64,
    errors: u64,
    degraded: bool,
}

fn metrics(target: Target<'_>) -> Series {
    let mut registry = prometheus_client::registry::Registry::default();
    primespark_connectors::metrics::register(&mut registry);
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    let mut s = Series::default();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        let ours = series.contains(&format!("sink=\"{}\"", target.sink));
        if !ours {
            continue;
        }
        if series.starts_with("primespark_sink_rows_written_total") {
            s.rows += value as u64;
        } else if series.starts_with("primespark_sink_errors_total") {
            s.errors += value as u64;
        } else if series.starts_with("primespark_sink_degraded") && value > 0.0 {
            s.degraded = true;
        }
    }
    s
}

/// A sink whose writes wait while the gate is shut.
struct Gated {
    inner: BoxRawSink,
    open: tokio::sync::watch::Receiver<bool>,
    writes: Arc<AtomicU64>,
}

#[async_trait]
impl Sink for Gated {
    type Input = RawBatch;
    fn id(&self) -> SinkId {
        self.inner.id()
    }
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn target(&self) -> Target<'static> {
        self.inner.target()
    }
    fn resume(&self, partition: i32) -> Option<PartitionOffset> {
        self.inner.resume(partition)
    }
    fn relays_letters(&self) -> bool {
        self.inner.relays_letters()
    }
    async fn recover(&mut self) -> Result<usize, SinkError> {
        self.inner.recover().await
    }
    async fn write(&mut self, batch: &RawBatch) -> Result<(), SinkError> {
        let _ = self.open.wait_for(|open| *open).await;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write(batch).await
    }
    async fn commit(&mut self, flush: Flush) -> Result<(), SinkError> {
        self.inner.commit(flush).await
    }
}

/// A feed of `total` records per partition (offsets after the suite's earlier steps), counting
/// what the source took.
struct Counted {
    next: HashMap<i32, i64>,
    end: i64,
    taken: Arc<AtomicU64>,
}

impl primespark_schemas::flow::Feed for Counted {
    fn poll(&mut self) -> primespark_schemas::flow::Polled {
        use primespark_schemas::flow::Polled;
        let Some((&partition, next)) = self
            .next
            .iter_mut()
            .filter(|(_, n)| **n < self.end)
            .min_by_key(|(_, n)| **n)
        else {
            return Polled::Empty;
        };
        let offset = *next;
        *next += 1;
        self.taken.fetch_add(1, Ordering::Relaxed);
        Polled::Payload {
            partition,
            offset,
            payload: serde_json::json!({"device_id": format!("pi-{partition}-{}", offset / 100),
                "metrics": {"cpu_percent": (offset % 100) as f64},
                "timestamp": 1_762_351_200_000i64 + offset * 1000})
            .to_string()
            .into_bytes(),
        }
    }
    fn kind(&self) -> &'static str {
        "kafka"
    }
}

/// Step 5: a stalled sink pauses the source; released, it takes every record once.
async fn backpressure(sut: &SinkUnderTest) -> Result<()> {
    use primespark_operators::control::Control;
    use primespark_operators::sink::{FlushPolicy, RawSink};
    use primespark_operators::source::{EventTimeSpec, FeedSource, PartitionResume, SourceSpec};
    use timely::dataflow::operators::core::OkErr;

    const FROM: i64 = 50;
    const TO: i64 = 30_000;
    let name = sut.kind.name;
    let (sink, _) = sut.build().await?;
    let resumes: BTreeMap<i32, PartitionResume> = PARTITIONS
        .iter()
        .map(|p| {
            (
                *p,
                PartitionResume {
                    raw: vec![(id(), sink.resume(*p).map(|r| r.next_offset))],
                    window: None,
                },
            )
        })
        .collect();
    let (open_tx, open_rx) = tokio::sync::watch::channel(false);
    let writes = Arc::new(AtomicU64::new(0));
    let gated: BoxRawSink = Box::new(Gated {
        inner: sink,
        open: open_rx,
        writes: writes.clone(),
    });
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let runtime = tokio::spawn(RawRuntime::new(&sut.topic, vec![gated]).run(rx));
    let taken = Arc::new(AtomicU64::new(0));
    let feed = Counted {
        next: PARTITIONS.iter().map(|p| (*p, FROM)).collect(),
        end: TO,
        taken: taken.clone(),
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let topic = sut.topic.clone();
    let worker = std::thread::spawn(move || {
        timely::execute_directly(move |worker| {
            let control = Control::new(flag, Arc::default());
            let drained = std::rc::Rc::new(std::cell::Cell::new(false));
            let spec = SourceSpec {
                topic,
                kind: StreamKind::Telemetry,
                partitions: resumes,
                time: EventTimeSpec {
                    out_of_orderness_us: 0,
                    allowed_lateness_us: 0,
                    width_us: 3_600_000_000,
                    idle_timeout: Duration::from_secs(30),
                    committed_watermark_us: 0,
                    max_future_us: Some(300_000_000),
                },
                limits: Default::default(),
                control: control.clone(),
                backfill: None,
            };
            let flush = FlushPolicy {
                rows: 500,
                interval: Duration::from_millis(50),
            };
            let drained_flag = drained.clone();
            worker.dataflow::<u64, _, _>(|scope| {
                let feed: Box<dyn primespark_schemas::flow::Feed> = Box::new(feed);
                let (raw, _marks): (
                    timely::dataflow::StreamVec<'_, u64, RawItem>,
                    timely::dataflow::StreamVec<'_, u64, primespark_operators::record::SourceMark>,
                ) = scope.feed_source(spec, Some(feed)).ok_err(|i| i);
                raw.raw_sink(tx, flush, &control, drained_flag);
            });
            while !(control.is_shutting_down() && drained.get()) {
                worker.step_or_park(Some(Duration::from_millis(5)));
            }
            // The source keeps its capability at shutdown (open windows stay open), so the
            // dataflow never completes by itself: drop it, as the run's workers do.
            for id in worker.installed_dataflows() {
                worker.drop_dataflow(id);
            }
        })
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let while_stalled = taken.load(Ordering::Relaxed);
    // What may be in flight: a source activation, the operator's buffer up to twice its flush
    // size, two batches in the channel and one in the runtime.
    let bound = 2 * 4096 + 2 * 500 * 2 + 3 * 4096;
    ensure!(
        while_stalled <= bound,
        "{name}: the source read {while_stalled} records while the sink was stalled (bound {bound}): no backpressure"
    );
    ensure!(
        writes.load(Ordering::Relaxed) == 0,
        "{name}: the gate did not hold"
    );
    eprintln!("{name}: stalled after {while_stalled} records");
    open_tx.send(true)?;
    let total = (TO - FROM) as u64 * PARTITIONS.len() as u64;
    for _ in 0..600 {
        if taken.load(Ordering::Relaxed) >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "{name}: released, source took {}",
        taken.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || worker.join())
        .await?
        .map_err(|_| anyhow::anyhow!("{name}: the worker panicked"))?;
    eprintln!("{name}: worker joined");
    runtime.await??;
    ensure!(
        taken.load(Ordering::Relaxed) == total,
        "{name}: the source took {} of {total} records after the sink moved again",
        taken.load(Ordering::Relaxed)
    );
    let got = (sut.read_back)().await?;
    let mut counts: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    for p in got.into_iter().filter(|(_, o)| *o >= FROM) {
        *counts.entry(p).or_default() += 1;
    }
    if sut.takes != Takes::Letters {
        let records = counts.len() as u64;
        if records != total {
            let first = counts.keys().next();
            let last = counts.keys().last();
            eprintln!("{name}: holds {first:?}..{last:?}");
        }
        ensure!(
            records == total,
            "{name}: holds {records} of the {total} records read behind the stall"
        );
        if sut.guarantee == Guarantee::ExactlyOnce {
            ensure!(
                counts.values().all(|n| *n == 1),
                "{name}: records stored twice behind the stall"
            );
        }
    }
    Ok(())
}
