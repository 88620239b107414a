//! README's run command: `cargo run --release` starts the `weilan` program with no
//! arguments — collector, embedded broker and an agent watching this machine, with a
//! development PKI in `./weilan-data`. Run here as built, from a fresh directory, in a
//! network namespace of its own: the agent's first events are stored, and Ctrl-C
//! (SIGINT) stops everything cleanly, broker included.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

#[test]
fn the_readme_run_command_starts_collector_broker_and_agent_and_stops_cleanly() {
    if !netns_available() {
        return;
    }
    if !require(
        "quickstart needs the `mosquitto` binary (apt-get install mosquitto)",
        std::path::Path::new("/usr/sbin/mosquitto").exists(),
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create();
    let mut c: Command = ns.command(weilan_bin());
    c.current_dir(dir.path());
    let mut run = Proc::spawn(c, dir.path().join("quickstart.log"), "quickstart");
    let db = dir.path().join("weilan-data/weilan.db");
    let started = || {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM events WHERE kind = 'agent.started'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .unwrap_or(0)
    };
    wait_for(
        "the quickstart agent's first event stored",
        Duration::from_secs(60),
        || (started() >= 1).then_some(()),
        || run.log_text(),
    );
    let broker = std::fs::read_to_string(dir.path().join("weilan-data/broker/mosquitto.conf"))
        .unwrap_or_default();
    assert!(broker.contains("use_identity_as_username true"), "{broker}");
    run.signal(nix::sys::signal::Signal::SIGINT);
    let stopped = within(Duration::from_secs(30), || {
        (!run.is_running()).then_some(())
    });
    let log = run.log_text();
    println!(
        "MEASURED quickstart: agent.started stored, stopped on SIGINT: {}",
        stopped.is_some()
    );
    assert!(stopped.is_some(), "still running 30 s after SIGINT\n{log}");
    assert!(log.contains("embedded broker stopped"), "{log}");
    // No Mosquitto of this run is left behind.
    let conf = dir.path().join("weilan-data/broker/mosquitto.conf");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("mosquitto") && c.contains(conf.to_str().unwrap()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
