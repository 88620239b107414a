//! One interface over the collector's two storage engines (issue "Beyond one box"):
//! SQLite, embedded, the default for a quickstart and small sites; PostgreSQL for
//! fleets, shared by several collectors.
//!
//! Statements are written once in the SQL both engines accept, with SQLite's `?N`
//! placeholders (rewritten to `$N` for PostgreSQL, [`sql::to_postgres`]); where the
//! dialects differ a caller asks [`Sql::engine`]. Parameters and columns are the types
//! both store the same way ([`value`]): 64-bit integers, text, bytes. Statements are
//! prepared once per connection on both engines.
//!
//! Both engines are driven synchronously (rusqlite; the `postgres` client, which runs
//! tokio-postgres on its own small runtime) from the threads that already do the
//! storage work: the ingest writer and the command line, never an async task.

pub mod sql;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod value;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use postgres::GenericClient;

pub use crate::db_params as params;
pub use value::{Column, Param, Value};
use value::{ForPostgres, ForSqlite};

/// Which engine a connection talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Where the database is: a SQLite file, or a PostgreSQL connection string
/// (`postgresql://user@host/db` or `host=… dbname=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// A `postgres://` or `postgresql://` URL is PostgreSQL; anything else is a path.
    pub fn parse(text: &str) -> Location {
        if text.starts_with("postgresql://") || text.starts_with("postgres://") {
            Location::Postgres(text.to_string())
        } else {
            Location::Sqlite(PathBuf::from(text))
        }
    }

    /// The collector's database: `store.url` if set, else the file `store.path`.
    pub fn of(settings: &weilan_config::settings::collector::CollectorSettings) -> Location {
        match &settings.store_url {
            Some(url) => Location::Postgres(url.clone()),
            None => Location::Sqlite(settings.store_path.clone()),
        }
    }

    pub fn engine(&self) -> Engine {
        match self {
            Location::Sqlite(_) => Engine::Sqlite,
            Location::Postgres(_) => Engine::Postgres,
        }
    }
}

impl std::fmt::Display for Location {
    /// The path, or the connection string without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&without_password(url)),
        }
    }
}

fn without_password(url: &str) -> String {
    let Some(rest) = url.split_once("://").map(|(_, r)| r) else {
        return url.to_string();
    };
    let scheme = &url[..url.len() - rest.len()];
    match rest.split_once('@') {
        Some((user, host)) if user.contains(':') => {
            format!(
                "{scheme}{}:***@{host}",
                user.split(':').next().unwrap_or("")
            )
        }
        _ => url.to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("the query returned no row")]
    NoRow,
    #[error("column {index}: {reason}")]
    Column { index: usize, reason: String },
    #[error("{0}")]
    Misuse(&'static str),
}

/// PostgreSQL's own message (with its detail) rather than the client's "db error".
fn postgres_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        },
        None => e.to_string(),
    }
}

impl Error {
    /// A unique or primary key was violated.
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Error::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            }
            Error::Postgres(e) => e.code() == Some(&postgres::error::SqlState::UNIQUE_VIOLATION),
            _ => false,
        }
    }
}

/// PostgreSQL statements prepared on one connection, by their SQLite-form text.
type Prepared = RefCell<HashMap<String, postgres::Statement>>;

/// One connection.
pub struct Conn {
    inner: ConnInner,
}

enum ConnInner {
    Sqlite(rusqlite::Connection),
    Postgres(PgConn),
}

/// A PostgreSQL connection that may be dropped anywhere: the client closes its
/// connection by blocking on a runtime of its own, which panics on a tokio worker
/// thread (a collector stopping on PostgreSQL panicked as it dropped its store).
struct PgConn(Option<Box<Pg<postgres::Client, Prepared>>>);

impl std::ops::Deref for PgConn {
    type Target = Pg<postgres::Client, Prepared>;
    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("taken only by drop")
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("taken only by drop")
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        let pg = self.0.take();
        let on_async_worker = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_async_worker {
            tokio::task::block_in_place(move || drop(pg));
        }
    }
}

/// Statements kept prepared per SQLite connection (the rules engine and ingest use
/// a few dozen; rusqlite's default keeps 16).
const SQLITE_STATEMENT_CACHE: usize = 256;

impl Conn {
    /// Opens (SQLite: creates) the database. Engine settings and migrations are the
    /// caller's ([`crate::store::Store::open`]).
    pub fn open(location: &Location) -> Result<Conn, Error> {
        match location {
            Location::Sqlite(path) => Ok(Conn::from_sqlite(rusqlite::Connection::open(path)?)),
            Location::Postgres(url) => {
                let client = postgres::Client::connect(url, postgres::NoTls)?;
                Ok(Conn {
                    inner: ConnInner::Postgres(PgConn(Some(Box::new(Pg {
                        client: RefCell::new(client),
                        prepared: RefCell::default(),
                    })))),
                })
            }
        }
    }

    /// Opens for reading only (SQLite: the file must exist and is never written).
    pub fn open_read_only(location: &Location) -> Result<Conn, Error> {
        match location {
            Location::Sqlite(path) => Ok(Conn::from_sqlite(rusqlite::Connection::open_with_flags(
                path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )?)),
            Location::Postgres(_) => Conn::open(location),
        }
    }

    pub fn from_sqlite(conn: rusqlite::Connection) -> Conn {
        conn.set_prepared_statement_cache_capacity(SQLITE_STATEMENT_CACHE);
        Conn {
            inner: ConnInner::Sqlite(conn),
        }
    }

    /// The SQLite connection, for what only SQLite has (pragmas, checkpoints).
    pub fn sqlite(&self) -> Option<&rusqlite::Connection> {
        match &self.inner {
            ConnInner::Sqlite(c) => Some(c),
            ConnInner::Postgres(_) => None,
        }
    }

    /// A write transaction. SQLite: `IMMEDIATE`, so it takes the write lock before
    /// its first read (a deferred one that reads, then writes, fails at once when
    /// another connection committed in between). PostgreSQL: read committed.
    pub fn transaction(&mut self) -> Result<Tx<'_>, Error> {
        self.begin(rusqlite::TransactionBehavior::Immediate, |c| {
            c.transaction()
        })
    }

    /// A read-only transaction that sees one snapshot throughout (an export reads
    /// millions of rows while ingest goes on).
    pub fn snapshot(&mut self) -> Result<Tx<'_>, Error> {
        self.begin(rusqlite::TransactionBehavior::Deferred, |c| {
            c.build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
        })
    }

    fn begin<'c>(
        &'c mut self,
        sqlite: rusqlite::TransactionBehavior,
        postgres: impl FnOnce(
            &'c mut postgres::Client,
        ) -> Result<postgres::Transaction<'c>, postgres::Error>,
    ) -> Result<Tx<'c>, Error> {
        Ok(Tx {
            inner: match &mut self.inner {
                ConnInner::Sqlite(c) => TxInner::Sqlite(c.transaction_with_behavior(sqlite)?),
                ConnInner::Postgres(pg) => {
                    let Pg { client, prepared } = &mut **pg;
                    TxInner::Postgres(Pg {
                        client: RefCell::new(postgres(client.get_mut())?),
                        prepared,
                    })
                }
            },
        })
    }
}

/// One transaction; rolled back when dropped without [`Tx::commit`].
pub struct Tx<'c> {
    inner: TxInner<'c>,
}

enum TxInner<'c> {
    Sqlite(rusqlite::Transaction<'c>),
    Postgres(Pg<postgres::Transaction<'c>, &'c Prepared>),
}

impl Tx<'_> {
    pub fn commit(self) -> Result<(), Error> {
        match self.inner {
            TxInner::Sqlite(tx) => tx.commit()?,
            TxInner::Postgres(pg) => pg.client.into_inner().commit()?,
        }
        Ok(())
    }

    /// The SQLite transaction, for what only SQLite has.
    pub fn sqlite(&self) -> Option<&rusqlite::Transaction<'_>> {
        match &self.inner {
            TxInner::Sqlite(tx) => Some(tx),
            TxInner::Postgres(_) => None,
        }
    }
}

/// A row of either engine; columns by index.
pub enum Row<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r postgres::Row),
}

impl Row<'_> {
    pub fn get<T: Column>(&self, idx: usize) -> Result<T, Error> {
        match self {
            Row::Sqlite(r) => T::from_sqlite(r, idx),
            Row::Postgres(r) => T::from_postgres(r, idx),
        }
    }
}

/// What a statement runs on.
#[doc(hidden)]
pub enum Target<'a> {
    Sqlite(&'a rusqlite::Connection),
    Postgres(&'a dyn PgOps),
}

/// The PostgreSQL operations, on a client or inside a transaction (one object type
/// for both: the `postgres` crate's own trait for them is not object safe).
#[doc(hidden)]
pub trait PgOps {
    fn execute(&self, sql: &str, params: &[&dyn Param]) -> Result<u64, Error>;
    fn batch(&self, sql: &str) -> Result<(), Error>;
    fn query(&self, sql: &str, params: &[&dyn Param]) -> Result<Vec<postgres::Row>, Error>;
    fn pages(
        &self,
        sql: &str,
        params: &[&dyn Param],
        page: &mut dyn FnMut(Vec<postgres::Row>) -> Result<bool, Error>,
    ) -> Result<(), Error>;
}

/// Reading a query's rows a page at a time, with other statements in between: a
/// portal, which only a transaction has.
#[doc(hidden)]
pub trait Portals {
    fn portal(
        &mut self,
        st: &postgres::Statement,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<postgres::Portal, Error>;
    fn fetch(&mut self, portal: &postgres::Portal, rows: i32) -> Result<Vec<postgres::Row>, Error>;
}

impl Portals for postgres::Transaction<'_> {
    fn portal(
        &mut self,
        st: &postgres::Statement,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<postgres::Portal, Error> {
        Ok(self.bind(st, params)?)
    }
    fn fetch(&mut self, portal: &postgres::Portal, rows: i32) -> Result<Vec<postgres::Row>, Error> {
        Ok(self.query_portal(portal, rows)?)
    }
}

impl Portals for postgres::Client {
    fn portal(
        &mut self,
        _: &postgres::Statement,
        _: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<postgres::Portal, Error> {
        Err(Error::Misuse(
            "a paged read needs a transaction (Conn::snapshot)",
        ))
    }
    fn fetch(&mut self, _: &postgres::Portal, _: i32) -> Result<Vec<postgres::Row>, Error> {
        Err(Error::Misuse(
            "a paged read needs a transaction (Conn::snapshot)",
        ))
    }
}

/// Rows fetched per page of [`Sql::stream`] on PostgreSQL.
const PAGE_ROWS: i32 = 1024;

/// A PostgreSQL client or transaction with the statements prepared on its connection.
struct Pg<C, P> {
    client: RefCell<C>,
    prepared: P,
}

impl<C: GenericClient + Portals, P: std::borrow::Borrow<Prepared>> PgOps for Pg<C, P> {
    fn execute(&self, sql: &str, params: &[&dyn Param]) -> Result<u64, Error> {
        let c = &mut *self.client.borrow_mut();
        let st = pg_statement(c, self.prepared.borrow(), sql)?;
        let values = pg_values(params);
        Ok(c.execute(&st, &pg_refs(&values))?)
    }

    fn batch(&self, sql: &str) -> Result<(), Error> {
        Ok(self.client.borrow_mut().batch_execute(sql)?)
    }

    fn query(&self, sql: &str, params: &[&dyn Param]) -> Result<Vec<postgres::Row>, Error> {
        let c = &mut *self.client.borrow_mut();
        let st = pg_statement(c, self.prepared.borrow(), sql)?;
        let values = pg_values(params);
        Ok(c.query(&st, &pg_refs(&values))?)
    }

    fn pages(
        &self,
        sql: &str,
        params: &[&dyn Param],
        page: &mut dyn FnMut(Vec<postgres::Row>) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        let portal = {
            let c = &mut *self.client.borrow_mut();
            let st = pg_statement(c, self.prepared.borrow(), sql)?;
            let values = pg_values(params);
            c.portal(&st, &pg_refs(&values))?
        };
        loop {
            // The borrow ends before `page` runs: it may run statements itself.
            let rows = self.client.borrow_mut().fetch(&portal, PAGE_ROWS)?;
            let last = rows.len() < PAGE_ROWS as usize;
            if !page(rows)? || last {
                return Ok(());
            }
        }
    }
}

fn pg_statement<C: GenericClient>(
    c: &mut C,
    prepared: &Prepared,
    sql: &str,
) -> Result<postgres::Statement, Error> {
    if let Some(st) = prepared.borrow().get(sql) {
        return Ok(st.clone());
    }
    let st = c.prepare(&sql::to_postgres(sql))?;
    prepared.borrow_mut().insert(sql.to_string(), st.clone());
    Ok(st)
}

fn pg_values<'p>(params: &'p [&'p dyn Param]) -> Vec<ForPostgres<'p>> {
    params.iter().map(|p| ForPostgres(p.value())).collect()
}

fn pg_refs<'v>(values: &'v [ForPostgres<'v>]) -> Vec<&'v (dyn postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

fn sqlite_params<'p>(
    params: &'p [&'p dyn Param],
) -> rusqlite::ParamsFromIter<impl Iterator<Item = ForSqlite<'p>>> {
    rusqlite::params_from_iter(params.iter().map(|p| ForSqlite(*p)))
}

/// Statements, on a connection or inside a transaction.
pub trait Sql {
    #[doc(hidden)]
    fn target(&self) -> Target<'_>;

    fn engine(&self) -> Engine {
        match self.target() {
            Target::Sqlite(_) => Engine::Sqlite,
            Target::Postgres(_) => Engine::Postgres,
        }
    }

    /// `sqlite` on SQLite, `postgres` on PostgreSQL: for the few statements whose
    /// dialects differ.
    fn pick<'s>(&self, sqlite: &'s str, postgres: &'s str) -> &'s str {
        match self.engine() {
            Engine::Sqlite => sqlite,
            Engine::Postgres => postgres,
        }
    }

    /// Runs one statement; the number of rows it changed.
    fn execute(&self, sql: &str, params: &[&dyn Param]) -> Result<u64, Error> {
        match self.target() {
            Target::Sqlite(c) => Ok(c.prepare_cached(sql)?.execute(sqlite_params(params))? as u64),
            Target::Postgres(pg) => pg.execute(sql, params),
        }
    }

    /// Runs statements separated by `;`, without parameters (schema changes).
    fn execute_batch(&self, sql: &str) -> Result<(), Error> {
        match self.target() {
            Target::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Target::Postgres(pg) => pg.batch(sql),
        }
    }

    /// Each row mapped by `map` and then handed to `each`, in order, until `each`
    /// returns `false`. `each` may run statements on the same connection (an export merges heartbeat blocks into the rows it reads).
    /// On PostgreSQL this needs a transaction; rows come a page at a time.
    fn stream<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        mut map: impl FnMut(&Row<'_>) -> Result<T, Error>,
        mut each: impl FnMut(T) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        match self.target() {
            Target::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(sqlite_params(params))?;
                while let Some(r) = rows.next()? {
                    if !each(map(&Row::Sqlite(r))?)? {
                        break;
                    }
                }
                Ok(())
            }
            Target::Postgres(pg) => pg.pages(sql, params, &mut |rows| {
                for r in &rows {
                    if !each(map(&Row::Postgres(r))?)? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }),
        }
    }

    /// Every row, each mapped by `f`.
    fn query_map<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        mut f: impl FnMut(&Row<'_>) -> Result<T, Error>,
    ) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        match self.target() {
            Target::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(sqlite_params(params))?;
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
            }
            Target::Postgres(pg) => {
                for r in pg.query(sql, params)? {
                    out.push(f(&Row::Postgres(&r))?);
                }
            }
        }
        Ok(out)
    }

    /// The first row mapped by `f`, if there is one.
    fn query_opt<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row<'_>) -> Result<T, Error>,
    ) -> Result<Option<T>, Error> {
        match self.target() {
            Target::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let mut rows = st.query(sqlite_params(params))?;
                match rows.next()? {
                    Some(r) => Ok(Some(f(&Row::Sqlite(r))?)),
                    None => Ok(None),
                }
            }
            Target::Postgres(pg) => match pg.query(sql, params)?.first() {
                Some(r) => Ok(Some(f(&Row::Postgres(r))?)),
                None => Ok(None),
            },
        }
    }

    /// The first row mapped by `f`; [`Error::NoRow`] when there is none.
    fn query_row<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: impl FnOnce(&Row<'_>) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.query_opt(sql, params, f)?.ok_or(Error::NoRow)
    }

    /// Whether the query returns any row.
    fn exists(&self, sql: &str, params: &[&dyn Param]) -> Result<bool, Error> {
        Ok(self.query_opt(sql, params, |_| Ok(()))?.is_some())
    }
}

impl Sql for Conn {
    fn target(&self) -> Target<'_> {
        match &self.inner {
            ConnInner::Sqlite(c) => Target::Sqlite(c),
            ConnInner::Postgres(pg) => Target::Postgres(&**pg),
        }
    }
}

impl Sql for Tx<'_> {
    fn target(&self) -> Target<'_> {
        match &self.inner {
            TxInner::Sqlite(tx) => Target::Sqlite(tx),
            TxInner::Postgres(pg) => Target::Postgres(pg),
        }
    }
}

#[cfg(test)]
mod tests;
