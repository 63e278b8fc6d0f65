//! Streamed model transfer in ScatterAndGather, end to end: a real server job and two real
//! client engines, each with a `ClientRunner`, on one in-process network.
//!
//! Every endpoint sends through a [`Tap`]: a transport that hands each message to the network
//! unchanged, records what matters (runner syncs, the train tasks clients receive, the stream
//! pieces, the results they submit) and can hold one chosen stream piece until the test lets
//! it go, which keeps a transfer in progress for as long as the test needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Recipient;
use fedrun_cell::{
    AbortSignal, CellError, CellMessage, Deliver, Fqcn, MsgType, Network, Transport,
};
use fedrun_core::constants::{reserved_topic, stream as stream_keys, topic};
use fedrun_core::{CellReturnCode, DataKind, Dxo, FlContext, Map, NdArray, Shareable, Value};
use fedrun_engine::stream::arrays::KEY_DATA;
use fedrun_engine::stream::{MODEL_STREAM_HEADER, TOPIC_RESULT, TOPIC_WEIGHTS};
use fedrun_engine::{
    executor_fn, ClientEngine, ClientRunner, EngineError, EngineHandle, Executor, RunEnd,
    RunOutcome, RunnerConfig, TaskRouter,
};
use fedrun_server::{
    Aggregator, Contribution, FedAvg, ModelWeights, NpyPersistor, SagConfig, ScatterAndGather,
    ServerError, ServerJob, WorkflowEvent, WorkflowOutcome, NUM_STEPS_CURRENT_ROUND,
};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot, watch};

const JOB: &str = "job-streamed";
const SITES: [&str; 2] = ["site-1", "site-2"];
/// Every wait of these tests ends within this (debug builds move a few MiB per round).
const DEADLINE: Duration = Duration::from_secs(30);
/// Elements of the large array: 2.5 MiB of f32 plus a few, so its `.npy` bytes span three
/// 1 MiB chunks and do not end on a chunk boundary.
const W_LEN: usize = (5 << 18) + 7;
/// Models of at least this many bytes are streamed; the test model is far above it.
const STREAM_THRESHOLD: u64 = 4 << 10;

/// Logs go to the test output with `RUST_LOG=...`.
fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

// ------------------------------------------------------------------------------------------------
// The tap
// ------------------------------------------------------------------------------------------------

/// What the tap saw, in sending order.
#[derive(Clone, Debug, PartialEq)]
enum Wire {
    /// A runner's `__sync_runner__` request (its stream consumers are registered by then).
    Sync { from: String },
    /// A `train` task in a `get_task` reply: how many entries its DXO data had, and its
    /// model-stream header.
    Task {
        to: String,
        arrays: usize,
        stream: Option<String>,
    },
    /// One `ObjectStreamer.Request` piece on a model topic.
    Piece {
        from: String,
        to: String,
        topic: String,
        seq: i64,
        bytes: usize,
    },
    /// A `submit_update`: how many entries its DXO data had, and its model-stream header.
    Submit {
        from: String,
        arrays: usize,
        stream: Option<String>,
    },
}

/// The one piece the tap holds back: sent `from` `to`, on stream `topic`, with sequence `seq`.
struct Hold {
    from: String,
    to: String,
    topic: String,
    seq: i64,
    /// Told once the piece is held.
    reached: Option<oneshot::Sender<()>>,
    /// The piece goes on once this turns true.
    release: watch::Receiver<bool>,
}

/// A transport over the in-process network that records [`Wire`] events and may hold one
/// piece (see the module doc). Clones share the record and the hold.
#[derive(Clone)]
struct Tap {
    net: Network,
    wire: mpsc::UnboundedSender<Wire>,
    hold: Arc<Mutex<Option<Hold>>>,
}

impl Tap {
    fn new() -> (Tap, mpsc::UnboundedReceiver<Wire>) {
        let (wire, rx) = mpsc::unbounded_channel();
        let tap = Tap {
            net: Network::new(),
            wire,
            hold: Arc::new(Mutex::new(None)),
        };
        (tap, rx)
    }

    /// Holds the piece `seq` of the stream on `topic` going `from` `to` until the returned
    /// sender says `true`; the receiver fires once it is held.
    fn hold(
        &self,
        from: &str,
        to: &str,
        topic: &str,
        seq: i64,
    ) -> (oneshot::Receiver<()>, watch::Sender<bool>) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = watch::channel(false);
        *self.hold.lock().unwrap() = Some(Hold {
            from: from.to_owned(),
            to: to.to_owned(),
            topic: topic.to_owned(),
            seq,
            reached: Some(reached_tx),
            release: release_rx,
        });
        (reached_rx, release_tx)
    }

    /// The release of the hold, when `seen` is the held piece (only once).
    fn gate(&self, seen: &Wire) -> Option<watch::Receiver<bool>> {
        let Wire::Piece {
            from,
            to,
            topic,
            seq,
            ..
        } = seen
        else {
            return None;
        };
        let mut hold = self.hold.lock().unwrap();
        let h = hold
            .as_mut()
            .filter(|h| h.from == *from && h.to == *to && h.topic == *topic && h.seq == *seq)?;
        let reached = h.reached.take()?;
        let _ = reached.send(());
        Some(h.release.clone())
    }
}

impl Transport for Tap {
    fn register(&self, fqcn: Fqcn, inbox: Recipient<Deliver>) -> Result<(), CellError> {
        self.net.register(fqcn, inbox)
    }

    fn unregister(&self, fqcn: &Fqcn) {
        self.net.unregister(fqcn)
    }

    fn route(&self, msg: CellMessage) -> BoxFuture<'static, Result<(), CellReturnCode>> {
        let gate = classify(&msg).and_then(|seen| {
            let gate = self.gate(&seen);
            // the test may have stopped listening; the record is then not needed
            let _ = self.wire.send(seen);
            gate
        });
        let net = self.net.clone();
        Box::pin(async move {
            if let Some(mut release) = gate {
                // a closed release (the test ended) lets the piece go too
                let _ = release.wait_for(|go| *go).await;
            }
            net.route(msg).await
        })
    }
}

/// The site part of a cell name (`site-1.job` → `site-1`).
fn site_of(fqcn: Option<&str>) -> String {
    fqcn.and_then(|f| f.split('.').next())
        .unwrap_or("?")
        .to_owned()
}

/// The number of DXO data entries of `s` (0 when it is no DXO) and its model-stream header.
fn dxo_summary(s: &Shareable) -> (usize, Option<String>) {
    let arrays = Dxo::from_shareable(s).map_or(0, |d| d.data.len());
    let stream = s
        .header_or_none(MODEL_STREAM_HEADER)
        .and_then(Value::as_str)
        .map(str::to_owned);
    (arrays, stream)
}

fn classify(msg: &CellMessage) -> Option<Wire> {
    let s = msg.payload.as_shareable()?;
    let from = site_of(msg.headers.origin());
    let to = site_of(msg.headers.destination());
    let request = msg.headers.msg_type() == Some(MsgType::Req);
    match msg.headers.topic()? {
        t if t == reserved_topic::SYNC_RUNNER && request => Some(Wire::Sync { from }),
        t if t == topic::SUBMIT_UPDATE && request => {
            let (arrays, stream) = dxo_summary(s);
            Some(Wire::Submit {
                from,
                arrays,
                stream,
            })
        }
        t if t == topic::GET_TASK && !request => {
            let name = s.header_or_none("task_name").and_then(Value::as_str);
            (name == Some("train")).then(|| {
                let (arrays, stream) = dxo_summary(s);
                Wire::Task { to, arrays, stream }
            })
        }
        t if t == stream_keys::TOPIC_REQUEST && request => {
            let topic = s
                .header_or_none(stream_keys::HEADER_TOPIC)
                .and_then(Value::as_str)?;
            let seq = s
                .header_or_none(stream_keys::HEADER_SEQ)
                .and_then(Value::as_i64)?;
            let bytes = s
                .get(KEY_DATA)
                .and_then(Value::as_bin)
                .map_or(0, |b| b.len());
            Some(Wire::Piece {
                from,
                to,
                topic: topic.to_owned(),
                seq,
                bytes,
            })
        }
        _ => None,
    }
}

/// Collects what the tap saw.
struct Record {
    rx: mpsc::UnboundedReceiver<Wire>,
    seen: Vec<Wire>,
}

impl Record {
    fn drain(&mut self) -> &[Wire] {
        while let Ok(w) = self.rx.try_recv() {
            self.seen.push(w);
        }
        &self.seen
    }

    /// Waits until every site's runner asked `__sync_runner__`: its model consumer is
    /// registered (the runner registers it before it syncs). The server streams a site's model
    /// when the site is handed its task, so this is not needed for correctness; it keeps the
    /// order of the recorded events the same from run to run.
    async fn wait_for_syncs(&mut self) {
        within(async {
            loop {
                let synced = SITES.iter().all(|site| {
                    self.seen
                        .iter()
                        .any(|w| matches!(w, Wire::Sync { from } if from == site))
                });
                if synced {
                    return;
                }
                let w = self.rx.recv().await.expect("the tap is gone");
                self.seen.push(w);
            }
        })
        .await
    }
}

// ------------------------------------------------------------------------------------------------
// Model, clients and server
// ------------------------------------------------------------------------------------------------

/// The initial global model: `w` (f32, dyadic values, so every weighted sum below is exact in
/// f32 whatever the order) and `b` (f64).
fn initial_model() -> ModelWeights {
    let w: Vec<f32> = (0..W_LEN)
        .map(|i| (i % 1000) as f32 * 0.25 - 100.0)
        .collect();
    let mut m = ModelWeights::new();
    m.insert("w".into(), NdArray::from_f32(&[W_LEN], &w).unwrap());
    m.insert(
        "b".into(),
        NdArray::from_f64(&[3], &[1.0, -2.0, 0.5]).unwrap(),
    );
    m
}

/// The `.npy` bytes of a model.
fn npy_len(model: &ModelWeights) -> usize {
    model.values().map(|a| a.npy().len()).sum()
}

/// A WEIGHTS DXO result: `w + add`, `b + add`, with `NUM_STEPS_CURRENT_ROUND = steps`.
fn trained(w: &[f32], b: &[f64], add: f32, steps: i64) -> Shareable {
    let w: Vec<f32> = w.iter().map(|v| v + add).collect();
    let b: Vec<f64> = b.iter().map(|v| v + f64::from(add)).collect();
    let mut data = Map::new();
    data.insert("w", NdArray::from_f32(&[w.len()], &w).unwrap());
    data.insert("b", NdArray::from_f64(&[b.len()], &b).unwrap());
    let mut dxo = Dxo::new(DataKind::Weights, data);
    dxo.meta.insert(NUM_STEPS_CURRENT_ROUND, steps);
    dxo.to_shareable()
}

/// What an executor received for one task.
#[derive(Debug)]
struct Received {
    site: String,
    stream: Option<String>,
    w: Vec<f32>,
    b: Vec<f64>,
}

/// Executor settings of one site.
#[derive(Clone)]
struct Training {
    /// Added to every received weight.
    add: f32,
    /// The `NUM_STEPS_CURRENT_ROUND` it reports.
    steps: i64,
    /// Each task's model goes here.
    received: mpsc::UnboundedSender<Received>,
    /// Tasks started.
    calls: Arc<AtomicUsize>,
    /// When set, the executor waits for this before it trains (once).
    go: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
}

impl Training {
    fn new(add: f32, steps: i64, received: &mpsc::UnboundedSender<Received>) -> Training {
        Training {
            add,
            steps,
            received: received.clone(),
            calls: Arc::new(AtomicUsize::new(0)),
            go: Arc::new(Mutex::new(None)),
        }
    }

    /// The executor waits for the returned sender before it trains.
    fn gated(self) -> (Training, oneshot::Sender<()>) {
        let (tx, rx) = oneshot::channel();
        *self.go.lock().unwrap() = Some(rx);
        (self, tx)
    }

    fn executor(&self, site: &str) -> impl Executor {
        let this = self.clone();
        let site = site.to_owned();
        executor_fn(
            move |_name, task: Shareable, _ctx: FlContext, _abort: AbortSignal| {
                this.calls.fetch_add(1, Ordering::SeqCst);
                let go = this.go.lock().unwrap().take();
                let (add, steps, out, site) =
                    (this.add, this.steps, this.received.clone(), site.clone());
                async move {
                    if let Some(go) = go {
                        go.await.map_err(|_| "the test went away".to_owned())?;
                    }
                    let stream = task
                        .header_or_none(MODEL_STREAM_HEADER)
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    let dxo = Dxo::from_shareable(&task).map_err(|e| e.to_string())?;
                    let array = |name: &str| {
                        dxo.data
                            .get(name)
                            .and_then(Value::as_ndarray)
                            .ok_or_else(|| format!("the task has no array '{name}'"))
                    };
                    let w = array("w")?.to_f32_vec().map_err(|e| e.to_string())?;
                    let b = array("b")?.to_f64_vec().map_err(|e| e.to_string())?;
                    let result = trained(&w, &b, add, steps);
                    let _ = out.send(Received { site, stream, w, b });
                    Ok(result)
                }
            },
        )
    }
}

/// A client job: its engine and its runner's run.
struct Site {
    name: String,
    engine: EngineHandle,
    run: tokio::task::JoinHandle<Result<RunOutcome, EngineError>>,
}

async fn start_site(tap: &Tap, name: &str, training: &Training) -> Site {
    let engine = within(
        ClientEngine::builder(name, JOB)
            .job_clients(&SITES)
            .communication_timeout(Duration::from_secs(10))
            .start_on(tap.clone()),
    )
    .await
    .unwrap();
    let mut router = TaskRouter::new();
    router
        .add(["train"], Arc::new(training.executor(name)))
        .unwrap();
    let config = RunnerConfig {
        default_interval: Duration::from_millis(10),
        task_check_interval: Duration::from_millis(20),
        task_abort_grace: Duration::from_secs(2),
        // above the 64 MiB test's transfer in a debug build on a busy machine
        model_stream_timeout: Duration::from_secs(120),
        ..RunnerConfig::default()
    };
    let run = ClientRunner::new(engine.clone(), router, config).spawn();
    Site {
        name: name.to_owned(),
        engine,
        run,
    }
}

/// The server job on the tap, with its workflow events.
async fn start_server(tap: &Tap) -> (ServerJob, mpsc::UnboundedReceiver<WorkflowEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = within(
        ServerJob::builder(JOB)
            .job_clients(&SITES)
            .poll_interval(Duration::from_millis(10))
            .events(tx)
            .start_on(tap.clone()),
    )
    .await
    .unwrap();
    (server, rx)
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("fedrun-streamed-{tag}-{}", uuid::Uuid::new_v4()))
}

fn sag(config: SagConfig, dir: &std::path::Path) -> ScatterAndGather {
    let persistor = NpyPersistor::new(dir).with_initial_weights(initial_model());
    ScatterAndGather::new(
        config.with_stream_threshold(STREAM_THRESHOLD),
        Arc::new(FedAvg::default()),
        Arc::new(persistor),
    )
    .with_id("sag")
}

/// Runs the workflow on the actix arbiter; the handle yields its result.
fn spawn_workflow(
    server: &ServerJob,
    mut workflow: ScatterAndGather,
) -> tokio::task::JoinHandle<Result<WorkflowOutcome, ServerError>> {
    let server = server.clone();
    actix::spawn(async move { server.run_workflow(&mut workflow).await })
}

/// The whole-array FedAvg of `results` (site, result), computed by the aggregator itself (no
/// stream): what the streamed round must equal exactly.
fn whole_array_fedavg(results: &[(&str, Shareable)]) -> ModelWeights {
    let contributions: Vec<Contribution> = results
        .iter()
        .map(|(site, s)| Contribution {
            client: (*site).to_owned(),
            dxo: Dxo::from_shareable(s).unwrap(),
        })
        .collect();
    let avg = FedAvg::default().aggregate(&contributions).unwrap();
    fedrun_server::weights_from_dxo(&avg).unwrap()
}

/// The pieces of stream `topic` from `from` to `to`.
fn pieces<'a>(seen: &'a [Wire], from: &str, to: &str, topic: &str) -> Vec<&'a Wire> {
    seen.iter()
        .filter(|w| {
            matches!(w, Wire::Piece { from: f, to: t, topic: tp, .. }
                if f == from && t == to && tp == topic)
        })
        .collect()
}

fn piece_bytes(pieces: &[&Wire]) -> usize {
    pieces
        .iter()
        .map(|w| match w {
            Wire::Piece { bytes, .. } => *bytes,
            _ => 0,
        })
        .sum()
}

// ------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------

#[actix::test]
async fn streamed_sag_round_with_real_clients_gives_the_exact_fedavg() {
    init_log();
    let (tap, rx) = Tap::new();
    let mut record = Record {
        rx,
        seen: Vec::new(),
    };
    let (server, _events) = start_server(&tap).await;
    let (received_tx, mut received) = mpsc::unbounded_channel();
    let trainings = [
        Training::new(1.0, 1, &received_tx),
        Training::new(3.0, 3, &received_tx),
    ];
    let mut sites = Vec::new();
    for (name, training) in SITES.iter().zip(&trainings) {
        sites.push(start_site(&tap, name, training).await);
    }
    record.wait_for_syncs().await;

    let dir = temp_dir("fedavg");
    let rounds = 2;
    let workflow = sag(SagConfig::new(2, rounds), &dir);
    let outcome = within(spawn_workflow(&server, workflow))
        .await
        .unwrap()
        .unwrap();

    // The executors saw the model the stream delivered, and what they returned.
    let initial = initial_model();
    let mut global = initial.clone();
    let mut by_round: BTreeMap<u32, Vec<Received>> = BTreeMap::new();
    for round in 0..rounds {
        let mut got: Vec<Received> = Vec::new();
        for _ in SITES {
            got.push(within(received.recv()).await.unwrap());
        }
        got.sort_by(|a, b| a.site.cmp(&b.site));
        let mut results = Vec::new();
        for (r, training) in got.iter().zip(&trainings) {
            assert!(
                r.stream.is_some(),
                "{} round {round}: the task names its model stream",
                r.site
            );
            assert_eq!(
                r.w,
                global["w"].to_f32_vec().unwrap(),
                "{} round {round}: the executor got the global model's w",
                r.site
            );
            assert_eq!(r.b, global["b"].to_f64_vec().unwrap());
            results.push((
                r.site.as_str(),
                trained(&r.w, &r.b, training.add, training.steps),
            ));
        }
        assert_eq!(
            got[0].stream, got[1].stream,
            "round {round}: one stream carries the model to both sites"
        );
        global = whole_array_fedavg(&results);
        by_round.insert(round, got);
    }
    assert!(received.try_recv().is_err(), "one task per site and round");
    assert_ne!(
        by_round[&0][0].stream, by_round[&1][0].stream,
        "each round has its own stream"
    );

    // The streamed FedAvg equals the aggregator's whole-array FedAvg exactly, which is (with
    // weights 1 and 3, sites adding 1 and 3) the global model plus 2.5 per round.
    let model = outcome.model.as_ref().unwrap();
    assert_eq!(model["w"].shape(), &[W_LEN]);
    assert_eq!(
        model["w"].to_f32_vec().unwrap(),
        global["w"].to_f32_vec().unwrap()
    );
    assert_eq!(
        model["b"].to_f64_vec().unwrap(),
        global["b"].to_f64_vec().unwrap()
    );
    let closed_form: Vec<f32> = initial["w"]
        .to_f32_vec()
        .unwrap()
        .iter()
        .map(|v| v + 2.5 * rounds as f32)
        .collect();
    assert_eq!(model["w"].to_f32_vec().unwrap(), closed_form);
    assert_eq!(model["b"].to_f64_vec().unwrap(), vec![6.0, 3.0, 5.5]);
    assert_eq!(outcome.rounds.len(), rounds as usize);
    for round in &outcome.rounds {
        assert_eq!(round.clients, SITES);
        assert!(round.failed_clients.is_empty());
    }

    // The model went through the stream both ways: the tasks and the results carried no array
    // but named the stream, and each site got / sent every .npy byte in pieces (w alone spans
    // three 1 MiB chunks).
    let seen = record.drain().to_vec();
    let model_bytes = npy_len(&initial);
    for site in SITES {
        let tasks: Vec<_> = seen
            .iter()
            .filter(|w| matches!(w, Wire::Task { to, .. } if to == site))
            .collect();
        assert_eq!(tasks.len(), rounds as usize, "{site}: {tasks:?}");
        for t in &tasks {
            assert!(
                matches!(
                    t,
                    Wire::Task {
                        arrays: 0,
                        stream: Some(_),
                        ..
                    }
                ),
                "{site}: the task carries no array and names its stream: {t:?}"
            );
        }
        let submits: Vec<_> = seen
            .iter()
            .filter(|w| matches!(w, Wire::Submit { from, .. } if from == site))
            .collect();
        assert_eq!(submits.len(), rounds as usize, "{site}: {submits:?}");
        for (t, s) in tasks.iter().zip(&submits) {
            let (
                Wire::Task { stream: ts, .. },
                Wire::Submit {
                    arrays, stream: ss, ..
                },
            ) = (t, s)
            else {
                unreachable!()
            };
            assert_eq!(*arrays, 0, "{site}: the result carries no array");
            assert_eq!(ss, ts, "{site}: the result names the task's stream");
        }
        let down = pieces(&seen, "server", site, TOPIC_WEIGHTS);
        assert!(
            down.len() >= 4 * rounds as usize,
            "{site}: {} pieces",
            down.len()
        );
        assert_eq!(piece_bytes(&down), model_bytes * rounds as usize);
        let up = pieces(&seen, site, "server", TOPIC_RESULT);
        assert!(
            up.len() >= 4 * rounds as usize,
            "{site}: {} pieces",
            up.len()
        );
        assert_eq!(piece_bytes(&up), model_bytes * rounds as usize);
        assert!(
            down.iter()
                .chain(&up)
                .all(|p| matches!(p, Wire::Piece { bytes, .. } if *bytes <= 1 << 20)),
            "{site}: no piece above 1 MiB"
        );
    }

    for site in sites {
        let end = within(site.run).await.unwrap().unwrap();
        assert_eq!(end.ended_by, RunEnd::EndRun, "{}", site.name);
        assert_eq!(end.results_sent, rounds as usize, "{}", site.name);
        site.engine.stop().await;
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The run ended one of the two ways an abort may end it.
fn assert_stopped(site: &str, end: &RunOutcome) {
    assert!(
        matches!(end.ended_by, RunEnd::EndRun | RunEnd::Aborted),
        "{site}: {end:?}"
    );
    assert_eq!(end.results_sent, 0, "{site}: no result once aborted");
}

#[actix::test]
async fn abort_during_a_streamed_transfer_ends_cleanly() {
    init_log();
    let (tap, rx) = Tap::new();
    let mut record = Record {
        rx,
        seen: Vec::new(),
    };
    let (server, _events) = start_server(&tap).await;
    let (received_tx, _received) = mpsc::unbounded_channel();
    let trainings = [
        Training::new(1.0, 1, &received_tx),
        Training::new(3.0, 3, &received_tx),
    ];
    let mut sites = Vec::new();
    for (name, training) in SITES.iter().zip(&trainings) {
        sites.push(start_site(&tap, name, training).await);
    }
    record.wait_for_syncs().await;
    // site-2 gets the model's first chunk, the second stays on the wire
    let (reached, release) = tap.hold("server", "site-2", TOPIC_WEIGHTS, 1);

    let dir = temp_dir("abort");
    let run = spawn_workflow(&server, sag(SagConfig::new(2, 1), &dir));
    within(reached).await.unwrap();
    assert!(
        trainings
            .iter()
            .all(|t| t.calls.load(Ordering::SeqCst) == 0),
        "no executor runs before its model arrived"
    );
    server.abort();

    let err = within(run).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ServerError::Aborted)
            || matches!(&err, ServerError::RoundFailed { round: 0, source }
                if matches!(**source, ServerError::Aborted)),
        "{err:?}"
    );
    for site in sites {
        let end = within(site.run).await.unwrap().unwrap();
        assert_stopped(&site.name, &end);
        site.engine.stop().await;
    }
    assert!(
        trainings
            .iter()
            .all(|t| t.calls.load(Ordering::SeqCst) == 0),
        "an aborted transfer never reaches an executor"
    );
    let seen = record.drain();
    assert!(
        !seen.iter().any(|w| matches!(w, Wire::Submit { .. })),
        "no result was submitted: {seen:?}"
    );
    let _ = release.send(true);
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits for the server's event that `client`'s result arrived.
async fn result_received(events: &mut mpsc::UnboundedReceiver<WorkflowEvent>, client: &str) {
    within(async {
        loop {
            match events.recv().await.expect("the server is gone") {
                WorkflowEvent::ResultReceived { client: c, .. } if c == client => return,
                _ => {}
            }
        }
    })
    .await
}

#[actix::test]
async fn a_result_stream_still_arriving_when_enough_results_came_is_awaited_not_half_counted() {
    init_log();
    let (tap, rx) = Tap::new();
    let mut record = Record {
        rx,
        seen: Vec::new(),
    };
    let (server, mut events) = start_server(&tap).await;
    let (received_tx, _received) = mpsc::unbounded_channel();
    let (site_1, go) = Training::new(1.0, 1, &received_tx).gated();
    let trainings = [site_1, Training::new(3.0, 3, &received_tx)];
    let mut sites = Vec::new();
    for (name, training) in SITES.iter().zip(&trainings) {
        sites.push(start_site(&tap, name, training).await);
    }
    record.wait_for_syncs().await;
    // site-2's result: the first chunk reaches the server's sums, the second stays on the wire
    let (reached, release) = tap.hold("site-2", "server", TOPIC_RESULT, 1);

    let dir = temp_dir("late");
    // one result is enough: the round closes as soon as site-1's result is in
    let run = spawn_workflow(&server, sag(SagConfig::new(1, 1), &dir));
    within(reached).await.unwrap();
    go.send(()).unwrap();
    result_received(&mut events, "site-1").await;
    // the round has enough results while site-2's stream is half-way: let it finish
    release.send(true).unwrap();

    let outcome = within(run).await.unwrap().unwrap();
    let model = outcome.model.as_ref().unwrap();
    let initial = initial_model();
    let both: Vec<f32> = initial["w"]
        .to_f32_vec()
        .unwrap()
        .iter()
        .map(|v| v + 2.5)
        .collect();
    assert_eq!(
        model["w"].to_f32_vec().unwrap(),
        both,
        "the aggregate is the exact FedAvg of both complete results"
    );
    assert_eq!(model["b"].to_f64_vec().unwrap(), vec![3.5, 0.5, 3.0]);
    assert_eq!(outcome.rounds[0].clients, SITES);
    for site in sites {
        let end = within(site.run).await.unwrap().unwrap();
        assert_eq!(end.ended_by, RunEnd::EndRun, "{}", site.name);
        site.engine.stop().await;
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn client_abort_during_its_result_upload_fails_the_round_instead_of_a_wrong_model() {
    init_log();
    let (tap, rx) = Tap::new();
    let mut record = Record {
        rx,
        seen: Vec::new(),
    };
    let (server, _events) = start_server(&tap).await;
    let (received_tx, _received) = mpsc::unbounded_channel();
    let (site_1, go) = Training::new(1.0, 1, &received_tx).gated();
    let trainings = [site_1, Training::new(3.0, 3, &received_tx)];
    let mut sites = Vec::new();
    for (name, training) in SITES.iter().zip(&trainings) {
        sites.push(start_site(&tap, name, training).await);
    }
    record.wait_for_syncs().await;
    let (reached, release) = tap.hold("site-2", "server", TOPIC_RESULT, 1);

    let dir = temp_dir("client-abort");
    let run = spawn_workflow(&server, sag(SagConfig::new(1, 1), &dir));
    within(reached).await.unwrap();
    // site-2's job is aborted half-way through its upload
    let mut sites = sites.into_iter();
    let (first, second) = (sites.next().unwrap(), sites.next().unwrap());
    assert!(second.engine.abort_app(JOB).await.unwrap());
    let end = within(second.run).await.unwrap().unwrap();
    assert_eq!(end.ended_by, RunEnd::Aborted);
    assert_eq!(end.results_sent, 0);
    // site-1 then answers: enough results, but the sums hold part of site-2's
    go.send(()).unwrap();

    let err = within(run).await.unwrap().unwrap_err();
    assert!(
        matches!(&err, ServerError::RoundFailed { round: 0, source }
            if source.to_string().contains("broke off")),
        "{err:?}"
    );
    let end = within(first.run).await.unwrap().unwrap();
    assert_eq!(end.ended_by, RunEnd::EndRun);
    assert_eq!(end.results_sent, 1);
    let _ = release.send(true);
    first.engine.stop().await;
    second.engine.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `.npy` elements of a model of just over 64 MiB (the default stream threshold).
const BIG_LEN: usize = (16 << 20) + 7;

/// Awaits `f` within 150 s: a 64 MiB round in a debug build takes ~20 s on an idle machine.
async fn within_long<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(150), f)
        .await
        .expect("no answer before the deadline")
}

#[actix::test]
async fn a_client_joining_after_a_64_mib_model_stream_started_gets_its_own_copy() {
    init_log();
    let (tap, mut rx) = Tap::new();
    let (server, _events) = start_server(&tap).await;
    let (received_tx, mut received) = mpsc::unbounded_channel();
    let first = start_site(&tap, SITES[0], &Training::new(1.0, 1, &received_tx)).await;

    let w: Vec<f32> = (0..BIG_LEN).map(|i| (i % 64) as f32).collect();
    let mut initial = ModelWeights::new();
    initial.insert("w".into(), NdArray::from_f32(&[BIG_LEN], &w).unwrap());
    initial.insert("b".into(), NdArray::from_f64(&[1], &[0.5]).unwrap());
    assert!(npy_len(&initial) as u64 >= fedrun_server::sag::DEFAULT_STREAM_THRESHOLD);
    let dir = temp_dir("late");
    let persistor = NpyPersistor::new(&dir).with_initial_weights(initial);
    // min_clients 2: the round cannot complete without the late joiner
    let workflow = ScatterAndGather::new(
        SagConfig::new(2, 1),
        Arc::new(FedAvg::default()),
        Arc::new(persistor),
    );
    let run = spawn_workflow(&server, workflow);

    // the round is under way: site-1 has its task and its model is streaming
    within(async {
        loop {
            let seen = rx.recv().await.expect("the tap is gone");
            if matches!(&seen, Wire::Piece { to, topic, .. } if to == SITES[0] && topic == TOPIC_WEIGHTS)
            {
                return;
            }
        }
    })
    .await;
    let late = start_site(&tap, SITES[1], &Training::new(3.0, 1, &received_tx)).await;

    let outcome = within_long(run).await.unwrap().unwrap();
    assert_eq!(outcome.rounds.len(), 1);
    assert_eq!(
        outcome.rounds[0].clients, SITES,
        "the late joiner took part"
    );
    assert!(outcome.rounds[0].failed_clients.is_empty());
    let mut got = Vec::new();
    for _ in SITES {
        got.push(within_long(received.recv()).await.unwrap());
    }
    got.sort_by(|a, b| a.site.cmp(&b.site));
    for r in &got {
        assert_eq!(r.w.len(), BIG_LEN, "{}", r.site);
        assert!(
            r.w == w,
            "{}: the executor got the whole global model",
            r.site
        );
    }
    // (1 + 3) / 2 added to every weight
    let model = outcome.model.unwrap();
    let expected: Vec<f32> = w.iter().map(|v| v + 2.0).collect();
    assert!(model["w"].to_f32_vec().unwrap() == expected, "exact FedAvg");

    for site in [first, late] {
        let end = within_long(site.run).await.unwrap().unwrap();
        assert_eq!(end.ended_by, RunEnd::EndRun, "{}", site.name);
        site.engine.stop().await;
    }
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
