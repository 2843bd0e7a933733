//! Step 5 of a convergence, *record*: the catch-all after the policies, the
//! private keys of deleted epochs destroyed, what this node remembers of
//! the cluster, the convergence record, and the report.

use std::time::Instant;

use super::agreement::{self, Agreed};
use super::decide::Decided;
use super::error::{ms, ConvergeError};
use super::facts::Facts;
use super::guard;
use super::identity::Mine;
use super::report::Report;
use crate::datastore::calico::Topology;
use crate::datastore::ipsec::{identities_digest, Phase};
use crate::state::{Converged, NodeState, Seen, CONVERGED_VERSION};
use crate::xfrm::desired::Unprotected;
use crate::xfrm::kernel::Applied;
use crate::xfrm::Dir;

/// How long each step took, for the report.
pub(super) struct Timings {
    /// When the convergence began (lock wait included).
    pub started: Instant,
    /// Milliseconds until the snapshot was read.
    pub read_millis: u64,
    /// Milliseconds of the identity, key-agreement and decide steps.
    pub identity_millis: u64,
    /// When the apply step began.
    pub apply: Instant,
}

/// What the steps before this one found and did.
pub(super) struct Done<'a> {
    /// The read step's facts.
    pub facts: &'a Facts,
    /// This node's identity.
    pub mine: &'a Mine,
    /// The decide step's plan.
    pub decided: Decided,
    /// What the kernel took.
    pub applied: Applied,
    /// Key agreement.
    pub agreed: &'a Agreed,
}

/// Writes what follows the apply, in the order `crate::state` documents,
/// and reports. `reassert`: the agent writes the guard again when its mark
/// is old; an ADD only when it changed (or this boot has not written it).
pub(super) fn finish(
    state: &mut NodeState,
    done: Done<'_>,
    reassert: bool,
    node: String,
    t: Timings,
) -> Result<Report, ConvergeError> {
    let (facts, mine, decided, applied) = (done.facts, done.mine, &done.decided, &done.applied);
    agreement::forget_deleted(state, &facts.snap, done.agreed)?;
    // From `encrypt` on, the catch-all comes after the policies that carve
    // the protected paths out of it.
    guard::sync(state, facts, reassert)?;
    // A node holding a stronger phase than the record asks for keeps what
    // it saw; otherwise the record it followed is the one to follow from
    // (a record of a new lineage, once it asks for as much, replaces it).
    if facts.holding.is_none() {
        let generation = facts.snap.config.as_ref().map_or(0, |c| c.phase_generation);
        state.note_seen((facts.phase != Phase::Off).then(|| Seen {
            cluster_guid: facts.snap.topology.cluster_guid.clone().unwrap_or_default(),
            phase_generation: generation,
            phase: facts.phase,
        }))?;
    }
    let (id, incarnation) = mine
        .ident
        .as_ref()
        .map_or((None, 0), |(i, _)| (Some(i.id), i.incarnation));
    let handover = &decided.handover;
    if !handover.is_done() {
        tracing::info!(
            waiting_for = ?handover.waiting_for,
            kept_inbound = handover.kept_inbound,
            "handing over between incarnations: older SAs carry the traffic until the peers hold the new ones"
        );
    }
    if mine.from_snapshot
        && !mine.new_incarnation
        && handover.is_done()
        && applied.refused.is_empty()
    {
        let record = Converged {
            version: CONVERGED_VERSION,
            node: node.clone(),
            phase: facts.phase,
            // The record names no boot while off (no identity is held).
            boot_id: if facts.phase == Phase::Off {
                String::new()
            } else {
                facts.boot.clone()
            },
            id,
            incarnation,
            ledger: if facts.phase == Phase::Off {
                String::new()
            } else {
                state.ledger_digest().to_string()
            },
            states: decided.desired.states.len(),
            policies: decided.desired.policies.len(),
            revision: facts.snap.revision,
            fingerprint: facts.snap.fingerprint.clone(),
            digest: decided.digest.clone(),
            mtu: facts.mtu.clone(),
            checked: facts.snap.read_at.clone(),
        };
        if let Err(e) = state.save_converged(record) {
            tracing::warn!(error = %e, "cannot write the convergence record; the next ADD reads etcd in full");
        }
    }
    Ok(report(done, node, t))
}

/// What this convergence saw and did.
fn report(done: Done<'_>, node: String, t: Timings) -> Report {
    let Done {
        facts,
        mine,
        decided,
        applied,
        agreed,
    } = done;
    let Decided {
        desired,
        plan,
        handover,
        ids_acked,
        revs,
        ..
    } = decided;
    let snap = &facts.snap;
    let (id, incarnation) = mine
        .ident
        .as_ref()
        .map_or((None, 0), |(i, _)| (Some(i.id), i.incarnation));
    // States are inbound or outbound, never forward.
    let (states_in, states_out, _) = by_dir(desired.states.values().map(|s| s.dir));
    let refused = applied.refused.iter().map(|(dst, why)| Unprotected {
        peer: owner_of(&snap.topology, dst),
        blocks: vec![*dst],
        reason: format!("{why}: blocked by the catch-all"),
    });
    let mut lanes: std::collections::BTreeMap<String, std::collections::BTreeSet<&str>> =
        std::collections::BTreeMap::new();
    for s in desired.states.values().filter(|s| s.dir == Dir::Out) {
        let lane = serde_json::to_value(s.lane)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        lanes.entry(lane).or_default().insert(s.receiver.as_str());
    }
    let out_packets = facts
        .held
        .states
        .values()
        .filter(|k| {
            desired
                .states
                .get(&(k.dst, k.spi))
                .is_some_and(|s| s.dir == Dir::Out)
        })
        .map(|k| k.packets)
        .max()
        .unwrap_or(0);
    let report = Report {
        lanes: lanes.into_iter().map(|(l, p)| (l, p.len())).collect(),
        out_packets,
        node,
        refused_epochs: Vec::new(),
        phase: facts.phase,
        acked_phase: facts.asked,
        held: facts.holding.clone(),
        id,
        incarnation,
        new_incarnation: mine.new_incarnation,
        states: desired.states.len(),
        policies: desired.policies.len(),
        writes: applied.states_added
            + applied.states_deleted
            + applied.policies_added
            + applied.policies_updated
            + applied.policies_deleted,
        revision: snap.revision,
        millis: ms(t.started),
        read_millis: t.read_millis,
        identity_millis: t.identity_millis,
        apply_millis: ms(t.apply),
        installed_epochs: desired.installed_epochs.clone(),
        active_epoch: desired.active_epoch,
        phase_generation: snap.config.as_ref().map_or(0, |c| c.phase_generation),
        states_by_dir: (states_in, states_out),
        policies_by_dir: by_dir(desired.policies.values().map(|p| p.dir)),
        changes: plan.describe(8),
        kernel_drift: None,
        identities_digest: identities_digest(&ids_acked),
        acked_rev: revs.acked,
        settled_rev: revs.settled,
        lost_epochs: agreed.lost.iter().copied().collect(),
        unchanged: false,
        coalesced: false,
        unprotected: desired.unprotected.iter().cloned().chain(refused).collect(),
        mtu: facts.mtu.clone(),
        stale: None,
        guard: None,
        refused: applied.refused.iter().map(|(_, why)| why.clone()).collect(),
        waiting_for: handover.waiting_for.into_iter().collect(),
        kept_inbound: handover.kept_inbound,
    };
    if facts.phase >= Phase::Encrypt {
        for u in &report.unprotected {
            tracing::warn!(peer = %u.peer.escape_debug(), blocks = ?u.blocks, reason = %u.reason, "a path cannot be protected: its traffic is blocked");
        }
    }
    tracing::debug!(?report, "converged");
    report
}

/// The node a refused policy's destination belongs to (its address or one
/// of its blocks), for the report; the destination itself when none.
fn owner_of(t: &Topology, dst: &ipnet::IpNet) -> String {
    t.nodes
        .values()
        .find(|n| {
            [n.ipv4, n.ipv6]
                .into_iter()
                .flatten()
                .any(|u| *dst == ipnet::IpNet::from(u.addr))
                || n.blocks.contains(dst)
        })
        .map_or_else(|| dst.to_string(), |n| n.name.clone())
}

/// Counts by direction: (inbound, outbound, forward).
fn by_dir(dirs: impl Iterator<Item = Dir>) -> (usize, usize, usize) {
    dirs.fold((0, 0, 0), |(i, o, f), d| match d {
        Dir::In => (i + 1, o, f),
        Dir::Out => (i, o + 1, f),
        Dir::Fwd => (i, o, f + 1),
    })
}
