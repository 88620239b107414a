//! Process set-up both binaries share: logging and the shutdown signal.

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
