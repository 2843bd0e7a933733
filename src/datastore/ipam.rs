//! Calico's IPAM allocation blocks: which node holds each address that it
//! borrowed from another node's block (DESIGN §2, "Borrowed addresses").
//!
//! A block record, `/calico/ipam/v2/assignment/ipv4/block/<a.b.c.d-nn>`,
//! keeps `affinity: "host:<owner>"` while each allocated ordinal points
//! (through `allocations[ordinal]`) at an entry of `attributes[]` whose
//! `secondary.node` names the node the pod (or tunnel address) lives on.
//! An address whose node is not the owner is borrowed: its traffic must be
//! selected toward the node that holds it, not toward the block's owner.
//!
//! Pure and defensive: a malformed record yields a reason, never a panic,
//! and never a partial answer.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::Value;

/// Prefix of Calico's IPAM allocation blocks.
pub const IPAM_BLOCKS: &str = "/calico/ipam/v2/assignment/";

/// The most ordinals a block may have (a /16 of IPv4, a /112 of IPv6);
/// Calico's blocks are /26 and /122 by default.
const MAX_ORDINALS: u128 = 1 << 16;

/// One address a node holds in another node's block.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Borrowed {
    /// The node that holds the address (`secondary.node`).
    pub node: String,
    /// The address, as a host network (/32 or /128).
    pub addr: IpNet,
    /// The block's owner (`affinity: host:<owner>`), if it has one.
    pub owner: Option<String>,
}

/// The borrowed addresses of one block record. `Ok(vec![])` for a record
/// that borrows nothing (or has no affinity: every node then borrows).
pub fn borrowed(key: &str, raw: &[u8]) -> Result<Vec<Borrowed>, String> {
    let rest = key
        .strip_prefix(IPAM_BLOCKS)
        .ok_or("not an IPAM block key")?;
    let v4 = match rest.split('/').next() {
        Some("ipv4") => true,
        Some("ipv6") => false,
        _ => return Err("not an ipv4/ipv6 IPAM block key".into()),
    };
    let v: Value = serde_json::from_slice(raw).map_err(|e| format!("value is not JSON: {e}"))?;
    if v.get("deleted").and_then(Value::as_bool) == Some(true) {
        return Ok(vec![]);
    }
    let cidr_s = v
        .get("cidr")
        .and_then(Value::as_str)
        .ok_or("the block has no cidr")?;
    let cidr: IpNet = cidr_s
        .parse()
        .map_err(|_| format!("cidr {cidr_s:?} is not a CIDR"))?;
    if cidr.addr().is_ipv4() != v4 || cidr.trunc() != cidr {
        return Err(format!("cidr {cidr_s:?} does not match its key"));
    }
    let owner = match v.get("affinity") {
        None | Some(Value::Null) => None,
        Some(a) => {
            let a = a.as_str().ok_or("affinity is not a string")?;
            a.strip_prefix("host:").map(str::to_string)
        }
    };
    let size = 1u128 << (cidr.max_prefix_len() - cidr.prefix_len()).min(127);
    let allocations = match v.get("allocations") {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("allocations is not an array".into()),
    };
    if allocations.len() as u128 > size.min(MAX_ORDINALS) {
        return Err(format!(
            "{} allocations for a block of {size} addresses",
            allocations.len()
        ));
    }
    let attributes = match v.get("attributes") {
        None | Some(Value::Null) => &Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => return Err("attributes is not an array".into()),
    };
    let mut out = Vec::new();
    for (ordinal, slot) in allocations.iter().enumerate() {
        let attr = match slot {
            Value::Null => continue,
            s => s
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| format!("allocations[{ordinal}] is not an index"))?,
        };
        let a = attributes
            .get(attr)
            .ok_or_else(|| format!("allocations[{ordinal}] points past attributes"))?;
        let Some(node) = a
            .get("secondary")
            .and_then(|s| s.get("node"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        if owner.as_deref() == Some(node) {
            continue;
        }
        if node.is_empty() || crate::config::validate_nodename(node).is_err() {
            return Err(format!(
                "attributes[{attr}].secondary.node {:?} is not a node name",
                node.escape_debug().to_string()
            ));
        }
        let addr = nth(cidr, ordinal as u128);
        out.push(Borrowed {
            node: node.to_string(),
            addr: IpNet::from(addr),
            owner: owner.clone(),
        });
    }
    Ok(out)
}

/// The `n`th address of `net` (`n` is below its size, checked above).
fn nth(net: IpNet, n: u128) -> IpAddr {
    match net {
        IpNet::V4(n4) => IpAddr::V4((u32::from(n4.network()).wrapping_add(n as u32)).into()),
        IpNet::V6(n6) => IpAddr::V6((u128::from(n6.network()).wrapping_add(n)).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEY: &str = "/calico/ipam/v2/assignment/ipv4/block/10.244.18.128-26";

    fn block(allocs: Value, attrs: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cidr": "10.244.18.128/26", "affinity": "host:node-3", "strictAffinity": false,
            "allocations": allocs, "unallocated": [], "attributes": attrs, "deleted": false
        }))
        .unwrap()
    }

    #[test]
    fn an_address_held_by_another_node_is_borrowed_by_it() {
        let mut allocs = vec![Value::Null; 64];
        allocs[0] = json!(0);
        allocs[12] = json!(1);
        let raw = block(
            json!(allocs),
            json!([
                {"handle_id": "ipip-tunnel-addr-node-3", "secondary": {"node": "node-3", "type": "ipipTunnelAddress"}},
                {"handle_id": "k8s-pod-network.x", "secondary": {"namespace": "default", "node": "node-4", "pod": "p4"}}
            ]),
        );
        let b = borrowed(KEY, &raw).unwrap();
        assert_eq!(
            b,
            vec![Borrowed {
                node: "node-4".into(),
                addr: "10.244.18.140/32".parse().unwrap(),
                owner: Some("node-3".into()),
            }]
        );
    }

    #[test]
    fn malformed_records_are_refused_with_a_reason() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (KEY, b"{".to_vec()),
            (KEY, block(json!([0]), json!([]))),
            (KEY, block(json!(["x"]), json!([]))),
            (KEY, block(json!(vec![Value::Null; 65]), json!([]))),
            (
                KEY,
                block(json!([0]), json!([{"secondary": {"node": "Bad Name"}}])),
            ),
            (
                "/calico/ipam/v2/assignment/ipv6/block/10.244.18.128-26",
                block(json!([]), json!([])),
            ),
        ];
        for (k, raw) in cases {
            assert!(
                borrowed(k, &raw).is_err(),
                "{}",
                String::from_utf8_lossy(&raw)
            );
        }
        let deleted = serde_json::to_vec(&json!({"deleted": true})).unwrap();
        assert_eq!(borrowed(KEY, &deleted).unwrap(), vec![]);
    }
}
