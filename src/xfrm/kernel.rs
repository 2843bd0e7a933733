//! The kernel side: dump our XFRM states and policies, apply a [`Plan`].
//!
//! One `NETLINK_XFRM` socket, opened in the calling thread's namespace.
//! Writes go in batches of ACK'd requests, in this order: states first (a
//! policy never points at a state that is not there yet), then policy adds
//! and in-place updates, then policy deletes, then state deletes. When a
//! stage fails, the states or policies that stage added are deleted again,
//! and the error names the object and the kernel's reason.
//!
//! A *replaced* state (one altered outside calico-ipsec under our SPI) is
//! deleted before its replacement is added, since the kernel holds one state
//! per destination and SPI; if the add then fails, that path has no SA and
//! its policy drops the traffic until the next convergence. That is fail
//! closed, not hitless, and the deleted state is not restored.
//!
//! Keys: a state dump carries every state's key (ours and others'). Each is
//! zeroized as soon as the message is decoded, as are the receive buffer and
//! the encoded requests; no message is ever logged.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{NlasIterator, NLA_TYPE_MASK};
use netlink_packet_xfrm::{
    constants::{
        AF_INET, AF_INET6, IPPROTO_ESP, XFRMA_ALG_AEAD, XFRMA_TMPL, XFRM_MODE_TRANSPORT,
        XFRM_MODE_TUNNEL, XFRM_MSG_NEWPOLICY, XFRM_MSG_NEWSA, XFRM_POLICY_BLOCK, XFRM_POLICY_FWD,
        XFRM_POLICY_IN, XFRM_POLICY_OUT, XFRM_STATE_ESN,
    },
    policy::DelGetMessage as PolicyId,
    state::GetDumpMessage,
    Address, UserPolicyInfo, UserSaInfo, UserTemplate, XfrmMessage, XFRM_USER_POLICY_INFO_LEN,
    XFRM_USER_SA_INFO_LEN, XFRM_USER_TEMPLATE_LEN,
};

use super::encode::{
    del_policy_message, del_sa_message, describe_policy, describe_sa, policy_message, sa_message,
    scrub,
};
use super::{Dir, Held, KernelPolicy, KernelSa, Mode, Plan, SaSpec, Selector, Template};
use crate::keys::{is_our_reqid, SaKey};
use crate::netlink::{NetlinkError, Socket};

/// A failure talking XFRM to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum XfrmError {
    /// The socket or a dump failed.
    #[error("XFRM netlink ({op}): {source}")]
    Netlink {
        /// What we were doing.
        op: &'static str,
        /// The failure.
        #[source]
        source: NetlinkError,
    },
    /// The kernel refused one object.
    #[error("the kernel refused to {what}: {source}")]
    Refused {
        /// The object and operation, without key material.
        what: String,
        /// The kernel's reason.
        #[source]
        source: NetlinkError,
    },
    /// Another IPsec configuration holds a selector we need.
    #[error("a policy that is not ours already holds {0}: remove it or exclude this node (calico-ipsec never changes foreign policies)")]
    Foreign(String),
    /// A key could not be produced for a state.
    #[error("cannot derive the key of {what}: {reason}")]
    Key {
        /// The state.
        what: String,
        /// Why.
        reason: String,
    },
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// States added (including replaced ones).
    pub states_added: usize,
    /// States deleted (including replaced ones).
    pub states_deleted: usize,
    /// Policies added.
    pub policies_added: usize,
    /// Policies updated in place.
    pub policies_updated: usize,
    /// Policies deleted.
    pub policies_deleted: usize,
    /// Policies the kernel refused, each with its selector's destination
    /// and the reason (a foreign policy in the way, say). Each fails only
    /// its own path, which the catch-all keeps blocked; the rest of the
    /// plan is applied.
    pub refused: Vec<(ipnet::IpNet, String)>,
}

/// An XFRM netlink socket in the current network namespace.
pub struct Xfrm {
    sock: Socket<XfrmMessage>,
}

/// The address `a` of the kernel's family `family` (`None`: another family).
fn ip(a: &Address, family: u16) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(a.to_ipv4())),
        AF_INET6 => Some(IpAddr::V6(a.to_ipv6())),
        _ => None,
    }
}

fn mode(m: u8) -> Option<Mode> {
    match m {
        XFRM_MODE_TRANSPORT => Some(Mode::Transport),
        XFRM_MODE_TUNNEL => Some(Mode::Tunnel),
        _ => None,
    }
}

fn net(a: &Address, family: u16, len: u8) -> Option<IpNet> {
    IpNet::new(ip(a, family)?, len).ok()
}

/// Reads a native-endian u32 at `at` (the caller checked the length).
fn ne_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn decode_err(what: &str, e: impl std::fmt::Display) -> NetlinkError {
    NetlinkError::Decode(format!("{what}: {e}"))
}

/// `struct xfrm_algo_aead`: a 64-byte name, then key and ICV lengths (bits).
const AEAD_NAME_LEN: usize = 64;

/// Our state in a dumped `XFRM_MSG_NEWSA` payload, if it is ours. Only the
/// fixed header and the AEAD attribute's name and ICV length are read; the
/// key bytes are never copied (the receive buffer is zeroized afterwards).
fn our_state(payload: &[u8]) -> Result<Option<KernelSa>, NetlinkError> {
    let i = UserSaInfo::parse(payload).map_err(|e| decode_err("state", e))?;
    if i.id.proto != IPPROTO_ESP || !is_our_reqid(i.reqid) {
        return Ok(None);
    }
    let (Some(src), Some(dst)) = (ip(&i.saddr, i.family), ip(&i.id.daddr, i.family)) else {
        return Ok(None);
    };
    let mut sa = KernelSa {
        src,
        dst,
        spi: i.id.spi,
        reqid: i.reqid,
        mode: mode(i.mode),
        aead: None,
        icv_bits: 0,
        key_bits: 0,
        esn: i.flags & XFRM_STATE_ESN != 0,
        packets: i.lifetime_cur.packets,
    };
    let attrs = payload.get(XFRM_USER_SA_INFO_LEN..).unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| decode_err("state attribute", e))?;
        if nla.kind() & NLA_TYPE_MASK == XFRMA_ALG_AEAD {
            let v = nla.value();
            if v.len() < AEAD_NAME_LEN + 8 {
                return Err(decode_err("state", "short AEAD attribute"));
            }
            let name = &v[..AEAD_NAME_LEN];
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            sa.aead = Some(String::from_utf8_lossy(&name[..end]).into_owned());
            // alg_key_len counts the 32-bit salt rfc4106 appends.
            sa.key_bits = ne_u32(v, AEAD_NAME_LEN).saturating_sub(32);
            sa.icv_bits = ne_u32(v, AEAD_NAME_LEN + 4);
        }
    }
    Ok(Some(sa))
}

/// Our policy in a dumped `XFRM_MSG_NEWPOLICY` payload, if it is ours.
fn our_policy(payload: &[u8]) -> Result<Option<KernelPolicy>, NetlinkError> {
    let i = UserPolicyInfo::parse(payload).map_err(|e| decode_err("policy", e))?;
    if !super::is_our_priority(i.priority) {
        return Ok(None);
    }
    let dir = match i.direction {
        XFRM_POLICY_IN => Dir::In,
        XFRM_POLICY_OUT => Dir::Out,
        XFRM_POLICY_FWD => Dir::Fwd,
        _ => return Ok(None),
    };
    let s = &i.selector;
    let (Some(src), Some(dst)) = (
        net(&s.saddr, s.family, s.prefixlen_s),
        net(&s.daddr, s.family, s.prefixlen_d),
    ) else {
        return Ok(None);
    };
    let mut templates = Vec::new();
    let mut other_templates = 0;
    let attrs = payload.get(XFRM_USER_POLICY_INFO_LEN..).unwrap_or_default();
    for nla in NlasIterator::new(attrs) {
        let nla = nla.map_err(|e| decode_err("policy attribute", e))?;
        if nla.kind() & NLA_TYPE_MASK == XFRMA_TMPL {
            for raw in nla.value().chunks_exact(XFRM_USER_TEMPLATE_LEN) {
                let t = UserTemplate::parse(raw).map_err(|e| decode_err("template", e))?;
                let addrs = (ip(&t.saddr, t.family), ip(&t.id.daddr, t.family));
                match (t.id.proto == IPPROTO_ESP, addrs, mode(t.mode)) {
                    (true, (Some(src), Some(dst)), Some(mode)) => templates.push(Template {
                        src,
                        dst,
                        mode,
                        reqid: t.reqid,
                        optional: t.optional != 0,
                    }),
                    _ => other_templates += 1,
                }
            }
        }
    }
    Ok(Some(KernelPolicy {
        dir,
        sel: Selector {
            src,
            dst,
            proto: s.proto,
            dport: if s.dport_mask == 0 { 0 } else { s.dport },
        },
        priority: i.priority,
        block: i.action == XFRM_POLICY_BLOCK,
        templates,
        other_templates,
    }))
}

impl Xfrm {
    /// Opens an XFRM socket in the calling thread's network namespace.
    pub fn open() -> Result<Self, XfrmError> {
        let sock = Socket::open(netlink_sys::protocols::NETLINK_XFRM)
            .map_err(|source| XfrmError::Netlink { op: "open", source })?;
        Ok(Self { sock })
    }

    /// Dumps our states and policies (everything else is ignored). Replies
    /// are read in place: nothing but the fields compared is decoded.
    pub fn held(&mut self) -> Result<Held, XfrmError> {
        let mut held = Held::default();
        self.sock
            .dump_raw(
                XfrmMessage::GetDumpSa(GetDumpMessage { nlas: vec![] }),
                |kind, payload| {
                    if kind == XFRM_MSG_NEWSA {
                        if let Some(sa) = our_state(payload)? {
                            held.states.insert((sa.dst, sa.spi), sa);
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|source| XfrmError::Netlink {
                op: "dump states",
                source,
            })?;
        self.sock
            .dump_raw(
                XfrmMessage::GetPolicy(PolicyId::default()),
                |kind, payload| {
                    if kind == XFRM_MSG_NEWPOLICY {
                        if let Some(p) = our_policy(payload)? {
                            held.policies.insert((p.dir, p.sel), p);
                        }
                    }
                    Ok(())
                },
            )
            .map_err(|source| XfrmError::Netlink {
                op: "dump policies",
                source,
            })?;
        Ok(held)
    }

    /// Sends a batch; returns the index and error of each failure.
    fn send(
        &mut self,
        msgs: &[XfrmMessage],
        op: &'static str,
    ) -> Result<Vec<(usize, NetlinkError)>, XfrmError> {
        let results = self
            .sock
            .batch(msgs)
            .map_err(|source| XfrmError::Netlink { op, source })?;
        Ok(results
            .into_iter()
            .enumerate()
            .filter_map(|(i, r)| r.err().map(|e| (i, e)))
            .collect())
    }

    /// Applies `plan`, asking `key` for each state to add. `held` is what the
    /// plan was computed from (used to take back a failed policy update).
    pub fn apply<F>(&mut self, plan: &Plan, held: &Held, mut key: F) -> Result<Applied, XfrmError>
    where
        F: FnMut(&SaSpec) -> Result<SaKey, String>,
    {
        let mut done = Applied::default();

        // 1. States: replaced ones are deleted first (same dst and SPI).
        if !plan.replace_states.is_empty() {
            let dels: Vec<_> = plan
                .replace_states
                .iter()
                .map(|s| del_sa_message(s.dst, s.spi))
                .collect();
            let failed = self.send(&dels, "delete states")?;
            if let Some((i, source)) = failed
                .into_iter()
                .find(|(_, e)| e.errno() != Some(libc::ESRCH))
            {
                return Err(XfrmError::Refused {
                    what: format!("delete {}", describe_sa(&plan.replace_states[i])),
                    source,
                });
            }
            done.states_deleted += dels.len();
        }
        let to_add: Vec<&SaSpec> = plan.add_states.iter().chain(&plan.replace_states).collect();
        let mut adds = Vec::with_capacity(to_add.len());
        for s in &to_add {
            match key(s) {
                Ok(k) => adds.push(sa_message(s, &k)),
                Err(reason) => {
                    adds.iter_mut().for_each(scrub);
                    return Err(XfrmError::Key {
                        what: describe_sa(s),
                        reason,
                    });
                }
            }
        }
        let failed = self.send(&adds, "add states");
        adds.iter_mut().for_each(scrub);
        let failed = failed?;
        if let Some((i, source)) = failed.first() {
            // Take back the states this stage added.
            let bad: std::collections::HashSet<usize> = failed.iter().map(|(i, _)| *i).collect();
            let undo: Vec<_> = to_add
                .iter()
                .enumerate()
                .filter(|(j, _)| !bad.contains(j))
                .map(|(_, s)| del_sa_message(s.dst, s.spi))
                .collect();
            let _ = self.send(&undo, "take back states");
            return Err(XfrmError::Refused {
                what: format!("add {}", describe_sa(to_add[*i])),
                source: clone_err(source),
            });
        }
        done.states_added += adds.len();

        // 2. Policies: adds (the catch-all last: see `Plan::diff`), then
        //    atomic in-place updates. A refused add fails only itself: the
        //    others stay, and the catch-all keeps its path blocked.
        let adds: Vec<_> = plan
            .add_policies
            .iter()
            .map(|p| policy_message(p, false))
            .collect();
        let failed = self.send(&adds, "add policies")?;
        for (i, source) in &failed {
            let p = &plan.add_policies[*i];
            let what = describe_policy(p.dir, &p.sel);
            let why = if source.errno() == Some(libc::EEXIST) {
                XfrmError::Foreign(what)
            } else {
                XfrmError::Refused {
                    what: format!("add {what}"),
                    source: clone_err(source),
                }
            };
            tracing::warn!(error = %why, "a policy was refused; its path stays blocked by the catch-all");
            done.refused.push((p.sel.dst, why.to_string()));
        }
        done.policies_added += adds.len() - failed.len();
        let updates: Vec<_> = plan
            .update_policies
            .iter()
            .map(|p| policy_message(p, true))
            .collect();
        let failed = self.send(&updates, "update policies")?;
        if let Some((i, source)) = failed.first() {
            let bad: std::collections::HashSet<usize> = failed.iter().map(|(i, _)| *i).collect();
            let undo: Vec<_> = plan
                .update_policies
                .iter()
                .enumerate()
                .filter(|(j, _)| !bad.contains(j))
                .filter_map(|(_, p)| held.policies.get(&p.key()))
                .filter_map(|old| {
                    let action = match (old.block, old.templates.first()) {
                        (true, _) => super::Action::Block,
                        (false, Some(t)) => super::Action::Allow(*t),
                        (false, None) => return None,
                    };
                    Some(policy_message(
                        &super::PolicySpec {
                            dir: old.dir,
                            sel: old.sel,
                            action,
                        },
                        true,
                    ))
                })
                .collect();
            let _ = self.send(&undo, "take back policy updates");
            let p = &plan.update_policies[*i];
            return Err(XfrmError::Refused {
                what: format!("update {}", describe_policy(p.dir, &p.sel)),
                source: clone_err(source),
            });
        }
        done.policies_updated += updates.len();

        // 3. Deletes: policies, then the states they may have used. Gone
        //    already (ENOENT/ESRCH) counts as done.
        let dels: Vec<_> = plan
            .del_policies
            .iter()
            .map(|(d, s)| del_policy_message(*d, s))
            .collect();
        let failed = self.send(&dels, "delete policies")?;
        if let Some((i, source)) = failed
            .into_iter()
            .find(|(_, e)| e.errno() != Some(libc::ENOENT))
        {
            let (d, s) = &plan.del_policies[i];
            return Err(XfrmError::Refused {
                what: format!("delete {}", describe_policy(*d, s)),
                source,
            });
        }
        done.policies_deleted += dels.len();
        let dels: Vec<_> = plan
            .del_states
            .iter()
            .map(|(dst, spi)| del_sa_message(*dst, *spi))
            .collect();
        let failed = self.send(&dels, "delete states")?;
        if let Some((i, source)) = failed
            .into_iter()
            .find(|(_, e)| e.errno() != Some(libc::ESRCH))
        {
            let (dst, spi) = plan.del_states[i];
            return Err(XfrmError::Refused {
                what: format!("delete state to {dst} spi 0x{spi:08x}"),
                source,
            });
        }
        done.states_deleted += dels.len();
        Ok(done)
    }
}

fn clone_err(e: &NetlinkError) -> NetlinkError {
    match e {
        NetlinkError::Kernel(c) => NetlinkError::Kernel(*c),
        other => NetlinkError::Decode(other.to_string()),
    }
}

/// The kernel's XFRM counters of this namespace.
pub const XFRM_STAT: &str = "/proc/net/xfrm_stat";

/// Parses /proc/net/xfrm_stat ("XfrmInError   0" per line).
pub fn parse_xfrm_stat(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// Reads this namespace's XFRM counters (empty when the kernel has none).
pub fn read_xfrm_stat() -> BTreeMap<String, u64> {
    std::fs::read_to_string(XFRM_STAT)
        .map(|t| parse_xfrm_stat(&t))
        .unwrap_or_default()
}
