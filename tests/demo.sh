#!/usr/bin/env bash
# The README's main job: create a real pod the way kubelet would, through the
# chain [ptp + host-local (standing in for calico), calico-ipsec], and show
# calico-ipsec clamping the pod's MTU to exactly what fits after ESP.
set -euo pipefail

BIN=$(realpath "${1:-target/release/calico-ipsec}")
CNI_DIR=/usr/lib/cni
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it creates network namespaces)"; exit 1; }
[ -x "$BIN" ] || { echo "demo: $BIN not built; run make build"; exit 1; }
[ -x "$CNI_DIR/ptp" ] || { echo "demo: install containernetworking-plugins"; exit 1; }

NODE=demo-node-$$ POD=demo-pod-$$ CID=demo-$$
TMP=$(mktemp -d)
cleanup() { ip netns del "$POD" 2>/dev/null || true; ip netns del "$NODE" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
cni() { # cni PLUGIN COMMAND < config : run a plugin in the node namespace as kubelet's runtime would
    ip netns exec "$NODE" env CNI_COMMAND="$2" CNI_CONTAINERID="$CID" CNI_NETNS="/run/netns/$POD" \
        CNI_IFNAME=eth0 CNI_PATH="$CNI_DIR" "$1"
}
mtu_of() { ip -n "$1" -j link show dev "$2" | jq -r '.[0].mtu'; }

ip netns add "$NODE"; ip netns add "$POD"
ip -n "$NODE" link set lo up; ip -n "$POD" link set lo up
# The node's uplink: eth0 with a 1500-byte MTU (its far end is unused).
ip -n "$NODE" link add eth0 mtu 1500 type veth peer name wire0
ip -n "$NODE" link set eth0 up

say "The node's uplink eth0 has MTU 1500. What fits in ESP (AES-GCM, 128-bit ICV) over IPIP:"
ip netns exec "$NODE" "$BIN" mtu --json | jq -c 'del(.encapsulation,.icv_bits,.outer_ip)'
BOUND=$(ip netns exec "$NODE" "$BIN" mtu)
echo "So a pod may send at most $BOUND bytes per packet (the vendor formula would say 1452, which fragments)."

cat > "$TMP/ptp.json" <<EOF
{"cniVersion":"0.3.1","name":"k8s-pod-network","type":"ptp","mtu":1500,"ipMasq":false,
 "ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.135.0/26"}]],"dataDir":"$TMP/ipam"}}
EOF
say "ADD through ptp (standing in for calico): the pod gets eth0 at MTU 1500"
PREV=$(cni "$CNI_DIR/ptp" ADD < "$TMP/ptp.json")
echo "$PREV" | jq -c '{interfaces, ips}'
echo "pod eth0 MTU: $(mtu_of "$POD" eth0)"

jq -n --argjson prev "$PREV" --arg tmp "$TMP" '{cniVersion:"0.3.1", name:"k8s-pod-network", type:"calico-ipsec",
   log_file_path:($tmp+"/calico-ipsec.log"), state_dir:($tmp+"/state"), prevResult:$prev}' > "$TMP/ours.json"
say "ADD through calico-ipsec, chained after it"
RESULT=$(cni "$BIN" ADD < "$TMP/ours.json")
HOSTVETH=$(echo "$PREV" | jq -r '.interfaces[0].name')
echo "pod eth0 MTU: $(mtu_of "$POD" eth0); host-side $HOSTVETH MTU: $(mtu_of "$NODE" "$HOSTVETH")"
if [ "$RESULT" = "$(echo "$PREV" | jq -c .)" ] || [ "$(echo "$RESULT" | jq -S .)" = "$(echo "$PREV" | jq -S .)" ]; then
    echo "calico-ipsec passed ptp's result on unchanged."
else
    echo "UNEXPECTED: the result changed"; exit 1
fi

GW=$(echo "$PREV" | jq -r '.ips[0].gateway')
say "The pod sends with don't-fragment to its gateway $GW"
if ip netns exec "$POD" ping -c1 -W2 -M do -s $((BOUND - 28)) "$GW" >/dev/null; then
    echo "a $BOUND-byte packet: sent and answered"
else
    echo "UNEXPECTED: a $BOUND-byte packet failed"; exit 1
fi
if out=$(ip netns exec "$POD" ping -c1 -W2 -M do -s $((BOUND - 27)) "$GW" 2>&1); then
    echo "UNEXPECTED: a $((BOUND + 1))-byte packet went out"; exit 1
else
    echo "a $((BOUND + 1))-byte packet: refused in the pod ($(echo "$out" | grep -o 'message too long.*' | head -1))"
fi

say "CHECK (cniVersion 0.4.0+) verifies the clamp"
jq '.cniVersion="1.0.0" | .prevResult.cniVersion="1.0.0" | del(.prevResult.ips[].version)' "$TMP/ours.json" > "$TMP/check.json"
cni "$BIN" CHECK < "$TMP/check.json" && echo "CHECK passed"

say "DEL in reverse order; the MTU backup is removed"
cni "$BIN" DEL < "$TMP/ours.json" && cni "$CNI_DIR/ptp" DEL < "$TMP/ptp.json"
ls "$TMP/state" | grep -q . && { echo "UNEXPECTED: state left behind"; exit 1; }
echo "done: no state left, pod interface gone: $(ip -n "$POD" link show eth0 >/dev/null 2>&1 && echo no || echo yes)"
