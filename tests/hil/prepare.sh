#!/usr/bin/env bash
# Builds what the real-kernel USB fence tests need (idempotent):
#  - the guest: Debian kernel, initramfs, stick images (build.sh, into $HIL_OUT)
#  - the agent, statically linked (the guest has no glibc of its own)
# Then: cargo test --test usb_fence_hil   (or tests/hil/run-scenarios.sh, which does both)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export HIL_OUT=${HIL_OUT:-/tmp/weilan-hil}
bash "$ROOT/tests/hil/build.sh" "$HIL_OUT"
cd "$ROOT"
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu --bin weilan-agent
echo "prepared: guest in $HIL_OUT, agent in target/x86_64-unknown-linux-gnu/release/weilan-agent"
