//! One cell process (`fedrun-cellbench cell ...`): a fedrun endpoint on loopback TCP, started
//! by the orchestrator as a child, one OS process per cell, as NVFlare's harness does.
//!
//! - `server`: listens on `tcp://127.0.0.1:<port>` (port 0: it picks one and reports it) and
//!   hosts two cells: `server` (the core path's handlers) and the server job `server.bench`
//!   (an `SJ` aux runner and a stream processor: the engine path).
//! - `site-<i>`: connects to the server and hosts `site-<i>` (core echo) and a client job engine
//!   `site-<i>.bench` ([`fedrun_engine::ClientEngine`]) with an aux `echo` handler.
//!
//! The child talks to the orchestrator on its standard streams: it prints `READY {json}` once
//! its cells are up, and, if it is the active side, waits for a `GO` line on stdin, measures and
//! prints `RESULT {json}` (or `ERROR {json}`). It stops when stdin closes; a watchdog ends it
//! after `--max-life` whatever happens.

use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use actix::{Actor, Addr};
use fedrun_cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, HandlerError, Payload};
use fedrun_core::constants::process_type;
use fedrun_core::{Map, Shareable, Value};
use fedrun_engine::stream::{
    ByteSink, BytesConsumerFactory, RegisterStreamProcessing, StreamConfig, StreamProcessor,
};
use fedrun_engine::{
    aux_handler, AuxConfig, AuxRequest, AuxRunner, ClientEngine, EngineHandle, GetJobClients,
    RegisterAuxMessageHandler, RunInfo, RunInfoConfig,
};
use fedrun_wire::{
    StreamSendConfig, TcpTransport, WireConfig, STREAM_THRESHOLD, STREAM_THRESHOLD_HEADROOM,
};
use serde_json::{json, Value as Json};
use tokio::sync::{mpsc, watch};

use crate::args::Options;
use crate::error::BenchError;
use crate::measure::{epoch_secs, Memory, WordSum};
use crate::scenarios;

/// The job id of every engine in the benchmark.
pub const JOB: &str = "bench";
/// The channel of the core path's requests and of the streamed objects.
pub const BENCH_CHANNEL: &str = "bench";
/// Echo the request (core and aux).
pub const TOPIC_ECHO: &str = "echo";
/// Count the bytes of the request and checksum them (core).
pub const TOPIC_SINK: &str = "sink";
/// Count one fire-and-forget message (core and aux).
pub const TOPIC_FF: &str = "ff";
/// Reset the fire-and-forget counter (core).
pub const TOPIC_FF_RESET: &str = "ff_reset";
/// Wait until the counter reaches `expected` (or `timeout_s` passes), then report it (core).
pub const TOPIC_FF_WAIT: &str = "ff_wait";
/// Report the size and checksum of the bytes streamed so far to the server (core).
pub const TOPIC_STREAM_STATUS: &str = "stream_status";
/// The topic of streamed objects (on [`BENCH_CHANNEL`]).
pub const BLOB_TOPIC: &str = "blob";

/// How long a child waits for its connection to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child's goodbye to its peers may take when it stops.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Prints one protocol line (`TAG {json}`) on stdout and flushes it.
pub fn emit(tag: &str, body: &Json) {
    let mut out = std::io::stdout().lock();
    // The orchestrator is gone if stdout is closed: nothing useful left to do with the error.
    let _ = writeln!(out, "{tag} {body}");
    let _ = out.flush();
}

/// What the orchestrator tells a child on stdin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Start measuring (active side only).
    Go,
    /// Stdin closed: stop.
    Stop,
}

/// Fire-and-forget messages counted by the server.
#[derive(Clone, Copy, Debug, Default)]
struct FfCount {
    count: u64,
    first: Option<f64>,
    last: Option<f64>,
}

/// The server's counters, shared with its handlers.
pub struct ServerState {
    ff: Mutex<FfCount>,
    ff_seen: watch::Sender<u64>,
    stream_sum: Mutex<WordSum>,
}

impl ServerState {
    fn new() -> ServerState {
        ServerState {
            ff: Mutex::new(FfCount::default()),
            ff_seen: watch::channel(0).0,
            stream_sum: Mutex::new(WordSum::default()),
        }
    }

    fn record_ff(&self) {
        let now = epoch_secs();
        let count = {
            let mut ff = self.ff.lock().unwrap_or_else(PoisonError::into_inner);
            ff.count += 1;
            ff.first.get_or_insert(now);
            ff.last = Some(now);
            ff.count
        };
        self.ff_seen.send_replace(count);
    }

    fn reset_ff(&self) {
        *self.ff.lock().unwrap_or_else(PoisonError::into_inner) = FfCount::default();
        self.ff_seen.send_replace(0);
    }

    fn ff_snapshot(&self) -> Value {
        let ff = *self.ff.lock().unwrap_or_else(PoisonError::into_inner);
        let time = |t: Option<f64>| t.map_or(Value::Nil, Value::from);
        Value::Map(Map::from_iter([
            ("count", Value::from(ff.count)),
            ("first", time(ff.first)),
            ("last", time(ff.last)),
        ]))
    }

    /// Waits until at least `expected` messages were counted, at most `timeout`.
    async fn wait_ff(&self, expected: u64, timeout: Duration) {
        let mut seen = self.ff_seen.subscribe();
        let reached = async {
            loop {
                if *seen.borrow_and_update() >= expected {
                    return;
                }
                if seen.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, reached).await;
    }
}

/// A writer that keeps nothing: it checksums the bytes of the current stream.
struct ChecksumSink(Arc<ServerState>);

impl Write for ChecksumSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .stream_sum
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The server's engine side: the server job's cell and actors.
pub struct ServerSide {
    /// `server.bench`.
    pub job_cell: CellHandle,
    /// The server job's run.
    pub run_info: Addr<RunInfo>,
    /// The server job's aux runner (process type `SJ`).
    pub aux: Addr<AuxRunner>,
    /// The server job's stream processor (receives the large transfers).
    pub stream: Addr<StreamProcessor>,
    /// Counters.
    pub state: Arc<ServerState>,
}

/// A site's engine side.
pub struct SiteSide {
    /// The client job engine on `site-<i>.bench`.
    pub engine: EngineHandle,
}

/// Which end of the benchmark this process is.
pub enum Side {
    /// The server process.
    Server(ServerSide),
    /// A site process.
    Site(SiteSide),
}

/// The wire settings of every bench cell: the defaults, except that the stream threshold is
/// raised so that one object-stream piece (`--chunk-kib`, 4 MiB by default) with its headers
/// leaves as one frame: at most `max(STREAM_THRESHOLD, piece + STREAM_THRESHOLD_HEADROOM)`.
/// A piece above the default threshold would otherwise be a stream of 1 MiB chunks with an ACK,
/// a streamed reply and a reassembly copy on the receiver (about 1.7 GiB/s instead of 2.3 GiB/s
/// for 4 MiB pieces here). The 128 MiB core request is still streamed.
pub fn wire_config(opts: &Options) -> WireConfig {
    let piece = opts.chunk_kib.saturating_mul(1024);
    WireConfig {
        stream_send: StreamSendConfig {
            threshold: STREAM_THRESHOLD.max(piece.saturating_add(STREAM_THRESHOLD_HEADROOM)),
            ..StreamSendConfig::default()
        },
        ..WireConfig::default()
    }
}

/// A running cell process: its transport, its core cell and its engine side.
///
/// # Example
///
/// A server process and one site, as two children of the orchestrator would start them
/// (here in one process, for illustration):
///
/// ```no_run
/// use fedrun_bench::node::Node;
/// use fedrun_bench::Options;
///
/// actix::System::new().block_on(async {
///     let args = |more: &[&str]| {
///         let mut a = vec!["--scenario", "latency"];
///         a.extend_from_slice(more);
///         Options::parse(a.into_iter().map(String::from)).unwrap()
///     };
///     let server = Node::start(&args(&["--name", "server", "--port", "0"])).await.unwrap();
///     let port = server.port.to_string();
///     let site = Node::start(&args(&["--name", "site-1", "--port", &port])).await.unwrap();
///     assert_eq!(site.core.fqcn().as_str(), "site-1");
///     site.shutdown().await;
///     server.shutdown().await;
/// });
/// ```
pub struct Node {
    /// `server` or `site-<i>`.
    pub name: String,
    /// The process's TCP endpoint.
    pub transport: TcpTransport,
    /// The core cell (`server` or `site-<i>`).
    pub core: CellHandle,
    /// The server's listening port (the port connected to, on a site).
    pub port: u16,
    /// The engine side.
    pub side: Side,
}

fn echo_handler() -> fedrun_cell::RequestHandler {
    request_handler(|req: CellMessage| async move { Ok(Some(CellMessage::new(req.payload))) })
}

fn value_reply(pairs: Vec<(&'static str, Value)>) -> CellMessage {
    CellMessage::new(Payload::value(Value::Map(Map::from_iter(pairs))))
}

/// The job meta naming sites `site-1` … `site-<n>`.
fn job_meta(sites: usize) -> Value {
    let clients: Vec<Value> = (1..=sites)
        .map(|i| Value::Map(Map::from_iter([("name", format!("site-{i}"))])))
        .collect();
    Value::Map(Map::from_iter([("job_clients", Value::Array(clients))]))
}

impl Node {
    /// Starts this process's endpoint and cells, as `opts.name` says.
    ///
    /// # Errors
    ///
    /// The listener or connector cannot start, the server is not reachable within 60 s, or a
    /// cell, engine or handler cannot be set up.
    pub async fn start(opts: &Options) -> Result<Node, BenchError> {
        if opts.name == "server" {
            Self::start_server(opts).await
        } else {
            Self::start_site(opts).await
        }
    }

    async fn start_server(opts: &Options) -> Result<Node, BenchError> {
        let transport = TcpTransport::new(Fqcn::SERVER, wire_config(opts));
        let addr = transport
            .add_listener(&format!("tcp://127.0.0.1:{}", opts.port))
            .await?;
        let state = Arc::new(ServerState::new());

        let core = Cell::start(Fqcn::SERVER, transport.clone())?;
        core.register_request_handler(BENCH_CHANNEL, TOPIC_ECHO, echo_handler())
            .await?;
        let sink = request_handler(|req: CellMessage| async move {
            let bytes = req
                .payload
                .as_bytes()
                .ok_or_else(|| HandlerError::Other("sink: the payload is not bytes".into()))?;
            let mut sum = WordSum::default();
            sum.update(bytes);
            Ok(Some(value_reply(vec![
                ("n", Value::from(bytes.len() as u64)),
                ("sum", Value::from(sum.finish())),
            ])))
        });
        core.register_request_handler(BENCH_CHANNEL, TOPIC_SINK, sink)
            .await?;
        let st = Arc::clone(&state);
        let ff = request_handler(move |_req: CellMessage| {
            st.record_ff();
            async { Ok(None) }
        });
        core.register_request_handler(BENCH_CHANNEL, TOPIC_FF, ff)
            .await?;
        let st = Arc::clone(&state);
        let reset = request_handler(move |_req: CellMessage| {
            st.reset_ff();
            async { Ok(Some(value_reply(vec![("ok", Value::from(true))]))) }
        });
        core.register_request_handler(BENCH_CHANNEL, TOPIC_FF_RESET, reset)
            .await?;
        let st = Arc::clone(&state);
        let wait = request_handler(move |req: CellMessage| {
            let st = Arc::clone(&st);
            async move {
                let args = req.payload.as_value().and_then(|v| v.as_map().cloned());
                let get = |k: &str| args.as_ref().and_then(|m| m.get(k).cloned());
                let expected = get("expected").and_then(|v| v.as_u64()).unwrap_or(0);
                let secs = get("timeout_s").and_then(|v| v.as_f64()).unwrap_or(10.0);
                let timeout = Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(10));
                st.wait_ff(expected, timeout).await;
                Ok(Some(CellMessage::new(Payload::value(st.ff_snapshot()))))
            }
        });
        core.register_request_handler(BENCH_CHANNEL, TOPIC_FF_WAIT, wait)
            .await?;
        let st = Arc::clone(&state);
        let status = request_handler(move |_req: CellMessage| {
            let sum = *st.stream_sum.lock().unwrap_or_else(PoisonError::into_inner);
            async move {
                Ok(Some(value_reply(vec![
                    ("size", Value::from(sum.len())),
                    ("sum", Value::from(sum.finish())),
                ])))
            }
        });
        core.register_request_handler(BENCH_CHANNEL, TOPIC_STREAM_STATUS, status)
            .await?;

        // The server job: the engine path.
        let run_info = RunInfo::new(
            RunInfoConfig::new("server", JOB)
                .with_job_meta(job_meta(opts.clients))
                .with_process_type(process_type::SERVER_JOB),
        )
        .start();
        let job_cell = Cell::start(Fqcn::job_cell("server", JOB)?, transport.clone())?;
        let aux = AuxRunner::new(
            AuxConfig::new("server", JOB, job_cell.clone(), run_info.clone())
                .with_process_type(process_type::SERVER_JOB),
        )
        .start();
        aux.send(GetJobClients { job_meta: None }).await??;
        let echo = aux_handler(|req: AuxRequest| async move { Ok::<_, String>(req.request) });
        aux.send(RegisterAuxMessageHandler::new(TOPIC_ECHO, echo))
            .await??;
        let st = Arc::clone(&state);
        let ff = aux_handler(move |_req: AuxRequest| {
            st.record_ff();
            async { Ok::<_, String>(Shareable::new()) }
        });
        aux.send(RegisterAuxMessageHandler::new(TOPIC_FF, ff))
            .await??;
        let stream = StreamProcessor::start(StreamConfig::new(
            "server",
            JOB,
            aux.clone(),
            run_info.clone(),
        ))
        .await?;
        let st = Arc::clone(&state);
        let (factory, mut received) = BytesConsumerFactory::new(move |_stream_ctx| {
            *st.stream_sum.lock().unwrap_or_else(PoisonError::into_inner) = WordSum::default();
            Ok(ByteSink::Writer(Box::new(ChecksumSink(Arc::clone(&st)))))
        });
        stream
            .send(RegisterStreamProcessing::new(
                BENCH_CHANNEL,
                BLOB_TOPIC,
                factory,
            ))
            .await?;
        // Finished streams are reported here; a failed one is worth a log line.
        actix::spawn(async move {
            while let Some(done) = received.recv().await {
                if !done.rc.is_ok() {
                    log::warn!(
                        "[job={JOB} site=server] stream ended with {} after {} bytes",
                        done.rc,
                        done.size
                    );
                }
            }
        });
        Ok(Node {
            name: "server".to_owned(),
            transport,
            core,
            port: addr.port(),
            side: Side::Server(ServerSide {
                job_cell,
                run_info,
                aux,
                stream,
                state,
            }),
        })
    }

    async fn start_site(opts: &Options) -> Result<Node, BenchError> {
        let me = Fqcn::new(opts.name.as_str())?;
        let transport = TcpTransport::new(me.clone(), wire_config(opts));
        transport.add_connector(&format!("tcp://127.0.0.1:{}", opts.port))?;
        if !transport
            .wait_for_peer(&Fqcn::SERVER, CONNECT_TIMEOUT)
            .await
        {
            return Err(BenchError::Timeout(format!(
                "{} not connected to the server on port {} within {CONNECT_TIMEOUT:?}",
                opts.name, opts.port
            )));
        }
        let core = Cell::start(me, transport.clone())?;
        core.register_request_handler(BENCH_CHANNEL, TOPIC_ECHO, echo_handler())
            .await?;
        let engine = ClientEngine::builder(&opts.name, JOB)
            .start_on(transport.clone())
            .await?;
        let echo = aux_handler(|req: AuxRequest| async move { Ok::<_, String>(req.request) });
        engine
            .register_aux_message_handler(TOPIC_ECHO, echo)
            .await?;
        Ok(Node {
            name: opts.name.clone(),
            transport,
            core,
            port: opts.port,
            side: Side::Site(SiteSide { engine }),
        })
    }

    /// Stops the engine side and says goodbye to the peers (bounded in time).
    pub async fn shutdown(&self) {
        let stop = async {
            match &self.side {
                Side::Site(site) => site.engine.stop().await,
                Side::Server(server) => server.job_cell.stop().await,
            }
            self.core.stop().await;
            self.transport.shutdown().await;
        };
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, stop).await.is_err() {
            log::warn!(
                "{}: shutdown took longer than {SHUTDOWN_TIMEOUT:?}",
                self.name
            );
        }
    }
}

/// Ends the process after `max_life`, whatever it is doing (a hung child never outlives the
/// orchestrator's deadline by much).
fn start_watchdog(name: String, max_life: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(max_life);
        eprintln!("{name}: watchdog: alive for {max_life:?}, exiting");
        std::process::exit(3);
    });
}

/// Reads stdin on a thread: `GO` lines become [`Control::Go`], the end of stdin
/// [`Control::Stop`].
fn start_stdin_reader(tx: mpsc::UnboundedSender<Control>) {
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l.trim() == "GO" => {
                    // The receiver is gone only when the process is ending.
                    let _ = tx.send(Control::Go);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = tx.send(Control::Stop);
    });
}

/// The `cell` role: runs one cell process until stdin closes.
///
/// # Errors
///
/// The node could not start (also reported as an `ERROR` line).
pub fn run_cell(opts: Options) -> Result<(), BenchError> {
    start_watchdog(opts.name.clone(), opts.max_life);
    let (tx, rx) = mpsc::unbounded_channel();
    start_stdin_reader(tx);
    actix::System::new().block_on(cell_main(opts, rx))
}

async fn cell_main(
    opts: Options,
    mut control: mpsc::UnboundedReceiver<Control>,
) -> Result<(), BenchError> {
    let node = match Node::start(&opts).await {
        Ok(node) => node,
        Err(e) => {
            emit(
                "ERROR",
                &json!({"name": opts.name, "error": format!("start: {e}")}),
            );
            return Err(e);
        }
    };
    let mem = Memory::of(None);
    emit(
        "READY",
        &json!({
            "name": node.name,
            "pid": std::process::id(),
            "port": node.port,
            "VmRSS": mem.rss,
            "VmHWM": mem.hwm,
        }),
    );
    if opts.active {
        if control.recv().await == Some(Control::Go) {
            match scenarios::run(&node, &opts).await {
                Ok(mut result) => {
                    if let Json::Object(m) = &mut result {
                        m.insert("scenario".into(), opts.scenario.as_str().into());
                        m.insert("path".into(), opts.path.as_str().into());
                        m.insert("name".into(), node.name.clone().into());
                    }
                    emit("RESULT", &result);
                }
                Err(e) => emit("ERROR", &json!({"name": node.name, "error": e.to_string()})),
            }
        } else {
            node.shutdown().await;
            return Ok(());
        }
    }
    // Stay up so the orchestrator can read this process's peak RSS; it closes stdin to stop us.
    while let Some(c) = control.recv().await {
        if c == Control::Stop {
            break;
        }
    }
    node.shutdown().await;
    Ok(())
}
