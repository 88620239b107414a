//! The `weilan-collector` command line (the binary and the all-in-one `weilan` call this): the collector.
//! Parsing, settings, tracing and signals only; the loops live in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::pki::{self, PkiPaths};
use crate::rules::Level;
use crate::tail::{self, TailOptions};
use clap::{Parser, Subcommand};
use weilan_config::settings::collector::{CollectorFile, CollectorSettings};

use weilan_config::runtime::EXIT_CONFIG;

#[derive(Parser)]
#[command(
    name = "weilan-collector",
    version,
    about = "Weilan collector: events, alerts and the PKI of the fence"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[arg(long, default_value = "/etc/weilan/collector.toml")]
    config: PathBuf,
    /// Start (inclusive): a time (`2026-11-01T00:00:00+08:00`, `2026-11-01` in the
    /// exports' time zone) or a span back from now (`7d`).
    #[arg(long)]
    from: String,
    /// End (exclusive), same forms; default now.
    #[arg(long)]
    to: Option<String>,
    /// Only these agents (comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "group")]
    agents: Vec<String>,
    /// Only agents of this group (`[agent_groups]` in the rule files).
    #[arg(long)]
    group: Option<String>,
    /// zh-CN or en (default: the settings' `exports.language`).
    #[arg(long)]
    lang: Option<String>,
    /// The export's directory (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Give heartbeats a row in events.csv too (they are always in events.jsonl and
    /// counted in the manifest; by default the spreadsheet leaves them out).
    #[arg(long)]
    heartbeats_in_csv: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector (broker, ingest, alerts).
    Serve {
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
    },
    /// Check everything `serve` loads — settings, policy, rules, roster, PKI files and
    /// their permissions — and print every problem (exit status 64).
    CheckConfig {
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
        /// When run as root: also check that this account (the service's `User=`) can
        /// read every file the collector opens. Ignored if it does not exist.
        #[arg(long, default_value = crate::preflight::SERVICE_USER)]
        service_user: String,
    },
    /// List the rules in force (built-in pack and the rule directory of the settings).
    Rules {
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
        /// JSON lines for machines.
        #[arg(long)]
        json: bool,
    },
    /// Check a rule directory (every file, every CEL expression) without a collector.
    CheckRules {
        /// The directory of `*.toml` rule files.
        #[arg(long)]
        dir: PathBuf,
        /// Check without the built-in pack (ids are then not checked against it).
        #[arg(long)]
        no_builtin: bool,
    },
    /// Export a period for auditors: CSV (with BOM) and JSON lines of events and
    /// alerts, report.html, and a signed manifest chained to the previous export.
    Export(ExportArgs),
    /// Verify an export: manifest signature, every file's SHA-256, nothing missing or
    /// added, and the chain to the previous exports beside it. Exit 1 on any mismatch.
    VerifyExport {
        dir: PathBuf,
        /// The Weilan CA certificate (default: the one in the collector settings).
        #[arg(long)]
        ca: Option<PathBuf>,
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
    },
    /// Import a journal bundle from a host with no network (`weilan-agent journal
    /// export`): the running collector checks it whole, stores it exactly once and
    /// writes the ack bundle the agent takes back (`weilan-agent journal import-ack`).
    /// Exit 1 when it is refused (the reason names the line and record).
    Import {
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
        /// The journal bundles (`weilan-journal-….bundle`), imported in the order
        /// given; each one's ack bundle is written beside it (`….acks`).
        #[arg(required = true)]
        bundles: Vec<PathBuf>,
        /// How long to wait for the running collector to import each.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
    },
    /// Follow the alert log.
    Tail(TailArgs),
    /// List the fleet: state, last event, versions, backlog.
    Agents {
        #[command(subcommand)]
        action: Option<AgentsAction>,
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
        /// JSON lines for machines.
        #[arg(long)]
        json: bool,
    },
    /// Refused payloads per source (agent or door controller named by the topic):
    /// how many, how many bytes, when, the last reason, and how many are still kept
    /// as evidence (the newest 1 000 per source).
    Quarantine {
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
        /// JSON lines for machines.
        #[arg(long)]
        json: bool,
    },
    /// Issue a temporary unlock token for one device on one agent (signed by the
    /// collector; the agent verifies it offline). Writes it to --out and/or sends it.
    Unlock(UnlockArgs),
    /// Send a signed command to an agent (authenticated, bound to the agent, expiring,
    /// never executed twice); the agent reports a command.result event.
    #[command(name = "command")]
    Order {
        #[arg(long, default_value = "/etc/weilan/collector.toml")]
        config: PathBuf,
        #[arg(long)]
        agent: String,
        /// Who asks and why (travels with the command and its result).
        #[arg(long)]
        reason: String,
        /// Seconds the command stays valid.
        #[arg(long, default_value_t = 600)]
        valid_secs: i64,
        #[command(subcommand)]
        action: CommandCli,
    },
    /// Print the Mosquitto ACL for collectors sharing the ingest and districts
    /// forwarding to this province: the shipped `weilan.acl` with each further
    /// collector's and district's own block (docs/deployment.md §10, §12).
    BrokerAcl {
        /// A further collector's name (`pki issue-collector`); repeat for each.
        #[arg(long = "collector")]
        collectors: Vec<String>,
        /// A district allowed to forward to this province (`pki issue-district`,
        /// docs/deployment.md §12); repeat for each.
        #[arg(long = "district")]
        districts: Vec<String>,
    },
    /// Manage the Weilan PKI (CA, broker and agent certificates).
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Enrollment tokens: agents trade one (with a key they made) for their certificate.
    Enroll {
        #[command(subcommand)]
        command: EnrollCommand,
    },
    /// Badge roster helpers.
    Roster {
        #[command(subcommand)]
        command: RosterCommand,
    },
    /// Print the documented example settings.
    PrintDefaultConfig,
}

#[derive(clap::Args)]
struct UnlockArgs {
    #[arg(long, default_value = "/etc/weilan/collector.toml")]
    config: PathBuf,
    /// The agent id (its certificate's common name).
    #[arg(long)]
    agent: String,
    /// Device identity hash (from usb.attached / usb.decision).
    #[arg(long)]
    hash: Option<String>,
    /// Device serial (with --vid-pid: a serial alone is no identity).
    #[arg(long)]
    serial: Option<String>,
    /// The device's vid:pid (VVVV:PPPP), required with --serial.
    #[arg(long)]
    vid_pid: Option<String>,
    /// allow or read-only.
    #[arg(long, default_value = "allow")]
    mode: String,
    /// How long it is valid, from now.
    #[arg(long, default_value_t = 60)]
    minutes: u64,
    /// Seconds instead of minutes (short tests).
    #[arg(long)]
    seconds: Option<u64>,
    /// Who asks and why; audited with every decision the token makes.
    #[arg(long)]
    reason: String,
    /// Write the token here (for `weilan-agent unlock --token FILE`, e.g. offline).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Send it to the agent now, as a signed command (through the running collector).
    #[arg(long)]
    send: bool,
}

#[derive(clap::Args)]
struct TailArgs {
    /// The alert log (default: the one named in the collector settings).
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, default_value = "/etc/weilan/collector.toml")]
    config: PathBuf,
    /// Minimum level: red, yellow or blue.
    #[arg(long)]
    level: Option<String>,
    #[arg(long)]
    agent: Option<String>,
    /// Rule id or prefix.
    #[arg(long)]
    rule: Option<String>,
    /// Print JSON lines for machines.
    #[arg(long)]
    json: bool,
    /// Print what is there and exit instead of following.
    #[arg(long)]
    no_follow: bool,
    /// Only alerts from then on, reading rotated files too: a time
    /// (`2026-11-21T08:00:00Z`, `2026-11-21 08:00` local) or a span back (`2h`, `7d`).
    #[arg(long)]
    since: Option<String>,
    /// Print counts by level, rule and agent for the selection, then exit.
    #[arg(long)]
    summary: bool,
}

#[derive(Subcommand)]
enum AgentsAction {
    /// Revoke every certificate of an agent: its payloads are refused (red alert) from
    /// now on, and the CRL for external brokers (`crl.pem` beside the CA) is rewritten —
    /// install it where the broker's `crlfile` points and reload the broker.
    Revoke {
        id: String,
        /// Why (kept in the registry).
        #[arg(long)]
        reason: String,
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum EnrollCommand {
    /// Make single-use tokens, printed one a line (kept only as digests): give each to
    /// one workstation for `weilan-agent enroll --collector HOST --token TOKEN`.
    Create {
        /// How many tokens.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// How long they stay valid (30m, 24h, 7d).
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Host groups the enrolled agents get (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Allow these tokens to re-enroll this already enrolled id (its old
        /// certificates are revoked); without it an enrolled id is refused.
        #[arg(long)]
        replace: Option<String>,
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum RosterCommand {
    /// Read card numbers from standard input, one per line, and print the roster's
    /// `id_hash` for each (with the last four digits); numbers stay out of argv.
    Hash {
        /// The site's badge key file (the door agents' `[door] badge_key`).
        #[arg(long)]
        key: PathBuf,
    },
}

#[derive(Subcommand)]
enum CommandCli {
    /// Block a device (by identity hash) regardless of policy, for the agent's run.
    BlockDevice {
        #[arg(long)]
        hash: String,
    },
    /// Make a device (by identity hash) read-only.
    ReadOnly {
        #[arg(long)]
        hash: String,
    },
    /// Move a file into the agent's evidence store, if it still has this SHA-256.
    QuarantineFile {
        #[arg(long)]
        path: String,
        #[arg(long)]
        sha256: String,
    },
    /// End a process (SIGTERM, then SIGKILL), if it still runs this executable.
    KillProcess {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        exe: String,
    },
    /// Ask the agent to report its host inventory now.
    Inventory,
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the CA, the broker certificate and the collector's client certificate.
    Init {
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
        /// Names the broker certificate carries (DNS names or IP addresses).
        #[arg(long = "name", default_values = ["weilan-collector", "localhost", "127.0.0.1"])]
        names: Vec<String>,
    },
    /// Issue an agent certificate; its common name is the agent id.
    IssueAgent {
        name: String,
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
    /// Issue the certificate of a further collector sharing the ingest
    /// (`broker.shared_group`, docs/deployment.md §10); its name is its broker user.
    IssueCollector {
        /// `weilan-collector-` and a suffix, e.g. `weilan-collector-b`.
        name: String,
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
    /// Issue a district collector's certificate for this province (federation,
    /// docs/deployment.md §12); its name is its broker user and topic level.
    IssueDistrict {
        /// `weilan-district-` and a suffix, e.g. `weilan-district-east`.
        name: String,
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
    /// Rewrite the CRL (`crl.pem`) from the registry's revocations.
    Crl {
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
    /// Issue a door controller certificate (docs/protocol.md, "Door controllers").
    IssueDoorController {
        name: String,
        #[arg(long, default_value = "/etc/weilan/pki")]
        dir: PathBuf,
    },
}

fn load(config: &std::path::Path) -> Result<CollectorSettings, ExitCode> {
    weilan_config::runtime::load_or_exit::<CollectorFile>(config)
}

/// Runs the command line given in `args` (including the program name).
pub fn main(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let cli: Cli = match weilan_config::runtime::parse_cli(args) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::PrintDefaultConfig => print_default_config_command(),
        Command::CheckConfig {
            config,
            service_user,
        } => check_config_command(config, service_user),
        Command::Rules { config, json } => rules_command(config, json),
        Command::CheckRules { dir, no_builtin } => check_rules_command(dir, no_builtin),
        Command::Export(args) => export_command(args),
        Command::VerifyExport { dir, ca, config } => verify_export_command(dir, ca, config),
        Command::Tail(args) => tail_command(args),
        Command::Unlock(args) => unlock_command(args),
        Command::Order {
            config,
            agent,
            reason,
            valid_secs,
            action,
        } => order_command(config, agent, reason, valid_secs, action),
        Command::Quarantine { config, json } => quarantine_command(config, json),
        Command::Import {
            config,
            bundles,
            wait_secs,
        } => import_command(config, bundles, wait_secs),
        Command::Agents {
            action: Some(AgentsAction::Revoke { id, reason, dir }),
            ..
        } => agents_revoke_command(id, reason, dir),
        Command::Agents {
            action: None,
            config,
            json,
        } => agents_list_command(config, json),
        Command::Roster {
            command: RosterCommand::Hash { key },
        } => roster_hash_command(key),
        Command::Enroll {
            command:
                EnrollCommand::Create {
                    count,
                    ttl,
                    groups,
                    replace,
                    dir,
                },
        } => enroll_create_command(count, ttl, groups, replace, dir),
        Command::Pki { command } => pki_command(command),
        Command::BrokerAcl {
            collectors,
            districts,
        } => match crate::broker::acl_for_collectors(&collectors)
            .and_then(|acl| crate::broker::acl_for_districts(acl, &districts))
        {
            Ok(acl) => {
                print!("{acl}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("broker-acl: {e}");
                ExitCode::from(64)
            }
        },
        Command::Serve { config } => serve_command(config),
    }
}

fn print_default_config_command() -> ExitCode {
    print!("{}", weilan_config::examples::COLLECTOR_TOML);
    ExitCode::SUCCESS
}

fn check_config_command(config: PathBuf, service_user: String) -> ExitCode {
    match load(&config) {
        Ok(s) => {
            let report = crate::preflight::check(&s, Some(service_user.as_str()));
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            for p in &report.problems {
                eprintln!("{p}");
            }
            if !report.problems.is_empty() {
                eprintln!(
                    "{}: {} problem(s); `serve` would not start as configured",
                    config.display(),
                    report.problems.len()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            println!(
                "{}: ok; policy version {}, {} rules, PKI checked{}",
                config.display(),
                report.policy_version.as_deref().unwrap_or("?"),
                report.rules,
                report
                    .checked_as
                    .map(|u| format!(" (readable by the service user `{u}`)"))
                    .unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn rules_command(config: PathBuf, json: bool) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match crate::rules::RuleSet::load(settings.rules_builtin, settings.rules_dir.as_deref()) {
        Ok(set) => {
            print_rules(&set, json);
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprint!("{e}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn check_rules_command(dir: PathBuf, no_builtin: bool) -> ExitCode {
    // A typo in the path must not pass as "no site rules".
    if !dir.is_dir() {
        eprintln!("{}: not a directory (no rule was checked)", dir.display());
        return ExitCode::from(EXIT_CONFIG);
    }
    match crate::rules::RuleSet::load(!no_builtin, Some(&dir)) {
        Ok(set) => {
            println!(
                "{}: ok; {} rules in force from {} files",
                dir.display(),
                set.rules().count(),
                set.files.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprint!("{e}");
            }
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn export_command(args: ExportArgs) -> ExitCode {
    let settings = match load(&args.config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match run_export(&settings, args) {
        Ok(s) => {
            println!(
                "exported {} events and {} alerts to {} (manifest SHA-256 {}{})",
                s.events,
                s.alerts,
                s.dir.display(),
                s.manifest_sha256,
                s.previous
                    .map(|p| format!(", chained to {p}"))
                    .unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("export: {e}");
            ExitCode::FAILURE
        }
    }
}

fn verify_export_command(dir: PathBuf, ca: Option<PathBuf>, config: PathBuf) -> ExitCode {
    let ca = match ca {
        Some(ca) => ca,
        None => match load(&config) {
            Ok(s) => s.ca,
            Err(code) => return code,
        },
    };
    let verifier = match weilan_config::signing::Verifier::from_ca_file(&ca) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("verify-export: {}: {e}", ca.display());
            return ExitCode::FAILURE;
        }
    };
    match crate::export::verify::verify(&dir, &verifier) {
        Ok(v) => {
            println!(
                "ok: {} export(s), {} files, signed by {}: {}",
                v.exports.len(),
                v.files,
                v.signer,
                v.exports.join(" <- ")
            );
            for n in v.notes {
                println!("note: {n}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("verify-export: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn tail_command(args: TailArgs) -> ExitCode {
    let TailArgs {
        file,
        config,
        level,
        agent,
        rule,
        json,
        no_follow,
        since,
        summary,
    } = args;
    let path = match file {
        Some(f) => f,
        None => match load(&config) {
            Ok(s) => s.alerts_path,
            Err(code) => return code,
        },
    };
    let min_level = match level.as_deref().map(|l| (l, Level::parse(l))) {
        None => None,
        Some((_, Some(l))) => Some(l),
        Some((l, None)) => {
            eprintln!("--level: `{l}` is not red, yellow or blue");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let since = match since.as_deref().map(tail::parse_since).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("--since: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let opts = TailOptions {
        path,
        follow: !no_follow,
        since,
        summary,
        json,
        min_level,
        agent,
        rule,
        color: std::io::stdout().is_terminal(),
    };
    match tail::tail(&opts, &mut std::io::stdout().lock(), || false) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}: {e}", opts.path.display());
            ExitCode::FAILURE
        }
    }
}

fn unlock_command(args: UnlockArgs) -> ExitCode {
    let UnlockArgs {
        config,
        agent,
        hash,
        serial,
        vid_pid,
        mode,
        minutes,
        seconds,
        reason,
        out,
        send,
    } = args;
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let issued = crate::unlock::issue(
        &settings,
        &agent,
        hash,
        serial,
        vid_pid,
        &mode,
        seconds.unwrap_or(minutes * 60),
        &reason,
        out.as_deref(),
        send,
    );
    weilan_config::runtime::print_outcome(issued, "unlock")
}

fn order_command(
    config: PathBuf,
    agent: String,
    reason: String,
    valid_secs: i64,
    action: CommandCli,
) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let action = match action {
        CommandCli::BlockDevice { hash } => {
            weilan_config::wire::CommandAction::BlockDevice { device_hash: hash }
        }
        CommandCli::ReadOnly { hash } => {
            weilan_config::wire::CommandAction::SetDeviceReadOnly { device_hash: hash }
        }
        CommandCli::QuarantineFile { path, sha256 } => {
            weilan_config::wire::CommandAction::QuarantineFile { path, sha256 }
        }
        CommandCli::KillProcess { pid, exe } => {
            weilan_config::wire::CommandAction::KillProcess { pid, exe }
        }
        CommandCli::Inventory => weilan_config::wire::CommandAction::RequestInventory,
    };
    let sent = crate::unlock::send_command(&settings, &agent, action, &reason, valid_secs)
        .map(|seq| format!("command {seq} sent to {agent} by the running collector; its result arrives as a command.result event"));
    weilan_config::runtime::print_outcome(sent, "command")
}

fn import_command(config: PathBuf, bundles: Vec<PathBuf>, wait_secs: u64) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let wait = std::time::Duration::from_secs(wait_secs);
    let mut failed = false;
    for bundle in bundles {
        let result = crate::import::spool_and_wait(&settings.store_path, &bundle, wait)
            .and_then(|(outcome, acks)| import_report(&bundle, outcome, acks));
        if let Err(e) = &result {
            failed = true;
            eprintln!("import: {e}");
        } else if let Ok(text) = result {
            println!("{text}");
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What `import` says of one bundle; its ack bundle is copied beside it.
fn import_report(
    bundle: &std::path::Path,
    outcome: crate::import::ImportOutcome,
    acks: Option<PathBuf>,
) -> Result<String, String> {
    if outcome.status == crate::import::ImportStatus::Refused {
        return Err(format!(
            "{}: refused, nothing stored (agent `{}`): {}",
            bundle.display(),
            outcome.agent_id.as_deref().unwrap_or("?"),
            outcome.reason.as_deref().unwrap_or("?")
        ));
    }
    let mut text = format!(
        "{}: {} from `{}`: {} records in {} batches; stored {}, already stored {}, refused {}; {} batches acknowledged",
        bundle.display(),
        outcome.status,
        outcome.agent_id.as_deref().unwrap_or("?"),
        outcome.records,
        outcome.batches,
        outcome.stored,
        outcome.duplicates,
        outcome.rejected,
        outcome.acknowledged
    );
    if let Some(acks) = acks {
        let to = bundle.with_extension("acks");
        std::fs::copy(&acks, &to).map_err(|e| format!("{}: {e}", to.display()))?;
        text.push_str(&format!(
            "\nack bundle: {} (take it back: weilan-agent journal import-ack)",
            to.display()
        ));
    }
    if let Some(reason) = outcome.reason {
        text.push_str(&format!("\n{reason}"));
    }
    Ok(text)
}

fn quarantine_command(config: PathBuf, json: bool) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rows = crate::store::Store::open_at(&crate::db::Location::of(&settings))
        .and_then(|mut s| s.quarantine_summary());
    match rows {
        Ok(rows) => {
            if !json {
                println!(
                    "{:<24} {:>9} {:>12} {:>6}  {:<28} last reason",
                    "source", "refused", "bytes", "kept", "last"
                );
            }
            for r in rows {
                if json {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                } else {
                    println!(
                        "{:<24} {:>9} {:>12} {:>6}  {:<28} {}",
                        r.source, r.refused, r.bytes, r.kept, r.last_at, r.last_reason
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quarantine: {e}");
            ExitCode::FAILURE
        }
    }
}

fn agents_revoke_command(id: String, reason: String, dir: PathBuf) -> ExitCode {
    match crate::registry::revoke(&PkiPaths::new(&dir), &id, &reason) {
        Ok(revoked) if revoked.is_empty() => {
            eprintln!("revoke: `{id}` has no valid certificate in the registry");
            ExitCode::FAILURE
        }
        Ok(revoked) => {
            for e in &revoked {
                println!(
                    "revoked `{id}` certificate {} (serial {}, {}); CRL {}",
                    &e.fingerprint[..16],
                    e.serial,
                    e.role,
                    crate::registry::crl_path(&PkiPaths::new(&dir)).display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("revoke: {e}");
            ExitCode::FAILURE
        }
    }
}

fn agents_list_command(config: PathBuf, json: bool) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rows = crate::store::Store::open_at(&crate::db::Location::of(&settings))
        .map_err(|e| e.to_string())
        .and_then(|mut s| crate::fleet::list(&mut s).map_err(|e| e.to_string()));
    // Certificate expiry from the registry beside the CA.
    let pki_dir = settings
        .ca
        .parent()
        .map(PkiPaths::new)
        .unwrap_or_else(|| PkiPaths::new("."));
    let registry =
        crate::registry::Registry::load(&crate::registry::path(&pki_dir)).unwrap_or_default();
    match rows {
        Ok(mut rows) => {
            for r in &mut rows {
                r.cert_expires = registry.expiry_of(&r.agent_id).map(str::to_string);
            }
            if !json {
                println!(
                    "{:<24} {:<8} {:<28} {:<8} {:<16} {:>8} {:>10}  {:<22} host",
                    "agent",
                    "state",
                    "last event",
                    "version",
                    "policy",
                    "backlog",
                    "events",
                    "certificate ends"
                );
            }
            for r in rows {
                if json {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                } else {
                    println!(
                        "{:<24} {:<8} {:<28} {:<8} {:<16} {:>8} {:>10}  {:<22} {}",
                        r.agent_id,
                        r.state,
                        r.last_event.as_deref().unwrap_or("-"),
                        r.agent_version.as_deref().unwrap_or("-"),
                        r.policy_version.as_deref().unwrap_or("-"),
                        r.backlog.map_or("-".to_string(), |b| b.to_string()),
                        r.events,
                        r.cert_expires
                            .as_deref()
                            .map(|t| t.get(..19).unwrap_or(t))
                            .unwrap_or("not enrolled"),
                        r.hostname.as_deref().unwrap_or("-")
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", settings.store_path.display());
            ExitCode::FAILURE
        }
    }
}

fn roster_hash_command(key: PathBuf) -> ExitCode {
    let key = match weilan_config::badge::read_key(&key, false) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{}: {e}", key.display());
            return ExitCode::FAILURE;
        }
    };
    println!("id_hash,last4");
    for line in std::io::stdin().lines().map_while(Result::ok) {
        let card = line.trim();
        if card.is_empty() {
            continue;
        }
        if !card.bytes().all(|b| b.is_ascii_digit()) {
            eprintln!("skipped a line that is not a card number (digits only)");
            continue;
        }
        println!(
            "{},{}",
            weilan_config::badge::card_hash(&key, card),
            weilan_config::badge::last4(card)
        );
    }
    ExitCode::SUCCESS
}

fn enroll_create_command(
    count: usize,
    ttl: String,
    groups: Vec<String>,
    replace: Option<String>,
    dir: PathBuf,
) -> ExitCode {
    let ttl = match ttl
        .parse::<jiff::Span>()
        .and_then(|s| s.to_duration(jiff::SpanRelativeTo::days_are_24_hours()))
    {
        Ok(d) if d.is_positive() => d,
        _ => {
            eprintln!("--ttl: `{ttl}` is not a duration (30m, 24h, 7d)");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if !(1..=10_000).contains(&count) {
        eprintln!("--count: 1 to 10000");
        return ExitCode::from(EXIT_CONFIG);
    }
    match crate::enroll::create_tokens(&PkiPaths::new(&dir), count, ttl, groups, replace) {
        Ok(tokens) => {
            for t in tokens {
                println!("{t}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("enroll: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pki_command(command: PkiCommand) -> ExitCode {
    let result = match command {
        PkiCommand::Init { dir, names } => {
            let paths = PkiPaths::new(&dir);
            pki::init(&paths, &names).map(|()| {
                println!(
                    "PKI created in {}: ca.pem, server.pem (for {}), collector.pem",
                    dir.display(),
                    pki::server_names(&names).join(", ")
                );
            })
        }
        PkiCommand::Crl { dir } => crate::registry::write_crl(&PkiPaths::new(&dir))
            .map(|p| println!("CRL written: {}", p.display()))
            .map_err(pki::PkiError::from),
        PkiCommand::IssueDoorController { name, dir } => {
            pki::issue_door_controller(&PkiPaths::new(&dir), &name).map(|(c, k)| {
                println!(
                    "door controller `{name}`: certificate {}, key {} (0600)",
                    c.display(),
                    k.display()
                );
            })
        }
        PkiCommand::IssueCollector { name, dir } => {
            pki::issue_collector(&PkiPaths::new(&dir), &name).map(|(c, k)| {
                println!(
                    "collector `{name}`: certificate {}, key {} (0600)",
                    c.display(),
                    k.display()
                );
            })
        }
        PkiCommand::IssueDistrict { name, dir } => pki::issue_district(&PkiPaths::new(&dir), &name)
            .map(|(c, k)| {
                println!(
                    "district `{name}`: certificate {}, key {} (0600)",
                    c.display(),
                    k.display()
                );
            }),
        PkiCommand::IssueAgent { name, dir } => {
            pki::issue_agent(&PkiPaths::new(&dir), &name).map(|(c, k)| {
                println!(
                    "agent `{name}`: certificate {}, key {} (0600)",
                    c.display(),
                    k.display()
                );
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pki: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve_command(config: PathBuf) -> ExitCode {
    let settings = match load(&config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    weilan_config::runtime::init_tracing(&settings.log, "");
    weilan_config::runtime::serve(
        "weilan-collector",
        tokio::runtime::Runtime::new(),
        |shutdown| crate::run(settings, shutdown),
        |e| match e {
            crate::CollectorError::Policy(e) => Some(e.to_string()),
            // What an operator wrote: exit 64 like every configuration error.
            e @ (crate::CollectorError::Rules(_)
            | crate::CollectorError::Roster(_)
            | crate::CollectorError::Sink(_)
            | crate::CollectorError::Registry(_)) => Some(format!("weilan-collector: {e}\n")),
            _ => None,
        },
    )
}

fn print_rules(set: &crate::rules::RuleSet, json: bool) {
    for r in set.rules() {
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "id": r.id, "title": r.title, "level": r.level.as_str(), "tags": r.tags,
                    "on": r.on, "condition": r.condition.as_ref().map(|c| &c.text),
                    "correlated": r.correlation.is_some(), "suppress_secs": r.suppress_secs,
                    "actions": r.actions.len(), "origin": r.origin, "description": r.description,
                })
            );
        } else {
            println!(
                "{:<6} {:<48} {}  [{}] ({})",
                r.level.as_str().to_uppercase(),
                r.id,
                r.title,
                r.on.join(", "),
                r.origin
            );
        }
    }
}

/// A time in the exports' zone (`2026-11-01`, `2026-11-01 08:00`, RFC 3339) or a span back.
fn parse_time(s: &str, tz: &jiff::tz::TimeZone) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    if let Ok(d) = s.parse::<jiff::civil::Date>() {
        return d
            .to_zoned(tz.clone())
            .map(|z| z.timestamp())
            .map_err(|e| e.to_string());
    }
    if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
        return dt
            .to_zoned(tz.clone())
            .map(|z| z.timestamp())
            .map_err(|e| e.to_string());
    }
    tail::parse_since(s)
}

fn run_export(
    settings: &CollectorSettings,
    args: ExportArgs,
) -> Result<crate::export::Summary, String> {
    let ExportArgs {
        from,
        to,
        agents,
        group,
        lang,
        out,
        heartbeats_in_csv,
        ..
    } = args;
    let tz = settings.exports.timezone.clone();
    let from = parse_time(&from, &tz)?;
    let to = match to.as_deref() {
        Some(t) => parse_time(t, &tz)?,
        None => jiff::Timestamp::now(),
    };
    let lang_code = lang.unwrap_or_else(|| settings.exports.language.clone());
    let lang = crate::export::Lang::parse(&lang_code)
        .ok_or_else(|| format!("--lang `{lang_code}` is not zh-CN or en"))?;
    let rules = crate::rules::RuleSet::load(settings.rules_builtin, settings.rules_dir.as_deref())
        .map_err(|e| e.iter().map(|e| e.to_string()).collect::<String>())?;
    let (scope, label) = crate::export::scope(
        &crate::db::Location::of(settings),
        &rules,
        (!agents.is_empty()).then_some(agents),
        group,
    )
    .map_err(|e| e.to_string())?;
    let signer =
        weilan_config::signing::Signer::from_pem_files(&settings.client_cert, &settings.client_key)
            .map_err(|e| e.to_string())?;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} events ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let req = crate::export::Request {
        from,
        to,
        tz,
        agents: scope,
        scope_label: label,
        lang,
        dir: out,
        schedule: None,
        caught_up: false,
        heartbeats_in_csv,
    };
    let result = crate::export::export(
        &crate::db::Location::of(settings),
        &signer,
        &rules,
        &req,
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    );
    bar.finish_and_clear();
    result.map_err(|e| e.to_string())
}
