#!/bin/bash
# End-to-end: faults while the cluster is enforced and traffic flows.
#
# Three nodes with agents, two managers, phase enforce (reached through the
# managers), ICMP echo at 100/s from a pod on node-1 to one on node-2.
#   1. The leading manager is killed (-9) in the middle of a rotation: the
#      other takes the lead and finishes it.
#   2. etcd is stopped for 30 s: traffic goes on with no echo lost, the
#      agents report stale (/healthz, /metrics) and change nothing; once
#      etcd is back they are current again and a rotation completes.
#   3. node-2's agent is killed (-9) 20 times while it converges a rotation,
#      and restarted: afterwards every node holds exactly the desired states
#      and policies (nothing leaked, nothing pending) and traffic flows.
#   4. node-4 joins and node-3 leaves while node-1 and node-2 exchange
#      traffic: no echo between them is lost; node-4 gets SAs with node-1
#      and node-2 and its pod reaches node-1's over ESP; node-3's agent,
#      stopped with SIGTERM, leaves its states in place; while Calico
#      still lists node-3, a rotation waits for its key (the leader names
#      it) until the operator excludes it, then completes; node-3's SAs go
#      from the others once its records leave etcd.
#   5. A deleted epoch comes back, still active (etcd restored from an
#      older backup): node-1 and node-2 take new incarnations, so none of
#      the keys they held for it before comes back; the manager retires it;
#      no echo is lost and nothing crosses in clear.
#   6. etcd is wiped and re-initialised (Calico's records loaded again with
#      a new clusterGUID, `keys init` with a new KEK, `enable`): while the
#      config record is gone, ADDs fail and the kernel is left as it is;
#      once it is back at phase off, the nodes hold enforce (a record that
#      does not follow the one they saw never lowers the phase) and move to
#      the new epoch; `enable` takes the cluster back to enforce. No key of
#      before comes back, nothing crosses in clear, and pings flow again.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

e2e_init

e2e_bin
tmp=$(mktemp -d)
daemon_cluster_up "$tmp" "$bin"
rotate() { nsx wire "$bin" keys rotate --etcd-endpoints "$ETCD_ENDPOINTS" --kek-file "$tmp/kek" >/dev/null; }
newest_epoch() { ipsec_epochs | jq '[.[].e] | max'; }
leader() { ectl get --print-value-only /calico/ipsec/v1/manager/leader; }
# settled NODE: `status` shows nothing pending and every peer's SAs and policies in place.
settled() {
    local out
    out=$(nsx "$1" "$bin" status --nodename "$1" --json) || return 1
    [[ $(jq '.pending_changes' <<<"$out") == 0 ]]
}
ping_report() { # NAME: "sent lost" of a finished traffic.py ping
    jq -r '"\(.sent | length) \(.lost | length)"' "$tmp/ping-$1.json"
}
# traffic_stop NAME: stops the capture and the ping of case NAME; sets sent and lost.
traffic_stop() {
    cap_stop
    kill -TERM "$ping_pid"; wait "$ping_pid" || true
    read -r sent lost <<<"$(ping_report "$1")"
}

for n in "${NODES[@]}"; do agent_start "$n"; done
manager_start mgr-a
manager_start mgr-b
wait_until 60 "three agents publish a leased status" three_live || true
check "pod p1 on node-1" cni_add node-1 p1
check "pod p2 on node-2" cni_add node-2 p2
ip1=$(pod_ip p1) ip2=$(pod_ip p2)
check "calico-ipsec enable --wait" nsx wire "$bin" enable --etcd-endpoints "$ETCD_ENDPOINTS" --wait --timeout-seconds 180

# ------------------------------------------------ 1. leader killed mid-rotation
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/ping-1.json" 100 2>/dev/null &
ping_pid=$!
sleep 1
# A 6 s overlap, so that the kill surely lands before the rotation ends.
set_overlap() {
    ipsec_cfg | jq -c --argjson o "$1" '.overlap_seconds = $o' | ectl put /calico/ipsec/v1/config >/dev/null
}
set_overlap 6
first=$(leader)
rotate
kill -KILL "${MANAGER_PID[$first]}"
target=$(newest_epoch)
at_kill=$(ipsec_epochs)
info "killed the leader $first; epochs then: $at_kill"
check "the rotation was not over when the leader died" test "$at_kill" != "[{\"e\":$target,\"s\":\"active\"}]"
wait_until 90 "the other manager finishes the rotation (epoch $target the only one)" only_epoch "$target" || true
second=$(leader)
check "the lead passed to the other manager ($first → $second)" test "$second" != "$first" -a -n "$second"
set_overlap 2
manager_start "$first"
sleep 1
kill -TERM "$ping_pid"; wait "$ping_pid" || true
read -r sent lost <<<"$(ping_report 1)"
info "during the leader's death: $sent echoes sent, $lost lost"
check_eq "echoes lost while the leader died mid-rotation" "$lost" 0

# ------------------------------------------------ 2. etcd away for 30 s
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/ping-2.json" 100 2>/dev/null &
ping_pid=$!
sleep 1
before=$(ip netns exec "${E2E_NS_PREFIX}node-1" ip xfrm state | grep -c '^src' || true)
etcd_stop
t0=$SECONDS
sleep 8
check_match "node-1's agent reports stale on /healthz" "$(nsx node-1 curl -s http://127.0.0.1:9094/healthz || true)" 'stale'
check_match "node-1's agent: calico_ipsec_etcd_reachable 0" "$(nsx node-1 curl -s http://127.0.0.1:9094/metrics || true)" 'calico_ipsec_etcd_reachable 0'
sleep $((30 - (SECONDS - t0)))
during=$(ip netns exec "${E2E_NS_PREFIX}node-1" ip xfrm state | grep -c '^src' || true)
check_eq "node-1's states untouched while etcd was away" "$during" "$before"
etcd_start
info "etcd was away for $((SECONDS - t0)) s"
kill -TERM "$ping_pid"; wait "$ping_pid" || true
read -r sent lost <<<"$(ping_report 2)"
info "while etcd was away: $sent echoes sent, $lost lost"
check_eq "echoes lost while etcd was away" "$lost" 0
wait_until 60 "node-1's agent is current again" \
    bash -c "ip netns exec ${E2E_NS_PREFIX}node-1 curl -s http://127.0.0.1:9094/metrics | grep -q 'calico_ipsec_etcd_reachable 1'"
rotate
target=$(newest_epoch)
wait_until 90 "after etcd's return a rotation completes (epoch $target)" only_epoch "$target" || true

# ------------------------------------------------ 3. agent killed -9, 20 times
accepted=0
for i in $(seq 1 20); do
    # Refused while the last one is still pending (keys rotate waits for no
    # one): the kills go on either way.
    rotate 2>/dev/null && accepted=$((accepted + 1))
    # Somewhere inside node-2's convergence of the new epoch.
    sleep "0.$((RANDOM % 6))"
    kill -KILL "${AGENT_PID[node-2]}" 2>/dev/null || true
    wait "${AGENT_PID[node-2]}" 2>/dev/null || true
    agent_start node-2
done
info "$accepted of 20 rotations accepted (the others found an epoch still pending)"
check_ge "rotations accepted among the kills" "$accepted" 2
target=$(newest_epoch)
wait_until 180 "after 20 kills the rotations complete (epoch $target the only one)" only_epoch "$target" || true
for n in "${NODES[@]}"; do
    wait_until 30 "$n: nothing pending" settled "$n" || true
    out=$(nsx "$n" "$bin" status --nodename "$n" --json)
    states=$(ip netns exec "$E2E_NS_PREFIX$n" ip xfrm state | grep -c '^src' || true)
    pols=$(ip netns exec "$E2E_NS_PREFIX$n" ip xfrm policy | grep -c '^src' || true)
    check_eq "$n: exactly 4 states in the kernel (2 peers × in/out × 1 epoch)" "$states" 4
    check_eq "$n: exactly 5 policies in the kernel (2 peers × in/out, the IPIP catch-all)" "$pols" 5
    check_eq "$n: installed epochs" "$(jq -c .installed_epochs <<<"$out")" "[$target]"
done
ls "$tmp/state-node-2/node" | indent
check_eq "node-2's state directory holds no temporary files" \
    "$(find "$tmp/state-node-2" -name '*.tmp*' | grep -c . || true)" 0
check "p1 → p2 ping after the kills" nsx p1 ping -c 3 -i 0.2 -W 2 "$ip2"

# ------------------------------------------------ 4. node-4 joins, node-3 leaves
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/ping-4.json" 100 2>/dev/null &
ping_pid=$!
sleep 1
node_join node-4 10.0.0.14 10.244.77.0 10.244.77.0/26
agent_start node-4
check "pod p4 on node-4" cni_add node-4 p4
# A graceful shutdown leaves the data plane as it is.
kill -TERM "${AGENT_PID[node-3]}"
wait "${AGENT_PID[node-3]}" 2>/dev/null || true
held3=$(ipn node-3 xfrm state | grep -c '^src' || true)
check_ge "node-3's agent stopped by SIGTERM left its states in place" "$held3" 4
check_ge "... and its outbound policies" "$(ipn node-3 xfrm policy | grep -c 'dir out' || true)" 2
# Still listed by Calico, node-3 publishes no key of a new epoch, and a node
# installs an epoch only once every listed peer has: the rotation waits, and
# the leader names node-3. Excluded by the operator, node-3 holds nothing
# back: the others rotate, with no echo between them lost.
rotate
held=$(newest_epoch)
named() { grep -h "epoch $held pending" "$tmp"/manager-*.log | grep -q 'no live agent to publish a key for it.*node-3'; }
wait_until 30 "the leader names node-3 (no live agent) as what holds epoch $held back" named || true
sleep 2
check_match "epoch $held still pending while node-3 is listed without an agent" "$(ipsec_epochs)" "\"e\":$held,\"s\":\"pending\""
ipsec_cfg | jq -c '.excluded_nodes = ["node-3"]' | ectl put /calico/ipsec/v1/config >/dev/null
wait_until 90 "node-3 excluded: epoch $held active, the older ones deleted" only_epoch "$held" || true
target=$held
node_leave node-3
ipsec_cfg | jq -c 'del(.excluded_nodes)' | ectl put /calico/ipsec/v1/config >/dev/null
has_sa() { # NODE PEER_IP: an ESP state toward PEER_IP exists on NODE
    ip netns exec "$E2E_NS_PREFIX$1" ip xfrm state | grep -q "^src ${NODE_IP[$1]} dst $2"
}
no_sa() { ! has_sa "$@"; }
wait_until 60 "node-1 holds SAs toward node-4" has_sa node-1 10.0.0.14 || true
wait_until 60 "node-4 holds SAs toward node-1 and node-2" bash -c \
    "ip netns exec ${E2E_NS_PREFIX}node-4 ip xfrm state | grep -q 'dst 10.0.0.11' && ip netns exec ${E2E_NS_PREFIX}node-4 ip xfrm state | grep -q 'dst 10.0.0.12'" || true
wait_until 60 "node-1 holds no SA toward node-3 once it left" no_sa node-1 10.0.0.13 || true
check "p4 (node-4) → p1 ping" nsx p4 ping -c 3 -i 0.2 -W 2 "$ip1"
cap_start node-4 eth0 "$tmp/node4.pcap"
pinged=$(nsx p4 ping -c 10 -i 0.2 -W 5 "$ip1" 2>&1 || true)
sleep 0.5
cap_stop
esp4=$(cap_ipv4 "$tmp/node4.pcap" | awk '$1 == "ESP" && $3 == "10.0.0.14"' | grep -c . || true)
check_ge "node-4's traffic on its wire is ESP" "$esp4" 5
check_eq "no plaintext IPIP from node-4" "$(cap_ipv4 "$tmp/node4.pcap" | awk '$1 == "IPIP"' | grep -c . || true)" 0
if ((esp4 < 5)); then
    info "ping from p4 during the capture:"
    indent <<<"$pinged"
    cap_ipv4 "$tmp/node4.pcap" | head -5 | indent
fi
sleep 1
kill -TERM "$ping_pid"; wait "$ping_pid" || true
read -r sent lost <<<"$(ping_report 4)"
info "while node-4 joined and node-3 left: $sent echoes sent, $lost lost"
check_eq "echoes p1 → p2 lost while node-4 joined and node-3 left" "$lost" 0

# ------------------------------------------------ 5. an epoch restored
# An etcd restored from an older backup brings back a deleted epoch, still
# active: the same secret. Its keys must not come back with it: every node
# remembers the epochs that left its kernel in its incarnation, and takes a
# new incarnation (new keys) before it creates an outbound SA of it again.
old=$target
saved=$(ectl get --print-value-only "/calico/ipsec/v1/epochs/$old")
spi_byte=$(printf '0x%02x' $((old % 255 + 1)))
keys_of() { # NODE: the AEAD keys of its states of epoch $old
    ipn "$1" xfrm state | awk -v b="$spi_byte" '/^src/ {e = 0} $0 ~ "spi " b {e = 1} e && /aead/ {print $3}'
}
before_keys=$(for n in node-1 node-2; do keys_of "$n"; done | sort -u)
check_ge "epoch $old's keys read from the kernel" "$(grep -c . <<<"$before_keys")" 4
inc_of() { nsx "$1" "$bin" status --nodename "$1" --json | jq -r .incarnation; }
inc1=$(inc_of node-1) inc2=$(inc_of node-2)
rotate
target=$(newest_epoch)
wait_until 90 "epoch $target active, epoch $old deleted" only_epoch "$target" || true
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/ping-5.json" 100 2>/dev/null &
ping_pid=$!
cap_start wire w-node-1 "$tmp/restore.pcap"
sleep 1
# The managers would retire the older epoch at once (the overlap has long
# passed), before any node installs it: stopped, they let the nodes act on
# it as on any active epoch, which is what must not reuse a key.
for m in mgr-a mgr-b; do kill -TERM "${MANAGER_PID[$m]}" 2>/dev/null || true; done
for m in mgr-a mgr-b; do wait "${MANAGER_PID[$m]}" 2>/dev/null || true; done
ectl put "/calico/ipsec/v1/epochs/$old" "$saved" >/dev/null
has_old() { [[ $(ipn "$1" xfrm state | grep -c "spi $spi_byte") -ge 2 ]]; }
wait_until 60 "node-1 holds epoch $old's SAs again" has_old node-1 || true
wait_until 60 "node-2 holds epoch $old's SAs again" has_old node-2 || true
after_keys=$(for n in node-1 node-2; do keys_of "$n"; done | sort -u)
info "restored epoch $old: incarnations node-1 $inc1 → $(inc_of node-1), node-2 $inc2 → $(inc_of node-2)"
check_ge "restored epoch $old: SA keys in the kernel again" "$(grep -c . <<<"$after_keys")" 4
check_eq "restored epoch $old: keys used before that came back" \
    "$(comm -12 <(echo "$before_keys") <(echo "$after_keys") | grep -c . || true)" 0
manager_start mgr-a
manager_start mgr-b
wait_until 90 "the manager retires the restored epoch: epoch $target alone again" only_epoch "$target" || true
sleep 1
traffic_stop 5
info "while epoch $old came back and went: $sent echoes sent, $lost lost"
check_eq "echoes lost while a deleted epoch came back" "$lost" 0
check_eq "restored epoch: packets with a pod address in clear on node-1's port" \
    "$(cap_ipv4 "$tmp/restore.pcap" | awk '$3 ~ /^10\.244\./ || $4 ~ /^10\.244\./' | grep -c . || true)" 0

# ------------------------------------------------ 6. etcd wiped and re-initialised
# What an operator does after losing etcd without a backup: Calico's records
# come back (calico-node writes them again, with a new clusterGUID), then
# `keys init` (a new KEK, delivered to the nodes) and `enable`.
calico_dump() { # Calico's records (not ours) as the fixture's {key: value}
    ectl get --prefix /calico/ -w json | jq '[.kvs[]? | {key: (.key | @base64d), value: .value}
        | select(.key | test("^/calico/(resources|ipam)/")) | .value |= (@base64d | fromjson)] | from_entries'
}
all_keys() { # the AEAD keys of every state on node-1, node-2 and node-4
    for n in node-1 node-2 node-4; do ipn "$n" xfrm state | awk '/aead/ {print $3}'; done | sort -u
}
calico_dump | jq '(.[] | select(.kind? == "ClusterInformation") | .spec.clusterGUID) = "e2e-wiped-and-reinitialised"' >"$tmp/calico.json"
check_eq "Calico's records saved, with a new clusterGUID" \
    "$(jq -r '[.[] | select(.kind? == "ClusterInformation") | .spec.clusterGUID] | join(",")' "$tmp/calico.json")" \
    e2e-wiped-and-reinitialised
check_ge "Calico's Node resources saved" "$(jq '[.[] | select(.kind? == "Node")] | length' "$tmp/calico.json")" 3
keys_before=$(all_keys)
states_before=$(ipn node-1 xfrm state | grep -c '^src' || true)
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/ping-6.json" 100 2>/dev/null &
ping_pid=$!
cap_start wire w-node-1 "$tmp/wipe.pcap"
sleep 1
etcd_stop
rm -rf "$ETCD_DIR/data"
etcd_start
etcd_load_fixture "$tmp/calico.json"
# The agents resume their watches from revisions the new etcd has not
# reached: they must notice and read everything again.
gone() { grep -q 'the record is missing, but this node has seen the cluster initialised' "$tmp/agent-node-1.log"; }
wait_until 30 "node-1's agent sees the config record gone" gone || true
check_ge "node-1's agent noticed etcd's revision go back and read its prefixes again" \
    "$(grep -c 'below the one this watch delivered' "$tmp/agent-node-1.log" || true)" 1
sleep 2
if out=$(cni_add node-1 pw 2>&1); then ok=1; else ok=0; fi
ip netns del "${E2E_NS_PREFIX}pw" 2>/dev/null || true
check_eq "an ADD while the config record is gone fails" "$ok" 0
check_match "the ADD says why: the node has seen the cluster initialised" "$out" 'seen the cluster initialised'
check_eq "node-1's states untouched while the config record is gone" \
    "$(ipn node-1 xfrm state | grep -c '^src' || true)" "$states_before"
mv "$tmp/kek" "$tmp/kek.before-wipe"
check "keys init on the wiped etcd" nsx wire "$bin" keys init --kek-file "$tmp/kek"
ipsec_cfg | jq -c '.overlap_seconds = 2 | .rotation_interval_seconds = 0' | ectl put /calico/ipsec/v1/config >/dev/null
held() { [[ -n $(ectl get --print-value-only "/calico/ipsec/v1/nodes/$1" | jq -r '.held // empty') ]]; }
for n in node-1 node-2 node-4; do
    wait_until 60 "$n holds enforce although the new config says off" held "$n" || true
done
check_match "status --cluster names the held nodes" \
    "$(nsx wire "$bin" status --cluster --etcd-endpoints "$ETCD_ENDPOINTS" || true)" 'holds a stronger phase'
check_match "phase off in the new record: node-1's catch-all still drops clear pod packets" \
    "$(nsx node-1 nft list table inet calico_ipsec 2>&1 || true)" 'daddr @pools4 rt ipsec missing'
check "calico-ipsec enable --wait on the re-initialised cluster" \
    nsx wire "$bin" enable --etcd-endpoints "$ETCD_ENDPOINTS" --wait --timeout-seconds 180
not_held() { ! held "$1"; }
wait_until 30 "node-1 follows the new record again" not_held node-1 || true
check_eq "re-initialised: phase" "$(ipsec_cfg | jq -r .phase)" enforce
sleep 2
traffic_stop 6
info "while etcd was wiped and re-initialised: $sent echoes sent, $lost lost"
check_ge "echoes answered across the wipe" "$((sent - lost))" 1
keys_after=$(all_keys)
check_ge "re-initialised: SA keys in the kernel" "$(grep -c . <<<"$keys_after")" 4
check_eq "re-initialised: keys of before that came back" \
    "$(comm -12 <(echo "$keys_before") <(echo "$keys_after") | grep -c . || true)" 0
check_eq "wiped etcd: packets with a pod address in clear on node-1's port" \
    "$(cap_ipv4 "$tmp/wipe.pcap" | awk '$3 ~ /^10\.244\./ || $4 ~ /^10\.244\./' | grep -c . || true)" 0
check_match "re-initialised: p1 → p2 answers" \
    "$(ip netns exec "${E2E_NS_PREFIX}p1" ping -c 20 -i 0.1 -W 1 "$ip2" 2>&1 || true)" ' 0% packet loss'
check "re-initialised: a pod starts on node-1" cni_add node-1 p6

# No fault here touches the kernel: what the agents wrote after a kill, an
# etcd outage, a rotation or a peer's new incarnation is not drift, even
# when their own writes' notifications woke them (test_heal.sh shows real
# drift is still caught).
for n in node-1 node-2 node-3 node-4; do
    check_eq "agent $n logged no kernel drift (nothing but calico-ipsec touched the kernel)" \
        "$(grep -c 'drifted outside calico-ipsec' "$tmp/agent-$n.log" 2>/dev/null || true)" 0
done
for n in node-1 node-2 node-4; do
    if grep -q ' ERROR ' "$tmp/agent-$n.log"; then
        info "agent $n logged errors:"
        { grep ' ERROR ' "$tmp/agent-$n.log" | cut -c29-300 | sort | uniq -c | sort -rn | head -5 | indent; } || true
    fi
done
daemons_stop
e2e_finish
