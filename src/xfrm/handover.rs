//! Make-before-break when a node changes incarnation.
//!
//! A node publishes a new incarnation when it cannot vouch for an outbound
//! SA it created (lost, altered, a ledger it cannot trust): every outbound
//! SA then gets a new SPI and key, so that no key is ever used twice. The
//! kernel sends on the newest state that fits a policy's template, so
//! installing the new SAs at once would switch each peer's traffic to keys
//! the peer may not hold yet. The hand-over avoids that:
//!
//! - **Sender.** Toward a peer whose status does not yet acknowledge the new
//!   identities (its `identities` digest differs from the current one), an
//!   outbound SA of an older incarnation that is still in the kernel, intact,
//!   keeps carrying the traffic, and the new one waits. Once the peer
//!   acknowledges, the new SA is added (the kernel switches to it) and the
//!   old one deleted. Where no old SA is left there is nothing to wait for:
//!   the new SA goes in at once, and the outage lasts until the peer installs
//!   its inbound twin (one etcd round trip and one convergence).
//! - **Receiver.** An inbound SA of a peer's older incarnation is kept while
//!   the peer may still send on it: while its status says it is handing over,
//!   predates its new identity, or has not acknowledged the current
//!   identities. In an epoch whose keys bind both ends, the SPI also
//!   carries the receiver's incarnation, so a node's own new incarnation
//!   hands over the same way: its peers keep sending on the inbound SA made
//!   for its older one until they have its new SA.
//!
//! A kept SA is one the kernel holds exactly as specified: it is never added
//! or replaced, so no key of an older incarnation is ever installed again.
//! The agent watches the statuses; an ADD reads them only when a hand-over
//! is [`possible`]. A peer without a status (no agent) takes no part: it is
//! switched to at once, and its older inbound SAs are not kept.

use std::collections::{BTreeMap, BTreeSet};

use super::{Desired, Dir, Held, KernelSa, SaSpec};
use crate::datastore::aggregate::{Aggregate, Revs};
use crate::datastore::ipsec::Identity;

/// What one peer's status record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAck {
    /// The incarnation the status was published with.
    pub incarnation: u32,
    /// The identities digest the peer converged with.
    pub identities: String,
    /// True while the peer still sends on an older incarnation somewhere.
    pub handover: bool,
    /// Its acknowledged and settled identity revisions, where its release
    /// says them (then they decide, not the digest).
    pub revs: Option<Revs>,
}

/// The peers' status records, for the hand-over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerAcks {
    /// The digest of the identity records this convergence uses.
    pub current: String,
    /// Live status records, by node name.
    pub peers: BTreeMap<String, PeerAck>,
    /// The revision of each peer's identity record as this node read it,
    /// and this node's own under its name, from its latest publication
    /// (filled in by the convergence; `i64::MAX`: unknown, so no peer can
    /// have acknowledged it).
    pub revisions: BTreeMap<String, i64>,
    /// This node's name.
    pub me: String,
}

impl PeerAcks {
    /// The identity revision a peer's status must reach for the pair
    /// (this node, `peer`): the newer of the two identities. `None` when
    /// one of them is newer than this node's snapshot.
    pub fn need(&self, peer: &str) -> Option<i64> {
        let mine = self.revisions.get(&self.me).copied().unwrap_or(0);
        let theirs = self.revisions.get(peer).copied()?;
        Some(mine.max(theirs)).filter(|r| *r < i64::MAX)
    }

    /// True when `peer` holds the SAs of this node's and its own current
    /// identities (or has no status: no agent takes part).
    fn acked(&self, peer: &str) -> bool {
        let Some(p) = self.peers.get(peer) else {
            return true;
        };
        match p.revs {
            Some(r) => self.need(peer).is_some_and(|n| r.acked >= n),
            None => p.identities == self.current,
        }
    }

    /// True when `peer` may still send toward this node on an older
    /// incarnation's SA.
    fn may_send_old(&self, peer: &str, ids: &BTreeMap<String, Identity>) -> bool {
        let Some(p) = self.peers.get(peer) else {
            return false;
        };
        match p.revs {
            Some(r) => self.need(peer).is_none_or(|n| r.settled < n),
            None => {
                p.handover
                    || p.identities != self.current
                    || ids
                        .get(peer)
                        .is_some_and(|i| i.incarnation != p.incarnation)
            }
        }
    }
}

/// What the hand-over kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handover {
    /// Peers toward which this node still sends on an older incarnation.
    pub waiting_for: BTreeSet<String>,
    /// Inbound SAs of peers' older incarnations kept for now.
    pub kept_inbound: usize,
    /// Every state kept as it is (an older twin, either way), by kernel key:
    /// each keeps the key it was made with.
    pub kept: BTreeSet<(std::net::IpAddr, u32)>,
}

impl Handover {
    /// True when nothing is pending.
    pub fn is_done(&self) -> bool {
        self.waiting_for.is_empty() && self.kept_inbound == 0
    }
}

/// The same SA slot (sender, lane, epoch, addresses) under another
/// incarnation: SPIs differ only in their incarnation byte (bits 16-23).
fn older_twin(spec: &SaSpec, k: &KernelSa) -> bool {
    k.src == spec.src
        && k.dst == spec.dst
        && k.reqid == spec.reqid
        && k.mode == Some(spec.lane.mode())
        && k.spi != spec.spi
        && k.spi & 0xff00_ffff == spec.spi & 0xff00_ffff
}

/// The held twins of `spec` that may be kept: those the kernel holds
/// exactly as they were made (never re-created).
fn twins(spec: &SaSpec, held: &Held) -> Vec<SaSpec> {
    held.states
        .values()
        .filter(|k| older_twin(spec, k))
        .map(|k| SaSpec {
            spi: k.spi,
            ..spec.clone()
        })
        .filter(|s| held.states.get(&s.key()).is_some_and(|k| k.matches(s)))
        .collect()
}

/// True when a hand-over may apply: a desired state is missing while an
/// older twin of it is held, or a held state is an older twin of a desired
/// inbound one. Only then are the peers' statuses worth reading.
pub fn possible(want: &Desired, held: &Held) -> bool {
    want.states.values().any(|s| {
        let missing = !held.states.contains_key(&s.key());
        (missing || s.dir == Dir::In) && held.states.values().any(|k| older_twin(s, k))
    })
}

impl PeerAcks {
    /// From the live status records, by node name (`current`, `revisions`
    /// and `me` are filled in by the convergence).
    pub fn from_statuses<'a>(
        statuses: impl IntoIterator<Item = (&'a str, &'a crate::datastore::ipsec::NodeStatus)>,
    ) -> Self {
        PeerAcks {
            peers: statuses
                .into_iter()
                .map(|(name, st)| {
                    let ack = PeerAck {
                        incarnation: st.incarnation,
                        identities: st.identities.clone(),
                        handover: st.handover,
                        revs: Revs::of(st),
                    };
                    (name.to_string(), ack)
                })
                .collect(),
            ..PeerAcks::default()
        }
    }

    /// From the leader's aggregate, for a node whose identity records are
    /// `ids`: each peer says its own revisions or the common ones.
    pub fn from_aggregate(agg: &Aggregate, ids: &BTreeMap<String, Identity>) -> Self {
        let peers = ids
            .iter()
            .map(|(name, i)| {
                let ack = PeerAck {
                    incarnation: i.incarnation,
                    identities: String::new(),
                    handover: false,
                    revs: Some(agg.peer(name)),
                };
                (name.clone(), ack)
            })
            .collect();
        PeerAcks {
            peers,
            ..PeerAcks::default()
        }
    }
}

/// Applies the hand-over to `want`: outbound SAs wait for the peer's
/// acknowledgement where an older one can still carry the traffic, and
/// inbound SAs of peers' older incarnations stay while those peers may use
/// them. `acks` is `None` when the statuses were not read.
pub fn hand_over(
    want: &mut Desired,
    held: &Held,
    ids: &BTreeMap<String, Identity>,
    acks: Option<&PeerAcks>,
) -> Handover {
    let mut h = Handover::default();
    // A peer with no status takes no part in hand-overs (no agent, or
    // dead): it switched at once, as its ADDs do without statuses.
    let acked = |peer: &str| acks.is_some_and(|a| a.acked(peer));
    // A peer that has not acknowledged the current identities may still
    // send on a twin made for this node's older incarnation (keys that
    // bind both ends: this node's new incarnation is a new SPI too).
    let may_send_old = |peer: &str| acks.is_none_or(|a| a.may_send_old(peer, ids));
    let waiting: Vec<SaSpec> = want
        .states
        .values()
        .filter(|s| s.dir == Dir::Out && !held.states.contains_key(&s.key()))
        .filter(|s| !acked(&s.receiver))
        .cloned()
        .collect();
    for spec in waiting {
        let kept = twins(&spec, held);
        if kept.is_empty() {
            continue;
        }
        want.states.remove(&spec.key());
        h.waiting_for.insert(spec.receiver.clone());
        for s in kept {
            h.kept.insert(s.key());
            want.states.insert(s.key(), s);
        }
    }
    // Inbound twins of a peer's older incarnation, its new SA already in.
    let inbound: Vec<SaSpec> = want
        .states
        .values()
        .filter(|s| s.dir == Dir::In && may_send_old(&s.sender))
        .cloned()
        .collect();
    for spec in inbound {
        for s in twins(&spec, held) {
            h.kept.insert(s.key());
            if want.states.insert(s.key(), s).is_none() {
                h.kept_inbound += 1;
            }
        }
    }
    h
}

#[cfg(test)]
#[path = "handover_tests.rs"]
mod tests;
