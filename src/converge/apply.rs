//! Applying a plan with keys derived just in time, what the pod MTU must
//! fit, and the report of a convergence that kept the kernel as it was.

use std::collections::HashMap;
use std::time::Instant;

use super::{ms, phase_of, ConvergeError, Report};
use crate::config::PluginConfig;
use crate::datastore::paths::PathKind;
use crate::datastore::snapshot::Snapshot;
use crate::keys::{EpochSecret, Kek, SaId};
use crate::mtu::{Encapsulation, IcvBits, MtuParams, OuterIp};
use crate::xfrm::kernel::{Applied, Xfrm};
use crate::xfrm::{Dir, Held, Plan};

/// The report of a convergence that left the kernel as it was, and why.
pub(super) fn kept(
    node: String,
    snap: &Snapshot,
    held: &Held,
    why: String,
    started: Instant,
    mtu: Vec<MtuParams>,
) -> Report {
    tracing::error!(node = %node, reason = %why, "cannot follow etcd; keeping the XFRM state this node holds");
    let (phase, _) = phase_of(snap);
    let me = snap.identities.get(&node);
    // The epochs the kernel still holds (so that none is deleted under it);
    // the phase generation stays 0, so nothing is acknowledged.
    let mut installed: Vec<u32> = held
        .states
        .values()
        .map(|s| (s.reqid & 0xffff).saturating_sub(1))
        .collect();
    installed.sort_unstable();
    installed.dedup();
    Report {
        node,
        phase,
        id: me.map(|i| i.id),
        incarnation: me.map_or(0, |i| i.incarnation),
        states: held.states.len(),
        policies: held.policies.len(),
        revision: snap.revision,
        millis: ms(started),
        read_millis: ms(started),
        installed_epochs: installed,
        mtu,
        stale: Some(why),
        // No active epoch and phase generation 0: nothing is acknowledged.
        ..Report::default()
    }
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

/// Unseals the epochs the plan needs and applies it, deriving each key just
/// before its state is added.
pub(super) fn apply_with_keys(
    cfg: &PluginConfig,
    snap: &Snapshot,
    agreed: &super::agreement::Agreed,
    xfrm: &mut Xfrm,
    plan: &Plan,
    held: &Held,
) -> Result<Applied, ConvergeError> {
    // The agreement epochs were opened by `prepare`; only the others are
    // unsealed here, and only when a state is to be added.
    let needs_keys = plan
        .add_states
        .iter()
        .chain(&plan.replace_states)
        .any(|s| !agreed.secrets.contains_key(&s.epoch));
    let kek = if needs_keys {
        Some(Kek::load(&cfg.kek_file)?)
    } else {
        None
    };
    let guid = snap.topology.cluster_guid.clone().unwrap_or_default();
    let mut secrets: HashMap<u32, EpochSecret> = HashMap::new();
    let mut shared = super::agreement::SharedSecrets::default();
    let applied = xfrm.apply(plan, held, |s| {
        let rec = snap
            .epochs
            .iter()
            .find(|e| e.epoch == s.epoch)
            .ok_or_else(|| format!("epoch {} has no record", s.epoch))?;
        let secret = match (agreed.secrets.get(&s.epoch), secrets.entry(s.epoch)) {
            (Some(opened), _) => opened,
            (None, std::collections::hash_map::Entry::Occupied(e)) => e.into_mut(),
            (None, std::collections::hash_map::Entry::Vacant(v)) => {
                let kek = kek.as_ref().ok_or("no KEK loaded")?;
                v.insert(rec.open(kek).map_err(|e| e.to_string())?)
            }
        };
        let id = SaId {
            epoch: s.epoch,
            sender: &s.sender,
            incarnation: s.incarnation,
            receiver: &s.receiver,
            lane: s.lane.index(),
            key_bits: s.key_bits,
        };
        if rec.agreement.is_some() {
            return agreed.derive(secret, &guid, s, &id, &mut shared).ok_or_else(|| {
                format!(
                    "epoch {} has no usable key agreement with the peer (a missing or unverified key)",
                    s.epoch
                )
            });
        }
        secret
            .derive(&guid, &id)
            .ok_or_else(|| "a node name is longer than 253 bytes".to_string())
    })?;
    let outbound = plan.add_states.iter().filter(|s| s.dir == Dir::Out).count();
    tracing::info!(
        states_added = applied.states_added,
        outbound_added = outbound,
        states_deleted = applied.states_deleted,
        policies_added = applied.policies_added,
        policies_updated = applied.policies_updated,
        policies_deleted = applied.policies_deleted,
        "applied"
    );
    Ok(applied)
}
