//! CHECK: the pod's MTU (and its host veth's) must not exceed the bound.

use super::error::{code, CniError};
use super::Request;
use crate::podmtu::PodNet;

/// Runs CHECK.
pub fn exec(req: &Request) -> Result<(), CniError> {
    if req.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "prevResult is missing: CHECK needs the result of the ADD it verifies",
            "",
        ));
    }
    let netns = req.netns()?;
    let bound = super::encryption_bound(&req.config)?;
    let mut net = PodNet::open(netns)?;
    let links = net.find(req.ifname())?;
    if let Some((link, in_pod)) = links.above(bound).next() {
        let side = if in_pod {
            "pod interface"
        } else {
            "host-side veth"
        };
        return Err(CniError::new(
            code::MTU_ABOVE_BOUND,
            format!(
                "{side} {} has MTU {}, above the encryption bound {bound}: encrypted packets from this pod would fragment or be dropped; recreate the pod so calico-ipsec can clamp it",
                link.name, link.mtu
            ),
            format!("netns {}", netns.display()),
        ));
    }
    Ok(())
}
