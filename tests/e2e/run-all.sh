#!/bin/bash
# Run every tests/e2e/test_*.sh (inside one VM boot: tests/e2e/vm.sh
# tests/e2e/run-all.sh) and add up their "N passed, N failed" lines.
# A suite that exits non-zero without failures of its own, or prints no
# tally, counts one failure.
#   run-all.sh [PATTERN]   only suites whose file name matches the glob PATTERN
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
pattern=${1:-*}
# The guest's devtmpfs has no /dev/fd, which process substitution needs.
[[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd

total_pass=0 total_fail=0 suites=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

for suite in "$here"/test_*.sh; do
    name=$(basename "$suite")
    # shellcheck disable=SC2053   # glob match intended
    [[ $name == $pattern ]] || continue
    suites=$((suites + 1))
    echo "=== $name"
    start=$SECONDS
    rc=0
    # A hung suite must not take the others down with it. timeout makes the
    # suite a process group of its own, so leftovers are killed afterwards;
    # output goes through a file so a leaked child cannot block us.
    : >"$log"
    mapfile -t before < <(find /tmp -mindepth 1 -maxdepth 1 -printf '%f\n')
    timeout -k 5 "${E2E_SUITE_TIMEOUT:-420}" "$suite" </dev/null >"$log" 2>&1 &
    pid=$!
    tail -s 0.2 -n +1 -f --pid="$pid" "$log"
    wait "$pid" || rc=$?
    kill -KILL -- "-$pid" 2>/dev/null || true
    tally=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -1 || true)
    # In the VM /tmp is a tmpfs in the guest's memory: what a suite left
    # there (etcd's data, captures, copies of the binary) would fill it for
    # the suites after it. Each leaves /tmp as it found it. A suite that
    # failed first leaves its daemons' logs and its JSON reports (agents,
    # managers, plugins, traffic) in the run's share, for the host to read.
    if [[ ${E2E_IN_VM:-} == 1 ]]; then
        mapfile -t left < <(comm -13 <(printf '%s\n' "${before[@]}" | sort) \
            <(find /tmp -mindepth 1 -maxdepth 1 -printf '%f\n' | sort) | grep -vxF "$(basename "$log")" || true)
        if ((${#left[@]} > 0)); then
            if [[ -n ${E2E_OUT:-} ]] && { ((rc != 0)) || ! grep -q ' 0 failed$' <<<"$tally"; }; then
                kept=$E2E_OUT/failed/${name%.sh}
                mkdir -p "$kept"
                (cd /tmp && find "${left[@]}" -maxdepth 2 -type f \( -name '*.log' -o -name '*.json' \) \
                    -size -8M -exec cp --parents -t "$kept" {} + 2>/dev/null) || true
                echo "#      kept $name's logs in the run's share: failed/${name%.sh}/ (vm.sh prints where)"
            fi
            kb=$(cd /tmp && du -sk -- "${left[@]}" 2>/dev/null | awk '{s += $1} END {print s + 0}')
            (cd /tmp && rm -rf -- "${left[@]}")
            echo "#      removed what $name left in /tmp: $((kb / 1024)) MiB"
        fi
    fi
    p=0 f=0
    if [[ -n $tally ]]; then
        read -r p _ f _ <<<"$tally"
    fi
    if [[ -z $tally && $rc == 0 ]]; then
        echo "FAIL - $name printed no 'N passed, N failed' line"
        f=1
    elif ((rc != 0 && f == 0)); then
        if ((rc == 124)); then
            echo "FAIL - $name timed out after ${E2E_SUITE_TIMEOUT:-420}s"
        else
            echo "FAIL - $name exited $rc without reporting a failure"
        fi
        f=$((f + 1))
    fi
    echo "=== $name: $p passed, $f failed ($((SECONDS - start))s)"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
done

if ((suites == 0)); then
    echo "FAIL - no suite matches $here/test_$pattern"
    total_fail=1
fi
echo "$total_pass passed, $total_fail failed"
((total_fail == 0))
