//! The default provider: RustCrypto's crates and the OS random source.

use aes_gcm::aead::{AeadInOut, KeyInit, Nonce};
use aes_gcm::Aes256Gcm;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{NONCE_LEN, P256_PUBLIC_LEN};

/// The provider's name.
pub const NAME: &str = "RustCrypto (aes-gcm, hkdf, hmac, sha2, p256; getrandom)";

/// The TLS provider's name.
pub const TLS_NAME: &str = "rustls with ring";

/// rustls's ring provider.
pub fn tls_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Nothing to test before use (the FIPS provider's module tests itself).
#[allow(dead_code)]
pub fn self_test() -> Result<(), String> {
    Ok(())
}

pub fn random(buf: &mut [u8]) -> Result<(), String> {
    getrandom::fill(buf).map_err(|e| e.to_string())
}

pub fn seal_aes256gcm(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plain: &[u8],
) -> Option<Vec<u8>> {
    let cipher = Aes256Gcm::new_from_slice(key).ok()?;
    let mut buf = plain.to_vec();
    cipher
        .encrypt_in_place(&Nonce::<Aes256Gcm>::from(*nonce), aad, &mut buf)
        .ok()?;
    Some(buf)
}

pub fn open_aes256gcm(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let cipher = Aes256Gcm::new_from_slice(key).ok()?;
    let mut buf = Zeroizing::new(sealed.to_vec());
    cipher
        .decrypt_in_place(&Nonce::<Aes256Gcm>::from(*nonce), aad, &mut *buf)
        .ok()?;
    Some(buf)
}

pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Option<()> {
    let salt = (!salt.is_empty()).then_some(salt);
    Hkdf::<Sha256>::new(salt, ikm).expand(info, out).ok()
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: this cannot fail.
    let mut m = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    for p in parts {
        m.update(p);
    }
    m
}

pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    mac(key, parts).finalize().into_bytes().into()
}

pub fn hmac_sha256_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    mac(key, parts).verify_slice(tag).is_ok()
}

pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

pub fn p256_public_valid(public: &[u8]) -> bool {
    PublicKey::from_sec1_bytes(public).is_ok()
}

/// A P-256 scalar (zeroized on drop by `SecretKey`).
pub struct Private(SecretKey);

impl Private {
    pub fn generate() -> Result<Self, String> {
        loop {
            let mut b = Zeroizing::new([0u8; 32]);
            random(&mut b[..])?;
            // A value outside [1, n-1] (probability about 2^-32) is drawn again.
            if let Some(k) = Self::from_be_bytes(&b[..]) {
                return Ok(k);
            }
        }
    }

    pub fn from_be_bytes(bytes: &[u8]) -> Option<Self> {
        SecretKey::from_slice(bytes).ok().map(Self)
    }

    pub fn to_be_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.0.to_bytes().to_vec())
    }

    pub fn public(&self) -> [u8; P256_PUBLIC_LEN] {
        let point = self.0.public_key().to_encoded_point(false);
        let mut out = [0u8; P256_PUBLIC_LEN];
        out.copy_from_slice(point.as_bytes());
        out
    }

    pub fn agree(&self, peer: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        let peer = PublicKey::from_sec1_bytes(peer).ok()?;
        let shared = p256::ecdh::diffie_hellman(self.0.to_nonzero_scalar(), peer.as_affine());
        let mut z = Zeroizing::new([0u8; 32]);
        z.copy_from_slice(shared.raw_secret_bytes());
        Some(z)
    }
}
