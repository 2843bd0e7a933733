//! Watches the kernel as the agent watches etcd: XFRM and link notifications.
//!
//! Two netlink sockets joined to multicast groups, each read on its own
//! thread:
//! - `NETLINK_XFRM`: states and policies added, updated, deleted, expired,
//!   and flushes (`ip xfrm state flush`, another IPsec daemon, a module
//!   reload);
//! - `NETLINK_ROUTE`: links and addresses (the uplink, `tunl0`,
//!   `vxlan.calico`).
//!
//! Nothing is decoded beyond the message type: any notification means "the
//! kernel may have drifted", and the agent converges, which compares the
//! whole desired set with a fresh dump. A notification of our own writes
//! costs one convergence that changes nothing. An XFRM state notification
//! carries the SA's key, so the receive buffer is zeroized after every read
//! and no message is ever kept or logged.

use std::io;

use netlink_sys::{protocols, Socket, SocketAddr};
use tokio::sync::mpsc;
use zeroize::Zeroize;

/// One kernel notification, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelEvent {
    /// An XFRM state or policy changed, or a table was flushed.
    Xfrm(&'static str),
    /// A link or an address changed.
    Link(&'static str),
    /// Notifications were lost (the socket's queue overflowed).
    Overrun,
}

impl std::fmt::Display for KernelEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelEvent::Xfrm(k) | KernelEvent::Link(k) => f.write_str(k),
            KernelEvent::Overrun => f.write_str("notifications lost"),
        }
    }
}

/// XFRM multicast groups (`enum xfrm_nlgroups`), as a bind mask.
const XFRM_GROUPS: u32 = (1 << (2 - 1)) // XFRMNLGRP_EXPIRE
    | (1 << (3 - 1)) // XFRMNLGRP_SA
    | (1 << (4 - 1)); // XFRMNLGRP_POLICY
/// Route groups: RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR.
const ROUTE_GROUPS: u32 = 0x1 | 0x10 | 0x100;

fn xfrm_kind(t: u16) -> Option<&'static str> {
    Some(match t {
        16 => "state added",
        17 => "state deleted",
        19 => "policy added",
        20 => "policy deleted",
        24 => "state expired",
        25 => "policy updated",
        26 => "state updated",
        27 => "policy expired",
        28 => "states flushed",
        29 => "policies flushed",
        _ => return None,
    })
}

fn link_kind(t: u16) -> Option<&'static str> {
    Some(match t {
        16 => "link changed",
        17 => "link removed",
        20 => "address added",
        21 => "address removed",
        _ => return None,
    })
}

/// Opens both sockets in the calling thread's namespace and starts their
/// reader threads. Events go to `tx`; when it is full an event is already
/// waiting, which is all the agent needs to know.
pub fn spawn(tx: mpsc::Sender<KernelEvent>) -> io::Result<()> {
    let xfrm = open(protocols::NETLINK_XFRM, XFRM_GROUPS)?;
    let route = open(protocols::NETLINK_ROUTE, ROUTE_GROUPS)?;
    let tx2 = tx.clone();
    std::thread::Builder::new()
        .name("watch-xfrm".into())
        .spawn(move || read(&xfrm, &tx, KernelEvent::Xfrm, xfrm_kind))?;
    std::thread::Builder::new()
        .name("watch-link".into())
        .spawn(move || read(&route, &tx2, KernelEvent::Link, link_kind))?;
    Ok(())
}

fn open(protocol: isize, groups: u32) -> io::Result<Socket> {
    let mut s = Socket::new(protocol)?;
    s.bind(&SocketAddr::new(0, groups))?;
    // A larger queue: a flush of thousands of objects arrives at once.
    let _ = s.set_rx_buf_sz(4 * 1024 * 1024);
    Ok(s)
}

fn read(
    sock: &Socket,
    tx: &mpsc::Sender<KernelEvent>,
    wrap: fn(&'static str) -> KernelEvent,
    kind: fn(u16) -> Option<&'static str>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    loop {
        buf.clear();
        let got = sock.recv(&mut buf, 0);
        let mut event = None;
        match got {
            Ok(n) => {
                // Every netlink message in the datagram: 16-byte headers,
                // the type at offset 4, lengths aligned to 4.
                let mut at = 0usize;
                while at + 16 <= n.min(buf.len()) {
                    let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
                        as usize;
                    let ty = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                    if let Some(k) = kind(ty) {
                        event = Some(wrap(k));
                    }
                    if len < 16 {
                        break;
                    }
                    at += (len + 3) & !3;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => event = Some(KernelEvent::Overrun),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::error!(error = %e, "the kernel notification socket failed; drift is found by the periodic resync only");
                buf.zeroize();
                // Tell the agent, so that it converges once more.
                let _ = tx.try_send(KernelEvent::Overrun);
                return;
            }
        }
        // The datagram may hold an SA's key: wipe the whole allocation
        // (zeroize clears the spare capacity too).
        buf.zeroize();
        if let Some(ev) = event {
            if tx.is_closed() {
                return;
            }
            let _ = tx.try_send(ev);
        }
    }
}
