//! Transfer tools as they start: scp, sftp, rsync, curl uploads, wget posts, ftp/lftp,
//! nc/ncat/socat, rclone, smbclient → `net.transfer_tool` with the arguments.
//!
//! Process starts come from the kernel's process connector ([`crate::procevents`],
//! `PROC_EVENT_EXEC`; root in the initial namespaces); an overflow is reported, never
//! silent.
//! Recognising a tool from its arguments ([`recognise`]) is pure and unit-tested.

use std::time::Duration;

use weilan_config::event::{Event, NetTransferTool};

use crate::procevents::ProcEvent;
pub use crate::procevents::{ExecOpenError, ProcConnector};
use crate::source::{BoxFuture, Source, SourceContext, SourceError};

/// Which transfer tool `argv` runs, if any. `exe` is the executable's path (its file
/// name may differ from `argv[0]`, e.g. `nc` → `nc.openbsd`).
pub fn recognise(exe: Option<&str>, argv: &[String]) -> Option<&'static str> {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    let names: Vec<String> = exe
        .map(base)
        .into_iter()
        .chain(argv.first().map(|a| base(a)))
        .collect();
    let is = |n: &str| names.iter().any(|x| x == n);
    let args = argv.get(1..).unwrap_or_default();
    let has = |flag: &str| {
        args.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if is("scp") {
        // `scp -t` is the receiving end of someone else's copy; `-f` sends from here.
        return (!has("-t")).then_some("scp");
    }
    if is("sftp") {
        return Some("sftp");
    }
    if is("rsync") {
        // `rsync --server` is the far end of a transfer started elsewhere.
        return (!has("--server")).then_some("rsync");
    }
    if is("curl") {
        return curl_uploads(args).then_some("curl");
    }
    if is("wget") {
        return (has("--post-file") || has("--body-file")).then_some("wget");
    }
    for tool in [
        "ftp",
        "lftp",
        "tftp",
        "ncat",
        "socat",
        "rclone",
        "smbclient",
    ] {
        if is(tool) {
            return Some(tool);
        }
    }
    if ["nc", "netcat", "nc.openbsd", "nc.traditional"]
        .iter()
        .any(|n| is(n))
    {
        return Some("nc");
    }
    None
}

/// Whether curl's arguments send a file: `-T`/`--upload-file`, or data / form
/// options whose value reads a file (`@file`, `name=@file`, `name=<file`).
fn curl_uploads(args: &[String]) -> bool {
    const TAKES_DATA: [&str; 6] = [
        "-d",
        "--data",
        "--data-binary",
        "--data-urlencode",
        "-F",
        "--form",
    ];
    let reads_file = |v: &str| v.starts_with('@') || v.contains("=@") || v.contains("=<");
    args.iter().enumerate().any(|(i, a)| {
        let next = args.get(i + 1).map(String::as_str).unwrap_or("");
        a == "-T"
            || a == "--upload-file"
            || (a.starts_with("-T") && a.len() > 2)
            || a.starts_with("--upload-file=")
            || (TAKES_DATA.contains(&a.as_str()) && reads_file(next))
            || a.split_once('=')
                .is_some_and(|(flag, v)| TAKES_DATA.contains(&flag) && reads_file(v))
            || ((a.starts_with("-d") || a.starts_with("-F")) && a.len() > 2 && reads_file(&a[2..]))
    })
}

/// A source of process starts.
pub trait ExecWatch: Send {
    /// Pids that started a new program since the last call (waits up to ~200 ms).
    /// `Err` on failure; `Ok((pids, true))` when the kernel dropped some.
    fn next(&mut self) -> Result<(Vec<u32>, bool), String>;
}

impl ExecWatch for ProcConnector {
    fn next(&mut self) -> Result<(Vec<u32>, bool), String> {
        let mut events = Vec::new();
        let overflowed = self.recv(true, &mut events)?;
        let pids = events
            .into_iter()
            .filter_map(|e| match e {
                ProcEvent::Exec { pid } => Some(pid),
                _ => None,
            })
            .collect();
        Ok((pids, overflowed))
    }
}

/// Makes the process-start watch for one run.
pub type ExecFactory = Box<dyn Fn() -> Result<Box<dyn ExecWatch>, ExecOpenError> + Send + Sync>;

/// Reports transfer tools as they start.
pub struct ToolsSource {
    watch: std::sync::Arc<ExecFactory>,
}

impl ToolsSource {
    pub fn new(watch: ExecFactory) -> Self {
        ToolsSource {
            watch: std::sync::Arc::new(watch),
        }
    }
}

impl Source for ToolsSource {
    fn name(&self) -> &'static str {
        "transfer-tools"
    }

    fn run<'a>(&'a mut self, ctx: &'a SourceContext) -> BoxFuture<'a, Result<(), SourceError>> {
        Box::pin(async move {
            let factory = self.watch.clone();
            let ctx = ctx.clone();
            tokio::task::spawn_blocking(move || {
                let mut watch = match factory() {
                    Ok(w) => w,
                    Err(ExecOpenError::Failed(e)) => return Err(SourceError::Other(e)),
                    Err(ExecOpenError::Unavailable(e)) => {
                        ctx.sink.report_blocking(
                            "transfer-tools",
                            format!("{e}: transfer tools are not reported"),
                            0,
                        )?;
                        return Ok(());
                    }
                };
                let mut last_overflow_report: Option<std::time::Instant> = None;
                let mut overflows = 0u64;
                while !ctx.shutdown.is_cancelled() {
                    let (pids, overflowed) = watch.next().map_err(SourceError::Other)?;
                    if overflowed {
                        overflows += 1;
                        if last_overflow_report.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                            last_overflow_report = Some(std::time::Instant::now());
                            ctx.sink.report_blocking(
                                "transfer-tools",
                                format!("process-start notifications overflowed ({overflows} times so far): tool starts in those bursts were not seen"),
                                0,
                            )?;
                        }
                    }
                    for pid in pids {
                        if let Some(e) = describe(pid) {
                            ctx.sink.emit_blocking(Event::NetTransferTool(e))?;
                        }
                    }
                }
                Ok(())
            })
            .await
            .map_err(|e| SourceError::Other(format!("transfer-tools watcher: {e}")))?
        })
    }
}

/// `net.transfer_tool` for `pid`, if it runs one.
fn describe(pid: u32) -> Option<NetTransferTool> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string());
    let args = crate::procinfo::args(pid)?;
    let tool = recognise(exe.as_deref(), &args)?;
    let info = crate::procinfo::process(pid);
    Some(NetTransferTool {
        pid,
        tool: tool.into(),
        exe,
        args,
        uid: info.as_ref().and_then(|i| i.uid),
        user: info.and_then(|i| i.user),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(exe: &str, args: &str) -> Option<&'static str> {
        let argv: Vec<String> = args.split_whitespace().map(String::from).collect();
        recognise(Some(exe), &argv)
    }

    #[test]
    fn uploads_are_recognised_and_downloads_are_not() {
        assert_eq!(
            r("/usr/bin/curl", "curl -T report.xlsx https://x/up"),
            Some("curl")
        );
        assert_eq!(
            r("/usr/bin/curl", "curl --data-binary @a.zip https://x"),
            Some("curl")
        );
        assert_eq!(
            r("/usr/bin/curl", "curl -F file=@a.zip https://x"),
            Some("curl")
        );
        assert_eq!(
            r("/usr/bin/curl", "curl -d @body.json https://x"),
            Some("curl")
        );
        assert_eq!(r("/usr/bin/curl", "curl -o page.html https://x"), None);
        assert_eq!(r("/usr/bin/curl", "curl -d name=value https://x"), None);
        assert_eq!(
            r("/usr/bin/wget", "wget --post-file=a.zip https://x"),
            Some("wget")
        );
        assert_eq!(r("/usr/bin/wget", "wget https://x/file"), None);
    }

    #[test]
    fn far_ends_of_transfers_started_elsewhere_are_not_tools() {
        assert_eq!(r("/usr/bin/scp", "scp a.txt host:/tmp"), Some("scp"));
        assert_eq!(r("/usr/bin/scp", "scp -t /tmp"), None);
        assert_eq!(r("/usr/bin/scp", "scp -f /etc/passwd"), Some("scp"));
        assert_eq!(r("/usr/bin/rsync", "rsync -a dir host:/x"), Some("rsync"));
        assert_eq!(
            r("/usr/bin/rsync", "rsync --server -logDtpre.iLsfxCIvu . /x"),
            None
        );
    }

    #[test]
    fn the_executable_or_argv0_names_the_tool() {
        // Debian's nc is nc.openbsd behind an alternatives link.
        assert_eq!(r("/usr/bin/nc.openbsd", "nc 10.0.0.2 9000"), Some("nc"));
        assert_eq!(r("/usr/bin/ncat", "ncat -l 9000"), Some("ncat"));
        assert_eq!(
            r("/usr/bin/rclone", "rclone copy a remote:b"),
            Some("rclone")
        );
        assert_eq!(
            r("/usr/bin/smbclient", "smbclient //srv/share"),
            Some("smbclient")
        );
        assert_eq!(r("/usr/bin/lftp", "lftp ftp://x"), Some("lftp"));
        assert_eq!(r("/usr/bin/cat", "cat file"), None);
    }
}
