//! The catch-all guard: from `encrypt` on, pod traffic that no XFRM
//! policy protects is dropped in nftables (DESIGN §5c).
//!
//! A list of protected paths fails open for every path it forgets: a node
//! with no block, a borrowed address, a second source address, a VXLAN port
//! set only in calico-node's environment, a peer not converged yet, a policy
//! database flushed by anyone with `CAP_NET_ADMIN`. So the guard lists no
//! path. Its table `inet calico_ipsec` has one postrouting chain that drops,
//! per family, every packet that the kernel is *not* about to transform
//! (`rt ipsec missing`) and that
//! - is IPIP (IPv4), or UDP to any Calico VXLAN port (etcd's `default` and
//!   `node.<name>` settings, and this node's `vxlan.calico`/`vxlan-v6.calico`
//!   devices), or
//! - goes to an address inside any IP pool, or
//! - comes from an address inside a pool and goes to a cluster node,
//!
//! unless it leaves through `lo`, a pod's veth (Felix's `interfacePrefix`,
//! `cali*` by default) or one of Calico's
//! tunnel devices (whose output is the IPIP or VXLAN packet the first rule
//! sees). The per-peer policies carve the protected paths out of it: a
//! packet they select carries its XFRM bundle and never matches.
//!
//! Exceptions, on purpose: same-node pod to pod and host to local pod
//! (`cali*`), the node's own traffic (etcd, the API server, SSH: not pod
//! addresses), and pod traffic to outside the cluster (neither a pool nor a
//! node address; Calico's `natOutgoing` masquerades it before this chain,
//! which runs after source NAT at priority 110).
//!
//! Order keeps transitions hitless: the guard is written after the XFRM
//! policies at `encrypt` (so a path is protected before it is guarded) and
//! removed before them when the phase drops below `encrypt`.
//!
//! The ruleset is written with `nft -f -` (the interface libnftables
//! maintains; Kubernetes' knftables does the same), as one transaction that
//! replaces the table: there is never a moment without a guard. The script
//! is also kept in the state directory, so that after a reboot the guard is
//! back before etcd is even asked (`converge::guard::restore`, from the
//! script that [`crate::state`] keeps).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::datastore::calico::Topology;
use crate::datastore::ipsec::Phase;

/// The nftables table the guard owns (family `inet`).
pub const TABLE: &str = "calico_ipsec";
/// The guard is written again at least this often by the agent, even when
/// unchanged, so that a table removed by hand comes back.
pub const REASSERT: Duration = Duration::from_secs(30);
/// Interfaces whose output the guard never drops besides pods' own (Felix's
/// `interfacePrefix`, "cali" by default): loopback and Calico's tunnels.
pub const EXEMPT: [&str; 4] = ["lo", "tunl0", "vxlan.calico", "vxlan-v6.calico"];
/// Where `nft` is looked for before `$PATH` (kubelet may run a plugin with
/// an almost empty `$PATH`).
const NFT_PATHS: [&str; 3] = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];

/// Why the guard could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// No `nft` binary.
    #[error("the nftables catch-all needs `nft` (Debian: nftables), found in none of /usr/sbin, /sbin, /usr/bin or $PATH; without it pod paths that no XFRM policy covers could leave in clear, so encryption cannot be enforced on this node")]
    NoNft,
    /// `nft` could not be run.
    #[error("running {nft}: {source}")]
    Spawn {
        /// The binary.
        nft: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused the ruleset.
    #[error("nft refused the guard table inet {TABLE} (exit {code}): {stderr}")]
    Refused {
        /// Its exit status.
        code: i32,
        /// What it printed (addresses only: no key is ever in a ruleset).
        stderr: String,
    },
}

/// What the catch-all drops, per family: empty below `encrypt`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    /// Every IP pool (disabled ones too: their pods keep their addresses).
    pools: BTreeSet<IpNet>,
    /// Every cluster node's underlay address.
    nodes: BTreeSet<IpNet>,
    /// IPIP is dropped (an IPv4 pool tunnels with it).
    ipip: bool,
    /// VXLAN ports dropped, as (IPv4?, port).
    vxlan: BTreeSet<(bool, u16)>,
    /// Pods' interface prefixes (exempt, with every name they start).
    pods: BTreeSet<String>,
}

impl Guard {
    /// The guard for a phase and a topology.
    pub fn of(phase: Phase, t: &Topology) -> Self {
        if phase < Phase::Encrypt {
            return Self::default();
        }
        let mut g = Guard {
            pools: t.pools.iter().map(|p| p.cidr).collect(),
            nodes: t
                .nodes
                .values()
                .flat_map(|n| [n.ipv4, n.ipv6])
                .flatten()
                .map(|u| IpNet::from(u.addr))
                .collect(),
            pods: t.interface_prefixes.clone(),
            ..Self::default()
        };
        for sel in super::desired::catch_all(t) {
            match sel.proto {
                super::PROTO_IPIP => g.ipip = true,
                _ => {
                    g.vxlan.insert((matches!(sel.dst, IpNet::V4(_)), sel.dport));
                }
            }
        }
        g
    }

    /// True when nothing is guarded (the table is removed).
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty() && !self.ipip && self.vxlan.is_empty()
    }

    /// A digest of the script (for the record).
    pub fn digest(&self) -> String {
        digest_of(&self.script())
    }

    /// The `nft -f` script that replaces the table with this guard (or
    /// removes it when empty), in one transaction.
    pub fn script(&self) -> String {
        let mut out = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
        if self.is_empty() {
            return out;
        }
        out.push_str(&format!("table inet {TABLE} {{\n"));
        let mut rules = Vec::new();
        let set = |out: &mut String, name: &str, ty: &str, interval: bool, elems: Vec<String>| {
            let flags = if interval { "\n    flags interval" } else { "" };
            out.push_str(&format!(
                "  set {name} {{\n    type {ty}{flags}\n    elements = {{ {} }}\n  }}\n",
                elems.join(", ")
            ));
        };
        for v4 in [true, false] {
            let (fam, addr, ty, nfproto) = if v4 {
                ("4", "ip", "ipv4_addr", "ipv4")
            } else {
                ("6", "ip6", "ipv6_addr", "ipv6")
            };
            let of_fam = |n: &&IpNet| matches!(n, IpNet::V4(_)) == v4;
            let pools: Vec<String> = self
                .pools
                .iter()
                .filter(of_fam)
                .map(ToString::to_string)
                .collect();
            let nodes: Vec<String> = self
                .nodes
                .iter()
                .filter(of_fam)
                .map(|n| n.addr().to_string())
                .collect();
            let ports: Vec<String> = self
                .vxlan
                .iter()
                .filter(|(f, _)| *f == v4)
                .map(|(_, p)| p.to_string())
                .collect();
            let drop = "rt ipsec missing counter drop";
            if v4 && self.ipip {
                rules.push(format!(
                    "    meta nfproto ipv4 meta l4proto 4 {drop} comment \"IPIP without ESP\""
                ));
            }
            if !ports.is_empty() {
                set(
                    &mut out,
                    &format!("vxlan{fam}"),
                    "inet_service",
                    false,
                    ports,
                );
                rules.push(format!(
                    "    meta nfproto {nfproto} udp dport @vxlan{fam} {drop} comment \"VXLAN without ESP\""
                ));
            }
            if !pools.is_empty() {
                set(&mut out, &format!("pools{fam}"), ty, true, pools);
                rules.push(format!(
                    "    meta nfproto {nfproto} {addr} daddr @pools{fam} {drop} comment \"to a pod address without ESP\""
                ));
                if !nodes.is_empty() {
                    set(&mut out, &format!("nodes{fam}"), ty, false, nodes);
                    rules.push(format!(
                        "    meta nfproto {nfproto} {addr} saddr @pools{fam} {addr} daddr @nodes{fam} {drop} comment \"pod to node without ESP\""
                    ));
                }
            }
        }
        // After source NAT (100): a masqueraded pod packet to outside the
        // cluster no longer has a pod source.
        out.push_str(
            "  chain clear_out {\n    type filter hook postrouting priority 110; policy accept;\n",
        );
        let pods = self.pods.iter().map(|p| format!("{p}*"));
        for ifc in EXEMPT.iter().map(|s| s.to_string()).chain(pods) {
            out.push_str(&format!("    oifname \"{ifc}\" accept\n"));
        }
        for r in rules {
            out.push_str(&r);
            out.push('\n');
        }
        out.push_str("  }\n}\n");
        out
    }
}

/// The SHA-256 of a script, in hex: what a guard's mark records.
pub fn digest_of(script: &str) -> String {
    Sha256::digest(script.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// Whether a kept script is one of ours (it starts by declaring our table).
pub fn is_ours(script: &str) -> bool {
    script.starts_with(&format!("table inet {TABLE} {{}}\n"))
}

/// Runs `nft -f -` with the script.
pub fn run_nft(script: &str) -> Result<(), GuardError> {
    let Some(nft) = nft_binary() else {
        return Err(GuardError::NoNft);
    };
    let spawn_err = |source| GuardError::Spawn {
        nft: nft.display().to_string(),
        source,
    };
    let mut child = Command::new(&nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(GuardError::Refused {
        code: out.status.code().unwrap_or(-1),
        stderr: stderr
            .chars()
            .take(400)
            .collect::<String>()
            .escape_debug()
            .to_string(),
    })
}

/// The `nft` binary, if the node has one.
pub fn nft_binary() -> Option<PathBuf> {
    let fixed = NFT_PATHS.iter().map(PathBuf::from);
    let from_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nft")).collect())
        .unwrap_or_default();
    fixed.chain(from_path).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::calico::{EncapMode, Node, Pool, Underlay};

    fn topology(ipip: EncapMode, vxlan: EncapMode) -> Topology {
        let mut t = Topology::default();
        t.interface_prefixes.insert("cali".into());
        for (cidr, name) in [("10.244.0.0/16", "v4"), ("fd00:244::/48", "v6")] {
            t.pools.push(Pool {
                name: name.into(),
                cidr: cidr.parse().unwrap(),
                ipip: if name == "v4" { ipip } else { EncapMode::Never },
                vxlan,
                disabled: false,
            });
        }
        t.nodes.insert(
            "a".into(),
            Node {
                name: "a".into(),
                ipv4: Some(Underlay {
                    addr: "10.0.0.11".parse().unwrap(),
                    subnet: "10.0.0.0/24".parse().unwrap(),
                }),
                ipv6: None,
                blocks: vec![],
            },
        );
        t
    }

    #[test]
    fn below_encrypt_there_is_no_guard_and_the_table_goes() {
        let t = topology(EncapMode::Always, EncapMode::Never);
        for phase in [Phase::Off, Phase::Accept] {
            let g = Guard::of(phase, &t);
            assert!(g.is_empty());
            assert_eq!(
                g.script(),
                "table inet calico_ipsec {}\ndelete table inet calico_ipsec\n"
            );
        }
    }

    #[test]
    fn the_catch_all_drops_tunnels_pools_and_pod_to_node_without_esp() {
        let mut t = topology(EncapMode::Always, EncapMode::Never);
        let s = Guard::of(Phase::Encrypt, &t).script();
        assert!(s.contains("priority 110"), "{s}");
        for ifc in EXEMPT.iter().chain(&["cali*"]) {
            assert!(s.contains(&format!("oifname \"{ifc}\" accept")), "{s}");
        }
        assert!(
            s.contains("meta nfproto ipv4 meta l4proto 4 rt ipsec missing counter drop"),
            "{s}"
        );
        assert!(s.contains("elements = { 10.244.0.0/16 }"), "{s}");
        assert!(s.contains("ip daddr @pools4 rt ipsec missing"), "{s}");
        assert!(
            s.contains("ip saddr @pools4 ip daddr @nodes4 rt ipsec missing"),
            "{s}"
        );
        assert!(s.contains("ip6 daddr @pools6 rt ipsec missing"), "{s}");
        assert!(!s.contains("udp dport"), "no VXLAN pool, no device: {s}");
        // Every accept comes before the first drop.
        assert!(
            s.rfind("accept\n").unwrap() < s.find("drop").unwrap(),
            "{s}"
        );
        // VXLAN: etcd's default, a node's own setting, and this node's device.
        t = topology(EncapMode::Never, EncapMode::Always);
        t.felix_nodes.insert(
            "b".into(),
            crate::datastore::calico::FelixOverride {
                vxlan_port: Some(8472),
                vxlan_port_v6: None,
            },
        );
        t.device_vxlan_ports.push((true, 4790));
        let s = Guard::of(Phase::Enforce, &t).script();
        assert!(s.contains("elements = { 4789, 4790, 8472 }"), "{s}");
        assert!(
            s.contains("meta nfproto ipv4 udp dport @vxlan4 rt ipsec missing"),
            "{s}"
        );
        assert!(
            s.contains("meta nfproto ipv6 udp dport @vxlan6 rt ipsec missing"),
            "{s}"
        );
        assert!(!s.contains("l4proto 4"), "no IPIP pool: {s}");
    }
}
