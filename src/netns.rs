//! Running code inside another network namespace, safely.
//!
//! `with` opens the namespace file on the caller's thread, then runs the
//! closure on a fresh OS thread that `setns`es into it and exits when the
//! closure returns. No thread ever has to switch back, so an early return or a
//! panic inside the closure can never leave a thread in the wrong namespace.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Why the namespace could not be entered.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file does not exist (the pod sandbox is gone).
    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),
    /// The namespace file exists but could not be opened.
    #[error("opening network namespace {path}: {source}")]
    Open {
        /// The namespace path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `setns` refused the file (not a network namespace, or no privilege).
    #[error("entering network namespace {path}: {source}")]
    Enter {
        /// The namespace path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: nix::Error,
    },
    /// The worker thread could not be started or died.
    #[error("namespace worker thread for {0} failed")]
    Thread(PathBuf),
}

/// Runs `f` with the network namespace at `path` and returns its result.
pub fn with<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let file = File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            NetnsError::NotFound(path.to_path_buf())
        } else {
            NetnsError::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    std::thread::scope(|s| {
        let worker = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(f())
            })
            .map_err(|_| NetnsError::Thread(path.to_path_buf()))?;
        worker
            .join()
            .map_err(|_| NetnsError::Thread(path.to_path_buf()))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_not_found() {
        let err = with(Path::new("/nonexistent/netns/x"), || ()).expect_err("missing");
        assert!(matches!(err, NetnsError::NotFound(_)), "{err}");
    }

    #[test]
    fn a_regular_file_is_refused_by_setns() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        let err = with(f.path(), || ()).expect_err("not a namespace");
        assert!(matches!(err, NetnsError::Enter { .. }), "{err}");
    }
}
