#!/usr/bin/env bash
# The long fuzz run of the admission core (not in CI; CI replays the committed
# corpus on stable through `cargo test --test fuzz_corpus`).
#   bench/fuzz/run.sh [seconds per target, default 3600]
# Needs `cargo install cargo-fuzz` and a nightly toolchain. One job: the box is
# shared. New inputs go to a scratch corpus; the committed seeds are refreshed
# with `cargo fuzz cmin` only when coverage grew. A crash stops the run and
# leaves its input in fuzz/artifacts/<target>/: add it to fuzz/corpus/<target>/
# and a regression test named after the bug to core/tests/fuzz_corpus.rs.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-3600}
work=${FUZZ_WORK:-/tmp/tierq-fuzz}
for target in admission_ops bucket; do
    mkdir -p "$work/$target"
    cp -n fuzz/corpus/$target/* "$work/$target/" 2>/dev/null || true
    cargo +nightly fuzz run "$target" "$work/$target" -- \
        -max_total_time="$secs" -jobs=1 -workers=1 -print_final_stats=1 2>&1 \
        | grep -E '^(#[0-9]+ +(DONE|INITED)|stat::|Done|==|thread|.*panicked)' || true
    echo "$target: $(ls "$work/$target" | wc -l) inputs in $work/$target"
    echo "  minimize into the repo: rm -rf /tmp/cmin && mkdir /tmp/cmin && cp $work/$target/* /tmp/cmin/ && cargo +nightly fuzz cmin $target /tmp/cmin"
done
