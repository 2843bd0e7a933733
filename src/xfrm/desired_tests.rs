//! Tests of the desired state in every Calico mode and family.

use super::*;
use crate::datastore::calico::{IPAM_HOSTS, RESOURCES};
use crate::datastore::ipsec::EpochState;
use crate::xfrm::{Held, Plan};
use serde_json::{json, Value};

/// The fixture's key/values, with the pool's modes replaced and extra keys.
fn kvs(ipip: &str, vxlan: &str, extra: &[(String, Value)]) -> Vec<(String, Vec<u8>)> {
    let path = format!(
        "{}/tests/fixtures/calico/etcd-3-nodes.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("JSON");
    for (k, val) in v.iter_mut() {
        if k.contains("ippools/") {
            val["spec"]["ipipMode"] = json!(ipip);
            val["spec"]["vxlanMode"] = json!(vxlan);
        }
    }
    for (k, val) in extra {
        v.insert(k.clone(), val.clone());
    }
    v.into_iter()
        .map(|(k, v)| (k, serde_json::to_vec(&v).expect("compact")))
        .collect()
}

fn topology_of(kvs: &[(String, Vec<u8>)]) -> Topology {
    Topology::from_kvs(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

fn topology() -> Topology {
    topology_of(&kvs("Always", "Never", &[]))
}

fn epoch(n: u32, state: EpochState) -> EpochRecord {
    EpochRecord {
        epoch: n,
        state,
        created: String::new(),
        algorithm: String::new(),
        key_bits: 128,
        icv_bits: None,
        kek_fingerprint: String::new(),
        sealed_secret: String::new(),
        seal: crate::datastore::records::SEAL_BOUND,
        also_sealed: Default::default(),
        agreement: None,
        activated: None,
    }
}

fn ids() -> BTreeMap<String, Identity> {
    (1..=3)
        .map(|n| {
            (
                format!("node-{n}"),
                Identity {
                    id: n,
                    incarnation: 10 * u32::from(n),
                    boot_id: String::new(),
                },
            )
        })
        .collect()
}

fn compute_in(t: &Topology, phase: Phase, epochs: &[EpochRecord]) -> Desired {
    let ids = ids();
    Desired::compute(&Inputs {
        topology: t,
        me: "node-1",
        my_identity: ids.get("node-1"),
        identities: &ids,
        phase,
        epochs,
        icv_bits: 128,
        agreement: &std::collections::BTreeMap::new(),
    })
    .expect("computes")
}

fn compute(phase: Phase, epochs: &[EpochRecord]) -> Desired {
    compute_in(&topology(), phase, epochs)
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn allow(p: &PolicySpec) -> Template {
    match p.action {
        Action::Allow(t) => t,
        Action::Block => panic!("{p:?} blocks"),
    }
}

fn policy<'a>(d: &'a Desired, dir: Dir, src: &str, dst: &str) -> Option<&'a PolicySpec> {
    d.policies
        .values()
        .find(|p| p.dir == dir && p.sel.src == net(src) && p.sel.dst == net(dst))
}

#[test]
fn phases_add_states_then_outbound_then_inbound_policies() {
    let epochs = [epoch(1, EpochState::Active)];
    let off = compute(Phase::Off, &epochs);
    assert!(off.states.is_empty() && off.policies.is_empty());
    assert_eq!(off.peers.len(), 2);

    let accept = compute(Phase::Accept, &epochs);
    assert_eq!(
        accept.states.len(),
        4,
        "an outbound and an inbound state per peer"
    );
    assert!(accept.policies.is_empty());

    let encrypt = compute(Phase::Encrypt, &epochs);
    assert_eq!(encrypt.states.len(), 4);
    assert_eq!(
        encrypt.policies.len(),
        3,
        "one outbound policy per peer, and the IPIP catch-all"
    );
    assert!(encrypt.policies.values().all(|p| p.dir == Dir::Out));
    let catch_all: Vec<_> = encrypt
        .policies
        .values()
        .filter(|p| p.sel.is_catch_all())
        .collect();
    assert_eq!(catch_all.len(), 1);
    assert_eq!(catch_all[0].action, Action::Block);
    assert_eq!(catch_all[0].sel.proto, PROTO_IPIP);
    assert_eq!(catch_all[0].sel.priority(), crate::xfrm::PRIORITY_CATCH_ALL);
    // Outbound IPIP from any local source.
    assert!(encrypt
        .policies
        .values()
        .filter(|p| !p.sel.is_catch_all())
        .all(|p| p.sel.src == net("0.0.0.0/0") && p.sel.dst.prefix_len() == 32));

    let enforce = compute(Phase::Enforce, &epochs);
    assert_eq!(enforce.policies.len(), 5);
    let inbound: Vec<_> = enforce
        .policies
        .values()
        .filter(|p| p.dir == Dir::In)
        .collect();
    assert_eq!(inbound.len(), 2);
    assert!(
        inbound.iter().all(|p| allow(p).reqid == 0),
        "inbound accepts any epoch"
    );
    assert!(enforce.unprotected.is_empty());
}

#[test]
fn spis_and_keys_follow_the_documented_layout() {
    let d = compute(Phase::Encrypt, &[epoch(1, EpochState::Active)]);
    let out: Vec<_> = d.states.values().filter(|s| s.dir == Dir::Out).collect();
    for s in &out {
        assert_eq!(s.src, ip("10.0.0.11"));
        assert_eq!(
            s.spi,
            (2 << 24) | (10 << 16) | 1,
            "epoch 1, incarnation 10, id 1"
        );
        assert_eq!((s.sender.as_str(), s.incarnation), ("node-1", 10));
        assert_eq!(s.lane, Lane::V4Transport);
    }
    let spis: Vec<u32> = d
        .states
        .values()
        .filter(|s| s.dir == Dir::In)
        .map(|s| s.spi)
        .collect();
    assert_eq!(spis.len(), 2);
    assert!(spis.contains(&((2 << 24) | (20 << 16) | 2)));
    assert!(spis.contains(&((2 << 24) | (30 << 16) | 3)));
    for p in d.policies.values().filter(|p| !p.sel.is_catch_all()) {
        assert_eq!(p.sel.proto, PROTO_IPIP, "the fixture's pool is IPIP Always");
        assert_eq!(allow(p).reqid, keys::reqid(1));
        assert_eq!(allow(p).mode, Mode::Transport);
    }
}

#[test]
fn rotation_installs_pending_inbound_and_keeps_senders_on_active() {
    let d = compute(
        Phase::Enforce,
        &[
            epoch(1, EpochState::Retired),
            epoch(2, EpochState::Active),
            epoch(3, EpochState::Pending),
        ],
    );
    assert_eq!(d.installed_epochs, vec![2, 3]);
    assert_eq!(d.states.len(), 8, "2 epochs x 2 peers x 2 directions");
    let out = d
        .policies
        .values()
        .find(|p| p.dir == Dir::Out && !p.sel.is_catch_all())
        .expect("out");
    assert_eq!(allow(out).reqid, keys::reqid(2));
}

#[test]
fn a_peer_without_incarnation_gets_no_states_but_is_still_blocked() {
    let t = topology();
    let mut ids = ids();
    ids.remove("node-3");
    let epochs = [epoch(1, EpochState::Active)];
    let d = Desired::compute(&Inputs {
        topology: &t,
        me: "node-1",
        my_identity: ids.get("node-1"),
        identities: &ids,
        phase: Phase::Encrypt,
        epochs: &epochs,
        icv_bits: 128,
        agreement: &std::collections::BTreeMap::new(),
    })
    .expect("computes");
    let n3 = ip("10.0.0.13");
    assert!(d.states.values().all(|s| s.src != n3 && s.dst != n3));
    assert!(
        d.policies.values().any(|p| p.sel.dst == IpNet::from(n3)),
        "fail closed"
    );
}

#[test]
fn errors_name_what_to_fix() {
    let t = topology();
    let ids = ids();
    let base = Inputs {
        topology: &t,
        me: "node-1",
        my_identity: ids.get("node-1"),
        identities: &ids,
        phase: Phase::Encrypt,
        epochs: &[],
        icv_bits: 128,
        agreement: &std::collections::BTreeMap::new(),
    };
    assert_eq!(
        Desired::compute(&base).err(),
        Some(DesiredError::NoActiveEpoch(Phase::Encrypt))
    );
    let unknown = Inputs {
        me: "node-9",
        ..base
    };
    assert!(matches!(
        Desired::compute(&unknown),
        Err(DesiredError::UnknownNode(_))
    ));
}

#[test]
fn diff_of_what_is_held_is_empty_and_rotation_is_an_update() {
    let e1 = [epoch(1, EpochState::Active), epoch(2, EpochState::Pending)];
    let before = compute(Phase::Enforce, &e1);
    let held = Held::exactly(&before);
    assert!(Plan::diff(&before, &held).is_empty());

    let e2 = [epoch(1, EpochState::Active), epoch(2, EpochState::Active)];
    let after = compute(Phase::Enforce, &e2);
    let plan = Plan::diff(&after, &held);
    assert_eq!(plan.update_policies.len(), 2, "{}", plan.summary());
    assert!(plan.add_policies.is_empty() && plan.del_policies.is_empty());
    assert!(plan.add_states.is_empty() && plan.del_states.is_empty());

    let off = compute(Phase::Off, &e2);
    let plan = Plan::diff(&off, &held);
    assert_eq!(plan.del_states.len(), held.states.len());
    assert_eq!(plan.del_policies.len(), held.policies.len());
}

#[test]
fn a_state_that_differs_is_replaced() {
    let d = compute(Phase::Accept, &[epoch(1, EpochState::Active)]);
    let mut held = Held::exactly(&d);
    let first = *held.states.keys().next().expect("a state");
    if let Some(s) = held.states.get_mut(&first) {
        s.icv_bits = 64;
    }
    let plan = Plan::diff(&d, &held);
    assert_eq!(plan.replace_states.len(), 1);
    assert_eq!(plan.writes(), 2);
}

/// No encapsulation (and CrossSubnet within one subnet): tunnel mode over
/// the pod blocks, `fwd`/`in` policies optional until enforce.
#[test]
fn paths_without_a_tunnel_use_tunnel_mode_over_the_blocks() {
    for (ipip, vxlan) in [
        ("Never", "Never"),
        ("CrossSubnet", "Never"),
        ("Never", "CrossSubnet"),
    ] {
        let t = topology_of(&kvs(ipip, vxlan, &[]));
        let e = [epoch(1, EpochState::Active)];
        let accept = compute_in(&t, Phase::Accept, &e);
        assert_eq!(accept.states.len(), 4, "{ipip}/{vxlan}");
        for s in accept.states.values() {
            assert_eq!(s.lane, Lane::V4Tunnel);
            assert_eq!(s.spi & 0x8000, 0x8000, "the tunnel bit");
        }
        let fwd = policy(&accept, Dir::Fwd, "10.244.201.64/26", "10.244.135.0/26").expect("fwd");
        assert!(allow(fwd).optional, "plaintext still passes in accept");
        assert_eq!(allow(fwd).mode, Mode::Tunnel);
        assert!(policy(&accept, Dir::Fwd, "10.0.0.12/32", "10.244.135.0/26").is_some());
        assert!(policy(&accept, Dir::In, "10.244.201.64/26", "10.0.0.11/32").is_some());
        assert!(accept.policies.values().all(|p| p.dir != Dir::Out));

        let enforce = compute_in(&t, Phase::Enforce, &e);
        let out = policy(&enforce, Dir::Out, "0.0.0.0/0", "10.244.201.64/26").expect("out");
        let tm = allow(out);
        assert_eq!(
            (tm.src, tm.dst, tm.mode),
            (ip("10.0.0.11"), ip("10.0.0.12"), Mode::Tunnel)
        );
        assert_eq!(tm.reqid, keys::reqid(1));
        assert!(policy(&enforce, Dir::Out, "10.244.135.0/26", "10.0.0.12/32").is_some());
        let fwd = policy(&enforce, Dir::Fwd, "10.244.201.64/26", "10.244.135.0/26").expect("fwd");
        assert!(!allow(fwd).optional, "required in enforce");
        assert!(enforce.unprotected.is_empty());
        // Enforcing is an in-place update of the inbound templates.
        let plan = Plan::diff(
            &enforce,
            &Held::exactly(&compute_in(&t, Phase::Encrypt, &e)),
        );
        assert!(
            plan.del_policies.is_empty() && plan.add_states.is_empty(),
            "{}",
            plan.summary()
        );
    }
}

#[test]
fn cross_subnet_encapsulates_only_across_subnets() {
    let n3 = "/calico/resources/v3/projectcalico.org/nodes/node-3".to_string();
    let mut v = kvs("CrossSubnet", "Never", &[]);
    for (k, val) in v.iter_mut() {
        if *k == n3 {
            *val = String::from_utf8_lossy(val)
                .replace("10.0.0.13/24", "10.0.1.13/24")
                .into_bytes();
        }
    }
    let t = topology_of(&v);
    let d = compute_in(&t, Phase::Encrypt, &[epoch(1, EpochState::Active)]);
    assert!(
        policy(&d, Dir::Out, "0.0.0.0/0", "10.244.201.64/26").is_some(),
        "node-2: tunnel"
    );
    let ipip = policy(&d, Dir::Out, "0.0.0.0/0", "10.0.1.13/32").expect("node-3: IPIP");
    assert_eq!(ipip.sel.proto, PROTO_IPIP);
}

#[test]
fn mixed_disabled_and_missing_pools_and_felix_port() {
    let pool = |cidr: &str, ipip: &str, vxlan: &str, disabled: bool| json!({"kind": "IPPool", "spec": {"cidr": cidr, "ipipMode": ipip, "vxlanMode": vxlan, "disabled": disabled}});
    let extra = [
        (
            format!("{RESOURCES}ippools/vx"),
            pool("10.245.0.0/16", "Never", "Always", true),
        ),
        (
            format!("{RESOURCES}felixconfigurations/default"),
            json!({"kind": "FelixConfiguration", "spec": {"vxlanPort": 8472}}),
        ),
        (
            format!("{IPAM_HOSTS}node-2/ipv4/block/10.245.7.0-26"),
            json!({}),
        ),
        (
            format!("{IPAM_HOSTS}node-2/ipv4/block/10.99.0.0-26"),
            json!({}),
        ),
        (
            format!("{IPAM_HOSTS}gone/ipv4/block/10.244.77.0-26"),
            json!({}),
        ),
    ];
    let t = topology_of(&kvs("Always", "Never", &extra));
    let e = [epoch(1, EpochState::Active)];
    let d = compute_in(&t, Phase::Encrypt, &e);
    let to2: Vec<_> = d
        .policies
        .values()
        .filter(|p| p.dir == Dir::Out && p.sel.dst == net("10.0.0.12/32"))
        .map(|p| (p.sel.proto, p.sel.dport))
        .collect();
    assert_eq!(
        to2,
        vec![(PROTO_IPIP, 0), (PROTO_UDP, 8472)],
        "both tunnels, Felix's port"
    );
    for blocked in ["10.99.0.0/26", "10.244.77.0/26"] {
        let p = policy(&d, Dir::Out, "0.0.0.0/0", blocked).expect("blocked");
        assert_eq!(p.action, Action::Block, "{blocked}");
    }
    assert_eq!(d.unprotected.len(), 2, "{:?}", d.unprotected);
    let accept = compute_in(&t, Phase::Accept, &e);
    assert!(
        accept.policies.values().all(|p| p.action != Action::Block),
        "only from encrypt"
    );
    let row = &d
        .peers
        .iter()
        .find(|p| p.name == "node-2")
        .expect("node-2")
        .families[0];
    let kinds: Vec<String> = row.paths.iter().map(ToString::to_string).collect();
    assert_eq!(kinds, ["ipip", "vxlan", "blocked"]);
}

#[test]
fn dual_stack_protects_ipv6_natively_and_over_vxlan() {
    let mut extra = vec![(
        format!("{RESOURCES}ippools/v6"),
        json!({"kind": "IPPool", "spec": {"cidr": "fd00:10:244::/48", "vxlanMode": "Never"}}),
    )];
    for (n, a) in [(1, "11"), (2, "12"), (3, "13")] {
        extra.push((
            format!("{IPAM_HOSTS}node-{n}/ipv6/block/fd00:10:244:{n}::-122"),
            json!({}),
        ));
        let _ = a;
    }
    let mut v = kvs("Always", "Never", &extra);
    for (k, val) in v.iter_mut() {
        for (n, a) in [(1, "11"), (2, "12"), (3, "13")] {
            if k.ends_with(&format!("nodes/node-{n}")) {
                let mut j: Value = serde_json::from_slice(val).expect("json");
                j["spec"]["bgp"]["ipv6Address"] = json!(format!("fd00::{a}/64"));
                *val = serde_json::to_vec(&j).expect("json");
            }
        }
    }
    let t = topology_of(&v);
    let d = compute_in(&t, Phase::Enforce, &[epoch(1, EpochState::Active)]);
    let lanes: BTreeSet<Lane> = d.states.values().map(|s| s.lane).collect();
    assert_eq!(
        lanes,
        [Lane::V4Transport, Lane::V6Tunnel].into_iter().collect()
    );
    let out = policy(&d, Dir::Out, "::/0", "fd00:10:244:2::/122").expect("v6 out");
    assert_eq!(
        (allow(out).src, allow(out).dst),
        (ip("fd00::11"), ip("fd00::12"))
    );
    let v6_in = d
        .states
        .values()
        .filter(|s| s.dir == Dir::In && s.dst == ip("fd00::11"))
        .count();
    assert_eq!(v6_in, 2, "one inbound IPv6 state per peer");
    assert!(d.unprotected.is_empty(), "{:?}", d.unprotected);
}

#[test]
fn a_planted_node_never_takes_another_nodes_sas() {
    let extra = [
        (
            format!("{RESOURCES}nodes/planted"),
            json!({"kind": "Node", "spec": {"bgp": {"ipv4Address": "10.0.0.12/24"}}}),
        ),
        (
            format!("{IPAM_HOSTS}planted/ipv4/block/10.244.50.0-26"),
            json!({}),
        ),
    ];
    let t = topology_of(&kvs("Always", "Never", &extra));
    let mut ids = ids();
    ids.insert(
        "planted".into(),
        Identity {
            id: 9,
            incarnation: 1,
            boot_id: String::new(),
        },
    );
    let d = Desired::compute(&Inputs {
        topology: &t,
        me: "node-1",
        my_identity: ids.get("node-1"),
        identities: &ids,
        phase: Phase::Enforce,
        epochs: &[epoch(1, EpochState::Active)],
        icv_bits: 128,
        agreement: &std::collections::BTreeMap::new(),
    })
    .expect("computes");
    assert!(d
        .states
        .values()
        .all(|s| s.receiver != "planted" && s.sender != "planted"));
    assert!(d
        .states
        .values()
        .all(|s| s.dst != ip("10.0.0.12") && s.src != ip("10.0.0.12")));
    for blk in ["10.244.50.0/26", "10.244.201.64/26"] {
        assert_eq!(
            policy(&d, Dir::Out, "0.0.0.0/0", blk).map(|p| p.action),
            Some(Action::Block)
        );
    }
    assert!(
        d.states.values().any(|s| s.dst == ip("10.0.0.13")),
        "node-3 keeps working"
    );
}

#[test]
fn each_epoch_carries_its_own_cipher() {
    let mut old = epoch(1, EpochState::Active);
    old.icv_bits = None;
    let mut new = epoch(2, EpochState::Pending);
    new.key_bits = 256;
    new.icv_bits = Some(96);
    let d = compute(Phase::Enforce, &[old, new]);
    let by_epoch = |e: u32| -> Vec<(u32, u32)> {
        d.states
            .values()
            .filter(|s| s.epoch == e)
            .map(|s| (s.key_bits, s.icv_bits))
            .collect()
    };
    assert_eq!(by_epoch(1).len(), 4);
    assert!(
        by_epoch(1).iter().all(|c| *c == (128, 128)),
        "an epoch naming no ICV takes the config's: {:?}",
        by_epoch(1)
    );
    assert_eq!(by_epoch(2).len(), 4);
    assert!(
        by_epoch(2).iter().all(|c| *c == (256, 96)),
        "{:?}",
        by_epoch(2)
    );
}

/// Node-3's block with ordinal 12 (10.244.18.140) held by `holder`.
fn borrowed_from_node_3(holder: &str) -> (String, Value) {
    let mut allocs = vec![Value::Null; 64];
    allocs[12] = json!(0);
    (
        "/calico/ipam/v2/assignment/ipv4/block/10.244.18.128-26".into(),
        json!({"cidr": "10.244.18.128/26", "affinity": "host:node-3", "allocations": allocs,
               "attributes": [{"secondary": {"node": holder, "pod": "p", "namespace": "default"}}]}),
    )
}

#[test]
fn a_borrowed_address_is_selected_toward_the_node_that_holds_it() {
    let t = topology_of(&kvs("Never", "Never", &[borrowed_from_node_3("node-2")]));
    let d = compute_in(&t, Phase::Encrypt, &[epoch(1, EpochState::Active)]);
    let host = policy(&d, Dir::Out, "0.0.0.0/0", "10.244.18.140/32").expect("borrowed /32");
    assert_eq!(
        allow(host).dst,
        ip("10.0.0.12"),
        "toward node-2, the holder"
    );
    assert_eq!(host.sel.priority(), crate::xfrm::PRIORITY_HOST);
    let block = policy(&d, Dir::Out, "0.0.0.0/0", "10.244.18.128/26").expect("node-3's block");
    assert_eq!(allow(block).dst, ip("10.0.0.13"));
    assert!(host.sel.priority() < block.sel.priority(), "the /32 wins");
    // Node-1's pods to node-2's address, sent from the borrowed address on
    // node-2 back to node-1: node-1 accepts it in enforce.
    let e = compute_in(&t, Phase::Enforce, &[epoch(1, EpochState::Active)]);
    assert!(policy(&e, Dir::Fwd, "10.244.18.140/32", "10.244.135.0/26").is_some());
}

#[test]
fn a_node_without_a_block_is_a_peer_wherever_a_pool_tunnels() {
    let node_4 = (
        format!("{RESOURCES}nodes/node-4"),
        json!({"kind": "Node", "apiVersion": "projectcalico.org/v3", "metadata": {"name": "node-4"},
               "spec": {"bgp": {"ipv4Address": "10.0.0.14/24"}}}),
    );
    for (ipip, vxlan, proto, dport) in [
        ("Always", "Never", PROTO_IPIP, 0),
        ("Never", "Always", PROTO_UDP, 4789),
    ] {
        let t = topology_of(&kvs(ipip, vxlan, std::slice::from_ref(&node_4)));
        let d = compute_in(&t, Phase::Encrypt, &[epoch(1, EpochState::Active)]);
        let p = policy(&d, Dir::Out, "0.0.0.0/0", "10.0.0.14/32").expect("toward node-4");
        assert_eq!((p.sel.proto, p.sel.dport), (proto, dport));
        assert_eq!(allow(p).mode, Mode::Transport);
        assert!(d
            .peers
            .iter()
            .any(|v| v.name == "node-4" && !v.families.is_empty()));
    }
    // Without a tunnel there is nothing to select toward it: its borrowed
    // addresses, once seen, are; until then the guard drops its traffic.
    let t = topology_of(&kvs("Never", "Never", &[node_4]));
    let d = compute_in(&t, Phase::Encrypt, &[epoch(1, EpochState::Active)]);
    assert!(policy(&d, Dir::Out, "0.0.0.0/0", "10.0.0.14/32").is_none());
}

#[test]
fn a_vxlan_port_set_only_on_the_device_is_selected_and_caught() {
    let mut t = topology_of(&kvs("Never", "Always", &[]));
    crate::converge::cluster::with_device_ports(&mut t, "node-1", vec![(true, 4790)]);
    let d = compute_in(&t, Phase::Encrypt, &[epoch(1, EpochState::Active)]);
    let p = policy(&d, Dir::Out, "0.0.0.0/0", "10.0.0.12/32").expect("toward node-2");
    assert_eq!(p.sel.dport, 4790, "this node sends to its device's port");
    let caught: BTreeSet<u16> = d
        .policies
        .values()
        .filter(|p| p.sel.is_catch_all())
        .map(|p| p.sel.dport)
        .collect();
    assert_eq!(caught, BTreeSet::from([4789, 4790]));
}

#[test]
fn an_own_id_above_what_an_spi_holds_is_refused_not_masked() {
    let (t, mut ids, epochs) = (topology(), ids(), [epoch(1, EpochState::Active)]);
    let mut compute = |id: u16| {
        ids.get_mut("node-1").expect("node-1").id = id;
        Desired::compute(&Inputs {
            topology: &t,
            me: "node-1",
            my_identity: ids.get("node-1"),
            identities: &ids,
            phase: Phase::Encrypt,
            epochs: &epochs,
            icv_bits: 128,
            agreement: &std::collections::BTreeMap::new(),
        })
    };
    assert!(compute(keys::MAX_NODE_ID).is_ok()); // 0x8001 masked would be id 1
    let err = compute(0x8001).map(|_| ()).expect_err("refused");
    assert!(matches!(err, DesiredError::IdTooLarge(0x8001)), "{err}");
}
