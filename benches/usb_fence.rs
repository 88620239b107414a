//! USB fence decision latency on the fake sysfs tree (not a test).
//!
//! `cargo bench --bench usb_fence` (as root: network namespace). A real agent in
//! enforce mode watches a fake sysfs tree; the bench broadcasts kernel-format `add`
//! uevents for storage devices and reads each `usb.decision`'s `latency_us`: from
//! the uevent reaching the agent to the `authorized` write returning. The same field
//! is reported by `tests/usb_fence_hil.rs` from a real kernel in QEMU.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use weilan_agent::source::usb::sysfs::fake::{add_stick, FakeStick};

fn main() {
    weilan_config::tls::install_default_provider();
    if !netns_available() {
        return;
    }
    let n: usize = std::env::var("DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let w = World::new();
    std::fs::write(
        w.path("policy.toml"),
        "version = \"bench\"\n[usb]\nmode = \"enforce\"\ndefault_target = \"block\"\n",
    )
    .unwrap();
    let ns = Netns::create();
    let collector = w.start_collector(&ns, &w.collector_toml(false, "[log]\nlevel = \"warn\"\n"));
    let cfg = w.agent_toml_with(AGENT, "pki/ca.pem", "", "[log]\nlevel = \"warn\"\n");
    let _agent = w.start_agent_stored(&ns, &cfg, AGENT);
    for i in 0..n {
        let port = format!("1-{}", i + 2);
        let devpath = add_stick(
            &w.sysfs(),
            &FakeStick {
                port: &port,
                vid: "abcd",
                pid: "1234",
                serial: &format!("LAT{i:05}"),
                classes: &[8],
                disk: None,
            },
        );
        ns.send_uevent("add", &devpath, "usb", "usb_device");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(
        "decisions",
        Duration::from_secs(120),
        || {
            (w.count("SELECT COUNT(*) FROM events WHERE kind = 'usb.decision'") >= n as i64)
                .then_some(())
        },
        || collector.log_text(),
    );
    let mut lat: Vec<i64> = w
        .db()
        .query_map(
            "SELECT json_extract(envelope, '$.event.data.latency_us') FROM events WHERE kind = 'usb.decision' AND json_extract(envelope, '$.event.data.latency_us') IS NOT NULL",
            params![],
            |r| r.get(0),
        )
        .unwrap();
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "fake sysfs tree, {} hot-plugged storage devices at 50/s, enforce mode (block): decision latency uevent→authorized=0 written: p50 {} µs, p99 {} µs, max {} µs",
        lat.len(),
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
}
