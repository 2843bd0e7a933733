//! `calico-ipsec status`: this node's phase, epochs and peers, whether each
//! peer's SAs and policies are in place, and the kernel's XFRM counters.
//! Read-only; shows SPIs and names, never a key.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;

use clap::Args;
use serde::Serialize;

use super::{CliError, EtcdArgs};
use crate::converge::{observe, Observed};
use crate::datastore::ipsec::Phase;
use crate::xfrm::Dir;

/// The kernel's IPsec counters (read by [`crate::xfrm::kernel`]).
pub use crate::xfrm::kernel::{parse_xfrm_stat, read_xfrm_stat, XFRM_STAT};

/// Arguments of `calico-ipsec status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// etcd access.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// This node's name (default: Calico's /var/lib/calico/nodename).
    #[arg(long, env = "NODENAME")]
    pub nodename: Option<String>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The whole cluster from etcd (phases, epochs, nodes behind and why)
    /// instead of this node's kernel state.
    #[arg(long)]
    pub cluster: bool,
    /// The node's state directory (the conflist's `state_dir`): whether
    /// this node has seen the cluster initialised is kept there.
    #[arg(long, default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: std::path::PathBuf,
    /// A conflist holding a calico-ipsec entry (as `converge --config`):
    /// its nodename, etcd settings and state_dir replace the flags above.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// One object's state: in place, missing, or not wanted in this phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Presence {
    /// Desired and in the kernel.
    Ok,
    /// Desired and not in the kernel (or different).
    Missing,
    /// Not desired in this phase (or for this peer).
    None,
}

/// One peer's row, for one address family.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Node name.
    pub name: String,
    /// "ipv4" or "ipv6".
    pub family: &'static str,
    /// Underlay address in that family, if the peer has one.
    pub address: Option<IpAddr>,
    /// Every path in use: ipip, vxlan, tunnel, blocked.
    pub paths: Vec<String>,
    /// Why a path is blocked, when one is.
    pub blocked: Vec<String>,
    /// The peer's id.
    pub id: Option<u16>,
    /// The peer's incarnation.
    pub incarnation: u32,
    /// Outbound states (all installed epochs).
    pub sa_out: Presence,
    /// Inbound states.
    pub sa_in: Presence,
    /// Outbound policies.
    pub policy_out: Presence,
    /// Inbound policies (`in` and `fwd`).
    pub policy_in: Presence,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// This node.
    pub node: String,
    /// The cluster's phase.
    pub phase: Phase,
    /// The phase the manager is moving to.
    pub target_phase: Phase,
    /// This node's id.
    pub id: Option<u16>,
    /// This node's incarnation.
    pub incarnation: u32,
    /// Epochs with states installed.
    pub installed_epochs: Vec<u32>,
    /// The epoch senders use.
    pub active_epoch: Option<u32>,
    /// States and policies that must change to match etcd (0 when converged).
    pub pending_changes: usize,
    /// Our states and policies in the kernel.
    pub kernel_states: usize,
    /// Our policies in the kernel.
    pub kernel_policies: usize,
    /// The etcd revision read.
    pub revision: i64,
    /// Peers, one row per family.
    pub peers: Vec<PeerStatus>,
    /// Pod blocks no SA protects (blocked once encryption is on).
    pub unprotected: Vec<crate::xfrm::desired::Unprotected>,
    /// Our records in etcd that were skipped, and why.
    pub problems: Vec<String>,
    /// /proc/net/xfrm_stat, every counter.
    pub xfrm_stat: BTreeMap<String, u64>,
}

fn presence(wanted: usize, missing: usize) -> Presence {
    match (wanted, missing) {
        (0, _) => Presence::None,
        (_, 0) => Presence::Ok,
        _ => Presence::Missing,
    }
}

/// Builds the report from what `observe` saw.
pub fn build(o: &Observed, xfrm_stat: BTreeMap<String, u64>) -> Status {
    let missing_state = |k: &(IpAddr, u32)| {
        let want = &o.desired.states[k];
        o.held.states.get(k).is_none_or(|h| !h.matches(want))
    };
    let missing_policy = |k: &(Dir, crate::xfrm::Selector)| {
        let want = &o.desired.policies[k];
        o.held.policies.get(k).is_none_or(|h| !h.matches(want))
    };
    let mut peers = Vec::new();
    for p in &o.desired.peers {
        for f in &p.families {
            let sa = |dir: Dir| {
                let keys: Vec<_> = f.states.iter().filter(|(d, _)| *d == dir).collect();
                presence(
                    keys.len(),
                    keys.iter().filter(|(_, k)| missing_state(k)).count(),
                )
            };
            let pol = |inbound: bool| {
                let keys: Vec<_> = f
                    .policies
                    .iter()
                    .filter(|(d, _)| (*d != Dir::Out) == inbound)
                    .collect();
                presence(
                    keys.len(),
                    keys.iter().filter(|k| missing_policy(k)).count(),
                )
            };
            let v4 = f.family == "ipv4";
            peers.push(PeerStatus {
                name: p.name.clone(),
                family: f.family,
                address: p.addresses.iter().find(|a| a.is_ipv4() == v4).copied(),
                paths: f.paths.iter().map(ToString::to_string).collect(),
                blocked: f.blocked.clone(),
                id: p.id,
                incarnation: p.incarnation,
                sa_out: sa(Dir::Out),
                sa_in: sa(Dir::In),
                policy_out: pol(false),
                policy_in: pol(true),
            });
        }
    }
    let me = o.snapshot.identities.get(&o.node);
    let mut problems = o.snapshot.problems.clone();
    problems.extend(o.snapshot.config_problem.clone());
    problems.extend(o.holding.as_ref().map(|why| format!("phase held: {why}")));
    problems.extend(
        o.snapshot
            .topology
            .skipped
            .iter()
            .map(|s| format!("{}: {}", s.key, s.reason)),
    );
    Status {
        node: o.node.clone(),
        phase: o.phase,
        target_phase: o
            .snapshot
            .config
            .as_ref()
            .map_or(Phase::Off, |c| c.target_phase),
        id: me.map(|i| i.id),
        incarnation: me.map_or(0, |i| i.incarnation),
        installed_epochs: o.desired.installed_epochs.clone(),
        active_epoch: o.desired.active_epoch,
        pending_changes: o.plan.writes(),
        kernel_states: o.held.states.len(),
        kernel_policies: o.held.policies.len(),
        revision: o.snapshot.revision,
        peers,
        unprotected: o.desired.unprotected.clone(),
        problems,
        xfrm_stat,
    }
}

/// `s` safe for a terminal: control characters and escapes printed as
/// Rust escapes (names come from etcd, which anyone with write access fills).
pub fn clean(s: &str) -> String {
    s.chars().flat_map(char::escape_debug).collect()
}

fn phase_name(p: Phase) -> String {
    format!("{p:?}").to_lowercase()
}

fn word(p: Presence) -> &'static str {
    match p {
        Presence::Ok => "ok",
        Presence::Missing => "MISSING",
        Presence::None => "-",
    }
}

/// Writes the report as a table.
pub fn render(s: &Status, out: &mut dyn Write) -> std::io::Result<()> {
    let epochs: Vec<String> = s.installed_epochs.iter().map(u32::to_string).collect();
    writeln!(out, "node:         {}", s.node)?;
    writeln!(
        out,
        "phase:        {} (target {})",
        phase_name(s.phase),
        phase_name(s.target_phase)
    )?;
    writeln!(
        out,
        "identity:     id {}, incarnation {}",
        s.id.map_or("-".into(), |i| i.to_string()),
        s.incarnation
    )?;
    writeln!(
        out,
        "epochs:       installed [{}], active {}",
        epochs.join(", "),
        s.active_epoch.map_or("-".into(), |e| e.to_string())
    )?;
    writeln!(
        out,
        "kernel:       {} states, {} policies of ours; {}",
        s.kernel_states,
        s.kernel_policies,
        if s.pending_changes == 0 {
            "converged".to_string()
        } else {
            format!("{} changes pending", s.pending_changes)
        }
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<20} {:<4} {:<15} {:<14} {:>5} {:>4}  {:<7} {:<7} {:<7} {:<7}",
        "PEER", "FAM", "ADDRESS", "PATH", "ID", "INC", "SA-OUT", "SA-IN", "POL-OUT", "POL-IN"
    )?;
    for p in &s.peers {
        writeln!(
            out,
            "{:<20} {:<4} {:<15} {:<14} {:>5} {:>4}  {:<7} {:<7} {:<7} {:<7}",
            clean(&p.name),
            if p.family == "ipv4" { "v4" } else { "v6" },
            p.address.map_or("-".into(), |a| a.to_string()),
            p.paths.join(","),
            p.id.map_or("-".into(), |i| i.to_string()),
            p.incarnation,
            word(p.sa_out),
            word(p.sa_in),
            word(p.policy_out),
            word(p.policy_in)
        )?;
    }
    for r in s
        .peers
        .iter()
        .flat_map(|p| p.blocked.iter().map(move |b| (p, b)))
    {
        writeln!(
            out,
            "  blocked: {} ({}): {}",
            clean(&r.0.name),
            r.0.family,
            clean(r.1)
        )?;
    }
    let unusable: Vec<_> = s
        .unprotected
        .iter()
        .filter(|u| !s.peers.iter().any(|p| p.name == u.peer))
        .collect();
    for u in unusable {
        let blocks: Vec<String> = u.blocks.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "  blocked: pods of {} ({}): {}",
            clean(&u.peer),
            blocks.join(", "),
            clean(&u.reason)
        )?;
    }
    for p in &s.problems {
        writeln!(out, "  skipped: {}", clean(p))?;
    }
    writeln!(
        out,
        "unprotected:  {} pod block path(s){}",
        s.unprotected.len(),
        if s.unprotected.is_empty() {
            ""
        } else if s.phase >= Phase::Encrypt {
            " (blocked, never in clear)"
        } else {
            " (not yet blocked: the phase is before encrypt)"
        }
    )?;
    writeln!(out)?;
    writeln!(out, "crypto:       {}", crate::keys::crypto::describe())?;
    let nonzero: Vec<String> = s
        .xfrm_stat
        .iter()
        .filter(|(_, v)| **v != 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if s.xfrm_stat.is_empty() {
        writeln!(out, "xfrm_stat:    unavailable ({XFRM_STAT} is missing)")
    } else if nonzero.is_empty() {
        writeln!(out, "xfrm_stat:    all {} counters 0", s.xfrm_stat.len())
    } else {
        writeln!(out, "xfrm_stat:    {}", nonzero.join(" "))
    }
}

/// Runs `calico-ipsec status`.
pub fn exec(args: &StatusArgs, out: &mut dyn Write) -> Result<(), CliError> {
    if args.cluster {
        return super::cluster_status::exec(&args.etcd, args.json, out);
    }
    let seen = match &args.config {
        Some(path) => {
            let cfg = super::converge::load_entry(path)?;
            let node = cfg
                .node_name()
                .map_err(crate::converge::ConvergeError::from)?;
            observe(&crate::converge::settings(&cfg), node, &cfg.state_dir)?
        }
        None => {
            let node = match &args.nodename {
                Some(n) => crate::config::validate_nodename(n)?,
                None => crate::config::read_nodename_file(std::path::Path::new(
                    crate::config::DEFAULT_NODENAME_FILE,
                ))
                .map_err(crate::converge::ConvergeError::from)?,
            };
            observe(&args.etcd.settings()?, node, &args.state_dir)?
        }
    };
    let status = build(&seen, read_xfrm_stat());
    if args.json {
        super::print_json(out, &status)?;
    } else {
        render(&status, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfrm_stat_parses_every_counter() {
        let m = parse_xfrm_stat("XfrmInError              \t0\nXfrmInNoStates           \t3\n");
        assert_eq!(m.len(), 2);
        assert_eq!(m["XfrmInNoStates"], 3);
    }
}
