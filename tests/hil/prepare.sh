#!/usr/bin/env bash
# Builds what the real-kernel USB fence tests need (idempotent):
#  - the guest: Debian kernel, initramfs, stick images (build.sh, into $HIL_OUT)
#  - the agent, statically linked (the guest has no glibc of its own), stripped into
#    target/hil/weilan-agent, where the tests look for it.
# By default the agent is the test build's own: the same debug dependencies, only the
# program linked with crt-static (seconds; a second, release build of the whole tree
# took 7 minutes of CI's 20). HIL_PROFILE=release builds it as shipped instead, for
# the decision latency in BENCHMARKS.md.
# Then: cargo test --test usb_fence_hil   (or tests/hil/run-scenarios.sh, which does both)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export HIL_OUT=${HIL_OUT:-/tmp/weilan-hil}
bash "$ROOT/tests/hil/build.sh" "$HIL_OUT"
cd "$ROOT"
target=${CARGO_TARGET_DIR:-$ROOT/target}
mkdir -p "$ROOT/target/hil"
if [ "${HIL_PROFILE:-debug}" = release ]; then
  RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu --bin weilan-agent
  built=$target/x86_64-unknown-linux-gnu/release/weilan-agent
else
  cargo rustc --bin weilan-agent -- -C target-feature=+crt-static
  built=$target/debug/weilan-agent
fi
# A dynamically linked program asks for an interpreter (ld.so) the guest does not have.
if readelf -l "$built" | grep -q INTERP; then echo "prepare.sh: $built is not statically linked" >&2; exit 1; fi
strip -o "$ROOT/target/hil/weilan-agent" "$built"
echo "prepared: guest in $HIL_OUT, agent (${HIL_PROFILE:-debug}, static) in target/hil/weilan-agent"
