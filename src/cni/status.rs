//! STATUS: whether ADD could succeed now: the MTU bound is known, etcd
//! answers, and while encryption is on the KEK opens every installed epoch.

use super::error::{code, CniError};
use super::Request;

/// Runs STATUS.
pub fn exec(req: &Request) -> Result<(), CniError> {
    let snap = super::read_snapshot(&req.config).map_err(unavailable)?;
    let carriers = match (&snap, req.config.node_name()) {
        (Some(s), Ok(node)) => crate::converge::mtu_params(s, &node),
        _ => Vec::new(),
    };
    let bound = super::encryption_bound(&req.config, &carriers).map_err(unavailable)?;
    super::warn_tunnel_above(bound);
    if let Some(snap) = snap {
        keys_ready(&req.config, &snap).map_err(|why| {
            CniError::new(
                code::NOT_AVAILABLE,
                format!("calico-ipsec is not ready: {why}"),
                "",
            )
        })?;
    }
    Ok(())
}

/// Any failure to reach etcd makes the plugin unavailable (code 50).
fn unavailable(e: CniError) -> CniError {
    CniError::new(
        code::NOT_AVAILABLE,
        format!("calico-ipsec is not ready: {}", e.msg),
        e.details,
    )
}

/// While encryption is on, the KEK must open every installed epoch.
fn keys_ready(
    cfg: &crate::config::PluginConfig,
    snap: &crate::datastore::snapshot::Snapshot,
) -> Result<(), String> {
    use crate::datastore::ipsec::{EpochState, Phase};
    let phase = snap.config.as_ref().map_or(Phase::Off, |c| c.phase);
    if phase == Phase::Off {
        return Ok(());
    }
    let kek = crate::keys::Kek::load(&cfg.kek_file)
        .map_err(|e| format!("{e}; mount the cluster's KEK Secret at kek_file"))?;
    let live: Vec<_> = snap
        .epochs
        .iter()
        .filter(|e| matches!(e.state, EpochState::Pending | EpochState::Active))
        .collect();
    if !live.iter().any(|e| e.state == EpochState::Active) {
        return Err(format!("phase {phase:?} but no active key epoch in etcd"));
    }
    for e in live {
        let guid = snap.topology.cluster_guid.as_deref().unwrap_or_default();
        e.open(&kek, guid).map_err(|err| err.to_string())?;
    }
    Ok(())
}
