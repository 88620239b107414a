#!/bin/bash
# build.sh [OUTDIR]  -- a Debian 12 guest whose PID 1 is systemd, for testing Weilan's units
# and packages (tests/systemd_guest.rs). The project's copy of shared/tools/systemd-guest,
# with the guest packages the test needs (python3 reads the collector's database,
# netcat-openbsd makes an upload between network namespaces, mosquitto is the collector's
# embedded broker).
# Default OUTDIR: $SDG_OUT or /tmp/weilan-systemd-guest. Needs root (apt-get, mmdebstrap).
# ~1-2 min; a second call with the guest already built returns at once.
# EXTRA="pkg1 pkg2" adds Debian packages to the guest root.
set -euo pipefail
OUT=$(realpath -m "${1:-${SDG_OUT:-/tmp/weilan-systemd-guest}}")
mkdir -p "$OUT"
pkgs="systemd,systemd-sysv,udev,kmod,iproute2,dbus,procps,ca-certificates,python3,netcat-openbsd,mosquitto"
for p in ${EXTRA:-}; do pkgs="$pkgs,$p"; done
# Rebuilt when the package list changed since the last build.
[ -f "$OUT/root.cpio.gz" ] && [ -f "$OUT/vmlinuz" ] && [ "$(cat "$OUT/packages" 2>/dev/null)" = "$pkgs" ] && { echo "guest already built: $OUT"; exit 0; }
need=(qemu-system-x86_64:qemu-system-x86 mmdebstrap:mmdebstrap cpio:cpio depmod:kmod)
miss=(); for p in "${need[@]}"; do command -v "${p%%:*}" >/dev/null || miss+=("${p#*:}"); done
if [ ${#miss[@]} -gt 0 ]; then
  apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${miss[@]}"
fi
# guest kernel: Debian's linux-image package, unpacked (the host kernel is untouched)
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || { apt-get update -qq; KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
KVER=${KPKG#linux-image-}; KX="$OUT/kernel/$KVER"
if [ ! -f "$KX/boot/vmlinuz-$KVER" ]; then
  mkdir -p "$OUT/dl" "$OUT/kernel" && chmod 777 "$OUT/dl"
  ( cd "$OUT/dl" && apt-get download "$KPKG" )
  rm -rf "$KX.tmp" && dpkg -x "$OUT"/dl/"$KPKG"_*.deb "$KX.tmp" && depmod -b "$KX.tmp" "$KVER" && mv "$KX.tmp" "$KX"
fi
cp "$KX/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
# root file system: minbase + systemd, unpacked into an initramfs (no disk image, no partitioning)
R="$OUT/root"; rm -rf "$R" "$OUT/root.tar"
mmdebstrap --quiet --variant=minbase --include="$pkgs" bookworm "$OUT/root.tar"   # mirror: the host's apt sources
mkdir -p "$R" && tar -xf "$OUT/root.tar" -C "$R" && rm -f "$OUT/root.tar"
mkdir -p "$R/lib/modules" && cp -a "$KX/lib/modules/$KVER" "$R/lib/modules/"
echo systemd-guest > "$R/etc/hostname"
printf '9p\n9pnet_virtio\n' > "$R/etc/modules-load.d/share.conf"
mkdir -p "$R/share"
# the job: /share/job.sh runs once the system is up; its output and exit status land in /share/out
cat > "$R/etc/systemd/system/guest-job.service" <<'UNIT'
[Unit]
Description=Run /share/job.sh, then power off
After=multi-user.target
[Service]
Type=oneshot
StandardOutput=journal+console
ExecStartPre=/bin/sh -c 'mount -t 9p -o trans=virtio,version=9p2000.L share /share && mkdir -p /share/out'
ExecStart=/bin/sh -c 'cd /root; /bin/sh /share/job.sh > /share/out/stdout 2> /share/out/stderr; echo $? > /share/out/rc'
ExecStopPost=/bin/systemctl poweroff --no-block
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/guest-job.service "$R/etc/systemd/system/multi-user.target.wants/guest-job.service"
ln -sf /lib/systemd/systemd "$R/init"
( cd "$R" && find . | cpio -o -H newc --quiet ) | gzip -1 > "$OUT/root.cpio.gz"
rm -rf "$R"
echo "$pkgs" > "$OUT/packages"
echo "built: $OUT/vmlinuz, $OUT/root.cpio.gz (kernel $KVER)"
