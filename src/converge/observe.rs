//! What a convergence would do, without doing it: CHECK and
//! `calico-ipsec status`.

use crate::datastore::etcd::{Etcd, EtcdSettings};
use crate::datastore::ipsec::Phase;
use crate::datastore::snapshot::{self, Snapshot};
use crate::xfrm::handover::hand_over;
use crate::xfrm::kernel::Xfrm;
use crate::xfrm::{Desired, Held, Inputs, Plan};

use std::path::Path;

use super::error::{phase_of, runtime, ConvergeError};
use crate::state::NodeState;

/// How a snapshot turned into a plan, for CHECK and `status` (no writes).
#[derive(Debug, Clone)]
pub struct Observed {
    /// The snapshot read.
    pub snapshot: Snapshot,
    /// This node.
    pub node: String,
    /// The phase applied (the record's, or the stronger one held).
    pub phase: Phase,
    /// Why the node holds a stronger phase than the config record asks for.
    pub holding: Option<String>,
    /// The desired state.
    pub desired: Desired,
    /// What the kernel holds that is ours.
    pub held: Held,
    /// The difference.
    pub plan: Plan,
}

/// Reads etcd and the kernel and computes the plan, without writing
/// anything (CHECK and `calico-ipsec status`).
pub fn observe(
    etcd: &EtcdSettings,
    node: String,
    state_dir: &Path,
) -> Result<Observed, ConvergeError> {
    let snapshot = runtime()?.block_on(async {
        let etcd = Etcd::connect(etcd).await?;
        snapshot::read(&etcd).await
    })?;
    observe_snapshot(snapshot, node, state_dir)
}

/// Computes the plan from a snapshot already read. A missing config record
/// is judged as a convergence judges it: on a node that has seen the
/// cluster initialised, or that holds IPsec state, it is an error, never
/// "phase off" (which would call every object of ours drift).
pub fn observe_snapshot(
    snapshot: Snapshot,
    node: String,
    state_dir: &Path,
) -> Result<Observed, ConvergeError> {
    let held = Xfrm::open()?.held()?;
    let seen = NodeState::peek_seen(state_dir);
    if let Some(why) = super::cluster::config_gone(&snapshot, seen.as_ref(), !held.is_empty()) {
        return Err(super::cluster::config_refused(why));
    }
    let (phase, holding) = super::cluster::applied_phase(&snapshot, seen.as_ref());
    let mut snapshot = snapshot;
    super::cluster::with_device_ports(
        &mut snapshot.topology,
        &node,
        super::cluster::device_vxlan_ports(),
    );
    let (_, icv_bits) = phase_of(&snapshot);
    let ready = super::agreement::published(&snapshot);
    let desired = Desired::compute(&Inputs {
        topology: &snapshot.topology,
        me: &node,
        my_identity: snapshot.identities.get(&node),
        identities: &snapshot.identities,
        phase,
        epochs: &snapshot.epochs,
        icv_bits,
        agreement: &ready,
    })?;
    let mut desired = desired;
    // As an ADD would converge: without the peers' statuses, a hand-over
    // between incarnations waits.
    hand_over(&mut desired, &held, &snapshot.identities, None);
    let plan = Plan::diff(&desired, &held);
    Ok(Observed {
        snapshot,
        node,
        phase,
        holding,
        desired,
        held,
        plan,
    })
}
