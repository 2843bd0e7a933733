//! GC: remove per-attachment state the runtime no longer knows.

use std::collections::HashSet;

use serde_json::Value;

use super::error::{code, CniError};
use super::Request;
use crate::podmtu::PodMtuError;
use crate::state::attachment::StateDir;

const VALID: &str = "cni.dev/valid-attachments";

fn bad(msg: String) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        msg,
        "the runtime sent a malformed GC request",
    )
}

/// The (containerID, ifname) pairs in `cni.dev/valid-attachments`.
fn valid_attachments(req: &Request) -> Result<Option<HashSet<(String, String)>>, CniError> {
    let list = match req.raw.get(VALID) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad(format!("{VALID} must be an array"))),
    };
    let mut out = HashSet::new();
    for (i, item) in list.iter().enumerate() {
        let field = |name: &str| item.get(name).and_then(Value::as_str).map(String::from);
        match (field("containerID"), field("ifname")) {
            (Some(c), Some(n)) => {
                out.insert((c, n));
            }
            _ => {
                return Err(bad(format!(
                    "{VALID}[{i}] must be an object with string fields containerID and ifname"
                )))
            }
        }
    }
    Ok(Some(out))
}

/// Runs GC.
pub fn exec(req: &Request) -> Result<(), CniError> {
    let Some(valid) = valid_attachments(req)? else {
        tracing::warn!("GC without {VALID}: removing nothing");
        return Ok(());
    };
    let state = StateDir::new(&req.config.state_dir);
    let mut failures = Vec::new();
    for (path, backup) in state.list().map_err(PodMtuError::from)? {
        match backup {
            Ok(b) if valid.contains(&(b.container_id.clone(), b.ifname.clone())) => {}
            Ok(b) => match state.remove_path(&path) {
                Ok(_) => {
                    tracing::info!(container = %b.container_id, ifname = %b.ifname, "GC removed stale MTU backup")
                }
                Err(e) => failures.push(e.to_string()),
            },
            Err(e) => tracing::warn!(error = %e, "GC left an unreadable state file for inspection"),
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            code::STATE,
            format!("GC could not remove {} stale state file(s)", failures.len()),
            failures.join("; "),
        ))
    }
}
