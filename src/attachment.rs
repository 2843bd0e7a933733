//! Per-attachment state: the MTUs a pod had before we lowered them.
//!
//! One file per (container ID, interface), `<state_dir>/<id>_<ifname>.json`,
//! mode 0600, written to a temporary file and renamed into place. ADD writes it
//! before changing anything; DEL restores from it and removes it; GC removes
//! the files of attachments the runtime no longer knows.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A state-directory failure, naming the path.
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
    #[error("state file {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        reason: String,
    },
}

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

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

impl StateDir {
    /// A state directory at `dir`; created on first write.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The backup file for one attachment.
    pub fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!("{container_id}_{ifname}.json"))
    }

    /// Reads one attachment's backup; `Ok(None)` when there is none.
    pub fn load(&self, container_id: &str, ifname: &str) -> Result<Option<Backup>, StateError> {
        let path = self.path(container_id, ifname);
        match fs::read(&path) {
            Ok(bytes) => Self::decode(&path, &bytes).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Backup, StateError> {
        serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Writes a backup atomically with mode 0600.
    pub fn save(&self, b: &Backup) -> Result<(), StateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err("creating", &self.dir))?;
        let path = self.path(&b.container_id, &b.ifname);
        let body = serde_json::to_vec_pretty(b).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &body).map_err(io_err("writing", &path))
    }

    /// Removes one attachment's backup; `Ok(false)` when there was none.
    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<bool, StateError> {
        self.remove_path(&self.path(container_id, ifname))
    }

    /// Moves a corrupt backup aside to `<file>.corrupt` for the operator.
    pub fn quarantine(&self, container_id: &str, ifname: &str) -> Result<PathBuf, StateError> {
        let path = self.path(container_id, ifname);
        let aside = path.with_extension("json.corrupt");
        fs::rename(&path, &aside).map_err(io_err("moving aside", &path))?;
        Ok(aside)
    }

    /// Every backup in the directory, with its path; corrupt files are
    /// returned as errors in place so the caller can report each one.
    pub fn list(&self) -> Result<Vec<Listed>, StateError> {
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
            let parsed = fs::read(&path)
                .map_err(io_err("reading", &path))
                .and_then(|b| Self::decode(&path, &b));
            out.push((path, parsed));
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

/// Writes `body` to `path` with mode 0600: to a temporary file beside it,
/// synced, then renamed over `path`, so readers see the old or the new file.
pub fn write_atomic(path: &Path, body: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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
        let all = dir.list().expect("list");
        assert_eq!(all.len(), 3);
        assert_eq!(all.iter().filter(|(_, r)| r.is_ok()).count(), 2);
    }
}
