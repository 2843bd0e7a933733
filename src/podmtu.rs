//! The pod's interface and its host-side veth: find them, lower their MTU to
//! the encryption bound, and put it back.
//!
//! The pod interface is found by `CNI_IFNAME` inside `CNI_NETNS`, never by
//! position in a result. Its host peer is the link whose index the pod veth
//! reports (`IFLA_LINK`) *and* which reports the pod veth back as its own peer,
//! so a reused index or name can never send us to an unrelated link.

use std::path::{Path, PathBuf};

use crate::link::{Link, LinkError, RouteSocket};
use crate::netns::{self, NetnsError};
use crate::state::attachment::{Backup, StateDir};
use crate::state::StateError;

/// A failure finding or changing the pod's links.
#[derive(Debug, thiserror::Error)]
pub enum PodMtuError {
    /// The pod namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// No interface named `CNI_IFNAME` in the pod namespace.
    #[error("no interface named {ifname} in network namespace {netns}")]
    NoInterface {
        /// `CNI_IFNAME`.
        ifname: String,
        /// `CNI_NETNS`.
        netns: PathBuf,
    },
    /// A netlink request failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The backup could not be written or read.
    #[error(transparent)]
    State(#[from] StateError),
}

/// The pod interface and, for a veth, its verified host-side peer.
#[derive(Debug, Clone)]
pub struct PodLinks {
    /// `CNI_IFNAME` in the pod namespace.
    pub pod: Link,
    /// Its host-side veth peer in the node namespace, when there is one.
    pub host: Option<Link>,
}

impl PodLinks {
    /// The links whose MTU is above `bound`, as (link, in pod?) pairs.
    pub fn above(&self, bound: u32) -> impl Iterator<Item = (&Link, bool)> {
        std::iter::once((&self.pod, true))
            .chain(self.host.iter().map(|h| (h, false)))
            .filter(move |(l, _)| l.mtu > bound)
    }
}

/// Route sockets in the pod namespace and in the node namespace.
pub struct PodNet {
    pod: RouteSocket,
    host: RouteSocket,
    netns: PathBuf,
}

impl PodNet {
    /// Opens a socket inside `netns` (on a short-lived thread) and one here.
    pub fn open(netns_path: &Path) -> Result<Self, PodMtuError> {
        let pod = netns::with(netns_path, RouteSocket::open)??;
        let host = RouteSocket::open()?;
        Ok(Self {
            pod,
            host,
            netns: netns_path.to_path_buf(),
        })
    }

    /// Finds `ifname` in the pod and its host peer.
    pub fn find(&mut self, ifname: &str) -> Result<PodLinks, PodMtuError> {
        let pod = self
            .pod
            .by_name(ifname)?
            .ok_or_else(|| PodMtuError::NoInterface {
                ifname: ifname.to_string(),
                netns: self.netns.clone(),
            })?;
        let host = match (pod.is_veth(), pod.peer_index) {
            (true, Some(idx)) => self
                .host
                .by_index(idx)?
                .filter(|h| h.is_veth() && h.peer_index == Some(pod.index)),
            _ => None,
        };
        if host.is_none() {
            tracing::info!(ifname, "pod interface has no host-side veth peer in this namespace; only the pod side is clamped");
        }
        Ok(PodLinks { pod, host })
    }

    /// Sets the MTU of a link found by `find`.
    pub fn set_mtu(&mut self, link: &Link, in_pod: bool, mtu: u32) -> Result<(), PodMtuError> {
        let sock = if in_pod {
            &mut self.pod
        } else {
            &mut self.host
        };
        sock.set_mtu(link, mtu)?;
        tracing::info!(ifname = %link.name, in_pod, from = link.mtu, to = mtu, "set MTU");
        Ok(())
    }
}

/// One MTU that ADD lowered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lowered {
    /// Interface name.
    pub name: String,
    /// In the pod namespace (true) or the node namespace.
    pub in_pod: bool,
    /// The new MTU.
    pub mtu: u32,
}

/// Lowers every link above `bound` to it, after saving a backup.
/// Either all of them change or none does.
pub fn clamp(
    net: &mut PodNet,
    links: &PodLinks,
    bound: u32,
    state: &StateDir,
    container_id: &str,
    ifname: &str,
) -> Result<Vec<Lowered>, PodMtuError> {
    let todo: Vec<(Link, bool)> = links.above(bound).map(|(l, p)| (l.clone(), p)).collect();
    if todo.is_empty() {
        return Ok(Vec::new());
    }
    // Keep the oldest backup: a repeated ADD must not record our own values.
    let created = match state.load(container_id, ifname) {
        Ok(Some(_)) => false,
        Ok(None) => true,
        Err(StateError::Corrupt { path, reason }) => {
            tracing::warn!(path = %path.display(), %reason, "moving a corrupt MTU backup aside");
            state.quarantine(container_id, ifname)?;
            true
        }
        Err(e) => return Err(e.into()),
    };
    if created {
        state.save(&Backup {
            container_id: container_id.to_string(),
            ifname: ifname.to_string(),
            pod_mtu: links.pod.mtu,
            host_ifname: links.host.as_ref().map(|h| h.name.clone()),
            host_mtu: links.host.as_ref().map(|h| h.mtu),
            bound,
        })?;
    }
    let mut done: Vec<&(Link, bool)> = Vec::new();
    for item in &todo {
        let (link, in_pod) = item;
        if let Err(e) = net.set_mtu(link, *in_pod, bound) {
            // Roll back what changed, newest first, then the backup.
            for (l, p) in done.iter().rev().map(|x| (&x.0, x.1)) {
                if let Err(re) = net.set_mtu(l, p, l.mtu) {
                    tracing::error!(ifname = %l.name, error = %re, "rolling back MTU failed");
                }
            }
            if created {
                if let Err(re) = state.remove(container_id, ifname) {
                    tracing::error!(error = %re, "removing MTU backup during rollback failed");
                }
            }
            return Err(e);
        }
        done.push(item);
    }
    Ok(todo
        .into_iter()
        .map(|(l, in_pod)| Lowered {
            name: l.name,
            in_pod,
            mtu: bound,
        })
        .collect())
}

/// Whether DEL may put `recorded` back on a link now at `current`: only
/// when ADD's change is still in place (`current` is the bound it set) and
/// the recorded value is what ADD lowered from (above the bound). So DEL
/// only ever raises a link from our bound back to its own pre-ADD MTU.
pub fn may_restore(current: u32, recorded: u32, bound: u32) -> bool {
    current == bound && recorded > bound
}

/// Puts back the MTUs in `backup` on links that are still there, still ours
/// and still at the bound ADD set ([`may_restore`]). Missing namespaces and
/// links are fine; other failures are returned.
pub fn restore(netns_path: &Path, backup: &Backup) -> Result<(), PodMtuError> {
    let mut net = match PodNet::open(netns_path) {
        Ok(n) => n,
        // Gone, or a leftover file whose namespace was already unmounted.
        Err(PodMtuError::Netns(NetnsError::NotFound(_))) => return Ok(()),
        Err(PodMtuError::Netns(NetnsError::Enter {
            source: nix::errno::Errno::EINVAL,
            ..
        })) => return Ok(()),
        Err(e) => return Err(e),
    };
    let links = match net.find(&backup.ifname) {
        Ok(l) => l,
        Err(PodMtuError::NoInterface { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut todo = vec![(&links.pod, true, backup.pod_mtu)];
    if let (Some(host), Some(mtu)) = (&links.host, backup.host_mtu) {
        if Some(&host.name) == backup.host_ifname.as_ref() {
            todo.push((host, false, mtu));
        }
    }
    for (link, in_pod, recorded) in todo {
        if link.mtu == recorded {
            continue;
        }
        if may_restore(link.mtu, recorded, backup.bound) {
            net.set_mtu(link, in_pod, recorded)?;
        } else {
            tracing::warn!(ifname = %link.name, in_pod, mtu = link.mtu, recorded, bound = backup.bound,
                "not restoring the MTU: the link is no longer at the bound ADD set, or the backup's value is not one ADD lowered from");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::may_restore;

    #[test]
    fn del_only_undoes_our_own_lowering() {
        assert!(may_restore(1446, 1480, 1446), "ADD lowered 1480 to 1446");
        assert!(
            !may_restore(1300, 1480, 1446),
            "someone else changed it since"
        );
        assert!(
            !may_restore(1446, 1400, 1446),
            "ADD never lowered from below the bound"
        );
        assert!(!may_restore(1446, 1446, 1446));
    }
}
