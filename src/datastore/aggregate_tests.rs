use super::*;

fn status(acked: i64, settled: i64) -> NodeStatus {
    let mut s: NodeStatus = serde_json::from_value(serde_json::json!({
        "id": 1, "incarnation": 1, "installed_epochs": [], "acked_phase": "encrypt",
        "heartbeat": "", "identities": "d", "handover": settled < acked,
    }))
    .expect("status");
    s.acked_rev = Some(acked);
    s.settled_rev = Some(settled);
    s
}

fn cluster(n: usize, acked: i64) -> Vec<(String, NodeStatus)> {
    (0..n)
        .map(|i| (format!("node-{i:05}"), status(acked, acked)))
        .collect()
}

fn size(a: &Aggregate) -> usize {
    serde_json::to_vec(a).expect("json").len()
}

#[test]
fn a_steady_cluster_names_no_node_whatever_its_size() {
    let small = Aggregate::build(&cluster(100, 40)).expect("built");
    let big = Aggregate::build(&cluster(5000, 40)).expect("built");
    assert_eq!(size(&small), size(&big), "the same size");
    assert!(big.exact && big.nodes.is_empty());
    assert_eq!(
        big.peer("node-00042"),
        Revs {
            acked: 40,
            settled: 40
        }
    );
}

#[test]
fn nodes_in_motion_are_named_with_their_own_revisions() {
    let mut live = cluster(10, 40);
    live[3].1 = status(55, 54); // rebooted: waits for its peers
    live[5].1 = status(55, 55); // converged with it already
    live[8].1.identities.clear(); // phase off: no SA, takes no part
    live[8].1.acked_rev = Some(0);
    live[8].1.settled_rev = Some(0);
    live.remove(9); // no agent
    let agg = Aggregate::build(&live).expect("built");
    assert!(agg.exact);
    assert_eq!(
        agg.common,
        Revs {
            acked: 40,
            settled: 40
        }
    );
    assert_eq!(
        agg.nodes.keys().collect::<Vec<_>>(),
        ["node-00003", "node-00005"]
    );
    assert_eq!(
        agg.peer("node-00003"),
        Revs {
            acked: 55,
            settled: 54
        }
    );
    assert_eq!(agg.peer("node-00008"), agg.common, "off: the common pair");
    assert_eq!(
        agg.peer("node-00009"),
        agg.common,
        "no agent: the common pair"
    );
}

#[test]
fn a_whole_cluster_in_motion_gets_floors_of_constant_size() {
    // Half of 5,000 nodes moved to revision 90, one still waits at 89, one
    // straggler is far behind: more than LIST_MAX differ from the common pair.
    let mut live = cluster(5000, 90);
    for (i, (_, s)) in live.iter_mut().enumerate().filter(|(i, _)| i % 2 == 0) {
        *s = status(if i == 0 { 12 } else { 40 }, if i == 0 { 12 } else { 40 });
    }
    live[1].1 = status(90, 89);
    let agg = Aggregate::build(&live).expect("built");
    assert!(!agg.exact);
    assert!(agg.nodes.is_empty());
    assert_eq!(
        agg.common,
        Revs {
            acked: 12,
            settled: 12
        },
        "the lowest of each"
    );
    assert!(size(&agg) < 64, "{} bytes", size(&agg));
    // Every node says at least what the floors say of it.
    for (n, s) in &live {
        let r = agg.peer(n);
        assert!(r.acked <= s.acked_rev.unwrap_or(0) && r.settled <= s.settled_rev.unwrap_or(0));
    }
    // Just past the limit it is floors, at it still exact.
    let mut live = cluster(200, 90);
    for (_, s) in live.iter_mut().take(LIST_MAX) {
        *s = status(91, 91);
    }
    let at = Aggregate::build(&live).expect("built");
    assert!(at.exact && at.nodes.len() == LIST_MAX);
    live[LIST_MAX].1 = status(91, 91);
    assert!(!Aggregate::build(&live).expect("built").exact);
}

#[test]
fn no_aggregate_while_a_node_of_an_older_release_runs() {
    let mut live = cluster(4, 40);
    live[2].1.acked_rev = None;
    live[2].1.settled_rev = None;
    assert_eq!(Aggregate::build(&live), None);
    // In phase off it holds no SA: it does not matter.
    live[2].1.identities.clear();
    live[2].1.handover = false;
    assert!(Aggregate::build(&live).is_some());
}

#[test]
fn every_leader_computes_the_same_record() {
    let mut live = cluster(4, 40);
    live[0].1 = status(50, 50);
    live[1].1 = status(50, 50);
    let one = Aggregate::build(&live).expect("built");
    live.reverse();
    assert_eq!(Some(one.clone()), Aggregate::build(&live));
    assert_eq!(one.common.acked, 50, "a tie goes to the greatest pair");
    assert_eq!(one.nodes.len(), 2);
}

#[test]
fn a_record_parses_back_and_a_malformed_one_does_not() {
    let agg = Aggregate::build(&cluster(3, 7)).expect("built");
    let text = serde_json::to_string(&agg).expect("json");
    assert_eq!(text, r#"{"common":{"acked":7,"settled":7},"exact":true}"#);
    assert_eq!(serde_json::from_str::<Aggregate>(&text).ok(), Some(agg));
    assert!(serde_json::from_str::<Aggregate>(r#"{"ids_seen":"x","identities":"y"}"#).is_err());
}
