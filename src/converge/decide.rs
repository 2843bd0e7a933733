//! Step 3 of a convergence, *decide*: the desired state, the hand-over
//! between incarnations, and the plan against the kernel.

use std::collections::BTreeMap;

use super::agreement::Agreed;
use super::error::ConvergeError;
use super::facts::Facts;
use super::identity::{renew, Mine};
use crate::datastore::ipsec::{identities_digest, Identity, IpsecStore};
use crate::xfrm::handover::{hand_over, possible, Handover, PeerAcks};
use crate::xfrm::{Desired, DesiredError, Inputs, Plan};

/// What the convergence will make the kernel hold.
pub(super) struct Decided {
    /// The desired state.
    pub desired: Desired,
    /// The difference with the kernel.
    pub plan: Plan,
    /// How far the hand-over to a new incarnation got.
    pub handover: Handover,
    /// The identities as the peers will see them, ours included.
    pub ids_now: BTreeMap<String, Identity>,
}

/// Computes the desired state and the plan. When the plan would create an
/// outbound SA the ledger says was created before (it was lost or altered),
/// a new incarnation is published and the plan computed again. `Err` of
/// the outer result is a failure; the inner `Err` is a desired state etcd
/// does not allow (the caller keeps what the kernel holds, if anything).
pub(super) async fn decide(
    store: &IpsecStore<'_>,
    facts: &Facts,
    mine: &mut Mine,
    agreed: &Agreed,
    acks: Option<&PeerAcks>,
    node: &str,
) -> Result<Result<Decided, DesiredError>, ConvergeError> {
    let ready = agreed.readiness(node);
    loop {
        let computed = Desired::compute(&Inputs {
            topology: &facts.snap.topology,
            me: node,
            my_identity: mine.ident.as_ref().map(|(i, _)| i),
            identities: &facts.snap.identities,
            phase: facts.phase,
            epochs: &facts.snap.epochs,
            icv_bits: facts.icv_bits,
            agreement: &ready,
        });
        let mut desired = match computed {
            Ok(d) => d,
            Err(e) => return Ok(Err(e)),
        };
        // The snapshot may predate our own publication.
        let mut ids_now = facts.snap.identities.clone();
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
        if let Some(a) = acks.as_mut() {
            a.current = identities_digest(&ids_now);
        }
        let handover = hand_over(&mut desired, &facts.held, &ids_now, acks.as_ref());
        let plan = Plan::diff(&desired, &facts.held);
        let lost = plan.created_outbound().any(|s| {
            mine.ledger
                .used_before(s.epoch, &s.receiver, s.lane.index())
        });
        if !lost || mine.new_incarnation || mine.ident.is_none() {
            return Ok(Ok(Decided {
                desired,
                plan,
                handover,
                ids_now,
            }));
        }
        renew(store, node, &facts.boot, mine).await?;
    }
}
