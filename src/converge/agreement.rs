//! This node's side of key agreement in a convergence: its key pair for
//! each epoch with agreement (made and published when it has none), the
//! peers' public keys that verify under the epoch secret, the epochs it
//! cannot use, and forgetting the private keys of deleted epochs.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

use super::ConvergeError;
use crate::config::PluginConfig;
use crate::datastore::ipsec::IpsecStore;
use crate::datastore::records::{PubkeyRecord, AGREEMENT_P256};
use crate::datastore::snapshot::Snapshot;
use crate::keys::agreement::{
    file_tag, pubkey_mac, verify_pubkey, EpochKeyPair, KeyStore, PUBLIC_LEN,
};
use crate::keys::Kek;

/// What a convergence knows of key agreement.
#[derive(Debug, Default)]
pub struct Agreed {
    /// This node's pair for each agreement epoch it can use.
    pub mine: BTreeMap<u32, EpochKeyPair>,
    /// The public keys that verified, per epoch and node (this node's too).
    pub verified: BTreeMap<u32, BTreeMap<String, [u8; PUBLIC_LEN]>>,
    /// Agreement epochs this node cannot use: its record is in etcd but its
    /// private key is gone (a reboot emptied tmpfs), or the record is not
    /// its own key. Its paths wait for a new epoch.
    pub lost: BTreeSet<u32>,
    /// Whether this convergence wrote a public key to etcd.
    pub wrote: bool,
    /// The key files of the epochs in etcd (epoch, file tag).
    pub files: BTreeSet<(u32, String)>,
}

impl Agreed {
    /// Per agreement epoch, the nodes whose key this node can use: the
    /// peers whose key verified, and `me` only when it holds its pair.
    pub fn readiness(&self, me: &str) -> BTreeMap<u32, BTreeSet<String>> {
        self.verified
            .iter()
            .map(|(e, keys)| {
                let mut ready: BTreeSet<String> =
                    keys.keys().filter(|n| n.as_str() != me).cloned().collect();
                if self.mine.contains_key(e) {
                    ready.insert(me.to_string());
                }
                (*e, ready)
            })
            .collect()
    }

    /// The key of one SA of an agreement epoch, from this node's pair and
    /// the peer's verified key (`None` when either is missing).
    pub fn derive(
        &self,
        secret: &crate::keys::EpochSecret,
        guid: &str,
        s: &crate::xfrm::SaSpec,
        id: &crate::keys::SaId<'_>,
    ) -> Option<crate::keys::SaKey> {
        let outbound = s.dir == crate::xfrm::Dir::Out;
        let peer = if outbound { &s.receiver } else { &s.sender };
        let pair = self.mine.get(&s.epoch)?;
        let theirs = self.verified.get(&s.epoch)?.get(peer)?;
        let z = pair.shared(theirs)?;
        let (sender, receiver) = if outbound {
            (pair.public(), theirs)
        } else {
            (theirs, pair.public())
        };
        secret.derive_agreed(guid, id, &z, sender, receiver)
    }
}

fn decode(b64: &str) -> Option<Vec<u8>> {
    B64.decode(b64).ok()
}

/// Makes sure this node has a pair and a published key for every agreement
/// epoch of `snap`, and verifies every peer's key. `kek` is needed only
/// when the snapshot has an agreement epoch.
pub(super) async fn prepare(
    cfg: &PluginConfig,
    store: &IpsecStore<'_>,
    snap: &Snapshot,
    node: &str,
    kek: Option<&Kek>,
) -> Result<Agreed, ConvergeError> {
    let mut out = Agreed::default();
    let epochs: Vec<_> = snap
        .epochs
        .iter()
        .filter(|e| e.agreement.as_deref() == Some(AGREEMENT_P256))
        .collect();
    if epochs.is_empty() {
        return Ok(out);
    }
    let kek =
        kek.ok_or_else(|| ConvergeError::Agreement("no KEK to open the epochs with".into()))?;
    let guid = snap.topology.cluster_guid.clone().unwrap_or_default();
    let keystore = KeyStore::new(&cfg.agreement_dir);
    let none = BTreeMap::new();
    for rec in epochs {
        let e = rec.epoch;
        let secret = rec
            .open(kek)
            .map_err(|err| ConvergeError::Agreement(err.to_string()))?;
        let tag = file_tag(&secret, e);
        out.files.insert((e, tag.clone()));
        let published = snap.pubkeys.get(&e).unwrap_or(&none);
        let mut verified = BTreeMap::new();
        for (peer, r) in published {
            let (Some(public), Some(mac)) = (decode(&r.public), decode(&r.mac)) else {
                tracing::warn!(epoch = e, node = %peer.escape_debug(), "a public key record is not base64; its paths wait");
                continue;
            };
            if !verify_pubkey(&secret, &guid, e, peer, &public, &mac) {
                tracing::error!(epoch = e, node = %peer.escape_debug(), "a public key does not verify under the epoch secret (written by someone without the KEK?); it is not used and its paths wait");
                continue;
            }
            let mut p = [0u8; PUBLIC_LEN];
            p.copy_from_slice(&public);
            verified.insert(peer.clone(), p);
        }
        // A retired epoch only drains: nothing is made or reported for it.
        let retired = rec.state == crate::datastore::records::EpochState::Retired;
        if retired {
            if let (Some(public), Some(pair)) = (verified.get(node), keystore.load(e, &tag)?) {
                if pair.public() == public {
                    out.mine.insert(e, pair);
                }
            }
            out.verified.insert(e, verified);
            continue;
        }
        match (published.get(node), verified.get(node)) {
            (Some(_), Some(public)) => match keystore.load(e, &tag)? {
                Some(pair) if pair.public() == public => {
                    out.mine.insert(e, pair);
                }
                held => {
                    tracing::warn!(
                        epoch = e,
                        have_private = held.is_some(),
                        "this node's public key for the epoch is in etcd but its private key is not here (a reboot?): the epoch is lost to this node until the next one"
                    );
                    out.lost.insert(e);
                }
            },
            (Some(_), None) => {
                // Our own record does not verify: never overwritten (write
                // once), so this epoch cannot be used here.
                tracing::error!(
                    epoch = e,
                    "the public key in etcd under this node's name is not this node's key (it does not verify): the epoch is lost to this node until the next one"
                );
                out.lost.insert(e);
            }
            (None, _) => {
                // A pair stored but not yet published (a crash, or a
                // publication this snapshot does not show yet) is kept, never
                // replaced: a file of an earlier epoch of the same number has
                // another tag.
                let (pair, _) = keystore.load_or_generate(e, &tag)?;
                let mac = pubkey_mac(&secret, &guid, e, node, pair.public())
                    .ok_or_else(|| ConvergeError::Agreement("node name too long".into()))?;
                let r = PubkeyRecord {
                    public: B64.encode(pair.public()),
                    mac: B64.encode(mac),
                };
                if !store.create_pubkey(e, node, &r).await? {
                    return Err(ConvergeError::Agreement(format!(
                        "another writer created this node's public key for epoch {e} first; converging again"
                    )));
                }
                out.wrote = true;
                tracing::info!(epoch = e, "published this node's public key for the epoch");
                verified.insert(node.to_string(), *pair.public());
                out.mine.insert(e, pair);
            }
        }
        out.verified.insert(e, verified);
    }
    Ok(out)
}

/// Per agreement epoch, the nodes that published a key, unverified: what
/// `status` and CHECK, which hold no KEK, take for the readiness a
/// convergence computes (they differ only for a key that fails its MAC or a
/// private key this node lost, both of which the convergence logs).
pub fn published(snap: &Snapshot) -> BTreeMap<u32, BTreeSet<String>> {
    snap.epochs
        .iter()
        .filter(|e| e.agreement.as_deref() == Some(AGREEMENT_P256))
        .map(|e| {
            let nodes = snap
                .pubkeys
                .get(&e.epoch)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            (e.epoch, nodes)
        })
        .collect()
}

/// Removes the private keys of epochs that are gone from etcd, and of
/// earlier epochs of the same numbers: only the files of the epochs this
/// convergence opened are kept, and every file of an epoch number that
/// still has public keys in etcd but no readable record (the manager
/// deletes both in one transaction, so such a record is only malformed).
pub(super) fn forget_deleted(
    cfg: &PluginConfig,
    snap: &Snapshot,
    agreed: &Agreed,
) -> Result<(), ConvergeError> {
    let opened: BTreeSet<u32> = agreed.files.iter().map(|(e, _)| *e).collect();
    let keep_any: BTreeSet<u32> = snap
        .pubkeys
        .keys()
        .copied()
        .chain(snap.epochs.iter().map(|e| e.epoch))
        .filter(|e| !opened.contains(e))
        .collect();
    let removed = KeyStore::new(&cfg.agreement_dir).retain(&agreed.files, &keep_any)?;
    if !removed.is_empty() {
        tracing::info!(epochs = ?removed, "destroyed the private keys of deleted epochs (forward secrecy)");
    }
    Ok(())
}
