//! The PostgreSQL steps of docs/deployment.md ("PostgreSQL for a fleet"), run as
//! written against the test machine's server (`.ci/run` starts it): the documented
//! commands create the database, the collector accepts it and makes its schema there,
//! and the documented settings name it. A database the collector cannot use (not
//! byte-ordered) is refused with the reason and the fix.

mod common;

use std::process::Command;
use std::str::FromStr;

use common::*;
use weilan_collector::db::testing::{server_url, with_database};
use weilan_collector::store::{Store, StoreError};

/// The fenced block after `<!-- postgres-test: NAME -->` in docs/deployment.md.
fn doc_block(name: &str) -> String {
    common::doc_block(
        "docs/deployment.md",
        &format!("<!-- postgres-test: {name} -->"),
    )
}

/// A superuser connection to the test server, or `None` (SKIPPED) without one.
fn admin() -> Option<postgres::Client> {
    let server = server_url();
    match postgres::Client::connect(&server, postgres::NoTls) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(
                std::env::var_os("WEILAN_REQUIRE_POSTGRES").is_none(),
                "PostgreSQL is required (WEILAN_REQUIRE_POSTGRES) but {server} refused: {e}"
            );
            println!("SKIPPED: no PostgreSQL server at {server}: {e}");
            None
        }
    }
}

#[test]
fn the_documented_database_is_created_and_the_collector_makes_its_schema_there() {
    let Some(mut admin) = admin() else { return };
    if Command::new("su").arg("--version").output().is_err() {
        println!("SKIPPED: no `su` to run the documented commands as `postgres`");
        return;
    }
    // The documented names; a run before this one may have left them.
    admin
        .batch_execute("DROP DATABASE IF EXISTS weilan WITH (FORCE)")
        .unwrap();
    admin.batch_execute("DROP ROLE IF EXISTS weilan").unwrap();
    let shell = doc_block("database");
    let out = Command::new("sh").arg("-ec").arg(&shell).output().unwrap();
    assert!(
        out.status.success(),
        "{shell}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (owner, collate): (String, String) = {
        let row = admin
            .query_one(
                "SELECT pg_get_userbyid(datdba)::text, datcollate::text FROM pg_database WHERE datname = 'weilan'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((owner.as_str(), collate.as_str()), ("weilan", "C"));

    // The documented settings name that database on the local socket, as the
    // service user; this test runs as another user, so it connects as itself.
    let settings = doc_block("settings");
    let table: toml::Table = settings.parse().expect("the documented [store] is TOML");
    let url = table["store"]["url"].as_str().expect("store.url");
    let config = postgres::Config::from_str(url).expect("a PostgreSQL URL");
    assert_eq!(config.get_dbname(), Some("weilan"));
    assert_eq!(config.get_user(), Some("weilan"), "the service user's role");
    let database = with_database(&server_url(), config.get_dbname().unwrap());
    let location = Location::Postgres(database.clone());
    {
        let store = Store::open_at(&location).expect("the collector opens the documented database");
        assert_eq!(store.count_events().unwrap(), 0);
    }
    let version: i64 = admin_on(&database)
        .query_one("SELECT version FROM weilan_schema", &[])
        .unwrap()
        .get(0);
    assert!(version >= 12, "schema made: version {version}");

    // The whole documented [store], with `path` in this test's folder, passes
    // the collector's own check.
    let w = World::new();
    let path_line = format!("path = \"{}\"", w.path("weilan.db").display());
    let store_toml = settings
        .lines()
        .map(|l| {
            if l.starts_with("path =") {
                path_line.as_str()
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let config_path = w.collector_toml(false, "");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let text = text.replacen(
        &format!("[store]\npath = \"weilan.db\"\n{}", w.store_url_line()),
        &format!("{store_toml}\n"),
        1,
    );
    assert!(text.contains(url), "{text}");
    std::fs::write(&config_path, text).unwrap();
    let check = Command::new(weilan_bin())
        .args(["collector", "check-config", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    admin
        .batch_execute("DROP DATABASE IF EXISTS weilan WITH (FORCE)")
        .unwrap();
    admin.batch_execute("DROP ROLE IF EXISTS weilan").unwrap();
}

fn admin_on(url: &str) -> postgres::Client {
    postgres::Client::connect(url, postgres::NoTls).unwrap()
}

#[test]
fn a_database_that_does_not_order_text_bytewise_is_refused_with_the_fix() {
    let Some(mut admin) = admin() else { return };
    let name = format!("weilan_icu_{}", std::process::id());
    // An ICU collation orders 'a' before 'B' while `datcollate` still says C.
    if let Err(e) = admin.batch_execute(&format!(
        "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C' LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
    )) {
        println!("SKIPPED: this server cannot make an ICU database: {e}");
        return;
    }
    let result = Store::open_at(&Location::Postgres(with_database(&server_url(), &name)));
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    match result {
        Err(e @ StoreError::Unusable { .. }) => {
            let text = e.to_string();
            assert!(text.contains("--locale C"), "{text}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a database that orders 'a' before 'B' was accepted"),
    }
}
