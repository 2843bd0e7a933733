//! CHECK: the pod's MTU (and its host veth's) must not exceed the bound, and
//! the node's XFRM states and policies must be what etcd says.

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
    let seen = if req.config.etcd.endpoints.is_empty() {
        None
    } else {
        let node = req
            .config
            .node_name()
            .map_err(crate::converge::ConvergeError::from)?;
        Some(crate::converge::observe(
            &crate::converge::settings(&req.config),
            node,
            &req.config.state_dir,
        )?)
    };
    let carriers = seen
        .as_ref()
        .map(|o| crate::converge::mtu_params(&o.snapshot, &o.node))
        .unwrap_or_default();
    let bound = super::encryption_bound(&req.config, &carriers)?;
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
    if let Some(seen) = seen {
        if !seen.plan.is_empty() {
            return Err(CniError::new(
                code::XFRM_DRIFT,
                format!(
                    "this node's IPsec state differs from etcd's ({}): the next ADD or the agent converges it; run `calico-ipsec status` to see which peers",
                    seen.plan.summary()
                ),
                format!("phase {:?}, etcd revision {}", seen.phase, seen.snapshot.revision),
            ));
        }
    }
    Ok(())
}
