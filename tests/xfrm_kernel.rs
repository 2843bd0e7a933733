//! `xfrm/kernel.rs` against a real kernel's XFRM (ESP, `rfc4106(gcm(aes))`):
//! an apply leaves exactly the plan, takes back what it added when the
//! kernel refuses part of a stage, never touches a foreign object, and
//! counts what is already gone as deleted.
//!
//! They need root and a kernel with ESP and GCM. The host's kernel has
//! neither, so they are `#[ignore]`d on the host and `make e2e` runs them
//! inside the VM (`tests/e2e/vm.sh <this test binary> --ignored`), where
//! they fail, never skip. Each test runs on a thread in a network namespace
//! of its own, so they cannot see each other's objects.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use calico_ipsec::keys::{reqid, SaKey, SecretBytes};
use calico_ipsec::xfrm::kernel::{Xfrm, XfrmError};
use calico_ipsec::xfrm::{
    Action, Desired, Dir, Held, Lane, Mode, Plan, PolicySpec, SaSpec, Selector, Template,
};

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 9, 0, n))
}

/// Runs `f` on a thread in a new, empty network namespace.
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): these tests need root");
        f()
    })
    .join()
    .expect("the test thread panicked")
}

/// `ip ARGS` in the calling thread's namespace; panics unless it succeeds.
fn ip_cmd(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sa(dir: Dir, peer: u8) -> SaSpec {
    let (src, dst) = match dir {
        Dir::Out => (ip(1), ip(peer)),
        _ => (ip(peer), ip(1)),
    };
    SaSpec {
        dir,
        src,
        dst,
        spi: (1 << 16) | u32::from(peer) | if dir == Dir::Out { 0x100 } else { 0 },
        reqid: reqid(1),
        epoch: 1,
        sender: "a".into(),
        incarnation: 1,
        receiver: "b".into(),
        receiver_incarnation: None,
        icv_bits: 128,
        key_bits: 128,
        lane: Lane::V4Transport,
    }
}

fn policy(dir: Dir, peer: u8) -> PolicySpec {
    let (src, dst) = match dir {
        Dir::Out => (ip(1), ip(peer)),
        _ => (ip(peer), ip(1)),
    };
    PolicySpec {
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
            reqid: if dir == Dir::Out { reqid(1) } else { 0 },
            optional: false,
        }),
    }
}

/// Both directions toward each of `peers`.
fn desired(peers: &[u8]) -> Desired {
    let mut d = Desired::default();
    for &p in peers {
        for dir in [Dir::Out, Dir::In] {
            let s = sa(dir, p);
            d.states.insert(s.key(), s);
            let pol = policy(dir, p);
            d.policies.insert(pol.key(), pol);
        }
    }
    d
}

/// A key for every state (the test's; never a derived one).
fn key(_: &SaSpec) -> Result<SaKey, String> {
    Ok(SaKey(SecretBytes::new(vec![0x5a; 20])))
}

fn converge(x: &mut Xfrm, want: &Desired) -> Result<Held, XfrmError> {
    let held = x.held()?;
    x.apply(&Plan::diff(want, &held), &held, key)?;
    x.held()
}

#[test]
#[ignore = "needs root and a kernel with ESP and GCM: run in the VM by make e2e"]
fn an_apply_leaves_exactly_the_plan_and_a_second_finds_nothing_to_do() {
    in_fresh_netns(|| {
        let mut x = Xfrm::open().expect("XFRM socket");
        let want = desired(&[2, 3]);
        let held = converge(&mut x, &want).expect("apply");
        assert_eq!(held.states.len(), 4);
        assert_eq!(held.policies.len(), 4);
        assert!(Plan::diff(&want, &held).is_empty(), "nothing left to do");
        let states = ip_cmd(&["xfrm", "state", "list"]);
        assert_eq!(states.matches("rfc4106(gcm(aes))").count(), 4, "{states}");
        // Shrinking the plan deletes exactly what is no longer wanted.
        let want = desired(&[3]);
        let held = converge(&mut x, &want).expect("apply the smaller plan");
        assert!(Plan::diff(&want, &held).is_empty());
        assert_eq!(held.states.len(), 2);
        assert!(!ip_cmd(&["xfrm", "state", "list"]).contains("10.9.0.2"));
    });
}

#[test]
#[ignore = "needs root and a kernel with ESP and GCM: run in the VM by make e2e"]
fn a_refused_state_takes_back_the_states_added_with_it_and_keeps_the_foreign_one() {
    in_fresh_netns(|| {
        // A foreign state (reqid 7) holds the (dst, SPI) of our inbound SA
        // from peer 3.
        let taken = sa(Dir::In, 3);
        let spi = format!("0x{:08x}", taken.spi);
        ip_cmd(&[
            "xfrm",
            "state",
            "add",
            "src",
            "10.9.0.3",
            "dst",
            "10.9.0.1",
            "proto",
            "esp",
            "spi",
            &spi,
            "reqid",
            "7",
            "mode",
            "transport",
            "aead",
            "rfc4106(gcm(aes))",
            "0x0000000000000000000000000000000000000000",
            "128",
        ]);
        let mut x = Xfrm::open().expect("XFRM socket");
        let want = desired(&[2, 3]);
        let held = x.held().expect("dump");
        assert!(held.states.is_empty(), "the foreign state is not ours");
        let plan = Plan::diff(&want, &held);
        assert_eq!(
            plan.add_states.len(),
            4,
            "three are added beside the refused one"
        );
        let err = x
            .apply(&plan, &held, key)
            .expect_err("the kernel refuses the SPI a foreign state holds");
        assert!(
            matches!(err, XfrmError::Refused { .. }),
            "refused, with what: {err}"
        );
        let after = x.held().expect("dump");
        assert!(
            after.states.is_empty() && after.policies.is_empty(),
            "the states added in the same stage were taken back, and no policy was added: {after:?}"
        );
        let states = ip_cmd(&["xfrm", "state", "list"]);
        assert_eq!(states.matches("proto esp").count(), 1, "{states}");
        assert!(
            states.contains("reqid 7 "),
            "the foreign state stays: {states}"
        );
    });
}

#[test]
#[ignore = "needs root and a kernel with ESP and GCM: run in the VM by make e2e"]
fn a_foreign_policy_on_our_selector_is_refused_and_never_changed() {
    in_fresh_netns(|| {
        ip_cmd(&[
            "xfrm",
            "policy",
            "add",
            "src",
            "10.9.0.1/32",
            "dst",
            "10.9.0.2/32",
            "proto",
            "4",
            "dir",
            "out",
            "priority",
            "100",
        ]);
        let mut x = Xfrm::open().expect("XFRM socket");
        let want = desired(&[2]);
        let held = x.held().expect("dump");
        let done = x
            .apply(&Plan::diff(&want, &held), &held, key)
            .expect("the rest of the plan applies");
        assert_eq!(done.refused.len(), 1, "{:?}", done.refused);
        assert!(done.refused[0].1.contains("not ours"), "{:?}", done.refused);
        let after = x.held().expect("dump");
        assert_eq!(
            after.policies.len(),
            1,
            "the refused policy fails only itself; the inbound one beside it stays: {after:?}"
        );
        assert_eq!(after.states.len(), 2, "{after:?}");
        let pols = ip_cmd(&["xfrm", "policy", "list", "dir", "out"]);
        assert!(
            pols.contains("priority 100"),
            "the foreign policy stays: {pols}"
        );
        assert!(
            !pols.contains("tmpl"),
            "and was never given our template (it is the only outbound one): {pols}"
        );
    });
}

#[test]
#[ignore = "needs root and a kernel with ESP and GCM: run in the VM by make e2e"]
fn deleting_what_is_already_gone_counts_as_done() {
    in_fresh_netns(|| {
        let mut x = Xfrm::open().expect("XFRM socket");
        let want = desired(&[2]);
        converge(&mut x, &want).expect("apply");
        let held = x.held().expect("dump");
        let plan = Plan::diff(&Desired::default(), &held);
        assert_eq!(plan.del_states.len(), 2);
        assert_eq!(plan.del_policies.len(), 2);
        // Someone else removes them between the dump and the apply.
        ip_cmd(&["xfrm", "state", "flush"]);
        ip_cmd(&["xfrm", "policy", "flush"]);
        let done = x
            .apply(&plan, &held, key)
            .expect("ESRCH and ENOENT on delete are done, not errors");
        assert_eq!((done.states_deleted, done.policies_deleted), (2, 2));
        assert!(x.held().expect("dump").states.is_empty());
    });
}
