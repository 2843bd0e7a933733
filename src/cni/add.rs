//! ADD: clamp the pod's MTU to the encryption bound and pass the result on.

use serde_json::Value;

use super::error::{code, CniError};
use super::result::{self, MtuChange};
use super::Request;
use crate::podmtu::{self, PodNet};
use crate::state::attachment::StateDir;

/// IPv6's minimum link MTU (RFC 8200).
const IPV6_MIN_MTU: u32 = 1280;

/// Runs ADD and returns the result to print.
pub fn exec(req: &Request) -> Result<Value, CniError> {
    let prev = req.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "prevResult is missing: calico-ipsec is a chained plugin and must be listed after calico in the conflist",
            "",
        )
    })?;
    let netns = req.netns()?;
    // IPsec first, under the node lock: an unreachable etcd (code 11) or a
    // refused state fails the ADD before the pod is touched, so a pod never
    // starts while its node cannot encrypt (fail closed).
    let mut carriers = Vec::new();
    if !req.config.etcd.endpoints.is_empty() {
        let report = crate::converge::converge(&req.config)?;
        if let Some(why) = &report.stale {
            tracing::warn!(reason = %why, "the node keeps its XFRM state but cannot follow etcd");
        }
        carriers = report.mtu.clone();
        tracing::info!(
            node = %report.node,
            phase = ?report.phase,
            incarnation = report.incarnation,
            states = report.states,
            policies = report.policies,
            writes = report.writes,
            unchanged = report.unchanged,
            coalesced = report.coalesced,
            millis = report.millis,
            "IPsec converged"
        );
    }

    // The pools and this node's families decide what the pod MTU must fit;
    // the conflist's encapsulation only without a datastore (MTU-only).
    let bound = super::encryption_bound(&req.config, &carriers)?;
    if bound < IPV6_MIN_MTU && result::has_ipv6(prev) {
        return Err(CniError::new(
            code::MTU_TOO_SMALL,
            format!("the pod MTU after encryption would be {bound}, below IPv6's minimum of 1280, and the pod has an IPv6 address: the kernel would remove its IPv6 addresses"),
            "raise the underlay MTU (or ext_mtu) so that the bound reaches 1280, or give the pod no IPv6 address",
        ));
    }
    let mut net = PodNet::open(netns)?;
    let links = net.find(req.ifname())?;
    let state = StateDir::new(&req.config.state_dir);
    let lowered = podmtu::clamp(
        &mut net,
        &links,
        bound,
        &state,
        req.container_id(),
        req.ifname(),
    )?;
    super::warn_tunnel_above(bound);

    let sandbox = netns.to_string_lossy().into_owned();
    let changes: Vec<MtuChange> = lowered
        .into_iter()
        .map(|l| MtuChange {
            sandbox: l.in_pod.then(|| sandbox.clone()),
            name: l.name,
            mtu: l.mtu,
        })
        .collect();
    tracing::info!(
        container = req.container_id(),
        ifname = req.ifname(),
        bound,
        lowered = changes.len(),
        "ADD done"
    );
    Ok(result::render(prev, req.version, &changes))
}
