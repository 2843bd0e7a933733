//! The node's status record: what it says, and keeping it under the lease.

use std::sync::Mutex;

use super::{lock, mark_stale, State};
use crate::converge::Report;
use crate::datastore::etcd::{Etcd, EtcdError};
use crate::datastore::ipsec::{now_rfc3339, IpsecStore, IpsecStoreError, NodeStatus};

pub(super) fn status_of(r: &Report, stale: bool, kek: String) -> NodeStatus {
    let off = r.phase == crate::datastore::ipsec::Phase::Off;
    NodeStatus {
        kek,
        lost_epochs: r.lost_epochs.clone(),
        seal: crate::datastore::records::SEAL_NEWEST,
        id: r.id.unwrap_or(0),
        incarnation: r.incarnation,
        installed_epochs: r.installed_epochs.clone(),
        acked_phase: r.acked_phase,
        held: r.held.clone().unwrap_or_default(),
        acked_generation: r.phase_generation,
        active_epoch: r.active_epoch,
        heartbeat: now_rfc3339(),
        stale,
        // While off no SA depends on the identities, and the manager does
        // not read the digest: leaving it out keeps the record still while
        // nodes join (each would otherwise change every node's record).
        identities: if off {
            String::new()
        } else {
            r.identities_digest.clone()
        },
        handover: !r.waiting_for.is_empty(),
        // Off: no SA, nothing to acknowledge (as the digest).
        acked_rev: Some(if off { 0 } else { r.acked_rev }),
        settled_rev: Some(if off { 0 } else { r.settled_rev }),
        lanes: r.lanes.clone(),
        unprotected: r.unprotected.len(),
        seq_bits: 64 - r.out_packets.leading_zeros(),
    }
}

pub(super) fn without_heartbeat(s: &NodeStatus) -> NodeStatus {
    NodeStatus {
        heartbeat: String::new(),
        ..s.clone()
    }
}

/// Writes the status under the lease (granting one first when needed).
pub(super) async fn publish(
    etcd: &Etcd,
    state: &Mutex<State>,
    node: &str,
    status: &NodeStatus,
    ttl: i64,
) -> bool {
    let held = lock(state).lease;
    let lease = match held {
        Some(l) => Ok(l),
        None => etcd.grant_lease(ttl).await,
    };
    let lease = match lease {
        Ok(l) => l,
        Err(e) => {
            mark_stale(state, &e.to_string());
            return false;
        }
    };
    lock(state).lease = Some(lease);
    match IpsecStore::new(etcd).put_status(node, status, lease).await {
        Ok(()) => true,
        Err(IpsecStoreError::Etcd(EtcdError::LeaseNotFound { .. })) => {
            // The lease expired (etcd was away longer than its TTL): next time
            // a fresh one is granted.
            lock(state).lease = None;
            false
        }
        Err(e) => {
            mark_stale(state, &e.to_string());
            false
        }
    }
}

/// Refreshes the lease: `Some(true)` when alive, `Some(false)` when it had
/// expired (forgotten, so the next publication grants a new one), `None`
/// when there is no lease yet or etcd did not answer.
pub(super) async fn keep_alive(etcd: &Etcd, state: &Mutex<State>) -> Option<bool> {
    let lease = lock(state).lease?;
    match etcd.keep_alive_once(lease).await {
        Ok(ttl) if ttl > 0 => Some(true),
        // Expired: etcd answers with a TTL of 0 or "lease not found". The
        // record went with it, and nothing else would write it again (it is
        // written only on change): publish it anew under a new lease.
        Ok(_) | Err(EtcdError::LeaseNotFound { .. }) => {
            tracing::warn!("the status lease expired; publishing the status again under a new one");
            lock(state).lease = None;
            Some(false)
        }
        Err(e) => {
            mark_stale(state, &e.to_string());
            None
        }
    }
}

/// Takes over the lease of the status record a previous agent of this node
/// left (killed, or restarting): the node stays live for the manager while
/// this agent starts, instead of vanishing when that lease runs out. The
/// record lags the kernel at worst, and a lagging acknowledgement only
/// makes the manager wait. A lease of another TTL is left to expire.
pub(super) async fn adopt_lease(etcd: &Etcd, state: &Mutex<State>, node: &str, ttl: i64) {
    let lease = match IpsecStore::new(etcd).status_lease(node).await {
        Ok(l) if l != 0 => l,
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read this node's status record; a new lease is granted at the first publication");
            return;
        }
    };
    match etcd.keep_alive_once(lease).await {
        Ok(left) if left == ttl => {
            tracing::info!(
                lease = format_args!("{lease:x}"),
                "kept the status lease of the previous agent alive"
            );
            lock(state).lease = Some(lease);
        }
        Ok(_) | Err(_) => {}
    }
}

/// The fingerprint of the KEK file this node reads ("" when it cannot).
pub(super) fn kek_fingerprint(path: &std::path::Path) -> String {
    crate::keys::Kek::load(path).map_or_else(|_| String::new(), |k| k.fingerprint())
}
