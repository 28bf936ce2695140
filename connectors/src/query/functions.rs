//! SQL functions the platform's dashboards use that DataFusion lacks, and DataFusion's
//! functions whose output a caller sizes, capped.
//!
//! `repeat`, `lpad`, `rpad`, `array_repeat`, and the list forms of `range` and
//! `generate_series` (over integers, dates and timestamps) allocate what their arguments ask
//! for, outside the query memory pool: one `repeat('x', 2000000000)` would take 2 GB of a Pi's
//! memory at once. Each is registered again
//! as [`Capped`], which refuses arguments whose result would exceed `query.max_value_bytes`
//! (bytes of a string, elements of a list) with an error naming the function and the key.
//!
//! `time_bucket(width, ts)` is TimescaleDB's: buckets of `width` aligned like TimescaleDB's
//! default origin (Monday 2000-01-03 00:00 UTC), so weekly buckets start on Mondays and every
//! width that divides a day matches `date_bin` from the epoch. `width` may be an interval or a
//! string such as `'5 minutes'`, as PostgreSQL casts the unknown literal.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, IntervalUnit, TimeUnit};
use datafusion::common::{plan_err, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// TimescaleDB's default origin, in nanoseconds since the epoch.
const ORIGIN_NS: i64 = 946_857_600_000_000_000;

/// `time_bucket(width, ts)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TimeBucket {
    signature: Signature,
}

impl Default for TimeBucket {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for TimeBucket {
    fn name(&self) -> &str {
        "time_bucket"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let [width, ts] = arg_types else {
            return plan_err!(
                "time_bucket takes (width, timestamp), got {} arguments",
                arg_types.len()
            );
        };
        let width = match width {
            DataType::Interval(_) | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                DataType::Interval(IntervalUnit::MonthDayNano)
            }
            other => return plan_err!("time_bucket: width must be an interval, got {other}"),
        };
        let ts = match ts {
            DataType::Timestamp(unit, tz) => DataType::Timestamp(*unit, tz.clone()),
            DataType::Date32 | DataType::Date64 | DataType::Utf8 | DataType::Utf8View => {
                DataType::Timestamp(TimeUnit::Nanosecond, None)
            }
            other => {
                return plan_err!("time_bucket: second argument must be a timestamp, got {other}")
            }
        };
        Ok(vec![width, ts])
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types.get(1) {
            Some(t @ DataType::Timestamp(_, _)) => Ok(t.clone()),
            _ => Ok(DataType::Timestamp(TimeUnit::Nanosecond, None)),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let tz = match args.return_type() {
            DataType::Timestamp(_, tz) => tz.clone(),
            _ => None,
        };
        let origin = ScalarValue::TimestampNanosecond(Some(ORIGIN_NS), tz.clone());
        let mut arg_fields = args.arg_fields.clone();
        arg_fields.push(Arc::new(Field::new(
            "origin",
            DataType::Timestamp(TimeUnit::Nanosecond, tz),
            false,
        )));
        let mut values = args.args;
        values.push(ColumnarValue::Scalar(origin));
        datafusion::functions::datetime::date_bin().invoke_with_args(ScalarFunctionArgs {
            args: values,
            arg_fields,
            number_rows: args.number_rows,
            return_field: args.return_field,
            config_options: args.config_options,
        })
    }
}

/// The cap a session starts with (`query.max_value_bytes`' default): 16 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 16 << 20;

/// Registers the functions on `ctx`; the functions that allocate what their arguments ask
/// for are capped at [`DEFAULT_MAX_VALUE_BYTES`].
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::new_from_impl(TimeBucket::default()));
    cap_functions(ctx, DEFAULT_MAX_VALUE_BYTES);
}

/// Caps (again) the functions that allocate what their arguments ask for at
/// `max_value_bytes` (`query.max_value_bytes`).
pub fn cap_functions(ctx: &SessionContext, max_value_bytes: usize) {
    let max = i64::try_from(max_value_bytes).unwrap_or(i64::MAX);
    for (name, size) in [
        ("repeat", Size::Repeat),
        ("lpad", Size::Count(1)),
        ("rpad", Size::Count(1)),
        ("array_repeat", Size::Count(1)),
        ("range", Size::Series),
        ("generate_series", Size::Series),
    ] {
        if let Some(udf) = ctx.state().scalar_functions().get(name).cloned() {
            // A capped one is capped anew, not wrapped twice.
            let any: &dyn std::any::Any = udf.inner().as_ref();
            let inner = any
                .downcast_ref::<Capped>()
                .map_or(udf.clone(), |c| c.inner.clone());
            ctx.register_udf(ScalarUDF::new_from_impl(Capped { inner, size, max }));
        }
    }
}

/// How big a capped function's result gets, from its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Size {
    /// The integer argument at this index (characters or elements).
    Count(usize),
    /// `repeat(text, n)`: the text's bytes times `n`.
    Repeat,
    /// `range(start, stop[, step])` over integers: the number of steps.
    Series,
}

/// A function of DataFusion's whose result is bounded before it is computed.
#[derive(Debug)]
pub struct Capped {
    inner: Arc<ScalarUDF>,
    size: Size,
    max: i64,
}

impl PartialEq for Capped {
    fn eq(&self, other: &Self) -> bool {
        self.inner.name() == other.inner.name() && self.size == other.size && self.max == other.max
    }
}

impl Eq for Capped {}

impl std::hash::Hash for Capped {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.name().hash(state);
        self.size.hash(state);
        self.max.hash(state);
    }
}

/// The largest integer of `value` (`None`: null, or not an integer).
fn largest_int(value: &ColumnarValue) -> Option<i64> {
    use datafusion::arrow::array::{Array, Int64Array};
    match value {
        ColumnarValue::Scalar(s) => match s.cast_to(&DataType::Int64).ok()? {
            ScalarValue::Int64(v) => v,
            _ => None,
        },
        ColumnarValue::Array(a) => {
            let cast = datafusion::arrow::compute::cast(a, &DataType::Int64).ok()?;
            let ints = cast.as_any().downcast_ref::<Int64Array>()?;
            datafusion::arrow::compute::max(ints)
        }
    }
}

/// The earliest and latest instant of a date or timestamp `value`, in seconds since the epoch
/// (`None`: null, or not a date or timestamp).
fn instants(value: &ColumnarValue) -> Option<(i64, i64)> {
    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::datatypes::TimeUnit;
    let data_type = value.data_type();
    if !matches!(
        data_type,
        DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
    ) {
        return None;
    }
    let array = value.to_array(1).ok()?;
    let seconds =
        datafusion::arrow::compute::cast(&array, &DataType::Timestamp(TimeUnit::Second, None))
            .ok()?;
    let ints = datafusion::arrow::compute::cast(&seconds, &DataType::Int64).ok()?;
    let ints = ints.as_any().downcast_ref::<Int64Array>()?;
    Some((
        datafusion::arrow::compute::min(ints)?,
        datafusion::arrow::compute::max(ints)?,
    ))
}

/// The shortest an interval step can be, in whole seconds (a month at least 28 days, a day
/// at least 23 hours); `None` when it is not a scalar interval.
fn shortest_step_seconds(value: &ColumnarValue) -> Option<i64> {
    let ColumnarValue::Scalar(s) = value else {
        return None;
    };
    let (months, days, nanos): (i64, i64, i64) = match s {
        ScalarValue::IntervalYearMonth(Some(m)) => (i64::from(*m), 0, 0),
        ScalarValue::IntervalDayTime(Some(v)) => {
            (0, i64::from(v.days), i64::from(v.milliseconds) * 1_000_000)
        }
        ScalarValue::IntervalMonthDayNano(Some(v)) => {
            (i64::from(v.months), i64::from(v.days), v.nanoseconds)
        }
        _ => return None,
    };
    let seconds = months
        .saturating_mul(28 * 86_400)
        .saturating_add(days.saturating_mul(23 * 3_600))
        .saturating_add(nanos / 1_000_000_000);
    Some(seconds.saturating_abs())
}

/// The longest text of `value`, in bytes (0 for anything else).
fn longest_text(value: &ColumnarValue) -> i64 {
    use datafusion::arrow::array::{Array, LargeStringArray};
    match value {
        ColumnarValue::Scalar(s) => match s.cast_to(&DataType::LargeUtf8) {
            Ok(ScalarValue::LargeUtf8(Some(t))) => t.len() as i64,
            _ => 0,
        },
        ColumnarValue::Array(a) => datafusion::arrow::compute::cast(a, &DataType::LargeUtf8)
            .ok()
            .and_then(|c| {
                let texts = c.as_any().downcast_ref::<LargeStringArray>()?;
                texts.iter().flatten().map(|t| t.len() as i64).max()
            })
            .unwrap_or(0),
    }
}

impl Capped {
    /// The size the arguments ask for (saturating).
    fn asked(&self, args: &[ColumnarValue]) -> i64 {
        let int = |i: usize| args.get(i).and_then(largest_int).unwrap_or(0);
        match self.size {
            Size::Count(i) => int(i),
            Size::Repeat => longest_text(
                args.first()
                    .unwrap_or(&ColumnarValue::Scalar(ScalarValue::Null)),
            )
            .saturating_mul(int(1)),
            Size::Series => {
                if args.len() >= 2 && args.len() <= 3 {
                    // Dates and timestamps step by an interval: the widest span over the
                    // shortest step the interval can be.
                    if let (Some((least, _)), Some((_, greatest))) =
                        (instants(&args[0]), instants(&args[1]))
                    {
                        let step = args.get(2).map_or(Some(86_400), shortest_step_seconds);
                        return match step {
                            Some(step) if step > 0 => {
                                greatest.saturating_sub(least).saturating_abs() / step
                            }
                            // A step under a second (or one that cannot be read): count
                            // each second of the span, an upper bound of whole-second steps.
                            _ => greatest
                                .saturating_sub(least)
                                .saturating_abs()
                                .saturating_mul(1000),
                        };
                    }
                }
                let ints = args.iter().all(|a| largest_int(a).is_some());
                if !ints || args.len() < 2 {
                    return 0;
                }
                let (start, stop) = (int(0), int(1));
                let step = if args.len() > 2 { int(2) } else { 1 };
                // The smallest start matters too: the widest span of the batch.
                let least_start = args
                    .first()
                    .and_then(|a| match a {
                        ColumnarValue::Scalar(_) => Some(start),
                        ColumnarValue::Array(arr) => {
                            let neg =
                                datafusion::arrow::compute::kernels::numeric::neg(arr).ok()?;
                            largest_int(&ColumnarValue::Array(neg)).map(|v| v.saturating_neg())
                        }
                    })
                    .unwrap_or(start);
                let span = stop.saturating_sub(least_start).saturating_abs();
                span / step.saturating_abs().max(1)
            }
        }
    }
}

impl ScalarUDFImpl for Capped {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let asked = self.asked(&args.args);
        if asked > self.max {
            return plan_err!(
                "{}: the result would hold {asked} {}, over query.max_value_bytes ({}); ask for less",
                self.inner.name(),
                match self.size {
                    Size::Repeat => "bytes",
                    Size::Count(_) if self.inner.name().ends_with("pad") => "characters",
                    _ => "elements",
                },
                self.max
            );
        }
        self.inner.invoke_with_args(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn one(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        datafusion::arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn time_bucket_matches_timescaledb() {
        let ctx = SessionContext::new();
        register(&ctx);
        let out = one(
            &ctx,
            "SELECT time_bucket('5 minutes', TIMESTAMP '2025-11-05 14:03:07') AS a, \
             time_bucket(INTERVAL '1 hour', TIMESTAMPTZ '2025-11-05T14:59:59Z') AS b, \
             time_bucket('1 week', TIMESTAMP '2025-11-05 14:03:07') AS c",
        )
        .await;
        assert_eq!(out.matches("2025-11-05T14:00:00").count(), 2, "{out}");
        // Weeks start on Monday, as TimescaleDB's origin 2000-01-03 does (2025-11-03 is one).
        assert!(out.contains("2025-11-03T00:00:00"), "{out}");
    }

    #[tokio::test]
    async fn percentile_cont_within_group_runs() {
        let ctx = SessionContext::new();
        register(&ctx);
        let out = one(
            &ctx,
            "SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY v) AS p95 \
             FROM (VALUES (1.0), (2.0), (3.0), (4.0), (5.0)) AS t(v)",
        )
        .await;
        // Linear interpolation between 4 and 5 at rank 0.95 * 4 = 3.8.
        assert!(out.contains("| 4.79999") || out.contains("| 4.8 "), "{out}");
    }
}

#[cfg(test)]
mod capped {
    use super::*;

    async fn run(sql: &str) -> Result<String> {
        let ctx = SessionContext::new();
        register(&ctx);
        cap_functions(&ctx, 1000);
        let batches = ctx.sql(sql).await?.collect().await?;
        Ok(datafusion::arrow::util::pretty::pretty_format_batches(&batches)?.to_string())
    }

    #[tokio::test]
    async fn functions_that_allocate_what_they_are_asked_for_are_capped() {
        for sql in [
            "SELECT repeat('x', 2000000000)",
            "SELECT repeat('abcd', 300)",
            "SELECT lpad('x', 5000)",
            "SELECT rpad('x', 5000, 'y')",
            "SELECT array_repeat(1, 100000)",
            "SELECT range(0, 10000000000)",
            "SELECT generate_series(1, 5000)",
            "SELECT range(TIMESTAMP '2020-01-01', TIMESTAMP '2030-01-01', INTERVAL '1 second')",
            "SELECT generate_series(DATE '1900-01-01', DATE '2100-01-01', INTERVAL '1 day')",
            "SELECT range(TIMESTAMP '2020-01-01', TIMESTAMP '2020-01-02', INTERVAL '1 millisecond')",
            "SELECT repeat(t, n) FROM (VALUES ('ab', 10), ('abc', 600)) v(t, n)",
        ] {
            let e = run(sql).await.expect_err(sql).to_string();
            assert!(e.contains("query.max_value_bytes"), "{sql}: {e}");
        }
        // Within the cap they work as before.
        for (sql, want) in [
            ("SELECT repeat('ab', 3) AS v", "ababab"),
            ("SELECT lpad('7', 3, '0') AS v", "007"),
            ("SELECT array_repeat(1, 3) AS v", "[1, 1, 1]"),
            ("SELECT range(0, 3) AS v", "[0, 1, 2]"),
            (
                "SELECT generate_series(DATE '2020-01-01', DATE '2020-01-03', INTERVAL '1 day') AS v",
                "2020-01-03",
            ),
            (
                "SELECT range(TIMESTAMP '2020-01-01T00:00:00', TIMESTAMP '2020-01-01T00:10:00', INTERVAL '1 minute') AS v",
                "2020-01-01T00:09:00",
            ),
        ] {
            let out = run(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
            assert!(out.contains(want), "{sql}: {out}");
        }
    }
}
