//! What the desired state says of each peer, for `status`, metrics and
//! logs: the paths in use, the blocked ones and why.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::{Dir, Selector};
use crate::datastore::paths::PathKind;

/// One peer's traffic in one address family (for `status` and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathView {
    /// "ipv4" or "ipv6".
    pub family: &'static str,
    /// Every path in use, either way (several when pools differ).
    pub paths: BTreeSet<PathKind>,
    /// Why a path is blocked, when one is.
    pub blocked: Vec<String>,
    /// The states desired for this peer and family.
    #[serde(skip)]
    pub states: Vec<(Dir, (IpAddr, u32))>,
    /// The policies desired for this peer and family.
    #[serde(skip)]
    pub policies: Vec<(Dir, Selector)>,
}

/// One peer as this node sees it (for `status` and logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerView {
    /// Node name.
    pub name: String,
    /// Underlay addresses (IPv4 first).
    pub addresses: Vec<IpAddr>,
    /// The peer's id, once it has published one.
    pub id: Option<u16>,
    /// The peer's incarnation (0 before it published one).
    pub incarnation: u32,
    /// Why the peer is refused (its pods are blocked), if it is.
    pub refused: Option<String>,
    /// Per family.
    pub families: Vec<PathView>,
}

/// A path no SA protects, and why (counted by `calico_ipsec_unprotected_paths`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unprotected {
    /// The peer (or the owner of the blocks).
    pub peer: String,
    /// The destination blocks concerned.
    pub blocks: Vec<IpNet>,
    /// Why.
    pub reason: String,
}
