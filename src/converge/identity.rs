//! Step 2 of a convergence, *identity*: this node's incarnation, and the
//! publication of a new one whenever a key could otherwise be used twice.
//!
//! An outbound SA's key is derived from (epoch, me, incarnation, peer). If
//! that SA is ever lost (a reboot, a flush, a peer that left and came back)
//! it must not be created again with the same key: GCM nonces restart with
//! every new SA. So the node keeps a ledger of every (epoch, peer) outbound
//! SA it has created in its current incarnation, written before the SA is
//! created ([`crate::state`]). A new incarnation is published in etcd
//! (`nodeids/<node>`), before any SA that uses it exists, when:
//! - the node has never published one;
//! - the kernel's boot id differs from the one published (a reboot);
//! - the ledger is missing or belongs to another incarnation or boot;
//! - an outbound SA the ledger says was created is missing or altered, or
//!   an inbound SA whose key binds this incarnation (its replay window
//!   would start over), or this node's private key for its incarnation in
//!   an epoch whose public keys belong to incarnations is gone ([`renew`],
//!   from the keys and decide steps).

use super::error::ConvergeError;
use super::facts::Facts;
use crate::datastore::ipsec::{Identity, IpsecStore, IpsecStoreError, Phase};
use crate::state::{Ledger, NodeState};
use crate::xfrm::{Dir, SaSpec};

/// This node's identity in one convergence.
#[derive(Debug, Default)]
pub(super) struct Mine {
    /// The identity and its etcd revision (`None` while off).
    pub ident: Option<(Identity, i64)>,
    /// The ledger to hold; written in the apply step when `ledger_changed`.
    pub ledger: Ledger,
    /// Whether `ledger` differs from the one on disk.
    pub ledger_changed: bool,
    /// True when a new incarnation was published this time.
    pub new_incarnation: bool,
    /// True while nothing was read from etcd beyond the snapshot (the
    /// convergence record may vouch only for such a convergence).
    pub from_snapshot: bool,
}

/// Whether the published incarnation cannot be trusted to have fresh keys:
/// never published, published before a reboot, or without a matching ledger
/// (so which SAs were created under it is unknown).
pub fn needs_new_incarnation(ident: &Identity, ledger: Option<&Ledger>, boot: &str) -> bool {
    ident.incarnation == 0
        || ident.boot_id != boot
        || ledger.is_none_or(|l| l.incarnation != ident.incarnation || l.boot_id != boot)
}

/// This node's identity: the snapshot's, or etcd's when the snapshot has
/// none (or lags our own last publication), and a new incarnation when the
/// published one cannot be trusted.
///
/// While the phase is off an ADD holds no identity; the agent (`eager`)
/// settles one all the same, once its boot id can be read, so that the
/// step out of off writes none: each identity written is delivered to
/// every node.
pub(super) async fn settle(
    store: &IpsecStore<'_>,
    state: &NodeState,
    facts: &Facts,
    node: &str,
    eager: bool,
) -> Result<Mine, ConvergeError> {
    let mut mine = Mine {
        from_snapshot: true,
        ..Mine::default()
    };
    if facts.phase == Phase::Off && (!eager || facts.boot.is_empty()) {
        return Ok(mine);
    }
    let boot = &facts.boot;
    let loaded = state.ledger();
    // A snapshot older than our own last publication (the agent's cache
    // may lag its write) is no reason for yet another incarnation.
    let behind =
        |i: &Identity| loaded.is_some_and(|l| l.boot_id == *boot && l.incarnation > i.incarnation);
    let known = facts
        .snap
        .identities
        .get(node)
        .filter(|i| i.id > 0 && !behind(i))
        .zip(facts.snap.identity_revisions.get(node));
    let current = match known {
        Some((i, rev)) => (i.clone(), *rev),
        None => {
            mine.from_snapshot = false;
            store.identity(node).await?
        }
    };
    match loaded.filter(|_| !needs_new_incarnation(&current.0, loaded, boot)) {
        Some(l) => {
            mine.ledger = l.clone();
            mine.ident = Some(current);
        }
        None => {
            let floor = loaded.map_or(0, |l| l.incarnation);
            bump(store, node, current, floor, boot, &mut mine).await?;
        }
    }
    Ok(mine)
}

/// Publishes a new incarnation because a key of the current one cannot be
/// used again (`why`: an SA of it is missing or altered, or this node's
/// private key for it is gone).
pub(super) async fn renew(
    store: &IpsecStore<'_>,
    node: &str,
    boot: &str,
    mine: &mut Mine,
    why: &str,
) -> Result<(), ConvergeError> {
    let Some(current) = mine.ident.clone() else {
        return Ok(());
    };
    tracing::warn!(
        node = %node,
        incarnation = current.0.incarnation,
        reason = why,
        "publishing a new incarnation so that no key is used twice"
    );
    let floor = mine.ledger.incarnation;
    bump(store, node, current, floor, boot, mine).await
}

/// Publishes the next incarnation (compare-and-swap on the identity record
/// at its revision), above both the published one and `floor` (the local
/// ledger's), and starts an empty ledger for it. The ledger is written by
/// the apply step, before any SA; a crash before then leaves the old
/// ledger, which names another incarnation: the next convergence publishes
/// yet another.
async fn bump(
    store: &IpsecStore<'_>,
    node: &str,
    (mut ident, mut rev): (Identity, i64),
    floor: u32,
    boot: &str,
    mine: &mut Mine,
) -> Result<(), ConvergeError> {
    for _ in 0..16 {
        let last = ident.incarnation.max(floor);
        let Some(incarnation) = last.checked_add(1) else {
            return Err(IpsecStoreError::Malformed {
                key: crate::datastore::ipsec::nodeid_key(node),
                reason: format!("incarnation {last} is the largest there is: delete this node's nodeids record once every epoch now in etcd has been rotated away and deleted"),
            }
            .into());
        };
        let next = Identity {
            id: ident.id,
            incarnation,
            boot_id: boot.to_string(),
        };
        // The reply's revision saves reading the record back.
        if let Some(new_rev) = store.publish_identity(node, &next, rev).await? {
            tracing::info!(
                node,
                incarnation = next.incarnation,
                "published a new incarnation"
            );
            mine.ledger = Ledger::fresh(boot, next.incarnation);
            mine.ledger_changed = true;
            mine.new_incarnation = true;
            mine.from_snapshot = false;
            // A missing revision (0) only makes a later compare-and-swap
            // fail and read the record back.
            mine.ident = Some((next, new_rev));
            return Ok(());
        }
        (ident, rev) = store.identity(node).await?;
    }
    Err(IpsecStoreError::Contended(format!("publishing a new incarnation of {node}")).into())
}

/// The entry an SA of this node has in the ledger, and whether it is an
/// inbound one: "epoch/peer[/lane]" for an outbound SA whose key binds the
/// sender only ([`Ledger::entry`]); "epoch/peer/lane/incarnation" of the
/// other end for an SA whose key binds both ([`Ledger::bound_entry`]); none
/// for an inbound SA whose key binds the sender only (its key is the
/// peer's to keep fresh).
pub(super) fn ledger_entry(s: &SaSpec) -> Option<(bool, String)> {
    let lane = s.lane.index();
    match (s.dir, s.receiver_incarnation) {
        (Dir::Out, None) => Some((false, Ledger::entry(s.epoch, &s.receiver, lane))),
        (Dir::Out, Some(r)) => Some((false, Ledger::bound_entry(s.epoch, &s.receiver, lane, r))),
        (Dir::In, Some(_)) => Some((
            true,
            Ledger::bound_entry(s.epoch, &s.sender, lane, s.incarnation),
        )),
        _ => None,
    }
}

/// Whether the ledger lists `s`: made in this incarnation, for the
/// incarnations it names.
pub(super) fn listed(ledger: &Ledger, s: &SaSpec) -> bool {
    ledger_entry(s).is_some_and(|(inbound, e)| ledger.lists(inbound, &e))
}

/// Whether making `s` would use a key of this incarnation again.
pub(super) fn made_before(ledger: &Ledger, s: &SaSpec) -> bool {
    ledger_entry(s).is_some_and(|(inbound, e)| ledger.made_before(s.epoch, inbound, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(inc: u32, boot: &str) -> Identity {
        Identity {
            id: 1,
            incarnation: inc,
            boot_id: boot.into(),
        }
    }

    #[test]
    fn a_new_incarnation_after_reboot_first_start_or_lost_ledger() {
        let l = Ledger::fresh("b1", 4);
        assert!(!needs_new_incarnation(&ident(4, "b1"), Some(&l), "b1"));
        assert!(
            needs_new_incarnation(&ident(0, ""), None, "b1"),
            "first start"
        );
        assert!(
            needs_new_incarnation(&ident(4, "b1"), Some(&l), "b2"),
            "rebooted"
        );
        assert!(
            needs_new_incarnation(&ident(4, "b1"), None, "b1"),
            "ledger lost"
        );
        assert!(
            needs_new_incarnation(&ident(5, "b1"), Some(&l), "b1"),
            "ledger of another incarnation"
        );
    }

    /// An SA of epoch 5 with `peer` on lane 0; `other` is the other end's
    /// incarnation its key binds.
    fn sa(dir: Dir, peer: &str, other: Option<u32>) -> SaSpec {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let (sender, receiver) = match dir {
            Dir::Out => ("me".to_string(), peer.to_string()),
            _ => (peer.to_string(), "me".to_string()),
        };
        let (incarnation, receiver_incarnation) = match dir {
            Dir::Out => (9, other),
            _ => (other.unwrap_or(1), other.map(|_| 9)),
        };
        SaSpec {
            dir,
            src: ip,
            dst: ip,
            spi: 0x0600_0001,
            reqid: crate::keys::reqid(5),
            epoch: 5,
            sender,
            incarnation,
            receiver,
            receiver_incarnation,
            icv_bits: 128,
            key_bits: 128,
            lane: crate::xfrm::Lane::V4Transport,
        }
    }

    #[test]
    fn a_held_state_is_listed_only_under_the_incarnations_it_was_made_for() {
        let mut l = Ledger::fresh("b", 9);
        // Made for the peer's incarnation 2: listed for 2, not for 3 (the
        // peer rebooted: the same slot now needs another key).
        l.sent.insert(Ledger::bound_entry(5, "peer", 0, 2));
        assert!(listed(&l, &sa(Dir::Out, "peer", Some(2))));
        assert!(!listed(&l, &sa(Dir::Out, "peer", Some(3))));
        // Inbound: made from the sender's incarnation 4 in this ledger's
        // incarnation; a fresh ledger (this node's new incarnation) lists
        // none.
        l.received.insert(Ledger::bound_entry(5, "peer", 0, 4));
        let inb = sa(Dir::In, "peer", Some(4));
        assert!(listed(&l, &inb));
        assert!(!listed(&Ledger::fresh("b", 10), &inb));
        // An inbound SA whose key binds the sender only is never listed,
        // so never made "again".
        let plain_in = sa(Dir::In, "peer", None);
        assert_eq!(ledger_entry(&plain_in), None);
        l.forgotten.insert(5);
        assert!(!made_before(&l, &plain_in));
        assert!(
            made_before(&l, &sa(Dir::Out, "peer", None)),
            "forgotten epoch"
        );
    }
}
