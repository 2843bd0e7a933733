//! `calico-ipsec status --cluster`: is the cluster encrypted, and which
//! nodes are not following? Built from etcd alone (the config, the epochs,
//! the live status records, the leader's aggregate and Calico's node
//! list): no kernel access, no secret.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use super::CliError;
use crate::datastore::calico::{valid_node_name, RESOURCES};
use crate::datastore::etcd::Etcd;
use crate::datastore::ipsec::{acked_identities_digest, EpochState, IpsecStore, NodeStatus, Phase};

/// One epoch, and how many live nodes hold and send with it.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRow {
    /// The epoch number.
    pub epoch: u32,
    /// pending, active or retired.
    pub state: EpochState,
    /// The key agreement it uses ("" for none).
    pub agreement: String,
    /// Live nodes that installed its SAs.
    pub installed: usize,
    /// Live nodes whose outbound policies send with it.
    pub sending: usize,
}

/// A node that is not where the cluster is, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Behind {
    /// The node.
    pub node: String,
    /// Why it is behind.
    pub why: Vec<String>,
}

/// The whole cluster as etcd tells it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// The cluster's phase.
    pub phase: Phase,
    /// The phase it moves toward.
    pub target: Phase,
    /// The phase's generation.
    pub generation: u64,
    /// Who leads and what it waits for.
    pub manager: String,
    /// Nodes Calico lists.
    pub calico_nodes: usize,
    /// Nodes whose agent holds a live status.
    pub live_nodes: usize,
    /// Live nodes per acknowledged phase.
    pub phases: BTreeMap<String, usize>,
    /// Live nodes sending on each SA lane (a node may use several).
    pub lanes: BTreeMap<String, usize>,
    /// The epochs in etcd.
    pub epochs: Vec<EpochRow>,
    /// Live nodes not where the cluster is, with why.
    pub behind: Vec<Behind>,
    /// Nodes Calico lists with no live agent that the operator has not
    /// excluded: no phase step passes them.
    pub not_following: Vec<String>,
    /// Nodes the operator excluded.
    pub excluded: Vec<String>,
    /// Status records under a lease that do not parse.
    pub unreadable: Vec<String>,
    /// Unprotected (blocked) paths, per node.
    pub unprotected: BTreeMap<String, usize>,
    /// The node with the highest outbound sequence number, and that
    /// number's bit length (it is below 2^bits).
    pub highest_sequence: Option<(String, u32)>,
    /// The leader's aggregate: nodes it names, and whether it is current.
    pub aggregate: Option<AggregateRow>,
}

/// What the leader's aggregate holds.
#[derive(Debug, Clone, Serialize)]
pub struct AggregateRow {
    /// Nodes it names as differing from the common revisions.
    pub named: usize,
    /// False while so many nodes move that it states floors only.
    pub exact: bool,
    /// True when the nodes it does not name acknowledge every identity
    /// record etcd holds now.
    pub current: bool,
}

/// Why a live node is behind the cluster; empty when it is not.
fn why_behind(
    s: &NodeStatus,
    cfg_phase: Phase,
    generation: u64,
    newest_active: Option<u32>,
    digest: &str,
) -> Vec<String> {
    let mut why = Vec::new();
    if s.acked_phase != cfg_phase || s.acked_generation != generation {
        why.push(format!(
            "acknowledged phase {:?} (generation {}), not {cfg_phase:?} ({generation})",
            s.acked_phase, s.acked_generation
        ));
    }
    if cfg_phase >= Phase::Encrypt && s.active_epoch != newest_active {
        why.push(format!(
            "sends with epoch {:?}, not {newest_active:?}",
            s.active_epoch
        ));
    }
    if cfg_phase != Phase::Off && s.identities != digest {
        why.push("has not converged with every peer's current incarnation".into());
    }
    if s.handover {
        why.push("still hands over from an older incarnation".into());
    }
    if s.stale {
        why.push("cannot follow etcd (stale)".into());
    }
    if !s.held.is_empty() {
        why.push(format!("holds a stronger phase: {}", s.held));
    }
    if !s.lost_epochs.is_empty() {
        why.push(format!("lost its keys of epochs {:?}", s.lost_epochs));
    }
    why
}

/// Reads the cluster's state from etcd.
pub async fn read(etcd: &Etcd) -> Result<ClusterStatus, CliError> {
    let store = IpsecStore::new(etcd);
    let (cfg, _) = store.config_rev().await?.ok_or_else(|| {
        CliError::Refused(
            "no /calico/ipsec/v1/config: the cluster is not initialised (`calico-ipsec keys init`)"
                .into(),
        )
    })?;
    let (epochs, _) = store.epochs_lenient().await?;
    let statuses = store.node_statuses().await?;
    let (ids, newest_identity) = store.identities_rev().await?;
    let digest = acked_identities_digest(&ids, &cfg.excluded_nodes);
    let agg = store.aggregate().await?;
    let prefix = format!("{RESOURCES}nodes/");
    let calico: Vec<String> = etcd
        .get_prefix_keys(&prefix)
        .await?
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix))
        .filter(|n| valid_node_name(n))
        .map(str::to_string)
        .collect();
    let manager = crate::manager::explain(etcd).await?;
    let newest_active = epochs
        .iter()
        .filter(|(e, _)| e.state == EpochState::Active)
        .map(|(e, _)| e.epoch)
        .max();
    let live = &statuses.live;
    let mut phases = BTreeMap::new();
    let mut lanes = BTreeMap::new();
    let mut behind = Vec::new();
    let mut unprotected = BTreeMap::new();
    let mut highest: Option<(String, u32)> = None;
    for (name, s) in live {
        *phases
            .entry(format!("{:?}", s.acked_phase).to_lowercase())
            .or_insert(0) += 1;
        for lane in s.lanes.keys() {
            *lanes.entry(lane.clone()).or_insert(0) += 1;
        }
        let why = why_behind(s, cfg.phase, cfg.phase_generation, newest_active, &digest);
        if !why.is_empty() {
            behind.push(Behind {
                node: name.clone(),
                why,
            });
        }
        if s.unprotected > 0 {
            unprotected.insert(name.clone(), s.unprotected);
        }
        if s.seq_bits > highest.as_ref().map_or(0, |(_, b)| *b) {
            highest = Some((name.clone(), s.seq_bits));
        }
    }
    let not_following = calico
        .iter()
        .filter(|n| {
            !live.iter().any(|(l, _)| l == *n)
                && !statuses.unreadable.iter().any(|(u, _)| u == *n)
                && !cfg.excluded_nodes.contains(n)
        })
        .cloned()
        .collect();
    let epochs = epochs
        .iter()
        .map(|(e, _)| EpochRow {
            epoch: e.epoch,
            state: e.state,
            agreement: e.agreement.clone().unwrap_or_default(),
            installed: live
                .iter()
                .filter(|(_, s)| s.installed_epochs.contains(&e.epoch))
                .count(),
            sending: live
                .iter()
                .filter(|(_, s)| s.active_epoch == Some(e.epoch))
                .count(),
        })
        .collect();
    Ok(ClusterStatus {
        phase: cfg.phase,
        target: cfg.target_phase,
        generation: cfg.phase_generation,
        manager,
        calico_nodes: calico.len(),
        live_nodes: live.len(),
        phases,
        lanes,
        epochs,
        behind,
        not_following,
        excluded: cfg.excluded_nodes.clone(),
        unreadable: statuses.unreadable.iter().map(|(n, _)| n.clone()).collect(),
        unprotected,
        highest_sequence: highest,
        aggregate: agg.map(|a| AggregateRow {
            named: a.nodes.len(),
            exact: a.exact,
            current: a.common.acked >= newest_identity,
        }),
    })
}

/// Writes the cluster status as text.
pub fn render(c: &ClusterStatus, out: &mut dyn Write) -> std::io::Result<()> {
    let lower = |p: Phase| format!("{p:?}").to_lowercase();
    writeln!(
        out,
        "phase:    {} (target {}, generation {})",
        lower(c.phase),
        lower(c.target),
        c.generation
    )?;
    writeln!(out, "manager:  {}", c.manager)?;
    writeln!(
        out,
        "nodes:    {} live of {} Calico lists ({} excluded)",
        c.live_nodes,
        c.calico_nodes,
        c.excluded.len()
    )?;
    let list = |m: &BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(out, "phases:   {}", list(&c.phases))?;
    writeln!(out, "lanes:    {}", list(&c.lanes))?;
    writeln!(out, "epochs:")?;
    for e in &c.epochs {
        let state = format!("{:?}", e.state).to_lowercase();
        let agreement = if e.agreement.is_empty() {
            "none"
        } else {
            &e.agreement
        };
        writeln!(
            out,
            "  {:>6}  {state:<8} agreement {agreement:<5} installed on {}, sending on {}",
            e.epoch, e.installed, e.sending
        )?;
    }
    if let Some((node, bits)) = &c.highest_sequence {
        writeln!(
            out,
            "highest outbound sequence number: below 2^{bits} ({node})"
        )?;
    }
    if let Some(a) = &c.aggregate {
        writeln!(
            out,
            "aggregate: {}{}",
            if a.exact {
                format!("{} node(s) in motion", a.named)
            } else {
                "many nodes in motion (floors only)".into()
            },
            if a.current {
                ""
            } else {
                " (behind the identities in etcd)"
            }
        )?;
    } else {
        writeln!(
            out,
            "aggregate: none (no leader writes one; nodes read the statuses)"
        )?;
    }
    let mut problems = 0;
    for b in &c.behind {
        problems += 1;
        writeln!(out, "BEHIND      {}: {}", b.node, b.why.join("; "))?;
    }
    for n in &c.not_following {
        problems += 1;
        writeln!(
            out,
            "NO AGENT    {n}: Calico lists it, no live agent, not excluded"
        )?;
    }
    for n in &c.unreadable {
        problems += 1;
        writeln!(out, "UNREADABLE  {n}: its status record does not parse")?;
    }
    for (n, k) in &c.unprotected {
        problems += 1;
        writeln!(out, "BLOCKED     {n}: {k} path(s) cannot be protected")?;
    }
    if problems == 0 {
        writeln!(out, "every live node follows the cluster")?;
    }
    Ok(())
}

/// `status --cluster`.
pub fn exec(etcd: &super::EtcdArgs, json: bool, out: &mut dyn Write) -> Result<(), CliError> {
    let settings = etcd.settings()?;
    let rt = crate::runtime::current_thread()?;
    let status = rt.block_on(async {
        let etcd = Etcd::connect(&settings).await?;
        read(&etcd).await
    })?;
    if json {
        super::print_json(out, &status)?;
    } else {
        render(&status, out)?;
    }
    Ok(())
}
