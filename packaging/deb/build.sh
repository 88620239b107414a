#!/bin/bash
# build.sh BINARY VERSION OUTDIR [AGENT_BINARY] -- the weilan-agent and
# weilan-collector Debian packages (amd64) from one built `weilan` program (it runs as
# either, by its name) and this repository's config/. With AGENT_BINARY (the
# agent-only `weilan-agent` program, built beside it by `cargo build --release
# --workspace`) the agent package carries that instead: no collector, rules engine or
# database code on every workstation, about 4 MiB less resident (BENCHMARKS.md).
# dpkg-deb is the builder; the maintainer scripts are the
# ones beside this file. tests/systemd-guest/packages.sh installs, upgrades and purges them under a
# real systemd (tests/systemd_guest.rs). Needs dpkg-deb (Debian's dpkg).
set -euo pipefail
BIN=$(realpath "$1"); VERSION=$2; OUT=$(realpath -m "$3"); AGENT_BIN=$(realpath "${4:-$1}")
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd); CFG="$REPO/config"
mkdir -p "$OUT"
stage() {  # stage PACKAGE: a fresh root with DEBIAN/ from the templates
  local root="$OUT/$1.root"
  rm -rf "$root"; mkdir -p "$root/DEBIAN"
  sed "s/@VERSION@/$VERSION/" "$HERE/$1.control" > "$root/DEBIAN/control"
  for s in postinst prerm postrm; do install -m 0755 "$HERE/$1.$s" "$root/DEBIAN/$s"; done
  install -m 0644 "$HERE/$1.conffiles" "$root/DEBIAN/conffiles"
  echo "$root"
}
finish() {  # finish PACKAGE ROOT
  dpkg-deb --root-owner-group -Zxz -z1 --build "$2" "$OUT/${1}_${VERSION}_amd64.deb" >/dev/null
  rm -rf "$2"
  echo "$OUT/${1}_${VERSION}_amd64.deb"
}

r=$(stage weilan-agent)
install -D -m 0755 "$AGENT_BIN" "$r/usr/bin/weilan-agent"
install -D -m 0644 "$CFG/weilan-agent.service" "$r/usr/lib/systemd/system/weilan-agent.service"
install -D -m 0644 "$CFG/agent.toml" "$r/etc/weilan/agent.toml"
install -D -m 0644 "$CFG/policy.toml" "$r/usr/share/weilan-agent/policy.toml"
finish weilan-agent "$r"

r=$(stage weilan-collector)
install -D -m 0755 "$BIN" "$r/usr/bin/weilan-collector"
install -D -m 0644 "$CFG/weilan-collector.service" "$r/usr/lib/systemd/system/weilan-collector.service"
install -D -m 0644 "$CFG/weilan-collector.sysusers" "$r/usr/lib/sysusers.d/weilan-collector.conf"
install -D -m 0644 "$CFG/weilan-collector.tmpfiles" "$r/usr/lib/tmpfiles.d/weilan-collector.conf"
install -D -m 0644 "$CFG/collector.toml" "$r/etc/weilan/collector.toml"
install -D -m 0644 "$CFG/policy.toml" "$r/usr/share/weilan-collector/policy.toml"
install -D -m 0644 "$CFG/mosquitto/weilan.conf" "$r/usr/share/weilan-collector/mosquitto/weilan.conf"
install -D -m 0644 "$CFG/mosquitto/weilan.acl" "$r/usr/share/weilan-collector/mosquitto/weilan.acl"
finish weilan-collector "$r"
