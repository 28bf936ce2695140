//! DataFusion filter expressions as PostgreSQL SQL over one table's columns, translated only
//! where PostgreSQL selects exactly the rows DataFusion would (see the module docs of
//! [`super`]).

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{
    expr::{Between, BinaryExpr, Cast, InList, Like},
    Expr, Operator,
};

use super::types::{quote_ident, ColumnKind, PgType};

/// An escape-string literal (`E'...'`): means the same whatever `standard_conforming_strings`
/// is. `None` for strings PostgreSQL cannot hold (NUL).
fn quote_str(s: &str) -> Option<String> {
    if s.contains('\0') {
        return None;
    }
    Some(format!(
        "E'{}'",
        s.replace('\\', "\\\\").replace('\'', "''")
    ))
}

/// Where a translated value comes from: the float rules depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A column, possibly under a lossless cast.
    Column,
    /// A literal on which both engines agree (not a float zero, infinity or NaN).
    Literal,
    /// A float literal of 0, -0, ±infinity or NaN.
    SpecialFloat,
    /// A typed NULL.
    Null,
}

/// A translated value expression.
#[derive(Debug, Clone)]
struct Val {
    sql: String,
    ty: PgType,
    origin: Origin,
}

/// Formats microseconds since the Unix epoch as PostgreSQL input, for years 1 to 9999 (where
/// chrono's and PostgreSQL's notations agree).
fn timestamp_text(micros: i64) -> Option<String> {
    use chrono::Datelike;
    let t = chrono::DateTime::from_timestamp_micros(micros)?;
    if !(1..=9999).contains(&t.year()) {
        return None;
    }
    Some(t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
}

/// A literal as SQL, or `None` if it has no exact PostgreSQL counterpart.
fn literal(value: &ScalarValue) -> Option<Val> {
    use ScalarValue as S;
    let typed = |text: String, ty: PgType| {
        Some(Val {
            sql: format!("'{text}'::{}", ty.name()),
            ty,
            origin: Origin::Literal,
        })
    };
    let null = |ty: PgType| {
        Some(Val {
            sql: format!("NULL::{}", ty.name()),
            ty,
            origin: Origin::Null,
        })
    };
    let float = |v: f64, text: String, ty: PgType| {
        let origin = if v == 0.0 || !v.is_finite() {
            Origin::SpecialFloat
        } else {
            Origin::Literal
        };
        Some(Val {
            sql: format!("'{text}'::{}", ty.name()),
            ty,
            origin,
        })
    };
    let text = |s: &str| {
        Some(Val {
            sql: quote_str(s)?,
            ty: PgType::Text,
            origin: Origin::Literal,
        })
    };
    let bytes = |b: &[u8]| {
        let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
        Some(Val {
            sql: format!("E'\\\\x{hex}'::bytea"),
            ty: PgType::Bytea,
            origin: Origin::Literal,
        })
    };
    let timestamp = |micros: Option<i64>, tz: &Option<Arc<str>>| {
        let ty = if tz.is_some() {
            PgType::Timestamptz
        } else {
            PgType::Timestamp
        };
        match micros {
            None => null(ty),
            Some(m) => {
                let text = timestamp_text(m)?;
                // The value is an instant in UTC whatever zone the type names.
                let suffix = if tz.is_some() { "+00" } else { "" };
                typed(format!("{text}{suffix}"), ty)
            }
        }
    };
    match value {
        S::Boolean(Some(b)) => Some(Val {
            sql: if *b { "TRUE" } else { "FALSE" }.to_owned(),
            ty: PgType::Bool,
            origin: Origin::Literal,
        }),
        S::Boolean(None) => null(PgType::Bool),
        S::Int16(v) => v.map_or_else(
            || null(PgType::Int2),
            |v| typed(v.to_string(), PgType::Int2),
        ),
        S::Int32(v) => v.map_or_else(
            || null(PgType::Int4),
            |v| typed(v.to_string(), PgType::Int4),
        ),
        S::Int64(v) => v.map_or_else(
            || null(PgType::Int8),
            |v| typed(v.to_string(), PgType::Int8),
        ),
        // `{:?}` is the shortest text that reads back as the same float.
        S::Float32(v) => v.map_or_else(
            || null(PgType::Float4),
            |v| float(f64::from(v), format!("{v:?}"), PgType::Float4),
        ),
        S::Float64(v) => v.map_or_else(
            || null(PgType::Float8),
            |v| float(v, format!("{v:?}"), PgType::Float8),
        ),
        S::Utf8(v) | S::LargeUtf8(v) | S::Utf8View(v) => {
            v.as_deref().map_or_else(|| null(PgType::Text), text)
        }
        S::Binary(v) | S::LargeBinary(v) | S::BinaryView(v) => {
            v.as_deref().map_or_else(|| null(PgType::Bytea), bytes)
        }
        S::Date32(v) => match v {
            None => null(PgType::Date),
            Some(days) => {
                let t = timestamp_text(i64::from(*days).checked_mul(86_400_000_000)?)?;
                typed(t.get(..10)?.to_owned(), PgType::Date)
            }
        },
        S::TimestampSecond(v, tz) => timestamp(to_micros(*v, |s| s.checked_mul(1_000_000))?, tz),
        S::TimestampMillisecond(v, tz) => timestamp(to_micros(*v, |ms| ms.checked_mul(1_000))?, tz),
        S::TimestampMicrosecond(v, tz) => timestamp(*v, tz),
        // Only whole microseconds: PostgreSQL would round the rest.
        S::TimestampNanosecond(v, tz) => timestamp(
            to_micros(*v, |ns| (ns % 1_000 == 0).then_some(ns / 1_000))?,
            tz,
        ),
        _ => None,
    }
}

/// A timestamp literal's value in microseconds: `Some(None)` for NULL, `None` when `convert`
/// finds no exact microsecond value.
fn to_micros(v: Option<i64>, convert: impl FnOnce(i64) -> Option<i64>) -> Option<Option<i64>> {
    match v {
        None => Some(None),
        Some(v) => convert(v).map(Some),
    }
}

/// Translates DataFusion filter expressions to PostgreSQL SQL over one table's columns.
pub(super) struct Translator<'a> {
    pub(super) schema: &'a Schema,
    pub(super) kinds: &'a [ColumnKind],
}

impl Translator<'_> {
    /// A value (column, lossless cast of a column, literal).
    fn value(&self, e: &Expr) -> Option<Val> {
        match e {
            Expr::Column(c) => {
                let idx = self.schema.index_of(&c.name).ok()?;
                let kind = self.kinds.get(idx)?;
                if !kind.filterable() {
                    return None;
                }
                Some(Val {
                    sql: format!("({}::{})", quote_ident(&c.name), kind.pg.name()),
                    ty: kind.pg,
                    origin: Origin::Column,
                })
            }
            Expr::Literal(v, _) => literal(v),
            Expr::Cast(Cast { expr, field }) => {
                let inner = self.value(expr)?;
                if inner.origin != Origin::Column {
                    return None;
                }
                let target = ColumnKind::of(field.data_type())?;
                if !target.filterable() || !lossless_cast(inner.ty, target.pg) {
                    return None;
                }
                Some(Val {
                    sql: format!("({}::{})", inner.sql, target.pg.name()),
                    ty: target.pg,
                    origin: Origin::Column,
                })
            }
            _ => None,
        }
    }

    /// A boolean expression, or `None` if PostgreSQL would not answer it exactly as DataFusion.
    pub(super) fn predicate(&self, e: &Expr) -> Option<String> {
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::And | Operator::Or => {
                    let word = if *op == Operator::And { "AND" } else { "OR" };
                    Some(format!(
                        "({} {word} {})",
                        self.predicate(left)?,
                        self.predicate(right)?
                    ))
                }
                _ => self.comparison(left, *op, right),
            },
            Expr::Not(inner) => Some(format!("(NOT {})", self.predicate(inner)?)),
            Expr::IsNull(inner) => Some(format!("({} IS NULL)", self.operand(inner)?)),
            Expr::IsNotNull(inner) => Some(format!("({} IS NOT NULL)", self.operand(inner)?)),
            Expr::IsTrue(inner) => Some(format!("({} IS TRUE)", self.predicate(inner)?)),
            Expr::IsFalse(inner) => Some(format!("({} IS FALSE)", self.predicate(inner)?)),
            Expr::IsUnknown(inner) => Some(format!("({} IS UNKNOWN)", self.predicate(inner)?)),
            Expr::IsNotTrue(inner) => Some(format!("({} IS NOT TRUE)", self.predicate(inner)?)),
            Expr::IsNotFalse(inner) => Some(format!("({} IS NOT FALSE)", self.predicate(inner)?)),
            Expr::IsNotUnknown(inner) => {
                Some(format!("({} IS NOT UNKNOWN)", self.predicate(inner)?))
            }
            Expr::Between(Between {
                expr,
                negated,
                low,
                high,
            }) => {
                let v = self.value(expr)?;
                let lo = self.value(low)?;
                let hi = self.value(high)?;
                if !comparable(&v, &lo) || !comparable(&v, &hi) {
                    return None;
                }
                let not = if *negated { "NOT " } else { "" };
                Some(format!(
                    "({}{} {not}BETWEEN {} AND {})",
                    v.sql,
                    collate(v.ty),
                    lo.sql,
                    hi.sql
                ))
            }
            Expr::InList(InList {
                expr,
                list,
                negated,
            }) => {
                let v = self.value(expr)?;
                if list.is_empty() {
                    return None;
                }
                let mut items = Vec::with_capacity(list.len());
                for item in list {
                    let item = self.value(item)?;
                    if item.origin == Origin::Column || !comparable(&v, &item) {
                        return None;
                    }
                    items.push(item.sql);
                }
                let not = if *negated { "NOT " } else { "" };
                Some(format!("({} {not}IN ({}))", v.sql, items.join(", ")))
            }
            Expr::Like(Like {
                negated,
                expr,
                pattern,
                escape_char,
                case_insensitive,
            }) => {
                // ILIKE folds case by locale in PostgreSQL, by Unicode in Arrow.
                if *case_insensitive || !matches!(escape_char, None | Some('\\')) {
                    return None;
                }
                let v = self.value(expr)?;
                let Expr::Literal(p, _) = pattern.as_ref() else {
                    return None;
                };
                let p = match p {
                    ScalarValue::Utf8(Some(p))
                    | ScalarValue::LargeUtf8(Some(p))
                    | ScalarValue::Utf8View(Some(p)) => p,
                    _ => return None,
                };
                // PostgreSQL rejects a trailing escape, Arrow matches a backslash.
                if v.ty != PgType::Text || ends_with_escape(p) {
                    return None;
                }
                let not = if *negated { "NOT " } else { "" };
                Some(format!("({} {not}LIKE {})", v.sql, quote_str(p)?))
            }
            Expr::Column(_) | Expr::Literal(..) => {
                let v = self.value(e)?;
                (v.ty == PgType::Bool).then_some(v.sql)
            }
            _ => None,
        }
    }

    /// The operand of `IS [NOT] NULL`: a value or a predicate.
    fn operand(&self, e: &Expr) -> Option<String> {
        self.value(e).map(|v| v.sql).or_else(|| self.predicate(e))
    }

    fn comparison(&self, left: &Expr, op: Operator, right: &Expr) -> Option<String> {
        let sql_op = match op {
            Operator::Eq => "=",
            Operator::NotEq => "<>",
            Operator::Lt => "<",
            Operator::LtEq => "<=",
            Operator::Gt => ">",
            Operator::GtEq => ">=",
            Operator::IsDistinctFrom => "IS DISTINCT FROM",
            Operator::IsNotDistinctFrom => "IS NOT DISTINCT FROM",
            _ => return None,
        };
        let l = self.value(left)?;
        let r = self.value(right)?;
        if !comparable(&l, &r) {
            return None;
        }
        let ordering = matches!(
            op,
            Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
        );
        let collation = if ordering { collate(l.ty) } else { "" };
        Some(format!("({}{collation} {sql_op} {})", l.sql, r.sql))
    }
}

/// Byte order for text, as Arrow compares; nothing for other types.
fn collate(ty: PgType) -> &'static str {
    if ty == PgType::Text {
        " COLLATE \"C\""
    } else {
        ""
    }
}

/// Both sides have the same type, and for floats one is a column and the other a literal both
/// engines order the same way against any value (see the module docs).
fn comparable(a: &Val, b: &Val) -> bool {
    if a.ty != b.ty {
        return false;
    }
    if !a.ty.is_float() {
        return true;
    }
    let safe_literal = |o: Origin| matches!(o, Origin::Literal | Origin::Null);
    (a.origin == Origin::Column && safe_literal(b.origin))
        || (b.origin == Origin::Column && safe_literal(a.origin))
}

/// Casts DataFusion and PostgreSQL compute identically for every value.
fn lossless_cast(from: PgType, to: PgType) -> bool {
    use PgType::*;
    from == to
        || matches!(
            (from, to),
            (Int2, Int4)
                | (Int2, Int8)
                | (Int4, Int8)
                | (Int2, Float8)
                | (Int4, Float8)
                | (Float4, Float8)
        )
}

/// Whether a LIKE pattern ends in an unescaped backslash.
fn ends_with_escape(pattern: &str) -> bool {
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && chars.next().is_none() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{DataType, Field, TimeUnit};
    use datafusion::logical_expr::{col, lit};

    use super::*;
    use crate::query::pg_table::types::TableName;

    fn translator_schema() -> (Schema, Vec<ColumnKind>) {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("score", DataType::Float64, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new(
                "at_ms",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
        ]);
        let kinds = schema
            .fields()
            .iter()
            .map(|f| ColumnKind::of(f.data_type()).unwrap())
            .collect();
        (schema, kinds)
    }

    fn translate(e: &Expr) -> Option<String> {
        let (schema, kinds) = translator_schema();
        Translator {
            schema: &schema,
            kinds: &kinds,
        }
        .predicate(e)
    }

    #[test]
    fn quotes_strings_and_identifiers() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_str("O'Brien").unwrap(), "E'O''Brien'");
        assert_eq!(quote_str("a\\'b").unwrap(), "E'a\\\\''b'");
        assert_eq!(quote_str("nul\0"), None);
        assert_eq!(
            TableName::parse("public.t\"x").sql(),
            "\"public\".\"t\"\"x\""
        );
    }

    #[test]
    fn translates_comparisons_and_logic() {
        let e = col("id").gt(lit(5i64)).and(col("name").eq(lit("O'Brien")));
        assert_eq!(
            translate(&e).unwrap(),
            "(((\"id\"::int8) > '5'::int8) AND ((\"name\"::text) = E'O''Brien'))"
        );
        let e = col("name").lt(lit("b"));
        assert_eq!(
            translate(&e).unwrap(),
            "((\"name\"::text) COLLATE \"C\" < E'b')"
        );
        let e = col("id").in_list(vec![lit(1i64), lit(2i64)], true);
        assert_eq!(
            translate(&e).unwrap(),
            "((\"id\"::int8) NOT IN ('1'::int8, '2'::int8))"
        );
        let e = col("name")
            .is_null()
            .or(Expr::Not(Box::new(col("id").between(lit(1i64), lit(3i64)))));
        assert!(translate(&e).is_some());
    }

    #[test]
    fn refuses_what_postgres_would_answer_differently() {
        // Float zero: Arrow orders -0.0 before 0.0, PostgreSQL calls them equal.
        assert_eq!(translate(&col("score").gt_eq(lit(0.0f64))), None);
        assert_eq!(translate(&col("score").eq(lit(f64::NAN))), None);
        assert!(translate(&col("score").gt_eq(lit(0.5f64))).is_some());
        // Mixed types (DataFusion would have cast one side).
        assert_eq!(translate(&col("id").eq(lit(5i32))), None);
        // Coarser timestamps than PostgreSQL's.
        assert_eq!(
            translate(&col("at_ms").is_null()),
            None,
            "non-microsecond timestamp columns stay in DataFusion"
        );
        // ILIKE and trailing escapes.
        assert_eq!(translate(&col("name").ilike(lit("a%"))), None);
        assert_eq!(translate(&col("name").like(lit("a\\"))), None);
        assert!(translate(&col("name").like(lit("a\\%%"))).is_some());
        // Functions.
        assert_eq!(
            translate(&datafusion::functions::expr_fn::upper(col("name")).eq(lit("X"))),
            None
        );
    }

    #[test]
    fn formats_timestamp_literals_in_utc() {
        // 2024-03-01T12:34:56.789012Z
        let micros = 1_709_296_496_789_012;
        let v = literal(&ScalarValue::TimestampMicrosecond(
            Some(micros),
            Some("Europe/Berlin".into()),
        ))
        .unwrap();
        assert_eq!(v.sql, "'2024-03-01 12:34:56.789012+00'::timestamptz");
        let v = literal(&ScalarValue::TimestampNanosecond(
            Some(micros * 1000 + 1),
            None,
        ));
        assert!(v.is_none(), "sub-microsecond literals are not exact");
        let v = literal(&ScalarValue::Date32(Some(19_783))).unwrap();
        assert_eq!(v.sql, "'2024-03-01'::date");
    }
}
