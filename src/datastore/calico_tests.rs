//! Tests of the topology parser against Calico's fixture.

use super::*;

pub(crate) fn fixture_kvs() -> Vec<(String, Vec<u8>)> {
    let path = format!(
        "{}/tests/fixtures/calico/etcd-3-nodes.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(path).expect("fixture");
    let v: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("JSON");
    v.into_iter()
        .map(|(k, v)| (k, serde_json::to_vec(&v).expect("compact")))
        .collect()
}

fn topo(kvs: &[(String, Vec<u8>)]) -> Topology {
    Topology::from_kvs(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
}

fn node(name: &str, spec: Value) -> (String, Vec<u8>) {
    (
        format!("{RESOURCES}nodes/{name}"),
        serde_json::to_vec(&serde_json::json!({"kind": "Node", "apiVersion": "projectcalico.org/v3", "metadata": {"name": name}, "spec": spec})).expect("json"),
    )
}

#[test]
fn reads_the_three_node_fixture() {
    let t = topo(&fixture_kvs());
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    assert_eq!(t.nodes.len(), 3);
    let n1 = &t.nodes["node-1"];
    let u = n1.ipv4.expect("ipv4");
    assert_eq!(u.addr.to_string(), "10.0.0.11");
    assert_eq!(u.subnet.to_string(), "10.0.0.0/24");
    assert_eq!(n1.blocks[0].to_string(), "10.244.135.0/26");
    assert_eq!(
        t.cluster_guid.as_deref(),
        Some("5b0e2f9c8d4a4e61b7a39c2d1e0f4a66")
    );
    assert_eq!(t.pools.len(), 1);
    assert_eq!(t.felix, Felix::default());
    let n2 = &t.nodes["node-2"];
    assert_eq!(
        t.path(n1, n2, &n2.blocks[0]),
        crate::datastore::paths::Path::Ipip
    );
    assert_eq!(t.peers("node-1").count(), 2);
}

#[test]
fn malformed_resources_are_skipped_and_their_blocks_kept_apart() {
    let mut kvs = fixture_kvs();
    kvs.push(node("no-bgp", serde_json::json!({})));
    kvs.push(node(
        "bad-cidr",
        serde_json::json!({"bgp": {"ipv4Address": "10.0.0.99"}}),
    ));
    kvs.push((format!("{RESOURCES}nodes/garbage"), b"{not json".to_vec()));
    kvs.push(node(
        "Bad\u{1b}[31mName",
        serde_json::json!({"bgp": {"ipv4Address": "10.0.0.97/24"}}),
    ));
    kvs.push((
        format!("{IPAM_HOSTS}no-bgp/ipv4/block/10.244.9.0-26"),
        b"{}".to_vec(),
    ));
    kvs.push((
        format!("{IPAM_HOSTS}node-2/ipv4/block/10.244.1.0-99"),
        b"{}".to_vec(),
    ));
    kvs.push((
        format!("{IPAM_HOSTS}ghost/ipv4/block/10.244.8.0-26"),
        b"{}".to_vec(),
    ));
    let t = topo(&kvs);
    assert_eq!(t.nodes.len(), 3, "the good nodes stay");
    assert_eq!(t.skipped.len(), 5, "{:?}", t.skipped);
    assert!(t
        .skipped
        .iter()
        .any(|s| s.key.ends_with("no-bgp") && s.reason.contains("ipv4Address")));
    let unusable: Vec<(&str, String)> = t
        .unusable
        .iter()
        .map(|u| (u.name.as_str(), u.blocks[0].to_string()))
        .collect();
    assert!(
        unusable.contains(&("no-bgp", "10.244.9.0/26".into())),
        "{unusable:?}"
    );
    assert!(
        unusable.contains(&("ghost", "10.244.8.0/26".into())),
        "{unusable:?}"
    );
}

#[test]
fn ipv6_nodes_pools_blocks_and_felix_ports() {
    let mut kvs = fixture_kvs();
    kvs.push(node(
        "v6-only",
        serde_json::json!({"bgp": {"ipv6Address": "fd00::14/64"}}),
    ));
    kvs.push((
        format!("{IPAM_HOSTS}v6-only/ipv6/block/fd00:10:244:1::-122"),
        b"{}".to_vec(),
    ));
    kvs.push((
        format!("{RESOURCES}ippools/v6"),
        serde_json::to_vec(&serde_json::json!({"kind": "IPPool", "spec": {"cidr": "fd00:10:244::/48", "vxlanMode": "Always", "disabled": true}})).expect("json"),
    ));
    kvs.push((
        format!("{RESOURCES}felixconfigurations/default"),
        serde_json::to_vec(&serde_json::json!({"kind": "FelixConfiguration", "spec": {"vxlanPort": 8472, "vxlanPortV6": 4790}})).expect("json"),
    ));
    let t = topo(&kvs);
    let n = &t.nodes["v6-only"];
    assert!(n.ipv4.is_none());
    assert_eq!(n.ipv6.expect("v6").addr.to_string(), "fd00::14");
    assert_eq!(n.blocks[0].to_string(), "fd00:10:244:1::/122");
    let pool = t
        .pool_of(&n.blocks[0])
        .expect("the disabled pool still counts");
    assert!(pool.disabled);
    assert_eq!(
        t.felix,
        Felix {
            vxlan_port: 8472,
            vxlan_port_v6: 4790
        }
    );
}

#[test]
fn clashing_addresses_and_ids_are_refused_never_me() {
    let mut kvs = fixture_kvs();
    // A planted node with node-2's address, and one with this node's.
    kvs.push(node(
        "planted",
        serde_json::json!({"bgp": {"ipv4Address": "10.0.0.12/24"}}),
    ));
    kvs.push(node(
        "mimic",
        serde_json::json!({"bgp": {"ipv4Address": "10.0.0.11/24"}}),
    ));
    let t = topo(&kvs);
    let ids = [("node-1", 1u16), ("node-2", 2), ("node-3", 3), ("mimic", 3)];
    let refused = t.clashes("node-1", ids);
    assert!(refused.contains_key("planted") && refused.contains_key("node-2"));
    assert!(refused.contains_key("mimic"));
    assert!(refused.contains_key("node-3"), "shares id 3 with mimic");
    assert!(
        !refused.contains_key("node-1"),
        "this node is never refused"
    );
    assert!(refused["planted"].contains("10.0.0.12"), "{refused:?}");
}

#[test]
fn felix_settings_per_node_and_the_pods_interface_prefixes() {
    let mut kvs = fixture_kvs();
    let felix = |name: &str, spec: Value| {
        (
            format!("{RESOURCES}felixconfigurations/{name}"),
            serde_json::to_vec(&serde_json::json!({"kind": "FelixConfiguration", "metadata": {"name": name}, "spec": spec})).expect("json"),
        )
    };
    kvs.push(felix(
        "default",
        serde_json::json!({"vxlanPort": 4790, "interfacePrefix": "cali, tap,bad name;"}),
    ));
    kvs.push(felix("node.node-2", serde_json::json!({"vxlanPort": 8472})));
    kvs.push(felix("node.node-3", serde_json::json!({"vxlanPort": "x"})));
    let t = topo(&kvs);
    assert_eq!(t.vxlan_port("node-1", true), 4790);
    assert_eq!(t.vxlan_port("node-2", true), 8472, "node.<name> wins");
    assert_eq!(t.vxlan_port("node-2", false), DEFAULT_VXLAN_PORT);
    assert_eq!(
        t.vxlan_ports(true).into_iter().collect::<Vec<_>>(),
        vec![4790, 8472]
    );
    assert!(t.skipped.iter().any(|s| s.key.ends_with("node.node-3")));
    assert_eq!(
        t.interface_prefixes.iter().cloned().collect::<Vec<_>>(),
        vec!["cali".to_string(), "tap".to_string()],
        "a prefix that is not an interface name never reaches nftables"
    );
}
