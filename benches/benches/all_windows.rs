//! Decode -> every windowed aggregate (telemetry, inference and analytics with the task
//! lifecycle join, 1-minute and 1-hour rollups) on
//! two timely workers, broker and sinks excluded, against a one-thread raw JSON-parse baseline
//! measured in the same run. Prints events/s, events/s per core and the peak resident memory.
//! Run with `cargo bench -p primespark-benches --bench all_windows`.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use primespark_benches::peak_rss_mb;
use primespark_operators::decode::{DecodeRecord, StreamKind};
use primespark_operators::record::{SinkId, SinkSet, SourceRecord};
use primespark_operators::routing::{InferenceWindowSpec, InferenceWindows};
use primespark_operators::tasks::{task_windows, TaskInput, TaskWindowSpec};
use primespark_operators::window::metric_windows;
use primespark_schemas::analytics::AnalyticsEvent;
use primespark_schemas::inference::InferenceEvent;
use primespark_schemas::rows::{RawRow, Rollup};
use primespark_schemas::DecodeLimits;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

// The allocator the `primespark` binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 1_000_000;
const DEVICES: usize = 1_000;
const WORKERS: usize = 2;
const T0_MS: i64 = 1_762_351_200_000;

/// Every fifth event is an inference request, every tenth an analytics event (four of five
/// walk a task through created, assigned, started, completed; one is an API call), the rest
/// telemetry; 100 events per millisecond.
fn payloads() -> Vec<(StreamKind, Vec<u8>)> {
    (0..EVENTS)
        .map(|i| {
            let ts = T0_MS + (i as i64) / 100;
            if i % 10 == 9 {
                let j = i / 10;
                let payload = match j % 5 {
                    4 => format!(
                        r#"{{"event_type":"llm_generate","endpoint":"/api/llm/{}","user_id":"user-{}","timestamp":{ts}}}"#,
                        j % 7,
                        j % 50
                    ),
                    step => format!(
                        r#"{{"event_type":"{}","task_id":"t-{}","task_type":"type-{}","agent_id":"agent-{}","timestamp":{ts}}}"#,
                        ["task_created", "task_assigned", "task_started", "task_completed"][step],
                        j / 5,
                        (j / 5) % 3,
                        (j / 5) % 8
                    ),
                };
                (StreamKind::Analytics, payload.into_bytes())
            } else if i % 5 == 4 {
                let payload = format!(
                    r#"{{"model":"model-{}","prompt_length":{},"response_length":{},"latency_ms":{}.5,"source":"{}","status":"{}","routing_strategy":"{}","fallback":false,"timestamp":{ts}}}"#,
                    i % 3,
                    i % 500,
                    i % 1500,
                    50 + i % 2000,
                    if i % 2 == 0 { "edge" } else { "cloud" },
                    if i % 31 == 0 { "error" } else { "ok" },
                    ["edge_first", "cloud_first", "balanced"][i % 3],
                );
                (StreamKind::Inference, payload.into_bytes())
            } else {
                let device = i % DEVICES;
                let payload = format!(
                    r#"{{"device_id":"pi-{device:05}","metrics":{{"cpu_percent":{}.5,"memory_percent":{}.25,"disk_percent":18.0,"temperature":{}.0,"load_avg":1.25}},"timestamp":{ts}}}"#,
                    i % 100,
                    (i * 7) % 100,
                    40 + i % 30
                );
                (StreamKind::Telemetry, payload.into_bytes())
            }
        })
        .collect()
}

fn main() {
    let data = Arc::new(payloads());
    let bytes: usize = data.iter().map(|(_, p)| p.len()).sum();

    // Baseline: one thread parses every message into a generic JSON value, nothing else.
    let started = Instant::now();
    let mut fields = 0usize;
    for (_, p) in data.iter() {
        let v: serde_json::Value = serde_json::from_slice(p).expect("valid json");
        fields += v.as_object().map_or(0, |o| o.len());
    }
    let baseline = started.elapsed();
    assert!(fields > 0);

    let rss_before = peak_rss_mb("self");
    let rows = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    {
        let data = data.clone();
        let rows = rows.clone();
        timely::execute(timely::Config::process(WORKERS), move |worker| {
            let index = worker.index();
            let peers = worker.peers();
            let probe = ProbeHandle::new();
            let mut telemetry: InputHandleVec<u64, SourceRecord> = InputHandleVec::new();
            let mut inference: InputHandleVec<u64, SourceRecord> = InputHandleVec::new();
            let mut analytics: InputHandleVec<u64, SourceRecord> = InputHandleVec::new();
            worker.dataflow(|scope| {
                let limits = DecodeLimits::default();
                let points = |input: &mut InputHandleVec<u64, SourceRecord>, kind: StreamKind| {
                    scope
                        .input_from(input)
                        .flat_map(move |r| kind.decode("bench", &limits, r).unwrap_or_default())
                };
                let metrics =
                    points(&mut telemetry, StreamKind::Telemetry).flat_map(|p| match p.row {
                        RawRow::Telemetry(r) => {
                            Some(((r.device_id, r.metric_name), r.time_us, r.value))
                        }
                        _ => None,
                    });
                let requests =
                    points(&mut inference, StreamKind::Inference).flat_map(|p| match p.row {
                        RawRow::Inference(r) => Some(r.event),
                        _ => None,
                    });
                let events =
                    points(&mut analytics, StreamKind::Analytics).flat_map(|p| match p.row {
                        RawRow::Analytics(r) => Some(r.event),
                        _ => None,
                    });
                let tasks = events.clone().flat_map(|e| match e {
                    AnalyticsEvent::Task(event) => Some(TaskInput {
                        event,
                        restored: false,
                    }),
                    AnalyticsEvent::Api(_) => None,
                });
                let api = events.flat_map(|e| match e {
                    AnalyticsEvent::Api(a) => Some(a),
                    AnalyticsEvent::Task(_) => None,
                });
                let out = task_windows(
                    tasks,
                    api,
                    TaskWindowSpec {
                        dataflow: "bench".into(),
                        committed_watermark_us: 0,
                        allowed_lateness_us: 0,
                        out_of_orderness_us: 5_000_000,
                    },
                );
                let (a, b, c) = (rows.clone(), rows.clone(), rows.clone());
                out.task_stats
                    .inspect(move |_| {
                        a.fetch_add(1, Ordering::Relaxed);
                    })
                    .probe_with(&probe);
                out.agent_load
                    .inspect(move |_| {
                        b.fetch_add(1, Ordering::Relaxed);
                    })
                    .probe_with(&probe);
                out.api_events
                    .inspect(move |_| {
                        c.fetch_add(1, Ordering::Relaxed);
                    })
                    .probe_with(&probe);
                out.state.probe_with(&probe);
                // The same operators as dataflows/src/dataflow.rs.
                let counter = rows.clone();
                metric_windows(metrics, "bench", 0, 0)
                    .inspect(move |_| {
                        counter.fetch_add(1, Ordering::Relaxed);
                    })
                    .probe_with(&probe);
                for rollup in Rollup::ALL {
                    let requests: timely::dataflow::StreamVec<'_, u64, InferenceEvent> =
                        requests.clone();
                    let (stats, routing) = requests.inference_windows(InferenceWindowSpec {
                        dataflow: "bench".into(),
                        width_us: rollup.width_us(),
                        suffix: rollup.suffix().into(),
                        committed_watermark_us: 0,
                        allowed_lateness_us: 0,
                    });
                    let (a, b) = (rows.clone(), rows.clone());
                    stats
                        .inspect(move |_| {
                            a.fetch_add(1, Ordering::Relaxed);
                        })
                        .probe_with(&probe);
                    routing
                        .inspect(move |_| {
                            b.fetch_add(1, Ordering::Relaxed);
                        })
                        .probe_with(&probe);
                }
            });
            // Each worker reads its share, like partitions; the watermark trails by 5 s.
            for (chunk_no, chunk) in data.chunks(4096).enumerate() {
                if chunk_no % peers != index {
                    continue;
                }
                for (i, (kind, payload)) in chunk.iter().enumerate() {
                    let record = SourceRecord {
                        partition: index as i32,
                        offset: (chunk_no * 4096 + i) as i64,
                        payload: payload.clone(),
                        delivery: SinkSet::of([SinkId::WINDOWS]),
                        watermark_us: i64::MIN,
                        allowed_lateness_us: 0,
                    };
                    match kind {
                        StreamKind::Telemetry => telemetry.send(record),
                        StreamKind::Inference => inference.send(record),
                        StreamKind::Analytics => analytics.send(record),
                    }
                }
                let wm = ((T0_MS + (chunk_no as i64 * 4096) / 100 - 5_000) * 1000) as u64;
                for input in [&mut telemetry, &mut inference, &mut analytics] {
                    if wm > *input.time() {
                        input.advance_to(wm);
                    }
                }
                // Let the dataflow catch up now and then, not after every chunk: a source
                // hands over thousands of records per activation too.
                if chunk_no % 32 == 0 {
                    while probe.less_than(telemetry.time()) {
                        worker.step();
                    }
                } else {
                    worker.step();
                }
            }
            telemetry.close();
            inference.close();
            analytics.close();
            while worker.step() {}
        })
        .expect("timely");
    }
    let pipeline = started.elapsed();

    let rate = |d: std::time::Duration| EVENTS as f64 / d.as_secs_f64();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "all_windows: {EVENTS} events (70% telemetry from {DEVICES} devices, 20% inference, 10% task and API events), {:.1} MB, {WORKERS} workers",
        bytes as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "  baseline serde_json::Value parse, 1 thread : {:>10.0} events/s",
        rate(baseline)
    );
    let _ = writeln!(
        out,
        "  decode -> 1m + 1h windows of every table   : {:>10.0} events/s ({:.0} per core, {:.2}x baseline), {} window rows",
        rate(pipeline),
        rate(pipeline) / WORKERS as f64,
        rate(pipeline) / rate(baseline),
        rows.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "  peak resident memory: {:.0} MB (input held in memory: {:.0} MB before the dataflow ran)",
        peak_rss_mb("self"),
        rss_before
    );
}
