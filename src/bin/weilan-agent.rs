//! `weilan-agent`: the agent-only program, a thin binary over [`weilan_agent::cli`]. It
//! links none of the collector's code (rules engine, SQLite, broker), which the
//! multi-call `weilan` carries: the Debian agent package ships this one
//! (packaging/deb/build.sh).

fn main() -> std::process::ExitCode {
    weilan_agent::cli::main(std::env::args_os())
}
