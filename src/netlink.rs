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
    NetlinkBuffer, NetlinkDeserializable, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_sys::{Socket as SysSocket, SocketAddr};
use zeroize::Zeroize;

/// Receive buffer size; large enough for any single netlink datagram.
const RECV_BUF: usize = 256 * 1024;
/// Requests per datagram in a batch: their ACKs must fit the socket's
/// receive queue (each ACK is a small skb of its own).
const BATCH_MSGS: usize = 64;
/// The netlink message header's length.
const HEADER_LEN: usize = 16;

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

    fn send(&mut self, inner: &M, flags: u16) -> Result<u32, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut bytes = Vec::new();
        encode(&mut bytes, inner, NLM_F_REQUEST | flags, self.seq);
        let sent = self.sock.send(&bytes, 0);
        bytes.zeroize();
        sent.map_err(NetlinkError::Io)?;
        Ok(self.seq)
    }

    /// Sends one request and collects the replies: until the ACK for a
    /// request, or until DONE for a dump (`NLM_F_DUMP` in `flags`).
    pub fn request(&mut self, inner: M, flags: u16) -> Result<Vec<M>, NetlinkError> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = if dump { flags } else { flags | NLM_F_ACK };
        let seq = self.send(&inner, flags)?;
        let mut out = Vec::new();
        loop {
            for msg in self.recv_messages()? {
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

    /// Sends one dump request and hands each reply's message type and
    /// payload to `each`, undecoded, straight from the receive buffer (which
    /// is zeroized after every datagram). Cheaper than [`Socket::request`]
    /// for big dumps of which only a few fields matter.
    pub fn dump_raw<F>(&mut self, inner: M, mut each: F) -> Result<(), NetlinkError>
    where
        F: FnMut(u16, &[u8]) -> Result<(), NetlinkError>,
    {
        let seq = self.send(&inner, NLM_F_REQUEST | NLM_F_DUMP)?;
        loop {
            self.buf.clear();
            let n = self.sock.recv(&mut self.buf, 0).map_err(NetlinkError::Io)?;
            let done = walk_raw(&self.buf[..n], seq, &mut each);
            self.buf[..n].zeroize();
            if done? {
                return Ok(());
            }
        }
    }

    /// Receives one datagram and decodes every message in it. The buffer is
    /// zeroized before returning: replies may hold key material (an XFRM
    /// state dump does).
    fn recv_messages(&mut self) -> Result<Vec<NetlinkMessage<M>>, NetlinkError> {
        self.buf.clear();
        let n = self.sock.recv(&mut self.buf, 0).map_err(NetlinkError::Io)?;
        let decoded = decode_all(&self.buf[..n]);
        self.buf[..n].zeroize();
        decoded
    }

    /// Sends `msgs` as write requests, many per datagram, each with its own
    /// ACK, and returns one result per message, in order. The kernel handles
    /// every message of a datagram even when an earlier one fails. The
    /// encoded bytes are zeroized after sending (XFRM requests carry keys).
    pub fn batch(&mut self, msgs: &[M]) -> Result<Vec<Result<(), NetlinkError>>, NetlinkError> {
        let mut results = Vec::with_capacity(msgs.len());
        let mut bytes = Vec::new();
        for chunk in msgs.chunks(BATCH_MSGS) {
            let first = self.seq.wrapping_add(1);
            bytes.clear();
            for m in chunk {
                self.seq = self.seq.wrapping_add(1);
                encode(&mut bytes, m, NLM_F_REQUEST | NLM_F_ACK, self.seq);
            }
            let sent = self.sock.send(&bytes, 0);
            bytes.zeroize();
            sent.map_err(NetlinkError::Io)?;
            let mut acks: Vec<Option<Result<(), NetlinkError>>> =
                (0..chunk.len()).map(|_| None).collect();
            let mut left = chunk.len();
            while left > 0 {
                for msg in self.recv_messages()? {
                    let slot = msg.header.sequence_number.wrapping_sub(first) as usize;
                    if slot >= chunk.len() {
                        continue;
                    }
                    if let NetlinkPayload::Error(e) = msg.payload {
                        if acks[slot].is_none() {
                            left -= 1;
                        }
                        acks[slot] = Some(match e.code {
                            None => Ok(()),
                            Some(code) => Err(NetlinkError::Kernel(-code.get())),
                        });
                    }
                }
            }
            results.extend(acks.into_iter().map(|a| a.unwrap_or(Ok(()))));
        }
        Ok(results)
    }
}

/// Hands every message of one datagram answering `seq` to `each`; true at
/// the end of the dump (DONE, or an error, returned as such).
fn walk_raw<F>(mut data: &[u8], seq: u32, each: &mut F) -> Result<bool, NetlinkError>
where
    F: FnMut(u16, &[u8]) -> Result<(), NetlinkError>,
{
    while data.len() >= HEADER_LEN {
        let word =
            |at: usize| u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
        let len = word(0) as usize;
        if len < HEADER_LEN || len > data.len() {
            return Err(NetlinkError::Decode(format!(
                "message length {len} with {} bytes left",
                data.len()
            )));
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let payload = &data[HEADER_LEN..len];
        if word(8) == seq {
            match kind {
                // Both carry an errno (DONE: 0 unless the dump failed).
                NLMSG_DONE | NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                    return match code {
                        0 => Ok(true),
                        c => Err(NetlinkError::Kernel(-c)),
                    };
                }
                NLMSG_OVERRUN => return Err(NetlinkError::Decode("receive overrun".into())),
                NLMSG_NOOP => {}
                _ => each(kind, payload)?,
            }
        }
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    Ok(false)
}

/// Decodes the messages of one datagram (each padded to 4 bytes).
fn decode_all<M: NetlinkDeserializable>(
    mut data: &[u8],
) -> Result<Vec<NetlinkMessage<M>>, NetlinkError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let len = NetlinkBuffer::new_checked(data)
            .map_err(|e| NetlinkError::Decode(e.to_string()))?
            .length() as usize;
        if len == 0 || len > data.len() {
            return Err(NetlinkError::Decode(format!(
                "message length {len} with {} bytes left",
                data.len()
            )));
        }
        out.push(
            NetlinkMessage::<M>::deserialize(&data[..len])
                .map_err(|e| NetlinkError::Decode(e.to_string()))?,
        );
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    Ok(out)
}

/// Appends one netlink message (header, payload, padding) to `out`.
fn encode<M: NetlinkSerializable>(out: &mut Vec<u8>, msg: &M, flags: u16, seq: u32) {
    let payload = msg.buffer_len();
    let len = HEADER_LEN + payload;
    let start = out.len();
    out.resize(start + ((len + 3) & !3), 0);
    let b = &mut out[start..];
    b[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&msg.message_type().to_ne_bytes());
    b[6..8].copy_from_slice(&flags.to_ne_bytes());
    b[8..12].copy_from_slice(&seq.to_ne_bytes());
    b[12..16].copy_from_slice(&0u32.to_ne_bytes());
    msg.serialize(&mut b[HEADER_LEN..len]);
}
