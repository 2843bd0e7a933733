//! A small synchronous netlink socket, generic over the message family.
//!
//! Sending, sequence checks, multipart receive and error decoding are done
//! here once; `link` (route) and later `xfrm` add one typed method per
//! operation on top. Every write asks the kernel for an ACK. Messages are
//! never logged whole: XFRM messages carry key material.

use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;

use netlink_packet_core::{
    NetlinkBuffer, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{Socket as SysSocket, SocketAddr};

/// Receive buffer size; large enough for any single netlink datagram.
const RECV_BUF: usize = 256 * 1024;

/// What went wrong talking to the kernel over netlink.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be created or bound.
    #[error("opening a netlink socket: {0}")]
    Open(#[source] io::Error),
    /// Sending or receiving failed.
    #[error("netlink I/O: {0}")]
    Io(#[source] io::Error),
    /// The kernel answered with an error code.
    #[error("{}", io::Error::from_raw_os_error(*.0))]
    Kernel(i32),
    /// A reply could not be decoded.
    #[error("undecodable netlink reply: {0}")]
    Decode(String),
}

impl NetlinkError {
    /// The errno the kernel answered with, if it was a kernel error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel(e) => Some(*e),
            _ => None,
        }
    }
}

/// A netlink socket of one protocol, carrying messages of type `M`.
pub struct Socket<M> {
    sock: SysSocket,
    seq: u32,
    buf: Vec<u8>,
    _family: PhantomData<fn() -> M>,
}

impl<M> Socket<M>
where
    M: NetlinkSerializable + NetlinkDeserializable + Debug,
{
    /// Opens and binds a socket of `protocol` (e.g. `NETLINK_ROUTE`) in the
    /// calling thread's network namespace.
    pub fn open(protocol: isize) -> Result<Self, NetlinkError> {
        let mut sock = SysSocket::new(protocol).map_err(NetlinkError::Open)?;
        sock.bind_auto().map_err(NetlinkError::Open)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Open)?;
        // Extended ACKs carry the kernel's reason; failure to enable is harmless.
        let _ = sock.set_ext_ack(true);
        Ok(Self {
            sock,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
            _family: PhantomData,
        })
    }

    fn send(&mut self, inner: M, flags: u16) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
        msg.finalize();
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut bytes);
        self.sock.send(&bytes, 0).map_err(NetlinkError::Io)?;
        Ok(self.seq)
    }

    /// Sends one request and collects the replies: until the ACK for a
    /// request, or until DONE for a dump (`NLM_F_DUMP` in `flags`).
    pub fn request(&mut self, inner: M, flags: u16) -> Result<Vec<M>, NetlinkError> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = if dump { flags } else { flags | NLM_F_ACK };
        let seq = self.send(inner, flags)?;
        let mut out = Vec::new();
        loop {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, 0).map_err(NetlinkError::Io)?;
            let mut off = 0usize;
            while off < n {
                let data = &self.buf[off..n];
                let len = NetlinkBuffer::new_checked(data)
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?
                    .length() as usize;
                if len == 0 || len > data.len() {
                    return Err(NetlinkError::Decode(format!(
                        "message length {len} with {} bytes left",
                        data.len()
                    )));
                }
                let msg = NetlinkMessage::<M>::deserialize(&data[..len])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                // Netlink pads each message to 4 bytes.
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue; // a late reply to an earlier request
                }
                match msg.payload {
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => return Err(NetlinkError::Kernel(-code.get())),
                    },
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Overrun(_) => {
                        return Err(NetlinkError::Decode("receive overrun".into()))
                    }
                    _ => {}
                }
            }
        }
    }
}
