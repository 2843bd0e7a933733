//! Per-attachment state: the MTUs a pod had before we lowered them.
//!
//! One file per (container ID, interface), `<state_dir>/<id>_<ifname>.json`
//! (a container ID longer than 128 characters is replaced by `_` and a
//! SHA-256 prefix, so the name stays short), mode 0600, written by
//! [`crate::fsutil::write_atomic`]. ADD writes it before changing anything;
//! DEL restores from it and removes it; GC removes the files of attachments
//! the runtime no longer knows. A file that is a link, not a regular file,
//! not ours (owner, mode) or about another attachment is never believed: it
//! is reported as corrupt and moved aside.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io_err, StateError};
use crate::fsutil::{self, Links, SafeFileError};

use serde::{Deserialize, Serialize};

/// What ADD changed on one attachment, so DEL can put it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The pod interface's MTU before ADD lowered it.
    pub pod_mtu: u32,
    /// The host-side veth's name, if there is one.
    pub host_ifname: Option<String>,
    /// The host-side veth's MTU before ADD lowered it.
    pub host_mtu: Option<u32>,
    /// The bound ADD applied.
    pub bound: u32,
}

/// One file found by [`StateDir::list`]: its path and what it holds.
pub type Listed = (PathBuf, Result<Backup, StateError>);

/// The directory that holds attachment backups.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// A state directory at `dir`; created on first write.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The backup file for one attachment; its name is at most 150 bytes
    /// whatever the container ID.
    pub fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir
            .join(format!("{}_{ifname}.json", file_stem(container_id)))
    }

    /// Reads one attachment's backup; `Ok(None)` when there is none. A file
    /// that is not a trustworthy backup of exactly this attachment is
    /// [`StateError::Corrupt`].
    pub fn load(&self, container_id: &str, ifname: &str) -> Result<Option<Backup>, StateError> {
        let path = self.path(container_id, ifname);
        let Some(b) = Self::read(&path)? else {
            return Ok(None);
        };
        if b.container_id != container_id || b.ifname != ifname {
            return Err(StateError::Corrupt {
                path,
                reason: format!(
                    "it is the backup of container {:?} interface {:?}, not of this attachment",
                    b.container_id, b.ifname
                ),
            });
        }
        Ok(Some(b))
    }

    /// Reads and checks one file; never follows a link, never blocks.
    fn read(path: &Path) -> Result<Option<Backup>, StateError> {
        let corrupt = |reason: String| StateError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let (bytes, meta) = match fsutil::read_regular(path, Links::Refuse, MAX_BACKUP_BYTES) {
            Ok(r) => r,
            Err(SafeFileError::Missing(_)) => return Ok(None),
            Err(SafeFileError::Io { source, .. }) => return Err(io_err("reading", path)(source)),
            Err(e) => return Err(corrupt(e.to_string())),
        };
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(corrupt(format!(
                "it is owned by uid {}, not by uid {me} that writes backups",
                meta.uid()
            )));
        }
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(corrupt(format!(
                "its mode {:o} lets others write it",
                meta.permissions().mode() & 0o777
            )));
        }
        let b: Backup = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        b.check().map_err(corrupt)?;
        Ok(Some(b))
    }

    /// Writes a backup atomically with mode 0600.
    pub fn save(&self, b: &Backup) -> Result<(), StateError> {
        {
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(io_err("creating", &self.dir))?;
        }
        let path = self.path(&b.container_id, &b.ifname);
        let body = serde_json::to_vec_pretty(b).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        fsutil::write_atomic(&path, &body, 0o600).map_err(io_err("writing", &path))
    }

    /// Removes one attachment's backup; `Ok(false)` when there was none.
    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<bool, StateError> {
        self.remove_path(&self.path(container_id, ifname))
    }

    /// Moves a corrupt backup aside to `<file>.corrupt` for the operator (a
    /// link is moved as a link; what it points to is never touched).
    pub fn quarantine(&self, container_id: &str, ifname: &str) -> Result<PathBuf, StateError> {
        let path = self.path(container_id, ifname);
        let aside = path.with_extension("json.corrupt");
        fs::rename(&path, &aside).map_err(io_err("moving aside", &path))?;
        Ok(aside)
    }

    /// Every backup in the directory, with its path; corrupt files are
    /// returned as errors in place so the caller can report each one.
    pub fn list(&self) -> Result<Vec<Listed>, StateError> {
        // The temporary files of ADDs killed mid-write go too.
        let swept = fsutil::remove_stale_temps(&self.dir);
        if swept > 0 {
            tracing::info!(dir = %self.dir.display(), files = swept, "removed temporary files of killed writers");
        }
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &self.dir))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match Self::read(&path) {
                Ok(Some(b)) => out.push((path, Ok(b))),
                Ok(None) => {} // removed meanwhile
                Err(e) => out.push((path, Err(e))),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes a file found by `list`; `Ok(false)` when it was already gone.
    pub fn remove_path(&self, path: &Path) -> Result<bool, StateError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("removing", path)(e)),
        }
    }
}

/// The largest backup file believed; a real one is a few hundred bytes.
const MAX_BACKUP_BYTES: u64 = 16 * 1024;

/// Container IDs up to this length appear in file names as they are.
const MAX_ID_IN_NAME: usize = 128;

/// The container ID's part of a file name: the ID itself, or for a long ID
/// `_` and 40 hex digits of its SHA-256 (a valid ID never starts with `_`).
fn file_stem(container_id: &str) -> String {
    if container_id.len() <= MAX_ID_IN_NAME {
        return container_id.to_string();
    }
    let digest = Sha256::digest(container_id.as_bytes());
    let hex: String = digest[..20].iter().map(|b| format!("{b:02x}")).collect();
    format!("_{hex}")
}

/// The MTUs Linux can carry: 68 (IPv4's minimum) to 65535.
const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

impl Backup {
    /// Whether the recorded values are MTUs at all.
    fn check(&self) -> Result<(), String> {
        let mtus = [Some(self.pod_mtu), self.host_mtu, Some(self.bound)];
        match mtus.into_iter().flatten().find(|m| !MTU_RANGE.contains(m)) {
            Some(m) => Err(format!("it records the MTU {m}, outside 68-65535")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(cid: &str) -> Backup {
        Backup {
            container_id: cid.into(),
            ifname: "eth0".into(),
            pod_mtu: 1480,
            host_ifname: Some("cali0123456789a".into()),
            host_mtu: Some(1480),
            bound: 1446,
        }
    }

    #[test]
    fn save_load_remove_round_trip_with_0600() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path().join("state"));
        assert_eq!(dir.load("c1", "eth0").expect("load"), None);
        dir.save(&backup("c1")).expect("save");
        let mode = fs::metadata(dir.path("c1", "eth0"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(dir.load("c1", "eth0").expect("load"), Some(backup("c1")));
        assert!(dir.remove("c1", "eth0").expect("remove"));
        assert!(!dir.remove("c1", "eth0").expect("second remove"));
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_default() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path());
        fs::write(dir.path("c1", "eth0"), b"{not json").expect("write");
        let err = dir.load("c1", "eth0").expect_err("corrupt");
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        let aside = dir.quarantine("c1", "eth0").expect("quarantine");
        assert!(aside.exists());
        assert_eq!(dir.load("c1", "eth0").expect("gone"), None);
    }

    #[test]
    fn list_reports_each_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path());
        dir.save(&backup("a")).expect("save");
        dir.save(&backup("b")).expect("save");
        fs::write(tmp.path().join("junk_eth0.json"), b"[]").expect("write");
        // An ADD killed between writing its temporary file and the rename.
        let killed = tmp
            .path()
            .join(format!(".a_eth0.json.{}.0.00000001.tmp", 1u32 << 30));
        fs::write(&killed, b"{").expect("write");
        let all = dir.list().expect("list");
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().filter(|(_, r)| r.is_ok()).count(), 2);
        assert!(!killed.exists(), "GC's listing sweeps dead writers' files");
    }

    #[test]
    fn a_linked_or_foreign_backup_is_never_believed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path().join("state"));
        dir.save(&backup("other")).expect("save");
        // A link to a well-formed backup that claims pod_mtu 9000.
        let mut forged = backup("c1");
        forged.pod_mtu = 9000;
        let outside = tmp.path().join("forged.json");
        fs::write(&outside, serde_json::to_vec(&forged).expect("json")).expect("write");
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).expect("chmod");
        std::os::unix::fs::symlink(&outside, dir.path("c1", "eth0")).expect("link");
        let err = dir.load("c1", "eth0").expect_err("a link");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        let aside = dir.quarantine("c1", "eth0").expect("aside");
        assert!(fs::symlink_metadata(&aside)
            .expect("lstat")
            .file_type()
            .is_symlink());
        assert!(outside.exists(), "the link's target is untouched");
        // Another attachment's backup copied under this name.
        fs::copy(dir.path("other", "eth0"), dir.path("c2", "eth0")).expect("copy");
        let err = dir.load("c2", "eth0").expect_err("foreign");
        assert!(err.to_string().contains("not of this attachment"), "{err}");
        // A backup others may write.
        dir.save(&backup("c3")).expect("save");
        fs::set_permissions(dir.path("c3", "eth0"), fs::Permissions::from_mode(0o622))
            .expect("chmod");
        assert!(matches!(
            dir.load("c3", "eth0"),
            Err(StateError::Corrupt { .. })
        ));
        // An MTU no link can have.
        let mut silly = backup("c4");
        silly.pod_mtu = 1_000_000;
        dir.save(&silly).expect("save");
        assert!(matches!(
            dir.load("c4", "eth0"),
            Err(StateError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_250_character_container_id_round_trips_with_a_short_name() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = StateDir::new(tmp.path());
        let long = "a".repeat(250);
        let path = dir.path(&long, "eth0");
        let name_len = path.file_name().map_or(0, |n| n.len());
        assert!(name_len <= 60, "{name_len}");
        assert_ne!(dir.path(&format!("{long}b"), "eth0"), path);
        assert_eq!(dir.path("abc", "eth0"), tmp.path().join("abc_eth0.json"));
        dir.save(&backup(&long)).expect("save");
        assert_eq!(dir.load(&long, "eth0").expect("load"), Some(backup(&long)));
        assert_eq!(dir.list().expect("list").len(), 1);
        assert!(dir.remove(&long, "eth0").expect("remove"));
    }
}
