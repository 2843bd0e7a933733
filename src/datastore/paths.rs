//! How Calico carries pod traffic between two nodes (DESIGN §2, §5b): per
//! destination block, the pool that holds it decides IPIP, VXLAN, or no
//! tunnel at all, and CrossSubnet decides by the two nodes' subnets. A block
//! whose path cannot be known (outside every pool, a family one node lacks,
//! IPIP asked for IPv6) is `Blocked`, never left to chance.

use std::fmt;

use ipnet::IpNet;
use serde::Serialize;

use super::calico::{EncapMode, Node, Topology};

/// The path pod packets toward one block take between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// IP-in-IP between the nodes' IPv4 addresses.
    Ipip,
    /// VXLAN over the family of the block, to this UDP port.
    Vxlan(u16),
    /// No encapsulation: routed natively (Never, or CrossSubnet in one subnet).
    Native,
    /// The path cannot be determined or protected, and why.
    Blocked(String),
}

/// The kind of a [`Path`], for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// IPIP, protected by ESP transport mode.
    Ipip,
    /// VXLAN, protected by ESP transport mode.
    Vxlan,
    /// No tunnel, protected by ESP tunnel mode.
    Tunnel,
    /// Blocked (fail closed).
    Blocked,
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ipip => "ipip",
            Self::Vxlan => "vxlan",
            Self::Tunnel => "tunnel",
            Self::Blocked => "blocked",
        })
    }
}

impl Path {
    /// Its kind.
    pub fn kind(&self) -> PathKind {
        match self {
            Self::Ipip => PathKind::Ipip,
            Self::Vxlan(_) => PathKind::Vxlan,
            Self::Native => PathKind::Tunnel,
            Self::Blocked(_) => PathKind::Blocked,
        }
    }
}

impl Topology {
    /// Every (path kind, IPv4?) a pod packet of `me` may take, from the pools
    /// (disabled ones included) in the families `me` has an address in. The
    /// pod MTU must fit the smallest of them.
    pub fn carriers(&self, me: &Node) -> std::collections::BTreeSet<(PathKind, bool)> {
        let mut out = std::collections::BTreeSet::new();
        for p in &self.pools {
            let v4 = matches!(p.cidr, IpNet::V4(_));
            if me.underlay(v4).is_none() || (!v4 && p.ipip != EncapMode::Never) {
                continue;
            }
            if v4 && p.ipip != EncapMode::Never {
                out.insert((PathKind::Ipip, v4));
            }
            if p.vxlan != EncapMode::Never && p.ipip != EncapMode::Always {
                out.insert((PathKind::Vxlan, v4));
            }
            if p.ipip != EncapMode::Always && p.vxlan != EncapMode::Always {
                out.insert((PathKind::Tunnel, v4));
            }
        }
        out
    }

    /// The path from node `from` to the pods of `block`, which lives on `to`.
    pub fn path(&self, from: &Node, to: &Node, block: &IpNet) -> Path {
        let v4 = matches!(block, IpNet::V4(_));
        let fam = if v4 { "IPv4" } else { "IPv6" };
        let Some(pool) = self.pool_of(block) else {
            return Path::Blocked(format!("block {block} lies outside every IP pool"));
        };
        let (Some(a), Some(b)) = (from.underlay(v4), to.underlay(v4)) else {
            let who = if from.underlay(v4).is_none() {
                &from.name
            } else {
                &to.name
            };
            return Path::Blocked(format!(
                "node {who} has no {fam} address (spec.bgp.{}) for block {block}",
                if v4 { "ipv4Address" } else { "ipv6Address" }
            ));
        };
        let same_subnet = a.subnet == b.subnet;
        let applies = |m: EncapMode| match m {
            EncapMode::Always => true,
            EncapMode::CrossSubnet => !same_subnet,
            EncapMode::Never => false,
        };
        if !v4 && pool.ipip != EncapMode::Never {
            return Path::Blocked(format!(
                "pool {} asks for IPIP, which cannot carry IPv6",
                pool.name
            ));
        }
        if v4 && applies(pool.ipip) {
            Path::Ipip
        } else if applies(pool.vxlan) {
            Path::Vxlan(self.vxlan_port(&from.name, v4))
        } else {
            Path::Native
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::calico::{Felix, Pool, Underlay};

    fn node(name: &str, v4: &str, v6: Option<&str>, blocks: &[&str]) -> Node {
        let u = |s: &str| {
            let n: IpNet = s.parse().expect("cidr");
            Underlay {
                addr: n.addr(),
                subnet: n.trunc(),
            }
        };
        Node {
            name: name.into(),
            ipv4: Some(u(v4)),
            ipv6: v6.map(u),
            blocks: blocks.iter().map(|b| b.parse().expect("block")).collect(),
        }
    }

    fn pool(cidr: &str, ipip: EncapMode, vxlan: EncapMode) -> Pool {
        Pool {
            name: cidr.into(),
            cidr: cidr.parse().expect("cidr"),
            ipip,
            vxlan,
            disabled: false,
        }
    }

    #[test]
    fn every_mode_decides_per_block_and_subnet() {
        use EncapMode::*;
        let t = Topology {
            pools: vec![
                pool("10.244.0.0/16", CrossSubnet, Never),
                pool("10.245.0.0/16", Never, CrossSubnet),
                pool("10.246.0.0/16", Never, Never),
                pool("fd00:244::/48", Never, Always),
                pool("fd00:245::/48", Never, Never),
                pool("fd00:246::/48", Always, Never),
            ],
            felix: Felix {
                vxlan_port: 8472,
                vxlan_port_v6: 4790,
            },
            ..Default::default()
        };
        let a = node("a", "10.0.0.11/24", Some("fd00::11/64"), &[]);
        let b = node("b", "10.0.0.12/24", Some("fd00::12/64"), &[]);
        let c = node("c", "10.0.1.13/24", None, &[]);
        let p = |to: &Node, blk: &str| t.path(&a, to, &blk.parse().expect("block"));
        assert_eq!(
            p(&b, "10.244.1.0/26"),
            Path::Native,
            "IPIP CrossSubnet, same subnet"
        );
        assert_eq!(p(&c, "10.244.1.0/26"), Path::Ipip);
        assert_eq!(
            p(&b, "10.245.1.0/26"),
            Path::Native,
            "VXLAN CrossSubnet, same subnet"
        );
        assert_eq!(
            p(&c, "10.245.1.0/26"),
            Path::Vxlan(8472),
            "Felix's vxlanPort"
        );
        assert_eq!(p(&c, "10.246.1.0/26"), Path::Native);
        assert_eq!(p(&b, "fd00:244::/122"), Path::Vxlan(4790), "vxlanPortV6");
        assert_eq!(p(&b, "fd00:245::/122"), Path::Native);
        assert!(matches!(p(&c, "fd00:245::/122"), Path::Blocked(r) if r.contains("IPv6")));
        assert!(matches!(p(&b, "fd00:246::/122"), Path::Blocked(r) if r.contains("IPIP")));
        assert!(matches!(p(&b, "10.99.0.0/26"), Path::Blocked(r) if r.contains("outside")));
    }

    #[test]
    fn a_disabled_pool_still_decides_its_blocks() {
        let mut t = Topology {
            pools: vec![pool("10.244.0.0/16", EncapMode::Always, EncapMode::Never)],
            ..Default::default()
        };
        t.pools[0].disabled = true;
        let a = node("a", "10.0.0.11/24", None, &[]);
        let b = node("b", "10.0.0.12/24", None, &[]);
        assert_eq!(
            t.path(&a, &b, &"10.244.1.0/26".parse().expect("block")),
            Path::Ipip
        );
    }
}
