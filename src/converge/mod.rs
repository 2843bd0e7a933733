//! Converging this node's XFRM state: the one writer of the data plane.
//!
//! [`converge`] (the ADD) opens this node's state, which takes the
//! node-wide lock (kubelet runs ADDs concurrently, and the agent converges
//! too), answers from the last convergence's record when neither etcd nor
//! the kernel changed since ([`record`]), and otherwise reads a snapshot
//! and runs [`converge_with`], as the agent does. A convergence reads top
//! to bottom:
//!
//! 1. *read* ([`facts`]): the kernel, and whether the config record can be
//!    followed;
//! 2. *identity* ([`identity`]): this node's incarnation, a new one when a
//!    key could otherwise be used twice;
//! 3. *keys* ([`epochs`], [`agreement`]): every epoch opened with the
//!    parameters it carries (an altered one is refused), this node's key
//!    pairs and the peers' verified public keys;
//! 4. *decide* ([`decide`]): the desired state, the hand-over between
//!    incarnations, and the plan;
//! 5. *apply* ([`apply`]): the ledger ahead, the catch-all in its place,
//!    the plan with keys derived just in time;
//! 6. *record* ([`finish`]): the catch-all after the policies, the keys of
//!    deleted epochs destroyed, the convergence record, the report.
//!
//! When nothing differs, no netlink write happens. The order in which
//! node state is written, and why a crash anywhere is safe, is
//! [`crate::state`]'s module doc.

use std::time::Instant;

use crate::clock::Stamp;
use crate::config::PluginConfig;
use crate::datastore::etcd::{Etcd, EtcdSettings};
use crate::datastore::ipsec::{IpsecStore, IpsecStoreError};
use crate::datastore::snapshot::{self, Snapshot};
use crate::state::NodeState;
use crate::xfrm::handover::PeerAcks;

mod agreement;
mod apply;
pub mod cluster;
mod decide;
mod epochs;
mod error;
mod facts;
mod finish;
pub mod guard;
mod identity;
mod observe;
pub mod record;
mod report;

pub use error::{boot_id, ConvergeError, DEFAULT_ICV_BITS};
pub use facts::mtu_params;
pub use identity::needs_new_incarnation;
pub use observe::{observe, observe_snapshot, Observed};
pub use report::Report;

/// What the ADD and the agent log when a convergence put back what changed
/// in the kernel outside calico-ipsec (tests/e2e grep for it).
pub const DRIFT_REPAIRED: &str = "the kernel's XFRM state drifted outside calico-ipsec; put back";

/// How long an ADD (or the agent) waits for the node lock before giving up
/// with "try again later": a holder does one convergence, each etcd request
/// bounded by `etcd_timeout_ms`, so a longer wait means a stuck holder, and
/// the runtime's retry is better than a pod creation that never returns.
pub const NODE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(25);

/// The plugin's etcd settings. The member that answered last is remembered
/// in `<state_dir>/node/etcd-member`, shared by the ADDs and the agent.
pub fn settings(cfg: &PluginConfig) -> EtcdSettings {
    EtcdSettings::from_config(&cfg.etcd, cfg.etcd_timeout)
        .with_hint_file(cfg.state_dir.join("node").join("etcd-member"))
}

/// A wait for the node lock this long is logged (the agent or another ADD
/// held it for a whole convergence).
const LOCK_WAIT_NOTED_MS: u64 = 100;

/// Opens this node's state (taking the node lock) for one convergence.
pub fn open_state(cfg: &PluginConfig) -> Result<NodeState, ConvergeError> {
    Ok(NodeState::open(
        &cfg.state_dir,
        &cfg.agreement_dir,
        NODE_LOCK_WAIT,
    )?)
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
    let mut state = open_state(cfg)?;
    let waited = error::ms(started);
    if waited >= LOCK_WAIT_NOTED_MS {
        tracing::info!(
            waited_ms = waited,
            "waited for the node lock (another ADD or the agent held it)"
        );
    }
    // After a reboot, the catch-all is back before etcd is asked.
    guard::restore(&mut state, false);
    // ADDs that queued on the lock are answered by the read of whichever
    // holder began after they asked (group commit).
    if let Some(report) = record::coalesced(&state, &node, asked.as_ref(), started)? {
        return Ok(report);
    }
    let result = error::runtime()?.block_on(async {
        let etcd = Etcd::connect(&settings(cfg))
            .await
            .map_err(IpsecStoreError::from)?;
        if let Some(report) = record::unchanged(&etcd, &mut state, &node, started).await? {
            return Ok(report);
        }
        let snap = snapshot::read(&etcd).await?;
        converge_with(cfg, &mut state, &etcd, snap, None, false, node, started).await
    });
    match &result {
        Err(_) => {
            if let Err(e) = state.invalidate() {
                tracing::warn!(error = %e, "cannot remove the convergence record");
            }
        }
        // The agent logs and counts its own repairs; an ADD that got there
        // first says so in its log.
        Ok(r) if r.kernel_drift == Some(true) && r.writes > 0 => tracing::warn!(
            repaired = %r.changes.join("; "),
            writes = r.writes,
            "{DRIFT_REPAIRED}"
        ),
        Ok(_) => {}
    }
    result
}

/// Converges from a snapshot with a connected client and this node's state
/// open (so the node lock held).
///
/// `acks` are the peers' acknowledgements (the agent has them from the
/// leader's aggregate; without them, the statuses are read when a hand-over
/// may apply): they let a hand-over to a new incarnation complete.
/// `by_agent`: the agent reasserts the catch-all every 30 s (an ADD writes
/// it only when it changed or this boot has not written it).
#[allow(clippy::too_many_arguments)]
pub async fn converge_with(
    cfg: &PluginConfig,
    state: &mut NodeState,
    etcd: &Etcd,
    snap: Snapshot,
    acks: Option<&PeerAcks>,
    by_agent: bool,
    node: String,
    started: Instant,
) -> Result<Report, ConvergeError> {
    // Whatever happens next, the last record no longer vouches for the kernel.
    state.invalidate()?;
    let read_millis = error::ms(started);
    let mut facts = match facts::read(state, snap, by_agent, &node, started)? {
        facts::Read::Follow(f) => f,
        facts::Read::Kept(report) => return Ok(*report),
    };
    let kernel_drift = apply::drift(state, &facts);
    let t_identity = Instant::now();
    let store = IpsecStore::new(etcd);
    let mut mine = identity::settle(&store, state, &facts, &node, by_agent).await?;
    // Keys are published in every phase, off included, so that every
    // node's key is in etcd long before enable needs it.
    let opened = epochs::open(cfg, &mut facts)?;
    let refused_epochs = opened.refused;
    let mut secrets = opened.secrets;
    // Keys, then the plan; once more after a new incarnation (a key of the
    // current one would be used twice), whose keys differ.
    let (agreed, decided) = loop {
        let my_inc = mine.ident.as_ref().map(|(i, _)| i.incarnation);
        let agreed = agreement::prepare(state, &store, &facts.snap, &node, my_inc, secrets).await?;
        mine.from_snapshot &= !agreed.wrote;
        let renewable = !mine.new_incarnation && mine.ident.is_some();
        if let Some(why) = agreed.renew.filter(|_| renewable) {
            identity::renew(&store, &node, &facts.boot, &mut mine, why).await?;
            secrets = agreed.secrets;
            continue;
        }
        match decide::decide(&store, &facts, &mine, &agreed, acks, &node).await? {
            decide::Decision::Decided(d) => break (agreed, *d),
            decide::Decision::Renew(why) => {
                identity::renew(&store, &node, &facts.boot, &mut mine, why).await?;
                secrets = agreed.secrets;
            }
            // What etcd says cannot be followed: keep what protects the
            // node now rather than tear it down.
            decide::Decision::Refused(e) if !facts.held.is_empty() => {
                let why = e.to_string();
                return Ok(report::kept(
                    node,
                    &facts.snap,
                    &facts.held,
                    why,
                    started,
                    facts.mtu,
                ));
            }
            decide::Decision::Refused(e) => return Err(e.into()),
        }
    };
    let timings = finish::Timings {
        started,
        read_millis,
        identity_millis: error::ms(t_identity),
        apply: Instant::now(),
    };
    let applied = apply::apply(state, &mut facts, &mut mine, &decided, &agreed)?;
    let done = finish::Done {
        facts: &facts,
        mine: &mine,
        decided,
        applied,
        agreed: &agreed,
    };
    let mut report = finish::finish(state, done, by_agent, node, timings)?;
    report.refused_epochs = refused_epochs;
    report.kernel_drift = kernel_drift;
    Ok(report)
}
