//! DEL: put back what ADD changed. Idempotent, and it never fails: libcni
//! runs DEL in reverse chain order and stops at the first failure, and our
//! entry sits right after calico's, so a failing DEL here would keep calico
//! and every plugin before it from releasing what it holds (pod IPs). A missing namespace, interface or
//! backup is success; any other problem is logged and left for the operator
//! (and GC), never returned.

use super::Request;
use crate::podmtu;
use crate::state::attachment::StateDir;
use crate::state::StateError;

/// Runs DEL; problems are logged, not returned.
pub fn exec(req: &Request) {
    if let Some(why) = &req.env.refused {
        tracing::warn!(%why, "DEL for an attachment ADD would have refused: nothing of ours can exist for it");
        return;
    }
    let state = StateDir::new(&req.config.state_dir);
    let (cid, ifname) = (req.container_id(), req.ifname());
    let backup = match state.load(cid, ifname) {
        Ok(b) => b,
        Err(StateError::Corrupt { path, reason }) => {
            match state.quarantine(cid, ifname) {
                Ok(aside) => {
                    tracing::error!(path = %path.display(), %reason, aside = %aside.display(),
                    "MTU backup is unusable; moved aside for inspection, the pod's MTU is not restored")
                }
                Err(e) => tracing::error!(path = %path.display(), %reason, error = %e,
                    "MTU backup is unusable and cannot be moved aside; the pod's MTU is not restored"),
            }
            None
        }
        Err(e) => {
            tracing::error!(container = cid, ifname, error = %e,
                "DEL cannot read the MTU backup; the pod's MTU is not restored (check state_dir)");
            return;
        }
    };
    let Some(backup) = backup else {
        tracing::debug!(container = cid, ifname, "DEL: nothing to restore");
        return;
    };
    let restored = match &req.env.netns {
        Some(ns) => podmtu::restore(ns, &backup),
        None => {
            tracing::info!(
                container = cid,
                "DEL without CNI_NETNS: the pod is gone, nothing to restore"
            );
            Ok(())
        }
    };
    if let Err(e) = restored {
        tracing::error!(container = cid, ifname, error = %e,
            "DEL could not restore the pod's MTU; its backup is kept for inspection and GC");
        return;
    }
    match state.remove(cid, ifname) {
        Ok(_) => tracing::info!(container = cid, ifname, "DEL done"),
        Err(e) => tracing::error!(container = cid, ifname, error = %e,
            "DEL restored the MTU but cannot remove its backup; GC removes it later"),
    }
}
