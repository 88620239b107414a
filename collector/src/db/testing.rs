//! Throwaway PostgreSQL databases for tests: each test gets a database of its own on
//! the server named by `WEILAN_TEST_POSTGRES` (default: the local server's socket,
//! as the user running the tests), dropped again when the test ends. `.ci/run`
//! installs and starts that server; without one a test says `SKIPPED` and passes.

use std::sync::atomic::{AtomicU32, Ordering};

/// The server tests use: `WEILAN_TEST_POSTGRES`, else the local socket.
pub fn server_url() -> String {
    std::env::var("WEILAN_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgresql://%2Fvar%2Frun%2Fpostgresql/postgres".to_string())
}

/// A database that exists for this value's life.
pub struct TempDatabase {
    name: String,
    server: String,
    url: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl TempDatabase {
    /// A new empty database, or `None` (after printing `SKIPPED: <why>`) when no
    /// server answers. With `WEILAN_REQUIRE_POSTGRES=1` (CI) a missing server fails.
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
        let name = format!(
            "weilan_test_{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            jiff::Timestamp::now().as_millisecond() % 1_000_000
        );
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {server}: {e}"));
        let url = with_database(&server, &name);
        Some(TempDatabase { name, server, url })
    }

    /// The connection string of this database.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn location(&self) -> super::Location {
        super::Location::Postgres(self.url.clone())
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// `server` (a `postgresql://host/db?…` URL) naming database `name` instead.
fn with_database(server: &str, name: &str) -> String {
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
