//! The node-wide lock: kubelet runs ADDs concurrently, and the agent
//! converges too; one convergence at a time holds the node's state.

use std::fs::File;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::StateError;
use crate::fsutil;

/// An exclusive `flock` on `<state_dir>/node/lock` (a regular file; a link
/// there is refused, never followed), held until dropped.
pub struct NodeLock {
    _lock: Flock<File>,
}

impl NodeLock {
    /// Takes the lock in `dir` (created 0700), waiting at most `wait` for
    /// another holder to let go; [`StateError::LockTimeout`] after that.
    pub fn acquire(dir: &Path, wait: Duration) -> Result<Self, StateError> {
        fsutil::private_dir(dir)?;
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
                Err((_, e)) => {
                    return Err(StateError::Io {
                        op: "locking",
                        path,
                        source: io::Error::from(e),
                    })
                }
            }
            let waited = started.elapsed();
            if waited >= wait {
                return Err(StateError::LockTimeout { path, waited });
            }
            std::thread::sleep(pause.min(wait - waited));
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}
