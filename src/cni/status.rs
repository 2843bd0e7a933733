//! STATUS: whether ADD could succeed now.

use super::error::{code, CniError};
use super::Request;

/// Runs STATUS: ready when the MTU bound can be computed.
pub fn exec(req: &Request) -> Result<(), CniError> {
    let bound = super::encryption_bound(&req.config).map_err(|e| {
        CniError::new(
            code::NOT_AVAILABLE,
            format!("calico-ipsec is not ready: {}", e.msg),
            e.details,
        )
    })?;
    super::warn_tunnel_above(bound);
    Ok(())
}
