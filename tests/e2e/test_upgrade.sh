#!/bin/bash
# End-to-end: a rolling upgrade from the previous release (E2E_PREV_BIN,
# built by `make prev-build`) to this one (CALICO_IPSEC), under traffic.
#
# Three nodes, real etcd, two managers. The previous release does
# everything first: `keys init`, the agents, the managers, the CNI plugin
# (each node has a plugin file of its own), `enable` to enforce. Then, one
# node at a time as a DaemonSet rolls, each node's agent is stopped
# (SIGTERM), its plugin file replaced by rename with this release's, and
# this release's agent started; the managers roll between node-1 and
# node-2, a standby first, then the leader:
#
#   old managers, node-1 new, node-2 and node-3 old: a new pod on node-1
#     (this release's plugin) and one on node-3 (the previous one), CHECK of
#     an older pod through the new plugin, a key rotation (the previous
#     release's CLI), node-1 (new agent) takes a new incarnation;
#   new managers, node-1 new, node-2 and node-3 old: a manager of this
#     release leads;
#   new managers, node-1 and node-2 new, node-3 old: a key rotation (this
#     release's CLI), node-3 (old agent) takes a new incarnation, a new pod
#     on node-3 (the previous release's plugin);
#   every node new: DEL of a pod the previous plugin made, a rotation, a
#     new pod on node-3, and every agent, manager and plugin file is this
#     release's binary.
#
# A new incarnation is forced as test_heal.sh does: the agent is stopped,
# the node's ledger removed, the agent started again; it can vouch for none
# of its SAs and moves every peer to new ones, make-before-break.
#
# Throughout: ICMP echo at 100/s p1→p2, p2→p3 and p3→p1 (every pair of
# nodes), counted by traffic.py; the whole wire (the bridge) captured.
# Asserts: 0 packets with a pod address in clear and 0 clear IPIP on the
# wire; 0 echoes lost (shown per step); after each step every node's own
# `status` (by the binary its agent runs) is enforce, the expected epoch
# alone, every peer's SAs and policies in place, nothing pending, and
# `status --cluster` (both releases' CLIs) agrees: 3 live nodes, all in
# enforce, the epoch installed and sent with on all, none behind; after a
# new incarnation every peer knows it; new pods get the same MTU from both
# plugins and reach pods on the other nodes. The checks are black-box: they
# read no record of calico-ipsec's, only what the CLIs, the kernel and the
# wire say (the set-up shortens the overlap in the config record, as every
# suite's does).
# Most helpers run through check and wait_until, which shellcheck cannot follow.
# shellcheck disable=SC2317
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

e2e_init

e2e_bin
new=$bin
old=${E2E_PREV_BIN:-}
if [[ -z $old || ! -x $old ]]; then
    fail "E2E_PREV_BIN '${old:-<unset>}' is not the previous release's binary: build it with 'make prev-build' and pass E2E_PREV_BIN=\$PWD/target/prev-bin/calico-ipsec (make e2e does both)"
    e2e_finish
fi
if [[ $(realpath "$old") == "$(realpath "$new")" ]]; then
    fail "E2E_PREV_BIN and CALICO_IPSEC are the same file ($old): nothing would be upgraded"
    e2e_finish
fi
info "previous release: $old ($(sha256sum <"$old" | cut -c1-12))"
info "this release:     $new ($(sha256sum <"$new" | cut -c1-12))"
suite_start=$SECONDS
# rel BIN: which release BIN is, for the messages.
rel() { if [[ $1 == "$old" ]]; then echo old; else echo new; fi; }

tmp=$(mktemp -d)
daemon_cluster_up "$tmp" "$old"
# No shared plugin: each node has its own file, as each node has its own
# /opt/cni/bin; an ADD that did not name its node's would find none.
rm -f "$tmp/bin/calico-ipsec"
E2E_LEASE_TTL=20

# What each node runs: its agent's binary and its plugin file's origin.
declare -A NODE_BIN
# plugin_install NODE BIN: BIN becomes NODE's plugin file by rename, as the
# init container puts it in /opt/cni/bin (an ADD running finishes on the
# file it started with).
plugin_install() {
    mkdir -p "$tmp/plugins/$1"
    cp "$2" "$tmp/plugins/$1/.calico-ipsec.tmp"
    mv -f "$tmp/plugins/$1/.calico-ipsec.tmp" "$tmp/plugins/$1/calico-ipsec"
}
# agent_on NODE BIN: NODE's agent, running BIN.
agent_on() {
    NODE_BIN[$1]=$2
    E2E_BIN=$2 agent_start "$1"
}
agent_stop() {
    kill -TERM "${AGENT_PID[$1]}" 2>/dev/null || true
    wait "${AGENT_PID[$1]}" 2>/dev/null || true
}
manager_stop() {
    kill -TERM "${MANAGER_PID[$1]}" 2>/dev/null || true
    wait "${MANAGER_PID[$1]}" 2>/dev/null || true
}
# The CNI chain of NODE, with the plugin file NODE holds now.
pod_start() { CNI_BIN_PATH="/usr/lib/cni:$tmp/plugins/$1" cni_add "$1" "$2"; }
pod_check() { CNI_BIN_PATH="/usr/lib/cni:$tmp/plugins/$1" cni_check "$1" "$2"; }
pod_stop() { CNI_BIN_PATH="/usr/lib/cni:$tmp/plugins/$1" cni_del "$1" "$2"; }
pod_mtu() { ipn "$1" link show eth0 | sed -n 's/.* mtu \([0-9]*\) .*/\1/p'; }
# reaches POD IP: five echoes from POD to IP, all answered.
reaches() { nsx "$1" ping -c 5 -i 0.2 -W 2 "$2" | grep -q ' 0% packet loss'; }

# node_status NODE: NODE's own status, read by the binary its agent runs.
node_status() {
    nsx "$1" "${NODE_BIN[$1]}" status --config "$CNI_CONFLIST_DIR/$1.conflist" --json
}
# node_ok NODE EPOCH: enforce, EPOCH the only epoch and the active one,
# both peers' SAs and policies in place, nothing pending, no problem.
node_ok() {
    node_status "$1" 2>/dev/null | jq -e --argjson e "$2" '
        .phase == "enforce" and .active_epoch == $e and .installed_epochs == [$e]
        and .pending_changes == 0 and (.problems | length) == 0 and (.peers | length) == 2
        and all(.peers[]; .sa_out == "ok" and .sa_in == "ok" and .policy_out == "ok" and .policy_in == "ok")' >/dev/null
}
cluster_status() { nsx wire "$1" status --cluster --etcd-endpoints "$ETCD_ENDPOINTS" "${@:2}"; }
# cluster_ok BIN EPOCH: BIN's `status --cluster` has 3 live nodes, all in
# enforce, EPOCH the only epoch, active, installed and sent with on all 3,
# no node behind, none without an agent, nothing unreadable or unprotected.
cluster_ok() {
    cluster_status "$1" --json 2>/dev/null | jq -e --argjson e "$2" '
        .phase == "enforce" and .target == "enforce" and .live_nodes == 3 and .phases == {"enforce": 3}
        and [.epochs[] | [.epoch, .state, .installed, .sending]] == [[$e, "active", 3, 3]]
        and .behind == [] and .not_following == [] and .unreadable == [] and .unprotected == {}' >/dev/null
}
all_ok() {
    local n
    for n in "${NODES[@]}"; do node_ok "$n" "$1" || return 1; done
    cluster_ok "$new" "$1"
}
# settle LABEL EPOCH: wait until every node and both CLIs' cluster view say
# the cluster is enforced on EPOCH alone; on failure, show what they say.
settle() {
    local label=$1 e=$2 t0=$SECONDS n
    if wait_until 120 "$label: every node enforces with epoch $e alone, nothing pending (status, status --cluster)" all_ok "$e"; then
        info "$label: settled in $((SECONDS - t0)) s"
    else
        for n in "${NODES[@]}"; do
            info "$n ($(rel "${NODE_BIN[$n]}")) status:"
            nsx "$n" "${NODE_BIN[$n]}" status --config "$CNI_CONFLIST_DIR/$n.conflist" 2>&1 | indent || true
            grep -E ' (WARN|ERROR) ' "$tmp/agent-$n.log" | tail -4 | cut -c1-300 | indent || true
        done
        info "status --cluster:"
        cluster_status "$new" 2>&1 | indent || true
    fi
    check "$label: the previous release's status --cluster agrees" cluster_ok "$old" "$e"
}
# rotate BIN EPOCH: `keys rotate` with BIN's CLI, to EPOCH.
rotate() {
    mark "rotation to epoch $2 ($(rel "$1") CLI)"
    check "keys rotate to epoch $2 with the $(rel "$1") release's CLI" \
        nsx wire "$1" keys rotate --etcd-endpoints "$ETCD_ENDPOINTS" --kek-file "$tmp/kek"
}
incarnation() { node_status "$1" | jq -r .incarnation; }
inc_above() { [[ $(incarnation "$1") -gt $2 ]]; }
# peers_know NODE INC: every other node's status names NODE at incarnation INC.
peers_know() {
    local p
    for p in "${NODES[@]}"; do
        [[ $p == "$1" ]] && continue
        node_status "$p" | jq -e --arg n "$1" --argjson i "$2" \
            '[.peers[] | select(.name == $n) | .incarnation] == [$i]' >/dev/null || return 1
    done
}
# reincarnate NODE EPOCH: NODE's agent stopped, its ledger lost, the same
# binary started again: NODE takes a new incarnation; every peer follows.
reincarnate() {
    local n=$1 inc0 inc1
    mark "$n ($(rel "${NODE_BIN[$n]}")) loses its ledger"
    inc0=$(incarnation "$n")
    agent_stop "$n"
    rm -f "$tmp/state-$n/node/ledger"
    agent_on "$n" "${NODE_BIN[$n]}"
    wait_until 60 "$n ($(rel "${NODE_BIN[$n]}") agent) takes a new incarnation after losing its ledger" inc_above "$n" "$inc0" || true
    inc1=$(incarnation "$n")
    info "$n: incarnation $inc0 -> $inc1"
    wait_until 60 "both peers of $n know its incarnation $inc1" peers_know "$n" "$inc1" || true
    settle "$n's new incarnation" "$2"
}
# roll_node NODE: the DaemonSet's pod on NODE replaced: the old agent
# stopped (SIGTERM: it leaves the kernel and its lease), this release's
# plugin file put in place, this release's agent started.
roll_node() {
    mark "$1 rolled to this release"
    info "rolling $1 to this release"
    agent_stop "$1"
    plugin_install "$1" "$new"
    agent_on "$1" "$new"
}
# leader: the manager that leads, as `status --cluster` says.
leader() { cluster_status "$new" --json 2>/dev/null | jq -r .manager | sed -n 's/^manager \([^ ]*\) .*/\1/p'; }
new_leads() { [[ $(leader) == new-* ]]; }
# mark STEP: a step's start, for the per-step echo counts, and its time.
mark() {
    echo "$(now) $*" >>"$tmp/marks"
    info "[$((SECONDS - suite_start)) s] $*"
}

# ----------------------------------------------- the previous release only
for n in "${NODES[@]}"; do
    plugin_install "$n" "$old"
    agent_on "$n" "$old"
done
E2E_BIN=$old manager_start old-a
E2E_BIN=$old manager_start old-b
live3() { [[ $(cluster_status "$old" --json | jq .live_nodes) == 3 ]]; }
wait_until 60 "three agents are live (status --cluster)" live3 || true
for i in 1 2 3; do check "pod p$i on node-$i (previous release's plugin)" pod_start "node-$i" "p$i"; done
ip1=$(pod_ip p1) ip2=$(pod_ip p2)
mtu=$(pod_mtu p1)
info "pod MTU from the previous release's plugin: $mtu"
info "[$((SECONDS - suite_start)) s] enable"
check "calico-ipsec enable --wait (previous release)" \
    nsx wire "$old" enable --etcd-endpoints "$ETCD_ENDPOINTS" --wait --timeout-seconds 180
settle "previous release everywhere" 1

# From here on: the whole wire (the bridge) captured, echo on every pair
# of nodes. What is not ESP is kept for wire_clear; ESP only counted (kept
# whole, a run's 100,000 ESP packets would take minutes to read under TCG).
cap_start wire br0 "$tmp/wire.pcap" 256 'not esp'
clear_cap=$CAP_PID
cap_start wire br0 "$tmp/esp.pcap" 40 esp
esp_cap=$CAP_PID
declare -A PING_PID
for pair in 12 23 31; do
    a=${pair:0:1} b=${pair:1:1}
    ip netns exec "${E2E_NS_PREFIX}p$a" python3 "$here/traffic.py" ping "$(pod_ip "p$b")" \
        "$tmp/ping-$pair.json" 100 2>"$tmp/ping-$pair.err" &
    PING_PID[$pair]=$!
done
mark "traffic started"
sleep 3

# ------------------------------ node-1 new, old managers, node-2/3 old
roll_node node-1
settle "node-1 new, node-2 and node-3 old, old managers" 1
check "CHECK of p1 (made by the previous plugin) through this release's plugin" pod_check node-1 p1
check "new pod p4 on node-1 (this release's plugin)" pod_start node-1 p4
check "new pod p5 on node-3 (the previous release's plugin)" pod_start node-3 p5
ip4=$(pod_ip p4) ip5=$(pod_ip p5)
check_eq "p4's MTU (this release's plugin) equals the previous plugin's" "$(pod_mtu p4)" "$mtu"
check_eq "p5's MTU (the previous plugin, mixed cluster)" "$(pod_mtu p5)" "$mtu"
check "p4 (node-1, new) reaches p5 (node-3, old)" reaches p4 "$ip5"
check "p5 (node-3, old) reaches p2 (node-2, old)" reaches p5 "$ip2"
check "p4 (node-1, new) reaches p2 (node-2, old)" reaches p4 "$ip2"
rotate "$old" 2
settle "rotation under old managers, node-1 new" 2
reincarnate node-1 2

# -------------------------------------------------- the managers roll
first=$(leader)
info "leading manager: ${first:-unknown}"
standby="old-a"
[[ $first == old-a ]] && standby="old-b"
mark "managers rolled"
manager_stop "$standby"
E2E_BIN=$new manager_start new-a
manager_stop "${first:-old-b}"
E2E_BIN=$new manager_start new-b
wait_until 60 "a manager of this release leads" new_leads || true
info "leading manager: $(leader)"

# ------------------------------ node-1/2 new, new managers, node-3 old
roll_node node-2
settle "node-1 and node-2 new, node-3 old, new managers" 2
rotate "$new" 3
settle "rotation under new managers, node-3 old" 3
reincarnate node-3 3
check "new pod p6 on node-3 (the previous release's plugin, new managers)" pod_start node-3 p6
check_eq "p6's MTU" "$(pod_mtu p6)" "$mtu"
check "p6 (node-3, old) reaches p4 (node-1, new)" reaches p6 "$ip4"

# --------------------------------------------------- this release only
roll_node node-3
settle "this release everywhere" 3
check "DEL of p5 (made by the previous plugin) through this release's plugin" pod_stop node-3 p5
rotate "$new" 4
settle "rotation, this release everywhere" 4
check "new pod p7 on node-3 (this release's plugin)" pod_start node-3 p7
check_eq "p7's MTU" "$(pod_mtu p7)" "$mtu"
check "p7 (node-3) reaches p1 (node-1)" reaches p7 "$ip1"
check "p7 (node-3) reaches p2 (node-2)" reaches p7 "$ip2"
want=$(realpath "$new")
for n in "${NODES[@]}"; do
    check_eq "$n's agent runs this release's binary" "$(readlink "/proc/${AGENT_PID[$n]}/exe")" "$want"
    check "$n's plugin file is this release's binary" cmp -s "$tmp/plugins/$n/calico-ipsec" "$new"
done
for m in new-a new-b; do
    check_eq "manager $m runs this release's binary" "$(readlink "/proc/${MANAGER_PID[$m]}/exe")" "$want"
done
sleep 2

# ----------------------------------------------------------- the count
mark "traffic stopped"
for pair in 12 23 31; do kill -TERM "${PING_PID[$pair]}" 2>/dev/null || true; done
for pair in 12 23 31; do wait "${PING_PID[$pair]}" 2>/dev/null || true; done
CAP_PID=$clear_cap cap_stop
CAP_PID=$esp_cap cap_stop
for pair in 12 23 31; do
    a=${pair:0:1} b=${pair:1:1}
    sent=$(jq '.sent | length' "$tmp/ping-$pair.json")
    lost=$(jq '.lost | length' "$tmp/ping-$pair.json")
    info "echo p$a→p$b: $sent sent, $lost lost; per step:"
    python3 "$here/traffic.py" report "$tmp/ping-$pair.json" "$tmp/marks" | indent
    check_ge "echoes sent p$a→p$b (100/s through the whole upgrade)" "$sent" 1000
    check_eq "echoes lost p$a→p$b over the whole upgrade" "$lost" 0
done
clear=$(wire_clear "$tmp/wire.pcap")
ipip=$(wire_count "$tmp/wire.pcap" IPIP)
read -r kept dropped < <(cap_stats "$tmp/wire.pcap")
read -r esp esp_dropped < <(cap_stats "$tmp/esp.pcap")
info "on the wire over the whole upgrade: $esp ESP, $kept other packets ($clear with a pod address in clear, $ipip clear IPIP)"
check_eq "packets with a pod address in clear on the wire, over the whole upgrade" "$clear" 0
check_eq "clear IPIP packets on the wire, over the whole upgrade" "$ipip" 0
check_eq "packets other than ESP the kernel dropped before the capture saw them" "$dropped" 0
check_ge "ESP packets on the wire (echoes and replies on the three pairs; $esp_dropped not captured)" "$esp" 3000
if [[ $clear != 0 ]]; then
    tcpdump -r "$tmp/wire.pcap" -nn -tttt 'net 10.244.0.0/16' 2>/dev/null | head -8 | indent
fi
for n in "${NODES[@]}"; do
    check_eq "xfrm_stat counters on $n all 0" "$(xfrm_errors "$n")" ""
done
for f in "$tmp"/agent-*.log "$tmp"/manager-*.log; do
    if grep -q ' ERROR ' "$f"; then
        info "$(basename "$f" .log) logged errors:"
        { grep ' ERROR ' "$f" | cut -c29-300 | sort | uniq -c | sort -rn | head -5 | indent; } || true
    fi
done
info "the upgrade suite took $((SECONDS - suite_start)) s"
daemons_stop
e2e_finish
