//! The reconciler's parts that need no etcd: backoff, the watch cache,
//! and what counts as a repair of drift.

use super::*;

fn kv(key: &str, value: &str) -> Kv {
    Kv {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        mod_revision: 1,
        lease: 0,
    }
}

#[test]
fn backoff_doubles_to_its_ceiling_and_resets_on_success() {
    let mut b = Backoff::new();
    let waits: Vec<Duration> = (0..9).map(|_| b.failed()).collect();
    assert_eq!(waits[0], RETRY_MIN);
    assert_eq!(waits[1], RETRY_MIN * 2);
    assert_eq!(waits[8], RETRY_MAX, "capped: {waits:?}");
    b.skip();
    assert!(b.at.is_none(), "new data tries at once");
    assert_eq!(b.failed(), RETRY_MAX, "but the delay is kept");
    b.succeeded();
    assert_eq!(b.failed(), RETRY_MIN);
}

#[test]
fn the_cache_is_ready_only_with_every_prefix_and_every_watch_up() {
    let state = Mutex::new(State::new("node-1".into()));
    let mut c = WatchCache::new(2);
    assert!(c.not_ready().is_some());
    assert!(c.absorb(
        WatchMsg::Reset {
            idx: 0,
            kvs: vec![kv("/a", "1")],
            revision: 5
        },
        &state
    ));
    assert!(c.not_ready().is_some(), "the statuses prefix is missing");
    assert!(c.absorb(
        WatchMsg::Reset {
            idx: 1,
            kvs: vec![],
            revision: 5
        },
        &state
    ));
    assert_eq!(c.not_ready(), None);
    assert!(!c.absorb(
        WatchMsg::Down {
            idx: 0,
            reason: "gone".into()
        },
        &state
    ));
    assert_eq!(c.not_ready(), Some("an etcd watch is down"));
    assert!(lock(&state).stale, "a down watch makes the node stale");
    assert!(c.absorb(WatchMsg::Up { idx: 0 }, &state), "back: converge");
    assert!(!c.absorb(WatchMsg::Up { idx: 0 }, &state), "already up");
    assert!(
        !c.absorb(WatchMsg::Up { idx: 7 }, &state),
        "an unknown prefix is ignored, never a panic"
    );
    assert!(c.absorb(
        WatchMsg::Changes {
            idx: 0,
            changes: vec![Change::Delete("/a".into()), Change::Put(kv("/b", "2"))],
            revision: 6
        },
        &state
    ));
    let (rev, map) = c.ranges[0].as_ref().expect("range");
    assert_eq!(*rev, 6);
    assert_eq!(map.keys().collect::<Vec<_>>(), vec!["/b"]);
}

fn report(writes: usize, kernel_drift: Option<bool>) -> Report {
    Report {
        writes,
        kernel_drift,
        ..Report::default()
    }
}

#[test]
fn only_a_kernel_changed_outside_calico_ipsec_counts_as_drift() {
    let woke = BTreeSet::from([KernelEvent::Xfrm("state added")]);
    let quiet = BTreeSet::new();
    // The kernel held what the last convergence left: the writes follow
    // etcd (a rotation, a peer's new incarnation), even when our own
    // writes' notifications woke the agent.
    assert!(!repaired_drift(&report(4, Some(false)), &woke));
    // It held something else: drift, found even with no notification (a
    // lost one, the periodic resync).
    assert!(repaired_drift(&report(2, Some(true)), &quiet));
    // No mark to compare with: a notification is taken as drift.
    assert!(repaired_drift(&report(2, None), &woke));
    assert!(!repaired_drift(&report(2, None), &quiet));

    // Counted only when something was put back.
    let state = Mutex::new(State::new("node-1".into()));
    record_success(&state, &report(0, Some(true)), &quiet, Duration::ZERO);
    record_success(&state, &report(4, Some(false)), &woke, Duration::ZERO);
    assert_eq!(lock(&state).kernel_repairs, 0);
    record_success(&state, &report(2, Some(true)), &quiet, Duration::ZERO);
    assert_eq!(lock(&state).kernel_repairs, 1);
}
