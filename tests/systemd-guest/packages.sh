#!/bin/sh
# Runs as root inside the systemd guest for tests/systemd_guest.rs: /share/files/debs/v1 and
# v2 hold two builds of the weilan-agent and weilan-collector packages (v2 newer).
# Install v1 on a clean Debian root -> both services active; stop the collector and
# record 1 000 events (failed ssh logins in the journal) that the agent cannot
# deliver; upgrade both to v2 -> every event delivered once; purge -> units, journal
# and database gone. Prints MEASURED lines; exits non-zero at the first broken promise.
set -eu
D=/share/files/debs
AGENT=ws-pkg-01
fail() {
  echo "FAILED: $*" >&2
  weilan-agent journal >&2 || true
  sql "SELECT kind || ' ' || COUNT(*) FROM events GROUP BY kind ORDER BY COUNT(*) DESC LIMIT 1" >&2 || true
  sql "SELECT envelope FROM events WHERE kind LIKE 'access.%' LIMIT 1" >&2 || true
  journalctl -t sshd --no-pager | tail -n 3 >&2
  journalctl -u weilan-agent -u weilan-collector --no-pager | tail -n 40 >&2
  exit 1
}
sql() {
  python3 - "$1" <<'PY'
import sqlite3, sys
c = sqlite3.connect('file:/var/lib/weilan-collector/weilan.db?mode=ro', uri=True, timeout=5)
print(c.execute(sys.argv[1]).fetchone()[0])
PY
}
until_true() {
  what=$1; secs=$2; shift 2
  end=$(( $(date +%s) + secs ))
  until "$@"; do
    [ "$(date +%s)" -lt "$end" ] || fail "waiting $secs s for: $what"
    sleep 0.5
  done
}
equals() { [ "$(sql "$2" 2>/dev/null || echo x)" = "$1" ]; }
at_least() { n=$(sql "$2" 2>/dev/null || echo 0); [ "${n:-0}" -ge "$1" ]; }
# The journal's records after its acknowledged watermark (`last E:S`, `acked E:S`).
unacked_at_least() {
  n=$(weilan-agent journal | awk '$1 == "last" {split($2, l, ":")} $1 == "acked" {split($2, a, ":")}
    END {print (l[2] + 0) - (a[2] + 0)}')
  [ "${n:-0}" -ge "$1" ]
}

echo '127.0.0.1 collector.example.internal' >> /etc/hosts
echo "== install v1"
dpkg -i "$D"/v1/weilan-collector_*.deb "$D"/v1/weilan-agent_*.deb
weilan-collector pki init --dir /etc/weilan/pki --name collector.example.internal
systemctl start weilan-collector
TOKEN=$(weilan-collector enroll create --count 1 --ttl 1h | tail -n 1)
weilan-agent enroll --collector collector.example.internal --token "$TOKEN" --id $AGENT
# The site's collector, as docs/deployment.md has it (an edited conffile, which the
# upgrade must keep).
sed -i 's/^host = .*/host = "collector.example.internal"/' /etc/weilan/agent.toml
systemctl start weilan-agent
systemctl is-active weilan-collector weilan-agent || fail "not active after install"
until_true "the agent's first events" 60 at_least 1 \
  "SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND kind = 'agent.started'"
echo "MEASURED installed: $(dpkg-query -W -f='${Package} ${Version} ${db:Status-Status}; ' weilan-agent weilan-collector)"

echo "== 1000 events the agent cannot deliver"
systemctl stop weilan-collector
i=0
while [ $i -lt 1100 ]; do
  i=$((i + 1))
  logger -t sshd "Failed password for invalid user pkgtest$i from 10.9.0.1 port 4$i ssh2"
done
until_true "1000 unacknowledged events in the agent's journal" 120 unacked_at_least 1000
sleep 2
status=$(weilan-agent journal)
# Keys are epoch:seq; this run's epoch holds both (every start takes a new epoch).
epoch=$(echo "$status" | awk '$1 == "last" {split($2, k, ":"); print k[1]}')
last=$(echo "$status" | awk '$1 == "last" {split($2, k, ":"); print k[2]}')
acked=$(echo "$status" | awk '$1 == "acked" {split($2, k, ":"); print k[2]}')
[ "$(echo "$status" | awk '$1 == "acked" {split($2, k, ":"); print k[1]}')" = "$epoch" ] \
  || fail "the acknowledged watermark is in another epoch than the last record: $status"
echo "MEASURED before the upgrade: $((last - acked)) undelivered events in the agent's journal (acked $epoch:$acked, last $epoch:$last)"

echo "== upgrade to v2"
dpkg -i "$D"/v2/weilan-collector_*.deb "$D"/v2/weilan-agent_*.deb
systemctl is-active weilan-collector weilan-agent || fail "not active after the upgrade"
# Exactly the records that waited: each stored once.
Q="SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND epoch = $epoch AND seq > $acked AND seq <= $last"
until_true "the waiting events stored" 120 at_least $((last - acked)) "$Q"
sleep 3
stored=$(sql "$Q")
distinct=$(sql "SELECT COUNT(DISTINCT event_id) FROM events WHERE agent_id = '$AGENT' AND epoch = $epoch AND seq > $acked AND seq <= $last")
logins=$(sql "SELECT COUNT(*) FROM events WHERE agent_id = '$AGENT' AND kind = 'access.login_failed' AND json_extract(envelope, '\$.event.data.user') LIKE 'pkgtest%'")
echo "MEASURED after the upgrade: $stored stored, $distinct distinct of $((last - acked)) waiting ($logins failed logins); $(dpkg-query -W -f='${Package} ${Version}; ' weilan-agent weilan-collector)edited agent.toml kept: $(grep -c '^host = "collector.example.internal"' /etc/weilan/agent.toml)"
[ "$stored" = $((last - acked)) ] && [ "$distinct" = "$stored" ] || fail "stored $stored, distinct $distinct of $((last - acked))"

echo "== purge"
dpkg --purge weilan-agent weilan-collector
left=""
for p in /var/lib/weilan-agent /var/lib/weilan-collector /usr/bin/weilan-agent /usr/bin/weilan-collector \
         /usr/lib/systemd/system/weilan-agent.service /usr/lib/systemd/system/weilan-collector.service \
         /etc/weilan/agent.toml /etc/weilan/collector.toml /etc/weilan/policy.toml; do
  [ -e "$p" ] && left="$left $p"
done
pgrep -u weilan -x mosquitto >/dev/null && left="$left (the collector's mosquitto)"
echo "MEASURED after purge: left [${left# }]; kept /etc/weilan/pki: $(ls /etc/weilan/pki | wc -l) files"
[ -z "$left" ] || fail "purge left:$left"
echo "JOB DONE"
