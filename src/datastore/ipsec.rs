//! Our records under `/calico/ipsec/v1/`: readable JSON, no secret in clear.
//!
//! - `config`: phase, target phase, encapsulation, algorithm, ICV, rotation
//!   interval and overlap;
//! - `epochs/<n>`: state, created, algorithm, KEK fingerprint, sealed secret;
//! - `ids/<id>` and `nodeids/<node>`: a small integer per node, allocated once;
//!   `nodeids/<node>` also holds the node's incarnation and the boot id it
//!   was published for (not leased: an incarnation must never repeat);
//! - `nodes/<node>`: id, incarnation, installed epochs, acknowledged phase,
//!   heartbeat, bound to a lease so that dead nodes vanish.

use serde::{Deserialize, Serialize};

use super::etcd::{Etcd, EtcdError};
use crate::keys::SealError;

/// The prefix of everything we store.
pub const PREFIX: &str = "/calico/ipsec/v1/";
/// The algorithm every SA uses (owned by `keys`).
pub use crate::keys::ALGORITHM;

/// How many ids a node probes from its home slot before it reads which are
/// taken.
const PROBES: usize = 32;

/// Where a node's search for a free id starts: a hash of its name, so that
/// nodes starting together spread over the id space.
pub fn home_slot(node: &str) -> u16 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(node.as_bytes());
    let max = u32::from(crate::keys::MAX_NODE_ID);
    let n = u32::from(u16::from_be_bytes([h[0], h[1]])) % max;
    u16::try_from(n + 1).unwrap_or(1)
}

/// The id an existing `nodeids/<node>` record holds.
fn existing_id(kv: &super::etcd::Kv) -> Result<u16, IpsecStoreError> {
    let v: serde_json::Value = decode(&kv.key, &kv.value)?;
    v["id"]
        .as_u64()
        .and_then(|i| u16::try_from(i).ok())
        .filter(|i| *i > 0 && *i <= crate::keys::MAX_NODE_ID)
        .ok_or_else(|| IpsecStoreError::Malformed {
            key: kv.key.clone(),
            reason: format!("no id between 1 and {}", crate::keys::MAX_NODE_ID),
        })
}

/// A failure reading or writing our records.
#[derive(Debug, thiserror::Error)]
pub enum IpsecStoreError {
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// A record is not what we wrote.
    #[error("{key} is malformed: {reason}")]
    Malformed {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The epoch's secret did not open.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// `keys init` found an existing configuration.
    #[error("{0} already exists: the cluster's keys are already initialised")]
    AlreadyInitialised(String),
    /// A record that must exist does not.
    #[error("{0} does not exist: run `calico-ipsec keys init` first")]
    NotInitialised(String),
    /// Calico's clusterGUID, which every epoch's seal binds, is missing.
    #[error("{0} has no spec.clusterGUID: every epoch's seal binds it and nodes refuse epochs without one; start calico-node (or Typha) once so that Calico writes its ClusterInformation, then retry")]
    NoClusterGuid(String),
    /// Every node id is taken.
    #[error("no free node id: all 32767 are allocated")]
    IdsExhausted,
    /// The KEK given is not the one that sealed the existing epochs.
    #[error("the KEK file has fingerprint {given}, but epoch {epoch} was sealed with {expected}: this is the wrong KEK file (nodes could not open a new epoch sealed with it)")]
    KekMismatch {
        /// The fingerprint of the KEK given.
        given: String,
        /// The fingerprint recorded on the newest epoch.
        expected: String,
        /// That epoch.
        epoch: u32,
    },
    /// The epochs are sealed under two KEKs (`keys rotate-kek` started).
    #[error("a KEK rotation is in progress: no epoch is added until it ends with `calico-ipsec keys rotate-kek --finish --kek-file <new KEK>`")]
    KekRotating,
    /// `keys rotate` while an epoch is already pending.
    #[error("epoch {0} is pending (installed on the nodes, not yet active): wait for the manager to activate it before adding another")]
    PendingEpoch(u32),
    /// An epoch number would pass the largest there is.
    #[error("no epoch number is left after {0}")]
    EpochsExhausted(u32),
    /// A new epoch's cipher cannot be used.
    #[error("the new epoch's cipher cannot be used: {0}")]
    BadCipher(String),
    /// Too many concurrent writers; give up rather than spin.
    #[error("gave up on {0} after repeated transaction conflicts")]
    Contended(String),
}

pub use super::records::{
    acked_identities_digest, identities_digest, Cipher, CipherChange, ClusterConfig, EpochRecord,
    EpochState, Identity, NodeStatus, NodeStatuses, Phase,
};
/// Record times (RFC 3339 UTC, Unix seconds), from [`crate::clock`].
pub use crate::clock::{now_rfc3339, now_unix, parse_rfc3339, rfc3339};

/// The key of the leader's published status (bound to the leader's lease).
pub fn manager_status_key() -> String {
    format!("{PREFIX}manager/status")
}

/// The key of the config record.
pub fn config_key() -> String {
    format!("{PREFIX}config")
}

/// `epoch-counter`: `{"last": N}`, the highest epoch number ever created,
/// so that no number is used twice.
pub fn epoch_counter_key() -> String {
    format!("{PREFIX}epoch-counter")
}

/// The key of an epoch record.
pub fn epoch_key(n: u32) -> String {
    format!("{PREFIX}epochs/{n}")
}

/// The key of a node's status record.
pub fn node_key(node: &str) -> String {
    format!("{PREFIX}nodes/{node}")
}

fn id_key(id: u16) -> String {
    format!("{PREFIX}ids/{id}")
}

/// The key of a node's identity record.
pub fn nodeid_key(node: &str) -> String {
    format!("{PREFIX}nodeids/{node}")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, raw: &[u8]) -> Result<T, IpsecStoreError> {
    serde_json::from_slice(raw).map_err(|e| IpsecStoreError::Malformed {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// A record as the JSON we store.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Our records are plain structs of strings and numbers: this cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The key of the manager's leader record (bound to the leader's lease).
pub fn leader_key() -> String {
    format!("{PREFIX}manager/leader")
}

/// Our records in one etcd.
pub struct IpsecStore<'a> {
    etcd: &'a Etcd,
}

impl<'a> IpsecStore<'a> {
    /// The client (for the fenced writes of [`super::leader`]).
    pub(super) fn etcd(&self) -> &'a Etcd {
        self.etcd
    }

    /// Wraps a connected client.
    pub fn new(etcd: &'a Etcd) -> Self {
        Self { etcd }
    }

    /// Reads the cluster config; `None` before `keys init`.
    pub async fn config(&self) -> Result<Option<ClusterConfig>, IpsecStoreError> {
        Ok(self.config_rev().await?.map(|(c, _)| c))
    }

    /// Every epoch record, in epoch order; malformed ones are errors.
    pub async fn epochs(&self) -> Result<Vec<EpochRecord>, IpsecStoreError> {
        Ok(self
            .epochs_rev()
            .await?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// Reads the config with its revision.
    pub async fn config_rev(&self) -> Result<Option<(ClusterConfig, i64)>, IpsecStoreError> {
        let key = config_key();
        match self.etcd.get(&key).await? {
            None => Ok(None),
            Some(kv) => Ok(Some((decode(&key, &kv.value)?, kv.mod_revision))),
        }
    }

    /// Every epoch record that parses, with its revision, in epoch order,
    /// and the key and reason of each that does not (skipped, as nodes skip
    /// them, rather than stopping every step).
    pub async fn epochs_lenient(
        &self,
    ) -> Result<(Vec<(EpochRecord, i64)>, Vec<(String, String)>), IpsecStoreError> {
        let (_, kvs) = self
            .etcd
            .get_prefix(&format!("{PREFIX}epochs/"), false)
            .await?;
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for kv in &kvs {
            match decode::<EpochRecord>(&kv.key, &kv.value) {
                Ok(e) => good.push((e, kv.mod_revision)),
                Err(e) => bad.push((kv.key.clone(), e.to_string())),
            }
        }
        good.sort_by_key(|(e, _)| e.epoch);
        Ok((good, bad))
    }

    /// Every epoch record with its revision, in epoch order.
    pub async fn epochs_rev(&self) -> Result<Vec<(EpochRecord, i64)>, IpsecStoreError> {
        let (_, kvs) = self
            .etcd
            .get_prefix(&format!("{PREFIX}epochs/"), false)
            .await?;
        let mut out = kvs
            .iter()
            .map(|kv| decode::<EpochRecord>(&kv.key, &kv.value).map(|e| (e, kv.mod_revision)))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|(e, _)| e.epoch);
        Ok(out)
    }

    /// Sets the target phase (compare-and-swap on the config); returns the
    /// config written.
    pub async fn set_target_phase(&self, target: Phase) -> Result<ClusterConfig, IpsecStoreError> {
        for _ in 0..16 {
            let (mut cfg, rev) = self
                .config_rev()
                .await?
                .ok_or_else(|| IpsecStoreError::NotInitialised(config_key()))?;
            if cfg.target_phase == target {
                return Ok(cfg);
            }
            cfg.target_phase = target;
            if self
                .etcd
                .compare_and_put(&config_key(), rev, encode(&cfg))
                .await?
            {
                return Ok(cfg);
            }
        }
        Err(IpsecStoreError::Contended(config_key()))
    }

    /// This node's id: the existing one, or a free one claimed in one
    /// transaction (so concurrent nodes never share an id).
    ///
    /// The search starts at a slot derived from the node's name and probes
    /// upward, so nodes that start together try different ids instead of
    /// all racing for the lowest free one. Only when a run of probes finds
    /// every slot taken does it read which ids are taken (keys only).
    pub async fn node_id(&self, node: &str) -> Result<u16, IpsecStoreError> {
        let max = crate::keys::MAX_NODE_ID;
        let mut slot = home_slot(node);
        let mut taken: Option<std::collections::HashSet<u16>> = None;
        for attempt in 0..(PROBES * 2) {
            if let Some(kv) = self.etcd.get(&nodeid_key(node)).await? {
                return existing_id(&kv);
            }
            if attempt == PROBES {
                // A crowded stretch: look up the free ids once.
                let prefix = format!("{PREFIX}ids/");
                let keys = self.etcd.get_prefix_keys(&prefix).await?;
                taken = Some(
                    keys.iter()
                        .filter_map(|k| k.rsplit('/').next()?.parse().ok())
                        .collect(),
                );
            }
            if let Some(t) = &taken {
                slot = (0..max)
                    .map(|d| (slot - 1 + d) % max + 1)
                    .find(|i| !t.contains(i))
                    .ok_or(IpsecStoreError::IdsExhausted)?;
            }
            let claimed = self
                .etcd
                .create_all(&[
                    (&id_key(slot), encode(&serde_json::json!({ "node": node }))),
                    (
                        &nodeid_key(node),
                        encode(&serde_json::json!({ "id": slot })),
                    ),
                ])
                .await?;
            if claimed {
                return Ok(slot);
            }
            if let Some(t) = taken.as_mut() {
                t.insert(slot);
            }
            slot = slot % max + 1;
        }
        Err(IpsecStoreError::Contended(format!(
            "allocating an id for {node}"
        )))
    }

    /// This node's identity record and its revision (the id allocated when
    /// there is none yet).
    pub async fn identity(&self, node: &str) -> Result<(Identity, i64), IpsecStoreError> {
        for _ in 0..16 {
            self.node_id(node).await?;
            if let Some(kv) = self.etcd.get(&nodeid_key(node)).await? {
                return Ok((decode(&kv.key, &kv.value)?, kv.mod_revision));
            }
        }
        Err(IpsecStoreError::Contended(format!(
            "reading {}",
            nodeid_key(node)
        )))
    }

    /// Replaces the identity record if it is still at `mod_revision`: the
    /// record's new revision, or `None` when another writer got there first.
    pub async fn publish_identity(
        &self,
        node: &str,
        identity: &Identity,
        mod_revision: i64,
    ) -> Result<Option<i64>, IpsecStoreError> {
        Ok(self
            .etcd
            .compare_and_put_at(&nodeid_key(node), mod_revision, encode(identity))
            .await?)
    }

    /// Publishes this node's status under `lease`.
    pub async fn put_status(
        &self,
        node: &str,
        status: &NodeStatus,
        lease: i64,
    ) -> Result<(), IpsecStoreError> {
        self.etcd
            .put(&node_key(node), encode(status), Some(lease))
            .await
            .map_err(Into::into)
    }

    /// The lease this node's status record is under (0: none, or no record).
    pub async fn status_lease(&self, node: &str) -> Result<i64, IpsecStoreError> {
        let key = node_key(node);
        Ok(self
            .etcd
            .get_prefix_leased(&key)
            .await?
            .into_iter()
            .find(|(kv, _)| kv.key == key)
            .map_or(0, |(_, lease)| lease))
    }

    /// True when an identity record was written strictly between revisions
    /// `after` and `before`.
    pub async fn identities_modified_between(
        &self,
        after: i64,
        before: i64,
    ) -> Result<bool, IpsecStoreError> {
        let prefix = format!("{PREFIX}nodeids/");
        Ok(self.etcd.modified_between(&prefix, after, before).await?)
    }

    /// Every node identity (malformed records left out, as a snapshot does).
    pub async fn identities(
        &self,
    ) -> Result<std::collections::BTreeMap<String, Identity>, IpsecStoreError> {
        Ok(self.identities_rev().await?.0)
    }

    /// [`IpsecStore::identities`], and the newest `mod_revision` among them.
    pub async fn identities_rev(
        &self,
    ) -> Result<(std::collections::BTreeMap<String, Identity>, i64), IpsecStoreError> {
        let prefix = format!("{PREFIX}nodeids/");
        let (_, kvs) = self.etcd.get_prefix(&prefix, false).await?;
        let mut newest = 0;
        let ids = kvs
            .iter()
            .filter_map(|kv| {
                let name = kv.key.strip_prefix(&prefix)?.to_string();
                let i = serde_json::from_slice::<Identity>(&kv.value).ok()?;
                newest = newest.max(kv.mod_revision);
                Some((name, i))
            })
            .collect();
        Ok((ids, newest))
    }

    /// Every live node's status: well-formed records under a lease.
    pub async fn statuses(&self) -> Result<Vec<(String, NodeStatus)>, IpsecStoreError> {
        Ok(self.node_statuses().await?.live)
    }

    /// Every status record, sorted into live, unreadable and unleased.
    pub async fn node_statuses(&self) -> Result<NodeStatuses, IpsecStoreError> {
        let prefix = format!("{PREFIX}nodes/");
        let mut out = NodeStatuses::default();
        for (kv, lease) in self.etcd.get_prefix_leased(&prefix).await? {
            let name = kv.key.trim_start_matches(&prefix).to_string();
            if lease == 0 {
                // An agent always writes under its lease: this record would
                // never expire, so it cannot vouch for a live node.
                out.unleased.push(name);
                continue;
            }
            match decode::<NodeStatus>(&kv.key, &kv.value) {
                Ok(s) => out.live.push((name, s)),
                Err(e) => out.unreadable.push((name, e.to_string())),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{EpochSecret, Kek};

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_262_400), "2026-11-21T12:00:00Z");
    }

    #[test]
    fn rfc3339_round_trips_and_rejects_other_forms() {
        for secs in [0, 951_782_400, 1_795_262_400, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&rfc3339(secs)), Some(secs));
        }
        assert_eq!(parse_rfc3339("2026-11-21T12:00:00+01:00"), None);
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339(""), None);
    }

    #[test]
    fn records_are_readable_json_without_secret_bytes() {
        let kek = Kek::from_bytes(vec![1; 32]).expect("32");
        let secret = EpochSecret::from_bytes(vec![0x5a; 32]);
        let mut rec = EpochRecord {
            epoch: 3,
            state: EpochState::Pending,
            created: rfc3339(0),
            algorithm: ALGORITHM.into(),
            key_bits: 128,
            icv_bits: None,
            kek_fingerprint: kek.fingerprint(),
            sealed_secret: secret.seal(&kek, 3).expect("seal"),
            seal: super::super::records::SEAL_LEGACY,
            also_sealed: Default::default(),
            agreement: None,
            activated: None,
        };
        // A legacy record (no "seal" field) still opens, with its epoch only.
        let mut legacy = serde_json::to_value(&rec).expect("json");
        legacy.as_object_mut().expect("object").remove("seal");
        let read: EpochRecord = serde_json::from_value(legacy).expect("a legacy record reads");
        assert_eq!(read.open(&kek, "guid").expect("open"), secret);
        // Resealed, it is bound: the text names version 2, and an altered
        // parameter no longer opens.
        rec.seal_under(&secret, &kek, "guid", super::super::records::SEAL_BOUND)
            .expect("reseal");
        let text = String::from_utf8(encode(&rec)).expect("utf8");
        assert!(text.contains("\"state\":\"pending\""), "{text}");
        assert!(text.contains("\"seal\":2"), "{text}");
        assert!(!text.contains(&"5a".repeat(16)));
        assert_eq!(rec.open(&kek, "guid").expect("open"), secret);
        let mut weaker = rec.clone();
        weaker.icv_bits = Some(64);
        assert!(weaker.open(&kek, "guid").is_err(), "a shorter ICV");
        assert!(rec.open(&kek, "other-guid").is_err(), "another cluster");
        // Stripping the version turns it into a legacy record that does not open.
        let mut stripped = serde_json::to_value(&rec).expect("json");
        stripped.as_object_mut().expect("object").remove("seal");
        let read: EpochRecord = serde_json::from_value(stripped).expect("reads");
        assert!(read.open(&kek, "guid").is_err());
    }
}
