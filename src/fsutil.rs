//! Files that a hostile or confused filesystem cannot turn against us.
//!
//! Every state file, lock, log and KEK goes through here:
//! - [`write_atomic`] writes a uniquely named temporary file created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` (a planted link or file at that name is never
//!   written through), syncs it, renames it over the target and syncs the
//!   directory;
//! - [`read_regular`] opens with `O_NONBLOCK` (a FIFO never blocks), and
//!   optionally `O_NOFOLLOW`, checks with `fstat` that what it opened is a
//!   regular file of bounded size, and only then reads it;
//! - [`open_lock`] and [`open_log`] refuse a symbolic link or a non-regular
//!   file at their path instead of following it.

use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether the last component of a path may be a symbolic link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Follow links (kubelet's Secret volumes are symlink farms).
    Follow,
    /// Refuse a link: state files are ours and never links.
    Refuse,
}

/// Why a file could not be opened or read safely.
#[derive(Debug, thiserror::Error)]
pub enum SafeFileError {
    /// Nothing at the path.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// The path is a symbolic link where none may be.
    #[error("{0} is a symbolic link; calico-ipsec does not follow links here (remove it)")]
    Symlink(PathBuf),
    /// The path is a FIFO, socket, device or directory.
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than such a file can legitimately be.
    #[error("{path} is {size} bytes, more than the {max} bytes such a file can hold")]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Another failure.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl SafeFileError {
    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Missing(p) | Self::Symlink(p) => p,
            Self::NotRegular { path, .. } | Self::TooLarge { path, .. } | Self::Io { path, .. } => {
                path
            }
        }
    }
}

/// A name for what a file type is, for messages.
pub fn kind_of(ft: fs::FileType) -> &'static str {
    if ft.is_file() {
        "regular file"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else {
        "special file"
    }
}

fn classify(path: &Path, links: Links, e: io::Error) -> SafeFileError {
    let path = path.to_path_buf();
    match e.raw_os_error() {
        Some(libc::ENOENT) => SafeFileError::Missing(path),
        // O_NOFOLLOW on a link fails with ELOOP.
        Some(libc::ELOOP) if links == Links::Refuse => SafeFileError::Symlink(path),
        // A FIFO opened for writing without blocking has no reader.
        Some(libc::ENXIO) => match fs::metadata(&path) {
            Ok(m) => SafeFileError::NotRegular {
                kind: kind_of(m.file_type()),
                path,
            },
            Err(_) => SafeFileError::Io { path, source: e },
        },
        _ => SafeFileError::Io { path, source: e },
    }
}

fn flags(links: Links) -> i32 {
    let base = libc::O_NONBLOCK | libc::O_CLOEXEC;
    match links {
        Links::Follow => base,
        Links::Refuse => base | libc::O_NOFOLLOW,
    }
}

/// Opens `path` for reading without blocking and checks that it is a
/// regular file; returns it with its `fstat`.
pub fn open_regular(path: &Path, links: Links) -> Result<(File, Metadata), SafeFileError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags(links))
        .open(path)
        .map_err(|e| classify(path, links, e))?;
    let meta = file.metadata().map_err(|source| SafeFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(SafeFileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    Ok((file, meta))
}

/// Reads a regular file of at most `max` bytes (see [`open_regular`]);
/// returns its bytes and its `fstat`.
pub fn read_regular(
    path: &Path,
    links: Links,
    max: u64,
) -> Result<(Vec<u8>, Metadata), SafeFileError> {
    let (file, meta) = open_regular(path, links)?;
    let bytes = read_bounded(file, &meta, path, max)?;
    Ok((bytes, meta))
}

/// Reads at most `max` bytes from a file opened by [`open_regular`]; a file
/// larger than that (now or while it is read) is refused.
pub fn read_bounded(
    file: File,
    meta: &Metadata,
    path: &Path,
    max: u64,
) -> Result<Vec<u8>, SafeFileError> {
    let too_large = |size| SafeFileError::TooLarge {
        path: path.to_path_buf(),
        size,
        max,
    };
    if meta.len() > max {
        return Err(too_large(meta.len()));
    }
    // One allocation of the final size, so a secret is not copied by a
    // growing buffer; one byte more detects a file that grew meanwhile.
    let cap = usize::try_from(meta.len().min(max).saturating_add(1)).unwrap_or(usize::MAX);
    let mut buf = Vec::with_capacity(cap);
    file.take(max.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(|source| SafeFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if buf.len() as u64 > max {
        return Err(too_large(buf.len() as u64));
    }
    Ok(buf)
}

/// Reads one of our state files: never through a link, regular files only.
/// `Ok(None)` when there is none.
pub fn read_state(path: &Path, max: u64) -> Result<Option<Vec<u8>>, SafeFileError> {
    match read_regular(path, Links::Refuse, max) {
        Ok((bytes, _)) => Ok(Some(bytes)),
        Err(SafeFileError::Missing(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A temporary name beside `path` that no other writer uses: pid, a
/// per-process counter and the clock, within NAME_MAX whatever `path`'s name.
fn temp_name(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut short: String = name.chars().take(100).collect();
    short.retain(|c| c != '/');
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut tmp = OsString::from(".");
    tmp.push(format!(
        "{short}.{}.{seq}.{nanos:08x}.tmp",
        std::process::id()
    ));
    path.with_file_name(tmp)
}

/// Removes the temporary files that writers killed between creating and
/// renaming them left in `dir` (names made by [`write_atomic`], of a process
/// that no longer runs); returns how many. Links are removed, never followed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let me = std::process::id();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(temp_writer) else {
            continue;
        };
        let alive = pid == me || Path::new("/proc").join(pid.to_string()).exists();
        if !alive && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The writer's pid in a name [`temp_name`] made: `.{name}.{pid}.{seq}.{nanos}.tmp`.
fn temp_writer(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let mut parts = rest.rsplitn(4, '.');
    let nanos = parts.next()?;
    let seq = parts.next()?;
    let pid = parts.next()?;
    parts.next()?;
    (u32::from_str_radix(nanos, 16).is_ok() && seq.parse::<u64>().is_ok())
        .then(|| pid.parse().ok())
        .flatten()
}

/// Syncs a directory, so a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?
        .sync_all()
}

/// Writes `body` to `path` with `mode`, atomically and durably: readers see
/// the old file or the new one, never a part, and never a file outside the
/// directory (the temporary file is created exclusively, links not followed).
pub fn write_atomic(path: &Path, body: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_owned(path, body, mode, None)
}

/// [`write_atomic`], giving the new file `owner` (uid, gid) when set; a
/// refusal to change the owner (not root) is ignored.
pub fn write_atomic_owned(
    path: &Path,
    body: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut last = None;
    // A name already taken (planted, or a crashed writer's) is skipped.
    for _ in 0..8 {
        let tmp = temp_name(path);
        let opened = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        let mut f = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let result = (|| {
            if let Some((uid, gid)) = owner {
                let _ = std::os::unix::fs::fchown(&f, Some(uid), Some(gid));
            }
            f.set_permissions(fs::Permissions::from_mode(mode))?;
            f.write_all(body)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        return sync_dir(dir);
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary name")))
}

/// Opens (creating, 0600) a lock file, never through a link and never
/// anything but a regular file.
pub fn open_lock(path: &Path) -> Result<File, SafeFileError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(flags(Links::Refuse))
        .open(path)
        .map_err(|e| classify(path, Links::Refuse, e))?;
    check_regular(path, file)
}

/// Opens (creating, 0640) a log file for appending, never through a link
/// and never anything but a regular file (a FIFO would block every request).
pub fn open_log(path: &Path) -> Result<File, SafeFileError> {
    let file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(flags(Links::Refuse))
        .open(path)
        .map_err(|e| classify(path, Links::Refuse, e))?;
    check_regular(path, file)
}

fn check_regular(path: &Path, file: File) -> Result<File, SafeFileError> {
    let meta = file.metadata().map_err(|source| SafeFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_file() {
        Ok(file)
    } else {
        Err(SafeFileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(meta.file_type()),
        })
    }
}

/// Creates `dir` (and its parents) 0700 when missing, and refuses it when it
/// is a link or not a directory.
pub fn private_dir(dir: &Path) -> Result<(), SafeFileError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| classify(dir, Links::Refuse, e))?;
    let meta = fs::symlink_metadata(dir).map_err(|e| classify(dir, Links::Refuse, e))?;
    if meta.file_type().is_symlink() {
        return Err(SafeFileError::Symlink(dir.to_path_buf()));
    }
    if !meta.is_dir() {
        return Err(SafeFileError::NotRegular {
            path: dir.to_path_buf(),
            kind: kind_of(meta.file_type()),
        });
    }
    Ok(())
}

/// Whether `path` names this process's standard output: `/dev/stdout`,
/// `/proc/self/fd/1` and the like, or any path to the same file as fd 1.
pub fn is_stdout(path: &Path) -> bool {
    let named = ["/dev/stdout", "/proc/self/fd/1", "/dev/fd/1"];
    if named.iter().any(|n| path == Path::new(n)) {
        return true;
    }
    let (Ok(target), Ok(out)) = (fs::metadata(path), fs::metadata("/proc/self/fd/1")) else {
        return false;
    };
    target.dev() == out.dev() && target.ino() == out.ino()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn write_atomic_never_writes_through_a_planted_link() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        fs::write(&outside, b"precious").expect("write");
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).expect("chmod");
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).expect("mkdir");
        let target = dir.join("c1_eth0.json");
        // Links at the old fixed temporary name and at the target itself.
        symlink(&outside, dir.join("c1_eth0.json.tmp")).expect("link");
        symlink(&outside, &target).expect("link");
        write_atomic(&target, b"{}", 0o600).expect("write");
        assert_eq!(fs::read(&outside).expect("read"), b"precious");
        let meta = fs::symlink_metadata(&target).expect("stat");
        assert!(
            meta.file_type().is_file(),
            "the link was replaced by a file"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&target).expect("read"), b"{}");
    }

    #[test]
    fn write_atomic_handles_a_name_at_name_max() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x".repeat(250));
        write_atomic(&path, b"1", 0o600).expect("write");
        assert_eq!(fs::read(&path).expect("read"), b"1");
        assert_eq!(
            fs::read_dir(tmp.path()).expect("ls").count(),
            1,
            "no leftovers"
        );
    }

    #[test]
    fn read_refuses_links_fifos_and_large_files_without_blocking() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let real = tmp.path().join("real");
        fs::write(&real, b"data").expect("write");
        let link = tmp.path().join("link");
        symlink(&real, &link).expect("link");
        assert!(matches!(
            read_regular(&link, Links::Refuse, 100),
            Err(SafeFileError::Symlink(_))
        ));
        assert_eq!(
            read_regular(&link, Links::Follow, 100).expect("follow").0,
            b"data"
        );
        let fifo = tmp.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let started = std::time::Instant::now();
        let err = read_regular(&fifo, Links::Follow, 100).expect_err("fifo");
        assert!(err.to_string().contains("FIFO"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(matches!(
            read_regular(&real, Links::Follow, 3),
            Err(SafeFileError::TooLarge { size: 4, .. })
        ));
        assert!(matches!(
            open_log(&fifo),
            Err(SafeFileError::NotRegular { .. })
        ));
        assert!(matches!(open_lock(&link), Err(SafeFileError::Symlink(_))));
        assert!(matches!(open_log(&link), Err(SafeFileError::Symlink(_))));
        assert_eq!(fs::read(&real).expect("read"), b"data", "untouched");
    }

    #[test]
    fn stdout_is_recognised_by_name_and_by_inode() {
        assert!(is_stdout(Path::new("/dev/stdout")));
        assert!(is_stdout(Path::new("/proc/self/fd/1")));
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(!is_stdout(&tmp.path().join("plugin.log")));
    }

    #[test]
    fn temporary_files_of_dead_writers_are_removed_and_no_others() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path();
        // A pid no process has (above the kernel's pid_max).
        let dead = format!(".ledger.{}.3.0badcafe.tmp", 1u32 << 30);
        let mine = format!(".ledger.{}.4.0badcafe.tmp", std::process::id());
        for n in [
            dead.as_str(),
            mine.as_str(),
            "ledger",
            ".ledger.x.tmp",
            "a.1.2.3.tmp",
        ] {
            fs::write(d.join(n), b"x").expect("write");
        }
        // A name of a dead writer that is a link: the link goes, not its target.
        let outside = d.join("outside");
        fs::write(&outside, b"keep").expect("write");
        let linked = format!(".guard.{}.1.00000001.tmp", 1u32 << 30);
        std::os::unix::fs::symlink(&outside, d.join(&linked)).expect("link");
        assert_eq!(remove_stale_temps(d), 2);
        assert!(!d.join(&dead).exists() && !d.join(&linked).exists());
        for kept in [
            mine.as_str(),
            "ledger",
            ".ledger.x.tmp",
            "a.1.2.3.tmp",
            "outside",
        ] {
            assert!(d.join(kept).exists(), "{kept} kept");
        }
        assert_eq!(remove_stale_temps(&d.join("missing")), 0);
    }
}
