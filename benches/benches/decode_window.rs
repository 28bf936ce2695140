//! Decode + 1-minute windows over 1M telemetry events, against a raw JSON-parse baseline
//! measured in the same run. Run with `cargo bench -p primespark-benches`.

use std::time::Instant;

use primespark_operators::decode::DecodeTelemetry;
use primespark_operators::record::{SinkId, SinkSet, SourceRecord};
use primespark_operators::window::{Stats, TumblingWindow, WindowSpec};
use primespark_schemas::rows::RawRow;
use primespark_schemas::telemetry::TelemetryEvent;
use primespark_schemas::DecodeLimits;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

// The allocator the `primespark` binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 1_000_000;
const DEVICES: usize = 1_000;
const T0_MS: i64 = 1_762_351_200_000;

fn payloads() -> Vec<Vec<u8>> {
    (0..EVENTS)
        .map(|i| {
            let device = i % DEVICES;
            // 100 events per millisecond of event time: 1M events span ~10 s per device group.
            let ts = T0_MS + (i as i64) / 10;
            format!(
                r#"{{"device_id":"pi-{device:05}","metrics":{{"cpu_percent":{}.5,"memory_percent":{}.25,"disk_percent":18.0,"temperature":{},"load_avg":1.25}},"timestamp":{ts}}}"#,
                i % 100,
                (i * 7) % 100,
                if device % 5 == 4 { "null".to_owned() } else { format!("{}.0", 40 + i % 30) }
            )
            .into_bytes()
        })
        .collect()
}

fn main() {
    let data = payloads();
    let bytes: usize = data.iter().map(Vec::len).sum();

    // Baseline: parse each message into a generic JSON value, nothing else.
    let started = Instant::now();
    let mut sink = 0usize;
    for p in &data {
        let v: serde_json::Value = serde_json::from_slice(p).expect("valid json");
        sink += v.as_object().map_or(0, |o| o.len());
    }
    let baseline = started.elapsed();
    assert!(sink > 0);

    // Decode and validate only.
    let limits = DecodeLimits::default();
    let started = Instant::now();
    let mut metrics = 0usize;
    for p in &data {
        metrics += TelemetryEvent::decode(p, &limits)
            .expect("valid")
            .metrics
            .len();
    }
    let decode = started.elapsed();

    // Decode + window in a timely dataflow on one worker.
    let records: Vec<SourceRecord> = data
        .iter()
        .enumerate()
        .map(|(i, p)| SourceRecord {
            partition: 0,
            offset: i as i64,
            payload: p.clone(),
            delivery: SinkSet::of([SinkId::WINDOWS]),
            watermark_us: i64::MIN,
            allowed_lateness_us: 0,
        })
        .collect();
    let started = Instant::now();
    let windows = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = windows.clone();
    timely::execute(timely::Config::thread(), move |worker| {
        let mut input: InputHandleVec<u64, SourceRecord> = InputHandleVec::new();
        let probe = ProbeHandle::new();
        let counter = counter.clone();
        worker.dataflow(|scope| {
            let (points, _dead) = scope
                .input_from(&mut input)
                .decode_telemetry("bench", DecodeLimits::default());
            points
                .flat_map(|p| match p.row {
                    RawRow::Telemetry(r) => {
                        Some(((r.device_id, r.metric_name), r.time_us, r.value))
                    }
                    _ => None,
                })
                .tumbling_window(
                    WindowSpec {
                        name: "bench_1m".into(),
                        dataflow: "bench".into(),
                        width_us: 60_000_000,
                        committed_watermark_us: 0,
                        allowed_lateness_us: 0,
                    },
                    |s: &mut Stats, v: f64| s.add(v),
                )
                .inspect(move |_| {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
                .probe_with(&probe);
        });
        let mut batch = 0u64;
        for chunk in records.chunks(4096) {
            for r in chunk {
                input.send(r.clone());
            }
            batch += 1;
            // Watermark: the chunk's lowest event time minus 5 s.
            let wm = ((T0_MS + (batch as i64 * 4096) / 10 - 5_000) * 1000) as u64;
            if wm > *input.time() {
                input.advance_to(wm);
            }
            while probe.less_than(input.time()) {
                worker.step();
            }
        }
        input.close();
        while worker.step() {}
    })
    .expect("timely");
    let pipeline = started.elapsed();

    let rate = |d: std::time::Duration| EVENTS as f64 / d.as_secs_f64();
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    let _ = writeln!(
        out,
        "decode_window: {EVENTS} telemetry events, {DEVICES} devices, {:.1} MB",
        bytes as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "  baseline serde_json::Value parse : {:>10.0} events/s",
        rate(baseline)
    );
    let _ = writeln!(
        out,
        "  decode + validate                 : {:>10.0} events/s  ({:.2}x baseline, {metrics} samples)",
        rate(decode),
        baseline.as_secs_f64() / decode.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "  decode + 1m windows (timely, 1 w) : {:>10.0} events/s  ({:.2}x baseline, {} window rows)",
        rate(pipeline),
        baseline.as_secs_f64() / pipeline.as_secs_f64(),
        windows.load(std::sync::atomic::Ordering::Relaxed)
    );
}
