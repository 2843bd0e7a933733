//! The agent's reconciler, in the shape of a kube-rs controller: a watch
//! cache fed by the etcd watches, events that only mark work as pending,
//! one [`Reconciler::reconcile`] that converges the node and publishes its
//! status, and an error policy with exponential backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::kernel_watch::KernelEvent;
use super::publish::{kek_fingerprint, publish, status_of, without_heartbeat};
use super::{lock, mark_stale, AgentOptions, State};
use crate::converge::{self, ConvergeError, Report};
use crate::datastore::aggregate::{aggregate_key, Aggregate};
use crate::datastore::etcd::{Etcd, Kv};
use crate::datastore::ipsec::{now_unix, IpsecStoreError, NodeStatus};
use crate::datastore::snapshot::Snapshot;
use crate::datastore::watch::{mark_down, mark_up, Change, WatchMsg};
use crate::xfrm::handover::PeerAcks;

/// The first retry after a failed convergence.
pub(super) const RETRY_MIN: Duration = Duration::from_millis(500);
/// The longest wait between retries while nothing changes.
pub(super) const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a node re-reads its peers' statuses while a hand-over waits
/// and no leader writes the aggregate.
pub(super) const POLL: Duration = Duration::from_secs(1);

/// What one prefix's watch has delivered: its revision and keys.
type Range = Option<(i64, BTreeMap<String, Kv>)>;

/// The keys of every watched prefix, as the watches delivered them.
#[derive(Debug)]
pub(super) struct WatchCache {
    ranges: Vec<Range>,
    down: Vec<bool>,
    /// The index of the leader's aggregate (last; not part of a snapshot).
    statuses: usize,
}

impl WatchCache {
    /// An empty cache of `prefixes` prefixes, the last of them the leader's
    /// aggregate of the peers' statuses.
    pub(super) fn new(prefixes: usize) -> Self {
        Self {
            ranges: vec![None; prefixes],
            down: vec![false; prefixes],
            statuses: prefixes.saturating_sub(1),
        }
    }

    /// Applies one watch message; true when it changed what a convergence
    /// reads (or a watch came back, when the kernel may have changed
    /// meanwhile).
    fn absorb(&mut self, msg: WatchMsg, state: &Mutex<State>) -> bool {
        match msg {
            WatchMsg::Reset { idx, kvs, revision } => {
                let Some(slot) = self.ranges.get_mut(idx) else {
                    return false;
                };
                *slot = Some((
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
                let Some(Some((rev, map))) = self.ranges.get_mut(idx) else {
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
            WatchMsg::Up { idx } => mark_up(&mut self.down, idx),
            WatchMsg::Down { idx, reason } => {
                if mark_down(&mut self.down, idx) {
                    lock(state).watch_restarts += 1;
                }
                mark_stale(state, &reason);
                false
            }
        }
    }

    /// Why no snapshot can be built now (`None`: one can).
    fn not_ready(&self) -> Option<&'static str> {
        if self.down.iter().any(|d| *d) {
            Some("an etcd watch is down")
        } else if self.ranges.iter().any(Option::is_none) {
            Some("the watches have not delivered every prefix yet")
        } else {
            None
        }
    }

    /// Whether prefix `idx` has been delivered once already.
    fn delivered(&self, idx: usize) -> bool {
        self.ranges.get(idx).is_some_and(Option::is_some)
    }

    /// Whether the watch of prefix `idx` is down.
    fn is_down(&self, idx: usize) -> bool {
        self.down.get(idx).copied().unwrap_or(false)
    }

    /// Whether every watch is up.
    fn all_up(&self) -> bool {
        !self.down.iter().any(|d| *d)
    }

    /// The snapshot the cache holds, at the newest revision delivered.
    fn snapshot(&self) -> Result<Snapshot, IpsecStoreError> {
        let ranges = &self.ranges[..self.statuses];
        let revision = ranges.iter().flatten().map(|(r, _)| *r).max().unwrap_or(0);
        let read: Vec<Vec<Kv>> = ranges
            .iter()
            .map(|c| {
                c.as_ref()
                    .map_or_else(Vec::new, |(_, m)| m.values().cloned().collect())
            })
            .collect();
        Snapshot::from_ranges(&read, revision)
    }

    /// The peers' acknowledgements from the leader's aggregate; `None`
    /// when there is none (no manager, or one from before it) or it does
    /// not parse: the convergence then reads the statuses itself, once,
    /// when a hand-over may apply.
    fn acks(&self, snap: &Snapshot) -> Option<PeerAcks> {
        let key = aggregate_key();
        let (_, m) = self.ranges.get(self.statuses)?.as_ref()?;
        let kv = m.get(&key)?;
        let agg: Aggregate = serde_json::from_slice(&kv.value).ok()?;
        Some(PeerAcks::from_aggregate(&agg, &snap.identities))
    }
}

/// When to try again after a failure: doubled per failure from
/// [`RETRY_MIN`] up to [`RETRY_MAX`]; new data tries at once.
#[derive(Debug)]
pub(super) struct Backoff {
    at: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            at: None,
            delay: RETRY_MIN,
        }
    }

    /// Records a failure: the next try waits the current delay, which then
    /// doubles. Returns the wait.
    fn failed(&mut self) -> Duration {
        let wait = self.delay;
        self.at = Some(tokio::time::Instant::now() + wait);
        self.delay = (self.delay * 2).min(RETRY_MAX);
        wait
    }

    /// A success: the next failure waits [`RETRY_MIN`] again.
    fn succeeded(&mut self) {
        self.at = None;
        self.delay = RETRY_MIN;
    }

    /// New data: try at once, keeping the delay for the next failure.
    fn skip(&mut self) {
        self.at = None;
    }

    /// Resolves when the wait is over; never while there is none.
    pub(super) async fn elapsed(&self) {
        match self.at {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

/// What the reconciler works with and never changes.
pub(super) struct Ctx<'a> {
    /// How the agent runs.
    pub opts: &'a AgentOptions,
    /// The etcd client.
    pub etcd: &'a Etcd,
    /// This node.
    pub node: &'a str,
    /// What the HTTP endpoint reports.
    pub state: &'a Mutex<State>,
}

/// What one call of [`Reconciler::reconcile`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Nothing was pending.
    Idle,
    /// Work is pending but cannot run yet, and why.
    Wait(&'static str),
    /// The node converged.
    Converged,
    /// The convergence failed; the next try comes after this long, or at
    /// once when new data arrives.
    Retry(Duration),
}

/// The agent's state between events.
pub(super) struct Reconciler {
    cache: WatchCache,
    /// Kernel notifications not yet answered by a convergence.
    drift: BTreeSet<KernelEvent>,
    /// When the oldest change not yet converged arrived.
    pending: Option<Instant>,
    backoff: Backoff,
    last_published: Option<NodeStatus>,
    /// When to re-read the peers' statuses (a hand-over without aggregate).
    poll: Option<tokio::time::Instant>,
    /// The last failure to follow the mounted KEK, logged once.
    kek_said: Option<String>,
}

impl Reconciler {
    /// A reconciler over `prefixes` watched prefixes (the last of them the
    /// peers' statuses).
    pub(super) fn new(prefixes: usize) -> Self {
        Self {
            cache: WatchCache::new(prefixes),
            drift: BTreeSet::new(),
            pending: None,
            backoff: Backoff::new(),
            last_published: None,
            poll: None,
            kek_said: None,
        }
    }

    /// The retry timer.
    pub(super) fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    fn mark(&mut self) {
        self.pending.get_or_insert_with(Instant::now);
    }

    /// Takes a watch message and everything already queued behind it.
    pub(super) fn on_watch(
        &mut self,
        first: WatchMsg,
        rx: &mut mpsc::Receiver<WatchMsg>,
        state: &Mutex<State>,
    ) {
        // The peers' acknowledgements matter only while a hand-over is pending.
        let handing_over = lock(state)
            .report
            .as_ref()
            .is_some_and(|r| !r.waiting_for.is_empty() || r.kept_inbound > 0);
        let statuses = self.cache.statuses;
        // A prefix read again (etcd compacted past the watch, or was
        // restored) or a watch back after an outage: etcd may hold another
        // status record than the one this agent wrote last. The record is
        // written only on change, so write it again once.
        let mut outage = false;
        let mut take = |m: WatchMsg| {
            let status = m.idx() == statuses;
            outage |= match &m {
                WatchMsg::Reset { idx, .. } => self.cache.delivered(*idx),
                WatchMsg::Up { idx } => self.cache.is_down(*idx),
                _ => false,
            };
            self.cache.absorb(m, state) && (!status || handing_over)
        };
        let mut changed = take(first);
        while let Ok(more) = rx.try_recv() {
            changed |= take(more);
        }
        if outage {
            self.last_published = None;
            changed = true;
        }
        if changed {
            self.mark();
            self.backoff.skip();
        }
    }

    /// Takes a kernel notification and the rest of its burst.
    pub(super) fn on_kernel(
        &mut self,
        first: KernelEvent,
        rx: &mut mpsc::Receiver<KernelEvent>,
        state: &Mutex<State>,
    ) {
        self.drift.insert(first);
        while let Ok(more) = rx.try_recv() {
            self.drift.insert(more);
        }
        lock(state).kernel_events += 1;
        self.mark();
        self.backoff.skip();
    }

    /// The periodic resync.
    pub(super) fn wake(&mut self) {
        self.mark();
    }

    /// Resolves when the peers' statuses are due to be read again.
    pub(super) async fn polled(&self) {
        match self.poll {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }

    /// The statuses are due: converge again.
    pub(super) fn on_poll(&mut self) {
        self.poll = None;
        self.mark();
    }

    /// The end of a retry wait.
    pub(super) fn on_retry(&mut self) {
        self.backoff.skip();
        self.mark();
    }

    /// The lease heartbeat: keeps the lease alive, clears a stale mark once
    /// etcd answers again, and asks for a publication when one is due.
    pub(super) fn on_beat(&mut self, ctx: &Ctx<'_>, alive: Option<bool>) {
        // A lease lost (or never granted): publish again at once.
        let alive = if self.last_published.is_some() && lock(ctx.state).lease.is_none() {
            Some(false)
        } else {
            alive
        };
        if alive == Some(true) && self.cache.all_up() && self.backoff.at.is_none() {
            let mut s = lock(ctx.state);
            if s.stale && s.report.is_some() {
                tracing::info!("etcd answers again");
                s.stale = false;
                s.stale_reason = None;
                s.stale_since = None;
            }
        }
        // Publish again after a lost lease. Otherwise the record is written
        // only when what it says changes: the lease is the liveness signal.
        if alive == Some(false) {
            self.last_published = None;
        }
        // A new KEK (the Secret changed): the plugin's copy follows it, and
        // the status says so within a heartbeat.
        if let Some(from) = &ctx.opts.kek_from {
            super::follow_kek(from, &ctx.opts.cfg.kek_file, &mut self.kek_said);
        }
        let kek_changed = self
            .last_published
            .as_ref()
            .is_some_and(|p| p.kek != kek_fingerprint(&ctx.opts.cfg.kek_file));
        if kek_changed || self.last_published.is_none() {
            self.mark();
        }
    }

    /// Converges when something is pending and the cache can tell what to
    /// converge to; then publishes the status when it changed.
    pub(super) async fn reconcile(&mut self, ctx: &Ctx<'_>) -> Next {
        lock(ctx.state).last_loop = Instant::now();
        let Some(since) = self.pending else {
            return Next::Idle;
        };
        if let Some(why) = self.cache.not_ready() {
            return Next::Wait(why);
        }
        if self.backoff.at.is_some() {
            return Next::Wait("waiting to retry a failed convergence");
        }
        let snap = match self.cache.snapshot() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "the datastore holds a malformed record; keeping the current XFRM state");
                let mut s = lock(ctx.state);
                s.converge_failures += 1;
                s.converge_error = Some(format!("the datastore holds a malformed record: {e}"));
                // Nothing to retry until the record changes.
                self.pending = None;
                return Next::Wait("a malformed record");
            }
        };
        let noticed = std::mem::take(&mut self.drift);
        let acks = self.cache.acks(&snap);
        match converge_once(&ctx.opts.cfg, ctx.etcd, snap, acks.as_ref(), ctx.node).await {
            Ok(report) => {
                self.pending = None;
                self.backoff.succeeded();
                // Without an aggregate nothing announces a peer's
                // acknowledgement: look again while a hand-over waits.
                let waits = !report.waiting_for.is_empty() || report.kept_inbound > 0;
                self.poll = (acks.is_none() && waits).then(|| tokio::time::Instant::now() + POLL);
                record_success(ctx.state, &report, &noticed, since.elapsed());
                self.publish(ctx, &report).await;
                Next::Converged
            }
            Err(e) => Next::Retry(self.error_policy(ctx.state, &e)),
        }
    }

    /// A failed convergence: stale when etcd is unavailable (the kernel is
    /// kept), an error otherwise; either way a retry with backoff.
    fn error_policy(&mut self, state: &Mutex<State>, e: &ConvergeError) -> Duration {
        let wait = self.backoff.failed();
        let unavailable = matches!(
            e,
            ConvergeError::Store(IpsecStoreError::Etcd(err)) if err.is_unavailable()
        );
        if unavailable {
            mark_stale(state, &e.to_string());
        } else {
            tracing::error!(error = %e, retry_in = ?wait, "convergence failed; the current XFRM state is kept");
        }
        let mut s = lock(state);
        s.converge_failures += 1;
        s.converge_error = Some(e.to_string());
        wait
    }

    /// Writes the status when it differs from the last one written.
    async fn publish(&mut self, ctx: &Ctx<'_>, report: &Report) {
        let kek = kek_fingerprint(&ctx.opts.cfg.kek_file);
        let status = status_of(report, report.stale.is_some(), kek);
        let changed =
            self.last_published.as_ref().map(without_heartbeat) != Some(without_heartbeat(&status));
        if changed && publish(ctx.etcd, ctx.state, ctx.node, &status, ctx.opts.lease_ttl).await {
            self.last_published = Some(status);
        }
    }
}

/// Whether a convergence that wrote put back drift. The convergence knows
/// when the kernel held what the last one left (then its writes follow
/// etcd or the node: a rotation, a peer's new incarnation, even when our
/// own writes' notifications woke it); without that mark, a kernel
/// notification since the last convergence is taken as drift.
fn repaired_drift(report: &Report, noticed: &BTreeSet<KernelEvent>) -> bool {
    report.kernel_drift.unwrap_or(!noticed.is_empty())
}

/// Updates what the endpoint reports after a successful convergence, and
/// logs and counts a repair of drift caused outside calico-ipsec.
fn record_success(
    state: &Mutex<State>,
    report: &Report,
    noticed: &BTreeSet<KernelEvent>,
    took: Duration,
) {
    if report.writes > 0 && repaired_drift(report, noticed) {
        let kinds: Vec<String> = noticed.iter().map(ToString::to_string).collect();
        tracing::warn!(
            noticed = %kinds.join(", "),
            repaired = %report.changes.join("; "),
            writes = report.writes,
            "{}",
            crate::converge::DRIFT_REPAIRED
        );
        lock(state).kernel_repairs += 1;
    }
    let mut s = lock(state);
    s.converge_seconds.observe(took.as_secs_f64());
    s.last_success = Some(now_unix());
    s.last_success_at = Some(Instant::now());
    s.converge_error = None;
    // A convergence may keep the kernel as it was because etcd cannot be
    // followed (stale, with the reason).
    let was_stale = s.stale;
    s.stale = report.stale.is_some();
    s.stale_reason = report.stale.clone();
    if !s.stale {
        s.stale_since = None;
    } else if !was_stale || s.stale_since.is_none() {
        s.stale_since = Some(Instant::now());
    }
    s.report = Some(report.clone());
    drop(s);
    if report.writes > 0 {
        tracing::info!(
            writes = report.writes,
            millis = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            phase = ?report.phase,
            epochs = ?report.installed_epochs,
            "converged"
        );
    }
}

/// One convergence under the node lock. The netlink work inside blocks, so
/// it runs with this worker handed off the runtime (`block_in_place`): the
/// watches, the probes and the lease keep running on the other worker.
async fn converge_once(
    cfg: &crate::config::PluginConfig,
    etcd: &Etcd,
    snap: Snapshot,
    acks: Option<&PeerAcks>,
    node: &str,
) -> Result<Report, ConvergeError> {
    let started = Instant::now();
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        // The lock serialises with ADDs; they hold it for one convergence.
        let mut state = converge::open_state(cfg)?;
        handle.block_on(converge::converge_with(
            cfg,
            &mut state,
            etcd,
            snap,
            acks,
            true,
            node.to_string(),
            started,
        ))
    })
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
