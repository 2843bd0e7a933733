#!/bin/bash
# End-to-end: `calico-ipsec mtu` agrees with the kernel for ESP transport
# mode (rfc4106(gcm(aes))) over IPIP. Two node namespaces on a bridge, tunl0
# as Calico sets it up, SAs and policies installed here with `ip xfrm`.
# For each EXTMTU and ICV: a DF ping whose IP packet is exactly the bound
# passes, travels as ESP and fills the link exactly; one byte more is
# refused locally with the bound as the reported MTU and never hits the wire.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

e2e_init

A_IP=192.0.2.11 B_IP=192.0.2.12           # underlay ("the wire")
A_TUN=10.244.0.1 B_TUN=10.244.1.1         # tunl0 addresses (pod blocks below)
tmp=$(mktemp -d)

e2e_bin

# topology EXTMTU ICV: fresh nodes A and B with ESP between them.
topology() {
    local ext=$1 icv=$2
    e2e_cleanup
    wire_up
    node_add a "$A_IP/24" "$ext"
    node_add b "$B_IP/24" "$ext"
    node_ipip a "$A_TUN" $((ext - 20))     # Calico: tunl0 = EXTMTU - 20, above the bound
    node_ipip b "$B_TUN" $((ext - 20))
    node_route_ipip a 10.244.1.0/26 "$B_IP"
    node_route_ipip b 10.244.0.0/26 "$A_IP"
    esp_pair a "$A_IP" b "$B_IP" "$icv"
}

# ping_df SIZE: one DF ping of an IP packet of SIZE bytes, tunl0 to tunl0.
ping_df() {
    nsx a ping -n -c 1 -W 5 -M 'do' -s $(($1 - 28)) -I "$A_TUN" "$B_TUN" 2>&1
}

summary=()
# E2E_MTU_EXT overrides the link MTUs tried (e.g. "1499 1500 9000").
read -ra ext_mtus <<<"${E2E_MTU_EXT:-1500 9000}"
for ext in "${ext_mtus[@]}"; do
    for icv in 64 96 128; do
        case_="EXTMTU $ext ICV $icv"
        if ! bound=$("$bin" mtu --ext-mtu "$ext" --icv "$icv") || [[ ! $bound =~ ^[0-9]+$ ]]; then
            fail "$case_: '$bin mtu --ext-mtu $ext --icv $icv' printed '$bound', not an integer"
            continue
        fi
        topology "$ext" "$icv"
        cap_start wire w-a "$tmp/wire.pcap"      # node A's port on the wire
        out0=$(xfrm_packets a "$A_IP" "$B_IP" "$ESP_SPI_AB")
        in0=$(xfrm_packets b "$A_IP" "$B_IP" "$ESP_SPI_AB")

        # At the bound: passes, and both directions went through the SAs.
        if res=$(ping_df "$bound"); then
            pass "$case_: DF ping of $bound bytes gets a reply"
        else
            fail "$case_: DF ping of $bound bytes failed:"
            indent <<<"$res"
        fi
        out1=$(xfrm_packets a "$A_IP" "$B_IP" "$ESP_SPI_AB")
        in1=$(xfrm_packets b "$A_IP" "$B_IP" "$ESP_SPI_AB")
        check_eq "$case_: A's outbound SA counted the request" $((out1 - out0)) 1
        check_eq "$case_: B's inbound SA counted the request" $((in1 - in0)) 1

        # One byte more: refused on A with the bound as the path MTU
        # ("Frag needed ... (mtu = N)" first, "message too long, mtu=N" after).
        for try in 1 2; do
            if res=$(ping_df $((bound + 1))); then
                fail "$case_: DF ping of $((bound + 1)) bytes got through (try $try)"
            else
                check_match "$case_: DF ping of $((bound + 1)) bytes refused with mtu $bound (try $try)" \
                    "$res" "(Frag needed and DF set \(mtu = $bound\)|message too long, mtu=$bound)\$"
            fi
        done
        out2=$(xfrm_packets a "$A_IP" "$B_IP" "$ESP_SPI_AB")
        check_eq "$case_: the refused pings never reached the SA" "$out2" "$out1"
        route=$(ipn a route get "$B_TUN" from "$A_TUN")
        kernel=$(grep -Eo 'mtu [0-9]+' <<<"$route" | awk '{print $2; exit}' || true)
        check_eq "$case_: kernel path MTU to the peer's inner address" "${kernel:-none}" "$bound"

        # The wire: ESP only between the nodes, and the bound fills the link.
        cap_stop
        pkts=$(cap_ipv4 "$tmp/wire.pcap")
        esp=$(awk '$1 == "ESP"' <<<"$pkts" | wc -l)
        other=$(awk '$1 != "ESP"' <<<"$pkts")
        check_eq "$case_: ESP packets on the wire (request + reply)" "$esp" 2
        check_eq "$case_: non-ESP IPv4 packets on the wire" "$other" ""
        # outer IP 20 + ESP 8 + IV 8 + payload padded to 4 with the 2-byte
        # trailer + ICV; at 1500 and 9000 that is exactly EXTMTU.
        maxlen=$(awk '$1 == "ESP" && $2 > m { m = $2 } END { print m + 0 }' <<<"$pkts")
        want=$((36 + (bound + 2 + 3) / 4 * 4 + icv / 8))
        check_eq "$case_: ESP packets on the wire are $want bytes" "$maxlen" "$want"
        check_ge "$case_: ... which fits the link MTU" $((ext - maxlen)) 0
        errs=$(xfrm_errors a)$(xfrm_errors b)
        check_eq "$case_: /proc/net/xfrm_stat errors" "$errs" ""

        summary+=("EXTMTU=$ext ICV=$icv: calico-ipsec=$bound kernel=${kernel:-none} formula=$(mtu_formula "$ext" "$icv") wire-max=$maxlen")
    done
done

for line in "${summary[@]}"; do info "$line"; done
rm -rf "$tmp"
e2e_finish
