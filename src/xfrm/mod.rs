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
//! [`crate::keys::REQID_TAG`]; a policy is ours when its priority is
//! [`PRIORITY`]. Nothing else in the kernel is read beyond that test, and
//! nothing else is ever changed.

pub mod desired;
pub mod kernel;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

pub use desired::{Desired, DesiredError, Inputs, PeerView};

/// The priority of every policy we install (lower wins in the kernel; this
/// value mostly serves to recognise ours).
pub const PRIORITY: u32 = 0xCA1C;
/// IP protocol number of IP-in-IP.
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// Calico's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// The anti-replay window of every SA, in packets (extended sequence numbers).
pub const REPLAY_WINDOW: u32 = 128;

/// Policy direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// Received by this node.
    In,
    /// Sent by this node.
    Out,
}

/// Which tunnel packets a policy matches: node to node, one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Selector {
    /// Source node address (/32).
    pub src: Ipv4Addr,
    /// Destination node address (/32).
    pub dst: Ipv4Addr,
    /// IP protocol: 4 (IPIP) or 17 (UDP).
    pub proto: u8,
    /// Destination port for UDP (4789), 0 for any.
    pub dport: u16,
}

/// One ESP transport-mode SA we want, without its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SaSpec {
    /// Outbound (this node sends) or inbound.
    pub dir: Dir,
    /// Sender address.
    pub src: Ipv4Addr,
    /// Receiver address.
    pub dst: Ipv4Addr,
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
    /// ICV length in bits.
    pub icv_bits: u32,
}

impl SaSpec {
    /// The kernel's identity of a state: destination and SPI (proto is ESP).
    pub fn key(&self) -> (Ipv4Addr, u32) {
        (self.dst, self.spi)
    }
}

/// One policy we want.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicySpec {
    /// Direction.
    pub dir: Dir,
    /// The traffic it matches.
    pub sel: Selector,
    /// The template's reqid: the active epoch's when outbound, 0 (any
    /// installed epoch) when inbound.
    pub reqid: u32,
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
    pub src: Ipv4Addr,
    /// Receiver address.
    pub dst: Ipv4Addr,
    /// SPI.
    pub spi: u32,
    /// reqid.
    pub reqid: u32,
    /// True when transport mode.
    pub transport: bool,
    /// AEAD algorithm name, if the state has one.
    pub aead: Option<String>,
    /// ICV length in bits.
    pub icv_bits: u32,
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
            && self.transport
            && self.aead.as_deref() == Some(crate::datastore::ipsec::ALGORITHM)
            && self.icv_bits == spec.icv_bits
            && self.esn
    }
}

/// A policy as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Direction.
    pub dir: Dir,
    /// Selector.
    pub sel: Selector,
    /// Priority.
    pub priority: u32,
    /// Templates as (src, dst, reqid, is ESP transport).
    pub templates: Vec<(Ipv4Addr, Ipv4Addr, u32, bool)>,
}

impl KernelPolicy {
    /// Whether the policy is what `spec` asks for.
    pub fn matches(&self, spec: &PolicySpec) -> bool {
        let want = (spec.sel.src, spec.sel.dst, spec.reqid, true);
        self.dir == spec.dir
            && self.sel == spec.sel
            && self.priority == PRIORITY
            && self.templates == [want]
    }
}

/// What the kernel holds that is ours.
#[derive(Debug, Clone, Default)]
pub struct Held {
    /// Our states, by (dst, spi).
    pub states: BTreeMap<(Ipv4Addr, u32), KernelSa>,
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
                    transport: true,
                    aead: Some(crate::datastore::ipsec::ALGORITHM.into()),
                    icv_bits: s.icv_bits,
                    esn: true,
                    packets: 0,
                };
                (s.key(), sa)
            })
            .collect();
        let policies = d
            .policies
            .values()
            .map(|p| {
                let kp = KernelPolicy {
                    dir: p.dir,
                    sel: p.sel,
                    priority: PRIORITY,
                    templates: vec![(p.sel.src, p.sel.dst, p.reqid, true)],
                };
                (p.key(), kp)
            })
            .collect();
        Self { states, policies }
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
    pub del_states: Vec<(Ipv4Addr, u32)>,
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

    /// Outbound states the plan creates (new or replaced).
    pub fn created_outbound(&self) -> impl Iterator<Item = &SaSpec> {
        self.add_states
            .iter()
            .chain(&self.replace_states)
            .filter(|s| s.dir == Dir::Out)
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
