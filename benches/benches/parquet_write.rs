//! Parquet archive writing: the NAS writer (`ParquetArchive::write_roll`: RawRow -> Arrow batch,
//! zstd, row groups, temp file + fsync + rename + directory fsync) against arrow-rs's plain
//! `ArrowWriter` with default properties on the same rows, measured in the same run.
//! Run with `cargo bench -p primespark-benches --bench parquet_write`.

use std::error::Error;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use primespark_benches::{telemetry_rows, METRICS};
use primespark_connectors::nas::{raw_batch, ParquetArchive};
use primespark_schemas::rows::RawRow;

// The allocator the `primespark` binary ships with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROWS: usize = 1_000_000;
const DEVICES: usize = 1_000;
/// `nas.roll_rows` default.
const ROLL_ROWS: usize = 200_000;
/// `nas.row_group_rows` default.
const ROW_GROUP_ROWS: usize = 128 * 1024;
/// Measured runs per variant; the best one is reported (the first warms the caches).
const RUNS: usize = 5;
/// The target: ours at least this share of plain `ArrowWriter`'s rate.
const TARGET_RATIO: f64 = 0.50;

type BoxError = Box<dyn Error>;

/// Every `*.parquet` file under `dir`; fails on a leftover temporary file.
fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>, BoxError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                files.push(path);
            } else {
                return Err(format!("unexpected file {}", path.display()).into());
            }
        }
    }
    Ok(files)
}

/// Files, bytes and rows (read back in full) under `dir`.
fn read_back(dir: &Path) -> Result<(usize, u64, usize), BoxError> {
    let files = parquet_files(dir)?;
    let (mut bytes, mut rows) = (0u64, 0usize);
    for f in &files {
        bytes += fs::metadata(f)?.len();
        for batch in ParquetRecordBatchReaderBuilder::try_new(fs::File::open(f)?)?.build()? {
            rows += batch?.num_rows();
        }
    }
    Ok((files.len(), bytes, rows))
}

/// One measured variant.
#[derive(Default)]
struct Variant {
    /// Writing, best run.
    write: Option<Duration>,
    /// RawRow -> RecordBatch conversion of the same run (plain writers only).
    convert: Duration,
    files: usize,
    bytes: u64,
}

impl Variant {
    fn record(&mut self, write: Duration, convert: Duration, dir: &Path) -> Result<(), BoxError> {
        let (files, bytes, rows) = read_back(dir)?;
        if rows != ROWS {
            return Err(format!("{}: read back {rows} rows, wrote {ROWS}", dir.display()).into());
        }
        if self
            .write
            .is_none_or(|w| write + convert < w + self.convert)
        {
            (self.write, self.convert) = (Some(write), convert);
        }
        (self.files, self.bytes) = (files, bytes);
        fs::remove_dir_all(dir)?;
        Ok(())
    }

    fn total(&self) -> Duration {
        self.write.unwrap_or_default() + self.convert
    }
}

fn write_ours(rows: &[RawRow], dir: &Path) -> Result<Duration, BoxError> {
    let archive = ParquetArchive::new(dir, "edge.telemetry", ROW_GROUP_ROWS);
    let started = Instant::now();
    for (k, roll) in rows.chunks(ROLL_ROWS).enumerate() {
        let first = (k * ROLL_ROWS) as i64;
        let last = first + roll.len() as i64 - 1;
        archive.write_roll(0, first, last, roll)?;
    }
    Ok(started.elapsed())
}

/// Converts each roll (timed apart), then writes each batch to its own file with a plain
/// `ArrowWriter` (timed: create, write, close). `durable` adds what `write_roll` does around
/// the writer: temporary name, file fsync, rename, directory fsync. Returns (write, convert).
fn write_plain(
    rows: &[RawRow],
    dir: &Path,
    props: Option<&WriterProperties>,
    durable: bool,
) -> Result<(Duration, Duration), BoxError> {
    fs::create_dir_all(dir)?;
    let (mut write, mut convert) = (Duration::ZERO, Duration::ZERO);
    for (k, roll) in rows.chunks(ROLL_ROWS).enumerate() {
        let started = Instant::now();
        let batch: RecordBatch = raw_batch(roll)?;
        convert += started.elapsed();

        let started = Instant::now();
        let path = dir.join(format!("part-{k:03}.parquet"));
        let tmp = dir.join(format!(".part-{k:03}.parquet.inprogress"));
        let file = fs::File::create(if durable { &tmp } else { &path })?;
        let mut writer = ArrowWriter::try_new(file, batch.schema(), props.cloned())?;
        writer.write(&batch)?;
        let file = writer.into_inner()?;
        if durable {
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(dir)?.sync_all()?;
        }
        write += started.elapsed();
    }
    Ok((write, convert))
}

fn main() {
    let rows = telemetry_rows(ROWS, DEVICES);
    let root = tempfile::tempdir().expect("creating a temporary folder");
    // Our codec and row groups on a plain ArrowWriter, then also our file protocol: what is
    // left between that and ours is write_roll's row handling (grouping by hour).
    let ours_props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).expect("zstd level 3"),
        ))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();

    let (mut ours, mut plain, mut plain_zstd, mut plain_durable) = (
        Variant::default(),
        Variant::default(),
        Variant::default(),
        Variant::default(),
    );
    for run in 0..RUNS {
        let dir = root.path().join(format!("ours-{run}"));
        let took = write_ours(&rows, &dir).expect("write_roll");
        ours.record(took, Duration::ZERO, &dir)
            .expect("checking ours");

        let dir = root.path().join(format!("plain-{run}"));
        let (write, convert) = write_plain(&rows, &dir, None, false).expect("plain ArrowWriter");
        plain.record(write, convert, &dir).expect("checking plain");

        let dir = root.path().join(format!("plain-zstd-{run}"));
        let (write, convert) = write_plain(&rows, &dir, Some(&ours_props), false)
            .expect("ArrowWriter with our properties");
        plain_zstd
            .record(write, convert, &dir)
            .expect("checking ArrowWriter with our properties");

        let dir = root.path().join(format!("plain-durable-{run}"));
        let (write, convert) = write_plain(&rows, &dir, Some(&ours_props), true)
            .expect("durable ArrowWriter with our properties");
        plain_durable
            .record(write, convert, &dir)
            .expect("checking durable ArrowWriter with our properties");
    }

    let rate = |d: Duration| ROWS as f64 / d.as_secs_f64();
    let mb = |b: u64| b as f64 / 1e6;
    let ours_t = ours.total();
    let plain_w = plain.write.unwrap_or_default();
    let ratio_incl = plain.total().as_secs_f64() / ours_t.as_secs_f64();
    let ratio_ready = plain_w.as_secs_f64() / ours_t.as_secs_f64();

    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "parquet_write: {ROWS} telemetry rows ({DEVICES} devices x {} metrics) in rolls of \
         {ROLL_ROWS}, best of {RUNS}, files read back in full",
        METRICS.len()
    );
    let _ = writeln!(
        out,
        "  {:<58} {:>8} {:>11} {:>6} {:>8}",
        "variant", "seconds", "rows/s", "files", "MB"
    );
    let line = |out: &mut std::io::StdoutLock<'_>, name: &str, d: Duration, v: &Variant| {
        let _ = writeln!(
            out,
            "  {name:<58} {:>8.3} {:>11.0} {:>6} {:>8.1}",
            d.as_secs_f64(),
            rate(d),
            v.files,
            mb(v.bytes)
        );
    };
    line(
        &mut out,
        "ArrowWriter defaults, ready batches (baseline)",
        plain_w,
        &plain,
    );
    line(
        &mut out,
        "ArrowWriter defaults, incl. RawRow -> RecordBatch",
        plain.total(),
        &plain,
    );
    let _ = writeln!(
        out,
        "    of which raw_batch conversion: {:.3} s ({:.0} rows/s)",
        plain.convert.as_secs_f64(),
        rate(plain.convert)
    );
    line(
        &mut out,
        "ArrowWriter zstd(3) + 128Ki-row groups, incl. conversion",
        plain_zstd.total(),
        &plain_zstd,
    );
    line(
        &mut out,
        "  same + temp name, fsync, rename, dir fsync",
        plain_durable.total(),
        &plain_durable,
    );
    line(
        &mut out,
        "ours: ParquetArchive::write_roll (zstd, fsync, rename)",
        ours_t,
        &ours,
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "  ours / ArrowWriter incl. conversion: {:.2}x; ours / ArrowWriter on ready batches: {:.2}x",
        ratio_incl, ratio_ready
    );
    let _ = writeln!(
        out,
        "  target ours >= {:.0}% of plain ArrowWriter: {} incl. conversion, {} on ready batches",
        TARGET_RATIO * 100.0,
        verdict(ratio_incl >= TARGET_RATIO),
        verdict(ratio_ready >= TARGET_RATIO)
    );
}
