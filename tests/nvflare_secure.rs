//! Live secure messages (`cn__secure`) with NVIDIA FLARE 2.9: fedrun client job cells and a
//! real NVFlare server job cell exchange certificates and sealed requests both ways.
//!
//! The credentials are provisioned at test time by the venv's own `nvflare provision` (a
//! two-site project written by the test into a temporary folder), so they are fresh and valid
//! now. `tests/interop/nvflare_secure_cells.py` hosts NVFlare's server root cell `server` (clear
//! TCP, no credentials: it only relays) and the server job cell `server.<job>` with the
//! server's credentials in mTLS configuration (certificates bound to cell names). It reports
//! every envelope NVFlare's credential manager seals or opens, so the test sees that the
//! messages really were encrypted, not only answered.
//!
//! Steps: NVFlare asks fedrun first (NVFlare's key exchange answered by fedrun), streamed aux
//! and core bytes; fedrun asks NVFlare first (fedrun's key exchange), streamed aux (one chunk
//! and several) and core bytes; a fedrun cell without credentials cannot send a secure request
//! and nothing of it reaches NVFlare. NVFlare 2.9 cannot seal a FOBS payload on the core
//! (unstreamed) path, so object payloads go on the streamed aux channel, as NVFlare's aux runner
//! sends them (fedrun streams a secure object request on such a channel whatever its size, with
//! the default settings used here), and the core path carries bytes.
//!
//! Needs `FEDRUN_NVFLARE_PYTHON` (a Python with nvflare==2.9.0, set by `.ci/run`); without it
//! the test says so and passes. Every wait has a deadline, the script has its own watchdog, and
//! the Python process is killed by its pid when the test ends.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "interop/py_cells.rs"]
mod py_cells;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedrun::cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, Payload, SendRequest};
use fedrun::secure::CellCredentials;
use fedrun::{CellReturnCode, Map, Value};
use fedrun_wire::{TcpTransport, WireConfig};
use py_cells::{free_port, PyArgs, PyCells, PYTHON_ENV, STEP};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

const JOB: &str = "secure-1";
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/interop/nvflare_secure_cells.py"
);
const WATCHDOG_SECS: u64 = 58;
/// Streamed in four 1 MiB chunks, each its own envelope.
const LARGE: usize = 3 * 1024 * 1024 + 5;

const PROJECT_YML: &str = "\
api_version: 3
name: fedrun_secure
description: fedrun live secure-message test (generated test credentials)
participants:
  - name: server1
    type: server
    org: fedrun
    fed_learn_port: 8102
    default_host: localhost
  - name: site-1
    type: client
    org: fedrun
  - name: site-2
    type: client
    org: fedrun
builders:
  - path: nvflare.lighter.impl.workspace.WorkspaceBuilder
    args:
      template_file:
        - master_template.yml
  - path: nvflare.lighter.impl.static_file.StaticFileBuilder
    args:
      config_folder: config
      scheme: tcp
  - path: nvflare.lighter.impl.cert.CertBuilder
";

/// A temporary folder, removed when the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Provisions the project with `nvflare provision` and returns the folder of its packages.
fn provision(python: &str, dir: &Path) -> PathBuf {
    std::fs::write(dir.join("project.yml"), PROJECT_YML).unwrap();
    let out = Command::new(python)
        .current_dir(dir)
        .args([
            "-c",
            "import sys; from nvflare.cli import main; \
             sys.argv = ['nvflare', 'provision', '-p', 'project.yml', '-w', 'ws']; sys.exit(main())",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nvflare provision failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let prod = dir.join("ws/fedrun_secure/prod_00");
    assert!(
        prod.join("site-1/startup/client.key").exists(),
        "no site kit in {prod:?}"
    );
    prod
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn server_job() -> Fqcn {
    Fqcn::job_cell("server", JOB).unwrap()
}

fn config(creds: Option<CellCredentials>) -> WireConfig {
    WireConfig {
        reconnect_initial: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        // default stream settings: a secure object request on aux_communication is streamed
        // anyway, as NVFlare 2.9 can only seal object payloads chunk by chunk
        secure: creds.map(Arc::new),
        ..WireConfig::default()
    }
}

/// A fedrun job cell `name` connected to the Python root cell, with the secure handlers.
async fn job(
    name: &str,
    port: u16,
    creds: Option<CellCredentials>,
) -> (
    TcpTransport,
    CellHandle,
    mpsc::UnboundedReceiver<CellMessage>,
) {
    let me = Fqcn::new(name).unwrap();
    let net = TcpTransport::new(me.clone(), config(creds));
    net.add_connector(&format!("tcp://127.0.0.1:{port}"))
        .unwrap();
    assert!(
        net.wait_for_peer(&Fqcn::SERVER, STEP).await,
        "no handshake with the Python root cell"
    );
    let cell = Cell::start(me, net.clone()).unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let echo = {
        let tx = tx.clone();
        let name = name.to_owned();
        request_handler(move |req: CellMessage| {
            let tx = tx.clone();
            let name = name.clone();
            async move {
                let got = req.payload.as_value().and_then(|v| v.as_map()).cloned();
                let x = got.as_ref().and_then(|m| m.get("x")).cloned();
                let blob_len = got
                    .as_ref()
                    .and_then(|m| m.get("blob"))
                    .and_then(Value::as_bin)
                    .map(|b| b.len());
                let mut reply = Map::new();
                reply.insert("echo_x", x.unwrap_or(Value::Nil));
                reply.insert("blob_len", blob_len.map_or(Value::Nil, Value::from));
                reply.insert("req_secure", req.headers.secure().unwrap_or(false));
                reply.insert("from", name.as_str());
                let _ = tx.send(req);
                Ok(Some(CellMessage::new(Payload::value(Value::Map(reply)))))
            }
        })
    };
    let bytes_echo = {
        let name = name.to_owned();
        request_handler(move |req: CellMessage| {
            let tx = tx.clone();
            let name = name.clone();
            async move {
                let mut out = format!("echo from {name}: ").into_bytes();
                out.extend_from_slice(req.payload.as_bytes().map_or(&[][..], |b| &b[..]));
                let _ = tx.send(req);
                Ok(Some(CellMessage::new(Payload::Bytes(Bytes::from(out)))))
            }
        })
    };
    cell.register_request_handler("aux_communication", "secure_echo", echo)
        .await
        .unwrap();
    cell.register_request_handler("task", "secure_bytes", bytes_echo)
        .await
        .unwrap();
    (net, cell, seen)
}

fn blob_map(x: i64, len: usize) -> Payload {
    let mut m = Map::new();
    m.insert("x", x);
    let blob: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    m.insert("blob", Value::Bin(Bytes::from(blob)));
    Payload::value(Value::Map(m))
}

fn map_of(reply: &CellMessage) -> &Map {
    assert_eq!(
        reply.return_code(),
        CellReturnCode::Ok,
        "reply: {:?}",
        reply.headers
    );
    reply
        .payload
        .as_value()
        .and_then(|v| v.as_map())
        .expect("the reply payload is not a map")
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<CellMessage>) -> CellMessage {
    timeout(STEP, rx.recv())
        .await
        .expect("the fedrun handler saw nothing before the deadline")
        .expect("handler channel closed")
}

/// How many envelopes NVFlare sealed and opened since the last call.
fn cipher_ops(py: &mut PyCells) -> (usize, usize) {
    let ops = py.drain("cipher");
    let count = |op: &str| ops.iter().filter(|e| e["op"] == op).count();
    (count("encrypt"), count("decrypt"))
}

#[actix::test]
async fn secure_messages_flow_both_ways_between_fedrun_and_live_nvflare_cells() {
    let Ok(python) = std::env::var(PYTHON_ENV) else {
        eprintln!(
            "NOTICE: {PYTHON_ENV} is not set: the live NVFlare secure-message test is skipped. \
             Run `bash .ci/run` (it creates .venv with nvflare==2.9.0 and sets it), or set \
             {PYTHON_ENV} to a Python that has nvflare==2.9.0."
        );
        return;
    };
    init_log();
    let dir = TempDir(std::env::temp_dir().join(format!(
        "fedrun-secure-{}-{}",
        std::process::id(),
        free_port()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let prod = provision(&python, &dir.0);
    let kit =
        |site: &str| CellCredentials::from_startup_kit(prod.join(site).join("startup")).unwrap();
    let server_kit = prod.join("server1/startup");
    let port = free_port();
    let mut py = PyCells::start_script(
        SCRIPT,
        PyArgs {
            python: &python,
            port,
            job: JOB,
            watchdog_secs: WATCHDOG_SECS,
            extra: &["--kit", server_kit.to_str().unwrap()],
        },
    )
    .await;
    let sj = server_job();

    // ---- A. NVFlare asks first: its key exchange is answered by fedrun
    let site1 = format!("site-1.{JOB}");
    let (net1, cell1, mut seen1) = job(&site1, port, Some(kit("site-1"))).await;
    let done = py
        .command(json!({"cmd": "ask_secure", "target": site1, "x": 7, "blob_kib": 2}))
        .await;
    assert_eq!(done["rc"], "ok", "{done}");
    assert_eq!(done["payload"]["echo_x"], 7);
    assert_eq!(done["payload"]["blob_len"], 2048);
    assert_eq!(done["payload"]["req_secure"], true);
    assert_eq!(
        done["secure"], true,
        "the streamed reply to a secure request is secure"
    );
    let req = next_seen(&mut seen1).await;
    assert_eq!(req.headers.secure(), Some(true));
    let (sealed, opened) = cipher_ops(&mut py);
    assert!(
        sealed >= 1 && opened >= 1,
        "NVFlare sealed {sealed}, opened {opened}"
    );

    let done = py
        .command(json!({"cmd": "ask_secure_bytes", "target": site1, "text": "hello from nvflare"}))
        .await;
    assert_eq!(done["rc"], "ok", "{done}");
    assert_eq!(
        done["payload"]["$text"],
        format!("echo from {site1}: hello from nvflare")
    );
    next_seen(&mut seen1).await;
    assert_eq!(
        cipher_ops(&mut py),
        (1, 1),
        "one sealed request, one sealed reply"
    );

    // then fedrun asks, with the certificate it learnt from NVFlare's exchange
    let reply = cell1
        .send_request(
            SendRequest::new(
                "aux_communication",
                "secure_echo",
                sj.clone(),
                CellMessage::new(blob_map(41, 3000)),
                STEP,
            )
            .with_secure(true),
        )
        .await
        .unwrap();
    let m = map_of(&reply);
    assert_eq!(m.get("echo_x").and_then(Value::as_i64), Some(41));
    assert_eq!(m.get("blob_len").and_then(Value::as_u64), Some(3000));
    assert_eq!(m.get("req_secure").and_then(Value::as_bool), Some(true));
    let (sealed, opened) = cipher_ops(&mut py);
    assert!(
        sealed >= 1 && opened >= 1,
        "NVFlare sealed {sealed}, opened {opened}"
    );

    // ---- B. fedrun asks first: fedrun's key exchange; several chunks, each its own envelope
    let site2 = format!("site-2.{JOB}");
    let (net2, cell2, _seen2) = job(&site2, port, Some(kit("site-2"))).await;
    let reply = cell2
        .send_request(
            SendRequest::new(
                "aux_communication",
                "secure_echo",
                sj.clone(),
                CellMessage::new(blob_map(42, LARGE)),
                STEP,
            )
            .with_secure(true),
        )
        .await
        .unwrap();
    let m = map_of(&reply);
    assert_eq!(m.get("echo_x").and_then(Value::as_i64), Some(42));
    assert_eq!(
        m.get("blob_len").and_then(Value::as_u64),
        Some(LARGE as u64)
    );
    let (_, opened) = cipher_ops(&mut py);
    assert!(
        opened >= 4,
        "NVFlare opened {opened} envelopes of a 4-chunk stream"
    );
    let reply = cell2
        .send_request(
            SendRequest::new(
                "task",
                "secure_bytes",
                sj.clone(),
                CellMessage::new(Payload::Bytes(Bytes::from_static(b"hello from fedrun"))),
                STEP,
            )
            .with_secure(true),
        )
        .await
        .unwrap();
    assert_eq!(
        reply.return_code(),
        CellReturnCode::Ok,
        "{:?}",
        reply.headers
    );
    assert_eq!(
        reply.payload.as_bytes().map(|b| &b[..]),
        Some(format!("echo from {sj}: hello from fedrun").as_bytes())
    );
    assert_eq!(
        cipher_ops(&mut py),
        (1, 1),
        "one sealed request, one sealed reply"
    );

    // ---- C. no credentials: the secure send fails, nothing reaches NVFlare in clear
    let bare = format!("site-2.{JOB}-bare");
    let (net3, cell3, _seen3) = job(&bare, port, None).await;
    let reply = cell3
        .send_request(
            SendRequest::new(
                "task",
                "secure_bytes",
                sj.clone(),
                CellMessage::new(Payload::Bytes(Bytes::from_static(b"must not leave"))),
                STEP,
            )
            .with_secure(true),
        )
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::AuthenticationError);
    // a plain request after it is the first thing NVFlare sees from that cell
    let reply = cell3
        .send_request(SendRequest::new(
            "task",
            "secure_bytes",
            sj.clone(),
            CellMessage::new(Payload::Bytes(Bytes::from_static(b"plain"))),
            STEP,
        ))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    let from_bare: Vec<_> = py
        .drain("request")
        .into_iter()
        .filter(|e| e["origin"] == bare.as_str())
        .collect();
    assert_eq!(from_bare.len(), 1, "{from_bare:?}");
    assert_eq!(from_bare[0]["payload"]["$text"], "plain");

    for (net, cell) in [(net1, cell1), (net2, cell2), (net3, cell3)] {
        cell.stop().await;
        net.shutdown().await;
    }
    py.quit().await;
}
