#!/usr/bin/env bash
# Runs the cargo-fuzz target for a bounded time. cargo-fuzz needs a nightly
# compiler for its sanitizer flags: use the nightly toolchain when rustup has
# one, else the stable compiler in bootstrap mode without a sanitizer.
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/corpus/cni_request fuzz/corpus/datastore
cp fuzz/seeds/* fuzz/corpus/cni_request/
cp fuzz/seeds-datastore/* fuzz/corpus/datastore/
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    run=(cargo +nightly fuzz run)
else
    export RUSTC_BOOTSTRAP=1
    run=(cargo fuzz run --sanitizer none)
fi
# The time is shared between the two targets.
for target in cni_request datastore; do
    "${run[@]}" "$target" "fuzz/corpus/$target" -- -max_total_time=$((seconds / 2)) -rss_limit_mb=2048 2>&1 | tail -n 5
    echo "fuzz: $target ran $((seconds / 2))s with no crash"
done
