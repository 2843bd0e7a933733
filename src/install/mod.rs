//! Installing into a node: our entry in Calico's conflist, the binary in the
//! CNI bin dir, and the KEK file.
//!
//! `conflist` holds the pure text edits; this module finds the files and
//! writes them atomically (temp file in the same directory, fsync, rename),
//! keeping each file's mode and owner.

pub mod conflist;
pub mod owner;
mod scan;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

pub use conflist::{plan_install, plan_uninstall, Edit, InstallOptions, PLUGIN_TYPE};

use crate::config::ConfigError;

/// Interfaces Felix creates when WireGuard is on (IPv4 and IPv6 defaults).
pub const WIREGUARD_IFACES: [&str; 2] = ["wireguard.cali", "wg-v6.cali"];

/// Why installing or uninstalling failed; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The file is not JSON.
    #[error("not valid JSON: {reason}")]
    Malformed {
        /// The parser's message, with line and column.
        reason: String,
    },
    /// The JSON is not a conflist we can chain into.
    #[error("not a CNI conflist: {reason}")]
    NotAConflist {
        /// What is missing.
        reason: String,
    },
    /// No plugin of type "calico".
    #[error("it has no plugin of type \"calico\"")]
    NoCalicoEntry,
    /// Calico runs on the Kubernetes API datastore.
    #[error("Calico uses the Kubernetes API datastore (\"datastore_type\": \"kubernetes\"); calico-ipsec supports only Calico's etcd datastore for now, so it was not installed")]
    KubernetesDatastore,
    /// A datastore type we do not know.
    #[error("Calico's \"datastore_type\" is {datastore:?}; calico-ipsec supports only \"etcdv3\"")]
    UnknownDatastore {
        /// The value found.
        datastore: String,
    },
    /// Calico's entry finds etcd by DNS SRV discovery.
    #[error("Calico's entry uses \"etcd_discovery_srv\", which calico-ipsec does not support; set \"etcd_endpoints\" in Calico's entry")]
    DiscoverySrv,
    /// Calico's entry has no etcd endpoints.
    #[error(
        "Calico's entry has no \"etcd_endpoints\"; calico-ipsec needs Calico's etcd datastore"
    )]
    NoEtcdEndpoints,
    /// More than one entry of ours.
    #[error("it holds {count} calico-ipsec entries; remove all but one (or run uninstall, then install)")]
    Duplicate {
        /// How many.
        count: usize,
    },
    /// The entry we would write does not validate.
    #[error("the calico-ipsec entry would be invalid: {source}")]
    InvalidEntry {
        /// The field that is wrong.
        #[source]
        source: ConfigError,
    },
    /// Calico's WireGuard encryption is on.
    #[error("Calico's WireGuard encryption is on ({evidence}); calico-ipsec cannot run alongside it (WireGuard takes pod traffic before the IPIP tunnel), so it was not installed. Turn WireGuard off first")]
    WireGuard {
        /// What showed it.
        evidence: String,
    },
    /// A bug: the edit did not produce what was planned.
    #[error("internal error, nothing was written: {reason}")]
    Internal {
        /// What went wrong.
        reason: String,
    },
}

/// Why `install` or `uninstall` failed on this node: which file, and why.
#[derive(Debug, thiserror::Error)]
pub enum InstallFileError {
    /// A conflist could not be edited.
    #[error("{path}: {source}")]
    Conflist {
        /// The conflist.
        path: PathBuf,
        /// Why.
        #[source]
        source: InstallError,
    },
    /// No conflist in the directory names Calico's plugin.
    #[error("no *.conflist in {dir} has a plugin of type \"calico\"; is Calico installed, and is --conf-dir its CNI config directory?")]
    NoCalicoConflist {
        /// The directory searched.
        dir: PathBuf,
    },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The KEK source is unusable.
    #[error(transparent)]
    Kek(#[from] crate::keys::KekError),
    /// Installing was refused (WireGuard on, or Calico's entry unusable).
    #[error(transparent)]
    Refused(InstallError),
    /// `--only-if-daemonset-deleted` could not get an answer; nothing was removed.
    #[error("kept the calico-ipsec entry: cannot tell whether DaemonSet {name} is being deleted: {source}")]
    Owner {
        /// The DaemonSet.
        name: String,
        /// Why.
        #[source]
        source: owner::OwnerError,
    },
    /// FelixConfiguration could not be read from etcd.
    #[error("cannot read Calico's FelixConfiguration from etcd to rule out WireGuard: {0}; fix etcd access, or pass --skip-datastore-check to rely on the local check alone")]
    Datastore(crate::datastore::etcd::EtcdError),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> InstallFileError + '_ {
    move |source| InstallFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `*.conflist` files in `dir`, sorted by name as libcni sorts them.
pub fn conflists(dir: &Path) -> Result<Vec<PathBuf>, InstallFileError> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_at(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist") && p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

/// Calico's conflist: the first `*.conflist` by name whose plugins include `calico`.
/// A file that does not parse is an error, not skipped: it may be Calico's.
pub fn find_calico_conflist(dir: &Path) -> Result<PathBuf, InstallFileError> {
    for path in conflists(dir)? {
        let text = fs::read_to_string(&path).map_err(io_at(&path))?;
        let has = conflist::has_calico(&text).map_err(|source| InstallFileError::Conflist {
            path: path.clone(),
            source,
        })?;
        if has {
            return Ok(path);
        }
    }
    Err(InstallFileError::NoCalicoConflist {
        dir: dir.to_path_buf(),
    })
}

/// Writes `bytes` to `path` atomically: a temp file beside it (a name libcni
/// ignores), fsync, rename, fsync of the directory. Keeps the old file's mode
/// and owner, or uses `mode` for a new file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallFileError> {
    write_atomic_with(path, bytes, mode, true, None).map(|_| ())
}

/// [`write_atomic`], but only if the file still holds `expected` just before
/// the rename (another writer's newer file is never replaced by an edit of
/// the older one); false, writing nothing, when it no longer does.
pub fn write_atomic_if_unchanged(
    path: &Path,
    bytes: &[u8],
    expected: &[u8],
) -> Result<bool, InstallFileError> {
    write_atomic_with(path, bytes, 0o644, true, Some(expected))
}

/// Where `uninstall` leaves its mark in the CNI config directory, so that a
/// running agent does not put the entry back; `install` removes it. libcni
/// reads no subdirectory.
pub fn uninstalled_marker(conf_dir: &Path) -> PathBuf {
    conf_dir.join(PLUGIN_TYPE).join("uninstalled")
}

/// `write_atomic`, keeping the old file's mode only when `keep_mode` is set
/// (and its owner then); [`crate::fsutil::write_atomic_owned`] does the write.
fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    keep_mode: bool,
    expected: Option<&[u8]>,
) -> Result<bool, InstallFileError> {
    if let Some(want) = expected {
        // Another writer's newer file is never replaced by an edit of the
        // older one (the window left is the write itself).
        if fs::read(path).map_err(io_at(path))? != want {
            return Ok(false);
        }
    }
    let old = fs::metadata(path).ok().filter(|_| keep_mode);
    let (mode, owner) = match &old {
        Some(m) => (m.mode() & 0o7777, Some((m.uid(), m.gid()))),
        None => (mode, None),
    };
    crate::fsutil::write_atomic_owned(path, bytes, mode, owner).map_err(io_at(path))?;
    Ok(true)
}

/// What a file operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file was written.
    Written,
    /// The file already had the right content; nothing was written.
    Unchanged,
    /// The file was removed.
    Removed,
    /// There was nothing to remove.
    Absent,
}

/// Copies `src` (normally the running binary) to `bin_dir/calico-ipsec`, mode 0755,
/// unless an identical file is already there.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<Outcome, InstallFileError> {
    let dst = bin_dir.join(PLUGIN_TYPE);
    let new = fs::read(src).map_err(io_at(src))?;
    if let Ok(old) = fs::read(&dst) {
        let mode = fs::metadata(&dst).map_err(io_at(&dst))?.mode() & 0o777;
        if old == new && mode == 0o755 {
            return Ok(Outcome::Unchanged);
        }
    }
    fs::create_dir_all(bin_dir).map_err(io_at(bin_dir))?;
    write_atomic_with(&dst, &new, 0o755, false, None)?;
    Ok(Outcome::Written)
}

/// Copies a KEK file (validated: 64 hex characters, not group- or world-readable)
/// to `dst` with mode 0600, unless it is already there.
pub fn install_kek(src: &Path, dst: &Path) -> Result<Outcome, InstallFileError> {
    let kek = crate::keys::Kek::load(src)?;
    let new = kek.to_hex_line();
    if let (Ok(old), Ok(meta)) = (crate::keys::Kek::load(dst), fs::symlink_metadata(dst)) {
        if old.expose() == kek.expose() && meta.is_file() && meta.mode() & 0o777 == 0o600 {
            return Ok(Outcome::Unchanged);
        }
    }
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
    }
    write_atomic_with(dst, new.as_bytes(), 0o600, false, None)?;
    Ok(Outcome::Written)
}

/// Removes a file, treating "already gone" as success.
pub fn remove_file(path: &Path) -> Result<Outcome, InstallFileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(Outcome::Removed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Outcome::Absent),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// The WireGuard interfaces present under `sys_class_net` (normally /sys/class/net).
pub fn wireguard_interfaces(sys_class_net: &Path) -> Vec<&'static str> {
    WIREGUARD_IFACES
        .into_iter()
        .filter(|i| sys_class_net.join(i).exists())
        .collect()
}
