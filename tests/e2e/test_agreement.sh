#!/bin/bash
# End-to-end: per-node key agreement (issue 14). Agents on three nodes and
# two managers, pods through the chain, echo at 100/s p1→p2 and p2→p3.
#
# 1. Rotation to an epoch with P-256 key agreement: every node keeps a 0600
#    private key under its agreement_dir and publishes its public key; the
#    rotation loses no echo.
# 2. Containment: a capture of node-2's port (node-1↔node-2 and
#    node-2↔node-3), and a script (esp_decrypt.py) given node-1's KEK, its
#    state and agreement directories, and etcd with every revision: it
#    decrypts node-1↔node-2 and opens no node-2↔node-3 packet.
# 3. Forward secrecy: a capture under that epoch; a rotation deletes it and
#    every node removes its private key; then every node's files and etcd's
#    history open nothing of the capture (before, the same script opened it).
# Key agreement is the default (keys init makes epoch 1 with it), and every
# epoch here is sealed as version 3: each node's public key belongs to one
# incarnation (pubkeys/<epoch>/<node>/<incarnation>), and SA keys bind the
# receiver's incarnation too.
#
# 4. A forged public key: written to etcd for node-2's incarnation by
#    someone without the KEK while node-2's agent is stopped; no node uses
#    it, node-2 moves to a new incarnation with a new key, the pending
#    epoch activates with no further rotation, and no echo is lost.
# 5. node-1 reboots (its private keys and SAs gone): it takes a new
#    incarnation and publishes new keys; no epoch changes (no rotation),
#    node-1's pair flows again within 2 s of its agent's restart,
#    node-2↔node-3 loses nothing, and nothing crosses in clear. A node-2→
#    node-1 ESP packet captured before the reboot, replayed onto node-1's
#    port after it, does not verify (XfrmInStateProtoError rises).
# 6. A downgrade attempt: a pending AES-256 epoch with key agreement is
#    rewritten in etcd without agreement and with AES-128. Every node
#    refuses it (the parameters are bound into the seal), the manager
#    retires it, no SA of it exists anywhere, and no echo is lost.
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
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/ping-12.json" 100 2>"$tmp/ping-12.err" &
ping12=$!
ip netns exec "${E2E_NS_PREFIX}p2" python3 "$here/traffic.py" ping "$ip3" "$tmp/ping-23.json" 100 2>"$tmp/ping-23.err" &
ping23=$!
sleep 2
mark() { echo "$(now) $*" >>"$tmp/steps.txt"; }
mark enable
check "calico-ipsec enable --wait" nsx wire "$bin" enable --etcd-endpoints "$ETCD_ENDPOINTS" --wait --timeout-seconds 180

rotate() { nsx wire "$bin" keys rotate --etcd-endpoints "$ETCD_ENDPOINTS" --kek-file "$tmp/kek" "$@"; }
# history_dump OUT: every key under /calico/ at every revision etcd keeps,
# newest value per key (what an attacker with the etcd history holds).
history_dump() {
    local rev r
    rev=$(ectl get / -w json | jq -r .header.revision)
    for ((r = 1; r <= rev; r++)); do
        ectl get --prefix /calico/ --rev="$r" -w json 2>/dev/null || true
    done | python3 -c '
import json, sys
kvs = {}
for line in sys.stdin:
    line = line.strip()
    if line:
        for kv in json.loads(line).get("kvs", []):
            kvs[kv["key"]] = kv
json.dump({"kvs": list(kvs.values())}, open(sys.argv[1], "w"))' "$1"
}
# decrypt PCAP DUMP DIRS: esp_decrypt.py's summary line, given the KEK and
# the agreement directories DIRS ("node-1=DIR,...").
decrypt() {
    ESP_AGREEMENT_DIRS=$3 python3 "$here/esp_decrypt.py" "$1" "$2" "$tmp/kek" calico-ipsec-e2e 2>&1 | tail -1 || true
}
field() { grep -o "$1=[0-9]*" <<<"$2" | cut -d= -f2; }

# ------------------------------------------------------------ 1. rotation
mark rotation-to-2
ectl get --print-value-only /calico/ipsec/v1/epochs/1 >"$tmp/epoch1.json"
t0=$(now)
check "keys rotate --agreement p256" rotate --agreement p256
wait_until 120 "epoch 2 (key agreement) active, epoch 1 deleted" only_epoch 2 || true
# The same measure as test_lifecycle.sh's "rotation N took", for comparison.
info "rotation to key agreement took $(echo "$(now) - $t0" | bc)s (overlap 2 s included)"
for n in "${NODES[@]}"; do
    check_eq "$n keeps its epoch-2 private key 0600 under its agreement_dir" \
        "$(stat -c %a "$tmp/agreement-$n"/2-*.key 2>&1)" 600
    inc=$(ectl get --print-value-only "/calico/ipsec/v1/nodeids/$n" | jq -r .incarnation)
    check_match "$n's public key for epoch 2, incarnation $inc, is in etcd with its MAC" \
        "$(ectl get --print-value-only "/calico/ipsec/v1/pubkeys/2/$n/$inc")" '"mac":"[A-Za-z0-9+/=]{44}"'
done
check_eq "epoch 1 (keys init's) already had key agreement, sealed as version 3" \
    "$(jq -r '.agreement + "/" + (.seal | tostring)' "$tmp/epoch1.json")" p256/3

# --------------------------------------------------------- 2. containment
cap_start wire w-node-2 "$tmp/contain.pcap"
sleep 3
cap_stop
tcpdump -r "$tmp/contain.pcap" -w "$tmp/c12.pcap" "host ${NODE_IP[node-1]} and host ${NODE_IP[node-2]}" 2>/dev/null
tcpdump -r "$tmp/contain.pcap" -w "$tmp/c23.pcap" "host ${NODE_IP[node-2]} and host ${NODE_IP[node-3]}" 2>/dev/null
history_dump "$tmp/history.json"
one="node-1=$tmp/agreement-node-1"
s12=$(decrypt "$tmp/c12.pcap" "$tmp/history.json" "$one")
s23=$(decrypt "$tmp/c23.pcap" "$tmp/history.json" "$one")
info "with node-1's files and etcd's history, node-1↔node-2: $s12"
info "with node-1's files and etcd's history, node-2↔node-3: $s23"
check_ge "containment: node-1's own pair decrypts" "$(field decrypted "$s12")" 10
check_eq "containment: ... every packet of it" "$(field failed "$s12")" 0
check_eq "containment: node-2↔node-3 opens for no packet" "$(field decrypted "$s23")" 0
check_ge "containment: ... of the node-2↔node-3 packets captured" "$(field nokey "$s23")" 10

# ---------------------------------------------------- 3. forward secrecy
mark rotation-to-3
all="node-1=$tmp/agreement-node-1,node-2=$tmp/agreement-node-2,node-3=$tmp/agreement-node-3"
history_dump "$tmp/history-before.json"
before=$(decrypt "$tmp/contain.pcap" "$tmp/history-before.json" "$all")
check_ge "forward secrecy: before the deletion, every node's files open the capture ($before)" \
    "$(field decrypted "$before")" 20
t0=$(now)
check "keys rotate (epoch 3)" rotate
wait_until 120 "epoch 3 active, epoch 2 deleted" only_epoch 3 || true
info "rotation between key-agreement epochs took $(echo "$(now) - $t0" | bc)s (overlap 2 s included)"
gone() { ! ls "$tmp"/agreement-node-*/2-*.key >/dev/null 2>&1; }
if ! wait_until 30 "every node removed its epoch-2 private key" gone; then
    ls -l "$tmp"/agreement-node-* | indent
    ectl get --prefix --keys-only /calico/ipsec/v1/pubkeys/ | grep . | indent
    ectl get --prefix --keys-only /calico/ipsec/v1/epochs/ | grep . | indent
    grep -h 'destroyed\|published this node\|epoch=2' "$tmp"/agent-node-*.log | tail -20 | indent
fi
history_dump "$tmp/history-after.json"
after=$(decrypt "$tmp/contain.pcap" "$tmp/history-after.json" "$all")
info "after the deletion, with every node's files, the KEK and etcd's history: $after"
check_eq "forward secrecy: the epoch-2 capture opens for no packet" "$(field decrypted "$after")" 0

# ------------------------------------------------------- 4. a forged key
mark forged-key
kill -TERM "${AGENT_PID[node-2]}"
wait "${AGENT_PID[node-2]}" 2>/dev/null || true
inc2=$(ectl get --print-value-only /calico/ipsec/v1/nodeids/node-2 | jq -r .incarnation)
check "keys rotate (epoch 4, pending)" rotate
forged=$(python3 -c '
import base64, os
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization
k = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
print("{\"public\":\"%s\",\"mac\":\"%s\"}" % (base64.b64encode(k).decode(), base64.b64encode(os.urandom(32)).decode()))')
ectl put "/calico/ipsec/v1/pubkeys/4/node-2/$inc2" "$forged" >/dev/null
agent_start node-2
wait_until 60 "node-1 refuses node-2's forged key" grep -q 'does not verify' "$tmp/agent-node-1.log" || true
wait_until 60 "node-2 finds the record under its name is not its key" \
    grep -q 'is not this node.s key' "$tmp/agent-node-2.log" || true
new2() { [ "$(ectl get --print-value-only /calico/ipsec/v1/nodeids/node-2 | jq -r .incarnation)" -gt "$inc2" ]; }
wait_until 60 "node-2 moves past the forged incarnation ($inc2) to a new one" new2 || true
wait_until 120 "the pending epoch activates with node-2's new key: epoch 4 alone" only_epoch 4 || true
check "keys rotate after the forgery" rotate
wait_until 120 "the new epoch 5 active: the cluster moves on" only_epoch 5 || true

kill -TERM "$ping12" "$ping23" 2>/dev/null || true
wait "$ping12" "$ping23" 2>/dev/null || true
mark end
for pair in 12 23; do
    sent=$(jq '.sent | length' "$tmp/ping-$pair.json")
    lost=$(jq '.lost | length' "$tmp/ping-$pair.json")
    # Where any loss fell, step by step.
    python3 - "$tmp/ping-$pair.json" "$tmp/steps.txt" <<'PY' | indent
import json, sys
d = json.load(open(sys.argv[1]))
steps = [l.split(None, 1) for l in open(sys.argv[2]) if l.strip()]
lost = set(d["lost"])
times = [t for c, t in d["sent"] if c in lost]
for i, (t0, name) in enumerate(steps):
    t1 = float(steps[i + 1][0]) if i + 1 < len(steps) else float("inf")
    n = [t for t in times if float(t0) <= t < t1]
    if n:
        print("%s: %d lost, from %+.2f s to %+.2f s of the step" % (name.strip(), len(n), n[0] - float(t0), n[-1] - float(t0)))
PY
    info "echo ${pair:0:1}→${pair:1:1}: $sent sent, $lost lost"
    check_eq "echoes lost p${pair:0:1}→p${pair:1:1} over every step" "$lost" 0
done
for n in "${NODES[@]}"; do
    check_eq "xfrm_stat counters on $n all 0" "$(xfrm_errors "$n")" ""
done

# ------------------------------------------------------ 5. node-1 reboots
# A reboot empties tmpfs (node-1's private keys) and the kernel (its SAs).
# One network namespace cannot reboot, so: node-1's agent stopped, its
# agreement directory emptied, its XFRM states flushed, its agent started
# again (the boot id stays; the lost key and SAs move node-1 to a new
# incarnation all the same).
inc1=$(ectl get --print-value-only /calico/ipsec/v1/nodeids/node-1 | jq -r .incarnation)
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/reboot-12.json" 100 2>"$tmp/reboot-12.err" &
ping12=$!
ip netns exec "${E2E_NS_PREFIX}p2" python3 "$here/traffic.py" ping "$ip3" "$tmp/reboot-23.json" 100 2>"$tmp/reboot-23.err" &
ping23=$!
cap_start wire w-node-1 "$tmp/reboot.pcap" 0
sleep 2
kill -TERM "${AGENT_PID[node-1]}"
wait "${AGENT_PID[node-1]}" 2>/dev/null || true
rm -f "$tmp"/agreement-node-1/*.key
ipn node-1 xfrm state flush
sleep 1
t_start=$(date +%s.%N)
agent_start node-1
new1() { [ "$(ectl get --print-value-only /calico/ipsec/v1/nodeids/node-1 | jq -r .incarnation)" -gt "$inc1" ]; }
wait_until 60 "reboot: node-1 takes a new incarnation (was $inc1)" new1 || true
sleep 4
kill -TERM "$ping12" "$ping23" 2>/dev/null || true
wait "$ping12" "$ping23" 2>/dev/null || true
cap_stop
check_eq "reboot: no rotation: epoch 5 alone, and the counter still at 5" \
    "$(ectl get --print-value-only /calico/ipsec/v1/epochs/5 | jq -r .state)/$(ectl get --print-value-only /calico/ipsec/v1/epoch-counter | jq -r .last)" active/5
check_eq "reboot: node-1 holds one new 0600 private key for epoch 5" \
    "$(stat -c %a "$tmp"/agreement-node-1/5-*.key 2>&1)" 600
clear=$(cap_ipv4 "$tmp/reboot.pcap" | awk '$3 ~ /^10\.244\./ || $4 ~ /^10\.244\./' | grep -c . || true)
check_eq "reboot: packets with a pod address in clear on node-1's port" "$clear" 0
lost23=$(jq '.lost | length' "$tmp/reboot-23.json")
info "reboot: echo 2→3 (pair without node-1): $(jq '.sent | length' "$tmp/reboot-23.json") sent, $lost23 lost"
check_eq "reboot: the pair without node-1 lost nothing" "$lost23" 0
# node-1's own pair is dark from the flush until its new keys are in on
# both ends (fail closed), then flows again: from the first echo sent after
# the agent started that came back, every later one came back too.
read -r sent12 lost12 back12 tail12 < <(python3 - "$tmp/reboot-12.json" "$t_start" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
start = float(sys.argv[2])
lost = set(d["lost"])
after = [(c, t) for c, t in d["sent"] if t >= start]
back = next((t for c, t in after if c not in lost and all(c2 not in lost for c2, t2 in after if t2 >= t)), None)
late = [c for c, t in after if back is not None and t >= back and c in lost]
print(len(d["sent"]), len(lost), "none" if back is None else "%.2f" % (back - start), len(late))
PY
)
# node-1's first convergence: the new incarnation it published (its log's
# timestamp, UTC).
conv12=$(python3 - "$tmp/agent-node-1.log" "$t_start" "$back12" <<'PY'
import datetime, sys
start = float(sys.argv[2])
lines = [l for l in open(sys.argv[1], errors="replace") if "published a new incarnation" in l]
t = None
for l in lines:
    try:
        s = l.split()[0].rstrip("Z")
        ts = datetime.datetime.fromisoformat(s).replace(tzinfo=datetime.timezone.utc).timestamp()
    except ValueError:
        continue
    if ts >= start:
        t = ts
        break
back = sys.argv[3]
print("none" if t is None or back == "none" else "%.2f" % (start + float(back) - t))
PY
)
info "reboot: echo 1→2: $sent12 sent, $lost12 lost; flowing again ${back12} s after node-1's agent started, ${conv12} s after its first convergence"
check_eq "reboot: echo 1→2 flows again and stays up" "$tail12/$([ "$back12" != none ] && echo up)" 0/up
check "reboot: node-1's pair back within 2 s of its agent's first convergence (${conv12} s)" \
    python3 -c "import sys; sys.exit(0 if '$conv12' != 'none' and float('$conv12') <= 2.0 else 1)"
# A replay: an ESP packet node-2 sent node-1 before the reboot, put back on
# node-1's port. node-1's new incarnation is in the key and in the SPI: no
# state takes the packet (XfrmInNoStates), or one that does fails to verify
# it (XfrmInStateProtoError).
python3 - "$tmp/reboot.pcap" "${NODE_IP[node-2]}" "${NODE_IP[node-1]}" "$t_start" "$tmp/replay.bin" <<'PY'
import socket, struct, sys
data = open(sys.argv[1], "rb").read()
src, dst, start = socket.inet_aton(sys.argv[2]), socket.inet_aton(sys.argv[3]), float(sys.argv[4])
endian = "<" if struct.unpack("<I", data[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
off, pick = 24, None
while off + 16 <= len(data):
    sec, usec, incl, orig = struct.unpack(endian + "IIII", data[off:off + 16])
    frame = data[off + 16:off + 16 + incl]
    off += 16 + incl
    ip = frame[14:]
    if incl == orig and sec + usec / 1e6 < start - 1 and frame[12:14] == b"\x08\x00" and ip[9] == 50 and ip[12:16] == src and ip[16:20] == dst:
        pick = frame
open(sys.argv[5], "wb").write(pick or b"")
PY
check "replay: an ESP packet node-2→node-1 from before the reboot was captured" test -s "$tmp/replay.bin"
rejected() { # the counters that say an inbound ESP packet was refused
    nsx node-1 cat /proc/net/xfrm_stat | awk '$1 == "XfrmInNoStates" || $1 == "XfrmInStateProtoError" {n += $2} END {print n + 0}'
}
before=$(rejected)
nsx wire python3 -c '
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
frame = open(sys.argv[2], "rb").read()
for _ in range(3):
    s.send(frame)' w-node-1 "$tmp/replay.bin"
sleep 1
after=$(rejected)
info "replay: node-1's XfrmInNoStates + XfrmInStateProtoError $before -> $after"
check "replay: node-1 refuses the 3 replayed packets (the counters rose by 3)" \
    test "$((after - before))" -ge 3

# ------------------------------------------------- 6. a downgrade attempt
# Someone who can write etcd but has no KEK takes a pending AES-256 epoch
# with key agreement and strips the agreement and lowers the key to
# AES-128. The parameters are bound into the seal: every node refuses the
# record, the manager retires it, and traffic stays on epoch 5.
for m in mgr-a mgr-b; do kill -TERM "${MANAGER_PID[$m]}" 2>/dev/null || true; done
for m in mgr-a mgr-b; do wait "${MANAGER_PID[$m]}" 2>/dev/null || true; done
ip netns exec "${E2E_NS_PREFIX}p1" python3 "$here/traffic.py" ping "$ip2" "$tmp/down-12.json" 100 2>/dev/null &
ping12=$!
ip netns exec "${E2E_NS_PREFIX}p2" python3 "$here/traffic.py" ping "$ip3" "$tmp/down-23.json" 100 2>/dev/null &
ping23=$!
sleep 1
check "keys rotate --key-bits 256 (epoch 6, pending, with key agreement)" rotate --key-bits 256
ectl get --print-value-only /calico/ipsec/v1/epochs/6 | jq -c 'del(.agreement) | .key_bits = 128' |
    ectl put /calico/ipsec/v1/epochs/6 >/dev/null
info "epoch 6 as altered: $(ectl get --print-value-only /calico/ipsec/v1/epochs/6 | jq -c '{epoch, key_bits, agreement, seal}')"
for n in "${NODES[@]}"; do
    wait_until 60 "downgrade: $n refuses the altered epoch 6" \
        grep -q 'does not open with its own parameters' "$tmp/agent-$n.log" || true
done
manager_start mgr-a
manager_start mgr-b
wait_until 120 "downgrade: the manager retires the altered epoch: epoch 5 alone again" only_epoch 5 || true
grep -h 'altered after sealing' "$tmp"/manager-mgr-*.log | tail -1 | indent
for n in "${NODES[@]}"; do
    # Epoch 6's SPIs carry 6 % 255 + 1 = 0x07 in their top byte.
    check_eq "downgrade: $n holds no SA of epoch 6" "$(ipn "$n" xfrm state | grep -c 'spi 0x07' || true)" 0
done
sleep 1
kill -TERM "$ping12" "$ping23" 2>/dev/null || true
wait "$ping12" "$ping23" 2>/dev/null || true
for pair in 12 23; do
    lost=$(jq '.lost | length' "$tmp/down-$pair.json")
    info "downgrade: echo ${pair:0:1}→${pair:1:1}: $(jq '.sent | length' "$tmp/down-$pair.json") sent, $lost lost"
    check_eq "downgrade: echoes lost p${pair:0:1}→p${pair:1:1} (traffic stays on epoch 5)" "$lost" 0
done
daemons_stop
e2e_finish
