//! Statement parameters and column values that mean the same on both engines: 64-bit
//! integers, text, bytes and NULL (PostgreSQL columns are `BIGINT`, `TEXT`, `BYTEA`).

use postgres::types::{to_sql_checked, IsNull, ToSql, Type};

use super::Error;

/// One parameter's value, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// Anything bound to a placeholder.
pub trait Param {
    fn value(&self) -> Value<'_>;
}

macro_rules! int_param {
    ($($t:ty),*) => {$(
        impl Param for $t {
            fn value(&self) -> Value<'_> {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_param!(i64, i32, u32, u16, u8, usize);

impl Param for u64 {
    fn value(&self) -> Value<'_> {
        // Sequence numbers and serials are far below 2^63; one above it is stored
        // as the largest integer rather than wrapping negative.
        Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl Param for bool {
    fn value(&self) -> Value<'_> {
        Value::Int(i64::from(*self))
    }
}

impl Param for f64 {
    fn value(&self) -> Value<'_> {
        Value::Real(*self)
    }
}

impl Param for str {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl Param for String {
    fn value(&self) -> Value<'_> {
        Value::Text(self)
    }
}

impl Param for [u8] {
    fn value(&self) -> Value<'_> {
        Value::Bytes(self)
    }
}

impl Param for Vec<u8> {
    fn value(&self) -> Value<'_> {
        Value::Bytes(self)
    }
}

impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value<'_> {
        (**self).value()
    }
}

impl<T: Param> Param for Option<T> {
    fn value(&self) -> Value<'_> {
        match self {
            Some(v) => v.value(),
            None => Value::Null,
        }
    }
}

/// Parameters as a slice: `params![a, b, c]`.
#[macro_export]
macro_rules! db_params {
    () => { &[] as &[&dyn $crate::db::Param] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::db::Param),+] as &[&dyn $crate::db::Param] };
}

/// A parameter for rusqlite.
pub(super) struct ForSqlite<'a>(pub &'a dyn Param);

impl rusqlite::ToSql for ForSqlite<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self.0.value() {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(i),
            Value::Real(f) => ValueRef::Real(f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Bytes(b) => ValueRef::Blob(b),
        }))
    }
}

/// A parameter for PostgreSQL, converted to the type the server inferred for its
/// placeholder (an integer into `BIGINT`, `INTEGER` or `BOOLEAN`; text into `TEXT`).
#[derive(Debug)]
pub(super) struct ForPostgres<'a>(pub Value<'a>);

impl ToSql for ForPostgres<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT4 => i32::try_from(i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(i)?.to_sql(ty, out),
                Type::BOOL => (i != 0).to_sql(ty, out),
                Type::FLOAT8 => (i as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => i.to_sql(ty, out),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT4 => (f as f32).to_sql(ty, out),
                _ => f.to_sql(ty, out),
            },
            Value::Text(s) => s.to_sql(ty, out),
            Value::Bytes(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A column read from a row of either engine.
pub trait Column: Sized {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error>;
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error>;
}

fn pg_int(row: &postgres::Row, idx: usize) -> Result<Option<i64>, Error> {
    let ty = row
        .columns()
        .get(idx)
        .map(|c| c.type_().clone())
        .ok_or(Error::Column {
            index: idx,
            reason: "no such column".into(),
        })?;
    Ok(match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(idx)?,
        Type::INT4 => row.try_get::<_, Option<i32>>(idx)?.map(i64::from),
        Type::INT2 => row.try_get::<_, Option<i16>>(idx)?.map(i64::from),
        Type::BOOL => row.try_get::<_, Option<bool>>(idx)?.map(i64::from),
        other => {
            return Err(Error::Column {
                index: idx,
                reason: format!("an integer was read from a {other} column"),
            })
        }
    })
}

impl Column for Option<i64> {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        pg_int(row, idx)
    }
}

fn required<T>(v: Option<T>, idx: usize) -> Result<T, Error> {
    v.ok_or(Error::Column {
        index: idx,
        reason: "NULL where a value was expected".into(),
    })
}

impl Column for i64 {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        required(pg_int(row, idx)?, idx)
    }
}

impl Column for bool {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        Ok(required(pg_int(row, idx)?, idx)? != 0)
    }
}

impl Column for f64 {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        Ok(row.try_get(idx)?)
    }
}

impl Column for Option<String> {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        Ok(row.try_get(idx)?)
    }
}

impl Column for String {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        Ok(row.try_get(idx)?)
    }
}

impl Column for Option<Vec<u8>> {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        Ok(row.try_get(idx)?)
    }
}

impl Column for Vec<u8> {
    fn from_sqlite(row: &rusqlite::Row<'_>, idx: usize) -> Result<Self, Error> {
        Ok(row.get(idx)?)
    }
    fn from_postgres(row: &postgres::Row, idx: usize) -> Result<Self, Error> {
        Ok(row.try_get(idx)?)
    }
}
