//! The agent's HTTP answers: `/livez` (the loop is alive), `/readyz` (the
//! node follows the datastore), `/healthz` (an alias of `/livez`, for
//! manifests written before the two) and `/metrics`.
//!
//! Ready means: the first convergence is done, the last one succeeded and
//! not too long ago, etcd answered within the stale grace, and (when the
//! agent keeps the conflist) our entry is in place. Liveness asks only that
//! the loop runs: restarting the agent does not bring etcd back.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conflist_watch::RepairStats;
use super::{lock, render, State};
use crate::metrics::{Exposition, Reply};

/// What the probes judge by.
#[derive(Debug, Clone)]
pub(super) struct Probes {
    /// The status lease's TTL, in seconds (the loop wakes every third of it).
    pub ttl: i64,
    /// The full re-convergence period.
    pub resync: Duration,
    /// How long etcd may be unreachable before the agent is not ready.
    pub stale_grace: Duration,
    /// The conflist watcher's counters, when it runs.
    pub repairs: Option<Arc<RepairStats>>,
}

impl Probes {
    /// How long the loop may go without running before it counts as wedged.
    fn wedged_after(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.ttl).unwrap_or(30).max(3) * 2)
    }

    /// How old the last successful convergence may be.
    fn converged_within(&self) -> Duration {
        self.resync * 2 + self.wedged_after()
    }
}

/// Answers one GET.
pub(super) fn handle(state: &Mutex<State>, path: &str, p: &Probes) -> Reply {
    match path {
        "/livez" | "/healthz" => livez(&lock(state), p, Instant::now()),
        "/readyz" => readyz(&lock(state), p, Instant::now()),
        "/metrics" => {
            let mut text = render(state);
            if let Some(r) = &p.repairs {
                let mut e = Exposition::default();
                r.expose(&mut e);
                text.push_str(&e.finish());
            }
            (200, text)
        }
        _ => (404, "not found: try /metrics, /livez or /readyz\n".into()),
    }
}

fn livez(s: &State, p: &Probes, now: Instant) -> Reply {
    if now.saturating_duration_since(s.last_loop) > p.wedged_after() {
        return (503, "the agent's loop has not run recently\n".into());
    }
    match (s.stale, &s.stale_reason) {
        (true, reason) => (
            200,
            format!(
                "ok (stale: {})\n",
                reason.as_deref().unwrap_or("etcd unreachable")
            ),
        ),
        (false, _) => (200, "ok\n".into()),
    }
}

fn readyz(s: &State, p: &Probes, now: Instant) -> Reply {
    let mut why: Vec<String> = Vec::new();
    if now.saturating_duration_since(s.last_loop) > p.wedged_after() {
        why.push("the agent's loop has not run recently".into());
    }
    match (s.last_success_at, &s.converge_error) {
        (None, Some(e)) => why.push(format!("the first convergence has not succeeded: {e}")),
        (None, None) => why.push("the first convergence has not completed yet".into()),
        (Some(_), Some(e)) => why.push(format!("the last convergence failed: {e}")),
        (Some(_), None) => {}
    }
    if let Some(at) = s.last_success_at {
        let age = now.saturating_duration_since(at);
        if age > p.converged_within() {
            why.push(format!(
                "no convergence has succeeded for {}s",
                age.as_secs()
            ));
        }
    }
    if let (true, Some(since)) = (s.stale, s.stale_since) {
        let age = now.saturating_duration_since(since);
        if age > p.stale_grace && s.last_success_at.is_some() {
            why.push(format!(
                "the node has not followed etcd for {}s (grace {}s): {}",
                age.as_secs(),
                p.stale_grace.as_secs(),
                s.stale_reason.as_deref().unwrap_or("unreachable")
            ));
        }
    }
    if let Some(problem) = p.repairs.as_ref().and_then(|r| r.problem()) {
        why.push(format!(
            "the calico-ipsec entry may be missing from Calico's conflist: {problem}"
        ));
    }
    if why.is_empty() {
        (200, "ready\n".into())
    } else {
        (503, format!("not ready: {}\n", why.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes() -> Probes {
        Probes {
            ttl: 30,
            resync: Duration::from_secs(60),
            stale_grace: Duration::from_secs(30),
            repairs: None,
        }
    }

    #[test]
    fn not_ready_before_the_first_convergence_nor_while_it_fails() {
        let now = Instant::now();
        let mut s = State::new("n1".into());
        assert_eq!(livez(&s, &probes(), now).0, 200);
        let (code, body) = readyz(&s, &probes(), now);
        assert_eq!(code, 503);
        assert!(body.contains("first convergence"), "{body}");
        s.converge_error = Some("the KEK cannot be read".into());
        assert!(readyz(&s, &probes(), now).1.contains("KEK"));
        s.converge_error = None;
        s.last_success_at = Some(now);
        s.stale = false;
        s.stale_since = None;
        assert_eq!(readyz(&s, &probes(), now), (200, "ready\n".into()));
        s.converge_error = Some("kernel said no".into());
        let (code, body) = readyz(&s, &probes(), now);
        assert_eq!(code, 503);
        assert!(
            body.contains("last convergence failed: kernel said no"),
            "{body}"
        );
    }

    #[test]
    fn stale_past_the_grace_or_an_old_success_is_not_ready_but_still_alive() {
        let t0 = Instant::now();
        let mut s = State::new("n1".into());
        s.last_success_at = Some(t0);
        s.last_loop = t0;
        s.stale = true;
        s.stale_since = Some(t0);
        s.stale_reason = Some("connection refused".into());
        let p = probes();
        assert_eq!(readyz(&s, &p, t0 + Duration::from_secs(10)).0, 200);
        let (code, body) = readyz(&s, &p, t0 + Duration::from_secs(31));
        assert_eq!(code, 503);
        assert!(body.contains("connection refused"), "{body}");
        let (code, body) = livez(&s, &p, t0 + Duration::from_secs(31));
        assert_eq!(code, 200);
        assert!(body.contains("stale"), "{body}");
        // The loop stopped: neither alive nor ready.
        assert_eq!(livez(&s, &p, t0 + Duration::from_secs(61)).0, 503);
        s.stale = false;
        s.last_loop = t0 + Duration::from_secs(200);
        let (code, body) = readyz(&s, &p, t0 + Duration::from_secs(200));
        assert_eq!(code, 503);
        assert!(
            body.contains("no convergence has succeeded for 200s"),
            "{body}"
        );
    }
}
