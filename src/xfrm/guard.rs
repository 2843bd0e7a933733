//! The plaintext guard: an nftables mirror of our outbound XFRM policies.
//!
//! An outbound policy is what makes the kernel encrypt a pod path, and the
//! XFRM policy database can be emptied by anyone with `CAP_NET_ADMIN`
//! (`ip xfrm policy flush`, another IPsec daemon starting, a module reload).
//! Until the agent puts the policies back, the pod packets of those paths
//! would leave in clear. The guard closes that window: a table
//! `inet calico_ipsec` whose postrouting chain drops every packet that one
//! of our outbound policies selects (same source, destination, protocol and
//! port) but that the kernel is *not* about to transform (`rt ipsec
//! missing`). While the policies are in place the guard never matches: the
//! packet carries the XFRM bundle, and the ESP packet it becomes has another
//! protocol. Block policies are mirrored the same way, so a blocked path
//! stays blocked too.
//!
//! Ordering keeps every transition hitless: policies that are about to be
//! deleted leave the guard first ([`Guard::before`]), and new ones join it
//! only once they are in the kernel ([`Guard::after`]).
//!
//! The ruleset is written with `nft -f -` (the interface libnftables
//! maintains; Kubernetes' knftables does the same), as one transaction that
//! replaces the table: there is never a moment without a guard.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::{Desired, Dir, Held, Plan, Selector};

/// The nftables table the guard owns (family `inet`).
pub const TABLE: &str = "calico_ipsec";
/// The guard is written again at least this often, even when unchanged, so
/// that a table removed by hand comes back.
pub const REASSERT: Duration = Duration::from_secs(30);
/// Where `nft` is looked for before `$PATH` (kubelet may run a plugin with
/// an almost empty `$PATH`).
const NFT_PATHS: [&str; 3] = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];
/// The record of the last guard written, in the state directory's `node/`.
const RECORD: &str = "guard";

/// Why the guard could not be written.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// No `nft` binary.
    #[error("the nftables guard needs `nft` (Debian: nftables), found in none of /usr/sbin, /sbin, /usr/bin or $PATH; without it a flushed XFRM policy database leaves pod paths in clear until the agent restores it")]
    NoNft,
    /// `nft` could not be run.
    #[error("running {nft}: {source}")]
    Spawn {
        /// The binary.
        nft: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused the ruleset.
    #[error("nft refused the guard table inet {TABLE} (exit {code}): {stderr}")]
    Refused {
        /// Its exit status.
        code: i32,
        /// What it printed (addresses only: no key is ever in a ruleset).
        stderr: String,
    },
}

/// The selectors the guard holds: every outbound policy (allowing or
/// blocking).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    sels: BTreeSet<Selector>,
}

impl Guard {
    /// The guard for a desired state: its outbound policies.
    pub fn of(want: &Desired) -> Self {
        Self::outbound(want, |_| true)
    }

    fn outbound(want: &Desired, keep: impl Fn(&Selector) -> bool) -> Self {
        Guard {
            sels: want
                .policies
                .values()
                .filter(|p| p.dir == Dir::Out && keep(&p.sel))
                .map(|p| Selector {
                    src: p.sel.src.trunc(),
                    dst: p.sel.dst.trunc(),
                    ..p.sel
                })
                .collect(),
        }
    }

    /// What may stay guarded while `plan` runs: the outbound policies that
    /// are both held now and desired (a policy about to be deleted must stop
    /// being guarded first, or its now-intended clear traffic is dropped).
    /// `None` when the plan deletes no outbound policy.
    pub fn before(want: &Desired, held: &Held, plan: &Plan) -> Option<Self> {
        if !plan.del_policies.iter().any(|(d, _)| *d == Dir::Out) {
            return None;
        }
        Some(Self::outbound(want, |s| {
            held.policies.contains_key(&(Dir::Out, *s))
        }))
    }

    /// The guard once the plan is applied: every desired outbound policy.
    pub fn after(want: &Desired) -> Self {
        Self::of(want)
    }

    /// Selectors guarded.
    pub fn len(&self) -> usize {
        self.sels.len()
    }

    /// True when nothing is guarded (the table is removed).
    pub fn is_empty(&self) -> bool {
        self.sels.is_empty()
    }

    /// A digest of the selectors (for the record).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for s in &self.sels {
            h.update(format!("{}>{}:{}:{};", s.src, s.dst, s.proto, s.dport));
        }
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    }

    /// The `nft -f` script that replaces the table with this guard (or
    /// removes it when empty), in one transaction.
    pub fn script(&self) -> String {
        let mut out = format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n");
        if self.sels.is_empty() {
            return out;
        }
        out.push_str(&format!("table inet {TABLE} {{\n"));
        let mut rules = Vec::new();
        for v4 in [true, false] {
            let (fam, addr, ty) = if v4 {
                ("4", "ip", "ipv4_addr")
            } else {
                ("6", "ip6", "ipv6_addr")
            };
            let mine: Vec<&Selector> = self
                .sels
                .iter()
                .filter(|s| matches!(s.dst, IpNet::V4(_)) == v4)
                .collect();
            let shapes: [(&str, String, String, Vec<String>); 3] = [
                (
                    "any",
                    format!("{ty} . {ty}"),
                    format!("{addr} saddr . {addr} daddr"),
                    mine.iter()
                        .filter(|s| s.proto == 0)
                        .map(|s| format!("{} . {}", s.src, s.dst))
                        .collect(),
                ),
                (
                    "proto",
                    format!("{ty} . {ty} . inet_proto"),
                    format!("{addr} saddr . {addr} daddr . meta l4proto"),
                    mine.iter()
                        .filter(|s| s.proto != 0 && s.dport == 0)
                        .map(|s| format!("{} . {} . {}", s.src, s.dst, s.proto))
                        .collect(),
                ),
                (
                    "port",
                    format!("{ty} . {ty} . inet_proto . inet_service"),
                    format!("{addr} saddr . {addr} daddr . meta l4proto . th dport"),
                    mine.iter()
                        .filter(|s| s.proto != 0 && s.dport != 0)
                        .map(|s| format!("{} . {} . {} . {}", s.src, s.dst, s.proto, s.dport))
                        .collect(),
                ),
            ];
            for (shape, key_type, key, elements) in shapes {
                if elements.is_empty() {
                    continue;
                }
                let set = format!("out{fam}_{shape}");
                out.push_str(&format!(
                    "  set {set} {{\n    type {key_type}\n    flags interval\n    elements = {{\n      {}\n    }}\n  }}\n",
                    elements.join(",\n      ")
                ));
                // `meta nfproto` keeps an inet chain's IPv4 keys off IPv6
                // packets and the other way round.
                let nfproto = if v4 { "ipv4" } else { "ipv6" };
                rules.push(format!(
                    "    meta nfproto {nfproto} {key} @{set} rt ipsec missing counter drop comment \"clear traffic of a calico-ipsec path\""
                ));
            }
        }
        out.push_str(
            "  chain clear_out {\n    type filter hook postrouting priority filter; policy accept;\n",
        );
        for r in rules {
            out.push_str(&r);
            out.push('\n');
        }
        out.push_str("  }\n}\n");
        out
    }

    /// Writes the guard with `nft -f -`. An empty guard on a node without
    /// `nft` is nothing to do (there is no table to remove).
    pub fn apply(&self) -> Result<(), GuardError> {
        let Some(nft) = nft_binary() else {
            return if self.is_empty() {
                Ok(())
            } else {
                Err(GuardError::NoNft)
            };
        };
        let spawn_err = |source| GuardError::Spawn {
            nft: nft.display().to_string(),
            source,
        };
        let mut child = Command::new(&nft)
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(self.script().as_bytes())
                .map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(GuardError::Refused {
            code: out.status.code().unwrap_or(-1),
            stderr: stderr
                .chars()
                .take(400)
                .collect::<String>()
                .escape_debug()
                .to_string(),
        })
    }

    /// Writes the guard unless the record in `state_dir` says this same
    /// guard was written less than [`REASSERT`] ago. Returns whether `nft`
    /// ran.
    pub fn sync(&self, state_dir: &Path) -> Result<bool, GuardError> {
        let digest = self.digest();
        // An empty guard, once removed, stays removed: it is not reasserted
        // (a node in MTU-only mode runs no `nft` after the first time).
        if recorded(state_dir).is_some_and(|(d, at)| d == digest && (self.is_empty() || fresh(at)))
        {
            return Ok(false);
        }
        // Whatever happens, the old record no longer vouches for the table.
        let _ = std::fs::remove_file(record_path(state_dir));
        match self.apply() {
            Ok(()) => {}
            // Removing the table fails only where nftables cannot be used at
            // all, and then there is no table: nothing is left to remove.
            Err(e) if self.is_empty() => {
                tracing::debug!(error = %e, "no nftables guard to remove");
            }
            Err(e) => return Err(e),
        }
        self.record(state_dir);
        Ok(true)
    }

    /// Records this guard as written now (a failure only means it is
    /// written again next time).
    fn record(&self, state_dir: &Path) {
        let body = format!("{} {}\n", self.digest(), now());
        if let Err(e) = crate::fsutil::write_atomic(&record_path(state_dir), body.as_bytes(), 0o600)
        {
            tracing::warn!(error = %e, "cannot record the nftables guard; it is written again next time");
        }
    }
}

impl Guard {
    /// Narrows a guard the agent wrote to this one, before outbound
    /// policies are deleted. Nothing to do (and no `nft` run) when no guard
    /// was ever recorded on this node: an ADD on a node without an agent.
    pub fn narrow(&self, state_dir: &Path) -> Result<bool, GuardError> {
        if recorded(state_dir).is_none() {
            return Ok(false);
        }
        forget(state_dir);
        self.apply()?;
        self.record(state_dir);
        Ok(true)
    }
}

/// Forgets the last guard written, so the next [`Guard::sync`] writes it.
pub fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(record_path(state_dir));
}

fn record_path(state_dir: &Path) -> PathBuf {
    state_dir.join("node").join(RECORD)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fresh(at: u64) -> bool {
    let n = now();
    at <= n && n - at < REASSERT.as_secs()
}

fn recorded(state_dir: &Path) -> Option<(String, u64)> {
    let raw = crate::fsutil::read_state(&record_path(state_dir), 256).ok()??;
    let text = String::from_utf8(raw).ok()?;
    let (d, at) = text.trim().split_once(' ')?;
    Some((d.to_string(), at.parse().ok()?))
}

/// The `nft` binary, if the node has one.
pub fn nft_binary() -> Option<PathBuf> {
    let fixed = NFT_PATHS.iter().map(PathBuf::from);
    let from_path: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nft")).collect())
        .unwrap_or_default();
    fixed.chain(from_path).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xfrm::{Action, Mode, PolicySpec, Template};

    fn sel(src: &str, dst: &str, proto: u8, dport: u16) -> Selector {
        Selector {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            dport,
        }
    }

    fn desired(out: &[(Selector, bool)]) -> Desired {
        let mut d = Desired::default();
        for (s, block) in out {
            let action = if *block {
                Action::Block
            } else {
                Action::Allow(Template {
                    src: s.src.addr(),
                    dst: s.dst.addr(),
                    mode: Mode::Transport,
                    reqid: 1,
                    optional: false,
                })
            };
            d.policies.insert(
                (Dir::Out, *s),
                PolicySpec {
                    dir: Dir::Out,
                    sel: *s,
                    action,
                },
            );
        }
        // An inbound policy is never guarded.
        let inb = sel("10.0.0.2/32", "10.0.0.1/32", 4, 0);
        d.policies.insert(
            (Dir::In, inb),
            PolicySpec {
                dir: Dir::In,
                sel: inb,
                action: Action::Block,
            },
        );
        d
    }

    #[test]
    fn every_outbound_policy_is_mirrored_by_shape_and_family() {
        let d = desired(&[
            (sel("10.0.0.1/32", "10.0.0.2/32", 4, 0), false),
            (sel("10.0.0.1/32", "10.0.0.3/32", 17, 4789), false),
            (sel("0.0.0.0/0", "10.244.3.0/26", 0, 0), false),
            (sel("0.0.0.0/0", "10.244.9.0/26", 0, 0), true),
            (sel("fd00::1/128", "fd00::3/128", 17, 4789), false),
        ]);
        let g = Guard::of(&d);
        assert_eq!(g.len(), 5);
        let s = g.script();
        assert!(s.starts_with("table inet calico_ipsec {}\ndelete table inet calico_ipsec\n"));
        assert!(s.contains("10.0.0.1/32 . 10.0.0.2/32 . 4"), "{s}");
        assert!(s.contains("10.0.0.1/32 . 10.0.0.3/32 . 17 . 4789"), "{s}");
        assert!(
            s.contains("0.0.0.0/0 . 10.244.3.0/26,\n      0.0.0.0/0 . 10.244.9.0/26"),
            "{s}"
        );
        assert!(s.contains("fd00::1/128 . fd00::3/128 . 17 . 4789"), "{s}");
        assert!(
            !s.contains("10.0.0.2/32 . 10.0.0.1/32"),
            "inbound mirrored: {s}"
        );
        assert!(s.contains("meta nfproto ipv6 ip6 saddr . ip6 daddr . meta l4proto . th dport @out6_port rt ipsec missing"));
        assert!(!s.contains("out6_any"), "no empty set: {s}");
    }

    #[test]
    fn an_empty_guard_removes_the_table() {
        let s = Guard::default().script();
        assert_eq!(
            s,
            "table inet calico_ipsec {}\ndelete table inet calico_ipsec\n"
        );
    }

    #[test]
    fn policies_about_to_go_leave_the_guard_first() {
        let keep = sel("10.0.0.1/32", "10.0.0.2/32", 4, 0);
        let gone = sel("10.0.0.1/32", "10.0.0.3/32", 4, 0);
        let new = sel("10.0.0.1/32", "10.0.0.4/32", 4, 0);
        let was = desired(&[(keep, false), (gone, false)]);
        let want = desired(&[(keep, false), (new, false)]);
        let held = Held::exactly(&was);
        let plan = Plan::diff(&want, &held);
        let before = Guard::before(&want, &held, &plan).expect("a deletion");
        assert_eq!(before.sels.iter().copied().collect::<Vec<_>>(), vec![keep]);
        assert_eq!(Guard::after(&want).len(), 2);
        // Nothing deleted: nothing to do first.
        let plan = Plan::diff(&want, &Held::exactly(&want));
        assert!(Guard::before(&want, &Held::exactly(&want), &plan).is_none());
    }

    #[test]
    fn the_record_skips_an_unchanged_guard_until_it_must_be_reasserted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("node")).unwrap();
        let g = Guard::default();
        // An empty guard with no nft is nothing to do, and is recorded.
        std::fs::write(
            record_path(dir.path()),
            format!("{} {}\n", g.digest(), now()),
        )
        .unwrap();
        assert!(!g.sync(dir.path()).unwrap());
        std::fs::write(
            record_path(dir.path()),
            format!("{} {}\n", g.digest(), now() - REASSERT.as_secs()),
        )
        .unwrap();
        assert!(recorded(dir.path()).is_some_and(|(_, at)| !fresh(at)));
        // An empty guard is not reasserted.
        assert!(!g.sync(dir.path()).unwrap());
        // A guard with something in it is, once its record is old.
        let full = Guard::of(&desired(&[(
            sel("10.0.0.1/32", "10.0.0.2/32", 4, 0),
            false,
        )]));
        std::fs::write(
            record_path(dir.path()),
            format!("{} {}\n", full.digest(), now() - REASSERT.as_secs()),
        )
        .unwrap();
        assert!(recorded(dir.path()).is_some_and(|(d, at)| d == full.digest() && !fresh(at)));
    }
}
