//! The key-encryption key: a 32-byte file on each node, 0600, delivered from
//! a Kubernetes Secret. Epoch secrets are sealed under it before they reach
//! etcd. The file holds 64 hex characters (a trailing newline is fine).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::secret::{random, SecretBytes};

/// Bytes of the KEK (AES-256).
pub const KEK_LEN: usize = 32;

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
    /// The file can be read by others.
    #[error(
        "KEK file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
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
        let mut h = Sha256::new();
        h.update(b"calico-ipsec/v1/kek-fingerprint");
        h.update(self.expose());
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Reads the KEK file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let io_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                KekError::Missing(path.to_path_buf())
            } else {
                KekError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let meta = fs::metadata(path).map_err(io_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KekError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = Zeroizing::new(fs::read(path).map_err(io_err)?);
        let hex = text.trim_ascii();
        if hex.len() != KEK_LEN * 2 {
            return Err(KekError::Malformed(path.to_path_buf()));
        }
        let mut bytes = vec![0u8; KEK_LEN];
        for (i, pair) in hex.chunks(2).enumerate() {
            let hi = hex_val(pair[0]).ok_or_else(|| KekError::Malformed(path.to_path_buf()))?;
            let lo = hex_val(pair[1]).ok_or_else(|| KekError::Malformed(path.to_path_buf()))?;
            bytes[i] = hi << 4 | lo;
        }
        Ok(Self(SecretBytes::new(bytes)))
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
        let mut hex = Zeroizing::new(String::with_capacity(KEK_LEN * 2 + 1));
        for b in self.expose() {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 15)]));
        }
        hex.push('\n');
        f.write_all(hex.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|source| KekError::Io {
                path: path.to_path_buf(),
                source,
            })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
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
    fn refuses_readable_or_malformed_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kek");
        fs::write(&path, "00".repeat(32)).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Kek::load(&path),
            Err(KekError::Permissions { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(Kek::load(&path).is_ok());
        fs::write(&path, "zz".repeat(32)).expect("write");
        assert!(matches!(Kek::load(&path), Err(KekError::Malformed(_))));
        fs::write(&path, "00".repeat(31)).expect("write");
        assert!(matches!(Kek::load(&path), Err(KekError::Malformed(_))));
        assert!(matches!(
            Kek::load(&dir.path().join("none")),
            Err(KekError::Missing(_))
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
