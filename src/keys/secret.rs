//! Epoch secrets, their sealing under the KEK, and per-SA key derivation.

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use zeroize::Zeroizing;

use super::crypto::{self, NONCE_LEN, TAG_LEN};
use super::{Kek, SaId};

/// Bytes of an epoch secret.
pub const EPOCH_SECRET_LEN: usize = 32;

/// Secret bytes: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    /// Wraps bytes, taking ownership so no copy is left behind.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The bytes, for the one place that hands them to the kernel or a cipher.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Why a sealed secret could not be opened or made.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The sealed value is not base64 of the right length.
    #[error("sealed secret of epoch {epoch} is malformed: {reason}")]
    Malformed {
        /// The epoch.
        epoch: u32,
        /// What is wrong with it.
        reason: String,
    },
    /// Authentication failed: a different KEK, or the value was altered or moved.
    #[error("sealed secret of epoch {epoch} does not open with this KEK (fingerprint {kek_fingerprint}): wrong KEK, or the value was altered")]
    WrongKey {
        /// The epoch.
        epoch: u32,
        /// The fingerprint of the KEK that was tried.
        kek_fingerprint: String,
    },
    /// The OS random source failed.
    #[error("the system random source failed: {0}")]
    Random(String),
}

/// Fills `buf` from the OS random source.
pub fn random(buf: &mut [u8]) -> Result<(), SealError> {
    crypto::random(buf).map_err(SealError::Random)
}

/// The 32-byte secret of one key epoch; per-SA keys derive from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochSecret(SecretBytes);

/// The 20-byte key of one SA (AES-128 key + 4-byte salt), for rfc4106(gcm(aes)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaKey(pub SecretBytes);

/// The associated data of a legacy (version 1) sealing: the epoch only.
fn aad_v1(epoch: u32) -> Vec<u8> {
    format!("calico-ipsec/v1/epoch/{epoch}").into_bytes()
}

/// What a version 2 sealing binds the secret to: everything that decides
/// how strong the epoch's SAs are, and the cluster. A record whose
/// parameters differ from those sealed does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealBinding<'a> {
    /// The epoch number.
    pub epoch: u32,
    /// The SA algorithm, as the record names it.
    pub algorithm: &'a str,
    /// The AES key size of its SAs.
    pub key_bits: u32,
    /// Its ICV length, when the record names one (else the config's).
    pub icv_bits: Option<u32>,
    /// Its key agreement, when it has one.
    pub agreement: Option<&'a str>,
    /// Calico's clusterGUID ("" when the cluster has none).
    pub cluster_guid: &'a str,
}

impl SealBinding<'_> {
    /// The associated data of a version 2 sealing: the label, then each
    /// field as a 4-byte big-endian length and its bytes (numbers as 4
    /// bytes big-endian; an absent ICV or agreement as an empty field).
    pub fn aad(&self) -> Vec<u8> {
        self.aad_labelled(b"calico-ipsec/v2/epoch-seal")
    }

    /// The associated data of a version 3 sealing: the same fields under
    /// another label, so that a version 3 record (whose keys also bind the
    /// receiver's incarnation) never opens as a version 2 one.
    pub fn aad_v3(&self) -> Vec<u8> {
        self.aad_labelled(b"calico-ipsec/v3/epoch-seal")
    }

    fn aad_labelled(&self, label: &[u8]) -> Vec<u8> {
        let mut out = label.to_vec();
        let icv = self.icv_bits.map(u32::to_be_bytes);
        let fields: [&[u8]; 6] = [
            &self.epoch.to_be_bytes(),
            self.algorithm.as_bytes(),
            &self.key_bits.to_be_bytes(),
            icv.as_ref().map_or(&[][..], |b| &b[..]),
            self.agreement.map_or(&[][..], str::as_bytes),
            self.cluster_guid.as_bytes(),
        ];
        for f in fields {
            let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }
}

/// What a sealing's associated data is made of.
#[derive(Debug, Clone, Copy)]
pub enum Aad<'a> {
    /// Version 1 (records sealed before the parameters were bound): the
    /// epoch number only.
    Legacy(u32),
    /// Version 2: [`SealBinding`].
    Bound(&'a SealBinding<'a>),
    /// Version 3: [`SealBinding`] under the version 3 label (the epoch's
    /// keys bind both ends' incarnations).
    BoundBothEnds(&'a SealBinding<'a>),
}

impl Aad<'_> {
    fn epoch(&self) -> u32 {
        match self {
            Aad::Legacy(e) => *e,
            Aad::Bound(b) | Aad::BoundBothEnds(b) => b.epoch,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Aad::Legacy(e) => aad_v1(*e),
            Aad::Bound(b) => b.aad(),
            Aad::BoundBothEnds(b) => b.aad_v3(),
        }
    }
}

impl EpochSecret {
    /// A fresh random secret.
    pub fn generate() -> Result<Self, SealError> {
        let mut b = Zeroizing::new(vec![0u8; EPOCH_SECRET_LEN]);
        random(&mut b)?;
        Ok(Self(SecretBytes(b)))
    }

    /// Wraps known bytes (tests, and unsealing).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(SecretBytes::new(bytes))
    }

    /// The raw bytes, for tests that re-derive keys independently.
    pub fn expose(&self) -> &[u8] {
        self.0.expose()
    }

    /// Seals under `kek` with AES-256-GCM, bound to the epoch and its
    /// parameters by the AAD (version 2), as base64(nonce || ciphertext || tag).
    pub fn seal_bound(&self, kek: &Kek, binding: &SealBinding<'_>) -> Result<String, SealError> {
        self.seal_with(kek, Aad::Bound(binding))
    }

    /// Seals as a legacy (version 1) record did, bound to `epoch` only
    /// (tests of the migration).
    pub fn seal(&self, kek: &Kek, epoch: u32) -> Result<String, SealError> {
        self.seal_with(kek, Aad::Legacy(epoch))
    }

    /// Seals under `kek` as [`EpochSecret::seal_bound`] does, with the
    /// version 3 associated data.
    pub fn seal_bound_v3(&self, kek: &Kek, binding: &SealBinding<'_>) -> Result<String, SealError> {
        self.seal_with(kek, Aad::BoundBothEnds(binding))
    }

    fn seal_with(&self, kek: &Kek, aad: Aad<'_>) -> Result<String, SealError> {
        let epoch = aad.epoch();
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let sealed = crypto::seal_aes256gcm(kek.expose(), &nonce, &aad.bytes(), self.0.expose())
            .ok_or_else(|| SealError::Malformed {
                epoch,
                reason: "the KEK is not a 256-bit key".into(),
            })?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(B64.encode(out))
    }

    /// Opens a legacy value made by [`EpochSecret::seal`] for the same `epoch`.
    pub fn unseal(kek: &Kek, epoch: u32, sealed: &str) -> Result<Self, SealError> {
        Self::unseal_with(kek, Aad::Legacy(epoch), sealed)
    }

    /// Opens a sealed value with the associated data it must have been made
    /// with; a different KEK, epoch or (version 2) parameter fails.
    pub fn unseal_with(kek: &Kek, aad: Aad<'_>, sealed: &str) -> Result<Self, SealError> {
        let epoch = aad.epoch();
        let raw = B64
            .decode(sealed.trim())
            .map_err(|e| SealError::Malformed {
                epoch,
                reason: format!("not base64: {e}"),
            })?;
        if raw.len() != NONCE_LEN + EPOCH_SECRET_LEN + TAG_LEN {
            return Err(SealError::Malformed {
                epoch,
                reason: format!(
                    "{} bytes, expected {}",
                    raw.len(),
                    NONCE_LEN + EPOCH_SECRET_LEN + TAG_LEN
                ),
            });
        }
        let (nonce_bytes, ct) = raw.split_at(NONCE_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(nonce_bytes);
        let buf =
            crypto::open_aes256gcm(kek.expose(), &nonce, &aad.bytes(), ct).ok_or_else(|| {
                SealError::WrongKey {
                    epoch,
                    kek_fingerprint: kek.fingerprint(),
                }
            })?;
        Ok(Self(SecretBytes(buf)))
    }

    /// The key of one SA; see the module docs for the exact derivation.
    pub fn derive(&self, cluster_guid: &str, id: &SaId<'_>) -> Option<SaKey> {
        let info = id.info()?;
        let mut okm = Zeroizing::new(vec![0u8; super::sa_key_len(id.key_bits)?]);
        // 20 or 36 bytes: far below HKDF-SHA256's limit of 255 * 32.
        crypto::hkdf_sha256(
            Some(cluster_guid.as_bytes()),
            self.0.expose(),
            &info,
            &mut okm,
        )?;
        Some(SaKey(SecretBytes(okm)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(b: u8) -> Kek {
        Kek::from_bytes(vec![b; 32]).expect("32 bytes")
    }

    #[test]
    fn seal_round_trip_and_wrong_kek() {
        let s = EpochSecret::generate().expect("random");
        let sealed = s.seal(&kek(1), 7).expect("seal");
        assert_eq!(EpochSecret::unseal(&kek(1), 7, &sealed).expect("unseal"), s);
        let err = EpochSecret::unseal(&kek(2), 7, &sealed).expect_err("wrong KEK");
        assert!(matches!(err, SealError::WrongKey { .. }), "{err}");
        // Bound to its epoch: moving it to another epoch's key fails.
        assert!(EpochSecret::unseal(&kek(1), 8, &sealed).is_err());
        // The sealed form does not contain the secret, raw or base64.
        assert!(!sealed.contains(&B64.encode(s.expose())));
        assert!(EpochSecret::unseal(&kek(1), 7, "!!!").is_err());
        assert!(EpochSecret::unseal(&kek(1), 7, "AAAA").is_err());
    }

    #[test]
    fn a_bound_seal_opens_only_with_the_parameters_it_was_made_for() {
        let s = EpochSecret::generate().expect("random");
        let b = SealBinding {
            epoch: 7,
            algorithm: "rfc4106(gcm(aes))",
            key_bits: 256,
            icv_bits: Some(128),
            agreement: Some("p256"),
            cluster_guid: "guid-1",
        };
        let sealed = s.seal_bound(&kek(1), &b).expect("seal");
        let open = |b: &SealBinding<'_>| EpochSecret::unseal_with(&kek(1), Aad::Bound(b), &sealed);
        assert_eq!(open(&b).expect("opens"), s);
        // Each downgrade an etcd writer without the KEK could try fails.
        for (what, altered) in [
            (
                "agreement stripped",
                SealBinding {
                    agreement: None,
                    ..b
                },
            ),
            ("AES-128", SealBinding { key_bits: 128, ..b }),
            (
                "64-bit ICV",
                SealBinding {
                    icv_bits: Some(64),
                    ..b
                },
            ),
            (
                "ICV left to the config",
                SealBinding {
                    icv_bits: None,
                    ..b
                },
            ),
            ("another epoch", SealBinding { epoch: 8, ..b }),
            (
                "another cluster",
                SealBinding {
                    cluster_guid: "guid-2",
                    ..b
                },
            ),
            (
                "another algorithm",
                SealBinding {
                    algorithm: "x",
                    ..b
                },
            ),
        ] {
            assert!(open(&altered).is_err(), "{what}");
        }
        // A version 3 sealing (keys that bind both ends) opens only as
        // version 3: neither version can pass for the other.
        let v3 = s.seal_bound_v3(&kek(1), &b).expect("seal v3");
        assert!(EpochSecret::unseal_with(&kek(1), Aad::BoundBothEnds(&b), &v3).is_ok());
        assert!(EpochSecret::unseal_with(&kek(1), Aad::Bound(&b), &v3).is_err());
        assert!(EpochSecret::unseal_with(&kek(1), Aad::BoundBothEnds(&b), &sealed).is_err());
        // Read as a legacy record (the version field stripped), it does not
        // open either: the AAD differs.
        assert!(EpochSecret::unseal(&kek(1), 7, &sealed).is_err());
        // Field boundaries count: moving bytes between fields changes the AAD.
        let a = SealBinding {
            algorithm: "ab",
            cluster_guid: "c",
            ..b
        }
        .aad();
        let c = SealBinding {
            algorithm: "a",
            cluster_guid: "bc",
            ..b
        }
        .aad();
        assert_ne!(a, c);
    }

    /// Sealings made by an independent implementation (Python's
    /// `cryptography`, `seal_aad` in tests/e2e/esp_decrypt.py): KEK 0x01 x 32,
    /// nonce 0x02 x 12, secret 0x03 x 32.
    #[test]
    fn bound_sealings_from_an_independent_implementation_open() {
        let full = SealBinding {
            epoch: 7,
            algorithm: "rfc4106(gcm(aes))",
            key_bits: 256,
            icv_bits: Some(128),
            agreement: Some("p256"),
            cluster_guid: "guid-1",
        };
        let bare = SealBinding {
            epoch: 3,
            algorithm: "rfc4106(gcm(aes))",
            key_bits: 128,
            icv_bits: None,
            agreement: None,
            cluster_guid: "",
        };
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(full.aad()),
            "63616c69636f2d69707365632f76322f65706f63682d7365616c000000040000000700000011726663343130362867636d28616573292900000004000001000000000400000080000000047032353600000006677569642d31"
        );
        assert_eq!(
            hex(bare.aad()),
            "63616c69636f2d69707365632f76322f65706f63682d7365616c000000040000000300000011726663343130362867636d2861657329290000000400000080000000000000000000000000"
        );
        for (b, sealed) in [
            (
                &full,
                "AgICAgICAgICAgICBNXKSklUwv7Qz7/LX6TBsaG20uzoso5y3oTj+Hv4d3zCpBaGwgFul1kLWNyur27Z",
            ),
            (
                &bare,
                "AgICAgICAgICAgICBNXKSklUwv7Qz7/LX6TBsaG20uzoso5y3oTj+Hv4d3wpsh/TaoR89v8p0D/7ggvr",
            ),
        ] {
            let s = EpochSecret::unseal_with(&kek(1), Aad::Bound(b), sealed).expect("opens");
            assert_eq!(s.expose(), &[3u8; 32][..]);
        }
    }

    #[test]
    fn debug_never_shows_bytes() {
        let s = EpochSecret::from_bytes(vec![0xAB; 32]);
        let k = s
            .derive(
                "guid",
                &SaId {
                    epoch: 1,
                    sender: "a",
                    incarnation: 0,
                    receiver: "b",
                    lane: 0,
                    key_bits: 128,
                    receiver_incarnation: None,
                },
            )
            .expect("derives");
        let text = format!("{s:?} {k:?} {:?}", kek(0xAB));
        assert!(
            !text.to_lowercase().contains("ab, ") && !text.contains("171"),
            "{text}"
        );
        assert!(text.contains("[redacted]"), "{text}");
    }

    /// Pinned vectors, computed independently with Python's hmac/hashlib
    /// (RFC 5869 HKDF written out by hand), so the derivation can never drift.
    #[test]
    fn derivation_test_vectors() {
        let secret = EpochSecret::from_bytes((0u8..32).collect());
        let guid = "5b0e2f9c8d4a4e61b7a39c2d1e0f4a66";
        let cases = [
            (
                1,
                "node-1",
                1,
                "node-2",
                "6c8acee79002ac48fa4d2c6a6c9b109b9fb3eacd",
            ),
            (
                1,
                "node-2",
                1,
                "node-1",
                "2c3c9537ef8da300144f570fc4540a2de677784c",
            ),
            (
                2,
                "node-1",
                1,
                "node-2",
                "3aa438fd686ec1c39193431e045b1ec88e7acfc2",
            ),
            (
                1,
                "node-1",
                2,
                "node-2",
                "58786d091a559156737dd0270f90fea07fda96ef",
            ),
        ];
        let cases = cases
            .map(|(e, s, i, r, w)| (e, s, i, r, 0, w))
            .into_iter()
            .chain([
                // Lanes 1 to 3 (IPv4 tunnel, IPv6 transport, IPv6 tunnel).
                (
                    1,
                    "node-1",
                    1,
                    "node-2",
                    1,
                    "8ddb5190e3362b5c504223f945512b0833705785",
                ),
                (
                    1,
                    "node-1",
                    1,
                    "node-2",
                    2,
                    "f64009fc36648f60eca01c60de5650c7594ff725",
                ),
                (
                    1,
                    "node-1",
                    1,
                    "node-2",
                    3,
                    "ea941b2dc0f9f835a3eae0629ca06e1fda8fda6d",
                ),
            ]);
        for (epoch, sender, incarnation, receiver, lane, want) in cases {
            let k = secret
                .derive(
                    guid,
                    &SaId {
                        epoch,
                        sender,
                        incarnation,
                        receiver,
                        lane,
                        key_bits: 128,
                        receiver_incarnation: None,
                    },
                )
                .expect("derives");
            let hex: String = k.0.expose().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                hex, want,
                "{epoch} {sender} {incarnation} {receiver} {lane}"
            );
        }
        // AES-256 epochs: 36 bytes (32 of key, 4 of salt), the info ending
        // in the lane and 0x20.
        let aes256 = [
            (
                1,
                "node-1",
                1,
                "node-2",
                0,
                "5908c2f11b59e063cd83c3fba7db482c576c75d9075aef638d194be8630e1e09ed178390",
            ),
            (
                1,
                "node-1",
                1,
                "node-2",
                1,
                "ee5f35705476d4169d7603054f319a49863eb9911c2453115b1fba9d8465e70a5f83d9b8",
            ),
            (
                2,
                "node-2",
                3,
                "node-1",
                3,
                "963a1724c4789cd13f5aa5399611655da8e85ca1de2ed4228b8323e98af2db1efbdc93e0",
            ),
        ];
        for (epoch, sender, incarnation, receiver, lane, want) in aes256 {
            let id = SaId {
                epoch,
                sender,
                incarnation,
                receiver,
                lane,
                key_bits: 256,
                receiver_incarnation: None,
            };
            let k = secret.derive(guid, &id).expect("derives");
            let hex: String = k.0.expose().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(
                hex, want,
                "AES-256 {epoch} {sender} {incarnation} {receiver} {lane}"
            );
        }
    }
}
