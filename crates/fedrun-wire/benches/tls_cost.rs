//! What TLS costs on NVFlare's wire: clear TCP vs mTLS between two fedrun cells of one process
//! over loopback (`cargo bench -p fedrun-wire --bench tls_cost`).
//!
//! For each mode the bench connects a job endpoint `site-1.bench` to a `server` endpoint (the
//! handshake is not measured), then measures
//!
//! - the round trip of a small request (a 16-byte payload answered by an echo handler):
//!   `LATENCY_ROUNDS` rounds of `LATENCY_REQUESTS` sequential requests; per round the median,
//!   over all rounds the median of the medians and the worst single request;
//! - the throughput of a 128 MiB request (raw bytes, streamed in 1 MiB chunks with windowed
//!   ACKs, answered with its length): `THROUGHPUT_ROUNDS` rounds; median and worst.
//!
//! The credentials are generated at start (ECDSA P-256, as rcgen makes them; NVFlare's kits are
//! RSA 2048, which only changes the handshake, not what is measured here). With
//! `FEDRUN_TLS_BENCH_KIT=<prod_00 folder of nvflare provision>` the bench uses a real kit
//! (`server1/startup` and `site-1/startup`, server identity `server1`) instead.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, Payload, SendRequest};
use fedrun_core::CellReturnCode;
use fedrun_wire::tls::{ConnectionSecurity, TlsConnector, TlsCredentials, TlsListener};
use fedrun_wire::{TcpTransport, WireConfig};

const MIB: usize = 1024 * 1024;
const BIG: usize = 128 * MIB;
const LATENCY_ROUNDS: usize = 5;
const LATENCY_REQUESTS: usize = 200;
const THROUGHPUT_ROUNDS: usize = 5;

/// Server and site-1 credentials and the server's identity.
struct Kits {
    server: TlsCredentials,
    site: TlsCredentials,
    server_identity: String,
}

fn generated_kits(dir: &Path) -> Result<Kits, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let e = |e: rcgen::Error| e.to_string();
    let mut ca = CertificateParams::new(vec!["bench".to_owned()]).map_err(e)?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "bench");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(e)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let write = |name: &str, role: &str, cn: &str| -> Result<TlsCredentials, String> {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder).map_err(|e| e.to_string())?;
        let mut p = CertificateParams::new(vec!["localhost".to_owned()]).map_err(e)?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().map_err(e)?;
        let cert = p.signed_by(&key, &ca_cert, &ca_key).map_err(e)?;
        let io = |e: std::io::Error| e.to_string();
        std::fs::write(folder.join("rootCA.pem"), ca_cert.pem()).map_err(io)?;
        std::fs::write(folder.join(format!("{role}.crt")), cert.pem()).map_err(io)?;
        std::fs::write(folder.join(format!("{role}.key")), key.serialize_pem()).map_err(io)?;
        TlsCredentials::from_startup_kit(&folder).map_err(|e| e.to_string())
    };
    Ok(Kits {
        server: write("server1", "server", "server1")?,
        site: write("site-1", "client", "site-1")?,
        server_identity: "server1".to_owned(),
    })
}

fn kits() -> Result<Kits, String> {
    if let Ok(prod) = std::env::var("FEDRUN_TLS_BENCH_KIT") {
        let prod = PathBuf::from(prod);
        let load =
            |p: &str| TlsCredentials::from_startup_kit(&prod.join(p)).map_err(|e| e.to_string());
        println!("credentials: the kit in {}", prod.display());
        return Ok(Kits {
            server: load("server1/startup")?,
            site: load("site-1/startup")?,
            server_identity: "server1".to_owned(),
        });
    }
    let dir = std::env::temp_dir().join(format!("fedrun-tls-bench-{}", std::process::id()));
    let kits = generated_kits(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    println!("credentials: generated (ECDSA P-256)");
    kits
}

struct Pair {
    server_net: TcpTransport,
    server: CellHandle,
    job_net: TcpTransport,
    job: CellHandle,
}

async fn pair(kits: Option<&Kits>) -> Result<Pair, String> {
    let s = |e: fedrun_wire::WireError| e.to_string();
    let server_net = TcpTransport::new(Fqcn::SERVER, WireConfig::default());
    let addr = match kits {
        Some(k) => {
            let l = TlsListener::new(&k.server, ConnectionSecurity::Mtls).map_err(s)?;
            server_net.add_tls_listener("stcp://127.0.0.1:0", l).await
        }
        None => server_net.add_listener("tcp://127.0.0.1:0").await,
    }
    .map_err(s)?;
    let server = Cell::start(Fqcn::SERVER, server_net.clone()).map_err(|e| e.to_string())?;
    server
        .register_request_handler(
            "bench",
            "echo",
            request_handler(
                |req: CellMessage| async move { Ok(Some(CellMessage::new(req.payload))) },
            ),
        )
        .await
        .map_err(|e| e.to_string())?;
    server
        .register_request_handler(
            "bench",
            "upload",
            request_handler(|req: CellMessage| async move {
                let len = req.payload.as_bytes().map_or(0, Bytes::len);
                let mut reply = fedrun_core::Shareable::new();
                reply.insert("len", len as u64);
                Ok(Some(CellMessage::new(reply)))
            }),
        )
        .await
        .map_err(|e| e.to_string())?;
    let me = Fqcn::job_cell("site-1", "bench").map_err(|e| e.to_string())?;
    let job_net = TcpTransport::new(me.clone(), WireConfig::default());
    match kits {
        Some(k) => {
            let c = TlsConnector::new(&k.site, ConnectionSecurity::Mtls, Some(&k.server_identity))
                .map_err(s)?;
            job_net.add_tls_connector(&format!("stcp://{addr}"), c)
        }
        None => job_net.add_connector(&format!("tcp://{addr}")),
    }
    .map_err(s)?;
    if !job_net
        .wait_for_peer(&Fqcn::SERVER, Duration::from_secs(10))
        .await
    {
        return Err("no connection".into());
    }
    let job = Cell::start(me, job_net.clone()).map_err(|e| e.to_string())?;
    Ok(Pair {
        server_net,
        server,
        job_net,
        job,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn request(p: &Pair, topic: &str, payload: Payload) -> Result<CellMessage, String> {
    let reply = p
        .job
        .send_request(SendRequest::new(
            "bench",
            topic,
            Fqcn::SERVER,
            CellMessage::new(payload),
            Duration::from_secs(600),
        ))
        .await
        .map_err(|e| e.to_string())?;
    if reply.return_code() != CellReturnCode::Ok {
        return Err(format!("reply {:?}", reply.headers));
    }
    Ok(reply)
}

async fn measure(name: &str, kits: Option<&Kits>) -> Result<(), String> {
    let p = pair(kits).await?;
    let small = Bytes::from_static(b"0123456789abcdef");
    // warm-up (first messages, allocator, session state)
    for _ in 0..20 {
        request(&p, "echo", Payload::Bytes(small.clone())).await?;
    }
    let mut medians = Vec::new();
    let mut worst: f64 = 0.0;
    for _ in 0..LATENCY_ROUNDS {
        let mut rtts = Vec::with_capacity(LATENCY_REQUESTS);
        for _ in 0..LATENCY_REQUESTS {
            let t = Instant::now();
            request(&p, "echo", Payload::Bytes(small.clone())).await?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            worst = worst.max(us);
            rtts.push(us);
        }
        medians.push(median(&mut rtts));
    }
    let latency = median(&mut medians.clone());
    let message = Bytes::from((0..BIG).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut rates = Vec::new();
    for _ in 0..THROUGHPUT_ROUNDS {
        let t = Instant::now();
        let reply = request(&p, "upload", Payload::Bytes(message.clone())).await?;
        let secs = t.elapsed().as_secs_f64();
        let len = reply
            .payload
            .as_shareable()
            .and_then(|s| s.get("len"))
            .and_then(|v| v.as_u64());
        if len != Some(BIG as u64) {
            return Err(format!("the handler saw {len:?} bytes"));
        }
        rates.push(128.0 / secs);
    }
    let worst_rate = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let rate = median(&mut rates);
    println!(
        "{name:>5}: small request round trip median {latency:.0} µs (per-round medians {}), \
         worst {worst:.0} µs; 128 MiB request median {rate:.0} MiB/s, worst {worst_rate:.0} MiB/s",
        medians
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join("/")
    );
    p.job.stop().await;
    p.server.stop().await;
    p.job_net.shutdown().await;
    p.server_net.shutdown().await;
    Ok(())
}

fn main() {
    let outcome = actix::System::new().block_on(async {
        let kits = kits()?;
        println!(
            "{LATENCY_ROUNDS} rounds x {LATENCY_REQUESTS} small requests, \
             {THROUGHPUT_ROUNDS} x 128 MiB, loopback, one process"
        );
        measure("clear", None).await?;
        measure("mtls", Some(&kits)).await?;
        Ok::<(), String>(())
    });
    if let Err(e) = outcome {
        eprintln!("tls_cost bench failed: {e}");
        std::process::exit(1);
    }
}
