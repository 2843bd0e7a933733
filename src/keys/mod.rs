//! Key material: the key-encryption key, sealed epoch secrets, per-SA keys
//! and SPIs. Nothing in here ever formats a key: every secret lives in a
//! zeroizing newtype whose `Debug` prints `[redacted]`.
//!
//! The derivation (also in the README, precisely enough to re-derive a key):
//!
//! ```text
//! okm = HKDF-SHA256(
//!     IKM  = epoch secret (32 bytes),
//!     salt = clusterGUID as ASCII bytes,
//!     info = "calico-ipsec/v1/sa" || u32be(epoch) || u16be(len(sender)) || sender
//!            || u32be(sender incarnation) || u16be(len(receiver)) || receiver
//!            || suffix,
//!     L    = 20 for an AES-128 epoch, 36 for an AES-256 epoch)
//! suffix = AES-128: u8(lane) when the lane is not 0, nothing for lane 0
//!          AES-256: u8(lane) || u8(0x20), always (also for lane 0)
//! AES-GCM key = okm[0..L-4], salt (nonce prefix) = okm[L-4..L]
//! ```
//! The receiver's name is length-prefixed and last, so the suffix's length
//! (0, 1 or 2 bytes) says which form it is: an AES-256 key never shares the
//! HKDF output an AES-128 key of the same SA would have.
//! An epoch sealed as version 3 uses the v2 derivation: the label is
//! `"calico-ipsec/v2/sa"` and `u32be(receiver incarnation)` follows the
//! receiver's name (before the suffix), so a receiver that lost its SAs
//! takes a new incarnation and never accepts a replay of earlier traffic.
//! The lane is the SA's family and mode: 0 IPv4 transport (IPIP, VXLAN),
//! 1 IPv4 tunnel (no encapsulation), 2 IPv6 transport (VXLAN over IPv6),
//! 3 IPv6 tunnel. One key per (epoch, sender, sender incarnation, receiver,
//! lane): an outbound SA
//! is created once with its own key, so two SAs never share a GCM key and the
//! nonce space of each starts fresh (DESIGN §5, invariant 1).

use zeroize::Zeroizing;

pub mod agreement;
pub mod crypto;
mod kek;
mod secret;

pub use kek::{Kek, KekError};
pub use secret::{Aad, EpochSecret, SaKey, SealBinding, SealError, SecretBytes};

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Lower-case hex of secret bytes, written straight into a zeroizing string
/// (sized up front, with `spare` bytes more, so it never reallocates and
/// leaves no copy behind): the KEK file and the epoch key files.
pub fn secret_hex(bytes: &[u8], spare: usize) -> Zeroizing<String> {
    let mut hex = Zeroizing::new(String::with_capacity(bytes.len() * 2 + spare));
    for b in bytes {
        hex.push(char::from(HEX[usize::from(b >> 4)]));
        hex.push(char::from(HEX[usize::from(b & 15)]));
    }
    hex
}

/// Exactly `len` bytes from `2 * len` hex characters (either case), into a
/// zeroizing buffer; `None` for anything else.
pub fn secret_from_hex(hex: &[u8], len: usize) -> Option<Zeroizing<Vec<u8>>> {
    if hex.len() != len * 2 {
        return None;
    }
    let mut bytes = Zeroizing::new(vec![0u8; len]);
    for (out, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
        *out = hex_val(pair[0])? << 4 | hex_val(pair[1])?;
    }
    Some(bytes)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The AEAD every SA uses: AES-GCM as RFC 4106 puts it in ESP.
pub const ALGORITHM: &str = "rfc4106(gcm(aes))";

/// The HKDF info label's prefix of epochs sealed before version 3: the
/// key depends on the sender's incarnation only.
pub const INFO_LABEL: &[u8] = b"calico-ipsec/v1/sa";

/// The HKDF info label's prefix of epochs sealed as version 3: the
/// receiver's incarnation follows its name, so a receiver that lost its
/// SAs (and so its replay windows) never gets the same key back.
pub const INFO_LABEL_V2: &[u8] = b"calico-ipsec/v2/sa";

/// AES key sizes an epoch may use, in bits.
pub const KEY_BITS: [u32; 2] = [128, 256];

/// The default AES key size of a new cluster.
pub const DEFAULT_KEY_BITS: u32 = 128;

/// The bytes of an rfc4106 key for an AES key of `key_bits` (the AES key,
/// then a 4-byte salt); `None` for a size we do not use.
pub fn sa_key_len(key_bits: u32) -> Option<usize> {
    match key_bits {
        128 => Some(20),
        256 => Some(36),
        _ => None,
    }
}

/// Everything that identifies one outbound SA's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaId<'a> {
    /// The key epoch.
    pub epoch: u32,
    /// The sending node's name.
    pub sender: &'a str,
    /// The sender's incarnation (bumped whenever it may have lost its SAs).
    pub incarnation: u32,
    /// The receiving node's name.
    pub receiver: &'a str,
    /// The SA's lane (0 to 3; see the derivation above).
    pub lane: u8,
    /// The AES key size of the epoch (128 or 256).
    pub key_bits: u32,
    /// The receiver's incarnation, for an epoch sealed as version 3 (the
    /// v2 derivation); `None` for earlier epochs.
    pub receiver_incarnation: Option<u32>,
}

impl SaId<'_> {
    /// The HKDF info bytes for this SA, as documented above; `None` when a
    /// name is longer than a Kubernetes node name may be (253 bytes): names
    /// are never truncated, so two names never share a key; `None` too for
    /// a key size we do not use.
    pub fn info(&self) -> Option<Vec<u8>> {
        let mut info =
            Vec::with_capacity(INFO_LABEL.len() + 17 + self.sender.len() + self.receiver.len());
        info.extend_from_slice(match self.receiver_incarnation {
            None => INFO_LABEL,
            Some(_) => INFO_LABEL_V2,
        });
        info.extend_from_slice(&self.epoch.to_be_bytes());
        push_name(&mut info, self.sender)?;
        info.extend_from_slice(&self.incarnation.to_be_bytes());
        push_name(&mut info, self.receiver)?;
        if let Some(r) = self.receiver_incarnation {
            info.extend_from_slice(&r.to_be_bytes());
        }
        match self.key_bits {
            128 if self.lane != 0 => info.push(self.lane),
            128 => {}
            256 => info.extend_from_slice(&[self.lane, 0x20]),
            _ => return None,
        }
        Some(info)
    }
}

/// The longest node name Kubernetes allows.
pub const MAX_NAME_LEN: usize = 253;

fn push_name(buf: &mut Vec<u8>, name: &str) -> Option<()> {
    let len = u16::try_from(name.len())
        .ok()
        .filter(|l| usize::from(*l) <= MAX_NAME_LEN)?;
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(name.as_bytes());
    Some(())
}

/// The largest node id: bit 15 of an SPI tells tunnel from transport SAs.
pub const MAX_NODE_ID: u16 = 0x7fff;

/// The SPI of the SA from `sender_id` in `epoch` at `incarnation`.
///
/// `SPI = (epoch % 255 + 1) << 24 | (incarnation % 256) << 16 | tunnel << 15
/// | sender_id`, with `sender_id` at most [`MAX_NODE_ID`]. The top byte is
/// never 0, so SPIs stay clear of the reserved range below 256; a receiver
/// sees distinct SPIs for distinct senders and modes, for up to 255 epochs
/// and 256 incarnations installed at once (IPv4 and IPv6 SAs have distinct
/// destination addresses).
pub fn spi(epoch: u32, incarnation: u32, sender_id: u16, tunnel: bool) -> u32 {
    ((epoch % 255 + 1) << 24)
        | ((incarnation % 256) << 16)
        | (u32::from(tunnel) << 15)
        | u32::from(sender_id & MAX_NODE_ID)
}

/// The SPI of an SA whose key binds both ends (an epoch sealed as version
/// 3): the incarnation byte holds the low 4 bits of the sender's
/// incarnation, then the low 4 bits of the receiver's.
///
/// `SPI = (epoch % 255 + 1) << 24 | (sender incarnation % 16) << 20 |
/// (receiver incarnation % 16) << 16 | tunnel << 15 | sender_id`. A new
/// incarnation of either end is a new SPI, so both ends can hand over
/// make-before-break: the receiver keeps the SA its peers still send on
/// while it installs the one they will send on next (up to 16 incarnations
/// of each end can be told apart at once; two are ever in use).
pub fn spi_bound(
    epoch: u32,
    sender_incarnation: u32,
    receiver_incarnation: u32,
    sender_id: u16,
    tunnel: bool,
) -> u32 {
    ((epoch % 255 + 1) << 24)
        | ((sender_incarnation % 16) << 20)
        | ((receiver_incarnation % 16) << 16)
        | (u32::from(tunnel) << 15)
        | u32::from(sender_id & MAX_NODE_ID)
}

/// The top 16 bits of every reqid we use: they mark a state as ours.
pub const REQID_TAG: u32 = 0xCA1C_0000;

/// The XFRM reqid of an epoch: policies pick the active epoch's SAs by it.
///
/// `reqid = 0xCA1C0000 | (epoch % 65535 + 1)`: never 0 (which means "any" in
/// a template), and tagged so that states of other IPsec software are never
/// mistaken for ours.
pub fn reqid(epoch: u32) -> u32 {
    REQID_TAG | (epoch % 0xffff + 1)
}

/// Whether `reqid` is one of ours.
pub fn is_our_reqid(reqid: u32) -> bool {
    reqid & 0xffff_0000 == REQID_TAG && reqid & 0xffff != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spis_are_unique_per_receiver_and_never_reserved() {
        let mut seen = std::collections::HashSet::new();
        for epoch in [1u32, 2, 3, 254, 255] {
            for inc in [0u32, 1, 255] {
                for sender in [1u16, 2, MAX_NODE_ID] {
                    for tunnel in [false, true] {
                        let s = spi(epoch, inc, sender, tunnel);
                        assert!(s >= 256, "SPI {s:#x} is in the reserved range");
                        assert!(seen.insert(s), "SPI {s:#x} repeats");
                    }
                }
            }
        }
        assert_eq!(spi(1, 0, 7, false), 0x0200_0007);
        assert_eq!(spi(1, 0, 7, true), 0x0200_8007);
    }

    #[test]
    fn bound_spis_tell_both_ends_incarnations_apart() {
        let mut seen = std::collections::HashSet::new();
        for s_inc in 0u32..16 {
            for r_inc in 0u32..16 {
                for tunnel in [false, true] {
                    let s = spi_bound(7, s_inc, r_inc, 9, tunnel);
                    assert!(s >= 256);
                    assert!(seen.insert(s), "SPI {s:#x} repeats");
                    // The hand-over's twins differ in bits 16-23 only.
                    assert_eq!(s & 0xff00_ffff, spi_bound(7, 0, 0, 9, tunnel));
                }
            }
        }
        assert_eq!(spi_bound(1, 2, 3, 7, false), 0x0223_0007);
        assert_eq!(spi_bound(1, 18, 3, 7, true), 0x0223_8007);
    }

    #[test]
    fn info_is_length_prefixed() {
        let id = SaId {
            epoch: 1,
            sender: "node-1",
            incarnation: 2,
            receiver: "node-2",
            lane: 0,
            key_bits: 128,
            receiver_incarnation: None,
        };
        let v2 = SaId {
            receiver_incarnation: Some(5),
            lane: 1,
            ..id.clone()
        };
        let mut want2 = b"calico-ipsec/v2/sa".to_vec();
        want2.extend_from_slice(&[0, 0, 0, 1, 0, 6]);
        want2.extend_from_slice(b"node-1");
        want2.extend_from_slice(&[0, 0, 0, 2, 0, 6]);
        want2.extend_from_slice(b"node-2");
        want2.extend_from_slice(&[0, 0, 0, 5, 1]);
        assert_eq!(
            v2.info(),
            Some(want2),
            "v2: the receiver's incarnation after its name, then the lane"
        );
        let mut want = b"calico-ipsec/v1/sa".to_vec();
        want.extend_from_slice(&[0, 0, 0, 1, 0, 6]);
        want.extend_from_slice(b"node-1");
        want.extend_from_slice(&[0, 0, 0, 2, 0, 6]);
        want.extend_from_slice(b"node-2");
        assert_eq!(id.info(), Some(want.clone()));
        let tunnel = SaId {
            lane: 1,
            ..id.clone()
        };
        want.push(1);
        assert_eq!(
            tunnel.info(),
            Some(want.clone()),
            "other lanes append their number"
        );
        let aes256 = SaId {
            key_bits: 256,
            ..tunnel.clone()
        };
        want.push(0x20);
        assert_eq!(aes256.info(), Some(want), "AES-256: lane and 0x20");
        let mut lane0 = id.info().expect("info");
        lane0.extend_from_slice(&[0, 0x20]);
        let aes256_0 = SaId {
            key_bits: 256,
            ..id.clone()
        };
        assert_eq!(aes256_0.info(), Some(lane0), "AES-256 names lane 0 too");
        let odd = SaId {
            key_bits: 192,
            ..id.clone()
        };
        assert_eq!(odd.info(), None, "a key size we do not use");
        // Without the prefixes "ab"+"c" and "a"+"bc" would collide.
        let a = SaId {
            sender: "ab",
            receiver: "c",
            ..id.clone()
        };
        let b = SaId {
            sender: "a",
            receiver: "bc",
            ..id
        };
        assert_ne!(a.info(), b.info());
        // Names past 253 bytes are refused, never truncated into a shared key.
        let long = "a".repeat(70_000);
        let c = SaId { sender: &long, ..a };
        assert_eq!(c.info(), None);
    }
}
