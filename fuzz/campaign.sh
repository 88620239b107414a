#!/bin/bash
# Runs every fuzz target for SECONDS (default 600), JOBS at a time (default 2), on
# its corpus (which grows), and prints one line per target: executions, new corpus
# entries, and any crash (kept under fuzz/artifacts/TARGET/). docs/fuzzing.md.
set -u
cd "$(dirname "$0")"
SECONDS_EACH=${1:-600}
JOBS=${2:-2}
export RUSTC_BOOTSTRAP=1
# As `cargo fuzz run` does: SQLite's amalgamation trips the ODR check.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
cargo fuzz build >/dev/null 2>&1 || { echo "cargo fuzz build failed"; exit 1; }
# The binaries as built now (a later edit of the tree does not rebuild them midway).
bin=target/x86_64-unknown-linux-gnu/release
echo "built from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- .. || echo ' (with uncommitted changes)')"
mkdir -p logs
targets=$(cargo fuzz list)
run_one() {
    t=$1
    mkdir -p "corpus/$t"; before=$(ls corpus/$t | wc -l)
    mkdir -p "artifacts/$t"
    "$bin/$t" -artifact_prefix="artifacts/$t/" "corpus/$t" "seeds/$t" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 >"logs/$t.log" 2>&1
    rc=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$')
    after=$(ls corpus/$t | wc -l)
    crash=$(ls artifacts/$t 2>/dev/null | tr '\n' ' ')
    echo "$t: ${runs:-?} executions in ${SECONDS_EACH} s, corpus $before -> $after, exit $rc${crash:+, artifacts: $crash}"
}
for t in $targets; do
    while [ "$(jobs -r | wc -l)" -ge "$JOBS" ]; do sleep 1; done
    run_one "$t" &
done
wait
