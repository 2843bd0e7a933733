#!/usr/bin/env python3
"""Computes the key-agreement test vectors of src/keys/agreement.rs from
the README's text alone: Python's cryptography for P-256, hmac/hashlib for
HKDF-SHA256 and HMAC (through tests/e2e/esp_decrypt.py, which follows the
same text to decrypt the VM suites' captures). The Rust test pins what this
prints.
"""
import hashlib
import hmac
import os
import struct
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "e2e"))
from esp_decrypt import hkdf_sha256, name_field, sa_info  # noqa: E402

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives import serialization


def pair(byte):
    priv = ec.derive_private_key(int.from_bytes(bytes([byte]) * 32, "big"), ec.SECP256R1())
    pub = priv.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)
    return priv, pub


def main():
    secret = bytes([0x11]) * 32
    guid = "5e6d2c1a-0b7f-4c3e-9a21-7f3b2d9c8e01"
    epoch, sender, inc, receiver = 7, "node-1", 2, "node-2"
    a, pa = pair(1)
    b, pb = pair(2)
    z = a.exchange(ec.ECDH(), b.public_key())
    assert z == b.exchange(ec.ECDH(), a.public_key())
    for bits, length in ((128, 20), (256, 36)):
        info = sa_info(epoch, sender, inc, receiver, 0, bits) + pa + pb
        print("sa_key_%d=%s" % (bits, hkdf_sha256(secret + z, guid.encode(), info, length).hex()))
    k_mac = hkdf_sha256(secret, guid.encode(), b"calico-ipsec/v1/pubkey-mac" + struct.pack(">I", epoch), 32)
    print("mac_node_1=%s" % hmac.new(k_mac, name_field(sender) + pa, hashlib.sha256).hexdigest())
    print("public_1=%s" % pa.hex())
    print("z=%s" % z.hex())


if __name__ == "__main__" and "--v2" not in sys.argv:
    main()


def v2():
    """Epochs sealed as version 3: the receiver's incarnation in the info,
    and each public key's MAC bound to its incarnation."""
    plain = bytes(range(32))
    g = "5b0e2f9c8d4a4e61b7a39c2d1e0f4a66"
    from esp_decrypt import sa_key
    for bits, lane, rinc in ((128, 0, 1), (128, 1, 1), (128, 0, 2), (256, 0, 1), (256, 3, 7)):
        k = sa_key(plain, g, 1, "node-1", 1, "node-2", lane, bits, rinc)
        print("v2_plain_%d_lane%d_rinc%d=%s" % (bits, lane, rinc, k.hex()))
    secret = bytes([0x11]) * 32
    guid = "5e6d2c1a-0b7f-4c3e-9a21-7f3b2d9c8e01"
    a, pa = pair(1)
    b, pb = pair(2)
    z = a.exchange(ec.ECDH(), b.public_key())
    for bits, length in ((128, 20), (256, 36)):
        info = sa_info(7, "node-1", 2, "node-2", 0, bits, 5) + pa + pb
        print("v2_agreed_%d=%s" % (bits, hkdf_sha256(secret + z, guid.encode(), info, length).hex()))
    k_mac = hkdf_sha256(secret, guid.encode(), b"calico-ipsec/v2/pubkey-mac" + struct.pack(">I", 7), 32)
    print("v2_k_mac=%s" % k_mac.hex())
    msg = name_field("node-1") + struct.pack(">I", 2) + pa
    print("v2_mac_node_1_inc_2=%s" % hmac.new(k_mac, msg, hashlib.sha256).hexdigest())


if __name__ == "__main__" and "--v2" in sys.argv:
    v2()
