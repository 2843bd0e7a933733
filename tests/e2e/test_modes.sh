#!/bin/bash
# End-to-end: every Calico mode and family leaves no pod packet in clear.
#
# Two L2 segments joined by a router namespace: node-1 (10.0.0.11,
# fd00::11) and node-2 (10.0.0.12, fd00::12) on segment A (bridge br0 in
# e2e-wire, where etcd also lives), node-3 (10.0.1.13, fd00:1::13) on
# segment B (bridge br1 in e2e-wireb). The router (e2e-router) forwards
# between them and routes pod blocks when no tunnel carries them. Each
# round sets the IP pools (and FelixConfiguration) in etcd, programs the
# routes Calico programs for that mode (DESIGN §2: tunl0 onlink for IPIP,
# vxlan.calico with neighbour and FDB entries for VXLAN, via the peer or the
# router for no encapsulation), creates fresh pods through the CNI chain
# [ptp + host-local, calico-ipsec] with encryption enforced, and then:
# - every pod pair exchanges ICMP (with a random marker), TCP and UDP while
#   every node's uplink is captured;
# - the captures hold no packet with a pod address in its outer header and
#   no clear IPIP or VXLAN between nodes, and every ESP packet decrypts with
#   keys derived independently of the binary (esp_decrypt.py), with the
#   marker inside;
# - the pod MTU is the bound for the pools in use, a DF ping at the bound
#   crosses to another node and one byte more is refused;
# - `status` names each path and reports 0 unprotected.
# Then the fault rounds: a malformed peer Node, the config record deleted,
# a bad epoch record and a planted node with another node's address: the
# traffic concerned is blocked or stays encrypted, never clear, and the
# good peers keep working.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

e2e_init
e2e_bin
tmp=$(mktemp -d)
E2E_TMP=$tmp E2E_BIN=$bin
CNI_CONFLIST_DIR=$tmp/cni
CNI_BIN_PATH=/usr/lib/cni:$tmp/bin
mkdir -p "$CNI_CONFLIST_DIR" "$tmp/bin"
ln -sf "$bin" "$tmp/bin/calico-ipsec"
R=/calico/resources/v3/projectcalico.org
H=/calico/ipam/v2/host

declare -A IP4=([node-1]=10.0.0.11 [node-2]=10.0.0.12 [node-3]=10.0.1.13)
declare -A IP6=([node-1]=fd00::11 [node-2]=fd00::12 [node-3]=fd00:1::13)
declare -A SEG=([node-1]=a [node-2]=a [node-3]=b)
declare -A VTEP=([node-1]=10.244.135.0 [node-2]=10.244.201.64 [node-3]=10.244.18.128)
declare -A VMAC=([node-1]=66:ee:00:00:00:01 [node-2]=66:ee:00:00:00:02 [node-3]=66:ee:00:00:00:03)
declare -A BLK6=([node-1]=fd00:10:244:1::/122 [node-2]=fd00:10:244:2::/122 [node-3]=fd00:10:244:3::/122)
PODS4="10.244.0.0/16,10.245.0.0/16"
PODS6="fd00:10:244::/48"

# ----------------------------------------------------------- the network
info "building two segments, a router, etcd and three nodes"
ip netns add "${E2E_NS_PREFIX}wire"
ip netns add "${E2E_NS_PREFIX}wireb"
ip netns add "${E2E_NS_PREFIX}router"
for w in wire wireb; do
    ipn "$w" link set lo up
    ipn "$w" link add br0 type bridge
    ipn "$w" link set br0 up
done
nsx router sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
ipn router link set lo up
for leg in a b; do
    w=wire; [[ $leg == b ]] && w=wireb
    ipn router link add "r-$leg" type veth peer name "w-r" netns "$E2E_NS_PREFIX$w"
    ipn "$w" link set w-r master br0 up
    ipn router link set "r-$leg" up
done
ipn router addr add 10.0.0.1/24 dev r-a
ipn router addr add fd00::1/64 dev r-a nodad
ipn router addr add 10.0.1.1/24 dev r-b
ipn router addr add fd00:1::1/64 dev r-b nodad

etcd_up 10.0.0.254 "$tmp/etcd"
ipn wire route add default via 10.0.0.1
etcd_load_fixture "$E2E_FIXTURE"
nsx wire "$bin" keys init --kek-file "$tmp/kek" >/dev/null
ipsec_cfg | jq -c '.phase = "enforce" | .target_phase = "enforce"' | ectl put /calico/ipsec/v1/config >/dev/null

for n in node-1 node-2 node-3; do
    w=wire gw4=10.0.0.1 gw6=fd00::1 plen=24
    [[ ${SEG[$n]} == b ]] && w=wireb gw4=10.0.1.1 gw6=fd00:1::1
    ip netns add "$E2E_NS_PREFIX$n"
    ipn "$n" link set lo up
    ipn "$n" link add eth0 type veth peer name "w-$n" netns "$E2E_NS_PREFIX$w"
    ipn "$w" link set "w-$n" master br0 up
    ipn "$n" addr add "${IP4[$n]}/$plen" dev eth0
    ipn "$n" addr add "${IP6[$n]}/64" dev eth0 nodad
    ipn "$n" link set eth0 up
    ipn "$n" route add default via "$gw4"
    ipn "$n" -6 route add default via "$gw6"
    nsx "$n" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
    ipn "$n" link show tunl0 >/dev/null 2>&1 || ipn "$n" tunnel add tunl0 mode ipip
    ipn "$n" link set tunl0 mtu 1480 up
    ipn "$n" addr add "${VTEP[$n]}/32" dev tunl0
    nsx "$n" sysctl -qw net.ipv4.conf.tunl0.rp_filter=0
    # Calico's Node: this node's addresses in CIDR form.
    ectl get --print-value-only "$R/nodes/$n" \
        | jq -c --arg a "${IP4[$n]}/24" --arg b "${IP6[$n]}/64" \
            '.spec.bgp.ipv4Address = $a | .spec.bgp.ipv6Address = $b' \
        | ectl put "$R/nodes/$n" >/dev/null
done
ectl get "$R/nodes/node-3" --print-value-only | jq -c .spec.bgp | indent

# conflist NODE LIST V4RANGE: LIST.conflist, [ptp + host-local on V4RANGE,
# calico-ipsec of NODE].
conflist() {
    jq -n --arg n "$1" --arg r "$3" --arg tmp "$tmp" --arg ep "$ETCD_ENDPOINTS" '{
        cniVersion: "1.0.0", name: "k8s-pod-network",
        plugins: [
          {type: "ptp", mtu: 1480, ipMasq: false,
           ipam: {type: "host-local", ranges: [[{subnet: $r}]], routes: [{dst: "0.0.0.0/0"}],
                  dataDir: "\($tmp)/ipam-\($n)"}},
          {type: "calico-ipsec", etcd_endpoints: $ep, nodename: $n,
           kek_file: "\($tmp)/kek", state_dir: "\($tmp)/state-\($n)", agreement_dir: "\($tmp)/agreement-\($n)",
           log_file_path: "\($tmp)/\($n).log", log_level: "debug", etcd_timeout_ms: 10000}
        ]}' >"$CNI_CONFLIST_DIR/$2.conflist"
}
declare -A BLK4=([node-1]=10.244.135.0/26 [node-2]=10.244.201.64/26 [node-3]=10.244.18.128/26)
for n in node-1 node-2 node-3; do conflist "$n" "$n" "${BLK4[$n]}"; done
conflist node-2 node-2b 10.245.2.0/26

# ------------------------------------------------------------- the modes

# pool NAME CIDR IPIP VXLAN [DISABLED]: an IPPool record.
pool() {
    jq -nc --arg n "$1" --arg c "$2" --arg i "$3" --arg v "$4" --argjson d "${5:-false}" \
        '{apiVersion: "projectcalico.org/v3", kind: "IPPool", metadata: {name: $n},
          spec: {cidr: $c, ipipMode: $i, vxlanMode: $v, disabled: $d, natOutgoing: false}}' \
        | ectl put "$R/ippools/$1" >/dev/null
}

# path IPIP VXLAN FROM TO V6: the path Calico takes (ipip, vxlan, native).
path() {
    local same=0
    [[ ${SEG[$3]} == "${SEG[$4]}" ]] && same=1
    applies() { [[ $1 == Always || ($1 == CrossSubnet && $same == 0) ]]; }
    if [[ $5 == 0 ]] && applies "$1"; then echo ipip
    elif applies "$2"; then echo vxlan
    else echo native; fi
}

# vxlan_dev NODE PORT: vxlan.calico (IPv4) and vxlan-v6.calico as Felix makes them.
vxlan_dev() {
    local n=$1 port=$2 p
    ipn "$n" link del vxlan.calico 2>/dev/null || true
    ipn "$n" link del vxlan-v6.calico 2>/dev/null || true
    ipn "$n" link add vxlan.calico type vxlan id 4096 dstport "$port" local "${IP4[$n]}" dev eth0 nolearning
    ipn "$n" link set vxlan.calico address "${VMAC[$n]}" mtu 1450 up
    ipn "$n" addr add "${VTEP[$n]}/32" dev vxlan.calico
    ipn "$n" link add vxlan-v6.calico type vxlan id 4096 dstport "$port" local "${IP6[$n]}" dev eth0 nolearning
    ipn "$n" link set vxlan-v6.calico address "${VMAC[$n]/66/76}" mtu 1430 up
    ipn "$n" addr add "fd00:ff::${n#node-}/128" dev vxlan-v6.calico nodad
    nsx "$n" sysctl -qw net.ipv4.conf.vxlan/calico.rp_filter=0
    for p in node-1 node-2 node-3; do
        [[ $p == "$n" ]] && continue
        ipn "$n" neigh replace "${VTEP[$p]}" lladdr "${VMAC[$p]}" dev vxlan.calico nud permanent
        nsx "$n" bridge fdb replace "${VMAC[$p]}" dev vxlan.calico dst "${IP4[$p]}" self permanent
        ipn "$n" -6 neigh replace "fd00:ff::${p#node-}" lladdr "${VMAC[$p]/66/76}" dev vxlan-v6.calico nud permanent
        nsx "$n" bridge fdb replace "${VMAC[$p]/66/76}" dev vxlan-v6.calico dst "${IP6[$p]}" self permanent
    done
}

# route N P BLOCK KIND V6: N's route to P's BLOCK for KIND.
route() {
    local n=$1 p=$2 b=$3 kind=$4 v6=$5 fam=-4 peer=${IP4[$2]} gw=10.0.0.1 rgw
    [[ $v6 == 1 ]] && fam=-6 peer=${IP6[$p]} gw=fd00::1
    [[ ${SEG[$n]} == b ]] && { gw=10.0.1.1; [[ $v6 == 1 ]] && gw=fd00:1::1; }
    case $kind in
        ipip) ipn "$n" route replace "$b" via "$peer" dev tunl0 onlink ;;
        vxlan)
            if [[ $v6 == 1 ]]; then ipn "$n" -6 route replace "$b" via "fd00:ff::${p#node-}" dev vxlan-v6.calico onlink
            else ipn "$n" route replace "$b" via "${VTEP[$p]}" dev vxlan.calico onlink; fi ;;
        native)
            if [[ ${SEG[$n]} == "${SEG[$p]}" ]]; then ipn "$n" "$fam" route replace "$b" via "$peer" dev eth0
            else ipn "$n" "$fam" route replace "$b" via "$gw" dev eth0; fi
            # The router learns the block (BGP would tell it).
            rgw=${IP4[$p]}; [[ $v6 == 1 ]] && rgw=${IP6[$p]}
            ipn router "$fam" route replace "$b" via "$rgw" ;;
    esac
}

# pods ROUND: fresh pods a-N on every node (and q-node-2 in the second
# block when it has a pool), through the CNI chain; converge every node
# again so that each knows every peer's incarnation.
pods() {
    local n
    for n in node-1 node-2 node-3; do
        [[ -e $CNI_CONFLIST_DIR/a-$n.result ]] && cni_del "$n" "a-$n" >/dev/null 2>&1 || true
        check "$1: ADD a pod on $n" cni_add "$n" "a-$n"
    done
    if [[ -e $CNI_CONFLIST_DIR/q-node-2.result ]]; then
        CNI_LIST=node-2b cni_del node-2 q-node-2 >/dev/null 2>&1 || true
    fi
    if [[ $HAS_B == 1 ]]; then check "$1: ADD a pod in the second pool on node-2" add_q; fi
    for n in node-1 node-2 node-3; do
        nsx "$n" "$bin" converge --config "$CNI_CONFLIST_DIR/$n.conflist" >/dev/null 2>&1 || true
    done
}

add_q() { CNI_LIST=node-2b cni_add node-2 q-node-2; }

# v6_pod NODE POD: give POD an IPv6 address from NODE's IPv6 block, routed
# as Calico routes it (host route to the pod, default via the host veth).
v6_pod() {
    local n=$1 pod=$2 a hif
    a=${BLK6[$n]%/*}
    a=${a%::}::a
    hif=$(ipn "$n" -o route get "$(pod_ip "$pod")" | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    ipn "$n" -6 addr add fe80::1/64 dev "$hif" nodad 2>/dev/null || true
    nsx "$n" sysctl -qw "net.ipv6.conf.$hif.forwarding=1" 2>/dev/null || true
    ipn "$pod" -6 addr add "$a/128" dev eth0 nodad
    ipn "$pod" -6 route replace default via fe80::1 dev eth0
    ipn "$n" -6 route replace "$a/128" dev "$hif"
    echo "$a"
}

# round NAME V4POOL_IPIP V4POOL_VXLAN [OPTIONS]: one mode. OPTIONS:
# disabled (pool A disabled), B (a second pool 10.245/16 VXLAN Always),
# port=N (Felix's vxlanPort), v6=IPIP/VXLAN (an IPv6 pool, its modes).
round() {
    local name=$1 ipip=$2 vxlan=$3 opt disabled=false port=4789 v6= n p kind marker
    shift 3
    HAS_B=0
    for opt in "$@"; do
        case $opt in
            disabled) disabled=true ;;
            B) HAS_B=1 ;;
            port=*) port=${opt#port=} ;;
            v6=*) v6=${opt#v6=} ;;
        esac
    done
    echo "# --- round $name: pool ipip=$ipip vxlan=$vxlan $*"
    pool default-ipv4-ippool 10.244.0.0/16 "$ipip" "$vxlan" "$disabled"
    if [[ $HAS_B == 1 ]]; then
        pool pool-b 10.245.0.0/16 Never Always
        ectl put "$H/node-2/ipv4/block/10.245.2.0-26" '{"deleted":false,"state":"confirmed"}' >/dev/null
    else
        ectl del "$R/ippools/pool-b" >/dev/null
        ectl del "$H/node-2/ipv4/block/10.245.2.0-26" >/dev/null
    fi
    for n in node-1 node-2 node-3; do
        if [[ -n $v6 ]]; then
            ectl put "$H/$n/ipv6/block/${BLK6[$n]/\//-}" '{"deleted":false,"state":"confirmed"}' >/dev/null
        else
            ectl del "$H/$n/ipv6/block/${BLK6[$n]/\//-}" >/dev/null
        fi
    done
    if [[ -n $v6 ]]; then pool pool-v6 fd00:10:244::/48 Never "$v6"; else ectl del "$R/ippools/pool-v6" >/dev/null; fi
    jq -nc --argjson p "$port" '{apiVersion: "projectcalico.org/v3", kind: "FelixConfiguration",
        metadata: {name: "default"}, spec: {vxlanPort: $p, vxlanPortV6: $p, interfacePrefix: "cali,veth"}}' \
        | ectl put "$R/felixconfigurations/default" >/dev/null
    for n in node-1 node-2 node-3; do
        vxlan_dev "$n" "$port"
        for p in node-1 node-2 node-3; do
            [[ $p == "$n" ]] && continue
            route "$n" "$p" "${BLK4[$p]}" "$(path "$ipip" "$vxlan" "$n" "$p" 0)" 0
            [[ $p == node-2 && $HAS_B == 1 ]] && route "$n" "$p" 10.245.2.0/26 vxlan 0
            [[ -n $v6 ]] && route "$n" "$p" "${BLK6[$p]}" "$(path Never "$v6" "$n" "$p" 1)" 1
        done
    done
    pods "$name"
    declare -A P4 P6
    for n in node-1 node-2 node-3; do
        P4[$n]=$(pod_ip "a-$n")
        [[ -n $v6 ]] && P6[$n]=$(v6_pod "$n" "a-$n")
    done
    local q=
    [[ $HAS_B == 1 ]] && q=$(pod_ip q-node-2)

    local s1
    s1=$(nsx node-1 "$bin" status --nodename node-1)
    indent <<<"$s1"
    check_match "$name: node-1's status reports 0 unprotected paths" "$s1" '^unprotected: +0 '
    check_eq "$name: node-1 converged, every SA and policy in place" \
        "$(nsx node-1 "$bin" status --nodename node-1 --json | jq -r '[.pending_changes] + [.peers[] | .sa_out, .sa_in, .policy_out] | map(tostring) | unique | join(",")')" "0,ok"

    marker=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')
    # On the wire side of each node's link: inside the node, tcpdump also
    # shows what tunnel-mode ESP decrypted, as if received in clear.
    for n in node-1 node-2 node-3; do cap_start "$(wire_of "$n")" "w-$n" "$tmp/$name-$n.pcap" 0; done
    for n in node-1 node-2 node-3; do
        for p in node-1 node-2 node-3; do
            [[ $p == "$n" ]] && continue
            check "$name: ping a-$n -> a-$p (${P4[$p]})" nsx "a-$n" ping -n -c 2 -i 0.2 -W 5 -p "$marker" "${P4[$p]}"
            if [[ -n $v6 ]]; then
                check "$name: ping6 a-$n -> a-$p (${P6[$p]})" nsx "a-$n" ping -6 -n -c 2 -i 0.2 -W 5 -p "$marker" "${P6[$p]}"
            fi
        done
    done
    [[ -n $q ]] && check "$name: ping a-node-1 -> q-node-2 in the second pool ($q)" \
        nsx a-node-1 ping -n -c 2 -i 0.2 -W 5 -p "$marker" "$q"
    check "$name: TCP and UDP a-node-1 <-> a-node-3" tcp_udp a-node-1 a-node-3 "${P4[node-3]}"
    if [[ -n $v6 ]]; then
        check "$name: TCP and UDP over IPv6 a-node-1 <-> a-node-3" tcp_udp a-node-1 a-node-3 "${P6[node-3]}"
    fi
    check "$name: ping from node-1's host to a-node-2" nsx node-1 ping -n -c 2 -i 0.2 -W 5 -p "$marker" "${P4[node-2]}"
    for n in node-1 node-2 node-3; do cap_stop_pid "w-$n"; done
    ectl get --prefix /calico/ -w json >"$tmp/etcd.json"
    for n in node-1 node-2 node-3; do
        if out=$(python3 "$here/esp_decrypt.py" "$tmp/$name-$n.pcap" "$tmp/etcd.json" "$tmp/kek" "hex:$marker" "$PODS4,$PODS6" 2>&1); then
            pass "$name: $n's uplink: no pod address in clear, every ESP packet decrypts with independent keys, marker inside ($(tail -1 <<<"$out"))"
        else
            fail "$name: $n's uplink capture:"
            indent <<<"$(tail -8 <<<"$out")"
        fi
        check_eq "$name: $n: every xfrm_stat counter 0" "$(xfrm_errors "$n")" ""
    done
    mtu_round "$name" "${P4[node-2]} ${P4[node-3]} $q" "${P6[node-3]:-}" "$@"
    rm -f "$tmp/$name"-*.pcap
}

# tcp_udp POD_A POD_B ADDR_B: 64 KiB over TCP and a UDP datagram, checked.
tcp_udp() {
    rm -f "$tmp/tcpudp.out"
    nsx "$2" python3 -c '
import socket, sys
f = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
t = socket.socket(f); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((sys.argv[2], 5001)); t.listen(1)
u = socket.socket(f, socket.SOCK_DGRAM); u.bind((sys.argv[2], 5002)); u.settimeout(15); t.settimeout(15)
c, _ = t.accept(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    n += len(b)
d, a = u.recvfrom(2048)
open(sys.argv[1], "w").write(f"{n} {d.decode()}\n")' "$tmp/tcpudp.out" "$3" &
    local srv=$! i
    # The server must listen before the client connects (python starts
    # slowly under TCG on a busy host): poll, do not guess.
    for ((i = 0; i < 100; i++)); do
        [[ -n $(nsx "$2" ss -Hltn "sport = :5001") ]] && break
        sleep 0.1
    done
    nsx "$1" python3 -c '
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5001), timeout=15); s.sendall(b"x" * 65536); s.close()
u = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    u.sendto(b"udp-ok", (sys.argv[1], 5002)); time.sleep(0.2)' "$3"
    wait "$srv" || return 1
    [[ $(cat "$tmp/tcpudp.out") == "65536 udp-ok" ]]
}

# cap_stop_pid NODE: stop NODE's capture (cap_start keeps only the last pid).
declare -A CAPS
cap_start_orig=$(declare -f cap_start)
eval "${cap_start_orig/cap_start/cap_start_one}"
cap_start() { cap_start_one "$@"; CAPS[$2]=$CAP_PID; }
wire_of() { if [[ ${SEG[$1]} == b ]]; then echo wireb; else echo wire; fi; }
cap_stop_pid() { CAP_PID=${CAPS[$1]}; cap_stop; }

# mtu_round NAME ADDR4 ADDR6 OPTIONS: the pod MTU is the smallest bound over
# the pools in use; DF at the bound crosses, one byte more is refused.
mtu_round() {
    local name=$1 a4=$2 a6=$3 want got encs=() opt
    shift 3
    # The carriers of the pools in use, as the README's table says.
    case $name in
        ipip-cross) encs=("ipip ipv4" "none ipv4") ;;
        vxlan-cross*) encs=("vxlan ipv4" "none ipv4") ;;
        never) encs=("none ipv4") ;;
        mixed-disabled) encs=("ipip ipv4" "vxlan ipv4") ;;
        dual-native) encs=("ipip ipv4" "none ipv6") ;;
        dual-vxlan) encs=("ipip ipv4" "vxlan ipv6") ;;
    esac
    want=99999
    for opt in "${encs[@]}"; do
        read -r e o <<<"$opt"
        got=$("$bin" mtu --ext-mtu 1500 --icv 128 --encap "$e" --outer "$o")
        ((got < want)) && want=$got
    done
    check_eq "$name: pod MTU is the smallest bound of the pools in use ($want)" \
        "$(ipn a-node-1 -j link show eth0 | jq '.[0].mtu')" "$want"
    local res a
    for a in $a4; do
        check "$name: DF ping of $want bytes crosses to $a" \
            nsx a-node-1 ping -n -c 1 -W 5 -M 'do' -s $((want - 28)) "$a"
    done
    res=$(nsx a-node-1 ping -n -c 1 -W 2 -M 'do' -s $((want - 27)) "${a4%% *}" 2>&1 || true)
    check_match "$name: one byte more is refused" "$res" "message too long, mtu=$want"
    if [[ -n $a6 ]]; then
        check "$name: IPv6 packet of $want bytes crosses to a-node-3" \
            nsx a-node-1 ping -6 -n -c 1 -W 5 -M 'do' -s $((want - 48)) "$a6"
        res=$(nsx a-node-1 ping -6 -n -c 1 -W 2 -M 'do' -s $((want - 47)) "$a6" 2>&1 || true)
        check_match "$name: one byte more over IPv6 is refused (not sent, nothing received)" \
            "$(paste -sd' ' <<<"$res")" "([Tt]oo long|[Tt]oo big).* 0 received"
    fi
}

round ipip-cross CrossSubnet Never
round vxlan-cross-port Never CrossSubnet port=8472
round never Never Never
round mixed-disabled Always Never disabled B
round dual-native Always Never v6=Never
round dual-vxlan Always Never v6=Always

# ------------------------------------------------------------ fault rounds
# In the no-encapsulation topology: each fault, then traffic captured.
echo "# --- fault rounds (no encapsulation)"
pool default-ipv4-ippool 10.244.0.0/16 Never Never false
ectl del "$R/ippools/pool-v6" >/dev/null
for n in node-1 node-2 node-3; do ectl del "$H/$n/ipv6/block/${BLK6[$n]/\//-}" >/dev/null; done
HAS_B=0
for n in node-1 node-2 node-3; do
    for p in node-1 node-2 node-3; do
        [[ $p == "$n" ]] || route "$n" "$p" "${BLK4[$p]}" native 0
    done
done
pods faults
p2=$(pod_ip a-node-2) p3=$(pod_ip a-node-3)
converge_all() {
    local n
    for n in node-1 node-2 node-3; do
        nsx "$n" "$bin" converge --config "$CNI_CONFLIST_DIR/$n.conflist" >"$tmp/converge-$n.out" 2>&1 || true
    done
}
# fault NAME WANT2 WANT3: after the fault, node-1's pod reaches a-node-2
# (WANT2: ok or blocked) and a-node-3, and nothing pod-addressed is in clear.
fault() {
    local name=$1 w2=$2 w3=$3 r
    cap_start wire w-node-1 "$tmp/f.pcap" 0
    for r in "2 $p2 $w2" "3 $p3 $w3"; do
        read -r i a w <<<"$r"
        if [[ $w == ok ]]; then
            check "$name: a-node-1 -> a-node-$i still works" nsx a-node-1 ping -n -c 2 -i 0.2 -W 5 "$a"
        else
            check_fails "$name: a-node-1 -> a-node-$i is blocked" nsx a-node-1 ping -n -c 2 -i 0.2 -W 2 "$a"
        fi
    done
    cap_stop_pid w-node-1
    ectl get --prefix /calico/ -w json >"$tmp/etcd.json"
    local out
    out=$(python3 "$here/esp_decrypt.py" "$tmp/f.pcap" "$tmp/etcd.json" "$tmp/kek" "" "$PODS4" 2>&1 || true)
    check_match "$name: no pod address in clear on node-1's uplink" "$(tail -1 <<<"$out")" 'failed=0 plaintext=0'
}

n3=$(ectl get --print-value-only "$R/nodes/node-3")
jq -c '.spec = {}' <<<"$n3" | ectl put "$R/nodes/node-3" >/dev/null
converge_all
fault "malformed node-3" ok blocked
check_match "status reports node-3's pods blocked" "$(nsx node-1 "$bin" status --nodename node-1)" 'blocked: pods of node-3'
check_match "the gauge counts it" "$(nsx node-1 "$bin" status --nodename node-1 --json | jq .unprotected)" '10\.244\.18\.128/26'
printf '%s' "$n3" | ectl put "$R/nodes/node-3" >/dev/null
# Twice: a node that re-creates the SAs it had removed toward node-3 must
# publish a new incarnation (no key for two SAs), which the others then learn.
converge_all
converge_all

cfg=$(ipsec_cfg)
before=$(ipn node-1 xfrm state | grep -c '^src' || true)
ectl del /calico/ipsec/v1/config >/dev/null
converge_all
check_eq "config deleted in enforce: node-1 keeps all its states" "$(ipn node-1 xfrm state | grep -c '^src' || true)" "$before"
check_match "config deleted: converge says why it keeps them" "$(cat "$tmp/converge-node-1.out")" 'missing|stale|keep'
out=$(cni_add node-1 cfg-pod 2>&1) && rc=0 || rc=$?
check_eq "config deleted: an ADD is refused (the node has seen the cluster initialised)" "$rc" 1
check_match "config deleted: the refusal names the missing record" "$out" '/calico/ipsec/v1/config.*missing'
ip netns del "${E2E_NS_PREFIX}cfg-pod" 2>/dev/null || true
fault "config deleted" ok ok
printf '%s' "$cfg" | ectl put /calico/ipsec/v1/config >/dev/null

ectl put /calico/ipsec/v1/epochs/99 'not json' >/dev/null
ectl put /calico/ipsec/v1/epochs/98 '{"epoch":98,"state":"revoked","created":"","algorithm":"","kek_fingerprint":"","sealed_secret":""}' >/dev/null
for n in node-1 node-2 node-3; do check "bad epoch records: ADD on $n succeeds" cni_add "$n" "e-$n"; done
fault "bad epoch records" ok ok
ectl del /calico/ipsec/v1/epochs/99 >/dev/null
ectl del /calico/ipsec/v1/epochs/98 >/dev/null

jq -c '.metadata.name = "planted" | .spec.bgp.ipv4Address = "10.0.0.12/24" | del(.spec.bgp.ipv6Address)' <<<"$n3" \
    | ectl put "$R/nodes/planted" >/dev/null
converge_all
fault "planted node with node-2's address" blocked ok
check_eq "node-1 holds no SA toward 10.0.0.12 while the address is contested" \
    "$(ipn node-1 xfrm state | grep -c '10\.0\.0\.12' || true)" 0
ectl del "$R/nodes/planted" >/dev/null
converge_all
converge_all
fault "planted node removed" ok ok

for n in node-1 node-2 node-3; do
    check_eq "$n: every xfrm_stat counter but XfrmOutPolBlock (the blocked pings) still 0" \
        "$(xfrm_errors "$n" | sed 's/XfrmOutPolBlock=[0-9]* //')" ""
done
rm -rf "$tmp"
e2e_finish
