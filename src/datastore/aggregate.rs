//! `/calico/ipsec/v1/acks`: what a node needs from its peers' status
//! records, in one record of bounded size that the leader writes when it
//! changes.
//!
//! A hand-over between incarnations asks, per peer, two questions that
//! etcd's revisions answer in order: has the peer converged with every
//! identity record up to revision R (`acked_rev` in its status), and has it
//! stopped sending on older incarnations toward every identity up to R
//! (`settled_rev`)? Both only grow, so "at least R" is a sound answer for
//! any node: the leader can speak for thousands of nodes with one pair of
//! floors. Watching every peer's status instead would deliver each status
//! write to every node (N² deliveries per step); naming every node that
//! moves would make the record, and each delivery of it, grow with the
//! cluster during a step (one reboot at 5,000 nodes cost 927 MB that way).
//!
//! The record says one of two things:
//! - **exact**: every live node not named says exactly (`acked`,
//!   `settled`); the few that differ ([`LIST_MAX`] at most) are named with
//!   their own revisions. This is the steady state, and a step's start and
//!   end.
//! - **floors**: more nodes than that differ (a whole cluster in motion):
//!   every live node says at least (`acked`, `settled`) and none is named.
//!
//! A node in phase off (no SA, `acked_rev` 0) and a node without a live
//! status take no part; a reader counts them as saying the common pair,
//! as a peer without an agent always was. The record is bound to the
//! leader's lease: with no manager it expires, and nodes read the
//! statuses themselves again. Nor is it written while a live status
//! comes from a release without revisions (a rolling upgrade): nodes read
//! the statuses then too.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::ipsec::{IpsecStore, IpsecStoreError, NodeStatus, PREFIX};

/// The key of the aggregate.
pub fn aggregate_key() -> String {
    format!("{PREFIX}acks")
}

/// The most nodes an exact record names.
pub const LIST_MAX: usize = 32;

/// One node's revisions, as its status states them.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Revs {
    /// It converged with every identity record up to this revision.
    pub acked: i64,
    /// It sends on no older incarnation toward any identity up to this revision.
    pub settled: i64,
}

impl Revs {
    /// What `s` says, if it comes from a release that says it.
    pub fn of(s: &NodeStatus) -> Option<Revs> {
        Some(Revs {
            acked: s.acked_rev?,
            settled: s.settled_rev?,
        })
    }
}

/// The leader's digest of every live status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// What every live node not in `nodes` says: exactly (`exact`) or at least.
    pub common: Revs,
    /// True when every live node not named says exactly `common`.
    pub exact: bool,
    /// The live nodes that differ from `common` (exact records only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, Revs>,
}

/// A live status in phase off: it holds no SA.
fn off(s: &NodeStatus) -> bool {
    s.identities.is_empty() && !s.handover
}

impl Aggregate {
    /// Builds the aggregate from the live statuses; `None` while one of
    /// them (out of phase off) comes from a release without revisions.
    pub fn build(live: &[(String, NodeStatus)]) -> Option<Self> {
        let mut entries = Vec::with_capacity(live.len());
        for (name, s) in live.iter().filter(|(_, s)| !off(s)) {
            entries.push((name, Revs::of(s)?));
        }
        let mut counts: HashMap<Revs, usize> = HashMap::new();
        for (_, r) in &entries {
            *counts.entry(*r).or_default() += 1;
        }
        // The most frequent pair; ties go to the greatest, so every leader
        // computes the same record.
        let common = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
            .map(|(r, _)| *r)
            .unwrap_or_default();
        let differ = entries.len() - counts.get(&common).copied().unwrap_or(0);
        if differ <= LIST_MAX {
            let nodes = entries
                .into_iter()
                .filter(|(_, r)| *r != common)
                .map(|(n, r)| (n.clone(), r))
                .collect();
            return Some(Aggregate {
                common,
                exact: true,
                nodes,
            });
        }
        let floor = |f: fn(&Revs) -> i64| entries.iter().map(|(_, r)| f(r)).min().unwrap_or(0);
        Some(Aggregate {
            common: Revs {
                acked: floor(|r| r.acked),
                settled: floor(|r| r.settled),
            },
            exact: false,
            nodes: BTreeMap::new(),
        })
    }

    /// What the aggregate says of `peer`: its own revisions, or at least
    /// the common ones.
    pub fn peer(&self, peer: &str) -> Revs {
        self.nodes.get(peer).copied().unwrap_or(self.common)
    }
}

impl IpsecStore<'_> {
    /// The leader's aggregate of the statuses, if there is one that parses
    /// (a malformed one is logged and counts as none).
    pub async fn aggregate(&self) -> Result<Option<Aggregate>, IpsecStoreError> {
        let Some(kv) = self.etcd().get(&aggregate_key()).await? else {
            return Ok(None);
        };
        match serde_json::from_slice(&kv.value) {
            Ok(a) => Ok(Some(a)),
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "the leader's aggregate does not parse; reading the statuses instead");
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
#[path = "aggregate_tests.rs"]
mod tests;
