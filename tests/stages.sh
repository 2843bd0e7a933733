#!/bin/bash
# Runs make targets one after another, stops at the first that fails, and
# prints every stage's duration (and the total) at the end, so that CI
# shows where its time goes and how it grows.
#   tests/stages.sh TARGET...
set -uo pipefail
names=() secs=()
start=$SECONDS rc=0
for t in "$@"; do
    s=$SECONDS
    echo "=== stage $t (started at $((SECONDS - start)) s)"
    make --no-print-directory "$t" || rc=$?
    names+=("$t") secs+=($((SECONDS - s)))
    ((rc == 0)) || { echo "=== stage $t failed (exit $rc)"; break; }
done
echo "=== stage durations"
for i in "${!names[@]}"; do
    printf '%-20s %6d s\n' "${names[$i]}" "${secs[$i]}"
done
printf '%-20s %6d s\n' total $((SECONDS - start))
exit "$rc"
