//! Live TLS/mTLS interop with NVIDIA FLARE 2.9: credentials from a real `nvflare provision`,
//! real NVFlare cells on `stcp://` loopback, in both directions.
//!
//! The test provisions a project at test time (server `server1`, `site-1`, `site-2`) and a
//! second, foreign project, then:
//!
//! - runs NVFlare's server root cell with the server kit (mTLS) and shows that it refuses a
//!   fedrun job that presents no client certificate, one whose certificate comes from the
//!   foreign CA, and a peer presenting `site-2`'s certificate while registering as
//!   `site-1.<job>` (NVFlare sends READY, then closes); and that after all that a fedrun job
//!   `site-1.<job>` with `site-1`'s kit is served: its request is answered;
//! - runs a fedrun listener with the server kit (mTLS) and NVFlare's client job cell
//!   `site-2.<job>` with `site-2`'s kit, which connects, checks the listener's certificate
//!   against `servers[0].identity` (`server1`) and gets its request answered.
//!
//! The Python side is `tests/interop/nvflare_tls_cells.py`. The test needs NVFlare 2.9.0:
//! `FEDRUN_NVFLARE_PYTHON` names a Python interpreter that has it. Without the variable the test
//! prints a notice and passes. Every wait has a deadline, each script has its own watchdog, and
//! every Python process is killed by its pid when the test ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fedrun::cell::{request_handler, Cell, CellMessage, Fqcn, SendRequest};
use fedrun::CellReturnCode;
use fedrun_wire::tls::{ConnectionSecurity, TlsConnector, TlsCredentials, TlsListener};
use fedrun_wire::{Frame, FrameType, HandshakeInfo, SfmCodec, TcpTransport, WireConfig};
use futures::{SinkExt, StreamExt};
use serde_json::Value as Json;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// The variable naming the Python interpreter that has `nvflare==2.9.0`.
const PYTHON_ENV: &str = "FEDRUN_NVFLARE_PYTHON";
/// The Python side.
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/nvflare_tls_cells.py"
);
/// The deadline of one step.
const STEP: Duration = Duration::from_secs(20);
/// The deadline for a Python cell to come up (importing NVFlare takes a few seconds).
const STARTUP: Duration = Duration::from_secs(40);
/// Each script ends itself after this many seconds.
const WATCHDOG_SECS: &str = "90";
const JOB: &str = "tls-1";

fn python() -> Option<String> {
    match std::env::var(PYTHON_ENV) {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            eprintln!(
                "skipped: {PYTHON_ENV} is not set (a Python with nvflare 2.9.0 runs this test)"
            );
            None
        }
    }
}

// ---------------------------------------------------------------- provisioning

/// `nvflare provision` of a project named `name` (server `server1` on localhost/127.0.0.1,
/// `site-1`, `site-2`, scheme tcp, connection security left to its default, mTLS) into
/// `dir`; returns the `prod_00` folder.
fn provision(python: &str, dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let project = format!(
        "api_version: 3\nname: {name}\ndescription: fedrun TLS interop (generated at test time)\n\
         participants:\n  - name: server1\n    type: server\n    org: nvidia\n    \
         fed_learn_port: 8102\n    default_host: localhost\n    host_names: [127.0.0.1]\n  \
         - name: site-1\n    type: client\n    org: nvidia\n  - name: site-2\n    type: client\n    \
         org: nvidia\nbuilders:\n  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder\n  \
         - path: nvflare.lighter.impl.static_file.StaticFileBuilder\n    args:\n      \
         config_folder: config\n      scheme: tcp\n  - path: nvflare.lighter.impl.cert.CertBuilder\n"
    );
    let yml = dir.join("project.yml");
    std::fs::write(&yml, project).unwrap();
    let ws = dir.join("ws");
    let out = Command::new(python)
        .args([
            "-c",
            "import sys; from nvflare.cli import main; sys.argv = ['nvflare'] + sys.argv[1:]; main()",
            "provision",
            "-p",
        ])
        .arg(&yml)
        .arg("-w")
        .arg(&ws)
        .output()
        .unwrap();
    let prod = ws.join(name).join("prod_00");
    assert!(
        prod.join("server1/startup/server.crt").is_file(),
        "nvflare provision failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    prod
}

/// A fresh folder of this test process named `name`.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("fedrun-nvflare-tls-{}", std::process::id()))
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

// ---------------------------------------------------------------- the Python process

/// A running `nvflare_tls_cells.py`: its JSON events, the tail of its stderr, killed by pid
/// in Drop (and its evidence printed when the test fails).
struct Py {
    child: Child,
    events: mpsc::UnboundedReceiver<Json>,
    received: Vec<Json>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Py {
    fn start(python: &str, args: &[&str]) -> Py {
        let mut child = Command::new(python)
            .arg(SCRIPT)
            .args(args)
            .args(["--watchdog", WATCHDOG_SECS])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python} {SCRIPT}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let event = serde_json::from_str::<Json>(&line)
                    .unwrap_or_else(|_| serde_json::json!({"event": "not_json", "text": line}));
                if tx.send(event).is_err() {
                    return;
                }
            }
            let _ = tx.send(serde_json::json!({"event": "eof"}));
        });
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let tail = Arc::clone(&stderr_tail);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
                if tail.len() == 200 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        Py {
            child,
            events,
            received: Vec::new(),
            stderr_tail,
        }
    }

    /// The next event named `name` (others are kept for the report); panics after `deadline`.
    async fn wait_event(&mut self, name: &str, deadline: Duration) -> Json {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let event = match tokio::time::timeout_at(until, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => panic!("the Python script's output ended while waiting for {name}"),
                Err(_) => panic!("no '{name}' event from the Python script within {deadline:?}"),
            };
            self.received.push(event.clone());
            if event["event"] == name {
                return event;
            }
            if event["event"] == "eof" || event["event"] == "watchdog" {
                panic!("the Python script ended ({event}) while waiting for {name}");
            }
        }
    }

    /// The events that arrived so far, without waiting.
    fn drain(&mut self) -> Vec<Json> {
        let mut out = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            self.received.push(e.clone());
            out.push(e);
        }
        out
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // by pid: only the process this test started
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- events from the Python script:");
            for e in &self.received {
                eprintln!("{e}");
            }
            eprintln!("---- last lines of its stderr:");
            for line in self
                .stderr_tail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
            {
                eprintln!("{line}");
            }
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------- log capture

/// Every log line of the process, so that the test can wait for the refusal it expects.
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
        eprintln!("{line}");
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

/// Waits (bounded) for a log line that contains all of one of `alternatives`; returns it.
async fn wait_for_log(alternatives: &[&[&str]]) -> String {
    let c = capture();
    let mut changes = c.changed.subscribe();
    let find = || {
        c.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| {
                alternatives
                    .iter()
                    .any(|parts| parts.iter().all(|p| l.contains(p)))
            })
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
    match timeout(STEP, wait).await {
        Ok(line) => line,
        Err(_) => panic!("no log line matching {alternatives:?}"),
    }
}

// ---------------------------------------------------------------- fedrun side

fn wire_config() -> WireConfig {
    WireConfig {
        reconnect_initial: Duration::from_millis(200),
        reconnect_max: Duration::from_secs(1),
        ..WireConfig::default()
    }
}

fn job_of(site: &str) -> Fqcn {
    Fqcn::job_cell(site, JOB).unwrap()
}

/// A fedrun job endpoint `name` connecting to `port` with `connector`.
fn fedrun_job(name: &Fqcn, port: u16, connector: TlsConnector) -> TcpTransport {
    let net = TcpTransport::new(name.clone(), wire_config());
    // the kit says tcp: TLS all the same, as NVFlare's job process does
    net.add_tls_connector(&format!("tcp://127.0.0.1:{port}"), connector)
        .unwrap();
    net
}

/// A raw mTLS client presenting `creds`' client pair that registers as `name`; returns what the
/// server answered to the HELLO and whether it then closed the connection.
async fn raw_hello(port: u16, creds: &TlsCredentials, name: &Fqcn) -> (Option<FrameType>, bool) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(creds.root_ca[0].clone()).unwrap();
    let pair = creds.client.clone().unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(pair.chain, pair.key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut framed = Framed::new(tls, SfmCodec::new());
    framed
        .send(Frame::hello(&HandshakeInfo::now(name)).unwrap())
        .await
        .unwrap();
    let first = match timeout(STEP, framed.next()).await.unwrap() {
        Some(Ok(f)) => Some(f.frame_type),
        _ => None,
    };
    // then the server closes (a bare close, no close_notify: an error or the end)
    let closed = match timeout(STEP, framed.next()).await {
        Ok(None | Some(Err(_))) => true,
        Ok(Some(Ok(_))) | Err(_) => false,
    };
    (first, closed)
}

// ---------------------------------------------------------------- tests

#[actix::test]
async fn fedrun_job_speaks_mtls_to_the_nvflare_server_which_refuses_bad_credentials() {
    let Some(python) = python() else { return };
    capture();
    let dir = temp_dir("to-nvflare");
    let prod = provision(&python, &dir.join("project"), "fedrun_tls_it");
    let foreign = provision(&python, &dir.join("foreign"), "other_project");
    let port = free_port();
    let server_kit = prod.join("server1/startup");
    let mut py = Py::start(
        &python,
        &[
            "server",
            "--kit",
            server_kit.to_str().unwrap(),
            "--port",
            &port.to_string(),
        ],
    );
    py.wait_event("ready", STARTUP).await;
    let site1 = TlsCredentials::from_startup_kit(&prod.join("site-1/startup")).unwrap();
    let site2 = TlsCredentials::from_startup_kit(&prod.join("site-2/startup")).unwrap();

    // 1. no client certificate: the server requires one
    let bare = TlsConnector::new(&site1, ConnectionSecurity::Tls, Some("server1")).unwrap();
    let nocert = job_of("site-7");
    let net = fedrun_job(&nocert, port, bare);
    let line = wait_for_log(&[
        &["site-7.tls-1", "authentication with", "failed"],
        &["site-7.tls-1", "cannot connect", "closed by the peer"],
    ])
    .await;
    assert!(!net.is_connected(&Fqcn::SERVER), "{line}");
    net.shutdown().await;

    // 2. a certificate of another project's CA
    let mut creds = TlsCredentials::from_startup_kit(&foreign.join("site-1/startup")).unwrap();
    creds.root_ca = site1.root_ca.clone();
    let conn = TlsConnector::new(&creds, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let stranger = Fqcn::job_cell("site-1", "foreign").unwrap();
    let net = fedrun_job(&stranger, port, conn);
    let line = wait_for_log(&[
        &["site-1.foreign", "authentication with", "failed"],
        &["site-1.foreign", "cannot connect", "closed by the peer"],
    ])
    .await;
    assert!(!net.is_connected(&Fqcn::SERVER), "{line}");
    net.shutdown().await;

    // 3. site-2's certificate registering as site-1's job: NVFlare answers READY, then closes
    let (first, closed) = raw_hello(port, &site2, &job_of("site-1")).await;
    assert!(
        closed,
        "NVFlare kept a connection whose name is not its certificate's (first frame {first:?})"
    );

    // 4. the real site-1: connected, its request answered
    let conn = TlsConnector::new(&site1, ConnectionSecurity::Mtls, Some("server1")).unwrap();
    let me = job_of("site-1");
    let net = fedrun_job(&me, port, conn);
    assert!(
        net.wait_for_peer(&Fqcn::SERVER, STEP).await,
        "no mTLS handshake with NVFlare's server"
    );
    let cell = Cell::start(me.clone(), net.clone()).unwrap();
    let reply = cell
        .send_request(SendRequest::new(
            "test",
            "echo",
            Fqcn::SERVER,
            CellMessage::new(Bytes::from_static(b"hello from fedrun")),
            STEP,
        ))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(
        reply.payload.as_bytes().map(|b| b.as_ref()),
        Some(&b"echo from server: hello from fedrun"[..])
    );
    let request = py.wait_event("request", STEP).await;
    assert_eq!(request["origin"], me.as_str());
    // no other peer's request got through
    assert!(py.drain().iter().all(|e| e["event"] != "request"));
    cell.stop().await;
    net.shutdown().await;
    drop(py);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn nvflare_client_job_speaks_mtls_to_a_fedrun_listener() {
    let Some(python) = python() else { return };
    capture();
    let dir = temp_dir("from-nvflare");
    let prod = provision(&python, &dir.join("project"), "fedrun_tls_it2");
    let server_creds = TlsCredentials::from_startup_kit(&prod.join("server1/startup")).unwrap();
    let net = TcpTransport::new(Fqcn::SERVER, wire_config());
    let listener = TlsListener::new(&server_creds, ConnectionSecurity::Mtls).unwrap();
    let addr = net
        .add_tls_listener("stcp://127.0.0.1:0", listener)
        .await
        .unwrap();
    let cell = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    cell.register_request_handler(
        "test",
        "echo",
        request_handler(|req: CellMessage| async move {
            let mut body = b"echo from fedrun: ".to_vec();
            body.extend_from_slice(req.payload.as_bytes().map_or(&[][..], |b| b.as_ref()));
            Ok(Some(CellMessage::new(Bytes::from(body))))
        }),
    )
    .await
    .unwrap();

    let site_kit = prod.join("site-2/startup");
    let mut py = Py::start(
        &python,
        &[
            "client",
            "--kit",
            site_kit.to_str().unwrap(),
            "--url",
            &format!("tcp://127.0.0.1:{}", addr.port()),
            "--site",
            "site-2",
            "--job",
            JOB,
            "--server-identity",
            "server1",
        ],
    );
    py.wait_event("connected", STARTUP).await;
    assert!(net.is_connected(&job_of("site-2")));
    let reply = py.wait_event("reply", STEP).await;
    assert_eq!(reply["rc"], "ok", "{reply}");
    assert_eq!(
        reply["payload"], "echo from fedrun: hello over mtls",
        "{reply}"
    );
    drop(py);
    cell.stop().await;
    net.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
