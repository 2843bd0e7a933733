//! Per-node, per-epoch key agreement on P-256 (issue 14).
//!
//! For every epoch it installs, each node holds an ephemeral P-256 key pair.
//! The private half lives in memory and in a 0600 file on tmpfs
//! ([`KeyStore`], under `/run`); the public half goes to etcd with a MAC
//! keyed from the epoch secret, so that someone who can write etcd but has
//! no KEK cannot substitute a key. The SA key mixes the epoch secret with
//! the ECDH of the sender's and the receiver's epoch keys:
//!
//! ```text
//! z    = x-coordinate of ECDH(sender's epoch key, receiver's epoch key), 32 bytes
//! okm  = HKDF-SHA256(IKM = epoch secret || z, salt = clusterGUID,
//!                    info = the SA info (keys module) || P_sender || P_receiver, L)
//! mac  = HMAC-SHA256(K_mac, u16be(len(node)) || node || P_node)
//! K_mac = HKDF-SHA256(IKM = epoch secret, salt = clusterGUID,
//!                     info = "calico-ipsec/v1/pubkey-mac" || u32be(epoch), 32)
//! ```
//! where `P_*` are SEC1 uncompressed points (65 bytes). Whoever holds one
//! node's files learns the epoch secret and that node's private keys, so
//! the keys of that node's pairs and of no other pair; once an epoch is
//! deleted and every node has removed its private key, nothing that
//! remains opens a capture of that epoch.

use super::crypto::{self, P256Private};
use zeroize::Zeroizing;

use super::{EpochSecret, SaId, SaKey, SecretBytes};

/// The length of a SEC1 uncompressed P-256 point.
pub const PUBLIC_LEN: usize = 65;

/// The HKDF info label of the public-key MAC key.
const MAC_LABEL: &[u8] = b"calico-ipsec/v1/pubkey-mac";

/// The same for epochs sealed as version 3, whose keys belong to one
/// incarnation of a node.
const MAC_LABEL_V2: &[u8] = b"calico-ipsec/v2/pubkey-mac";

/// Why a key pair or a peer's public key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AgreementError {
    /// The system's random source failed.
    #[error("cannot draw random bytes for an epoch key pair: {0}")]
    Random(String),
    /// A peer's public key is not a point on P-256.
    #[error("the public key of {node} for epoch {epoch} is not a P-256 point")]
    BadPublic {
        /// The node it claims to be.
        node: String,
        /// The epoch.
        epoch: u32,
    },
}

/// This node's key pair for one epoch. The private scalar is zeroized on
/// drop (by the provider) and never formatted.
pub struct EpochKeyPair {
    secret: P256Private,
    public: [u8; PUBLIC_LEN],
}

impl std::fmt::Debug for EpochKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKeyPair")
            .field("public", &hex(&self.public))
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// Hex of public bytes (a public key, a file tag, test output).
fn hex(b: &[u8]) -> String {
    super::secret_hex(b, 0).to_string()
}

impl EpochKeyPair {
    /// A fresh pair from the provider's random source.
    pub fn generate() -> Result<Self, AgreementError> {
        P256Private::generate()
            .map(Self::from_secret)
            .map_err(AgreementError::Random)
    }

    fn from_secret(secret: P256Private) -> Self {
        let public = secret.public();
        Self { secret, public }
    }

    /// The pair of a known 32-byte private scalar; `None` when it is not one.
    pub fn from_private(bytes: &[u8]) -> Option<Self> {
        P256Private::from_be_bytes(bytes).map(Self::from_secret)
    }

    /// The public key, SEC1 uncompressed.
    pub fn public(&self) -> &[u8; PUBLIC_LEN] {
        &self.public
    }

    /// The private scalar (32 bytes, big-endian), for the key file only.
    pub fn private_bytes(&self) -> Zeroizing<Vec<u8>> {
        self.secret.to_be_bytes()
    }

    /// The ECDH x-coordinate with a peer's public key (which must be a point
    /// on P-256, else `None`): the same on both ends.
    pub fn shared(&self, peer: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        self.secret.agree(peer)
    }
}

/// Whose key a MAC vouches for: a node, and for an epoch sealed as version
/// 3 the incarnation the key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOwner<'a> {
    /// The node's name.
    pub node: &'a str,
    /// Its incarnation (version 3 epochs), or `None` (a key for the whole
    /// epoch, as earlier epochs have).
    pub incarnation: Option<u32>,
}

/// The MAC key for the public keys of `epoch` (the v2 label when the keys
/// belong to incarnations).
fn mac_key(
    secret: &EpochSecret,
    cluster_guid: &str,
    epoch: u32,
    per_incarnation: bool,
) -> Zeroizing<[u8; 32]> {
    let mut info = if per_incarnation {
        MAC_LABEL_V2.to_vec()
    } else {
        MAC_LABEL.to_vec()
    };
    info.extend_from_slice(&epoch.to_be_bytes());
    let mut k = Zeroizing::new([0u8; 32]);
    // 32 bytes: far below HKDF-SHA256's limit.
    let _ = crypto::hkdf_sha256(
        Some(cluster_guid.as_bytes()),
        secret.expose(),
        &info,
        &mut k[..],
    );
    k
}

/// The MAC's key and the bytes before the point: `u16be(len(node)) ||
/// node`, then `u32be(incarnation)` for a key of one incarnation; `None`
/// for a name longer than a node name may be.
fn mac_input(
    secret: &EpochSecret,
    cluster_guid: &str,
    epoch: u32,
    owner: KeyOwner<'_>,
) -> Option<(Zeroizing<[u8; 32]>, Vec<u8>)> {
    let len = u16::try_from(owner.node.len())
        .ok()
        .filter(|l| usize::from(*l) <= super::MAX_NAME_LEN)?;
    let mut head = len.to_be_bytes().to_vec();
    head.extend_from_slice(owner.node.as_bytes());
    if let Some(i) = owner.incarnation {
        head.extend_from_slice(&i.to_be_bytes());
    }
    let key = mac_key(secret, cluster_guid, epoch, owner.incarnation.is_some());
    Some((key, head))
}

/// The MAC a node publishes beside its public key for `epoch`; `None` for
/// a name longer than a node name may be.
pub fn pubkey_mac(
    secret: &EpochSecret,
    cluster_guid: &str,
    epoch: u32,
    owner: KeyOwner<'_>,
    public: &[u8],
) -> Option<[u8; 32]> {
    let (key, head) = mac_input(secret, cluster_guid, epoch, owner)?;
    Some(crypto::hmac_sha256(&key[..], &[&head, public]))
}

/// Whether `mac` authenticates `public` as `owner`'s key for `epoch`
/// (compared in constant time), and `public` is a point on P-256.
pub fn verify_pubkey(
    secret: &EpochSecret,
    cluster_guid: &str,
    epoch: u32,
    owner: KeyOwner<'_>,
    public: &[u8],
    mac: &[u8],
) -> bool {
    crypto::p256_public_valid(public)
        && mac_input(secret, cluster_guid, epoch, owner)
            .is_some_and(|(key, head)| crypto::hmac_sha256_verify(&key[..], &[&head, public], mac))
}

impl EpochSecret {
    /// The key of one SA of an epoch with key agreement: HKDF over the epoch
    /// secret and the ECDH `z` of the two nodes' epoch keys, with both
    /// public keys (sender's first) after the SA info.
    pub fn derive_agreed(
        &self,
        cluster_guid: &str,
        id: &SaId<'_>,
        z: &[u8; 32],
        sender_public: &[u8],
        receiver_public: &[u8],
    ) -> Option<SaKey> {
        if sender_public.len() != PUBLIC_LEN || receiver_public.len() != PUBLIC_LEN {
            return None;
        }
        let mut info = id.info()?;
        info.extend_from_slice(sender_public);
        info.extend_from_slice(receiver_public);
        let mut ikm = Zeroizing::new(Vec::with_capacity(64));
        ikm.extend_from_slice(self.expose());
        ikm.extend_from_slice(z);
        let mut okm = Zeroizing::new(vec![0u8; super::sa_key_len(id.key_bits)?]);
        crypto::hkdf_sha256(Some(cluster_guid.as_bytes()), &ikm, &info, &mut okm)?;
        Some(SaKey(SecretBytes::new(okm.to_vec())))
    }
}

/// The tag of one epoch's key file: 16 hex characters derived from its
/// secret, so that an epoch made later under the same number (after a
/// deletion) never meets an earlier one's file, and a KEK change (which
/// seals the same secret again) keeps it.
pub fn file_tag(secret: &EpochSecret, epoch: u32) -> String {
    let mut info = b"calico-ipsec/v1/agreement-file".to_vec();
    info.extend_from_slice(&epoch.to_be_bytes());
    let mut t = [0u8; 8];
    let _ = crypto::hkdf_sha256(None, secret.expose(), &info, &mut t);
    hex(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id<'a>(sender: &'a str, receiver: &'a str) -> SaId<'a> {
        SaId {
            epoch: 7,
            sender,
            incarnation: 2,
            receiver,
            lane: 0,
            key_bits: 128,
            receiver_incarnation: None,
        }
    }

    fn v1(node: &str) -> KeyOwner<'_> {
        KeyOwner {
            node,
            incarnation: None,
        }
    }

    fn pair(byte: u8) -> EpochKeyPair {
        EpochKeyPair::from_private(&[byte; 32]).expect("a valid scalar")
    }

    #[test]
    fn both_ends_agree_and_a_third_node_cannot() {
        let secret = EpochSecret::from_bytes(vec![0x11; 32]);
        let (a, b, c) = (pair(1), pair(2), pair(3));
        let z_ab = a.shared(b.public()).expect("point");
        let z_ba = b.shared(a.public()).expect("point");
        assert_eq!(*z_ab, *z_ba);
        let k_sender = secret
            .derive_agreed("guid", &id("a", "b"), &z_ab, a.public(), b.public())
            .expect("key");
        let k_receiver = secret
            .derive_agreed("guid", &id("a", "b"), &z_ba, a.public(), b.public())
            .expect("key");
        assert_eq!(k_sender.0.expose(), k_receiver.0.expose());
        // c holds the epoch secret and both public keys, but not a's or b's
        // private key: its own ECDH gives another key.
        let z_cb = c.shared(b.public()).expect("point");
        let k_c = secret
            .derive_agreed("guid", &id("a", "b"), &z_cb, a.public(), b.public())
            .expect("key");
        assert_ne!(k_c.0.expose(), k_sender.0.expose());
        // And the agreed key is never the epoch-only one.
        let legacy = secret.derive("guid", &id("a", "b")).expect("key");
        assert_ne!(legacy.0.expose(), k_sender.0.expose());
    }

    /// Computed by `tests/vectors/agreement.py` (Python's cryptography and
    /// hmac/hashlib, from the README's text), never by this code.
    #[test]
    fn vectors_from_an_independent_implementation() {
        let secret = EpochSecret::from_bytes(vec![0x11; 32]);
        let guid = "5e6d2c1a-0b7f-4c3e-9a21-7f3b2d9c8e01";
        let (a, b) = (pair(1), pair(2));
        assert_eq!(hex(a.public()), "046ff03b949241ce1dadd43519e6960e0a85b41a69a05c328103aa2bce1594ca163c4f753a55bf01dc53f6c0b0c7eee78b40c6ff7d25a96e2282b989cef71c144a");
        let z = a.shared(b.public()).expect("point");
        assert_eq!(
            hex(&z[..]),
            "eb459a6b30d70eb4c0ddcd34ea96ed59e8f8d1843c22dd895ab603aa13d9a81d"
        );
        // The lane suffix is part of the info the public keys follow
        // (docs/spec.md: AES-128 lanes 1-3 with agreement).
        for (bits, lane, want) in [
            (128, 0, "ae694764015ea6aa072428712a7696cff59eb7f5"),
            (128, 1, "584e87a40d7685b4dd4f6faa33faafc6fa924023"),
            (128, 2, "fedfff7b7636292478c25a1af085c297dcce3fe1"),
            (128, 3, "7bd815707f6794fc88a04ca2c8c2ded577928294"),
            (
                256,
                0,
                "7ef6e5f916ca9156e44477be925b92ade7d26158eae80ab913054f7837e3dc31eb1a5922",
            ),
        ] {
            let id = SaId {
                epoch: 7,
                sender: "node-1",
                incarnation: 2,
                receiver: "node-2",
                lane,
                key_bits: bits,
                receiver_incarnation: None,
            };
            let k = secret
                .derive_agreed(guid, &id, &z, a.public(), b.public())
                .expect("key");
            assert_eq!(hex(k.0.expose()), want, "AES-{bits} lane {lane}");
        }
        let mac = pubkey_mac(&secret, guid, 7, v1("node-1"), a.public()).expect("mac");
        assert_eq!(
            hex(&mac),
            "7326230af3bcfce0620c33d1330bc907a19967071e45a2f396b02b01e427bbff"
        );
    }

    /// Epochs sealed as version 3 (the v2 derivation): values printed by
    /// `tests/vectors/agreement.py --v2` (Python's `cryptography` and
    /// hmac/hashlib), from docs/spec.md alone.
    #[test]
    fn v2_vectors_from_an_independent_implementation() {
        let plain = EpochSecret::from_bytes((0u8..32).collect());
        let g = "5b0e2f9c8d4a4e61b7a39c2d1e0f4a66";
        for (bits, lane, rinc, want) in [
            (128, 0, 1, "2e5f1b152713071bb642c4888cd362b89ad07764"),
            (128, 1, 1, "923e66838761a5cac67125e2a821ba5edcff1e87"),
            (128, 0, 2, "cffc92e262c88b33de1c1d349edd85ef6d36087d"),
            (
                256,
                0,
                1,
                "7a1e59b157e80a7570807c240c477fedf9d1c26eebf2ab95c0ee85ac491646538d4253a4",
            ),
            (
                256,
                3,
                7,
                "b1b63f9db4f30abd4cfa85dab42e19c423c8fa682c948b25d44980419ee8cc6d373ec72b",
            ),
        ] {
            let id = SaId {
                epoch: 1,
                sender: "node-1",
                incarnation: 1,
                receiver: "node-2",
                lane,
                key_bits: bits,
                receiver_incarnation: Some(rinc),
            };
            let k = plain.derive(g, &id).expect("key");
            assert_eq!(
                hex(k.0.expose()),
                want,
                "AES-{bits} lane {lane} rinc {rinc}"
            );
        }
        let secret = EpochSecret::from_bytes(vec![0x11; 32]);
        let guid = "5e6d2c1a-0b7f-4c3e-9a21-7f3b2d9c8e01";
        let (a, b) = (pair(1), pair(2));
        let z = a.shared(b.public()).expect("ecdh");
        for (bits, want) in [
            (128, "72b328d9316eb2dc2284d5e8c92ea383c4a1f048"),
            (
                256,
                "c8c1112a567f24da9c1581d943740e53a546a0bfc63f4ac38686eedf35a55282334305d4",
            ),
        ] {
            let id = SaId {
                receiver_incarnation: Some(5),
                key_bits: bits,
                ..id("node-1", "node-2")
            };
            let k = secret
                .derive_agreed(guid, &id, &z, a.public(), b.public())
                .expect("key");
            assert_eq!(hex(k.0.expose()), want, "agreed AES-{bits}");
        }
        let owner = KeyOwner {
            node: "node-1",
            incarnation: Some(2),
        };
        let mac = pubkey_mac(&secret, guid, 7, owner, a.public()).expect("mac");
        assert_eq!(
            hex(&mac),
            "a8ffdf7bd0b06f6f8019c6a08c5eda429cb0dafc5cb628f6652d1eacdcf94f9d"
        );
        assert!(verify_pubkey(&secret, guid, 7, owner, a.public(), &mac));
        let next = KeyOwner {
            incarnation: Some(3),
            ..owner
        };
        assert!(
            !verify_pubkey(&secret, guid, 7, next, a.public(), &mac),
            "moved to another incarnation"
        );
        assert!(
            !verify_pubkey(&secret, guid, 7, v1("node-1"), a.public(), &mac),
            "read as a key for the whole epoch"
        );
    }

    #[test]
    fn a_public_key_that_is_not_a_point_is_refused() {
        let a = pair(1);
        let mut bad = *a.public();
        bad[64] ^= 1;
        assert!(a.shared(&bad).is_none());
        assert!(a.shared(&[4u8; 10]).is_none());
        let secret = EpochSecret::from_bytes(vec![0x11; 32]);
        let mac = pubkey_mac(&secret, "g", 7, v1("a"), &bad).expect("mac");
        assert!(
            !verify_pubkey(&secret, "g", 7, v1("a"), &bad, &mac),
            "not a point"
        );
    }

    #[test]
    fn the_mac_binds_the_key_to_its_node_epoch_and_secret() {
        let secret = EpochSecret::from_bytes(vec![0x11; 32]);
        let a = pair(1);
        let mac = pubkey_mac(&secret, "g", 7, v1("node-a"), a.public()).expect("mac");
        assert!(verify_pubkey(
            &secret,
            "g",
            7,
            v1("node-a"),
            a.public(),
            &mac
        ));
        assert!(
            !verify_pubkey(&secret, "g", 7, v1("node-b"), a.public(), &mac),
            "moved to another node"
        );
        assert!(
            !verify_pubkey(&secret, "g", 8, v1("node-a"), a.public(), &mac),
            "moved to another epoch"
        );
        let other = EpochSecret::from_bytes(vec![0x22; 32]);
        let forged = pubkey_mac(&other, "g", 7, v1("node-a"), pair(9).public()).expect("mac");
        assert!(
            !verify_pubkey(&secret, "g", 7, v1("node-a"), pair(9).public(), &forged),
            "a writer without the epoch secret cannot substitute a key"
        );
        assert!(!verify_pubkey(
            &secret,
            "g",
            7,
            v1("node-a"),
            a.public(),
            &mac[..31]
        ));
    }

    #[test]
    fn a_pair_is_never_formatted_and_file_tags_differ_per_secret() {
        let first = EpochKeyPair::generate().expect("generate");
        let again = EpochKeyPair::from_private(&first.private_bytes()).expect("parse");
        assert_eq!(
            first.public(),
            again.public(),
            "the same pair from its bytes"
        );
        assert!(
            EpochKeyPair::from_private(&[0u8; 32]).is_none(),
            "zero is no scalar"
        );
        assert!(!format!("{first:?}").contains(&hex(&first.private_bytes())));
        let s1 = EpochSecret::from_bytes(vec![1; 32]);
        assert_eq!(file_tag(&s1, 3).len(), 16);
        assert_ne!(
            file_tag(&s1, 3),
            file_tag(&EpochSecret::from_bytes(vec![2; 32]), 3)
        );
    }
}
