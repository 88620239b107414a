//! `weilan-collector`: a thin binary over [`weilan_collector::cli`].

fn main() -> std::process::ExitCode {
    weilan_collector::cli::main(std::env::args_os())
}
