//! The network guard with a recording enforcer.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use weilan_config::policy::network::NetAction;

use super::{carry_out, NetEnforcer};
use crate::source::net::NetActionRequest;

const NS: u64 = 4026531840;

#[derive(Default)]
struct RecordingEnforcer(Mutex<Vec<String>>);

impl NetEnforcer for RecordingEnforcer {
    fn kill(&self, pid: u32, exe: &str) -> Result<String, String> {
        self.0.lock().unwrap().push(format!("kill {pid} {exe}"));
        Ok("ended by SIGTERM".into())
    }
    fn block(
        &self,
        _netns: u64,
        addr: std::net::IpAddr,
        d: Duration,
        rule: &str,
    ) -> Result<String, String> {
        self.0
            .lock()
            .unwrap()
            .push(format!("block {addr} {} {rule}", d.as_secs()));
        Err("nft: not here".into())
    }
}

#[test]
fn actions_report_how_they_went() {
    let e = RecordingEnforcer::default();
    let req = |action, pid| NetActionRequest {
        verdict: weilan_config::policy::network::NetVerdict {
            action,
            rule_id: "r".into(),
            block: Duration::from_secs(60),
            per: weilan_config::policy::network::Scope::Connection,
        },
        pid,
        exe: pid.map(|_| "/usr/bin/nc".to_string()),
        remote: "192.0.2.9:9000".parse::<SocketAddr>().unwrap(),
        netns: NS,
    };
    let ok = carry_out(&req(NetAction::Kill, Some(70)), &e);
    assert!(ok.ok && ok.rule_id == "r" && ok.pid == Some(70));
    let unknown = carry_out(&req(NetAction::Kill, None), &e);
    assert!(!unknown.ok && unknown.detail.contains("unknown"));
    let failed = carry_out(&req(NetAction::BlockDestination, Some(70)), &e);
    assert!(!failed.ok && failed.detail.contains("nft") && failed.expires.is_none());
    assert_eq!(
        *e.0.lock().unwrap(),
        vec![
            "kill 70 /usr/bin/nc".to_string(),
            "block 192.0.2.9 60 r".to_string()
        ]
    );
}

#[test]
fn the_nft_batch_has_the_table_the_sets_the_rules_and_the_element() {
    let json = serde_json::to_value(
        super::linux::block_batch("192.0.2.9".parse().unwrap(), 120, "bulk").to_nftables(),
    )
    .unwrap()
    .to_string();
    for needle in [
        "\"table\":{\"family\":\"inet\",\"name\":\"weilan\"",
        "\"hook\":\"output\"",
        "\"name\":\"blocked4\"",
        "\"name\":\"blocked6\"",
        "\"timeout\"",
        "@blocked4",
        "\"tcp reset\"",
        "\"val\":\"192.0.2.9\"",
        "\"timeout\":120",
    ] {
        assert!(json.contains(needle), "{needle} missing in {json}");
    }
}
