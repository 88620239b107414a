//! `weilan-agent`: a thin binary over [`weilan_agent::cli`].

fn main() -> std::process::ExitCode {
    weilan_agent::cli::main(std::env::args_os())
}
