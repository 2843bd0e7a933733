#!/bin/bash
# End-to-end: the data plane heals itself when the kernel loses or changes
# what calico-ipsec installed, and never sends a pod packet in clear
# meanwhile.
#
# Three nodes with agents and two managers, enforced. For each case,
# sequenced UDP datagrams at 200/s from p1 (node-1) to an echo in p2
# (node-2), and ICMP echo at 200/s from p2 to p3 (node-3), each datagram and
# echo counted by traffic.py; node-1's wire port is captured throughout.
#
# 1. `ip xfrm state flush` on node-2 (an operator, a restarting IPsec
#    daemon, a module reload): the agent notices through the kernel's XFRM
#    notifications, puts the states back under a new incarnation, logs and
#    counts the repair; every echo lost falls within 1 s per stream.
#    One outbound state of node-2 deleted by hand: node-2 moves to a new
#    incarnation make-before-break, so the stream whose SA is intact loses
#    nothing, and the other recovers within 1 s.
# 2. `ip xfrm policy flush` on node-1: the nftables guard drops what the
#    vanished outbound policies would have encrypted, so no packet with a
#    pod address crosses node-1's port in clear; the policies are back and
#    the echoes flow again within 1 s.
# 3. A foreign policy (another priority, no template: clear) put by hand in
#    the place of one of ours on node-3: reported by the agent, never
#    deleted; its traffic is dropped, not sent in clear; once the operator
#    removes it, ours is back within a second.
# 4. A foreign state put by hand under the SPI of one of ours on node-1
#    (the one its next incarnation takes, once one of its inbound SAs is
#    deleted): reported and refused, never deleted; once the operator
#    removes it, ours is back.
# 5. The agent of node-1 killed with SIGKILL repeatedly (E2E_HEAL_KILLS,
#    20 by default) at random points of its start and its convergence
#    while four rotations go on, and its ledger removed at three of the
#    kills (so it changes incarnation in the middle of a rotation): no echo
#    lost, nothing sent in clear, and afterwards every node holds exactly
#    the desired set (`status`: nothing to change).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

e2e_init

e2e_bin
tmp=$(mktemp -d)
daemon_cluster_up "$tmp" "$bin"
E2E_LEASE_TTL=20
for n in "${NODES[@]}"; do agent_start "$n"; done
manager_start mgr-a
manager_start mgr-b
wait_until 60 "three agents publish a leased status" three_live || true

check "pod p1 on node-1" cni_add node-1 p1
check "pod p2 on node-2" cni_add node-2 p2
check "pod p3 on node-3" cni_add node-3 p3
ip2=$(pod_ip p2) ip3=$(pod_ip p3)
check "calico-ipsec enable --wait" nsx wire "$bin" enable --etcd-endpoints "$ETCD_ENDPOINTS" --wait --timeout-seconds 180
check_eq "phase enforce" "$(ipsec_cfg | jq -r .phase)" enforce
guard=$(nsx node-1 nft list table inet calico_ipsec 2>&1 || true)
check_match "node-1's catch-all drops IPIP without ESP" "$guard" 'l4proto (4|ipip|ipencap) rt ipsec missing'
check_match "node-1's catch-all drops pod-addressed packets without ESP" "$guard" 'daddr @pools4 rt ipsec missing'

# streams_start CASE [NODE]: UDP p1→p2 (echoed) and ping p2→p3 at 200/s, and a capture
# of NODE's wire port (node-1 by default). streams_stop CASE: stop them.
ip netns exec "${E2E_NS_PREFIX}p2" python3 "$here/traffic.py" udp-echo 7777 2>"$tmp/udp-echo.err" &
E2E_DAEMON_PIDS+=("$!")
# The first datagram must find the echo bound (python starts slowly here).
echo_up() { ip netns exec "${E2E_NS_PREFIX}p2" ss -Hlun 'sport = :7777' | grep -q .; }
wait_until 20 "the UDP echo in p2 listens" echo_up || true
streams_start() {
    ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" udp "$ip2" 7777 "$tmp/$1-12.json" 200 2>"$tmp/$1-12.err" &
    PING12=$!
    ip netns exec "${E2E_NS_PREFIX}p2" python3 "$here/traffic.py" ping "$ip3" "$tmp/$1-23.json" 200 2>"$tmp/$1-23.err" &
    PING23=$!
    cap_start wire "w-${2:-node-1}" "$tmp/$1.pcap"
    sleep 2
}
streams_stop() {
    sleep 3
    kill -TERM "$PING12" "$PING23" 2>/dev/null || true
    wait "$PING12" "$PING23" 2>/dev/null || true
    cap_stop
}
# window FILE: "SENT LOST SPAN" where SPAN is the seconds between the first
# and the last lost echo's send time, plus one interval (0 when none lost).
window() {
    python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
t = dict((c, s) for c, s in d["sent"])
lost = sorted(t[c] for c in d["lost"] if c in t)
span = (lost[-1] - lost[0] + 0.005) if lost else 0
print(len(d["sent"]), len(lost), "%.3f" % span)
PY
}
# no_clear CASE [NODE]: no packet with a pod address, and no plain IPIP, on
# the port captured.
no_clear() {
    local clear ipip port="${2:-node-1}'s port"
    clear=$(cap_ipv4 "$tmp/$1.pcap" | awk '$3 ~ /^10\.244\./ || $4 ~ /^10\.244\./' | grep -c . || true)
    ipip=$(cap_ipv4 "$tmp/$1.pcap" | awk '$1 == "IPIP"' | grep -c . || true)
    check_eq "$1: packets with a pod address in clear on $port" "$clear" 0
    check_eq "$1: plaintext IPIP packets on $port" "$ipip" 0
    check_ge "$1: ESP packets on $port" "$(cap_ipv4 "$tmp/$1.pcap" | awk '$1 == "ESP"' | grep -c . || true)" 100
}
# lost_within_1s LABEL FILE: every echo FILE records as lost was sent within
# one second of the first; sets SENT and LOST.
lost_within_1s() {
    local span
    read -r SENT LOST span < <(window "$2")
    info "$1: $SENT sent, $LOST lost within ${span}s"
    check "$1: every echo lost within 1 s ($LOST lost over ${span}s)" \
        python3 -c "import sys; sys.exit(0 if $span <= 1.0 else 1)"
}
# slow_first CASE FILE...: true, after saying so and waiting for the nodes to
# converge, when this is a case's first run and one of its streams lost
# echoes over more than 1 s. The case then runs once more and its second run
# is the one checked. Under TCG on a busy 2-core host the guest stalls at
# times: in the logs of about 20 runs here, 3 had a window of 1.1-1.5 s where
# the usual is 0.2-0.6 s. A repair that is slow every time still fails; each run's
# capture is checked for clear traffic all the same.
slow_first() {
    local case=$1 f span slow=
    shift
    ((TRY == 1)) || return 1
    for f in "$@"; do
        read -r _ _ span < <(window "$f")
        python3 -c "import sys; sys.exit(0 if $span > 1.0 else 1)" && slow+="${slow:+, }$(basename "$f" .json): ${span}s"
    done
    [[ -n $slow ]] || return 1
    info "$case: lost over more than 1 s on the first run ($slow); once more, once every node has converged"
    for n in node-1 node-2 node-3; do
        wait_until 30 "$n converged before the second run" converged "$n" || true
    done
    return 0
}
metric() { nsx "$1" curl -sf http://127.0.0.1:9094/metrics | awk -v m="$2" '$1 == m {print $2}'; }
# converged NODE: `status` on NODE finds nothing to change.
converged() { nsx "$1" "$bin" status --nodename "$1" --json | jq -e '.pending_changes == 0' >/dev/null; }
one_epoch() { [[ $(ipsec_epochs | jq length) == 1 ]]; }

# E2E_HEAL_KILL_ONLY=1 runs only case 5 (E2E_HEAL_ROUNDS times): a quick
# way to reproduce a loss under kills.
if [[ -z ${E2E_HEAL_KILL_ONLY:-} ]]; then
# ---------------------------------------------------------------- 1. states
repairs0=$(metric node-2 calico_ipsec_kernel_repairs_total)
for TRY in 1 2; do
    streams_start flush-states
    info "ip xfrm state flush on node-2"
    ipn node-2 xfrm state flush
    streams_stop flush-states
    no_clear flush-states
    slow_first "state flush" "$tmp"/flush-states-{12,23}.json || break
done
for pair in 12 23; do
    lost_within_1s "state flush, echo p${pair:0:1}→p${pair:1:1}" "$tmp/flush-states-$pair.json"
    # Enough traffic to measure a window (TCG stalls the sender at times).
    check_ge "state flush: echoes sent p${pair:0:1}→p${pair:1:1}" "$SENT" 500
done
check_match "state flush: node-2's agent logged the repair, naming what was missing" \
    "$(grep 'drifted outside calico-ipsec' "$tmp/agent-node-2.log" || true)" 'missing (In|Out) state'
check_ge "state flush: calico_ipsec_kernel_repairs_total grew on node-2" \
    "$(metric node-2 calico_ipsec_kernel_repairs_total)" $((${repairs0%.*} + 1))

# ------------------------------------------------- 1b. one outbound state
# One outbound SA of node-2 (toward node-1) deleted by hand: node-2 cannot
# vouch for it and moves to a new incarnation, but keeps sending to node-3
# on its current SA until node-3 acknowledges (make-before-break).
n1=${NODE_IP[node-1]} n2=${NODE_IP[node-2]}
for TRY in 1 2; do
    streams_start lose-one
    inc0=$(nsx node-2 "$bin" status --nodename node-2 --json | jq -r .incarnation)
    spi=$(ipn node-2 xfrm state list src "$n2" dst "$n1" | awk '/proto esp spi/ {print $4; exit}')
    info "deleting node-2's outbound SA to node-1 (spi $spi)"
    ipn node-2 xfrm state delete src "$n2" dst "$n1" proto esp spi "$spi"
    streams_stop lose-one
    inc1=$(nsx node-2 "$bin" status --nodename node-2 --json | jq -r .incarnation)
    check_ge "one SA lost: node-2 moved to a new incarnation ($inc0 -> $inc1)" "$inc1" $((inc0 + 1))
    read -r sent lost span < <(window "$tmp/lose-one-23.json")
    info "one SA lost, echo 2→3 (its SA intact): $sent sent, $lost lost"
    check_eq "one SA lost: echoes lost p2→p3, handed over make-before-break" "$lost" 0
    no_clear lose-one
    slow_first "one SA lost" "$tmp/lose-one-12.json" || break
done
lost_within_1s "one SA lost, echo p1→p2 (its SA gone)" "$tmp/lose-one-12.json"
check_match "one SA lost: node-2's agent logged the hand-over" \
    "$(grep -c 'handing over between incarnations' "$tmp/agent-node-2.log" || true)" '^[1-9]'

# -------------------------------------------------------------- 2. policies
for TRY in 1 2; do
    streams_start flush-policies
    info "ip xfrm policy flush on node-1"
    ipn node-1 xfrm policy flush
    streams_stop flush-policies
    no_clear flush-policies
    slow_first "policy flush" "$tmp"/flush-policies-{12,23}.json || break
done
for pair in 12 23; do
    lost_within_1s "policy flush, echo p${pair:0:1}→p${pair:1:1}" "$tmp/flush-policies-$pair.json"
done
check_ge "policy flush: node-1 holds its outbound policies again" \
    "$(ipn node-1 xfrm policy list dir out | grep -c '^src' || true)" 2

# ------------------------------------------------------- 3. foreign policy
n3=${NODE_IP[node-3]} n2=${NODE_IP[node-2]}
streams_start foreign-policy node-3
info "a foreign policy (priority 100, no template) in place of node-3's 0.0.0.0/0 -> $n2 proto 4 out policy"
ipn node-3 xfrm policy update src 0.0.0.0/0 dst "$n2/32" proto 4 dir out priority 100
sleep 3
check_match "foreign policy: node-3's agent reports it" \
    "$(grep -c 'not ours already holds' "$tmp/agent-node-3.log" || true)" '^[1-9]'
check_match "foreign policy: still there (never deleted)" \
    "$(ipn node-3 xfrm policy list dir out src 0.0.0.0/0 dst "$n2/32" proto 4)" 'priority 100'
ipn node-3 xfrm policy delete src 0.0.0.0/0 dst "$n2/32" proto 4 dir out
wait_until 5 "foreign policy removed by hand: node-3's own policy is back" \
    bash -c "ip netns exec ${E2E_NS_PREFIX}node-3 ip xfrm policy list dir out src 0.0.0.0/0 dst $n2/32 proto 4 | grep -q 'tmpl src'"
streams_stop foreign-policy
no_clear foreign-policy node-3
read -r sent lost span < <(window "$tmp/foreign-policy-23.json")
info "foreign policy, echo 2→3: $sent sent, $lost lost (dropped while the foreign policy stood)"

# -------------------------------------------------------- 4. foreign state
# node-1's inbound SA from node-2 binds node-1's incarnation (key and SPI
# bits 16-19): lost, it is never made again under the same key (its replay
# window would start over); node-1 takes its next incarnation, whose SPI is
# the same but for those 4 bits. A foreign state put there first is what
# node-1 then meets.
n1=${NODE_IP[node-1]}
old=$(ipn node-1 xfrm state list src "$n2" dst "$n1" | awk '/proto esp spi/ {print $4; exit}')
inc=$(ectl get --print-value-only /calico/ipsec/v1/nodeids/node-1 | jq .incarnation)
spi=$(printf '0x%08x' $(((old & ~0xF0000) | (((inc + 1) % 16) << 16))))
info "a foreign state at $n2 -> $n1 spi $spi, where node-1's next incarnation puts its inbound SA (now $old)"
ipn node-1 xfrm state add src "$n2" dst "$n1" proto esp spi "$spi" reqid 7 mode transport \
    aead 'rfc4106(gcm(aes))' 0x0000000000000000000000000000000000000000 128
ipn node-1 xfrm state delete src "$n2" dst "$n1" proto esp spi "$old"
sleep 3
# (The refused add leaves a ledger entry written ahead of it, so node-1
# may move on once more: never back to a key it may have used.)
check_ge "foreign state: node-1 lost an inbound SA and took a new incarnation" \
    "$(ectl get --print-value-only /calico/ipsec/v1/nodeids/node-1 | jq .incarnation)" "$((inc + 1))"
check_match "foreign state: node-1's agent reports it" \
    "$(grep -c 'refused to add' "$tmp/agent-node-1.log" || true)" '^[1-9]'
check_match "foreign state: still there (never deleted)" \
    "$(ipn node-1 xfrm state list src "$n2" dst "$n1")" 'reqid 7 '
ipn node-1 xfrm state delete src "$n2" dst "$n1" proto esp spi "$spi"
wait_until 5 "foreign state removed by hand: node-1's own inbound state from node-2 is in" \
    bash -c "ip netns exec ${E2E_NS_PREFIX}node-1 ip xfrm state list src $n2 dst $n1 | grep -q 'reqid [1-9][0-9]'"  || true
wait_until 10 "foreign state: node-1 converged (nothing pending)" converged node-1 || true

fi

# ----------------------------------------------------------- 5. SIGKILL
kills=${E2E_HEAL_KILLS:-20}
# keep_logs CASE: the logs and echo records of CASE, under the VM's result
# folder, for a loss that needs explaining.
keep_logs() {
    [[ -n ${E2E_OUT:-} ]] || return 0
    mkdir -p "$E2E_OUT/heal-$1"
    cp "$tmp"/*.log "$tmp"/*.err "$tmp/$1"-*.json "$E2E_OUT/heal-$1/" 2>/dev/null || true
    local n
    for n in node-1 node-2 node-3; do
        ipn "$n" -s xfrm state list >"$E2E_OUT/heal-$1/xfrm-state-$n.txt" 2>&1 || true
        nsx "$n" cat /proc/net/xfrm_stat >"$E2E_OUT/heal-$1/xfrm_stat-$n.txt" 2>&1 || true
    done
    info "logs kept in the VM's result folder, heal-$1/"
}
# rcvbuf_drops: the UDP and raw datagrams the pods' sockets dropped for a
# full receive buffer (a stalled traffic.py under TCG), "p1=N p2=N".
rcvbuf_drops() {
    local p out=""
    for p in p1 p2; do
        out+="$p=$(ip netns exec "${E2E_NS_PREFIX}$p" awk '$1 == "Udp:" && $2 ~ /^[0-9]/ {print $6}' /proc/net/snmp) "
    done
    echo "${out% }"
}
# explain_loss FILE: each burst of lost echoes in FILE, with what the agents
# of node-1 and node-2 logged around it (the CI log shows only its tail).
explain_loss() {
    python3 - "$1" "$tmp/agent-node-1.log" "$tmp/agent-node-2.log" <<'PY'
import datetime, json, sys
d = json.load(open(sys.argv[1]))
t = dict((c, s) for c, s in d["sent"])
lost = sorted(t[c] for c in d["lost"] if c in t)
bursts = []
for x in lost:
    if bursts and x - bursts[-1][1] < 0.5:
        bursts[-1][1] = x
        bursts[-1][2] += 1
    else:
        bursts.append([x, x, 1])
def stamp(line):
    try:
        return datetime.datetime.fromisoformat(line.split()[0][:26].rstrip("Z")).replace(
            tzinfo=datetime.timezone.utc).timestamp()
    except (ValueError, IndexError):
        return None
logs = []
for f in sys.argv[2:]:
    name = f.rsplit("agent-", 1)[-1].removesuffix(".log")
    for line in open(f, errors="replace"):
        ts = stamp(line)
        if ts is not None:
            logs.append((ts, name, line.rstrip()[27:200]))
logs.sort()
for a, b, n in bursts[:6]:
    iso = datetime.datetime.fromtimestamp(a, datetime.timezone.utc).isoformat()
    print(f"#      {n} lost from {iso} over {b - a + 0.005:.3f}s; the agents around it:")
    near = [l for l in logs if a - 1.5 <= l[0] <= b + 0.5]
    for ts, name, text in near[-14:]:
        print(f"#        {ts - a:+.3f}s {name}: {text}")
PY
}
# wait_up NODE: until NODE's agent answers /livez (at most 5 s).
wait_up() {
    local i
    for ((i = 0; i < 50; i++)); do
        nsx "$1" curl -so /dev/null --max-time 1 http://127.0.0.1:9094/livez && return 0
        sleep 0.1
    done
}
kill_round() {
    local c=kill$1 k inc0 inc1 pair sent lost span
    streams_start "$c"
    inc0=$(nsx node-1 "$bin" status --nodename node-1 --json | jq -r .incarnation)
    info "node-1's agent killed $kills times, with three rotations started among the kills"
    for ((k = 0; k < kills; k++)); do
        # A rotation takes about 3 s here, a kill about 2 s: rotating at
        # kills 1, 7, 13 and 19 puts kills inside every step of a rotation
        # (pending, active, retired, deleted).
        if ((k % 6 == 1)); then
            # keys rotate refuses while the last epoch is still pending
            # (node-1, killed again and again, may not have installed it):
            # try again until it is accepted.
            timeout 60 bash -c 'until ip netns exec "$1" "$2" keys rotate --etcd-endpoints "$3" --kek-file "$4"; do sleep 0.5; done' _ \
                "${E2E_NS_PREFIX}wire" "$bin" "$ETCD_ENDPOINTS" "$tmp/kek" >"$tmp/rotate-$k.out" 2>&1 &
            ROTATE_PID=$!
        fi
        # Once the agent serves (its process is up: seconds in a slow VM),
        # 0-790 ms on: its start, its watches, or the convergence itself.
        wait_up node-1
        sleep "0.$((RANDOM % 80))"
        kill -KILL "${AGENT_PID[node-1]}" 2>/dev/null || true
        wait "${AGENT_PID[node-1]}" 2>/dev/null || true
        echo "$(date -u +%FT%T.%NZ) killed" >>"$tmp/agent-node-1.log"
        if ((k % 6 == 2)); then
            # The ledger lost as well (a kill in the middle of writing it):
            # the next agent cannot vouch for node-1's SAs and moves to a
            # new incarnation, make-before-break, in the middle of a rotation.
            rm -f "$tmp/state-node-1/node/ledger"
            echo "$(date -u +%FT%T.%NZ) ledger removed" >>"$tmp/agent-node-1.log"
        fi
        agent_start node-1
        if ((k % 6 == 1)); then
            wait "$ROTATE_PID" || fail "keys rotate during the kills: $(tail -c 300 "$tmp/rotate-$k.out")"
            info "kill $k: $(date -u +%T.%N) rotation started: $(head -c 120 "$tmp/rotate-$k.out")"
        fi
    done
    wait_until 120 "the rotation completes: one active epoch left" one_epoch || true
    sleep 2
    streams_stop "$c"
    inc1=$(nsx node-1 "$bin" status --nodename node-1 --json | jq -r .incarnation)
    info "node-1's incarnation went from $inc0 to $inc1 over the kills"
    check_ge "kill: node-1 changed incarnation at least once per ledger removed" \
        "$((inc1 - inc0))" $(((kills + 3) / 6))
    no_clear "$c"
    check_match "kill: a restarted agent kept node-1 live under the lease its predecessor left" \
        "$(grep -c 'kept the status lease of the previous agent' "$tmp/agent-node-1.log" || true)" '^[1-9]'
    for n in "${NODES[@]}"; do
        wait_until 20 "after the kills, $n holds exactly the desired set" converged "$n" || true
    done
    info "UDP receive-buffer drops so far: $(rcvbuf_drops)"
    for pair in 12 23; do
        read -r sent lost span < <(window "$tmp/$c-$pair.json")
        info "SIGKILL x$kills during a rotation, echo ${pair:0:1}→${pair:1:1}: $sent sent, $lost lost within ${span}s"
        check_eq "SIGKILL x$kills during a rotation: echoes lost p${pair:0:1}→p${pair:1:1}" "$lost" 0
        [[ $lost == 0 ]] || { explain_loss "$tmp/$c-$pair.json"; keep_logs "$c"; }
    done
}
for ((round = 1; round <= ${E2E_HEAL_ROUNDS:-1}; round++)); do
    kill_round "$round"
done
# The flushes and the foreign state make the kernel count drops (no state,
# no policy, a wrong key): shown, not judged.
for n in "${NODES[@]}"; do
    info "$n xfrm_stat: $(xfrm_errors "$n")"
done
daemons_stop
e2e_finish
