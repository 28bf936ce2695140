//! Wires primespark's operators and connectors into dataflows, and the `primespark` binary.
//!
//! This crate is the wiring only: the operators live in `primespark-operators` (source, windows,
//! raw sink and commit, scoring), the sinks and their runtime in `primespark-connectors`
//! (`sink`).
//!
//! - [`config`]: the typed configuration (TOML + environment).
//! - [`plan`]: the pure plan of a run from its configuration: streams, topics, sinks.
//! - [`dataflow`]: the dataflow of one stream and the windows its kind needs.
//! - [`run`]: process start-up and shutdown: runtime, migrations, each stream's sinks and
//!   state, the services, the timely workers.
//! - [`npu`]: opening the Hailo-8 when there is one.
//! - [`fleet`]: a synthetic fleet producer (demo, `produce`, tests, benchmarks).
//! - [`demo`]: the embedded default with an in-process Kafka-protocol broker.
//! - [`console`]: the web console at `/` of the query endpoint.
//! - [`ops`]: the process's metrics registry and HTTP routes (`/metrics`, `/healthz`).
//! - [`cli`]: the command line.
//! - [`allocator`]: mimalloc's memory options, set by the binaries.

// Tests may unwrap: a panic there is a failed test with its message.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod allocator;
pub mod cli;
pub mod config;
pub mod console;
pub mod dataflow;
pub mod demo;
pub mod fleet;
pub mod npu;
pub mod ops;
pub mod plan;
pub mod run;
