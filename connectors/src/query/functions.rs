//! SQL functions the platform's dashboards use that DataFusion lacks.
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

/// Registers the functions on `ctx`.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::new_from_impl(TimeBucket::default()));
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
