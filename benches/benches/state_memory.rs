//! State is bounded by the open windows: 10,000 devices at a constant rate (one telemetry
//! event per device per second of event time, 10 minutes of event time, 6M events) through
//! decode and the 1-minute and 1-hour windows on two workers. Events are generated on the fly,
//! so resident memory is the dataflow's. Prints resident memory after every event-time minute,
//! the growth from minute 2 to the end (flat state means ~0), and the peak.
//! Run with `cargo bench -p primespark-benches --bench state_memory`.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use primespark_operators::decode::{DecodeRecord, StreamKind};
use primespark_operators::record::{SinkId, SinkSet, SourceRecord};
use primespark_operators::window::metric_windows;
use primespark_schemas::rows::RawRow;
use primespark_schemas::DecodeLimits;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

// The allocator the `primespark` binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEVICES: i64 = 10_000;
const SECONDS: i64 = 600;
const WORKERS: usize = 2;
const T0_MS: i64 = 1_762_351_200_000;

fn rss_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let samples: Arc<Mutex<Vec<(i64, f64)>>> = Arc::new(Mutex::new(Vec::new()));
    let start_rss = rss_mb("VmRSS:");
    let started = Instant::now();
    {
        let samples = samples.clone();
        timely::execute(timely::Config::process(WORKERS), move |worker| {
            let index = worker.index() as i64;
            let peers = worker.peers() as i64;
            let probe = ProbeHandle::new();
            let mut input: InputHandleVec<u64, SourceRecord> = InputHandleVec::new();
            worker.dataflow(|scope| {
                let limits = DecodeLimits::default();
                let points = scope
                    .input_from(&mut input)
                    .flat_map(move |r| StreamKind::Telemetry.decode("bench", &limits, r).unwrap_or_default())
                    .flat_map(|p| match p.row {
                        RawRow::Telemetry(r) => Some(((r.device_id, r.metric_name), r.time_us, r.value)),
                        _ => None,
                    });
                metric_windows(points, "bench", 0, 0).probe_with(&probe);
            });
            let mut offset = 0i64;
            for second in 0..SECONDS {
                // This worker's devices, like partitions.
                for device in (index..DEVICES).step_by(peers as usize) {
                    let ts = T0_MS + second * 1000 + device % 1000;
                    let payload = format!(
                        r#"{{"device_id":"pi-{device:05}","metrics":{{"cpu_percent":{}.5,"memory_percent":{}.25,"disk_percent":18.0,"temperature":{}.0,"load_avg":1.25}},"timestamp":{ts}}}"#,
                        (device + second) % 100,
                        (device * 7) % 100,
                        40 + device % 30
                    );
                    input.send(SourceRecord {
                        partition: index as i32,
                        offset,
                        payload: payload.into_bytes(),
                        delivery: SinkSet::of([SinkId::WINDOWS]),
                        watermark_us: i64::MIN,
                        allowed_lateness_us: 0,
                    });
                    offset += 1;
                }
                let wm = ((T0_MS + second * 1000 - 5_000) * 1000).max(0) as u64;
                if wm > *input.time() {
                    input.advance_to(wm);
                }
                while probe.less_than(input.time()) {
                    worker.step();
                }
                if index == 0 && second % 60 == 59 {
                    if let Ok(mut s) = samples.lock() {
                        s.push((second / 60 + 1, rss_mb("VmRSS:")));
                    }
                }
            }
            input.close();
            while worker.step() {}
        })
        .expect("timely");
    }
    let elapsed = started.elapsed();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let events = DEVICES * SECONDS;
    let _ = writeln!(
        out,
        "state_memory: {DEVICES} devices x {SECONDS} s of event time = {events} events, {WORKERS} workers, {:.0} events/s",
        events as f64 / elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "  resident memory before the dataflow: {start_rss:.0} MB"
    );
    for (minute, rss) in &samples {
        let _ = writeln!(out, "  after event-time minute {minute:>2}: {rss:>6.0} MB");
    }
    if let (Some(m2), Some(last)) = (samples.iter().find(|(m, _)| *m == 2), samples.last()) {
        let _ = writeln!(
            out,
            "  growth from minute 2 to minute {}: {:+.0} MB ({:.2}x)",
            last.0,
            last.1 - m2.1,
            last.1 / m2.1
        );
    }
    let _ = writeln!(out, "  peak resident memory: {:.0} MB", rss_mb("VmHWM:"));
}
