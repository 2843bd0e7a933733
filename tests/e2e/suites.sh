#!/bin/bash
# Run the VM suites (tests/e2e/test_*.sh), each in a VM boot of its own, and
# add up their "N passed, N failed" lines.
#
#   tests/e2e/suites.sh [PATTERN]   only suites whose file name matches the glob
#
# Each suite gets a fresh guest kernel: nothing one suite leaves in the
# kernel (namespaces still being torn down, XFRM state, slab, a wedged
# kworker) reaches the next, and a guest kernel that dies takes one suite
# with it, not the ones after it.
#
# A guest kernel failure is not a test result. vm.sh boots the guest with
# softlockup_panic=1, so a kernel that locks up panics after 60 s (with
# every CPU's stack on the console) instead of hanging until the VM's
# timeout, and it exits 126 when the console shows a panic or a lockup. The
# suite then runs once more in a fresh VM, and the log says so, with the
# kernel's lines. A second kernel failure fails the suite; so does any
# failure of the suite's own.
#
# Environment (and everything vm.sh and run-all.sh read):
#   E2E_SUITE_TIMEOUT  limit for each suite, in seconds (default 420); its VM
#                      gets 120 s more, for the boot and the clean-up
#   E2E_TIMEOUT        budget for all the suites together, in seconds (default
#                      3600); a suite that would start past it is not run and
#                      counts one failure
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
pattern=${1:-*}
suite_timeout=${E2E_SUITE_TIMEOUT:-420}
budget=${E2E_TIMEOUT:-3600}
export E2E_SUITE_TIMEOUT=$suite_timeout

# One VM run of one suite: prints run-all.sh's "N passed, N failed" line
# (none if the VM died first) on stdout; returns vm.sh's exit code.
run_one() {
    local name=$1 left=$2 vm_timeout rc
    vm_timeout=$((suite_timeout + 120))
    ((vm_timeout <= left)) || vm_timeout=$left
    E2E_TIMEOUT=$vm_timeout "$here/vm.sh" "$here/run-all.sh" "$name" >&2
    rc=$?
    grep -E '^[0-9]+ passed, [0-9]+ failed$' "$repo/target/e2e/last/log" 2>/dev/null | tail -1
    return "$rc"
}

total_pass=0 total_fail=0 suites=0 reruns=0
start=$SECONDS
summary=()
for suite in "$here"/test_*.sh; do
    name=$(basename "$suite")
    # shellcheck disable=SC2053   # glob match intended
    [[ $name == $pattern ]] || continue
    suites=$((suites + 1))
    s=$SECONDS
    note=
    for try in 1 2; do
        left=$((budget - (SECONDS - start)))
        if ((left < 60)); then
            echo "FAIL - $name not run: the e2e budget of ${budget}s (E2E_TIMEOUT) is spent"
            p=0 f=1 note=" (not run)"
            break
        fi
        tally=$(run_one "$name" "$left")
        rc=$?
        p=0 f=0
        [[ -n $tally ]] && read -r p _ f _ <<<"$tally"
        if ((rc == 126 && try == 1)); then
            reruns=$((reruns + 1))
            echo "#      GUEST KERNEL FAILURE during $name (vm.sh exit 126; the lines are above," \
                "and in $(readlink -f "$repo/target/e2e/last")/console.log): running $name once more in a fresh VM"
            continue
        fi
        if ((rc == 126)); then
            echo "FAIL - $name: the guest kernel failed in two VM boots running it"
            f=$((f + 1)) note=" (guest kernel failed twice)"
        elif ((rc != 0 && f == 0)); then
            echo "FAIL - $name: its VM exited $rc without a failure of the suite's own (vm.sh: 124 timeout, 125 no exit code)"
            f=1
        fi
        ((try == 2)) && note="${note:- (second VM, after a guest kernel failure)}"
        break
    done
    summary+=("$(printf '%-28s %4d passed, %d failed, %4d s%s' "$name" "$p" "$f" $((SECONDS - s)) "$note")")
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
done

if ((suites == 0)); then
    echo "FAIL - no suite matches $here/test_$pattern"
    total_fail=1
fi
echo "=== VM suites, one VM boot each"
printf '%s\n' "${summary[@]}"
((reruns == 0)) || echo "# $reruns suite(s) ran a second time after a guest kernel failure (see GUEST KERNEL FAILURE above)"
echo "$total_pass passed, $total_fail failed ($((SECONDS - start)) s)"
((total_fail == 0))
