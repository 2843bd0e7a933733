//! Every userspace primitive the keys use, from one provider: RustCrypto by
//! default, or AWS-LC's FIPS 140-3 validated module through aws-lc-rs in
//! the `fips` build (`make fips`). The same test vectors pass on both.
//!
//! What goes through here: the random source, AES-256-GCM (sealing epoch
//! secrets), HKDF-SHA256 (every key derivation), HMAC-SHA256 (public-key
//! MACs), SHA-256 (KEK fingerprints), P-256 ECDH (key agreement), and the
//! TLS of every etcd and Kubernetes API connection (rustls, with ring in
//! the standard build and AWS-LC's FIPS module in the FIPS build). The
//! digests that only name or compare our own records and files (the
//! convergence record, attachment file names, the guard's mark) protect no
//! secret and use `sha2` in both builds.

use std::sync::Arc;

use zeroize::Zeroizing;

#[cfg(not(feature = "fips"))]
mod rustcrypto;
#[cfg(not(feature = "fips"))]
use rustcrypto as provider;

#[cfg(feature = "fips")]
mod awslc;
#[cfg(feature = "fips")]
use awslc as provider;

/// Bytes of an AES-256-GCM nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of an AES-256-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a SEC1 uncompressed P-256 point.
pub const P256_PUBLIC_LEN: usize = 65;

/// Which provider this binary was built with, for `status` and the logs.
pub const PROVIDER: &str = provider::NAME;

/// Whether this build is the FIPS build.
pub const FIPS_BUILD: bool = cfg!(feature = "fips");

/// Where the kernel says whether it runs in FIPS mode.
pub const KERNEL_FIPS: &str = "/proc/sys/crypto/fips_enabled";

/// The variable that lets the FIPS build run on a kernel not in FIPS mode.
pub const ALLOW_NON_FIPS_KERNEL: &str = "CALICO_IPSEC_ALLOW_NON_FIPS_KERNEL";

/// The TLS provider of every etcd and Kubernetes API connection: ring in
/// the standard build, AWS-LC's FIPS module in the FIPS build.
pub fn tls_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider::tls_provider())
}

/// Makes [`tls_provider`] the process's default, which tonic's etcd
/// channels take; run first in `main`. A second call changes nothing.
pub fn install_tls_provider() {
    // Err: one is installed already (this one: only `main` installs).
    let _ = rustls::crypto::CryptoProvider::install_default(provider::tls_provider());
}

/// Whether the process's TLS provider is this build's: in the FIPS build,
/// a connection must never fall back to a non-validated one.
fn tls_ready() -> Result<(), String> {
    let Some(p) = rustls::crypto::CryptoProvider::get_default() else {
        return Err("no TLS provider is installed (calico-ipsec's main installs it first)".into());
    };
    if FIPS_BUILD && !p.fips() {
        return Err("the TLS provider installed is not AWS-LC's FIPS module".into());
    }
    Ok(())
}

/// Whether the kernel runs in FIPS mode (`fips=1` on its command line).
pub fn kernel_fips() -> bool {
    std::fs::read_to_string(KERNEL_FIPS).is_ok_and(|s| s.trim() == "1")
}

/// One line for `status` and the logs: the build, its provider and the
/// kernel's mode.
pub fn describe() -> String {
    format!(
        "{} build, {}; TLS {}; kernel FIPS mode {}",
        if FIPS_BUILD { "FIPS" } else { "standard" },
        PROVIDER,
        provider::TLS_NAME,
        if kernel_fips() { "on" } else { "off" }
    )
}

/// Whether this process may handle keys: always in the standard build; in
/// the FIPS build only once the module passed its power-on self tests, its
/// TLS provider is installed as the process default, and
/// on a kernel in FIPS mode (the ESP data path is the kernel's) unless
/// `allow_non_fips_kernel` (or [`ALLOW_NON_FIPS_KERNEL`]=1) says otherwise.
pub fn ready(allow_non_fips_kernel: bool) -> Result<(), String> {
    if !FIPS_BUILD {
        return Ok(());
    }
    provider::self_test()?;
    tls_ready()?;
    let allowed =
        allow_non_fips_kernel || std::env::var(ALLOW_NON_FIPS_KERNEL).is_ok_and(|v| v == "1");
    if !kernel_fips() && !allowed {
        return Err(format!(
            "this is the FIPS build, but the kernel is not in FIPS mode ({KERNEL_FIPS} is not 1): boot it with fips=1, or allow it explicitly ({ALLOW_NON_FIPS_KERNEL}=1, or \"allow_non_fips_kernel\": true in the conflist entry)"
        ));
    }
    Ok(())
}

/// Fills `buf` from the provider's random source.
pub fn random(buf: &mut [u8]) -> Result<(), String> {
    provider::random(buf)
}

/// AES-256-GCM: `ciphertext || tag` of `plain` under `key` (32 bytes).
pub fn seal_aes256gcm(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plain: &[u8],
) -> Option<Vec<u8>> {
    provider::seal_aes256gcm(key, nonce, aad, plain)
}

/// AES-256-GCM: the plaintext of `ciphertext || tag`, `None` when it does
/// not authenticate.
pub fn open_aes256gcm(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    provider::open_aes256gcm(key, nonce, aad, sealed)
}

/// HKDF-SHA256 (RFC 5869) into `out`; `salt` `None` is the absent salt
/// (32 zero bytes). `None` when `out` is longer than 255 x 32 bytes.
pub fn hkdf_sha256(salt: Option<&[u8]>, ikm: &[u8], info: &[u8], out: &mut [u8]) -> Option<()> {
    provider::hkdf_sha256(salt.unwrap_or(&[]), ikm, info, out)
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    provider::hmac_sha256(key, parts)
}

/// Whether `tag` is the HMAC-SHA256 of `parts`, compared in constant time.
pub fn hmac_sha256_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    provider::hmac_sha256_verify(key, parts, tag)
}

/// SHA-256 over the concatenation of `parts`.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    provider::sha256(parts)
}

/// Whether `public` is a SEC1 uncompressed point on P-256.
pub fn p256_public_valid(public: &[u8]) -> bool {
    public.len() == P256_PUBLIC_LEN && provider::p256_public_valid(public)
}

/// A P-256 private key for ECDH; the scalar is zeroized on drop and never
/// formatted.
pub struct P256Private(provider::Private);

impl P256Private {
    /// A fresh key from the provider's random source.
    pub fn generate() -> Result<Self, String> {
        provider::Private::generate().map(Self)
    }

    /// The key of a 32-byte big-endian scalar; `None` when it is not one
    /// (zero, or not below the group order).
    pub fn from_be_bytes(bytes: &[u8]) -> Option<Self> {
        provider::Private::from_be_bytes(bytes).map(Self)
    }

    /// The scalar, 32 bytes big-endian.
    pub fn to_be_bytes(&self) -> Zeroizing<Vec<u8>> {
        self.0.to_be_bytes()
    }

    /// The public key, SEC1 uncompressed.
    pub fn public(&self) -> [u8; P256_PUBLIC_LEN] {
        self.0.public()
    }

    /// The ECDH x-coordinate with a peer's public key; `None` when it is not
    /// a point on P-256.
    pub fn agree(&self, peer: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        self.0.agree(peer)
    }
}

#[cfg(test)]
mod tests;
