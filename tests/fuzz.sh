#!/usr/bin/env bash
# Runs the cargo-fuzz target for a bounded time. cargo-fuzz needs a nightly
# compiler for its sanitizer flags: use the nightly toolchain when rustup has
# one, else the stable compiler in bootstrap mode without a sanitizer.
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p fuzz/corpus/cni_request
cp fuzz/seeds/* fuzz/corpus/cni_request/
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    run=(cargo +nightly fuzz run)
else
    export RUSTC_BOOTSTRAP=1
    run=(cargo fuzz run --sanitizer none)
fi
"${run[@]}" cni_request fuzz/corpus/cni_request -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 5
echo "fuzz: cni_request ran ${seconds}s with no crash"
