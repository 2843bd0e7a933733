//! Tests of this node's side of key agreement.
use super::*;

fn record(secret: &EpochSecret, epoch: u32, node: &str, pair: &EpochKeyPair) -> PubkeyRecord {
    let owner = KeyOwner {
        node,
        incarnation: None,
    };
    let mac = pubkey_mac(secret, "guid", epoch, owner, pair.public()).expect("mac");
    PubkeyRecord {
        public: B64.encode(pair.public()),
        mac: B64.encode(mac),
    }
}

fn o(node: &str) -> PubkeyOwner {
    (node.to_string(), None)
}

#[test]
fn a_key_per_incarnation_verifies_only_for_that_incarnation() {
    let e = 0xffe0;
    let secret = EpochSecret::generate().expect("secret");
    let pair = EpochKeyPair::generate().expect("pair");
    let owner = KeyOwner {
        node: "node-2",
        incarnation: Some(3),
    };
    let mac = pubkey_mac(&secret, "guid", e, owner, pair.public()).expect("mac");
    let r = PubkeyRecord {
        public: B64.encode(pair.public()),
        mac: B64.encode(mac),
    };
    let tag = file_tag(&secret, e);
    let at = |inc: Option<u32>| ("node-2".to_string(), inc);
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &at(Some(3)), &r),
        Some(*pair.public())
    );
    // Moved to another incarnation, or read as a key for the whole
    // epoch: it does not verify.
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &at(Some(4)), &r),
        None
    );
    assert_eq!(check_pubkey(&secret, "guid", e, &tag, &at(None), &r), None);
    // And a key for the whole epoch does not verify as one incarnation's.
    let whole = record(&secret, e, "node-2", &pair);
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &at(Some(3)), &whole),
        None
    );
}

#[test]
fn a_verified_key_is_remembered_only_for_its_exact_record() {
    // Epoch numbers no other test uses: the cache is process-wide.
    let e = 0xfff0;
    let secret = EpochSecret::generate().expect("secret");
    let pair = EpochKeyPair::generate().expect("pair");
    let good = record(&secret, e, "node-2", &pair);
    let tag = file_tag(&secret, e);
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &o("node-2"), &good),
        Some(*pair.public())
    );
    // Served again from the cache.
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &o("node-2"), &good),
        Some(*pair.public())
    );
    // A record replaced by someone without the KEK: another key with a
    // MAC under another secret, and the same key with a MAC cut short.
    let other = EpochSecret::generate().expect("secret");
    let forged = record(
        &other,
        e,
        "node-2",
        &EpochKeyPair::generate().expect("pair"),
    );
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &o("node-2"), &forged),
        None
    );
    let cut = PubkeyRecord {
        mac: B64.encode([0u8; 16]),
        ..good.clone()
    };
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &o("node-2"), &cut),
        None
    );
    // The same record under another node's name does not verify.
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &o("node-3"), &good),
        None
    );
    // A later epoch of the same number (another secret, so another
    // tag) verifies afresh: the old record does not open under it.
    let tag2 = file_tag(&other, e);
    assert_ne!(tag, tag2);
    assert_eq!(
        check_pubkey(&other, "guid", e, &tag2, &o("node-2"), &good),
        None
    );
    // The same record under another clusterGUID (another MAC key).
    assert_eq!(
        check_pubkey(&secret, "guid-2", e, &tag, &o("node-2"), &good),
        None
    );
    // Not base64: refused, never a panic.
    let junk = PubkeyRecord {
        public: "%%%".into(),
        mac: "%%%".into(),
    };
    assert_eq!(
        check_pubkey(&secret, "guid", e, &tag, &o("node-4"), &junk),
        None
    );
}

#[test]
fn a_peer_whose_new_key_is_not_readable_yet_stays_at_its_last_incarnation() {
    use crate::datastore::ipsec::Identity;
    use crate::datastore::records::{EpochRecord, EpochState, SEAL_BOTH_ENDS};
    let e = 0xffd0;
    let secret = EpochSecret::generate().expect("secret");
    let rec = EpochRecord {
        epoch: e,
        state: EpochState::Active,
        created: String::new(),
        algorithm: crate::keys::ALGORITHM.into(),
        key_bits: 128,
        icv_bits: None,
        kek_fingerprint: String::new(),
        sealed_secret: String::new(),
        seal: SEAL_BOTH_ENDS,
        also_sealed: Default::default(),
        activated: None,
        agreement: Some(AGREEMENT_P256.into()),
    };
    let keyed = |node: &str, inc: u32| {
        let pair = EpochKeyPair::generate().expect("pair");
        let owner = KeyOwner {
            node,
            incarnation: Some(inc),
        };
        let mac = pubkey_mac(&secret, "guid", e, owner, pair.public()).expect("mac");
        let r = PubkeyRecord {
            public: B64.encode(pair.public()),
            mac: B64.encode(mac),
        };
        ((node.to_string(), Some(inc)), r)
    };
    let mut snap = Snapshot::default();
    for (n, inc) in [("node-1", 1), ("node-2", 3), ("node-3", 5)] {
        let ident = Identity {
            id: 1,
            incarnation: inc,
            boot_id: String::new(),
        };
        snap.identities.insert(n.to_string(), ident);
    }
    // node-2 published incarnation 3 but only incarnation 2's key is there
    // yet; node-3's key of its incarnation 5 is there.
    snap.pubkeys
        .insert(e, [keyed("node-2", 2), keyed("node-3", 5)].into());
    let secrets: BTreeMap<u32, EpochSecret> = [(e, secret.clone())].into();
    let bases: BTreeMap<u32, String> = [(e, file_tag(&secret, e))].into();
    let got = lagging(&snap, "node-1", &[&rec], &secrets, &bases, "guid");
    assert_eq!(got, [("node-2".to_string(), 2)].into());
    // Once incarnation 3's key is there, nobody lags.
    let (owner, r) = keyed("node-2", 3);
    snap.pubkeys.get_mut(&e).expect("epoch").insert(owner, r);
    assert!(lagging(&snap, "node-1", &[&rec], &secrets, &bases, "guid").is_empty());
}
