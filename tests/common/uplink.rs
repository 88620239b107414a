//! Simulated hosts for the multi-collector tests: the agent's own journal and uplink
//! (`weilan_agent::journal`, `weilan_agent::uplink`), in the test process, one per
//! host, delivering a journal written up front until every event is acknowledged.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use weilan_agent::journal::{Journal, JournalConfig};
use weilan_agent::uplink::{Uplink, UplinkConfig};
use weilan_config::event::Envelope;
use weilan_config::settings::agent::Delivery;
use weilan_config::signing::{Signer, Verifier};

/// Host `name` of the PKI `pki`, its journal under `root/agents/name` holding
/// `events`, delivering to the broker at 127.0.0.1:`port` (in the namespace the
/// uplink later runs in).
pub fn agent_uplink(
    root: &Path,
    pki: &weilan_collector::pki::PkiPaths,
    name: &str,
    port: u16,
    events: impl IntoIterator<Item = Envelope>,
) -> Uplink {
    let state = root.join("agents").join(name);
    let (mut journal, _) = Journal::open(JournalConfig {
        dir: state.join("journal"),
        state_dir: state.clone(),
        segment_bytes: 4 << 20,
        max_bytes: 1 << 30,
        retain_acked_bytes: 0,
    })
    .expect("journal");
    for e in events {
        journal.append(e).expect("append");
    }
    journal.sync().expect("journal sync");
    let (cert, key) = (pki.agent(name), pki.agent_key(name));
    let tls = weilan_config::tls::client_config(&pki.ca(), &cert, &key, "weilan-collector")
        .expect("agent tls");
    // Receivers the uplink hands policies, commands and identity switches to: kept
    // for as long as it runs (leaked: the process ends with the test).
    let (policy_tx, policy_rx) = tokio::sync::mpsc::channel(4);
    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(64);
    let (switch_tx, switch_rx) = tokio::sync::mpsc::channel(1);
    std::mem::forget((policy_rx, commands_rx, switch_tx));
    Uplink {
        config: UplinkConfig {
            agent_id: name.into(),
            host: "127.0.0.1".into(),
            port,
            tls,
            delivery: Delivery {
                keep_alive: Duration::from_secs(20),
                batch_max_events: 100,
                batch_linger: Duration::from_millis(50),
                max_batches_in_flight: 8,
                ack_timeout: Duration::from_secs(5),
                reconnect_spread: Duration::ZERO,
                max_events_per_sec: 1_000_000,
            },
            drain_timeout: Duration::from_secs(600),
        },
        signer: Signer::from_pem_files(&cert, &key).expect("agent key"),
        identity_switches: switch_rx,
        verifier: Verifier::from_ca_file(&pki.ca()).expect("ca"),
        policy_pushes: policy_tx,
        commands: commands_tx,
        journal: Arc::new(Mutex::new(journal)),
        notify: Arc::new(tokio::sync::Notify::new()),
        stats: Arc::new(Default::default()),
        ack_drop: state.join("ack-drop"),
    }
}

/// Runs `uplinks` inside namespace `ns` (on a thread of their own) until each has
/// delivered its whole journal.
pub fn deliver_in(ns: &super::Netns, uplinks: Vec<Uplink>) -> std::thread::JoinHandle<()> {
    let ns_name = ns.name.clone();
    std::thread::spawn(move || {
        let netns = super::Netns { name: ns_name };
        netns.run_in(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tasks: Vec<_> = uplinks
                    .into_iter()
                    .map(|u| {
                        let drain = tokio_util::sync::CancellationToken::new();
                        drain.cancel();
                        tokio::spawn(u.run(drain))
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        });
        std::mem::forget(netns); // deleted by the test's own handle
    })
}
