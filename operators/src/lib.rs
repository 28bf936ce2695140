//! Timely operators of primespark.
//!
//! Each operator is an extension trait on a timely `Stream` (or, for the source, on a scope),
//! named, non-blocking, and built on timely's generic builders:
//! - [`source`]: the source of every dataflow over a `Feed` (Kafka partitions or the Parquet
//!   archive): decoding in place, per-partition watermarks, which consumers need each record.
//! - [`sink`]: the raw sink and commit operators, which hand batches to the sinks' async
//!   runtimes through bounded channels (backpressure pauses the source).
//! - [`scoring`]: anomaly scoring of telemetry samples, micro-batched to an inference thread.
//! - [`control`]: the shutdown, pause and pressure flags the operators of a worker share.
//! - [`decode`]: Kafka records to validated telemetry points; bad records become dead letters.
//! - [`window`]: event-time tumbling windows, emitted when the watermark (the timely frontier)
//!   passes their end.
//! - [`routing`]: inference and edge-vs-cloud routing statistics, mergeable window folds.
//! - [`sketch`]: a mergeable quantile sketch (DDSketch) for percentiles with a 0.5% relative
//!   error, so partial aggregates from many workers merge exactly.
//! - [`tasks`]: the task lifecycle of `analytics.events` as a differential-dataflow join, with
//!   backlog and agent load sampled at every window's end, and API event windows.
//! - [`recent`]: the latest dead letters and anomalies, for the console.
//! - [`checkpoint`]: the pure bookkeeping that decides where each Kafka partition must resume so
//!   that a restart neither loses nor doubles an aggregate.
//!
//! Time in every dataflow is event time in microseconds since the epoch (`u64`): a source holds
//! its capability at its watermark, so the frontier an operator sees *is* the watermark.
//! The record types that flow between operators live in [`record`].

// Tests may unwrap: a panic there is a failed test with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod checkpoint;
pub mod control;
pub mod decode;
pub mod inference;
pub mod metrics;
pub mod recent;
pub mod record;
pub mod routing;
pub mod scoring;
pub mod sink;
pub mod sketch;
pub mod source;
pub mod tasks;
pub mod watermark;
pub mod window;

/// Timely time of every primespark dataflow: event-time watermark in microseconds since the epoch.
pub type EventTime = u64;

/// A deterministic 64-bit hash, identical in every process of a cluster (same binary), used to
/// exchange records by key: foldhash with a fixed seed, several times faster than SipHash on
/// the short string keys every exchange hashes.
pub fn stable_hash<K: std::hash::Hash + ?Sized>(key: &K) -> u64 {
    use std::hash::BuildHasher;
    const SEED: u64 = 0x7072_696d_6573_7061; // "primespa"
    foldhash::fast::FixedState::with_seed(SEED).hash_one(key)
}

/// Hash maps of operator state: foldhash (per-process random seed) instead of SipHash. Keys
/// here come from the pipeline's own events, and a DoS-resistant hash costs a fifth of a
/// window operator's time.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Hash sets of operator state, as [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
