//! Network links over rtnetlink: list them, find one, set its MTU.
//!
//! Each method is one `ip link` verb. The socket acts in the network namespace
//! of the thread that opened it (see `netns::with`).

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::netlink::{NetlinkError, Socket};

/// A link-level failure, naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The netlink exchange failed.
    #[error("{op}: {source}")]
    Netlink {
        /// What was being done, e.g. "set MTU of eth0 to 1446".
        op: String,
        /// The underlying failure.
        #[source]
        source: NetlinkError,
    },
}

impl LinkError {
    /// The kernel errno behind this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Netlink { source, .. } => source.errno(),
        }
    }
}

/// What we need to know about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index in its namespace.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Current MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// A loopback device.
    pub loopback: bool,
    /// `IFLA_LINK`: for a veth, the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the peer's namespace, as seen from this one.
    pub peer_netnsid: Option<i32>,
    /// `IFLA_INFO_KIND`, e.g. "veth".
    pub kind: Option<String>,
    /// `IFLA_VXLAN_PORT`: the UDP port a VXLAN device sends to.
    pub vxlan_port: Option<u16>,
}

impl Link {
    fn from_message(m: &LinkMessage) -> Self {
        let mut link = Link {
            index: m.header.index,
            name: String::new(),
            mtu: 0,
            up: m.header.flags.contains(LinkFlags::Up),
            loopback: m.header.link_layer_type == LinkLayerType::Loopback
                || m.header.flags.contains(LinkFlags::Loopback),
            peer_index: None,
            peer_netnsid: None,
            kind: None,
            vxlan_port: None,
        };
        for attr in &m.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Mtu(v) => link.mtu = *v,
                LinkAttribute::Link(i) => link.peer_index = Some(*i),
                LinkAttribute::LinkNetNsId(i) => link.peer_netnsid = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(kind_name(k)),
                            LinkInfo::Data(InfoData::Vxlan(v)) => {
                                link.vxlan_port = v.iter().find_map(|a| match a {
                                    InfoVxlan::Port(p) => Some(*p),
                                    _ => None,
                                });
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// Whether this link is a veth.
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

/// An rtnetlink socket bound in the namespace where it was opened.
pub struct RouteSocket(Socket<RouteNetlinkMessage>);

impl RouteSocket {
    /// Opens a route socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, LinkError> {
        Socket::open(netlink_sys::constants::NETLINK_ROUTE)
            .map(RouteSocket)
            .map_err(|source| LinkError::Netlink {
                op: "open route netlink socket".into(),
                source,
            })
    }

    /// `ip link show`: every link in the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, LinkError> {
        let replies = self
            .0
            .request(
                RouteNetlinkMessage::GetLink(LinkMessage::default()),
                NLM_F_REQUEST | NLM_F_DUMP,
            )
            .map_err(|source| LinkError::Netlink {
                op: "list links".into(),
                source,
            })?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(Link::from_message(m)),
                _ => None,
            })
            .collect())
    }

    fn get(&mut self, req: LinkMessage, what: String) -> Result<Option<Link>, LinkError> {
        match self.0.request(RouteNetlinkMessage::GetLink(req), 0) {
            Ok(replies) => Ok(replies.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(Link::from_message(m)),
                _ => None,
            })),
            Err(NetlinkError::Kernel(libc::ENODEV)) => Ok(None),
            Err(source) => Err(LinkError::Netlink {
                op: format!("look up {what}"),
                source,
            }),
        }
    }

    /// `ip link show dev NAME`; `None` when there is no such link.
    pub fn by_name(&mut self, name: &str) -> Result<Option<Link>, LinkError> {
        let mut req = LinkMessage::default();
        req.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.get(req, format!("interface {name}"))
    }

    /// `ip link show` by index; `None` when there is no such link.
    pub fn by_index(&mut self, index: u32) -> Result<Option<Link>, LinkError> {
        let mut req = LinkMessage::default();
        req.header.index = index;
        self.get(req, format!("interface index {index}"))
    }

    /// `ip link set dev NAME mtu MTU`.
    pub fn set_mtu(&mut self, link: &Link, mtu: u32) -> Result<(), LinkError> {
        let mut req = LinkMessage::default();
        req.header.index = link.index;
        req.attributes.push(LinkAttribute::Mtu(mtu));
        self.0
            .request(RouteNetlinkMessage::SetLink(req), 0)
            .map(|_| ())
            .map_err(|source| LinkError::Netlink {
                op: format!("set MTU of {} to {mtu}", link.name),
                source,
            })
    }
}
