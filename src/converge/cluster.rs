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
use crate::datastore::ipsec::Phase;
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

/// The phase this node keeps when the config record asks for less than it
/// converged on before, from a record that does not follow the one it saw:
/// another clusterGUID, or an older phase generation (etcd wiped and
/// re-initialised, or restored from an older backup). Such a record did not
/// come from `calico-ipsec disable`, whose steps each raise the generation,
/// so the node holds its phase, with the reason, until the cluster's phase
/// comes back up to it (`calico-ipsec enable`); it then follows the new
/// record from there. `None`: follow the record.
pub fn held_phase(snap: &Snapshot, seen: Option<&Seen>) -> Option<(Phase, String)> {
    let (config, seen) = (snap.config.as_ref()?, seen?);
    let guid = snap.topology.cluster_guid.as_deref().unwrap_or_default();
    let follows = guid == seen.cluster_guid && config.phase_generation >= seen.phase_generation;
    if follows || config.phase >= seen.phase {
        return None;
    }
    let what = if guid == seen.cluster_guid {
        format!(
            "an older phase generation ({} < {})",
            config.phase_generation, seen.phase_generation
        )
    } else {
        format!(
            "another clusterGUID ({} after {})",
            guid.escape_debug(),
            seen.cluster_guid.escape_debug()
        )
    };
    Some((
        seen.phase,
        format!(
            "the config record asks for phase {:?} with {what}: etcd was re-initialised or restored, not disabled; this node keeps phase {:?} until the cluster's phase reaches it again (`calico-ipsec enable`), and follows the record from there",
            config.phase, seen.phase
        ),
    ))
}

/// The phase a convergence applies: the config record's, or the stronger
/// one [`held_phase`] keeps, with why it is kept.
pub fn applied_phase(snap: &Snapshot, seen: Option<&Seen>) -> (Phase, Option<String>) {
    match held_phase(snap, seen) {
        Some((held, why)) => (held, Some(why)),
        None => (super::error::phase_of(snap).0, None),
    }
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
            phase: Phase::Enforce,
        };
        let why = config_gone(&snap, Some(&seen), false).expect("refused");
        let e = config_refused(why).to_string();
        assert!(
            e.contains("/calico/ipsec/v1/config") && e.contains("guid-1"),
            "{e}"
        );
        assert!(config_gone(&snap, None, true).is_some(), "state held");
    }

    fn snap(guid: &str, phase: Phase, generation: u64) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.topology.cluster_guid = Some(guid.into());
        snap.config = Some(crate::datastore::ipsec::ClusterConfig {
            phase,
            phase_generation: generation,
            ..Default::default()
        });
        snap
    }

    #[test]
    fn a_record_that_does_not_follow_the_one_seen_never_lowers_the_phase() {
        let seen = Seen {
            cluster_guid: "guid-1".into(),
            phase_generation: 7,
            phase: Phase::Enforce,
        };
        // `disable`'s steps raise the generation: followed down to off.
        for (phase, generation) in [(Phase::Encrypt, 8), (Phase::Accept, 9), (Phase::Off, 10)] {
            assert_eq!(
                held_phase(&snap("guid-1", phase, generation), Some(&seen)),
                None
            );
        }
        // Re-initialised (another clusterGUID) or restored (an older
        // generation): held at enforce, whatever it asks below that.
        for s in [
            snap("guid-2", Phase::Off, 0),
            snap("guid-1", Phase::Encrypt, 6),
        ] {
            let (phase, why) = held_phase(&s, Some(&seen)).expect("held");
            assert_eq!(phase, Phase::Enforce);
            assert!(why.contains("re-initialised or restored"), "{why}");
        }
        let (_, why) = held_phase(&snap("guid-2", Phase::Accept, 2), Some(&seen)).expect("held");
        assert!(why.contains("guid-2") && why.contains("guid-1"), "{why}");
        // Once the new record asks for as much, it is followed.
        assert_eq!(
            held_phase(&snap("guid-2", Phase::Enforce, 3), Some(&seen)),
            None
        );
        assert_eq!(
            held_phase(&snap("guid-1", Phase::Enforce, 2), Some(&seen)),
            None
        );
        // A node that never saw the cluster follows any record.
        assert_eq!(held_phase(&snap("guid-2", Phase::Off, 0), None), None);
    }
}
