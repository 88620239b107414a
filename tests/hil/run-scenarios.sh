#!/usr/bin/env bash
# One command for the real-kernel USB fence scenarios: prepare, then run them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
bash "$ROOT/tests/hil/prepare.sh"
cd "$ROOT" && cargo test --test usb_fence_hil -- --nocapture
