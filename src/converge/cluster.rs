//! What a convergence keeps apart from the XFRM plan: the fact that this
//! node has seen the cluster initialised (so a missing config record is
//! never read as "off"), the catch-all guard's place around the plan, and
//! the VXLAN ports this node's devices really use.
//!
//! `<state_dir>/node/cluster` holds `{"cluster_guid": .., "phase_generation":
//! ..}`: written whenever this node converges on a phase other than `off`,
//! removed when it converges on `off` from a config record that says so
//! (`calico-ipsec disable`). While it exists and the config record does not,
//! every convergence is refused, whatever the kernel holds (DESIGN §5b).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConvergeError;
use crate::datastore::calico::Topology;
use crate::datastore::ipsec::{config_key, IpsecStoreError, Phase};
use crate::datastore::snapshot::Snapshot;
use crate::link::RouteSocket;
use crate::xfrm::guard::Guard;

/// Calico's VXLAN devices, IPv4 then IPv6.
const VXLAN_DEVICES: [(&str, bool); 2] = [("vxlan.calico", true), ("vxlan-v6.calico", false)];

/// This node has seen the cluster initialised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Calico's clusterGUID at the time.
    pub cluster_guid: String,
    /// The highest phase generation converged on.
    pub phase_generation: u64,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("node").join("cluster")
}

impl Seen {
    /// What this node remembers (`None`: never initialised, or disabled
    /// since). A record that cannot be read counts as seen: refusing is the
    /// safe side.
    pub fn load(state_dir: &Path) -> Option<Self> {
        let read = crate::fsutil::read_state(&path(state_dir), 4096);
        if matches!(read, Ok(None)) {
            return None;
        }
        Some(
            read.ok()
                .flatten()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .unwrap_or(Seen {
                    cluster_guid: "(unreadable record)".into(),
                    phase_generation: 0,
                }),
        )
    }

    /// Notes a convergence on `phase`: remembered when not `off`, forgotten
    /// when `off` (the config record says so).
    pub fn note(
        state_dir: &Path,
        phase: Phase,
        guid: Option<&str>,
        generation: u64,
    ) -> Result<(), ConvergeError> {
        let p = path(state_dir);
        if phase == Phase::Off {
            return match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ConvergeError::State {
                    op: "removing",
                    path: p,
                    source: e,
                }),
                _ => Ok(()),
            };
        }
        let was = Self::load(state_dir);
        let now = Seen {
            cluster_guid: guid.unwrap_or_default().to_string(),
            phase_generation: generation.max(was.as_ref().map_or(0, |w| w.phase_generation)),
        };
        if was.as_ref() == Some(&now) {
            return Ok(());
        }
        let body = serde_json::to_vec(&now).unwrap_or_default();
        crate::fsutil::write_atomic(&p, &body, 0o600).map_err(|source| ConvergeError::State {
            op: "writing",
            path: p,
            source,
        })
    }

    /// Why a convergence is refused while the config record is missing.
    pub fn missing_reason(&self) -> String {
        format!(
            "the record is missing, but this node has seen the cluster initialised (clusterGUID {}, phase generation {}), so encryption may be required: restore the record (etcd backup, or `calico-ipsec keys init` then `enable`); to turn encryption off, run `calico-ipsec disable` before removing anything",
            self.cluster_guid.escape_debug(),
            self.phase_generation
        )
    }
}

/// Why the config record cannot be followed, judged the same way by a
/// convergence, CHECK and `status`: unparsable; missing on a node that has
/// seen the cluster initialised; or missing while this node holds IPsec
/// state. `None`: it can be followed (absent on a node that never saw the
/// cluster and holds nothing is phase off).
pub fn config_gone(snap: &Snapshot, state_dir: &Path, holds_state: bool) -> Option<String> {
    if snap.config.is_some() {
        return None;
    }
    if let Some(why) = &snap.config_problem {
        return Some(why.clone());
    }
    if let Some(seen) = Seen::load(state_dir) {
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

/// Writes the guard. At `encrypt` and above a guard that cannot be written
/// fails the convergence: without it, a path no policy covers could leave
/// in clear. Below, a failure is only logged (there is nothing to guard).
pub fn sync_guard(
    g: &Guard,
    phase: Phase,
    state_dir: &Path,
    boot: &str,
    reassert: bool,
) -> Result<(), ConvergeError> {
    match g.sync(state_dir, boot, reassert) {
        Ok(_) => Ok(()),
        Err(e) if phase < Phase::Encrypt => {
            tracing::warn!(error = %e, "cannot remove the nftables catch-all");
            Ok(())
        }
        Err(e) => Err(ConvergeError::Guard(e)),
    }
}

/// Puts back the catch-all kept from before this boot, or with `force`
/// whatever this boot did (see [`crate::xfrm::guard::restore`]); a failure
/// is logged, and the convergence that follows writes the guard or fails.
pub fn restore_guard(state_dir: &Path, force: bool) {
    let boot = crate::clock::read_boot_id().unwrap_or_default();
    if let Err(e) = crate::xfrm::guard::restore(state_dir, &boot, force) {
        tracing::error!(error = %e, "cannot restore the nftables catch-all kept from before this boot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_is_remembered_until_it_is_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("node")).unwrap();
        assert!(Seen::load(dir.path()).is_none());
        Seen::note(dir.path(), Phase::Accept, Some("guid-1"), 3).unwrap();
        Seen::note(dir.path(), Phase::Enforce, Some("guid-1"), 2).unwrap();
        let s = Seen::load(dir.path()).unwrap();
        assert_eq!(s.phase_generation, 3, "the highest generation is kept");
        let e = config_refused(s.missing_reason()).to_string();
        assert!(
            e.contains("/calico/ipsec/v1/config") && e.contains("guid-1"),
            "{e}"
        );
        Seen::note(dir.path(), Phase::Off, None, 4).unwrap();
        assert!(Seen::load(dir.path()).is_none());
        // An unreadable record counts as seen.
        std::fs::write(path(dir.path()), b"{").unwrap();
        assert!(Seen::load(dir.path()).is_some());
    }
}
