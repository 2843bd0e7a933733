//! What a convergence judges apart from the XFRM plan: whether the config
//! record can be followed, and the VXLAN ports this node's devices really
//! use.
//!
//! This node remembers that it has seen the cluster initialised
//! ([`Seen`], written whenever it converges on a phase other than `off`,
//! removed when it converges on `off` from a config record that says so:
//! `calico-ipsec disable`). While it does and the config record is missing,
//! every convergence is refused, whatever the kernel holds (DESIGN §5b).

use super::error::ConvergeError;
use crate::datastore::calico::Topology;
use crate::datastore::ipsec::{config_key, IpsecStoreError};
use crate::datastore::snapshot::Snapshot;
use crate::link::RouteSocket;
use crate::state::Seen;

/// Calico's VXLAN devices, IPv4 then IPv6.
const VXLAN_DEVICES: [(&str, bool); 2] = [("vxlan.calico", true), ("vxlan-v6.calico", false)];

/// Why the config record cannot be followed, judged the same way by a
/// convergence, CHECK and `status`: unparsable; missing on a node that has
/// seen the cluster initialised; or missing while this node holds IPsec
/// state. `None`: it can be followed (absent on a node that never saw the
/// cluster and holds nothing is phase off).
pub fn config_gone(snap: &Snapshot, seen: Option<&Seen>, holds_state: bool) -> Option<String> {
    if snap.config.is_some() {
        return None;
    }
    if let Some(why) = &snap.config_problem {
        return Some(why.clone());
    }
    if let Some(seen) = seen {
        return Some(seen.missing_reason());
    }
    holds_state.then(|| {
        "the record is missing while this node holds IPsec state (was it deleted? `calico-ipsec disable` turns encryption off)".into()
    })
}

/// The refusal for a config record that cannot be followed.
pub fn config_refused(reason: String) -> ConvergeError {
    ConvergeError::Store(IpsecStoreError::Malformed {
        key: config_key(),
        reason,
    })
}

/// The VXLAN ports this node's Calico devices send to, as (IPv4?, port):
/// what calico-node's `FELIX_VXLANPORT` set without etcd knowing. Empty when
/// there is no such device (or the links cannot be read: etcd's ports then
/// stand alone, and the catch-all still drops what no policy protects).
pub fn device_vxlan_ports() -> Vec<(bool, u16)> {
    let Ok(mut sock) = RouteSocket::open() else {
        return vec![];
    };
    VXLAN_DEVICES
        .iter()
        .filter_map(|(name, v4)| {
            let port = sock.by_name(name).ok()??.vxlan_port?;
            Some((*v4, port))
        })
        .collect()
}

/// Puts this node's VXLAN devices' ports into the topology: they win over
/// etcd's for this node's own selectors, and join the catch-all.
pub fn with_device_ports(t: &mut Topology, me: &str, ports: Vec<(bool, u16)>) {
    for (v4, port) in &ports {
        let o = t.felix_nodes.entry(me.to_string()).or_default();
        if *v4 {
            o.vxlan_port = Some(*port);
        } else {
            o.vxlan_port_v6 = Some(*port);
        }
    }
    t.device_vxlan_ports = ports;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_record_is_refused_once_the_cluster_was_seen_or_state_is_held() {
        let snap = Snapshot::default();
        assert_eq!(config_gone(&snap, None, false), None, "never seen: off");
        let seen = Seen {
            cluster_guid: "guid-1".into(),
            phase_generation: 3,
        };
        let why = config_gone(&snap, Some(&seen), false).expect("refused");
        let e = config_refused(why).to_string();
        assert!(
            e.contains("/calico/ipsec/v1/config") && e.contains("guid-1"),
            "{e}"
        );
        assert!(config_gone(&snap, None, true).is_some(), "state held");
    }
}
