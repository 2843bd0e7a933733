//! This node's identity on the data plane: the node-wide lock, the ledger of
//! outbound SAs created in the current incarnation, the boot id, and the
//! publication of a new incarnation (so that no key is used by two SAs).

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::record;
use super::{state_err, ConvergeError};
use crate::datastore::ipsec::{Identity, IpsecStore, IpsecStoreError};
use crate::fsutil;

pub use crate::clock::BOOT_ID_PATH;

/// How long an ADD (or the agent) waits for the node lock before giving up
/// with "try again later": a holder does one convergence, each etcd request
/// bounded by `etcd_timeout_ms`, so a longer wait means a stuck holder, and
/// the runtime's retry is better than a pod creation that never returns.
pub const NODE_LOCK_WAIT: Duration = Duration::from_secs(25);

/// The node-wide lock: an exclusive `flock` on `<state_dir>/node/lock`
/// (a regular file; a link there is refused, never followed).
pub struct NodeLock {
    _lock: Flock<File>,
}

impl NodeLock {
    /// Takes the lock, waiting at most `wait` for another holder to let go;
    /// [`ConvergeError::LockTimeout`] after that.
    pub fn acquire(state_dir: &Path, wait: Duration) -> Result<Self, ConvergeError> {
        let dir = state_dir.join("node");
        create_private_dir(&dir)?;
        let path = dir.join("lock");
        let started = Instant::now();
        let mut file = fsutil::open_lock(&path)?;
        let mut pause = Duration::from_millis(5);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Self { _lock: lock }),
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
                Err((f, nix::errno::Errno::EINTR)) => {
                    file = f;
                    continue;
                }
                Err((_, e)) => return Err(state_err("locking", &path)(io::Error::from(e))),
            }
            let waited = started.elapsed();
            if waited >= wait {
                return Err(ConvergeError::LockTimeout { path, waited });
            }
            std::thread::sleep(pause.min(wait - waited));
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

fn create_private_dir(dir: &Path) -> Result<(), ConvergeError> {
    Ok(fsutil::private_dir(dir)?)
}

/// The outbound SAs created in the current incarnation (names, no keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The boot id it belongs to.
    pub boot_id: String,
    /// The incarnation it belongs to.
    pub incarnation: u32,
    /// "epoch/peer" of every outbound SA created.
    pub sent: BTreeSet<String>,
}

impl Ledger {
    pub(super) fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("node").join("ledger")
    }

    /// Reads the ledger; `None` when missing or unreadable (both mean the
    /// history is unknown, which a new incarnation settles).
    pub fn load(state_dir: &Path) -> Option<Self> {
        let bytes = match fsutil::read_state(&Self::path(state_dir), record::MAX_RECORD_BYTES) {
            Ok(b) => b?,
            Err(e) => {
                tracing::warn!(error = %e, "the SA ledger is unusable; a new incarnation will be published");
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "the SA ledger is unreadable; a new incarnation will be published");
                None
            }
        }
    }

    /// Writes the ledger atomically (0600), synced before any SA it lists.
    pub fn save(&self, state_dir: &Path) -> Result<(), ConvergeError> {
        let path = Self::path(state_dir);
        if let Some(dir) = path.parent() {
            create_private_dir(dir)?;
        }
        let body = serde_json::to_vec(self).unwrap_or_default();
        fsutil::write_atomic(&path, &body, 0o600).map_err(state_err("writing", &path))
    }

    /// "epoch/peer" for IPv4 transport SAs, "epoch/peer/lane" for the others.
    pub(super) fn entry(epoch: u32, peer: &str, lane: crate::xfrm::Lane) -> String {
        match lane.index() {
            0 => format!("{epoch}/{peer}"),
            n => format!("{epoch}/{peer}/{n}"),
        }
    }
}

/// Whether the published incarnation cannot be trusted to have fresh keys:
/// never published, published before a reboot, or without a matching ledger
/// (so which SAs were created under it is unknown).
pub fn needs_new_incarnation(ident: &Identity, ledger: Option<&Ledger>, boot: &str) -> bool {
    ident.incarnation == 0
        || ident.boot_id != boot
        || ledger.is_none_or(|l| l.incarnation != ident.incarnation || l.boot_id != boot)
}

/// Reads the kernel's boot id.
pub fn boot_id() -> Result<String, ConvergeError> {
    crate::clock::read_boot_id().map_err(state_err("reading", Path::new(BOOT_ID_PATH)))
}

/// Publishes the next incarnation (compare-and-swap on the identity record
/// at its revision), above both the published one and `floor` (the local
/// ledger's), and starts an empty ledger for it.
pub(super) async fn bump(
    store: &IpsecStore<'_>,
    node: &str,
    (mut ident, mut rev): (Identity, i64),
    floor: u32,
    boot: &str,
    state_dir: &Path,
) -> Result<((Identity, i64), Ledger), ConvergeError> {
    for _ in 0..16 {
        let next = Identity {
            id: ident.id,
            incarnation: ident.incarnation.max(floor) + 1,
            boot_id: boot.to_string(),
        };
        // The reply's revision saves reading the record back.
        let written = store.publish_identity(node, &next, rev).await?;
        if let Some(new_rev) = written {
            let ledger = Ledger {
                boot_id: boot.to_string(),
                incarnation: next.incarnation,
                sent: BTreeSet::new(),
            };
            ledger.save(state_dir)?;
            tracing::info!(
                node,
                incarnation = next.incarnation,
                "published a new incarnation"
            );
            // A missing revision (0) only makes a later compare-and-swap
            // fail and read the record back.
            return Ok(((next, new_rev), ledger));
        }
        (ident, rev) = store.identity(node).await?;
    }
    Err(IpsecStoreError::Contended(format!("publishing a new incarnation of {node}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn ident(inc: u32, boot: &str) -> Identity {
        Identity {
            id: 1,
            incarnation: inc,
            boot_id: boot.into(),
        }
    }

    fn ledger(inc: u32, boot: &str) -> Ledger {
        Ledger {
            boot_id: boot.into(),
            incarnation: inc,
            sent: BTreeSet::new(),
        }
    }

    #[test]
    fn a_new_incarnation_after_reboot_first_start_or_lost_ledger() {
        let l = ledger(4, "b1");
        assert!(!needs_new_incarnation(&ident(4, "b1"), Some(&l), "b1"));
        assert!(
            needs_new_incarnation(&ident(0, ""), None, "b1"),
            "first start"
        );
        assert!(
            needs_new_incarnation(&ident(4, "b1"), Some(&l), "b2"),
            "rebooted"
        );
        assert!(
            needs_new_incarnation(&ident(4, "b1"), None, "b1"),
            "ledger lost"
        );
        assert!(
            needs_new_incarnation(&ident(5, "b1"), Some(&l), "b1"),
            "ledger of another incarnation"
        );
    }

    #[test]
    fn ledger_round_trip_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut l = ledger(3, "b");
        l.sent
            .insert(Ledger::entry(2, "node-2", crate::xfrm::Lane::V4Transport));
        l.save(dir.path()).expect("save");
        assert_eq!(Ledger::load(dir.path()), Some(l));
        let mode = fs::metadata(Ledger::path(dir.path()))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_node_lock_waits_a_bounded_time_and_refuses_a_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = NodeLock::acquire(dir.path(), Duration::ZERO).expect("first");
        let started = Instant::now();
        let err = match NodeLock::acquire(dir.path(), Duration::from_millis(300)) {
            Err(e) => e,
            Ok(_) => panic!("two holders of the node lock"),
        };
        let waited = started.elapsed();
        assert!(matches!(err, ConvergeError::LockTimeout { .. }), "{err}");
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2));
        assert!(err.to_string().contains("still held"), "{err}");
        drop(held);
        let again = NodeLock::acquire(dir.path(), Duration::from_millis(300));
        assert!(again.is_ok(), "free once released");
        drop(again);

        let other = tempfile::tempdir().expect("tempdir");
        let outside = other.path().join("victim");
        fs::write(&outside, b"keep").expect("write");
        fs::create_dir(other.path().join("node")).expect("mkdir");
        std::os::unix::fs::symlink(&outside, other.path().join("node/lock")).expect("link");
        let err = NodeLock::acquire(other.path(), Duration::ZERO).err();
        assert!(
            matches!(
                err,
                Some(ConvergeError::Unsafe(
                    crate::fsutil::SafeFileError::Symlink(_)
                ))
            ),
            "{err:?}"
        );
    }
}
