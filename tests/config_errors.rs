//! Bad settings and policy files: every problem is reported at once, with
//! `file:line:column` and the field path, and the programs exit with status 64.

mod common;

use std::fs;
use std::process::Command;

use common::weilan_bin;

fn check(args: &[&str], config: &std::path::Path) -> (i32, String) {
    let out = Command::new(weilan_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn agent_settings_with_unknown_key_wrong_type_and_bad_path_exit_64_listing_all() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "agent.pem", "agent-key.pem", "policy.toml"] {
        fs::write(dir.path().join(f), "x").unwrap();
    }
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        "[agent]\nstate_dir = \".\"\npolicy = \"policy.toml\"\nfavourite_colour = \"blue\"\n\n\
         [collector]\nhost = \"127.0.0.1\"\nport = \"eighty\"\nca = \"ca.pem\"\n\n\
         [tls]\ncert = \"agent.pem\"\nkey = \"/nonexistent/agent-key.pem\"\n",
    )
    .unwrap();
    let (code, err) = check(&["agent", "check-config"], &cfg);
    assert_eq!(code, 64, "{err}");
    let file = cfg.display().to_string();
    assert!(
        err.contains(&format!(
            "{file}:4:1: agent.favourite_colour: unknown field"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:8:1: collector.port: invalid type")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}:13:1: tls.key: cannot read `/nonexistent/agent-key.pem`"
        )),
        "{err}"
    );
    // `run` refuses the same file the same way, before doing anything.
    let (code, err2) = check(&["agent", "run"], &cfg);
    assert_eq!((code, err2), (64, err));
}

/// The fleet settings of the broker issue (reconnect spread, batches in flight) are
/// range-checked, every one of them in the same report, with the line they are on.
#[test]
fn agent_fleet_settings_out_of_range_are_all_reported_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "agent.pem", "agent-key.pem", "policy.toml"] {
        fs::write(dir.path().join(f), "x").unwrap();
    }
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        "[agent]\nstate_dir = \".\"\npolicy = \"policy.toml\"\n\n\
         [collector]\nhost = \"127.0.0.1\"\nca = \"ca.pem\"\nreconnect_spread_secs = 301\n\
         max_batches_in_flight = 0\nack_timeout_secs = 0\n\n\
         [tls]\ncert = \"agent.pem\"\nkey = \"agent-key.pem\"\n",
    )
    .unwrap();
    exits_64_reporting_all(
        &["agent", "check-config"],
        &cfg,
        &[
            "collector.reconnect_spread_secs: 301 is out of range; expected 0 to 300",
            "collector.max_batches_in_flight: 0 is out of range; expected 1 to 32",
            "collector.ack_timeout_secs: 0 is out of range; expected 1 to 3600",
        ],
    );
}

/// `args` on `cfg` exits 64 and its report holds every one of `expected`.
fn exits_64_reporting_all(args: &[&str], cfg: &std::path::Path, expected: &[&str]) {
    let (code, err) = check(args, cfg);
    assert_eq!(code, 64, "{err}");
    for e in expected {
        assert!(err.contains(e), "missing `{e}` in:\n{err}");
    }
}

/// A directory with the files a collector's settings name (placeholders: these tests
/// stop at the settings' checks), plus `more`.
fn collector_files(more: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let named = [
        "ca.pem",
        "s.pem",
        "s-key.pem",
        "c.pem",
        "c-key.pem",
        "policy.toml",
    ];
    for f in named.iter().chain(more) {
        fs::write(dir.path().join(f), "x").unwrap();
    }
    dir
}

/// The collector's per-source quota and queue are range-checked together.
#[test]
fn collector_ingest_limits_a_foreign_store_url_and_a_misplaced_shared_group_are_all_reported_with_exit_64(
) {
    let dir = collector_files(&[]);
    let cfg = dir.path().join("collector.toml");
    fs::write(
        &cfg,
        "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:8883\"\nshared_group = \"weilan/#\"\n\
         [tls]\nca = \"ca.pem\"\nserver_cert = \"s.pem\"\nserver_key = \"s-key.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c-key.pem\"\n\
         [store]\npath = \"weilan.db\"\nurl = \"mysql://db/weilan\"\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n\
         [ingest]\nmax_bytes_per_source_per_sec = 1000\nqueue = 0\n\
         [exports]\nheartbeats_compact_after_secs = 99999999\n",
    )
    .unwrap();
    exits_64_reporting_all(
        &["collector", "check-config"],
        &cfg,
        &[
            "ingest.max_bytes_per_source_per_sec: 1000 is out of range; expected 65536 to 1073741824",
            "ingest.queue: 0 is out of range; expected 1 to 100000",
            "exports.heartbeats_compact_after_secs: 99999999 is out of range; expected 0 to 2678400",
            "store.url: must be a PostgreSQL URL",
            "broker.shared_group: `weilan/#` must be 1 to 64 letters, digits, `-` or `_`",
            "broker.shared_group: needs mode = \"external\"",
        ],
    );
    // Collectors sharing the ingest share one PostgreSQL database.
    let shared = fs::read_to_string(&cfg)
        .unwrap()
        .replace("mode = \"embedded\"", "mode = \"external\"")
        .replace("weilan/#", "weilan")
        .replace("url = \"mysql://db/weilan\"\n", "");
    fs::write(&cfg, shared).unwrap();
    let (code, err) = check(&["collector", "check-config"], &cfg);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("broker.shared_group: needs [store] url"),
        "{err}"
    );
    assert!(!err.contains("letters, digits"), "{err}");
}

/// `[federation]`: every wrong district and upstream field reported at once.
#[test]
fn federation_districts_and_upstream_are_checked_field_by_field_with_exit_64() {
    let dir = collector_files(&["east-ca.pem"]);
    let cfg = dir.path().join("collector.toml");
    fs::write(
        &cfg,
        "[broker]\nmode = \"external\"\n\
         [tls]\nca = \"ca.pem\"\nserver_cert = \"s.pem\"\nserver_key = \"s-key.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c-key.pem\"\n\
         [store]\npath = \"weilan.db\"\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n\
         [federation.upstream]\nhost = \"\"\nca = \"ca.pem\"\ncert = \"missing.pem\"\nkey = \"c-key.pem\"\nwindow = 0\n\
         [[federation.districts]]\nname = \"weilan-district-east\"\nca = \"east-ca.pem\"\n\
         [[federation.districts]]\nname = \"weilan-district-east\"\nca = \"east-ca.pem\"\n\
         [[federation.districts]]\nname = \"ws-01\"\nca = \"nowhere.pem\"\n",
    )
    .unwrap();
    exits_64_reporting_all(
        &["collector", "check-config"],
        &cfg,
        &[
            "federation.upstream.host: must name the province broker",
            "federation.upstream.cert:",
            "federation.upstream.window: 0 is out of range; expected 1 to 65535",
            "federation.districts[1].name: `weilan-district-east` is named twice",
            "federation.districts[2].name: `ws-01` is not a district name",
            "federation.districts[2].ca:",
        ],
    );
}

#[test]
fn policy_with_unknown_key_wrong_type_and_bad_path_is_refused_with_all_errors() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "agent.pem", "agent-key.pem"] {
        fs::write(dir.path().join(f), "x").unwrap();
    }
    fs::write(
        dir.path().join("policy.toml"),
        "version = \"p1\"\nshiny = true\n\n[[usb.known_devices]]\nlabel = \"a\"\nserial = 7\n\n\
         [files]\nevidence_dir = \"relative/evidence\"\n",
    )
    .unwrap();
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        "[agent]\nstate_dir = \".\"\npolicy = \"policy.toml\"\n[collector]\nhost = \"h\"\nca = \"ca.pem\"\n\
         [tls]\ncert = \"agent.pem\"\nkey = \"agent-key.pem\"\n",
    )
    .unwrap();
    let (code, err) = check(&["agent", "check-config"], &cfg);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("policy.toml:2:1: shiny: unknown field"),
        "{err}"
    );
    assert!(
        err.contains("policy.toml:6:1: usb.known_devices[0].serial: invalid type"),
        "{err}"
    );
    assert!(
        err.contains(
            "policy.toml:9:1: files.evidence_dir: `relative/evidence` must be an absolute path"
        ),
        "{err}"
    );
}

#[test]
fn collector_settings_report_every_problem_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("collector.toml");
    fs::write(
        &cfg,
        "[broker]\nmode = \"embedded\"\nlisten = \"not-an-address\"\nturbo = true\n\
         [tls]\nca = \"ca.pem\"\nserver_cert = \"s.pem\"\nserver_key = \"s-key.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"c-key.pem\"\n\
         [store]\npath = \"/nonexistent/dir/weilan.db\"\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n",
    )
    .unwrap();
    let (code, err) = check(&["collector", "check-config"], &cfg);
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("collector.toml:4:1: broker.turbo: unknown field"),
        "{err}"
    );
    assert!(err.contains("broker.listen"), "{err}");
    assert!(
        err.contains("store.path: directory `/nonexistent/dir` does not exist"),
        "{err}"
    );
    assert!(err.contains("tls.ca"), "{err}");
}

/// `check-config` loads what `serve` loads: a broker certificate that does not name
/// `broker.server_name` (the collector would not reach its own broker), keys the
/// service user cannot read, a broken rule file — all listed, exit 64.
#[test]
fn collector_check_config_checks_the_pki_as_the_service_will_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    weilan_collector::pki::init(
        &weilan_collector::pki::PkiPaths::new(&pki_dir),
        &["collector.example.internal".into()],
    )
    .unwrap();
    fs::write(dir.path().join("policy.toml"), "version = \"p1\"\n").unwrap();
    fs::create_dir(dir.path().join("rules")).unwrap();
    let cfg = dir.path().join("collector.toml");
    let write = |server_name: &str| {
        fs::write(
            &cfg,
            format!(
                "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:8883\"\nserver_name = \"{server_name}\"\nclient_id = \"{client_id}\"\n\n\
                 [tls]\nca = \"pki/ca.pem\"\nserver_cert = \"pki/server.pem\"\nserver_key = \"pki/server-key.pem\"\n\
                 client_cert = \"pki/collector.pem\"\nclient_key = \"pki/collector-key.pem\"\n\n\
                 [store]\npath = \"weilan.db\"\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n\
                 [rules]\ndir = \"rules\"\n",
                // The broken variant also names a client id the certificate does
                // not carry (a further collector that kept the first's certificate).
                client_id = if server_name == "broker.example.internal" {
                    "weilan-collector-b"
                } else {
                    "weilan-collector"
                }
            ),
        )
        .unwrap()
    };
    // `pki init --name collector.example.internal` keeps the protocol name: ok.
    write("weilan-collector");
    let (code, err) = check(
        &["collector", "check-config", "--service-user", "root"],
        &cfg,
    );
    assert_eq!(code, 0, "{err}");
    write("collector.example.internal");
    let (code, err) = check(
        &["collector", "check-config", "--service-user", "root"],
        &cfg,
    );
    assert_eq!(code, 0, "{err}");

    // A name the certificate does not carry, a broken rule file and (as root, for
    // the unprivileged `nobody`) unreadable keys: every one reported.
    write("broker.example.internal");
    fs::write(dir.path().join("rules/site.toml"), "[[rule]]\nid = 3\n").unwrap();
    let (code, err) = check(
        &["collector", "check-config", "--service-user", "nobody"],
        &cfg,
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("server.pem: not a valid server certificate for `broker.example.internal`"),
        "{err}"
    );
    assert!(err.contains("site.toml"), "{err}");
    assert!(
        err.contains(
            "collector.pem: its name `weilan-collector` is not broker.client_id `weilan-collector-b`"
        ),
        "{err}"
    );
    if nix::unistd::geteuid().is_root() {
        assert!(
            err.contains("collector-key.pem: the service user `nobody` cannot read it"),
            "{err}"
        );
        assert!(
            err.contains("server-key.pem: the service user `nobody` cannot read it"),
            "{err}"
        );
    }
}

/// A USB identity that trusts a serial alone is valid but weak: `check-config` says
/// so (and still passes).
#[test]
fn check_config_warns_on_a_serial_only_usb_rule() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "agent.pem", "agent-key.pem"] {
        fs::write(dir.path().join(f), "x").unwrap();
    }
    fs::write(
        dir.path().join("policy.toml"),
        "version = \"p1\"\n[[usb.rules]]\nid = \"by-serial\"\ntarget = \"allow\"\nserial = [\"4C53\"]\n",
    )
    .unwrap();
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        "[agent]\nstate_dir = \".\"\npolicy = \"policy.toml\"\n[collector]\nhost = \"h\"\nca = \"ca.pem\"\n\
         [tls]\ncert = \"agent.pem\"\nkey = \"agent-key.pem\"\n",
    )
    .unwrap();
    let (code, err) = check(&["agent", "check-config"], &cfg);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: ")
            && err.contains("policy.toml: usb.rules[0] (`by-serial`): serial without vid_pid"),
        "{err}"
    );
}

/// `check-rules` on a directory that does not exist used to say ok.
#[test]
fn check_rules_refuses_a_missing_directory() {
    let out = Command::new(weilan_bin())
        .args(["collector", "check-rules", "--dir", "/nonexistent/rules.d"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("/nonexistent/rules.d: not a directory"),
        "{err}"
    );
}

/// A broken rule file stops `serve` with status 64 (a configuration error), as
/// settings and policy errors do, not 1.
#[test]
fn serve_exits_64_on_a_broken_rule_file() {
    let dir = tempfile::tempdir().unwrap();
    weilan_collector::pki::init(
        &weilan_collector::pki::PkiPaths::new(dir.path().join("pki")),
        &[],
    )
    .unwrap();
    fs::write(dir.path().join("policy.toml"), "version = \"p1\"\n").unwrap();
    fs::create_dir(dir.path().join("rules")).unwrap();
    fs::write(dir.path().join("rules/site.toml"), "[[rule]]\nid = 3\n").unwrap();
    let cfg = dir.path().join("collector.toml");
    fs::write(
        &cfg,
        "[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:0\"\n[enroll]\nenabled = false\n\n\
         [tls]\nca = \"pki/ca.pem\"\nserver_cert = \"pki/server.pem\"\nserver_key = \"pki/server-key.pem\"\n\
         client_cert = \"pki/collector.pem\"\nclient_key = \"pki/collector-key.pem\"\n\n\
         [store]\npath = \"weilan.db\"\n[alerts]\npath = \"alerts.jsonl\"\n[policy]\npath = \"policy.toml\"\n\
         [rules]\ndir = \"rules\"\n",
    )
    .unwrap();
    let (code, err) = check(&["collector", "serve"], &cfg);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("site.toml"), "{err}");
}
