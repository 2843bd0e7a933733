//! `calico-ipsec mtu`: the pod MTU bound, as a number or a breakdown.

use std::io::Write;

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::config::DEFAULT_MTU_IFACE_PATTERN;
use crate::mtu::{detect_ext_mtu, DetectError, Encapsulation, IcvBits, MtuParams, OuterIp};

/// Why `mtu` failed.
#[derive(Debug, thiserror::Error)]
pub enum MtuCliError {
    /// Detection found no underlay interface.
    #[error("{0}; pass --ext-mtu or --iface-pattern")]
    Detect(#[from] DetectError),
    /// The pattern is not a regular expression.
    #[error("--iface-pattern is not a valid regular expression: {0}")]
    Pattern(#[from] regex::Error),
    /// No room is left for a packet.
    #[error("an underlay MTU of {0} leaves no room for a pod packet after encryption")]
    NoRoom(u32),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
}

/// Encapsulation as a CLI value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EncapArg {
    /// IP-in-IP (protocol 4).
    Ipip,
    /// VXLAN (UDP 4789).
    Vxlan,
    /// No tunnel (Never, or CrossSubnet within a subnet): ESP tunnel mode.
    None,
}

/// Outer header family as a CLI value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OuterArg {
    /// IPv4 (20-byte header).
    Ipv4,
    /// IPv6 (40-byte header).
    Ipv6,
}

/// Arguments of `calico-ipsec mtu`.
#[derive(Debug, Args)]
pub struct MtuArgs {
    /// The underlay (node NIC) MTU; detected from the node's up interfaces when omitted.
    #[arg(long, value_parser = clap::value_parser!(u32).range(68..=65535))]
    pub ext_mtu: Option<u32>,
    /// How Calico carries pod traffic between nodes.
    #[arg(long, value_enum, default_value = "ipip")]
    pub encap: EncapArg,
    /// AES-GCM ICV length in bits.
    #[arg(long, default_value_t = 128, value_parser = parse_icv)]
    pub icv: u32,
    /// The outer (node-to-node) IP family.
    #[arg(long, value_enum, default_value = "ipv4")]
    pub outer: OuterArg,
    /// ESP in UDP (NAT traversal), 8 more bytes.
    #[arg(long)]
    pub udp_encap: bool,
    /// Interfaces that carry node traffic, for detection (Felix's default).
    #[arg(long, default_value = DEFAULT_MTU_IFACE_PATTERN)]
    pub iface_pattern: String,
    /// Print every overhead term as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses an ICV length: 64, 96 or 128.
pub fn parse_icv(s: &str) -> Result<u32, String> {
    match s.parse::<u64>().ok().and_then(IcvBits::from_bits) {
        Some(b) => Ok(b.bits()),
        None => Err(format!("{s:?} is not 64, 96 or 128")),
    }
}

/// Runs `calico-ipsec mtu`.
pub fn exec(args: &MtuArgs, out: &mut dyn Write) -> Result<(), MtuCliError> {
    let params = MtuParams {
        encapsulation: match args.encap {
            EncapArg::Ipip => Encapsulation::Ipip,
            EncapArg::Vxlan => Encapsulation::Vxlan,
            EncapArg::None => Encapsulation::None,
        },
        icv: IcvBits::from_bits(args.icv.into()).unwrap_or(IcvBits::B128),
        outer: match args.outer {
            OuterArg::Ipv4 => OuterIp::V4,
            OuterArg::Ipv6 => OuterIp::V6,
        },
        udp_encap: args.udp_encap,
    };
    let (ext, source) = match args.ext_mtu {
        Some(m) => (m, "--ext-mtu".to_string()),
        None => {
            let re = regex::Regex::new(&args.iface_pattern)?;
            let (m, iface) = detect_ext_mtu(&re)?;
            (m, format!("detected on {iface}"))
        }
    };
    let b = params.breakdown(ext).ok_or(MtuCliError::NoRoom(ext))?;
    if args.json {
        let mut v = serde_json::to_value(b).map_err(std::io::Error::other)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("ext_mtu_source".into(), json!(source));
            o.insert("encapsulation".into(), json!(params.encapsulation));
            o.insert("icv_bits".into(), json!(params.icv.bits()));
            o.insert("outer_ip".into(), json!(params.outer));
        }
        super::print_json(out, &v)?;
    } else {
        writeln!(out, "{}", b.pod_mtu)?;
    }
    Ok(())
}
