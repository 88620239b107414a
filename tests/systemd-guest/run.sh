#!/bin/bash
# run.sh JOB.sh  (the project's copy of shared/tools/systemd-guest/run.sh)
# [--put PATH]... [--timeout S] [--mem MiB]
# Boots the guest from build.sh (OUTDIR: $SDG_OUT or /tmp/systemd-guest) with systemd as PID 1,
# runs JOB.sh as root once multi-user.target is reached (files given with --put are in /share/files),
# powers off, prints the job's stdout/stderr and exits with its status (124 on timeout).
set -euo pipefail
OUT=$(realpath -m "${SDG_OUT:-/tmp/weilan-systemd-guest}")
[ -f "$OUT/root.cpio.gz" ] || { echo "run.sh: build the guest first: build.sh" >&2; exit 2; }
job=$1; shift; puts=(); timeout=300; mem=2048
while [ $# -gt 0 ]; do case $1 in
  --put) puts+=("$2"); shift 2;; --timeout) timeout=$2; shift 2;; --mem) mem=$2; shift 2;;
  *) echo "run.sh: unknown argument $1" >&2; exit 2;; esac; done
RUN=$(mktemp -d "$OUT/run.XXXXXX"); mkdir -p "$RUN/share/out" "$RUN/share/files"
cp "$job" "$RUN/share/job.sh"
for p in "${puts[@]}"; do cp -a "$p" "$RUN/share/files/"; done
t0=$(date +%s)
set +e
timeout "$timeout" qemu-system-x86_64 -m "$mem" -smp 2 -nographic -no-reboot -nic none \
  -kernel "$OUT/vmlinuz" -initrd "$OUT/root.cpio.gz" \
  -append "console=ttyS0 rdinit=/lib/systemd/systemd systemd.unit=multi-user.target panic=-1 quiet" \
  -fsdev "local,id=share,path=$RUN/share,security_model=none" -device virtio-9p-pci,fsdev=share,mount_tag=share \
  > "$RUN/console.log" 2>&1
q=$?
set -e
echo "run.sh: guest ran $(( $(date +%s) - t0 )) s; console log $RUN/console.log" >&2
cat "$RUN/share/out/stdout" 2>/dev/null; cat "$RUN/share/out/stderr" >&2 2>/dev/null
[ $q -eq 124 ] && { echo "run.sh: timed out after $timeout s" >&2; exit 124; }
[ -f "$RUN/share/out/rc" ] || { echo "run.sh: the job did not finish (see the console log)" >&2; exit 125; }
exit "$(cat "$RUN/share/out/rc")"
