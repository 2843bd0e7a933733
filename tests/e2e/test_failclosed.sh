#!/bin/bash
# End-to-end: fail closed by construction (DESIGN §5c). IPIP fixture, agents
# on every node, two managers. Every traffic round captures the whole wire
# (bridge br0 in e2e-wire) and asserts that no packet carries a pod address
# (10.244/16) in clear, as outer header or IPIP inner header, and that no
# IPIP packet crosses in clear; then that the traffic was either delivered
# encrypted (echoes answered, ESP between the two nodes on the wire) or
# blocked (no answer), as the case expects.
#
# 1. node-3's agent SIGSTOPped past its 4 s status lease just before
#    `enable --wait`: for 15 s the phase stays below encrypt and enable has
#    not returned; after SIGCONT enable reaches enforce and p1 <-> p3 is
#    encrypted.
# 2. node-4 joins with a Node resource and NO block affinity while node-1's
#    agent is down; its pod p4 runs on 10.244.18.140, borrowed from node-3's
#    block (the IPAM block record says so; routes as BIRD makes them):
#    p1 -> p4 blocked until an ADD converges node-1, then p1 <-> p4
#    encrypted.
# 3. node-1 sends toward node-2 from a second address (10.0.0.21):
#    p1 -> p2 encrypted or blocked, never clear (which one is reported).
# 4. A foreign allow policy on node-1 with the selector of our policy toward
#    node-3 (src 0.0.0.0/0 dst 10.0.0.13/32 proto 4, priority 100), put
#    while node-1's agent is down: after its restart p1 -> p2 is encrypted,
#    p1 -> p3 is blocked and node-1 reports the refused peer; once the
#    foreign policy is removed p1 -> p3 is encrypted again.
# 5. The config record deleted in enforce, then node-3 "rebooted" (agent
#    stopped, XFRM flushed, nft table deleted, pods and agreement dir gone,
#    state dir kept): the agent puts the nft table back within seconds, an
#    ADD on node-3 is refused naming /calico/ipsec/v1/config (or, if it
#    succeeds, its pod's traffic is encrypted), and node-3's host sends
#    nothing in clear toward p1.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

e2e_init
e2e_bin
tmp=$(mktemp -d)
daemon_cluster_up "$tmp" "$bin"
t_start=$SECONDS
# node-3's lease is short (case 1 lets it expire); the others' are long so
# that a slow TCG guest never drops them from the cluster by accident.
for n in node-1 node-2; do E2E_LEASE_TTL=20 agent_start "$n"; done
E2E_LEASE_TTL=4 agent_start node-3
manager_start mgr-a
manager_start mgr-b
wait_until 60 "three agents publish a leased status" three_live || true
check "pod p1 on node-1" cni_add node-1 p1
check "pod p2 on node-2" cni_add node-2 p2
check "pod p3 on node-3" cni_add node-3 p3
ip1=$(pod_ip p1) ip2=$(pod_ip p2) ip3=$(pod_ip p3)
N1=${NODE_IP[node-1]} N2=${NODE_IP[node-2]} N3=${NODE_IP[node-3]}

# status NODE: the node's `status`, with its state directory (where it
# keeps whether it has seen the cluster initialised).
status() { nsx "$1" "$bin" status --nodename "$1" --state-dir "$tmp/state-$1"; }
# diag NODE...: what the nodes hold and logged, shown after a failed case.
diag() {
    local n
    for n in "$@"; do
        info "$n: agent log, last lines:"
        tail -n 10 "$tmp/agent-$n.log" | cut -c1-240 | indent || true
        info "$n: XFRM policies:"
        ipn "$n" xfrm policy | grep -Ev '^\s*(proto esp|mark|lifetime|limit|security)' | head -30 | indent || true
        info "$n: XFRM states: $(ipn "$n" xfrm state | grep -c '^src' || true); xfrm_stat: $(xfrm_errors "$n")"
        info "$n: nft ruleset:"
        nsx "$n" nft list ruleset 2>&1 | head -30 | indent || true
    done
}
# case_begin TITLE / case_end NODE...: a case's banner and time; the
# diagnostics of NODE... when the case failed anything.
case_begin() { echo "# --- $*"; CASE_FAILS=$E2E_FAIL CASE_T0=$SECONDS; }
case_end() {
    info "case took $((SECONDS - CASE_T0))s"
    ((E2E_FAIL == CASE_FAILS)) && return 0
    info "$ROUND: the wire (etcd, ARP and IPv6 left out):"
    tcpdump -r "$tmp/$ROUND.pcap" -nn 'ip and not port 2379' 2>/dev/null | head -12 | cut -c1-160 | indent || true
    diag "$@"
}
# poll SECS CMD...: CMD succeeds within SECS (quiet: no tally).
poll() {
    local end=$((SECONDS + $1))
    shift
    while ((SECONDS < end)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}
# echo_ok POD ADDR: one echo answered within 2 s.
echo_ok() { nsx "$1" ping -n -c 1 -W 2 "$2"; }
# reach DESC SECS POD ADDR: within SECS an echo from POD to ADDR is answered.
reach() { wait_until "$2" "$1" echo_ok "$3" "$4" || true; }
# blocked DESC POD ADDR: three echoes, none answered.
blocked() { check_fails "$1" nsx "$2" ping -n -c 3 -i 0.3 -W 2 "$3"; }
# round_start NAME: capture the whole wire into $tmp/NAME.pcap.
round_start() { ROUND=$1; cap_start wire br0 "$tmp/$1.pcap"; }
# round_end: stop the capture; nothing pod-addressed and no IPIP in clear.
round_end() {
    # tcpdump's ring hands packets over in blocks retired after 1 s; those
    # of the last second are lost when it is stopped earlier.
    sleep 1.2
    cap_stop
    local f=$tmp/$ROUND.pcap clear ipip
    clear=$(wire_clear "$f") ipip=$(wire_count "$f" IPIP)
    info "$ROUND: on the wire: $clear packets with a pod address in clear, $ipip clear IPIP, $(wire_count "$f" ESP) ESP"
    check_eq "$ROUND: packets with a pod address in clear on the wire" "$clear" 0
    check_eq "$ROUND: clear IPIP packets on the wire" "$ipip" 0
    [[ $clear == 0 && $ipip == 0 ]] || tcpdump -r "$f" -nn ip 2>/dev/null | grep -E '10\.244\.|IP .* > .*: IP ' | head -6 | indent
}
# esp_seen A B: ESP between underlay addresses A and B in the last round.
esp_seen() { check_ge "$ROUND: ESP between $1 and $2 on the wire" "$(wire_count "$tmp/$ROUND.pcap" ESP "$1" "$2")" 2; }
phase() { ipsec_cfg | jq -r .phase; }
live() { ectl get --keys-only "/calico/ipsec/v1/nodes/$1" | grep -q .; }
# gone NODE: etcd answered, and NODE holds no status record (an etcdctl
# that fails under a loaded emulator proves nothing).
gone() { local out; out=$(ectl get --keys-only "/calico/ipsec/v1/nodes/$1") && [[ -z $out ]]; }

# ------------------------------------------------------------------ case 1
case_begin "1. node-3's agent stopped past its lease: enable --wait is held back"
kill -STOP "${AGENT_PID[node-3]}"
wait_until 30 "node-3's status lease expires while its agent is stopped" gone node-3 || true
# Twice, a second apart: the managers read the same etcd.
sleep 1
check "node-3 still holds no status record" gone node-3
timeout 200 ip netns exec "${E2E_NS_PREFIX}wire" "$bin" enable --etcd-endpoints "$ETCD_ENDPOINTS" \
    --wait --timeout-seconds 180 >"$tmp/enable.out" 2>&1 &
enable_pid=$!
seen=" "
end=$((SECONDS + 15))
while ((SECONDS < end)); do
    p=$(phase)
    [[ $seen == *" $p "* ]] || seen+="$p "
    sleep 0.3
done
info "phases seen in 15 s with node-3's agent stopped:$seen"
check_eq "the phase never reached encrypt or enforce while node-3 was not live" \
    "$(grep -cE ' (encrypt|enforce) ' <<<"$seen" || true)" 0
# The managers wait at off; should a step show up anyway, say why.
[[ $seen == " off " ]] || grep -hE 'phase|not live|no live agent' "$tmp"/manager-mgr-*.log | tail -n 12 | cut -c1-240 | indent
check "enable --wait still waiting while node-3 is not live" kill -0 "$enable_pid"
kill -CONT "${AGENT_PID[node-3]}"
t_cont=$SECONDS rc=0
wait "$enable_pid" || rc=$?
info "enable --wait returned $((SECONDS - t_cont))s after SIGCONT"
check_eq "enable --wait returned 0 once node-3's agent resumed ($(tail -1 "$tmp/enable.out"))" "$rc" 0
check_eq "phase enforce" "$(phase)" enforce
round_start 1-enforce
reach "p1 -> p3 answered" 30 p1 "$ip3"
reach "p3 -> p1 answered" 10 p3 "$ip1"
round_end
esp_seen "$N1" "$N3"
case_end node-1 node-3
[[ $E2E_FAIL == "$CASE_FAILS" ]] || tail -n 8 "$tmp/manager-mgr-a.log" "$tmp/manager-mgr-b.log" | cut -c1-200 | indent

# ------------------------------------------------------------------ case 2
case_begin "2. node-4 has no block affinity; its pod runs on an address borrowed from node-3's block"
# node-1's agent is down while node-4 joins: node-1 has not converged on its
# new peer until an ADD does it.
kill -TERM "${AGENT_PID[node-1]}"
wait "${AGENT_PID[node-1]}" 2>/dev/null || true
N4=10.0.0.14 ip4=10.244.18.140
node_join_borrower node-4 "$N4" 10.244.99.1
E2E_LEASE_TTL=20 agent_start node-4
# A default route, as every real host has: without one, proxy ARP never
# answers the pod's 169.254.1.1.
ipn node-4 route add default via 10.0.0.254 dev eth0
pod_add node-4 p4 "$ip4" 1400
# Calico's IPAM block of node-3: its tunnel address (ordinal 0) and p3 on
# node-3, ordinal 12 (10.244.18.140) borrowed by node-4.
o3=$((${ip3##*.} - 128))
jq -nc --argjson o3 "$o3" '{cidr: "10.244.18.128/26", affinity: "host:node-3", strictAffinity: false,
    allocations: [range(64) | if . == 0 then 0 elif . == $o3 then 1 elif . == 12 then 2 else null end],
    unallocated: [range(64) | select(. != 0 and . != $o3 and . != 12)],
    attributes: [
      {handle_id: "ipip-tunnel-addr-node-3", secondary: {node: "node-3", type: "ipipTunnelAddress"}},
      {handle_id: "k8s-pod-network.p3", secondary: {namespace: "default", node: "node-3", pod: "p3"}},
      {handle_id: "k8s-pod-network.p4", secondary: {namespace: "default", node: "node-4", pod: "p4"}}],
    deleted: false}' | ectl put /calico/ipam/v2/assignment/ipv4/block/10.244.18.128-26 >/dev/null
# BIRD: the borrowing node advertises the /32, more specific than the block.
for n in node-1 node-2 node-3; do ipn "$n" route replace "$ip4/32" via "$N4" dev tunl0 onlink; done
wait_until 60 "node-4's agent publishes a leased status" live node-4 || true
round_start 2-unconverged
blocked "p1 -> p4 blocked while node-1 has not converged on its new peer" p1 "$ip4"
round_end
check "an ADD on node-1 converges it with node-4 as a peer" cni_add node-1 p1b
case_end node-1 node-4
E2E_LEASE_TTL=20 agent_start node-1
round_start 2-borrowed
reach "p1 -> p4 ($ip4, borrowed) answered" 60 p1 "$ip4"
reach "p4 -> p1 answered" 20 p4 "$ip1"
round_end
esp_seen "$N1" "$N4"
case_end node-1 node-4

# ------------------------------------------------------------------ case 3
case_begin "3. node-1 sends toward node-2 from a second address"
ipn node-1 addr add 10.0.0.21/24 dev eth0
ipn node-1 route replace "$N2/32" dev eth0 src 10.0.0.21
round_start 3-second-source
outcome=blocked
poll 8 echo_ok p1 "$ip2" && outcome=delivered
round_end
info "p1 -> p2 with node-1 sending from 10.0.0.21: $outcome"
if [[ $outcome == delivered ]]; then
    check_ge "$ROUND: delivered, so encrypted: ESP between node-1 and $N2" \
        "$(wire_count "$tmp/$ROUND.pcap" ESP "10.0.0.21|$N1" "$N2")" 2
else
    pass "$ROUND: p1 -> p2 blocked (not delivered), nothing in clear"
fi
ipn node-1 route del "$N2/32" dev eth0 src 10.0.0.21
ipn node-1 addr del 10.0.0.21/24 dev eth0
case_end node-1 node-2

# ------------------------------------------------------------------ case 4
case_begin "4. a foreign policy refuses our outbound policy toward node-3 on node-1"
kill -TERM "${AGENT_PID[node-1]}"
wait "${AGENT_PID[node-1]}" 2>/dev/null || true
ipn node-1 xfrm policy list dir out | awk -v d="$N3/32" '$1 == "src" && $4 == d && $6 ~ /^(4|ipencap|ipip)$/ {print $2}' \
    | while read -r s; do ipn node-1 xfrm policy delete dir out src "$s" dst "$N3/32" proto 4; done
ipn node-1 xfrm policy add dir out src 0.0.0.0/0 dst "$N3/32" proto 4 priority 100
log_from=$(($(wc -l <"$tmp/agent-node-1.log") + 1))
E2E_LEASE_TTL=20 agent_start node-1
# refused_reported: node-1's status, or its agent's log since the restart,
# names node-3 (or its address) on a line that says what went wrong.
refused_reported() {
    { status node-1 2>&1; tail -n +"$log_from" "$tmp/agent-node-1.log"; } \
        | grep -Ei "(node-3|$N3).*(refus|exist|not ours|foreign|block)|(refus|exist|not ours|foreign|block).*(node-3|$N3)"
}
round_start 4-foreign
reach "p1 -> p2 answered after node-1's agent restarted" 30 p1 "$ip2"
wait_until 20 "node-1 reports the refused policy toward node-3" refused_reported || true
blocked "p1 -> p3 blocked while the foreign policy stands" p1 "$ip3"
round_end
esp_seen "$N1" "$N2"
refused_reported | head -3 | cut -c1-240 | indent || true
check_match "the foreign policy is still there (never changed)" \
    "$(ipn node-1 xfrm policy list dir out)" 'priority 100 '
ipn node-1 xfrm policy delete dir out src 0.0.0.0/0 dst "$N3/32" proto 4
round_start 4-recovered
reach "foreign policy removed: p1 -> p3 answered again" 20 p1 "$ip3"
round_end
esp_seen "$N1" "$N3"
case_end node-1 node-3

# ------------------------------------------------------------------ case 5
case_begin "5. config record deleted, node-3 rebooted"
ectl del /calico/ipsec/v1/config >/dev/null
kill -TERM "${AGENT_PID[node-3]}"
wait "${AGENT_PID[node-3]}" 2>/dev/null || true
ipn node-3 xfrm state flush
ipn node-3 xfrm policy flush
nsx node-3 nft delete table inet calico_ipsec 2>/dev/null || true
ip netns del "${E2E_NS_PREFIX}p3"
rm -rf "$tmp/agreement-node-3"
check "node-3 holds no nft table before its agent starts" eval "! ip netns exec ${E2E_NS_PREFIX}node-3 nft list table inet calico_ipsec"
round_start 5-reboot
E2E_LEASE_TTL=4 agent_start node-3
wait_until 10 "node-3's agent puts the nft table back (config record missing)" \
    nsx node-3 nft list table inet calico_ipsec || true
if out=$(cni_add node-3 p5 2>&1); then
    info "ADD on node-3 succeeded with the config record missing: its pod's traffic must be encrypted"
    reach "p5 -> p1 answered, encrypted" 20 p5 "$ip1"
    p5_ok=1
else
    check_match "ADD on node-3 refused, naming the missing config record" "$out" '/calico/ipsec/v1/config'
    p5_ok=0
fi
if nsx node-3 ping -n -c 3 -i 0.3 -W 2 "$ip1" >/dev/null 2>&1; then h=delivered; else h=blocked; fi
info "node-3's host -> p1 ($ip1): $h"
round_end
[[ $p5_ok == 0 ]] || esp_seen "$N1" "$N3"
[[ $h == blocked ]] || esp_seen "$N1" "$N3"
case_end node-3

info "the cases took $((SECONDS - t_start))s"
daemons_stop
e2e_finish
