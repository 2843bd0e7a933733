//! One consistent read of everything a node needs: Calico's topology and our
//! config and epochs. The CNI plugin and (later) the agent build their
//! desired state from a snapshot.

use super::calico::{Topology, IPAM_HOSTS, RESOURCES};
use super::etcd::{Etcd, EtcdError, EtcdSettings, Kv};
use std::collections::BTreeMap;

use super::ipsec::{config_key, ClusterConfig, EpochRecord, Identity, IpsecStoreError, PREFIX};

/// The Calico resource kinds a node needs, under [`RESOURCES`]. Workload
/// endpoints and policies (the bulk of a big cluster) are not read.
const KINDS: [&str; 3] = ["nodes/", "ippools/", "clusterinformations/"];

/// What a node reads from etcd.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Calico's nodes, pools, blocks and clusterGUID.
    pub topology: Topology,
    /// Our config; `None` before `keys init` (encryption off).
    pub config: Option<ClusterConfig>,
    /// Every epoch's record (secrets still sealed).
    pub epochs: Vec<EpochRecord>,
    /// Every node's id and incarnation, by node name. A malformed record is
    /// left out (with a warning): that one peer gets no SAs.
    pub identities: BTreeMap<String, Identity>,
    /// The etcd revision the reads saw.
    pub revision: i64,
}

/// The key prefixes a snapshot is built from (and the agent watches).
pub fn prefixes() -> Vec<String> {
    let mut v: Vec<String> = KINDS.iter().map(|k| format!("{RESOURCES}{k}")).collect();
    v.push(IPAM_HOSTS.to_string());
    v.push(PREFIX.to_string());
    v
}

/// Reads a snapshot with serializable (local, quorum-free) reads.
pub async fn read(etcd: &Etcd) -> Result<Snapshot, IpsecStoreError> {
    let mut kvs = Vec::new();
    let mut revision = 0;
    for prefix in prefixes() {
        let (rev, got) = etcd.get_prefix(&prefix, true).await?;
        if revision == 0 {
            revision = rev;
        }
        kvs.extend(got);
    }
    Snapshot::from_kvs(kvs.iter(), revision)
}

impl Snapshot {
    /// Builds a snapshot from the keys under [`prefixes`] (any order; other
    /// keys are ignored), as read at `revision`.
    pub fn from_kvs<'a>(
        kvs: impl Iterator<Item = &'a Kv> + Clone,
        revision: i64,
    ) -> Result<Self, IpsecStoreError> {
        let topology = Topology::from_kvs(
            kvs.clone()
                .filter(|kv| !kv.key.starts_with(PREFIX))
                .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
        );
        let mut config = None;
        let mut epochs = Vec::new();
        let mut identities = BTreeMap::new();
        let epoch_prefix = format!("{PREFIX}epochs/");
        let id_prefix = format!("{PREFIX}nodeids/");
        for kv in kvs.filter(|kv| kv.key.starts_with(PREFIX)) {
            let malformed = |e: serde_json::Error| IpsecStoreError::Malformed {
                key: kv.key.clone(),
                reason: e.to_string(),
            };
            if kv.key == config_key() {
                config = Some(serde_json::from_slice(&kv.value).map_err(malformed)?);
            } else if kv.key.starts_with(&epoch_prefix) {
                epochs.push(serde_json::from_slice::<EpochRecord>(&kv.value).map_err(malformed)?);
            } else if let Some(node) = kv.key.strip_prefix(&id_prefix) {
                match serde_json::from_slice::<Identity>(&kv.value) {
                    Ok(id) => {
                        identities.insert(node.to_string(), id);
                    }
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "skipping a malformed node identity")
                    }
                }
            }
        }
        epochs.sort_by_key(|e| e.epoch);
        Ok(Snapshot {
            topology,
            config,
            epochs,
            identities,
            revision,
        })
    }
}

/// Connects and reads a snapshot, on a private single-threaded runtime (for
/// the synchronous CNI path).
pub fn read_blocking(settings: &EtcdSettings) -> Result<Snapshot, IpsecStoreError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            IpsecStoreError::Etcd(EtcdError::Request {
                op: "start the async runtime".into(),
                reason: e.to_string(),
            })
        })?;
    rt.block_on(async {
        let etcd = Etcd::connect(settings).await?;
        read(&etcd).await
    })
}
