//! Step 1 of a convergence, *read*: what etcd's snapshot, the kernel and
//! this node's state say, and whether the config record can be followed.

use std::time::Instant;

use super::cluster;
use super::error::{boot_id, phase_of, ConvergeError};
use super::report::{kept, Report};
use crate::datastore::ipsec::Phase;
use crate::datastore::paths::PathKind;
use crate::datastore::snapshot::Snapshot;
use crate::mtu::MtuParams;
use crate::mtu::{Encapsulation, IcvBits, OuterIp};
use crate::state::NodeState;
use crate::xfrm::guard::Guard;
use crate::xfrm::kernel::Xfrm;
use crate::xfrm::Held;

/// What one convergence works from.
pub(super) struct Facts {
    /// The snapshot, with this node's VXLAN device ports added.
    pub snap: Snapshot,
    /// The phase applied: the one the config record asks for, or the
    /// stronger one this node holds (`holding` says why).
    pub phase: Phase,
    /// The phase the config record asks for.
    pub asked: Phase,
    /// Why this node holds a stronger phase than the record asks for: the
    /// record does not follow the one it converged on before.
    pub holding: Option<String>,
    /// The ICV length it asks for.
    pub icv_bits: u32,
    /// The netlink socket.
    pub xfrm: Xfrm,
    /// What the kernel holds that is ours.
    pub held: Held,
    /// What the pod MTU must fit.
    pub mtu: Vec<MtuParams>,
    /// The catch-all this phase and topology need.
    pub guard: Guard,
    /// The kernel's boot id: what an identity and the guard's mark are
    /// tied to (read leniently while off, where no identity needs it).
    pub boot: String,
}

/// The outcome of reading: converge from these facts, or keep the kernel
/// as it is (the report says why).
pub(super) enum Read {
    /// Go on.
    Follow(Box<Facts>),
    /// The config record cannot be followed, and the agent keeps what
    /// protects the node now.
    Kept(Box<Report>),
}

/// Reads the kernel and judges the config record. A record that is missing
/// or unparsable never turns encryption off: a node that has seen the
/// cluster initialised, or holds IPsec state, refuses (the agent, `agent`,
/// keeps that state and reports itself stale); only a node that has never
/// seen it reads "no record" as off.
pub(super) fn read(
    state: &NodeState,
    mut snap: Snapshot,
    agent: bool,
    node: &str,
    started: Instant,
) -> Result<Read, ConvergeError> {
    let mut xfrm = Xfrm::open()?;
    let held = xfrm.held()?;
    let mtu = mtu_params(&snap, node);
    if let Some(why) = cluster::config_gone(&snap, state.seen(), !held.is_empty()) {
        if held.is_empty() || !agent {
            return Err(cluster::config_refused(why));
        }
        return Ok(Read::Kept(Box::new(kept(
            node.to_string(),
            &snap,
            &held,
            why,
            started,
            mtu,
        ))));
    }
    cluster::with_device_ports(&mut snap.topology, node, cluster::device_vxlan_ports());
    let (asked, icv_bits) = phase_of(&snap);
    let (phase, holding) = cluster::applied_phase(&snap, state.seen());
    if let Some(why) = &holding {
        tracing::warn!(held = ?phase, asked = ?asked, reason = %why, "keeping a stronger phase than the config record asks for");
    }
    let guard = Guard::of(phase, &snap.topology);
    let boot = if phase == Phase::Off {
        crate::clock::read_boot_id().unwrap_or_default()
    } else {
        boot_id()?
    };
    Ok(Read::Follow(Box::new(Facts {
        snap,
        phase,
        asked,
        holding,
        icv_bits,
        xfrm,
        held,
        mtu,
        guard,
        boot,
    })))
}

/// What the pod MTU of `node` must fit, from the pools and its families,
/// with the cluster's ICV length.
pub fn mtu_params(snap: &Snapshot, node: &str) -> Vec<MtuParams> {
    let (_, icv_bits) = phase_of(snap);
    let icv = IcvBits::from_bits(icv_bits.into()).unwrap_or(IcvBits::B128);
    let Some(me) = snap.topology.nodes.get(node) else {
        return Vec::new();
    };
    let mut out: Vec<MtuParams> = snap
        .topology
        .carriers(me)
        .into_iter()
        .filter_map(|(kind, v4)| {
            let encapsulation = match kind {
                PathKind::Ipip => Encapsulation::Ipip,
                PathKind::Vxlan => Encapsulation::Vxlan,
                PathKind::Tunnel => Encapsulation::None,
                PathKind::Blocked => return None,
            };
            Some(MtuParams {
                encapsulation,
                icv,
                outer: if v4 { OuterIp::V4 } else { OuterIp::V6 },
                udp_encap: false,
            })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}
