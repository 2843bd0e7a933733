//! Keeps our entry in Calico's conflist.
//!
//! calico-node's install-cni writes `10-calico.conflist` anew on every start
//! and upgrade (a new file renamed over the old one), which drops our entry:
//! pods created afterwards would start without the MTU clamp and without the
//! fail-closed gate. The agent watches the CNI config directory with inotify
//! and puts the entry back with the same edit `install` makes (our entry
//! directly after Calico's, Calico's etcd fields copied, every other byte
//! kept), written atomically (temp file in the same directory, rename). The
//! entry put back is the one last seen in the file, so an operator's settings
//! survive. A full check also runs every [`RECHECK`], in case an event was
//! lost. After `calico-ipsec uninstall` (which leaves
//! [`crate::install::uninstalled_marker`]) nothing is put back.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::{Map, Value};

use crate::install::conflist::{self, InstallOptions};
use crate::install::{self as inst, Edit, InstallError, InstallFileError};
use crate::metrics::Exposition;

/// How often the directory is checked even without an event.
pub const RECHECK: Duration = Duration::from_secs(10);

/// Why a check could not keep the entry in place.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The conflist could not be read or written.
    #[error(transparent)]
    File(#[from] InstallFileError),
    /// The conflist cannot take our entry (Calico's entry changed).
    #[error("{path}: {source}")]
    Conflist {
        /// The conflist.
        path: PathBuf,
        /// Why.
        #[source]
        source: InstallError,
    },
}

/// What one check found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Our entry is in place; nothing was written.
    Present,
    /// Our entry was missing (or out of date) and was written back.
    Repaired(PathBuf),
    /// `uninstall` ran: the entry is left out on purpose.
    Uninstalled,
    /// No conflist names Calico's plugin (yet): nothing to repair.
    NoCalico,
    /// The file changed while we edited it; the next event checks again.
    Raced,
}

/// Counters and the last problem, shared with `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct RepairStats {
    repairs: AtomicU64,
    failures: AtomicU64,
    problem: Mutex<Option<String>>,
}

impl RepairStats {
    /// How many times the entry was put back.
    pub fn repairs(&self) -> u64 {
        self.repairs.load(Ordering::Relaxed)
    }

    /// Why the entry is not in place, when the last check failed.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Appends the repair counters to an exposition.
    pub fn expose(&self, e: &mut Exposition) {
        e.counter(
            "calico_ipsec_conflist_repairs_total",
            "Times the agent put its entry back into Calico's conflist after it was rewritten",
            self.repairs() as f64,
        );
        e.counter(
            "calico_ipsec_conflist_repair_failures_total",
            "Checks of Calico's conflist that could not put the entry back",
            self.failures.load(Ordering::Relaxed) as f64,
        );
    }

    fn record(&self, r: &Result<Outcome, RepairError>) {
        let problem = match r {
            Ok(Outcome::Repaired(_)) => {
                self.repairs.fetch_add(1, Ordering::Relaxed);
                None
            }
            Ok(_) => None,
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                Some(e.to_string())
            }
        };
        let mut p = self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *p = problem;
    }
}

/// Checks one CNI config directory and puts our entry back when it is gone.
#[derive(Debug)]
pub struct Repairer {
    dir: PathBuf,
    remembered: Option<Map<String, Value>>,
}

impl Repairer {
    /// A repairer for `dir`, remembering no entry yet.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            remembered: None,
        }
    }

    /// Checks the directory once, writing the entry back if needed.
    pub fn check(&mut self) -> Result<Outcome, RepairError> {
        if inst::uninstalled_marker(&self.dir).exists() {
            return Ok(Outcome::Uninstalled);
        }
        let path = match inst::find_calico_conflist(&self.dir) {
            Ok(p) => p,
            Err(InstallFileError::NoCalicoConflist { .. }) => return Ok(Outcome::NoCalico),
            Err(e) => return Err(e.into()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| InstallFileError::Io {
            path: path.clone(),
            source,
        })?;
        let at = |source| RepairError::Conflist {
            path: path.clone(),
            source,
        };
        let opts = InstallOptions {
            kek_file: None,
            restore: self.remembered.clone(),
        };
        match inst::plan_install(&text, &opts).map_err(at)? {
            Edit::Unchanged => {
                self.remembered = conflist::our_entry(&text).map_err(at)?;
                Ok(Outcome::Present)
            }
            Edit::Changed(new) => {
                // `uninstall` leaves its mark before it edits: look again.
                if inst::uninstalled_marker(&self.dir).exists() {
                    return Ok(Outcome::Uninstalled);
                }
                if !inst::write_atomic_if_unchanged(&path, new.as_bytes(), text.as_bytes())? {
                    return Ok(Outcome::Raced);
                }
                self.remembered = conflist::our_entry(&new).map_err(at)?;
                Ok(Outcome::Repaired(path))
            }
        }
    }
}

/// Checks once, logging what was done and counting it.
fn check_logged(r: &mut Repairer, stats: &RepairStats, last_error: &mut Option<String>) {
    let result = r.check();
    stats.record(&result);
    match &result {
        Ok(Outcome::Repaired(path)) => tracing::warn!(
            conflist = %path.display(),
            repairs = stats.repairs(),
            "the conflist was rewritten without the calico-ipsec entry (calico-node's install-cni?); put the entry back"
        ),
        Ok(Outcome::Raced) => {
            tracing::debug!("the conflist changed while being repaired; checking again")
        }
        Ok(_) => {}
        Err(e) => {
            let msg = e.to_string();
            if last_error.as_deref() != Some(msg.as_str()) {
                tracing::error!(error = %msg, "cannot put the calico-ipsec entry back into Calico's conflist; pods created now start without it");
            }
            *last_error = Some(msg);
            return;
        }
    }
    if last_error.take().is_some() {
        tracing::info!("the calico-ipsec entry is in place again");
    }
}

/// Whether an event may concern a conflist (or the watch itself).
fn relevant(mask: AddWatchFlags, name: Option<&OsStr>) -> bool {
    let whole = AddWatchFlags::IN_Q_OVERFLOW
        | AddWatchFlags::IN_IGNORED
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    mask.intersects(whole)
        || name.is_some_and(|n| Path::new(n).extension() == Some(OsStr::new("conflist")))
        || name == Some(OsStr::new(crate::install::PLUGIN_TYPE))
}

/// Watches `dir` for ever on the calling thread, repairing as needed.
pub fn watch(dir: &Path, stats: &RepairStats) {
    let mut r = Repairer::new(dir);
    let mut last_error = None;
    let mut watch_error: Option<String> = None;
    loop {
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .and_then(|i| i.add_watch(dir, flags).map(|_| i));
        let ino = match ino {
            Ok(i) => i,
            Err(e) => {
                let msg = format!("cannot watch {}: {e}", dir.display());
                if watch_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "retrying every 5s; checking the conflist meanwhile");
                }
                watch_error = Some(msg);
                check_logged(&mut r, stats, &mut last_error);
                std::thread::sleep(Duration::from_secs(5));
                continue;
            }
        };
        if watch_error.take().is_some() {
            tracing::info!(dir = %dir.display(), "watching the CNI config directory");
        }
        // Whatever happened before the watch existed.
        check_logged(&mut r, stats, &mut last_error);
        'events: loop {
            let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(RECHECK.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, ms) {
                Ok(0) => check_logged(&mut r, stats, &mut last_error),
                Ok(_) => {
                    let events = match ino.read_events() {
                        Ok(ev) => ev,
                        Err(nix::errno::Errno::EAGAIN) => continue,
                        Err(e) => {
                            tracing::warn!(error = %e, "reading inotify events failed; watching again");
                            break 'events;
                        }
                    };
                    let gone = events.iter().any(|e| {
                        e.mask.intersects(
                            AddWatchFlags::IN_IGNORED
                                | AddWatchFlags::IN_DELETE_SELF
                                | AddWatchFlags::IN_MOVE_SELF,
                        )
                    });
                    if events.iter().any(|e| relevant(e.mask, e.name.as_deref())) {
                        check_logged(&mut r, stats, &mut last_error);
                    }
                    if gone {
                        break 'events;
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "polling inotify failed; watching again");
                    std::thread::sleep(Duration::from_secs(1));
                    break 'events;
                }
            }
        }
    }
}

/// Starts [`watch`] on its own thread.
pub fn spawn(dir: PathBuf, stats: std::sync::Arc<RepairStats>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("conflist-watch".into())
        .spawn(move || watch(&dir, &stats))
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALICO: &str = include_str!("../../tests/fixtures/calico/10-calico.conflist");

    #[test]
    fn a_rewritten_conflist_gets_the_remembered_entry_back_and_nothing_else_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("10-calico.conflist");
        let opts = InstallOptions {
            kek_file: Some("/custom/kek".into()),
            ..InstallOptions::default()
        };
        let Ok(Edit::Changed(installed)) = inst::plan_install(CALICO, &opts) else {
            panic!("install plans a change")
        };
        std::fs::write(&path, &installed).expect("write");
        let mut r = Repairer::new(dir.path());
        assert_eq!(r.check().expect("check"), Outcome::Present);
        // install-cni writes Calico's own file again.
        std::fs::write(&path, CALICO).expect("rewrite");
        assert_eq!(r.check().expect("check"), Outcome::Repaired(path.clone()));
        let repaired = std::fs::read_to_string(&path).expect("read");
        assert_eq!(repaired, installed, "the operator's kek_file is kept");
        assert_eq!(
            inst::plan_uninstall(&repaired).expect("plan"),
            Edit::Changed(CALICO.to_string()),
            "nothing but our entry was added"
        );
        assert_eq!(r.check().expect("check"), Outcome::Present, "idempotent");
        // After uninstall nothing is put back.
        std::fs::write(&path, CALICO).expect("rewrite");
        let marker = inst::uninstalled_marker(dir.path());
        std::fs::create_dir_all(marker.parent().expect("parent")).expect("mkdir");
        std::fs::write(&marker, "").expect("marker");
        assert_eq!(r.check().expect("check"), Outcome::Uninstalled);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), CALICO);
    }

    #[test]
    fn with_no_entry_ever_seen_the_entry_is_the_one_install_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("10-calico.conflist");
        std::fs::write(&path, CALICO).expect("write");
        let mut r = Repairer::new(dir.path());
        assert_eq!(r.check().expect("check"), Outcome::Repaired(path.clone()));
        let Ok(Edit::Changed(by_install)) = inst::plan_install(CALICO, &InstallOptions::default())
        else {
            panic!("install plans a change")
        };
        assert_eq!(std::fs::read_to_string(&path).expect("read"), by_install);
    }

    #[test]
    fn a_failure_is_reported_and_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("10-calico.conflist"), "{ half").expect("write");
        let stats = RepairStats::default();
        let mut last = None;
        check_logged(&mut Repairer::new(dir.path()), &stats, &mut last);
        assert!(stats
            .problem()
            .is_some_and(|p| p.contains("10-calico.conflist")));
        let mut e = Exposition::default();
        stats.expose(&mut e);
        assert!(e
            .finish()
            .contains("calico_ipsec_conflist_repair_failures_total 1\n"));
    }
}
