#!/bin/bash
# Helpers for the end-to-end suites (tests/e2e/test_*.sh). Source it:
#
#   . "$(dirname "$0")/lib.sh"
#   e2e_init
#   ... check / check_eq / pass / fail ...
#   e2e_finish            # prints "N passed, N failed", non-zero on failure
#
# A suite starts with
#   set -euo pipefail
#   here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
#   # shellcheck source-path=SCRIPTDIR source=lib.sh
#   . "$here/lib.sh"
# and is run by run-all.sh when its name matches test_*.sh.
# All network objects live in network namespaces named "e2e-*" inside the VM
# (vm.sh); addresses are documentation / pod-style ranges only.
# shellcheck disable=SC2034   # globals are meant for the sourcing suite

E2E_NS_PREFIX=e2e-
E2E_PASS=0
E2E_FAIL=0
E2E_CAP_PIDS=()

# ---------------------------------------------------------------- tally

pass() { E2E_PASS=$((E2E_PASS + 1)); echo "ok   - $*"; }
fail() { E2E_FAIL=$((E2E_FAIL + 1)); echo "FAIL - $*"; }
info() { echo "#      $*"; }
# indent: quote a command's output under a result line.
indent() {
    local line
    while IFS= read -r line; do echo "#      | $line"; done
}

# check DESC CMD...: pass if CMD succeeds; its output is shown on failure.
check() {
    local desc=$1 output
    shift
    if output=$("$@" 2>&1); then
        pass "$desc"
    else
        fail "$desc (exit $?: $*)"
        [[ -z $output ]] || indent <<<"$output"
    fi
}

# check_fails DESC CMD...: pass if CMD fails.
check_fails() {
    local desc=$1
    shift
    if "$@" >/dev/null 2>&1; then fail "$desc (unexpectedly succeeded: $*)"; else pass "$desc"; fi
}

# check_eq DESC GOT WANT
check_eq() {
    if [[ $2 == "$3" ]]; then pass "$1"; else fail "$1 (got '$2', want '$3')"; fi
}

# check_match DESC TEXT ERE: pass if TEXT matches the extended regex.
check_match() {
    if grep -Eq -- "$3" <<<"$2"; then
        pass "$1"
    else
        fail "$1 (no match for /$3/ in:)"
        indent <<<"$2"
    fi
}

# check_ge DESC GOT MIN (integers)
check_ge() {
    if [[ $2 =~ ^-?[0-9]+$ ]] && (($2 >= $3)); then pass "$1"; else fail "$1 (got '$2', want >= $3)"; fi
}

# Print the tally line and leave with 0 only when nothing failed.
e2e_finish() {
    trap - EXIT ERR
    e2e_cleanup
    echo "$E2E_PASS passed, $E2E_FAIL failed"
    if ((E2E_FAIL == 0 && E2E_PASS > 0)); then exit 0; fi
    exit 1
}

# Sets `bin` to the binary under test (CALICO_IPSEC), or fails the suite at
# once when it is missing.
e2e_bin() {
    bin=${CALICO_IPSEC:-}
    if [[ -z $bin || ! -x $bin ]]; then
        fail "CALICO_IPSEC binary '${bin:-<unset>}' is missing: build it first (make build)"
        e2e_finish
    fi
}

# -------------------------------------------------------------- set-up

# Kernel modules the suites use; all are loaded from the 9p root.
E2E_MODULES=(esp4 xfrm_user xfrm4_tunnel ipip tunnel4 gcm ghash_generic aesni_intel
             ghash_clmulni_intel seqiv veth bridge)

# Refuse to run outside the VM (the host kernel lacks ESP/GCM/IPIP and we
# do not want to touch its network), load modules, clean up on exit.
e2e_init() {
    if [[ ${E2E_IN_VM:-} != 1 && ${E2E_ALLOW_HOST:-} != 1 ]]; then
        echo "$0: run inside the test VM: tests/e2e/vm.sh $0 (or set E2E_ALLOW_HOST=1)" >&2
        exit 2
    fi
    [[ $(id -u) == 0 ]] || { echo "$0: must run as root" >&2; exit 2; }
    # The guest's devtmpfs has no /dev/fd, which process substitution needs.
    [[ -e /dev/fd ]] || ln -s /proc/self/fd /dev/fd
    local m missing=()
    for m in "${E2E_MODULES[@]}"; do
        modprobe -q "$m" 2>/dev/null || missing+=("$m")
    done
    # Only the crypto accelerators are optional.
    for m in "${missing[@]}"; do
        case $m in
            aesni_intel | ghash_clmulni_intel | ghash_generic) ;;
            *) echo "$0: cannot load kernel module $m" >&2; exit 2 ;;
        esac
    done
    e2e_cleanup
    trap 'e2e_cleanup' EXIT
    # Under set -e a failing set-up command ends the suite: say which one.
    set -E
    trap 'echo "#      aborted: \"$BASH_COMMAND\" failed (exit $?) in ${FUNCNAME[*]:-main} at ${BASH_SOURCE[0]}:$LINENO" >&2' ERR
}

# Remove every e2e-* namespace and stop captures.
e2e_cleanup() {
    local pid ns
    for pid in "${E2E_CAP_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    E2E_CAP_PIDS=()
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        [[ $ns == "$E2E_NS_PREFIX"* ]] && ip netns del "$ns" 2>/dev/null
    done
    return 0
}

# nsx NS CMD...: run CMD in namespace e2e-NS.
nsx() {
    local ns=$1
    shift
    ip netns exec "$E2E_NS_PREFIX$ns" "$@"
}

# ipn NS ARGS...: `ip` in namespace e2e-NS (cheaper than nsx NS ip ...).
ipn() {
    local ns=$1
    shift
    ip -n "$E2E_NS_PREFIX$ns" "$@"
}

# ---------------------------------------------------------------- topology

# wire_up: namespace e2e-wire holding bridge br0, the nodes' shared L2 "wire".
wire_up() {
    ip netns add "${E2E_NS_PREFIX}wire"
    ipn wire link set lo up
    ipn wire link add br0 type bridge
    ipn wire link set br0 up
}

# node_add NODE ADDR/PLEN MTU: namespace e2e-NODE with eth0 on the wire
# bridge at ADDR, link MTU MTU on every hop of the wire.
node_add() {
    local node=$1 addr=$2 mtu=$3
    ip netns add "$E2E_NS_PREFIX$node"
    ipn "$node" link set lo up
    ipn "$node" link add eth0 mtu "$mtu" type veth peer name "w-$node" mtu "$mtu"
    ipn "$node" link set "w-$node" netns "${E2E_NS_PREFIX}wire"
    ipn wire link set "w-$node" master br0 up
    ipn wire link set br0 mtu "$mtu" 2>/dev/null || true
    ipn "$node" addr add "$addr" dev eth0
    ipn "$node" link set eth0 up
    nsx "$node" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
        net.ipv4.conf.default.rp_filter=0
}

# node_mtu NODE MTU: change the underlay MTU of NODE (both veth ends).
node_mtu() {
    ipn wire link set "w-$1" mtu "$2"
    ipn "$1" link set eth0 mtu "$2"
}

# node_ipip NODE TUNNEL_ADDR MTU: bring up tunl0 the way Calico's felix does
# (the ipip fallback device, a /32 tunnel address, Calico's MTU).
node_ipip() {
    local node=$1 addr=$2 mtu=$3
    ipn "$node" link show tunl0 >/dev/null 2>&1 \
        || ipn "$node" tunnel add tunl0 mode ipip
    ipn "$node" link set tunl0 mtu "$mtu" up
    ipn "$node" addr add "$addr/32" dev tunl0
    nsx "$node" sysctl -qw net.ipv4.conf.tunl0.rp_filter=0
}

# node_route_ipip NODE CIDR PEER_UNDERLAY_IP: route a peer's pod block
# through tunl0, as bird does ("via PEER dev tunl0 onlink").
node_route_ipip() {
    ipn "$1" route replace "$2" via "$3" dev tunl0 onlink
}

# pod_add NODE POD ADDR MTU: namespace e2e-POD with eth0 at ADDR/32 behind a
# host-side "cali" + 11 hex veth in NODE, wired like Calico (169.254.1.1
# gateway answered by proxy ARP, /32 host route). Sets POD_HOST_IF.
pod_add() {
    local node=$1 pod=$2 addr=$3 mtu=$4 hif
    hif=cali$(printf '%s' "$pod" | sha1sum | cut -c1-11)
    ip netns add "$E2E_NS_PREFIX$pod"
    ipn "$pod" link set lo up
    ipn "$node" link add "$hif" mtu "$mtu" type veth peer name eth0 mtu "$mtu" \
        netns "$E2E_NS_PREFIX$pod"
    nsx "$node" sysctl -qw "net.ipv4.conf.$hif.proxy_arp=1" "net.ipv4.conf.$hif.rp_filter=0"
    ipn "$node" link set "$hif" up
    ipn "$node" route replace "$addr/32" dev "$hif" scope link
    ipn "$pod" addr add "$addr/32" dev eth0
    ipn "$pod" link set eth0 up
    ipn "$pod" route add 169.254.1.1 dev eth0 scope link
    ipn "$pod" route add default via 169.254.1.1 dev eth0
    POD_HOST_IF=$hif
}

# -------------------------------------------------------------------- XFRM

E2E_AEAD='rfc4106(gcm(aes))'

# xfrm_key: 20 random bytes (16 AES-128 key + 4 salt) as 0x-hex.
xfrm_key() {
    printf '0x%s\n' "$(od -An -tx1 -N20 /dev/urandom | tr -d ' \n')"
}

# xfrm_sa NODE SRC DST SPI KEY ICV REQID: one ESP transport-mode SA.
xfrm_sa() {
    local node=$1 src=$2 dst=$3 spi=$4 key=$5 icv=$6 reqid=$7
    ipn "$node" xfrm state add src "$src" dst "$dst" proto esp spi "$spi" \
        reqid "$reqid" mode transport replay-window 32 \
        aead "$E2E_AEAD" "$key" "$icv"
}

# xfrm_policy_out NODE SRC DST REQID [CMD]: IPIP (proto 4) from SRC to DST
# must leave in ESP with the SA of REQID. CMD is add (default) or update.
xfrm_policy_out() {
    ipn "$1" xfrm policy "${5:-add}" src "$2/32" dst "$3/32" proto 4 dir out \
        tmpl src "$2" dst "$3" proto esp reqid "$4" mode transport
}

# xfrm_policy_in NODE SRC DST: IPIP from SRC to DST must have arrived in ESP
# (any SA: template reqid 0).
xfrm_policy_in() {
    ipn "$1" xfrm policy add src "$2/32" dst "$3/32" proto 4 dir in \
        tmpl src "$2" dst "$3" proto esp reqid 0 mode transport
}

# esp_pair NODE_A IP_A NODE_B IP_B ICV [REQID] [ENFORCE]: SAs both ways with
# fresh keys, outbound policies on both nodes and, unless ENFORCE=0, inbound
# policies too. Sets ESP_SPI_AB and ESP_SPI_BA.
esp_pair() {
    local a=$1 ipa=$2 b=$3 ipb=$4 icv=$5 reqid=${6:-1} enforce=${7:-1} kab kba
    ESP_SPI_AB=$(printf '0x%08x' $(((reqid << 16) | 0xa)))
    ESP_SPI_BA=$(printf '0x%08x' $(((reqid << 16) | 0xb)))
    kab=$(xfrm_key)
    kba=$(xfrm_key)
    xfrm_sa "$a" "$ipa" "$ipb" "$ESP_SPI_AB" "$kab" "$icv" "$reqid"
    xfrm_sa "$b" "$ipa" "$ipb" "$ESP_SPI_AB" "$kab" "$icv" "$reqid"
    xfrm_sa "$b" "$ipb" "$ipa" "$ESP_SPI_BA" "$kba" "$icv" "$reqid"
    xfrm_sa "$a" "$ipb" "$ipa" "$ESP_SPI_BA" "$kba" "$icv" "$reqid"
    xfrm_policy_out "$a" "$ipa" "$ipb" "$reqid"
    xfrm_policy_out "$b" "$ipb" "$ipa" "$reqid"
    if [[ $enforce != 0 ]]; then
        xfrm_policy_in "$b" "$ipa" "$ipb"
        xfrm_policy_in "$a" "$ipb" "$ipa"
    fi
}

# xfrm_packets NODE SRC DST SPI: packets counted by that SA ("lifetime current").
xfrm_packets() {
    ipn "$1" -s xfrm state get src "$2" dst "$3" proto esp spi "$4" \
        | awk '/lifetime current:/ { getline; sub(/.*, */, ""); sub(/\(packets\).*/, ""); print; exit }'
}

# xfrm_errors NODE: the non-zero counters of /proc/net/xfrm_stat ("" if none).
xfrm_errors() {
    # shellcheck disable=SC2016   # awk program
    nsx "$1" awk '$2 != 0 { printf "%s=%s ", $1, $2 }' /proc/net/xfrm_stat
}

# ----------------------------------------------------------------- capture

# cap_start NS IFACE FILE [SNAPLEN] [FILTER]: tcpdump on IFACE in e2e-NS
# into FILE (pcap; SNAPLEN 256 by default, 0 for whole packets; only the
# packets the tcpdump expression FILTER matches, when given); returns once
# tcpdump is listening. Sets CAP_PID.
cap_start() {
    local ns=$1 ifc=$2 file=$3 snap=${4:-256} i
    # Not through nsx: $! must be tcpdump itself (ip netns exec execs it),
    # not a subshell that would leave tcpdump running when killed.
    ip netns exec "$E2E_NS_PREFIX$ns" tcpdump -i "$ifc" -n -U -B 16384 -s "$snap" -Z root -w "$file" ${5:+"$5"} \
        </dev/null >/dev/null 2>"$file.err" &
    CAP_PID=$!
    E2E_CAP_PIDS+=("$CAP_PID")
    for ((i = 0; i < 200; i++)); do
        grep -q 'listening on' "$file.err" 2>/dev/null && return 0
        kill -0 "$CAP_PID" 2>/dev/null || break
        sleep 0.05
    done
    echo "tcpdump did not start:" >&2
    cat "$file.err" >&2
    return 1
}

# cap_stop: stop the capture started last (flushes the file).
# (SIGTERM: background jobs of a non-interactive shell ignore SIGINT.)
cap_stop() {
    local i
    kill -TERM "$CAP_PID" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$CAP_PID" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$CAP_PID" 2>/dev/null || true
    wait "$CAP_PID" 2>/dev/null || true
}

# cap_stats FILE: "CAPTURED DROPPED", the packets the stopped capture into
# FILE wrote and those the kernel dropped before it could (as tcpdump says).
cap_stats() {
    awk '/packets captured/ {c = $1} /dropped by kernel/ {d = $1} END {print c + 0, d + 0}' "$1.err"
}

# cap_ipv4 FILE: one line per IPv4 packet: "PROTO LENGTH SRC DST" with
# PROTO as tcpdump names it (ESP, IPIP, ICMP, UDP, ...) and the IP length.
cap_ipv4() {
    tcpdump -r "$1" -nn -v ip 2>/dev/null | awk '
        /proto [^ ]+ \([0-9]+\), length [0-9]+/ {
            match($0, /proto [^ ]+ \(/); proto = substr($0, RSTART + 6, RLENGTH - 8)
            match($0, /length [0-9]+\)/); len = substr($0, RSTART + 7, RLENGTH - 8)
            getline; src = $1; dst = $3; sub(/:$/, "", dst)
            print proto, len, src, dst
        }'
}

# --------------------------------------------------------------------- etcd

# etcd_up ADDR DIR: a real etcd (Debian's etcd-server, from the host root)
# in e2e-wire, serving clients on ADDR:2379 on br0, so the node namespaces
# reach it over the wire. Sets ETCD_ENDPOINTS for etcdctl and calico-ipsec.
# etcd_proc ADDR DIR: start the etcd process only (ETCD_PID, ETCD_ADDR, ETCD_DIR).
etcd_proc() {
    ETCD_ADDR=$1 ETCD_DIR=$2
    ip netns exec "${E2E_NS_PREFIX}wire" etcd --name e2e --data-dir "$2/data" \
        --listen-client-urls "http://$1:2379" --advertise-client-urls "http://$1:2379" \
        --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
        --initial-cluster e2e=http://127.0.0.1:2380 --log-level error \
        </dev/null >>"$2/etcd.log" 2>&1 &
    ETCD_PID=$!
    E2E_CAP_PIDS+=("$!")
}

etcd_up() {
    local addr=$1 dir=$2 i
    ipn wire addr add "$addr/24" dev br0
    mkdir -p "$dir"
    etcd_proc "$addr" "$dir"
    export ETCD_ENDPOINTS=http://$addr:2379 ETCDCTL_API=3
    for ((i = 0; i < 300; i++)); do
        ectl endpoint health >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "etcd did not come up:" >&2
    cat "$dir/etcd.log" >&2
    return 1
}

# ectl ARGS...: etcdctl against the e2e etcd (from e2e-wire, where it is reachable).
ectl() { ip netns exec "${E2E_NS_PREFIX}wire" etcdctl --endpoints "$ETCD_ENDPOINTS" "$@"; }

# etcd_load_fixture FILE: one put per key of a {key: value} JSON file,
# values as compact JSON (how Calico writes them). FelixConfiguration
# default gets interfacePrefix "cali,veth": the suites' pods come from the
# ptp plugin, whose host-side devices are veth*, and Felix (so the
# catch-all, which exempts pods' own interfaces) must be told so.
etcd_load_fixture() {
    local k
    while IFS= read -r k; do
        jq -c --arg k "$k" '.[$k] | if .kind == "FelixConfiguration" and .metadata.name == "default"
            then .spec.interfacePrefix = "cali,veth" else . end' "$1" | ectl put "$k" >/dev/null
    done < <(jq -r 'keys[]' "$1")
}

# ---------------------------------------------------------------------- CNI
# The CNI client is the Rust tests' (tests/common/chain.rs, libcni's invoke
# semantics), built as the `cni_client` example: one client for both tiers.
# Plugins run inside the node namespace. CNI_CONFLIST_DIR holds
# NODE.conflist, and POD.result, the cached result of POD's last ADD.

CNI_CONFLIST_DIR=${CNI_CONFLIST_DIR:-/tmp/e2e-cni}
CNI_BIN_PATH=${CNI_BIN_PATH:-/usr/lib/cni}
# The client built with the binary under test (make build builds both in
# one cargo run), else the host release build's.
if [[ -z ${CNI_CLIENT:-} ]]; then
    CNI_CLIENT=$(dirname "${CALICO_IPSEC:-/nonexistent/x}")/examples/cni_client
    [[ -x $CNI_CLIENT ]] || CNI_CLIENT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/release/examples/cni_client
fi

# cni_run VERB NODE POD: VERB through NODE's list (or CNI_LIST's, when set:
# another conflist for the same node) for namespace e2e-POD. Prints the
# failing plugin's CNI error on failure.
cni_run() {
    [[ -x $CNI_CLIENT ]] || { echo "no CNI client at $CNI_CLIENT (make build builds it)"; return 2; }
    "$CNI_CLIENT" "$1" --conflist "$CNI_CONFLIST_DIR/${CNI_LIST:-$2}.conflist" \
        --node "$E2E_NS_PREFIX$2" --cid "$3" --netns "/run/netns/$E2E_NS_PREFIX$3" \
        --cache "$CNI_CONFLIST_DIR/$3.result" --cni-path "$CNI_BIN_PATH"
}

# cni_add NODE POD: create namespace e2e-POD and run ADD for it; the result
# is cached in $CNI_CONFLIST_DIR/POD.result. Prints the error on failure.
cni_add() {
    local out
    ip netns add "$E2E_NS_PREFIX$2"
    out=$(cni_run ADD "$1" "$2") || { echo "$out"; return 1; }
}

# cni_check NODE POD: CHECK every plugin with the cached result.
cni_check() {
    local out
    out=$(cni_run CHECK "$1" "$2") || { echo "$out"; return 1; }
}

# cni_del NODE POD: DEL in reverse order, then remove the namespace.
cni_del() {
    local out
    out=$(cni_run DEL "$1" "$2") || { echo "$out"; return 1; }
    ip netns del "$E2E_NS_PREFIX$2"
}

# pod_ip POD: the pod's IPv4 address from its cached result.
pod_ip() {
    jq -r '.ips[0].address | split("/")[0]' "$CNI_CONFLIST_DIR/$1.result"
}

# ------------------------------------------------------------------ cluster

# The Calico fixture's three nodes: underlay addresses, tunl0 addresses and
# pod blocks, exactly as in tests/fixtures/calico/etcd-3-nodes.json.
NODES=(node-1 node-2 node-3)
declare -A NODE_IP=([node-1]=10.0.0.11 [node-2]=10.0.0.12 [node-3]=10.0.0.13)
declare -A TUNNEL=([node-1]=10.244.135.0 [node-2]=10.244.201.64 [node-3]=10.244.18.128)
declare -A BLOCK=([node-1]=10.244.135.0/26 [node-2]=10.244.201.64/26 [node-3]=10.244.18.128/26)
E2E_FIXTURE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../fixtures/calico" && pwd)/etcd-3-nodes.json

# node_conflist NODE: $CNI_CONFLIST_DIR/NODE.conflist: [ptp + host-local on
# NODE's block, calico-ipsec with its own nodename and state dir].
node_conflist() {
    local n=$1 tmp=$E2E_TMP
    jq -n --arg n "$n" --arg block "${BLOCK[$n]}" --arg tmp "$tmp" --arg ep "$ETCD_ENDPOINTS" '{
        cniVersion: "1.0.0", name: "k8s-pod-network",
        plugins: [
          {type: "ptp", mtu: 1480, ipMasq: false,
           ipam: {type: "host-local", ranges: [[{subnet: $block}]], routes: [{dst: "0.0.0.0/0"}],
                  dataDir: "\($tmp)/ipam-\($n)"}},
          {type: "calico-ipsec", etcd_endpoints: $ep, nodename: $n,
           kek_file: "\($tmp)/kek", state_dir: "\($tmp)/state-\($n)",
           agreement_dir: "\($tmp)/agreement-\($n)",
           log_file_path: "\($tmp)/\($n).log", log_level: "debug", etcd_timeout_ms: 10000}
        ]}' >"$CNI_CONFLIST_DIR/$n.conflist"
}

# node_resource_put NODE ADDR TUNNEL: NODE's Calico Node resource in etcd,
# shaped like the fixture's node-1, at underlay ADDR/24 with tunl0 TUNNEL.
node_resource_put() {
    local n=$1 addr=$2 tunnel=$3
    jq -c --arg n "$n" --arg a "$addr/24" --arg t "$tunnel" '.[$k]
        | .metadata.name = $n | .metadata.uid = "e2e-\($n)"
        | .spec.bgp.ipv4Address = $a | .spec.bgp.ipv4IPIPTunnelAddr = $t
        | .spec.orchRefs[0].nodeName = $n' \
        --arg k /calico/resources/v3/projectcalico.org/nodes/node-1 "$E2E_FIXTURE" \
        | ectl put "/calico/resources/v3/projectcalico.org/nodes/$n" >/dev/null
}

# node_join NODE ADDR TUNNEL BLOCK: a node joining the running cluster: its
# Calico Node resource and block affinity in etcd (shaped like the
# fixture's), its namespace with tunl0 and routes, the peers' routes to its
# block, and its conflist.
node_join() {
    local n=$1 addr=$2 tunnel=$3 block=$4 p
    NODE_IP[$n]=$addr TUNNEL[$n]=$tunnel BLOCK[$n]=$block
    node_resource_put "$n" "$addr" "$tunnel"
    ectl put "/calico/ipam/v2/host/$n/ipv4/block/${block/\//-}" '{"deleted":false,"state":"confirmed"}' >/dev/null
    node_add "$n" "$addr/24" 1500
    node_ipip "$n" "$tunnel" 1480
    for p in "${NODES[@]}"; do
        node_route_ipip "$n" "${BLOCK[$p]}" "${NODE_IP[$p]}"
        node_route_ipip "$p" "$block" "$addr"
    done
    NODES+=("$n")
    node_conflist "$n"
}

# node_leave NODE: the node's Calico records leave etcd (as when a node is
# deleted from the cluster); its namespace stays.
node_leave() {
    local n=$1 p keep=()
    ectl del "/calico/resources/v3/projectcalico.org/nodes/$n" >/dev/null
    ectl del --prefix "/calico/ipam/v2/host/$n/" >/dev/null
    for p in "${NODES[@]}"; do [[ $p == "$n" ]] || keep+=("$p"); done
    NODES=("${keep[@]}")
}

# cluster_up TMP BIN PHASE: the wire, etcd at 10.0.0.254 loaded with the
# fixture, `keys init` (KEK in TMP/kek) with the config's phase set to
# PHASE, and the three node namespaces with a 1500-byte underlay, tunl0 and
# routes to each peer's block the way Calico makes them (via tunl0 onlink).
# Each node gets TMP/cni/NODE.conflist: [ptp + host-local on its block,
# calico-ipsec with its own nodename and state dir]. BIN is linked into
# TMP/bin, which CNI_BIN_PATH searches after Debian's plugins.
cluster_up() {
    local tmp=$1 bin=$2 phase=$3 n p
    E2E_TMP=$tmp E2E_BIN=$bin
    CNI_CONFLIST_DIR=$tmp/cni
    CNI_BIN_PATH=/usr/lib/cni:$tmp/bin
    mkdir -p "$CNI_CONFLIST_DIR" "$tmp/bin"
    ln -sf "$bin" "$tmp/bin/calico-ipsec"
    wire_up
    etcd_up 10.0.0.254 "$tmp/etcd"
    etcd_load_fixture "$E2E_FIXTURE"
    nsx wire "$bin" keys init --kek-file "$tmp/kek" >/dev/null
    ectl get --print-value-only /calico/ipsec/v1/config \
        | jq -c --arg p "$phase" '.phase = $p | .target_phase = $p' \
        | ectl put /calico/ipsec/v1/config >/dev/null
    for n in "${NODES[@]}"; do
        node_add "$n" "${NODE_IP[$n]}/24" 1500
        node_ipip "$n" "${TUNNEL[$n]}" 1480
        for p in "${NODES[@]}"; do
            [[ $p == "$n" ]] || node_route_ipip "$n" "${BLOCK[$p]}" "${NODE_IP[$p]}"
        done
        node_conflist "$n"
    done
}

# ------------------------------------------------------------------ misc

# mtu_formula EXTMTU ICV_BITS: DESIGN §4 bound for ESP transport over IPIP,
# outer IPv4. For information only: the suites compare the binary with the kernel.
mtu_formula() {
    local x=$(($1 - 20 - 8 - 8 - $2 / 8))
    echo $((x - x % 4 - 2))
}

# ------------------------------------------------------------ daemons

# The agents and managers of the lifecycle suites, with their logs in
# $E2E_TMP. daemons_stop ends them all (call it before e2e_finish).
E2E_DAEMON_PIDS=()
declare -A AGENT_PID MANAGER_PID

# agent_start NODE: the node agent in NODE's namespace, metrics on that
# namespace's loopback, a status lease of E2E_LEASE_TTL seconds (6 by
# default); AGENT_PID[NODE].
agent_start() {
    ip netns exec "$E2E_NS_PREFIX$1" "$E2E_BIN" agent --config "$CNI_CONFLIST_DIR/$1.conflist" \
        --listen 127.0.0.1:9094 --lease-ttl-seconds "${E2E_LEASE_TTL:-6}" >>"$E2E_TMP/agent-$1.log" 2>&1 &
    AGENT_PID[$1]=$!
    E2E_DAEMON_PIDS+=("$!")
}

# manager_start NAME: a manager in the wire namespace (beside etcd), a 4 s
# leadership lease, a step every 200 ms; MANAGER_PID[NAME].
manager_start() {
    ip netns exec "${E2E_NS_PREFIX}wire" "$E2E_BIN" manager --etcd-endpoints "$ETCD_ENDPOINTS" \
        --kek-file "$E2E_TMP/kek" --id "$1" --listen none --lease-ttl-seconds 4 --interval-ms 200 \
        >>"$E2E_TMP/manager-$1.log" 2>&1 &
    MANAGER_PID[$1]=$!
    E2E_DAEMON_PIDS+=("$!")
}

# daemons_stop: SIGTERM every agent, manager and background helper started.
daemons_stop() {
    local p
    for p in "${E2E_DAEMON_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    E2E_DAEMON_PIDS=()
}

# wait_until SECONDS DESC CMD...: poll CMD every 0.2 s until it succeeds; a check.
wait_until() {
    local secs=$1 desc=$2 end
    shift 2
    end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        if "$@" >/dev/null 2>&1; then
            pass "$desc"
            return 0
        fi
        sleep 0.2
    done
    fail "$desc (not within ${secs}s)"
    return 1
}

# ipsec_cfg: the config record. ipsec_epochs: [{e: N, s: STATE}, ...].
ipsec_cfg() { ectl get --print-value-only /calico/ipsec/v1/config; }
ipsec_epochs() { ectl get --prefix --print-value-only /calico/ipsec/v1/epochs/ | jq -sc 'map({e: .epoch, s: .state})'; }
# live_nodes: how many nodes hold a leased status record.
live_nodes() { ectl get --prefix --keys-only /calico/ipsec/v1/nodes/ | grep -c . || true; }
# three_live: at least three nodes hold a leased status record.
three_live() { [[ $(live_nodes) -ge 3 ]]; }

# daemon_cluster_up TMP BIN: cluster_up with the phase off, a 2 s overlap
# (so rotations fit a suite) and no scheduled rotation; the daemons are
# stopped on exit.
daemon_cluster_up() {
    info "setting up three nodes, etcd and the keys"
    cluster_up "$1" "$2" off
    info "cluster up; starting agents and managers"
    ipsec_cfg | jq -c '.overlap_seconds = 2 | .rotation_interval_seconds = 0' \
        | ectl put /calico/ipsec/v1/config >/dev/null
    trap 'daemons_stop; e2e_cleanup' EXIT
}
# only_epoch N: epoch N is active and the only epoch left.
only_epoch() { [[ $(ipsec_epochs) == "[{\"e\":$1,\"s\":\"active\"}]" ]]; }
# now: Unix time with nanoseconds.
now() { date +%s.%N; }

# timeline_start FILE: a background poller appending "TIME LABEL" to FILE
# whenever the phase or the epochs change (traffic.py report splits by it).
timeline_start() {
    local file=$1
    (
        last=
        while :; do
            cur="phase $(ipsec_cfg | jq -r '.phase') epochs $(ipsec_epochs | jq -r 'map("\(.e)\(.s[0:1])") | join(",")')"
            if [[ $cur != "$last" ]]; then
                echo "$(now) $cur" >>"$file"
                last=$cur
            fi
            sleep 0.1
        done
    ) &
    E2E_DAEMON_PIDS+=("$!")
}

# etcd_stop / etcd_start: stop etcd (SIGTERM, waited for) and start it again
# on the same data directory (after etcd_up).
etcd_stop() {
    kill -TERM "$ETCD_PID" 2>/dev/null || true
    while kill -0 "$ETCD_PID" 2>/dev/null; do sleep 0.1; done
}
etcd_start() {
    local i
    etcd_proc "$ETCD_ADDR" "$ETCD_DIR"
    for ((i = 0; i < 300; i++)); do
        ectl endpoint health >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "etcd did not come back" >&2
    return 1
}

# ------------------------------------------ fail-closed (test_failclosed.sh)

# node_join_borrower NODE ADDR TUNNEL: a node joining the running cluster
# with NO IPAM block affinity (its pods run on addresses borrowed from other
# nodes' blocks): its Calico Node resource (shaped like the fixture's), its
# namespace with tunl0 at TUNNEL and routes to every node's block, and its
# conflist (host-local on TUNNEL/32: the chain is never run on it). No
# peer gets a route to it: add one /32 per address it borrows.
node_join_borrower() {
    local n=$1 addr=$2 tunnel=$3 p
    node_resource_put "$n" "$addr" "$tunnel"
    node_add "$n" "$addr/24" 1500
    node_ipip "$n" "$tunnel" 1480
    for p in "${NODES[@]}"; do node_route_ipip "$n" "${BLOCK[$p]}" "${NODE_IP[$p]}"; done
    NODE_IP[$n]=$addr TUNNEL[$n]=$tunnel BLOCK[$n]=$tunnel/32
    NODES+=("$n")
    node_conflist "$n"
}

# wire_clear FILE: packets of the capture with a pod address (10.244/16) in
# clear, in the outer header or in the inner header of an IPIP packet.
wire_clear() { tcpdump -r "$1" -nn ip 2>/dev/null | grep -c '10\.244\.' || true; }

# wire_count FILE PROTO [A B]: packets of PROTO (as cap_ipv4 names it: ESP,
# IPIP, ...), only those between addresses matching the EREs A and B (either
# way) when given.
wire_count() {
    cap_ipv4 "$1" | awk -v p="$2" -v a="^(${3:-.*})\$" -v b="^(${4:-.*})\$" \
        '$1 == p && (($3 ~ a && $4 ~ b) || ($3 ~ b && $4 ~ a))' | grep -c . || true
}
