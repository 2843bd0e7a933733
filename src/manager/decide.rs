//! The leader's decision: at most one step from what it sees, a pure
//! function (see the module above for the rules).

use crate::datastore::ipsec::{
    parse_rfc3339, ClusterConfig, EpochRecord, EpochState, NodeStatus, Phase,
};

/// What the leader sees in one tick.
#[derive(Debug, Clone)]
pub struct View {
    /// The config and its revision.
    pub config: (ClusterConfig, i64),
    /// Every epoch record and its revision, in epoch order.
    pub epochs: Vec<(EpochRecord, i64)>,
    /// Every live node's status (their leases alive).
    pub live: Vec<(String, NodeStatus)>,
    /// Nodes whose leased status record cannot be read: they may hold SAs,
    /// so no step that needs every node's acknowledgement is taken.
    pub unreadable: Vec<String>,
    /// The nodes Calico lists (its Node resources): all of them while a
    /// phase step is pending (the step waits for each one that is neither
    /// live nor excluded by the operator); while an epoch is pending, those
    /// that ever held an incarnation (to name what holds it back).
    pub calico_nodes: Vec<String>,
    /// [`crate::datastore::ipsec::identities_digest`] of the identity records now.
    pub identities: String,
    /// Unix seconds now.
    pub now: u64,
    /// Epochs whose record claims this manager's KEK but does not open
    /// with the parameters it carries (altered in etcd): no node uses them.
    pub refused: Vec<u32>,
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

/// The first five of `names`, for a wait's reason.
fn first_five<'a>(names: impl IntoIterator<Item = &'a String>) -> String {
    let n: Vec<&str> = names.into_iter().take(5).map(String::as_str).collect();
    n.join(", ")
}

fn names(v: &[&(String, NodeStatus)]) -> String {
    first_five(v.iter().map(|(n, _)| n))
}

/// The nodes Calico lists that have no live agent and that the operator has
/// not excluded.
pub fn not_following(v: &View) -> Vec<String> {
    let (cfg, _) = &v.config;
    v.calico_nodes
        .iter()
        .filter(|n| {
            !v.live.iter().any(|(l, _)| l == *n)
                && !v.unreadable.contains(n)
                && !cfg.excluded_nodes.contains(n)
        })
        .cloned()
        .collect()
}

/// Decides the next step (a pure function of the view).
pub fn decide(v: &View) -> Action {
    let (cfg, _) = &v.config;
    if v.live.is_empty() && v.unreadable.is_empty() {
        return Action::Wait(
            "no node agent is alive (no leased status record under /calico/ipsec/v1/nodes/)".into(),
        );
    }
    // A step every node must acknowledge waits for nodes we cannot read.
    let unreadable = |what: &str| {
        Action::Wait(format!(
            "{what}: {} node(s) publish a status record that cannot be read: {}",
            v.unreadable.len(),
            first_five(&v.unreadable)
        ))
    };
    let blocked = !v.unreadable.is_empty();
    // Out of phase off, a node's acknowledgement counts only once it has
    // converged with every node's current incarnation (the same identity
    // digest as ours): then it holds the SAs of every peer.
    let current = |s: &NodeStatus| cfg.phase == Phase::Off || s.identities == v.identities;
    if cfg.phase != cfg.target_phase {
        // A node Calico lists whose agent is not live may still send in
        // clear (paused, starved, partitioned): no step past it.
        let absent = not_following(v);
        if !absent.is_empty() {
            return Action::Wait(format!(
                "phase {:?} → {:?}: waiting for {} node(s) that Calico lists but whose agent is not live (or exclude them by name in excluded_nodes): {}",
                cfg.phase,
                cfg.target_phase,
                absent.len(),
                first_five(&absent)
            ));
        }
        let behind: Vec<&(String, NodeStatus)> = v
            .live
            .iter()
            .filter(|(_, s)| {
                s.acked_phase != cfg.phase
                    || s.acked_generation != cfg.phase_generation
                    || !current(s)
            })
            .collect();
        if behind.is_empty() && blocked {
            return unreadable(&format!("phase {:?} → {:?}", cfg.phase, cfg.target_phase));
        }
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
    let lost = |e: u32| v.live.iter().any(|(_, s)| s.lost_epochs.contains(&e));
    let refused = |e: u32| v.refused.contains(&e);
    if let Some(p) = of(EpochState::Pending).map(|e| e.epoch).min() {
        if refused(p) {
            // Altered in etcd: no node installs it. Retire it; the next
            // rotation makes a fresh one (under a new number).
            return Action::Retire(vec![p]);
        }
        if newest_active.is_some_and(|a| p < a) {
            // A pending epoch older than the active one can never be used.
            return Action::Retire(vec![p]);
        }
        if acks && lost(p) {
            // A node lost its key for it (a reboot): it could never install
            // it. Retire it; the next rotation makes a fresh one.
            return Action::Retire(vec![p]);
        }
        let missing: Vec<_> = v
            .live
            .iter()
            .filter(|(_, s)| !s.installed_epochs.contains(&p) || !current(s))
            .collect();
        if acks && missing.is_empty() && blocked {
            return unreadable(&format!("epoch {p} pending"));
        }
        if !acks || missing.is_empty() {
            return Action::Activate(p);
        }
        // A listed node without a live agent publishes no key for it, and
        // a node installs an epoch only once every peer has: name it.
        let absent = not_following(v);
        let held_by = if absent.is_empty() {
            String::new()
        } else {
            format!(
                "; {} node(s) that Calico lists have no live agent to publish a key for it (exclude them by name in excluded_nodes): {}",
                absent.len(),
                first_five(&absent)
            )
        };
        return Action::Wait(format!(
            "epoch {p} pending: not yet installed on {} node(s): {}{held_by}",
            missing.len(),
            names(&missing)
        ));
    }
    // The overlap and the next rotation count from the newest epoch's
    // activation, which this manager stamps: a time it cannot read, or one
    // in its future (another host's clock), is stamped again now.
    if let Some(rec) = newest_active.and_then(|n| of(EpochState::Active).find(|e| e.epoch == n)) {
        let stamped = rec.activated.as_deref().and_then(parse_rfc3339);
        if stamped.is_none_or(|t| t > v.now) {
            return Action::Activate(rec.epoch);
        }
    }
    if let Some(newest) = newest_active {
        let older: Vec<u32> = of(EpochState::Active)
            .map(|e| e.epoch)
            .filter(|e| *e < newest)
            .collect();
        if !older.is_empty() {
            let rec = of(EpochState::Active).find(|e| e.epoch == newest);
            let since = rec
                .and_then(|e| e.activated.as_deref())
                .and_then(parse_rfc3339)
                .unwrap_or(v.now);
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
            if blocked {
                return unreadable(&format!("epoch {newest} active"));
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
        if !acks || (holding.is_empty() && !blocked) {
            return Action::Delete(e.epoch);
        }
    }
    // While the KEK changes, a new epoch could be sealed under one KEK only,
    // and nodes holding the other could not open it: rotations wait.
    let kek_changing = v.epochs.iter().any(|(e, _)| !e.also_sealed.is_empty());
    if let Some(newest) = newest_active.filter(|_| !kek_changing) {
        // A node that lost its key for the active epoch can send to no one:
        // rotate now rather than at the interval.
        if (acks && lost(newest)) || refused(newest) {
            return Action::Rotate;
        }
        if cfg.rotation_interval_seconds > 0 {
            let rec = of(EpochState::Active).find(|e| e.epoch == newest);
            let born = rec
                .and_then(|e| e.activated.as_deref())
                .and_then(parse_rfc3339)
                .unwrap_or(v.now);
            if v.now >= born.saturating_add(cfg.rotation_interval_seconds) {
                return Action::Rotate;
            }
        }
    }
    if kek_changing {
        return Action::Wait(
            "a KEK rotation is in progress (epochs sealed under two KEKs): rotations wait until `keys rotate-kek --finish`".into(),
        );
    }
    Action::Wait(format!(
        "steady: phase {:?}, epoch {:?}",
        cfg.phase, newest_active
    ))
}
