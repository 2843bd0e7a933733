//! One step of the leader: the view from the watch cache, the decision (the
//! pure [`super::decide`]), and the fenced writes of
//! [`crate::datastore::leader`] that carry it out.

use std::sync::Mutex;

use super::cache::Cache;
use super::{decide, lock, Action, ManagerOptions, Stats, View};
use crate::datastore::etcd::Etcd;
use crate::datastore::ipsec::{
    now_rfc3339, now_unix, CipherChange, EpochRecord, EpochState, IpsecStore, IpsecStoreError,
};
use crate::datastore::leader::Fence;
use crate::datastore::records::{SEAL_BOUND, SEAL_LEGACY};
use crate::keys::Kek;

/// The view of one step, from the watch cache (nothing read from etcd);
/// `Err` when the config record does not parse.
pub(super) fn read_view(cache: &mut Cache, stats: &Mutex<Stats>) -> Result<Option<View>, String> {
    let Some(config) = cache.config().transpose()? else {
        return Ok(None);
    };
    let (epochs, malformed) = cache.epochs();
    let nodes = cache.statuses();
    let identities = cache.identities_digest(&config.0.excluded_nodes);
    // Calico's node list matters to a phase step. While an epoch is
    // pending, the listed nodes that ever held an incarnation name what may
    // hold it back (peers without one need no key).
    let pending = epochs.iter().any(|(e, _)| e.state == EpochState::Pending);
    let calico_nodes = if config.0.phase != config.0.target_phase {
        cache.calico_nodes()
    } else if pending {
        cache.calico_nodes_with_incarnation()
    } else {
        Vec::new()
    };
    let ignored: Vec<String> = nodes
        .unreadable
        .iter()
        .map(|(n, why)| format!("{n} (unreadable: {why})"))
        .chain(
            nodes
                .unleased
                .iter()
                .map(|n| format!("{n} (bound to no lease)")),
        )
        .collect();
    {
        let mut s = lock(stats);
        if s.ignored != ignored && !ignored.is_empty() {
            tracing::warn!(records = ?ignored, "status records under nodes/ that count as no live node; an unreadable one under a lease holds every step that needs acknowledgement");
        }
        s.ignored = ignored;
        let skipped: Vec<String> = malformed
            .iter()
            .map(|(k, why)| format!("{k}: {why}"))
            .collect();
        if s.malformed_epochs != skipped && !skipped.is_empty() {
            tracing::error!(records = ?skipped, "epoch records that cannot be parsed are skipped (nodes skip them too); fix or delete them");
        }
        s.malformed_epochs = skipped;
        s.unreadable = nodes.unreadable.len();
        s.unleased = nodes.unleased.len();
    }
    Ok(Some(View {
        config,
        epochs,
        live: nodes.live,
        unreadable: nodes.unreadable.into_iter().map(|(n, _)| n).collect(),
        calico_nodes,
        identities,
        now: now_unix(),
        refused: Vec::new(),
    }))
}

/// With the KEK at hand, reseals legacy records (version 1, parameters not
/// bound) as version 2, one step on its own, and notes in the view every
/// epoch that claims this KEK but does not open with the parameters it
/// carries (altered in etcd). Without the KEK nothing is checked here:
/// nodes refuse such records themselves.
async fn check_seals(
    etcd: &Etcd,
    opts: &ManagerOptions,
    fence: &Fence,
    view: &mut View,
    guid: &str,
    stats: &Mutex<Stats>,
) -> Result<Option<Action>, IpsecStoreError> {
    let Ok(kek) = Kek::load(&opts.kek_file) else {
        return Ok(None);
    };
    let store = IpsecStore::new(etcd);
    let kek_changing = view.epochs.iter().any(|(e, _)| !e.also_sealed.is_empty());
    // Every live agent opens bound records (a rolling upgrade is over).
    let all_bound = view.live.iter().all(|(_, s)| s.seal >= SEAL_BOUND);
    let mut legacy = Vec::new();
    let mut refused = Vec::new();
    for (rec, rev) in &view.epochs {
        if !rec.sealed_under(&kek) {
            continue;
        }
        match rec.open(&kek, guid) {
            Ok(secret) if rec.seal == SEAL_LEGACY && !kek_changing && all_bound => {
                let mut bound = rec.clone();
                if bound.seal_under(&secret, &kek, guid, SEAL_BOUND).is_ok() {
                    legacy.push((bound, *rev));
                }
            }
            Ok(_) => {}
            Err(e) => refused.push((rec.epoch, rec.refusal(&e))),
        }
    }
    if !legacy.is_empty() {
        let list: Vec<u32> = legacy.iter().map(|(e, _)| e.epoch).collect();
        if store.put_epochs_fenced(fence, &legacy).await? {
            tracing::info!(epochs = ?list, "resealed legacy epoch records: their parameters and the clusterGUID are now bound to the secret");
        }
        return Ok(Some(Action::Wait(format!(
            "resealed epochs {list:?} (version 2)"
        ))));
    }
    {
        let mut s = lock(stats);
        let now: Vec<String> = refused
            .iter()
            .map(|(e, why)| format!("epoch {e}: {why}"))
            .collect();
        if s.refused_epochs != now && !now.is_empty() {
            tracing::error!(epochs = ?now, "epoch records altered after sealing (their parameters no longer match): no node uses them; the manager retires them and rotates");
        }
        s.refused_epochs = now;
    }
    view.refused = refused.into_iter().map(|(e, _)| e).collect();
    Ok(None)
}

/// One step of the leader: decide on the view, write under the fence
/// ([`Fence`]). `view` is `None` when there is no config; `check`: open the
/// epochs with the KEK again (their records or the KEK may have changed).
#[allow(clippy::too_many_arguments)]
pub(super) async fn tick(
    etcd: &Etcd,
    opts: &ManagerOptions,
    fence: &Fence,
    view: Option<&mut View>,
    check: bool,
    guid: &str,
    stats: &Mutex<Stats>,
) -> Result<Action, IpsecStoreError> {
    let Some(view) = view else {
        return Ok(Action::Wait(
            "no /calico/ipsec/v1/config: run `calico-ipsec keys init`".into(),
        ));
    };
    if check {
        if let Some(wait) = check_seals(etcd, opts, fence, view, guid, stats).await? {
            return Ok(wait);
        }
    }
    let view = &*view;
    {
        let mut s = lock(stats);
        s.phase = Some(view.config.0.phase);
        s.target = Some(view.config.0.target_phase);
        s.live = view.live.len();
        let absent = super::decide::not_following(view);
        if absent != s.not_following && !absent.is_empty() {
            tracing::warn!(nodes = ?absent, "nodes Calico lists have no live agent: no phase step is taken past them, and a pending epoch waits for their keys (exclude one by name in excluded_nodes)");
        }
        s.not_following = absent;
        s.epochs = view
            .epochs
            .iter()
            .map(|(e, _)| (e.epoch, e.state))
            .collect();
    }
    let action = decide(view);
    let store = IpsecStore::new(etcd);
    let ok = match &action {
        Action::Wait(_) => return Ok(action),
        Action::SetPhase { from, to } => {
            let (mut cfg, rev) = view.config.clone();
            cfg.phase = *to;
            cfg.phase_generation += 1;
            let done = store.put_config_fenced(fence, &cfg, rev).await?;
            if done {
                lock(stats).phase_changes += 1;
                tracing::info!(from = ?from, to = ?to, generation = cfg.phase_generation, target = ?cfg.target_phase, nodes = view.live.len(), "phase advanced: every live node acknowledged");
            }
            done
        }
        Action::Activate(n) | Action::Delete(n) => {
            let Some((rec, rev)) = view.epochs.iter().find(|(e, _)| e.epoch == *n) else {
                return Ok(action);
            };
            let done = if matches!(action, Action::Activate(_)) {
                let mut rec = rec.clone();
                rec.state = EpochState::Active;
                rec.activated = Some(now_rfc3339());
                store.put_epochs_fenced(fence, &[(rec, *rev)]).await?
            } else {
                store.delete_epoch_fenced(fence, *n, *rev).await?
            };
            if done && rec.state == EpochState::Active {
                tracing::warn!(epoch = n, "the active epoch's activation time was unreadable or in this manager's future: stamped again now (the overlap and the next rotation count from it)");
            } else if done {
                if matches!(action, Action::Activate(_)) {
                    lock(stats).activations += 1;
                    tracing::info!(
                        epoch = n,
                        nodes = view.live.len(),
                        "epoch activated: installed on every live node"
                    );
                } else {
                    tracing::info!(epoch = n, "retired epoch deleted: no live node holds it");
                }
            }
            done
        }
        Action::Retire(list) => {
            let retired: Vec<(EpochRecord, i64)> = view
                .epochs
                .iter()
                .filter(|(e, _)| list.contains(&e.epoch))
                .map(|(rec, rev)| {
                    let mut rec = rec.clone();
                    rec.state = EpochState::Retired;
                    (rec, *rev)
                })
                .collect();
            let done = store.put_epochs_fenced(fence, &retired).await?;
            if done {
                tracing::info!(epochs = ?list, "epochs retired: every live node sends with the newest and the overlap passed");
            }
            done
        }
        Action::Rotate => {
            let kek = match Kek::load(&opts.kek_file) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(error = %e, "cannot rotate: the KEK file cannot be read");
                    return Ok(Action::Wait(format!(
                        "rotation due, but the KEK cannot be read: {e}"
                    )));
                }
            };
            let added = fence
                .add_pending_epoch(&IpsecStore::new(etcd), &kek, CipherChange::default())
                .await?;
            if let Some(rec) = &added {
                tracing::info!(epoch = rec.epoch, "rotation: added a pending epoch");
            }
            added.is_some()
        }
    };
    if !ok {
        tracing::debug!(
            ?action,
            "a step's transaction did not apply (lost leadership or raced); re-reading"
        );
    }
    Ok(action)
}
