//! The desired XFRM state of one node: a pure function of what etcd says.
//!
//! For every peer and address family, the path of each pod block between the
//! two nodes (see [`crate::datastore::paths`]) decides what protects it:
//! - IPIP or VXLAN: ESP transport mode on the node-to-node packet (outbound
//!   policy on the tunnel's protocol and port, inbound in enforce);
//! - no tunnel: ESP tunnel mode between the nodes' addresses, selecting the
//!   pod blocks (outbound toward the peer's blocks and from this node's pods
//!   to the peer's address; `in` and `fwd` policies for what the peer sends);
//! - blocked: a block policy, so the path is dropped, never left in clear.
//!
//! Each lane (family and mode) has its own SAs per installed epoch: an
//! outbound state me→peer and an inbound state peer→me. By phase (DESIGN §6):
//! - `off`: nothing;
//! - `accept`: the states, plus the `in`/`fwd` tunnel policies with an
//!   optional template (tunnel-mode ESP from a peer would otherwise be
//!   refused as `XfrmInNoPols`, and plaintext must still pass);
//! - `encrypt`: plus the outbound policies picking the active epoch, and
//!   block policies for every path that cannot be protected;
//! - `enforce`: the inbound templates become required, plus the transport
//!   inbound policies, so plaintext from peers is refused.
//!
//! Outbound policies are installed toward every peer, even one that has not
//! published an incarnation yet, or one without a pod block (wherever a pool
//! tunnels): with no SA the kernel drops the traffic rather than sending it
//! in clear. From `encrypt` on, [`catch_all`] block policies under all of
//! them drop the IPIP and VXLAN that no per-peer policy protects (DESIGN
//! §5c); the nftables guard does the same for pod addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

pub use super::view::{PathView, PeerView, Unprotected};
use super::{Action, Dir, Lane, Mode, PolicySpec, SaSpec, Selector, Template};
use super::{PROTO_IPIP, PROTO_UDP};
use crate::datastore::calico::{Node, Topology};
use crate::datastore::ipsec::{EpochRecord, EpochState, Identity, Phase};
use crate::datastore::paths::{Path, PathKind};
use crate::keys;

/// Why the desired state cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    /// This node is not a usable Calico node in the datastore.
    #[error("node {0} is not a usable node in Calico's datastore (no Node resource, or one without spec.bgp.ipv4Address/ipv6Address, or one that shares its address): check the nodename and the Node resource")]
    UnknownNode(String),
    /// Encryption is on but no epoch is active.
    #[error("the phase is {0:?} but no key epoch is active: run `calico-ipsec keys init`, or check /calico/ipsec/v1/epochs/")]
    NoActiveEpoch(Phase),
    /// The cluster has no clusterGUID, which salts every key.
    #[error("Calico's ClusterInformation has no clusterGUID, which salts every key")]
    NoClusterGuid,
    /// This node's id does not fit an SPI.
    #[error("this node's id {0} is above {max}, which an SPI holds (/calico/ipsec/v1/nodeids/): delete its nodeids and ids records so it gets a lower one", max = keys::MAX_NODE_ID)]
    IdTooLarge(u16),
    /// The ICV length in the config is not 64, 96 or 128.
    #[error("/calico/ipsec/v1/config has icvBits {0}; use 64, 96 or 128")]
    BadIcv(u32),
}

/// Everything the desired state depends on.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Calico's nodes and pools.
    pub topology: &'a Topology,
    /// This node's name.
    pub me: &'a str,
    /// This node's id and incarnation (`None` while the phase is off).
    pub my_identity: Option<&'a Identity>,
    /// Every node's id and incarnation.
    pub identities: &'a BTreeMap<String, Identity>,
    /// The cluster's phase.
    pub phase: Phase,
    /// Every epoch record.
    pub epochs: &'a [EpochRecord],
    /// ICV length, in bits, of an epoch whose record names none (one
    /// written before epochs carried their own): the cluster config's.
    pub icv_bits: u32,
    /// For each epoch with key agreement, the nodes whose epoch key this
    /// node can use (this node only when it holds its private key): a pair
    /// gets that epoch's SAs only when both ends are in it.
    pub agreement: &'a BTreeMap<u32, BTreeSet<String>>,
}

/// The states and policies this node should hold.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// States by (dst, spi).
    pub states: BTreeMap<(IpAddr, u32), SaSpec>,
    /// Policies by (dir, selector).
    pub policies: BTreeMap<(Dir, Selector), PolicySpec>,
    /// Every peer considered.
    pub peers: Vec<PeerView>,
    /// Paths that are blocked rather than encrypted.
    pub unprotected: Vec<Unprotected>,
    /// Epochs whose states are installed (pending and active).
    pub installed_epochs: Vec<u32>,
    /// The epoch outbound policies pick.
    pub active_epoch: Option<u32>,
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

fn any(v4: bool) -> IpNet {
    if v4 {
        IpNet::V4(ipnet::Ipv4Net::default())
    } else {
        IpNet::V6(ipnet::Ipv6Net::default())
    }
}

/// What one (peer, family) pair needs, before phases and epochs.
struct Pair {
    /// Peer blocks by outbound path.
    out: Vec<(IpNet, Path)>,
    /// This node's blocks by the path the peer uses toward them.
    inb: Vec<(IpNet, Path)>,
}

impl Pair {
    /// The lanes either direction uses (both nodes compute the same set).
    fn lanes(&self, me: IpAddr) -> BTreeSet<Lane> {
        self.out
            .iter()
            .chain(&self.inb)
            .filter_map(|(_, p)| match p {
                Path::Ipip | Path::Vxlan(_) => Some(Lane::of(me, Mode::Transport)),
                Path::Native => Some(Lane::of(me, Mode::Tunnel)),
                Path::Blocked(_) => None,
            })
            .collect()
    }
}

/// The builder of one computation.
struct Build<'a> {
    i: &'a Inputs<'a>,
    d: Desired,
    /// Installed epochs: number, AES key bits, ICV bits, and whether its
    /// keys bind the receiver's incarnation (sealed as version 3).
    installed: Vec<(u32, u32, u32, bool)>,
    active: Option<u32>,
}

impl Build<'_> {
    fn policy(&mut self, view: &mut PathView, dir: Dir, sel: Selector, action: Action) {
        let p = PolicySpec { dir, sel, action };
        view.policies.push(p.key());
        self.d.policies.insert(p.key(), p);
    }

    fn block_out(&mut self, view: &mut PathView, peer: &str, block: IpNet, reason: &str) {
        if self.i.phase >= Phase::Encrypt {
            let sel = Selector {
                src: any(matches!(block, IpNet::V4(_))),
                dst: block,
                proto: 0,
                dport: 0,
            };
            self.policy(view, Dir::Out, sel, Action::Block);
        }
        self.d.unprotected.push(Unprotected {
            peer: peer.to_string(),
            blocks: vec![block],
            reason: reason.to_string(),
        });
    }

    /// The SAs of one lane with a peer, for every installed epoch.
    #[allow(clippy::too_many_arguments)]
    fn sas(
        &mut self,
        view: &mut PathView,
        lane: Lane,
        peer: &Node,
        (me_ip, peer_ip): (IpAddr, IpAddr),
        mine: Option<&Identity>,
        theirs: Option<&Identity>,
    ) {
        let Some(theirs) = theirs else { return };
        let tunnel = lane.mode() == Mode::Tunnel;
        for (epoch, key_bits, icv_bits, binds) in self.installed.clone() {
            if let Some(ready) = self.i.agreement.get(&epoch) {
                let missing = [self.i.me, peer.name.as_str()]
                    .into_iter()
                    .find(|n| !ready.contains(*n));
                if let Some(n) = missing {
                    let why = format!("waiting for {}'s key for epoch {epoch}", n.escape_debug());
                    if !view.blocked.contains(&why) {
                        view.blocked.push(why);
                    }
                    continue;
                }
            }
            // The SPI names the sender (its id and incarnation) and, for
            // keys that bind both ends, the receiver's incarnation too.
            let base = |dir,
                        (src, dst),
                        sender_id,
                        (sender, inc): (&str, u32),
                        (receiver, rinc): (&str, u32)| SaSpec {
                dir,
                src,
                dst,
                spi: match binds {
                    true => keys::spi_bound(epoch, inc, rinc, sender_id, tunnel),
                    false => keys::spi(epoch, inc, sender_id, tunnel),
                },
                reqid: keys::reqid(epoch),
                epoch,
                sender: sender.to_string(),
                incarnation: inc,
                receiver: receiver.to_string(),
                receiver_incarnation: binds.then_some(rinc),
                icv_bits,
                key_bits,
                lane,
            };
            if let Some(m) = mine {
                let out = base(
                    Dir::Out,
                    (me_ip, peer_ip),
                    m.id,
                    (self.i.me, m.incarnation),
                    (&peer.name, theirs.incarnation),
                );
                view.states.push((Dir::Out, out.key()));
                self.d.states.insert(out.key(), out);
            }
            // Keys that bind the receiver's incarnation need this node's.
            let Some(my_inc) = mine.map(|m| m.incarnation).or((!binds).then_some(0)) else {
                continue;
            };
            let inb = base(
                Dir::In,
                (peer_ip, me_ip),
                theirs.id,
                (&peer.name, theirs.incarnation),
                (self.i.me, my_inc),
            );
            view.states.push((Dir::In, inb.key()));
            self.d.states.insert(inb.key(), inb);
        }
    }

    fn family(
        &mut self,
        me: &Node,
        peer: &Node,
        v4: bool,
        refused: Option<&str>,
    ) -> Option<PathView> {
        let fam = |n: &Node| -> Vec<IpNet> {
            n.blocks
                .iter()
                .filter(|b| matches!(b, IpNet::V4(_)) == v4)
                .copied()
                .collect()
        };
        let (peer_blocks, my_blocks) = (fam(peer), fam(me));
        let t = self.i.topology;
        // A node without a block in this family may still run pods on
        // addresses it borrows later (or that this node has not seen yet):
        // wherever a pool tunnels, the tunnel between the two nodes is
        // protected as if each of its blocks were there.
        let tunnels = |from: &Node, to: &Node| -> Vec<(IpNet, Path)> {
            t.pools
                .iter()
                .filter(|p| matches!(p.cidr, IpNet::V4(_)) == v4)
                .map(|p| (p.cidr, t.path(from, to, &p.cidr)))
                .filter(|(_, p)| matches!(p, Path::Ipip | Path::Vxlan(_)))
                .collect()
        };
        let out_extra = if peer_blocks.is_empty() {
            tunnels(me, peer)
        } else {
            vec![]
        };
        let inb_extra = if my_blocks.is_empty() {
            tunnels(peer, me)
        } else {
            vec![]
        };
        if peer_blocks.is_empty()
            && my_blocks.is_empty()
            && out_extra.is_empty()
            && inb_extra.is_empty()
        {
            return None;
        }
        let mut view = PathView {
            family: if v4 { "ipv4" } else { "ipv6" },
            paths: BTreeSet::new(),
            blocked: Vec::new(),
            states: Vec::new(),
            policies: Vec::new(),
        };
        if let Some(reason) = refused {
            for b in peer_blocks {
                self.block_out(&mut view, &peer.name, b, reason);
            }
            view.paths.insert(PathKind::Blocked);
            view.blocked.push(reason.to_string());
            return Some(view);
        }
        let pair = Pair {
            out: peer_blocks
                .iter()
                .map(|b| (*b, t.path(me, peer, b)))
                .chain(out_extra)
                .collect(),
            inb: my_blocks
                .iter()
                .map(|b| (*b, t.path(peer, me, b)))
                .chain(inb_extra)
                .collect(),
        };
        for (_, p) in pair.out.iter().chain(&pair.inb) {
            view.paths.insert(p.kind());
            if let Path::Blocked(r) = p {
                if !view.blocked.contains(r) {
                    view.blocked.push(r.clone());
                }
            }
        }
        for (b, p) in &pair.out {
            if let Path::Blocked(r) = p {
                self.block_out(&mut view, &peer.name, *b, r);
            }
        }
        let (Some(mu), Some(pu)) = (me.underlay(v4), peer.underlay(v4)) else {
            return Some(view);
        };
        let (me_ip, peer_ip) = (mu.addr, pu.addr);
        if self.i.phase == Phase::Off {
            return Some(view);
        }
        let theirs = self
            .i
            .identities
            .get(&peer.name)
            .filter(|p| p.incarnation > 0);
        let mine = self.i.my_identity.filter(|m| m.incarnation > 0);
        let lanes = pair.lanes(me_ip);
        for &lane in &lanes {
            self.sas(&mut view, lane, peer, (me_ip, peer_ip), mine, theirs);
        }
        let encrypt = self.i.phase >= Phase::Encrypt;
        let enforce = self.i.phase == Phase::Enforce;
        let tmpl = |src, dst, mode, reqid, optional| Template {
            src,
            dst,
            mode,
            reqid,
            optional,
        };
        let out_reqid = self.active.map(keys::reqid).unwrap_or(0);
        // Transport: one selector per tunnel protocol and port, either way.
        let outer = |src: IpAddr, dst: IpAddr, p: &Path| {
            let (proto, dport) = match p {
                Path::Ipip => (PROTO_IPIP, 0),
                Path::Vxlan(port) => (PROTO_UDP, *port),
                _ => return None,
            };
            Some(Selector {
                src: host(src),
                dst: host(dst),
                proto,
                dport,
            })
        };
        // Outbound from any local source: an outer packet sourced from
        // another address of this node is then encrypted (the SA is looked
        // up by its addresses) or dropped, never sent in clear.
        let out_sels: BTreeSet<Selector> = pair
            .out
            .iter()
            .filter_map(|(_, p)| outer(me_ip, peer_ip, p))
            .map(|sel| Selector {
                src: any(v4),
                ..sel
            })
            .collect();
        let in_sels: BTreeSet<Selector> = pair
            .inb
            .iter()
            .filter_map(|(_, p)| outer(peer_ip, me_ip, p))
            .collect();
        for sel in out_sels.into_iter().filter(|_| encrypt) {
            let t = tmpl(me_ip, peer_ip, Mode::Transport, out_reqid, false);
            self.policy(&mut view, Dir::Out, sel, Action::Allow(t));
        }
        for sel in in_sels.into_iter().filter(|_| enforce) {
            let t = tmpl(peer_ip, me_ip, Mode::Transport, 0, false);
            self.policy(&mut view, Dir::In, sel, Action::Allow(t));
        }
        // Tunnel: the pod blocks themselves.
        if !lanes.contains(&Lane::of(me_ip, Mode::Tunnel)) {
            return Some(view);
        }
        let sel = |src, dst| Selector {
            src,
            dst,
            proto: 0,
            dport: 0,
        };
        if encrypt {
            let t = Action::Allow(tmpl(me_ip, peer_ip, Mode::Tunnel, out_reqid, false));
            for (b, _) in pair.out.iter().filter(|(_, p)| *p == Path::Native) {
                self.policy(&mut view, Dir::Out, sel(any(v4), *b), t);
            }
            for m in &my_blocks {
                self.policy(&mut view, Dir::Out, sel(*m, host(peer_ip)), t);
            }
        }
        let t = Action::Allow(tmpl(peer_ip, me_ip, Mode::Tunnel, 0, !enforce));
        // Forwarded to this node's pods, or delivered to one of its own
        // addresses inside its blocks (tunnel or gateway addresses).
        for (m, _) in pair.inb.iter().filter(|(_, p)| *p == Path::Native) {
            for src in peer_blocks.iter().copied().chain([host(peer_ip)]) {
                self.policy(&mut view, Dir::Fwd, sel(src, *m), t);
                self.policy(&mut view, Dir::In, sel(src, *m), t);
            }
        }
        for p in &peer_blocks {
            self.policy(&mut view, Dir::In, sel(*p, host(me_ip)), t);
        }
        Some(view)
    }
}

/// The catch-all block policies (DESIGN §5c): every IPIP packet, and every
/// UDP packet to a Calico VXLAN port, that no per-peer policy protects is
/// dropped in the kernel. Only for the tunnels the pools use (or a device
/// this node has), so that other software's IPIP or VXLAN is left alone
/// where Calico uses none. Pod addresses without a tunnel are the nftables
/// guard's part: an XFRM selector cannot exclude this node's own pods.
pub fn catch_all(t: &Topology) -> Vec<Selector> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let pools = t
            .pools
            .iter()
            .filter(|p| matches!(p.cidr, IpNet::V4(_)) == v4);
        let (mut ipip, mut vxlan) = (false, false);
        for p in pools {
            ipip |= v4 && p.ipip != crate::datastore::calico::EncapMode::Never;
            vxlan |= p.vxlan != crate::datastore::calico::EncapMode::Never;
        }
        vxlan |= t.device_vxlan_ports.iter().any(|(f, _)| *f == v4);
        if ipip {
            out.push(Selector {
                src: any(v4),
                dst: any(v4),
                proto: PROTO_IPIP,
                dport: 0,
            });
        }
        if vxlan {
            out.extend(t.vxlan_ports(v4).into_iter().map(|port| Selector {
                src: any(v4),
                dst: any(v4),
                proto: PROTO_UDP,
                dport: port,
            }));
        }
    }
    out
}

impl Desired {
    /// Computes the desired state.
    pub fn compute(i: &Inputs<'_>) -> Result<Self, DesiredError> {
        let t = i.topology;
        let ids = i
            .identities
            .iter()
            .filter(|(n, _)| t.nodes.contains_key(*n))
            .map(|(n, id)| (n.as_str(), id.id));
        let mut refused = t.clashes(i.me, ids);
        for n in t.excluded.iter().filter(|n| n.as_str() != i.me) {
            refused.insert(
                n.clone(),
                "excluded by the operator (excluded_nodes in /calico/ipsec/v1/config)".into(),
            );
        }
        for (name, id) in i.identities {
            if id.id > keys::MAX_NODE_ID && name != i.me {
                refused.insert(
                    name.clone(),
                    format!("has node id {}, above {}", id.id, keys::MAX_NODE_ID),
                );
            }
        }
        if let Some(mine) = i.my_identity.filter(|m| m.id > keys::MAX_NODE_ID) {
            return Err(DesiredError::IdTooLarge(mine.id));
        }
        let me = t
            .nodes
            .get(i.me)
            .ok_or_else(|| DesiredError::UnknownNode(i.me.to_string()))?;
        // A pending epoch with key agreement is installed only once every
        // peer that has an identity (and this node) holds a usable key, so
        // that "installed on every node" means every pair can use it.
        let all_keys = |e: u32| {
            i.agreement.get(&e).is_none_or(|ready| {
                ready.contains(i.me)
                    && t.peers(i.me).all(|p| {
                        refused.contains_key(&p.name)
                            || i.identities
                                .get(&p.name)
                                .is_none_or(|id| id.incarnation == 0)
                            || ready.contains(&p.name)
                    })
            })
        };
        let installed: Vec<(u32, u32, u32, bool)> = i
            .epochs
            .iter()
            .filter(|e| match e.state {
                EpochState::Active => true,
                EpochState::Pending => all_keys(e.epoch),
                _ => false,
            })
            .map(|e| {
                let icv = e.icv_bits.unwrap_or(i.icv_bits);
                (e.epoch, e.key_bits, icv, e.binds_receiver())
            })
            .collect();
        let active = i
            .epochs
            .iter()
            .filter(|e| e.state == EpochState::Active)
            .map(|e| e.epoch)
            .max();
        if i.phase != Phase::Off {
            if !matches!(i.icv_bits, 64 | 96 | 128) {
                return Err(DesiredError::BadIcv(i.icv_bits));
            }
            if t.cluster_guid.is_none() {
                return Err(DesiredError::NoClusterGuid);
            }
            if i.phase >= Phase::Encrypt && active.is_none() {
                return Err(DesiredError::NoActiveEpoch(i.phase));
            }
        }
        let mut b = Build {
            i,
            d: Desired::default(),
            installed: if i.phase == Phase::Off {
                vec![]
            } else {
                installed
            },
            active: active.filter(|_| i.phase != Phase::Off),
        };
        for peer in t.peers(i.me) {
            let why = refused.get(&peer.name).map(String::as_str);
            let families: Vec<PathView> = [true, false]
                .into_iter()
                .filter_map(|v4| b.family(me, peer, v4, why))
                .collect();
            let ident = i.identities.get(&peer.name);
            b.d.peers.push(PeerView {
                name: peer.name.clone(),
                addresses: [peer.ipv4, peer.ipv6]
                    .into_iter()
                    .flatten()
                    .map(|u| u.addr)
                    .collect(),
                id: ident.map(|p| p.id),
                incarnation: ident
                    .filter(|p| p.incarnation > 0)
                    .map_or(0, |p| p.incarnation),
                refused: why.map(str::to_string),
                families,
            });
        }
        // Pods of nodes that cannot be peers: blocked, never in clear.
        for u in &t.unusable {
            let mut view = PathView {
                family: "",
                paths: BTreeSet::new(),
                blocked: vec![],
                states: vec![],
                policies: vec![],
            };
            for blk in &u.blocks {
                b.block_out(&mut view, &u.name, *blk, &u.reason);
            }
        }
        if i.phase >= Phase::Encrypt {
            for sel in catch_all(t) {
                let p = PolicySpec {
                    dir: Dir::Out,
                    sel,
                    action: Action::Block,
                };
                b.d.policies.insert(p.key(), p);
            }
        }
        b.d.installed_epochs = b.installed.iter().map(|(e, _, _, _)| *e).collect();
        b.d.active_epoch = b.active;
        Ok(b.d)
    }
}

#[cfg(test)]
#[path = "desired_tests.rs"]
mod tests;
