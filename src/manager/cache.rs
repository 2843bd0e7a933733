//! What the manager decides on, kept by etcd watches: the config, the
//! epochs, the live statuses, the identities, the leader record, Calico's
//! node names and the clusterGUID. Records are parsed once, when they
//! change, so a step reads nothing from etcd and costs what changed, not
//! the cluster.

use std::collections::{BTreeMap, BTreeSet};

use crate::datastore::calico::{valid_node_name, RESOURCES};
use crate::datastore::etcd::Kv;
use crate::datastore::ipsec::{
    acked_identities_digest, config_key, leader_key, ClusterConfig, EpochRecord, Identity,
    NodeStatus, NodeStatuses, PREFIX,
};
use crate::datastore::watch::{mark_down, mark_up, Change, WatchMsg};

/// The watched keys and prefixes, in [`Cache`] index order.
pub(super) fn watched() -> Vec<String> {
    vec![
        config_key(),
        format!("{PREFIX}epochs/"),
        format!("{PREFIX}nodes/"),
        format!("{PREFIX}nodeids/"),
        leader_key(),
        format!("{RESOURCES}nodes/"),
        format!("{RESOURCES}clusterinformations/default"),
    ]
}

const CONFIG: usize = 0;
const EPOCHS: usize = 1;
const STATUSES: usize = 2;
const IDS: usize = 3;
const LEADER: usize = 4;
const CALICO_NODES: usize = 5;
const GUID: usize = 6;

/// One status record, as parsed when it arrived.
#[derive(Debug, Clone)]
enum Status {
    Live(Box<NodeStatus>),
    Unreadable(String),
    Unleased,
}

/// The manager's view of etcd, as the watches delivered it.
#[derive(Debug, Default)]
pub(super) struct Cache {
    delivered: [bool; 7],
    down: [bool; 7],
    config: Option<Result<(ClusterConfig, i64), String>>,
    epochs: BTreeMap<String, Result<(EpochRecord, i64), String>>,
    statuses: BTreeMap<String, Status>,
    ids: BTreeMap<String, Identity>,
    /// The digest of the identities, and the excluded nodes it leaves out.
    ids_digest: Option<(Vec<String>, String)>,
    leader: Option<Vec<u8>>,
    calico_nodes: BTreeSet<String>,
    guid: String,
    /// Counts the changes absorbed.
    generation: u64,
}

impl Cache {
    /// Applies one watch message; true when it changed the config or the
    /// epochs (what a step of the leader writes).
    pub(super) fn absorb_step(&mut self, msg: WatchMsg) -> bool {
        let step = matches!(msg.idx(), CONFIG | EPOCHS);
        self.absorb(msg) && step
    }

    /// How many changes the cache has absorbed: equal generations, equal
    /// contents.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// Applies one watch message; true when what a step reads changed.
    pub(super) fn absorb(&mut self, msg: WatchMsg) -> bool {
        let changed = self.absorb_inner(msg);
        if changed {
            self.generation += 1;
        }
        changed
    }

    fn absorb_inner(&mut self, msg: WatchMsg) -> bool {
        match msg {
            WatchMsg::Reset { idx, kvs, .. } => {
                if idx >= self.delivered.len() {
                    return false;
                }
                self.clear(idx);
                for kv in kvs {
                    self.put(idx, kv);
                }
                self.delivered[idx] = true;
                true
            }
            WatchMsg::Changes { idx, changes, .. } => {
                for c in changes {
                    match c {
                        Change::Put(kv) => self.put(idx, kv),
                        Change::Delete(k) => self.delete(idx, &k),
                    }
                }
                true
            }
            WatchMsg::Up { idx } => mark_up(&mut self.down, idx),
            WatchMsg::Down { idx, reason } => {
                if mark_down(&mut self.down, idx) {
                    tracing::warn!(idx, %reason, "etcd watch down; retrying");
                }
                false
            }
        }
    }

    /// Why no step can be decided now (`None`: one can).
    pub(super) fn not_ready(&self) -> Option<&'static str> {
        if self.down.iter().any(|d| *d) {
            Some("an etcd watch is down")
        } else if self.delivered.iter().any(|d| !d) {
            Some("the watches have not delivered every prefix yet")
        } else {
            None
        }
    }

    fn clear(&mut self, idx: usize) {
        match idx {
            CONFIG => self.config = None,
            EPOCHS => self.epochs.clear(),
            STATUSES => self.statuses.clear(),
            IDS => {
                self.ids.clear();
                self.ids_digest = None;
            }
            LEADER => self.leader = None,
            CALICO_NODES => self.calico_nodes.clear(),
            GUID => self.guid.clear(),
            _ => {}
        }
    }

    fn put(&mut self, idx: usize, kv: Kv) {
        match idx {
            CONFIG if kv.key == config_key() => {
                self.config = Some(
                    serde_json::from_slice(&kv.value)
                        .map(|c| (c, kv.mod_revision))
                        .map_err(|e| e.to_string()),
                );
            }
            EPOCHS => {
                let parsed = serde_json::from_slice::<EpochRecord>(&kv.value)
                    .map(|e| (e, kv.mod_revision))
                    .map_err(|e| e.to_string());
                self.epochs.insert(kv.key, parsed);
            }
            STATUSES => {
                let Some(name) = kv.key.strip_prefix(&format!("{PREFIX}nodes/")) else {
                    return;
                };
                let st = if kv.lease == 0 {
                    Status::Unleased
                } else {
                    match serde_json::from_slice::<NodeStatus>(&kv.value) {
                        Ok(s) => Status::Live(Box::new(s)),
                        Err(e) => Status::Unreadable(e.to_string()),
                    }
                };
                self.statuses.insert(name.to_string(), st);
            }
            IDS => {
                let Some(name) = kv.key.strip_prefix(&format!("{PREFIX}nodeids/")) else {
                    return;
                };
                self.ids_digest = None;
                match serde_json::from_slice::<Identity>(&kv.value) {
                    Ok(i) => self.ids.insert(name.to_string(), i),
                    Err(_) => self.ids.remove(name),
                };
            }
            LEADER if kv.key == leader_key() => self.leader = Some(kv.value),
            CALICO_NODES => {
                if let Some(n) = kv.key.strip_prefix(&format!("{RESOURCES}nodes/")) {
                    if valid_node_name(n) {
                        self.calico_nodes.insert(n.to_string());
                    }
                }
            }
            GUID => {
                self.guid = serde_json::from_slice::<serde_json::Value>(&kv.value)
                    .ok()
                    .and_then(|v| {
                        v.pointer("/spec/clusterGUID")
                            .and_then(serde_json::Value::as_str)
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
            }
            _ => {}
        }
    }

    fn delete(&mut self, idx: usize, key: &str) {
        match idx {
            CONFIG if key == config_key() => self.config = None,
            EPOCHS => {
                self.epochs.remove(key);
            }
            STATUSES => {
                if let Some(n) = key.strip_prefix(&format!("{PREFIX}nodes/")) {
                    self.statuses.remove(n);
                }
            }
            IDS => {
                if let Some(n) = key.strip_prefix(&format!("{PREFIX}nodeids/")) {
                    self.ids.remove(n);
                    self.ids_digest = None;
                }
            }
            LEADER if key == leader_key() => self.leader = None,
            CALICO_NODES => {
                if let Some(n) = key.strip_prefix(&format!("{RESOURCES}nodes/")) {
                    self.calico_nodes.remove(n);
                }
            }
            GUID => self.guid.clear(),
            _ => {}
        }
    }

    /// The config and its revision; `Err` when the record does not parse.
    pub(super) fn config(&self) -> Option<Result<(ClusterConfig, i64), String>> {
        self.config.clone()
    }

    /// Every epoch record that parses, in epoch order, and (key, why) of
    /// each that does not.
    #[allow(clippy::type_complexity)]
    pub(super) fn epochs(&self) -> (Vec<(EpochRecord, i64)>, Vec<(String, String)>) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for (k, e) in &self.epochs {
            match e {
                Ok(e) => good.push(e.clone()),
                Err(why) => bad.push((k.clone(), why.clone())),
            }
        }
        good.sort_by_key(|(e, _)| e.epoch);
        (good, bad)
    }

    /// The status records, sorted as [`NodeStatuses`].
    pub(super) fn statuses(&self) -> NodeStatuses {
        let mut out = NodeStatuses::default();
        for (name, st) in &self.statuses {
            match st {
                Status::Live(s) => out.live.push((name.clone(), (**s).clone())),
                Status::Unreadable(why) => out.unreadable.push((name.clone(), why.clone())),
                Status::Unleased => out.unleased.push(name.clone()),
            }
        }
        out
    }

    /// The identity records.
    #[cfg(test)]
    pub(super) fn identities(&self) -> &BTreeMap<String, Identity> {
        &self.ids
    }

    /// [`acked_identities_digest`] of the identity records (the operator's
    /// excluded nodes left out), computed once per change.
    pub(super) fn identities_digest(&mut self, excluded: &[String]) -> String {
        match &self.ids_digest {
            Some((ex, d)) if ex.as_slice() == excluded => d.clone(),
            _ => {
                let d = acked_identities_digest(&self.ids, excluded);
                self.ids_digest = Some((excluded.to_vec(), d.clone()));
                d
            }
        }
    }

    /// Who the leader record names, if anyone.
    pub(super) fn leader(&self) -> Option<&[u8]> {
        self.leader.as_deref()
    }

    /// The nodes Calico lists.
    pub(super) fn calico_nodes(&self) -> Vec<String> {
        self.calico_nodes.iter().cloned().collect()
    }

    /// The nodes Calico lists whose identity record names an incarnation:
    /// each one's key is needed before a pending epoch is installed.
    pub(super) fn calico_nodes_with_incarnation(&self) -> Vec<String> {
        self.calico_nodes
            .iter()
            .filter(|n| self.ids.get(*n).is_some_and(|i| i.incarnation > 0))
            .cloned()
            .collect()
    }

    /// The cluster's GUID ("" when Calico has none).
    pub(super) fn guid(&self) -> &str {
        &self.guid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, lease: i64) -> Kv {
        Kv {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 7,
            lease,
        }
    }

    fn reset(idx: usize, kvs: Vec<Kv>) -> WatchMsg {
        WatchMsg::Reset {
            idx,
            kvs,
            revision: 7,
        }
    }

    #[test]
    fn statuses_are_sorted_by_what_they_can_tell_and_follow_deletes() {
        let mut c = Cache::default();
        for i in 0..7 {
            assert!(c.not_ready().is_some());
            c.absorb(reset(i, vec![]));
        }
        assert_eq!(c.not_ready(), None);
        let good = r#"{"id":1,"incarnation":2,"installed_epochs":[1],"acked_phase":"encrypt","heartbeat":""}"#;
        let nodes = format!("{PREFIX}nodes/");
        c.absorb(WatchMsg::Changes {
            idx: STATUSES,
            changes: vec![
                Change::Put(kv(&format!("{nodes}a"), good, 5)),
                Change::Put(kv(&format!("{nodes}b"), "{", 5)),
                Change::Put(kv(&format!("{nodes}c"), good, 0)),
            ],
            revision: 8,
        });
        let s = c.statuses();
        assert_eq!(s.live.len(), 1);
        assert_eq!(s.live[0].1.incarnation, 2);
        assert_eq!(s.unreadable.len(), 1);
        assert_eq!(s.unleased, ["c"]);
        c.absorb(WatchMsg::Changes {
            idx: STATUSES,
            changes: vec![Change::Delete(format!("{nodes}a"))],
            revision: 9,
        });
        assert!(c.statuses().live.is_empty(), "a lease gone: not live");
        c.absorb(WatchMsg::Down {
            idx: 3,
            reason: "gone".into(),
        });
        assert_eq!(c.not_ready(), Some("an etcd watch is down"));
        assert!(c.absorb(WatchMsg::Up { idx: 3 }));
        assert!(!c.absorb(WatchMsg::Up { idx: 99 }), "never a panic");
    }

    #[test]
    fn the_identities_digest_follows_every_change() {
        let mut c = Cache::default();
        let ids = format!("{PREFIX}nodeids/");
        c.absorb(reset(
            IDS,
            vec![kv(&format!("{ids}a"), r#"{"id":1,"incarnation":1}"#, 0)],
        ));
        let first = c.identities_digest(&[]);
        c.absorb(WatchMsg::Changes {
            idx: IDS,
            changes: vec![Change::Put(kv(
                &format!("{ids}a"),
                r#"{"id":1,"incarnation":2}"#,
                0,
            ))],
            revision: 8,
        });
        assert_ne!(c.identities_digest(&[]), first);
        assert_eq!(
            c.identities_digest(&[]),
            crate::datastore::ipsec::identities_digest(c.identities())
        );
        // An excluded node is left out, and the digest follows the list.
        let without = c.identities_digest(&["a".to_string()]);
        assert_eq!(
            without,
            crate::datastore::ipsec::identities_digest(&BTreeMap::new())
        );
        assert_ne!(c.identities_digest(&[]), without);
    }
}
