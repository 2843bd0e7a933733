//! The desired XFRM state of one node: a pure function of what etcd says.
//!
//! Per peer with a tunnel toward it, and for each installed epoch (pending or
//! active): an outbound state me→peer and an inbound state peer→me. By phase
//! (DESIGN §6):
//! - `off`: nothing;
//! - `accept`: the states only, so peers may start sending;
//! - `encrypt`: plus an outbound policy per peer whose template picks the
//!   active epoch's reqid;
//! - `enforce`: plus an inbound policy per peer whose template accepts any
//!   installed epoch (reqid 0), so plaintext tunnel packets are refused.
//!
//! Outbound policies are installed toward every peer with a tunnel, even one
//! that has not published an incarnation yet: with no SA the kernel drops
//! the traffic rather than sending it in clear (fail closed).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Serialize;

use super::{Dir, PolicySpec, SaSpec, Selector, PROTO_IPIP, PROTO_UDP, VXLAN_PORT};
use crate::datastore::calico::Topology;
use crate::datastore::ipsec::{EpochRecord, EpochState, Identity, Phase};
use crate::keys;
use crate::mtu::Encapsulation;

/// Why the desired state cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    /// This node is not a usable Calico node in the datastore.
    #[error("node {0} is not in Calico's datastore (or has no spec.bgp.ipv4Address): check the nodename and the Node resource")]
    UnknownNode(String),
    /// Encryption is on but no epoch is active.
    #[error("the phase is {0:?} but no key epoch is active: run `calico-ipsec keys init`, or check /calico/ipsec/v1/epochs/")]
    NoActiveEpoch(Phase),
    /// The cluster has no clusterGUID, which salts every key.
    #[error("Calico's ClusterInformation has no clusterGUID, which salts every key")]
    NoClusterGuid,
    /// The ICV length in the config is not 64, 96 or 128.
    #[error("/calico/ipsec/v1/config has icvBits {0}; use 64, 96 or 128")]
    BadIcv(u32),
}

/// Everything the desired state depends on.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Calico's nodes and pools.
    pub topology: &'a Topology,
    /// This node's name.
    pub me: &'a str,
    /// This node's id and incarnation (`None` while the phase is off).
    pub my_identity: Option<&'a Identity>,
    /// Every node's id and incarnation.
    pub identities: &'a BTreeMap<String, Identity>,
    /// The cluster's phase.
    pub phase: Phase,
    /// Every epoch record.
    pub epochs: &'a [EpochRecord],
    /// ICV length of every SA, in bits.
    pub icv_bits: u32,
}

/// One peer as this node sees it (for `status` and logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    /// Node name.
    pub name: String,
    /// Underlay address.
    pub address: Ipv4Addr,
    /// "ipip", "vxlan", or "none" (no tunnel: traffic cannot be selected).
    pub tunnel: &'static str,
    /// The peer's id and incarnation, once it has published them.
    pub id: Option<u16>,
    /// The peer's incarnation (0 before it published one).
    pub incarnation: u32,
}

/// The states and policies this node should hold.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    /// States by (dst, spi).
    pub states: BTreeMap<(Ipv4Addr, u32), SaSpec>,
    /// Policies by (dir, selector).
    pub policies: BTreeMap<(Dir, Selector), PolicySpec>,
    /// Every peer considered.
    pub peers: Vec<PeerView>,
    /// Epochs whose states are installed (pending and active).
    pub installed_epochs: Vec<u32>,
    /// The epoch outbound policies pick.
    pub active_epoch: Option<u32>,
}

impl Desired {
    /// Computes the desired state.
    pub fn compute(i: &Inputs<'_>) -> Result<Self, DesiredError> {
        let mut d = Desired::default();
        let me = i
            .topology
            .nodes
            .get(i.me)
            .ok_or_else(|| DesiredError::UnknownNode(i.me.to_string()))?;
        let installed: Vec<u32> = i
            .epochs
            .iter()
            .filter(|e| matches!(e.state, EpochState::Pending | EpochState::Active))
            .map(|e| e.epoch)
            .collect();
        let active = i
            .epochs
            .iter()
            .filter(|e| e.state == EpochState::Active)
            .map(|e| e.epoch)
            .max();
        for peer in i.topology.peers(i.me) {
            let tunnel = i.topology.encapsulation(me, peer);
            let ident = i.identities.get(&peer.name).filter(|p| p.incarnation > 0);
            d.peers.push(PeerView {
                name: peer.name.clone(),
                address: peer.ipv4,
                tunnel: match tunnel {
                    Some(Encapsulation::Ipip) => "ipip",
                    Some(Encapsulation::Vxlan) => "vxlan",
                    None => "none",
                },
                id: i.identities.get(&peer.name).map(|p| p.id),
                incarnation: ident.map_or(0, |p| p.incarnation),
            });
        }
        if i.phase == Phase::Off {
            return Ok(d);
        }
        if !matches!(i.icv_bits, 64 | 96 | 128) {
            return Err(DesiredError::BadIcv(i.icv_bits));
        }
        if i.topology.cluster_guid.is_none() {
            return Err(DesiredError::NoClusterGuid);
        }
        if i.phase >= Phase::Encrypt && active.is_none() {
            return Err(DesiredError::NoActiveEpoch(i.phase));
        }
        d.installed_epochs = installed.clone();
        d.active_epoch = active;
        for peer in i.topology.peers(i.me) {
            let (proto, dport) = match i.topology.encapsulation(me, peer) {
                Some(Encapsulation::Ipip) => (PROTO_IPIP, 0),
                Some(Encapsulation::Vxlan) => (PROTO_UDP, VXLAN_PORT),
                None => continue,
            };
            // States only toward peers that take part (have published an
            // incarnation): they are the ones that install our inbound SAs.
            let peer_ident = i.identities.get(&peer.name).filter(|p| p.incarnation > 0);
            for &epoch in installed.iter().filter(|_| peer_ident.is_some()) {
                if let Some(mine) = i.my_identity.filter(|m| m.incarnation > 0) {
                    let out = SaSpec {
                        dir: Dir::Out,
                        src: me.ipv4,
                        dst: peer.ipv4,
                        spi: keys::spi(epoch, mine.incarnation, mine.id),
                        reqid: keys::reqid(epoch),
                        epoch,
                        sender: i.me.to_string(),
                        incarnation: mine.incarnation,
                        receiver: peer.name.clone(),
                        icv_bits: i.icv_bits,
                    };
                    d.states.insert(out.key(), out);
                }
                if let Some(theirs) = peer_ident {
                    let inb = SaSpec {
                        dir: Dir::In,
                        src: peer.ipv4,
                        dst: me.ipv4,
                        spi: keys::spi(epoch, theirs.incarnation, theirs.id),
                        reqid: keys::reqid(epoch),
                        epoch,
                        sender: peer.name.clone(),
                        incarnation: theirs.incarnation,
                        receiver: i.me.to_string(),
                        icv_bits: i.icv_bits,
                    };
                    d.states.insert(inb.key(), inb);
                }
            }
            if let (true, Some(active)) = (i.phase >= Phase::Encrypt, active) {
                let out = PolicySpec {
                    dir: Dir::Out,
                    sel: Selector {
                        src: me.ipv4,
                        dst: peer.ipv4,
                        proto,
                        dport,
                    },
                    reqid: keys::reqid(active),
                };
                d.policies.insert(out.key(), out);
            }
            if i.phase == Phase::Enforce {
                let inb = PolicySpec {
                    dir: Dir::In,
                    sel: Selector {
                        src: peer.ipv4,
                        dst: me.ipv4,
                        proto,
                        dport,
                    },
                    reqid: 0,
                };
                d.policies.insert(inb.key(), inb);
            }
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::ipsec::EpochState;
    use crate::xfrm::{Held, Plan};

    fn topology() -> Topology {
        let path = format!(
            "{}/tests/fixtures/calico/etcd-3-nodes.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(path).expect("fixture");
        let v: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).expect("JSON");
        let kvs: Vec<(String, Vec<u8>)> = v
            .into_iter()
            .map(|(k, v)| (k, serde_json::to_vec(&v).expect("compact")))
            .collect();
        Topology::from_kvs(kvs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    fn epoch(n: u32, state: EpochState) -> EpochRecord {
        EpochRecord {
            epoch: n,
            state,
            created: String::new(),
            algorithm: String::new(),
            kek_fingerprint: String::new(),
            sealed_secret: String::new(),
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

    fn compute(phase: Phase, epochs: &[EpochRecord]) -> Desired {
        let t = topology();
        let ids = ids();
        Desired::compute(&Inputs {
            topology: &t,
            me: "node-1",
            my_identity: ids.get("node-1"),
            identities: &ids,
            phase,
            epochs,
            icv_bits: 128,
        })
        .expect("computes")
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
        assert_eq!(encrypt.policies.len(), 2);
        assert!(encrypt.policies.values().all(|p| p.dir == Dir::Out));

        let enforce = compute(Phase::Enforce, &epochs);
        assert_eq!(enforce.policies.len(), 4);
        let inbound: Vec<_> = enforce
            .policies
            .values()
            .filter(|p| p.dir == Dir::In)
            .collect();
        assert_eq!(inbound.len(), 2);
        assert!(
            inbound.iter().all(|p| p.reqid == 0),
            "inbound accepts any epoch"
        );
    }

    #[test]
    fn spis_and_keys_follow_the_documented_layout() {
        let d = compute(Phase::Encrypt, &[epoch(1, EpochState::Active)]);
        let me = &topology().nodes["node-1"];
        let out: Vec<_> = d.states.values().filter(|s| s.dir == Dir::Out).collect();
        for s in &out {
            assert_eq!(s.src, me.ipv4);
            assert_eq!(
                s.spi,
                (2 << 24) | (10 << 16) | 1,
                "epoch 1, incarnation 10, id 1"
            );
            assert_eq!((s.sender.as_str(), s.incarnation), ("node-1", 10));
        }
        let inb: Vec<_> = d.states.values().filter(|s| s.dir == Dir::In).collect();
        let spis: Vec<u32> = inb.iter().map(|s| s.spi).collect();
        assert_eq!(spis.len(), 2);
        assert!(spis.contains(&((2 << 24) | (20 << 16) | 2)));
        assert!(spis.contains(&((2 << 24) | (30 << 16) | 3)));
        for p in d.policies.values() {
            assert_eq!(p.sel.proto, PROTO_IPIP, "the fixture's pool is IPIP Always");
            assert_eq!(p.reqid, keys::reqid(1));
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
            .find(|p| p.dir == Dir::Out)
            .expect("out");
        assert_eq!(out.reqid, keys::reqid(2));
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
        })
        .expect("computes");
        let n3 = t.nodes["node-3"].ipv4;
        assert!(d.states.values().all(|s| s.src != n3 && s.dst != n3));
        assert!(d.policies.values().any(|p| p.sel.dst == n3), "fail closed");
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
}
