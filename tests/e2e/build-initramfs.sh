#!/bin/bash
# Build the tiny busybox initramfs used by tests/e2e/vm.sh.
#
#   tests/e2e/build-initramfs.sh OUT.cpio.gz
#
# The image holds only busybox, the virtio + 9p kernel modules (decompressed)
# and an /init that mounts the host's root read-only over 9p, adds tmpfs
# where the guest needs to write, mounts the writable "out" share, then
# switch_roots into the host root and runs stage 2 (the test script).
#
# Kernel: $E2E_KVER, else the newest /boot/vmlinuz-* that has /lib/modules.
# Needs: busybox-static (/bin/busybox), kmod (modinfo), cpio, gzip,
#        xz-utils / zstd only if the kernel's modules are compressed.
set -euo pipefail

out=${1:?usage: $0 OUT.cpio.gz}

# Newest kernel with both an image and a module tree.
pick_kver() {
    local v best=
    for v in $(find /boot -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V); do
        [[ -d /lib/modules/$v/kernel ]] && best=$v
    done
    [[ -n $best ]] || { echo "no /boot/vmlinuz-* with matching /lib/modules (apt-get install linux-image-amd64)" >&2; return 1; }
    echo "$best"
}

kver=${E2E_KVER:-$(pick_kver)}
moddir=/lib/modules/$kver
busybox=${E2E_BUSYBOX:-/bin/busybox}
[[ -f $moddir/modules.dep ]] || { echo "missing $moddir/modules.dep" >&2; exit 1; }
[[ -x $busybox ]] || { echo "missing $busybox (apt-get install busybox-static)" >&2; exit 1; }
# A dynamically linked busybox would need its libraries in the image too.
if ! "$busybox" --list 2>/dev/null | grep -qx switch_root; then
    echo "$busybox has no switch_root applet" >&2; exit 1
fi

# Modules the initramfs needs; dependencies are added from modules.dep.
wanted=(virtio_pci 9pnet_virtio 9p)

declare -A dep_of=() done_mod=()
order=()
# modules.dep lines: "kernel/x/y.ko[.xz]: dep1.ko dep2.ko"
while IFS=: read -r path deps; do
    dep_of[$path]=$deps
done <"$moddir/modules.dep"

# Depth-first: every dependency before the module itself.
add_mod() {
    local path=$1 d
    [[ -n ${done_mod[$path]:-} ]] && return 0
    done_mod[$path]=1
    for d in ${dep_of[$path]}; do add_mod "$d"; done
    order+=("$path")
}

for m in "${wanted[@]}"; do
    f=$(modinfo -k "$kver" -F filename "$m" 2>/dev/null || true)
    case $f in
        "" ) echo "module $m not found for $kver" >&2; exit 1 ;;
        "(builtin)" ) continue ;;                 # built in: nothing to load
    esac
    add_mod "${f#"$moddir"/}"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work"/{bin,dev,proc,sys,newroot,mods}
cp "$busybox" "$work/bin/busybox"

# Copy modules, decompressed (busybox insmod cannot be relied on for xz/zst).
: >"$work/mods/order"
for path in "${order[@]}"; do
    base=$(basename "$path")
    case $path in
        *.ko.xz)  name=${base%.xz};  xz -dc "$moddir/$path" >"$work/mods/$name" ;;
        *.ko.zst) name=${base%.zst}; zstd -qdc "$moddir/$path" >"$work/mods/$name" ;;
        *.ko.gz)  name=${base%.gz};  gzip -dc "$moddir/$path" >"$work/mods/$name" ;;
        *.ko)     name=$base;        cp "$moddir/$path" "$work/mods/$name" ;;
        *) echo "unexpected module file $path" >&2; exit 1 ;;
    esac
    echo "$name" >>"$work/mods/order"
done
echo "$kver" >"$work/kver"

# Stage 1: runs as PID 1 from the initramfs, under busybox sh.
cat >"$work/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1

die() {
    echo "e2e-init: FATAL: $*" >/dev/console
    sync
    echo o >/proc/sysrq-trigger
    sleep 30
}

for m in $(cat /mods/order); do
    insmod "/mods/$m" || die "insmod $m failed"
done

# Kernel command line: e2e.script=PATH (what to run), e2e.rootcache=MODE.
script=
projdir=
rootcache=loose
for arg in $(cat /proc/cmdline); do
    case $arg in
        e2e.script=*) script=${arg#e2e.script=} ;;
        e2e.work=*) projdir=${arg#e2e.work=} ;;
        e2e.rootcache=*) rootcache=${arg#e2e.rootcache=} ;;
    esac
done
[ -n "$script" ] || die "no e2e.script= on the kernel command line"

# The host's / (read-only) becomes our root. The 9p devices may take a
# moment to appear after virtio_pci probes, so retry briefly.
opts=trans=virtio,version=9p2000.L,msize=262144
i=0
until mount -t 9p -o "$opts,ro,cache=$rootcache" hostroot /newroot; do
    i=$((i + 1)); [ $i -lt 50 ] || die "cannot mount 9p hostroot"
    sleep 0.1
done

# Writable scratch over the read-only host tree.
for d in tmp run var/lib var/log var/tmp var/cache; do
    [ -d "/newroot/$d" ] && [ ! -L "/newroot/$d" ] && mount -t tmpfs -o mode=0755 tmpfs "/newroot/$d"
done
chmod 1777 /newroot/tmp /newroot/var/tmp 2>/dev/null
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
[ -d /newroot/sys/kernel/debug ] && mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null

# The project's directory, mounted back at its own path (it may lie under
# one of the tmpfs directories above, e.g. a CI checkout in /tmp).
if [ -n "$projdir" ]; then
    mkdir -p "/newroot$projdir" 2>/dev/null
    mount -t 9p -o "$opts,ro,cache=$rootcache" work "/newroot$projdir" || die "cannot mount 9p work at $projdir"
fi

# Results go to the writable "out" share (host temp dir).
mkdir -p /newroot/run/e2e/out
mount -t 9p -o "$opts,cache=none" out /newroot/run/e2e/out || die "cannot mount 9p out"
cp /stage2.sh /newroot/run/e2e/stage2.sh

exec switch_root /newroot /bin/bash /run/e2e/stage2.sh "$script"
EOF

# Stage 2: runs as PID 1 inside the host root, under the host's bash.
cat >"$work/stage2.sh" <<'EOF'
#!/bin/bash
# PID 1 after switch_root: run the test script, record its exit code, power off.
out=/run/e2e/out
script=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8 E2E_IN_VM=1 E2E_OUT=$out

poweroff_now() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 60
}
trap poweroff_now EXIT

hostname e2e-vm 2>/dev/null
ip link set lo up
# Host-side settings chosen by vm.sh (cwd, CALICO_IPSEC, E2E_*).
# shellcheck disable=SC1091
[ -f "$out/env" ] && . "$out/env"
args=()
# shellcheck disable=SC2046
[ -f "$out/args" ] && eval "args=($(cat "$out/args"))"

echo "e2e-vm: kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime)s, running $script${args[*]:+ ${args[*]}}" >/dev/console
rc=0
set -o pipefail
"$script" "${args[@]}" </dev/null 2>&1 | tee "$out/log" >/dev/console || rc=$?
echo "$rc" >"$out/rc.tmp" && mv "$out/rc.tmp" "$out/rc"
echo "e2e-vm: $script exited $rc after $(cut -d' ' -f1 /proc/uptime)s uptime" >/dev/console
EOF
chmod 755 "$work/init" "$work/stage2.sh" "$work/bin/busybox"

# Pack it (newc cpio, gzip; CONFIG_RD_GZIP is always on in Debian kernels).
tmp_out="$out.tmp.$$"
(cd "$work" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9n >"$tmp_out"
mv "$tmp_out" "$out"
echo "built $out for kernel $kver: ${order[*]}" >&2
