//! fedrun endpoints over TLS and mTLS on loopback, with credentials generated at test time (a
//! root CA, a server certificate `CN=server1`, site certificates `CN=site-1`/`CN=site-2`, and a
//! second, foreign CA), laid out as NVFlare startup kits. Checks that requests are answered
//! over mTLS and TLS, that a listener refuses a peer without a certificate, with a certificate
//! of another CA, or registering a name its certificate does not belong to (with a log line),
//! and keeps serving others; and that a connector refuses a server of another CA or with
//! another identity. Every wait is on the event itself, bounded by a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use fedrun_cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, SendRequest};
use fedrun_core::{CellReturnCode, Shareable};
use fedrun_wire::tls::{ConnectionSecurity, TlsConnector, TlsCredentials, TlsListener};
use fedrun_wire::{Frame, FrameType, HandshakeInfo, SfmCodec, TcpTransport, WireConfig, WireError};
use futures::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// Upper bound for any single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- log capture

/// Every log line of the process, so that a test can wait for the one it expects.
struct Capture {
    lines: Mutex<Vec<String>>,
    changed: watch::Sender<usize>,
}

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if record.level() > log::Level::Info {
            return;
        }
        let line = format!("{} {}", record.level(), record.args());
        let n = {
            let mut lines = self.lines.lock().unwrap();
            lines.push(line);
            lines.len()
        };
        self.changed.send_replace(n);
    }
    fn flush(&self) {}
}

fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture {
            lines: Mutex::new(Vec::new()),
            changed: watch::channel(0).0,
        }));
        let _ = log::set_logger(c);
        log::set_max_level(log::LevelFilter::Info);
        c
    })
}

/// Waits (bounded) for a log line containing every one of `parts`; returns it.
async fn wait_for_log(parts: &[&str]) -> String {
    let c = capture();
    let mut changes = c.changed.subscribe();
    let find = || {
        c.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .cloned()
    };
    let wait = async {
        loop {
            if let Some(line) = find() {
                return line;
            }
            changes.changed().await.unwrap();
        }
    };
    match timeout(DEADLINE, wait).await {
        Ok(line) => line,
        Err(_) => panic!("no log line with {parts:?}"),
    }
}

// ---------------------------------------------------------------- credentials

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

/// A leaf `CN=<cn>, O=nvidia` signed by `ca`, with `sans` as DNS names: what `nvflare
/// provision` writes (no key usage, no extended key usage).
fn leaf(ca: &Ca, cn: &str, sans: &[&str]) -> (String, String) {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "nvidia");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedrun-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A startup kit: `rootCA.pem` and, when given, `<role>.crt`/`<role>.key`.
fn kit(dir: &Path, root: &Ca, role: &str, pair: Option<(String, String)>) -> TlsCredentials {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("rootCA.pem"), root.cert.pem()).unwrap();
    if let Some((cert, key)) = pair {
        std::fs::write(dir.join(format!("{role}.crt")), cert).unwrap();
        std::fs::write(dir.join(format!("{role}.key")), key).unwrap();
    }
    TlsCredentials::from_startup_kit(dir).unwrap()
}

/// The credentials of one test: a project CA with a server and two sites, and a foreign CA
/// with its own `site-1`.
struct Kits {
    server: TlsCredentials,
    site1: TlsCredentials,
    site2: TlsCredentials,
    /// Only `rootCA.pem` (a TLS-mode client).
    anonymous: TlsCredentials,
    /// `site-1` certified by another CA.
    foreign_site1: TlsCredentials,
    /// A server certified by another CA.
    foreign_server: TlsCredentials,
}

fn kits(name: &str) -> Kits {
    let dir = temp_dir(name);
    let root = ca("fedrun_test");
    let other = ca("other_project");
    let kits = Kits {
        server: kit(
            &dir.join("server1"),
            &root,
            "server",
            Some(leaf(&root, "server1", &["localhost"])),
        ),
        site1: kit(
            &dir.join("site-1"),
            &root,
            "client",
            Some(leaf(&root, "site-1", &["site-1"])),
        ),
        site2: kit(
            &dir.join("site-2"),
            &root,
            "client",
            Some(leaf(&root, "site-2", &["site-2"])),
        ),
        anonymous: kit(&dir.join("anonymous"), &root, "client", None),
        foreign_site1: kit(
            &dir.join("foreign-site-1"),
            &other,
            "client",
            Some(leaf(&other, "site-1", &["site-1"])),
        ),
        foreign_server: kit(
            &dir.join("foreign-server"),
            &other,
            "server",
            Some(leaf(&other, "server1", &["localhost"])),
        ),
    };
    let _ = std::fs::remove_dir_all(&dir);
    kits
}

// ---------------------------------------------------------------- endpoints

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn fast_config() -> WireConfig {
    WireConfig {
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..WireConfig::default()
    }
}

struct Server {
    net: TcpTransport,
    addr: SocketAddr,
    cell: CellHandle,
}

/// A `server` endpoint listening with `creds` in `security` mode, its cell answering
/// `test/echo` with the request's payload.
async fn server(creds: &TlsCredentials, security: ConnectionSecurity) -> Server {
    capture();
    let net = TcpTransport::new(Fqcn::SERVER, fast_config());
    let listener = TlsListener::new(creds, security).unwrap();
    let addr = net
        .add_tls_listener("stcp://127.0.0.1:0", listener)
        .await
        .unwrap();
    let cell = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    cell.register_request_handler(
        "test",
        "echo",
        request_handler(|req: CellMessage| async move { Ok(Some(CellMessage::new(req.payload))) }),
    )
    .await
    .unwrap();
    Server { net, addr, cell }
}

/// A job endpoint `name` connecting to `addr` over TLS.
fn client(name: &str, addr: SocketAddr, connector: TlsConnector) -> TcpTransport {
    let net = TcpTransport::new(fqcn(name), fast_config());
    // `tcp://` on purpose: a TLS connector uses TLS whatever the scheme says
    net.add_tls_connector(&format!("tcp://{addr}"), connector)
        .unwrap();
    net
}

/// Sends `test/echo` from a cell on `net` to `server` and checks the answer.
async fn echo_round_trip(net: &TcpTransport, name: &str) {
    assert!(
        net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await,
        "{name} never connected"
    );
    let cell = Cell::start(fqcn(name), net.clone()).unwrap();
    let mut body = Shareable::new();
    body.insert("round", 7);
    let reply = cell
        .send_request(SendRequest::new(
            "test",
            "echo",
            Fqcn::SERVER,
            CellMessage::new(body.clone()),
            DEADLINE,
        ))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.payload.as_shareable(), Some(&body));
    cell.stop().await;
}

async fn stop(server: Server, clients: &[&TcpTransport]) {
    for c in clients {
        c.shutdown().await;
    }
    server.cell.stop().await;
    server.net.shutdown().await;
}

// ---------------------------------------------------------------- tests

#[actix::test]
async fn mtls_request_is_answered_and_both_sides_see_the_registered_names() {
    let k = kits("mtls-ok");
    let server = server(&k.server, ConnectionSecurity::Mtls).await;
    let conn = TlsConnector::new(&k.site1, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let job = client("site-1.J1", server.addr, conn);
    echo_round_trip(&job, "site-1.J1").await;
    assert!(server.net.is_connected(&fqcn("site-1.J1")));
    stop(server, &[&job]).await;
}

#[actix::test]
async fn tls_mode_needs_no_client_certificate_and_binds_no_name() {
    let k = kits("tls-ok");
    let server = server(&k.server, ConnectionSecurity::Tls).await;
    // a TLS-mode client presents nothing; any name is accepted (NVFlare sees CN "N/A")
    let conn = TlsConnector::new(&k.anonymous, ConnectionSecurity::Tls, None).unwrap();
    let job = client("site-9.J1", server.addr, conn);
    echo_round_trip(&job, "site-9.J1").await;
    stop(server, &[&job]).await;
}

#[actix::test]
async fn mtls_listener_refuses_a_client_without_certificate_and_keeps_serving() {
    let k = kits("mtls-nocert");
    let server = server(&k.server, ConnectionSecurity::Mtls).await;
    let bare = TlsConnector::new(&k.anonymous, ConnectionSecurity::Tls, None).unwrap();
    let intruder = client("site-7.J1", server.addr, bare);
    // the client learns it at its first read (TLS 1.3: alert certificate_required)
    wait_for_log(&["site-7.J1", "authentication with", "failed"]).await;
    assert!(!server.net.is_connected(&fqcn("site-7.J1")));
    let conn = TlsConnector::new(&k.site2, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let good = client("site-2.J1", server.addr, conn);
    echo_round_trip(&good, "site-2.J1").await;
    assert!(!server.net.is_connected(&fqcn("site-7.J1")));
    stop(server, &[&intruder, &good]).await;
}

#[actix::test]
async fn mtls_listener_refuses_a_certificate_of_another_ca_and_keeps_serving() {
    let k = kits("mtls-foreign");
    let server = server(&k.server, ConnectionSecurity::Mtls).await;
    // the foreign site trusts the project root (so it gets as far as presenting its cert)
    let mut creds = k.foreign_site1.clone();
    creds.root_ca = k.site1.root_ca.clone();
    let conn = TlsConnector::new(&creds, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let intruder = client("site-1.EVIL", server.addr, conn);
    wait_for_log(&["site-1.EVIL", "authentication with", "failed"]).await;
    let conn = TlsConnector::new(&k.site1, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let good = client("site-1.J1", server.addr, conn);
    echo_round_trip(&good, "site-1.J1").await;
    assert!(!server.net.is_connected(&fqcn("site-1.EVIL")));
    stop(server, &[&intruder, &good]).await;
}

#[actix::test]
async fn mtls_listener_closes_a_peer_whose_name_is_not_its_certificate_before_ready() {
    let k = kits("mtls-name");
    let server = server(&k.server, ConnectionSecurity::Mtls).await;
    // a raw client with site-2's certificate claiming to be site-1's job (the fedrun connector
    // refuses to do that, see below, so this plays a foreign peer)
    let conn = TlsConnector::new(&k.site2, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let probe = TcpTransport::new(fqcn("site-1.J1"), fast_config());
    assert!(matches!(
        probe.add_tls_connector(&format!("tcp://{}", server.addr), conn),
        Err(WireError::IdentityMismatch { .. })
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(k.site2.root_ca[0].clone()).unwrap();
    let pair = k.site2.client.clone().unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(pair.chain, pair.key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut framed = Framed::new(tls, SfmCodec::new());
    let hello = HandshakeInfo::now(&fqcn("site-1.J1"));
    framed.send(Frame::hello(&hello).unwrap()).await.unwrap();
    let answer = timeout(DEADLINE, framed.next()).await.unwrap();
    assert!(
        !matches!(&answer, Some(Ok(f)) if f.frame_type == FrameType::Ready),
        "a READY was sent to an impostor"
    );
    let line = wait_for_log(&["site-1.J1", "presented a certificate for site-2"]).await;
    assert!(line.contains("must be site-1"), "{line}");
    // the listener serves the real site-1
    let conn = TlsConnector::new(&k.site1, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let good = client("site-1.J1", server.addr, conn);
    echo_round_trip(&good, "site-1.J1").await;
    stop(server, &[&good]).await;
}

#[actix::test]
async fn connector_refuses_a_server_of_another_ca() {
    let k = kits("client-foreign-server");
    let server = server(&k.foreign_server, ConnectionSecurity::Tls).await;
    let conn = TlsConnector::new(&k.site1, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let job = client("site-1.J2", server.addr, conn);
    let line = wait_for_log(&["site-1.J2", "authentication with", "certificate refused"]).await;
    assert!(line.starts_with("ERROR"), "{line}");
    assert!(!job.is_connected(&Fqcn::SERVER));
    stop(server, &[&job]).await;
}

#[actix::test]
async fn connector_refuses_a_server_whose_cn_is_not_the_expected_identity() {
    let k = kits("client-server-cn");
    let server = server(&k.server, ConnectionSecurity::Mtls).await;
    // the kit says the server is "server" but its certificate says "server1"
    let conn = TlsConnector::new(&k.site1, ConnectionSecurity::Mtls, None).unwrap();
    let job = client("site-1.J3", server.addr, conn);
    let line = wait_for_log(&["site-1.J3", "presented a certificate for server1"]).await;
    assert!(line.contains("must be server"), "{line}");
    assert!(!job.is_connected(&Fqcn::SERVER));
    stop(server, &[&job]).await;
}

#[actix::test]
async fn connector_reports_a_close_right_after_ready_as_an_authentication_failure() {
    let k = kits("ready-close");
    // a server that behaves as NVFlare does with a name it refuses: READY, then close
    let pair = k.server.server.clone().unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(pair.chain, pair.key)
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
            .accept(tcp)
            .await
            .unwrap();
        let mut framed = Framed::new(tls, SfmCodec::new());
        let hello = framed.next().await.unwrap().unwrap();
        assert_eq!(hello.frame_type, FrameType::Hello);
        let ready = Frame::ready(&HandshakeInfo::now(&Fqcn::SERVER)).unwrap();
        framed.send(ready).await.unwrap();
        // dropped: closed without close_notify, as a Python peer closes
    });
    let conn = TlsConnector::new(&k.site1, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let job = client("site-1.J9", addr, conn);
    let line = wait_for_log(&["site-1.J9", "closed the mTLS connection right after READY"]).await;
    assert!(line.starts_with("ERROR"), "{line}");
    timeout(DEADLINE, server).await.unwrap().unwrap();
    job.shutdown().await;
}

#[actix::test]
async fn credentials_that_cannot_work_fail_when_configured() {
    let k = kits("config");
    assert!(matches!(
        TlsListener::new(&k.anonymous, ConnectionSecurity::Mtls),
        Err(WireError::TlsConfig(_))
    ));
    assert!(matches!(
        TlsConnector::new(&k.anonymous, ConnectionSecurity::Mtls, None),
        Err(WireError::TlsConfig(_))
    ));
    assert!(matches!(
        TlsConnector::new(&k.site1, ConnectionSecurity::Clear, None),
        Err(WireError::TlsConfig(_))
    ));
    let missing = TlsCredentials::from_startup_kit(Path::new("/nonexistent-fedrun-kit"));
    assert!(matches!(missing, Err(WireError::TlsFile { .. })));
}
