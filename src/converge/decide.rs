//! Step 3 of a convergence, *decide*: the desired state, the hand-over
//! between incarnations, and the plan against the kernel.

use std::collections::BTreeMap;

use super::agreement::Agreed;
use super::error::ConvergeError;
use super::facts::Facts;
use super::identity::Mine;
use crate::datastore::ipsec::{identities_digest, Identity, IpsecStore};
use crate::xfrm::handover::{hand_over, possible, Handover, PeerAcks};
use crate::xfrm::{Desired, DesiredError, Dir, Inputs, Plan, SaSpec};

/// What the convergence will make the kernel hold.
pub(super) struct Decided {
    /// The desired state.
    pub desired: Desired,
    /// The difference with the kernel.
    pub plan: Plan,
    /// How far the hand-over to a new incarnation got.
    pub handover: Handover,
    /// The identities as the peers will see them (ours included) that this
    /// node acknowledges (its status's digest, and what it expects its
    /// peers to acknowledge): [`acknowledged`].
    pub ids_acked: BTreeMap<String, Identity>,
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
        None if possible(&desired, &facts.held) => {
            let live = store.statuses().await?;
            Some(PeerAcks::from_statuses(
                live.iter().map(|(n, s)| (n.as_str(), s)),
            ))
        }
        None => None,
    };
    let ids_acked = acknowledged(node, &ids_now, agreed, &desired, &facts.snap);
    if let Some(a) = acks.as_mut() {
        a.current = identities_digest(&ids_acked);
    }
    let handover = hand_over(&mut desired, &facts.held, &ids_now, acks.as_ref());
    let mut plan = Plan::diff(&desired, &facts.held);
    let stale: Vec<SaSpec> = desired
        .states
        .values()
        .filter(|s| s.receiver_incarnation.is_some() && !handover.kept.contains(&s.key()))
        .filter(|s| !vouched(&mine.ledger, s))
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
    let l = &mine.ledger;
    let lost_out = plan
        .created_outbound()
        .any(|s| l.sent_before(s.epoch, &s.receiver, s.lane.index(), s.receiver_incarnation));
    let lost_in = plan
        .created_inbound()
        .filter(|s| s.receiver_incarnation.is_some())
        .any(|s| l.received_before(s.epoch, &s.sender, s.lane.index(), s.incarnation));
    if (lost_out || lost_in) && !mine.new_incarnation && mine.ident.is_some() {
        return Ok(Decision::Renew(if lost_out {
            "an outbound SA created earlier is missing or altered"
        } else {
            "an inbound SA created earlier is missing or altered (its replay window would start over)"
        }));
    }
    Ok(Decision::Decided(Box::new(Decided {
        desired,
        plan,
        handover,
        ids_acked,
    })))
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
    ids.iter()
        .filter(|(n, _)| !keyless.contains(*n))
        .map(|(n, i)| (n.clone(), i.clone()))
        .collect()
}

/// Whether the ledger says a state of a key that binds both ends was made
/// for the incarnations `s` names (this node's is the ledger's own).
fn vouched(ledger: &crate::state::Ledger, s: &SaSpec) -> bool {
    let lane = s.lane.index();
    match (s.dir, s.receiver_incarnation) {
        (_, None) => true,
        (Dir::Out, Some(r)) => ledger.sent.contains(&crate::state::Ledger::bound_entry(
            s.epoch,
            &s.receiver,
            lane,
            r,
        )),
        (_, Some(_)) => ledger.received.contains(&crate::state::Ledger::bound_entry(
            s.epoch,
            &s.sender,
            lane,
            s.incarnation,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Ledger;
    use crate::xfrm::Lane;

    fn spec(dir: Dir, rinc: Option<u32>) -> SaSpec {
        let ip = |n| std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, n));
        SaSpec {
            dir,
            src: ip(1),
            dst: ip(2),
            spi: 0x0201_0001,
            reqid: crate::keys::reqid(1),
            epoch: 1,
            sender: if dir == Dir::Out { "me" } else { "peer" }.into(),
            incarnation: 4,
            receiver: if dir == Dir::Out { "peer" } else { "me" }.into(),
            receiver_incarnation: rinc,
            icv_bits: 128,
            key_bits: 128,
            lane: Lane::V4Transport,
        }
    }

    #[test]
    fn a_held_state_is_vouched_for_only_under_the_incarnations_it_was_made_for() {
        let mut l = Ledger::fresh("b", 9);
        // Keys that bind the sender only: the kernel's view is enough.
        assert!(vouched(&l, &spec(Dir::Out, None)));
        assert!(vouched(&l, &spec(Dir::In, None)));
        // Made for the peer's incarnation 2: vouched for 2, not for 3 (the
        // peer rebooted: the same SPI now needs another key).
        l.sent.insert(Ledger::bound_entry(1, "peer", 0, 2));
        assert!(vouched(&l, &spec(Dir::Out, Some(2))));
        assert!(!vouched(&l, &spec(Dir::Out, Some(3))));
        // Inbound: made from the sender's incarnation 4 in this ledger's
        // incarnation; a fresh ledger (this node's new incarnation) vouches
        // for none.
        l.received.insert(Ledger::bound_entry(1, "peer", 0, 4));
        assert!(vouched(&l, &spec(Dir::In, Some(9))));
        assert!(!vouched(&Ledger::fresh("b", 10), &spec(Dir::In, Some(10))));
    }
}
