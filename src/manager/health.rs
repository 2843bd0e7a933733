//! The manager's HTTP answers and what they judge by: `/livez` (the loop
//! runs), `/readyz` (it can do its job), `/healthz` (an alias of `/livez`)
//! and `/metrics`; and the status the leader publishes for `enable --wait`.
//!
//! Ready means: etcd answers, the KEK can be read (a leader seals every new
//! epoch with it), and, while leading, the last step and the last write of
//! the leader's status succeeded.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{lock, Stats};
use crate::datastore::etcd::Etcd;
use crate::datastore::ipsec::{encode, leader_key, manager_status_key, now_rfc3339};
use crate::datastore::ipsec::{EpochState, IpsecStore, IpsecStoreError};
use crate::datastore::leader::Fence;
use crate::keys::Kek;
use crate::metrics::{Exposition, Reply};

/// How long the loop may go without running before it counts as wedged.
pub(super) const WEDGED_AFTER: Duration = Duration::from_secs(60);
/// How long one read of the KEK may take.
const KEK_READ_LIMIT: Duration = Duration::from_secs(2);

/// `/calico/ipsec/v1/manager/status`: what the leader is doing, under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerStatus {
    /// The leader's id.
    pub leader: String,
    /// Why it is not stepping, or the step it last took.
    pub waiting: String,
    /// When it wrote this, RFC 3339 UTC.
    pub heartbeat: String,
}

/// Answers one GET.
pub(super) fn handle(stats: &Mutex<Stats>, path: &str) -> Reply {
    let s = lock(stats);
    match path {
        "/livez" | "/healthz" => livez(&s, Instant::now()),
        "/readyz" => readyz(&s, Instant::now()),
        "/metrics" => (200, render(&s)),
        _ => (404, "not found: try /metrics, /livez or /readyz\n".into()),
    }
}

fn livez(s: &Stats, now: Instant) -> Reply {
    match s.last_loop {
        Some(t) if now.saturating_duration_since(t) > WEDGED_AFTER => {
            (503, "the manager's loop has not run recently\n".into())
        }
        _ => (200, "ok\n".into()),
    }
}

/// Ready when this manager can do its job; the body says why not.
pub(super) fn readyz(s: &Stats, now: Instant) -> Reply {
    let mut why: Vec<String> = Vec::new();
    match s.last_loop {
        None => why.push("the manager has not reached etcd yet".into()),
        Some(t) if now.saturating_duration_since(t) > WEDGED_AFTER => {
            why.push("the manager's loop has not run recently".into());
        }
        Some(_) => {}
    }
    if s.last_loop.is_some() && !s.etcd_reachable {
        why.push("etcd does not answer".into());
    }
    if let Some(e) = &s.kek_error {
        why.push(format!(
            "the KEK cannot be read, so no epoch can be sealed: {e}"
        ));
    }
    if s.leader {
        if let Some(e) = &s.write_error {
            why.push(format!("the leader cannot write to etcd: {e}"));
        }
        if let Some(e) = &s.step_error {
            why.push(format!("the leader's last step failed: {e}"));
        }
    }
    if !why.is_empty() {
        return (503, format!("not ready: {}\n", why.join("; ")));
    }
    if s.leader {
        (200, format!("ready (leader): {}\n", s.waiting))
    } else {
        (200, "ready (standby)\n".into())
    }
}

/// Reads the KEK off the loop, at most [`KEK_READ_LIMIT`], one read at a time.
#[derive(Debug, Default)]
pub(super) struct KekCheck {
    pending: Option<tokio::task::JoinHandle<Result<(), String>>>,
    last: Option<Instant>,
}

impl KekCheck {
    /// Checks the KEK every `every`, recording the outcome in `stats`.
    pub(super) async fn run(&mut self, path: &Path, every: Duration, stats: &Mutex<Stats>) {
        if self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        let handle = self.pending.take().unwrap_or_else(|| {
            let p = path.to_path_buf();
            tokio::task::spawn_blocking(move || {
                Kek::load(&p).map(|_| ()).map_err(|e| e.to_string())
            })
        });
        let mut handle = handle;
        let outcome = match tokio::time::timeout(KEK_READ_LIMIT, &mut handle).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("the read failed: {e}")),
            Err(_) => {
                // Still blocked (a FIFO?): keep waiting on the same read.
                self.pending = Some(handle);
                Err(format!(
                    "reading {} did not finish within {}s",
                    path.display(),
                    KEK_READ_LIMIT.as_secs()
                ))
            }
        };
        self.last = Some(Instant::now());
        let mut s = lock(stats);
        match (&s.kek_error, &outcome) {
            (None, Err(e)) => {
                tracing::error!(error = %e, kek_file = %path.display(), "the KEK cannot be read: not ready, and no rotation can happen")
            }
            (Some(_), Ok(())) => {
                tracing::info!(kek_file = %path.display(), "the KEK can be read again")
            }
            _ => {}
        }
        s.kek_error = outcome.err();
    }
}

/// The leader writes its status under its lease and the fence: this is also
/// the proof that it can write. `Ok(false)` when the fence failed (no longer
/// the leader).
pub(super) async fn publish(
    etcd: &Etcd,
    lease: i64,
    fence: &Fence,
    waiting: &str,
) -> Result<bool, IpsecStoreError> {
    let status = ManagerStatus {
        leader: fence.id().to_string(),
        waiting: waiting.to_string(),
        heartbeat: now_rfc3339(),
    };
    IpsecStore::new(etcd)
        .put_leased_fenced(fence, &manager_status_key(), encode(&status), lease)
        .await
}

/// Why the cluster is not at its target yet, as the leader says (for
/// `enable --wait`): who leads and what it waits for, or that none leads.
pub async fn explain(etcd: &Etcd) -> Result<String, IpsecStoreError> {
    let Some(leader) = etcd.get(&leader_key()).await? else {
        return Ok(format!(
            "no manager is leading (no {}): is the calico-ipsec-manager Deployment running, and can it reach etcd?",
            leader_key()
        ));
    };
    let leader = String::from_utf8_lossy(&leader.value).into_owned();
    let status = etcd
        .get(&manager_status_key())
        .await?
        .and_then(|kv| serde_json::from_slice::<ManagerStatus>(&kv.value).ok())
        .filter(|s| s.leader == leader);
    Ok(match status {
        Some(s) => format!("manager {leader} is waiting: {}", s.waiting),
        None => {
            format!("manager {leader} leads but has not said what it waits for (an older version?)")
        }
    })
}

/// The manager's metrics.
pub(super) fn render(s: &Stats) -> String {
    let mut e = Exposition::default();
    e.gauge(
        "calico_ipsec_manager_leader",
        "1 while this manager is the leader",
        if s.leader { 1.0 } else { 0.0 },
    );
    e.family(
        "calico_ipsec_manager_node_not_following",
        "gauge",
        "1 for each node Calico lists whose agent is not live and that is not excluded: no phase step is taken past it",
    );
    for n in &s.not_following {
        e.sample(
            "calico_ipsec_manager_node_not_following",
            &[("node", n)],
            1.0,
        );
    }
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
    e.counter(
        "calico_ipsec_manager_phase_changes_total",
        "Phase steps this manager made",
        s.phase_changes as f64,
    );
    e.counter(
        "calico_ipsec_manager_activations_total",
        "Epochs this manager activated",
        s.activations as f64,
    );
    e.counter(
        "calico_ipsec_manager_aggregate_writes_total",
        "Writes of the aggregate of the statuses (only when it changed)",
        s.aggregate_writes as f64,
    );
    e.counter(
        "calico_ipsec_manager_failures_total",
        "Steps that failed",
        s.failures as f64,
    );
    e.family(
        "calico_ipsec_manager_ignored_status_records",
        "gauge",
        "Status records under nodes/ that count as no live node, by why",
    )
    .sample(
        "calico_ipsec_manager_ignored_status_records",
        &[("reason", "unreadable")],
        s.unreadable as f64,
    )
    .sample(
        "calico_ipsec_manager_ignored_status_records",
        &[("reason", "unleased")],
        s.unleased as f64,
    );
    e.gauge(
        "calico_ipsec_manager_ready",
        "1 when /readyz answers 200",
        if readyz(s, std::time::Instant::now()).0 == 200 {
            1.0
        } else {
            0.0
        },
    );
    e.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_that_cannot_read_the_kek_or_write_is_not_ready() {
        let now = Instant::now();
        let mut s = Stats::default();
        assert_eq!(readyz(&s, now).0, 503, "before etcd answered");
        s.last_loop = Some(now);
        s.etcd_reachable = true;
        s.leader = true;
        s.waiting = "steady".into();
        assert_eq!(readyz(&s, now), (200, "ready (leader): steady\n".into()));
        s.kek_error = Some("permission denied".into());
        let (code, body) = readyz(&s, now);
        assert_eq!(code, 503);
        assert!(
            body.contains("KEK") && body.contains("permission denied"),
            "{body}"
        );
        s.kek_error = None;
        s.write_error = Some("etcdserver: permission denied".into());
        assert!(readyz(&s, now).1.contains("cannot write"));
        // A standby is not judged by the leader's writes.
        s.leader = false;
        assert_eq!(readyz(&s, now).0, 200);
        s.etcd_reachable = false;
        assert_eq!(readyz(&s, now).0, 503);
        assert_eq!(livez(&s, now).0, 200, "etcd away is no reason to restart");
        assert_eq!(livez(&s, now + WEDGED_AFTER * 2).0, 503);
    }

    #[test]
    fn counters_are_typed_counter() {
        let text = render(&Stats::default());
        for name in [
            "calico_ipsec_manager_failures_total",
            "calico_ipsec_manager_activations_total",
            "calico_ipsec_manager_phase_changes_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{text}");
        }
    }
}
