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
}
