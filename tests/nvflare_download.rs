//! Live NVFlare 2.9 numpy download references, both ways, against real NVFlare Python cells.
//!
//! `tests/download.rs` checks fedrun against itself; only a live NVFlare shows that both sides
//! agree on the dot-3 datum, the placeholders, the `.npz` items and the status/state protocol.
//! `tests/interop/nvflare_cells.py --np-download` hosts NVFlare's server root cell and server
//! job cell with NVFlare's default `np_download_chunk_size` (2 MiB), so every array it sends
//! leaves as a download reference, and every reference it receives is pulled while NVFlare's
//! own FOBS decodes the message. The steps:
//!
//! 1. Python sends fedrun a Shareable of arrays (a 3 MiB float32, so several batches, a small
//!    float32, a float64), as a plain request and as a streamed one; the fedrun handler sees the
//!    exact arrays, downloaded by its `ArrayResolver` from Python's download service.
//! 2. fedrun sends Python a Shareable whose arrays its `DownloadService` offers; NVFlare pulls
//!    them and reports what it got; its reply carries an array as a reference again. And a
//!    fedrun handler answers a Python request with arrays offered the same way.
//! 3. fedrun asks Python for the arrays: the reply is resolved before the requester sees it.
//! 4. Python sends references that cannot be resolved (unknown ref id, unreachable producer):
//!    fedrun answers with an error and its handler never runs; a reply with such references
//!    reaches the fedrun requester as an error reply.
//!
//! Needs `FEDRUN_NVFLARE_PYTHON` (a Python with nvflare==2.9.0); without it the test prints a
//! notice and passes. Every wait has a deadline, the script has its own watchdog, and the Python
//! process is killed by its pid when the test ends, even on failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "interop/py_cells.rs"]
mod py_cells;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fedrun::cell::{header, request_handler, Cell, CellHandle, CellMessage, Fqcn, SendRequest};
use fedrun::core::NdArray;
use fedrun::engine::download::{ArrayResolver, DownloadConfig, DownloadService};
use fedrun::fobs::download_ref::refs_from_value;
use fedrun::{AppReturnCode, CellReturnCode, Map, Shareable, Value};
use fedrun_wire::{TcpTransport, WireConfig};
use py_cells::{free_port, PyArgs, PyCells, PYTHON_ENV, STEP};
use serde_json::{json, Value as Json};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// The job of the Python server job cell and of the fedrun client job cell.
const JOB: &str = "dl-1";
/// The Python script ends itself after this many seconds, whatever happens.
const WATCHDOG_SECS: u64 = 88;
/// The whole test must stay under this.
const WHOLE_TEST: Duration = Duration::from_secs(90);
/// NVFlare's default `np_download_chunk_size`.
const CHUNK: u64 = 2 * 1024 * 1024;

fn me() -> Fqcn {
    Fqcn::job_cell("site-1", JOB).unwrap()
}

fn server_job() -> Fqcn {
    Fqcn::job_cell("server", JOB).unwrap()
}

/// The value formula of the test arrays (the script's `make_arrays`): exact in f32 and f64.
fn v(i: usize) -> f64 {
    ((i * 7 + 3) % 1001) as f64 * 0.125 - 60.0
}

fn big() -> NdArray {
    let data: Vec<f32> = (0..768 * 1024).map(|i| v(i) as f32).collect();
    NdArray::from_f32(&[768, 1024], &data).unwrap()
}

fn mid() -> NdArray {
    let data: Vec<f32> = (0..1000).map(|i| (v(i) + 0.5) as f32).collect();
    NdArray::from_f32(&[1000], &data).unwrap()
}

fn small() -> NdArray {
    let data: Vec<f64> = (0..6).map(|i| v(i) + 1.0 / 3.0).collect();
    NdArray::from_f64(&[3, 2], &data).unwrap()
}

/// The Shareable of arrays both sides send (the script's `arrays_shareable`).
fn arrays_shareable() -> Shareable {
    let mut weights = Map::new();
    weights.insert("big", big());
    weights.insert("mid", mid());
    let mut s = Shareable::new();
    s.set_header("task_name", "train");
    s.insert("weights", Value::Map(weights));
    s.insert("small", small());
    s.insert("round", 7);
    s
}

/// Sum of an array's values as f64 (what the script reports as `sum`).
fn sum(a: &NdArray) -> f64 {
    match a.descr() {
        "<f4" => a.to_f32_vec().unwrap().iter().map(|x| f64::from(*x)).sum(),
        _ => a.to_f64_vec().unwrap().iter().sum(),
    }
}

/// `got` is exactly `want`: dtype, shape and every value.
fn assert_same_array(name: &str, got: Option<&Value>, want: &NdArray) {
    let got = got
        .and_then(Value::as_ndarray)
        .unwrap_or_else(|| panic!("{name} is not an ndarray: {got:?}"));
    assert_eq!(got.descr(), want.descr(), "{name} dtype");
    assert_eq!(got.shape(), want.shape(), "{name} shape");
    if want.descr() == "<f4" {
        assert_eq!(
            got.to_f32_vec().unwrap(),
            want.to_f32_vec().unwrap(),
            "{name}"
        );
    } else {
        assert_eq!(
            got.to_f64_vec().unwrap(),
            want.to_f64_vec().unwrap(),
            "{name}"
        );
    }
}

/// `s` holds exactly the test arrays.
fn assert_test_arrays(s: &Shareable) {
    let weights = s
        .get("weights")
        .and_then(Value::as_map)
        .expect("no weights map");
    assert_same_array("weights.big", weights.get("big"), &big());
    assert_same_array("weights.mid", weights.get("mid"), &mid());
    assert_same_array("small", s.get("small"), &small());
    assert_eq!(s.get("round").and_then(Value::as_i64), Some(7));
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

async fn connect(port: u16) -> TcpTransport {
    let config = WireConfig {
        reconnect_initial: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        ..WireConfig::default()
    };
    let transport = TcpTransport::new(me(), config);
    transport
        .add_connector(&format!("tcp://127.0.0.1:{port}"))
        .unwrap();
    assert!(
        transport.wait_for_peer(&Fqcn::SERVER, STEP).await,
        "no handshake with the Python server root cell"
    );
    transport
}

/// Handlers for `task/arrays` and `interop/arrays` (a core and a stream channel): what they
/// receive goes to the returned channel.
async fn register_handlers(cell: &CellHandle) -> mpsc::UnboundedReceiver<CellMessage> {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = request_handler(move |req: CellMessage| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(req);
            let mut answer = Shareable::make_reply(AppReturnCode::Ok, None);
            answer.insert("answer", "arrays seen by fedrun");
            Ok(Some(CellMessage::new(answer)))
        }
    });
    for channel in ["task", "interop"] {
        cell.register_request_handler(channel, "arrays", handler.clone())
            .await
            .unwrap();
    }
    rx
}

/// Python's download service served batch `ref_id` to fedrun: data replies (at least two, one
/// holding only the 3 MiB item), then `eof`. Returns the number of data replies.
fn assert_served_in_batches(served: &[Json], ref_id: &str, me: &str) -> usize {
    let mine: Vec<&Json> = served.iter().filter(|e| e["ref_id"] == ref_id).collect();
    assert!(
        mine.iter().all(|e| e["origin"] == me),
        "served to someone else: {mine:?}"
    );
    let data: Vec<&&Json> = mine.iter().filter(|e| e["status"] == "ok").collect();
    assert!(data.len() >= 2, "expected several batches: {mine:?}");
    assert!(
        data.iter()
            .any(|e| e["items"] == 1 && e["item_bytes"][0].as_u64().is_some_and(|n| n > CHUNK)),
        "the big array did not go alone: {mine:?}"
    );
    let items: u64 = data.iter().map(|e| e["items"].as_u64().unwrap()).sum();
    assert_eq!(items, 3, "{mine:?}");
    assert!(
        mine.iter().any(|e| e["status"] == "eof"),
        "no eof: {mine:?}"
    );
    data.len()
}

/// Waits for the `ref_created` event of one payload Python sent and checks it names the
/// Python job cell (or the tampered producer).
async fn python_ref(py: &mut PyCells, tampered: Option<&str>) -> Json {
    let (_, e) = py
        .wait_event("ref_created", |e| e["tampered"] == json!(tampered))
        .await;
    assert_eq!(e["dot"], 3, "{e}");
    e
}

#[actix::test]
async fn numpy_download_refs_interoperate_with_live_nvflare_cells() {
    let Ok(python) = std::env::var(PYTHON_ENV) else {
        eprintln!(
            "NOTICE: {PYTHON_ENV} is not set: the live NVFlare download-reference test is \
             skipped. Set {PYTHON_ENV} to a Python that has nvflare==2.9.0 (`bash .ci/run` \
             creates .venv and sets it)."
        );
        return;
    };
    init_log();
    let started = Instant::now();
    let port = free_port();
    let mut py = PyCells::start(PyArgs {
        python: &python,
        port,
        job: JOB,
        watchdog_secs: WATCHDOG_SECS,
        extra: &["--np-download"],
    })
    .await;
    let me = me();
    let my_name = me.to_string();

    let transport = connect(port).await;
    let cell = Cell::start(me.clone(), transport.clone()).unwrap();
    let config = DownloadConfig {
        request_timeout: Duration::from_secs(5),
        max_retries: 1,
        ..DownloadConfig::default()
    };
    let resolver = ArrayResolver::new(cell.clone(), "site-1", JOB, config.clone());
    cell.set_payload_resolver(Some(Arc::new(resolver)))
        .await
        .unwrap();
    let offers = DownloadService::start(&cell, "site-1", JOB, &config)
        .await
        .unwrap();
    let mut seen = register_handlers(&cell).await;

    // ---- 1. Python -> fedrun: arrays as refs on a core channel, then on a stream channel
    for (channel, streamed) in [("task", false), ("interop", true)] {
        let done = py
            .command(
                json!({"cmd": "ask_arrays", "target": my_name, "channel": channel,
                            "topic": "arrays"}),
            )
            .await;
        assert_eq!(done["streamed"], streamed);
        assert_eq!(done["rc"], "ok", "{done}");
        assert_eq!(done["payload"]["answer"], "arrays seen by fedrun");
        let r = python_ref(&mut py, None).await;
        assert_eq!(r["fqcn"], server_job().as_str());
        let got = timeout(STEP, seen.recv()).await.unwrap().unwrap();
        assert_eq!(got.headers.channel(), Some(channel));
        assert!(!got.headers.contains_key(header::DOWNLOAD_REFS));
        let s = got.payload.as_shareable().expect("not a Shareable");
        assert_test_arrays(s);
        assert_eq!(
            s.header_or_none("task_name").and_then(Value::as_str),
            Some("train")
        );
        // fedrun's confirmation (fire-and-forget, after eof) may still be on its way
        let ref_id = r["ref_id"].as_str().unwrap().to_owned();
        let id = ref_id.clone();
        py.wait_event("download_served", |e| {
            e["ref_id"] == id.as_str() && e["confirm"] == "success"
        })
        .await;
        let served = py.drain("download_served");
        let batches = assert_served_in_batches(&served, &ref_id, &my_name);
        eprintln!("step 1 ({channel}): {batches} data batches from NVFlare");
    }

    // ---- 2. fedrun -> Python: arrays offered by fedrun's DownloadService, pulled by NVFlare
    let mut body = arrays_shareable();
    let refs = offers.offer(&mut body).expect("arrays to offer");
    let ref_id = refs_from_value(&refs).unwrap()[0].ref_id.clone();
    assert!(offers.holds(&ref_id));
    let msg = CellMessage::new(body).with_header(header::DOWNLOAD_REFS, refs);
    let req = SendRequest::new("aux_communication", "np_check", server_job(), msg, STEP);
    let reply = cell.send_request(req).await.unwrap();
    assert_eq!(
        reply.return_code(),
        CellReturnCode::Ok,
        "{:?}",
        reply.headers
    );
    let (_, e) = py.wait_event("arrays_received", |_| true).await;
    assert_eq!(e["origin"], my_name.as_str());
    for (name, want) in [("big", big()), ("mid", mid()), ("small", small())] {
        let got = &e["arrays"][name];
        assert_eq!(got["type"], "ndarray", "{name}: {got}");
        assert_eq!(got["equal"], true, "{name}: {got}");
        assert_eq!(got["shape"], json!(want.shape()), "{name}");
        assert_eq!(got["sum"].as_f64(), Some(sum(&want)), "{name}: {got}");
    }
    assert_eq!(e["arrays"]["big"]["dtype"], "float32");
    assert_eq!(e["arrays"]["small"]["dtype"], "float64");
    let s = reply.payload.as_shareable().expect("reply not a Shareable");
    assert_eq!(s.return_code().as_str(), "OK");
    assert_eq!(s.get("all_equal").and_then(Value::as_bool), Some(true));
    assert_eq!(s.get("round").and_then(Value::as_i64), Some(7));
    // the reply's own array came as a ref from Python and was resolved by fedrun
    python_ref(&mut py, None).await;
    assert_same_array("echo_small", s.get("echo_small"), &small());
    // NVFlare read fedrun's batch to its end: the arrays are released
    assert!(!offers.holds(&ref_id), "fedrun still holds batch {ref_id}");

    // ---- 2b. Python asks fedrun on a stream channel; fedrun's (streamed) reply offers arrays
    let (ref_tx, mut ref_rx) = mpsc::unbounded_channel();
    let o = offers.clone();
    let give = request_handler(move |_req: CellMessage| {
        let (o, ref_tx) = (o.clone(), ref_tx.clone());
        async move {
            let mut answer = Shareable::make_reply(AppReturnCode::Ok, None);
            answer.insert("mid", mid());
            answer.insert("small", small());
            let refs = o.offer(&mut answer).expect("arrays to offer");
            let _ = ref_tx.send(refs_from_value(&refs).unwrap()[0].ref_id.clone());
            Ok(Some(
                CellMessage::new(answer).with_header(header::DOWNLOAD_REFS, refs),
            ))
        }
    });
    cell.register_request_handler("interop", "give_arrays", give)
        .await
        .unwrap();
    let done = py
        .command(
            json!({"cmd": "ask", "target": my_name, "channel": "interop",
                        "topic": "give_arrays", "payload": {}}),
        )
        .await;
    assert_eq!(done["streamed"], true);
    assert_eq!(done["rc"], "ok", "{done}");
    let got = &done["payload"]["mid"]["$ndarray"];
    assert_eq!(got["dtype"], "float32", "{done}");
    assert_eq!(got["values"], json!(mid().to_f32_vec().unwrap()));
    let got = &done["payload"]["small"]["$ndarray"];
    assert_eq!(got["dtype"], "float64", "{done}");
    assert_eq!(got["shape"], json!([3, 2]));
    assert_eq!(got["values"], json!(small().to_f64_vec().unwrap()));
    let reply_ref = timeout(STEP, ref_rx.recv()).await.unwrap().unwrap();
    assert!(!offers.holds(&reply_ref), "fedrun still holds {reply_ref}");

    // ---- 3. fedrun asks, Python's reply carries the arrays as refs
    let req = SendRequest::new(
        "aux_communication",
        "get_arrays",
        server_job(),
        CellMessage::new(Shareable::new()),
        STEP,
    );
    let reply = cell.send_request(req).await.unwrap();
    assert_eq!(
        reply.return_code(),
        CellReturnCode::Ok,
        "{:?}",
        reply.headers
    );
    assert_test_arrays(reply.payload.as_shareable().expect("reply not a Shareable"));
    let r = python_ref(&mut py, None).await;
    let id = r["ref_id"].as_str().unwrap().to_owned();
    let wanted = id.clone();
    py.wait_event("download_served", |e| {
        e["ref_id"] == wanted.as_str() && e["confirm"] == "success"
    })
    .await;
    assert_served_in_batches(&py.drain("download_served"), &id, &my_name);

    // ---- 4. refs fedrun cannot resolve: an error, never a payload with placeholders
    for (mode, error_has) in [
        ("unknown_ref", "invalid_request"),
        ("unreachable", "server.nowhere"),
    ] {
        py.command(json!({"cmd": "tamper", "mode": mode})).await;
        // a request from Python: answered with the error, the handler never runs
        let done = py
            .command(
                json!({"cmd": "ask_arrays", "target": my_name, "channel": "task",
                            "topic": "arrays", "timeout": 14}),
            )
            .await;
        python_ref(&mut py, Some(mode)).await;
        assert_eq!(done["rc"], "comm_error", "{mode}: {done}");
        let error = done["error"].as_str().unwrap_or("");
        assert!(error.contains(error_has), "{mode}: {done}");
        assert!(seen.try_recv().is_err(), "{mode}: the handler ran");
        // a reply to fedrun: the requester gets an error reply without a payload
        let req = SendRequest::new(
            "aux_communication",
            "get_arrays",
            server_job(),
            CellMessage::new(Shareable::new()),
            STEP,
        );
        let reply = cell.send_request(req).await.unwrap();
        python_ref(&mut py, Some(mode)).await;
        assert_eq!(reply.return_code(), CellReturnCode::CommError, "{mode}");
        assert!(
            reply.headers.error().is_some_and(|e| e.contains(error_has)),
            "{mode}: {:?}",
            reply.headers.error()
        );
        assert!(reply.payload.is_none(), "{mode}: {:?}", reply.payload);
    }
    py.command(json!({"cmd": "tamper", "mode": null})).await;

    cell.stop().await;
    transport.shutdown().await;
    py.quit().await;
    let elapsed = started.elapsed();
    eprintln!("live NVFlare download refs: all steps passed in {elapsed:?}");
    assert!(elapsed < WHOLE_TEST, "the download test took {elapsed:?}");
}
