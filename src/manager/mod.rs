//! The key manager: one leader at a time (an etcd lease), moving the cluster
//! through phases and key epochs only as fast as every live node follows.
//!
//! Each tick the leader reads the config, the epochs and the nodes' leased
//! status records, and [`decide`]s at most one step:
//! - **Phase**: off → accept → encrypt → enforce toward the target, and back;
//!   one step, only once every live node has acknowledged the current phase
//!   and its generation.
//! - **Activate** the lowest pending epoch once every live node has
//!   installed it.
//! - **Retire** older active epochs once every live node sends with the
//!   newest and the overlap has passed since it became active.
//! - **Delete** a retired epoch once no live node holds it.
//! - **Rotate**: add a pending epoch when the newest is older than the
//!   rotation interval.
//!
//! With the phase off no node holds SAs, so epochs move without waiting.
//! Every write is a transaction that also compares the leader record with
//! this manager's id (fencing): a deposed leader cannot write, so two
//! managers are safe.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::datastore::etcd::{Etcd, EtcdSettings};
use crate::datastore::ipsec::{
    config_key, encode, epoch_key, identities_digest, leader_key, now_rfc3339, now_unix,
    parse_rfc3339, ClusterConfig, EpochRecord, EpochState, IpsecStore, IpsecStoreError, NodeStatus,
    Phase,
};
use crate::keys::Kek;
use crate::metrics::Exposition;

/// What the leader sees in one tick.
#[derive(Debug, Clone)]
pub struct View {
    /// The config and its revision.
    pub config: (ClusterConfig, i64),
    /// Every epoch record and its revision, in epoch order.
    pub epochs: Vec<(EpochRecord, i64)>,
    /// Every live node's status (their leases alive).
    pub live: Vec<(String, NodeStatus)>,
    /// [`crate::datastore::ipsec::identities_digest`] of the identity records now.
    pub identities: String,
    /// Unix seconds now.
    pub now: u64,
}

/// The one step a tick takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Move the phase one step.
    SetPhase {
        /// From.
        from: Phase,
        /// To.
        to: Phase,
    },
    /// Make a pending epoch active.
    Activate(u32),
    /// Retire these active epochs (older than the newest).
    Retire(Vec<u32>),
    /// Delete a retired epoch's record.
    Delete(u32),
    /// Add a pending epoch (scheduled rotation).
    Rotate,
    /// Nothing to do; why the cluster is where it is.
    Wait(String),
}

/// The phase one step from `from` toward `to`.
pub fn step(from: Phase, to: Phase) -> Phase {
    use Phase::*;
    let order = [Off, Accept, Encrypt, Enforce];
    let i = order.iter().position(|p| *p == from).unwrap_or(0);
    let j = order.iter().position(|p| *p == to).unwrap_or(0);
    match i.cmp(&j) {
        std::cmp::Ordering::Less => order[i + 1],
        std::cmp::Ordering::Greater => order[i - 1],
        std::cmp::Ordering::Equal => from,
    }
}

fn names(v: &[&(String, NodeStatus)]) -> String {
    let mut n: Vec<&str> = v.iter().map(|(n, _)| n.as_str()).collect();
    n.truncate(5);
    n.join(", ")
}

/// Decides the next step (a pure function of the view).
pub fn decide(v: &View) -> Action {
    let (cfg, _) = &v.config;
    if v.live.is_empty() {
        return Action::Wait(
            "no node agent is alive (no status record under /calico/ipsec/v1/nodes/)".into(),
        );
    }
    // Out of phase off, a node's acknowledgement counts only once it has
    // converged with every node's current incarnation (the same identity
    // digest as ours): then it holds the SAs of every peer.
    let current = |s: &NodeStatus| cfg.phase == Phase::Off || s.identities == v.identities;
    if cfg.phase != cfg.target_phase {
        let behind: Vec<&(String, NodeStatus)> = v
            .live
            .iter()
            .filter(|(_, s)| {
                s.acked_phase != cfg.phase
                    || s.acked_generation != cfg.phase_generation
                    || !current(s)
            })
            .collect();
        if behind.is_empty() {
            return Action::SetPhase {
                from: cfg.phase,
                to: step(cfg.phase, cfg.target_phase),
            };
        }
        return Action::Wait(format!(
            "phase {:?} → {:?}: waiting for {} node(s) to acknowledge {:?}: {}",
            cfg.phase,
            cfg.target_phase,
            behind.len(),
            cfg.phase,
            names(&behind)
        ));
    }
    // With the phase off no node holds SAs: epochs need no acknowledgement.
    let acks = cfg.phase != Phase::Off;
    let of = |s: EpochState| {
        v.epochs
            .iter()
            .filter(move |(e, _)| e.state == s)
            .map(|(e, _)| e)
    };
    let newest_active = of(EpochState::Active).map(|e| e.epoch).max();
    if let Some(p) = of(EpochState::Pending).map(|e| e.epoch).min() {
        if newest_active.is_some_and(|a| p < a) {
            // A pending epoch older than the active one can never be used.
            return Action::Retire(vec![p]);
        }
        let missing: Vec<_> = v
            .live
            .iter()
            .filter(|(_, s)| !s.installed_epochs.contains(&p) || !current(s))
            .collect();
        if !acks || missing.is_empty() {
            return Action::Activate(p);
        }
        return Action::Wait(format!(
            "epoch {p} pending: not yet installed on {} node(s): {}",
            missing.len(),
            names(&missing)
        ));
    }
    if let Some(newest) = newest_active {
        let older: Vec<u32> = of(EpochState::Active)
            .map(|e| e.epoch)
            .filter(|e| *e < newest)
            .collect();
        if !older.is_empty() {
            let rec = of(EpochState::Active).find(|e| e.epoch == newest);
            let since = rec
                .and_then(|e| e.activated.as_deref().or(Some(e.created.as_str())))
                .and_then(parse_rfc3339)
                .unwrap_or(0);
            let lagging: Vec<_> = v
                .live
                .iter()
                .filter(|(_, s)| s.active_epoch != Some(newest))
                .collect();
            if !acks {
                return Action::Retire(older);
            }
            if !lagging.is_empty() {
                return Action::Wait(format!(
                    "epoch {newest} active: {} node(s) do not send with it yet: {}",
                    lagging.len(),
                    names(&lagging)
                ));
            }
            let due = since.saturating_add(cfg.overlap_seconds);
            if v.now >= due {
                return Action::Retire(older);
            }
            return Action::Wait(format!(
                "epoch {newest} active: older epochs {older:?} retire in {}s (overlap)",
                due - v.now
            ));
        }
    }
    for (e, _) in v
        .epochs
        .iter()
        .filter(|(e, _)| e.state == EpochState::Retired)
    {
        let holding: Vec<_> = v
            .live
            .iter()
            .filter(|(_, s)| s.installed_epochs.contains(&e.epoch))
            .collect();
        if !acks || holding.is_empty() {
            return Action::Delete(e.epoch);
        }
    }
    if let Some(newest) = newest_active {
        if cfg.rotation_interval_seconds > 0 {
            let rec = of(EpochState::Active).find(|e| e.epoch == newest);
            let born = rec.and_then(|e| parse_rfc3339(&e.created)).unwrap_or(v.now);
            if v.now >= born.saturating_add(cfg.rotation_interval_seconds) {
                return Action::Rotate;
            }
        }
    }
    Action::Wait(format!(
        "steady: phase {:?}, epoch {:?}",
        cfg.phase, newest_active
    ))
}

/// How the manager runs.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// etcd access.
    pub etcd: EtcdSettings,
    /// The KEK, to seal new epochs.
    pub kek_file: PathBuf,
    /// This manager's name in the leader record.
    pub id: String,
    /// TTL of the leadership lease, in seconds.
    pub lease_ttl: i64,
    /// Time between ticks.
    pub interval: Duration,
    /// Where to serve `/metrics` and `/healthz`.
    pub listen: Option<SocketAddr>,
}

/// Why the manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The metrics address could not be bound, or the runtime failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Default)]
struct Stats {
    leader: bool,
    phase: Option<Phase>,
    target: Option<Phase>,
    live: usize,
    epochs: Vec<(u32, EpochState)>,
    phase_changes: u64,
    activations: u64,
    failures: u64,
    etcd_reachable: bool,
    waiting: String,
}

/// Runs the manager until SIGTERM or SIGINT.
pub fn run(opts: ManagerOptions) -> Result<(), ManagerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let stats = Arc::new(Mutex::new(Stats::default()));
        if let Some(addr) = opts.listen {
            let listener = crate::metrics::bind(addr).await?;
            let st = Arc::clone(&stats);
            let handler = Arc::new(move |path: &str| match path {
                "/healthz" => (200, "ok\n".to_string()),
                "/metrics" => (200, render(&lock(&st))),
                _ => (404, "not found: try /metrics or /healthz\n".to_string()),
            });
            tokio::spawn(crate::metrics::serve(listener, handler));
        }
        let term = crate::agent::shutdown_signal();
        let lease = Arc::new(Mutex::new(None::<(Etcd, i64)>));
        tokio::select! {
            () = term => {}
            () = lead(&opts, &stats, &lease) => {}
        }
        // Hand leadership over at once rather than after the TTL.
        let held = lock(&lease).take();
        if let Some((etcd, l)) = held {
            let _ = etcd.revoke_lease(l).await;
        }
        tracing::info!(id = %opts.id, "manager stopping");
        Ok(())
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Campaigns, and while leader, ticks.
async fn lead(
    opts: &ManagerOptions,
    stats: &Mutex<Stats>,
    lease_slot: &Mutex<Option<(Etcd, i64)>>,
) {
    let mut last_wait = String::new();
    loop {
        let etcd = match Etcd::connect(&opts.etcd).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "etcd unreachable; retrying");
                lock(stats).etcd_reachable = false;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let lease = match etcd.grant_lease(opts.lease_ttl).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot get a lease; retrying");
                lock(stats).etcd_reachable = false;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        *lock(lease_slot) = Some((etcd.clone(), lease));
        let fence = [Compare::value(
            leader_key(),
            CompareOp::Equal,
            opts.id.as_bytes(),
        )];
        let mut last_keepalive = std::time::Instant::now();
        let keepalive_every =
            Duration::from_secs(u64::try_from(opts.lease_ttl / 3).unwrap_or(1).max(1));
        loop {
            tokio::time::sleep(opts.interval).await;
            if last_keepalive.elapsed() >= keepalive_every {
                match etcd.keep_alive_once(lease).await {
                    Ok(ttl) if ttl > 0 => last_keepalive = std::time::Instant::now(),
                    Ok(_) => {
                        tracing::warn!("the manager's lease expired; campaigning again");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lease keep-alive failed");
                        lock(stats).etcd_reachable = false;
                        continue;
                    }
                }
            }
            // Campaign: become leader if nobody is.
            let won = etcd
                .txn(
                    "campaign",
                    Txn::new()
                        .when([Compare::version(leader_key(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            leader_key(),
                            opts.id.as_bytes().to_vec(),
                            Some(etcd_client::PutOptions::new().with_lease(lease)),
                        )]),
                )
                .await;
            let leader = match won {
                Ok(true) => {
                    tracing::info!(id = %opts.id, "became the leader");
                    true
                }
                Ok(false) => match etcd.get(&leader_key()).await {
                    Ok(Some(kv)) => kv.value == opts.id.as_bytes(),
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the leader record failed");
                        lock(stats).etcd_reachable = false;
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed");
                    lock(stats).etcd_reachable = false;
                    continue;
                }
            };
            {
                let mut s = lock(stats);
                s.etcd_reachable = true;
                if s.leader && !leader {
                    tracing::warn!(id = %opts.id, "no longer the leader");
                }
                s.leader = leader;
            }
            if !leader {
                continue;
            }
            match tick(&etcd, opts, &fence, stats).await {
                Ok(Action::Wait(why)) => {
                    if why != last_wait {
                        tracing::info!(%why, "waiting");
                        last_wait = why.clone();
                    }
                    lock(stats).waiting = why;
                }
                Ok(_) => last_wait.clear(),
                Err(e) => {
                    tracing::warn!(error = %e, "manager step failed; retrying");
                    let mut s = lock(stats);
                    s.failures += 1;
                    if matches!(&e, IpsecStoreError::Etcd(err) if err.is_unavailable()) {
                        s.etcd_reachable = false;
                    }
                }
            }
        }
    }
}

async fn read_view(etcd: &Etcd) -> Result<Option<View>, IpsecStoreError> {
    let store = IpsecStore::new(etcd);
    let Some(config) = store.config_rev().await? else {
        return Ok(None);
    };
    let epochs = store.epochs_rev().await?;
    let live = store.statuses().await?;
    let identities = identities_digest(&store.identities().await?);
    Ok(Some(View {
        config,
        epochs,
        live,
        identities,
        now: now_unix(),
    }))
}

/// One step of the leader: read, decide, write under the fence.
async fn tick(
    etcd: &Etcd,
    opts: &ManagerOptions,
    fence: &[Compare],
    stats: &Mutex<Stats>,
) -> Result<Action, IpsecStoreError> {
    let Some(view) = read_view(etcd).await? else {
        return Ok(Action::Wait(
            "no /calico/ipsec/v1/config: run `calico-ipsec keys init`".into(),
        ));
    };
    {
        let mut s = lock(stats);
        s.phase = Some(view.config.0.phase);
        s.target = Some(view.config.0.target_phase);
        s.live = view.live.len();
        s.epochs = view
            .epochs
            .iter()
            .map(|(e, _)| (e.epoch, e.state))
            .collect();
    }
    let action = decide(&view);
    let fenced = |extra: Compare, ops: Vec<TxnOp>| {
        let mut cmp = fence.to_vec();
        cmp.push(extra);
        Txn::new().when(cmp).and_then(ops)
    };
    let ok = match &action {
        Action::Wait(_) => return Ok(action),
        Action::SetPhase { from, to } => {
            let (mut cfg, rev) = view.config.clone();
            cfg.phase = *to;
            cfg.phase_generation += 1;
            let done = etcd
                .txn(
                    "set phase",
                    fenced(
                        Compare::mod_revision(config_key(), CompareOp::Equal, rev),
                        vec![TxnOp::put(config_key(), encode(&cfg), None)],
                    ),
                )
                .await?;
            if done {
                lock(stats).phase_changes += 1;
                tracing::info!(from = ?from, to = ?to, generation = cfg.phase_generation, target = ?cfg.target_phase, nodes = view.live.len(), "phase advanced: every live node acknowledged");
            }
            done
        }
        Action::Activate(n) | Action::Delete(n) => {
            let Some((rec, rev)) = view.epochs.iter().find(|(e, _)| e.epoch == *n) else {
                return Ok(action);
            };
            let key = epoch_key(*n);
            let op = if matches!(action, Action::Activate(_)) {
                let mut rec = rec.clone();
                rec.state = EpochState::Active;
                rec.activated = Some(now_rfc3339());
                TxnOp::put(key.as_str(), encode(&rec), None)
            } else {
                TxnOp::delete(key.as_str(), None)
            };
            let done = etcd
                .txn(
                    "epoch",
                    fenced(
                        Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev),
                        vec![op],
                    ),
                )
                .await?;
            if done {
                if matches!(action, Action::Activate(_)) {
                    lock(stats).activations += 1;
                    tracing::info!(
                        epoch = n,
                        nodes = view.live.len(),
                        "epoch activated: installed on every live node"
                    );
                } else {
                    tracing::info!(epoch = n, "retired epoch deleted: no live node holds it");
                }
            }
            done
        }
        Action::Retire(list) => {
            let mut cmp = fence.to_vec();
            let mut ops = Vec::new();
            for (rec, rev) in view.epochs.iter().filter(|(e, _)| list.contains(&e.epoch)) {
                let key = epoch_key(rec.epoch);
                cmp.push(Compare::mod_revision(key.as_str(), CompareOp::Equal, *rev));
                let mut rec = rec.clone();
                rec.state = EpochState::Retired;
                ops.push(TxnOp::put(key.as_str(), encode(&rec), None));
            }
            let done = etcd
                .txn("retire epochs", Txn::new().when(cmp).and_then(ops))
                .await?;
            if done {
                tracing::info!(epochs = ?list, "epochs retired: every live node sends with the newest and the overlap passed");
            }
            done
        }
        Action::Rotate => {
            let kek = match Kek::load(&opts.kek_file) {
                Ok(k) => k,
                Err(e) => {
                    tracing::error!(error = %e, "cannot rotate: the KEK file cannot be read");
                    return Ok(Action::Wait(format!(
                        "rotation due, but the KEK cannot be read: {e}"
                    )));
                }
            };
            let added = IpsecStore::new(etcd)
                .add_pending_epoch_if(&kek, fence)
                .await?;
            if let Some(rec) = &added {
                tracing::info!(epoch = rec.epoch, "rotation: added a pending epoch");
            }
            added.is_some()
        }
    };
    if !ok {
        tracing::debug!(
            ?action,
            "a step's transaction did not apply (lost leadership or raced); re-reading"
        );
    }
    Ok(action)
}

fn render(s: &Stats) -> String {
    let mut e = Exposition::default();
    e.gauge(
        "calico_ipsec_manager_leader",
        "1 while this manager is the leader",
        if s.leader { 1.0 } else { 0.0 },
    );
    e.gauge(
        "calico_ipsec_manager_etcd_reachable",
        "1 when etcd answered the last request",
        if s.etcd_reachable { 1.0 } else { 0.0 },
    );
    if let (Some(p), Some(t)) = (s.phase, s.target) {
        let p = format!("{p:?}").to_lowercase();
        let t = format!("{t:?}").to_lowercase();
        e.family(
            "calico_ipsec_manager_phase",
            "gauge",
            "The cluster's phase and target (1 for the current ones)",
        )
        .sample(
            "calico_ipsec_manager_phase",
            &[("phase", &p), ("kind", "current")],
            1.0,
        )
        .sample(
            "calico_ipsec_manager_phase",
            &[("phase", &t), ("kind", "target")],
            1.0,
        );
    }
    e.gauge(
        "calico_ipsec_manager_live_nodes",
        "Nodes whose agent holds a live status lease",
        s.live as f64,
    );
    e.family(
        "calico_ipsec_manager_epochs",
        "gauge",
        "Key epochs by state",
    );
    for st in [EpochState::Pending, EpochState::Active, EpochState::Retired] {
        let n = s.epochs.iter().filter(|(_, x)| *x == st).count();
        let name = format!("{st:?}").to_lowercase();
        e.sample("calico_ipsec_manager_epochs", &[("state", &name)], n as f64);
    }
    e.gauge(
        "calico_ipsec_manager_phase_changes_total",
        "Phase steps this manager made",
        s.phase_changes as f64,
    );
    e.gauge(
        "calico_ipsec_manager_activations_total",
        "Epochs this manager activated",
        s.activations as f64,
    );
    e.gauge(
        "calico_ipsec_manager_failures_total",
        "Steps that failed",
        s.failures as f64,
    );
    e.finish()
}

/// Waits until the config's phase equals its target (for `enable --wait`).
pub async fn wait_for_phase(
    etcd: &Etcd,
    timeout: Duration,
) -> Result<ClusterConfig, IpsecStoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let store = IpsecStore::new(etcd);
        let (cfg, _) = store
            .config_rev()
            .await?
            .ok_or_else(|| IpsecStoreError::NotInitialised(config_key()))?;
        if cfg.phase == cfg.target_phase || tokio::time::Instant::now() >= deadline {
            return Ok(cfg);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::ipsec;

    fn epoch(n: u32, state: EpochState, activated: Option<u64>) -> (EpochRecord, i64) {
        (
            EpochRecord {
                epoch: n,
                state,
                created: ipsec::rfc3339(1000),
                algorithm: ipsec::ALGORITHM.into(),
                kek_fingerprint: String::new(),
                sealed_secret: String::new(),
                activated: activated.map(ipsec::rfc3339),
            },
            1,
        )
    }

    fn node(phase: Phase, gen: u64, installed: &[u32], active: Option<u32>) -> NodeStatus {
        NodeStatus {
            id: 1,
            incarnation: 1,
            installed_epochs: installed.to_vec(),
            acked_phase: phase,
            acked_generation: gen,
            active_epoch: active,
            heartbeat: String::new(),
            stale: false,
            identities: "d".into(),
        }
    }

    fn view(
        phase: Phase,
        target: Phase,
        gen: u64,
        epochs: Vec<(EpochRecord, i64)>,
        live: Vec<NodeStatus>,
    ) -> View {
        View {
            config: (
                ClusterConfig {
                    phase,
                    target_phase: target,
                    phase_generation: gen,
                    rotation_interval_seconds: 0,
                    overlap_seconds: 10,
                    ..ClusterConfig::default()
                },
                1,
            ),
            epochs,
            live: live
                .into_iter()
                .enumerate()
                .map(|(i, s)| (format!("node-{}", i + 1), s))
                .collect(),
            identities: "d".into(),
            now: 2000,
        }
    }

    #[test]
    fn phases_step_one_at_a_time_in_both_directions() {
        use Phase::*;
        assert_eq!(step(Off, Enforce), Accept);
        assert_eq!(step(Accept, Enforce), Encrypt);
        assert_eq!(step(Encrypt, Enforce), Enforce);
        assert_eq!(step(Enforce, Off), Encrypt);
        assert_eq!(step(Accept, Off), Off);
        assert_eq!(step(Encrypt, Encrypt), Encrypt);
    }

    #[test]
    fn a_phase_advances_only_when_every_live_node_acknowledged_it() {
        let e = vec![epoch(1, EpochState::Active, Some(1000))];
        let lagging = view(
            Phase::Accept,
            Phase::Enforce,
            1,
            e.clone(),
            vec![
                node(Phase::Accept, 1, &[1], Some(1)),
                node(Phase::Off, 0, &[], None),
            ],
        );
        assert!(matches!(decide(&lagging), Action::Wait(w) if w.contains("node-2")));
        // The same phase acknowledged under an older generation is not an ack.
        let old_gen = view(
            Phase::Accept,
            Phase::Enforce,
            3,
            e.clone(),
            vec![node(Phase::Accept, 1, &[1], Some(1))],
        );
        assert!(matches!(decide(&old_gen), Action::Wait(_)));
        let all = view(
            Phase::Accept,
            Phase::Enforce,
            1,
            e,
            vec![
                node(Phase::Accept, 1, &[1], Some(1)),
                node(Phase::Accept, 1, &[1], Some(1)),
            ],
        );
        assert_eq!(
            decide(&all),
            Action::SetPhase {
                from: Phase::Accept,
                to: Phase::Encrypt
            }
        );
    }

    #[test]
    fn an_acknowledgement_made_before_a_peer_incarnation_does_not_count() {
        let e = vec![epoch(1, EpochState::Active, Some(1000))];
        let mut v = view(
            Phase::Accept,
            Phase::Enforce,
            1,
            e,
            vec![node(Phase::Accept, 1, &[1], Some(1)); 2],
        );
        v.live[1].1.identities = "older".into();
        assert!(matches!(decide(&v), Action::Wait(w) if w.contains("node-2")));
    }

    #[test]
    fn no_live_node_means_no_step() {
        let v = view(
            Phase::Off,
            Phase::Enforce,
            0,
            vec![epoch(1, EpochState::Active, None)],
            vec![],
        );
        assert!(matches!(decide(&v), Action::Wait(_)));
    }

    #[test]
    fn rotation_activates_when_installed_everywhere_then_retires_after_overlap_then_deletes() {
        let e = |s2: EpochState, act2: Option<u64>| {
            vec![epoch(1, EpochState::Active, Some(1000)), epoch(2, s2, act2)]
        };
        let p = Phase::Enforce;
        // Pending, one node lacks it.
        let v = view(
            p,
            p,
            3,
            e(EpochState::Pending, None),
            vec![node(p, 3, &[1, 2], Some(1)), node(p, 3, &[1], Some(1))],
        );
        assert!(matches!(decide(&v), Action::Wait(w) if w.contains("epoch 2 pending")));
        // Installed everywhere: activate.
        let v = view(
            p,
            p,
            3,
            e(EpochState::Pending, None),
            vec![node(p, 3, &[1, 2], Some(1)); 2],
        );
        assert_eq!(decide(&v), Action::Activate(2));
        // Active, one node still sends with 1: wait.
        let v = view(
            p,
            p,
            3,
            e(EpochState::Active, Some(1995)),
            vec![node(p, 3, &[1, 2], Some(2)), node(p, 3, &[1, 2], Some(1))],
        );
        assert!(matches!(decide(&v), Action::Wait(w) if w.contains("do not send")));
        // Everyone sends with 2, overlap (10 s) not over: wait.
        let v = view(
            p,
            p,
            3,
            e(EpochState::Active, Some(1995)),
            vec![node(p, 3, &[1, 2], Some(2)); 2],
        );
        assert!(matches!(decide(&v), Action::Wait(w) if w.contains("overlap")));
        // Overlap over: retire 1.
        let v = view(
            p,
            p,
            3,
            e(EpochState::Active, Some(1990)),
            vec![node(p, 3, &[1, 2], Some(2)); 2],
        );
        assert_eq!(decide(&v), Action::Retire(vec![1]));
        // Retired but still installed somewhere: wait; then delete.
        let retired = vec![
            epoch(1, EpochState::Retired, Some(1000)),
            epoch(2, EpochState::Active, Some(1990)),
        ];
        let v = view(
            p,
            p,
            3,
            retired.clone(),
            vec![node(p, 3, &[2], Some(2)), node(p, 3, &[1, 2], Some(2))],
        );
        assert!(matches!(decide(&v), Action::Wait(_)));
        let v = view(p, p, 3, retired, vec![node(p, 3, &[2], Some(2)); 2]);
        assert_eq!(decide(&v), Action::Delete(1));
    }

    #[test]
    fn with_the_phase_off_epochs_move_without_acknowledgement() {
        let p = Phase::Off;
        let v = view(
            p,
            p,
            0,
            vec![
                epoch(1, EpochState::Active, Some(1000)),
                epoch(2, EpochState::Pending, None),
            ],
            vec![node(p, 0, &[], None)],
        );
        assert_eq!(decide(&v), Action::Activate(2));
    }

    #[test]
    fn scheduled_rotation_adds_an_epoch_when_the_newest_is_old() {
        let p = Phase::Enforce;
        let mut v = view(
            p,
            p,
            3,
            vec![epoch(1, EpochState::Active, Some(1000))],
            vec![node(p, 3, &[1], Some(1))],
        );
        v.config.0.rotation_interval_seconds = 500;
        assert_eq!(decide(&v), Action::Rotate);
        v.config.0.rotation_interval_seconds = 5000;
        assert!(matches!(decide(&v), Action::Wait(_)));
    }
}
