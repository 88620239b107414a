//! The host-access source: follows the journal (where systemd runs), the auth log, or
//! as the last fallback the wtmp login record (sessions only), and reports `access.login`, `access.logout`, `access.login_failed` and
//! `access.privilege`, each saying which it read.
//!
//! Its place in each stream is kept in the state directory (`access-position`: the
//! journal cursor, or the auth log's inode and offset), so lines written while the
//! agent was stopped are read when it starts again.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::authlog::{Follower, Start};
use super::changes::{FileChanges, Wake};
use super::{journal, parse};
use crate::source::{
    sleep_unless_cancelled, BoxFuture, EventSink, Source, SourceContext, SourceError,
};
use weilan_config::settings::agent::AccessFrom;

/// Settings of [`AccessSource`].
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// `auto`, `journal` or `auth-log`.
    pub from: AccessFrom,
    pub auth_logs: Vec<PathBuf>,
    pub wtmp: PathBuf,
    pub poll: Duration,
    pub state_dir: PathBuf,
}

pub struct AccessSource {
    config: AccessConfig,
}

impl AccessSource {
    pub fn new(config: AccessConfig) -> Self {
        AccessSource { config }
    }
}

/// Where the events come from, as chosen at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    Journal,
    AuthLog(PathBuf),
    Utmp(PathBuf),
}

/// `auto`: the journal when systemd's journal socket exists and `journalctl` can be
/// run, else the first auth log that exists, else wtmp if it exists.
pub fn choose(config: &AccessConfig) -> Option<Stream> {
    let journal_ok = || {
        Path::new("/run/systemd/journal/socket").exists()
            && Command::new("journalctl")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    };
    let auth_log = || config.auth_logs.iter().find(|p| p.exists()).cloned();
    let wtmp = || {
        config
            .wtmp
            .exists()
            .then(|| Stream::Utmp(config.wtmp.clone()))
    };
    match config.from {
        AccessFrom::Journal => Some(Stream::Journal),
        AccessFrom::AuthLog => auth_log().map(Stream::AuthLog),
        AccessFrom::Utmp => wtmp(),
        AccessFrom::Auto if journal_ok() => Some(Stream::Journal),
        AccessFrom::Auto => auth_log().map(Stream::AuthLog).or_else(wtmp),
    }
}

fn position_file(state_dir: &Path) -> PathBuf {
    state_dir.join("access-position")
}

/// The saved `(inode, offset)` of a file stream (`auth-log` or `utmp`), if the saved
/// position is of that stream.
fn saved_file_position(state_dir: &Path, stream: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(position_file(state_dir)).ok()?;
    let mut w = text.strip_prefix(stream)?.split_whitespace();
    Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
}

fn save_file_position(state_dir: &Path, stream: &str, (ino, offset): (u64, u64)) {
    save_position(state_dir, &format!("{stream} {ino} {offset}"));
}

/// Writes the position atomically (a torn file would restart from the end).
fn save_position(state_dir: &Path, text: &str) {
    let path = position_file(state_dir);
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .is_err()
    {
        tracing::warn!(path = %path.display(), "access position not saved");
    }
}

fn emit_parsed(
    sink: &EventSink,
    program: &str,
    message: &str,
    source: &str,
) -> Result<(), SourceError> {
    if let Some(e) = parse::parse_message(program, message, source) {
        sink.emit_blocking(e)?;
    }
    Ok(())
}

fn report(sink: &EventSink, error: String) -> Result<(), SourceError> {
    sink.report_blocking("access", error, 0)
}

fn follow_auth_log(
    config: &AccessConfig,
    path: &Path,
    ctx: &SourceContext,
) -> Result<(), SourceError> {
    let start = saved_file_position(&config.state_dir, "auth-log")
        .map_or(Start::End, |(ino, offset)| Start::At { ino, offset });
    let mut f = Follower::new(path, start);
    let mut changes = FileChanges::new(path);
    let (mut truncations, mut cut) = (0, 0);
    tracing::info!(path = %path.display(), "following the auth log");
    while !ctx.shutdown.is_cancelled() {
        let lines = f.read_new().map_err(|e| SourceError::Io {
            what: path.display().to_string(),
            source: e,
        })?;
        for line in &lines {
            if let Some((program, _, message)) = parse::split_syslog_line(line) {
                emit_parsed(&ctx.sink, program, message.trim_start(), "auth-log")?;
            }
        }
        if !lines.is_empty() {
            save_file_position(&config.state_dir, "auth-log", f.position());
        }
        if f.truncations > truncations || f.cut_lines > cut {
            truncations = f.truncations;
            cut = f.cut_lines;
            report(
                &ctx.sink,
                format!(
                    "{}: truncated in place {truncations} times (lines written between a copy and its truncation are lost to every reader), {cut} over-long lines cut",
                    path.display()
                ),
            )?;
        }
        // More may be waiting (a burst past the read limit, the rest of a rotated
        // file): read again at once; else sleep until the file changes.
        if lines.is_empty() && changes.wait(&ctx.shutdown, config.poll) == Wake::Shutdown {
            break;
        }
    }
    Ok(())
}

fn follow_wtmp(config: &AccessConfig, path: &Path, ctx: &SourceContext) -> Result<(), SourceError> {
    let start = saved_file_position(&config.state_dir, "utmp");
    let mut f = super::utmp::WtmpFollower::new(path, start);
    let mut changes = FileChanges::new(path);
    tracing::info!(path = %path.display(), "following wtmp (sessions only: no failures, no sudo)");
    while !ctx.shutdown.is_cancelled() {
        let events = f.read_new().map_err(|e| SourceError::Io {
            what: path.display().to_string(),
            source: e,
        })?;
        let any = !events.is_empty();
        for e in events {
            ctx.sink.emit_blocking(e)?;
        }
        if any {
            save_file_position(&config.state_dir, "utmp", f.position());
        }
        // Records past the read limit wait: read again at once (logouts of processes
        // the agent does not report give no events, so the position says it).
        let behind = std::fs::metadata(path)
            .is_ok_and(|m| m.len().saturating_sub(f.position().1) >= super::utmp::RECORD);
        if !behind && changes.wait(&ctx.shutdown, config.poll) == Wake::Shutdown {
            break;
        }
    }
    Ok(())
}

fn follow_journal(config: &AccessConfig, ctx: &SourceContext) -> Result<(), SourceError> {
    let saved = std::fs::read_to_string(position_file(&config.state_dir)).ok();
    let cursor = saved
        .as_deref()
        .and_then(|t| t.strip_prefix("journal "))
        .map(str::trim);
    let mut child = Command::new("journalctl")
        .args(journal::journalctl_args(cursor))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| SourceError::Io {
            what: "journalctl".into(),
            source: e,
        })?;
    let stdout = child.stdout.take().expect("piped");
    // journalctl blocks on its pipe; shutdown kills it, which ends the read loop.
    let shutdown = ctx.shutdown.clone();
    let pid = child.id();
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::spawn(move || {
        // In the runtime, the wait sleeps until shutdown (no wake-ups while idle).
        let _in_runtime = runtime.as_ref().map(|r| r.enter());
        while sleep_unless_cancelled(&shutdown, Duration::from_secs(3600)) {}
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    });
    tracing::info!("following the journal");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.map_err(|e| SourceError::Io {
            what: "journalctl output".into(),
            source: e,
        })?;
        match journal::parse_entry(&line) {
            Some(entry) => {
                emit_parsed(&ctx.sink, &entry.program, &entry.message, "journal")?;
                save_position(&config.state_dir, &format!("journal {}", entry.cursor));
            }
            None => tracing::debug!(line = %line, "journal line without an entry"),
        }
    }
    let _ = child.wait();
    if ctx.shutdown.is_cancelled() {
        Ok(())
    } else {
        Err(SourceError::Other("journalctl ended".into()))
    }
}

impl Source for AccessSource {
    fn name(&self) -> &'static str {
        "access"
    }

    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let config = self.config.clone();
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || match choose(&config) {
                Some(Stream::Journal) => follow_journal(&config, &ctx),
                Some(Stream::AuthLog(path)) => follow_auth_log(&config, &path, &ctx),
                Some(Stream::Utmp(path)) => follow_wtmp(&config, &path, &ctx),
                None => {
                    // Said once; the source then ends (nothing to restart into).
                    report(
                        &ctx.sink,
                        format!(
                            "no journal, none of {:?} and no {}: logins are not reported",
                            config.auth_logs,
                            config.wtmp.display()
                        ),
                    )?;
                    Ok(())
                }
            })
            .await
            .map_err(|e| SourceError::Other(format!("access source: {e}")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use weilan_config::event::Event;

    #[test]
    fn auth_log_lines_become_events_and_the_position_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("auth.log");
        std::fs::write(
            &log,
            "Nov 22 05:00:00 srv sshd[1]: Accepted publickey for old from 10.0.0.1 port 1 ssh2\n",
        )
        .unwrap();
        let config = AccessConfig {
            from: AccessFrom::AuthLog,
            auth_logs: vec![dir.path().join("missing"), log.clone()],
            wtmp: dir.path().join("no-wtmp"),
            poll: Duration::from_millis(20),
            state_dir: dir.path().to_path_buf(),
        };
        assert_eq!(choose(&config), Some(Stream::AuthLog(log.clone())));
        let run = |lines: &str| {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            let shutdown = tokio_util::sync::CancellationToken::new();
            let ctx = SourceContext {
                sink: EventSink::new(tx, Arc::new(AtomicU64::new(0))),
                shutdown: shutdown.clone(),
            };
            let mut source = AccessSource::new(config.clone());
            let task = rt.spawn(async move { source.run(&ctx).await.map_err(|e| e.to_string()) });
            std::thread::sleep(Duration::from_millis(100));
            let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            std::io::Write::write_all(&mut f, lines.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            shutdown.cancel();
            rt.block_on(task).unwrap().unwrap();
            let mut out = Vec::new();
            while let Ok(o) = rx.try_recv() {
                out.push(o.event);
            }
            out
        };
        let first = run("Nov 22 05:01:00 srv sudo:    alice : TTY=pts/0 ; PWD=/ ; USER=root ; COMMAND=/usr/bin/id\nNov 22 05:01:01 srv cron[2]: unrelated\n");
        assert_eq!(
            first.len(),
            1,
            "history before the first start is not replayed: {first:?}"
        );
        assert!(
            matches!(&first[0], Event::AccessPrivilege(p) if p.user == "alice" && p.source == "auth-log")
        );
        // Written while the agent was stopped: read at the next start.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"Nov 22 05:02:00 srv sshd[3]: Failed publickey for root from 10.0.0.9 port 7 ssh2: ED25519 x\n"))
            .unwrap();
        let second = run("");
        assert_eq!(second.len(), 1, "{second:?}");
        assert!(
            matches!(&second[0], Event::AccessLoginFailed(f) if f.remote_addr.as_deref() == Some("10.0.0.9"))
        );
    }
}
