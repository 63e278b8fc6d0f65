//! Live interop with NVIDIA FLARE 2.9: fedrun cells and a fedrun client job engine
//! talk to real NVFlare Python cells over loopback TCP.
//!
//! The byte-level tests (`crates/fedrun-wire/tests`) replay captured frames; only a live peer
//! shows that both sides agree on everything at once: the handshake, routing through the server
//! root, FOBS payloads both ways, streamed requests and their streamed replies, heartbeats and
//! goodbyes, and the aux protocol of the engine. `tests/interop/nvflare_cells.py` hosts NVFlare's
//! server root cell `server` (listening on a free port of 127.0.0.1) and a server job cell
//! `server.<job>`; it prints one JSON event per line for everything it observes and takes one
//! JSON command per line for everything the Python side must start.
//!
//! The test needs NVFlare 2.9.0: `FEDRUN_NVFLARE_PYTHON` names a Python interpreter that has it
//! (`.ci/run` creates `.venv` and exports it). Without the variable the test prints a notice and
//! passes, so `cargo test --workspace` works without Python; with it, every step must succeed.
//! Every wait has a deadline, the script has its own watchdog, and the Python process is killed
//! by its pid when the test ends, even on failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "interop/py_cells.rs"]
mod py_cells;

use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun::cell::{
    request_handler, Cell, CellHandle, CellMessage, FireAndForget, Fqcn, SendRequest,
};
use fedrun::core::NdArray;
use fedrun::engine::{aux_handler, AuxRequest, AuxTargets};
use fedrun::{AppReturnCode, CellReturnCode, ClientEngine, Map, Shareable, Value};
use fedrun_wire::{TcpTransport, WireConfig};
use py_cells::{free_port, PyArgs, PyCells, PYTHON_ENV, STEP};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::timeout;

/// The job of the Python server job cell and of the fedrun client job cell.
const JOB: &str = "interop-1";
/// The Python script ends itself after this many seconds, whatever happens.
const WATCHDOG_SECS: u64 = 58;
/// The whole test must stay under this.
const WHOLE_TEST: Duration = Duration::from_secs(60);
/// Size of the large streamed message: above NVFlare's 1 MiB chunk and fedrun's 4 MiB ACK
/// interval, and not a multiple of either.
const LARGE: usize = 5 * 1024 * 1024 + 777;
/// Size of the request fedrun streams to Python: above fedrun's 1 MiB streaming threshold
/// (`StreamSendConfig::threshold`), so it leaves as four chunks.
const STREAMED_UP: usize = 3 * 1024 * 1024 + 5;

/// `len` bytes of the test pattern.
fn pattern(len: usize) -> Bytes {
    Bytes::from((0..len).map(pattern_byte).collect::<Vec<u8>>())
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// The byte pattern of the large message (same formula as the script's `pattern`).
fn pattern_byte(i: usize) -> u8 {
    ((i * 7 + 3) % 251) as u8
}

// ----------------------------------------------------------------------------------------------
// The fedrun side

fn me() -> Fqcn {
    Fqcn::job_cell("site-1", JOB).unwrap()
}

fn server_job() -> Fqcn {
    Fqcn::job_cell("server", JOB).unwrap()
}

fn wire_config() -> WireConfig {
    WireConfig {
        // idle PINGs from fedrun after one quiet second (step g)
        heartbeat_interval: Duration::from_secs(1),
        reconnect_initial: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
        ..WireConfig::default()
    }
}

/// A transport named `site-1.<job>`, connected to the Python server root cell.
async fn connect(port: u16) -> TcpTransport {
    let transport = TcpTransport::new(me(), wire_config());
    transport
        .add_connector(&format!("tcp://127.0.0.1:{port}"))
        .unwrap();
    assert!(
        transport.wait_for_peer(&Fqcn::SERVER, STEP).await,
        "no handshake with the Python server root cell"
    );
    transport
}

/// A Shareable with a value of each kind FOBS carries natively or by a builtin tag.
fn sample() -> Shareable {
    let mut nested = Map::new();
    nested.insert("k", Value::from(vec![Value::from(1), Value::from("v")]));
    let mut s = Shareable::new();
    s.set_header("__task_name__", "train");
    s.insert("int", -7);
    s.insert("big", u64::MAX);
    s.insert("float", 2.5);
    s.insert("text", "three");
    s.insert("bytes", Bytes::from_static(&[4, 0, 255]));
    s.insert("none", Value::Nil);
    s.insert("flag", true);
    s.insert("list", Value::from(vec![Value::from(1), Value::from("a")]));
    s.insert(
        "tuple",
        Value::Tuple(vec![Value::from(1), Value::from("x")]),
    );
    s.insert("nested", nested);
    s
}

fn with(key: &str, value: impl Into<Value>) -> Shareable {
    let mut s = Shareable::new();
    s.insert(key, value);
    s
}

fn str_of<'a>(s: &'a Shareable, key: &str) -> Option<&'a str> {
    s.get(key).and_then(Value::as_str)
}

/// The cell handlers of phase 1; what they receive goes to the returned channel.
async fn register_handlers(cell: &CellHandle) -> mpsc::UnboundedReceiver<CellMessage> {
    let (tx, rx) = mpsc::unbounded_channel();
    let question = {
        let tx = tx.clone();
        request_handler(move |req: CellMessage| {
            let tx = tx.clone();
            async move {
                let q = req
                    .payload
                    .as_shareable()
                    .and_then(|s| str_of(s, "q"))
                    .unwrap_or("")
                    .to_owned();
                let channel = req.headers.channel().unwrap_or("").to_owned();
                let _ = tx.send(req);
                let mut answer = Shareable::make_reply(AppReturnCode::Ok, None);
                answer.insert("answer", "from fedrun");
                answer.insert("q", q);
                answer.insert("channel", channel);
                Ok(Some(CellMessage::new(answer)))
            }
        })
    };
    let large = {
        let tx = tx.clone();
        request_handler(move |req: CellMessage| {
            let tx = tx.clone();
            async move {
                let blob = req
                    .payload
                    .as_shareable()
                    .and_then(|s| s.get("blob"))
                    .and_then(Value::as_bin)
                    .cloned()
                    .unwrap_or_default();
                let pattern_ok = blob.iter().enumerate().all(|(i, b)| *b == pattern_byte(i));
                let _ = tx.send(req);
                let mut answer = Shareable::make_reply(AppReturnCode::Ok, None);
                answer.insert("len", blob.len());
                answer.insert("pattern_ok", pattern_ok);
                Ok(Some(CellMessage::new(answer)))
            }
        })
    };
    let note = request_handler(move |req: CellMessage| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(req);
            Ok(None)
        }
    });
    for (channel, topic, handler) in [
        ("interop", "question", question.clone()),
        ("task", "question", question),
        ("interop", "large", large),
        ("interop", "note", note.clone()),
        ("task", "note", note),
    ] {
        cell.register_request_handler(channel, topic, handler)
            .await
            .unwrap();
    }
    rx
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<CellMessage>) -> CellMessage {
    timeout(STEP, rx.recv())
        .await
        .expect("the fedrun handler saw nothing before the deadline")
        .expect("handler channel closed")
}

async fn request(cell: &CellHandle, channel: &str, topic: &str, body: Shareable) -> CellMessage {
    let req = SendRequest::new(channel, topic, server_job(), CellMessage::new(body), STEP);
    cell.send_request(req).await.unwrap()
}

fn reply_shareable(reply: &CellMessage) -> &Shareable {
    assert_eq!(
        reply.return_code(),
        CellReturnCode::Ok,
        "reply: {:?}",
        reply.headers
    );
    reply
        .payload
        .as_shareable()
        .expect("the reply payload is not a Shareable")
}

// ----------------------------------------------------------------------------------------------
// The test

#[actix::test]
async fn fedrun_cells_and_engine_interoperate_with_live_nvflare_cells() {
    let Ok(python) = std::env::var(PYTHON_ENV) else {
        eprintln!(
            "NOTICE: {PYTHON_ENV} is not set: the live NVFlare interop test is skipped. \
             Run `bash .ci/run` (it creates .venv with nvflare==2.9.0 and sets it), or set \
             {PYTHON_ENV} to a Python that has nvflare==2.9.0."
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
        extra: &[],
    })
    .await;
    let me = me();
    let my_name = me.to_string();

    // ---- a. connect: HELLO/READY with the Python server root cell
    let transport = connect(port).await;
    assert_eq!(transport.peers(), vec![Fqcn::SERVER]);
    py.wait_event("peer_state", |e| {
        e["peer"] == my_name && e["state"] == "READY"
    })
    .await;
    let cell = Cell::start(me.clone(), transport.clone()).unwrap();
    let mut seen = register_handlers(&cell).await;

    // ---- b. request on a non-stream channel, forwarded by the root; the Shareable comes back
    let body = sample();
    let reply = request(&cell, "task", "echo", body.clone()).await;
    assert_eq!(reply_shareable(&reply), &body);
    assert_eq!(reply.headers.origin(), Some(server_job().as_str()));
    let (_, e) = py
        .wait_event("request", |e| {
            e["channel"] == "task" && e["topic"] == "echo"
        })
        .await;
    assert_eq!(e["origin"], my_name);
    assert_eq!(e["via"], "core");
    assert_eq!(e["payload"]["text"], "three");
    assert_eq!(e["payload"]["big"], json!(u64::MAX));
    assert_eq!(e["payload"]["tuple"], json!({"$tuple": [1, "x"]}));
    assert_eq!(
        e["payload"]["bytes"],
        json!({"$bytes_len": 3, "$bytes_sum": 259})
    );

    // ---- c. request on aux_communication (a stream channel), sent unstreamed by fedrun
    let reply = request(
        &cell,
        "aux_communication",
        "interop_echo",
        with("x", "aux-1"),
    )
    .await;
    let s = reply_shareable(&reply);
    assert_eq!(s.return_code().as_str(), "OK");
    assert_eq!(str_of(s, "echo"), Some("aux-1"));
    assert_eq!(str_of(s, "via"), Some("core"));

    // ---- c2. server_command/get_task: a task with a numpy array back
    let mut pull = Shareable::new();
    pull.set_header("last_task_id", "none");
    let reply = request(&cell, "server_command", "get_task", pull).await;
    let task = reply_shareable(&reply);
    assert_eq!(
        task.header_or_none("task_name").and_then(Value::as_str),
        Some("train")
    );
    assert_eq!(
        task.cookie("task_id").and_then(Value::as_str),
        Some("tid-0001")
    );
    let weights = task
        .get("weights")
        .and_then(Value::as_ndarray)
        .expect("weights are not an inline ndarray");
    assert_eq!(weights.shape(), &[3]);
    assert_eq!(weights.to_f32_vec().unwrap(), vec![0.5, -1.25, 3.0]);

    // ---- c3. numpy both ways (inline arrays): Python sums ours, sends its own
    let w = NdArray::from_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
    let reply = request(&cell, "aux_communication", "np_sum", with("w", w)).await;
    let s = reply_shareable(&reply);
    assert_eq!(str_of(s, "got_type"), Some("ndarray"));
    assert_eq!(s.get("got_sum").and_then(Value::as_f64), Some(15.0));
    let w2 = s.get("w2").and_then(Value::as_ndarray).expect("w2 missing");
    assert_eq!(w2.shape(), &[2, 2]);
    assert_eq!(w2.to_i32_vec().unwrap(), vec![1, 2, 3, 4]);

    // ---- c4. fedrun -> Python, streamed: a multi-chunk submit_update whose
    //          reply comes back as a stream on return_only
    let reply = request(
        &cell,
        "server_command",
        "submit_update",
        with("blob", pattern(STREAMED_UP)),
    )
    .await;
    let s = reply_shareable(&reply);
    assert_eq!(
        s.get("received").and_then(Value::as_u64),
        Some(STREAMED_UP as u64)
    );
    assert_eq!(s.get("pattern_ok").and_then(Value::as_bool), Some(true));
    let (_, e) = py
        .wait_event("request", |e| e["topic"] == "submit_update")
        .await;
    assert_eq!(e["via"], "stream");
    assert_eq!(e["origin"], my_name);

    // ---- d. Python -> fedrun on a stream channel: a streamed request, a streamed reply
    let done = py
        .command(
            json!({"cmd": "ask", "target": my_name, "channel": "interop",
                        "topic": "question", "payload": {"q": "stream question"}}),
        )
        .await;
    assert_eq!(done["streamed"], true);
    assert_eq!(done["rc"], "ok", "{done}");
    assert_eq!(done["payload"]["answer"], "from fedrun");
    assert_eq!(done["payload"]["q"], "stream question");
    assert_eq!(done["payload"]["__headers__"]["__rc__"], "OK");
    let got = next_seen(&mut seen).await;
    assert_eq!(got.headers.channel(), Some("interop"));
    assert_eq!(got.headers.origin(), Some(server_job().as_str()));

    // ---- d2. Python -> fedrun on a core channel
    let done = py
        .command(json!({"cmd": "ask", "target": my_name, "channel": "task",
                        "topic": "question", "payload": {"q": "core question"}}))
        .await;
    assert_eq!(done["streamed"], false);
    assert_eq!(done["rc"], "ok", "{done}");
    assert_eq!(done["payload"]["q"], "core question");
    assert_eq!(done["payload"]["channel"], "task");
    assert_eq!(next_seen(&mut seen).await.headers.channel(), Some("task"));

    // ---- e. fire-and-forget both ways
    let sent = cell
        .fire_and_forget(FireAndForget::new(
            "task",
            "note",
            vec![server_job()],
            CellMessage::new(with("note", "from fedrun")),
        ))
        .await
        .unwrap();
    assert_eq!(sent.get(&server_job()), Some(&CellReturnCode::Ok));
    let (_, e) = py
        .wait_event("ff_received", |e| e["payload"]["note"] == "from fedrun")
        .await;
    assert_eq!(e["origin"], my_name);
    assert_eq!(e["reply_expected"], false);
    // a fire-and-forget above the streaming threshold leaves as a stream without sm__ri
    let big = pattern(STREAMED_UP);
    let sent = cell
        .fire_and_forget(FireAndForget::new(
            "aux_communication",
            "big_note",
            vec![server_job()],
            CellMessage::new(with("blob", big)),
        ))
        .await
        .unwrap();
    assert_eq!(sent.get(&server_job()), Some(&CellReturnCode::Ok));
    let (_, e) = py
        .wait_event("ff_received", |e| e["topic"] == "big_note")
        .await;
    assert_eq!(e["payload"]["blob"]["$bytes_len"], STREAMED_UP);
    let expected_sum: u64 = (0..STREAMED_UP).map(|i| u64::from(pattern_byte(i))).sum();
    assert_eq!(e["payload"]["blob"]["$bytes_sum"], expected_sum);
    for channel in ["task", "interop"] {
        let done = py
            .command(json!({"cmd": "fire", "target": my_name, "channel": channel,
                            "topic": "note", "payload": {"note": channel}}))
            .await;
        assert_eq!(done["streamed"], channel == "interop");
        let got = next_seen(&mut seen).await;
        assert_eq!(got.headers.channel(), Some(channel));
        assert_eq!(got.headers.reply_expected(), Some(false));
        let note = got.payload.as_shareable().and_then(|s| str_of(s, "note"));
        assert_eq!(note, Some(channel));
    }

    // ---- f. a large streamed request from Python, reassembled by fedrun
    let done = py
        .command(
            json!({"cmd": "ask_large", "target": my_name, "channel": "interop",
                        "topic": "large", "size": LARGE, "timeout": 30}),
        )
        .await;
    assert_eq!(done["rc"], "ok", "{done}");
    assert_eq!(done["payload"]["len"], LARGE);
    assert_eq!(done["payload"]["pattern_ok"], true);
    let got = next_seen(&mut seen).await;
    assert!(got.headers.payload_len().is_some_and(|n| n > LARGE as u64));

    // ---- g. PING/PONG both ways
    let done = py.command(json!({"cmd": "ping", "peer": my_name})).await;
    assert_eq!(done["pings_sent"], 1);
    py.wait_event("pong_received", |e| e["peer"] == my_name)
        .await;
    // fedrun's own PING after one quiet second (WireConfig::heartbeat_interval)
    py.wait_event("ping_received", |e| e["peer"] == my_name)
        .await;

    // ---- h. bye: fedrun says goodbye, Python sees the peer gone
    cell.stop().await;
    transport.shutdown().await;
    let (bye_at, _) = py
        .wait_event("bye_received", |e| e["origin"] == my_name)
        .await;
    let (gone_at, _) = py
        .wait_event("peer_state", |e| {
            e["peer"] == my_name && e["state"] != "READY" && e["state"] != "IDLE"
        })
        .await;
    assert!(bye_at < gone_at, "the connection closed before the bye");
    assert!(transport.wait_for_peer_gone(&Fqcn::SERVER, STEP).await);

    // ---- i. a fedrun client job engine sends an aux request to the Python server job cell
    let transport = connect(port).await;
    py.wait_event("peer_state", |e| {
        e["peer"] == my_name && e["state"] == "READY"
    })
    .await;
    let engine = ClientEngine::builder("site-1", JOB)
        .job_clients(&["site-1"])
        .start_on(transport.clone())
        .await
        .unwrap();
    let replies = engine
        .send_aux_request(AuxTargets::Server, "interop_aux", with("x", 7), STEP)
        .await
        .unwrap();
    let reply = replies.get("server").expect("no reply keyed 'server'");
    assert_eq!(reply.return_code().as_str(), "OK", "{reply:?}");
    assert_eq!(str_of(reply, "answer"), Some("from the python server job"));
    assert_eq!(str_of(reply, "seen_topic"), Some("interop_aux"));
    assert_eq!(reply.get("seen_x").and_then(Value::as_i64), Some(7));
    let props = reply
        .get("seen_peer_props")
        .and_then(Value::as_map)
        .expect("Python saw no __peer_props__");
    assert_eq!(
        props.get("__identity_name__").and_then(Value::as_str),
        Some("site-1")
    );
    assert_eq!(props.get("__run_num__").and_then(Value::as_str), Some(JOB));
    let (_, e) = py
        .wait_event("request", |e| e["topic"] == "interop_aux")
        .await;
    assert_eq!(e["channel"], "aux_communication");
    assert_eq!(e["origin"], my_name);

    // ---- j. a Python aux request (streamed, as NVFlare's aux runner sends it) answered by an
    //         aux handler of the engine
    let (tx, mut aux_seen) = mpsc::unbounded_channel();
    let handler = aux_handler(move |req: AuxRequest| {
        let tx = tx.clone();
        async move {
            let x = req.request.get("x").cloned().unwrap_or(Value::Nil);
            let _ = tx.send(req);
            let mut answer = Shareable::make_reply(AppReturnCode::Ok, None);
            answer.insert("answer", "from the fedrun engine");
            answer.insert("x", x);
            Ok(answer)
        }
    });
    engine
        .register_aux_message_handler("rust_topic", handler)
        .await
        .unwrap();
    let done = py
        .command(
            json!({"cmd": "aux", "target": my_name, "topic": "rust_topic",
                        "payload": {"x": 11}}),
        )
        .await;
    assert_eq!(done["rc"], "ok", "{done}");
    assert_eq!(done["payload"]["__headers__"]["__rc__"], "OK", "{done}");
    assert_eq!(done["payload"]["answer"], "from the fedrun engine");
    assert_eq!(done["payload"]["x"], 11);
    let req = timeout(STEP, aux_seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.topic, "rust_topic");
    let peer = req.request.peer_props().and_then(Value::as_map).unwrap();
    assert_eq!(
        peer.get("__identity_name__").and_then(Value::as_str),
        Some("server")
    );
    assert_eq!(peer.get("__run_num__").and_then(Value::as_str), Some(JOB));
    assert_eq!(req.ctx.identity_name(), "site-1");

    // ---- the end: the engine leaves with a bye too, then the Python cells stop
    engine.stop().await;
    transport.shutdown().await;
    py.wait_event("bye_received", |e| e["origin"] == my_name)
        .await;
    py.quit().await;
    let elapsed = started.elapsed();
    eprintln!("live NVFlare interop: all steps passed in {elapsed:?}");
    assert!(elapsed < WHOLE_TEST, "the interop test took {elapsed:?}");
}
