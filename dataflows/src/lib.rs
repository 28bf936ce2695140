//! Wires primespark's operators and connectors into dataflows, and the `primespark` binary.
//!
//! - [`config`]: the typed configuration (TOML + environment).
//! - [`source`]: the source operator, over Kafka (explicit partition assignment, non-blocking polls,
//!   per-partition watermarks, resume offsets) or the Parquet archive (`primespark backfill`).
//! - [`sinks`]: timely operators that hand batches to the async writers with backpressure.
//! - [`writers`]: the async writers (PostgreSQL, Parquet) with retries.
//! - [`dataflow`]: the dataflow of one topic (telemetry, inference) and its windows.
//! - [`scoring`]: anomaly scoring of telemetry samples (`[inference]`, the scoring operator).
//! - [`run`]: process start-up and shutdown: runtime, migrations, state, timely workers.
//! - [`fleet`]: a synthetic fleet producer (demo, `produce`, tests, benchmarks).
//! - [`demo`]: the embedded default with an in-process Kafka-protocol broker.
//! - [`ops`]: the process's metrics registry and HTTP routes (`/metrics`, `/healthz`).
//! - [`cli`]: the command line.

// Tests may unwrap: a panic there is a failed test with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod dataflow;
pub mod demo;
pub mod fleet;
pub mod ops;
pub mod run;
pub mod scoring;
pub mod sinks;
pub mod source;
pub mod writers;
