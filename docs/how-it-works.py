#!/usr/bin/env python3
"""Draws docs/how-it-works.svg, the picture in the README.

This script is the source of the picture: edit it, then run

    python3 docs/how-it-works.py

It writes docs/how-it-works.svg beside itself. No package outside
Python's standard library is needed.
"""
import os
from xml.sax.saxutils import escape

W, H = 1100, 860
SANS = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"

out = []


def text(x, y, s, size=12, weight="normal", anchor="start", family=SANS, fill="#1a1a1a", italic=False):
    style = ' font-style="italic"' if italic else ""
    out.append(
        f'<text x="{x}" y="{y}" font-family="{family}" font-size="{size}" '
        f'font-weight="{weight}" text-anchor="{anchor}" fill="{fill}"{style}>{escape(s)}</text>'
    )


def box(x, y, w, h, fill, stroke, title=None, dashed=False, radius=8):
    dash = ' stroke-dasharray="6 4"' if dashed else ""
    out.append(
        f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{radius}" ry="{radius}" '
        f'fill="{fill}" stroke="{stroke}" stroke-width="1.5"{dash}/>'
    )
    if title:
        text(x + 10, y + 20, title, size=14, weight="bold")


def lines(x, y, items, size=12, step=16, family=SANS):
    for i, s in enumerate(items):
        text(x, y + i * step, s, size=size, family=family)


def arrow(x1, y1, x2, y2, both=False, color="#444444", width=1.6, dashed=False):
    start = ' marker-start="url(#head)"' if both else ""
    dash = ' stroke-dasharray="5 4"' if dashed else ""
    out.append(
        f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{color}" '
        f'stroke-width="{width}" marker-end="url(#head)"{start}{dash}/>'
    )


def label(x, y, items, anchor="middle", size=11):
    for i, s in enumerate(items):
        text(x, y + i * 13, s, size=size, anchor=anchor, fill="#333333", italic=True)


# Colours: etcd blue, manager orange, node grey, agent/plugin green,
# kernel purple, phases from grey (off) to dark green (enforce).
ETCD = ("#e8f1fb", "#2f6db3")
MANAGER = ("#fdf0e1", "#c2721a")
CLI = ("#f4f4f4", "#777777")
NODE = ("#fafafa", "#555555")
AGENT = ("#e9f6ec", "#2e8a48")
KERNEL = ("#f1ebf8", "#6b4aa0")

out.append(
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
    f'viewBox="0 0 {W} {H}" role="img" aria-labelledby="title desc">'
)
out.append("<title id=\"title\">How calico-ipsec works</title>")
out.append(
    "<desc id=\"desc\">etcd holds Calico's records and calico-ipsec's records under "
    "/calico/ipsec/v1/. A leader-elected manager steps the phase and rotates key epochs. "
    "On every node an agent and the chained CNI plugin converge the kernel's XFRM states "
    "and policies and an nftables guard from etcd. Traffic between nodes is ESP. "
    "Phases: off, accept, encrypt, enforce.</desc>"
)
out.append(
    '<defs><marker id="head" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="8" '
    'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
    'fill="#444444"/></marker></defs>'
)
out.append(f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>')

text(20, 30, "How calico-ipsec works", size=18, weight="bold")

# --- Row 1: the CLI, etcd, the manager --------------------------------------
box(20, 60, 200, 150, *CLI, title="calico-ipsec CLI")
lines(30, 102, ["(the operator)", "keys init", "keys rotate", "enable / disable", "status / converge"], size=12)

box(300, 50, 500, 220, *ETCD, title="etcd: Calico's datastore")
rows = [
    ("/calico/resources/v3/…", "Calico: nodes, pools, clusterGUID"),
    ("/calico/ipam/v2/…", "Calico: block affinities, blocks"),
    ("/calico/ipsec/v1/config", "phase, target_phase, generation"),
    ("/calico/ipsec/v1/epochs/<n>", "state, cipher, sealed secret"),
    ("/calico/ipsec/v1/nodeids/<node>", "node id, incarnation"),
    ("/calico/ipsec/v1/pubkeys/<e>/<node>", "P-256 key + MAC"),
    ("/calico/ipsec/v1/nodes/<node>", "agent status (leased)"),
    ("/calico/ipsec/v1/manager/leader", "leader record (leased)"),
]
for i, (k, v) in enumerate(rows):
    y = 96 + i * 20
    text(312, y, k, size=11, family=MONO, fill="#1d3f66")
    text(575, y, v, size=11)
text(312, 258, "No secret in clear: epoch secrets are sealed under the KEK.", size=11, italic=True, fill="#333333")

box(880, 50, 200, 220, *MANAGER, title="manager")
lines(890, 92, [
    "2 replicas, 1 leader",
    "(lease on manager/leader)",
    "steps the phase",
    "adds, activates, retires",
    "and deletes key epochs",
    "(a new one every",
    "rotation_interval_seconds)",
    "each step only once every",
    "live node has followed",
], size=12, step=17)
text(890, 258, "every write is fenced", size=11, italic=True, fill="#333333")

arrow(220, 130, 300, 130)
label(260, 118, ["writes"])
arrow(800, 150, 880, 150, both=True)
label(840, 138, ["txn"])
label(840, 168, ["reads", "statuses"])

# --- Row 2: two nodes --------------------------------------------------------
def node(x, name, peer_side):
    y = 360
    box(x, y, 510, 340, *NODE, title=name)
    # the agent
    box(x + 15, y + 35, 225, 100, *AGENT)
    text(x + 25, y + 55, "agent (DaemonSet)", size=13, weight="bold")
    lines(x + 25, y + 74, [
        "watches etcd, converges at once",
        "publishes nodes/<node>",
        "/metrics, /livez, /readyz",
    ], size=11, step=15)
    # the CNI plugin
    box(x + 260, y + 35, 235, 100, *AGENT)
    text(x + 270, y + 55, "CNI plugin (after calico)", size=13, weight="bold")
    lines(x + 270, y + 74, [
        "kubelet ADD: converge first,",
        "then clamp the pod MTU",
        "so that ESP fits",
    ], size=11, step=15)
    # the kernel
    box(x + 15, y + 165, 480, 110, *KERNEL)
    text(x + 25, y + 185, "kernel", size=13, weight="bold")
    lines(x + 25, y + 205, [
        "XFRM states: one ESP SA per peer, direction, lane, epoch",
        "XFRM policies: per peer (priority 0xCA1C), catch-all block (0xCA1D)",
        "nftables guard: table inet calico_ipsec drops IPIP, VXLAN and",
        "pod packets that the kernel is not about to encrypt",
    ], size=11, step=16)
    arrow(x + 127, y + 135, x + 127, y + 165)
    arrow(x + 377, y + 135, x + 377, y + 165)
    label(x + 252, y + 155, ["netlink, nft"])
    # the pods
    box(x + 15, y + 290, 480, 36, "#ffffff", "#999999", radius=4)
    text(x + 25, y + 313, "pods: IPIP, VXLAN or routed (no tunnel) toward other nodes", size=11)
    return y


y = node(20, "node-1", "right")
node(570, "node-2", "left")

# etcd to the agents and plugins
arrow(420, 270, 155, y + 35, both=True)
label(255, 300, ["watch; status,", "identity, pubkeys"], anchor="middle")
arrow(470, 270, 400, y + 35)
label(470, 322, ["read (ADD)"], anchor="start")
arrow(680, 270, 705, y + 35, both=True)
label(640, 322, ["watch; status,"], anchor="end")
label(640, 335, ["identity, pubkeys"], anchor="end")
arrow(730, 270, 950, y + 35)
label(800, 300, ["read (ADD)"], anchor="start")

# the wire
wy = 740
out.append(f'<line x1="60" y1="{wy}" x2="1040" y2="{wy}" stroke="#6b4aa0" stroke-width="5"/>')
arrow(275, y + 340, 275, wy - 3, color="#6b4aa0")
arrow(825, y + 340, 825, wy - 3, color="#6b4aa0")
text(550, wy - 10, "the wire between nodes: ESP only, rfc4106(gcm(aes))", size=13, weight="bold", anchor="middle", fill="#4a2f78")

# --- Row 3: the phases ---------------------------------------------------------
text(20, 780, "Phases, stepped by the manager (enable: left to right; disable: the same steps back):", size=13, weight="bold")
phases = [
    ("off", "no IPsec state", "#eeeeee", "#777777"),
    ("accept", "SAs both ways; clear accepted", "#e6f2e6", "#5a9a5a"),
    ("encrypt", "outbound policies: send ESP", "#cfe8cf", "#3d8a3d"),
    ("enforce", "inbound: clear refused", "#a9d6a9", "#2a6e2a"),
]
bw, gap, x0, py = 230, 50, 20, 795
for i, (name, what, fill, stroke) in enumerate(phases):
    x = x0 + i * (bw + gap)
    box(x, py, bw, 50, fill, stroke, radius=6)
    text(x + bw / 2, py + 21, name, size=14, weight="bold", anchor="middle", family=MONO)
    text(x + bw / 2, py + 39, what, size=11, anchor="middle")
    if i < len(phases) - 1:
        arrow(x + bw + 4, py + 25, x + bw + gap - 4, py + 25, both=True)

out.append("</svg>")

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "how-it-works.svg"), "w", encoding="utf-8") as f:
    f.write("\n".join(out) + "\n")
