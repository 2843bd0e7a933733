//! The records we keep under `/calico/ipsec/v1/`, as types: the config, an
//! epoch, a node's identity and its live status ([`super::ipsec`] reads and
//! writes them).

use serde::{Deserialize, Serialize};

use crate::keys::{Aad, EpochSecret, Kek, SealBinding, SealError, ALGORITHM};

/// Encryption phase of the cluster (DESIGN §6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// No IPsec.
    #[default]
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
    /// ICV bits the pod MTU leaves room for (64, 96 or 128), and the ICV of
    /// an epoch that names none. An epoch's own ICV is at most this.
    pub icv_bits: u32,
    /// Seconds between rotations.
    pub rotation_interval_seconds: u64,
    /// Seconds an old epoch stays installed after the switch.
    pub overlap_seconds: u64,
    /// Bumped by the manager on every phase change, so that an
    /// acknowledgement always names the change it answers.
    #[serde(default)]
    pub phase_generation: u64,
    /// Nodes Calico lists that the operator excluded by name: the manager
    /// steps past them, and their peers block them from `encrypt` on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded_nodes: Vec<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            phase: Phase::Off,
            target_phase: Phase::Off,
            icv_bits: 128,
            rotation_interval_seconds: 24 * 3600,
            overlap_seconds: 300,
            phase_generation: 0,
            excluded_nodes: Vec::new(),
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

/// The cipher of an epoch's SAs, chosen when the epoch is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cipher {
    /// AES key bits: 128 or 256.
    pub key_bits: u32,
    /// ICV bits (64, 96 or 128); `None`: the config's.
    pub icv_bits: Option<u32>,
    /// Whether its keys mix in per-node P-256 key agreement.
    pub agreement: bool,
}

impl Default for Cipher {
    fn default() -> Self {
        Self {
            key_bits: crate::keys::DEFAULT_KEY_BITS,
            icv_bits: None,
            agreement: false,
        }
    }
}

/// What a new epoch changes of the newest epoch's cipher (`None`: keeps it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CipherChange {
    /// AES key bits.
    pub key_bits: Option<u32>,
    /// ICV bits.
    pub icv_bits: Option<u32>,
    /// Key agreement on or off.
    pub agreement: Option<bool>,
}

impl CipherChange {
    /// The cipher `base` becomes with this change.
    pub fn apply(self, base: Cipher) -> Cipher {
        Cipher {
            key_bits: self.key_bits.unwrap_or(base.key_bits),
            icv_bits: self.icv_bits.or(base.icv_bits),
            agreement: self.agreement.unwrap_or(base.agreement),
        }
    }
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
    /// The SA algorithm: `rfc4106(gcm(aes))`, AES-GCM as ESP uses it.
    pub algorithm: String,
    /// The AES key size of its SAs: 128 or 256 (absent in records written
    /// before it could be chosen: 128).
    #[serde(default = "default_key_bits")]
    pub key_bits: u32,
    /// The ICV length of its SAs: 64, 96 or 128, at most the config's
    /// `icv_bits`, which the pod MTU leaves room for (absent: the config's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icv_bits: Option<u32>,
    /// Which KEK sealed it.
    pub kek_fingerprint: String,
    /// base64(nonce || AES-256-GCM(secret) || tag), the AAD bound to the
    /// epoch and, from `seal` 2 on, to its parameters and the cluster.
    pub sealed_secret: String,
    /// How the secret is sealed: 3, bound to [`Self::binding`] with keys
    /// that bind both ends' incarnations ([`SEAL_BOTH_ENDS`]); 2, bound to
    /// [`Self::binding`]; 1 (absent, records written before), bound to the
    /// epoch number only, which the manager reseals as 2 (never as 3: that
    /// would change the keys of a live epoch).
    #[serde(default = "legacy_seal")]
    pub seal: u32,
    /// The same secret sealed under other KEKs while the KEK changes
    /// (`keys rotate-kek`), by KEK fingerprint; empty otherwise.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub also_sealed: std::collections::BTreeMap<String, String>,
    /// When it became active, RFC 3339 UTC (absent while pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated: Option<String>,
    /// The key agreement its SA keys mix in: [`AGREEMENT_P256`], or absent
    /// for keys derived from the epoch secret alone (every epoch written
    /// before agreement existed keeps its keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<String>,
}

/// The sealing of records written before the parameters were bound.
pub const SEAL_LEGACY: u32 = 1;
/// The sealing that binds the parameters and the cluster.
pub const SEAL_BOUND: u32 = 2;
/// The sealing of version 2's fields under the version 3 label: the
/// epoch's SA keys bind the receiver's incarnation too (the v2 derivation),
/// and with agreement each node's public key belongs to one incarnation
/// (`pubkeys/<epoch>/<node>/<incarnation>`), so a reboot costs no rotation.
pub const SEAL_BOTH_ENDS: u32 = 3;
/// The newest sealing this release writes and opens.
pub const SEAL_NEWEST: u32 = SEAL_BOTH_ENDS;

fn legacy_seal() -> u32 {
    SEAL_LEGACY
}

/// Per-node P-256 key agreement (`crate::keys::agreement`).
pub const AGREEMENT_P256: &str = "p256";

/// Whose public key a record is: the node, and for an epoch sealed as
/// [`SEAL_BOTH_ENDS`] the incarnation it belongs to.
pub type PubkeyOwner = (String, Option<u32>);

/// A node's public key for one epoch (`pubkeys/<epoch>/<node>`, or
/// `pubkeys/<epoch>/<node>/<incarnation>` for an epoch sealed as
/// [`SEAL_BOTH_ENDS`]), written once: SEC1 uncompressed, with its MAC under
/// the epoch secret, both base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PubkeyRecord {
    /// base64 of the 65-byte SEC1 uncompressed point.
    pub public: String,
    /// base64 of HMAC-SHA256 over the node name and the point.
    pub mac: String,
}

fn default_key_bits() -> u32 {
    crate::keys::DEFAULT_KEY_BITS
}

impl EpochRecord {
    /// The cipher its SAs use.
    pub fn cipher(&self) -> Cipher {
        Cipher {
            key_bits: self.key_bits,
            icv_bits: self.icv_bits,
            agreement: self.agreement.is_some(),
        }
    }

    /// Why its SAs cannot be made as it says, if they cannot: an algorithm,
    /// key size or ICV we do not use, or an ICV longer than `budget_icv`
    /// (the config's, which the pod MTU leaves room for).
    pub fn cipher_problem(&self, budget_icv: u32) -> Option<String> {
        if self.algorithm != ALGORITHM {
            return Some(format!(
                "algorithm {:?} is not {ALGORITHM}",
                self.algorithm.escape_debug().to_string()
            ));
        }
        if crate::keys::sa_key_len(self.key_bits).is_none() {
            return Some(format!("key_bits {} is not 128 or 256", self.key_bits));
        }
        if let Some(a) = self.agreement.as_deref().filter(|a| *a != AGREEMENT_P256) {
            return Some(format!(
                "agreement {:?} is not {AGREEMENT_P256}",
                a.escape_debug().to_string()
            ));
        }
        match self.icv_bits {
            Some(b) if !matches!(b, 64 | 96 | 128) => {
                Some(format!("icv_bits {b} is not 64, 96 or 128"))
            }
            Some(b) if b > budget_icv => Some(format!(
                "icv_bits {b} is longer than the config's {budget_icv}, which the pod MTU leaves room for"
            )),
            _ => None,
        }
    }

    /// What a version 2 sealing of this record binds.
    pub fn binding<'a>(&'a self, cluster_guid: &'a str) -> SealBinding<'a> {
        SealBinding {
            epoch: self.epoch,
            algorithm: &self.algorithm,
            key_bits: self.key_bits,
            icv_bits: self.icv_bits,
            agreement: self.agreement.as_deref(),
            cluster_guid,
        }
    }

    /// Opens the secret with `kek` (the sealing made under it: the main one
    /// or, while the KEK changes, the other) in the cluster `cluster_guid`.
    /// A version 2 record whose parameters were changed after sealing does
    /// not open.
    pub fn open(&self, kek: &Kek, cluster_guid: &str) -> Result<EpochSecret, SealError> {
        let sealed = self
            .also_sealed
            .get(&kek.fingerprint())
            .filter(|_| self.kek_fingerprint != kek.fingerprint())
            .unwrap_or(&self.sealed_secret);
        let binding = self.binding(cluster_guid);
        let aad = match self.seal {
            SEAL_LEGACY => Aad::Legacy(self.epoch),
            SEAL_BOUND => Aad::Bound(&binding),
            SEAL_BOTH_ENDS => Aad::BoundBothEnds(&binding),
            other => {
                return Err(SealError::Malformed {
                    epoch: self.epoch,
                    reason: format!(
                        "seal version {other} is not 1, 2 or 3 (a newer calico-ipsec wrote it?)"
                    ),
                })
            }
        };
        EpochSecret::unseal_with(kek, aad, sealed)
    }

    /// Whether its SA keys bind both ends' incarnations (sealed as
    /// [`SEAL_BOTH_ENDS`]): the v2 derivation, and public keys per
    /// incarnation.
    pub fn binds_receiver(&self) -> bool {
        self.seal >= SEAL_BOTH_ENDS
    }

    /// Whether the record says it is sealed under `kek` (mainly, or beside
    /// it while the KEK changes): if it then does not open, it was altered;
    /// if it does not say so, the KEK is the wrong one.
    pub fn sealed_under(&self, kek: &Kek) -> bool {
        let fp = kek.fingerprint();
        self.kek_fingerprint == fp || self.also_sealed.contains_key(&fp)
    }

    /// Why this record, sealed under the KEK tried, does not open, in the
    /// operator's terms.
    pub fn refusal(&self, e: &SealError) -> String {
        match e {
            SealError::WrongKey { kek_fingerprint, .. } => format!(
                "epoch {} names KEK {kek_fingerprint} but does not open with the parameters it carries (key_bits {}, icv_bits {:?}, agreement {:?}, seal {}): they, or its sealed secret, were changed after sealing",
                self.epoch, self.key_bits, self.icv_bits, self.agreement, self.seal
            ),
            other => other.to_string(),
        }
    }

    /// Seals `secret` under `kek` for this record as it now stands, as
    /// `version` ([`SEAL_BOUND`], or [`SEAL_LEGACY`] while a live node
    /// opens only that), replacing the main sealing and dropping the others.
    pub fn seal_under(
        &mut self,
        secret: &EpochSecret,
        kek: &Kek,
        cluster_guid: &str,
        version: u32,
    ) -> Result<(), SealError> {
        self.seal = version;
        self.sealed_secret = self.sealing(secret, kek, cluster_guid)?;
        self.kek_fingerprint = kek.fingerprint();
        self.also_sealed.clear();
        Ok(())
    }

    /// Adds a sealing under another KEK beside the main one, of the same
    /// version.
    pub fn seal_beside(
        &mut self,
        secret: &EpochSecret,
        kek: &Kek,
        cluster_guid: &str,
    ) -> Result<(), SealError> {
        let sealed = self.sealing(secret, kek, cluster_guid)?;
        self.also_sealed.insert(kek.fingerprint(), sealed);
        Ok(())
    }

    fn sealing(&self, secret: &EpochSecret, kek: &Kek, guid: &str) -> Result<String, SealError> {
        match self.seal {
            SEAL_LEGACY => secret.seal(kek, self.epoch),
            SEAL_BOUND => secret.seal_bound(kek, &self.binding(guid)),
            _ => secret.seal_bound_v3(kek, &self.binding(guid)),
        }
    }
}

/// `/calico/ipsec/v1/nodes/<node>`: a node's live status, under its lease.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// It converged with every identity record up to this etcd revision
    /// (`None`: a release from before it; 0 in phase off): a peer's
    /// hand-over toward it waits for this to reach the newer of the two
    /// nodes' identity revisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_rev: Option<i64>,
    /// It sends on no older incarnation toward any identity up to this
    /// revision (at most `acked_rev`): peers keep accepting an older
    /// incarnation's SAs from it until this reaches their pair's revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_rev: Option<i64>,
    /// The fingerprint of the KEK file the node reads ("" when it cannot
    /// read one): `keys rotate-kek --finish` waits for every node to hold
    /// the new KEK.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kek: String,
    /// Key-agreement epochs this node cannot use (its private key is gone,
    /// as after a reboot): the manager moves to a new epoch at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost_epochs: Vec<u32>,
    /// The newest epoch sealing this node opens ([`SEAL_BOUND`]; absent, 0:
    /// an agent from before it, which opens [`SEAL_LEGACY`] records only).
    /// Records are sealed as version 2 only once every live node opens it.
    #[serde(default)]
    pub seal: u32,
    /// Peers it sends to, per SA lane (`v4-transport`, `v4-tunnel`, ...).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub lanes: std::collections::BTreeMap<String, usize>,
    /// Paths toward pod blocks it cannot protect (blocked from encrypt on).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unprotected: usize,
    /// Why it holds a stronger phase than the config record asks for (a
    /// record of a re-initialised or restored etcd): `acked_phase` is then
    /// the record's, which the node's state more than satisfies.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub held: String,
    /// Bits of its highest outbound sequence number (0: none sent): the
    /// record changes only when it doubles, not with every packet.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub seq_bits: u32,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
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
    digest_of(ids.iter())
}

/// [`identities_digest`] of every node but those the operator excluded
/// (`excluded_nodes`): what a node's acknowledgement covers, since no node
/// holds SAs with an excluded one. The manager and the agents both leave
/// them out, so an excluded node that never published a key (a dead one)
/// holds nothing back.
pub fn acked_identities_digest(
    ids: &std::collections::BTreeMap<String, Identity>,
    excluded: &[String],
) -> String {
    digest_of(ids.iter().filter(|(n, _)| !excluded.contains(n)))
}

fn digest_of<'a>(ids: impl Iterator<Item = (&'a String, &'a Identity)>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(algorithm: &str, key_bits: u32, icv_bits: Option<u32>) -> EpochRecord {
        EpochRecord {
            epoch: 1,
            state: EpochState::Active,
            created: String::new(),
            algorithm: algorithm.into(),
            key_bits,
            icv_bits,
            kek_fingerprint: String::new(),
            sealed_secret: String::new(),
            seal: crate::datastore::records::SEAL_BOUND,
            also_sealed: Default::default(),
            agreement: None,
            activated: None,
        }
    }

    #[test]
    fn an_epoch_names_a_cipher_we_use_or_is_refused() {
        assert_eq!(rec(ALGORITHM, 128, None).cipher_problem(128), None);
        assert_eq!(rec(ALGORITHM, 256, Some(96)).cipher_problem(128), None);
        let says = |r: EpochRecord, budget: u32, what: &str| {
            let why = r.cipher_problem(budget).expect("refused");
            assert!(why.contains(what), "{why}");
        };
        says(rec("rfc4106(gcm(des))", 128, None), 128, "algorithm");
        says(rec(ALGORITHM, 192, None), 128, "key_bits 192");
        says(rec(ALGORITHM, 128, Some(100)), 128, "icv_bits 100");
        says(rec(ALGORITHM, 128, Some(128)), 96, "pod MTU");
    }

    #[test]
    fn records_without_a_cipher_read_as_aes_128_with_the_config_icv() {
        let text = br#"{"epoch":1,"state":"active","created":"","algorithm":"rfc4106(gcm(aes))","kek_fingerprint":"","sealed_secret":""}"#;
        let r: EpochRecord = serde_json::from_slice(text).expect("old record");
        assert_eq!((r.key_bits, r.icv_bits), (128, None));
        let out = String::from_utf8(serde_json::to_vec(&r).expect("json")).expect("utf8");
        assert!(!out.contains("icv_bits"), "{out}");
        // A config written before (with encapsulation and algorithm) reads.
        let cfg = br#"{"phase":"off","target_phase":"off","encapsulation":"ipip","algorithm":"rfc4106(gcm(aes))","icv_bits":128,"rotation_interval_seconds":1,"overlap_seconds":1}"#;
        let c: ClusterConfig = serde_json::from_slice(cfg).expect("old config");
        assert_eq!(c.icv_bits, 128);
    }
}
