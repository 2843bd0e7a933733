//! DEL: put back what ADD changed. Idempotent; a missing namespace, interface
//! or backup is success.

use super::error::CniError;
use super::Request;
use crate::attachment::{StateDir, StateError};
use crate::podmtu;

/// Runs DEL.
pub fn exec(req: &Request) -> Result<(), CniError> {
    let state = StateDir::new(&req.config.state_dir);
    let (cid, ifname) = (req.container_id(), req.ifname());
    let backup = match state.load(cid, ifname) {
        Ok(b) => b,
        Err(StateError::Corrupt { path, reason }) => {
            let aside = state
                .quarantine(cid, ifname)
                .map_err(podmtu::PodMtuError::from)?;
            tracing::error!(path = %path.display(), %reason, aside = %aside.display(),
                "MTU backup is corrupt; moved aside for inspection, the pod's MTU is not restored");
            None
        }
        Err(e) => return Err(podmtu::PodMtuError::from(e).into()),
    };
    let Some(backup) = backup else {
        tracing::debug!(container = cid, ifname, "DEL: nothing to restore");
        return Ok(());
    };
    match &req.env.netns {
        Some(ns) => podmtu::restore(ns, &backup)?,
        None => tracing::info!(
            container = cid,
            "DEL without CNI_NETNS: the pod is gone, nothing to restore"
        ),
    }
    state
        .remove(cid, ifname)
        .map_err(podmtu::PodMtuError::from)?;
    tracing::info!(container = cid, ifname, "DEL done");
    Ok(())
}
