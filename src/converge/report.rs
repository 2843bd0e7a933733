//! What a convergence reports: to the ADD's log, the agent's status record
//! and metrics, and `calico-ipsec converge`.

use std::time::Instant;

use serde::Serialize;

use super::error::{ms, phase_of};
use crate::datastore::ipsec::Phase;
use crate::datastore::snapshot::Snapshot;
use crate::mtu::MtuParams;
use crate::xfrm::Held;

/// What a converge saw and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// This node.
    pub node: String,
    /// Epochs whose record does not open with the parameters it carries
    /// (altered after sealing), each with the reason: left unused.
    pub refused_epochs: Vec<(u32, String)>,
    /// The phase applied.
    pub phase: Phase,
    /// The config record's phase this convergence satisfies: `phase`, or
    /// the weaker one the record asks for while this node holds more.
    pub acked_phase: Phase,
    /// Why this node holds a stronger phase than the config record asks
    /// for (a record that does not follow the one it converged on).
    pub held: Option<String>,
    /// This node's id, once it has one.
    pub id: Option<u16>,
    /// This node's incarnation (0 while the phase is off).
    pub incarnation: u32,
    /// True when a new incarnation was published this time.
    pub new_incarnation: bool,
    /// States desired.
    pub states: usize,
    /// Policies desired.
    pub policies: usize,
    /// Netlink writes done.
    pub writes: usize,
    /// The etcd revision of the snapshot.
    pub revision: i64,
    /// Milliseconds taken, lock wait included.
    pub millis: u64,
    /// Milliseconds from the start to the snapshot read from etcd.
    pub read_millis: u64,
    /// Milliseconds spent settling the incarnation (etcd writes included).
    pub identity_millis: u64,
    /// Milliseconds spent applying the plan (keys and netlink).
    pub apply_millis: u64,
    /// The epochs now installed (pending and active). This and the fields
    /// below it up to `identities_digest` are empty when `unchanged`.
    pub installed_epochs: Vec<u32>,
    /// The epoch outbound policies send with, in encrypt and enforce.
    pub active_epoch: Option<u32>,
    /// The config's phase generation this convergence applied.
    pub phase_generation: u64,
    /// Our states by direction: (inbound, outbound).
    pub states_by_dir: (usize, usize),
    /// Our policies by direction: (inbound, outbound, forward).
    pub policies_by_dir: (usize, usize, usize),
    /// What the convergence changed, named (at most 8; empty when nothing).
    pub changes: Vec<String>,
    /// Whether the kernel held something other than what the last
    /// convergence on this node left (changed outside calico-ipsec: a
    /// flush, an expiry, another daemon). `None`: unknown (no mark of this
    /// boot, or the last convergence did not finish its writes).
    pub kernel_drift: Option<bool>,
    /// The digest of the node identities converged with.
    pub identities_digest: String,
    /// Every identity record up to this etcd revision is converged.
    pub acked_rev: i64,
    /// No older incarnation is sent on toward an identity up to this revision.
    pub settled_rev: i64,
    /// True when the last convergence was found to still hold (etcd's
    /// fingerprint and the kernel unchanged), so nothing else was read.
    pub unchanged: bool,
    /// True when another process's etcd read, begun after this request,
    /// vouched for it (concurrent ADDs), so etcd was not asked at all.
    pub coalesced: bool,
    /// Paths toward pod blocks that no SA can protect (blocked once
    /// encryption is on), with their reasons.
    pub unprotected: Vec<crate::xfrm::desired::Unprotected>,
    /// What the pod MTU must fit: one entry per way a pod packet of this node
    /// may leave it (empty when the datastore has no pool for its families).
    pub mtu: Vec<MtuParams>,
    /// Why the kernel was left as it was although etcd could not be
    /// followed (a missing or malformed config, an epoch that cannot be
    /// used): the node keeps what it has and reports itself stale.
    pub stale: Option<String>,
    /// Why the nftables catch-all could not be written. Always `None` in a
    /// report: a convergence that cannot write it at `encrypt` or above
    /// fails instead (kept for the status record's shape).
    pub guard: Option<String>,
    /// Policies the kernel refused (a foreign policy in the way): their
    /// paths stay blocked by the catch-all, the others converged.
    pub refused: Vec<String>,
    /// Peers toward which this node still sends on an older incarnation's
    /// SAs, waiting for them to acknowledge its new one (make-before-break).
    pub waiting_for: Vec<String>,
    /// Inbound SAs of peers' older incarnations kept while those peers may
    /// still send on them.
    pub kept_inbound: usize,
    /// Key-agreement epochs this node cannot use (its private key is gone).
    pub lost_epochs: Vec<u32>,
    /// Peers this node sends to, per SA lane (`v4-transport`, ...).
    pub lanes: std::collections::BTreeMap<String, usize>,
    /// The most packets one of this node's outbound SAs has sent: its
    /// highest outbound sequence number, as the kernel counts at this
    /// convergence.
    pub out_packets: u64,
}

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
        acked_phase: phase,
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
