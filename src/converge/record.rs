//! The ADD's fast path: the record of the last convergence that needed no
//! write lets the next one prove, in one small etcd request and one kernel
//! dump, that it still holds.
//!
//! After a convergence that wrote nothing to etcd, the node keeps a record
//! ([`Converged`], in [`crate::state`]; no secrets) of:
//! - the [`Fingerprint`](crate::datastore::snapshot::Fingerprint) of the
//!   snapshot it converged from (per etcd range read: key count and newest
//!   modification revision, which change on any put or delete);
//! - a digest of the desired states and policies, in exactly the terms
//!   [`Plan::diff`](crate::xfrm::Plan::diff) compares them with the kernel;
//! - the boot id, and the digest of the ledger it was made under.
//!
//! The next convergence first checks the boot id and the ledger's digest,
//! reads the fingerprint (keys only, one per range) and dumps the kernel.
//! When all of them match, the desired state is unchanged and the kernel
//! holds exactly it: nothing needs to change, so nothing is read or
//! written. Any mismatch, and every failure, falls back to the full
//! convergence, which removes the record before it starts and writes a new
//! one only when it succeeds.

use std::time::Instant;

use sha2::{Digest, Sha256};

use super::error::{boot_id, ms, ConvergeError};
use super::report::Report;
use crate::clock::Stamp;
use crate::datastore::etcd::Etcd;
use crate::datastore::ipsec::{IpsecStoreError, Phase};
use crate::datastore::snapshot;
use crate::state::{Converged, NodeState};
use crate::xfrm::kernel::Xfrm;
use crate::xfrm::{Desired, Held};

/// A `Hasher` that feeds SHA-256, so that the `Hash` of the terms compared
/// (in one binary: the record's version is bumped with the format) becomes
/// a digest.
struct ShaHasher(Sha256);

impl std::hash::Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// A digest of the desired states and policies: equal to [`held_digest`]
/// exactly when the kernel holds what is desired (an empty plan).
pub fn desired_digest(d: &Desired) -> String {
    held_digest(&Held::exactly(d))
}

/// The digest of what the kernel holds that is ours, comparable with
/// [`desired_digest`].
pub fn held_digest(held: &Held) -> String {
    use std::hash::Hash;
    let mut h = ShaHasher(Sha256::new());
    held.states.len().hash(&mut h);
    for s in held.states.values() {
        s.terms().hash(&mut h);
    }
    held.policies.len().hash(&mut h);
    for p in held.policies.values() {
        p.hash(&mut h);
    }
    h.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether the node-local facts of the last convergence still hold: the same
/// boot, and a ledger of the same incarnation (otherwise the incarnation must
/// change). The record holds the digest of the ledger it was made with: the
/// same bytes are the same incarnation and boot.
fn local_facts_hold(state: &NodeState, last: &Converged) -> Result<bool, ConvergeError> {
    if last.phase == Phase::Off {
        return Ok(true);
    }
    if boot_id()? != last.boot_id {
        return Ok(false);
    }
    Ok(!state.ledger_digest().is_empty() && state.ledger_digest() == last.ledger)
}

/// The fast path: a report when the last convergence still holds (etcd's
/// fingerprint and the kernel's [`held_digest`] unchanged: nothing to do),
/// `None` otherwise. The kernel dump runs on its own thread while etcd
/// answers.
pub(super) async fn unchanged(
    etcd: &Etcd,
    state: &mut NodeState,
    node: &str,
    started: Instant,
) -> Result<Option<Report>, ConvergeError> {
    let Some(last) = state.converged().filter(|c| c.node == node).cloned() else {
        return Ok(None);
    };
    if !local_facts_hold(state, &last)? {
        return Ok(None);
    }
    let dump = std::thread::spawn(|| -> Result<String, ConvergeError> {
        Ok(held_digest(&Xfrm::open()?.held()?))
    });
    let checking = Stamp::now();
    let fingerprint = snapshot::fingerprint(etcd).await;
    let kernel = dump
        .join()
        .map_err(|_| ConvergeError::Runtime(std::io::Error::other("the XFRM dump panicked")))??;
    let (fingerprint, revision) = fingerprint.map_err(IpsecStoreError::from)?;
    if fingerprint != last.fingerprint {
        tracing::debug!("etcd changed since the last convergence");
        return Ok(None);
    }
    if !kernel_holds(&last, &kernel) {
        return Ok(None);
    }
    // Requests queued behind this one may take its answer.
    if checking.is_some() {
        let mut record = last.clone();
        record.checked = checking;
        if let Err(e) = state.save_converged(record) {
            tracing::warn!(error = %e, "cannot refresh the convergence record");
        }
    }
    Ok(Some(unchanged_report(last, revision, started)))
}

fn kernel_holds(last: &Converged, kernel_digest: &str) -> bool {
    if kernel_digest == last.digest {
        return true;
    }
    tracing::info!(
        node = %last.node.escape_debug(),
        "the kernel's XFRM state drifted from the last convergence; converging"
    );
    false
}

/// Group commit for concurrent ADDs: when an etcd read that began after
/// this request was made (`asked`, taken before the node lock) found the
/// record true, and the node-local facts and the kernel still match it,
/// the request is answered without asking etcd again: what it would read
/// is no newer than what that read saw. `None`: check etcd as usual.
pub(super) fn coalesced(
    state: &NodeState,
    node: &str,
    asked: Option<&Stamp>,
    started: Instant,
) -> Result<Option<Report>, ConvergeError> {
    let Some(last) = state.converged().filter(|c| c.node == node) else {
        return Ok(None);
    };
    if !asked.is_some_and(|a| vouches(last, a)) || !local_facts_hold(state, last)? {
        return Ok(None);
    }
    let kernel = held_digest(&Xfrm::open()?.held()?);
    if !kernel_holds(last, &kernel) {
        return Ok(None);
    }
    let mut report = unchanged_report(last.clone(), last.revision, started);
    report.coalesced = true;
    Ok(Some(report))
}

/// Whether the record's last etcd read began at or after `asked`.
fn vouches(last: &Converged, asked: &Stamp) -> bool {
    last.checked.as_ref().is_some_and(|c| c.not_before(asked))
}

fn unchanged_report(last: Converged, revision: i64, started: Instant) -> Report {
    let millis = ms(started);
    let report = Report {
        node: last.node,
        phase: last.phase,
        acked_phase: last.phase,
        id: last.id,
        incarnation: last.incarnation,
        states: last.states,
        policies: last.policies,
        revision,
        millis,
        read_millis: millis,
        unchanged: true,
        mtu: last.mtu,
        // The fast path reads no snapshot: epochs, phase generation, counts
        // by direction and the identities digest are left empty (the agent,
        // which publishes them, always converges in full).
        ..Report::default()
    };
    tracing::debug!(?report, "still converged");
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::CONVERGED_VERSION;
    use crate::xfrm::{Action, Dir, Lane, Mode, Plan, PolicySpec, SaSpec, Selector, Template};
    use std::net::{IpAddr, Ipv4Addr};

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    fn desired() -> Desired {
        let mut d = Desired::default();
        for peer in 2..5u8 {
            for (dir, src, dst) in [(Dir::Out, ip(1), ip(peer)), (Dir::In, ip(peer), ip(1))] {
                let s = SaSpec {
                    dir,
                    src,
                    dst,
                    spi: (1 << 16) | u32::from(peer),
                    reqid: 0xCA10_0001,
                    epoch: 1,
                    sender: "a".into(),
                    incarnation: 1,
                    receiver: "b".into(),
                    receiver_incarnation: None,
                    icv_bits: 128,
                    key_bits: 128,
                    lane: Lane::V4Transport,
                };
                d.states.insert(s.key(), s);
                let p = PolicySpec {
                    dir,
                    sel: Selector {
                        src: src.into(),
                        dst: dst.into(),
                        proto: 4,
                        dport: 0,
                    },
                    action: Action::Allow(Template {
                        src,
                        dst,
                        mode: Mode::Transport,
                        reqid: if dir == Dir::Out { 0xCA10_0001 } else { 0 },
                        optional: false,
                    }),
                };
                d.policies.insert(p.key(), p);
            }
        }
        d
    }

    /// The kernel holding exactly `d`, its states having carried packets.
    fn held_of(d: &Desired) -> Held {
        let mut h = Held::exactly(d);
        for sa in h.states.values_mut() {
            sa.packets = 7;
        }
        h
    }

    /// Every single-field drift of the kernel: the plan is not empty, and
    /// the digests differ.
    #[test]
    fn digests_agree_with_the_plan() {
        let d = desired();
        let held = held_of(&d);
        assert!(Plan::diff(&d, &held).is_empty());
        assert_eq!(
            desired_digest(&d),
            held_digest(&held),
            "packets do not count"
        );

        let k = *held.states.keys().next().expect("a state");
        let pk = *held.policies.keys().next().expect("a policy");
        type Drift = Box<dyn Fn(&mut Held)>;
        let drifts: Vec<(&str, Drift)> = vec![
            (
                "state deleted",
                Box::new(move |h| {
                    h.states.remove(&k);
                }),
            ),
            (
                "state added",
                Box::new(move |h| {
                    let mut s = h.states[&k].clone();
                    s.spi += 100;
                    h.states.insert((s.dst, s.spi), s);
                }),
            ),
            (
                "reqid",
                Box::new(move |h| h.states.get_mut(&k).expect("k").reqid += 1),
            ),
            (
                "src",
                Box::new(move |h| h.states.get_mut(&k).expect("k").src = ip(99)),
            ),
            (
                "tunnel mode",
                Box::new(move |h| h.states.get_mut(&k).expect("k").mode = Some(Mode::Tunnel)),
            ),
            (
                "no aead",
                Box::new(move |h| h.states.get_mut(&k).expect("k").aead = None),
            ),
            (
                "other aead",
                Box::new(move |h| {
                    h.states.get_mut(&k).expect("k").aead = Some("rfc4106(gcm(aes))x".into())
                }),
            ),
            (
                "icv",
                Box::new(move |h| h.states.get_mut(&k).expect("k").icv_bits = 96),
            ),
            (
                "no esn",
                Box::new(move |h| h.states.get_mut(&k).expect("k").esn = false),
            ),
            (
                "policy deleted",
                Box::new(move |h| {
                    h.policies.remove(&pk);
                }),
            ),
            (
                "policy reqid",
                Box::new(move |h| h.policies.get_mut(&pk).expect("pk").templates[0].reqid += 1),
            ),
            (
                "policy template optional",
                Box::new(move |h| {
                    h.policies.get_mut(&pk).expect("pk").templates[0].optional = true
                }),
            ),
            (
                "policy template mode",
                Box::new(move |h| {
                    h.policies.get_mut(&pk).expect("pk").templates[0].mode = Mode::Tunnel
                }),
            ),
            (
                "policy blocks",
                Box::new(move |h| {
                    let p = h.policies.get_mut(&pk).expect("pk");
                    p.block = true;
                    p.templates.clear();
                }),
            ),
            (
                "policy priority",
                Box::new(move |h| h.policies.get_mut(&pk).expect("pk").priority += 1),
            ),
            (
                "two templates",
                Box::new(move |h| {
                    let p = h.policies.get_mut(&pk).expect("pk");
                    let t = p.templates[0];
                    p.templates.push(t);
                }),
            ),
            (
                "policy added",
                Box::new(move |h| {
                    let mut p = h.policies[&pk].clone();
                    p.sel.dport = 4789;
                    h.policies.insert((p.dir, p.sel), p);
                }),
            ),
        ];
        for (what, drift) in drifts {
            let mut h = held.clone();
            drift(&mut h);
            assert!(!Plan::diff(&d, &h).is_empty(), "{what}: the plan sees it");
            assert_ne!(
                desired_digest(&d),
                held_digest(&h),
                "{what}: the digest sees it"
            );
        }
    }

    #[test]
    fn a_record_answers_only_requests_made_before_its_read_began() {
        let asked = Stamp::now().expect("a boot id and CLOCK_BOOTTIME");
        let mut c: Converged = serde_json::from_value(serde_json::json!({
            "version": CONVERGED_VERSION, "node": "node-1", "phase": "enforce", "boot_id": "b",
            "id": 1, "incarnation": 3, "ledger": "", "states": 2, "policies": 2,
            "revision": 7, "fingerprint": {"cluster_id": 0, "marks": []}, "digest": "d"
        }))
        .expect("a record written before `checked` existed still reads");
        assert!(!vouches(&c, &asked), "no stamp: never taken on trust");
        c.checked = Stamp::now();
        assert!(
            vouches(&c, &asked),
            "a read that began after the request answers it"
        );
        let later = Stamp::now().expect("now");
        assert!(!vouches(
            &c,
            &Stamp {
                boottime_ns: later.boottime_ns + 1,
                ..later
            }
        ));
        c.checked = Some(Stamp {
            boot_id: "another boot".into(),
            boottime_ns: u64::MAX,
        });
        assert!(
            !vouches(&c, &asked),
            "a stamp of another boot answers nothing"
        );
    }
}
