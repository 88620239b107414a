//! File storm: 100 000 small files written onto a watched mount (not a test).
//!
//! `cargo bench --bench files_storm` (as root: tmpfs mount, fanotify, network
//! namespace). Side by side in one run, on the same fresh 4 GiB tmpfs and the same
//! writer (this process: open O_CREAT, write 256 B, close, spread over 10 subfolders,
//! as `../shared/tools/peers/storm.py` does), paced at 20 000 files/s and flat out:
//!
//! - no watcher (the writer's own rate);
//! - `inotifywait -m -r -e close_write --format %w%f` (inotify-tools), output to a file;
//! - a real `weilan agent` (fanotify, exit point = the tmpfs) delivering to a real
//!   collector over mutual TLS; files are counted in the collector's database;
//! - the same agent with its inotify fallback (flat out: the writer is not held up
//!   by permission events, so the queue can overflow and the rescan must cover it).
//!
//! For each: files seen, the watcher's CPU seconds (utime + stime from
//! `/proc/PID/stat`, all threads, dead ones included) and peak RSS (VmHWM). For the
//! agent "seen" is distinct paths in stored `file.exported` events, and the
//! `file.overflow` events' exact counts are printed: nothing may be missing.
//! `FILES` overrides 100 000.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SUBDIRS: usize = 10;
const DOCX_MODE: &str = "flat out + 10 MB docx copies";

/// A Word document of about 10 MB on disk (text of random common characters, which
/// deflate cannot shrink much), its first line the mark 机密★1年.
fn big_docx() -> std::sync::Arc<Vec<u8>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut paragraphs: Vec<String> = vec!["机密★1年".into()];
    let mut size = 0;
    while size < 14_500_000 {
        let p: String = (0..400)
            .map(|_| char::from_u32(rng.random_range(0x4E00..0x9FA5)).expect("CJK"))
            .collect();
        size += p.len();
        paragraphs.push(p);
    }
    let runs: Vec<[&str; 1]> = paragraphs.iter().map(|p| [p.as_str()]).collect();
    let refs: Vec<&[&str]> = runs.iter().map(|r| r.as_slice()).collect();
    std::sync::Arc::new(weilan_agent::classify::samples::docx(&refs))
}

/// Copies the document onto the mount, two copies a second, until told to stop.
struct DocxCopier {
    dir: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Duration)>,
}

impl DocxCopier {
    fn start(dir: PathBuf, docx: std::sync::Arc<Vec<u8>>) -> DocxCopier {
        std::fs::create_dir_all(&dir).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, halt) = (dir.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut copies = 0;
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                // Two a second: 21 MB/s, what a USB 2.0 stick takes.
                let due = t0 + Duration::from_millis(500 * copies as u64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                std::fs::write(d.join(format!("report-{copies}.docx")), docx.as_slice()).unwrap();
                // The tmpfs is not endless: copies older than four go (the agent reads
                // a copy through the descriptor it holds, deleted or not).
                if copies >= 4 {
                    let _ = std::fs::remove_file(d.join(format!("report-{}.docx", copies - 4)));
                }
                copies += 1;
            }
            (copies, t0.elapsed())
        });
        DocxCopier { dir, stop, thread }
    }

    /// Stops copying: the copies made, in how long.
    fn stop(self) -> (usize, Duration, PathBuf) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (copies, took) = self.thread.join().unwrap();
        (copies, took, self.dir)
    }

    /// Stops copying; says how many copies were made and how many of them the
    /// collector holds classified `mark:secret`.
    fn finish(self, w: &World) -> String {
        let (copies, took, dir) = self.stop();
        let like = format!("{}/%", dir.display());
        let classified = || {
            w.count(&format!(
                "SELECT COUNT(DISTINCT json_extract(envelope, '$.event.data.path')) FROM events \
                 WHERE kind = 'file.exported' AND json_extract(envelope, '$.event.data.path') LIKE '{like}' \
                 AND envelope LIKE '%mark:secret%'"
            )) as u64
        };
        let got = settle(classified, Duration::from_secs(5), Duration::from_secs(300));
        if let Some(one) = w
            .events(
                "file.exported",
                "json_extract(envelope, '$.event.data.path') LIKE ?2",
                &[&like],
            )
            .first()
        {
            println!(
                "one docx copy as stored: size {}, hashed {}, classes {}, note {}",
                one["size"], one["hashed_bytes"], one["classification"], one["classification_note"]
            );
        }
        format!(
            "10 MB docx copied beside it: {copies} in {:.1} s, {got} stored classified mark:secret",
            took.as_secs_f64()
        )
    }
}
const PACED_RATE: f64 = 20_000.0;

struct TmpfsMount(PathBuf);
impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `n` files under `dir` (subfolders s0..s9 made first); `rate` 0 = flat out.
/// Returns files per second reached.
fn storm(dir: &Path, n: usize, rate: f64) -> f64 {
    for s in 0..SUBDIRS {
        std::fs::create_dir_all(dir.join(format!("s{s}"))).unwrap();
    }
    let data = [b'x'; 256];
    let t0 = Instant::now();
    for i in 0..n {
        if rate > 0.0 {
            let target = t0 + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if target > now + Duration::from_micros(500) {
                std::thread::sleep(target - now);
            }
        }
        let mut f = std::fs::File::create(dir.join(format!("s{}/f{i}.txt", i % SUBDIRS))).unwrap();
        f.write_all(&data).unwrap();
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// CPU seconds (all threads) of a live process.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // rest starts at field 3 (state, not numeric, filtered): utime = field 14, stime = 15.
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let (utime, stime) = (
        f.get(10).copied().unwrap_or(0),
        f.get(11).copied().unwrap_or(0),
    );
    (utime + stime) as f64 / ticks
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Waits until `f` stops changing for `quiet` (at most `max`); its last value.
fn settle(mut f: impl FnMut() -> u64, quiet: Duration, max: Duration) -> u64 {
    let start = Instant::now();
    let mut last = f();
    let mut since = Instant::now();
    while start.elapsed() < max {
        std::thread::sleep(Duration::from_millis(250));
        let now = f();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    last
}

/// Once a peer's output file has stopped growing (2 s quiet, at most 30 s): its CPU
/// seconds and peak RSS.
fn when_quiet(out: &Path, pid: u32) -> (f64, f64) {
    settle(
        || std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        Duration::from_secs(2),
        Duration::from_secs(30),
    );
    (cpu_secs(pid), peak_rss_mib(pid))
}

struct Row {
    watcher: &'static str,
    mode: &'static str,
    seen: u64,
    cpu: f64,
    rss: f64,
    rate: f64,
    note: String,
}

fn inotifywait_run(mount: &Path, dir: &Path, n: usize, rate: f64, mode: &'static str) -> Row {
    std::fs::create_dir_all(dir).unwrap();
    let tag: String = mode.chars().filter(char::is_ascii_alphanumeric).collect();
    let out = mount.join(format!("../inotifywait-{tag}.txt"));
    let errf = mount.join(format!("../inotifywait-{tag}.err"));
    let mut child = Command::new("inotifywait")
        .args(["-m", "-r", "-e", "close_write", "--format", "%w%f"])
        .arg(dir)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&errf).unwrap())
        .stdin(Stdio::null())
        .spawn()
        .expect("inotifywait");
    wait_for(
        "inotifywait ready",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(&errf)
                .unwrap_or_default()
                .contains("Watches established")
                .then_some(())
        },
        String::new,
    );
    let reached = storm(dir, n, rate);
    let (cpu, rss) = when_quiet(&out, child.id());
    let _ = child.kill();
    let _ = child.wait();
    let seen: HashSet<String> = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    let overflow = std::fs::read_to_string(&errf)
        .unwrap_or_default()
        .to_lowercase()
        .contains("overflow");
    Row {
        watcher: "inotifywait -m -r -e close_write",
        mode,
        seen: seen.len() as u64,
        cpu,
        rss,
        rate: reached,
        note: if overflow {
            "said: queue overflow".into()
        } else {
            "no overflow reported".into()
        },
    }
}

/// The masks of `pid`'s fanotify marks (`/proc/PID/fdinfo`), as hex.
fn fanotify_masks(pid: u32) -> Vec<String> {
    let mut masks = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return masks;
    };
    for fd in fds.flatten() {
        if !std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().contains("fanotify")) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        masks.extend(info.lines().filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("mask:"))
                .map(String::from)
        }));
    }
    masks
}

/// fatrace (fanotify notifications, no permission events) on the mount of `dir`.
fn fatrace_run(mount: &Path, dir: &Path, n: usize, rate: f64, mode: &'static str) -> Row {
    std::fs::create_dir_all(dir).unwrap();
    let tag: String = mode.chars().filter(char::is_ascii_alphanumeric).collect();
    let out = mount.join(format!("../fatrace-{tag}.txt"));
    let mut child = Command::new("fatrace")
        .args(["-c", "-f", "W", "-o"])
        .arg(&out)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fatrace");
    std::thread::sleep(Duration::from_secs(1)); // its mark is in place (no ready line)
    let reached = storm(dir, n, rate);
    let (cpu, rss) = when_quiet(&out, child.id());
    // SIGINT: fatrace flushes its output and exits.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait();
    let prefix = format!("{}/", dir.display());
    let seen: HashSet<String> = std::fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        // `comm(pid): CWO /path`: the event letters, merged, then the path.
        .filter_map(|l| {
            let (kinds, path) = l.split_once("): ")?.1.split_once(' ')?;
            kinds.contains('W').then(|| path.to_string())
        })
        .filter(|p| p.starts_with(&prefix))
        .collect();
    Row {
        watcher: "fatrace -c -f W",
        mode,
        seen: seen.len() as u64,
        cpu,
        rss,
        rate: reached,
        note: "prints comm(pid) and path".into(),
    }
}

fn main() {
    weilan_config::tls::install_default_provider();
    if !require("files_storm needs root (tmpfs, fanotify, netns)", is_root()) || !netns_available()
    {
        return;
    }
    let n: usize = std::env::var("FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let w = World::new();
    let mount = w.path("storm");
    std::fs::create_dir_all(&mount).unwrap();
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4g", "weilan-storm"])
            .arg(&mount),
    );
    let _m = TmpfsMount(mount.clone());
    let mut rows = Vec::new();

    let docx = big_docx();
    println!(
        "the docx copied beside the storm: {:.1} MB",
        docx.len() as f64 / 1e6
    );
    let docx_only = std::env::var("DOCX_ONLY").is_ok();
    for (mode, rate) in [
        ("paced 20k/s", PACED_RATE),
        ("flat out", 0.0),
        (DOCX_MODE, 0.0),
    ] {
        if std::env::var("ONLY_AGENT").is_ok() {
            break;
        }
        if docx_only && rate > 0.0 {
            continue;
        }
        let copier =
            (mode == DOCX_MODE).then(|| DocxCopier::start(mount.join("none-docx"), docx.clone()));
        let none = storm(&mount.join(format!("none-{}", rows.len())), n, rate);
        let note = copier
            .map(|c| c.stop().0)
            .map(|c| format!("{c} docx copies beside it"))
            .unwrap_or_default();
        rows.push(Row {
            watcher: "(none)",
            mode,
            seen: 0,
            cpu: 0.0,
            rss: 0.0,
            rate: none,
            note,
        });
    }
    // Fresh file system for the watchers: no earlier files in the way.
    run_ok(Command::new("umount").arg(&mount));
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4g", "weilan-storm"])
            .arg(&mount),
    );

    let only_agent = std::env::var("ONLY_AGENT").is_ok(); // for profiling the agent
    type PeerRun = fn(&Path, &Path, usize, f64, &'static str) -> Row;
    let peers: [(&str, &str, PeerRun); 2] = [
        ("inotifywait", "inw", inotifywait_run),
        ("fatrace", "fat", fatrace_run),
    ];
    for (program, tag, peer_run) in peers {
        if only_agent || docx_only {
            break;
        }
        if which(program).is_none() {
            require(&format!("{program} for the side-by-side peer"), false);
            continue;
        }
        for (mode, rate, sub) in [
            ("paced 20k/s", PACED_RATE, "paced"),
            ("flat out", 0.0, "flat"),
        ] {
            rows.push(peer_run(
                &mount,
                &mount.join(format!("{tag}-{sub}")),
                n,
                rate,
                mode,
            ));
        }
    }

    // The agent: exit point = the tmpfs, named in its (fake) mount table.
    std::fs::write(
        w.path("mountinfo"),
        format!(
            "36 25 0:99 / {} rw - tmpfs weilan-storm rw\n",
            mount.display()
        ),
    )
    .unwrap();
    let ns = Netns::create();
    let collector = w.start_collector(&ns, &w.collector_toml(false, "[log]\nlevel = \"warn\"\n"));
    // (backend, a deny rule in the policy, mode, rate, folder). With a deny rule for
    // this exit point every open waits for the agent (permission events); without,
    // writes are notifications.
    let runs: [(&str, bool, &str, f64, &str); 5] = [
        ("fanotify", false, "paced 20k/s", PACED_RATE, "agent-paced"),
        ("fanotify", false, "flat out", 0.0, "agent-flat"),
        ("fanotify", false, DOCX_MODE, 0.0, "agent-flat-docx"),
        ("fanotify", true, "flat out", 0.0, "agent-flat-deny"),
        ("inotify", false, "flat out", 0.0, "agent-inotify-flat"),
    ];
    let mut agent: Option<Proc> = None;
    let mut started_as = ("", false);
    for (backend, deny, mode, rate, sub) in runs {
        if docx_only && (rate > 0.0 || backend == "inotify" || deny) {
            continue;
        }
        if (backend, deny) != started_as {
            if let Some(mut a) = agent.take() {
                a.stop();
            }
            let mut policy = String::from("version = \"storm\"\n");
            if deny {
                policy.push_str(&format!(
                    "[files]\nevidence_dir = \"{}\"\n[[files.rules]]\nid = \"no-ids-out\"\n\
                     detectors = [\"prc-resident-id\"]\naction = \"deny\"\n",
                    w.path("evidence").display()
                ));
            }
            std::fs::write(w.path("policy.toml"), policy).unwrap();
            let cfg = w.agent_toml_with(
                AGENT,
                "pki/ca.pem",
                "",
                &format!(
                    "[files]\nwatch_mounts = [\"{}\"]\nbackend = \"{backend}\"\n[log]\nlevel = \"warn\"\n",
                    mount.display()
                ),
            );
            let started = w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.started'");
            let a = w.start_agent(&ns, &cfg, AGENT);
            wait_for(
                "agent up",
                Duration::from_secs(60),
                || {
                    (w.count("SELECT COUNT(*) FROM events WHERE kind = 'agent.started'") > started)
                        .then_some(())
                },
                || a.log_text(),
            );
            std::thread::sleep(Duration::from_secs(1)); // the mount is marked (poll 200 ms)
            if backend == "fanotify" {
                // FAN_OPEN_PERM (0x10000) on the exit point exactly when a deny rule applies.
                let pid = a.child.id();
                let masks = wait_for(
                    "the exit point's marks for this policy",
                    Duration::from_secs(20),
                    || {
                        let m = fanotify_masks(pid);
                        let perm = m
                            .iter()
                            .any(|x| u64::from_str_radix(x, 16).is_ok_and(|v| v & 0x1_0000 != 0));
                        (perm == deny).then_some(m)
                    },
                    || format!("{:?}", fanotify_masks(pid)),
                );
                println!("agent marks (deny rule: {deny}): {masks:?}");
            }
            agent = Some(a);
            started_as = (backend, deny);
        }
        let pid = agent.as_ref().unwrap().child.id();
        let dir = mount.join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        let cpu0 = cpu_secs(pid);
        let since = jiff::Timestamp::now()
            .checked_sub(jiff::SignedDuration::from_secs(5))
            .unwrap()
            .to_string();
        // Beside the storm, 10 MB documents copied one after another onto the same
        // mount: each is hashed and classified, which must not hold up the writer.
        let copier =
            (mode == DOCX_MODE).then(|| DocxCopier::start(mount.join("docx"), docx.clone()));
        let reached = storm(&dir, n, rate);
        let docx_note = copier.map(|c| c.finish(&w));
        let like = format!("{}/%", dir.display());
        let count = || {
            w.count(&format!(
                "SELECT COUNT(DISTINCT json_extract(envelope, '$.event.data.path')) FROM events \
                 WHERE kind = 'file.exported' AND json_extract(envelope, '$.event.data.path') LIKE '{like}'"
            )) as u64
        };
        let seen = settle(count, Duration::from_secs(5), Duration::from_secs(300));
        let cpu = cpu_secs(pid) - cpu0;
        let overflows = w.events(
            "file.overflow",
            "json_extract(envelope, '$.event.data.since') >= ?2",
            &[&since],
        );
        let rescanned: u64 = overflows
            .iter()
            .filter_map(|o| o["rescanned"].as_u64())
            .sum();
        let total = w.count(&format!(
            "SELECT COUNT(*) FROM events WHERE kind = 'file.exported' \
             AND json_extract(envelope, '$.event.data.path') LIKE '{like}'"
        ));
        let none = w.count(&format!(
            "SELECT COUNT(*) FROM events WHERE kind = 'file.exported' \
             AND json_extract(envelope, '$.event.data.attribution') = 'none' \
             AND json_extract(envelope, '$.event.data.path') LIKE '{like}'"
        ));
        if std::env::var("DEBUG_DUPS").is_ok() {
            let rows: Vec<(String, String, String, i64)> = w
                .db()
                .query_map(
                    &format!(
                        "SELECT json_extract(envelope, '$.event.data.path'), json_extract(envelope, '$.event.data.first_write'), json_extract(envelope, '$.event.data.last_write'), seq FROM events \
                         WHERE kind = 'file.exported' AND json_extract(envelope, '$.event.data.path') IN \
                         (SELECT json_extract(envelope, '$.event.data.path') p FROM events WHERE kind = 'file.exported' AND p LIKE '{like}' GROUP BY p HAVING COUNT(*) > 1 LIMIT 3) ORDER BY 1, 4"
                    ),
                    params![],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .unwrap_or_default();
            eprintln!("duplicates sample: {rows:#?}\noverflows: {overflows:#?}");
        }
        rows.push(Row {
            watcher: if backend == "fanotify" && deny {
                "weilan agent, fanotify, a deny rule: permission events (→ journal → mTLS → collector DB)"
            } else if backend == "fanotify" {
                "weilan agent, fanotify (→ journal → mTLS → collector DB)"
            } else {
                "weilan agent, inotify fallback (→ journal → mTLS → collector DB)"
            },
            mode,
            seen,
            cpu,
            rss: peak_rss_mib(pid),
            rate: reached,
            note: format!(
                "file.overflow events: {} (rescanned {rescanned}); file.exported events {total}, writer unknown {none}; missing: {}{}",
                overflows.len(),
                n as u64 - seen.min(n as u64),
                docx_note.map(|d| format!("; {d}")).unwrap_or_default()
            ),
        });
    }
    drop(agent);
    drop(collector);

    println!("\nfile storm: {n} files × 256 B on tmpfs, 10 subfolders, writer = this process\n");
    println!("| watcher | mode | seen / {n} | watcher CPU s (µs/file) | peak RSS MiB | writer files/s | note |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        if r.watcher == "(none)" {
            println!("| (none) | {} | – | – | – | {:.0} | |", r.mode, r.rate);
        } else {
            println!(
                "| {} | {} | {} | {:.2} ({:.1}) | {:.1} | {:.0} | {} |",
                r.watcher,
                r.mode,
                r.seen,
                r.cpu,
                r.cpu * 1e6 / n as f64,
                r.rss,
                r.rate,
                r.note
            );
        }
    }
}
