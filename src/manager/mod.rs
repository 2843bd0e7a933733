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
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::datastore::aggregate::{aggregate_key, Aggregate};
use crate::datastore::etcd::{Etcd, EtcdError, EtcdSettings};
use crate::datastore::ipsec::{
    config_key, encode, ClusterConfig, EpochState, IpsecStore, IpsecStoreError, Phase,
};
use crate::datastore::leader::Fence;
use crate::datastore::watch::{watch_prefix, WatchMsg};

mod act;
mod cache;
mod decide;
mod health;
use act::tick;
use cache::Cache;
pub use decide::{decide, step, Action, View};
pub use health::{explain, ManagerStatus};

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
    /// Where to serve `/metrics` and the probes.
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
    last_loop: Option<Instant>,
    kek_error: Option<String>,
    /// Epoch records that do not parse, skipped.
    malformed_epochs: Vec<String>,
    /// Epoch records altered after sealing, refused.
    refused_epochs: Vec<String>,
    write_error: Option<String>,
    step_error: Option<String>,
    unreadable: usize,
    unleased: usize,
    ignored: Vec<String>,
    not_following: Vec<String>,
    /// Writes of the aggregate of the statuses.
    aggregate_writes: u64,
}

/// Runs the manager until SIGTERM or SIGINT.
pub fn run(opts: ManagerOptions) -> Result<(), ManagerError> {
    let rt = crate::runtime::daemon()?;
    rt.block_on(async move {
        let stats = Arc::new(Mutex::new(Stats::default()));
        if let Some(addr) = opts.listen {
            let listener = crate::metrics::bind(addr).await?;
            let st = Arc::clone(&stats);
            let handler = Arc::new(move |path: &str| health::handle(&st, path));
            tokio::spawn(crate::metrics::serve(listener, handler));
        }
        let term = crate::runtime::shutdown_signal();
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

/// After a step's write, the longest the leader waits for the watch to
/// deliver it before deciding again (it normally arrives in milliseconds).
const ECHO_WAIT: Duration = Duration::from_secs(5);
/// How long a burst of changes may take before the leader decides on it.
const SETTLE: Duration = Duration::from_millis(20);
/// The most bytes one write of the aggregate may send to the nodes (its
/// size times the live nodes, each of which watches it) and still go out
/// at once. A record that names many nodes of a large cluster changes with
/// each of them, so it waits until the statuses have been still for
/// [`STILL`], or for [`LATEST`] at most. A record of floors names nobody:
/// it is small, and changes only when the slowest node moves.
const FANOUT_MAX: usize = 4 << 20;
/// See [`FANOUT_MAX`].
const STILL: Duration = Duration::from_secs(1);
/// See [`FANOUT_MAX`].
const LATEST: Duration = Duration::from_secs(5);
/// How often the leader opens the epochs with its KEK again even when no
/// record changed (the KEK file may have).
const RECHECK: Duration = Duration::from_secs(30);

/// Connects and takes a lease, then follows etcd until the lease is lost;
/// and again.
async fn lead(
    opts: &ManagerOptions,
    stats: &Mutex<Stats>,
    lease_slot: &Mutex<Option<(Etcd, i64)>>,
) {
    let mut kek = health::KekCheck::default();
    loop {
        lock(stats).last_loop = Some(Instant::now());
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
        let (tx, mut rx) = mpsc::channel::<WatchMsg>(256);
        let watches: Vec<_> = cache::watched()
            .into_iter()
            .enumerate()
            .map(|(i, p)| tokio::spawn(watch_prefix(etcd.clone(), i, p, tx.clone())))
            .collect();
        drop(tx);
        follow(&etcd, lease, opts, stats, &mut rx, &mut kek).await;
        for w in watches {
            w.abort();
        }
    }
}

/// While `lease` lives: keeps it alive, campaigns when nobody leads, and
/// while leading decides on every change the watches deliver (and every
/// `interval`, for steps that are due by time), writes the aggregate of
/// the statuses when it changes, and says what it waits for.
async fn follow(
    etcd: &Etcd,
    lease: i64,
    opts: &ManagerOptions,
    stats: &Mutex<Stats>,
    rx: &mut mpsc::Receiver<WatchMsg>,
    kek: &mut health::KekCheck,
) {
    let fence = Fence::new(&opts.id);
    let keepalive_every =
        Duration::from_secs(u64::try_from(opts.lease_ttl / 3).unwrap_or(1).max(1));
    let mut keepalive = tokio::time::interval(keepalive_every);
    keepalive.tick().await;
    let mut idle = tokio::time::interval(opts.interval);
    let mut cache = Cache::default();
    let mut last_wait = String::new();
    let mut lead = Leading::default();
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                // A step makes many nodes write at once: take them together.
                tokio::time::sleep(SETTLE).await;
                let mut steps = cache.absorb_step(msg);
                while let Ok(more) = rx.try_recv() {
                    steps |= cache.absorb_step(more);
                }
                if steps {
                    lead.echo = None;
                }
            }
            _ = idle.tick() => {}
            _ = keepalive.tick() => match etcd.keep_alive_once(lease).await {
                Ok(ttl) if ttl > 0 => {}
                Ok(_) => {
                    tracing::warn!("the manager's lease expired; campaigning again");
                    lock(stats).leader = false;
                    return;
                }
                Err(EtcdError::LeaseNotFound { .. }) => {
                    tracing::warn!("the manager's lease expired; campaigning again under a new one");
                    lock(stats).leader = false;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease keep-alive failed");
                    lock(stats).etcd_reachable = false;
                    continue;
                }
            },
        }
        lock(stats).last_loop = Some(Instant::now());
        kek.run(&opts.kek_file, keepalive_every, stats).await;
        if let Some(why) = cache.not_ready() {
            tracing::debug!(why, "not deciding yet");
            continue;
        }
        let leader = match cache.leader() {
            Some(id) => id == opts.id.as_bytes(),
            // Nobody leads: campaign (only then, so that a standby costs
            // etcd nothing while a leader lives).
            None => match IpsecStore::new(etcd).campaign(&fence, lease).await {
                Ok(won) => {
                    if won {
                        tracing::info!(id = %opts.id, "became the leader");
                    }
                    won
                }
                Err(IpsecStoreError::Etcd(EtcdError::LeaseNotFound { .. })) => {
                    tracing::warn!(
                        "the manager's lease expired; campaigning again under a new one"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed");
                    lock(stats).etcd_reachable = false;
                    continue;
                }
            },
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
            lead = Leading::default();
            continue;
        }
        if lead.echo.is_some_and(|t| t.elapsed() < ECHO_WAIT) {
            continue;
        }
        lead.echo = None;
        // The view is built again only when the watches delivered a change;
        // otherwise only the clock moved (steps due by time).
        let generation = cache.generation();
        let recheck = lead.checked.is_none_or(|t| t.elapsed() >= RECHECK);
        let fresh = recheck || lead.viewed.as_ref().is_none_or(|(g, _)| *g != generation);
        if fresh {
            lead.viewed = None;
        }
        let view = match lead.viewed.take() {
            Some((_, v)) => Ok(v),
            None => act::read_view(&mut cache, stats),
        };
        let mut view = match view {
            Ok(v) => v,
            Err(why) => {
                let said = format!("{} is malformed: {why}", config_key());
                if said != last_wait {
                    tracing::error!(%said, "no step can be decided");
                    last_wait = said.clone();
                }
                {
                    let mut s = lock(stats);
                    s.waiting = said.clone();
                    s.step_error = Some(said);
                }
                lead.say(etcd, lease, &fence, stats).await;
                continue;
            }
        };
        if let Some(v) = view.as_mut() {
            v.now = crate::datastore::ipsec::now_unix();
        }
        lead.aggregate(etcd, lease, &fence, &cache, view.as_ref(), stats)
            .await;
        if fresh {
            lead.checked = Some(Instant::now());
        }
        let done = tick(
            etcd,
            opts,
            &fence,
            view.as_mut(),
            fresh,
            cache.guid(),
            stats,
        )
        .await;
        lead.viewed = Some((generation, view));
        match done {
            Ok(Action::Wait(why)) => {
                if why != last_wait {
                    tracing::info!(%why, "waiting");
                    last_wait = why.clone();
                }
                let mut s = lock(stats);
                s.waiting = why;
                s.step_error = None;
            }
            Ok(_) => {
                last_wait.clear();
                lock(stats).step_error = None;
                lead.echo = Some(Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "manager step failed; retrying");
                let mut s = lock(stats);
                s.failures += 1;
                s.step_error = Some(e.to_string());
                if matches!(&e, IpsecStoreError::Etcd(err) if err.is_unavailable()) {
                    s.etcd_reachable = false;
                }
            }
        }
        lead.say(etcd, lease, &fence, stats).await;
    }
}

/// What a leader has written, so that it writes again only on change.
#[derive(Debug, Default)]
struct Leading {
    /// When a step's write went out whose echo has not arrived yet.
    echo: Option<Instant>,
    /// The aggregate last written.
    aggregate: Option<Vec<u8>>,
    /// The cache generation the aggregate was last built from.
    built: Option<u64>,
    /// The view last decided on, and the cache generation it was built from.
    viewed: Option<(u64, Option<View>)>,
    /// When the epochs were last opened with the KEK.
    checked: Option<Instant>,
    /// Since when the aggregate differs from the one written.
    differs: Option<Instant>,
    /// The cache generation last seen, and when it changed.
    moved: (u64, Option<Instant>),
    /// What the leader last said it waits for.
    said: Option<String>,
}

impl Leading {
    /// Writes the aggregate of the statuses when it changed (fenced, under
    /// the leader's lease).
    async fn aggregate(
        &mut self,
        etcd: &Etcd,
        lease: i64,
        fence: &Fence,
        cache: &Cache,
        view: Option<&View>,
        stats: &Mutex<Stats>,
    ) {
        let Some(view) = view else { return };
        let generation = cache.generation();
        let now = Instant::now();
        if self.moved.0 != generation {
            self.moved = (generation, Some(now));
        }
        if self.built == Some(generation) {
            return;
        }
        let Some(agg) = Aggregate::build(&view.live) else {
            // A live status of a release without revisions (a rolling
            // upgrade): no aggregate, so every node reads the statuses.
            self.withdraw(etcd, fence, generation).await;
            return;
        };
        let bytes = encode(&agg);
        if self.aggregate.as_ref() == Some(&bytes) {
            self.built = Some(generation);
            self.differs = None;
            return;
        }
        let since = *self.differs.get_or_insert(now);
        let still = self.moved.1.is_none_or(|t| now - t >= STILL);
        let fanout = bytes.len().saturating_mul(view.live.len());
        if fanout > FANOUT_MAX && !still && now - since < LATEST {
            return;
        }
        match IpsecStore::new(etcd)
            .put_leased_fenced(fence, &aggregate_key(), bytes.clone(), lease)
            .await
        {
            Ok(true) => {
                tracing::info!(
                    named = agg.nodes.len(),
                    exact = agg.exact,
                    bytes = bytes.len(),
                    "wrote the aggregate of the statuses"
                );
                lock(stats).aggregate_writes += 1;
                self.aggregate = Some(bytes);
                self.built = Some(generation);
                self.differs = None;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot write the aggregate of the statuses"),
        }
    }

    /// Deletes the aggregate (once per leadership, while none may be
    /// written).
    async fn withdraw(&mut self, etcd: &Etcd, fence: &Fence, generation: u64) {
        if self.aggregate.as_ref().is_some_and(Vec::is_empty) {
            self.built = Some(generation);
            return;
        }
        match IpsecStore::new(etcd)
            .delete_fenced(fence, &aggregate_key())
            .await
        {
            Ok(true) => {
                tracing::info!("no aggregate of the statuses while a node of an older release runs: nodes read the statuses");
                self.aggregate = Some(Vec::new());
                self.built = Some(generation);
                self.differs = None;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot delete the aggregate of the statuses"),
        }
    }

    /// Says what the leader waits for (for `enable --wait`), when it
    /// changed; writing it is also the proof that the leader can write.
    async fn say(&mut self, etcd: &Etcd, lease: i64, fence: &Fence, stats: &Mutex<Stats>) {
        let why = lock(stats).waiting.clone();
        if self.said.as_ref() == Some(&why) {
            return;
        }
        match health::publish(etcd, lease, fence, &why).await {
            Ok(wrote) => {
                let was = lock(stats).write_error.take();
                if was.is_some() {
                    tracing::info!("the leader can write to etcd again");
                }
                if wrote {
                    self.said = Some(why);
                }
            }
            Err(e) => {
                let mut s = lock(stats);
                if s.write_error.is_none() {
                    tracing::error!(error = %e, "the leader cannot write to etcd: not ready");
                }
                s.write_error = Some(e.to_string());
            }
        }
    }
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
mod tests;
