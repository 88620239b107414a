//! A frozen agent (SIGSTOP: no events, no orderly stop, its TCP connection still up) is
//! reported within 90 s with the default settings, whatever the phase of its
//! heartbeat: 10 agents, each frozen a different time after one of its heartbeats
//! was stored (0, 3, ... 27 s: the whole 30-s heartbeat period, the worst case
//! included).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const AGENTS: usize = 10;

#[test]
fn a_frozen_agent_is_reported_silent_within_90_s_at_any_heartbeat_phase() {
    if !netns_available() {
        return;
    }
    let w = World::new();
    let ids: Vec<String> = (0..AGENTS).map(|i| format!("ws-frozen-{i}")).collect();
    for id in &ids {
        weilan_collector::pki::issue_agent(&w.pki, id).unwrap();
    }
    let ns = Netns::create();
    // Default [fleet] settings: silent_after_secs, check_interval_secs as shipped.
    let collector = w.start_collector(&ns, &w.collector_toml(false, ""));
    let agents: Vec<Proc> = ids
        .iter()
        .map(|id| w.start_agent(&ns, &w.agent_toml(id, "pki/ca.pem", ""), id))
        .collect();
    let w = Arc::new(w);
    let heartbeats = |w: &World, id: &str| {
        w.count(&format!(
            "SELECT COUNT(*) FROM events WHERE agent_id = '{id}' AND kind = 'agent.heartbeat'"
        ))
    };
    // Each agent: wait for one of its heartbeats to be stored, wait its phase, freeze.
    let frozen_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; AGENTS]));
    let threads: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (w, id, frozen_at) = (w.clone(), id.clone(), frozen_at.clone());
            let pid = agents[i].pid();
            std::thread::spawn(move || {
                let before = heartbeats(&w, &id);
                let deadline = Instant::now() + Duration::from_secs(90);
                while heartbeats(&w, &id) == before {
                    assert!(Instant::now() < deadline, "{id}: no heartbeat stored");
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_secs(3 * i as u64));
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
                frozen_at.lock().unwrap()[i] = Some(Instant::now());
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let frozen = frozen_at.lock().unwrap().clone();
    // Each one's "silent" alert, timed from its freeze.
    let mut reported: Vec<Option<Duration>> = vec![None; AGENTS];
    let deadline = Instant::now() + Duration::from_secs(150);
    while reported.iter().any(Option::is_none) && Instant::now() < deadline {
        for a in w.alert_lines() {
            if a["rule_id"] != "builtin.fleet.agent-silent" {
                continue;
            }
            if let Some(i) = ids.iter().position(|id| a["agent_id"] == id.as_str()) {
                if reported[i].is_none() {
                    reported[i] = Some(frozen[i].unwrap().elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let secs: Vec<String> = reported
        .iter()
        .map(|r| r.map_or("never".into(), |d| format!("{:.1}", d.as_secs_f64())))
        .collect();
    println!(
        "MEASURED silent-agent alert after freezing at heartbeat phase 0, 3, ... 27 s: {} s",
        secs.join(", ")
    );
    for (i, r) in reported.iter().enumerate() {
        let d =
            r.unwrap_or_else(|| panic!("{} was never reported\n{}", ids[i], collector.log_text()));
        assert!(d <= Duration::from_secs(90), "{}: {d:?}", ids[i]);
    }
    drop(agents);
}
