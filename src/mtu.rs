//! The exact MTU bound for pod packets once ESP is added (DESIGN §4).
//!
//! On the wire, ESP in transport mode adds: the outer IP header (20, or 40 for
//! IPv6), an optional UDP header for NAT traversal (8), the ESP header (8), the
//! GCM IV (8), the pod packet plus any encapsulation that rides inside ESP
//! (VXLAN's UDP + VXLAN + Ethernet headers, 30), padding so that payload + 2 is
//! a multiple of 4, the 2-byte trailer, and the ICV (8, 12 or 16). Hence
//!
//! ```text
//! X     = EXTMTU - outer - udp - 8 - 8 - ICV
//! L_max = floor4(X) - 2 - E
//! ```

use serde::{Deserialize, Serialize};

use crate::link::{Link, LinkError, RouteSocket};

/// Bytes of the ESP header (SPI and sequence number).
pub const ESP_HEADER: u32 = 8;
/// Bytes of the explicit IV that rfc4106(gcm(aes)) sends.
pub const ESP_IV: u32 = 8;
/// Bytes of the ESP trailer (pad length and next header).
pub const ESP_TRAILER: u32 = 2;
/// Bytes of the UDP header of ESP-in-UDP (NAT traversal).
pub const UDP_ENCAP: u32 = 8;
/// Bytes VXLAN adds inside the ESP payload: UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const VXLAN_INNER: u32 = 30;

/// How Calico carries pod traffic between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encapsulation {
    /// IP-in-IP: the tunnel's outer header is the packet ESP protects.
    Ipip,
    /// VXLAN: UDP (Felix's vxlanPort) with an inner Ethernet frame.
    Vxlan,
    /// No tunnel: ESP tunnel mode adds the outer header itself.
    None,
}

impl Encapsulation {
    /// Parses "ipip" or "vxlan" (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ipip" => Some(Self::Ipip),
            "vxlan" => Some(Self::Vxlan),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// Bytes of this encapsulation that travel inside the ESP payload.
    pub fn inner_bytes(self) -> u32 {
        match self {
            Self::Ipip | Self::None => 0,
            Self::Vxlan => VXLAN_INNER,
        }
    }
}

/// The AES-GCM integrity check value length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IcvBits {
    /// 64-bit ICV.
    B64,
    /// 96-bit ICV.
    B96,
    /// 128-bit ICV, the default and the strongest.
    B128,
}

impl IcvBits {
    /// From a bit count: 64, 96 or 128.
    pub fn from_bits(bits: u64) -> Option<Self> {
        match bits {
            64 => Some(Self::B64),
            96 => Some(Self::B96),
            128 => Some(Self::B128),
            _ => None,
        }
    }

    /// The length in bits, as `ip xfrm` and netlink take it.
    pub fn bits(self) -> u32 {
        match self {
            Self::B64 => 64,
            Self::B96 => 96,
            Self::B128 => 128,
        }
    }

    /// The length in bytes on the wire.
    pub fn bytes(self) -> u32 {
        self.bits() / 8
    }
}

/// The IP version of the outer (node-to-node) header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OuterIp {
    /// IPv4 outer header, 20 bytes.
    #[serde(rename = "ipv4")]
    V4,
    /// IPv6 outer header, 40 bytes.
    #[serde(rename = "ipv6")]
    V6,
}

impl OuterIp {
    /// Parses "ipv4" or "ipv6".
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "ipv4" | "4" => Some(Self::V4),
            "ipv6" | "6" => Some(Self::V6),
            _ => None,
        }
    }

    /// Bytes of the outer IP header.
    pub fn header_bytes(self) -> u32 {
        match self {
            Self::V4 => 20,
            Self::V6 => 40,
        }
    }
}

/// Everything the bound depends on apart from EXTMTU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MtuParams {
    /// IPIP or VXLAN.
    pub encapsulation: Encapsulation,
    /// ICV length.
    pub icv: IcvBits,
    /// Outer header family.
    pub outer: OuterIp,
    /// ESP in UDP (NAT traversal).
    pub udp_encap: bool,
}

impl Default for MtuParams {
    fn default() -> Self {
        Self {
            encapsulation: Encapsulation::Ipip,
            icv: IcvBits::B128,
            outer: OuterIp::V4,
            udp_encap: false,
        }
    }
}

/// Every term of the bound; the terms add up to `ext_mtu` exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    /// The underlay MTU the packet must fit.
    pub ext_mtu: u32,
    /// Outer IP header.
    pub outer_ip_header: u32,
    /// UDP header of ESP-in-UDP, or 0.
    pub udp_encap_header: u32,
    /// ESP header.
    pub esp_header: u32,
    /// GCM IV.
    pub esp_iv: u32,
    /// Integrity check value.
    pub esp_icv: u32,
    /// ESP trailer (pad length, next header).
    pub esp_trailer: u32,
    /// Worst-case padding lost to the 4-byte alignment at this EXTMTU.
    pub alignment_padding: u32,
    /// Encapsulation headers inside the ESP payload (VXLAN), or 0.
    pub inner_encapsulation: u32,
    /// The largest pod packet that leaves as one unfragmented frame.
    pub pod_mtu: u32,
}

impl MtuParams {
    /// The bound at `ext_mtu`, or `None` when the overhead leaves no room.
    pub fn breakdown(&self, ext_mtu: u32) -> Option<Breakdown> {
        let udp = if self.udp_encap { UDP_ENCAP } else { 0 };
        let x = ext_mtu.checked_sub(
            self.outer.header_bytes() + udp + ESP_HEADER + ESP_IV + self.icv.bytes(),
        )?;
        let aligned = x & !3;
        let pod_mtu = aligned
            .checked_sub(ESP_TRAILER + self.encapsulation.inner_bytes())
            .filter(|m| *m > 0)?;
        Some(Breakdown {
            ext_mtu,
            outer_ip_header: self.outer.header_bytes(),
            udp_encap_header: udp,
            esp_header: ESP_HEADER,
            esp_iv: ESP_IV,
            esp_icv: self.icv.bytes(),
            esp_trailer: ESP_TRAILER,
            alignment_padding: x - aligned,
            inner_encapsulation: self.encapsulation.inner_bytes(),
            pod_mtu,
        })
    }
}

/// Why the underlay MTU could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// Listing the node's links failed.
    #[error("listing the node's interfaces: {0}")]
    Link(#[from] LinkError),
    /// No up interface matches the pattern.
    #[error("no up interface matches the pattern {pattern:?} (interfaces seen: {seen})")]
    NoMatch {
        /// The pattern used.
        pattern: String,
        /// The names of the links that exist, for the operator.
        seen: String,
    },
}

/// The smallest MTU among up, non-loopback links whose names match `pattern`.
pub fn pick_ext_mtu<'a>(
    links: impl IntoIterator<Item = &'a Link>,
    pattern: &regex::Regex,
) -> Result<(u32, String), DetectError> {
    let mut seen = Vec::new();
    let mut best: Option<(u32, String)> = None;
    for l in links {
        seen.push(l.name.clone());
        if !l.up || l.loopback || !pattern.is_match(&l.name) {
            continue;
        }
        if best.as_ref().is_none_or(|(m, _)| l.mtu < *m) {
            best = Some((l.mtu, l.name.clone()));
        }
    }
    best.ok_or_else(|| DetectError::NoMatch {
        pattern: pattern.as_str().to_string(),
        seen: if seen.is_empty() {
            "none".into()
        } else {
            seen.join(", ")
        },
    })
}

/// Detects EXTMTU in the current network namespace (the node's).
pub fn detect_ext_mtu(pattern: &regex::Regex) -> Result<(u32, String), DetectError> {
    let mut sock = RouteSocket::open()?;
    let links = sock.links()?;
    pick_ext_mtu(&links, pattern)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(enc: Encapsulation, icv: IcvBits, outer: OuterIp, udp: bool) -> MtuParams {
        MtuParams {
            encapsulation: enc,
            icv,
            outer,
            udp_encap: udp,
        }
    }

    /// A byte-level model of an ESP transport-mode packet, independent of the
    /// formula: the on-wire length of a pod packet of `l` bytes.
    fn wire_len(p: &MtuParams, l: u32) -> u32 {
        let payload = p.encapsulation.inner_bytes() + l; // what ESP encrypts
        let mut padded = payload + ESP_TRAILER;
        while padded % 4 != 0 {
            padded += 1;
        }
        let udp = if p.udp_encap { UDP_ENCAP } else { 0 };
        p.outer.header_bytes() + udp + ESP_HEADER + ESP_IV + padded + p.icv.bytes()
    }

    #[test]
    fn measured_kernel_values() {
        // DESIGN §4: Debian 6.1, rfc4106(gcm(aes)), ICV 128, link 1500.
        let ipip = MtuParams::default();
        assert_eq!(ipip.breakdown(1500).map(|b| b.pod_mtu), Some(1446));
        let vxlan = params(Encapsulation::Vxlan, IcvBits::B128, OuterIp::V4, false);
        assert_eq!(vxlan.breakdown(1500).map(|b| b.pod_mtu), Some(1416));
    }

    #[test]
    fn formula_is_the_largest_packet_that_fits_for_every_ext_mtu() {
        let encs = [Encapsulation::Ipip, Encapsulation::Vxlan];
        let icvs = [IcvBits::B64, IcvBits::B96, IcvBits::B128];
        let outers = [OuterIp::V4, OuterIp::V6];
        let mut checked = 0u32;
        for enc in encs {
            for icv in icvs {
                for outer in outers {
                    for udp in [false, true] {
                        let p = params(enc, icv, outer, udp);
                        for ext in 1280..=9216 {
                            let b = p.breakdown(ext).expect("room at >= 1280");
                            assert!(wire_len(&p, b.pod_mtu) <= ext, "{p:?} {ext}: bound too big");
                            assert!(
                                wire_len(&p, b.pod_mtu + 1) > ext,
                                "{p:?} {ext}: bound {} leaves a byte unused",
                                b.pod_mtu
                            );
                            let sum = b.outer_ip_header
                                + b.udp_encap_header
                                + b.esp_header
                                + b.esp_iv
                                + b.esp_icv
                                + b.esp_trailer
                                + b.alignment_padding
                                + b.inner_encapsulation
                                + b.pod_mtu;
                            assert_eq!(sum, ext, "terms must add up to EXTMTU");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 3 * 2 * 2 * (9216 - 1280 + 1));
    }

    #[test]
    fn vendor_formula_is_wrong_for_128_bit_icv() {
        // "EXTMTU - 46 - ((EXTMTU - 46) mod 4)" gives 1452 at 1500.
        let vendor = |e: u32| (e - 46) - ((e - 46) % 4);
        assert_eq!(vendor(1500), 1452);
        assert!(MtuParams::default().breakdown(1500).map(|b| b.pod_mtu) < Some(vendor(1500)));
    }

    #[test]
    fn no_room_is_none() {
        assert_eq!(MtuParams::default().breakdown(40), None);
        assert_eq!(MtuParams::default().breakdown(0), None);
    }

    #[test]
    fn detection_takes_the_smallest_matching_up_link() {
        let re = regex::Regex::new(crate::config::DEFAULT_MTU_IFACE_PATTERN).expect("pattern");
        let l = |name: &str, mtu, up, lo| Link {
            index: 1,
            name: name.into(),
            mtu,
            up,
            loopback: lo,
            peer_index: None,
            peer_netnsid: None,
            kind: None,
            vxlan_port: None,
        };
        let links = [
            l("lo", 65536, true, true),
            l("eth0", 9000, true, false),
            l("ens5", 1500, true, false),
            l("eth1", 1400, false, false),
            l("tunl0", 1480, true, false),
        ];
        let (mtu, name) = pick_ext_mtu(&links, &re).expect("found");
        assert_eq!((mtu, name.as_str()), (1500, "ens5"));
        let err = pick_ext_mtu(&links[..1], &re).expect_err("no match");
        assert!(err.to_string().contains("lo"), "{err}");
    }
}
