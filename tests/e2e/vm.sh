#!/bin/bash
# Boot Debian's stock kernel under qemu (TCG) with the host's root as a
# read-only 9p root, run one script inside, and exit with its exit code.
#
#   tests/e2e/vm.sh SCRIPT [ARGS...]      e.g. tests/e2e/vm.sh tests/e2e/run-all.sh
#
# Environment:
#   E2E_TIMEOUT   hard limit for the whole VM run in seconds (default 300)
#   E2E_KVER      kernel version (default: newest /boot/vmlinuz-* with modules)
#   E2E_MEM/E2E_SMP  guest memory (MiB, default 1024) and CPUs (default 2)
#   E2E_APPEND    extra kernel command line (e.g. e2e.rootcache=none: the 9p
#                 root is mounted cache=loose by default, for speed)
#   CALICO_IPSEC  binary under test (default $repo/target/release/calico-ipsec)
#   Every CALICO_IPSEC and E2E_* variable is passed into the guest.
# Logs: target/e2e/last/{console.log,log,rc} (console.log is also streamed).
# Exit: the script's own code; 124 timeout (the guest gets an NMI 30 s before,
# for its stacks); 125 the VM ended without an exit
# code; 126 the guest kernel panicked or locked up (its lines are printed).
# Needs root on the host: Debian's /boot/vmlinuz-* is readable by root only.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=$repo/target/e2e

[[ $# -ge 1 ]] || { echo "usage: $0 SCRIPT [ARGS...]" >&2; exit 2; }
script=$(realpath "$1"); shift
[[ -x $script ]] || { echo "vm.sh: $script is not an executable file" >&2; exit 2; }
# The guest mounts tmpfs over /tmp, /run, /var/lib, /var/log, /var/tmp and
# /var/cache. The repository is therefore shared on its own (never its
# parent: a checkout at /tmp/calico-ipsec would hide the guest's /tmp behind
# a read-only share) and mounted back at the same path over that tmpfs, so a
# checkout anywhere is visible in the guest. Nothing outside it is shared.
work=$repo
case $work in
    *[[:space:]]*) echo "vm.sh: $work contains whitespace; the guest cannot mount it" >&2; exit 2 ;;
esac
case $script in
    "$work"/*) ;;
    /tmp/* | /run/* | /var/lib/* | /var/log/* | /var/tmp/* | /var/cache/*)
        echo "vm.sh: $script is under a directory the guest hides behind tmpfs" >&2; exit 2 ;;
esac

pick_kver() {
    local v best=
    for v in $(find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V); do
        [[ -d /lib/modules/$v/kernel ]] && best=$v
    done
    [[ -n $best ]] || { echo "vm.sh: no /boot/vmlinuz-* with matching /lib/modules (apt-get install linux-image-amd64)" >&2; return 1; }
    echo "$best"
}
kver=${E2E_KVER:-$(pick_kver)}
kernel=/boot/vmlinuz-$kver
[[ -r $kernel ]] || { echo "vm.sh: cannot read $kernel (run as root)" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "vm.sh: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 2; }

# (Re)build the initramfs when missing or older than its inputs.
mkdir -p "$cache"
initrd=$cache/initramfs-$kver.cpio.gz
if [[ ! -s $initrd || $here/build-initramfs.sh -nt $initrd || /bin/busybox -nt $initrd \
      || /lib/modules/$kver/modules.dep -nt $initrd ]]; then
    E2E_KVER=$kver "$here/build-initramfs.sh" "$initrd"
fi

# Writable share for results; "last" points at the newest run.
out=$(mktemp -d "$cache/run.XXXXXX")
ln -sfn "$(basename "$out")" "$cache/last"
# Keep the 30 newest runs (tests/e2e/suites.sh boots one VM per suite).
find "$cache" -maxdepth 1 -name 'run.*' -type d -printf '%T@ %p\n' | sort -rn | tail -n +31 \
    | cut -d' ' -f2- | xargs -r rm -rf

# What the guest runs: cwd, environment, arguments (bash-quoted).
export CALICO_IPSEC=${CALICO_IPSEC:-$repo/target/release/calico-ipsec}
{
    printf 'cd %q\n' "$PWD"
    while IFS= read -r name; do
        printf 'export %s=%q\n' "$name" "${!name}"
    done < <(compgen -e | grep -E '^(CALICO_IPSEC|E2E_[A-Z0-9_]+)$' | grep -vxE 'E2E_(IN_VM|OUT)')
} >"$out/env"
[[ $# -gt 0 ]] && printf '%q ' "$@" >"$out/args"

timeout_s=${E2E_TIMEOUT:-300}
console=$out/console.log
echo "vm.sh: kernel $kver, running $script${*:+ $*}, timeout ${timeout_s}s, logs in $out" >&2

# A guest kernel that locks up panics (softlockup_panic) after 60 s
# (watchdog_thresh=30: twice that, well past a stall of TCG's own) instead
# of hanging until the timeout. On the way down it takes every CPU's stack
# (softlockup_all_cpu_backtrace, panic_print 0x40) and replays the kernel
# log at full verbosity (0x20), which loglevel=3 otherwise keeps off the
# console. panic=-1 with -no-reboot then ends qemu.
#
# A wedged guest that is no soft lockup (a CPU spinning with interrupts
# off, say) gets an NMI through qemu's monitor 30 s before the timeout;
# unknown_nmi_panic turns it into the same panic, stacks and all, and vm.sh
# reports the timeout with them. (Within the VM, run-all.sh's own per-suite
# timeout ends a suite that merely hangs long before this.)
fail_fast="softlockup_panic=1 softlockup_all_cpu_backtrace=1 panic_print=0x60 watchdog_thresh=30 unknown_nmi_panic"
# The monitor is a pair of FIFOs (a unix socket's path would be limited to
# 108 bytes, and a clone may sit deeper).
monitor=$out/monitor
mkfifo "$monitor.in" "$monitor.out"
nmi_after=$((timeout_s > 90 ? timeout_s - 30 : timeout_s * 2 / 3))
# The watcher speaks on a copy of stderr (fd 3): its own stderr is
# /dev/null, so bash's "Terminated" when vm.sh stops its sleep stays out
# of the log, and a killed sleep ends it there.
exec 3>&2
(
    sleep "$nmi_after" || exit 0
    echo "vm.sh: the VM is still up after ${nmi_after}s: an NMI, for every CPU's stack" >&3
    : >"$out/nmi-sent"
    # shellcheck disable=SC2016   # $1 is the inner shell's
    timeout 5 bash -c 'echo nmi >"$1"' _ "$monitor.in"
) </dev/null >/dev/null 2>/dev/null &
watcher=$!
exec 3>&-

start=$(date +%s.%N)
set +e
# No NIC: all traffic stays in namespaces inside the guest. stdin is
# /dev/null so qemu never touches the terminal's mode.
timeout -k 10 "$timeout_s" qemu-system-x86_64 \
    -accel tcg -cpu max -m "${E2E_MEM:-1024}" -smp "${E2E_SMP:-2}" \
    -nographic -nodefaults -serial stdio -no-reboot -nic none \
    -monitor "pipe:$monitor" \
    -kernel "$kernel" -initrd "$initrd" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$work,mount_tag=work,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$out,mount_tag=out,security_model=none,multidevs=remap" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 $fail_fast e2e.script=$script e2e.work=$work ${E2E_APPEND:-}" \
    </dev/null 2>&1 | sed -u $'s/\e\\[[0-9;?]*[A-Za-z]//g; s/\ec//g' | tee "$console"
status=("${PIPESTATUS[@]}")
pkill -P "$watcher" 2>/dev/null
kill "$watcher" 2>/dev/null
rm -f "$monitor.in" "$monitor.out"
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

# The guest kernel itself failed: say so apart from a test's failure or a
# hang (exit 126; tests/e2e/suites.sh runs such a suite once more).
kernel_failed='Kernel panic - not syncing|BUG: soft lockup'
if [[ ! -s $out/rc ]] && grep -qE "$kernel_failed" "$console"; then
    what="GUEST KERNEL FAILURE" code=126
    # The NMI was ours: the guest was wedged at the timeout.
    [[ -e $out/nmi-sent ]] && what="TIMEOUT: the guest was still up at ${nmi_after}s" code=124
    echo "vm.sh: $what after ${elapsed}s (qemu status ${status[0]}); the first report, and another CPU's stack:" >&2
    # 45 lines from the first report (with the panic's own stack), and 30
    # from the first other CPU's backtrace, which only the replay shows.
    tr -d '\r' <"$console" | awk -v failed="$kernel_failed" '
        $0 ~ failed && !a_done { a = 45; a_done = 1 }
        a_done && cpu == "" && match($0, /CPU: [0-9]+ PID/) { cpu = substr($0, RSTART + 5, RLENGTH - 9) }
        !b_done && match($0, /NMI backtrace for cpu [0-9]+/) && substr($0, RSTART + 22, RLENGTH - 22) != cpu { b = 30; b_done = 1 }
        a > 0 || b > 0 { print; if (a > 0) a--; if (b > 0) b-- }
        a == 0 && b == 0 && b_done { exit }' | head -80 | sed 's/^/vm.sh:   /' >&2
    echo "vm.sh: the whole console, stacks included: $console" >&2
    exit "$code"
fi
if [[ ${status[0]} -eq 124 || ${status[0]} -eq 137 ]]; then
    echo "vm.sh: TIMEOUT: VM killed after ${timeout_s}s" >&2
    exit 124
fi
if [[ ! -s $out/rc ]]; then
    echo "vm.sh: VM exited (qemu status ${status[0]}) after ${elapsed}s without writing an exit code" >&2
    exit 125
fi
rc=$(<"$out/rc")
echo "vm.sh: $(basename "$script") exited $rc; VM ran ${elapsed}s" >&2
exit "$rc"
