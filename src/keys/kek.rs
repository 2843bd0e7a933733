//! The key-encryption key: a 32-byte file on each node, 0600, delivered from
//! a Kubernetes Secret. Epoch secrets are sealed under it before they reach
//! etcd. The file holds 64 hex characters (a trailing newline is fine).
//!
//! # Which KEK files are read
//!
//! kubelet mounts a Secret as links (`kek -> ..data/kek`, `..data ->
//! ..<timestamp>/`) and, with a pod `fsGroup`, makes the file root:fsGroup
//! and group-readable (`defaultMode: 0400` becomes 0440). So [`Kek::load`]
//! follows links to a regular file (never a FIFO, socket or device: it
//! opens without blocking and checks with `fstat`), of at most
//! [`MAX_KEK_FILE_BYTES`], owned by root or by the user reading it, with no
//! permission for others and no write permission for group: 0400, 0600,
//! 0440 and 0640 are read; 0444, 0644 and 0660 are refused.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::fsutil::{self, Links, SafeFileError};

use zeroize::Zeroizing;

use super::secret::{random, SecretBytes};

/// Bytes of the KEK (AES-256).
pub const KEK_LEN: usize = 32;
/// The largest KEK file read: 64 hex characters and some whitespace.
pub const MAX_KEK_FILE_BYTES: u64 = 256;

/// Why the KEK could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The file is missing.
    #[error("KEK file {0} does not exist; create it with `calico-ipsec keys init` or mount the KEK Secret there")]
    Missing(PathBuf),
    /// Reading or writing failed.
    #[error("KEK file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The process may not open the file (not its owner, not in its group).
    #[error("KEK file {path}: permission denied to uid {uid} (groups {groups}); run as its owner or root, or in its group (a pod's fsGroup)")]
    Denied {
        /// The file.
        path: PathBuf,
        /// Our effective uid.
        uid: u32,
        /// Our groups.
        groups: String,
    },
    /// The path is not a regular file (a FIFO, a socket, a device, a directory).
    #[error("KEK file {path} is a {kind}, not a regular file; point kek_file at the file holding the KEK (a link to it, as kubelet mounts Secrets, is fine)")]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The file is far larger than a KEK.
    #[error(
        "KEK file {path} is {size} bytes; a KEK file holds 64 hex characters, so this is not a KEK"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file belongs to a user other than root or us.
    #[error("KEK file {path} is owned by uid {owner}; it must be owned by root or by uid {uid} that reads it (chown root)")]
    Owner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        uid: u32,
    },
    /// Others may read it, or group or others may write it.
    #[error("KEK file {path} has mode {mode:04o}: {why}; use 0400 or 0600 (0440 is fine: kubelet makes a Secret's 0400 that with a pod fsGroup)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// What the mode allows that it must not.
        why: &'static str,
    },
    /// The content is not 64 hex characters.
    #[error("KEK file {0} must hold exactly 64 hex characters (32 bytes)")]
    Malformed(PathBuf),
    /// `keys init` would overwrite an existing KEK.
    #[error("KEK file {0} already exists; refusing to overwrite it (the sealed epochs in etcd depend on it)")]
    Exists(PathBuf),
    /// The random source failed.
    #[error("generating a KEK: {0}")]
    Random(String),
}

/// The key-encryption key. Zeroized on drop, never printed.
#[derive(Clone)]
pub struct Kek(SecretBytes);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek([redacted], fingerprint {})", self.fingerprint())
    }
}

impl Kek {
    /// Wraps 32 bytes; `None` for any other length.
    pub fn from_bytes(bytes: Vec<u8>) -> Option<Self> {
        (bytes.len() == KEK_LEN).then(|| Self(SecretBytes::new(bytes)))
    }

    /// A fresh random KEK.
    pub fn generate() -> Result<Self, KekError> {
        let mut b = vec![0u8; KEK_LEN];
        random(&mut b).map_err(|e| KekError::Random(e.to_string()))?;
        Ok(Self(SecretBytes::new(b)))
    }

    /// The raw key, for the cipher.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    /// A public identifier of this KEK: the first 16 hex digits of
    /// SHA-256("calico-ipsec/v1/kek-fingerprint" || KEK). Safe to store and show.
    pub fn fingerprint(&self) -> String {
        super::crypto::sha256(&[b"calico-ipsec/v1/kek-fingerprint", self.expose()])[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Reads the KEK file under the rule in the module documentation.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let file_err = |e: SafeFileError| match e {
            SafeFileError::Missing(p) => KekError::Missing(p),
            SafeFileError::NotRegular { path, kind } => KekError::NotRegular { path, kind },
            SafeFileError::TooLarge { path, size, .. } => KekError::TooLarge { path, size },
            SafeFileError::Io { path, source }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                KekError::Denied {
                    path,
                    uid: nix::unistd::geteuid().as_raw(),
                    groups: our_groups(),
                }
            }
            SafeFileError::Io { path, source } => KekError::Io { path, source },
            SafeFileError::Symlink(p) => KekError::NotRegular {
                path: p,
                kind: "symbolic link",
            },
        };
        let (file, meta) = fsutil::open_regular(path, Links::Follow).map_err(file_err)?;
        check_owner_and_mode(path, meta.uid(), meta.permissions().mode())?;
        let text = Zeroizing::new(
            fsutil::read_bounded(file, &meta, path, MAX_KEK_FILE_BYTES).map_err(file_err)?,
        );
        Self::from_hex(path, text.trim_ascii())
    }

    fn from_hex(path: &Path, hex: &[u8]) -> Result<Self, KekError> {
        let mut bytes = super::secret_from_hex(hex, KEK_LEN)
            .ok_or_else(|| KekError::Malformed(path.to_path_buf()))?;
        Ok(Self(SecretBytes::new(std::mem::take(&mut *bytes))))
    }

    /// The file form: 64 lower-case hex characters and a newline.
    pub fn to_hex_line(&self) -> Zeroizing<String> {
        let mut hex = super::secret_hex(self.expose(), 1);
        hex.push('\n');
        hex
    }

    /// Writes this KEK to a new file with mode 0600; never overwrites.
    pub fn write_new(&self, path: &Path) -> Result<(), KekError> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|source| KekError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    KekError::Exists(path.to_path_buf())
                } else {
                    KekError::Io {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
        let hex = self.to_hex_line();
        f.write_all(hex.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|source| KekError::Io {
                path: path.to_path_buf(),
                source,
            })
    }
}

/// The owner and mode rule: owned by root or by us; nothing for others, no
/// write for group.
fn check_owner_and_mode(path: &Path, owner: u32, mode: u32) -> Result<(), KekError> {
    let uid = nix::unistd::geteuid().as_raw();
    if owner != 0 && owner != uid {
        return Err(KekError::Owner {
            path: path.to_path_buf(),
            owner,
            uid,
        });
    }
    let why = if mode & 0o007 != 0 {
        "others have access to it"
    } else if mode & 0o020 != 0 {
        "its group can write it"
    } else {
        return Ok(());
    };
    Err(KekError::Permissions {
        path: path.to_path_buf(),
        mode: mode & 0o7777,
        why,
    })
}

fn our_groups() -> String {
    let mut gids = vec![nix::unistd::getegid().as_raw()];
    gids.extend(
        nix::unistd::getgroups()
            .unwrap_or_default()
            .iter()
            .map(|g| g.as_raw()),
    );
    gids.sort_unstable();
    gids.dedup();
    gids.iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_load_round_trips_with_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/kek");
        let k = Kek::generate().expect("random");
        k.write_new(&path).expect("write");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Kek::load(&path).expect("load");
        assert_eq!(back.expose(), k.expose());
        assert!(matches!(
            Kek::generate().expect("random").write_new(&path),
            Err(KekError::Exists(_))
        ));
        assert_eq!(Kek::load(&path).expect("unchanged").expose(), k.expose());
    }

    #[test]
    fn reads_owner_and_group_readable_modes_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kek");
        fs::write(&path, "00".repeat(32)).expect("write");
        for (mode, ok) in [
            (0o400, true),
            (0o600, true),
            (0o440, true),
            (0o640, true),
            (0o444, false),
            (0o644, false),
            (0o660, false),
            (0o604, false),
        ] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
            match Kek::load(&path) {
                Ok(_) => assert!(ok, "mode {mode:o} was read"),
                Err(e @ KekError::Permissions { .. }) => {
                    assert!(!ok, "mode {mode:o} refused: {e}");
                    assert!(e.to_string().contains("0400"), "says what to use: {e}");
                }
                Err(e) => panic!("mode {mode:o}: {e}"),
            }
        }
        let err = check_owner_and_mode(&path, 4242, 0o400).expect_err("foreign owner");
        assert!(err.to_string().contains("chown"), "{err}");
    }

    #[test]
    fn refuses_malformed_oversized_and_special_files_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kek");
        fs::write(&path, "zz".repeat(32)).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(Kek::load(&path), Err(KekError::Malformed(_))));
        fs::write(&path, "00".repeat(31)).expect("write");
        assert!(matches!(Kek::load(&path), Err(KekError::Malformed(_))));
        fs::write(&path, "00".repeat(4096)).expect("write");
        assert!(matches!(Kek::load(&path), Err(KekError::TooLarge { .. })));
        assert!(matches!(
            Kek::load(&dir.path().join("none")),
            Err(KekError::Missing(_))
        ));
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let started = std::time::Instant::now();
        let err = Kek::load(&fifo).expect_err("a FIFO");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(
            err.to_string().contains("is a FIFO, not a regular file"),
            "{err}"
        );
        assert!(matches!(
            Kek::load(dir.path()),
            Err(KekError::NotRegular { .. })
        ));
    }

    #[test]
    fn fingerprint_is_stable_and_not_the_key() {
        let k = Kek::from_bytes(vec![7; 32]).expect("32");
        assert_eq!(k.fingerprint().len(), 16);
        assert_eq!(
            k.fingerprint(),
            Kek::from_bytes(vec![7; 32]).expect("32").fingerprint()
        );
        assert_ne!(
            k.fingerprint(),
            Kek::from_bytes(vec![8; 32]).expect("32").fingerprint()
        );
        assert!(!format!("{k:?}").contains("0707"));
    }
}
