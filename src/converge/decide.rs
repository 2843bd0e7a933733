//! Step 3 of a convergence, *decide*: the desired state, the hand-over
//! between incarnations, and the plan against the kernel.

use std::collections::BTreeMap;

use super::agreement::Agreed;
use super::error::ConvergeError;
use super::facts::Facts;
use super::identity::{listed, made_before, Mine};
use crate::datastore::aggregate::Revs;
use crate::datastore::ipsec::{identities_digest, Identity, IpsecStore};
use crate::xfrm::handover::{hand_over, possible, Handover, PeerAcks};
use crate::xfrm::{Desired, DesiredError, Dir, Inputs, Plan, SaSpec};

/// What the convergence will make the kernel hold.
pub(super) struct Decided {
    /// The desired state.
    pub desired: Desired,
    /// The digest of `desired` in the terms the plan compares
    /// ([`super::record::desired_digest`]), computed once for the
    /// convergence record and the kernel mark.
    pub digest: String,
    /// The difference with the kernel.
    pub plan: Plan,
    /// How far the hand-over to a new incarnation got.
    pub handover: Handover,
    /// The identities as the peers will see them (ours included) that this
    /// node acknowledges (its status's digest, and what it expects its
    /// peers to acknowledge): [`acknowledged`].
    pub ids_acked: BTreeMap<String, Identity>,
    /// The identity revisions this node acknowledges and has settled
    /// (its status's `acked_rev` and `settled_rev`): [`revisions`].
    pub revs: Revs,
}

/// What the decide step concluded.
pub(super) enum Decision {
    /// The desired state and the plan.
    Decided(Box<Decided>),
    /// A desired state etcd does not allow (the caller keeps what the
    /// kernel holds, if anything).
    Refused(DesiredError),
    /// The plan would make an SA again under a key this incarnation used
    /// (an outbound SA's nonces, or an inbound SA's replay window, would
    /// start over): a new incarnation must be published, and the keys
    /// prepared and the plan computed again. Says why.
    Renew(&'static str),
}

/// The peers' acknowledgements, read once: the leader's aggregate (one
/// key), or every status where no leader writes one (none running, or one
/// from before the aggregate).
pub(super) async fn read_acks(
    store: &IpsecStore<'_>,
    snap: &crate::datastore::snapshot::Snapshot,
) -> Result<PeerAcks, ConvergeError> {
    if let Some(agg) = store.aggregate().await? {
        return Ok(PeerAcks::from_aggregate(&agg, &snap.identities));
    }
    let live = store.statuses().await?;
    Ok(PeerAcks::from_statuses(
        live.iter().map(|(n, s)| (n.as_str(), s)),
    ))
}

/// Computes the desired state and the plan. A state whose key binds both
/// ends and that the ledger does not vouch for (it was made for another
/// incarnation of either end) is replaced: the kernel never shows a key.
pub(super) async fn decide(
    store: &IpsecStore<'_>,
    facts: &Facts,
    mine: &Mine,
    agreed: &Agreed,
    acks: Option<&PeerAcks>,
    node: &str,
) -> Result<Decision, ConvergeError> {
    let ready = agreed.readiness(node);
    // A peer whose new key is not readable yet stays at the incarnation
    // it had (`agreement::lagging`).
    let mut peers = facts.snap.identities.clone();
    for (n, inc) in &agreed.effective {
        if let Some(i) = peers.get_mut(n) {
            i.incarnation = *inc;
        }
    }
    let computed = Desired::compute(&Inputs {
        topology: &facts.snap.topology,
        me: node,
        my_identity: mine.ident.as_ref().map(|(i, _)| i),
        identities: &peers,
        phase: facts.phase,
        epochs: &facts.snap.epochs,
        icv_bits: facts.icv_bits,
        agreement: &ready,
    });
    let mut desired = match computed {
        Ok(d) => d,
        Err(e) => return Ok(Decision::Refused(e)),
    };
    // The snapshot may predate our own publication.
    let mut ids_now = peers;
    if let Some((m, _)) = &mine.ident {
        ids_now.insert(node.to_string(), m.clone());
    }
    // An ADD reads the peers' statuses only when a hand-over may apply.
    let mut acks = match acks {
        Some(a) => Some(a.clone()),
        None if possible(&desired, &facts.held) => Some(read_acks(store, &facts.snap).await?),
        None => None,
    };
    let ids_acked = acknowledged(node, &ids_now, agreed, &desired, &facts.snap);
    let mut revisions = facts.snap.identity_revisions.clone();
    if let Some((_, rev)) = &mine.ident {
        revisions.insert(node.to_string(), *rev);
    }
    if let Some(a) = acks.as_mut() {
        a.current = identities_digest(&ids_acked);
        a.revisions = revisions.clone();
        a.me = node.to_string();
    }
    let handover = hand_over(&mut desired, &facts.held, &ids_now, acks.as_ref());
    let mut newest = newest_identity(&facts.snap);
    if let Some(r) = own_record_next(store, mine, newest).await? {
        // The snapshot predates only our own new record: it is converged
        // with every identity up to it (without waiting for the watch to
        // bring it back, one more convergence before peers may switch).
        newest = r;
    }
    let revs = self::revisions(node, &revisions, &ids_now, &facts.snap, newest, &handover);
    let mut plan = Plan::diff(&desired, &facts.held);
    let stale: Vec<SaSpec> = desired
        .states
        .values()
        .filter(|s| s.receiver_incarnation.is_some() && !handover.kept.contains(&s.key()))
        .filter(|s| !listed(&mine.ledger, s))
        .filter(|s| {
            facts
                .held
                .states
                .get(&s.key())
                .is_some_and(|k| k.matches(s))
        })
        .cloned()
        .collect();
    plan.replace_states.extend(stale);
    let again = plan
        .created_outbound()
        .chain(plan.created_inbound())
        .find(|s| made_before(&mine.ledger, s));
    if let Some(s) = again.filter(|_| !mine.new_incarnation && mine.ident.is_some()) {
        return Ok(Decision::Renew(match s.dir {
            Dir::Out => "an outbound SA created earlier is missing or altered",
            _ => "an inbound SA created earlier is missing or altered (its replay window would start over)",
        }));
    }
    Ok(Decision::Decided(Box::new(Decided {
        digest: super::record::desired_digest(&desired),
        desired,
        plan,
        handover,
        ids_acked,
        revs,
    })))
}

/// The newest `mod_revision` among the snapshot's identity records.
fn newest_identity(snap: &crate::datastore::snapshot::Snapshot) -> i64 {
    snap.identity_revisions.values().copied().max().unwrap_or(0)
}

/// The revision of this node's own identity record when it is newer than
/// `newest`, the snapshot's newest, and no other identity record changed in
/// between (one linearizable read, only then: just after a new incarnation).
async fn own_record_next(
    store: &IpsecStore<'_>,
    mine: &Mine,
    newest: i64,
) -> Result<Option<i64>, ConvergeError> {
    let Some((_, rev)) = &mine.ident else {
        return Ok(None);
    };
    if *rev <= newest {
        return Ok(None);
    }
    let moved = store.identities_modified_between(newest, *rev).await?;
    Ok((!moved).then_some(*rev))
}

/// The identity revisions this node's status states. `acked_rev`: the
/// newest identity record of the snapshot, or less, just below the oldest
/// one whose peer this node keeps at an older incarnation (its new key is
/// not readable yet, `agreement::lagging`); every record up to it is
/// converged (`newest`: the newest record the node has converged with).
/// A peer with no key at all in an epoch (a node that never
/// published one: dead, or not yet started) does not lower it: it holds
/// no SA of an older incarnation to hand over from, and a dead node must
/// not hold every later hand-over back. `settled_rev`: no more than that,
/// and below every pair this node still waits on (the newer identity of
/// it and the peer).
fn revisions(
    me: &str,
    revisions: &BTreeMap<String, i64>,
    ids_now: &BTreeMap<String, Identity>,
    snap: &crate::datastore::snapshot::Snapshot,
    newest: i64,
    handover: &Handover,
) -> Revs {
    let rev = |n: &str| revisions.get(n).copied().unwrap_or(0);
    let acked = snap
        .identities
        .iter()
        .filter(|(n, _)| n.as_str() != me)
        .filter(|(n, i)| {
            ids_now
                .get(*n)
                .is_some_and(|a| a.incarnation != i.incarnation)
        })
        .map(|(n, _)| rev(n) - 1)
        .fold(newest, i64::min);
    let settled = handover
        .waiting_for
        .iter()
        .map(|peer| rev(me).max(rev(peer)) - 1)
        .fold(acked, i64::min);
    Revs { acked, settled }
}

/// The identities this node acknowledges: those it converged with, less the
/// listed peers whose current key it lacks in an epoch whose keys are per
/// incarnation (so the manager's phase steps and activations, and a peer's
/// hand-over, wait until it holds their SAs).
fn acknowledged(
    me: &str,
    ids: &BTreeMap<String, Identity>,
    agreed: &Agreed,
    desired: &Desired,
    snap: &crate::datastore::snapshot::Snapshot,
) -> BTreeMap<String, Identity> {
    let listed = |n: &str| snap.topology.nodes.contains_key(n);
    let keyless = agreed.keyless(me, &desired.installed_epochs, listed, ids);
    // No SA is held with an excluded node: the manager leaves it out too
    // (`acked_identities_digest`).
    ids.iter()
        .filter(|(n, _)| !keyless.contains(*n) && !snap.topology.excluded.contains(*n))
        .map(|(n, i)| (n.clone(), i.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn ident(inc: u32) -> Identity {
        Identity {
            id: 1,
            incarnation: inc,
            boot_id: String::new(),
        }
    }

    /// node-1 (me) at revision 10, node-2 at 20, node-3 at 30, node-4 at 40.
    fn snap() -> crate::datastore::snapshot::Snapshot {
        let mut s = crate::datastore::snapshot::Snapshot::default();
        for (n, rev) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
            s.identities.insert(format!("node-{n}"), ident(1));
            s.identity_revisions.insert(format!("node-{n}"), rev);
        }
        s
    }

    /// node-1's revisions, converged with the snapshot's newest record.
    fn revs_of(
        revs: &BTreeMap<String, i64>,
        now: &BTreeMap<String, Identity>,
        s: &crate::datastore::snapshot::Snapshot,
        handover: &Handover,
    ) -> Revs {
        revisions("node-1", revs, now, s, newest_identity(s), handover)
    }

    #[test]
    fn acked_is_the_newest_record_unless_a_peer_is_kept_at_an_older_incarnation() {
        let s = snap();
        let revs = s.identity_revisions.clone();
        let mut now = s.identities.clone();
        let none = Handover::default();
        assert_eq!(
            revs_of(&revs, &now, &s, &none),
            Revs {
                acked: 40,
                settled: 40
            }
        );
        // node-3's new key is not readable yet: kept at incarnation 0.
        now.insert("node-3".into(), ident(0));
        assert_eq!(
            revs_of(&revs, &now, &s, &none),
            Revs {
                acked: 29,
                settled: 29
            }
        );
        // A peer missing from the convergence altogether (it never
        // published a key: a dead node) does not lower it.
        let mut now = s.identities.clone();
        now.remove("node-2");
        assert_eq!(revs_of(&revs, &now, &s, &none).acked, 40);
    }

    #[test]
    fn an_excluded_node_is_left_out_of_what_a_node_acknowledges_as_the_manager_does() {
        let mut s = snap();
        s.topology.excluded.insert("node-3".into());
        let ids = s.identities.clone();
        let acked = acknowledged("node-1", &ids, &Agreed::default(), &Desired::default(), &s);
        let names: Vec<&str> = acked.keys().map(String::as_str).collect();
        assert_eq!(names, ["node-1", "node-2", "node-4"]);
        // The digest a status states is the one the manager compares it to.
        assert_eq!(
            identities_digest(&acked),
            crate::datastore::ipsec::acked_identities_digest(&ids, &["node-3".to_string()])
        );
        assert_ne!(identities_digest(&acked), identities_digest(&ids));
    }

    #[test]
    fn settled_stays_below_every_pair_still_waited_on() {
        let s = snap();
        let mut revs = s.identity_revisions.clone();
        let now = s.identities.clone();
        let waiting = |peers: &[&str]| Handover {
            waiting_for: peers.iter().map(|p| p.to_string()).collect::<BTreeSet<_>>(),
            ..Handover::default()
        };
        // Waiting on node-2 (20) and node-4 (40): below the older pair.
        assert_eq!(
            revs_of(&revs, &now, &s, &waiting(&["node-2", "node-4"])),
            Revs {
                acked: 40,
                settled: 19
            }
        );
        // This node's own new incarnation (revision 50, newer than the
        // snapshot): every pair is at 50, and nothing past the snapshot
        // is acknowledged.
        revs.insert("node-1".into(), 50);
        assert_eq!(
            revs_of(&revs, &now, &s, &waiting(&["node-2"])),
            Revs {
                acked: 40,
                settled: 40
            }
        );
        // Once etcd says no other record changed up to it, the own record
        // is the newest converged: the pair with node-2 is still waited on.
        assert_eq!(
            revisions("node-1", &revs, &now, &s, 50, &waiting(&["node-2"])),
            Revs {
                acked: 50,
                settled: 49
            }
        );
    }
}
