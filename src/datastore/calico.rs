//! Calico's topology, read from its etcd v3 resources (DESIGN §2).
//!
//! Pure: `Topology::from_kvs` takes the key/values of one read and builds a
//! typed snapshot. A malformed or partial resource is skipped with its reason
//! recorded (and logged); it never stops the rest from being used. What a
//! skipped node still owns (its pod blocks) is kept apart, so that the data
//! plane can block it instead of leaving it in clear.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

/// Prefix of Calico's v3 resources.
pub const RESOURCES: &str = "/calico/resources/v3/projectcalico.org/";
/// Prefix of Calico's IPAM host affinities.
pub const IPAM_HOSTS: &str = "/calico/ipam/v2/host/";
/// Felix's default VXLAN port (IPv4 and IPv6).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

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

/// A node's underlay address in one family, with the subnet its CIDR names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    /// The address.
    pub addr: IpAddr,
    /// The subnet (for CrossSubnet).
    pub subnet: IpNet,
}

/// One Calico node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// `spec.bgp.ipv4Address`.
    pub ipv4: Option<Underlay>,
    /// `spec.bgp.ipv6Address`.
    pub ipv6: Option<Underlay>,
    /// Pod blocks affine to this node (both families).
    pub blocks: Vec<IpNet>,
}

impl Node {
    /// The underlay address of the family of `net`.
    pub fn underlay(&self, v4: bool) -> Option<Underlay> {
        if v4 {
            self.ipv4
        } else {
            self.ipv6
        }
    }
}

/// One IP pool (enabled or not: a disabled pool's pods keep their addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// `spec.cidr`.
    pub cidr: IpNet,
    /// `spec.ipipMode`.
    pub ipip: EncapMode,
    /// `spec.vxlanMode`.
    pub vxlan: EncapMode,
    /// `spec.disabled`.
    pub disabled: bool,
}

/// A resource that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The etcd key.
    pub key: String,
    /// Why it could not be used.
    pub reason: String,
}

/// A node's own FelixConfiguration (`node.<name>`): the ports it sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FelixOverride {
    /// `spec.vxlanPort`, when set.
    pub vxlan_port: Option<u16>,
    /// `spec.vxlanPortV6`, when set.
    pub vxlan_port_v6: Option<u16>,
}

/// Felix's settings that decide what the wire carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Felix {
    /// `spec.vxlanPort` (IPv4 VXLAN).
    pub vxlan_port: u16,
    /// `spec.vxlanPortV6` (IPv6 VXLAN).
    pub vxlan_port_v6: u16,
}

impl Default for Felix {
    fn default() -> Self {
        Self {
            vxlan_port: DEFAULT_VXLAN_PORT,
            vxlan_port_v6: DEFAULT_VXLAN_PORT,
        }
    }
}

/// Pod blocks of a node that cannot be a peer (malformed, without an
/// address, or refused): their traffic is blocked once encryption is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    /// The node's name as the key gives it.
    pub name: String,
    /// Why it cannot be a peer.
    pub reason: String,
    /// Its pod blocks.
    pub blocks: Vec<IpNet>,
}

/// A typed snapshot of Calico's topology, as seen from one node.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    /// Every usable node, by name.
    pub nodes: BTreeMap<String, Node>,
    /// Every IP pool, disabled ones included.
    pub pools: Vec<Pool>,
    /// `ClusterInformation.spec.clusterGUID`.
    pub cluster_guid: Option<String>,
    /// FelixConfiguration `default`.
    pub felix: Felix,
    /// FelixConfiguration `node.<name>`, by node name.
    pub felix_nodes: BTreeMap<String, FelixOverride>,
    /// Addresses held by a node other than their block's owner.
    pub borrowed: Vec<super::ipam::Borrowed>,
    /// VXLAN ports this node's kernel devices use (`vxlan.calico`,
    /// `vxlan-v6.calico`), as (IPv4?, port): what calico-node's
    /// `FELIX_VXLANPORT` set without telling etcd. Filled in by the caller.
    pub device_vxlan_ports: Vec<(bool, u16)>,
    /// Felix's `interfacePrefix` (pods' host-side interfaces), from
    /// `default` and every node's own FelixConfiguration; "cali" when none
    /// says. Output through them is a pod of this node, never the wire.
    pub interface_prefixes: BTreeSet<String>,
    /// Nodes the operator excluded (our config's `excluded_nodes`, filled
    /// in by the snapshot): refused as peers, so blocked from `encrypt` on.
    pub excluded: BTreeSet<String>,
    /// Nodes that cannot be peers, with their blocks.
    pub unusable: Vec<Unusable>,
    /// What was skipped, for logs and status.
    pub skipped: Vec<Skipped>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

/// Parses "10.0.0.11/24" (Calico's CIDR form of a node address).
fn parse_underlay(s: &str, v4: bool) -> Option<Underlay> {
    let net: IpNet = s.parse().ok()?;
    (net.addr().is_ipv4() == v4).then(|| Underlay {
        addr: net.addr(),
        subnet: net.trunc(),
    })
}

/// Checks a node name as `nodename` is checked: a DNS subdomain of at most
/// 253 bytes (it feeds key derivations and is printed by `status`).
pub fn valid_node_name(n: &str) -> bool {
    !n.is_empty() && crate::config::validate_nodename(n).is_ok()
}

fn parse_node(name: &str, v: &Value) -> Result<Node, String> {
    if !valid_node_name(name) {
        return Err("the node name is not a valid Kubernetes node name".into());
    }
    if v.get("kind").and_then(Value::as_str) != Some("Node") {
        return Err("kind is not Node".into());
    }
    let family = |field: &str, v4: bool| -> Result<Option<Underlay>, String> {
        match str_at(v, &["spec", "bgp", field]) {
            None | Some("") => Ok(None),
            Some(s) => parse_underlay(s, v4).map(Some).ok_or_else(|| {
                let fam = if v4 { "IPv4" } else { "IPv6" };
                format!("spec.bgp.{field} {s:?} is not an {fam} address in CIDR form")
            }),
        }
    };
    let ipv4 = family("ipv4Address", true)?;
    let ipv6 = family("ipv6Address", false)?;
    if ipv4.is_none() && ipv6.is_none() {
        return Err(
            "no spec.bgp.ipv4Address or ipv6Address: the node has no underlay address and cannot be a peer"
                .into(),
        );
    }
    Ok(Node {
        name: name.to_string(),
        ipv4,
        ipv6,
        blocks: Vec::new(),
    })
}

fn parse_pool(name: &str, v: &Value) -> Result<Pool, String> {
    if v.get("kind").and_then(Value::as_str) != Some("IPPool") {
        return Err("kind is not IPPool".into());
    }
    let cidr_s = str_at(v, &["spec", "cidr"]).ok_or("no spec.cidr")?;
    let cidr: IpNet = cidr_s
        .parse()
        .map_err(|_| format!("spec.cidr {cidr_s:?} is not a CIDR"))?;
    let spec = v.get("spec");
    Ok(Pool {
        name: name.to_string(),
        cidr: cidr.trunc(),
        ipip: EncapMode::parse(spec.and_then(|s| s.get("ipipMode")))
            .map_err(|e| format!("spec.ipipMode: {e}"))?,
        vxlan: EncapMode::parse(spec.and_then(|s| s.get("vxlanMode")))
            .map_err(|e| format!("spec.vxlanMode: {e}"))?,
        disabled: spec
            .and_then(|s| s.get("disabled"))
            .and_then(Value::as_bool)
            == Some(true),
    })
}

fn parse_felix(v: &Value) -> Result<FelixOverride, String> {
    let port = |field: &str| -> Result<Option<u16>, String> {
        match v.get("spec").and_then(|s| s.get(field)) {
            None | Some(Value::Null) => Ok(None),
            Some(p) => p
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0)
                .map(Some)
                .ok_or_else(|| format!("spec.{field} {p} is not a port number")),
        }
    };
    Ok(FelixOverride {
        vxlan_port: port("vxlanPort")?,
        vxlan_port_v6: port("vxlanPortV6")?,
    })
}

/// Felix's `spec.interfacePrefix` ("cali", or a comma-separated list):
/// only names an interface could start with (letters, digits, `-`, `_`,
/// `.`), so that nothing else reaches an nftables rule.
fn interface_prefixes(v: &Value) -> Vec<String> {
    str_at(v, &["spec", "interfacePrefix"])
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|p| {
                    !p.is_empty()
                        && p.len() < 15
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                })
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Parses "10.244.135.0-26" or "fd00:10:244::-122" (Calico's block key form).
fn parse_block(s: &str, v4: bool) -> Option<IpNet> {
    let (a, l) = s.rsplit_once('-')?;
    let addr: IpAddr = a.parse().ok()?;
    let net = IpNet::new(addr, l.parse().ok()?).ok()?;
    (addr.is_ipv4() == v4 && net.trunc() == net).then_some(net)
}

impl Topology {
    /// Builds the topology from etcd key/values (any order, any extra keys).
    pub fn from_kvs<'a>(kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Self {
        let mut t = Topology::default();
        let mut affinities: Vec<(String, IpNet)> = Vec::new();
        let mut bad_nodes: BTreeMap<String, String> = BTreeMap::new();
        let mut prefixes: BTreeSet<String> = BTreeSet::new();
        for (key, raw) in kvs {
            let mut skip = |reason: String| {
                tracing::warn!(key = %key.escape_debug(), %reason, "skipping a Calico resource");
                t.skipped.push(Skipped {
                    key: key.to_string(),
                    reason,
                });
            };
            if key.starts_with(super::ipam::IPAM_BLOCKS) {
                match super::ipam::borrowed(key, raw) {
                    Ok(b) => t.borrowed.extend(b),
                    Err(e) => skip(e),
                }
                continue;
            }
            if let Some(rest) = key.strip_prefix(IPAM_HOSTS) {
                // <node>/ipv4/block/<a.b.c.d-nn> or <node>/ipv6/block/<addr-nn>
                let parts: Vec<&str> = rest.split('/').collect();
                match parts.as_slice() {
                    [node, fam @ ("ipv4" | "ipv6"), "block", block] => {
                        match parse_block(block, *fam == "ipv4") {
                            Some(b) => affinities.push((node.to_string(), b)),
                            None => skip(format!("block {block:?} is not an {fam} block")),
                        }
                    }
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
            if !matches!(
                kind,
                "nodes" | "ippools" | "clusterinformations" | "felixconfigurations"
            ) {
                continue;
            }
            let v: Result<Value, _> = serde_json::from_slice(raw);
            let v = match v {
                Ok(v) => v,
                Err(e) => {
                    if kind == "nodes" {
                        bad_nodes.insert(name.to_string(), "value is not JSON".into());
                    }
                    skip(format!("value is not JSON: {e}"));
                    continue;
                }
            };
            if kind == "felixconfigurations" {
                prefixes.extend(interface_prefixes(&v));
            }
            match kind {
                "nodes" => match parse_node(name, &v) {
                    Ok(n) => {
                        t.nodes.insert(n.name.clone(), n);
                    }
                    Err(e) => {
                        bad_nodes.insert(name.to_string(), e.clone());
                        skip(e);
                    }
                },
                "ippools" => match parse_pool(name, &v) {
                    Ok(p) => t.pools.push(p),
                    Err(e) => skip(e),
                },
                "felixconfigurations" => match (name, parse_felix(&v)) {
                    ("default", Ok(f)) => {
                        t.felix = Felix {
                            vxlan_port: f.vxlan_port.unwrap_or(DEFAULT_VXLAN_PORT),
                            vxlan_port_v6: f.vxlan_port_v6.unwrap_or(DEFAULT_VXLAN_PORT),
                        }
                    }
                    (other, Ok(f)) => {
                        if let Some(node) = other.strip_prefix("node.") {
                            t.felix_nodes.insert(node.to_string(), f);
                        }
                    }
                    (_, Err(e)) => skip(e),
                },
                "clusterinformations" if name == "default" => {
                    match str_at(&v, &["spec", "clusterGUID"]) {
                        Some(g) if !g.is_empty() => t.cluster_guid = Some(g.to_string()),
                        _ => skip("ClusterInformation has no spec.clusterGUID".into()),
                    }
                }
                _ => {}
            }
        }
        let mut orphans: BTreeMap<String, Vec<IpNet>> = BTreeMap::new();
        t.borrowed.sort();
        t.borrowed.dedup();
        // A borrowed address is a block of one address of the node that
        // holds it: selected toward that node, never its block's owner.
        let held = t.borrowed.iter().map(|b| (b.node.clone(), b.addr));
        for (node, block) in affinities.into_iter().chain(held) {
            match t.nodes.get_mut(&node) {
                Some(n) => n.blocks.push(block),
                None => orphans.entry(node).or_default().push(block),
            }
        }
        for (name, blocks) in orphans {
            let reason = bad_nodes
                .remove(&name)
                .unwrap_or_else(|| "pod blocks of a node that has no Node resource".into());
            t.unusable.push(Unusable {
                name,
                reason,
                blocks,
            });
        }
        for n in t.nodes.values_mut() {
            n.blocks.sort();
            n.blocks.dedup();
        }
        t.pools.sort_by(|a, b| a.name.cmp(&b.name));
        prefixes.insert("cali".into());
        t.interface_prefixes = prefixes;
        t
    }

    /// The peers that cannot be trusted with SAs, each with its reason: a
    /// node that shares an underlay address or a node id with another node
    /// or with `me` (`me` itself is never refused, and a clash between two
    /// peers refuses both: neither may take the other's SAs).
    pub fn clashes<'a>(
        &self,
        me: &str,
        ids: impl IntoIterator<Item = (&'a str, u16)>,
    ) -> BTreeMap<String, String> {
        let mut by_addr: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
        for n in self.nodes.values() {
            for u in [n.ipv4, n.ipv6].into_iter().flatten() {
                by_addr
                    .entry(format!("the underlay address {}", u.addr))
                    .or_default()
                    .insert(&n.name);
            }
        }
        let mut by_id: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, id) in ids {
            by_id
                .entry(format!("the node id {id}"))
                .or_default()
                .insert(name.to_string());
        }
        let groups = by_addr
            .into_iter()
            .map(|(what, names)| (what, names.into_iter().map(str::to_string).collect()))
            .chain(by_id);
        let mut refused = BTreeMap::new();
        for (what, names) in groups.filter(|(_, n): &(String, BTreeSet<String>)| n.len() > 1) {
            let all: Vec<&str> = names.iter().map(String::as_str).collect();
            for name in names.iter().filter(|n| n.as_str() != me) {
                refused
                    .entry(name.clone())
                    .or_insert_with(|| format!("shares {what} with {}", all.join(", ")));
            }
        }
        refused
    }

    /// The pool holding `block` (the most specific one), if any.
    pub fn pool_of(&self, block: &IpNet) -> Option<&Pool> {
        self.pools
            .iter()
            .filter(|p| p.cidr.contains(block))
            .max_by_key(|p| p.cidr.prefix_len())
    }

    /// The VXLAN port `node` sends to (and listens on) in one family: its
    /// own FelixConfiguration, else `default`'s.
    pub fn vxlan_port(&self, node: &str, v4: bool) -> u16 {
        let o = self.felix_nodes.get(node);
        if v4 {
            o.and_then(|o| o.vxlan_port)
                .unwrap_or(self.felix.vxlan_port)
        } else {
            o.and_then(|o| o.vxlan_port_v6)
                .unwrap_or(self.felix.vxlan_port_v6)
        }
    }

    /// Every VXLAN port Calico may use in one family, as far as this node
    /// can know: `default`'s, every node's own, and this node's devices'.
    pub fn vxlan_ports(&self, v4: bool) -> BTreeSet<u16> {
        let mut out = BTreeSet::from([self.vxlan_port("", v4)]);
        for o in self.felix_nodes.values() {
            out.extend(if v4 { o.vxlan_port } else { o.vxlan_port_v6 });
        }
        out.extend(
            self.device_vxlan_ports
                .iter()
                .filter(|(f, _)| *f == v4)
                .map(|(_, p)| *p),
        );
        out
    }

    /// Every node except `me`.
    pub fn peers<'a>(&'a self, me: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes.values().filter(move |n| n.name != me)
    }
}

#[cfg(test)]
#[path = "calico_tests.rs"]
mod tests;
