#!/usr/bin/env python3
"""Decrypt captured ESP with keys derived independently of calico-ipsec.

Usage: esp_decrypt.py PCAP ETCD_DUMP KEK_FILE MARKER [POD_CIDRS]

ETCD_DUMP is `etcdctl get --prefix /calico/ -w json`. From it and the KEK
this script opens each epoch secret (AES-256-GCM, the AAD of seal_aad(),
value = base64(nonce || ciphertext || tag)) and
derives each SA's key exactly as the README documents:

    okm = HKDF-SHA256(IKM = epoch secret, salt = clusterGUID,
                      info = "calico-ipsec/v1/sa" || u32 epoch
                             || u16 len || sender || u32 incarnation
                             || u16 len || receiver || suffix,
                      L = 20 (AES-128) or 36 (AES-256))

An epoch sealed as version 3 ("seal": 3) uses the v2 derivation: the
label is "calico-ipsec/v2/sa" and u32 receiver incarnation follows the
receiver's name (before the suffix); with key agreement, each node's public
key belongs to one incarnation (pubkeys/<epoch>/<node>/<incarnation>), and the SPI's incarnation byte
holds the low 4 bits of the sender's incarnation, then of the receiver's.

The lane is 0 for IPv4 transport (IPIP, VXLAN), 1 for IPv4 tunnel mode, 2
for IPv6 transport (VXLAN over IPv6), 3 for IPv6 tunnel mode. For AES-128
the suffix is u8 lane, only when the lane is not 0; for AES-256 (the
epoch record's key_bits) it is u8 lane || 0x20, always. The AES key is
okm[:-4], the salt okm[-4:]. The SPI's bit 15 says tunnel mode; its low 15 bits
are the sender's node id.

HKDF is written out here with hmac/hashlib; AES-GCM comes from the
`cryptography` package. Every ESP packet between nodes must authenticate
(rfc4106 with extended sequence numbers: AAD = SPI || seq_hi || seq_lo),
carry IPIP or an IPv4 pod packet (next header 4), VXLAN (17) or an IPv6 pod
packet (41), and MARKER must appear in some plaintext. With POD_CIDRS
(comma-separated), any packet on the wire with a pod address in its outer
header counts as plaintext too. Prints a summary line and exits non-zero on
any failure.
"""
import base64
import hashlib
import hmac
import ipaddress
import json
import struct
import sys

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def hkdf_sha256(ikm, salt, info, length):
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


def name_field(name):
    b = name.encode()
    return struct.pack(">H", len(b)) + b


def sa_info(epoch, sender, incarnation, receiver, lane=0, key_bits=128, rinc=None):
    label = b"calico-ipsec/v1/sa" if rinc is None else b"calico-ipsec/v2/sa"
    info = (label + struct.pack(">I", epoch) + name_field(sender)
            + struct.pack(">I", incarnation) + name_field(receiver))
    if rinc is not None:
        info += struct.pack(">I", rinc)
    if key_bits == 256:
        return info + bytes([lane, 0x20])
    return info + (bytes([lane]) if lane else b"")


def okm_len(key_bits):
    return 36 if key_bits == 256 else 20


def sa_key(secret, guid, epoch, sender, incarnation, receiver, lane=0, key_bits=128, rinc=None):
    info = sa_info(epoch, sender, incarnation, receiver, lane, key_bits, rinc)
    return hkdf_sha256(secret, guid.encode(), info, okm_len(key_bits))


def agreed_key(secret, guid, epoch, sender, incarnation, receiver, lane, key_bits, pubs, privs, rinc=None):
    """The key of an epoch with key agreement (docs/spec.md, "Per-node key
    agreement"); None when neither end's private key is at hand. For keys
    per incarnation (rinc given), pubs is keyed by (epoch, node, incarnation)."""
    if rinc is None:
        ps, pr = pubs.get((epoch, sender)), pubs.get((epoch, receiver))
    else:
        ps, pr = pubs.get((epoch, sender, incarnation)), pubs.get((epoch, receiver, rinc))
    if ps is None or pr is None:
        return None
    from cryptography.hazmat.primitives import serialization

    def own(node, public):
        for k in privs.get((epoch, node), []):
            if k.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint) == public:
                return k
        return None
    if own(sender, ps) is not None:
        mine, theirs = own(sender, ps), pr
    elif own(receiver, pr) is not None:
        mine, theirs = own(receiver, pr), ps
    else:
        return None
    peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), theirs)
    z = mine.exchange(ec.ECDH(), peer)
    info = sa_info(epoch, sender, incarnation, receiver, lane, key_bits, rinc) + ps + pr
    return hkdf_sha256(secret + z, guid.encode(), info, okm_len(key_bits))


def load_privs(spec, kek_file):
    """ESP_AGREEMENT_DIRS="node-1=/dir,node-2=/dir": the nodes' epoch
    private keys (<dir>/<epoch>-<tag>.key, 64 hex characters of the
    big-endian scalar), by (epoch, node). Unset: every agreement-<node>
    directory beside the KEK file (the VM suites' layout)."""
    import os
    if spec is None:
        base = os.path.dirname(os.path.abspath(kek_file))
        spec = ",".join(f"{d[len('agreement-'):]}={os.path.join(base, d)}"
                        for d in sorted(os.listdir(base)) if d.startswith("agreement-"))
    privs = {}
    for item in filter(None, spec.split(",")):
        node, d = item.split("=", 1)
        for f in os.listdir(d) if os.path.isdir(d) else []:
            # <epoch>-<tag>.key; the tag tells epochs of the same number
            # apart, and the public key in etcd picks the right file below.
            e = f[:-4].split("-", 1)[0] if f.endswith(".key") else ""
            if e.isdigit():
                scalar = int(open(os.path.join(d, f)).read().strip(), 16)
                privs.setdefault((int(e), node), []).append(ec.derive_private_key(scalar, ec.SECP256R1()))
    return privs


def load_etcd(path):
    kvs = {}
    for kv in json.load(open(path)).get("kvs", []):
        try:
            kvs[base64.b64decode(kv["key"]).decode()] = json.loads(base64.b64decode(kv["value"]))
        except ValueError:
            pass  # a malformed record (the fault suites plant some)
    return kvs


def read_pcap(path):
    data = open(path, "rb").read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    off = 24
    while off + 16 <= len(data):
        _, _, incl, orig = struct.unpack(endian + "IIII", data[off:off + 16])
        off += 16
        frame = data[off:off + incl]
        off += incl
        if incl != orig:
            yield None  # truncated: cannot be checked
            continue
        if linktype == 1:  # Ethernet
            if len(frame) < 14 or frame[12:14] not in (b"\x08\x00", b"\x86\xdd"):
                continue
            yield frame[14:]
        elif linktype == 113:  # Linux cooked
            if frame[14:16] not in (b"\x08\x00", b"\x86\xdd"):
                continue
            yield frame[16:]


def seal_aad(rec, guid):
    """The AAD an epoch record's secret was sealed with: version 1 binds the
    epoch number; version 2 ("seal": 2) length-prefixes the epoch, algorithm,
    key bits, ICV bits, agreement and clusterGUID (docs/spec.md)."""
    n = rec["epoch"]
    label = b"calico-ipsec/v3/epoch-seal" if rec.get("seal", 1) == 3 else b"calico-ipsec/v2/epoch-seal"
    if rec.get("seal", 1) == 1:
        return f"calico-ipsec/v1/epoch/{n}".encode()
    icv = rec.get("icv_bits")
    fields = [struct.pack(">I", n), rec["algorithm"].encode(), struct.pack(">I", rec.get("key_bits", 128)),
              struct.pack(">I", icv) if icv is not None else b"", (rec.get("agreement") or "").encode(),
              guid.encode()]
    return label + b"".join(struct.pack(">I", len(f)) + f for f in fields)


def main():
    pcap, dump, kek_file, marker = sys.argv[1:5]
    pods = [ipaddress.ip_network(c) for c in sys.argv[5].split(",")] if len(sys.argv) > 5 else []
    # "hex:..." names raw bytes (e.g. a ping -p pattern); otherwise text.
    marker = bytes.fromhex(marker[4:]) if marker.startswith("hex:") else marker.encode()
    kek = bytes.fromhex(open(kek_file).read().strip())
    kvs = load_etcd(dump)
    guid = kvs["/calico/resources/v3/projectcalico.org/clusterinformations/default"]["spec"]["clusterGUID"]
    secrets, key_bits, per_inc = {}, {}, {}
    for k, v in kvs.items():
        if k.startswith("/calico/ipsec/v1/epochs/"):
            try:
                n = v["epoch"]
                raw = base64.b64decode(v["sealedSecret"] if "sealedSecret" in v else v["sealed_secret"])
                secrets[n] = AESGCM(kek).decrypt(raw[:12], raw[12:], seal_aad(v, guid))
                key_bits[n] = v.get("key_bits", 128)
                per_inc[n] = v.get("seal", 1) >= 3
            except Exception:  # noqa: BLE001 - a planted record without a secret
                pass
    agreement = {k2: v.get("agreement") for k2, v in
                 ((v["epoch"], v) for k, v in kvs.items() if k.startswith("/calico/ipsec/v1/epochs/")
                  and isinstance(v, dict) and "epoch" in v)}
    pubs = {}
    for k, v in kvs.items():
        if k.startswith("/calico/ipsec/v1/pubkeys/"):
            parts = k[len("/calico/ipsec/v1/pubkeys/"):].split("/")
            key = (int(parts[0]), parts[1]) + ((int(parts[2]),) if len(parts) == 3 else ())
            pubs[key] = base64.b64decode(v["public"])
    import os
    privs = load_privs(os.environ.get("ESP_AGREEMENT_DIRS"), kek_file)
    ids, ips, incs = {}, {}, {}
    for k, v in kvs.items():
        if k.startswith("/calico/ipsec/v1/nodeids/"):
            ids[v["id"]] = (k.rsplit("/", 1)[1], v.get("incarnation", 0))
            incs[k.rsplit("/", 1)[1]] = v.get("incarnation", 0)
        if k.startswith("/calico/resources/v3/projectcalico.org/nodes/"):
            for fam in ("ipv4Address", "ipv6Address"):
                a = v["spec"].get("bgp", {}).get(fam)
                if a:
                    ips[str(ipaddress.ip_address(a.split("/")[0]))] = v["metadata"]["name"]

    counts = {"esp": 0, "ok": 0, "bad": 0, "plain": 0, "truncated": 0, "nokey": 0}
    found = False
    for ip in read_pcap(pcap):
        if ip is None:
            counts["truncated"] += 1
            continue
        if ip[0] >> 4 == 6:
            v6, ihl, proto = True, 40, ip[6]
            src, dst = str(ipaddress.ip_address(ip[8:24])), str(ipaddress.ip_address(ip[24:40]))
            end = 40 + struct.unpack(">H", ip[4:6])[0]
        else:
            v6, ihl, proto = False, (ip[0] & 0x0F) * 4, ip[9]
            src, dst = str(ipaddress.ip_address(ip[12:16])), str(ipaddress.ip_address(ip[16:20]))
            end = struct.unpack(">H", ip[2:4])[0]
        if any(ipaddress.ip_address(a) in n for a in (src, dst) for n in pods
               if ipaddress.ip_address(a).version == n.version):
            counts["plain"] += 1
            print(f"pod address in clear on the wire: proto {proto} {src} -> {dst}")
            continue
        if src not in ips or dst not in ips:
            continue  # not node to node (e.g. etcd traffic to the wire's address)
        if v6 and proto == 58 and len(ip) > 40 and 133 <= ip[40] <= 137:
            continue  # neighbour discovery between the nodes: no pod packet
        if proto != 50:
            counts["plain"] += 1
            print(f"plaintext node-to-node packet: proto {proto} {src} -> {dst}")
            continue
        counts["esp"] += 1
        esp = ip[ihl:end]
        spi, seq = struct.unpack(">II", esp[:8])
        sender_id, inc8, slot = spi & 0x7FFF, (spi >> 16) & 0xFF, spi >> 24
        lane = (2 if v6 else 0) + (1 if spi & 0x8000 else 0)
        try:
            sender, incarnation = ids[sender_id]
            epoch = next(e for e in secrets if e % 255 + 1 == slot)
            assert ips[src] == sender, f"SPI names {sender} but the packet is from {ips[src]}"
            bits = key_bits[epoch]
            receiver = ips[dst]
            if per_inc.get(epoch):
                # The SPI's incarnation byte holds the low 4 bits of each
                # end's incarnation: the sender's is the newest with its
                # bits; the receiver's any it has had with its bits (a
                # capture can span a reboot): GCM's tag tells which.
                sbits, rbits = inc8 >> 4, inc8 & 0x0F
                incarnation -= (incarnation - sbits) % 16
                rincs = [r for r in range(incs.get(receiver, 0), 0, -1) if r % 16 == rbits]
            else:
                assert incarnation % 256 == inc8, "incarnation byte differs from etcd"
                rincs = [None]
            keys = []
            for rinc in rincs:
                if agreement.get(epoch):
                    k = agreed_key(secrets[epoch], guid, epoch, sender, incarnation, receiver, lane,
                                   bits, pubs, privs, rinc)
                else:
                    k = sa_key(secrets[epoch], guid, epoch, sender, incarnation, receiver, lane, bits, rinc)
                if k is not None:
                    keys.append(k)
            if not keys:
                counts["nokey"] += 1  # neither end's private key: cannot be opened
                continue
            iv, body = esp[8:16], esp[16:]
            aad = struct.pack(">III", spi, 0, seq)  # ESN: SPI, seq_hi, seq_lo
            plain = None
            for key in keys:
                try:
                    plain = AESGCM(key[:-4]).decrypt(key[-4:] + iv, body, aad)
                    break
                except Exception:  # noqa: BLE001 - the next candidate
                    if key is keys[-1]:
                        raise
            counts[f"aes{bits}"] = counts.get(f"aes{bits}", 0) + 1
            pad_len, next_header = plain[-2], plain[-1]
            assert next_header in (4, 17, 41), f"next header {next_header}, want 4, 17 or 41"
            counts.setdefault(f"nh{next_header}", 0)
            counts[f"nh{next_header}"] += 1
            inner = plain[:-2 - pad_len]
            if marker in inner:
                found = True
            counts["ok"] += 1
        except Exception as e:  # noqa: BLE001 - report every failure
            counts["bad"] += 1
            print(f"ESP spi 0x{spi:08x} seq {seq} {src} -> {dst}: {type(e).__name__} {e}")
    inner = " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k.startswith(("nh", "aes")))
    print("esp={esp} decrypted={ok} failed={bad} plaintext={plain} truncated={truncated} nokey={nokey}".format(**counts),
          inner,
          f"marker={'found' if found else 'missing'}")
    ok = counts["esp"] > 0 and counts["bad"] == 0 and counts["plain"] == 0 and found
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
