//! The XFRM data plane: what this node's kernel should hold, what it holds,
//! and the difference.
//!
//! - [`desired`] computes the states and policies from the topology, the
//!   epochs, the phase and every node's id and incarnation (no keys: a key is
//!   derived only when a state is about to be added);
//! - [`kernel`] dumps what the kernel holds that is ours and applies a plan
//!   in ACK'd netlink batches;
//! - [`Plan::diff`] compares the two.
//!
//! Ours, unambiguously: a state is ours when it is ESP and its reqid carries
//! [`crate::keys::REQID_TAG`]; a policy is ours when its priority is one of
//! [`PRIORITY_HOST`], [`PRIORITY`] and [`PRIORITY_CATCH_ALL`]. Nothing else
//! in the kernel is read beyond that test, and nothing else is ever changed.

pub mod desired;
mod encode;
pub mod guard;
pub mod handover;
pub mod kernel;
pub mod view;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::keys::ALGORITHM;

pub use desired::{Desired, DesiredError, Inputs, PathView, PeerView};

/// The priority of our per-peer policies (lower wins in the kernel; the
/// three values also serve to recognise ours).
pub const PRIORITY: u32 = 0xCA1C;
/// The priority of a policy toward one pod address (a borrowed /32 or /128
/// inside another node's block): it must win over the block's policy.
pub const PRIORITY_HOST: u32 = PRIORITY - 1;
/// The priority of the catch-all block policies, under every per-peer
/// policy: what no per-peer policy carves out is dropped (DESIGN §5c).
pub const PRIORITY_CATCH_ALL: u32 = PRIORITY + 1;

/// Whether a policy of this priority is ours.
pub fn is_our_priority(p: u32) -> bool {
    (PRIORITY_HOST..=PRIORITY_CATCH_ALL).contains(&p)
}
/// IP protocol number of IP-in-IP.
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// The anti-replay window of every SA, in packets (extended sequence numbers).
pub const REPLAY_WINDOW: u32 = 128;

/// Policy direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// Received by this node for itself.
    In,
    /// Sent by this node (its own or forwarded traffic).
    Out,
    /// Received by this node and forwarded (to a local pod).
    Fwd,
}

/// ESP mode of an SA or a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The node-to-node packet (IPIP or VXLAN) is protected as it is.
    Transport,
    /// The pod packet is wrapped in a new outer header between the nodes.
    Tunnel,
}

/// Which packets a policy matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Selector {
    /// Source network.
    pub src: IpNet,
    /// Destination network (same family as `src`).
    pub dst: IpNet,
    /// IP protocol (4 IPIP, 17 UDP), 0 for any.
    pub proto: u8,
    /// Destination port for UDP, 0 for any.
    pub dport: u16,
}

/// The ESP template of an allowing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Template {
    /// Tunnel source (the sending node).
    pub src: IpAddr,
    /// Tunnel destination (the receiving node).
    pub dst: IpAddr,
    /// Transport or tunnel.
    pub mode: Mode,
    /// The epoch's reqid when outbound, 0 (any installed epoch) inbound.
    pub reqid: u32,
    /// Plaintext may also pass (inbound tunnel policies before enforce).
    pub optional: bool,
}

/// One SA lane between two nodes: an address family and a mode. Each lane
/// has its own SAs, SPIs and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lane {
    /// IPv4 outer, transport mode (IPIP and VXLAN over IPv4).
    V4Transport,
    /// IPv4 outer, tunnel mode (IPv4 pods without a tunnel).
    V4Tunnel,
    /// IPv6 outer, transport mode (VXLAN over IPv6).
    V6Transport,
    /// IPv6 outer, tunnel mode (IPv6 pods without a tunnel).
    V6Tunnel,
}

impl Lane {
    /// The lane of `mode` between addresses of the family of `ip`.
    pub fn of(ip: IpAddr, mode: Mode) -> Self {
        match (ip.is_ipv4(), mode) {
            (true, Mode::Transport) => Self::V4Transport,
            (true, Mode::Tunnel) => Self::V4Tunnel,
            (false, Mode::Transport) => Self::V6Transport,
            (false, Mode::Tunnel) => Self::V6Tunnel,
        }
    }

    /// The lane's number in key derivations and SPIs (0 to 3).
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The lane's mode.
    pub fn mode(self) -> Mode {
        match self {
            Self::V4Transport | Self::V6Transport => Mode::Transport,
            Self::V4Tunnel | Self::V6Tunnel => Mode::Tunnel,
        }
    }
}

/// One ESP SA we want, without its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SaSpec {
    /// Outbound (this node sends) or inbound.
    pub dir: Dir,
    /// Sender address.
    pub src: IpAddr,
    /// Receiver address.
    pub dst: IpAddr,
    /// Security parameter index.
    pub spi: u32,
    /// The epoch's reqid.
    pub reqid: u32,
    /// Key epoch.
    pub epoch: u32,
    /// Sending node's name.
    pub sender: String,
    /// Sender's incarnation.
    pub incarnation: u32,
    /// Receiving node's name.
    pub receiver: String,
    /// The receiver's incarnation, which the key binds in an epoch sealed
    /// as version 3 (`None` for earlier epochs). Not visible in the kernel:
    /// the ledger says which one a held state was made for.
    pub receiver_incarnation: Option<u32>,
    /// ICV length in bits.
    pub icv_bits: u32,
    /// AES key size in bits (the epoch's: 128 or 256).
    pub key_bits: u32,
    /// Family and mode.
    pub lane: Lane,
}

impl SaSpec {
    /// The kernel's identity of a state: destination and SPI (proto is ESP).
    pub fn key(&self) -> (IpAddr, u32) {
        (self.dst, self.spi)
    }
}

/// What a policy does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Protect them with the template's SA.
    Allow(Template),
    /// Drop them: a path that cannot be protected (fail closed).
    Block,
}

/// One policy we want.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySpec {
    /// Direction.
    pub dir: Dir,
    /// The traffic it matches.
    pub sel: Selector,
    /// What happens to it.
    pub action: Action,
}

impl Selector {
    /// True for a catch-all: any source to any destination.
    pub fn is_catch_all(&self) -> bool {
        self.src.prefix_len() == 0 && self.dst.prefix_len() == 0
    }

    /// The priority a policy with this selector gets: the catch-all under
    /// everything, a single pod address above its block.
    pub fn priority(&self) -> u32 {
        if self.is_catch_all() {
            PRIORITY_CATCH_ALL
        } else if self.src.prefix_len() == 0
            && self.proto == 0
            && self.dst.prefix_len() == self.dst.max_prefix_len()
        {
            PRIORITY_HOST
        } else {
            PRIORITY
        }
    }
}

impl PolicySpec {
    /// The kernel's identity of a policy: direction and selector.
    pub fn key(&self) -> (Dir, Selector) {
        (self.dir, self.sel)
    }
}

/// A state as the kernel reports it (its key is read, then zeroized, never kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSa {
    /// Sender address.
    pub src: IpAddr,
    /// Receiver address.
    pub dst: IpAddr,
    /// SPI.
    pub spi: u32,
    /// reqid.
    pub reqid: u32,
    /// Transport or tunnel (`None`: another mode).
    pub mode: Option<Mode>,
    /// AEAD algorithm name, if the state has one.
    pub aead: Option<String>,
    /// ICV length in bits.
    pub icv_bits: u32,
    /// AES key size in bits (the AEAD key's length less its 32-bit salt).
    pub key_bits: u32,
    /// True when extended sequence numbers are on.
    pub esn: bool,
    /// Packets it has carried.
    pub packets: u64,
}

impl KernelSa {
    /// Whether the state is what `spec` asks for (keys aside: they are never
    /// compared; a state with the right SPI, epoch and incarnation was
    /// created with the derived key).
    pub fn matches(&self, spec: &SaSpec) -> bool {
        self.src == spec.src
            && self.dst == spec.dst
            && self.spi == spec.spi
            && self.reqid == spec.reqid
            && self.mode == Some(spec.lane.mode())
            && self.aead.as_deref() == Some(ALGORITHM)
            && self.icv_bits == spec.icv_bits
            && self.key_bits == spec.key_bits
            && self.esn
    }

    /// The terms [`KernelSa::matches`] compares, for digests (not packets).
    pub fn terms(&self) -> impl std::hash::Hash + '_ {
        (
            self.src,
            self.dst,
            self.spi,
            self.reqid,
            self.mode,
            self.aead.as_deref(),
            self.icv_bits,
            self.key_bits,
            self.esn,
        )
    }
}

/// A policy as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelPolicy {
    /// Direction.
    pub dir: Dir,
    /// Selector.
    pub sel: Selector,
    /// Priority.
    pub priority: u32,
    /// True when the action is block.
    pub block: bool,
    /// ESP templates (anything else the policy carries is left out, so it
    /// never matches a spec).
    pub templates: Vec<Template>,
    /// Templates of another protocol than ESP.
    pub other_templates: usize,
}

impl KernelPolicy {
    /// Whether the policy is what `spec` asks for.
    pub fn matches(&self, spec: &PolicySpec) -> bool {
        let shape_ok = self.dir == spec.dir
            && self.sel == spec.sel
            && self.priority == spec.sel.priority()
            && self.other_templates == 0;
        shape_ok
            && match spec.action {
                Action::Block => self.block && self.templates.is_empty(),
                Action::Allow(t) => !self.block && self.templates == [t],
            }
    }

    /// The kernel's policy for a spec (what the kernel holds once it is added).
    pub fn of(p: &PolicySpec) -> Self {
        let (block, templates) = match p.action {
            Action::Block => (true, vec![]),
            Action::Allow(t) => (false, vec![t]),
        };
        Self {
            dir: p.dir,
            sel: p.sel,
            priority: p.sel.priority(),
            block,
            templates,
            other_templates: 0,
        }
    }
}

/// What the kernel holds that is ours.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// Our states, by (dst, spi).
    pub states: BTreeMap<(IpAddr, u32), KernelSa>,
    /// Our policies, by (dir, selector).
    pub policies: BTreeMap<(Dir, Selector), KernelPolicy>,
}

impl Held {
    /// What the kernel holds when it holds exactly `d` (no packet carried
    /// yet): `Plan::diff(d, &Held::exactly(d))` is empty.
    pub fn exactly(d: &Desired) -> Self {
        let states = d
            .states
            .values()
            .map(|s| {
                let sa = KernelSa {
                    src: s.src,
                    dst: s.dst,
                    spi: s.spi,
                    reqid: s.reqid,
                    mode: Some(s.lane.mode()),
                    aead: Some(ALGORITHM.into()),
                    icv_bits: s.icv_bits,
                    key_bits: s.key_bits,
                    esn: true,
                    packets: 0,
                };
                (s.key(), sa)
            })
            .collect();
        let policies = d
            .policies
            .values()
            .map(|p| (p.key(), KernelPolicy::of(p)))
            .collect();
        Self { states, policies }
    }

    /// True when the kernel holds nothing of ours.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.policies.is_empty()
    }
}

/// The changes that take the kernel from what it holds to what is desired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// States to add.
    pub add_states: Vec<SaSpec>,
    /// States that exist under the right (dst, SPI) but differ: deleted and
    /// added again.
    pub replace_states: Vec<SaSpec>,
    /// States to delete, by (dst, spi).
    pub del_states: Vec<(IpAddr, u32)>,
    /// Policies to add.
    pub add_policies: Vec<PolicySpec>,
    /// Policies to switch in place (one atomic XFRM_MSG_UPDPOLICY each).
    pub update_policies: Vec<PolicySpec>,
    /// Policies to delete.
    pub del_policies: Vec<(Dir, Selector)>,
}

impl Plan {
    /// Compares the desired state with what the kernel holds.
    pub fn diff(want: &Desired, held: &Held) -> Self {
        let mut p = Plan::default();
        for (k, spec) in &want.states {
            match held.states.get(k) {
                None => p.add_states.push(spec.clone()),
                Some(have) if !have.matches(spec) => p.replace_states.push(spec.clone()),
                Some(_) => {}
            }
        }
        p.del_states = held
            .states
            .keys()
            .filter(|k| !want.states.contains_key(k))
            .copied()
            .collect();
        for (k, spec) in &want.policies {
            match held.policies.get(k) {
                None => p.add_policies.push(spec.clone()),
                Some(have) if !have.matches(spec) => p.update_policies.push(spec.clone()),
                Some(_) => {}
            }
        }
        p.del_policies = held
            .policies
            .keys()
            .filter(|k| !want.policies.contains_key(k))
            .copied()
            .collect();
        // The catch-all is added after the per-peer policies that carve
        // paths out of it, and deleted before them: no packet of a path
        // being protected or released meets it alone.
        p.add_policies.sort_by_key(|s| s.sel.is_catch_all());
        p.del_policies.sort_by_key(|(_, s)| !s.is_catch_all());
        p
    }

    /// True when the kernel already holds exactly the desired state.
    pub fn is_empty(&self) -> bool {
        self.add_states.is_empty()
            && self.replace_states.is_empty()
            && self.del_states.is_empty()
            && self.add_policies.is_empty()
            && self.update_policies.is_empty()
            && self.del_policies.is_empty()
    }

    /// The number of netlink writes the plan takes.
    pub fn writes(&self) -> usize {
        self.add_states.len()
            + 2 * self.replace_states.len()
            + self.del_states.len()
            + self.add_policies.len()
            + self.update_policies.len()
            + self.del_policies.len()
    }

    /// Inbound states the plan creates (new or replaced).
    pub fn created_inbound(&self) -> impl Iterator<Item = &SaSpec> {
        self.add_states
            .iter()
            .chain(&self.replace_states)
            .filter(|s| s.dir == Dir::In)
    }

    /// Outbound states the plan creates (new or replaced).
    pub fn created_outbound(&self) -> impl Iterator<Item = &SaSpec> {
        self.add_states
            .iter()
            .chain(&self.replace_states)
            .filter(|s| s.dir == Dir::Out)
    }

    /// The objects the plan adds, replaces or deletes, named without key
    /// material (at most `limit`), for the log of a repair.
    pub fn describe(&self, limit: usize) -> Vec<String> {
        let sa = |verb: &str, s: &SaSpec| {
            format!(
                "{verb} {:?} state {}->{} spi {:#010x} (epoch {}, {:?})",
                s.dir, s.src, s.dst, s.spi, s.epoch, s.lane
            )
        };
        let pol = |verb: &str, d: &Dir, sel: &Selector| {
            format!(
                "{verb} {d:?} policy {}->{} proto {} dport {}",
                sel.src, sel.dst, sel.proto, sel.dport
            )
        };
        self.add_states
            .iter()
            .map(|s| sa("missing", s))
            .chain(self.replace_states.iter().map(|s| sa("altered", s)))
            .chain(
                self.del_states
                    .iter()
                    .map(|(dst, spi)| format!("extra state ->{dst} spi {spi:#010x}")),
            )
            .chain(
                self.add_policies
                    .iter()
                    .map(|p| pol("missing", &p.dir, &p.sel)),
            )
            .chain(
                self.update_policies
                    .iter()
                    .map(|p| pol("altered", &p.dir, &p.sel)),
            )
            .chain(
                self.del_policies
                    .iter()
                    .map(|(d, sel)| pol("extra", d, sel)),
            )
            .take(limit)
            .collect()
    }

    /// A one-line summary with counts, for logs and errors.
    pub fn summary(&self) -> String {
        format!(
            "{} states to add, {} to replace, {} to delete; {} policies to add, {} to update, {} to delete",
            self.add_states.len(),
            self.replace_states.len(),
            self.del_states.len(),
            self.add_policies.len(),
            self.update_policies.len(),
            self.del_policies.len()
        )
    }
}
