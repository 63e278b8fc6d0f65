//! The cipher against NVFlare 2.9's own envelopes and key exchanges, captured from real cells
//! with the generated test kit in `tests/data/kit` (certificates valid from 2026-11-29 to
//! 2027-11-24: checks run at a fixed time inside that window).
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;

use fedrun_secure::envelope::{self, Envelope, SealKey, OVERHEAD};
use fedrun_secure::{
    CellCert, CellCipher, CellCredentials, IdentityResolver, SecureError, VerifyTime,
};
use serde_json::Value;

/// 2026-12-01T00:00:00Z, inside the kit's validity.
const KIT_TIME: VerifyTime = VerifyTime::Fixed(1_796_083_200);

fn data(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(p)
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(data(p)).unwrap()
}

/// The kit directory of the participant a cell name belongs to.
fn participant(fqcn: &str) -> &'static str {
    match fqcn.split('.').next().unwrap() {
        "server" => "server1",
        "site-1" => "site-1",
        "site-2" => "site-2",
        other => panic!("no kit for {other}"),
    }
}

fn creds(participant: &str) -> CellCredentials {
    CellCredentials::from_startup_kit(data(&format!("kit/{participant}")))
        .unwrap()
        .with_verify_time(KIT_TIME)
}

fn cert_pem(participant: &str) -> Vec<u8> {
    let name = if participant == "server1" {
        "server"
    } else {
        "client"
    };
    read(&format!("kit/{participant}/{name}.crt"))
}

fn lines(p: &str) -> Vec<Value> {
    String::from_utf8(read(p))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap()
}

fn hexf(v: &Value, k: &str) -> Vec<u8> {
    hex::decode(s(v, k)).unwrap()
}

/// Every captured envelope: the signature verifies under the origin's certificate, the key
/// unwraps with the destination's key to the AES key NVFlare used, and the cleartext is
/// NVFlare's, of the length its `cn__clear_payload_len` announced.
fn check_capture(file: &str) -> usize {
    let records = lines(file);
    assert!(!records.is_empty());
    for r in &records {
        let (origin, dest) = (s(r, "origin"), s(r, "destination"));
        let env_bytes = hexf(r, "envelope_hex");
        let sender = CellCert::from_pem(&cert_pem(participant(origin))).unwrap();
        let receiver = creds(participant(dest));
        let env = Envelope::parse(&env_bytes).unwrap();
        env.verify(sender.public_key())
            .unwrap_or_else(|e| panic!("#{} signature: {e}", r["idx"]));
        assert_eq!(hex::encode(env.nonce()), s(r, "nonce"));
        let clear = hexf(r, "clear_hex");
        assert_eq!(env.clear_len(), clear.len());
        assert_eq!(
            r["headers"]["cn__clear_payload_len"].as_u64(),
            Some(clear.len() as u64)
        );
        // the whole receive path: certificate exchange (identity bound, chain checked), open
        let cipher = CellCipher::new(receiver);
        cipher
            .accept_peer(origin, &cert_pem(participant(origin)))
            .unwrap();
        let opened = cipher.decrypt_from(origin, &env_bytes).unwrap();
        assert_eq!(opened, clear, "#{} cleartext", r["idx"]);
        // and twice: the second time from the cached unwrapped key
        assert_eq!(cipher.decrypt_from(origin, &env_bytes).unwrap(), clear);
    }
    records.len()
}

#[test]
fn every_envelope_captured_over_mtls_opens_with_the_kit_keys() {
    assert_eq!(
        check_capture("capture_mtls/secure_vectors.decoded.jsonl"),
        22
    );
}

#[test]
fn every_envelope_captured_over_tls_opens_with_the_kit_keys() {
    assert_eq!(
        check_capture("capture_tls/secure_vectors.decoded.jsonl"),
        14
    );
}

#[test]
fn the_unwrapped_key_is_the_aes_key_nvflare_used() {
    let r = &lines("capture_mtls/secure_vectors.decoded.jsonl")[0];
    let receiver = PrivateKeyOf::new(participant(s(r, "destination")));
    let env_bytes = hexf(r, "envelope_hex");
    let env = Envelope::parse(&env_bytes).unwrap();
    assert_eq!(
        env.unwrap_key(&receiver.0).unwrap().to_vec(),
        hexf(r, "aes_key")
    );
    assert_eq!(
        hex::encode(&env.ciphertext()[env.ciphertext().len() - 16..]),
        s(r, "tag")
    );
}

struct PrivateKeyOf(rsa::PrivateKey);

impl PrivateKeyOf {
    fn new(participant: &str) -> PrivateKeyOf {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let name = if participant == "server1" {
            "server"
        } else {
            "client"
        };
        let pem = String::from_utf8(read(&format!("kit/{participant}/{name}.key"))).unwrap();
        PrivateKeyOf(rsa::PrivateKey::from_pkcs1_pem(&pem).unwrap())
    }
}

#[test]
fn envelopes_made_by_the_rust_probe_open_with_the_vector_keys() {
    let records = lines("capture_mtls/rust_envelopes.jsonl");
    assert!(!records.is_empty());
    for r in &records {
        let sender = CellCert::from_pem(&cert_pem(participant(s(r, "sender")))).unwrap();
        let receiver = PrivateKeyOf::new(participant(s(r, "receiver")));
        let opened =
            envelope::open(sender.public_key(), &receiver.0, &hexf(r, "envelope_hex")).unwrap();
        assert_eq!(opened, hexf(r, "clear_hex"));
    }
}

#[test]
fn tampering_with_any_field_of_a_captured_envelope_is_refused() {
    let r = &lines("capture_mtls/secure_vectors.decoded.jsonl")[0];
    let (origin, dest) = (s(r, "origin"), s(r, "destination"));
    let good = hexf(r, "envelope_hex");
    let cipher = CellCipher::new(creds(participant(dest)));
    cipher
        .accept_peer(origin, &cert_pem(participant(origin)))
        .unwrap();
    assert!(cipher.decrypt_from(origin, &good).is_ok());
    // every byte: version, nonce, key_enc, signature, ciphertext and tag
    let positions: Vec<usize> = (0..good.len()).collect();
    for &i in &positions {
        let mut bad = good.clone();
        bad[i] ^= 0x01;
        let e = cipher.decrypt_from(origin, &bad).unwrap_err();
        let expected = if i == 0 {
            matches!(e, SecureError::Version(_))
        } else {
            matches!(e, SecureError::BadSignature)
        };
        assert!(expected, "byte {i}: {e}");
    }
    // truncated or extended
    assert!(matches!(
        cipher.decrypt_from(origin, &good[..OVERHEAD - 1]),
        Err(SecureError::TooShort { .. })
    ));
    let mut longer = good.clone();
    longer.push(0);
    assert!(cipher.decrypt_from(origin, &longer).is_err());
}

#[test]
fn an_envelope_is_refused_under_another_senders_certificate() {
    let r = &lines("capture_mtls/secure_vectors.decoded.jsonl")[0];
    assert_eq!(s(r, "origin"), "site-1.J1");
    let cipher = CellCipher::new(creds("server1"));
    cipher
        .accept_peer("site-2.J1", &cert_pem("site-2"))
        .unwrap();
    assert!(matches!(
        cipher.decrypt_from("site-2.J1", &hexf(r, "envelope_hex")),
        Err(SecureError::BadSignature)
    ));
    assert!(matches!(
        cipher.decrypt_from("site-1.J1", &hexf(r, "envelope_hex")),
        Err(SecureError::UnknownPeer(_))
    ));
}

#[test]
fn rust_made_envelopes_round_trip_between_the_kit_identities() {
    let site1 = CellCipher::new(creds("site-1"));
    let server = CellCipher::new(creds("server1"));
    site1
        .accept_peer("server.J1", &cert_pem("server1"))
        .unwrap();
    server
        .accept_peer("site-1.J1", &cert_pem("site-1"))
        .unwrap();
    for clear in [&b""[..], b"x", &[7u8; 5000][..]] {
        let env = site1.encrypt_for("server.J1", clear).unwrap();
        assert_eq!(env.len(), clear.len() + OVERHEAD);
        let e = Envelope::parse(&env).unwrap();
        assert_eq!(e.clear_len(), clear.len());
        assert_eq!(server.decrypt_from("site-1.J1", &env).unwrap(), clear);
    }
    // the AES key (and its wrapped form) is reused for one receiver, the nonce is not
    let a = site1.encrypt_for("server.J1", b"a").unwrap();
    let b = site1.encrypt_for("server.J1", b"a").unwrap();
    let (ea, eb) = (Envelope::parse(&a).unwrap(), Envelope::parse(&b).unwrap());
    assert_eq!(ea.key_enc(), eb.key_enc());
    assert_ne!(ea.nonce(), eb.nonce());
}

#[test]
fn a_sender_signs_with_nvflares_222_byte_salt() {
    // verifying with a verifier fixed to salt 222 accepts our signature
    use rsa::signature::Verifier;
    let site1 = CellCipher::new(creds("site-1"));
    site1.accept_peer("site-2.J1", &cert_pem("site-2")).unwrap();
    let env = site1.encrypt_for("site-2.J1", b"salt").unwrap();
    let e = Envelope::parse(&env).unwrap();
    let mut signed = env[..269].to_vec();
    signed.extend_from_slice(e.ciphertext());
    let key = CellCert::from_pem(&cert_pem("site-1")).unwrap();
    let v =
        rsa::pss::VerifyingKey::<sha2::Sha256>::new_with_salt_len(key.public_key().clone(), 222);
    let sig = rsa::pss::Signature::try_from(e.signature()).unwrap();
    v.verify(&signed, &sig).unwrap();
}

#[test]
fn a_sender_gets_a_bounded_number_of_distinct_wrapped_keys() {
    let server = CellCipher::new(creds("server1"));
    server
        .accept_peer("site-1.J1", &cert_pem("site-1"))
        .unwrap();
    let site1_key = PrivateKeyOf::new("site-1");
    let server_cert = CellCert::from_pem(&cert_pem("server1")).unwrap();
    for i in 0..=fedrun_secure::cipher::MAX_KEYS_PER_SENDER {
        let key = SealKey::new(server_cert.public_key()).unwrap();
        let env = envelope::seal(&site1_key.0, &key, b"k").unwrap();
        let r = server.decrypt_from("site-1.J1", &env);
        if i < fedrun_secure::cipher::MAX_KEYS_PER_SENDER {
            assert!(r.is_ok(), "key {i}");
        } else {
            assert!(
                matches!(r, Err(SecureError::KeyBudget(_))),
                "key {i}: {r:?}"
            );
        }
    }
}

#[test]
fn a_certificate_must_carry_the_identity_its_cell_name_resolves_to() {
    let site1 = CellCipher::new(creds("site-1"));
    // site-2's certificate claiming a site-1 job, or the server's job
    for (fqcn, pem) in [
        ("site-1.J1", "site-2"),
        ("server.J1", "site-2"),
        ("site-2.J1", "server1"),
    ] {
        assert!(matches!(
            site1.accept_peer(fqcn, &cert_pem(pem)),
            Err(SecureError::IdentityMismatch { .. })
        ));
        assert!(site1.peer(fqcn).is_none());
    }
    site1.accept_peer("site-2.J9", &cert_pem("site-2")).unwrap();
    site1.accept_peer("server", &cert_pem("server1")).unwrap();
    // tls mode: no binding
    let loose = CellCipher::new(creds("site-1").with_identity_binding(false));
    loose.accept_peer("site-1.J1", &cert_pem("site-2")).unwrap();
}

#[test]
fn a_certificate_must_chain_to_the_root_at_the_verification_time() {
    let expired =
        CellCipher::new(creds("site-1").with_verify_time(VerifyTime::Fixed(1_900_000_000)));
    assert!(matches!(
        expired.accept_peer("site-2.J1", &cert_pem("site-2")),
        Err(SecureError::Untrusted { .. })
    ));
    let early = CellCipher::new(creds("site-1").with_verify_time(VerifyTime::Fixed(1_700_000_000)));
    assert!(matches!(
        early.accept_peer("site-2.J1", &cert_pem("site-2")),
        Err(SecureError::Untrusted { .. })
    ));
    // a self-signed certificate with the right CN (generated: openssl req -x509 -newkey rsa:2048)
    let c = CellCipher::new(creds("site-1"));
    assert!(matches!(
        c.accept_peer("site-2.J1", &read("self_signed_site-2.crt")),
        Err(SecureError::Untrusted { .. })
    ));
    // the root itself is no end entity
    let root = CellCipher::new(creds("site-1").with_identity_binding(false));
    assert!(root
        .accept_peer("x", &read("kit/site-1/rootCA.pem"))
        .is_err());
}

#[test]
fn hostile_certificate_pem_is_refused_before_parsing() {
    let c = CellCipher::new(creds("site-1"));
    assert!(matches!(
        c.accept_peer("site-2.J1", b"not a pem"),
        Err(SecureError::NoCertificate)
    ));
    let huge = vec![b'A'; fedrun_secure::cert::MAX_PEM_LEN + 1];
    assert!(matches!(
        c.accept_peer("site-2.J1", &huge),
        Err(SecureError::BadCertificate(_))
    ));
    let mut garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_vec();
    assert!(c.accept_peer("site-2.J1", &garbage).is_err());
    garbage.clear();
    let many = cert_pem("site-2").repeat(fedrun_secure::cert::MAX_CHAIN_LEN + 1);
    assert!(matches!(
        c.accept_peer("site-2.J1", &many),
        Err(SecureError::BadCertificate(_))
    ));
}

#[test]
fn nvflares_key_exchange_certificates_are_accepted_for_their_origin() {
    for file in [
        "capture_mtls/secure_vectors.keyx.jsonl",
        "capture_tls/secure_vectors.keyx.jsonl",
    ] {
        for r in lines(file) {
            let origin = s(&r, "origin");
            let payload = fedrun_fobs::decode(bytes::Bytes::from(hexf(&r, "payload_hex"))).unwrap();
            let map = payload.value.as_map().unwrap();
            let cert = map
                .iter()
                .find(|(k, _)| k.as_str() == Some(fedrun_secure::CERT_CONTENT))
                .and_then(|(_, v)| v.as_bin())
                .unwrap();
            // the receiver of this message is its destination's participant
            let receiver = CellCipher::new(creds(participant(s(&r, "destination"))));
            let accepted = receiver.accept_peer(origin, cert).unwrap();
            assert_eq!(accepted.cn(), s(&r, "cert_cn"));
        }
    }
}

#[test]
fn a_startup_kit_gives_the_identity_and_the_servers_name() {
    let site = creds("site-1");
    assert_eq!(site.identity(), "site-1");
    assert!(site.enforces_identity(), "fed_client.json says mtls");
    assert_eq!(site.resolver(), &IdentityResolver::for_client("server1"));
    let server = creds("server1");
    assert_eq!(server.identity(), "server1");
    assert_eq!(server.resolver().resolve("server.J1"), "server1");
    // a key that is not the certificate's
    let key = String::from_utf8(read("kit/site-2/client.key")).unwrap();
    assert!(matches!(
        CellCredentials::from_pem(&key, &cert_pem("site-1"), &read("kit/site-1/rootCA.pem")),
        Err(SecureError::KeyMismatch)
    ));
    assert!(matches!(
        CellCredentials::from_startup_kit(data("kit/nowhere")),
        Err(SecureError::Read { .. })
    ));
}
