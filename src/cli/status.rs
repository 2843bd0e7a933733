//! `calico-ipsec status`: this node's phase, epochs and peers, whether each
//! peer's SAs and policies are in place, and the kernel's XFRM counters.
//! Read-only; shows SPIs and names, never a key.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;

use clap::Args;
use serde::Serialize;

use super::{CliError, EtcdArgs};
use crate::converge::{observe, Observed};
use crate::datastore::ipsec::Phase;
use crate::xfrm::Dir;

/// Where the kernel's IPsec counters are.
pub const XFRM_STAT: &str = "/proc/net/xfrm_stat";

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

/// One peer's row.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Node name.
    pub name: String,
    /// Underlay address.
    pub address: Ipv4Addr,
    /// ipip, vxlan or none.
    pub tunnel: &'static str,
    /// The peer's id.
    pub id: Option<u16>,
    /// The peer's incarnation.
    pub incarnation: u32,
    /// Outbound states (all installed epochs).
    pub sa_out: Presence,
    /// Inbound states.
    pub sa_in: Presence,
    /// Outbound policy.
    pub policy_out: Presence,
    /// Inbound policy.
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
    /// Peers.
    pub peers: Vec<PeerStatus>,
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
    let missing_state = |k: &(Ipv4Addr, u32)| {
        let want = &o.desired.states[k];
        o.held.states.get(k).is_none_or(|h| !h.matches(want))
    };
    let missing_policy = |k: &(Dir, crate::xfrm::Selector)| {
        let want = &o.desired.policies[k];
        o.held.policies.get(k).is_none_or(|h| !h.matches(want))
    };
    let peers = o
        .desired
        .peers
        .iter()
        .map(|p| {
            let count = |dir: Dir| {
                let keys: Vec<_> = o
                    .desired
                    .states
                    .iter()
                    .filter(|(_, s)| {
                        s.dir == dir && (if dir == Dir::Out { s.dst } else { s.src }) == p.address
                    })
                    .map(|(k, _)| *k)
                    .collect();
                presence(keys.len(), keys.iter().filter(|k| missing_state(k)).count())
            };
            let pol = |dir: Dir| {
                let keys: Vec<_> = o
                    .desired
                    .policies
                    .keys()
                    .filter(|(d, sel)| {
                        *d == dir && (if dir == Dir::Out { sel.dst } else { sel.src }) == p.address
                    })
                    .copied()
                    .collect();
                presence(
                    keys.len(),
                    keys.iter().filter(|k| missing_policy(k)).count(),
                )
            };
            PeerStatus {
                name: p.name.clone(),
                address: p.address,
                tunnel: p.tunnel,
                id: p.id,
                incarnation: p.incarnation,
                sa_out: count(Dir::Out),
                sa_in: count(Dir::In),
                policy_out: pol(Dir::Out),
                policy_in: pol(Dir::In),
            }
        })
        .collect();
    let me = o.snapshot.identities.get(&o.node);
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
        xfrm_stat,
    }
}

/// Parses /proc/net/xfrm_stat ("XfrmInError   0" per line).
pub fn parse_xfrm_stat(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Reads this namespace's XFRM counters (empty when the kernel has none).
pub fn read_xfrm_stat() -> BTreeMap<String, u64> {
    std::fs::read_to_string(XFRM_STAT)
        .map(|t| parse_xfrm_stat(&t))
        .unwrap_or_default()
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
        "{:<20} {:<15} {:<6} {:>5} {:>4}  {:<7} {:<7} {:<7} {:<7}",
        "PEER", "ADDRESS", "TUNNEL", "ID", "INC", "SA-OUT", "SA-IN", "POL-OUT", "POL-IN"
    )?;
    for p in &s.peers {
        writeln!(
            out,
            "{:<20} {:<15} {:<6} {:>5} {:>4}  {:<7} {:<7} {:<7} {:<7}",
            p.name,
            p.address.to_string(),
            p.tunnel,
            p.id.map_or("-".into(), |i| i.to_string()),
            p.incarnation,
            word(p.sa_out),
            word(p.sa_in),
            word(p.policy_out),
            word(p.policy_in)
        )?;
    }
    writeln!(out)?;
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
    let node = match &args.nodename {
        Some(n) => crate::config::validate_nodename(n)?,
        None => crate::config::read_nodename_file(std::path::Path::new(
            crate::config::DEFAULT_NODENAME_FILE,
        ))
        .map_err(crate::converge::ConvergeError::from)?,
    };
    let seen = observe(&args.etcd.settings()?, node)?;
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
