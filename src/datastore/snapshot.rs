//! One consistent read of everything a node needs: Calico's topology and our
//! config and epochs. The CNI plugin and (later) the agent build their
//! desired state from a snapshot.

use super::calico::{Topology, IPAM_HOSTS, RESOURCES};
use super::etcd::{Etcd, EtcdError, EtcdSettings};
use super::ipsec::{config_key, ClusterConfig, EpochRecord, IpsecStoreError, PREFIX};

/// What a node reads from etcd.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Calico's nodes, pools, blocks and clusterGUID.
    pub topology: Topology,
    /// Our config; `None` before `keys init` (encryption off).
    pub config: Option<ClusterConfig>,
    /// Every epoch's record (secrets still sealed).
    pub epochs: Vec<EpochRecord>,
    /// The etcd revision the reads saw.
    pub revision: i64,
}

/// Reads a snapshot with serializable (local, quorum-free) reads.
pub async fn read(etcd: &Etcd) -> Result<Snapshot, IpsecStoreError> {
    let (rev_a, calico) = etcd.get_prefix(RESOURCES, true).await?;
    let (_, ipam) = etcd.get_prefix(IPAM_HOSTS, true).await?;
    let (_, ours) = etcd.get_prefix(PREFIX, true).await?;
    let topology = Topology::from_kvs(
        calico
            .iter()
            .chain(ipam.iter())
            .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
    );
    let mut config = None;
    let mut epochs = Vec::new();
    let epoch_prefix = format!("{PREFIX}epochs/");
    for kv in &ours {
        let malformed = |e: serde_json::Error| IpsecStoreError::Malformed {
            key: kv.key.clone(),
            reason: e.to_string(),
        };
        if kv.key == config_key() {
            config = Some(serde_json::from_slice(&kv.value).map_err(malformed)?);
        } else if kv.key.starts_with(&epoch_prefix) {
            epochs.push(serde_json::from_slice::<EpochRecord>(&kv.value).map_err(malformed)?);
        }
    }
    epochs.sort_by_key(|e| e.epoch);
    Ok(Snapshot {
        topology,
        config,
        epochs,
        revision: rev_a,
    })
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
