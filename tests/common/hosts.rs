//! Fresh "hosts" on this machine for the deployment walk-through: each host is a
//! private mount namespace in which `/etc`, `/usr` and `/var` are overlays over this
//! machine's (writes land in the host's own directory, this machine is untouched) and
//! `/run` is empty. Hosts share a network namespace the test creates. Commands run
//! inside with `nsenter`, so a service started by one command keeps running for the
//! next. `systemctl` is a stand-in (see `SYSTEMCTL`): PID 1 here is not systemd.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{run_ok, Netns};

/// The `systemctl` stand-in put first on every host command's `PATH`.
pub const SYSTEMCTL: &str = r#"#!/bin/sh
# A systemctl stand-in for tests/deployment.rs (this machine's PID 1 is not systemd):
# enable --now / start / restart run the installed unit's ExecStartPre= lines, then
# its ExecStart= in the background, as the unit's User=, after creating its
# StateDirectory= and LogsDirectory=; reload sends SIGHUP; stop sends SIGTERM and
# waits. tests/systemd_guest.rs runs the same units under a real systemd.
set -eu
units=/run/weilan-test-units
mkdir -p "$units"
cmd=$1; shift
if [ "$cmd" = enable ]; then
  [ "${1:-}" = --now ] || exit 0
  shift; cmd=start
fi
unit=${1%.service}
file=/etc/systemd/system/$unit.service
[ -f "$file" ] || file=/lib/systemd/system/$unit.service
value() { sed -n "s/^$1=//p" "$file"; }
pid=$units/$unit.pid
stop() {
  if [ -f "$pid" ]; then
    p=$(cat "$pid"); kill "$p" 2>/dev/null || true
    while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    rm -f "$pid"
  fi
}
case $cmd in
  stop) stop; exit 0 ;;
  reload) kill -HUP "$(cat "$pid")"; exit 0 ;;
  is-active)
    if [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; then echo active; exit 0; fi
    echo inactive; exit 3 ;;
  start|restart) stop ;;
  *) echo "systemctl stand-in: '$cmd' is not supported" >&2; exit 1 ;;
esac
user=$(value User); user=${user:-root}
group=$(id -gn "$user")
for d in $(value StateDirectory); do install -d -o "$user" -g "$group" "/var/lib/$d"; done
for d in $(value LogsDirectory); do install -d -o "$user" -g "$group" "/var/log/$d"; done
as_user="setpriv --reuid=$user --regid=$group --init-groups"
value ExecStartPre | while IFS= read -r line; do
  case $line in
    -*) sh -c "exec $as_user ${line#-}" || true ;;
    +*) sh -c "exec ${line#+}" ;;
    *) sh -c "exec $as_user $line" ;;
  esac
done
setsid sh -c "exec $as_user $(value ExecStart)" > "$units/$unit.log" 2>&1 < /dev/null &
echo $! > "$pid"
# As systemd reports a unit that dies at once (port taken, bad settings) as failed.
sleep 1
if ! kill -0 "$(cat "$pid")" 2>/dev/null; then
  echo "$unit failed to start:" >&2; tail -n 20 "$units/$unit.log" >&2; exit 1
fi
"#;

/// docs/deployment.md, whose marked command blocks the deployment tests run.
pub const DEPLOYMENT_DOC: &str = include_str!("../../docs/deployment.md");

/// The command block under `<!-- deployment-test: NAME -->` in docs/deployment.md,
/// verbatim.
pub fn doc_step(name: &str) -> String {
    let marker = format!("<!-- deployment-test: {name} -->");
    let at = DEPLOYMENT_DOC
        .find(&marker)
        .unwrap_or_else(|| panic!("docs/deployment.md has no step `{name}`"));
    let mut lines = DEPLOYMENT_DOC[at + marker.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty());
    assert_eq!(
        lines.next(),
        Some("```sh"),
        "step `{name}` is not a sh block"
    );
    lines
        .take_while(|l| *l != "```")
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Every step the documentation marks, in the order it gives them.
pub fn doc_steps() -> Vec<String> {
    DEPLOYMENT_DOC
        .lines()
        .filter_map(|l| l.strip_prefix("<!-- deployment-test: "))
        .filter_map(|l| l.strip_suffix(" -->"))
        .map(str::to_string)
        .collect()
}

/// One fresh host. Dropping it kills what was started in it.
pub struct Host {
    pub name: String,
    harness_bin: PathBuf,
    holder: Child,
}

impl Host {
    pub fn new(ns: &Netns, root: &Path, name: &str) -> Host {
        let root = root.join(name);
        let harness_bin = root.join("harness-bin");
        std::fs::create_dir_all(&harness_bin).unwrap();
        let shim = harness_bin.join("systemctl");
        std::fs::write(&shim, SYSTEMCTL).unwrap();
        run_ok(Command::new("chmod").arg("0755").arg(&shim));
        let r = root.display();
        let script = format!(
            "set -e\n\
             for d in etc usr var; do\n\
               mkdir -p {r}/$d-upper {r}/$d-work\n\
               mount -t overlay overlay -o lowerdir=/$d,upperdir={r}/$d-upper,workdir={r}/$d-work /$d\n\
             done\n\
             mount -t tmpfs tmpfs /run\n\
             echo ready\n\
             exec sleep infinity\n"
        );
        let mut c = ns.command("unshare");
        c.args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        let mut holder = c.spawn().expect("spawn host");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "host {name} did not come up");
        Host {
            name: name.into(),
            harness_bin,
            holder,
        }
    }

    /// Runs `script` with `sh -e` on this host in `cwd`; returns (success, output).
    pub fn sh(&self, cwd: &Path, script: &str) -> (bool, String) {
        self.sh_with(cwd, script, &[])
    }

    /// Like [`Host::sh`], with extra environment variables.
    pub fn sh_with(&self, cwd: &Path, script: &str, env: &[(&str, &str)]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "-n"])
            .arg(format!("--wd={}", cwd.display()))
            .args(["sh", "-e", "-c", script])
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    self.harness_bin.display()
                ),
            )
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("nsenter");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Runs `script`, panicking with its output and the host's service logs on failure.
    pub fn run(&self, cwd: &Path, what: &str, script: &str) -> String {
        self.run_with(cwd, what, script, &[])
    }

    /// Like [`Host::run`], with extra environment variables.
    pub fn run_with(&self, cwd: &Path, what: &str, script: &str, env: &[(&str, &str)]) -> String {
        let (ok, out) = self.sh_with(cwd, script, env);
        assert!(
            ok,
            "{}: `{what}` failed:\n{script}\n--- output\n{out}\n{}",
            self.name,
            self.service_logs()
        );
        out
    }

    /// A file as this host sees it: through its mount namespace
    /// (`/proc/PID/root`), never the overlay's upper directory, whose inodes carry
    /// none of the locks taken through the overlay (SQLite would take a reader there
    /// for the last connection and delete the collector's WAL under it).
    pub fn path(&self, abs: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{abs}", self.holder.id()))
    }

    /// The first column of the first row of `sql` on the SQLite database `db` of this
    /// host, read inside the host (python3's sqlite3, read-only): SQLite's locks live on
    /// the overlay's inodes, and a reader outside would not see the writer's and could
    /// take itself for the last connection (and delete the live WAL).
    pub fn sql(&self, db: &str, sql: &str) -> Result<i64, String> {
        let script = format!(
            "python3 - <<'PY'\nimport sqlite3\nc = sqlite3.connect('file:{db}?mode=ro', uri=True, timeout=5)\nprint(c.execute({sql:?}).fetchone()[0])\nPY"
        );
        let (ok, out) = self.sh(Path::new("/"), &script);
        if !ok {
            return Err(out);
        }
        out.trim().parse().map_err(|_| out)
    }

    /// The logs of the services started with the `systemctl` stand-in.
    pub fn service_logs(&self) -> String {
        self.sh(
            Path::new("/"),
            "for f in /run/weilan-test-units/*.log; do [ -f \"$f\" ] && echo \"--- $f\" && tail -n 60 \"$f\"; done; true",
        )
        .1
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.sh(
            Path::new("/"),
            "for p in /run/weilan-test-units/*.pid; do [ -f \"$p\" ] && kill -9 $(cat \"$p\") 2>/dev/null; done; true",
        );
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}
