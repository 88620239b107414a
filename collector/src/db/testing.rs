//! Throwaway PostgreSQL stores for tests: each test gets a schema of its own in the
//! database `weilan_tests` on the server named by `WEILAN_TEST_POSTGRES` (default: the
//! local server's socket, as the user running the tests), dropped again when the test
//! ends. A schema, not a database per test: creating and dropping a database costs a
//! checkpoint each, about a second a test. `.ci/run` installs and starts the server;
//! without one a test says `SKIPPED` and passes.

use std::sync::atomic::{AtomicU32, Ordering};

/// The server tests use: `WEILAN_TEST_POSTGRES`, else the local socket.
pub fn server_url() -> String {
    std::env::var("WEILAN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgresql://%2Fvar%2Frun%2Fpostgresql/postgres".to_string())
}

/// The database the tests' schemas live in (byte-ordered text, as the collector needs).
const TEST_DATABASE: &str = "weilan_tests";

/// A store (a schema of [`TEST_DATABASE`]) that exists for this value's life.
pub struct TempDatabase {
    schema: String,
    database: String,
    url: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TempDatabase {
    /// A new empty store, or `None` (after printing `SKIPPED: <why>`) when no server
    /// answers. With `WEILAN_REQUIRE_POSTGRES=1` (CI) a missing server fails.
    pub fn create(test: &str) -> Option<TempDatabase> {
        let server = server_url();
        let mut admin = match postgres::Client::connect(&server, postgres::NoTls) {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("WEILAN_REQUIRE_POSTGRES").is_none(),
                    "PostgreSQL is required (WEILAN_REQUIRE_POSTGRES) but {server} refused: {e}"
                );
                println!("SKIPPED: {test}: no PostgreSQL server at {server}: {e}");
                return None;
            }
        };
        // Made by the first test that needs it; tests starting together race for it.
        if let Err(e) = admin.batch_execute(&format!(
            "CREATE DATABASE {TEST_DATABASE} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'"
        )) {
            let made_by_another = e.code().is_some_and(|c| {
                *c == postgres::error::SqlState::DUPLICATE_DATABASE
                    || *c == postgres::error::SqlState::UNIQUE_VIOLATION
            });
            assert!(
                made_by_another,
                "CREATE DATABASE {TEST_DATABASE} on {server}: {e}"
            );
        }
        let schema = format!(
            "t_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            jiff::Timestamp::now().as_millisecond() % 1_000_000
        );
        let database = with_database(&server, TEST_DATABASE);
        postgres::Client::connect(&database, postgres::NoTls)
            .and_then(|mut c| c.batch_execute(&format!("CREATE SCHEMA {schema}")))
            .unwrap_or_else(|e| panic!("CREATE SCHEMA {schema} in {database}: {e}"));
        let separator = if database.contains('?') { '&' } else { '?' };
        let url = format!("{database}{separator}options=-csearch_path%3D{schema}");
        Some(TempDatabase {
            schema,
            database,
            url,
        })
    }

    /// The connection string of this store (its schema first on the search path).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn location(&self) -> super::Location {
        super::Location::Postgres(self.url.clone())
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.database, postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
        }
    }
}

/// `server` (a `postgresql://host/db?…` URL) naming database `name` instead.
pub fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let host_end = rest
        .find('/')
        .map_or(base.len(), |i| base.len() - rest.len() + i);
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// Where a unit test's store goes: a SQLite file in `dir`, or, with
/// `WEILAN_TEST_STORE=postgresql` (CI runs the collector's tests a second time so),
/// a PostgreSQL database of its own, kept while the returned guard lives.
pub fn store_location(dir: &std::path::Path) -> (super::Location, Option<TempDatabase>) {
    match std::env::var("WEILAN_TEST_STORE").as_deref() {
        Ok("postgresql") => {
            let db = TempDatabase::create("store")
                .expect("WEILAN_TEST_STORE=postgresql, but no PostgreSQL server answers");
            (db.location(), Some(db))
        }
        _ => (super::Location::Sqlite(dir.join("db.sqlite")), None),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_database_name_replaces_the_servers() {
        assert_eq!(
            super::with_database("postgresql://%2Fvar%2Frun%2Fpostgresql/postgres", "x"),
            "postgresql://%2Fvar%2Frun%2Fpostgresql/x"
        );
        assert_eq!(
            super::with_database("postgresql://u:p@h:5432?sslmode=disable", "x"),
            "postgresql://u:p@h:5432/x?sslmode=disable"
        );
    }
}
