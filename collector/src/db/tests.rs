//! The same statements on both engines (PostgreSQL: a real server, see `testing`).

use super::testing::TempDatabase;
use super::{params, Conn, Engine, Error, Location, Sql};

const SCHEMA: &str = "CREATE TABLE t (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    note TEXT,
    body BYTEA,
    flag BIGINT NOT NULL DEFAULT 0
)";

/// Runs `check` on a fresh SQLite file and, when a server answers, a fresh
/// PostgreSQL database.
fn on_both(test: &str, check: impl Fn(&mut Conn)) {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = Conn::open(&Location::Sqlite(dir.path().join("t.db"))).unwrap();
    assert_eq!(sqlite.engine(), Engine::Sqlite);
    sqlite
        .execute_batch(&SCHEMA.replace("BYTEA", "BLOB"))
        .unwrap();
    check(&mut sqlite);
    if let Some(db) = TempDatabase::create(test) {
        let mut pg = Conn::open(&db.location()).unwrap();
        assert_eq!(pg.engine(), Engine::Postgres);
        pg.execute_batch(SCHEMA).unwrap();
        check(&mut pg);
    }
}

#[test]
fn values_go_in_and_come_out_the_same_on_both_engines() {
    on_both("values", |conn| {
        let tx = conn.transaction().unwrap();
        let body: Vec<u8> = vec![0, 1, 255];
        let none: Option<String> = None;
        tx.execute(
            "INSERT INTO t (id, name, note, body, flag) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![i64::MAX, "名字", none, body, true],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO t (id, name, note) VALUES (?1, ?2, ?2)",
            params![2u64, "two"],
        )
        .unwrap();
        tx.commit().unwrap();
        let (name, note, got, flag): (String, Option<String>, Vec<u8>, bool) = conn
            .query_row(
                "SELECT name, note, body, flag FROM t WHERE id = ?1",
                params![i64::MAX],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            (name.as_str(), note, got, flag),
            ("名字", None, vec![0, 1, 255], true)
        );
        let note: Option<String> = conn
            .query_row("SELECT note FROM t WHERE id = ?", params![2], |r| r.get(0))
            .unwrap();
        assert_eq!(note.as_deref(), Some("two"));
        // Aggregates come back as integers on both (PostgreSQL's SUM is cast).
        let (count, sum): (i64, i64) = conn
            .query_row(
                "SELECT COUNT(*), CAST(COALESCE(SUM(flag), 0) AS BIGINT) FROM t",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((count, sum), (2, 1));
        assert!(matches!(
            conn.query_row("SELECT id FROM t WHERE id = 3", params![], |r| r
                .get::<i64>(0)),
            Err(Error::NoRow)
        ));
        assert!(conn
            .exists("SELECT 1 FROM t WHERE id = ?1", params![2])
            .unwrap());
        assert!(!conn
            .exists("SELECT 1 FROM t WHERE id = ?1", params![3])
            .unwrap());
    });
}

#[test]
fn a_dropped_transaction_rolls_back_and_a_duplicate_key_is_told_apart() {
    on_both("rollback", |conn| {
        {
            let tx = conn.transaction().unwrap();
            tx.execute("INSERT INTO t (id, name) VALUES (1, 'a')", params![])
                .unwrap();
        }
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM t", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
        conn.execute("INSERT INTO t (id, name) VALUES (1, 'a')", params![])
            .unwrap();
        let dup = conn
            .execute("INSERT INTO t (id, name) VALUES (1, 'b')", params![])
            .unwrap_err();
        assert!(dup.is_unique_violation(), "{dup}");
        let ignored = conn
            .execute(
                "INSERT INTO t (id, name) VALUES (1, 'b') ON CONFLICT DO NOTHING",
                params![],
            )
            .unwrap();
        assert_eq!(ignored, 0);
    });
}

#[test]
fn rows_stream_in_order_until_the_caller_stops() {
    on_both("stream", |conn| {
        let tx = conn.transaction().unwrap();
        for i in 0..1000i64 {
            tx.execute(
                "INSERT INTO t (id, name) VALUES (?1, ?2)",
                params![i, format!("n{i}")],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let snapshot = conn.snapshot().unwrap();
        let mut seen = Vec::new();
        snapshot
            .stream(
                "SELECT id FROM t WHERE id >= ?1 ORDER BY id",
                params![10],
                |r| r.get::<i64>(0),
                |id| {
                    seen.push(id);
                    Ok(seen.len() < 500)
                },
            )
            .unwrap();
        assert_eq!(seen.len(), 500);
        assert_eq!((seen[0], seen[499]), (10, 509));
        let names = snapshot
            .query_map(
                "SELECT name FROM t WHERE id < 3 ORDER BY id",
                params![],
                |r| r.get::<String>(0),
            )
            .unwrap();
        assert_eq!(names, ["n0", "n1", "n2"]);
    });
}

#[test]
fn a_streamed_read_lets_other_statements_run_between_its_rows() {
    on_both("interleaved", |conn| {
        let tx = conn.transaction().unwrap();
        for i in 0..3000i64 {
            tx.execute("INSERT INTO t (id, name) VALUES (?1, 'x')", params![i])
                .unwrap();
        }
        tx.commit().unwrap();
        let snapshot = conn.snapshot().unwrap();
        let (mut rows, mut looked_up) = (0i64, 0i64);
        snapshot
            .stream(
                "SELECT id FROM t ORDER BY id",
                params![],
                |r| r.get::<i64>(0),
                |id| {
                    assert_eq!(id, rows, "in order, none twice");
                    rows += 1;
                    looked_up += snapshot
                        .query_row("SELECT COUNT(*) FROM t WHERE id <= ?1", params![id], |r| {
                            r.get::<i64>(0)
                        })
                        .unwrap();
                    Ok(rows < 2500)
                },
            )
            .unwrap();
        assert_eq!(rows, 2500);
        assert_eq!(looked_up, (1..=2500).sum::<i64>());
    });
}

#[test]
fn a_postgresql_password_is_not_shown() {
    let loc = Location::parse("postgresql://weilan:s3cret@db.example:5432/weilan");
    assert_eq!(loc.engine(), Engine::Postgres);
    assert_eq!(
        loc.to_string(),
        "postgresql://weilan:***@db.example:5432/weilan"
    );
    assert_eq!(
        Location::parse("/var/lib/weilan/weilan.db"),
        Location::Sqlite("/var/lib/weilan/weilan.db".into())
    );
}
