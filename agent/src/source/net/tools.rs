//! Transfer tools as they start: scp, sftp, rsync, curl uploads, wget posts, ftp/lftp,
//! nc/ncat/socat, rclone, smbclient → `net.transfer_tool` with the arguments.
//!
//! Process starts come from the kernel's process connector (netlink, `PROC_EVENT_EXEC`;
//! root in the initial namespaces). The one crate wrapping it (`cnproc` 0.2) loops
//! forever on an error message and hides overflows, so the few fixed-layout messages
//! are read here over `netlink-sys`; an overflow is reported, never silent.
//! Recognising a tool from its arguments ([`recognise`]) is pure and unit-tested.

use std::time::Duration;

use netlink_sys::protocols::NETLINK_CONNECTOR;
use netlink_sys::{Socket, SocketAddr as NlAddr};
use weilan_config::event::{Event, NetTransferTool};

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

/// Process-connector constants (`linux/cn_proc.h`, `linux/connector.h`).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;

/// A source of process starts.
pub trait ExecWatch: Send {
    /// Pids that started a new program since the last call (waits up to ~200 ms).
    /// `Err` on failure; `Ok((pids, true))` when the kernel dropped some.
    fn next(&mut self) -> Result<(Vec<u32>, bool), String>;
}

/// The kernel's process connector.
pub struct ProcConnector {
    sock: Socket,
    buf: Vec<u8>,
}

impl ProcConnector {
    pub fn open() -> Result<Self, ExecOpenError> {
        let fail = |what: &str, e: std::io::Error| {
            let msg = format!("process connector {what}: {e}");
            if e.raw_os_error() == Some(libc::ECONNREFUSED)
                || e.raw_os_error() == Some(libc::EPROTONOSUPPORT)
            {
                ExecOpenError::Unavailable(format!(
                    "{msg} (the kernel offers it in the initial network namespace only)"
                ))
            } else {
                ExecOpenError::Failed(msg)
            }
        };
        let mut sock = Socket::new(NETLINK_CONNECTOR).map_err(|e| fail("socket", e))?;
        sock.bind(&NlAddr::new(0, CN_IDX_PROC))
            .map_err(|e| fail("bind", e))?;
        let fd = &sock;
        let _ = nix::sys::socket::setsockopt(
            fd,
            nix::sys::socket::sockopt::RcvBufForce,
            &(4usize << 20),
        );
        nix::sys::socket::setsockopt(
            fd,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 200_000),
        )
        .map_err(|e| fail("timeout", std::io::Error::from(e)))?;
        let mut msg = Vec::with_capacity(NLMSG_HDRLEN + CN_MSG_LEN + 4);
        let total = (NLMSG_HDRLEN + CN_MSG_LEN + 4) as u32;
        msg.extend_from_slice(&total.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
        msg.extend_from_slice(&0u16.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
        msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
        msg.extend_from_slice(&4u16.to_ne_bytes()); // len
        msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
        msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
        sock.send_to(&msg, &NlAddr::new(0, 0), 0)
            .map_err(|e| fail("listen", e))?;
        Ok(ProcConnector {
            sock,
            buf: vec![0u8; 64 << 10],
        })
    }
}

/// The exec'ing process in one connector message, if it is an exec event.
pub fn parse_exec(msg: &[u8]) -> Option<u32> {
    let u32_at = |o: usize| {
        msg.get(o..o + 4)
            .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    };
    let data = NLMSG_HDRLEN + CN_MSG_LEN;
    if u32_at(NLMSG_HDRLEN)? != CN_IDX_PROC || u32_at(NLMSG_HDRLEN + 4)? != CN_VAL_PROC {
        return None;
    }
    if u32_at(data)? != PROC_EVENT_EXEC {
        return None;
    }
    // struct proc_event: what, cpu, timestamp_ns (u64), then exec { pid, tgid }.
    u32_at(data + 16 + 4)
}

impl ExecWatch for ProcConnector {
    fn next(&mut self) -> Result<(Vec<u32>, bool), String> {
        let mut pids = Vec::new();
        let mut overflowed = false;
        match self.sock.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => {
                let mut off = 0;
                while off + NLMSG_HDRLEN <= n {
                    let len =
                        u32::from_ne_bytes(self.buf[off..off + 4].try_into().unwrap()) as usize;
                    if len < NLMSG_HDRLEN || off + len > n {
                        break;
                    }
                    if let Some(pid) = parse_exec(&self.buf[off..off + len]) {
                        pids.push(pid);
                    }
                    off += (len + 3) & !3;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => overflowed = true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("process connector: {e}")),
        }
        Ok((pids, overflowed))
    }
}

/// Why the process-start watch could not be opened.
#[derive(Debug)]
pub enum ExecOpenError {
    /// Not available where the agent runs (outside the initial network namespace the
    /// kernel refuses the connector): said once, not retried.
    Unavailable(String),
    Failed(String),
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

    #[test]
    fn connector_messages_are_read_by_layout() {
        let mut m = vec![0u8; 16 + 20 + 16 + 8];
        m[16..20].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
        m[20..24].copy_from_slice(&CN_VAL_PROC.to_ne_bytes());
        m[36..40].copy_from_slice(&PROC_EVENT_EXEC.to_ne_bytes());
        m[52..56].copy_from_slice(&4242u32.to_ne_bytes());
        m[56..60].copy_from_slice(&4242u32.to_ne_bytes());
        assert_eq!(parse_exec(&m), Some(4242));
        m[36..40].copy_from_slice(&1u32.to_ne_bytes()); // fork
        assert_eq!(parse_exec(&m), None);
        assert_eq!(parse_exec(&m[..30]), None);
    }
}
