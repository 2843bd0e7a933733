//! Converging this node's XFRM state: the one writer of the data plane.
//!
//! `converge` takes the node-wide lock (kubelet runs ADDs concurrently, and
//! the agent converges too), reads a snapshot from etcd, makes sure this
//! node's incarnation is safe to use, computes the desired state, diffs it
//! with the kernel and applies the difference. When nothing differs, no
//! netlink write happens.
//!
//! # Incarnations: a key is never used by two SAs
//!
//! An outbound SA's key is derived from (epoch, me, incarnation, peer). If
//! that SA is ever lost (a reboot, a flush, a peer that left and came back)
//! it must not be created again with the same key: GCM nonces restart with
//! every new SA. So the node keeps a ledger (`<state_dir>/node/ledger`) of
//! every (epoch, peer) outbound SA it has created in its current incarnation,
//! written before the SA is created. A new incarnation is published in etcd
//! (`nodeids/<node>`), before any SA that uses it exists, when:
//! - the node has never published one;
//! - the kernel's boot id differs from the one published (a reboot);
//! - the ledger is missing or belongs to another incarnation or boot;
//! - an outbound SA the ledger says was created is missing or altered.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::clock::Stamp;
use crate::config::{NodenameError, PluginConfig};
use crate::datastore::etcd::{Etcd, EtcdSettings};
use crate::datastore::ipsec::{Identity, IpsecStore, IpsecStoreError, Phase};
use crate::datastore::snapshot::{self, Snapshot};
use crate::fsutil::SafeFileError;
use crate::keys::{Kek, KekError};
use crate::xfrm::guard::Guard;
use crate::xfrm::handover::{hand_over, PeerAcks};
use crate::xfrm::kernel::{Applied, Xfrm, XfrmError};
use crate::xfrm::{Desired, DesiredError, Dir, Inputs, Plan};
use record::Converged;
pub use report::Report;

mod agreement;
mod apply;
pub mod cluster;
mod identity;
mod observe;
pub mod record;
mod report;

pub use apply::mtu_params;
use apply::{apply_with_keys, kept};
use identity::bump;
pub use identity::{
    boot_id, needs_new_incarnation, Ledger, NodeLock, BOOT_ID_PATH, NODE_LOCK_WAIT,
};
pub use observe::{observe, observe_snapshot, Observed};
use record::{local_facts_hold, still_converged};

/// ICV length used when the config does not say.
pub const DEFAULT_ICV_BITS: u32 = 128;

/// Why converging failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvergeError {
    /// etcd or our records failed.
    #[error(transparent)]
    Store(#[from] IpsecStoreError),
    /// This node's name is unknown.
    #[error(transparent)]
    Nodename(#[from] NodenameError),
    /// The datastore does not allow a desired state.
    #[error(transparent)]
    Desired(#[from] DesiredError),
    /// The kernel refused.
    #[error(transparent)]
    Xfrm(#[from] XfrmError),
    /// The KEK cannot be loaded.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// The lock or ledger under the state directory failed.
    #[error("{op} {path}: {source}")]
    State {
        /// What we were doing.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A file under the state directory is a link or not a regular file.
    #[error(transparent)]
    Unsafe(#[from] SafeFileError),
    /// This node's side of key agreement failed.
    #[error("key agreement: {0}")]
    Agreement(String),
    /// This node's epoch private keys could not be read or written.
    #[error(transparent)]
    AgreementKeys(#[from] crate::keys::agreement::AgreementError),
    /// Another process held the node lock for longer than the wait.
    #[error("the node lock {path} is still held by another calico-ipsec process after {waited:?}; see which with `fuser -v {path}`")]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The nftables catch-all could not be written at `encrypt` or above.
    #[error("the nftables catch-all that drops pod traffic no XFRM policy protects: {0}")]
    Guard(#[source] crate::xfrm::guard::GuardError),
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

fn state_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ConvergeError {
    let path = path.to_path_buf();
    move |source| ConvergeError::State { op, path, source }
}

fn runtime() -> Result<tokio::runtime::Runtime, ConvergeError> {
    crate::runtime::current_thread().map_err(ConvergeError::Runtime)
}

/// The plugin's etcd settings. The member that answered last is remembered
/// in `<state_dir>/node/etcd-member`, shared by the ADDs and the agent.
pub fn settings(cfg: &PluginConfig) -> EtcdSettings {
    EtcdSettings::from_config(&cfg.etcd, cfg.etcd_timeout)
        .with_hint_file(cfg.state_dir.join("node").join("etcd-member"))
}

fn phase_of(s: &Snapshot) -> (Phase, u32) {
    s.config
        .as_ref()
        .map_or((Phase::Off, DEFAULT_ICV_BITS), |c| (c.phase, c.icv_bits))
}

fn ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Converges this node's kernel to what etcd says (the ADD path).
///
/// When the last convergence left a record ([`record`]) and neither etcd
/// (one small keys-only request) nor the kernel (one dump) changed since,
/// this returns at once with no other read and no write. Otherwise it reads
/// a snapshot and converges fully.
pub fn converge(cfg: &PluginConfig) -> Result<Report, ConvergeError> {
    let started = Instant::now();
    let asked = Stamp::now();
    let node = cfg.node_name()?;
    let _lock = NodeLock::acquire(&cfg.state_dir, NODE_LOCK_WAIT)?;
    // After a reboot, the catch-all is back before etcd is asked.
    cluster::restore_guard(&cfg.state_dir, false);
    let last = Converged::load(&cfg.state_dir).filter(|c| c.node == node);
    // ADDs that queued on the lock are answered by the read of whichever
    // holder began after they asked (group commit).
    if let (Some(last), Some(asked)) = (&last, &asked) {
        if let Some(report) = record::coalesced(cfg, last, asked, started)? {
            return Ok(report);
        }
    }
    let result = std::thread::scope(|scope| {
        // The local checks, the kernel dump and its digest run on their own
        // thread while etcd answers; `None` when the local facts changed.
        let dump = last.clone().map(|facts| {
            scope.spawn(move || -> Result<Option<String>, ConvergeError> {
                if !local_facts_hold(cfg, &facts)? {
                    return Ok(None);
                }
                let held = Xfrm::open()?.held()?;
                Ok(Some(record::held_digest(&held)))
            })
        });
        runtime()?.block_on(async {
            let etcd = Etcd::connect(&settings(cfg))
                .await
                .map_err(IpsecStoreError::from)?;
            if let (Some(last), Some(dump)) = (last, dump) {
                let checking = Stamp::now();
                let fingerprint = snapshot::fingerprint(&etcd).await;
                let kernel = dump.join().map_err(|_| {
                    ConvergeError::Runtime(io::Error::other("the XFRM dump panicked"))
                })??;
                let (fingerprint, revision) = fingerprint.map_err(IpsecStoreError::from)?;
                let mut record = last.clone();
                if let Some(report) = kernel.and_then(|kernel| {
                    still_converged(last, fingerprint, revision, &kernel, started)
                }) {
                    // Requests queued behind this one may take its answer.
                    if checking.is_some() {
                        record.checked = checking;
                        if let Err(e) = record.save(&cfg.state_dir) {
                            tracing::warn!(error = %e, "cannot refresh the convergence record");
                        }
                    }
                    return Ok(report);
                }
            }
            let snap = snapshot::read(&etcd).await?;
            converge_with(cfg, &etcd, snap, None, node, started).await
        })
    });
    if result.is_err() {
        if let Err(e) = Converged::invalidate(&cfg.state_dir) {
            tracing::warn!(error = %e, "cannot remove the convergence record");
        }
    }
    result
}

/// Converges from a snapshot with a connected client; the caller holds the
/// node lock.
///
/// `acks` are the peers' status records (the agent watches them; an ADD
/// reads none): they let a hand-over to a new incarnation complete. Both
/// write the nftables catch-all (below `encrypt` before the plan, from
/// `encrypt` on after it); the agent also reasserts it every 30 s, an ADD
/// writes it only when it changed or this boot has not written it.
pub async fn converge_with(
    cfg: &PluginConfig,
    etcd: &Etcd,
    snap: Snapshot,
    acks: Option<&PeerAcks>,
    node: String,
    started: Instant,
) -> Result<Report, ConvergeError> {
    // Whatever happens next, the last record no longer vouches for the kernel.
    Converged::invalidate(&cfg.state_dir)
        .map_err(state_err("removing", &Converged::path(&cfg.state_dir)))?;
    let read_millis = ms(started);
    let t_identity = Instant::now();
    let (phase, icv_bits) = phase_of(&snap);
    let store = IpsecStore::new(etcd);
    let mut xfrm = Xfrm::open()?;
    let held = xfrm.held()?;
    let mtu = mtu_params(&snap, &node);
    // A config record that is missing or unparsable never turns encryption
    // off: a node that has seen the cluster initialised, or holds IPsec
    // state, refuses (an agent with state keeps it and reports itself
    // stale); only a node that has never seen it reads "no record" as off.
    let config_gone = cluster::config_gone(&snap, &cfg.state_dir, !held.is_empty());
    if let Some(why) = config_gone {
        if held.is_empty() || acks.is_none() {
            return Err(cluster::config_refused(why));
        }
        return Ok(kept(node, &snap, &held, why, started, mtu));
    }
    let mut snap = snap;
    cluster::with_device_ports(&mut snap.topology, &node, cluster::device_vxlan_ports());
    let guard = Guard::of(phase, &snap.topology);

    // Off: remove whatever is ours; no identity needed.
    let mut mine: Option<(Identity, i64)> = None;
    let mut ledger = Ledger::default();
    let mut new_incarnation = false;
    let boot = if phase == Phase::Off {
        String::new()
    } else {
        boot_id()?
    };
    // The guard's record names the boot that wrote it, in every phase.
    let this_boot = if phase == Phase::Off {
        crate::clock::read_boot_id().unwrap_or_default()
    } else {
        boot.clone()
    };
    // The record may vouch for this convergence only when etcd was not
    // written and everything came from the snapshot (its fingerprint).
    let mut from_snapshot = true;
    if phase != Phase::Off {
        let known = snap
            .identities
            .get(&node)
            .filter(|i| i.id > 0)
            .zip(snap.identity_revisions.get(&node));
        let loaded = Ledger::load(&cfg.state_dir);
        // A snapshot older than our own last publication (the agent's cache
        // may lag its write) is no reason for yet another incarnation.
        let behind = |i: &Identity| {
            loaded
                .as_ref()
                .is_some_and(|l| l.boot_id == boot && l.incarnation > i.incarnation)
        };
        let (ident, rev) = match known.filter(|(i, _)| !behind(i)) {
            Some((i, rev)) => (i.clone(), *rev),
            None => {
                from_snapshot = false;
                store.identity(&node).await?
            }
        };
        let stale = needs_new_incarnation(&ident, loaded.as_ref(), &boot);
        let floor = loaded.as_ref().map_or(0, |l| l.incarnation);
        match loaded.filter(|_| !stale) {
            Some(l) => {
                ledger = l;
                mine = Some((ident, rev));
            }
            None => {
                let fresh = bump(&store, &node, (ident, rev), floor, &boot, &cfg.state_dir).await?;
                ledger = fresh.1;
                mine = Some(fresh.0);
                new_incarnation = true;
            }
        }
    }

    // Key agreement: this node's pairs (made and published when missing)
    // and the peers' keys that verify.
    // Keys are published in every phase, off included, so that every
    // node's key is in etcd long before enable needs it.
    let agreed = {
        let kek = snap
            .epochs
            .iter()
            .any(|e| e.agreement.is_some())
            .then(|| Kek::load(&cfg.kek_file))
            .transpose()?;
        agreement::prepare(cfg, &store, &snap, &node, kek.as_ref()).await?
    };
    if agreed.wrote {
        from_snapshot = false;
    }
    let ready = agreed.readiness(&node);

    let mut identity_millis = ms(t_identity);
    let (desired, plan, handover, ids_now) = loop {
        let computed = Desired::compute(&Inputs {
            topology: &snap.topology,
            me: &node,
            my_identity: mine.as_ref().map(|(i, _)| i),
            identities: &snap.identities,
            phase,
            epochs: &snap.epochs,
            icv_bits,
            agreement: &ready,
        });
        let mut desired = match computed {
            Ok(d) => d,
            // What etcd says cannot be followed: keep what protects the
            // node now rather than tear it down.
            Err(e) if !held.is_empty() => {
                return Ok(kept(node, &snap, &held, e.to_string(), started, mtu));
            }
            Err(e) => return Err(e.into()),
        };
        // The identities as the peers will see them, ours included (the
        // snapshot may predate our own publication).
        let mut ids_now = snap.identities.clone();
        if let Some((m, _)) = &mine {
            ids_now.insert(node.clone(), m.clone());
        }
        // An ADD reads the peers' statuses only when a hand-over may apply.
        let mut acks = match acks {
            Some(a) => Some(a.clone()),
            None if crate::xfrm::handover::possible(&desired, &held) => {
                let live = store.statuses().await?;
                Some(PeerAcks::from_statuses(
                    live.iter().map(|(n, s)| (n.as_str(), s)),
                ))
            }
            None => None,
        };
        if let Some(a) = acks.as_mut() {
            a.current = crate::datastore::ipsec::identities_digest(&ids_now);
        }
        let handover = hand_over(&mut desired, &held, &ids_now, acks.as_ref());
        let plan = Plan::diff(&desired, &held);
        let lost = plan.created_outbound().any(|s| {
            ledger
                .sent
                .contains(&Ledger::entry(s.epoch, &s.receiver, s.lane))
        });
        match (&mine, lost && !new_incarnation) {
            (Some((ident, rev)), true) => {
                tracing::warn!(
                    node = %node,
                    incarnation = ident.incarnation,
                    "an outbound SA created earlier is missing or altered; publishing a new incarnation so that no key is used twice"
                );
                let floor = ledger.incarnation;
                let current = (ident.clone(), *rev);
                let fresh = bump(&store, &node, current, floor, &boot, &cfg.state_dir).await?;
                ledger = fresh.1;
                mine = Some(fresh.0);
                new_incarnation = true;
                identity_millis = ms(t_identity);
            }
            _ => break (desired, plan, handover, ids_now),
        }
    };

    let mut applied = Applied::default();
    let t_apply = Instant::now();
    if !plan.is_empty() {
        tracing::info!(node = %node, phase = ?phase, plan = %plan.summary(), "converging XFRM");
        // Write-ahead: the ledger lists every outbound SA before it exists.
        let before = ledger.sent.len();
        ledger.sent.retain(|e| {
            e.split('/')
                .next()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some_and(|n| desired.installed_epochs.contains(&n))
        });
        let pruned = before != ledger.sent.len();
        let mut grew = false;
        for s in plan.created_outbound() {
            grew |= ledger
                .sent
                .insert(Ledger::entry(s.epoch, &s.receiver, s.lane));
        }
        if grew || pruned {
            ledger.save(&cfg.state_dir)?;
        }
        // Below `encrypt` the catch-all goes before the policies it
        // guarded (a hitless disable).
        if guard.is_empty() {
            cluster::sync_guard(&guard, phase, &cfg.state_dir, &this_boot, true)?;
        }
        applied = match apply_with_keys(cfg, &snap, &agreed, &mut xfrm, &plan, &held) {
            Ok(a) => a,
            Err(e) => {
                // What did go in is still carved out of the catch-all, and
                // what did not stays blocked: the guard is written anyway.
                if let Err(g) = cluster::sync_guard(&guard, phase, &cfg.state_dir, &this_boot, true)
                {
                    tracing::error!(error = %g, "the nftables catch-all could not be written either");
                }
                return Err(e);
            }
        };
    }
    agreement::forget_deleted(cfg, &snap, &agreed)?;
    // From `encrypt` on, the catch-all comes after the policies that carve
    // the protected paths out of it. The agent reasserts it; an ADD writes
    // it only when it changed (or this boot has not written it yet).
    cluster::sync_guard(&guard, phase, &cfg.state_dir, &this_boot, acks.is_some())?;
    cluster::Seen::note(
        &cfg.state_dir,
        phase,
        snap.topology.cluster_guid.as_deref(),
        snap.config.as_ref().map_or(0, |c| c.phase_generation),
    )?;
    let (id, incarnation) = mine
        .as_ref()
        .map_or((None, 0), |(i, _)| (Some(i.id), i.incarnation));
    if !handover.is_done() {
        tracing::info!(
            waiting_for = ?handover.waiting_for,
            kept_inbound = handover.kept_inbound,
            "handing over between incarnations: older SAs carry the traffic until the peers hold the new ones"
        );
    }
    if from_snapshot && !new_incarnation && handover.is_done() && applied.refused.is_empty() {
        let record = Converged {
            version: record::VERSION,
            node: node.clone(),
            phase,
            boot_id: boot.clone(),
            id,
            incarnation,
            ledger: if phase == Phase::Off {
                String::new()
            } else {
                record::file_digest(&Ledger::path(&cfg.state_dir))
            },
            states: desired.states.len(),
            policies: desired.policies.len(),
            revision: snap.revision,
            fingerprint: snap.fingerprint.clone(),
            digest: record::desired_digest(&desired),
            mtu: mtu.clone(),
            checked: snap.read_at.clone(),
        };
        if let Err(e) = record.save(&cfg.state_dir) {
            tracing::warn!(error = %e, "cannot write the convergence record; the next ADD reads etcd in full");
        }
    }
    // States are inbound or outbound, never forward.
    let (states_in, states_out, _) = by_dir(desired.states.values().map(|s| s.dir));
    let report = Report {
        node,
        phase,
        id,
        incarnation,
        new_incarnation,
        states: desired.states.len(),
        policies: desired.policies.len(),
        writes: applied.states_added
            + applied.states_deleted
            + applied.policies_added
            + applied.policies_updated
            + applied.policies_deleted,
        revision: snap.revision,
        millis: ms(started),
        read_millis,
        identity_millis,
        apply_millis: ms(t_apply),
        installed_epochs: desired.installed_epochs.clone(),
        active_epoch: desired.active_epoch,
        phase_generation: snap.config.as_ref().map_or(0, |c| c.phase_generation),
        states_by_dir: (states_in, states_out),
        policies_by_dir: by_dir(desired.policies.values().map(|p| p.dir)),
        changes: plan.describe(8),
        identities_digest: crate::datastore::ipsec::identities_digest(&ids_now),
        lost_epochs: agreed.lost.iter().copied().collect(),
        unchanged: false,
        coalesced: false,
        unprotected: desired
            .unprotected
            .iter()
            .cloned()
            .chain(
                applied
                    .refused
                    .iter()
                    .map(|(dst, why)| crate::xfrm::desired::Unprotected {
                        peer: owner_of(&snap.topology, dst),
                        blocks: vec![*dst],
                        reason: format!("{why}: blocked by the catch-all"),
                    }),
            )
            .collect(),
        mtu,
        stale: None,
        guard: None,
        refused: applied.refused.iter().map(|(_, why)| why.clone()).collect(),
        waiting_for: handover.waiting_for.into_iter().collect(),
        kept_inbound: handover.kept_inbound,
    };
    if phase >= Phase::Encrypt {
        for u in &report.unprotected {
            tracing::warn!(peer = %u.peer.escape_debug(), blocks = ?u.blocks, reason = %u.reason, "a path cannot be protected: its traffic is blocked");
        }
    }
    tracing::debug!(?report, "converged");
    Ok(report)
}

/// The node a refused policy's destination belongs to (its address or one
/// of its blocks), for the report; the destination itself when none.
fn owner_of(t: &crate::datastore::calico::Topology, dst: &ipnet::IpNet) -> String {
    t.nodes
        .values()
        .find(|n| {
            [n.ipv4, n.ipv6]
                .into_iter()
                .flatten()
                .any(|u| *dst == ipnet::IpNet::from(u.addr))
                || n.blocks.contains(dst)
        })
        .map_or_else(|| dst.to_string(), |n| n.name.clone())
}

/// Counts by direction: (inbound, outbound, forward).
fn by_dir(dirs: impl Iterator<Item = Dir>) -> (usize, usize, usize) {
    dirs.fold((0, 0, 0), |(i, o, f), d| match d {
        Dir::In => (i + 1, o, f),
        Dir::Out => (i, o + 1, f),
        Dir::Fwd => (i, o, f + 1),
    })
}
