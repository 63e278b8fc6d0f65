//! The cost of secure messages per message and per byte: sealing and opening an envelope
//! (1 KiB and one 1 MiB stream chunk), the first open of a sender's key (the RSA unwrap), the
//! check of a peer certificate. Keys: the generated test kit in `tests/data/kit`.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fedrun_secure::envelope::Envelope;
use fedrun_secure::{CellCipher, CellCredentials, VerifyTime};

fn kit(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kit")
        .join(p)
}

fn creds(p: &str) -> CellCredentials {
    CellCredentials::from_startup_kit(kit(p))
        .unwrap()
        .with_verify_time(VerifyTime::Fixed(1_796_083_200))
}

fn pem(p: &str, f: &str) -> Vec<u8> {
    std::fs::read(kit(p).join(f)).unwrap()
}

fn envelope(c: &mut Criterion) {
    let site1 = CellCipher::new(creds("site-1"));
    let server = CellCipher::new(creds("server1"));
    site1
        .accept_peer("server.J", &pem("server1", "server.crt"))
        .unwrap();
    server
        .accept_peer("site-1.J", &pem("site-1", "client.crt"))
        .unwrap();
    let mut g = c.benchmark_group("envelope");
    for size in [1024usize, 1024 * 1024] {
        let clear = vec![7u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("seal", size), &clear, |b, clear| {
            b.iter(|| site1.encrypt_for("server.J", clear).unwrap())
        });
        let env = site1.encrypt_for("server.J", &clear).unwrap();
        // the receiver's key is unwrapped once, then cached
        server.decrypt_from("site-1.J", &env).unwrap();
        g.bench_with_input(BenchmarkId::new("open", size), &env, |b, env| {
            b.iter(|| server.decrypt_from("site-1.J", env).unwrap())
        });
    }
    g.finish();

    let env = site1.encrypt_for("server.J", b"k").unwrap();
    let server_creds = creds("server1");
    let key = {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        let text = String::from_utf8(pem("server1", "server.key")).unwrap();
        rsa::PrivateKey::from_pkcs1_pem(&text).unwrap()
    };
    c.bench_function("first open: RSA-OAEP unwrap of key_enc", |b| {
        let e = Envelope::parse(&env).unwrap();
        b.iter(|| e.unwrap_key(&key).unwrap())
    });
    c.bench_function("key exchange: certificate checked (chain, identity)", |b| {
        let cipher = CellCipher::new(server_creds.clone());
        let cert = pem("site-1", "client.crt");
        b.iter(|| cipher.accept_peer("site-1.J", &cert).unwrap())
    });
}

criterion_group!(benches, envelope);
criterion_main!(benches);
