//! The room's files: modes, round trips, what a damaged file means, and
//! the node lock.

use super::*;
use crate::datastore::ipsec::Phase;
use crate::datastore::snapshot::Fingerprint;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

fn open(dir: &Path) -> NodeState {
    NodeState::open(dir, &dir.join("agreement"), Duration::ZERO).expect("open")
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn record(version: u32) -> Converged {
    Converged {
        version,
        node: "node-1".into(),
        phase: Phase::Enforce,
        boot_id: "b".into(),
        id: Some(1),
        incarnation: 3,
        ledger: String::new(),
        states: 6,
        policies: 6,
        revision: 42,
        fingerprint: Fingerprint::default(),
        digest: "d".into(),
        mtu: vec![crate::mtu::MtuParams::default()],
        checked: crate::clock::Stamp::now(),
    }
}

#[test]
fn the_record_is_0600_read_back_once_and_invalidated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut st = open(dir.path());
    assert_eq!(st.converged(), None);
    st.invalidate().expect("nothing to remove is fine");
    let c = record(CONVERGED_VERSION);
    st.save_converged(c.clone()).expect("save");
    drop(st);
    let mut st = open(dir.path());
    assert_eq!(st.converged(), Some(&c));
    assert_eq!(mode(&dir.path().join("node/converged")), 0o600);
    st.save_converged(record(CONVERGED_VERSION + 1))
        .expect("save");
    drop(st);
    let mut st = open(dir.path());
    assert_eq!(st.converged(), None, "another version is ignored");
    st.invalidate().expect("remove");
    assert!(!dir.path().join("node/converged").exists());
}

#[test]
fn the_ledger_is_0600_and_its_digest_names_its_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut st = open(dir.path());
    assert!(st.ledger().is_none());
    assert_eq!(st.ledger_digest(), "");
    let mut l = Ledger::fresh("b", 3);
    l.sent.insert(Ledger::entry(2, "node-2", 0));
    l.sent.insert(Ledger::entry(2, "node-3", 2));
    st.write_ledger(l.clone()).expect("save");
    let written = st.ledger_digest().to_string();
    drop(st);
    let st = open(dir.path());
    assert_eq!(st.ledger(), Some(&l));
    assert_eq!(st.ledger_digest(), written);
    assert_eq!(mode(&dir.path().join("node/ledger")), 0o600);
    assert_eq!(Ledger::epoch_of("2/node-3/2"), Some(2));
    drop(st);
    // A damaged ledger is no ledger: the history is unknown.
    fs::write(dir.path().join("node/ledger"), b"{").expect("write");
    let st = open(dir.path());
    assert!(st.ledger().is_none());
    assert_eq!(st.ledger_digest(), "");
}

#[test]
fn the_cluster_is_remembered_until_it_is_turned_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut st = open(dir.path());
    assert!(st.seen().is_none());
    let seen = Seen {
        cluster_guid: "guid-1".into(),
        phase_generation: 3,
        phase: Phase::Encrypt,
    };
    st.note_seen(Some(seen.clone())).expect("note");
    assert_eq!(NodeState::peek_seen(dir.path()), Some(seen.clone()));
    assert!(seen.missing_reason().contains("guid-1"));
    st.note_seen(None).expect("forget");
    assert!(NodeState::peek_seen(dir.path()).is_none());
    // An unreadable record counts as seen: refusing is the safe side.
    fs::write(dir.path().join("node/cluster"), b"{").expect("write");
    assert!(NodeState::peek_seen(dir.path()).is_some());
    // A record of an older release names no phase: the strongest stands.
    fs::write(
        dir.path().join("node/cluster"),
        br#"{"cluster_guid":"guid-1","phase_generation":3}"#,
    )
    .expect("write");
    let old = NodeState::peek_seen(dir.path()).expect("seen");
    assert_eq!((old.phase, old.phase_generation), (Phase::Enforce, 3));
}

#[test]
fn the_guard_mark_and_script_are_kept_and_forgotten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut st = open(dir.path());
    assert!(st.guard().is_none() && st.guard_script().is_none());
    let mark = GuardMark::now("abc".into(), "boot-1");
    st.keep_guard(Some(mark.clone()), Some("table inet x {}\n"));
    drop(st);
    let mut st = open(dir.path());
    assert_eq!(st.guard(), Some(&mark));
    assert!(mark.fresh(Duration::from_secs(30)));
    assert_eq!(st.guard_script().as_deref(), Some("table inet x {}\n"));
    assert_eq!(mode(&dir.path().join("node/guard.nft")), 0o600);
    st.keep_guard(None, Some(""));
    assert!(st.guard().is_none() && st.guard_script().is_none());
}

#[test]
fn private_keys_are_0600_never_replaced_and_forgotten_with_their_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut st = open(dir.path());
    assert!(st.private_key(3, "aa").expect("nothing yet").is_none());
    st.keep_private_key(3, "aa", &[7; 32]).expect("keep");
    assert!(
        st.keep_private_key(3, "aa", &[8; 32]).is_err(),
        "a stored key is never replaced"
    );
    drop(st);
    let mut st = open(dir.path());
    assert_eq!(st.private_key(3, "aa").expect("read"), Some(&[7u8; 32][..]));
    assert_eq!(mode(&dir.path().join("agreement/3-aa.key")), 0o600);
    assert_eq!(mode(&dir.path().join("agreement")), 0o700);
    st.keep_private_key(3, "bb", &[1; 32]).expect("keep");
    st.keep_private_key(4, "cc", &[2; 32]).expect("keep");
    st.keep_private_key(5, "dd", &[3; 32]).expect("keep");
    let keep: BTreeSet<(u32, String)> = [(3, "bb".to_string()), (4, "cc".to_string())].into();
    let removed = st.retain_private_keys(&keep, &[5].into()).expect("retain");
    assert_eq!(removed, vec![3], "the earlier epoch 3's file");
    assert!(!dir.path().join("agreement/3-aa.key").exists());
    assert!(st.private_key(5, "dd").expect("kept").is_some());
    drop(st);
    fs::write(dir.path().join("agreement/6-ee.key"), "zz").expect("write");
    let st = open(dir.path());
    let err = st.private_key(6, "ee").expect_err("not hex");
    assert!(err.to_string().contains("6-ee.key"), "{err}");
}

#[test]
fn the_node_lock_waits_a_bounded_time_and_refuses_a_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let held = open(dir.path());
    let started = Instant::now();
    let err = NodeState::open(dir.path(), dir.path(), Duration::from_millis(300))
        .expect_err("two holders of the node lock");
    let waited = started.elapsed();
    assert!(matches!(err, StateError::LockTimeout { .. }), "{err}");
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2));
    assert!(err.to_string().contains("still held"), "{err}");
    drop(held);
    assert!(
        NodeState::open(dir.path(), dir.path(), Duration::from_millis(300)).is_ok(),
        "free once released"
    );

    let other = tempfile::tempdir().expect("tempdir");
    let outside = other.path().join("victim");
    fs::write(&outside, b"keep").expect("write");
    fs::create_dir(other.path().join("node")).expect("mkdir");
    std::os::unix::fs::symlink(&outside, other.path().join("node/lock")).expect("link");
    let err = NodeState::open(other.path(), other.path(), Duration::ZERO).expect_err("a link");
    assert!(
        matches!(err, StateError::Unsafe(SafeFileError::Symlink(_))),
        "{err:?}"
    );
    assert_eq!(fs::read(&outside).expect("read"), b"keep");
}

#[test]
fn an_epoch_that_left_the_kernel_and_comes_back_counts_as_used() {
    let used = |l: &Ledger, e, peer, lane| l.made_before(e, false, &Ledger::entry(e, peer, lane));
    let mut l = Ledger::fresh("b", 1);
    l.sent.insert(Ledger::entry(1, "node-2", 0));
    l.sent.insert(Ledger::entry(2, "node-2", 0));
    assert!(used(&l, 1, "node-2", 0));
    assert!(!used(&l, 1, "node-3", 0), "another peer: a new key");
    assert!(!l.prune(&[1, 2]), "nothing left the kernel");
    // Epoch 1 retired and deleted: its entries go, its number stays.
    assert!(l.prune(&[2]));
    assert!(!l.sent.contains(&Ledger::entry(1, "node-2", 0)));
    // Set active again (or restored from a backup): its keys would be the
    // old ones, for every peer and lane, so any outbound SA needs a new
    // incarnation.
    assert!(used(&l, 1, "node-2", 0));
    assert!(used(&l, 1, "node-9", 3));
    assert!(!used(&l, 3, "node-2", 0), "a new epoch is fresh");
    // The watermark survives a write and a read.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut st = open(dir.path());
    st.write_ledger(l.clone()).expect("write");
    drop(st);
    assert_eq!(open(dir.path()).ledger(), Some(&l));
}

#[test]
fn the_kernel_mark_is_0600_written_only_on_change_and_a_damaged_one_says_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node/kernel");
    let mut st = open(dir.path());
    assert_eq!(st.kernel_mark(), None);
    let m = KernelMark {
        digest: "ab".repeat(32),
        boot: "boot-1".into(),
    };
    st.keep_kernel_mark(Some(m.clone()));
    assert_eq!(mode(&path), 0o600);
    let written = fs::metadata(&path)
        .expect("stat")
        .modified()
        .expect("mtime");
    std::thread::sleep(Duration::from_millis(20));
    st.keep_kernel_mark(Some(m.clone()));
    assert_eq!(
        fs::metadata(&path)
            .expect("stat")
            .modified()
            .expect("mtime"),
        written,
        "the same mark is not written again"
    );
    drop(st);
    let mut st = open(dir.path());
    assert_eq!(st.kernel_mark(), Some(&m), "read back");
    st.keep_kernel_mark(None);
    assert!(!path.exists(), "forgotten before a kernel write");
    drop(st);
    // A damaged mark (a digest alone, extra words, not UTF-8) is no mark:
    // the next convergence then cannot claim drift either way.
    for bad in [&b"abcd"[..], b"abcd boot extra", b"\xff\xfe boot"] {
        fs::write(&path, bad).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(open(dir.path()).kernel_mark(), None, "{bad:?}");
    }
}
