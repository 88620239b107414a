//! Host access, for real: an sshd (openssh-server) in a network namespace the test
//! creates logs to syslog; an rsyslogd the test starts writes the auth facility to a
//! file, as Debian's rsyslog writes /var/log/auth.log; the agent follows that file.
//! A failed ssh login (a key the server does not know), a successful one that runs
//! `sudo -u nobody true`, and its end must reach the collector as `access.*` events
//! with user, source address and outcome.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const CLIENT_ADDR: &str = "10.78.0.1";
const SERVER_ADDR: &str = "10.78.0.2";

/// The syslog socket the test's rsyslogd owns; removed when it stops.
struct Syslog(Proc);

impl Drop for Syslog {
    fn drop(&mut self) {
        self.0.stop();
        let _ = std::fs::remove_file("/dev/log");
    }
}

#[test]
fn ssh_logins_failures_and_sudo_are_reported_with_user_address_and_outcome() {
    if !netns_available() {
        return;
    }
    for p in ["sshd", "ssh", "rsyslogd", "sudo"] {
        if !require(&format!("access test needs `{p}`"), have(p)) {
            return;
        }
    }
    if !require(
        "access test needs /dev/log free (a system syslog already owns it here)",
        !std::path::Path::new("/dev/log").exists(),
    ) {
        return;
    }
    let w = World::new();
    let auth_log = w.path("auth.log");
    let conf = w.path("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "module(load=\"imuxsock\" SysSock.Name=\"/dev/log\")\nauth,authpriv.* {}\n",
            auth_log.display()
        ),
    )
    .unwrap();
    let mut rs = Command::new(which("rsyslogd").unwrap());
    rs.args(["-n", "-f"])
        .arg(&conf)
        .arg("-i")
        .arg(w.path("rsyslogd.pid"));
    let _syslog = Syslog(Proc::spawn(rs, w.path("rsyslogd.log"), "rsyslogd"));
    assert!(
        within(Duration::from_secs(10), || std::path::Path::new("/dev/log")
            .exists()
            .then_some(()))
        .is_some(),
        "rsyslogd did not open /dev/log: {}",
        std::fs::read_to_string(w.path("rsyslogd.log")).unwrap_or_default()
    );
    // The file exists before the agent starts, as /var/log/auth.log would.
    run_ok(Command::new("logger").args(["-p", "auth.info", "weilan access test starting"]));
    assert!(within(Duration::from_secs(10), || auth_log.exists().then_some(())).is_some());

    let home = Netns::create();
    let client = Netns::create();
    let server = Netns::create();
    link_namespaces(&client, CLIENT_ADDR, &server, SERVER_ADDR);
    // VERBOSE: OpenSSH logs a rejected key of a valid user only at this level.
    let (_sshd, key) = start_sshd(&w, &server, SERVER_ADDR, "LogLevel VERBOSE", true);

    let collector = w.collector_toml(false, "");
    let _c = w.start_collector(&home, &collector);
    let agent = w.agent_toml(
        AGENT,
        "pki/ca.pem",
        &format!(
            "[access]\nfrom = \"auth-log\"\nauth_logs = [\"{}\"]\npoll_ms = 200\n[network]\nenabled = false\n",
            auth_log.display()
        ),
    );
    let _a = w.start_agent(&home, &agent, AGENT);
    assert!(within(Duration::from_secs(20), || {
        (w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.started'") > 0).then_some(())
    })
    .is_some());
    assert!(within(Duration::from_secs(10), || client
        .command("ssh-keyscan")
        .arg(SERVER_ADDR)
        .output()
        .ok()
        .filter(|o| !o.stdout.is_empty()))
    .is_some());
    std::thread::sleep(Duration::from_millis(500));

    // A key the server does not know.
    let stranger = w.path("ssh/stranger");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&stranger),
    );
    let failed = client
        .command("ssh")
        .args(ssh_opts(&stranger))
        .arg(format!("root@{SERVER_ADDR}"))
        .arg("true")
        .status()
        .unwrap();
    assert!(!failed.success());
    // The right key, and privileges raised in the session.
    let ok = client
        .command("ssh")
        .args(ssh_opts(&key))
        .arg(format!("root@{SERVER_ADDR}"))
        .arg("sudo -n -u nobody true")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let event = |kind: &str, pred: &dyn Fn(&Value) -> bool| {
        within(Duration::from_secs(20), || {
            w.events(kind, "1", &[]).into_iter().find(|e| pred(e))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {kind}; access events: {:#?}\nauth.log:\n{}",
                w.events("access.login", "1", &[]),
                std::fs::read_to_string(&auth_log).unwrap_or_default()
            )
        })
    };
    let f = event("access.login_failed", &|e| e["remote_addr"] == CLIENT_ADDR);
    assert_eq!(
        (
            f["user"].as_str(),
            f["method"].as_str(),
            f["source"].as_str()
        ),
        (Some("root"), Some("ssh"), Some("auth-log"))
    );
    assert_eq!(f["reason"], "publickey rejected");
    let l = event("access.login", &|e| e["remote_addr"] == CLIENT_ADDR);
    assert_eq!(
        (l["user"].as_str(), l["method"].as_str()),
        (Some("root"), Some("ssh"))
    );
    let p = event("access.privilege", &|e| e["target_user"] == "nobody");
    assert_eq!(
        (
            p["user"].as_str(),
            p["tool"].as_str(),
            p["success"].as_bool()
        ),
        (Some("root"), Some("sudo"), Some(true))
    );
    assert_eq!(p["command"], "/usr/bin/true");
    let o = event("access.logout", &|e| e["session_id"] == l["session_id"]);
    assert_eq!(o["user"], "root");
    eprintln!("MEASURED access: failed {f}\nlogin {l}\nprivilege {p}\nlogout {o}");
}
