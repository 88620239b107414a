//! Process set-up both binaries share: the command line and settings loading (with
//! one exit code for bad input), logging and the shutdown signal.

use tokio_util::sync::CancellationToken;

use crate::settings::LogSettings;

/// Logs to stderr (systemd's journal keeps it), text or JSON. `RUST_LOG` overrides the
/// settings' filter; `extra` is appended to it (e.g. to quieten a dependency).
pub fn init_tracing(log: &LogSettings, extra: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{}{extra}", log.filter)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancels `shutdown` on SIGTERM or SIGINT: the one way a Weilan program stops.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    shutdown.cancel();
}

/// Exit code for bad configuration or usage (`EX_USAGE` from sysexits.h, 64).
pub const EXIT_CONFIG: u8 = 64;

/// Starts a command line (program name first): installs the one TLS provider every
/// connection uses, then parses. `--help`/`--version` print and end with success; a
/// usage error prints and ends with [`EXIT_CONFIG`].
pub fn parse_cli<C: clap::Parser>(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Result<C, std::process::ExitCode> {
    crate::tls::install_default_provider();
    C::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            std::process::ExitCode::from(EXIT_CONFIG)
        } else {
            std::process::ExitCode::SUCCESS
        }
    })
}

/// Loads and validates a settings file; on failure prints every error (with file,
/// line and field) and returns [`EXIT_CONFIG`].
pub fn load_or_exit<T>(path: &std::path::Path) -> Result<T::Valid, std::process::ExitCode>
where
    T: for<'de> eserde::EDeserialize<'de> + crate::load::Validate,
{
    crate::load::load_file::<T>(path).map_err(|e| {
        eprint!("{e}");
        std::process::ExitCode::from(EXIT_CONFIG)
    })
}

/// Runs a program's service until the shutdown signal, on `runtime`: exit 0 when it
/// stops cleanly; [`EXIT_CONFIG`] for an error `config_error` calls the operator's
/// (its text printed as given); 1 for any other error, logged and printed.
pub fn serve<E, F>(
    program: &str,
    runtime: std::io::Result<tokio::runtime::Runtime>,
    service: impl FnOnce(CancellationToken) -> F,
    config_error: impl Fn(&E) -> Option<String>,
) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<(), E>>,
{
    use std::process::ExitCode;
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        match service(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => match config_error(&e) {
                Some(text) => {
                    eprint!("{text}");
                    ExitCode::from(EXIT_CONFIG)
                }
                None => {
                    tracing::error!(error = %e, "{program} failed");
                    eprintln!("{program}: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}

/// A command's result on the terminal: its text on standard output and success, or
/// `failed: error` on standard error and failure.
pub fn print_outcome<T: std::fmt::Display, E: std::fmt::Display>(
    result: Result<T, E>,
    failed: &str,
) -> std::process::ExitCode {
    match result {
        Ok(text) => {
            println!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{failed}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
