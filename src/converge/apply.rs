//! Step 4 of a convergence, *apply*: the ledger written ahead, the
//! catch-all in its place around the plan, and the plan applied with keys
//! derived just in time.
//!
//! Around the plan, the node's [`KernelMark`] says what the kernel holds: it
//! is removed before the first netlink write and written once the plan is
//! in, so the next convergence, whichever process runs it, can tell a
//! kernel changed outside calico-ipsec ([`drift`]) from one that holds
//! exactly what was left (its own changes then come from etcd or the node).

use super::agreement::Agreed;
use super::decide::Decided;
use super::error::ConvergeError;
use super::facts::Facts;
use super::guard;
use super::identity::Mine;
use super::record::held_digest;
use crate::datastore::snapshot::Snapshot;
use crate::keys::SaId;
use crate::state::{KernelMark, NodeState};
use crate::xfrm::kernel::{Applied, Xfrm};
use crate::xfrm::{Dir, Held, Plan};

/// Writes the ledger ahead of the SAs it lists (pruned to the epochs still
/// installed), then applies the plan, with the catch-all before the
/// policies below `encrypt` (a hitless disable) and after them from
/// `encrypt` on (the guard step). When the apply fails, what did go in is
/// still carved out of the catch-all, and what did not stays blocked: the
/// guard is written anyway.
pub(super) fn apply(
    state: &mut NodeState,
    facts: &mut Facts,
    mine: &mut Mine,
    decided: &Decided,
    agreed: &Agreed,
) -> Result<Applied, ConvergeError> {
    let plan = &decided.plan;
    if mine.ident.is_some() {
        let ledger = &mut mine.ledger;
        let pruned = ledger.prune(&decided.desired.installed_epochs);
        let mut changed = mine.ledger_changed || pruned;
        let made = plan.created_outbound().chain(plan.created_inbound());
        for (inbound, entry) in made.filter_map(super::identity::ledger_entry) {
            changed |= ledger.record(inbound, entry);
        }
        if changed {
            state.write_ledger(ledger.clone())?;
            mine.ledger_changed = false;
        }
    }
    if plan.is_empty() {
        state.keep_kernel_mark(mark(facts, decided));
        return Ok(Applied::default());
    }
    tracing::info!(phase = ?facts.phase, plan = %plan.summary(), "converging XFRM");
    if facts.guard.is_empty() {
        guard::sync(state, facts, true)?;
    }
    // From the first write until the plan is in, nothing vouches for what
    // the kernel holds (a crash here leaves no mark).
    state.keep_kernel_mark(None);
    let snap = &facts.snap;
    match apply_with_keys(snap, agreed, &mut facts.xfrm, plan, &facts.held) {
        Ok(a) => {
            // A refused policy leaves the kernel short of the plan.
            if a.refused.is_empty() {
                state.keep_kernel_mark(mark(facts, decided));
            }
            Ok(a)
        }
        Err(e) => {
            if let Err(g) = guard::sync(state, facts, true) {
                tracing::error!(error = %g, "the nftables catch-all could not be written either");
            }
            Err(e)
        }
    }
}

/// Whether the kernel, as read at the start of this convergence, differs
/// from what the last convergence on this node left. `None` when no mark of
/// this boot says what that was.
pub(super) fn drift(state: &NodeState, facts: &Facts) -> Option<bool> {
    let m = state.kernel_mark()?;
    (!facts.boot.is_empty() && m.boot == facts.boot).then(|| m.digest != held_digest(&facts.held))
}

/// The mark of a kernel that holds exactly the desired state.
fn mark(facts: &Facts, decided: &Decided) -> Option<KernelMark> {
    (!facts.boot.is_empty()).then(|| KernelMark {
        digest: decided.digest.clone(),
        boot: facts.boot.clone(),
    })
}

/// Applies the plan, deriving each key from its epoch's secret (opened by
/// `converge::epochs`) just before its state is added.
pub(super) fn apply_with_keys(
    snap: &Snapshot,
    agreed: &Agreed,
    xfrm: &mut Xfrm,
    plan: &Plan,
    held: &Held,
) -> Result<Applied, ConvergeError> {
    let guid = snap.topology.cluster_guid.clone().unwrap_or_default();
    let mut shared = super::agreement::SharedSecrets::default();
    let applied = xfrm.apply(plan, held, |s| {
        let rec = snap
            .epochs
            .iter()
            .find(|e| e.epoch == s.epoch)
            .ok_or_else(|| format!("epoch {} has no record", s.epoch))?;
        let secret = agreed
            .secrets
            .get(&s.epoch)
            .ok_or_else(|| format!("epoch {} was not opened with the KEK", s.epoch))?;
        let id = SaId {
            epoch: s.epoch,
            sender: &s.sender,
            incarnation: s.incarnation,
            receiver: &s.receiver,
            lane: s.lane.index(),
            key_bits: s.key_bits,
            receiver_incarnation: s.receiver_incarnation,
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
