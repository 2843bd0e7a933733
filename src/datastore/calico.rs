//! Calico's topology, read from its etcd v3 resources (DESIGN §2).
//!
//! Pure: `Topology::from_kvs` takes the key/values of one read and builds a
//! typed snapshot. A malformed or partial resource is skipped with its reason
//! recorded (and logged); it never stops the rest from being used.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;

use crate::cni::result::parse_cidr;
use crate::mtu::Encapsulation;

/// Prefix of Calico's v3 resources.
pub const RESOURCES: &str = "/calico/resources/v3/projectcalico.org/";
/// Prefix of Calico's IPAM host affinities.
pub const IPAM_HOSTS: &str = "/calico/ipam/v2/host/";

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net4 {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub len: u8,
}

impl Net4 {
    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(ip) & self.mask()) == (u32::from(self.addr) & self.mask())
    }

    /// Whether `other` lies entirely inside this network.
    pub fn covers(&self, other: &Net4) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

impl std::fmt::Display for Net4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Calico's `ipipMode` / `vxlanMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncapMode {
    /// Never encapsulate.
    Never,
    /// Always encapsulate.
    Always,
    /// Only toward nodes in another subnet.
    CrossSubnet,
}

impl EncapMode {
    fn parse(v: Option<&Value>) -> Result<Self, String> {
        match v.and_then(Value::as_str) {
            None | Some("") | Some("Never") => Ok(Self::Never),
            Some("Always") => Ok(Self::Always),
            Some("CrossSubnet") => Ok(Self::CrossSubnet),
            Some(other) => Err(format!("unknown mode {other:?}")),
        }
    }
}

/// One Calico node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// `spec.bgp.ipv4Address` without its prefix: the underlay address.
    pub ipv4: Ipv4Addr,
    /// The node's subnet, from the same CIDR (for CrossSubnet).
    pub subnet: Net4,
    /// `spec.bgp.ipv4IPIPTunnelAddr`.
    pub ipip_tunnel: Option<Ipv4Addr>,
    /// `spec.ipv4VXLANTunnelAddr`.
    pub vxlan_tunnel: Option<Ipv4Addr>,
    /// Pod blocks affine to this node.
    pub blocks: Vec<Net4>,
}

/// One IP pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// `spec.cidr`.
    pub cidr: Net4,
    /// `spec.ipipMode`.
    pub ipip: EncapMode,
    /// `spec.vxlanMode`.
    pub vxlan: EncapMode,
}

/// A resource that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The etcd key.
    pub key: String,
    /// Why it could not be used.
    pub reason: String,
}

/// A typed snapshot of Calico's topology, as seen from one node.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Every usable node, by name.
    pub nodes: BTreeMap<String, Node>,
    /// Every enabled IPv4 pool.
    pub pools: Vec<Pool>,
    /// `ClusterInformation.spec.clusterGUID`.
    pub cluster_guid: Option<String>,
    /// What was skipped, for logs and status.
    pub skipped: Vec<Skipped>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

fn parse_v4(s: &str) -> Option<Ipv4Addr> {
    s.split('/').next()?.parse().ok()
}

fn parse_net4(s: &str) -> Option<Net4> {
    match parse_cidr(s)? {
        (IpAddr::V4(addr), len) => Some(Net4 { addr, len }),
        _ => None,
    }
}

fn parse_node(name: &str, v: &Value) -> Result<Node, String> {
    if v.get("kind").and_then(Value::as_str) != Some("Node") {
        return Err("kind is not Node".into());
    }
    let addr = str_at(v, &["spec", "bgp", "ipv4Address"]).ok_or(
        "no spec.bgp.ipv4Address: the node has no underlay IPv4 address and cannot be a peer",
    )?;
    let subnet = parse_net4(addr).ok_or_else(|| {
        format!("spec.bgp.ipv4Address {addr:?} is not an IPv4 address in CIDR form")
    })?;
    let opt_v4 = |path: &[&str]| -> Result<Option<Ipv4Addr>, String> {
        match str_at(v, path) {
            None | Some("") => Ok(None),
            Some(s) => parse_v4(s).map(Some).ok_or_else(|| {
                format!("spec.{} {s:?} is not an IPv4 address", path[1..].join("."))
            }),
        }
    };
    Ok(Node {
        name: name.to_string(),
        ipv4: subnet.addr,
        subnet: Net4 {
            addr: Ipv4Addr::from(u32::from(subnet.addr) & subnet.mask()),
            len: subnet.len,
        },
        ipip_tunnel: opt_v4(&["spec", "bgp", "ipv4IPIPTunnelAddr"])?,
        vxlan_tunnel: opt_v4(&["spec", "ipv4VXLANTunnelAddr"])?,
        blocks: Vec::new(),
    })
}

fn parse_pool(name: &str, v: &Value) -> Result<Option<Pool>, String> {
    if v.get("kind").and_then(Value::as_str) != Some("IPPool") {
        return Err("kind is not IPPool".into());
    }
    let cidr_s = str_at(v, &["spec", "cidr"]).ok_or("no spec.cidr")?;
    let Some((ip, _)) = parse_cidr(cidr_s) else {
        return Err(format!("spec.cidr {cidr_s:?} is not a CIDR"));
    };
    if ip.is_ipv6() {
        return Ok(None); // IPv6 pools are not encrypted yet; not an error.
    }
    if v.get("spec")
        .and_then(|s| s.get("disabled"))
        .and_then(Value::as_bool)
        == Some(true)
    {
        return Ok(None);
    }
    Ok(Some(Pool {
        name: name.to_string(),
        cidr: parse_net4(cidr_s).ok_or_else(|| format!("spec.cidr {cidr_s:?} is not IPv4"))?,
        ipip: EncapMode::parse(v.get("spec").and_then(|s| s.get("ipipMode")))
            .map_err(|e| format!("spec.ipipMode: {e}"))?,
        vxlan: EncapMode::parse(v.get("spec").and_then(|s| s.get("vxlanMode")))
            .map_err(|e| format!("spec.vxlanMode: {e}"))?,
    }))
}

/// Parses "10.244.135.0-26" (Calico's block key form).
fn parse_block(s: &str) -> Option<Net4> {
    let (a, l) = s.rsplit_once('-')?;
    Some(Net4 {
        addr: a.parse().ok()?,
        len: l.parse().ok().filter(|l: &u8| *l <= 32)?,
    })
}

impl Topology {
    /// Builds the topology from etcd key/values (any order, any extra keys).
    pub fn from_kvs<'a>(kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut t = Topology::default();
        let mut affinities: Vec<(String, Net4)> = Vec::new();
        for (key, raw) in kvs {
            let mut skip = |reason: String| {
                tracing::warn!(key, %reason, "skipping a Calico resource");
                t.skipped.push(Skipped {
                    key: key.to_string(),
                    reason,
                });
            };
            if let Some(rest) = key.strip_prefix(IPAM_HOSTS) {
                // <node>/ipv4/block/<a.b.c.d-nn>
                let parts: Vec<&str> = rest.split('/').collect();
                match parts.as_slice() {
                    [node, "ipv4", "block", block] => match parse_block(block) {
                        Some(b) => affinities.push((node.to_string(), b)),
                        None => skip(format!("block {block:?} is not a.b.c.d-nn")),
                    },
                    [_, "ipv6", "block", _] => {}
                    _ => skip("not a block affinity key".into()),
                }
                continue;
            }
            let Some(rest) = key.strip_prefix(RESOURCES) else {
                continue;
            };
            let Some((kind, name)) = rest.split_once('/') else {
                continue;
            };
            if !matches!(kind, "nodes" | "ippools" | "clusterinformations") {
                continue;
            }
            let v: Value = match serde_json::from_slice(raw) {
                Ok(v) => v,
                Err(e) => {
                    skip(format!("value is not JSON: {e}"));
                    continue;
                }
            };
            match kind {
                "nodes" => match parse_node(name, &v) {
                    Ok(n) => {
                        t.nodes.insert(n.name.clone(), n);
                    }
                    Err(e) => skip(e),
                },
                "ippools" => match parse_pool(name, &v) {
                    Ok(Some(p)) => t.pools.push(p),
                    Ok(None) => {}
                    Err(e) => skip(e),
                },
                _ if name == "default" => match str_at(&v, &["spec", "clusterGUID"]) {
                    Some(g) if !g.is_empty() => t.cluster_guid = Some(g.to_string()),
                    _ => skip("ClusterInformation has no spec.clusterGUID".into()),
                },
                _ => {}
            }
        }
        for (node, block) in affinities {
            if let Some(n) = t.nodes.get_mut(&node) {
                n.blocks.push(block);
            }
        }
        for n in t.nodes.values_mut() {
            n.blocks.sort();
        }
        t.pools.sort_by(|a, b| a.name.cmp(&b.name));
        t
    }

    /// The encapsulation that carries pod traffic from `from` to `to`, or
    /// `None` when it goes unencapsulated (which this product cannot select).
    pub fn encapsulation(&self, from: &Node, to: &Node) -> Option<Encapsulation> {
        let same_subnet = from.subnet == to.subnet;
        let applies = |m: EncapMode| match m {
            EncapMode::Always => true,
            EncapMode::CrossSubnet => !same_subnet,
            EncapMode::Never => false,
        };
        // The pools that hold the destination's pods; all pools if it has no block yet.
        let pools: Vec<&Pool> = self
            .pools
            .iter()
            .filter(|p| to.blocks.is_empty() || to.blocks.iter().any(|b| p.cidr.covers(b)))
            .collect();
        if pools.iter().any(|p| applies(p.ipip)) {
            Some(Encapsulation::Ipip)
        } else if pools.iter().any(|p| applies(p.vxlan)) {
            Some(Encapsulation::Vxlan)
        } else {
            None
        }
    }

    /// Every node except `me`.
    pub fn peers<'a>(&'a self, me: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.values().filter(move |n| n.name != me)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_kvs() -> Vec<(String, Vec<u8>)> {
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

    #[test]
    fn reads_the_three_node_fixture() {
        let t = topo(&fixture_kvs());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert_eq!(t.nodes.len(), 3);
        let n1 = &t.nodes["node-1"];
        assert_eq!(n1.ipv4, Ipv4Addr::new(10, 0, 0, 11));
        assert_eq!(n1.subnet.to_string(), "10.0.0.0/24");
        assert_eq!(n1.ipip_tunnel, Some(Ipv4Addr::new(10, 244, 135, 0)));
        assert_eq!(n1.blocks[0].to_string(), "10.244.135.0/26");
        assert_eq!(
            t.cluster_guid.as_deref(),
            Some("5b0e2f9c8d4a4e61b7a39c2d1e0f4a66")
        );
        assert_eq!(t.pools.len(), 1);
        let n2 = &t.nodes["node-2"];
        assert_eq!(t.encapsulation(n1, n2), Some(Encapsulation::Ipip));
        assert_eq!(t.peers("node-1").count(), 2);
    }

    #[test]
    fn malformed_resources_are_skipped_and_the_rest_kept() {
        let mut kvs = fixture_kvs();
        let node = |name: &str, spec: Value| {
            (
                format!("{RESOURCES}nodes/{name}"),
                serde_json::to_vec(&serde_json::json!({"kind": "Node", "apiVersion": "projectcalico.org/v3", "metadata": {"name": name}, "spec": spec})).expect("json"),
            )
        };
        kvs.push(node("no-bgp", serde_json::json!({})));
        kvs.push(node(
            "bad-cidr",
            serde_json::json!({"bgp": {"ipv4Address": "10.0.0.99"}}),
        ));
        kvs.push(node(
            "bad-tunnel",
            serde_json::json!({"bgp": {"ipv4Address": "10.0.0.98/24", "ipv4IPIPTunnelAddr": "x"}}),
        ));
        kvs.push((format!("{RESOURCES}nodes/garbage"), b"{not json".to_vec()));
        kvs.push((
            format!("{IPAM_HOSTS}node-2/ipv4/block/10.244.1.0-99"),
            b"{}".to_vec(),
        ));
        let t = topo(&kvs);
        assert_eq!(t.nodes.len(), 3, "the good nodes stay");
        assert_eq!(t.skipped.len(), 5, "{:?}", t.skipped);
        assert!(t
            .skipped
            .iter()
            .any(|s| s.key.ends_with("no-bgp") && s.reason.contains("ipv4Address")));
    }

    #[test]
    fn cross_subnet_encapsulates_only_across_subnets() {
        let mut kvs = fixture_kvs();
        for (k, v) in kvs.iter_mut() {
            if k.contains("ippools") {
                *v = String::from_utf8_lossy(v)
                    .replace("\"Always\"", "\"CrossSubnet\"")
                    .into_bytes();
            }
            if k.ends_with("nodes/node-3") {
                *v = String::from_utf8_lossy(v)
                    .replace("10.0.0.13/24", "10.0.1.13/24")
                    .into_bytes();
            }
        }
        let t = topo(&kvs);
        let (n1, n2, n3) = (&t.nodes["node-1"], &t.nodes["node-2"], &t.nodes["node-3"]);
        assert_eq!(t.encapsulation(n1, n2), None, "same subnet: native routing");
        assert_eq!(t.encapsulation(n1, n3), Some(Encapsulation::Ipip));
    }
}
