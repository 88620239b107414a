//! `weilan`: the all-in-one evaluation launcher.
//!
//! - `weilan` (no arguments): quickstart. Creates `./weilan-data` on first run (dev
//!   PKI, settings, policy), then runs the collector (embedded broker + SQLite) and an
//!   agent watching this machine in one process. Ctrl-C stops both cleanly; a second
//!   run reuses the data.
//! - `weilan agent ARGS` / `weilan collector ARGS`: exactly the `weilan-agent` and
//!   `weilan-collector` command lines (the end-to-end tests use these). Called through
//!   a link named `weilan-agent` or `weilan-collector`, it is that program: the
//!   deployment test puts such links on `PATH` and types the documented commands.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use weilan_collector::pki::{self, PkiPaths};
use weilan_config::settings::agent::AgentFile;
use weilan_config::settings::collector::CollectorFile;

const USAGE: &str = "usage: weilan [--data DIR] [--port PORT]\n       weilan agent ARGS...\n       weilan collector ARGS...";

fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let called_as = args
        .first()
        .map(Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("weilan")
        .to_string();
    match called_as.as_str() {
        "weilan-agent" => return weilan_agent::cli::main(args),
        "weilan-collector" => return weilan_collector::cli::main(args),
        _ => {}
    }
    match args.get(1).and_then(|a| a.to_str()) {
        Some("agent") => {
            args.remove(0);
            args[0] = "weilan-agent".into();
            return weilan_agent::cli::main(args);
        }
        Some("collector") => {
            args.remove(0);
            args[0] = "weilan-collector".into();
            return weilan_collector::cli::main(args);
        }
        _ => {}
    }
    let mut data = PathBuf::from("weilan-data");
    let mut port: u16 = 8883;
    let mut it = args.into_iter().skip(1);
    while let Some(a) = it.next() {
        match (a.to_str(), it.next()) {
            (Some("--data"), Some(v)) => data = PathBuf::from(v),
            (Some("--port"), Some(v)) => match v.to_str().and_then(|p| p.parse().ok()) {
                Some(p) => port = p,
                None => {
                    eprintln!("--port: not a port number\n{USAGE}");
                    return ExitCode::from(64);
                }
            },
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(64);
            }
        }
    }
    weilan_config::tls::install_default_provider();
    match quickstart(&data, port) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weilan: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn agent_name() -> String {
    let host: String = sysinfo_hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    if weilan_config::topics::valid_agent_id(&format!("local-{host}")) {
        format!("local-{host}")
    } else {
        "local-agent".into()
    }
}

fn sysinfo_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Writes `text` to `path` unless the file exists (a second run keeps edits).
fn write_once(path: &Path, text: &str) -> Result<()> {
    if !path.exists() {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn prepare(data: &Path, port: u16) -> Result<(PathBuf, PathBuf, String)> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize()?;
    let pki_paths = PkiPaths::new(data.join("pki"));
    let name = agent_name();
    if !pki::is_initialized(&pki_paths) {
        pki::init(
            &pki_paths,
            &[
                "weilan-collector".into(),
                "localhost".into(),
                "127.0.0.1".into(),
            ],
        )?;
        println!("created a development PKI in {}", pki_paths.dir.display());
    }
    if !pki_paths.agent(&name).exists() {
        pki::issue_agent(&pki_paths, &name)?;
    }
    write_once(
        &data.join("policy.toml"),
        "# Quickstart fence policy (reference: docs/policy.md).\n\
         version = \"quickstart-1\"\n\
         description = \"No known devices yet: every USB storage device raises a red alert.\"\n\n\
         # [[usb.known_devices]]\n# label = \"finance stick #1\"\n# serial = \"...\"\n",
    )?;
    write_once(
        &data.join("collector.toml"),
        &format!(
            "# Quickstart collector (reference: config/collector.toml).\n\
             [broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n\n\
             [tls]\nca = \"pki/ca.pem\"\nserver_cert = \"pki/server.pem\"\nserver_key = \"pki/server-key.pem\"\n\
             client_cert = \"pki/collector.pem\"\nclient_key = \"pki/collector-key.pem\"\n\n\
             [store]\npath = \"weilan.db\"\n\n[alerts]\npath = \"alerts.jsonl\"\n\n[policy]\npath = \"policy.toml\"\n\n[rules]\ndir = \"rules\"\n"
        ),
    )?;
    std::fs::create_dir_all(data.join("agent-state"))?;
    std::fs::create_dir_all(data.join("rules"))?;
    write_once(
        &data.join("agent.toml"),
        &format!(
            "# Quickstart agent watching this machine (reference: config/agent.toml).\n\
             [agent]\nhost_role = \"workstation\"\nstate_dir = \"agent-state\"\npolicy = \"policy.toml\"\n\n\
             [collector]\nhost = \"127.0.0.1\"\nport = {port}\nserver_name = \"weilan-collector\"\nca = \"pki/ca.pem\"\n\n\
             [tls]\ncert = \"pki/agents/{name}.pem\"\nkey = \"pki/agents/{name}-key.pem\"\n"
        ),
    )?;
    Ok((data.join("collector.toml"), data.join("agent.toml"), name))
}

fn quickstart(data: &Path, port: u16) -> Result<()> {
    let (collector_toml, agent_toml, name) = prepare(data, port)?;
    let collector = weilan_config::load_file::<CollectorFile>(&collector_toml)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let agent =
        weilan_config::load_file::<AgentFile>(&agent_toml).map_err(|e| anyhow::anyhow!("{e}"))?;
    weilan_config::runtime::init_tracing(
        &weilan_config::settings::LogSettings {
            filter: "info".into(),
            json: false,
        },
        ",mosquitto=warn",
    );
    let alerts = collector.alerts_path.clone();
    println!("Weilan quickstart: collector on 127.0.0.1:{port} (embedded broker, mutual TLS), agent `{name}` watching this machine.");
    println!("  data:     {}", data.display());
    println!("  database: {}", collector.store_path.display());
    println!("  alerts:   {}", alerts.display());
    println!(
        "  follow alerts in another terminal:  cargo run --release -- collector tail --file {}",
        alerts.display()
    );
    println!("Press Ctrl-C to stop.");
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let stop_agent = CancellationToken::new();
        let stop_collector = CancellationToken::new();
        let collector_task = tokio::spawn(weilan_collector::run(collector, stop_collector.clone()));
        let agent_task = tokio::spawn(weilan_agent::run(agent, stop_agent.clone()));
        wait_for_stop().await?;
        println!("stopping: the agent delivers its last events first");
        // The agent stops first so the collector can still acknowledge its last events.
        stop_agent.cancel();
        agent_task.await?.context("agent")?;
        stop_collector.cancel();
        collector_task.await?.context("collector")?;
        Ok(())
    })
}

/// Ctrl-C or SIGTERM.
async fn wait_for_stop() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
