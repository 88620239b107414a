//! The example files shipped in `config/` parse and validate (with their absolute
//! paths pointed at a temporary tree holding the files they name).

use std::fs;
use std::path::Path;

use weilan_config::load::load_str;
use weilan_config::policy::PolicyFile;
use weilan_config::settings::agent::AgentFile;
use weilan_config::settings::collector::CollectorFile;

fn relocate(text: &str, root: &Path) -> String {
    let r = root.display().to_string();
    text.replace("/etc/weilan", &format!("{r}/etc"))
        .replace("/var/lib", &format!("{r}/var/lib"))
        .replace("/var/log", &format!("{r}/var/log"))
}

fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for d in [
        "etc/pki",
        "var/lib/weilan-agent",
        "var/lib/weilan-collector",
        "var/log/weilan",
    ] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    for f in [
        "etc/policy.toml",
        "etc/pki/ca.pem",
        "etc/pki/agent.pem",
        "etc/pki/agent-key.pem",
        "etc/pki/server.pem",
        "etc/pki/server-key.pem",
        "etc/pki/collector.pem",
        "etc/pki/collector-key.pem",
    ] {
        fs::write(r.join(f), "x").unwrap();
    }
    dir
}

#[test]
fn shipped_agent_settings_are_valid() {
    let dir = tree();
    let text = relocate(weilan_config::examples::AGENT_TOML, dir.path());
    let s = load_str::<AgentFile>(&text, Path::new("agent.toml"), dir.path().into())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.collector_port, 8883);
    assert_eq!(s.heartbeat.as_secs(), 30);
    assert_eq!(s.host_role.as_str(), "workstation");
}

#[test]
fn shipped_collector_settings_are_valid() {
    let dir = tree();
    let text = relocate(weilan_config::examples::COLLECTOR_TOML, dir.path());
    let s = load_str::<CollectorFile>(&text, Path::new("collector.toml"), dir.path().into())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.broker_port, 8883);
    assert_eq!(
        s.exports.heartbeats_compact_after,
        Some(std::time::Duration::from_secs(3600))
    );
}

#[test]
fn shipped_policy_is_valid() {
    let p = load_str::<PolicyFile>(
        weilan_config::examples::POLICY_TOML,
        Path::new("policy.toml"),
        ".".into(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.usb.known_devices.len(), 1);
    assert_eq!(p.files.card_context, ["工资卡", "社保卡"]);
}

/// Settings that never mention `[exports]` stay valid on a machine where no export
/// directory exists yet (a fixed default under /var/lib once broke every collector
/// started with minimal settings): exports default to `exports/` beside the database.
#[test]
fn exports_default_beside_the_database_without_any_directory_existing() {
    let dir = tree();
    let r = dir.path().display();
    let text = format!(
        "[broker]\nmode = \"external\"\n[tls]\nca = \"{r}/etc/pki/ca.pem\"\nserver_cert = \"{r}/etc/pki/server.pem\"\n\
         server_key = \"{r}/etc/pki/server-key.pem\"\nclient_cert = \"{r}/etc/pki/collector.pem\"\n\
         client_key = \"{r}/etc/pki/collector-key.pem\"\n[store]\npath = \"{r}/db/weilan.db\"\n\
         [alerts]\npath = \"{r}/db/alerts.jsonl\"\n[policy]\npath = \"{r}/etc/policy.toml\"\n"
    );
    fs::create_dir_all(dir.path().join("db")).unwrap();
    let s = load_str::<CollectorFile>(&text, Path::new("collector.toml"), dir.path().into())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.exports.dir, dir.path().join("db/exports"));
    assert!(!s.exports.dir.exists());
    assert!(s.exports.schedules.is_empty());
}

/// Regression: `[usb] enabled = false` used to switch the files source off as well,
/// with no word from `check-config`. The fence and the files source are separate.
#[test]
fn the_files_source_does_not_depend_on_the_usb_fence() {
    let dir = tree();
    let text = relocate(weilan_config::examples::AGENT_TOML, dir.path()).replace(
            "# source which mounts are USB storage; it runs whether or not the fence does.\nenabled = true",
            "# source which mounts are USB storage; it runs whether or not the fence does.\nenabled = false",
        );
    assert!(
        text.contains("enabled = false"),
        "the example changed shape"
    );
    let s = load_str::<AgentFile>(&text, Path::new("agent.toml"), dir.path().into())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(s.usb.is_none());
    let files = s.files.expect("files source still configured");
    assert_eq!(files.mountinfo.file_name().unwrap(), "mountinfo");
    assert_eq!(files.mount_poll.as_millis(), 2000);
}

/// The policy reference's example, verbatim, is a valid policy (the validation it
/// documents must accept it: detector names, rules, paths).
#[test]
fn the_policy_in_docs_policy_md_is_valid() {
    let doc = include_str!("../../docs/policy.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "docs/policy.md's toml blocks changed: update this test"
    );
    if let Err(e) = weilan_config::policy::parse(blocks[0], "docs/policy.md") {
        panic!("{e}");
    }
}
