//! `/calico/ipsec/v1/aggregate`: what a node needs from its peers' status
//! records, in one record that the leader writes when it changes.
//!
//! A hand-over between incarnations needs, per peer, the identities digest
//! it converged with, whether it still hands over, and the incarnation its
//! status was published with. Watching every peer's status would deliver
//! each status write to every node (N² deliveries per step). The leader
//! watches the statuses once and writes this digest of them instead: in a
//! steady cluster it names no node at all (every live node acknowledges
//! the same identities), so its size follows what is in motion, not the
//! cluster. It is bound to the leader's lease: with no manager it expires,
//! and nodes read the statuses themselves again.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::ipsec::{identities_digest, Identity, IpsecStore, IpsecStoreError, NodeStatus, PREFIX};

/// The key of the aggregate.
pub fn aggregate_key() -> String {
    format!("{PREFIX}aggregate")
}

/// One node's acknowledgement, as its status states it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    /// The incarnation its status was published with.
    pub incarnation: u32,
    /// The identities digest it converged with.
    pub identities: String,
    /// True while it still sends on an older incarnation somewhere.
    #[serde(default)]
    pub handover: bool,
}

/// The leader's digest of every live status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// [`identities_digest`] of every identity record the leader read: a
    /// node whose own differs knows the aggregate is behind (or ahead).
    pub ids_seen: String,
    /// The identities digest most live nodes acknowledge.
    pub identities: String,
    /// Every live node that does not acknowledge exactly `identities`, not
    /// handing over, with a status of its current incarnation, with what its
    /// status says. A node in phase off (no digest, not handing over) holds
    /// no SA and is not named either. No count is kept: the record changes
    /// only when a node's acknowledgement does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub others: BTreeMap<String, AckRecord>,
}

/// What the aggregate says of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Its status says this, or it is not named: it acknowledges the common
    /// identities at its identity's incarnation, not handing over. A node
    /// with no live status (no agent) is not named either: for a hand-over
    /// the two are the same (switched to at once, its older inbound SAs not
    /// kept), so dead nodes never make the record grow.
    Says(AckRecord),
    /// The aggregate was computed from other identities than the reader's:
    /// nothing can be said of a node it does not list.
    Unknown,
}

impl Aggregate {
    /// Builds the aggregate from the identity records and the live statuses.
    pub fn build(ids: &BTreeMap<String, Identity>, live: &[(String, NodeStatus)]) -> Self {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let off = |s: &NodeStatus| s.identities.is_empty() && !s.handover;
        for (_, s) in live.iter().filter(|(_, s)| !s.handover && !off(s)) {
            *counts.entry(s.identities.as_str()).or_default() += 1;
        }
        // The most frequent digest; ties go to the greatest, so every
        // leader computes the same record.
        let identities = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(a.0.cmp(b.0)))
            .map(|(d, _)| (*d).to_string())
            .unwrap_or_default();
        let mut agg = Aggregate {
            ids_seen: identities_digest(ids),
            identities,
            ..Aggregate::default()
        };
        for (name, s) in live {
            let regular = !s.handover
                && s.identities == agg.identities
                && ids
                    .get(name)
                    .is_some_and(|i| i.incarnation == s.incarnation);
            if !regular && !off(s) {
                agg.others.insert(
                    name.clone(),
                    AckRecord {
                        incarnation: s.incarnation,
                        identities: s.identities.clone(),
                        handover: s.handover,
                    },
                );
            }
        }
        agg
    }

    /// What the aggregate says of `peer`, for a reader whose identity
    /// records are `ids`.
    pub fn peer(
        &self,
        peer: &str,
        ids: &BTreeMap<String, Identity>,
        ids_digest: &str,
    ) -> PeerState {
        if let Some(a) = self.others.get(peer) {
            return PeerState::Says(a.clone());
        }
        if self.ids_seen != ids_digest {
            return PeerState::Unknown;
        }
        match ids.get(peer) {
            Some(i) => PeerState::Says(AckRecord {
                incarnation: i.incarnation,
                identities: self.identities.clone(),
                handover: false,
            }),
            None => PeerState::Unknown,
        }
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
mod tests {
    use super::*;

    fn ident(inc: u32) -> Identity {
        Identity {
            id: 1,
            incarnation: inc,
            boot_id: String::new(),
        }
    }

    fn status(inc: u32, digest: &str, handover: bool) -> NodeStatus {
        serde_json::from_value(serde_json::json!({
            "id": 1, "incarnation": inc, "installed_epochs": [], "acked_phase": "encrypt",
            "heartbeat": "", "identities": digest, "handover": handover,
        }))
        .expect("status")
    }

    fn cluster(n: usize) -> (BTreeMap<String, Identity>, Vec<(String, NodeStatus)>) {
        let ids: BTreeMap<String, Identity> =
            (0..n).map(|i| (format!("node-{i:05}"), ident(1))).collect();
        let live = ids
            .keys()
            .map(|k| (k.clone(), status(1, "d1", false)))
            .collect();
        (ids, live)
    }

    #[test]
    fn a_steady_cluster_names_no_node_whatever_its_size() {
        let (ids, live) = cluster(100);
        let small = serde_json::to_vec(&Aggregate::build(&ids, &live)).expect("json");
        let (ids, live) = cluster(5000);
        let agg = Aggregate::build(&ids, &live);
        let big = serde_json::to_vec(&agg).expect("json");
        assert_eq!(small.len(), big.len(), "the same size");
        assert!(agg.others.is_empty());
        let d = identities_digest(&ids);
        assert_eq!(
            agg.peer("node-00042", &ids, &d),
            PeerState::Says(AckRecord {
                incarnation: 1,
                identities: "d1".into(),
                handover: false
            })
        );
    }

    #[test]
    fn nodes_in_motion_are_named_with_what_their_status_says() {
        let (mut ids, mut live) = cluster(10);
        ids.get_mut("node-00003").expect("n").incarnation = 2; // rebooted
        live[5].1 = status(1, "d2", false); // acknowledged newer identities
        live[6].1 = status(1, "d1", true); // handing over
        live.remove(9); // no agent
        live[8].1 = status(1, "", false); // still in phase off
        let agg = Aggregate::build(&ids, &live);
        assert_eq!(agg.identities, "d1");
        assert_eq!(
            agg.others.keys().collect::<Vec<_>>(),
            ["node-00003", "node-00005", "node-00006"]
        );
        assert_eq!(agg.others["node-00003"].incarnation, 1, "the status's");
        let d = identities_digest(&ids);
        let common = PeerState::Says(AckRecord {
            incarnation: 1,
            identities: "d1".into(),
            handover: false,
        });
        assert_eq!(
            agg.peer("node-00009", &ids, &d),
            common,
            "no agent: not named"
        );
        assert_eq!(agg.peer("node-00008", &ids, &d), common, "off: not named");
        assert!(matches!(agg.peer("node-00006", &ids, &d), PeerState::Says(a) if a.handover));
        // A reader that sees other identities cannot trust the common case,
        // but still reads what the aggregate names.
        assert_eq!(agg.peer("node-00001", &ids, "other"), PeerState::Unknown);
        assert_eq!(agg.peer("node-00009", &ids, "other"), PeerState::Unknown);
        assert!(matches!(
            agg.peer("node-00005", &ids, "other"),
            PeerState::Says(a) if a.identities == "d2"
        ));
    }

    #[test]
    fn every_leader_computes_the_same_record() {
        let (ids, mut live) = cluster(4);
        live[0].1 = status(1, "a", false);
        live[1].1 = status(1, "a", false);
        live[2].1 = status(1, "b", false);
        live[3].1 = status(1, "b", false);
        let one = Aggregate::build(&ids, &live);
        live.reverse();
        assert_eq!(one, Aggregate::build(&ids, &live));
        assert_eq!(one.identities, "b", "a tie goes to the greatest digest");
    }
}
