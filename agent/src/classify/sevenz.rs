//! 7z archives, unpacked in a child process that may fail but cannot hurt the agent.
//!
//! Why a process: `sevenz-rust2` sizes its buffers from the archive's own header — the
//! header itself, the encoded header's unpacked size, each coder's dictionary (up to
//! 4 GiB, zero-filled) — before anything could check them, and in Rust an allocation
//! that fails aborts the whole process. A user who can copy a crafted 7z onto a stick
//! must not be able to stop the fence that way. So the agent runs its own program again
//! as `weilan-agent unpack-7z` (hidden; argv\[0\] `weilan-agent`, so the multi-call
//! `weilan` dispatches it too), which confines itself before it reads a byte: address
//! space [`HELPER_MEMORY`], CPU seconds, no files written, a high OOM score; every
//! capability dropped (the agent's root privileges are not the child's); and a Landlock
//! ruleset with nothing allowed — no file opened, created or executed, no TCP, no
//! signal or abstract socket outside it — so a decoder bug that ran code would find
//! the agent's keys and the host out of reach ([`confine_myself`]; `weilan-agent
//! unpack-7z --check-confinement` shows what holds on a host). It inherits no
//! descriptors (std opens everything close-on-exec) and an empty environment, and it
//! is killed at the time limit. At most [`MAX_HELPERS`] run at once; a third waits its turn.
//!
//! The child only decompresses: it reads the archive from stdin and answers on stdout
//! with [`Frame`]s — each entry's bytes (within the inflation budget), entries it could
//! not read (encrypted, unsupported method) by name, a bomb refusal, or why the archive
//! cannot be opened. Every format inside is read by the agent's own extraction
//! ([`super::extract`]), exactly as a zip's entries are. An archive that kills its child
//! (memory, time) is refused with what the child said last (`memory allocation of …
//! failed`).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use super::extract::{Limits, MAX_ARCHIVE_ENTRIES, MAX_INFLATION_RATIO};

/// The hidden subcommand of `weilan-agent` that runs [`serve`].
pub const HELPER_SUBCOMMAND: &str = "unpack-7z";
/// Address space of one child: the archive (≤ the read limit), one entry (≤ the
/// budget), a dictionary as large as 7-Zip's `-mx9` uses (64 MiB) and the program.
pub const HELPER_MEMORY: u64 = 384 << 20;
/// Children that may run at once (each may use [`HELPER_MEMORY`]; the agent's unit caps
/// the whole service, children included, at 256 MiB touched).
pub const MAX_HELPERS: usize = 2;

/// One message from the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An entry's bytes, at most what was left of the budget.
    Entry { name: String, data: Vec<u8> },
    /// An entry that could not be read, and why.
    Unread { name: String, reason: String },
    /// Entries are left unread: the budget or the entry count ran out.
    More,
    /// The archive inflates past [`MAX_INFLATION_RATIO`]: refused.
    Bomb(String),
    /// The archive cannot be opened at all.
    Fatal(String),
}

const ENTRY: u8 = b'E';
const UNREAD: u8 = b'U';
const MORE: u8 = b'M';
const BOMB: u8 = b'B';
const FATAL: u8 = b'F';
const END: u8 = b'.';

static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Runs children from `program` instead of this process's own executable — for a
/// program that is not the agent (a benchmark) to reach the agent's helper.
pub fn use_helper_program(program: PathBuf) {
    let _ = PROGRAM.set(program);
}

/// The archive's entries as the child read them, or why there are none.
pub fn unpack(archive: &[u8], limits: Limits) -> Result<Vec<Frame>, String> {
    let _turn = Turn::take(limits.max_time)?;
    let answer = if cfg!(test) && PROGRAM.get().is_none() {
        // Unit tests have no agent executable to run: the same code, in process (the
        // child's limits are exercised by the end-to-end tests, tests/files.rs).
        let mut out = Vec::new();
        serve(archive, &mut out, limits.max_bytes).map_err(|e| e.to_string())?;
        Answer {
            stdout: out,
            ..Answer::default()
        }
    } else {
        run_child(archive, limits)?
    };
    if answer.killed_at_time_limit {
        return Err(format!(
            "reading took longer than {:?}: stopped",
            limits.max_time
        ));
    }
    match read_frames(&answer.stdout) {
        Ok(frames) => {
            if !answer.stderr.is_empty() {
                warn_once(&answer.stderr);
            }
            Ok(frames)
        }
        Err(cut) => Err(answer.why_it_stopped(cut)),
    }
}

/// What a child said on stderr while it worked (a confinement the kernel could not
/// give), logged once per agent run: every archive would say the same.
fn warn_once(stderr: &[u8]) {
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        let said = String::from_utf8_lossy(stderr);
        tracing::warn!(child = %said.trim(), "the 7z reader's own warning");
    }
}

/// What a child gave.
#[derive(Default)]
struct Answer {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<std::process::ExitStatus>,
    killed_at_time_limit: bool,
}

impl Answer {
    /// Why the frames stopped short: the child's last words and how it ended.
    fn why_it_stopped(&self, cut: String) -> String {
        use std::os::unix::process::ExitStatusExt;
        // What a Rust process says as it dies comes first (`memory allocation of N
        // bytes failed`; a panic's place, then its message); a backtrace follows.
        let stderr = String::from_utf8_lossy(&self.stderr);
        let said = stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note:"))
            .take_while(|l| !l.starts_with("stack backtrace"))
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let how = match self.status {
            Some(s) if s.signal().is_some() => {
                format!("killed by signal {}", s.signal().unwrap_or(0))
            }
            Some(s) => format!("exit status {}", s.code().unwrap_or(-1)),
            None => "no exit status".into(),
        };
        let limit = HELPER_MEMORY >> 20;
        if said.is_empty() {
            format!("refused: the reader stopped ({how}, {cut}; memory limit {limit} MiB)")
        } else {
            format!("refused: the reader stopped ({how}: {said}; memory limit {limit} MiB)")
        }
    }
}

/// Runs the child on `archive`: stdin fed whole, stdout read up to the budget plus
/// framing, stderr's tail kept, killed at the time limit.
fn run_child(archive: &[u8], limits: Limits) -> Result<Answer, String> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let cpu_seconds = limits.max_time.as_secs().max(1) + 1;
    let program = PROGRAM
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    let mut command = Command::new(&program);
    command
        .arg0("weilan-agent")
        .args([HELPER_SUBCOMMAND, "--budget", &limits.max_bytes.to_string()])
        .args(["--cpu-seconds", &cpu_seconds.to_string()])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("the 7z reader {} did not start: {e}", program.display()))?;
    let pid = child.id();
    let (done, watch) = std::sync::mpsc::channel::<()>();
    let max_time = limits.max_time;
    let watchdog = std::thread::Builder::new()
        .name("7z-watchdog".into())
        .spawn(move || {
            let expired = matches!(
                watch.recv_timeout(max_time),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            );
            if expired {
                // Not yet reaped (the reader waits for this thread before `wait`), so
                // the pid is still the child's.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            expired
        })
        .map_err(|e| e.to_string())?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let last_words = std::thread::Builder::new()
        .name("7z-stderr".into())
        .spawn(move || {
            let mut tail = Vec::new();
            let _ = (&mut stderr).take(8192).read_to_end(&mut tail);
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            tail
        })
        .map_err(|e| e.to_string())?;
    // The child reads all of stdin before it writes: no deadlock. A child that died
    // early makes this fail (EPIPE), and its status says why.
    let _ = stdin.write_all(archive);
    drop(stdin);
    let mut answer = Answer::default();
    let most = limits.max_bytes + (MAX_ARCHIVE_ENTRIES as u64 + 16) * 4096;
    let _ = (&mut stdout).take(most).read_to_end(&mut answer.stdout);
    drop(stdout);
    let _ = done.send(());
    answer.killed_at_time_limit = watchdog.join().unwrap_or(false);
    if answer.stdout.len() as u64 >= most {
        let _ = child.kill();
    }
    answer.status = child.wait().ok();
    answer.stderr = last_words.join().unwrap_or_default();
    Ok(answer)
}

/// One child's turn ([`MAX_HELPERS`] at once), waited for at most the time limit.
struct Turn;

static RUNNING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static FREED: std::sync::Condvar = std::sync::Condvar::new();

impl Turn {
    fn take(wait: Duration) -> Result<Turn, String> {
        let running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        let (mut running, timeout) = FREED
            .wait_timeout_while(running, wait, |n| *n >= MAX_HELPERS)
            .unwrap_or_else(|p| p.into_inner());
        if timeout.timed_out() && *running >= MAX_HELPERS {
            return Err(format!(
                "not read: {MAX_HELPERS} other archives were still being read after {wait:?}"
            ));
        }
        *running += 1;
        Ok(Turn)
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
        *running -= 1;
        FREED.notify_one();
    }
}

/// The child: `weilan-agent unpack-7z --budget N --cpu-seconds S`. Its limits are set
/// before the first byte of the archive is read; if they cannot be, it reads nothing.
/// A confinement the kernel cannot give (no Landlock) is said on stderr, which the
/// agent logs; the rlimits and the dropped capabilities still hold.
pub fn helper_main(budget: u64, cpu_seconds: u64) -> std::process::ExitCode {
    // The kernel's OOM killer, if the service's memory runs out, takes this process
    // before the agent (whose unit lowers its own score).
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let confined = confine_myself();
    if !confined.complete() {
        eprintln!("warning: 7z reader only partly confined: {confined}");
    }
    if let Err(e) = limit_myself(cpu_seconds) {
        let why = format!("the reader's limits could not be set: {e}");
        let _ = write_frame(&mut out, FATAL, &[why.as_bytes()]);
        let _ = write_frame(&mut out, END, &[]);
        let _ = out.flush();
        return std::process::ExitCode::FAILURE;
    }
    let mut archive = Vec::new();
    let read = std::io::stdin()
        .lock()
        .take(budget.saturating_add(1))
        .read_to_end(&mut archive);
    let served = match read {
        Ok(_) => serve(&archive, &mut out, budget),
        Err(e) => write_frame(&mut out, FATAL, &[e.to_string().as_bytes()]),
    };
    match served.and_then(|()| out.flush()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// What [`confine_myself`] achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// Every capability set cleared (effective, permitted, inheritable, ambient).
    pub capabilities_dropped: Result<(), String>,
    /// The Landlock ABI version the ruleset was enforced with (0: the kernel has no
    /// Landlock), or why the ruleset failed.
    pub landlock_abi: Result<u8, String>,
}

impl Confinement {
    /// Capabilities dropped and the file system closed (Landlock ABI 1 or newer: no
    /// file opened, created or executed).
    pub fn complete(&self) -> bool {
        self.capabilities_dropped.is_ok() && matches!(self.landlock_abi, Ok(v) if v >= 1)
    }

    /// TCP bind and connect refused too (ABI 4, Linux 6.7).
    pub fn tcp_closed(&self) -> bool {
        matches!(self.landlock_abi, Ok(v) if v >= 4)
    }
}

impl std::fmt::Display for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.capabilities_dropped {
            Ok(()) => write!(f, "capabilities: none")?,
            Err(e) => write!(f, "capabilities: not dropped ({e})")?,
        }
        match &self.landlock_abi {
            Err(e) => write!(f, "; landlock: failed ({e})"),
            Ok(0) => write!(f, "; landlock: not enforced (the kernel has none)"),
            Ok(abi) => {
                write!(f, "; landlock ABI v{abi}: files closed")?;
                if *abi >= 4 {
                    write!(f, ", TCP closed")?;
                } else {
                    write!(f, ", TCP open (needs ABI v4, Linux 6.7)")?;
                }
                if *abi >= 6 {
                    write!(f, ", signals and abstract sockets closed")
                } else {
                    write!(
                        f,
                        ", signals and abstract sockets open (need ABI v6, Linux 6.12)"
                    )
                }
            }
        }
    }
}

/// Drops every capability, then restricts this process with a Landlock ruleset that
/// handles every file-system and TCP right and scope the kernel knows and allows none
/// (best effort: an older kernel enforces what it has, and says which ABI). Descriptors
/// already open (stdin, stdout, stderr) stay usable; nothing can be opened.
pub fn confine_myself() -> Confinement {
    use caps::CapSet;
    use landlock::{
        Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetStatus, Scope,
        ABI,
    };
    let capabilities_dropped = [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ]
    .into_iter()
    .try_for_each(|set| caps::clear(None, set).map_err(|e| format!("{set:?}: {e}")));
    // The newest rights this crate knows; the kernel enforces those it has.
    let abi = ABI::V6;
    let landlock_abi = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.restrict_self())
        .map(|status| match (status.ruleset, status.landlock) {
            (RulesetStatus::NotEnforced, _) => 0,
            (_, LandlockStatus::Available { effective_abi, .. }) => effective_abi as u8,
            (_, _) => 0,
        })
        .map_err(|e| e.to_string());
    Confinement {
        capabilities_dropped,
        landlock_abi,
    }
}

/// `weilan-agent unpack-7z --check-confinement`: confines itself as for an archive,
/// then tries what a decoder bug might (open a file, connect over TCP) and prints what
/// held. Exit 0 only if the confinement is complete and everything it covers on this
/// kernel was refused.
pub fn check_confinement() -> std::process::ExitCode {
    let confined = confine_myself();
    println!("{confined}");
    let mut held = confined.complete();
    for path in ["/etc/passwd", "/proc/self/status"] {
        match std::fs::File::open(path) {
            Ok(_) => {
                held = false;
                println!("open {path}: allowed");
            }
            Err(e) => println!("open {path}: refused ({e})"),
        }
    }
    match std::fs::write("/tmp/weilan-7z-confinement-probe", b"x") {
        Ok(()) => {
            held = false;
            let _ = std::fs::remove_file("/tmp/weilan-7z-confinement-probe");
            println!("create a file: allowed");
        }
        Err(e) => println!("create a file: refused ({e})"),
    }
    let tcp = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], 9)),
        Duration::from_millis(200),
    );
    // The sandbox answers EACCES; a closed port would answer ECONNREFUSED.
    match tcp {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            println!("tcp connect: refused ({e})")
        }
        other if confined.tcp_closed() => {
            held = false;
            println!("tcp connect: not refused by the sandbox ({other:?})");
        }
        other => println!("tcp connect: not refused, as this kernel cannot ({other:?})"),
    }
    if held {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

/// Address space, CPU time, no file written, no core dump, few descriptors.
fn limit_myself(cpu_seconds: u64) -> nix::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    setrlimit(Resource::RLIMIT_AS, HELPER_MEMORY, HELPER_MEMORY)?;
    setrlimit(Resource::RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)?;
    setrlimit(Resource::RLIMIT_FSIZE, 0, 0)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
    setrlimit(Resource::RLIMIT_NOFILE, 16, 16)
}

/// Decompresses `archive`'s entries into frames on `out`, within `budget` inflated
/// bytes and [`MAX_ARCHIVE_ENTRIES`] entries; stops at a bomb.
pub fn serve(archive: &[u8], out: &mut impl Write, budget: u64) -> std::io::Result<()> {
    use sevenz_rust2::{ArchiveReader, Password};
    let mut reader = match ArchiveReader::new(std::io::Cursor::new(archive), Password::empty()) {
        Ok(r) => r,
        Err(e) => {
            write_frame(out, FATAL, &[reason(&e).as_bytes()])?;
            return write_frame(out, END, &[]);
        }
    };
    reader.set_thread_count(1);
    let packed = archive.len().max(1) as u64;
    let mut inflated = 0u64;
    let mut entries = 0usize;
    let mut written: std::io::Result<()> = Ok(());
    let walked = reader.for_each_entries(|entry, data| {
        if entry.is_directory() || !entry.has_stream() {
            return Ok(true);
        }
        let name = entry.name().to_string();
        let step = (|| {
            if entries >= MAX_ARCHIVE_ENTRIES || inflated >= budget {
                write_frame(out, MORE, &[])?;
                return Ok(false);
            }
            entries += 1;
            let mut bytes = Vec::new();
            if let Err(e) = data.take(budget - inflated + 1).read_to_end(&mut bytes) {
                write_frame(out, UNREAD, &[name.as_bytes(), e.to_string().as_bytes()])?;
                return Ok(false);
            }
            inflated += bytes.len() as u64;
            if inflated > 1 << 20 && inflated > packed * MAX_INFLATION_RATIO {
                let why = format!(
                    "7z bomb refused: {packed} bytes inflate to more than {inflated} (at {name})"
                );
                write_frame(out, BOMB, &[why.as_bytes()])?;
                return Ok(false);
            }
            let over = inflated > budget;
            if over {
                let keep = bytes.len() - (inflated - budget) as usize;
                bytes.truncate(keep);
            }
            write_frame(out, ENTRY, &[name.as_bytes(), &bytes])?;
            if over {
                write_frame(out, MORE, &[])?;
            }
            Ok(!over)
        })();
        match step {
            Ok(go_on) => Ok(go_on),
            Err(e) => {
                written = Err(e);
                Ok(false)
            }
        }
    });
    written?;
    if let Err(e) = walked {
        write_frame(out, UNREAD, &[b"(archive)", reason(&e).as_bytes()])?;
    }
    write_frame(out, END, &[])
}

/// An error of `sevenz-rust2` in the words of the `unreadable` reason.
fn reason(e: &sevenz_rust2::Error) -> String {
    let text = e.to_string();
    if text.contains("AES") || text.contains("Password") || text.contains("password") {
        "encrypted".into()
    } else {
        text
    }
}

/// A frame: its tag, then each field as a little-endian u64 length and its bytes.
fn write_frame(out: &mut impl Write, tag: u8, fields: &[&[u8]]) -> std::io::Result<()> {
    out.write_all(&[tag])?;
    for field in fields {
        out.write_all(&(field.len() as u64).to_le_bytes())?;
        out.write_all(field)?;
    }
    Ok(())
}

/// The frames up to the end mark; `Err` says where the stream was cut (a child that
/// died, or wrote something else).
fn read_frames(mut bytes: &[u8]) -> Result<Vec<Frame>, String> {
    fn field(bytes: &mut &[u8]) -> Result<Vec<u8>, String> {
        let (len, rest) = bytes
            .split_first_chunk::<8>()
            .ok_or("output cut inside a frame")?;
        let len = u64::from_le_bytes(*len);
        if len > rest.len() as u64 {
            return Err("output cut inside a frame".into());
        }
        let (value, rest) = rest.split_at(len as usize);
        *bytes = rest;
        Ok(value.to_vec())
    }
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    let mut frames = Vec::new();
    loop {
        let Some((&tag, rest)) = bytes.split_first() else {
            return Err(format!("output ended after {} frames", frames.len()));
        };
        bytes = rest;
        frames.push(match tag {
            ENTRY => Frame::Entry {
                name: text(field(&mut bytes)?),
                data: field(&mut bytes)?,
            },
            UNREAD => Frame::Unread {
                name: text(field(&mut bytes)?),
                reason: text(field(&mut bytes)?),
            },
            MORE => Frame::More,
            BOMB => Frame::Bomb(text(field(&mut bytes)?)),
            FATAL => Frame::Fatal(text(field(&mut bytes)?)),
            END => return Ok(frames),
            other => return Err(format!("unknown frame {other:#04x}")),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::samples;

    fn frames(archive: &[u8], budget: u64) -> Vec<Frame> {
        let mut out = Vec::new();
        serve(archive, &mut out, budget).unwrap();
        read_frames(&out).unwrap()
    }

    #[test]
    fn entries_come_back_whole_in_order_solid_or_not() {
        for solid in [false, true] {
            let archive =
                samples::seven_zip(&[("a.txt", b"first"), ("dir/b.txt", b"second")], solid);
            assert_eq!(
                frames(&archive, 1 << 20),
                vec![
                    Frame::Entry {
                        name: "a.txt".into(),
                        data: b"first".to_vec()
                    },
                    Frame::Entry {
                        name: "dir/b.txt".into(),
                        data: b"second".to_vec()
                    },
                ],
                "solid {solid}"
            );
        }
    }

    #[test]
    fn the_budget_cuts_the_entry_that_crosses_it_and_says_more_are_left() {
        let big = vec![b'x'; 3000];
        let archive = samples::seven_zip(&[("a", &big[..]), ("b", b"never read")], true);
        let got = frames(&archive, 1000);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(matches!(&got[0], Frame::Entry { data, .. } if data.len() == 1000));
        assert_eq!(got[1], Frame::More);
    }

    #[test]
    fn an_archive_that_inflates_past_the_ratio_is_refused_as_a_bomb() {
        let zeros = vec![0u8; 2 << 20];
        let archive = samples::seven_zip(&[("zeros.bin", &zeros[..])], false);
        assert!(
            archive.len() as u64 * MAX_INFLATION_RATIO < zeros.len() as u64,
            "{} bytes",
            archive.len()
        );
        let got = frames(&archive, 32 << 20);
        assert!(
            matches!(got.last(), Some(Frame::Bomb(why)) if why.contains("7z bomb refused")),
            "{got:?}"
        );
    }

    #[test]
    fn not_a_7z_and_a_cut_answer_are_named() {
        let got = frames(b"7z\xBC\xAF\x27\x1C\x00\x04garbage", 1 << 20);
        assert!(matches!(&got[..], [Frame::Fatal(_)]), "{got:?}");
        let archive = samples::seven_zip(&[("a.txt", b"first")], false);
        let mut out = Vec::new();
        serve(&archive, &mut out, 1 << 20).unwrap();
        out.truncate(out.len() - 3);
        assert!(read_frames(&out).unwrap_err().contains("cut"));
        assert!(read_frames(b"").unwrap_err().contains("after 0 frames"));
    }

    #[test]
    fn the_dying_child_is_described_by_its_last_words() {
        use std::os::unix::process::ExitStatusExt;
        let answer = Answer {
            stderr:
                b"memory allocation of 4294967296 bytes failed\nstack backtrace:\n  0: std::alloc\n"
                    .to_vec(),
            status: Some(std::process::ExitStatus::from_raw(libc::SIGABRT)),
            ..Answer::default()
        };
        let why = answer.why_it_stopped("output ended after 0 frames".into());
        assert!(why.contains("killed by signal 6"), "{why}");
        assert!(
            why.contains(": memory allocation of 4294967296 bytes failed;"),
            "{why}"
        );
        assert!(why.contains("384 MiB"), "{why}");
    }
}
