#!/bin/bash
# End-to-end: the XFRM data plane converged by calico-ipsec on every ADD.
#
# Three node namespaces on a bridge ("the wire"), IPIP the way Calico sets it
# up (tunl0, each peer's pod block via tunl0 onlink to the peer's node IP), a
# real etcd loaded with the Calico fixture for those nodes, and pods created
# through a libcni-shaped client with the chain [ptp + host-local,
# calico-ipsec]. Encryption is enforced from the start (the phase machine is
# the manager's job; here the config record says "enforce").
#
# Asserts: pod-to-pod ping and a TCP transfer work across nodes; the wire
# holds only ESP between nodes, and every captured ESP packet decrypts with
# keys derived independently (esp_decrypt.py) to IPIP carrying the payload
# sent; DF pings hold the MTU bound; a lost SA set brings a new incarnation;
# a node removed from etcd loses its SAs on the next ADD; 50 concurrent ADDs
# and then 50 concurrent DELs leave exactly the desired set.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

e2e_init

e2e_bin
tmp=$(mktemp -d)
cluster_up "$tmp" "$bin" enforce
EXT=1500
NODE_KEY=/calico/resources/v3/projectcalico.org/nodes

# status NODE: `calico-ipsec status --json` inside NODE.
status() { nsx "$1" "$bin" status --nodename "$1" --json; }

# add NODE POD DESC: ADD through the chain, as a check.
add() { check "$3" cni_add "$1" "$2"; }

# Round 1: each node publishes its identity on its first ADD. Round 2: each
# node now sees every peer's incarnation and installs SAs both ways.
for n in "${NODES[@]}"; do add "$n" "a-$n" "ADD a pod on $n (first, publishes its incarnation)"; done
for n in "${NODES[@]}"; do add "$n" "b-$n" "ADD a pod on $n (second, all peers known)"; done

for n in "${NODES[@]}"; do
    s=$(status "$n")
    check_eq "$n: status says enforce" "$(jq -r .phase <<<"$s")" enforce
    check_eq "$n: converged (no pending change)" "$(jq -r .pending_changes <<<"$s")" 0
    check_eq "$n: 4 states (in+out for 2 peers), 5 policies (in+out for 2 peers, the IPIP catch-all)" \
        "$(jq -r '"\(.kernel_states) \(.kernel_policies)"' <<<"$s")" "4 5"
    check_eq "$n: every peer's SAs and policies in place" \
        "$(jq -r '[.peers[] | .sa_out, .sa_in, .policy_out, .policy_in] | unique | join(",")' <<<"$s")" ok
    check "$n: CHECK passes for b-$n (no drift)" cni_check "$n" "b-$n"
done
table=$(nsx node-1 "$bin" status --nodename node-1)
check_match "status table names the peers" "$table" \
    'node-2 +v4 +10\.0\.0\.12 +ipip .* ok +ok +ok +ok'
# The FIPS round (`make fips-e2e`: the FIPS binary, a kernel booted with
# fips=1) must say so, TLS included; the standard round says standard.
if [[ $(cat /proc/sys/crypto/fips_enabled 2>/dev/null) == 1 ]]; then
    check_match "status: the FIPS build, TLS through AWS-LC's FIPS module, kernel FIPS mode on" "$table" \
        '^crypto: +FIPS build, AWS-LC FIPS 140-3 module.*; TLS rustls with AWS-LC.s FIPS module; kernel FIPS mode on'
else
    check_match "status: the standard build, TLS through ring" "$table" '^crypto: +standard build, .*; TLS rustls with ring;'
fi

# ------------------------------------------------------------ fast path
# A no-op ADD checks etcd's fingerprint and the kernel against the record of
# node-1's last convergence and reads or writes nothing else; any etcd change
# or kernel drift sends it down the full path.
fast() { grep -c 'IPsec converged.*writes=0.*unchanged=true' "$tmp/node-1.log" || true; }
check_eq "node-1 keeps a record of its last convergence, 0600" \
    "$(stat -c %a "$tmp/state-node-1/node/converged")" 600
f0=$(fast)
add node-1 f1-node-1 "a no-op ADD on node-1"
check_eq "the no-op ADD took the fast path, with no write" "$(fast)" $((f0 + 1))
inc=$(status node-1 | jq .incarnation)
spi_in=$(ipn node-1 xfrm state list | awk '/^src 10.0.0.12 dst 10.0.0.11$/{getline; print $4; exit}')
ipn node-1 xfrm state delete src 10.0.0.12 dst 10.0.0.11 proto esp spi "$spi_in"
add node-1 f2-node-1 "ADD on node-1 after its inbound SA from node-2 was deleted"
check_eq "the ADD saw the drift and restored the SA (nothing pending, 4 states, 5 policies with the catch-all)" \
    "$(status node-1 | jq -r '"\(.pending_changes) \(.kernel_states) \(.kernel_policies)"')" "0 4 5"
# The inbound key binds node-1's incarnation (epochs sealed as 3): made
# again under the same key, the SA's replay window would start empty, so
# node-1 takes a new incarnation instead. Its peers learn it on their next
# convergence (here, with no agent, their next ADD).
check_eq "an inbound SA lost: a new incarnation (no replay window starts over under the same key)" \
    "$(status node-1 | jq .incarnation)" "$((inc + 1))"
add node-2 f2-node-2 "ADD on node-2 learns node-1's new incarnation"
add node-3 f2-node-3 "ADD on node-3 learns node-1's new incarnation"
ipn node-1 xfrm policy delete src 0.0.0.0/0 dst 10.0.0.12/32 proto 4 dir out
add node-1 f3-node-1 "ADD on node-1 after its outbound policy to node-2 was deleted"
check_eq "the ADD saw the drift and restored the policy (nothing pending, 4 states, 5 policies)" \
    "$(status node-1 | jq -r '"\(.pending_changes) \(.kernel_states) \(.kernel_policies)"')" "0 4 5"
f1=$(fast)
add node-1 f4-node-1 "another no-op ADD on node-1"
check_eq "it took the fast path again" "$(fast)" $((f1 + 1))
check_eq "only the two no-op ADDs of the five took the fast path" "$(fast)" $((f0 + 2))

# No key in status, logs or etcd's plaintext view: the KEK never appears.
kek=$(cat "$tmp/kek")
check_fails "the KEK appears in no log, status or etcd value" \
    grep -rqi "$kek" "$tmp"/node-*.log <(status node-1) <(ectl get --prefix /calico/)

# ------------------------------------------------------- traffic, on the wire
p1=$(pod_ip b-node-1) p2=$(pod_ip b-node-2) p3=$(pod_ip b-node-3)
marker=$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')   # 8 random bytes, as the ping payload pattern
# Node-1's port of the bridge: a capture on br0 itself misses unicast frames
# the bridge forwards port to port once it has learned the MACs.
cap_start wire w-node-1 "$tmp/wire.pcap" 0
check "ping b-node-1 -> b-node-2 ($p1 -> $p2)" nsx b-node-1 ping -n -c 3 -i 0.2 -W 5 -p "$marker" "$p2"
check "ping b-node-2 -> b-node-3 ($p2 -> $p3)" nsx b-node-2 ping -n -c 3 -i 0.2 -W 5 "$p3"
check "ping b-node-3 -> b-node-1 ($p3 -> $p1)" nsx b-node-3 ping -n -c 3 -i 0.2 -W 5 "$p1"
# TCP: 200 KiB of random bytes, hashed on both ends.
head -c 204800 /dev/urandom >"$tmp/payload"
nsx b-node-2 python3 -c '
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(30); s.bind((sys.argv[1], 5001)); s.listen(1); open(sys.argv[2], "w").close()
c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(65536)
    if not b: break
    h.update(b); n += len(b)
open(sys.argv[2], "w").write(f"{n} {h.hexdigest()}\n")' "$p2" "$tmp/tcp.out" &
srv=$!
for ((i = 0; i < 100; i++)); do [[ -e $tmp/tcp.out ]] && break; sleep 0.1; done
check "TCP transfer b-node-1 -> b-node-2" nsx b-node-1 python3 -c '
import socket, sys
s = socket.create_connection((sys.argv[1], 5001), timeout=20)
s.sendall(open(sys.argv[2], "rb").read()); s.close()' "$p2" "$tmp/payload"
wait "$srv" || true
check_eq "TCP bytes arrive intact (length and SHA-256)" "$(cat "$tmp/tcp.out")" \
    "$(stat -c %s "$tmp/payload") $(sha256sum <"$tmp/payload" | cut -d' ' -f1)"
cap_stop

wire=$(cap_ipv4 "$tmp/wire.pcap" | awk '$3 ~ /^10\.0\.0\.1[123]$/ && $4 ~ /^10\.0\.0\.1[123]$/')
check_ge "ESP packets between nodes on node-1's port (pings to and from node-1)" "$(grep -c '^ESP ' <<<"$wire" || true)" 12
check_eq "plaintext packets between nodes on the wire (IPIP or other)" \
    "$(grep -vc '^ESP ' <<<"$wire" || true)" 0
ectl get --prefix /calico/ -w json >"$tmp/etcd.json"
if out=$(python3 "$here/esp_decrypt.py" "$tmp/wire.pcap" "$tmp/etcd.json" "$tmp/kek" "hex:$marker" 2>&1); then
    pass "every ESP packet decrypts with independently derived keys to IPIP; the ping's random payload is in it ($(tail -1 <<<"$out"))"
else
    fail "decrypting the capture with independently derived keys:"
    indent <<<"$out"
fi
for n in "${NODES[@]}"; do
    check_eq "$n: every /proc/net/xfrm_stat counter is 0" "$(xfrm_errors "$n")" ""
done

# -------------------------------------------------------------------- MTU
bound=$("$bin" mtu --ext-mtu "$EXT" --icv 128)
check_eq "pod MTU clamped to the bound ($bound)" "$(ipn b-node-1 -j link show eth0 | jq '.[0].mtu')" "$bound"
check "DF ping of $bound bytes pod to pod" nsx b-node-1 ping -n -c 1 -W 5 -M 'do' -s $((bound - 28)) "$p2"
res=$(nsx b-node-1 ping -n -c 1 -W 2 -M 'do' -s $((bound - 27)) "$p2" 2>&1 || true)
check_match "DF ping of $((bound + 1)) bytes is refused in the pod" "$res" "message too long, mtu=$bound"

# ------------------------------------------------------------ incarnation
inc0=$(status node-1 | jq .incarnation)
check "node-1 has a convergence record before its SAs are flushed" test -s "$tmp/state-node-1/node/converged"
ipn node-1 xfrm state flush
add node-1 c-node-1 "ADD on node-1 after its SAs were flushed"
inc1=$(status node-1 | jq .incarnation)
check_eq "lost SAs: node-1 published a new incarnation" "$inc1" $((inc0 + 1))
spis=$(ipn node-1 xfrm state list | awk '/^src 10.0.0.11 /{getline; print $4}' | sort -u)
# Keys that bind both ends: the SPI's incarnation byte holds the low 4
# bits of the sender's incarnation, then the receiver's.
# The low 16 bits are node-1's id (a slot derived from its name).
id1=$(status node-1 | jq .id)
check_match "node-1's new outbound SPIs carry incarnation $inc1 (bits 20-23) and its id $id1" "$spis" \
    "^0x02$(printf '%x' $((inc1 % 16)))[0-9a-f]$(printf '%04x' "$id1")$"
check_eq "ledger is 0600" "$(stat -c %a "$tmp/state-node-1/node/ledger")" 600
add node-2 c-node-2 "ADD on node-2 learns node-1's incarnation"
add node-3 c-node-3 "ADD on node-3 learns node-1's incarnation"
check "ping b-node-1 -> b-node-2 after the new incarnation" nsx b-node-1 ping -n -c 2 -i 0.2 -W 5 "$p2"

# --------------------------------------------------------- a node leaves
add node-1 c2-node-1 "ADD on node-1 once every node knows its new incarnation"
f2=$(fast)
add node-1 c3-node-1 "a no-op ADD on node-1"
check_eq "it took the fast path" "$(fast)" $((f2 + 1))
n3=$(ectl get --print-value-only "$NODE_KEY/node-3")
ectl del "$NODE_KEY/node-3" >/dev/null
add node-1 d-node-1 "ADD on node-1 after node-3 left etcd"
check_eq "that ADD did not take the fast path (etcd's fingerprint changed)" "$(fast)" $((f2 + 1))
check_eq "node-1 holds no state for node-3" "$(ipn node-1 xfrm state list | grep -c 10.0.0.13 || true)" 0
check_eq "node-1 holds no policy for node-3" "$(ipn node-1 xfrm policy list | grep -c 10.0.0.13 || true)" 0
check_eq "node-1 still holds node-2's SAs and policies, and blocks node-3's orphaned block (2 states, 4 policies with the catch-all)" \
    "$(status node-1 | jq -r '"\(.kernel_states) \(.kernel_policies)"')" "2 4"
check_match "node-1 blocks node-3's pod block, whose Node left but whose affinity stays" \
    "$(ipn node-1 xfrm policy list | paste -sd' ')" "src 0\.0\.0\.0/0 dst 10\.244\.18\.128/26[[:space:]]+dir out action block"

# ------------------------------------------- 50 concurrent ADDs, then DELs
# node-3 comes back while they run: the ADDs serialise on the node lock and
# the last one to run sees it.
pids=()
t0=$(date +%s.%N)
for i in $(seq 1 50); do
    cni_add node-1 "p$i" >"$tmp/add-$i.out" 2>&1 &
    pids+=("$!")
    [[ $i == 25 ]] && printf '%s' "$n3" | ectl put "$NODE_KEY/node-3" >/dev/null
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
info "50 concurrent ADDs took $(echo "$(date +%s.%N) - $t0" | bc) s"
check_eq "50 concurrent ADDs all succeed" "$failed" 0
((failed == 0)) || head -5 "$tmp"/add-*.out | indent
# Group commit: an ADD that queued on the lock takes the answer of a holder
# whose etcd read began after it asked, instead of asking etcd again.
coalesced=$(grep -c 'IPsec converged.*coalesced=true' "$tmp/node-1.log" || true)
info "of the 50 concurrent ADDs, $coalesced were answered by a read that began after they asked"
info "slowest calico-ipsec convergence among them (node lock wait included): $(grep 'IPsec converged' "$tmp/node-1.log" \
    | tail -50 | grep -o 'millis=[0-9]*' | cut -d= -f2 | sort -n | tail -1) ms"
check_ge "some of the 50 queued ADDs were answered by another's etcd read" "$coalesced" 1
add node-1 e-node-1 "one more ADD after node-3 is back"
s=$(status node-1)
check_eq "after the ADDs node-1 holds exactly the desired set" \
    "$(jq -r '"\(.pending_changes) \(.kernel_states) \(.kernel_policies)"' <<<"$s")" "0 4 5"
pids=()
for i in $(seq 1 50); do
    cni_del node-1 "p$i" >"$tmp/del-$i.out" 2>&1 &
    pids+=("$!")
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
check_eq "50 concurrent DELs all succeed" "$failed" 0
check_eq "after the DELs node-1 still holds exactly the desired set" \
    "$(status node-1 | jq -r '"\(.pending_changes) \(.kernel_states) \(.kernel_policies)"')" "0 4 5"
check "CHECK passes on node-1 after it all" cni_check node-1 e-node-1

rm -rf "$tmp"
e2e_finish
