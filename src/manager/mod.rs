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

use crate::datastore::etcd::{Etcd, EtcdSettings};
use crate::datastore::ipsec::{
    config_key, leader_key, ClusterConfig, EpochState, IpsecStore, IpsecStoreError, Phase,
};
use crate::datastore::leader::Fence;

mod act;
mod decide;
mod health;
use act::tick;
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

/// Campaigns, and while leader, ticks.
async fn lead(
    opts: &ManagerOptions,
    stats: &Mutex<Stats>,
    lease_slot: &Mutex<Option<(Etcd, i64)>>,
) {
    let mut last_wait = String::new();
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
        let fence = Fence::new(&opts.id);
        let mut last_keepalive = std::time::Instant::now();
        let keepalive_every =
            Duration::from_secs(u64::try_from(opts.lease_ttl / 3).unwrap_or(1).max(1));
        // What the leader last published, and when.
        let mut published: Option<(String, Instant)> = None;
        loop {
            tokio::time::sleep(opts.interval).await;
            lock(stats).last_loop = Some(Instant::now());
            kek.run(&opts.kek_file, keepalive_every, stats).await;
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
            let won = IpsecStore::new(&etcd).campaign(&fence, lease).await;
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
                published = None;
                continue;
            }
            match tick(&etcd, opts, &fence, stats).await {
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
            // Say what the leader waits for (for `enable --wait`); writing it
            // is also the proof that the leader can write.
            let why = lock(stats).waiting.clone();
            let due = published
                .as_ref()
                .is_none_or(|(w, at)| *w != why || at.elapsed() >= keepalive_every);
            if due {
                match health::publish(&etcd, lease, &fence, &why).await {
                    Ok(wrote) => {
                        let was = lock(stats).write_error.take();
                        if was.is_some() {
                            tracing::info!("the leader can write to etcd again");
                        }
                        if wrote {
                            published = Some((why, Instant::now()));
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
