//! This node's side of key agreement in a convergence: its key pair for
//! each epoch with agreement (made and published when it has none), the
//! peers' public keys that verify under the epoch secret, the epochs it
//! cannot use, and forgetting the private keys of deleted epochs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use zeroize::Zeroizing;

use super::error::ConvergeError;
use crate::datastore::ipsec::IpsecStore;
use crate::datastore::records::{PubkeyOwner, PubkeyRecord, AGREEMENT_P256};
use crate::datastore::snapshot::Snapshot;
use crate::keys::agreement::{
    file_tag, pubkey_mac, verify_pubkey, EpochKeyPair, KeyOwner, PUBLIC_LEN,
};
use crate::keys::EpochSecret;
use crate::state::{NodeState, StateError};

/// A peer's verified public key, and the incarnation it belongs to (keys
/// per incarnation) or `None` (a key for the whole epoch).
pub type Verified = (Option<u32>, [u8; PUBLIC_LEN]);

/// What a convergence knows of key agreement.
#[derive(Debug, Default)]
pub struct Agreed {
    /// This node's pair for each agreement epoch it can use.
    pub mine: BTreeMap<u32, EpochKeyPair>,
    /// The public keys that verified, per epoch and node (this node's
    /// too), with the incarnation each belongs to (epochs sealed as version
    /// 3: the node's current one; earlier epochs: `None`).
    pub verified: BTreeMap<u32, BTreeMap<String, Verified>>,
    /// Agreement epochs sealed before version 3 that this node cannot use:
    /// its record is in etcd but its private key is gone (a reboot emptied
    /// tmpfs), or the record is not its own key. Its paths wait for a new
    /// epoch.
    pub lost: BTreeSet<u32>,
    /// Why this node needs a new incarnation before it can use an epoch
    /// sealed as version 3 (its key for the current incarnation is
    /// published but its private key is gone, or the record is not its own):
    /// a new incarnation gets a new pair.
    pub renew: Option<&'static str>,
    /// Whether this convergence wrote a public key to etcd.
    pub wrote: bool,
    /// The agreement epochs whose keys are per incarnation (sealed as 3).
    pub per_incarnation: BTreeSet<u32>,
    /// Peers taken at an earlier incarnation than their identity record's,
    /// because the key of the current one is not readable yet ([`lagging`]).
    pub effective: BTreeMap<String, u32>,
    /// The key files of the epochs in etcd (epoch, file tag).
    pub files: BTreeSet<(u32, String)>,
    /// Epochs whose every key file is kept: their keys are per incarnation
    /// and this convergence holds none (an ADD while the phase is off), so
    /// it cannot tell the agent's current file from an older one.
    pub files_unknown: BTreeSet<u32>,
    /// The secrets of every epoch, opened once (`converge::epochs`) and used
    /// by the apply (zeroized on drop).
    pub secrets: BTreeMap<u32, EpochSecret>,
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

    /// The peers among `listed` (Calico's nodes) whose key of their
    /// current incarnation this node lacks for an installed epoch whose
    /// keys are per incarnation: it has not converged with their new
    /// incarnation yet, whatever their identity records say, so its
    /// acknowledgement must not count for them (their inbound SAs here, and
    /// this node's outbound ones to them, are not in).
    pub fn keyless(
        &self,
        me: &str,
        installed: &[u32],
        listed: impl Fn(&str) -> bool,
        ids: &BTreeMap<String, crate::datastore::ipsec::Identity>,
    ) -> BTreeSet<String> {
        let ready = self.readiness(me);
        ids.keys()
            .filter(|n| n.as_str() != me && listed(n))
            .filter(|n| {
                self.effective.contains_key(*n)
                    || installed
                        .iter()
                        .filter(|e| self.per_incarnation.contains(e))
                        .any(|e| ready.get(e).is_some_and(|r| !r.contains(*n)))
            })
            .cloned()
            .collect()
    }

    /// The key of one SA of an agreement epoch, from this node's pair and
    /// the peer's verified key (`None` when either is missing, or the key
    /// belongs to another incarnation than the SA's). `shared` keeps each
    /// pair's ECDH result for the other SAs of the same apply.
    pub fn derive(
        &self,
        secret: &EpochSecret,
        guid: &str,
        s: &crate::xfrm::SaSpec,
        id: &crate::keys::SaId<'_>,
        shared: &mut SharedSecrets,
    ) -> Option<crate::keys::SaKey> {
        let outbound = s.dir == crate::xfrm::Dir::Out;
        let (peer, peer_inc) = match (outbound, s.receiver_incarnation) {
            (true, r) => (&s.receiver, r),
            (false, r) => (&s.sender, r.map(|_| s.incarnation)),
        };
        let pair = self.mine.get(&s.epoch)?;
        let (inc, theirs) = self.verified.get(&s.epoch)?.get(peer)?;
        if *inc != peer_inc {
            return None;
        }
        let z = match shared.0.entry((s.epoch, peer.clone(), peer_inc)) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => v.insert(pair.shared(theirs)?),
        };
        let (sender, receiver) = if outbound {
            (pair.public(), theirs)
        } else {
            (theirs, pair.public())
        };
        secret.derive_agreed(guid, id, z, sender, receiver)
    }
}

/// The ECDH results of one apply, by (epoch, peer, peer's incarnation for
/// keys per incarnation): each is used by every SA of the pair (both
/// directions, every lane). Zeroized on drop; its Debug output shows only
/// how many it holds.
#[derive(Default)]
pub struct SharedSecrets(BTreeMap<(u32, String, Option<u32>), Zeroizing<[u8; 32]>>);

impl std::fmt::Debug for SharedSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedSecrets({} redacted)", self.0.len())
    }
}

fn decode(b64: &str) -> Option<Vec<u8>> {
    B64.decode(b64).ok()
}

/// A verified key, with the record it came from.
type Checked = (PubkeyRecord, [u8; PUBLIC_LEN]);

/// Public-key records that verified, by (epoch, file tag, clusterGUID,
/// owner): the MAC key comes from the epoch secret and the GUID. The agent
/// converges on every change, and each record costs a MAC and a point
/// check: at 1,000 peers and two epochs, 2,000 of each per convergence. An
/// entry answers only for the exact record text it was made from, and the
/// file tag comes from the epoch secret, so a changed record, or an epoch
/// made later under the same number, is verified afresh. Entries of epochs
/// no longer in etcd are dropped at each convergence.
static VERIFIED: Mutex<BTreeMap<Slot, Checked>> = Mutex::new(BTreeMap::new());

/// (epoch, file tag, clusterGUID, owner).
type Slot = (u32, String, String, PubkeyOwner);

fn verified_cache() -> MutexGuard<'static, BTreeMap<Slot, Checked>> {
    // The map is left consistent at every step: a panic elsewhere while it
    // was held does not make its entries wrong.
    VERIFIED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `owner`'s key for epoch `e` when `r` verifies under `secret`, from the
/// cache when this exact record verified before.
fn check_pubkey(
    secret: &EpochSecret,
    guid: &str,
    e: u32,
    tag: &str,
    owner: &PubkeyOwner,
    r: &PubkeyRecord,
) -> Option<[u8; PUBLIC_LEN]> {
    let peer = owner.0.as_str();
    let slot = (e, tag.to_string(), guid.to_string(), owner.clone());
    if let Some((rec, public)) = verified_cache().get(&slot) {
        if rec == r {
            return Some(*public);
        }
    }
    let (Some(public), Some(mac)) = (decode(&r.public), decode(&r.mac)) else {
        tracing::warn!(epoch = e, node = %peer.escape_debug(), "a public key record is not base64; its paths wait");
        return None;
    };
    let key_owner = KeyOwner {
        node: peer,
        incarnation: owner.1,
    };
    if !verify_pubkey(secret, guid, e, key_owner, &public, &mac) {
        tracing::error!(epoch = e, node = %peer.escape_debug(), "a public key does not verify under the epoch secret (written by someone without the KEK?); it is not used and its paths wait");
        return None;
    }
    let mut p = [0u8; PUBLIC_LEN];
    p.copy_from_slice(&public);
    verified_cache().insert(slot, (r.clone(), p));
    Some(p)
}

/// Makes sure this node has a pair and a published key for every agreement
/// epoch of `snap`, and verifies every peer's key. For an epoch sealed as
/// version 3 the keys are those of each node's current incarnation
/// (`my_inc` for this node; none is made while it has none).
pub(super) async fn prepare(
    state: &mut NodeState,
    store: &IpsecStore<'_>,
    snap: &Snapshot,
    node: &str,
    my_inc: Option<u32>,
    opened: BTreeMap<u32, EpochSecret>,
) -> Result<Agreed, ConvergeError> {
    let mut out = Agreed {
        secrets: opened,
        ..Agreed::default()
    };
    let epochs: Vec<_> = snap
        .epochs
        .iter()
        .filter(|e| e.agreement.as_deref() == Some(AGREEMENT_P256))
        .collect();
    if epochs.is_empty() {
        verified_cache().clear();
        return Ok(out);
    }
    let guid = snap.topology.cluster_guid.clone().unwrap_or_default();
    let none = BTreeMap::new();
    // Each epoch's file tag, from its secret: the instance its key files
    // and verified keys belong to.
    let mut bases = BTreeMap::new();
    for rec in &epochs {
        let secret = out.secrets.get(&rec.epoch).ok_or_else(|| {
            ConvergeError::Agreement(format!("epoch {} was not opened with the KEK", rec.epoch))
        })?;
        bases.insert(rec.epoch, file_tag(secret, rec.epoch));
    }
    out.effective = lagging(snap, node, &epochs, &out.secrets, &bases, &guid);
    for rec in epochs {
        let e = rec.epoch;
        // Both were found above.
        let (Some(secret), Some(base_tag)) = (out.secrets.get(&e).cloned(), bases.get(&e)) else {
            continue;
        };
        let per_inc = rec.binds_receiver();
        if per_inc {
            out.per_incarnation.insert(e);
        }
        // Whose key counts: each node's incarnation (its current one, or
        // for a peer whose new key is not readable yet, the one it had),
        // or the one key of the epoch.
        let wanted = |n: &str| -> Option<Option<u32>> {
            if !per_inc {
                return Some(None);
            }
            let inc = if n == node {
                my_inc
            } else {
                (out.effective.get(n).copied())
                    .or_else(|| snap.identities.get(n).map(|i| i.incarnation))
            };
            inc.filter(|i| *i > 0).map(Some)
        };
        let tag = match (per_inc, my_inc) {
            (true, Some(i)) => format!("{base_tag}.i{i}"),
            (true, None) => {
                // No incarnation here (an ADD while off): nothing to make
                // or use, and the agent's files, made for its incarnation,
                // are not this convergence's to remove.
                out.files.insert((e, base_tag.clone()));
                out.files_unknown.insert(e);
                continue;
            }
            (false, _) => base_tag.clone(),
        };
        out.files.insert((e, tag.clone()));
        let published = snap.pubkeys.get(&e).unwrap_or(&none);
        let mut verified = BTreeMap::new();
        for (owner, r) in published {
            if wanted(&owner.0) != Some(owner.1) {
                continue;
            }
            if let Some(p) = check_pubkey(&secret, &guid, e, base_tag, owner, r) {
                verified.insert(owner.0.clone(), (owner.1, p));
            }
        }
        let me = (node.to_string(), wanted(node).flatten());
        let ctx = Epoch {
            epoch: e,
            tag: &tag,
            secret: &secret,
            guid: &guid,
            retired: rec.state == crate::datastore::records::EpochState::Retired,
            incarnation: me.1,
            mine_published: published.contains_key(&me),
        };
        own_pair(state, store, node, &ctx, &mut verified, &mut out).await?;
        out.verified.insert(e, verified);
    }
    verified_cache().retain(|(e, tag, g, _), _| *g == guid && bases.get(e) == Some(tag));
    Ok(out)
}

/// The peers whose key of their current incarnation is not readable yet
/// (it is published just after the incarnation) in an active epoch whose
/// keys are per incarnation, with the newest earlier incarnation whose keys
/// are: until the new key is read, this node keeps the pair on the SAs of
/// that one (the peer keeps them too, until this node acknowledges its new
/// identity), instead of dropping the pair for a moment.
fn lagging(
    snap: &Snapshot,
    me: &str,
    epochs: &[&crate::datastore::records::EpochRecord],
    secrets: &BTreeMap<u32, EpochSecret>,
    bases: &BTreeMap<u32, String>,
    guid: &str,
) -> BTreeMap<String, u32> {
    let active: Vec<(u32, &EpochSecret, &str)> = epochs
        .iter()
        .filter(|r| r.binds_receiver() && r.state == crate::datastore::records::EpochState::Active)
        .filter_map(|r| {
            Some((
                r.epoch,
                secrets.get(&r.epoch)?,
                bases.get(&r.epoch)?.as_str(),
            ))
        })
        .collect();
    if active.is_empty() {
        return BTreeMap::new();
    }
    let none = BTreeMap::new();
    let has_keys = |peer: &str, inc: u32| {
        let owner = (peer.to_string(), Some(inc));
        active.iter().all(|(e, secret, tag)| {
            snap.pubkeys
                .get(e)
                .unwrap_or(&none)
                .get(&owner)
                .is_some_and(|r| check_pubkey(secret, guid, *e, tag, &owner, r).is_some())
        })
    };
    let mut out = BTreeMap::new();
    for (peer, ident) in snap.identities.iter().filter(|(n, _)| n.as_str() != me) {
        if ident.incarnation == 0 || has_keys(peer, ident.incarnation) {
            continue;
        }
        // Records of earlier incarnations, newest first.
        let mut earlier: Vec<u32> = active
            .iter()
            .filter_map(|(e, _, _)| snap.pubkeys.get(e))
            .flat_map(|m| m.keys())
            .filter(|(n, i)| n == peer && i.is_some_and(|i| i < ident.incarnation))
            .filter_map(|(_, i)| *i)
            .collect();
        earlier.sort_unstable_by(|a, b| b.cmp(a));
        earlier.dedup();
        if let Some(i) = earlier.into_iter().find(|i| has_keys(peer, *i)) {
            out.insert(peer.clone(), i);
        }
    }
    out
}

/// One agreement epoch as `prepare` sees it.
struct Epoch<'a> {
    epoch: u32,
    tag: &'a str,
    secret: &'a EpochSecret,
    guid: &'a str,
    retired: bool,
    /// This node's incarnation, for keys per incarnation.
    incarnation: Option<u32>,
    /// Whether etcd holds a public key under this node's name (and
    /// incarnation).
    mine_published: bool,
}

/// This node's pair for one epoch: the stored one when its published key
/// verifies, a new one published when none is, or the epoch lost (the
/// private key gone, or the record under our name not ours): for keys per
/// incarnation, a new incarnation is asked for instead. A retired epoch
/// (never installed again) only drains: nothing is made or reported for it.
async fn own_pair(
    state: &mut NodeState,
    store: &IpsecStore<'_>,
    node: &str,
    ep: &Epoch<'_>,
    verified: &mut BTreeMap<String, Verified>,
    out: &mut Agreed,
) -> Result<(), ConvergeError> {
    let (e, tag) = (ep.epoch, ep.tag);
    let mine_verified = verified.get(node).map(|(_, p)| *p);
    if ep.retired {
        if let (Some(public), Some(pair)) = (mine_verified, stored_pair(state, e, tag)?) {
            if *pair.public() == public {
                out.mine.insert(e, pair);
            }
        }
        return Ok(());
    }
    let mut lose = |out: &mut Agreed, why: &'static str| {
        verified.remove(node);
        match ep.incarnation {
            Some(_) => out.renew = Some(why),
            None => {
                out.lost.insert(e);
            }
        }
    };
    match (ep.mine_published, mine_verified) {
        (true, Some(public)) => match stored_pair(state, e, tag)? {
            Some(pair) if *pair.public() == public => {
                out.mine.insert(e, pair);
            }
            held => {
                tracing::warn!(
                    epoch = e,
                    incarnation = ?ep.incarnation,
                    have_private = held.is_some(),
                    "this node's public key for the epoch is in etcd but its private key is not here (a reboot?)"
                );
                lose(out, "this node's private key for an epoch is gone");
            }
        },
        (true, None) => {
            // Our own record does not verify: never overwritten (write
            // once), so this key cannot be used here.
            tracing::error!(
                epoch = e,
                incarnation = ?ep.incarnation,
                "the public key in etcd under this node's name is not this node's key (it does not verify)"
            );
            lose(
                out,
                "the public key in etcd under this node's name is not its own",
            );
        }
        (false, _) => {
            // A pair stored but not yet published (a crash, or a
            // publication this snapshot does not show yet) is kept, never
            // replaced: a file of an earlier epoch of the same number has
            // another tag.
            let pair = stored_or_new_pair(state, e, tag)?;
            let owner = KeyOwner {
                node,
                incarnation: ep.incarnation,
            };
            let mac = pubkey_mac(ep.secret, ep.guid, e, owner, pair.public())
                .ok_or_else(|| ConvergeError::Agreement("node name too long".into()))?;
            let r = PubkeyRecord {
                public: B64.encode(pair.public()),
                mac: B64.encode(mac),
            };
            // Refused also when the record is this node's own earlier write
            // that the snapshot does not show yet: the snapshot is then
            // older than what this node last acted on, and converging again
            // on a fresher one is what keeps the hand-over whole. Accepting
            // the record as published and going on lost 17-19 echoes in 2 of
            // 4 runs of test_faults' restored-epoch case (both ends taking a
            // new incarnation at once); the retry lost none.
            if !store.create_pubkey(e, node, ep.incarnation, &r).await? {
                return Err(ConvergeError::Agreement(format!(
                    "another writer created this node's public key for epoch {e} first, or the epoch was deleted meanwhile; converging again"
                )));
            }
            out.wrote = true;
            tracing::info!(epoch = e, incarnation = ?ep.incarnation, "published this node's public key for the epoch");
            verified.insert(node.to_string(), (ep.incarnation, *pair.public()));
            out.mine.insert(e, pair);
        }
    }
    Ok(())
}

/// This node's stored pair for one epoch instance (`tag`, see
/// [`file_tag`]), if it has one.
fn stored_pair(state: &NodeState, e: u32, tag: &str) -> Result<Option<EpochKeyPair>, StateError> {
    let Some(bytes) = state.private_key(e, tag)? else {
        return Ok(None);
    };
    EpochKeyPair::from_private(bytes)
        .map(Some)
        .ok_or_else(|| StateError::Corrupt {
            path: state.private_key_path(e, tag),
            reason: "not a P-256 private key (remove it; a new pair is made and published)".into(),
        })
}

/// This node's pair for one epoch instance: the stored one, or a new one,
/// stored before it is returned so that a key is never published unless
/// kept. A stored pair is never replaced: a pair stored but not yet
/// published (a crash, or a publication the snapshot does not show yet) is
/// the one published.
fn stored_or_new_pair(
    state: &mut NodeState,
    e: u32,
    tag: &str,
) -> Result<EpochKeyPair, ConvergeError> {
    if let Some(pair) = stored_pair(state, e, tag)? {
        return Ok(pair);
    }
    let pair = EpochKeyPair::generate()?;
    state.keep_private_key(e, tag, &pair.private_bytes())?;
    Ok(pair)
}

/// Per agreement epoch, the nodes that published a key (of their current
/// incarnation, for keys per incarnation), unverified: what
/// `status` and CHECK, which hold no KEK, take for the readiness a
/// convergence computes (they differ only for a key that fails its MAC or a
/// private key this node lost, both of which the convergence logs).
pub fn published(snap: &Snapshot) -> BTreeMap<u32, BTreeSet<String>> {
    snap.epochs
        .iter()
        .filter(|e| e.agreement.as_deref() == Some(AGREEMENT_P256))
        .map(|e| {
            let current = |(n, inc): &PubkeyOwner| {
                !e.binds_receiver()
                    || snap
                        .identities
                        .get(n)
                        .is_some_and(|i| Some(i.incarnation) == *inc)
            };
            let nodes = snap
                .pubkeys
                .get(&e.epoch)
                .map(|m| {
                    m.keys()
                        .filter(|o| current(o))
                        .map(|o| o.0.clone())
                        .collect()
                })
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
    state: &mut NodeState,
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
        .chain(agreed.files_unknown.iter().copied())
        .collect();
    let removed = state.retain_private_keys(&agreed.files, &keep_any)?;
    if !removed.is_empty() {
        tracing::info!(epochs = ?removed, "destroyed the private keys of deleted epochs (forward secrecy)");
    }
    Ok(())
}

#[cfg(test)]
#[path = "agreement_tests.rs"]
mod tests;
