#!/usr/bin/env python3
"""Continuous test traffic with exact accounting, for the lifecycle suites.

  traffic.py ping DST OUT.json [RATE]      ICMP echo at RATE/s (default 100)
                                           until SIGTERM, then waits 3 s for
                                           late replies
  traffic.py udp DST PORT OUT.json [RATE]  sequenced UDP datagrams at RATE/s
                                           to an udp-echo, counted as ping
  traffic.py udp-echo PORT                 send every datagram back
  traffic.py sink PORT OUT.json            accept one TCP stream, hash it
  traffic.py source DST PORT OUT.json      send a deterministic stream until
                                           SIGTERM, then close cleanly
  traffic.py report PING.json LOG...       packets sent and lost per phase

LOG files give the phase boundaries: the managers' logs (their "phase
advanced", "epoch activated", "epochs retired" and "deleted" lines, by their
RFC 3339 timestamps) and the suite's own marks ("UNIX_TIME LABEL" lines).

Each echo carries a 64-bit counter in its payload, so replies are matched
exactly (ICMP sequence numbers wrap) and every lost one is known by its send
time. The TCP stream is SHA-256 hashed on both ends; a reset or any other
socket error is recorded, not hidden.

"""
import datetime
import hashlib
import re
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


def exchange(label, sock, send, parse, out, rate):
    """Sends one numbered probe every 1/RATE s until SIGTERM, counts the
    numbered answers, waits 3 s for late ones, writes OUT."""
    interval = 1.0 / rate
    sent = []  # (counter, send time)
    received = set()
    counter = 0
    next_at = time.time()

    def drain(timeout):
        r, _, _ = select.select([sock], [], [], max(timeout, 0))
        while r:
            c = parse(sock.recv(2048))
            if c is not None:
                received.add(c)
            r, _, _ = select.select([sock], [], [], 0)

    while not stop:
        now = time.time()
        if now >= next_at:
            try:
                send(counter)
            except OSError as e:
                # A local refusal (e.g. no route, no SA) is a lost packet too.
                print("%.6f send %d: %s" % (now, counter, e), file=sys.stderr)
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
    print("%s: %d sent, %d received, %d lost" % (label, len(sent), len(received), len(lost)))


PAYLOAD = b"calico-ipsec-e2e" * 3


def roomy(sock):
    """Gives SOCK a 4 MiB receive buffer and returns it. Under TCG a
    traffic.py can stall for most of a second while agents restart; with
    the default buffer (about 40 datagrams after ESP) the kernel then drops
    datagrams for a full buffer (Udp RcvbufErrors), and the run would count
    them as lost by the data plane."""
    try:
        # SO_RCVBUFFORCE (root): past net.core.rmem_max.
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 4 << 20)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def ping(dst, out, rate=100.0):
    sock = roomy(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
    ident = os.getpid() & 0xFFFF

    def send(counter):
        body = struct.pack("!Q", counter) + PAYLOAD
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, counter & 0xFFFF)
        hdr = struct.pack("!BBHHH", 8, 0, checksum(hdr + body), ident, counter & 0xFFFF)
        sock.sendto(hdr + body, (dst, 0))

    def parse(pkt):
        icmp = pkt[(pkt[0] & 0x0F) * 4:]
        if len(icmp) >= 16 and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            return struct.unpack("!Q", icmp[8:16])[0]
        return None

    exchange("ping " + dst, sock, send, parse, out, rate)


def udp(dst, port, out, rate=100.0):
    """Sequenced UDP datagrams to an `udp-echo` at DST:PORT; each carries a
    64-bit counter and a random run id, and counts once it comes back."""
    sock = roomy(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    run = os.urandom(8)

    def send(counter):
        sock.sendto(run + struct.pack("!Q", counter) + PAYLOAD, (dst, int(port)))

    def parse(d):
        if len(d) >= 16 and d[:8] == run:
            return struct.unpack("!Q", d[8:16])[0]
        return None

    exchange("udp %s:%s" % (dst, port), sock, send, parse, out, rate)


def udp_echo(port):
    """Sends every datagram back to where it came from, until SIGTERM."""
    sock = roomy(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sock.bind(("0.0.0.0", int(port)))
    while not stop:
        r, _, _ = select.select([sock], [], [], 0.2)
        if r:
            d, peer = sock.recvfrom(2048)
            try:
                sock.sendto(d, peer)
            except OSError as e:
                # The sender counts it lost; say why, for the kept logs.
                print("%.6f echo to %s: %s" % (time.time(), peer[0], e), file=sys.stderr)


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


MANAGER_EVENTS = [
    (re.compile(r"phase advanced.*from=(\w+) to=(\w+)"), lambda m: "phase %s -> %s" % (m.group(1).lower(), m.group(2).lower())),
    (re.compile(r"epoch activated.*epoch=(\d+)"), lambda m: "epoch %s active" % m.group(1)),
    (re.compile(r"epochs retired.*epochs=\[([\d, ]+)\]"), lambda m: "epoch %s retired" % m.group(1)),
    (re.compile(r"retired epoch deleted.*epoch=(\d+)"), lambda m: "epoch %s deleted" % m.group(1)),
]


def marks_from(paths):
    marks = []
    for path in paths:
        with open(path, errors="replace") as f:
            for line in f:
                head, _, rest = line.strip().partition(" ")
                try:
                    marks.append((float(head), rest))
                    continue
                except ValueError:
                    pass
                try:
                    t = datetime.datetime.strptime(head, "%Y-%m-%dT%H:%M:%S.%fZ")
                except ValueError:
                    continue
                t = t.replace(tzinfo=datetime.timezone.utc).timestamp()
                for rx, label in MANAGER_EVENTS:
                    m = rx.search(rest)
                    if m:
                        marks.append((t, label(m)))
    return sorted(marks)


def report(ping_json, logs):
    with open(ping_json) as f:
        p = json.load(f)
    marks = marks_from(logs)
    lost = set(p["lost"])
    print("%-28s %8s %8s %6s" % ("from", "seconds", "sent", "lost"))
    edges = [(float("-inf"), "(start)")] + marks + [(float("inf"), None)]
    for (t0, label), (t1, _) in zip(edges, edges[1:]):
        seg = [c for c, ts in p["sent"] if t0 <= ts < t1]
        if label == "(start)" and not seg:
            continue
        secs = "%.1f" % (t1 - t0) if t0 != float("-inf") and t1 != float("inf") else "-"
        print("%-28s %8s %8d %6d" % (label, secs, len(seg), sum(1 for c in seg if c in lost)))
    print("%-28s %8s %8d %6d" % ("total", "", len(p["sent"]), len(lost)))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "ping":
        ping(args[0], args[1], float(args[2]) if len(args) > 2 else 100.0)
    elif cmd == "udp":
        udp(args[0], args[1], args[2], float(args[3]) if len(args) > 3 else 100.0)
    elif cmd == "udp-echo":
        udp_echo(args[0])
    elif cmd == "sink":
        sink(args[0], args[1])
    elif cmd == "source":
        source(args[0], args[1], args[2])
    elif cmd == "report":
        report(args[0], args[1:])
    else:
        sys.exit("unknown command " + cmd)
