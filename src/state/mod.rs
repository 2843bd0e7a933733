//! Everything this node keeps on disk, in one room: the only user of
//! [`crate::fsutil`] for node state.
//!
//! | file | what | written |
//! |---|---|---|
//! | `<state_dir>/node/lock` | the node-wide `flock` | never (opened) |
//! | `<state_dir>/node/converged` | the [`Converged`] record of the last convergence that needed no write | last |
//! | `<state_dir>/node/ledger` | the [`Ledger`] of outbound SAs created in this incarnation | before the SAs |
//! | `<state_dir>/node/cluster` | [`Seen`]: this node has seen the cluster initialised | after the apply |
//! | `<state_dir>/node/guard`, `guard.nft` | the catch-all's [`GuardMark`] and its script | around the apply |
//! | `<state_dir>/node/kernel` | the [`KernelMark`]: what the kernel held after the last convergence | removed before a kernel write, written after |
//! | `<agreement_dir>/<epoch>-<tag>.key` | this node's epoch private keys (tmpfs) | before their public key is published |
//! | `<state_dir>/<container>_<ifname>.json` | one pod attachment's MTU backup ([`attachment`]) | by ADD, before the MTU changes |
//!
//! A convergence opens the room with [`NodeState::open`]: it takes the node
//! lock, then reads every record and key file once. From then on it reads
//! the copies in memory, and each write goes to the file and the copy
//! together. Pod attachments are per pod, not under the node lock (a DEL
//! must not wait for a convergence): [`NodeState::attachments`] hands out
//! their directory.
//!
//! # The order of writes, and why a crash at any point is safe
//!
//! 1. [`NodeState::invalidate`] removes the convergence record before
//!    anything else changes: from here on nothing vouches for the kernel,
//!    so a crash makes the next convergence run in full.
//! 2. A private key is written ([`NodeState::keep_private_key`]) before its
//!    public key is published in etcd: a published key is never one this
//!    node cannot use after a crash.
//! 3. The ledger ([`NodeState::write_ledger`]) lists every outbound SA
//!    before the SA exists, and names the incarnation and boot. A crash
//!    before it is written leaves a ledger of another incarnation (a new one
//!    is published) or one without the SA (the SA was never made).
//! 4. The kernel is changed (not here).
//! 5. The guard's mark and script ([`NodeState::keep_guard`]) follow each
//!    `nft` run; a lost mark only makes the next convergence run `nft`
//!    again.
//! 6. Private keys of deleted epochs are removed, [`Seen`] is noted, and
//!    the convergence record is written last, only when the convergence
//!    read everything from its snapshot and wrote nothing to etcd.
//!
//! Every file is written atomically (temporary file, `fsync`, rename, `fsync`
//! of the directory), mode 0600, and read without following links.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::fsutil::{self, SafeFileError};

pub mod attachment;
mod lock;
mod records;

pub use lock::NodeLock;
pub use records::{Converged, GuardMark, KernelMark, Ledger, Seen, CONVERGED_VERSION};

/// The largest record or ledger read (a ledger lists at most a few
/// thousand peers per epoch).
pub const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;

/// The largest guard script read back (a script names pools and nodes).
const MAX_SCRIPT_BYTES: u64 = 1 << 20;

/// The catch-all's script, kept for a reboot.
pub const GUARD_SCRIPT: &str = "guard.nft";

/// A failure of the node's state on disk, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing or listing failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A state file exists but is not ours or is damaged.
    #[error("state file {path} is unusable: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why it could not be used.
        reason: String,
    },
    /// A file is a link, not a regular file, or too big.
    #[error(transparent)]
    Unsafe(#[from] SafeFileError),
    /// Another process held the node lock for longer than the wait.
    #[error("the node lock {path} is still held by another calico-ipsec process after {waited:?}; see which with `fuser -v {path}`")]
    LockTimeout {
        /// The lock file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

/// Removes a file; a missing one is fine.
fn remove(path: &Path) -> Result<(), StateError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", path)(e)),
        _ => Ok(()),
    }
}

fn write(path: &Path, body: &[u8]) -> Result<(), StateError> {
    if let Some(dir) = path.parent() {
        fsutil::private_dir(dir)?;
    }
    fsutil::write_atomic(path, body, 0o600).map_err(io_err("writing", path))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of some bytes, in hex.
pub fn digest(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// One epoch private key file as read: its 32 bytes, or the reason it is
/// unusable.
type KeyFile = Result<Zeroizing<Vec<u8>>, StateError>;

/// This node's state on disk, read once under the node lock.
pub struct NodeState {
    dir: PathBuf,
    keys_dir: PathBuf,
    _lock: NodeLock,
    converged: Option<Converged>,
    ledger: Option<Ledger>,
    ledger_digest: String,
    seen: Option<Seen>,
    guard: Option<GuardMark>,
    kernel: Option<KernelMark>,
    keys: BTreeMap<(u32, String), KeyFile>,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("dir", &self.dir)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl NodeState {
    /// Takes the node lock (waiting at most `wait`), then reads every record
    /// and key file once.
    pub fn open(
        state_dir: &Path,
        agreement_dir: &Path,
        wait: Duration,
    ) -> Result<Self, StateError> {
        let dir = state_dir.join("node");
        let lock = NodeLock::acquire(&dir, wait)?;
        // A writer killed between creating its temporary file and renaming
        // it leaves the file behind: gone once nobody can be writing it.
        // (Pod attachments, one file per pod beside `node/`, are swept by
        // GC, which lists them anyway: not on every ADD.)
        for d in [dir.as_path(), agreement_dir] {
            let n = fsutil::remove_stale_temps(d);
            if n > 0 {
                tracing::info!(dir = %d.display(), files = n, "removed temporary files of killed writers");
            }
        }
        let (ledger, ledger_digest) = records::read_ledger(&dir.join(records::LEDGER));
        Ok(Self {
            converged: records::read_converged(&dir.join(records::CONVERGED)),
            ledger,
            ledger_digest,
            seen: Seen::read(&dir),
            guard: GuardMark::read(&dir),
            kernel: KernelMark::read(&dir),
            keys: read_keys(agreement_dir)?,
            keys_dir: agreement_dir.to_path_buf(),
            dir,
            _lock: lock,
        })
    }

    /// What a reader without the lock (CHECK, `status`) needs: whether this
    /// node has seen the cluster initialised.
    pub fn peek_seen(state_dir: &Path) -> Option<Seen> {
        Seen::read(&state_dir.join("node"))
    }

    /// The directory of pod attachment backups (not under the node lock).
    pub fn attachments(state_dir: &Path) -> attachment::StateDir {
        attachment::StateDir::new(state_dir)
    }

    /// The record of the last convergence that needed no write.
    pub fn converged(&self) -> Option<&Converged> {
        self.converged.as_ref()
    }

    /// The ledger, when it exists and parses.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// The SHA-256 of the ledger's bytes ("" when there is none): the
    /// record names the ledger it was made under by this.
    pub fn ledger_digest(&self) -> &str {
        &self.ledger_digest
    }

    /// Whether this node has seen the cluster initialised.
    pub fn seen(&self) -> Option<&Seen> {
        self.seen.as_ref()
    }

    /// The catch-all last written, as recorded.
    pub fn guard(&self) -> Option<&GuardMark> {
        self.guard.as_ref()
    }

    /// Step 1: the record stops vouching for the kernel.
    pub fn invalidate(&mut self) -> Result<(), StateError> {
        self.converged = None;
        remove(&self.dir.join(records::CONVERGED))
    }

    /// Step 6 (or the fast path's refresh): writes the convergence record.
    pub fn save_converged(&mut self, c: Converged) -> Result<(), StateError> {
        let body = serde_json::to_vec(&c).map_err(|e| StateError::Corrupt {
            path: self.dir.join(records::CONVERGED),
            reason: e.to_string(),
        })?;
        write(&self.dir.join(records::CONVERGED), &body)?;
        self.converged = Some(c);
        Ok(())
    }

    /// Step 3: writes the ledger, synced, before any SA it lists exists.
    pub fn write_ledger(&mut self, l: Ledger) -> Result<(), StateError> {
        let path = self.dir.join(records::LEDGER);
        let body = serde_json::to_vec(&l).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write(&path, &body)?;
        self.ledger_digest = digest(&body);
        self.ledger = Some(l);
        Ok(())
    }

    /// Step 6: remembers the cluster (`Some`), or forgets it (`None`: the
    /// config record says `off`). Writes only a change.
    pub fn note_seen(&mut self, seen: Option<Seen>) -> Result<(), StateError> {
        if self.seen == seen {
            return Ok(());
        }
        let path = self.dir.join(records::SEEN);
        match &seen {
            None => remove(&path)?,
            Some(s) => write(&path, &serde_json::to_vec(s).unwrap_or_default())?,
        }
        self.seen = seen;
        Ok(())
    }

    /// The catch-all's kept script, read when it is to be restored.
    pub fn guard_script(&self) -> Option<String> {
        let raw = fsutil::read_state(&self.dir.join(GUARD_SCRIPT), MAX_SCRIPT_BYTES).ok()??;
        String::from_utf8(raw).ok()
    }

    /// Step 5: records the guard `nft` wrote (`None` forgets it, so the next
    /// sync writes it), and keeps its script for a reboot (`Some("")`
    /// removes the kept one). A failure is logged: it only costs an `nft`
    /// run later, or a reboot that waits for etcd.
    pub fn keep_guard(&mut self, mark: Option<GuardMark>, script: Option<&str>) {
        if let Some(s) = script {
            let path = self.dir.join(GUARD_SCRIPT);
            let kept = if s.is_empty() {
                remove(&path)
            } else {
                write(&path, s.as_bytes())
            };
            if let Err(e) = kept {
                tracing::warn!(error = %e, "cannot keep the catch-all's script; after a reboot it is back only once etcd is read");
            }
        }
        let path = self.dir.join(records::GUARD);
        let written = match &mark {
            Some(m) => write(&path, m.line().as_bytes()),
            None => remove(&path),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the nftables guard; it is written again next time");
        }
        self.guard = mark;
    }

    /// What the kernel held after the last convergence, as recorded.
    pub fn kernel_mark(&self) -> Option<&KernelMark> {
        self.kernel.as_ref()
    }

    /// Records what the kernel holds now (`None`: unknown, before a write
    /// to the kernel or after one that did not finish). Writes only a
    /// change. A failure is logged: it only costs the next convergence
    /// telling drift apart from a change of its own.
    pub fn keep_kernel_mark(&mut self, mark: Option<KernelMark>) {
        if self.kernel == mark {
            return;
        }
        let path = self.dir.join(records::KERNEL);
        let written = match &mark {
            Some(m) => write(&path, m.line().as_bytes()),
            None => remove(&path),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record what the kernel holds; the next convergence cannot tell drift from its own changes");
            // A mark that may be stale on disk is worse than none.
            let _ = remove(&path);
            self.kernel = None;
            return;
        }
        self.kernel = mark;
    }

    /// This node's private key for one epoch instance, if stored.
    pub fn private_key(&self, epoch: u32, tag: &str) -> Result<Option<&[u8]>, StateError> {
        match self.keys.get(&(epoch, tag.to_string())) {
            None => Ok(None),
            Some(Ok(k)) => Ok(Some(k.as_slice())),
            Some(Err(_)) => Err(StateError::Corrupt {
                path: key_path(&self.keys_dir, epoch, tag),
                reason: "not 64 hex characters of a P-256 private key (remove it; a new pair is made and published)".into(),
            }),
        }
    }

    /// The path of one epoch instance's private key file.
    pub fn private_key_path(&self, epoch: u32, tag: &str) -> PathBuf {
        key_path(&self.keys_dir, epoch, tag)
    }

    /// Step 2: stores a new private key (0600, in a 0700 directory) before
    /// its public key is published. A stored key is never replaced.
    pub fn keep_private_key(
        &mut self,
        epoch: u32,
        tag: &str,
        key: &[u8],
    ) -> Result<(), StateError> {
        let slot = (epoch, tag.to_string());
        if self.keys.contains_key(&slot) {
            return Err(StateError::Corrupt {
                path: key_path(&self.keys_dir, epoch, tag),
                reason: "a key is already stored for this epoch; it is never replaced".into(),
            });
        }
        let path = key_path(&self.keys_dir, epoch, tag);
        let text = crate::keys::secret_hex(key, 0);
        fsutil::private_dir(&self.keys_dir)?;
        fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(io_err("writing", &path))?;
        self.keys.insert(slot, Ok(Zeroizing::new(key.to_vec())));
        Ok(())
    }

    /// Step 6: removes every private key file but those of the epoch
    /// instances in `keep` and of the epoch numbers in `keep_any`: a deleted
    /// epoch's key, or one of an earlier epoch of the same number, must not
    /// outlive it (forward secrecy). Returns the removed files' epochs.
    pub fn retain_private_keys(
        &mut self,
        keep: &BTreeSet<(u32, String)>,
        keep_any: &BTreeSet<u32>,
    ) -> Result<Vec<u32>, StateError> {
        let doomed: Vec<(u32, String)> = self
            .keys
            .keys()
            .filter(|(e, t)| !keep_any.contains(e) && !keep.contains(&(*e, t.clone())))
            .cloned()
            .collect();
        let mut removed = Vec::new();
        for (epoch, tag) in doomed {
            remove(&key_path(&self.keys_dir, epoch, &tag))?;
            self.keys.remove(&(epoch, tag));
            removed.push(epoch);
        }
        Ok(removed)
    }
}

fn key_path(dir: &Path, epoch: u32, tag: &str) -> PathBuf {
    dir.join(format!("{epoch}-{tag}.key"))
}

/// Every `<epoch>-<tag>.key` file in the agreement directory.
fn read_keys(dir: &Path) -> Result<BTreeMap<(u32, String), KeyFile>, StateError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut out = BTreeMap::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let Some((epoch, tag)) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".key"))
            .and_then(|n| n.split_once('-'))
            .and_then(|(e, t)| Some((e.parse::<u32>().ok()?, t.to_string())))
        else {
            continue;
        };
        let path = entry.path();
        let key = match fsutil::read_state(&path, 256) {
            Ok(None) => continue,
            Ok(Some(text)) => {
                let text = Zeroizing::new(text);
                crate::keys::secret_from_hex(text.trim_ascii(), 32).ok_or(StateError::Corrupt {
                    path: path.clone(),
                    reason: "not 64 hex characters".into(),
                })
            }
            Err(e) => Err(e.into()),
        };
        out.insert((epoch, tag), key);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
