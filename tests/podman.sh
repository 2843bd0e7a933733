#!/bin/bash
# A real container runtime: Debian's podman (CNI backend) runs containers
# through the conflist [bridge + host-local, calico-ipsec] at cniVersion 0.4.0
# and 1.0.0, with our entry in MTU-only mode (no etcd_endpoints: ADD only
# clamps the pod's MTU and keeps a backup; DEL puts it back). For each version:
#   - the container's eth0 and its host veth carry the bound that
#     `calico-ipsec mtu --ext-mtu 1500` prints (the bridge asks for 1500);
#   - `podman inspect` shows exactly the address host-local allocated;
#   - `podman rm` leaves no backup in state_dir, no address in host-local's
#     data dir, no veth and no network namespace;
#   - 20 concurrent `podman run`s all get the bound and leave nothing behind;
#   - a bad entry (`"icv_bits": 100`) fails `podman run` with the field named
#     and leaks nothing: our DEL succeeds whatever the config says, so libcni
#     goes on to host-local's DEL.
#
# Everything podman keeps lives in a temporary directory (root, runroot,
# tmpdir, storage.conf, containers.conf, the network config dir, a plugin dir
# holding a link to our binary); the image is imported from busybox-static,
# no registry. Outside it, podman itself writes only its blob-info cache
# (/var/lib/containers/cache) and libcni's result cache (/var/lib/cni/results,
# entries named after our network, which must be gone at the end). The suite runs in its own mount namespace. Where the host has
# hybrid cgroups with controllers on the cgroup2 mount, crun refuses to start
# any container ("cgroups in hybrid mode not supported"), so the suite hides
# /sys/fs/cgroup/unified in that namespace; containers run with cgroups
# disabled and ulimits at 1024 (podman's defaults for root, 1048576, exceed
# what a restricted host lets crun set). It needs root and fails, never
# skips, when podman cannot run a container.
#
# Usage: tests/podman.sh [CALICO_IPSEC]   (default target/release/calico-ipsec;
# `make podman` passes the shipped binary)
set -uo pipefail

cd "$(dirname "$0")/.."
bin=$(realpath -e "${1:-target/release/calico-ipsec}" 2>/dev/null) || {
	echo "FAILED: the binary '${1:-target/release/calico-ipsec}' is missing: build it first (make build)"
	exit 1
}

die() {
	echo "FAILED: $*"
	echo "podman: 0 passed, 1 failed"
	exit 1
}

if [[ ${PODMAN_SUITE_NS:-} != 1 ]]; then
	[[ $(id -u) == 0 ]] || die "must run as root (podman rootful, CNI, veths)"
	for tool in podman crun unshare ip jq tar; do
		command -v "$tool" >/dev/null || die "$tool is not installed (make deps)"
	done
	PODMAN_SUITE_NS=1 exec unshare --mount --propagation private "$0" "$bin"
fi

passed=0
failed=0
ok() {
	echo "ok: $*"
	passed=$((passed + 1))
}
fail() {
	echo "FAILED: $*"
	failed=$((failed + 1))
}
indent() { sed 's/^/    | /'; }
check_eq() { if [[ $2 == "$3" ]]; then ok "$1"; else fail "$1 (got '$2', want '$3')"; fi; }

tmp=$(mktemp -d /tmp/calico-ipsec-podman.XXXXXX)
net=cipodman
# A bridge of our own, named per run; no address on it, so the host's routes
# stay as they were.
br=cipm$(($$ % 100000))
hl=$tmp/host-local/$net
state=$tmp/state
log=$tmp/calico-ipsec.log
mkdir -p "$tmp"/{root,runroot,tmp,net,plugins,rootfs/bin,host-local} "$state"

cleanup() {
	if [[ -n ${P:-} ]]; then
		timeout 60 "${P[@]}" rm -af -t 0 >/dev/null 2>&1
	fi
	ip link del "$br" 2>/dev/null
	# Mounts podman left under $tmp exist only in this namespace.
	grep -o " $tmp/[^ ]*" /proc/self/mounts | sort -r | xargs -r umount -l 2>/dev/null
	rm -rf "$tmp"
}
trap cleanup EXIT

# crun refuses hybrid cgroups whose cgroup2 mount has controllers, even with
# cgroups disabled; this mount namespace is ours, so hide the cgroup2 part.
if [[ $(stat -fc %T /sys/fs/cgroup) == tmpfs && $(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null) == cgroup2fs ]]; then
	controllers=$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null)
	if [[ -n $controllers ]]; then
		echo "note: hybrid cgroups with '$controllers' on cgroup2: hiding /sys/fs/cgroup/unified in this suite's mount namespace (crun refuses it)"
		umount /sys/fs/cgroup/unified || die "cannot unmount /sys/fs/cgroup/unified in a private mount namespace"
	fi
fi

bound=$("$bin" mtu --ext-mtu 1500) || die "$bin mtu --ext-mtu 1500 failed"
[[ $bound =~ ^[0-9]+$ ]] && ((bound < 1500)) || die "calico-ipsec mtu printed '$bound'"
echo "calico-ipsec: $bin; the bound at ext_mtu 1500: $bound"

# ------------------------------------------------------------ podman set-up

ln -s "$bin" "$tmp/plugins/calico-ipsec"
cat >"$tmp/storage.conf" <<EOF
[storage]
driver = "vfs"
runroot = "$tmp/runroot"
graphroot = "$tmp/root"
EOF
cat >"$tmp/containers.conf" <<EOF
[containers]
cgroups = "disabled"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
log_driver = "k8s-file"
[network]
network_backend = "cni"
cni_plugin_dirs = ["$tmp/plugins", "/usr/lib/cni"]
network_config_dir = "$tmp/net"
default_network = "$net"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$tmp/events.log"
runtime = "crun"
EOF
: >"$tmp/registries.conf"
export CONTAINERS_CONF=$tmp/containers.conf CONTAINERS_STORAGE_CONF=$tmp/storage.conf
export CONTAINERS_REGISTRIES_CONF=$tmp/registries.conf TMPDIR=$tmp/tmp
unset CONTAINER_HOST CONTAINER_CONNECTION
P=(podman --root "$tmp/root" --runroot "$tmp/runroot" --tmpdir "$tmp/tmp"
	--storage-driver vfs --cgroup-manager cgroupfs --events-backend file
	--network-config-dir "$tmp/net")
pm() { timeout 120 "${P[@]}" "$@"; }

echo "$(podman --version), $(crun --version | head -1)"
cp /bin/busybox "$tmp/rootfs/bin/busybox" || die "no /bin/busybox (busybox-static)"
for applet in sh ip cat sleep; do ln -s busybox "$tmp/rootfs/bin/$applet"; done
tar -C "$tmp/rootfs" -cf "$tmp/rootfs.tar" .
out=$(pm import -q "$tmp/rootfs.tar" localhost/bb:latest 2>&1) || die "podman import: $out"
image=localhost/bb:latest

# conflist VERSION [EXTRA-JSON]: our network, with EXTRA merged into our entry.
conflist() {
	jq -n --arg v "$1" --arg net "$net" --arg br "$br" --arg hl "$tmp/host-local" \
		--arg state "$state" --arg log "$log" --argjson extra "${2:-{\}}" '{
		cniVersion: $v, name: $net,
		plugins: [
			{type: "bridge", bridge: $br, isGateway: false, ipMasq: false, mtu: 1500,
			 ipam: {type: "host-local", ranges: [[{subnet: "198.19.213.0/24"}]], dataDir: $hl}},
			({type: "calico-ipsec", ext_mtu: 1500, state_dir: $state,
			  log_file_path: $log, log_level: "debug"} + $extra)
		]}' >"$tmp/net/$net.conflist"
}

# What the host holds for our network: allocated addresses, backups, veths
# on our bridge.
allocated() { find "$hl" -maxdepth 1 -type f -regex '.*/[0-9a-f.:]+' -printf '%f\n' 2>/dev/null | sort; }
backups() { find "$state" -maxdepth 1 -name '*.json' -printf '%f\n' 2>/dev/null | sort; }
ports() { ip -o link show master "$br" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1; }
# libcni's result cache (podman keeps libcni's default, /var/lib/cni): an
# entry stays when a DEL failed.
cni_cache() { find /var/lib/cni/results -maxdepth 1 -name "$net-*" -printf '%f\n' 2>/dev/null | sort; }
netns_files() { find /run/netns -maxdepth 1 -name 'netns-*' -printf '%f\n' 2>/dev/null | sort; }

# nothing_left WHAT: no container, address, backup, veth or new netns.
nothing_left() {
	local what=$1 left
	left=$(pm ps -aq)
	check_eq "$what: podman holds no container" "$left" ""
	check_eq "$what: no address left in host-local's data dir" "$(allocated | tr '\n' ' ')" ""
	check_eq "$what: no backup left in state_dir" "$(backups | tr '\n' ' ')" ""
	check_eq "$what: no veth left on the bridge" "$(ports | tr '\n' ' ')" ""
	check_eq "$what: no result left in libcni's cache" "$(cni_cache | tr '\n' ' ')" ""
	check_eq "$what: no network namespace left by podman" \
		"$(comm -13 <(echo "$netns_before") <(netns_files) | tr '\n' ' ')" ""
}

# The sandbox must be able to run a container at all: say why not, loudly.
out=$(pm run --rm --network none "$image" cat /proc/self/comm 2>&1)
[[ $out == cat ]] || die "podman cannot run a container here (outside calico-ipsec): $out"
netns_before=$(netns_files)

for v in 0.4.0 1.0.0; do
	echo "--- cniVersion $v"
	conflist "$v"

	# One container, kept running.
	if ! cid=$(pm run -d --network "$net" "$image" sleep 600 2>&1); then
		fail "$v: podman run: $(indent <<<"$cid")"
		continue
	fi
	ok "$v: podman run through [bridge + host-local, calico-ipsec]"
	pod=$(pm exec "$cid" cat /sys/class/net/eth0/mtu /sys/class/net/eth0/iflink 2>&1)
	read -r -d '' pod_mtu iflink <<<"$pod"
	check_eq "$v: the container's eth0 is clamped to the bound" "$pod_mtu" "$bound"
	veth=$(ip -o link show | awk -F': ' -v i="$iflink" '$1 == i {print $2}' | cut -d@ -f1)
	if [[ -n $veth ]]; then
		check_eq "$v: the host veth $veth is clamped to the bound" \
			"$(cat "/sys/class/net/$veth/mtu")" "$bound"
		check_eq "$v: the host veth is a port of the bridge" "$(ports)" "$veth"
	else
		fail "$v: no host link has ifindex '$iflink' (container said: $pod)"
	fi
	inspect_ip=$(pm inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" "$cid" 2>&1)
	check_eq "$v: podman inspect shows exactly what host-local allocated" "$inspect_ip" "$(allocated)"
	check_eq "$v: host-local's record names the container" \
		"$(head -1 "$hl/$inspect_ip" 2>/dev/null | tr -d '\r')" "$cid"
	check_eq "$v: state_dir holds the container's backup" "$(backups)" "${cid}_eth0.json"
	sandbox=$(pm inspect -f '{{.NetworkSettings.SandboxKey}}' "$cid")
	if out=$(pm rm -f -t 0 "$cid" 2>&1); then ok "$v: podman rm"; else fail "$v: podman rm: $out"; fi
	nothing_left "$v: after podman rm"
	[[ -n $veth ]] && check_eq "$v: the host veth $veth is gone" \
		"$(ip link show dev "$veth" 2>/dev/null)" ""
	check_eq "$v: the container's network namespace $sandbox is gone" \
		"$([[ -e $sandbox ]] && echo present)" ""

	# 20 at once.
	for i in $(seq 20); do
		pm run --rm --network "$net" "$image" \
			sh -c 'sleep 1; cat /sys/class/net/eth0/mtu; ip -4 addr show eth0' \
			>"$tmp/run-$i.out" 2>&1 &
	done
	runs_ok=0 mtus_ok=0
	for i in $(seq 20); do
		wait -n && runs_ok=$((runs_ok + 1))
	done
	for i in $(seq 20); do
		[[ $(head -1 "$tmp/run-$i.out") == "$bound" ]] && mtus_ok=$((mtus_ok + 1))
	done
	check_eq "$v: 20 concurrent podman runs succeed" "$runs_ok" 20
	check_eq "$v: each of the 20 got the bound on eth0" "$mtus_ok" 20
	ips=$(cat "$tmp"/run-*.out | grep -o 'inet [0-9.]*' | sort -u | wc -l)
	check_eq "$v: the 20 got 20 distinct addresses" "$ips" 20
	if ((runs_ok < 20 || mtus_ok < 20)); then
		for i in $(seq 20); do
			[[ $(head -1 "$tmp/run-$i.out") == "$bound" ]] || indent <"$tmp/run-$i.out"
		done
	fi
	nothing_left "$v: after 20 concurrent runs"

	# A bad entry: ADD refuses it naming the field, and DEL still lets
	# host-local release the address.
	conflist "$v" '{"icv_bits": 100}'
	if out=$(pm run --rm --network "$net" "$image" true 2>&1); then
		fail "$v: podman run with \"icv_bits\": 100 succeeded"
	else
		ok "$v: podman run with \"icv_bits\": 100 fails"
		if grep -q '"icv_bits"' <<<"$out"; then
			ok "$v: the error names the field: $(grep -o 'invalid calico-ipsec configuration.*' <<<"$out" | head -1)"
		else
			fail "$v: the error does not name icv_bits:"
			indent <<<"$out"
		fi
	fi
	nothing_left "$v: after the refused run"
done

# The leak check can fail: a stand-in whose DEL refuses a bad entry, as ours
# did before DEL learnt never to block the chain, must leak the address.
rm -f "$tmp/plugins/calico-ipsec"
cat >"$tmp/plugins/calico-ipsec" <<EOF
#!/bin/sh
if [ "\$CNI_COMMAND" = DEL ]; then
	echo '{"cniVersion":"1.0.0","code":7,"msg":"stand-in: DEL refuses the entry"}'
	exit 1
fi
exec "$bin" "\$@"
EOF
chmod +x "$tmp/plugins/calico-ipsec"
conflist 1.0.0 '{"icv_bits": 100}'
pm run --rm --network "$net" "$image" true >/dev/null 2>&1
check_eq "the leak check can fail: a stand-in DEL refusing the bad entry leaks the address" \
	"$(allocated | wc -l)" 1
allocated | sed "s|^|$hl/|" | xargs -r rm -f

# Our DEL saw each refused entry and deleted anyway (one per version).
n=$(grep -c 'DEL: the network configuration is invalid' "$log" 2>/dev/null)
check_eq "our log says DEL went ahead despite the bad entry, once per version" "${n:-0}" 2

echo "podman: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
