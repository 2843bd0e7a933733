//! Tests of the hand-over between incarnations.
use super::*;
use crate::datastore::calico::Topology;
use crate::datastore::ipsec::{EpochRecord, EpochState, Phase};
use crate::xfrm::{Inputs, Plan};

fn topology() -> Topology {
    let path = format!(
        "{}/tests/fixtures/calico/etcd-3-nodes.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).expect("JSON");
    let kvs: Vec<(String, Vec<u8>)> = v
        .into_iter()
        .map(|(k, v)| (k, serde_json::to_vec(&v).expect("compact")))
        .collect();
    Topology::from_kvs(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

fn ids(incarnations: [u32; 3]) -> BTreeMap<String, Identity> {
    (1..=3u16)
        .map(|n| {
            let identity = Identity {
                id: n,
                incarnation: incarnations[usize::from(n) - 1],
                boot_id: String::new(),
            };
            (format!("node-{n}"), identity)
        })
        .collect()
}

/// node-1's desired state in enforce with epoch 1 active.
fn desired_of(me: &str, ids: &BTreeMap<String, Identity>) -> Desired {
    desired_sealed(me, ids, crate::datastore::records::SEAL_BOUND)
}

/// The same with epoch 1 sealed as `seal`.
fn desired_sealed(me: &str, ids: &BTreeMap<String, Identity>, seal: u32) -> Desired {
    let epochs = [EpochRecord {
        epoch: 1,
        state: EpochState::Active,
        created: String::new(),
        algorithm: String::new(),
        key_bits: 128,
        icv_bits: None,
        kek_fingerprint: String::new(),
        sealed_secret: String::new(),
        seal,
        also_sealed: Default::default(),
        agreement: None,
        activated: None,
    }];
    Desired::compute(&Inputs {
        topology: &topology(),
        me,
        my_identity: ids.get(me),
        identities: ids,
        phase: Phase::Enforce,
        epochs: &epochs,
        icv_bits: 128,
        agreement: &std::collections::BTreeMap::new(),
    })
    .expect("computes")
}

fn acks(current: &BTreeMap<String, Identity>, acked: &[&str], handover: &[&str]) -> PeerAcks {
    let digest = crate::datastore::ipsec::identities_digest(current);
    let peers = (1..=3)
        .map(|n| format!("node-{n}"))
        .map(|n| {
            let ack = PeerAck {
                incarnation: current[&n].incarnation,
                identities: if acked.contains(&n.as_str()) {
                    digest.clone()
                } else {
                    "older".into()
                },
                handover: handover.contains(&n.as_str()),
                revs: None,
            };
            (n, ack)
        })
        .collect();
    PeerAcks {
        current: digest,
        peers,
        ..PeerAcks::default()
    }
}

/// Acknowledgements by revision, as `me` sees them: node-N's identity
/// record at `ids_at[N-1]`, and each peer's (acked, settled) as the
/// aggregate states it.
fn rev_acks(me: &str, ids_at: [i64; 3], says: [(i64, i64); 3]) -> PeerAcks {
    let mut agg = Aggregate {
        exact: true,
        ..Aggregate::default()
    };
    for (n, (acked, settled)) in says.iter().enumerate() {
        agg.nodes.insert(
            format!("node-{}", n + 1),
            Revs {
                acked: *acked,
                settled: *settled,
            },
        );
    }
    let mut a = PeerAcks::from_aggregate(&agg, &ids([11, 20, 30]));
    a.me = me.to_string();
    a.revisions = (0..3)
        .map(|n| (format!("node-{}", n + 1), ids_at[n]))
        .collect();
    a
}

/// node-1's inbound SAs in `d`, as seen by a peer.
fn inbound(d: &Desired) -> usize {
    d.states
        .values()
        .filter(|s| s.dir == Dir::In && s.sender == "node-1")
        .count()
}

fn out_spis(d: &Desired) -> BTreeMap<String, u32> {
    d.states
        .values()
        .filter(|s| s.dir == Dir::Out)
        .map(|s| (s.receiver.clone(), s.spi))
        .collect()
}

#[test]
fn a_new_incarnation_sends_on_the_old_sas_until_each_peer_acknowledges() {
    let before = ids([10, 20, 30]);
    let held = Held::exactly(&desired_of("node-1", &before));
    let old = out_spis(&desired_of("node-1", &before));
    let after = ids([11, 20, 30]);
    let new = out_spis(&desired_of("node-1", &after));
    assert_ne!(old, new);

    // Nobody has acknowledged: every old SA stays, no new one is added.
    let mut want = desired_of("node-1", &after);
    let h = hand_over(&mut want, &held, &after, Some(&acks(&after, &[], &[])));
    assert_eq!(out_spis(&want), old);
    assert_eq!(h.waiting_for.len(), 2);
    let plan = Plan::diff(&want, &held);
    assert!(
        plan.is_empty(),
        "nothing to do while waiting: {}",
        plan.summary()
    );

    // node-2 acknowledges: its new SA is added and its old one deleted;
    // node-3 still gets the old one.
    let mut want = desired_of("node-1", &after);
    let h = hand_over(
        &mut want,
        &held,
        &after,
        Some(&acks(&after, &["node-2"], &[])),
    );
    assert_eq!(out_spis(&want)["node-2"], new["node-2"]);
    assert_eq!(out_spis(&want)["node-3"], old["node-3"]);
    assert_eq!(h.waiting_for.iter().collect::<Vec<_>>(), ["node-3"]);
    let plan = Plan::diff(&want, &held);
    assert_eq!(plan.add_states.len(), 1);
    assert_eq!(plan.del_states.len(), 1);
    assert!(plan.replace_states.is_empty());

    // Without the statuses (an ADD), the hand-over waits.
    let mut want = desired_of("node-1", &after);
    let h = hand_over(&mut want, &held, &after, None);
    assert_eq!(out_spis(&want), old);
    assert!(!h.is_done());
}

#[test]
fn with_no_old_sa_left_the_new_one_goes_in_at_once() {
    let after = ids([11, 20, 30]);
    let mut want = desired_of("node-1", &after);
    let expect = out_spis(&want);
    let h = hand_over(
        &mut want,
        &Held::default(),
        &after,
        Some(&acks(&after, &[], &[])),
    );
    assert_eq!(out_spis(&want), expect);
    assert!(h.is_done());
}

#[test]
fn an_altered_old_sa_is_never_kept() {
    let before = ids([10, 20, 30]);
    let mut held = Held::exactly(&desired_of("node-1", &before));
    for sa in held.states.values_mut() {
        sa.icv_bits = 64;
    }
    let after = ids([11, 20, 30]);
    let mut want = desired_of("node-1", &after);
    let expect = out_spis(&want);
    hand_over(&mut want, &held, &after, Some(&acks(&after, &[], &[])));
    assert_eq!(
        out_spis(&want),
        expect,
        "an altered SA is replaced, never re-created"
    );
}

#[test]
fn a_receiver_keeps_the_senders_old_inbound_sa_while_it_may_be_used() {
    // node-2 sees node-1 move from incarnation 10 to 11.
    let before = ids([10, 20, 30]);
    let held = Held::exactly(&desired_of("node-2", &before));
    let after = ids([11, 20, 30]);
    // node-1 says it is handing over: both inbound SAs.
    let mut want = desired_of("node-2", &after);
    let h = hand_over(
        &mut want,
        &held,
        &after,
        Some(&acks(&after, &["node-2"], &["node-1"])),
    );
    assert_eq!(inbound(&want), 2);
    assert_eq!(h.kept_inbound, 1);
    // node-1's status predates its new identity: both, too.
    let mut stale = acks(&after, &["node-2"], &[]);
    stale.peers.get_mut("node-1").expect("node-1").incarnation = 10;
    let mut want = desired_of("node-2", &after);
    hand_over(&mut want, &held, &after, Some(&stale));
    assert_eq!(inbound(&want), 2);
    // node-1 has not acknowledged the current identities: it may still
    // send on the older one, so both stay.
    let mut want = desired_of("node-2", &after);
    hand_over(
        &mut want,
        &held,
        &after,
        Some(&acks(&after, &["node-2"], &[])),
    );
    assert_eq!(inbound(&want), 2);
    // node-1 has switched and acknowledged: only the new one.
    let mut want = desired_of("node-2", &after);
    let h = hand_over(
        &mut want,
        &held,
        &after,
        Some(&acks(&after, &["node-1", "node-2"], &[])),
    );
    assert_eq!(inbound(&want), 1);
    assert!(h.is_done());
}

#[test]
fn peers_without_a_status_take_no_part() {
    // No agent anywhere (statuses read, none found): switch at once, and
    // keep no older inbound SA, as before hand-overs existed.
    let before = ids([10, 20, 30]);
    let after = ids([11, 20, 30]);
    let none = PeerAcks {
        current: crate::datastore::ipsec::identities_digest(&after),
        ..PeerAcks::default()
    };
    let held = Held::exactly(&desired_of("node-1", &before));
    let mut want = desired_of("node-1", &after);
    assert!(possible(&want, &held));
    let expect = out_spis(&want);
    let h = hand_over(&mut want, &held, &after, Some(&none));
    assert_eq!(out_spis(&want), expect);
    assert!(h.is_done());

    let held = Held::exactly(&desired_of("node-2", &before));
    let mut want = desired_of("node-2", &after);
    let h = hand_over(&mut want, &held, &after, Some(&none));
    assert!(h.is_done());
    assert_eq!(inbound(&want), 1);

    // Nothing to hand over: no status read needed.
    let same = desired_of("node-1", &before);
    assert!(!possible(&same, &Held::exactly(&same)));
}

#[test]
fn with_keys_that_bind_both_ends_a_receivers_new_incarnation_hands_over_too() {
    use crate::datastore::records::SEAL_BOTH_ENDS;
    // node-1 moves from incarnation 10 to 11 (it lost an outbound SA, say):
    // its inbound SAs get new SPIs and keys; node-2 still sends on the
    // one made for incarnation 10 until it has read node-1's new one.
    let before = ids([10, 20, 30]);
    let after = ids([11, 20, 30]);
    let was = desired_sealed("node-1", &before, SEAL_BOTH_ENDS);
    let held = Held::exactly(&was);
    let from_2 = |d: &Desired| {
        let mut spis: Vec<u32> = d
            .states
            .values()
            .filter(|s| s.dir == Dir::In && s.sender == "node-2")
            .map(|s| s.spi)
            .collect();
        spis.sort_unstable();
        spis
    };
    let old = from_2(&was);
    let mut want = desired_sealed("node-1", &after, SEAL_BOTH_ENDS);
    let new = from_2(&want);
    assert_ne!(old, new, "node-1's new incarnation is a new inbound SPI");
    assert_eq!(
        (old[0] >> 16) & 0xf,
        10,
        "the receiver's incarnation in bits 16-19"
    );
    // node-2 has not acknowledged node-1's new identity: both stay.
    let h = hand_over(
        &mut want,
        &held,
        &after,
        Some(&acks(&after, &["node-1", "node-3"], &[])),
    );
    assert_eq!(from_2(&want).len(), 2);
    assert!(h.kept_inbound >= 1 && !h.is_done());
    let deleted = Plan::diff(&want, &held).del_states;
    assert!(
        deleted.iter().all(|(_, spi)| !old.contains(spi)),
        "node-2's old inbound SA is not deleted"
    );
    // Once it has: only the new one.
    let mut want = desired_sealed("node-1", &after, SEAL_BOTH_ENDS);
    hand_over(
        &mut want,
        &held,
        &after,
        Some(&acks(&after, &["node-1", "node-2", "node-3"], &[])),
    );
    assert_eq!(from_2(&want), new);
}

#[test]
fn by_revision_a_new_incarnation_waits_for_each_peer_to_reach_it() {
    // node-1 rebooted: its identity record is now at revision 50; node-2's
    // is at 20 and node-3's at 30.
    let before = ids([10, 20, 30]);
    let after = ids([11, 20, 30]);
    let at = [50, 20, 30];
    let held = Held::exactly(&desired_of("node-1", &before));
    let old = out_spis(&desired_of("node-1", &before));
    let new = out_spis(&desired_of("node-1", &after));

    // node-2 converged up to 50, node-3 only up to 49: node-2's new SA goes
    // in, node-3 keeps the old one.
    let mut want = desired_of("node-1", &after);
    let acks = rev_acks("node-1", at, [(50, 49), (50, 50), (49, 49)]);
    let h = hand_over(&mut want, &held, &after, Some(&acks));
    assert_eq!(h.waiting_for, BTreeSet::from(["node-3".to_string()]));
    let spis = out_spis(&want);
    assert_eq!(spis["node-2"], new["node-2"]);
    assert_eq!(spis["node-3"], old["node-3"]);

    // Floors only (a whole cluster in motion): at least 50 for everyone.
    let floors = Aggregate {
        common: Revs {
            acked: 50,
            settled: 49,
        },
        ..Aggregate::default()
    };
    let mut a = PeerAcks::from_aggregate(&floors, &after);
    a.me = "node-1".into();
    a.revisions = (0..3).map(|n| (format!("node-{}", n + 1), at[n])).collect();
    let mut want = desired_of("node-1", &after);
    assert!(hand_over(&mut want, &held, &after, Some(&a))
        .waiting_for
        .is_empty());
    assert_eq!(out_spis(&want), new);

    // This node's own record is newer than its snapshot: nobody can have
    // acknowledged it yet.
    let mut unknown = rev_acks("node-1", at, [(50, 50), (99, 99), (99, 99)]);
    unknown.revisions.insert("node-1".into(), i64::MAX);
    let mut want = desired_of("node-1", &after);
    let h = hand_over(&mut want, &held, &after, Some(&unknown));
    assert_eq!(h.waiting_for.len(), 2);
    assert_eq!(out_spis(&want), old);
}

#[test]
fn by_revision_a_peer_keeps_the_older_inbound_sa_until_the_sender_settles() {
    let before = ids([10, 20, 30]);
    let after = ids([11, 20, 30]);
    let at = [50, 20, 30];
    let held = Held::exactly(&desired_of("node-2", &before));
    // node-1 still waits on a pair at revision 50 (settled 49): it may
    // still send on its older SA toward node-2, so both stay.
    let mut want = desired_of("node-2", &after);
    let h = hand_over(
        &mut want,
        &held,
        &after,
        Some(&rev_acks("node-2", at, [(50, 49), (50, 50), (50, 50)])),
    );
    assert_eq!(inbound(&want), 2);
    assert_eq!(h.kept_inbound, 1);
    // node-1 waits only on node-3, whose record is newer (60): the pair
    // (node-1, node-2) is settled, so only the new SA stays.
    let mut want = desired_of("node-2", &after);
    let h = hand_over(
        &mut want,
        &held,
        &after,
        Some(&rev_acks(
            "node-2",
            [50, 20, 60],
            [(60, 59), (60, 60), (60, 60)],
        )),
    );
    assert_eq!(inbound(&want), 1);
    assert!(h.is_done());
    // node-1 has settled everything up to 50.
    let mut want = desired_of("node-2", &after);
    hand_over(
        &mut want,
        &held,
        &after,
        Some(&rev_acks("node-2", at, [(50, 50), (50, 50), (50, 50)])),
    );
    assert_eq!(inbound(&want), 1);
}
