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
    Journal {
        #[arg(long, default_value = "/etc/weilan/agent.toml")]
        config: PathBuf,
        /// Forget the acknowledged watermark so everything still in the journal is sent
        /// again at the next start (the collector stores nothing twice). Stop the agent first.
        #[arg(long)]
        reset_acks: bool,
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
        Command::Unlock { config, token } => unlock_command(config, token),
        Command::Journal { config, reset_acks } => journal_command(config, reset_acks),
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
