#!/bin/sh
# Runs as root inside the systemd guest for tests/systemd_guest.rs, with systemd 252 as
# PID 1. /share/files/release holds the programs and config/, /share/files/steps the
# command blocks of docs/deployment.md (verbatim). Installs collector and agent on this
# one host exactly as documented, then shows what the units promise: both active,
# their `systemd-analyze security` exposure, the network source measuring an upload
# between two other network namespaces under the hardened unit, 7z archives classified
# through the agent's memory-capped child process, a watchdog restart on
# a hung recorder, 20 crash-restarts, and a clean stop that delivers agent.stopping.
# Prints MEASURED lines; exits non-zero at the first broken promise.
set -eu
F=/share/files
AGENT=ws-finance-01

sql() {
  python3 - "$1" <<'PY'
import sqlite3, sys
c = sqlite3.connect('file:/var/lib/weilan-collector/weilan.db?mode=ro', uri=True, timeout=5)
print(c.execute(sys.argv[1]).fetchone()[0])
PY
}
# until_true WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
until_true() {
  what=$1; secs=$2; shift 2
  end=$(( $(date +%s) + secs ))
  until "$@"; do
    if [ "$(date +%s)" -ge "$end" ]; then
      echo "FAILED waiting $secs s for: $what" >&2
      journalctl -u weilan-agent -u weilan-collector --no-pager | tail -n 60 >&2
      exit 1
    fi
    sleep 0.5
  done
}
at_least() { n=$(sql "$2" 2>/dev/null || echo 0); [ "${n:-0}" -ge "$1" ]; }
step() {
  echo "== docs/deployment.md: $1"
  ( cd "$F/release" && sh -e "$F/steps/$1.sh" ) || {
    journalctl -u weilan-agent -u weilan-collector --no-pager | tail -n 60 >&2
    exit 1
  }
}
prop() { systemctl show -P "$2" "$1"; }
new_main_pid() { p=$(prop "$1" MainPID); [ "$p" != 0 ] && [ "$p" != "$2" ] && [ "$(systemctl is-active "$1")" = active ]; }
restarts_above() { [ "$(prop "$1" NRestarts)" -gt "$2" ]; }

# Name resolution, as the site's DNS would give it.
echo '127.0.0.1 collector.example.internal' >> /etc/hosts
step collector-install
step collector-pki
step collector-start
# The token the documented step prints (its last line), handed to the workstation
# (here the same host).
TOKEN=$(cd "$F/release" && sh -e "$F/steps/collector-enroll-token.sh" | tail -n 1)
export TOKEN
step workstation-install

systemctl is-active weilan-collector weilan-agent
until_true "the agent's first events" 60 at_least 1 \
  "SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND kind = 'agent.started'"
echo "MEASURED collector runs as: $(ps -o user= -p "$(prop weilan-collector MainPID)")"
for u in weilan-agent weilan-collector; do
  echo "MEASURED $(systemd-analyze security "$u" | grep 'Overall exposure level')"
done

# The network source, under the hardened unit (setns into other namespaces): 3 MiB
# sent from one namespace to another over a shaped veth, to an address outside the
# shipped policy's allowlist that exists only in this guest.
ip netns add up-src
ip netns add up-dst
ip link add va netns up-src type veth peer name vb netns up-dst
ip -n up-src addr add 198.18.0.1/24 dev va
ip -n up-dst addr add 198.18.0.2/24 dev vb
for n in up-src up-dst; do ip -n $n link set lo up; done
ip -n up-src link set va up
ip -n up-dst link set vb up
ip netns exec up-src tc qdisc add dev va root tbf rate 16mbit burst 32kbit latency 400ms 2>/dev/null || true
ip netns exec up-dst sh -c 'nc -l 198.18.0.2 9000 > /dev/null' &
sleep 1
ip netns exec up-src sh -c 'head -c 3145728 /dev/zero | nc -N 198.18.0.2 9000'
until_true "the upload from another network namespace" 30 at_least 1 \
  "SELECT COUNT(*) FROM events WHERE kind = 'net.transfer' AND json_extract(envelope, '$.event.data.phase') = 'closed' AND json_extract(envelope, '$.event.data.remote_addr') LIKE '198.18.0.2%'"
echo "MEASURED upload: $(sql "SELECT json_extract(envelope, '$.event.data.bytes_sent') || ' bytes sent to ' || json_extract(envelope, '$.event.data.remote_addr') || ' from netns ' || json_extract(envelope, '$.event.data.netns') FROM events WHERE kind = 'net.transfer' AND json_extract(envelope, '$.event.data.phase') = 'closed' ORDER BY received_at DESC LIMIT 1")"

# Classification under the hardened unit: a folder made an exit point (watch_mounts),
# a 7z archive decompressed by the agent's own memory-capped child process
# (classify/sevenz.rs), and one whose header claims 1 TiB, which kills only that child.
mkdir -p /mnt/exit
mount -t tmpfs exit /mnt/exit
sed -i 's|^watch_mounts = \[\]|watch_mounts = ["/mnt/exit"]|' /etc/weilan/agent.toml
started=$(sql "SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND kind = 'agent.started'")
systemctl restart weilan-agent
until_true "the agent restarted with /mnt/exit" 60 at_least $((started + 1)) \
  "SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND kind = 'agent.started'"
agent_pid=$(prop weilan-agent MainPID)
cp "$F/release/samples/header-bomb.7z" "$F/release/samples/secret.7z" /mnt/exit/ || true
exported() {
  sql "SELECT COALESCE(group_concat(json_extract(c.value, '$.detector') || ' ' || json_extract(c.value, '$.samples[0]'), ' | '), '') FROM events, json_each(json_extract(envelope, '$.event.data.classification')) c WHERE kind = 'file.exported' AND json_extract(envelope, '$.event.data.path') = '$1'"
}
has_classes() { [ -n "$(exported /mnt/exit/secret.7z)" ] && [ -n "$(exported /mnt/exit/header-bomb.7z)" ]; }
until_true "both 7z archives classified" 30 has_classes
echo "MEASURED 7z secret.7z: $(exported /mnt/exit/secret.7z)"
echo "MEASURED 7z header-bomb.7z: $(exported /mnt/exit/header-bomb.7z)"
echo "MEASURED 7z agent: same pid $([ "$(prop weilan-agent MainPID)" = "$agent_pid" ] && echo yes || echo no), NRestarts $(prop weilan-agent NRestarts)"
# The child confines itself (capabilities, Landlock) under the unit's syscall filter;
# if it could not, the agent logs the child's warning.
echo "MEASURED 7z confinement warnings in the agent's journal: $(journalctl -u weilan-agent --no-pager | grep -c "partly confined" || true)"
echo "MEASURED 7z confinement on this kernel: $(/usr/bin/weilan-agent unpack-7z --check-confinement | tr '\n' ';')"

# Watchdog: the recording loop hangs (fault injection), the keep-alives stop, systemd
# kills and restarts the agent.
mkdir -p /etc/systemd/system/weilan-agent.service.d
cat > /etc/systemd/system/weilan-agent.service.d/fault.conf <<'EOF'
[Service]
Environment=WEILAN_FAULT_STALL_RECORDER=/run/weilan-stall-recorder
WatchdogSec=10
EOF
systemctl daemon-reload
systemctl restart weilan-agent
before=$(prop weilan-agent NRestarts)
touch /run/weilan-stall-recorder
until_true "a watchdog restart" 60 restarts_above weilan-agent "$before"
rm -f /run/weilan-stall-recorder
until_true "the agent back after the watchdog" 30 new_main_pid weilan-agent 0
echo "MEASURED watchdog: NRestarts $before -> $(prop weilan-agent NRestarts); $(journalctl -u weilan-agent --no-pager | grep -c 'Watchdog timeout') watchdog timeout(s) in the journal"

# 20 crash-restarts in quick succession (RestartSec shortened so that systemd's
# default start limit, 5 in 10 s, would stop the unit; StartLimitIntervalSec=0 must not).
cat > /etc/systemd/system/weilan-agent.service.d/fault.conf <<'EOF'
[Service]
RestartSec=200ms
EOF
systemctl daemon-reload
until_true "the agent active" 30 new_main_pid weilan-agent 0
before=$(prop weilan-agent NRestarts)
start=$(date +%s)
i=0
while [ $i -lt 20 ]; do
  i=$((i + 1))
  pid=$(prop weilan-agent MainPID)
  kill -9 "$pid"
  until_true "crash-restart $i" 30 new_main_pid weilan-agent "$pid"
done
echo "MEASURED crash-restarts: 20 kill -9 in $(( $(date +%s) - start )) s, NRestarts $before -> $(prop weilan-agent NRestarts), now $(systemctl is-active weilan-agent)"
rm -rf /etc/systemd/system/weilan-agent.service.d
systemctl daemon-reload

# The collector restarts too (and its broker with it); the agent reconnects.
connects() { journalctl -u weilan-agent --no-pager | grep -c "MQTT connected" || true; }
agent_reconnected() { [ "$(connects)" -gt "$1" ]; }
before=$(connects)
pid=$(prop weilan-collector MainPID)
kill -9 "$pid"
until_true "the collector back" 30 new_main_pid weilan-collector "$pid"
until_true "the agent reconnected" 60 agent_reconnected "$before"
echo "MEASURED collector crash-restart: NRestarts $(prop weilan-collector NRestarts)"

# A clean stop drains: agent.stopping reaches the collector.
stopping=$(sql "SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND kind = 'agent.stopping'")
systemctl stop weilan-agent
until_true "agent.stopping stored" 30 at_least $((stopping + 1)) \
  "SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND kind = 'agent.stopping'"
echo "MEASURED clean stop: agent.stopping stored ($(( stopping + 1 )) in all), unit $(systemctl is-active weilan-agent || true)"
echo "JOB DONE"
