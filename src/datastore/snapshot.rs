//! One consistent read of everything a node needs: Calico's topology and our
//! config, epochs, identities and public keys. The CNI plugin reads one per
//! full convergence; the agent keeps one up to date from its watch. Both
//! build their desired state from it.

use super::calico::{Topology, IPAM_HOSTS, RESOURCES};
use super::etcd::{Etcd, EtcdError, EtcdSettings, Kv, Mark, Range};
use std::collections::BTreeMap;

use crate::clock::Stamp;

use serde::{Deserialize, Serialize};

use super::ipsec::{config_key, ClusterConfig, EpochRecord, Identity, IpsecStoreError, PREFIX};
use super::records::{PubkeyOwner, PubkeyRecord};

/// The Calico resource kinds a node needs, under [`RESOURCES`]. Workload
/// endpoints and policies (the bulk of a big cluster) are not read.
const KINDS: [&str; 4] = [
    "nodes/",
    "ippools/",
    "clusterinformations/",
    "felixconfigurations/",
];

/// Every key and prefix a snapshot reads, in a fixed order: Calico's
/// [`KINDS`], the IPAM host affinities, our config, epochs and node
/// identities. Our live node statuses (`nodes/`, heartbeats) and the id
/// index (`ids/`) are not read: the desired state does not depend on them.
fn ranges() -> Vec<(String, bool)> {
    let mut r: Vec<(String, bool)> = KINDS
        .iter()
        .map(|k| (format!("{RESOURCES}{k}"), true))
        .collect();
    r.push((IPAM_HOSTS.to_string(), true));
    r.push((config_key(), false));
    r.push((format!("{PREFIX}epochs/"), true));
    r.push((format!("{PREFIX}nodeids/"), true));
    r.push((format!("{PREFIX}pubkeys/"), true));
    // Last, and outside the fingerprint (see [`fingerprinted`]).
    r.push((super::ipam::IPAM_BLOCKS.to_string(), true));
    r
}

/// The ranges whose [`Mark`]s make the [`Fingerprint`]: all but Calico's
/// IPAM allocation blocks, which change with every pod address allocated
/// anywhere (an ADD's own allocation included). Borrowed addresses are
/// therefore followed by the agent's watch, not by an ADD's fast path; until
/// a node converges on one, the catch-all blocks its traffic (never clear).
fn fingerprinted(r: &[(String, bool)]) -> &[(String, bool)] {
    &r[..r.len() - 1]
}

fn as_ranges(r: &[(String, bool)]) -> Vec<Range<'_>> {
    r.iter()
        .map(|(key, prefix)| Range {
            key,
            prefix: *prefix,
        })
        .collect()
}

/// What etcd held under everything a snapshot reads, in a few bytes: the
/// cluster and the [`Mark`] of each range. Equal fingerprints mean equal
/// snapshots, so a node can tell in one small request that nothing it
/// depends on changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The etcd cluster's id.
    pub cluster_id: u64,
    /// One mark per range, in [`ranges`] order.
    pub marks: Vec<Mark>,
}

/// What a node reads from etcd.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Calico's nodes, pools, blocks and clusterGUID.
    pub topology: Topology,
    /// Our config; `None` before `keys init` (encryption off), or when the
    /// record cannot be parsed (then `config_problem` says why).
    pub config: Option<ClusterConfig>,
    /// Why the config record exists but cannot be used: the node must then
    /// keep what it has, never read it as "off".
    pub config_problem: Option<String>,
    /// Every usable epoch's record (secrets still sealed).
    pub epochs: Vec<EpochRecord>,
    /// Records of ours that were skipped, each with its key and reason.
    pub problems: Vec<String>,
    /// Every node's id and incarnation, by node name. A malformed record is
    /// left out (with a warning): that one peer gets no SAs.
    pub identities: BTreeMap<String, Identity>,
    /// The `mod_revision` of each identity record, by node name (for a
    /// compare-and-swap on it).
    pub identity_revisions: BTreeMap<String, i64>,
    /// The etcd revision the reads saw.
    pub revision: i64,
    /// The fingerprint of what was read, at the same revision.
    pub fingerprint: Fingerprint,
    /// Each node's public key for each epoch with key agreement, by epoch
    /// then owner (the node, and the incarnation for an epoch sealed as
    /// version 3), as written (verified against the epoch secret where used).
    pub pubkeys: BTreeMap<u32, BTreeMap<PubkeyOwner, PubkeyRecord>>,
    /// When the read from etcd began (`None` for the agent's watch cache,
    /// whose contents may lag etcd by an unknown time).
    pub read_at: Option<Stamp>,
}

/// The keys and prefixes a snapshot is built from, as (key, is a prefix),
/// in a fixed order: what the agent watches.
pub fn watched() -> Vec<(String, bool)> {
    ranges()
}

/// Reads a snapshot in one serializable (local, quorum-free) transaction:
/// one round trip, one revision.
pub async fn read(etcd: &Etcd) -> Result<Snapshot, IpsecStoreError> {
    let keys = ranges();
    let read_at = Stamp::now();
    let (header, read) = etcd.read_ranges(&as_ranges(&keys)).await?;
    let fingerprint = Fingerprint {
        cluster_id: header.cluster_id,
        marks: read
            .iter()
            .take(fingerprinted(&keys).len())
            .map(|kvs| Mark::of(kvs))
            .collect(),
    };
    let mut snap = build(&read, header.revision, fingerprint)?;
    snap.read_at = read_at;
    Ok(snap)
}

impl Snapshot {
    /// Builds a snapshot from the keys of each range of [`watched`], in that
    /// order (the agent's watch cache), as seen at `revision`. Its
    /// fingerprint has no cluster id, so it never matches a fast-path
    /// record: the next ADD after it reads etcd in full.
    pub fn from_ranges(read: &[Vec<Kv>], revision: i64) -> Result<Self, IpsecStoreError> {
        let n = fingerprinted(&ranges()).len().min(read.len());
        let fingerprint = Fingerprint {
            cluster_id: 0,
            marks: read.iter().take(n).map(|kvs| Mark::of(kvs)).collect(),
        };
        build(read, revision, fingerprint)
    }
}

/// Parses what was read from each range of [`ranges`], in order.
fn build(
    read: &[Vec<Kv>],
    revision: i64,
    fingerprint: Fingerprint,
) -> Result<Snapshot, IpsecStoreError> {
    let none: Vec<Kv> = Vec::new();
    let at = |i: usize| read.get(i).unwrap_or(&none);
    let blocks = ranges().len() - 1;
    let topology = Topology::from_kvs(
        (0..=KINDS.len())
            .chain([blocks])
            .flat_map(at)
            .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
    );
    let mut config = None;
    let mut config_problem = None;
    let mut problems = Vec::new();
    let mut epochs = Vec::new();
    let mut identities = BTreeMap::new();
    let mut identity_revisions = BTreeMap::new();
    let id_prefix = format!("{PREFIX}nodeids/");
    let base = KINDS.len() + 1;
    for kv in at(base).iter().filter(|kv| kv.key == config_key()) {
        match serde_json::from_slice::<ClusterConfig>(&kv.value) {
            Ok(c) => config = Some(c),
            Err(e) => {
                tracing::error!(key = %kv.key, error = %e, "our config record is malformed; keeping the current XFRM state");
                config_problem = Some(format!("{} is malformed: {e}", kv.key));
            }
        }
    }
    let budget_icv = config.as_ref().map_or(128, |c| c.icv_bits);
    for kv in at(base + 1) {
        let key = kv.key.escape_debug().to_string();
        match serde_json::from_slice::<EpochRecord>(&kv.value) {
            Ok(e) if !kv.key.ends_with(&format!("/{}", e.epoch)) => {
                problems.push(format!("{key} holds epoch {}, not its own number", e.epoch));
            }
            Ok(e) => match e.cipher_problem(budget_icv) {
                Some(why) => problems.push(format!("{key}: {why}")),
                None => epochs.push(e),
            },
            Err(e) => problems.push(format!("{key} is malformed: {e}")),
        }
    }
    if config
        .as_ref()
        .is_some_and(|c| c.phase != super::ipsec::Phase::Off)
    {
        for p in &problems {
            tracing::warn!(problem = %p, "skipping a key epoch record");
        }
    }
    for kv in at(base + 2) {
        let Some(node) = kv.key.strip_prefix(&id_prefix) else {
            continue;
        };
        match serde_json::from_slice::<Identity>(&kv.value) {
            Ok(id) => {
                identities.insert(node.to_string(), id);
                identity_revisions.insert(node.to_string(), kv.mod_revision);
            }
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "skipping a malformed node identity")
            }
        }
    }
    let pubkeys = pubkeys_of(at(base + 3), &mut problems);
    let mut topology = topology;
    topology.excluded = config
        .as_ref()
        .map(|c| c.excluded_nodes.iter().cloned().collect())
        .unwrap_or_default();
    epochs.sort_by_key(|e| e.epoch);
    Ok(Snapshot {
        topology,
        config,
        config_problem,
        epochs,
        problems,
        identities,
        identity_revisions,
        revision,
        fingerprint,
        pubkeys,
        read_at: None,
    })
}

/// The `pubkeys/<epoch>/<node>[/<incarnation>]` records; a malformed one
/// is reported and left out (that peer's paths wait, blocked, for a good
/// one).
fn pubkeys_of(
    kvs: &[Kv],
    problems: &mut Vec<String>,
) -> BTreeMap<u32, BTreeMap<PubkeyOwner, PubkeyRecord>> {
    let prefix = format!("{PREFIX}pubkeys/");
    let mut out: BTreeMap<u32, BTreeMap<PubkeyOwner, PubkeyRecord>> = BTreeMap::new();
    for kv in kvs {
        let key = kv.key.escape_debug().to_string();
        let Some((epoch, owner)) = kv.key.strip_prefix(&prefix).and_then(pubkey_path) else {
            problems.push(format!(
                "{key} is not pubkeys/<epoch>/<node> or pubkeys/<epoch>/<node>/<incarnation>"
            ));
            continue;
        };
        match serde_json::from_slice::<PubkeyRecord>(&kv.value) {
            Ok(r) => {
                out.entry(epoch).or_default().insert(owner, r);
            }
            Err(e) => problems.push(format!("{key} is malformed: {e}")),
        }
    }
    out
}

/// `<epoch>/<node>` or `<epoch>/<node>/<incarnation>` (decimal numbers
/// without a sign), as (epoch, owner).
fn pubkey_path(rest: &str) -> Option<(u32, PubkeyOwner)> {
    let mut parts = rest.split('/');
    let epoch = parts.next()?.parse::<u32>().ok()?;
    let node = parts.next().filter(|n| !n.is_empty())?;
    let incarnation = match parts.next() {
        None => None,
        Some(i) if i.bytes().all(|b| b.is_ascii_digit()) => Some(i.parse::<u32>().ok()?),
        Some(_) => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((epoch, (node.to_string(), incarnation)))
}

/// Reads the current [`Fingerprint`] of everything a snapshot reads, in one
/// small serializable transaction (no values), and the revision it saw.
pub async fn fingerprint(etcd: &Etcd) -> Result<(Fingerprint, i64), EtcdError> {
    let keys = ranges();
    let (header, marks) = etcd.marks(&as_ranges(fingerprinted(&keys))).await?;
    Ok((
        Fingerprint {
            cluster_id: header.cluster_id,
            marks,
        },
        header.revision,
    ))
}

/// Connects and reads a snapshot, on a private single-threaded runtime (for
/// the synchronous CNI path).
pub fn read_blocking(settings: &EtcdSettings) -> Result<Snapshot, IpsecStoreError> {
    let rt = crate::runtime::current_thread().map_err(|e| {
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
