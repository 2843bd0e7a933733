//! The agent's `/metrics` text.

use std::sync::Mutex;

use super::{lock, State};
use crate::metrics::Exposition;

/// The agent's metrics (the conflist watcher's are added by [`super::health`]).
///
/// Nothing here reads the kernel's XFRM tables: the counts are those of the
/// last convergence, which the kernel notifications ([`super::kernel_watch`])
/// keep current (any drift is converged away within a second), so a scrape
/// costs the same at 5 peers as at 5,000. Only `/proc/net/xfrm_stat`, a
/// fixed set of counters, is read.
pub(super) fn render(state: &Mutex<State>) -> String {
    let xfrm_stat = crate::xfrm::kernel::read_xfrm_stat();
    let s = lock(state);
    let mut e = Exposition::default();
    let node = s.node.as_str();
    if let Some(r) = &s.report {
        let (si, so) = r.states_by_dir;
        let (pi, po, pf) = r.policies_by_dir;
        e.family(
            "calico_ipsec_xfrm_states",
            "gauge",
            "XFRM states this product owns on the node, by direction (as of the last convergence)",
        )
        .sample("calico_ipsec_xfrm_states", &[("dir", "in")], si as f64)
        .sample("calico_ipsec_xfrm_states", &[("dir", "out")], so as f64);
        e.family(
            "calico_ipsec_xfrm_policies",
            "gauge",
            "XFRM policies this product owns on the node, by direction (as of the last convergence)",
        )
        .sample("calico_ipsec_xfrm_policies", &[("dir", "in")], pi as f64)
        .sample("calico_ipsec_xfrm_policies", &[("dir", "out")], po as f64)
        .sample("calico_ipsec_xfrm_policies", &[("dir", "fwd")], pf as f64);
        e.gauge(
            "calico_ipsec_guard_ok",
            "1 when the nftables catch-all (from encrypt on: pod traffic without ESP is dropped) is in place or not needed; a convergence that cannot write it fails",
            if r.guard.is_none() { 1.0 } else { 0.0 },
        );
    }
    e.counter(
        "calico_ipsec_kernel_events_total",
        "XFRM and link notifications from the kernel",
        s.kernel_events as f64,
    );
    e.counter(
        "calico_ipsec_kernel_repairs_total",
        "Convergences that put back what the kernel lost or changed outside calico-ipsec",
        s.kernel_repairs as f64,
    );
    if let Some(r) = &s.report {
        e.gauge(
            "calico_ipsec_epochs_installed",
            "Key epochs whose SAs are installed on the node",
            r.installed_epochs.len() as f64,
        );
        e.gauge(
            "calico_ipsec_epoch_active",
            "The epoch outbound policies send with (0: none)",
            f64::from(r.active_epoch.unwrap_or(0)),
        );
        e.gauge(
            "calico_ipsec_incarnation",
            "This node's incarnation",
            f64::from(r.incarnation),
        );
        e.gauge(
            "calico_ipsec_unprotected_paths",
            "Pod blocks toward which no SA can protect traffic (blocked in encrypt and enforce; healthy only at 0)",
            r.unprotected.len() as f64,
        );
        let phase = format!("{:?}", r.phase).to_lowercase();
        e.family(
            "calico_ipsec_phase",
            "gauge",
            "The phase this node has converged to (1 for the current one)",
        )
        .sample("calico_ipsec_phase", &[("phase", &phase)], 1.0);
    }
    e.family(
        "calico_ipsec_xfrm_stat_total",
        "counter",
        "Counters of /proc/net/xfrm_stat",
    );
    for (k, v) in &xfrm_stat {
        e.sample("calico_ipsec_xfrm_stat_total", &[("counter", k)], *v as f64);
    }
    e.histogram(
        "calico_ipsec_converge_seconds",
        "Time from an etcd change to the node's kernel matching it",
        &s.converge_seconds,
    );
    e.counter(
        "calico_ipsec_converge_failures_total",
        "Convergences that failed (the XFRM state was kept)",
        s.converge_failures as f64,
    );
    e.gauge(
        "calico_ipsec_last_success_timestamp_seconds",
        "When the node last converged, Unix seconds",
        s.last_success.unwrap_or(0) as f64,
    );
    e.gauge(
        "calico_ipsec_etcd_reachable",
        "1 when etcd answers, 0 while the agent is stale",
        if s.stale { 0.0 } else { 1.0 },
    );
    e.counter(
        "calico_ipsec_watch_restarts_total",
        "etcd watches that were lost and resumed",
        s.watch_restarts as f64,
    );
    e.family(
        "calico_ipsec_agent_info",
        "gauge",
        "The node this agent serves",
    )
    .sample("calico_ipsec_agent_info", &[("node", node)], 1.0);
    e.finish()
}
