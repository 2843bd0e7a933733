//! The netlink messages that add, update and delete our states and policies,
//! and their descriptions for errors (never with key material).

use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_xfrm::{
    constants::{
        AF_INET, AF_INET6, IPPROTO_ESP, XFRM_INF, XFRM_MODE_TRANSPORT, XFRM_MODE_TUNNEL,
        XFRM_POLICY_ALLOW, XFRM_POLICY_BLOCK, XFRM_POLICY_FWD, XFRM_POLICY_IN, XFRM_POLICY_OUT,
        XFRM_STATE_ESN,
    },
    policy::{DelGetMessage as PolicyId, ModifyMessage as PolicyMsg},
    state::{DelGetMessage as SaId, ModifyMessage as SaMsg},
    Address, AlgAead, Id, LifetimeConfig, ReplayEsn, Selector as XSelector, UserPolicyId,
    UserPolicyInfo, UserSaId, UserSaInfo, UserTemplate, XfrmAttrs, XfrmMessage,
};
use zeroize::Zeroize;

use super::{Action, Dir, Mode, PolicySpec, SaSpec, Selector, REPLAY_WINDOW};
use crate::keys::{SaKey, ALGORITHM};

/// The kernel's address family number of `ip`.
pub(super) fn family(ip: IpAddr) -> u16 {
    if ip.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

pub(super) fn xmode(m: Mode) -> u8 {
    match m {
        Mode::Transport => XFRM_MODE_TRANSPORT,
        Mode::Tunnel => XFRM_MODE_TUNNEL,
    }
}

fn infinite() -> LifetimeConfig {
    LifetimeConfig {
        soft_byte_limit: XFRM_INF,
        hard_byte_limit: XFRM_INF,
        soft_packet_limit: XFRM_INF,
        hard_packet_limit: XFRM_INF,
        ..Default::default()
    }
}

pub(super) fn xdir(d: Dir) -> u8 {
    match d {
        Dir::In => XFRM_POLICY_IN,
        Dir::Out => XFRM_POLICY_OUT,
        Dir::Fwd => XFRM_POLICY_FWD,
    }
}

fn xselector(s: &Selector) -> XSelector {
    XSelector {
        daddr: Address::from_ip(&s.dst.addr()),
        saddr: Address::from_ip(&s.src.addr()),
        dport: s.dport,
        dport_mask: if s.dport == 0 { 0 } else { 0xffff },
        family: family(s.src.addr()),
        prefixlen_d: s.dst.prefix_len(),
        prefixlen_s: s.src.prefix_len(),
        proto: s.proto,
        ..Default::default()
    }
}

/// "inbound state 10.0.0.12 -> 10.0.0.11 spi 0x02010002 (epoch 1, tunnel)".
pub(super) fn describe_sa(s: &SaSpec) -> String {
    format!(
        "{} state {} -> {} spi 0x{:08x} (epoch {}, {:?})",
        match s.dir {
            Dir::In | Dir::Fwd => "inbound",
            Dir::Out => "outbound",
        },
        s.src,
        s.dst,
        s.spi,
        s.epoch,
        s.lane
    )
}

fn net(n: &IpNet) -> String {
    n.to_string()
}

/// "policy src 10.0.0.11/32 dst 10.0.0.12/32 proto 4 dir out", as `ip xfrm` says it.
pub(super) fn describe_policy(dir: Dir, s: &Selector) -> String {
    let d = match dir {
        Dir::In => "in",
        Dir::Out => "out",
        Dir::Fwd => "fwd",
    };
    let mut text = format!("policy src {} dst {}", net(&s.src), net(&s.dst));
    if s.proto != 0 {
        text.push_str(&format!(" proto {}", s.proto));
    }
    if s.dport != 0 {
        text.push_str(&format!(" dport {}", s.dport));
    }
    text.push_str(&format!(" dir {d}"));
    text
}

/// Builds the add request of one state around its key.
pub(super) fn sa_message(s: &SaSpec, key: &SaKey) -> XfrmMessage {
    let mut alg_name = [0u8; 64];
    alg_name[..ALGORITHM.len()].copy_from_slice(ALGORITHM.as_bytes());
    let fam = family(s.dst);
    let info = UserSaInfo {
        selector: XSelector {
            family: fam,
            ..Default::default()
        },
        id: Id {
            daddr: Address::from_ip(&s.dst),
            spi: s.spi,
            proto: IPPROTO_ESP,
        },
        saddr: Address::from_ip(&s.src),
        lifetime_cfg: infinite(),
        reqid: s.reqid,
        family: fam,
        mode: xmode(s.lane.mode()),
        flags: XFRM_STATE_ESN,
        ..Default::default()
    };
    let words = REPLAY_WINDOW.div_ceil(32);
    XfrmMessage::AddSa(SaMsg {
        user_sa_info: info,
        nlas: vec![
            XfrmAttrs::EncryptionAlgAead(AlgAead {
                alg_name,
                // Bits of key and salt: 160 for AES-128, 288 for AES-256.
                alg_key_len: u32::try_from(key.0.expose().len() * 8).unwrap_or(0),
                alg_icv_len: s.icv_bits,
                alg_key: key.0.expose().to_vec(),
            }),
            XfrmAttrs::ReplayStateEsn(ReplayEsn {
                bmp_len: words,
                oseq: 0,
                seq: 0,
                oseq_hi: 0,
                seq_hi: 0,
                replay_window: REPLAY_WINDOW,
                bmp: vec![0; words as usize],
            }),
        ],
    })
}

/// The delete request of the state to `dst` with `spi`.
pub(super) fn del_sa_message(dst: IpAddr, spi: u32) -> XfrmMessage {
    XfrmMessage::DeleteSa(SaId {
        user_sa_id: UserSaId {
            daddr: Address::from_ip(&dst),
            spi,
            family: family(dst),
            proto: IPPROTO_ESP,
        },
        nlas: vec![],
    })
}

/// The add (or, with `update`, the atomic update) request of one policy.
pub(super) fn policy_message(p: &PolicySpec, update: bool) -> XfrmMessage {
    let (action, nlas) = match p.action {
        Action::Block => (XFRM_POLICY_BLOCK, vec![]),
        Action::Allow(t) => {
            let tmpl = UserTemplate {
                id: Id {
                    daddr: Address::from_ip(&t.dst),
                    spi: 0,
                    proto: IPPROTO_ESP,
                },
                family: family(t.dst),
                saddr: Address::from_ip(&t.src),
                reqid: t.reqid,
                mode: xmode(t.mode),
                share: 0,
                optional: u8::from(t.optional),
                aalgos: !0,
                ealgos: !0,
                calgos: !0,
            };
            (XFRM_POLICY_ALLOW, vec![XfrmAttrs::Template(vec![tmpl])])
        }
    };
    let info = UserPolicyInfo {
        selector: xselector(&p.sel),
        lifetime_cfg: infinite(),
        priority: p.sel.priority(),
        direction: xdir(p.dir),
        action,
        ..Default::default()
    };
    let msg = PolicyMsg {
        user_policy_info: info,
        nlas,
    };
    if update {
        XfrmMessage::UpdatePolicy(msg)
    } else {
        XfrmMessage::AddPolicy(msg)
    }
}

/// The delete request of one policy.
pub(super) fn del_policy_message(dir: Dir, sel: &Selector) -> XfrmMessage {
    XfrmMessage::DeletePolicy(PolicyId {
        user_policy_id: UserPolicyId {
            selector: xselector(sel),
            index: 0,
            direction: xdir(dir),
        },
        nlas: vec![],
    })
}

/// Overwrites every key a message carries.
pub(super) fn scrub(msg: &mut XfrmMessage) {
    if let XfrmMessage::AddSa(m) | XfrmMessage::UpdateSa(m) = msg {
        for nla in &mut m.nlas {
            match nla {
                XfrmAttrs::EncryptionAlgAead(a) => a.alg_key.zeroize(),
                XfrmAttrs::EncryptionAlg(a)
                | XfrmAttrs::AuthenticationAlg(a)
                | XfrmAttrs::CompressionAlg(a) => a.alg_key.zeroize(),
                XfrmAttrs::AuthenticationAlgTrunc(a) => a.alg_key.zeroize(),
                _ => {}
            }
        }
    }
}
