//! The records we keep under `/calico/ipsec/v1/`, as types: the config, an
//! epoch, a node's identity and its live status ([`super::ipsec`] reads and
//! writes them).

use serde::{Deserialize, Serialize};

use crate::keys::{EpochSecret, Kek, SealError, ALGORITHM};

/// Encryption phase of the cluster (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No IPsec.
    Off,
    /// Inbound SAs installed; plaintext still accepted.
    Accept,
    /// Outbound policies on.
    Encrypt,
    /// Inbound policies required: plaintext refused.
    Enforce,
}

/// `/calico/ipsec/v1/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// The phase every node has reached.
    pub phase: Phase,
    /// Where the manager is taking the cluster.
    pub target_phase: Phase,
    /// "ipip" or "vxlan".
    pub encapsulation: String,
    /// Always `rfc4106(gcm(aes))`.
    pub algorithm: String,
    /// ICV bits: 64, 96 or 128.
    pub icv_bits: u32,
    /// Seconds between rotations.
    pub rotation_interval_seconds: u64,
    /// Seconds an old epoch stays installed after the switch.
    pub overlap_seconds: u64,
    /// Bumped by the manager on every phase change, so that an
    /// acknowledgement always names the change it answers.
    #[serde(default)]
    pub phase_generation: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            phase: Phase::Off,
            target_phase: Phase::Off,
            encapsulation: "ipip".into(),
            algorithm: ALGORITHM.into(),
            icv_bits: 128,
            rotation_interval_seconds: 24 * 3600,
            overlap_seconds: 300,
            phase_generation: 0,
        }
    }
}

/// Life of a key epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EpochState {
    /// Installed inbound; not yet sent with.
    Pending,
    /// Senders use it.
    Active,
    /// Kept for the overlap, then deleted.
    Retired,
}

/// `/calico/ipsec/v1/epochs/<n>`: metadata in clear, the secret sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The epoch number.
    pub epoch: u32,
    /// Its state.
    pub state: EpochState,
    /// When it was created, RFC 3339 UTC.
    pub created: String,
    /// The SA algorithm.
    pub algorithm: String,
    /// Which KEK sealed it.
    pub kek_fingerprint: String,
    /// base64(nonce || AES-256-GCM(secret) || tag), AAD bound to the epoch.
    pub sealed_secret: String,
    /// When it became active, RFC 3339 UTC (absent while pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated: Option<String>,
}

impl EpochRecord {
    /// Opens the secret with `kek`.
    pub fn open(&self, kek: &Kek) -> Result<EpochSecret, SealError> {
        EpochSecret::unseal(kek, self.epoch, &self.sealed_secret)
    }
}

/// `/calico/ipsec/v1/nodes/<node>`: a node's live status, under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    pub id: u16,
    /// Its current incarnation.
    pub incarnation: u32,
    /// Epochs whose SAs it has installed.
    pub installed_epochs: Vec<u32>,
    /// The phase it has converged to.
    pub acked_phase: Phase,
    /// The config's `phase_generation` that phase belongs to.
    #[serde(default)]
    pub acked_generation: u64,
    /// The epoch its outbound policies send with.
    #[serde(default)]
    pub active_epoch: Option<u32>,
    /// Last report, RFC 3339 UTC.
    pub heartbeat: String,
    /// True while the agent cannot reach etcd and keeps its last known state.
    #[serde(default)]
    pub stale: bool,
    /// [`identities_digest`] of the node identities it converged with: once
    /// every live node reports the manager's own, each holds the SAs of
    /// every peer's current incarnation.
    #[serde(default)]
    pub identities: String,
    /// True while the node still sends on an older incarnation's SAs toward
    /// a peer that has not acknowledged its new one (peers keep accepting
    /// them until it is false).
    #[serde(default)]
    pub handover: bool,
}

/// The status records under `nodes/`, sorted by what they can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatuses {
    /// Well-formed records under a lease: the live nodes.
    pub live: Vec<(String, NodeStatus)>,
    /// Records under a lease that do not parse: (node, why).
    pub unreadable: Vec<(String, String)>,
    /// Records bound to no lease (not an agent's): ignored.
    pub unleased: Vec<String>,
}

/// A short digest of every node's (name, id, incarnation), the same on
/// every node that has seen the same identity records.
pub fn identities_digest(ids: &std::collections::BTreeMap<String, Identity>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for (name, i) in ids {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(i.id.to_be_bytes());
        h.update(i.incarnation.to_be_bytes());
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `/calico/ipsec/v1/nodeids/<node>`: a node's id and incarnation.
///
/// Peers derive the keys of the SAs they receive from this node from its
/// incarnation, so it is published before the node creates outbound SAs, and
/// only ever goes up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The node's id (the low 16 bits of its SPIs).
    pub id: u16,
    /// Bumped whenever the node may have lost SAs; 0 before the first.
    #[serde(default)]
    pub incarnation: u32,
    /// The kernel boot id the incarnation was published for.
    #[serde(default)]
    pub boot_id: String,
}
