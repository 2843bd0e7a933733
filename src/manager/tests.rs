//! Unit tests of [`super::decide`].

use super::*;
use crate::datastore::ipsec::{self, EpochRecord, NodeStatus};

fn epoch(n: u32, state: EpochState, activated: Option<u64>) -> (EpochRecord, i64) {
    (
        EpochRecord {
            epoch: n,
            state,
            created: ipsec::rfc3339(1000),
            algorithm: ipsec::ALGORITHM.into(),
            key_bits: 128,
            icv_bits: None,
            kek_fingerprint: String::new(),
            sealed_secret: String::new(),
            seal: crate::datastore::records::SEAL_BOUND,
            also_sealed: Default::default(),
            agreement: None,
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
        handover: false,
        seal: 2,
        ..NodeStatus::default()
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
        unreadable: vec![],
        calico_nodes: vec![],
        identities: "d".into(),
        now: 2000,
        refused: vec![],
    }
}

#[test]
fn no_phase_step_past_a_node_calico_lists_without_a_live_agent() {
    let e = vec![epoch(1, EpochState::Active, Some(1000))];
    let mut v = view(
        Phase::Accept,
        Phase::Enforce,
        1,
        e,
        vec![node(Phase::Accept, 1, &[1], Some(1))],
    );
    v.calico_nodes = vec!["node-1".into(), "node-3".into()];
    assert!(
        matches!(decide(&v), Action::Wait(ref w) if w.contains("node-3") && w.contains("not live")),
        "{:?}",
        decide(&v)
    );
    // Once the operator excludes it by name, the phase moves on.
    v.config.0.excluded_nodes = vec!["node-3".into()];
    assert_eq!(
        decide(&v),
        Action::SetPhase {
            from: Phase::Accept,
            to: Phase::Encrypt
        }
    );
    assert!(decide::not_following(&v).is_empty());
}

#[test]
fn a_pending_epoch_held_back_names_the_listed_node_without_a_live_agent() {
    let e = vec![
        epoch(1, EpochState::Active, Some(1000)),
        epoch(2, EpochState::Pending, None),
    ];
    // node-3 is dead: no key of epoch 2, so no peer installs it.
    let live = vec![
        node(Phase::Enforce, 1, &[1], Some(1)),
        node(Phase::Enforce, 1, &[1], Some(1)),
    ];
    let mut v = view(Phase::Enforce, Phase::Enforce, 1, e, live);
    v.calico_nodes = vec!["node-1".into(), "node-2".into(), "node-3".into()];
    match decide(&v) {
        Action::Wait(w) => {
            assert!(w.contains("not yet installed on 2 node(s)"), "{w}");
            assert!(w.contains("no live agent") && w.contains("node-3"), "{w}");
            assert!(w.contains("excluded_nodes"), "{w}");
        }
        a => panic!("{a:?}"),
    }
    // Excluded, it is not named; once the live nodes install it, it is
    // activated.
    v.config.0.excluded_nodes = vec!["node-3".into()];
    assert!(matches!(decide(&v), Action::Wait(ref w) if !w.contains("node-3")));
    for (_, s) in &mut v.live {
        s.installed_epochs = vec![1, 2];
    }
    assert_eq!(decide(&v), Action::Activate(2));
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
    let why = waits(&old_gen);
    assert!(why.contains("acknowledge Accept: node-1"), "{why}");
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
    let why = waits(&v);
    assert!(why.contains("no node agent is alive"), "{why}");
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
    let why = waits(&v);
    assert!(why.contains("epoch Some(2)"), "{why}");
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
    let why = waits(&v);
    assert!(why.contains("steady"), "{why}");
    // While the KEK changes (an epoch sealed under two), no rotation.
    v.config.0.rotation_interval_seconds = 500;
    v.epochs[0]
        .0
        .also_sealed
        .insert("0123456789abcdef".into(), String::new());
    assert!(
        matches!(decide(&v), Action::Wait(w) if w.contains("KEK rotation")),
        "{:?}",
        decide(&v)
    );
}

#[test]
fn an_unreadable_leased_record_holds_acknowledged_steps_and_no_record_is_named() {
    let p = Phase::Enforce;
    let mut v = view(
        Phase::Accept,
        p,
        1,
        vec![epoch(1, EpochState::Active, Some(1000))],
        vec![node(Phase::Accept, 1, &[1], Some(1))],
    );
    v.unreadable = vec!["node-9".into()];
    assert!(
        matches!(decide(&v), Action::Wait(w) if w.contains("node-9") && w.contains("cannot be read"))
    );
    v.unreadable.clear();
    assert!(matches!(decide(&v), Action::SetPhase { .. }));
    // With the phase off nothing waits for acknowledgement.
    let mut off = view(
        Phase::Off,
        Phase::Off,
        0,
        vec![
            epoch(1, EpochState::Active, Some(1000)),
            epoch(2, EpochState::Pending, None),
        ],
        vec![],
    );
    assert!(matches!(decide(&off), Action::Wait(w) if w.contains("no node agent is alive")));
    off.unreadable = vec!["node-9".into()];
    assert_eq!(decide(&off), Action::Activate(2));
}

#[test]
fn a_node_that_lost_its_epoch_key_brings_a_new_epoch_at_once() {
    use Phase::Enforce;
    let lost = |installed: &[u32], epochs: &[u32]| NodeStatus {
        lost_epochs: epochs.to_vec(),
        ..node(Enforce, 0, installed, Some(1))
    };
    // The active epoch lost by one node: rotate now, not at the interval
    // (which is 0 here: never).
    let v = view(
        Enforce,
        Enforce,
        0,
        vec![epoch(1, EpochState::Active, Some(1000))],
        vec![node(Enforce, 0, &[1], Some(1)), lost(&[], &[1])],
    );
    assert_eq!(decide(&v), Action::Rotate);
    // A pending epoch it lost can never be installed there: retired.
    let v = view(
        Enforce,
        Enforce,
        0,
        vec![
            epoch(1, EpochState::Active, Some(1000)),
            epoch(2, EpochState::Pending, None),
        ],
        vec![node(Enforce, 0, &[1, 2], Some(1)), lost(&[], &[1, 2])],
    );
    assert_eq!(decide(&v), Action::Retire(vec![2]));
    // Nobody lost anything: steady.
    let v = view(
        Enforce,
        Enforce,
        0,
        vec![epoch(1, EpochState::Active, Some(1000))],
        vec![node(Enforce, 0, &[1], Some(1))],
    );
    let why = waits(&v);
    assert!(why.contains("steady"), "{why}");
}

/// The reason of a `Wait`, or a failure naming the action taken instead.
fn waits(v: &View) -> String {
    match decide(v) {
        Action::Wait(why) => why,
        other => panic!("expected a wait, got {other:?}"),
    }
}

#[test]
fn an_altered_epoch_is_retired_or_rotated_away_never_activated() {
    use Phase::Enforce;
    let p = Enforce;
    // An altered pending epoch, installed everywhere as far as the statuses
    // say: retired, not activated.
    let mut v = view(
        p,
        p,
        3,
        vec![
            epoch(1, EpochState::Active, Some(1500)),
            epoch(2, EpochState::Pending, None),
        ],
        vec![node(p, 3, &[1, 2], Some(1)); 2],
    );
    assert_eq!(decide(&v), Action::Activate(2), "unaltered: activated");
    v.refused = vec![2];
    assert_eq!(decide(&v), Action::Retire(vec![2]));
    // The active epoch altered: a new epoch is made at once.
    let mut v = view(
        p,
        p,
        3,
        vec![epoch(1, EpochState::Active, Some(1500))],
        vec![node(p, 3, &[1], Some(1)); 2],
    );
    let why = waits(&v);
    assert!(why.contains("steady"), "{why}");
    v.refused = vec![1];
    assert_eq!(decide(&v), Action::Rotate);
}

#[test]
fn rotation_counts_from_the_managers_activation_stamp_not_the_creators_clock() {
    use Phase::Enforce;
    let p = Enforce;
    // Created (by `keys rotate` on a host whose clock is far behind) at
    // 1000, activated by the manager at 1900: with a 500 s interval the
    // rotation is due at 2400, not at 1500.
    let mut v = view(
        p,
        p,
        3,
        vec![epoch(1, EpochState::Active, Some(1900))],
        vec![node(p, 3, &[1], Some(1))],
    );
    v.config.0.rotation_interval_seconds = 500;
    let why = waits(&v);
    assert!(why.contains("steady"), "{why}");
    v.now = 2400;
    assert_eq!(decide(&v), Action::Rotate);
    // A stamp in the manager's future (another host's clock), or one it
    // cannot read, is stamped again: never a rotation or a retirement
    // decided on it.
    v.now = 2000;
    v.epochs[0].0.activated = Some(ipsec::rfc3339(9000));
    assert_eq!(decide(&v), Action::Activate(1));
    v.epochs[0].0.activated = Some("yesterday".into());
    assert_eq!(decide(&v), Action::Activate(1));
}
