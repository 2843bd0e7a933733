//! The FIPS provider: AWS-LC's FIPS 140-3 validated module (aws-lc-fips-sys)
//! through aws-lc-rs. Built with `make fips` (the `fips` feature).

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use aws_lc_rs::agreement::{self, ParsedPublicKey, PrivateKey, UnparsedPublicKey, ECDH_P256};
use aws_lc_rs::encoding::AsBigEndian;
use aws_lc_rs::{digest, hkdf, hmac, rand};
use zeroize::Zeroizing;

use super::{NONCE_LEN, P256_PUBLIC_LEN};

/// The provider's name.
pub const NAME: &str = "AWS-LC FIPS 140-3 module (aws-lc-fips-sys, through aws-lc-rs)";

/// The TLS provider's name.
pub const TLS_NAME: &str = "rustls with AWS-LC's FIPS module";

/// rustls's FIPS provider: AWS-LC's module, FIPS-approved suites only.
pub fn tls_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::default_fips_provider()
}

/// The module's power-on self tests passed and it runs in FIPS mode.
pub fn self_test() -> Result<(), String> {
    aws_lc_rs::try_fips_mode()
        .map_err(|e| format!("the AWS-LC FIPS module is not in FIPS mode: {e}"))
}

pub fn random(buf: &mut [u8]) -> Result<(), String> {
    rand::fill(buf).map_err(|_| "the AWS-LC random source failed".to_string())
}

fn key(key: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key)
        .ok()
        .map(LessSafeKey::new)
}

pub fn seal_aes256gcm(
    k: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    plain: &[u8],
) -> Option<Vec<u8>> {
    let mut buf = plain.to_vec();
    key(k)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?;
    Some(buf)
}

pub fn open_aes256gcm(
    k: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Option<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(sealed.to_vec());
    let len = key(k)?
        .open_in_place(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            &mut buf[..],
        )
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

/// An output length for HKDF's expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info: &[u8], out: &mut [u8]) -> Option<()> {
    // An empty salt is HMAC's zero-padded key: the same as 32 zero bytes.
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info];
    prk.expand(&info, Len(out.len())).ok()?.fill(out).ok()
}

fn context(key: &[u8], parts: &[&[u8]]) -> hmac::Context {
    let mut c = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
    for p in parts {
        c.update(p);
    }
    c
}

pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(context(key, parts).sign().as_ref());
    out
}

pub fn hmac_sha256_verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let data: Vec<u8> = parts.concat();
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), &data, tag).is_ok()
}

pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut c = digest::Context::new(&digest::SHA256);
    for p in parts {
        c.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(c.finish().as_ref());
    out
}

pub fn p256_public_valid(public: &[u8]) -> bool {
    ParsedPublicKey::try_from(&UnparsedPublicKey::new(&ECDH_P256, public)).is_ok()
}

/// A P-256 private key inside AWS-LC (freed and cleansed by it on drop).
pub struct Private(PrivateKey);

impl Private {
    pub fn generate() -> Result<Self, String> {
        PrivateKey::generate(&ECDH_P256)
            .map(Self)
            .map_err(|_| "AWS-LC could not generate a P-256 key".to_string())
    }

    pub fn from_be_bytes(bytes: &[u8]) -> Option<Self> {
        PrivateKey::from_private_key(&ECDH_P256, bytes)
            .ok()
            .map(Self)
    }

    pub fn to_be_bytes(&self) -> Zeroizing<Vec<u8>> {
        let bin: Result<aws_lc_rs::encoding::EcPrivateKeyBin<'static>, _> = self.0.as_be_bytes();
        Zeroizing::new(bin.map(|b| b.as_ref().to_vec()).unwrap_or_default())
    }

    pub fn public(&self) -> [u8; P256_PUBLIC_LEN] {
        let mut out = [0u8; P256_PUBLIC_LEN];
        if let Ok(p) = self.0.compute_public_key() {
            if p.as_ref().len() == P256_PUBLIC_LEN {
                out.copy_from_slice(p.as_ref());
            }
        }
        out
    }

    pub fn agree(&self, peer: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        let peer = UnparsedPublicKey::new(&ECDH_P256, peer);
        agreement::agree(&self.0, peer, (), |z| {
            let mut out = Zeroizing::new([0u8; 32]);
            if z.len() != 32 {
                return Err(());
            }
            out.copy_from_slice(z);
            Ok(out)
        })
        .ok()
    }
}
