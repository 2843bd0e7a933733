#!/bin/bash
# `make demo`, inside the VM (tests/e2e/vm.sh tests/e2e/demo.sh): a
# three-node Calico-style cluster in network namespaces, a real etcd with
# Calico's records, encryption enforced, pods created through the CNI chain
# [ptp + host-local, calico-ipsec], then `calico-ipsec status` for node-1 and
# what a capture on the wire sees while pods ping each other.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

say() { printf '\n== %s\n' "$*"; }
e2e_init
bin=${CALICO_IPSEC:?set CALICO_IPSEC to the calico-ipsec binary}
tmp=$(mktemp -d)

say "Bringing up 3 nodes (10.0.0.11-13) on a shared wire, IPIP between them, and etcd with Calico's records"
cluster_up "$tmp" "$bin" enforce
echo "etcd holds: $(ectl get --prefix /calico/ --keys-only | grep -c .) keys; encryption phase: enforce"

say "Creating pods through the CNI chain [ptp + host-local, calico-ipsec] (two per node)"
for round in a b; do
    for n in "${NODES[@]}"; do
        start=$(date +%s%N)
        if ! out=$(cni_add "$n" "$round-$n"); then
            echo "ADD of pod $round-$n on $n failed: $out"
            exit 1
        fi
        printf '  pod %-9s on %s: IP %-14s MTU %s  (ADD took %d ms)\n' "$round-$n" "$n" \
            "$(pod_ip "$round-$n")" "$(ipn "$round-$n" -j link show eth0 | jq '.[0].mtu')" \
            $((($(date +%s%N) - start) / 1000000))
    done
done

say "calico-ipsec status on node-1"
nsx node-1 "$bin" status --nodename node-1

p1=$(pod_ip b-node-1) p2=$(pod_ip b-node-2) p3=$(pod_ip b-node-3)
say "Pinging across nodes while capturing on the wire"
cap_start wire w-node-1 "$tmp/wire.pcap" 0
for pair in "b-node-1 $p2" "b-node-2 $p3" "b-node-3 $p1"; do
    read -r pod dst <<<"$pair"
    res=$(nsx "$pod" ping -n -q -c 10 -i 0.1 -W 5 "$dst" 2>&1 | grep 'packets transmitted' || true)
    echo "  $pod -> $dst: ${res:-no reply}"
done
cap_stop
wire=$(cap_ipv4 "$tmp/wire.pcap" | awk '$3 ~ /^10\.0\.0\.1[123]$/ && $4 ~ /^10\.0\.0\.1[123]$/')
esp=$(grep -c '^ESP ' <<<"$wire" || true)
plain=$(grep -vc '^ESP ' <<<"$wire" || true)
echo "  on node-1's port of the wire: $esp ESP packets, $plain unencrypted packets between nodes"
echo "  first packets seen:"
tcpdump -r "$tmp/wire.pcap" -nn 'host 10.0.0.11 and host 10.0.0.12' 2>/dev/null | head -4 | sed 's/^/    /'
ectl get --prefix /calico/ -w json >"$tmp/etcd.json"
echo "  decrypting the capture with keys derived independently from etcd and the KEK:"
python3 "$here/esp_decrypt.py" "$tmp/wire.pcap" "$tmp/etcd.json" "$tmp/kek" "" 10.244.0.0/16 | tail -1 | sed 's/^/    /'

say "Done: pod traffic between nodes left only as ESP (AES-GCM), with per-pair keys from etcd"
e2e_cleanup
rm -rf "$tmp"
