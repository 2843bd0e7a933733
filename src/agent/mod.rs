//! The node agent: keeps this node's XFRM state converged between pod events.
//!
//! - It holds a cache of the keys a snapshot is built from, fed by one etcd
//!   watch per prefix ([`watch`]); each watch resumes from the last revision
//!   it delivered after a reconnect.
//! - On every change it converges at once (the same code as an ADD, under the
//!   same node lock), and publishes the node's status under its lease:
//!   id, incarnation, installed epochs, active epoch, acknowledged phase.
//! - It watches the kernel too ([`kernel_watch`]): any XFRM or link
//!   notification converges again within a second, so a flushed state or
//!   policy table is put back at once; each repair is counted and logged
//!   with what was missing.
//! - While etcd cannot be reached it changes nothing in the kernel (the last
//!   known good data plane stays) and reports itself stale.
//! - A shutdown (SIGTERM, SIGINT) leaves the kernel state and the lease as
//!   they are: a restart within the lease's TTL is invisible to the manager.
//!
//! - It keeps our entry in Calico's conflist ([`conflist_watch`]).
//!
//! It serves `/metrics`, `/livez`, `/readyz` and `/healthz` ([`health`]).

pub mod conflist_watch;
mod exposition;
mod health;
pub mod kernel_watch;
mod publish;
pub mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::PluginConfig;
use crate::converge::{self, ConvergeError, NodeLock, Report};
use crate::datastore::etcd::{Etcd, Kv};
use crate::datastore::ipsec::{now_unix, IpsecStoreError, NodeStatus};
use crate::datastore::snapshot::{self, Snapshot};
use crate::metrics::Histogram;
use crate::xfrm::handover::PeerAcks;
use exposition::render;
use kernel_watch::KernelEvent;
use publish::{keep_alive, kek_fingerprint, publish, status_of, without_heartbeat};
use watch::{Change, WatchMsg};

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The plugin's settings (etcd, node name, KEK, state directory).
    pub cfg: PluginConfig,
    /// Where to serve `/metrics` and the probes; `None` serves nothing.
    pub listen: Option<SocketAddr>,
    /// The CNI config directory whose Calico conflist must keep our entry;
    /// `None` leaves the conflist alone.
    pub conf_dir: Option<PathBuf>,
    /// How long etcd may be unreachable before `/readyz` fails.
    pub stale_grace: Duration,
    /// TTL of the lease the status record is bound to, in seconds.
    pub lease_ttl: i64,
    /// Full re-convergence period even without events.
    pub resync: Duration,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The node name could not be found.
    #[error(transparent)]
    Nodename(#[from] crate::config::NodenameError),
    /// The metrics address could not be bound, or the runtime failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What the agent knows, shared with the HTTP endpoint.
#[derive(Debug)]
struct State {
    node: String,
    stale: bool,
    stale_reason: Option<String>,
    stale_since: Option<Instant>,
    last_success: Option<u64>,
    last_success_at: Option<Instant>,
    converge_error: Option<String>,
    last_loop: Instant,
    report: Option<Report>,
    converge_seconds: Histogram,
    converge_failures: u64,
    watch_restarts: u64,
    lease: Option<i64>,
    kernel_events: u64,
    kernel_repairs: u64,
}

impl State {
    /// Nothing known yet: stale until etcd answers.
    fn new(node: String) -> Self {
        State {
            node,
            stale: true,
            stale_reason: Some("not yet connected to etcd".into()),
            stale_since: Some(Instant::now()),
            last_success: None,
            last_success_at: None,
            converge_error: None,
            last_loop: Instant::now(),
            report: None,
            converge_seconds: Histogram::new(&CONVERGE_BUCKETS),
            converge_failures: 0,
            watch_restarts: 0,
            lease: None,
            kernel_events: 0,
            kernel_repairs: 0,
        }
    }
}

/// How long a burst of kernel notifications may take before the agent
/// converges on it.
const KERNEL_SETTLE: Duration = Duration::from_millis(20);

/// The first retry after a failed convergence.
const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait between retries while nothing changes.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Buckets of the convergence histogram, in seconds.
const CONVERGE_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let node = opts.cfg.node_name()?;
    let rt = crate::runtime::daemon()?;
    rt.block_on(async move {
        let state = Arc::new(Mutex::new(State::new(node.clone())));
        let repairs = match &opts.conf_dir {
            Some(dir) => {
                let stats = Arc::new(conflist_watch::RepairStats::default());
                conflist_watch::spawn(dir.clone(), Arc::clone(&stats))?;
                tracing::info!(dir = %dir.display(), "keeping the calico-ipsec entry in Calico's conflist");
                Some(stats)
            }
            None => None,
        };
        if let Some(addr) = opts.listen {
            let listener = crate::metrics::bind(addr).await?;
            let st = Arc::clone(&state);
            let probes = health::Probes {
                ttl: opts.lease_ttl,
                resync: opts.resync,
                stale_grace: opts.stale_grace,
                repairs,
            };
            let handler = Arc::new(move |path: &str| health::handle(&st, path, &probes));
            tokio::spawn(crate::metrics::serve(listener, handler));
            tracing::info!(%addr, "serving /metrics, /livez, /readyz and /healthz");
        }
        let shutdown = crate::runtime::shutdown_signal();
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            () = main_loop(opts, node, Arc::clone(&state)) => {}
        }
        tracing::info!(
            "agent stopping; the kernel's XFRM state and the status lease are left in place"
        );
        Ok(())
    })
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Connects, retrying until etcd answers.
async fn connect(opts: &AgentOptions, state: &Mutex<State>) -> Etcd {
    let settings = converge::settings(&opts.cfg);
    let mut backoff = Duration::from_millis(200);
    loop {
        match Etcd::connect(&settings).await {
            Ok(e) => return e,
            Err(e) => {
                mark_stale(state, &e.to_string());
                // Still alive: etcd being away is no reason to restart.
                lock(state).last_loop = Instant::now();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn mark_stale(state: &Mutex<State>, reason: &str) {
    let mut s = lock(state);
    if !s.stale {
        tracing::warn!(
            reason,
            "etcd is unreachable: keeping the last known good XFRM state (stale)"
        );
    }
    if !s.stale || s.stale_since.is_none() {
        s.stale_since = Some(Instant::now());
    }
    s.stale = true;
    s.stale_reason = Some(reason.to_string());
}

/// The agent proper: watches, converges, publishes.
async fn main_loop(opts: AgentOptions, node: String, state: Arc<Mutex<State>>) {
    let etcd = connect(&opts, &state).await;
    publish::adopt_lease(&etcd, &state, &node, opts.lease_ttl).await;
    let mut prefixes: Vec<String> = snapshot::watched().into_iter().map(|(k, _)| k).collect();
    // The peers' statuses, last: they are not part of the snapshot, and
    // matter only while a hand-over between incarnations is pending.
    let statuses_idx = prefixes.len();
    prefixes.push(format!("{}nodes/", crate::datastore::ipsec::PREFIX));
    let (tx, mut rx) = mpsc::channel::<WatchMsg>(256);
    for (idx, p) in prefixes.iter().enumerate() {
        tokio::spawn(watch::watch_prefix(
            etcd.clone(),
            idx,
            p.clone(),
            tx.clone(),
        ));
    }
    drop(tx);
    let (ktx, mut krx) = mpsc::channel::<KernelEvent>(64);
    if let Err(e) = kernel_watch::spawn(ktx) {
        tracing::error!(error = %e, "cannot watch the kernel's XFRM and link notifications; drift is found by the periodic resync only");
    }
    // Kernel notifications not yet answered by a convergence.
    let mut drift: std::collections::BTreeSet<KernelEvent> = Default::default();

    let mut cache: Vec<Option<(i64, BTreeMap<String, Kv>)>> = vec![None; prefixes.len()];
    let mut down: Vec<bool> = vec![false; prefixes.len()];
    // When the oldest change not yet converged arrived.
    let mut pending: Option<Instant> = None;
    // After a failed convergence: when to try again with nothing new, and
    // the next delay (doubled per failure up to RETRY_MAX; new data from
    // etcd or the kernel tries at once).
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut retry_delay = RETRY_MIN;
    let mut last_published: Option<NodeStatus> = None;
    let mut published_at = Instant::now();
    let heartbeat = Duration::from_secs(u64::try_from(opts.lease_ttl / 3).unwrap_or(1).max(1));
    let mut beat = tokio::time::interval(heartbeat);
    let mut resync = tokio::time::interval(opts.resync);
    resync.tick().await;

    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                let handing_over = lock(&state)
                    .report
                    .as_ref()
                    .is_some_and(|r| !r.waiting_for.is_empty() || r.kept_inbound > 0);
                // A status change matters only while a hand-over is pending.
                let take = |m: WatchMsg, cache: &mut Vec<_>, down: &mut Vec<bool>| {
                    let status = m.idx() == statuses_idx;
                    absorb(m, cache, down, &state) && (!status || handing_over)
                };
                let mut changed = take(msg, &mut cache, &mut down);
                // Take everything already queued before converging once.
                while let Ok(more) = rx.try_recv() {
                    changed |= take(more, &mut cache, &mut down);
                }
                if changed {
                    pending.get_or_insert_with(Instant::now);
                    retry_at = None;
                }
            }
            _ = beat.tick() => {
                let alive = keep_alive(&etcd, &state).await;
                if alive == Some(true) && !down.iter().any(|d| *d) && retry_at.is_none() {
                    let mut s = lock(&state);
                    if s.stale && s.report.is_some() {
                        tracing::info!("etcd answers again");
                        s.stale = false;
                        s.stale_reason = None;
                        s.stale_since = None;
                    }
                }
                // Publish again after a lost lease, and refresh the record's
                // heartbeat now and then.
                if alive == Some(false) || published_at.elapsed() >= Duration::from_secs(60) {
                    last_published = None;
                }
                // A new KEK (the Secret changed): say so within a heartbeat.
                if last_published
                    .as_ref()
                    .is_some_and(|p| p.kek != kek_fingerprint(&opts.cfg.kek_file))
                {
                    pending.get_or_insert_with(Instant::now);
                }
                if last_published.is_none() {
                    pending.get_or_insert_with(Instant::now);
                }
            }
            Some(ev) = krx.recv() => {
                // A flush or a burst of writes arrives as many messages:
                // let it finish, then converge once.
                tokio::time::sleep(KERNEL_SETTLE).await;
                drift.insert(ev);
                while let Ok(more) = krx.try_recv() {
                    drift.insert(more);
                }
                lock(&state).kernel_events += 1;
                pending.get_or_insert_with(Instant::now);
                retry_at = None;
            }
            _ = resync.tick() => {
                pending.get_or_insert_with(Instant::now);
            }
            () = retry => {
                retry_at = None;
                pending.get_or_insert_with(Instant::now);
            }
        }
        lock(&state).last_loop = Instant::now();
        if down.iter().any(|d| *d) {
            continue;
        }
        let Some(since) = pending else { continue };
        if cache.iter().any(Option::is_none) || retry_at.is_some() {
            continue;
        }
        let snap = match build_snapshot(&cache[..statuses_idx]) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "the datastore holds a malformed record; keeping the current XFRM state");
                let mut s = lock(&state);
                s.converge_failures += 1;
                s.converge_error = Some(format!("the datastore holds a malformed record: {e}"));
                drop(s);
                pending = None;
                continue;
            }
        };
        let noticed = std::mem::take(&mut drift);
        let acks = peer_acks(cache[statuses_idx].as_ref());
        match converge_once(&opts.cfg, &etcd, snap, &acks, &node).await {
            Ok(report) => {
                pending = None;
                retry_delay = RETRY_MIN;
                if report.writes > 0 && !noticed.is_empty() {
                    let kinds: Vec<String> = noticed.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        noticed = %kinds.join(", "),
                        repaired = %report.changes.join("; "),
                        writes = report.writes,
                        "the kernel's XFRM state drifted outside calico-ipsec; put back"
                    );
                    lock(&state).kernel_repairs += 1;
                }
                let took = since.elapsed();
                {
                    let mut s = lock(&state);
                    s.converge_seconds.observe(took.as_secs_f64());
                    s.last_success = Some(now_unix());
                    s.last_success_at = Some(Instant::now());
                    s.converge_error = None;
                    // A convergence may keep the kernel as it was because
                    // etcd cannot be followed (stale, with the reason).
                    let was_stale = s.stale;
                    s.stale = report.stale.is_some();
                    s.stale_reason = report.stale.clone();
                    if !s.stale {
                        s.stale_since = None;
                    } else if !was_stale || s.stale_since.is_none() {
                        s.stale_since = Some(Instant::now());
                    }
                    s.report = Some(report.clone());
                }
                if report.writes > 0 {
                    tracing::info!(
                        writes = report.writes,
                        millis = took.as_millis() as u64,
                        phase = ?report.phase,
                        epochs = ?report.installed_epochs,
                        "converged"
                    );
                }
                let kek = kek_fingerprint(&opts.cfg.kek_file);
                let status = status_of(&report, report.stale.is_some(), kek);
                let changed = last_published.as_ref().map(without_heartbeat)
                    != Some(without_heartbeat(&status));
                if changed && publish(&etcd, &state, &node, &status, opts.lease_ttl).await {
                    last_published = Some(status);
                    published_at = Instant::now();
                }
            }
            Err(e) => {
                let unavailable = matches!(
                    &e,
                    ConvergeError::Store(IpsecStoreError::Etcd(err)) if err.is_unavailable()
                );
                if unavailable {
                    mark_stale(&state, &e.to_string());
                } else {
                    tracing::error!(error = %e, retry_in = ?retry_delay, "convergence failed; the current XFRM state is kept");
                }
                let mut s = lock(&state);
                s.converge_failures += 1;
                s.converge_error = Some(e.to_string());
                drop(s);
                retry_at = Some(tokio::time::Instant::now() + retry_delay);
                retry_delay = (retry_delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Applies one watch message to the cache; true when data changed.
fn absorb(
    msg: WatchMsg,
    cache: &mut [Option<(i64, BTreeMap<String, Kv>)>],
    down: &mut [bool],
    state: &Mutex<State>,
) -> bool {
    match msg {
        WatchMsg::Reset { idx, kvs, revision } => {
            cache[idx] = Some((
                revision,
                kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
            ));
            true
        }
        WatchMsg::Changes {
            idx,
            changes,
            revision,
        } => {
            let Some((rev, map)) = cache[idx].as_mut() else {
                return false;
            };
            *rev = revision;
            for c in changes {
                match c {
                    Change::Put(kv) => {
                        map.insert(kv.key.clone(), kv);
                    }
                    Change::Delete(k) => {
                        map.remove(&k);
                    }
                }
            }
            true
        }
        WatchMsg::Up { idx } => {
            let was = std::mem::replace(&mut down[idx], false);
            if was {
                tracing::info!(idx, "etcd watch resumed");
            }
            // Converge once etcd is back, in case the kernel changed meanwhile.
            was
        }
        WatchMsg::Down { idx, reason } => {
            if !down[idx] {
                lock(state).watch_restarts += 1;
            }
            down[idx] = true;
            mark_stale(state, &reason);
            false
        }
    }
}

fn build_snapshot(
    cache: &[Option<(i64, BTreeMap<String, Kv>)>],
) -> Result<Snapshot, IpsecStoreError> {
    let revision = cache.iter().flatten().map(|(r, _)| *r).max().unwrap_or(0);
    let read: Vec<Vec<Kv>> = cache
        .iter()
        .map(|c| {
            c.as_ref()
                .map_or_else(Vec::new, |(_, m)| m.values().cloned().collect())
        })
        .collect();
    Snapshot::from_ranges(&read, revision)
}

/// The peers' status records as the hand-over reads them (a record that
/// does not parse counts as absent).
fn peer_acks(statuses: Option<&(i64, BTreeMap<String, Kv>)>) -> PeerAcks {
    let prefix = format!("{}nodes/", crate::datastore::ipsec::PREFIX);
    let parsed: Vec<(String, NodeStatus)> = statuses
        .map(|(_, m)| {
            m.values()
                .filter_map(|kv| {
                    let name = kv.key.strip_prefix(&prefix)?;
                    let st: NodeStatus = serde_json::from_slice(&kv.value).ok()?;
                    Some((name.to_string(), st))
                })
                .collect()
        })
        .unwrap_or_default();
    PeerAcks::from_statuses(parsed.iter().map(|(n, s)| (n.as_str(), s)))
}

async fn converge_once(
    cfg: &PluginConfig,
    etcd: &Etcd,
    snap: Snapshot,
    acks: &PeerAcks,
    node: &str,
) -> Result<Report, ConvergeError> {
    let started = Instant::now();
    // The lock serialises with ADDs; they hold it for one convergence.
    let lock = tokio::task::block_in_place(|| {
        NodeLock::acquire(&cfg.state_dir, converge::NODE_LOCK_WAIT)
    })?;
    let r = converge::converge_with(cfg, etcd, snap, Some(acks), node.to_string(), started).await;
    drop(lock);
    r
}
