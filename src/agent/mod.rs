//! The node agent: keeps this node's XFRM state converged between pod events.
//!
//! - It holds a cache of the keys a snapshot is built from, fed by one etcd
//!   watch per prefix ([`watch`]); each watch resumes from the last revision
//!   it delivered after a reconnect. Events only mark work as pending; one
//!   `reconcile` converges and publishes, and failures retry with backoff
//!   (`reconcile.rs`).
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
mod reconcile;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::PluginConfig;
use crate::converge::{self, Report};
use crate::datastore::etcd::Etcd;
use crate::datastore::snapshot;
use crate::datastore::watch::{self, WatchMsg};
use crate::metrics::Histogram;
use exposition::render;
use kernel_watch::KernelEvent;
use reconcile::{Ctx, Reconciler};

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
    /// The mounted KEK Secret that the plugin's copy (`cfg.kek_file`)
    /// follows; `None` leaves the copy alone.
    pub kek_from: Option<PathBuf>,
}

/// Makes the plugin's KEK copy equal to the mounted Secret (atomically,
/// 0600), so that a KEK changed in the Secret reaches the CNI plugin
/// without a restart; the status then reports the copy's fingerprint,
/// which `keys rotate-kek --finish` waits for. A failure is logged once
/// per distinct reason; the copy stays as it was.
pub fn follow_kek(from: &std::path::Path, copy: &std::path::Path, said: &mut Option<String>) {
    match crate::install::install_kek(from, copy) {
        Ok(crate::install::Outcome::Written) => {
            let fp = crate::keys::Kek::load(copy)
                .map(|k| k.fingerprint())
                .unwrap_or_default();
            tracing::info!(from = %from.display(), copy = %copy.display(), fingerprint = %fp, "the plugin's KEK copy now follows the mounted Secret");
            *said = None;
        }
        Ok(_) => *said = None,
        Err(e) => {
            let why = e.to_string();
            if said.as_deref() != Some(why.as_str()) {
                tracing::error!(from = %from.display(), copy = %copy.display(), error = %why, "cannot bring the plugin's KEK copy in line with the mounted Secret");
                *said = Some(why);
            }
        }
    }
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

/// Buckets of the convergence histogram, in seconds.
const CONVERGE_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let node = opts.cfg.node_name()?;
    // After a reboot, the catch-all this node enforced is back before etcd
    // is asked (DESIGN §5c); the first convergence then decides.
    if let Some(from) = &opts.kek_from {
        follow_kek(from, &opts.cfg.kek_file, &mut None);
    }
    match crate::converge::open_state(&opts.cfg) {
        Ok(mut state) => crate::converge::guard::restore(&mut state, true),
        Err(e) => {
            tracing::error!(error = %e, "cannot take the node lock to restore the nftables catch-all; the first convergence writes it")
        }
    }
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

/// The agent proper: the watches and the kernel feed the reconciler, which
/// converges and publishes.
async fn main_loop(opts: AgentOptions, node: String, state: Arc<Mutex<State>>) {
    let etcd = connect(&opts, &state).await;
    publish::adopt_lease(&etcd, &state, &node, opts.lease_ttl).await;
    let mut prefixes: Vec<String> = snapshot::watched().into_iter().map(|(k, _)| k).collect();
    // The leader's aggregate of the peers' statuses, last: it is not part
    // of the snapshot, and matters only while a hand-over between
    // incarnations is pending. No node watches another's status record.
    prefixes.push(crate::datastore::aggregate::aggregate_key());
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
    let ctx = Ctx {
        opts: &opts,
        etcd: &etcd,
        node: &node,
        state: &state,
    };
    let mut r = Reconciler::new(prefixes.len());
    let heartbeat = Duration::from_secs(u64::try_from(opts.lease_ttl / 3).unwrap_or(1).max(1));
    // The lease's keep-alive runs on a task of its own: a convergence (the
    // node lock, netlink, `nft`) blocks this loop, never the keep-alive, so
    // a busy node does not drop out of the manager's count.
    let (btx, mut brx) = mpsc::channel::<Option<bool>>(8);
    {
        let (etcd, state) = (etcd.clone(), Arc::clone(&state));
        tokio::spawn(async move {
            let mut beat = tokio::time::interval(heartbeat);
            loop {
                beat.tick().await;
                let alive = publish::keep_alive(&etcd, &state).await;
                // Full: the loop is busy and has beats to read; a lost
                // lease is also in the state (no lease), seen at the next.
                if let Err(mpsc::error::TrySendError::Closed(_)) = btx.try_send(alive) {
                    return;
                }
            }
        });
    }
    let mut resync = tokio::time::interval(opts.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { return };
                r.on_watch(msg, &mut rx, &state);
            }
            Some(alive) = brx.recv() => r.on_beat(&ctx, alive),
            Some(ev) = krx.recv() => {
                // A flush or a burst of writes arrives as many messages:
                // let it finish, then converge once.
                tokio::time::sleep(KERNEL_SETTLE).await;
                r.on_kernel(ev, &mut krx, &state);
            }
            _ = resync.tick() => r.wake(),
            () = r.backoff().elapsed() => r.on_retry(),
            () = r.polled() => r.on_poll(),
        }
        let next = r.reconcile(&ctx).await;
        tracing::trace!(?next, "reconciled");
    }
}
