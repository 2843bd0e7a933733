//! The provider against published vectors (RFC 5869, RFC 4231, FIPS 180-2):
//! the same assertions pass on the default and the FIPS build.

use super::*;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn hkdf_matches_rfc5869_with_and_without_salt() {
    let mut okm = [0u8; 42];
    hkdf_sha256(
        Some(&unhex("000102030405060708090a0b0c")),
        &[0x0b; 22],
        &unhex("f0f1f2f3f4f5f6f7f8f9"),
        &mut okm,
    )
    .expect("expand");
    assert_eq!(
        hex(&okm),
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    );
    // Test case 3: no salt, no info.
    hkdf_sha256(None, &[0x0b; 22], &[], &mut okm).expect("expand");
    assert_eq!(
        hex(&okm),
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    );
    let mut zero_salt = [0u8; 42];
    hkdf_sha256(Some(&[0u8; 32]), &[0x0b; 22], &[], &mut zero_salt).expect("expand");
    assert_eq!(okm, zero_salt, "no salt is 32 zero bytes");
}

#[test]
fn hmac_and_sha256_match_their_standards() {
    let tag = hmac_sha256(&[0x0b; 20], &[b"Hi ", b"There"]);
    assert_eq!(
        hex(&tag),
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    );
    assert!(hmac_sha256_verify(&[0x0b; 20], &[b"Hi There"], &tag));
    assert!(!hmac_sha256_verify(&[0x0b; 20], &[b"Hi There"], &tag[..31]));
    assert!(!hmac_sha256_verify(&[0x0c; 20], &[b"Hi There"], &tag));
    assert_eq!(
        hex(&sha256(&[b"a", b"bc"])),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn gcm_opens_what_it_sealed_and_nothing_altered() {
    let (k, n) = ([1u8; 32], [2u8; NONCE_LEN]);
    let sealed = seal_aes256gcm(&k, &n, b"aad", &[3u8; 32]).expect("seal");
    assert_eq!(sealed.len(), 32 + TAG_LEN);
    let open = open_aes256gcm(&k, &n, b"aad", &sealed).expect("open");
    assert_eq!(&open[..], &[3u8; 32][..]);
    assert!(
        open_aes256gcm(&k, &n, b"aae", &sealed).is_none(),
        "other AAD"
    );
    let mut bent = sealed.clone();
    bent[0] ^= 1;
    assert!(open_aes256gcm(&k, &n, b"aad", &bent).is_none(), "altered");
    assert!(
        seal_aes256gcm(&[1u8; 16], &n, b"", b"x").is_none(),
        "not a 256-bit key"
    );
}

#[test]
fn p256_keys_agree_and_refuse_what_is_not_a_key() {
    let a = P256Private::generate().expect("a");
    let b = P256Private::generate().expect("b");
    assert!(p256_public_valid(&a.public()));
    let z1 = a.agree(&b.public()).expect("z");
    let z2 = b.agree(&a.public()).expect("z");
    assert_eq!(*z1, *z2, "the same secret on both ends");
    let again = P256Private::from_be_bytes(&a.to_be_bytes()).expect("round trip");
    assert_eq!(again.public(), a.public());
    assert!(P256Private::from_be_bytes(&[0u8; 32]).is_none(), "zero");
    assert!(
        P256Private::from_be_bytes(&[0xff; 32]).is_none(),
        "above the order"
    );
    let mut off = a.public();
    off[64] ^= 1;
    assert!(!p256_public_valid(&off), "off the curve");
    assert!(a.agree(&off).is_none());
    assert!(!p256_public_valid(&a.public()[..33]), "compressed length");
}

#[test]
fn tls_takes_this_builds_provider() {
    // The FIPS build's TLS is AWS-LC's module, with FIPS-approved suites
    // only; the standard build's is ring.
    let p = tls_provider();
    assert_eq!(p.fips(), FIPS_BUILD, "{}", describe());
    assert!(!p.cipher_suites.is_empty());
    install_tls_provider();
    install_tls_provider();
    assert_eq!(tls_ready(), Ok(()));
    assert!(describe().contains("TLS rustls with"), "{}", describe());
}
