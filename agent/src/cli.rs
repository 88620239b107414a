//! The `weilan-agent` command line (the binary and the all-in-one `weilan` call this): the endpoint agent.
//! Parsing, settings, tracing and signals only; the loops live in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weilan_config::settings::agent::{AgentFile, AgentSettings};

use weilan_config::runtime::EXIT_CONFIG;

#[derive(Parser)]
#[command(
    name = "weilan-agent",
    version,
    about = "Weilan endpoint agent: the electronic fence on this host"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (as a systemd service).
    Run {
        #[arg(long, default_value = "/etc/weilan/agent.toml")]
        config: PathBuf,
    },
    /// Check the settings and the policy they name; print every problem.
    CheckConfig {
        #[arg(long, default_value = "/etc/weilan/agent.toml")]
        config: PathBuf,
    },
    /// Show the journal (segments, records, acknowledged watermark); safe while running.
    /// `export` and `import-ack` carry it to a collector on a stick (hosts with no
    /// network).
    Journal {
        #[arg(long, default_value = "/etc/weilan/agent.toml")]
        config: PathBuf,
        /// Forget the acknowledged watermark so everything still in the journal is sent
        /// again at the next start (the collector stores nothing twice). Stop the agent first.
        #[arg(long)]
        reset_acks: bool,
        #[command(subcommand)]
        carry: Option<Carry>,
    },
    /// Hand a temporary unlock token (from `weilan-collector unlock --out`) to the
    /// agent; works offline: the token is verified here with the pinned CA.
    Unlock {
        #[arg(long, default_value = "/etc/weilan/agent.toml")]
        config: PathBuf,
        /// The token file.
        #[arg(long)]
        token: PathBuf,
    },
    /// Get this host's identity from the collector with a one-time token (from
    /// `weilan-collector enroll create`): the key is made here and never leaves it.
    Enroll {
        /// The collector: `host` (port 8884) or `host:port`.
        #[arg(long)]
        collector: String,
        /// The token.
        #[arg(long)]
        token: String,
        /// The agent id to enroll as (default: this host's name).
        #[arg(long)]
        id: Option<String>,
        /// Where agent.pem, agent-key.pem and ca.pem go (agent.toml's defaults).
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
    /// Print the documented example settings.
    PrintDefaultConfig,
    /// Internal: the agent's 7z reader, run by the agent itself as a confined child
    /// process (classify/sevenz.rs); reads an archive on stdin.
    #[command(name = "unpack-7z", hide = true)]
    Unpack7z {
        /// Most bytes inflated in total.
        #[arg(long, required_unless_present = "check_confinement")]
        budget: Option<u64>,
        /// CPU seconds before the kernel stops it.
        #[arg(long, required_unless_present = "check_confinement")]
        cpu_seconds: Option<u64>,
        /// Confine as for an archive, try to open files and connect, print what held.
        #[arg(long)]
        check_confinement: bool,
    },
}

/// The journal on a stick (`airgap.rs`; docs/deployment.md, "Hosts with no network").
#[derive(Subcommand)]
enum Carry {
    /// Write every unacknowledged record as a signed journal bundle into a directory
    /// (the mounted transfer stick); safe while the agent runs.
    Export {
        /// The directory the bundles are written to.
        #[arg(long)]
        out: PathBuf,
        /// Start a new bundle file past this many MiB (FAT32 sticks hold at most
        /// 4 GiB per file).
        #[arg(long, default_value_t = crate::airgap::DEFAULT_BUNDLE_MIB)]
        max_mib: u64,
    },
    /// Hand the collector's ack bundle (from `weilan-collector import`) to the agent:
    /// checked here, applied by the running agent within a second (or at its next
    /// start); acknowledged records leave the journal.
    ImportAck {
        /// The ack bundles (`….acks`).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn load(config: &std::path::Path) -> Result<AgentSettings, ExitCode> {
    weilan_config::runtime::load_or_exit::<AgentFile>(config)
}

/// Runs the command line given in `args` (including the program name).
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli: Cli = match weilan_config::runtime::parse_cli(args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Enroll {
            collector,
            token,
            id,
            dir,
        } => enroll_command(collector, token, id, dir),
        Command::PrintDefaultConfig => print_default_config_command(),
        Command::Unpack7z {
            check_confinement: true,
            ..
        } => crate::classify::sevenz::check_confinement(),
        Command::Unpack7z {
            budget,
            cpu_seconds,
            ..
        } => crate::classify::sevenz::helper_main(budget.unwrap_or(0), cpu_seconds.unwrap_or(1)),
        Command::Unlock { config, token } => unlock_command(config, token),
        Command::Journal {
            config,
            reset_acks,
            carry,
        } => match carry {
            Some(carry) => carry_command(config, carry),
            None => journal_command(config, reset_acks),
        },
        Command::CheckConfig { config } => check_config_command(config),
        Command::Run { config } => run_command(config),
    }
}

fn enroll_command(collector: String, token: String, id: Option<String>, dir: PathBuf) -> ExitCode {
    let id = id.unwrap_or_else(|| sysinfo::System::host_name().unwrap_or_default());
    match crate::enroll::enroll(&collector, &token, &id, &dir) {
        Ok(e) => {
            println!(
                "enrolled as `{}`{}: certificate {}, key {} (0600, made here), CA {}",
                e.agent_id,
                if e.groups.is_empty() {
                    String::new()
                } else {
                    format!(" (groups {})", e.groups.join(", "))
                },
                e.cert.display(),
                e.key.display(),
                e.ca.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("enroll: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_default_config_command() -> ExitCode {
    print!("{}", weilan_config::examples::AGENT_TOML);
    ExitCode::SUCCESS
}

fn unlock_command(config: PathBuf, token: PathBuf) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = (|| -> Result<String, String> {
        let me = weilan_config::signing::Signer::from_pem_files(&settings.cert, &settings.key)
            .map_err(|e| e.to_string())?
            .identity()
            .common_name
            .clone();
        let verifier = weilan_config::signing::Verifier::from_ca_file(&settings.ca)
            .map_err(|e| e.to_string())?;
        let bytes = std::fs::read(&token).map_err(|e| format!("{}: {e}", token.display()))?;
        let msg =
            weilan_config::wire::decode_signed(&bytes, 64 * 1024).map_err(|e| e.to_string())?;
        let t = crate::unlock::verify(&verifier, &msg, &me)?;
        let store = crate::unlock::UnlockStore::new(&settings.state_dir);
        if store.used().contains(&t.token_id) {
            return Err(format!("token {} was already used", t.token_id));
        }
        store
            .drop_token(&msg, &t.token_id)
            .map_err(|e| e.to_string())?;
        Ok(format!(
                "token {} accepted: {} for device {}{} until {}; the running agent applies it within a second",
                t.token_id,
                t.mode,
                t.serial.as_deref().map(|s| format!("serial {s} ")).unwrap_or_default(),
                t.device_hash.as_deref().map(|h| format!("hash {h}")).unwrap_or_default(),
                t.not_after
            ))
    })();
    weilan_config::runtime::print_outcome(result, "unlock refused")
}

fn journal_command(config: PathBuf, reset_acks: bool) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let dir = settings.state_dir.join("journal");
    if reset_acks {
        if let Err(e) = crate::journal::reset_acked(&dir) {
            eprintln!("{}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        println!(
            "acknowledged watermark reset: everything in {} is sent again at the next start",
            dir.display()
        );
    }
    match crate::journal::inspect(&dir) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

fn carry_command(config: PathBuf, carry: Carry) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = match carry {
        Carry::Export { out, max_mib } => crate::airgap::export(&settings, &out, max_mib)
            .map_err(|e| e.to_string())
            .map(|e| {
                let onto = format!(
                    "onto the registered transfer stick `{}` (allowed by rule `{}`; {}:{} serial `{}`)\n",
                    e.stick.label,
                    e.stick.rule_id,
                    e.stick.vid,
                    e.stick.pid,
                    e.stick.serial.as_deref().unwrap_or("")
                );
                if e.bundles.is_empty() {
                    return format!(
                        "{onto}nothing to export: every record up to {} is acknowledged",
                        e.acked.map_or("-".into(), |k| k.to_string())
                    );
                }
                onto + &e
                    .bundles
                    .iter()
                    .map(|(path, m)| {
                        format!(
                            "exported {} records ({}..={}) in {} signed batches to {}",
                            m.records,
                            m.first,
                            m.last,
                            m.batches.len(),
                            path.display()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }),
        Carry::ImportAck { files } => files
            .iter()
            .map(|f| import_ack(&settings, f))
            .collect::<Result<Vec<_>, _>>()
            .map(|lines| lines.join("\n")),
    };
    weilan_config::runtime::print_outcome(result, "journal")
}

fn import_ack(settings: &AgentSettings, file: &std::path::Path) -> Result<String, String> {
    let me = weilan_config::signing::Signer::from_pem_files(&settings.cert, &settings.key)
        .map_err(|e| e.to_string())?
        .identity()
        .common_name
        .clone();
    let verifier =
        weilan_config::signing::Verifier::from_ca_file(&settings.ca).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let acks =
        crate::airgap::check_ack_bundle(&verifier, &me, file, &bytes).map_err(|e| e.to_string())?;
    let dropped =
        crate::airgap::drop_ack_bundle(&settings.state_dir, &bytes).map_err(|e| e.to_string())?;
    let (first, last) = (
        acks.iter().map(|a| a.first).min().expect("not empty"),
        acks.iter().map(|a| a.last).max().expect("not empty"),
    );
    Ok(format!(
        "{} acks verified ({first}..={last}); handed to the agent as {}: the running agent applies them within a second, a stopped one at its next start",
        acks.len(),
        dropped.display()
    ))
}

fn check_config_command(config: PathBuf) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match crate::load_policy(&settings) {
        Ok(p) => {
            for w in p.usb.lint() {
                eprintln!("warning: {}: {w}", settings.policy.display());
            }
            println!(
                "{}: ok; policy {} version {}",
                config.display(),
                settings.policy.display(),
                p.version
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn run_command(config: PathBuf) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    weilan_config::runtime::init_tracing(&settings.log, "");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    weilan_config::runtime::serve(
        "weilan-agent",
        runtime,
        |shutdown| crate::run(settings, shutdown),
        |e| match e {
            crate::AgentError::Policy(e) => Some(e.to_string()),
            // A badge key file the operator made wrong: a configuration error.
            e @ crate::AgentError::BadgeKey { .. } => Some(format!("weilan-agent: {e}\n")),
            _ => None,
        },
    )
}
