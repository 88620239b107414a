//! What `/proc` says about processes: who runs what, their ancestors, which sockets
//! and files they hold, which network namespace they live in — and ending one safely.
//!
//! Shared by the sources (files, network) and the command executor. Every lookup may
//! race with the process exiting; that is an absent answer, never an error.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use procfs::process::{FDTarget, Process};
use weilan_config::event::ProcessRef;

/// The uid of a user name (not cached: logins are rare).
pub fn user_id(name: &str) -> Option<u32> {
    nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .map(|u| u.uid.as_raw())
}

/// The name of `uid`, cached: the lookup parses the user database on every call,
/// and it runs while an opener waits. Bounded; a renamed account is seen after the
/// cache is cleared (at 1 024 entries or agent restart).
pub fn user_name(uid: u32) -> Option<String> {
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<u32, Option<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().ok().and_then(|c| c.get(&uid).cloned()) {
        return hit;
    }
    let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 1024 {
            c.clear();
        }
        c.insert(uid, name.clone());
    }
    name
}

/// One process as `/proc` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    /// Real uid.
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub ppid: u32,
    /// Start time in clock ticks since boot: with the pid, names the process uniquely
    /// (pids are recycled).
    pub start_ticks: u64,
}

/// The command line, NUL-separated arguments joined by spaces, at most 4 KiB.
fn cmdline_of(p: &Process) -> Option<String> {
    Some(joined_args(p.cmdline().ok()?))
}

/// Arguments joined by spaces, cut at 4 KiB (on a character boundary).
fn joined_args(args: Vec<String>) -> String {
    let mut s = args.join(" ");
    if s.len() > 4096 {
        let mut cut = 4096;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Details of `pid`, if it still exists.
pub fn process(pid: u32) -> Option<ProcessInfo> {
    let p = Process::new(pid as i32).ok()?;
    let stat = p.stat().ok()?;
    // The real uid: who ran it, also behind a setuid program (the owner of
    // /proc/PID is the effective uid, root for non-dumpable processes).
    let uid = p.status().ok().map(|s| s.ruid);
    Some(ProcessInfo {
        pid,
        exe: p.exe().ok().map(|e| e.display().to_string()),
        cmdline: cmdline_of(&p),
        uid,
        user: uid.and_then(user_name),
        ppid: stat.ppid.max(0) as u32,
        start_ticks: stat.starttime,
    })
}

/// Who runs `pid`, read in the order things vanish when a process exits: its
/// executable first (gone once it starts exiting), then its command line, then its
/// real uid (readable until it is reaped). Three plain reads, no parsing beyond the
/// uid line: this runs at every exec on the machine, racing the process's exit.
/// `None` once the process is reaped.
pub fn brief(pid: u32) -> Option<ProcessBrief> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.display().to_string());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .filter(|raw| !raw.is_empty())
        .map(|raw| {
            joined_args(
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect(),
            )
        });
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    Some(ProcessBrief {
        pid,
        exe,
        cmdline,
        uid,
        user: uid.and_then(user_name),
    })
}

/// What [`brief`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessBrief {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    /// Real uid.
    pub uid: Option<u32>,
    pub user: Option<String>,
}

/// The arguments of `pid` as the process was started.
pub fn args(pid: u32) -> Option<Vec<String>> {
    Process::new(pid as i32).ok()?.cmdline().ok()
}

/// Ancestors starting at `ppid`, parent first, up to `max` (stops at pid 1).
pub fn ancestors(mut ppid: u32, max: usize) -> Vec<ProcessRef> {
    let mut out = Vec::new();
    while ppid > 1 && out.len() < max {
        let Some(p) = process(ppid) else { break };
        out.push(ProcessRef {
            pid: p.pid,
            exe: p.exe,
            cmdline: p.cmdline,
        });
        ppid = p.ppid;
    }
    out
}

/// Which process holds each socket inode in `wanted`. With `uids`, only processes
/// owned by one of them are searched (a socket's owner uid is its creator's), which
/// keeps the scan to a handful of processes on a busy host; `None` searches all (a
/// socket handed to a process of another user).
pub fn socket_owners(wanted: &HashSet<u64>, uids: Option<&HashSet<u32>>) -> HashMap<u64, u32> {
    let mut found = HashMap::new();
    let Ok(all) = procfs::process::all_processes() else {
        return found;
    };
    for p in all.flatten() {
        if found.len() == wanted.len() {
            break;
        }
        if uids.is_some_and(|uids| p.uid().is_ok_and(|u| !uids.contains(&u))) {
            continue;
        }
        let Ok(fds) = p.fd() else { continue };
        for fd in fds.flatten() {
            if let FDTarget::Socket(inode) = fd.target {
                if wanted.contains(&inode) {
                    found.insert(inode, p.pid as u32);
                }
            }
        }
    }
    found
}

/// Regular files `pid` has open (absolute paths), at most `max`.
pub fn open_files(pid: u32, max: usize) -> Vec<PathBuf> {
    let Ok(p) = Process::new(pid as i32) else {
        return Vec::new();
    };
    let Ok(fds) = p.fd() else { return Vec::new() };
    let mut out: Vec<PathBuf> = Vec::new();
    for fd in fds.flatten() {
        if out.len() >= max {
            break;
        }
        if let FDTarget::Path(path) = fd.target {
            if path.is_absolute()
                && !path.starts_with("/dev")
                && !path.starts_with("/proc")
                && !out.contains(&path)
                && std::fs::metadata(&path).is_ok_and(|m| m.is_file())
            {
                out.push(path);
            }
        }
    }
    out
}

/// Every network namespace in use, each with a file that refers to it: a process's
/// `/proc/PID/ns/net`, or a name `ip netns add` bound under `/run/netns` (a namespace
/// can hold sockets with no process left in it).
pub fn net_namespaces() -> HashMap<u64, std::path::PathBuf> {
    let mut out = HashMap::new();
    if let Ok(named) = std::fs::read_dir("/run/netns") {
        for entry in named.flatten() {
            let path = entry.path();
            if let Ok(m) = std::fs::metadata(&path) {
                out.entry(std::os::unix::fs::MetadataExt::ino(&m))
                    .or_insert(path);
            }
        }
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = std::path::PathBuf::from(format!("/proc/{pid}/ns/net"));
        let link = std::fs::read_link(&path);
        if let Some(ino) = link.ok().and_then(|l| ns_inode(&l.to_string_lossy())) {
            out.entry(ino).or_insert(path);
        }
    }
    out
}

/// The inode in a namespace link's text, `net:[4026531840]`.
pub fn ns_inode(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The agent's own network namespace.
pub fn own_net_namespace() -> Option<u64> {
    ns_inode(
        &std::fs::read_link("/proc/self/ns/net")
            .ok()?
            .to_string_lossy(),
    )
}

/// Ends process `pid` if it still runs `exe` (a recycled pid is not touched): SIGTERM,
/// then SIGKILL after 2 s.
pub fn terminate(pid: u32, exe: &str) -> Result<String, String> {
    use nix::sys::signal::{kill as send, Signal};
    use nix::unistd::Pid;
    if pid <= 1 || pid == std::process::id() {
        return Err(format!("refusing to kill pid {pid}"));
    }
    let running = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| format!("process {pid}: {e}"))?;
    if running != std::path::Path::new(exe) {
        return Err(format!(
            "process {pid} runs {}, not {exe}: not killed",
            running.display()
        ));
    }
    let target = Pid::from_raw(pid as i32);
    send(target, Signal::SIGTERM).map_err(|e| format!("SIGTERM {pid}: {e}"))?;
    let gone = || !std::path::Path::new(&format!("/proc/{pid}/exe")).exists();
    for _ in 0..20 {
        if gone() {
            return Ok(format!("process {pid} ({exe}) ended by SIGTERM"));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    send(target, Signal::SIGKILL).map_err(|e| format!("SIGKILL {pid}: {e}"))?;
    Ok(format!(
        "process {pid} ({exe}) killed (SIGKILL after SIGTERM)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_sees_itself_and_its_parent() {
        let me = process(std::process::id()).expect("own process");
        assert!(me.exe.is_some() && me.start_ticks > 0);
        assert_eq!(me.uid, Some(nix::unistd::getuid().as_raw()));
        let chain = ancestors(me.ppid, 8);
        assert!(chain.first().is_none_or(|p| p.pid == me.ppid));
        assert!(own_net_namespace().is_some());
        assert!(net_namespaces().contains_key(&own_net_namespace().unwrap()));
    }

    #[test]
    fn a_socket_is_found_at_its_holder() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let inode: u64 = link
            .to_string_lossy()
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .unwrap()
            .parse()
            .unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let owners = socket_owners(&HashSet::from([inode]), Some(&HashSet::from([uid])));
        assert_eq!(owners.get(&inode), Some(&std::process::id()));
        // A uid filter that excludes the holder finds nothing.
        let none = socket_owners(&HashSet::from([inode]), Some(&HashSet::from([uid + 4242])));
        assert!(none.is_empty());
        let any = socket_owners(&HashSet::from([inode]), None);
        assert_eq!(any.get(&inode), Some(&std::process::id()));
        assert!(none.is_empty());
    }

    #[test]
    fn open_files_are_regular_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("held.txt");
        std::fs::write(&path, b"x").unwrap();
        let _held = std::fs::File::open(&path).unwrap();
        let files = open_files(std::process::id(), 4096);
        assert!(files.contains(&path), "{files:?}");
        assert!(files.iter().all(|f| !f.starts_with("/dev")));
    }
}
