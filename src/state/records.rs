//! The records a node keeps about itself: what they hold and how each is
//! read. Writing them is [`super::NodeState`]'s.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{digest, MAX_RECORD_BYTES};
use crate::clock::Stamp;
use crate::datastore::ipsec::Phase;
use crate::datastore::snapshot::Fingerprint;
use crate::fsutil;

/// The convergence record's file under `<state_dir>/node`.
pub(super) const CONVERGED: &str = "converged";
/// The ledger's file.
pub(super) const LEDGER: &str = "ledger";
/// The file that says this node has seen the cluster initialised.
pub(super) const SEEN: &str = "cluster";
/// The guard's mark.
pub(super) const GUARD: &str = "guard";
/// What the kernel held after the last convergence.
pub(super) const KERNEL: &str = "kernel";

/// The convergence record's format; a record of another version is ignored.
pub const CONVERGED_VERSION: u32 = 2;

/// The last convergence that needs no etcd write to stay valid (see
/// `converge::record` for how it is used).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Converged {
    /// [`CONVERGED_VERSION`].
    pub version: u32,
    /// This node.
    pub node: String,
    /// The phase converged to.
    pub phase: Phase,
    /// The kernel's boot id then ("" while the phase is off).
    pub boot_id: String,
    /// This node's id, once it has one.
    pub id: Option<u16>,
    /// The incarnation of the identity and of the ledger (0 while off).
    pub incarnation: u32,
    /// The ledger's digest then ("" while off).
    pub ledger: String,
    /// States desired.
    pub states: usize,
    /// Policies desired.
    pub policies: usize,
    /// The etcd revision of the snapshot.
    pub revision: i64,
    /// The snapshot's fingerprint.
    pub fingerprint: Fingerprint,
    /// The digest of the desired state, in the terms the plan compares.
    pub digest: String,
    /// What the pod MTU must fit.
    #[serde(default)]
    pub mtu: Vec<crate::mtu::MtuParams>,
    /// When the newest etcd read that found this record true began: a
    /// request made before then is answered by it.
    #[serde(default)]
    pub checked: Option<Stamp>,
}

/// Reads the record; `None` when missing, unreadable or of another version
/// (each means: converge fully).
pub(super) fn read_converged(path: &Path) -> Option<Converged> {
    let bytes = match fsutil::read_state(path, MAX_RECORD_BYTES) {
        Ok(b) => b?,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the convergence record");
            return None;
        }
    };
    match serde_json::from_slice::<Converged>(&bytes) {
        Ok(c) if c.version == CONVERGED_VERSION => Some(c),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(error = %e, "ignoring an unreadable convergence record");
            None
        }
    }
}

/// The outbound SAs created in the current incarnation (names, no keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The boot id it belongs to.
    pub boot_id: String,
    /// The incarnation it belongs to.
    pub incarnation: u32,
    /// Every outbound SA created: "epoch/peer" (lane 0) or
    /// "epoch/peer/lane" for an epoch whose keys bind the sender only, and
    /// "epoch/peer/lane/receiver-incarnation" for one whose keys bind both
    /// ends (sealed as version 3).
    pub sent: BTreeSet<String>,
    /// Every inbound SA created under keys that bind this incarnation
    /// (epochs sealed as version 3): "epoch/peer/lane/sender-incarnation".
    /// One that is missing later cannot be made again under the same key
    /// (its replay window would start empty), so it takes a new incarnation.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub received: BTreeSet<String>,
    /// Epochs whose entries were dropped when they left the kernel: one
    /// that comes back (set active again, or restored from a backup) would
    /// get its old keys back, so any outbound SA of it needs a new
    /// incarnation.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub forgotten: BTreeSet<u32>,
}

impl Ledger {
    /// An empty ledger for a new incarnation.
    pub fn fresh(boot_id: &str, incarnation: u32) -> Self {
        Self {
            boot_id: boot_id.to_string(),
            incarnation,
            sent: BTreeSet::new(),
            received: BTreeSet::new(),
            forgotten: BTreeSet::new(),
        }
    }

    /// Whether `entry` is listed, among the inbound SAs or the outbound ones.
    pub fn lists(&self, inbound: bool, entry: &str) -> bool {
        self.list(inbound).contains(entry)
    }

    /// Whether making the SA of `entry` (of `epoch`) would use a key of
    /// this incarnation again (an outbound SA's nonces, or an inbound SA's
    /// replay window, would start over): it is listed, or its epoch was
    /// forgotten.
    pub fn made_before(&self, epoch: u32, inbound: bool, entry: &str) -> bool {
        self.forgotten.contains(&epoch) || self.lists(inbound, entry)
    }

    /// Lists an SA as made (before it is); true when it was not listed yet.
    pub fn record(&mut self, inbound: bool, entry: String) -> bool {
        if inbound {
            self.received.insert(entry)
        } else {
            self.sent.insert(entry)
        }
    }

    fn list(&self, inbound: bool) -> &BTreeSet<String> {
        if inbound {
            &self.received
        } else {
            &self.sent
        }
    }

    /// The entry of an SA whose key binds both ends: (epoch, peer, lane)
    /// and the other end's incarnation (the receiver's for an outbound SA,
    /// the sender's for an inbound one).
    pub fn bound_entry(epoch: u32, peer: &str, lane: u8, other: u32) -> String {
        format!("{epoch}/{peer}/{lane}/{other}")
    }

    /// Drops the entries of epochs no longer installed, remembering their
    /// numbers; returns whether anything changed.
    pub fn prune(&mut self, installed: &[u32]) -> bool {
        let before = (self.sent.len(), self.received.len(), self.forgotten.len());
        let mut gone = BTreeSet::new();
        let mut keep = |e: &String| match Self::epoch_of(e) {
            Some(n) if installed.contains(&n) => true,
            Some(n) => {
                gone.insert(n);
                false
            }
            None => false,
        };
        self.sent.retain(&mut keep);
        self.received.retain(&mut keep);
        self.forgotten.extend(gone);
        before != (self.sent.len(), self.received.len(), self.forgotten.len())
    }

    /// "epoch/peer" for lane 0 (IPv4 transport), "epoch/peer/lane" for the others.
    pub fn entry(epoch: u32, peer: &str, lane: u8) -> String {
        match lane {
            0 => format!("{epoch}/{peer}"),
            n => format!("{epoch}/{peer}/{n}"),
        }
    }

    /// The epoch an entry names.
    pub fn epoch_of(entry: &str) -> Option<u32> {
        entry.split('/').next()?.parse().ok()
    }
}

/// Reads the ledger and the digest of its bytes; `None` when missing or
/// unreadable (both mean the history is unknown, which a new incarnation
/// settles).
pub(super) fn read_ledger(path: &Path) -> (Option<Ledger>, String) {
    let bytes = match fsutil::read_state(path, MAX_RECORD_BYTES) {
        Ok(Some(b)) => b,
        Ok(None) => return (None, String::new()),
        Err(e) => {
            tracing::warn!(error = %e, "the SA ledger is unusable; a new incarnation will be published");
            return (None, String::new());
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(l) => (Some(l), digest(&bytes)),
        Err(e) => {
            tracing::warn!(error = %e, "the SA ledger is unreadable; a new incarnation will be published");
            (None, String::new())
        }
    }
}

/// This node has seen the cluster initialised (so a missing config record
/// is never read as "off").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Calico's clusterGUID at the time.
    pub cluster_guid: String,
    /// The phase generation converged on last.
    pub phase_generation: u64,
    /// The phase converged on last (a record written before this field
    /// existed counts as `enforce`: the strongest is the safe side).
    #[serde(default = "strongest")]
    pub phase: Phase,
}

/// The phase a [`Seen`] record without one stands for.
fn strongest() -> Phase {
    Phase::Enforce
}

impl Seen {
    /// What this node remembers (`None`: never initialised, or disabled
    /// since). A record that cannot be read counts as seen: refusing is the
    /// safe side.
    pub(super) fn read(dir: &Path) -> Option<Self> {
        let read = fsutil::read_state(&dir.join(SEEN), 4096);
        if matches!(read, Ok(None)) {
            return None;
        }
        Some(
            read.ok()
                .flatten()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .unwrap_or(Seen {
                    cluster_guid: "(unreadable record)".into(),
                    phase_generation: 0,
                    phase: strongest(),
                }),
        )
    }

    /// Why a convergence is refused while the config record is missing.
    pub fn missing_reason(&self) -> String {
        format!(
            "the record is missing, but this node has seen the cluster initialised (clusterGUID {}, phase generation {}), so encryption may be required: restore the record (etcd backup, or `calico-ipsec keys init` then `enable`); to turn encryption off, run `calico-ipsec disable` before removing anything",
            self.cluster_guid.escape_debug(),
            self.phase_generation
        )
    }
}

/// The catch-all last written: its script's digest, when, and in which boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardMark {
    /// The SHA-256 of the script `nft` ran.
    pub digest: String,
    /// When, in seconds since the Unix epoch.
    pub at: u64,
    /// The kernel's boot id then.
    pub boot: String,
}

impl GuardMark {
    /// A mark for a script written now in `boot`.
    pub fn now(digest: String, boot: &str) -> Self {
        Self {
            digest,
            at: now(),
            boot: boot.to_string(),
        }
    }

    /// Whether it was written less than `within` ago.
    pub fn fresh(&self, within: std::time::Duration) -> bool {
        let n = now();
        self.at <= n && n - self.at < within.as_secs()
    }

    pub(super) fn line(&self) -> String {
        format!("{} {} {}\n", self.digest, self.at, self.boot)
    }

    pub(super) fn read(dir: &Path) -> Option<Self> {
        let raw = fsutil::read_state(&dir.join(GUARD), 512).ok()??;
        let text = String::from_utf8(raw).ok()?;
        let mut it = text.split_whitespace();
        Some(Self {
            digest: it.next()?.to_string(),
            at: it.next()?.parse().ok()?,
            boot: it.next().unwrap_or_default().to_string(),
        })
    }
}

/// What the kernel held (ours, in the terms the plan compares) when the
/// last convergence on this node finished, whichever process ran it: a
/// later convergence that finds something else knows the kernel was changed
/// outside calico-ipsec, and one that finds this knows any change it makes
/// comes from etcd or the node, not from drift.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelMark {
    /// The digest of what was held (`converge::record::held_digest`).
    pub digest: String,
    /// The kernel's boot id then: a mark of another boot says nothing.
    pub boot: String,
}

impl KernelMark {
    pub(super) fn line(&self) -> String {
        format!("{} {}\n", self.digest, self.boot)
    }

    pub(super) fn read(dir: &Path) -> Option<Self> {
        let raw = fsutil::read_state(&dir.join(KERNEL), 512).ok()??;
        let text = String::from_utf8(raw).ok()?;
        let mut it = text.split_whitespace();
        let mark = Self {
            digest: it.next()?.to_string(),
            boot: it.next()?.to_string(),
        };
        it.next().is_none().then_some(mark)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_bind_both_ends_are_told_apart_by_the_other_ends_incarnation() {
        let mut l = Ledger::fresh("b", 3);
        let out = |r| Ledger::bound_entry(5, "node-2", 0, r);
        let inb = |peer, s| Ledger::bound_entry(5, peer, 1, s);
        assert!(l.record(false, out(7)));
        assert!(l.record(true, inb("node-2", 9)));
        assert!(l.made_before(5, false, &out(7)));
        assert!(
            !l.made_before(5, false, &out(8)),
            "the receiver's new incarnation gives a new key"
        );
        assert!(
            !l.made_before(5, false, &Ledger::entry(5, "node-2", 0)),
            "another derivation"
        );
        assert!(l.made_before(5, true, &inb("node-2", 9)));
        assert!(!l.made_before(5, true, &inb("node-2", 10)));
        assert!(!l.made_before(5, true, &inb("node-3", 9)));
        assert!(!l.made_before(5, false, &inb("node-2", 9)), "kept apart");
        // Pruning drops both kinds and remembers the epoch: its keys are
        // never made again in this incarnation.
        assert!(l.prune(&[6]));
        assert!(l.sent.is_empty() && l.received.is_empty());
        assert!(l.made_before(5, false, &out(8)));
        assert!(l.made_before(5, true, &Ledger::bound_entry(5, "node-4", 0, 1)));
    }
}
