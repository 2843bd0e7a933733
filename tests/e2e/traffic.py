#!/usr/bin/env python3
"""Continuous test traffic with exact accounting, for the lifecycle suites.

  traffic.py ping DST OUT.json [RATE]      ICMP echo at RATE/s (default 100)
                                           until SIGTERM, then waits 3 s for
                                           late replies
  traffic.py sink PORT OUT.json            accept one TCP stream, hash it
  traffic.py source DST PORT OUT.json      send a deterministic stream until
                                           SIGTERM, then close cleanly
  traffic.py report PING.json TIMELINE     packets sent and lost per phase

Each echo carries a 64-bit counter in its payload, so replies are matched
exactly (ICMP sequence numbers wrap) and every lost one is known by its send
time. The TCP stream is SHA-256 hashed on both ends; a reset or any other
socket error is recorded, not hidden.

TIMELINE lines: "UNIX_TIME LABEL" (the suite writes one at each change).
"""
import hashlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time

stop = False


def on_term(_sig, _frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(dst, out, rate=100.0):
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    interval = 1.0 / rate
    sent = []  # (counter, send time)
    received = set()
    counter = 0
    start = time.time()
    next_at = start

    def drain(timeout):
        r, _, _ = select.select([sock], [], [], max(timeout, 0))
        while r:
            pkt = sock.recv(2048)
            ihl = (pkt[0] & 0x0F) * 4
            icmp = pkt[ihl:]
            if len(icmp) >= 16 and icmp[0] == 0:
                rid = struct.unpack("!H", icmp[4:6])[0]
                if rid == ident:
                    received.add(struct.unpack("!Q", icmp[8:16])[0])
            r, _, _ = select.select([sock], [], [], 0)

    while not stop:
        now = time.time()
        if now >= next_at:
            body = struct.pack("!Q", counter) + b"calico-ipsec-e2e" * 3
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, counter & 0xFFFF)
            hdr = struct.pack("!BBHHH", 8, 0, checksum(hdr + body), ident, counter & 0xFFFF)
            try:
                sock.sendto(hdr + body, (dst, 0))
            except OSError as e:
                # A local refusal (e.g. no route, no SA) is a lost packet too.
                print("send %d: %s" % (counter, e), file=sys.stderr)
            sent.append((counter, now))
            counter += 1
            next_at += interval
            # Never try to catch up in a burst after a stall.
            if next_at < now - 0.5:
                next_at = now
        drain(next_at - time.time())
    deadline = time.time() + 3
    while time.time() < deadline and len(received) < len(sent):
        drain(deadline - time.time())
    lost = [c for c, _ in sent if c not in received]
    with open(out, "w") as f:
        json.dump({"sent": sent, "lost": lost, "received": len(received)}, f)
    print("ping %s: %d sent, %d received, %d lost" % (dst, len(sent), len(received), len(lost)))


def block(i):
    return hashlib.sha256(b"calico-ipsec stream %d" % i).digest() * 32  # 1 KiB


def sink(port, out):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", int(port)))
    srv.listen(1)
    conn, peer = srv.accept()
    h = hashlib.sha256()
    n = 0
    err = None
    try:
        while True:
            b = conn.recv(65536)
            if not b:
                break
            h.update(b)
            n += len(b)
    except OSError as e:
        err = repr(e)
    with open(out, "w") as f:
        json.dump({"bytes": n, "sha256": h.hexdigest(), "error": err, "peer": peer[0]}, f)


def source(dst, port, out, rate_blocks=64):
    s = socket.create_connection((dst, int(port)), timeout=30)
    h = hashlib.sha256()
    n = 0
    i = 0
    err = None
    interval = 1.0 / rate_blocks
    try:
        while not stop:
            b = block(i)
            s.sendall(b)
            h.update(b)
            n += len(b)
            i += 1
            time.sleep(interval)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(30)
        while s.recv(4096):
            pass
        s.close()
    except OSError as e:
        err = repr(e)
    with open(out, "w") as f:
        json.dump({"bytes": n, "sha256": h.hexdigest(), "error": err}, f)


def report(ping_json, timeline):
    with open(ping_json) as f:
        p = json.load(f)
    marks = []
    with open(timeline) as f:
        for line in f:
            t, _, label = line.strip().partition(" ")
            if t:
                marks.append((float(t), label))
    marks.sort()
    lost = set(p["lost"])
    rows = []
    for i, (t0, label) in enumerate(marks):
        t1 = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        in_seg = [c for c, ts in p["sent"] if t0 <= ts < t1]
        rows.append((label, t1 - t0 if t1 != float("inf") else None, len(in_seg), sum(1 for c in in_seg if c in lost)))
    before = [c for c, ts in p["sent"] if marks and ts < marks[0][0]]
    print("%-34s %8s %8s %6s" % ("phase", "seconds", "sent", "lost"))
    if before:
        print("%-34s %8s %8d %6d" % ("(before the first mark)", "-", len(before), sum(1 for c in before if c in lost)))
    for label, secs, sent, nlost in rows:
        print("%-34s %8s %8d %6d" % (label, "%.1f" % secs if secs is not None else "-", sent, nlost))
    print("%-34s %8s %8d %6d" % ("total", "", len(p["sent"]), len(lost)))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ping":
        ping(args[0], args[1], float(args[2]) if len(args) > 2 else 100.0)
    elif cmd == "sink":
        sink(args[0], args[1])
    elif cmd == "source":
        source(args[0], args[1], args[2])
    elif cmd == "report":
        report(args[0], args[1])
    else:
        sys.exit("unknown command " + cmd)
