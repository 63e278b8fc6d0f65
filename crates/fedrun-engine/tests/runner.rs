//! Guarantees of the client job's task loop (`ClientRunner`, the pinned task
//! protocol) and of the client job config that builds its executors.
//!
//! Each test runs one client engine and its runner against a fake server job on one in-process
//! network: a cell at `server.J` whose `server_command` handlers answer `get_task` from a script
//! (and `__try_again__` when the script is empty) and record `submit_update`, plus an `SJ` aux
//! runner on the same cell answering `__sync_runner__`, `__task_check__` and `__job_heartbeat__`.
//! Everything the server sees is recorded in order, with the time it arrived.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use fedrun_cell::{request_handler, AbortSignal, Cell, CellMessage, Fqcn, HandlerError, Network};
use fedrun_core::constants::{
    channel, event_type, fl_ctx_key, header_key, reserved_topic, special_task, task_header, topic,
};
use fedrun_core::{AppReturnCode, FlContext, Map, PeerContext, ReturnCode, Shareable, Value};
use fedrun_engine::{
    aux_handler, executor_factory, executor_fn, executor_of, factory, handler_fn, AuxRequest,
    AuxRunner, BuildArgs, ClientEngine, ClientJobConfig, ClientRunner, Component, EngineError,
    EngineHandle, GetJobClients, RegisterAuxMessageHandler, RegisterComponentFactory, RunEnd,
    RunInfo, RunInfoConfig, RunnerConfig, SendAuxRequest, SetBuildAuthorizer, TaskRouter,
};
use fedrun_engine::{AuxConfig, Executor};
use tokio::sync::{mpsc, oneshot};

const JOB: &str = "J";
const SITE: &str = "site-1";
/// The deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

/// A runner config with short waits, so that a test takes milliseconds.
fn fast() -> RunnerConfig {
    RunnerConfig {
        default_interval: Duration::from_millis(10),
        task_check_interval: Duration::from_millis(20),
        task_check_timeout: Duration::from_secs(3),
        job_heartbeat_interval: Duration::from_secs(60),
        runner_sync_timeout: Duration::from_secs(2),
        max_runner_sync_timeout: Duration::from_secs(5),
        get_task_timeout: None,
        submit_task_result_timeout: None,
        task_abort_grace: Duration::from_secs(3),
        model_stream_timeout: Duration::from_secs(5),
        end_run_after_failed_pulls: None,
    }
}

// ------------------------------------------------------------------------------------------------
// The fake server job
// ------------------------------------------------------------------------------------------------

/// What the fake server saw, in arrival order.
#[derive(Debug)]
enum Seen {
    GetTask { at: Instant },
    Submit { result: Shareable, optional: bool },
    Sync,
    TaskCheck(Option<String>),
    Heartbeat,
}

/// How the fake server answers.
#[derive(Default)]
struct ServerState {
    /// The replies to `get_task`, in order; `__try_again__` (wait 10 ms) once empty.
    get_task: VecDeque<Shareable>,
    /// Answer `SERVER_NOT_READY` to this many `__sync_runner__` first.
    sync_not_ready: usize,
    /// `__task_check__` answers `TASK_UNKNOWN` for these task ids.
    unknown_tasks: HashSet<String>,
    /// Fail this many `submit_update` first (cell code `process_exception`).
    submit_failures: usize,
    /// Once `get_task` is empty, fail every pull (as a server root answers "cannot forward"
    /// once the server job is gone) instead of answering `__try_again__`.
    gone_when_empty: bool,
}

struct FakeServer {
    seen: mpsc::UnboundedReceiver<Seen>,
    aux: Addr<AuxRunner>,
}

impl FakeServer {
    async fn start(net: &Network, state: ServerState) -> FakeServer {
        let state = Arc::new(Mutex::new(state));
        let (tx, seen) = mpsc::unbounded_channel();
        let cell = Cell::start(Fqcn::job_cell("server", JOB).unwrap(), net.clone()).unwrap();

        let (st, t) = (Arc::clone(&state), tx.clone());
        let get_task = request_handler(move |_msg: CellMessage| {
            let _ = t.send(Seen::GetTask { at: Instant::now() });
            let (reply, gone) = {
                let mut s = st.lock().unwrap();
                (s.get_task.pop_front(), s.gone_when_empty)
            };
            async move {
                match reply {
                    Some(reply) => Ok(Some(CellMessage::new(reply))),
                    None if gone => Err(HandlerError::Other("cannot forward".into())),
                    None => Ok(Some(CellMessage::new(try_again(0.01)))),
                }
            }
        });
        cell.register_request_handler(channel::SERVER_COMMAND, topic::GET_TASK, get_task)
            .await
            .unwrap();

        let (st, t) = (Arc::clone(&state), tx.clone());
        let submit = request_handler(move |msg: CellMessage| {
            let optional = msg.headers.optional().unwrap_or(false);
            let result = msg.payload.as_shareable().cloned().unwrap();
            let _ = t.send(Seen::Submit { result, optional });
            let fail = {
                let mut s = st.lock().unwrap();
                let fail = s.submit_failures > 0;
                s.submit_failures = s.submit_failures.saturating_sub(1);
                fail
            };
            async move {
                if fail {
                    Err(HandlerError::Other("server busy".into()))
                } else {
                    Ok(Some(CellMessage::new(Shareable::new())))
                }
            }
        });
        cell.register_request_handler(channel::SERVER_COMMAND, topic::SUBMIT_UPDATE, submit)
            .await
            .unwrap();

        let meta = Value::Map(Map::from_iter([(
            "job_clients",
            Value::Array(vec![Value::Map(Map::from_iter([("name", SITE)]))]),
        )]));
        let run = RunInfo::new(RunInfoConfig::new("server", JOB).with_job_meta(meta)).start();
        let aux = AuxRunner::new(AuxConfig::new("server", JOB, cell, run).with_process_type("SJ"))
            .start();
        within(aux.send(GetJobClients { job_meta: None }))
            .await
            .unwrap()
            .unwrap();

        let (st, t) = (Arc::clone(&state), tx.clone());
        let sync = aux_handler(move |_req: AuxRequest| {
            let _ = t.send(Seen::Sync);
            let rc = {
                let mut s = st.lock().unwrap();
                if s.sync_not_ready > 0 {
                    s.sync_not_ready -= 1;
                    AppReturnCode::ServerNotReady
                } else {
                    AppReturnCode::Ok
                }
            };
            async move { Ok(Shareable::make_reply(rc, None)) }
        });
        let (st, t) = (Arc::clone(&state), tx.clone());
        let check = aux_handler(move |req: AuxRequest| {
            let id = req
                .request
                .header_or_none(header_key::TASK_ID)
                .and_then(Value::as_str)
                .map(str::to_owned);
            let _ = t.send(Seen::TaskCheck(id.clone()));
            let rc = match id {
                None => AppReturnCode::BadRequestData,
                Some(id) if st.lock().unwrap().unknown_tasks.contains(&id) => {
                    AppReturnCode::TaskUnknown
                }
                Some(_) => AppReturnCode::Ok,
            };
            async move { Ok(Shareable::make_reply(rc, None)) }
        });
        let t = tx;
        let heartbeat = aux_handler(move |_req: AuxRequest| {
            let _ = t.send(Seen::Heartbeat);
            async { Ok(Shareable::make_reply(AppReturnCode::Ok, None)) }
        });
        for (topic, handler) in [
            (reserved_topic::SYNC_RUNNER, sync),
            (reserved_topic::TASK_CHECK, check),
            (reserved_topic::JOB_HEARTBEAT, heartbeat),
        ] {
            within(aux.send(RegisterAuxMessageHandler::new(topic, handler)))
                .await
                .unwrap()
                .unwrap();
        }
        FakeServer { seen, aux }
    }

    /// The next thing the server saw.
    async fn next(&mut self) -> Seen {
        within(self.seen.recv()).await.expect("the server is gone")
    }

    /// Waits until the server sees something `pick` selects; returns it.
    async fn wait_for<T>(&mut self, mut pick: impl FnMut(&Seen) -> Option<T>) -> T {
        loop {
            let seen = self.next().await;
            if let Some(t) = pick(&seen) {
                return t;
            }
        }
    }

    /// Everything seen so far (without waiting).
    fn drain(&mut self) -> Vec<Seen> {
        let mut all = Vec::new();
        while let Ok(s) = self.seen.try_recv() {
            all.push(s);
        }
        all
    }

    /// Sends an aux request from the server job to the client job and returns its reply.
    async fn aux_to_client(&self, topic: &str, request: Shareable) -> Shareable {
        let msg = SendAuxRequest::new(SITE, topic, request, Duration::from_secs(5));
        let mut replies = within(self.aux.send(msg)).await.unwrap().unwrap();
        replies.remove(SITE).expect("a reply from the client")
    }
}

/// The server job's context, as it sends it with every task.
fn server_ctx(job: &str) -> PeerContext {
    let mut ctx = PeerContext::default();
    ctx.set(fl_ctx_key::RUN_NUM, job);
    ctx.set(fl_ctx_key::IDENTITY_NAME, "server");
    ctx
}

/// A real task as the captured server sends one, with a DXO holding `x`.
fn task(name: &str, id: &str, x: i64) -> Shareable {
    let mut dxo = Map::new();
    dxo.insert("kind", "WEIGHTS");
    dxo.insert("data", Map::from_iter([("x", x)]));
    dxo.insert("meta", Map::new());
    let mut t = Shareable::new();
    t.insert("DXO", dxo);
    t.set_header(header_key::CONTENT_TYPE, "DXO");
    t.set_header("current_round", 0);
    t.set_header("num_rounds", 2);
    t.set_cookie_jar(Map::from_iter([
        ("contribution_round", Value::from(0)),
        ("__workflow__", Value::from("scatter_and_gather")),
        ("__task_id__", Value::from(id)),
    ]));
    t.set_header(header_key::TASK_NAME, name);
    t.set_header(header_key::TASK_OPERATOR, Map::new());
    t.set_header(header_key::TASK_ID, id);
    t.set_header(header_key::MSG_ROOT_ID, format!("root-{id}"));
    t.set_header(header_key::MSG_ROOT_TTL, 3600.0);
    t.set_header(header_key::WAIT_TIME, 0.01);
    t.set_header(task_header::TASK_NAME, name);
    t.set_peer_context(server_ctx(JOB));
    t
}

fn try_again(wait: f64) -> Shareable {
    let mut s = Shareable::new();
    s.set_header(task_header::TASK_NAME, special_task::TRY_AGAIN);
    s.set_header(header_key::WAIT_TIME, wait);
    s.set_peer_context(server_ctx(JOB));
    s
}

fn end_run() -> Shareable {
    let mut s = Shareable::new();
    s.set_header(task_header::TASK_NAME, special_task::END_RUN);
    s.set_header(header_key::TASK_ID, "");
    s.set_cookie_jar(Map::from_iter([("__task_id__", "")]));
    s.set_peer_context(server_ctx(JOB));
    s
}

/// The `x` of a DXO body.
fn dxo_x(s: &Shareable) -> Option<i64> {
    s.get("DXO")?
        .as_map()?
        .get("data")?
        .as_map()?
        .get("x")?
        .as_i64()
}

fn header_str<'a>(s: &'a Shareable, key: &str) -> Option<&'a str> {
    s.header_or_none(key).and_then(Value::as_str)
}

// ------------------------------------------------------------------------------------------------
// The client side
// ------------------------------------------------------------------------------------------------

/// An event the client engine fired, with the `__run_abort_requested__` prop it carried.
type Fired = (String, Option<Value>);

struct Client {
    engine: EngineHandle,
    events: mpsc::UnboundedReceiver<Fired>,
}

impl Client {
    async fn start(net: &Network) -> Client {
        let engine = within(
            ClientEngine::builder(SITE, JOB)
                .communication_timeout(Duration::from_secs(5))
                .start(net),
        )
        .await
        .unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let probe = handler_fn("probe", move |event: &str, ctx: &mut FlContext| {
            let _ = tx.send((
                event.to_owned(),
                ctx.get_prop(fl_ctx_key::RUN_ABORT_REQUESTED),
            ));
            Ok(())
        });
        within(engine.add_handler(probe)).await.unwrap();
        Client { engine, events }
    }

    /// Every event fired so far, in order.
    fn fired(&mut self) -> Vec<Fired> {
        let mut all = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            all.push(e);
        }
        all
    }
}

fn names(fired: &[Fired]) -> Vec<&str> {
    fired.iter().map(|(e, _)| e.as_str()).collect()
}

/// The run events among `fired`, in order.
fn run_events(fired: &[Fired]) -> Vec<&str> {
    let run = [
        event_type::ABOUT_TO_START_RUN,
        event_type::START_RUN,
        event_type::ABORT_TASK,
        event_type::ABOUT_TO_END_RUN,
        event_type::END_RUN,
    ];
    names(fired)
        .into_iter()
        .filter(|e| run.contains(e))
        .collect()
}

/// An executor that multiplies the DXO's `x` by `factor` and records the server's identity it
/// saw in its context's peer context.
fn multiplier(factor: i64) -> impl Executor {
    executor_fn(
        move |_name, task: Shareable, ctx: FlContext, _abort| async move {
            let x = dxo_x(&task).ok_or("the task has no x")?;
            let mut data = Map::new();
            data.insert("x", x * factor);
            let mut dxo = Map::new();
            dxo.insert("kind", "WEIGHT_DIFF");
            dxo.insert("data", data);
            dxo.insert("meta", Map::from_iter([("NUM_STEPS_CURRENT_ROUND", 1)]));
            let mut result = Shareable::new();
            result.insert("DXO", dxo);
            let peer = ctx
                .peer_context()
                .and_then(|p| p.get(fl_ctx_key::IDENTITY_NAME))
                .cloned()
                .unwrap_or(Value::Nil);
            result.insert("peer_seen", peer);
            Ok(result)
        },
    )
}

fn router(tasks: &[&str], executor: impl Executor) -> TaskRouter {
    let mut r = TaskRouter::new();
    r.add(tasks.iter().copied(), Arc::new(executor)).unwrap();
    r
}

/// The submissions among `seen`.
fn submissions(seen: &[Seen]) -> Vec<&Shareable> {
    seen.iter()
        .filter_map(|s| match s {
            Seen::Submit { result, .. } => Some(result),
            _ => None,
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// The task loop
// ------------------------------------------------------------------------------------------------

#[actix::test]
async fn two_tasks_are_executed_and_their_results_carry_cookie_jar_name_id_and_ok_then_end_run_ends_the_loop(
) {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "t1", 2), task("train", "t2", 5), end_run()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let mut client = Client::start(&net).await;
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(10)),
        fast(),
    );

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
    assert_eq!(outcome.tasks_done, 2);
    assert_eq!(outcome.results_sent, 2);

    let seen = server.drain();
    let results = submissions(&seen);
    assert_eq!(results.len(), 2);
    for (result, (id, x)) in results.iter().zip([("t1", 20), ("t2", 50)]) {
        assert_eq!(dxo_x(result), Some(x));
        let jar = result.cookie_jar().expect("the cookie jar is echoed");
        assert_eq!(jar, task("train", id, 0).cookie_jar().unwrap());
        assert_eq!(header_str(result, header_key::TASK_NAME), Some("train"));
        assert_eq!(header_str(result, header_key::TASK_ID), Some(id));
        assert_eq!(result.return_code(), ReturnCode::OK);
        assert_eq!(header_str(result, header_key::RC), Some("OK"));
        let root = header_str(result, header_key::MSG_ROOT_ID).expect("a fresh msg root id");
        assert_ne!(root, format!("root-{id}"));
        assert_eq!(
            result.get("peer_seen").and_then(Value::as_str),
            Some("server")
        );
        assert!(
            result.peer_context().is_some(),
            "the result carries the client's context"
        );
    }
    // Each result is checked before it is sent, and the sync came first.
    let order: Vec<String> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Sync => Some("sync".to_owned()),
            Seen::TaskCheck(id) => Some(format!("check {}", id.clone().unwrap_or_default())),
            Seen::Submit { result, .. } => Some(format!(
                "submit {}",
                header_str(result, header_key::TASK_ID).unwrap()
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        ["sync", "check t1", "submit t1", "check t2", "submit t2"]
    );

    let fired = client.fired();
    assert_eq!(
        run_events(&fired),
        [
            event_type::ABOUT_TO_START_RUN,
            event_type::START_RUN,
            event_type::ABOUT_TO_END_RUN,
            event_type::END_RUN
        ]
    );
    let info = client.engine.get_run_info().await.unwrap();
    assert!(info.start_time.is_some(), "the run is marked started");
}

#[actix::test]
async fn executor_error_is_sent_as_execution_exception() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "t1", 1), end_run()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let failing =
        executor_fn(|_, _, _, _| async { Err::<Shareable, _>("out of memory".to_owned()) });
    let runner = ClientRunner::new(client.engine.clone(), router(&["train"], failing), fast());

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!((outcome.tasks_done, outcome.results_sent), (1, 1));
    let seen = server.drain();
    let results = submissions(&seen);
    assert_eq!(results.len(), 1);
    assert_eq!(
        results[0].return_code(),
        AppReturnCode::ExecutionException.into()
    );
    assert_eq!(header_str(results[0], header_key::TASK_ID), Some("t1"));
    assert!(results[0].cookie_jar().is_some());
    let errors = client
        .engine
        .show_errors()
        .await
        .unwrap()
        .expect("the failure is logged");
    assert_eq!(errors.records("ClientRunner", "task").len(), 1);
}

#[actix::test]
async fn executor_panic_is_sent_as_execution_exception_and_the_loop_goes_on() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("boom", "t1", 1), task("train", "t2", 3), end_run()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let mut r = router(&["train"], multiplier(2));
    let panicking = executor_fn(|_, _, _, _| async {
        if true {
            panic!("executor bug");
        }
        Ok::<Shareable, String>(Shareable::new())
    });
    r.add(["boom"], Arc::new(panicking)).unwrap();
    let runner = ClientRunner::new(client.engine.clone(), r, fast());

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
    let seen = server.drain();
    let results = submissions(&seen);
    assert_eq!(results.len(), 2);
    assert_eq!(
        results[0].return_code(),
        AppReturnCode::ExecutionException.into()
    );
    assert_eq!(results[1].return_code(), ReturnCode::OK);
    assert_eq!(dxo_x(results[1]), Some(6));
}

#[actix::test]
async fn unknown_task_is_answered_task_unknown() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("validate", "v1", 1), end_run()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(1)),
        fast(),
    );

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!(outcome.results_sent, 1);
    let seen = server.drain();
    let results = submissions(&seen);
    assert_eq!(results[0].return_code(), AppReturnCode::TaskUnknown.into());
    assert_eq!(
        header_str(results[0], header_key::TASK_NAME),
        Some("validate")
    );
    assert_eq!(header_str(results[0], header_key::TASK_ID), Some("v1"));
}

#[actix::test]
async fn task_from_another_job_is_answered_run_mismatch_without_running_the_executor() {
    let net = Network::new();
    let mut foreign = task("train", "t1", 1);
    foreign.set_peer_context(server_ctx("other-job"));
    let state = ServerState {
        get_task: VecDeque::from([foreign, end_run()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = {
        let calls = Arc::clone(&calls);
        executor_fn(move |_, t, _, _| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>(t) }
        })
    };
    let runner = ClientRunner::new(client.engine.clone(), router(&["train"], counted), fast());

    within(runner.run()).await.unwrap();
    let seen = server.drain();
    assert_eq!(
        submissions(&seen)[0].return_code(),
        AppReturnCode::RunMismatch.into()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[actix::test]
async fn try_again_waits_its_wait_time_then_the_task_is_fetched_and_run() {
    let net = Network::new();
    let wait = Duration::from_millis(300);
    let state = ServerState {
        get_task: VecDeque::from([
            try_again(wait.as_secs_f64()),
            task("train", "t1", 4),
            end_run(),
        ]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(3)),
        fast(),
    );

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!((outcome.tasks_done, outcome.results_sent), (1, 1));
    let seen = server.drain();
    let pulls: Vec<Instant> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::GetTask { at } => Some(*at),
            _ => None,
        })
        .collect();
    assert_eq!(pulls.len(), 3, "try again, the task, end of run");
    let gap = pulls[1] - pulls[0];
    assert!(
        gap >= wait,
        "the next pull came after {gap:?}, before the {wait:?} asked for"
    );
    assert_eq!(dxo_x(submissions(&seen)[0]), Some(12));
}

#[actix::test]
async fn abort_during_a_running_task_reaches_the_executor_ends_the_loop_and_fires_abort_task() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "t1", 1)]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let mut client = Client::start(&net).await;
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (saw_tx, saw_rx) = oneshot::channel::<()>();
    let started_tx = Mutex::new(Some(started_tx));
    let saw_tx = Arc::new(Mutex::new(Some(saw_tx)));
    let waiting = executor_fn(move |_, _, _, abort: AbortSignal| {
        if let Some(tx) = started_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
        let saw_tx = Arc::clone(&saw_tx);
        async move {
            abort.triggered().await;
            if let Some(tx) = saw_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            Ok::<_, String>(Shareable::new())
        }
    });
    let runner = ClientRunner::new(client.engine.clone(), router(&["train"], waiting), fast());
    let control = runner.control();
    let run = runner.spawn();

    within(started_rx).await.unwrap();
    assert_eq!(control.running_tasks().len(), 1);
    assert!(client.engine.abort_app(JOB).await.unwrap());
    within(saw_rx).await.expect("the executor saw the abort");
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.ended_by, RunEnd::Aborted);
    assert_eq!(outcome.tasks_done, 1);
    assert_eq!(outcome.results_sent, 0);
    assert!(control.running_tasks().is_empty());

    let seen = server.drain();
    assert!(
        submissions(&seen).is_empty(),
        "an aborted run sends no result"
    );
    let fired = client.fired();
    assert_eq!(
        run_events(&fired),
        [
            event_type::ABOUT_TO_START_RUN,
            event_type::START_RUN,
            event_type::ABORT_TASK,
            event_type::ABOUT_TO_END_RUN,
            event_type::END_RUN
        ]
    );
    let abort_task = fired
        .iter()
        .find(|(e, _)| e == event_type::ABORT_TASK)
        .unwrap();
    assert_eq!(
        abort_task.1,
        Some(Value::from(true)),
        "__run_abort_requested__ is set"
    );
}

#[actix::test]
async fn aborting_the_current_task_sends_task_aborted_optionally_and_the_run_goes_on() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "t1", 1), task("train", "t2", 1), end_run()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let started_tx = Mutex::new(Some(started_tx));
    let waits_for_abort = executor_fn(move |_, t: Shareable, _, abort: AbortSignal| {
        let first = header_str(&t, header_key::TASK_ID) == Some("t1");
        if first {
            if let Some(tx) = started_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
        async move {
            if first {
                abort.triggered().await;
            }
            Ok::<_, String>(t)
        }
    });
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], waits_for_abort),
        fast(),
    );
    let control = runner.control();
    let run = runner.spawn();

    within(started_rx).await.unwrap();
    assert_eq!(control.abort_current_tasks(), 1);
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
    assert_eq!((outcome.tasks_done, outcome.results_sent), (2, 2));
    let seen = server.drain();
    let sent: Vec<(ReturnCode, bool)> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::Submit { result, optional } => Some((result.return_code(), *optional)),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        [
            (AppReturnCode::TaskAborted.into(), true),
            (ReturnCode::OK, false)
        ]
    );
}

#[actix::test]
async fn an_executor_that_ignores_the_abort_is_dropped_after_the_grace_and_its_result_is_task_aborted(
) {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "t1", 1), end_run()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let started_tx = Mutex::new(Some(started_tx));
    let stubborn = executor_fn(move |_, _, _, _abort| {
        if let Some(tx) = started_tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
        futures::future::pending::<Result<Shareable, String>>()
    });
    let grace = Duration::from_millis(100);
    let config = RunnerConfig {
        task_abort_grace: grace,
        ..fast()
    };
    let runner = ClientRunner::new(client.engine.clone(), router(&["train"], stubborn), config);
    let control = runner.control();
    let run = runner.spawn();

    within(started_rx).await.unwrap();
    let aborted_at = Instant::now();
    assert_eq!(control.abort_current_tasks(), 1);
    let result = server
        .wait_for(|s| match s {
            Seen::Submit { result, .. } => Some(result.clone()),
            _ => None,
        })
        .await;
    assert!(aborted_at.elapsed() >= grace, "the executor had its grace");
    assert_eq!(result.return_code(), AppReturnCode::TaskAborted.into());
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
    assert!(control.running_tasks().is_empty());
}

#[actix::test]
async fn end_run_aux_from_the_server_ends_the_loop() {
    let net = Network::new();
    let mut server = FakeServer::start(&net, ServerState::default()).await;
    let mut client = Client::start(&net).await;
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(1)),
        fast(),
    );
    let run = runner.spawn();

    // The runner polls (the server has nothing: __try_again__); then the server ends the run.
    server
        .wait_for(|s| matches!(s, Seen::GetTask { .. }).then_some(()))
        .await;
    let reply = server
        .aux_to_client(reserved_topic::END_RUN, Shareable::new())
        .await;
    assert_eq!(reply.return_code(), ReturnCode::OK);
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
    assert_eq!(outcome.tasks_done, 0);
    let fired = client.fired();
    assert!(!names(&fired).contains(&event_type::ABORT_TASK));
    assert_eq!(run_events(&fired).last(), Some(&event_type::END_RUN));
}

#[actix::test]
async fn a_server_job_gone_after_the_last_task_ends_the_run_when_failed_pulls_are_bounded() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "t1", 2)]),
        gone_when_empty: true,
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let config = RunnerConfig {
        end_run_after_failed_pulls: Some(Duration::from_millis(200)),
        ..fast()
    };
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(1)),
        config,
    );
    let outcome = within(runner.run()).await.unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
    assert_eq!((outcome.tasks_done, outcome.results_sent), (1, 1));
    let pulls_after = server
        .drain()
        .iter()
        .filter(|s| matches!(s, Seen::GetTask { .. }))
        .count();
    assert!(
        pulls_after >= 2,
        "it kept pulling for a while first: {pulls_after}"
    );
}

#[actix::test]
async fn failed_pulls_before_any_task_never_end_the_run() {
    let net = Network::new();
    let state = ServerState {
        gone_when_empty: true,
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let config = RunnerConfig {
        end_run_after_failed_pulls: Some(Duration::from_millis(50)),
        ..fast()
    };
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(1)),
        config,
    );
    let control = runner.control();
    let run = runner.spawn();
    // far more failed pulls than the limit allows, and the run still goes on
    let mut failed = 0;
    while failed < 30 {
        server
            .wait_for(|s| matches!(s, Seen::GetTask { .. }).then_some(()))
            .await;
        failed += 1;
    }
    assert!(
        !run.is_finished(),
        "a server job that never answered is not 'gone'"
    );
    control.end_run();
    assert_eq!(within(run).await.unwrap().unwrap().tasks_done, 0);
}

#[actix::test]
async fn task_check_task_unknown_drops_the_result() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "gone", 1), task("train", "t2", 2), end_run()]),
        unknown_tasks: HashSet::from(["gone".to_owned()]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(1)),
        fast(),
    );

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!((outcome.tasks_done, outcome.results_sent), (2, 1));
    let seen = server.drain();
    let checked: Vec<Option<String>> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::TaskCheck(id) => Some(id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(checked, [Some("gone".to_owned()), Some("t2".to_owned())]);
    let results = submissions(&seen);
    assert_eq!(
        results.len(),
        1,
        "the server never receives the dropped result"
    );
    assert_eq!(header_str(results[0], header_key::TASK_ID), Some("t2"));
}

#[actix::test]
async fn a_result_the_server_does_not_take_is_checked_and_sent_again() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([task("train", "t1", 7), end_run()]),
        submit_failures: 1,
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let client = Client::start(&net).await;
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(1)),
        fast(),
    );

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!(outcome.results_sent, 1);
    let seen = server.drain();
    let order: Vec<&str> = seen
        .iter()
        .filter_map(|s| match s {
            Seen::TaskCheck(_) => Some("check"),
            Seen::Submit { .. } => Some("submit"),
            _ => None,
        })
        .collect();
    assert_eq!(order, ["check", "submit", "check", "submit"]);
    let results = submissions(&seen);
    let roots: Vec<&str> = results
        .iter()
        .map(|r| header_str(r, header_key::MSG_ROOT_ID).unwrap())
        .collect();
    assert_ne!(roots[0], roots[1], "each attempt has a fresh msg root id");
}

#[actix::test]
async fn sync_retries_until_the_server_runner_says_ok() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([end_run()]),
        sync_not_ready: 2,
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let mut client = Client::start(&net).await;
    let runner = ClientRunner::new(client.engine.clone(), TaskRouter::new(), fast());

    let outcome = within(runner.run()).await.unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
    let seen = server.drain();
    let first_pull = seen
        .iter()
        .position(|s| matches!(s, Seen::GetTask { .. }))
        .expect("the loop ran");
    let syncs_before = seen[..first_pull]
        .iter()
        .filter(|s| matches!(s, Seen::Sync))
        .count();
    assert_eq!(
        syncs_before, 3,
        "two SERVER_NOT_READY, then OK, before any task fetch"
    );
    assert!(names(&client.fired()).contains(&event_type::START_RUN));
}

#[actix::test]
async fn sync_that_never_succeeds_fails_the_run_after_the_deadline_without_start_events() {
    let net = Network::new();
    let state = ServerState {
        sync_not_ready: usize::MAX,
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let mut client = Client::start(&net).await;
    let config = RunnerConfig {
        max_runner_sync_timeout: Duration::from_millis(200),
        ..fast()
    };
    let runner = ClientRunner::new(client.engine.clone(), TaskRouter::new(), config);

    let started = Instant::now();
    let err = within(runner.run()).await.unwrap_err();
    match err {
        EngineError::RunnerSyncFailed { target, waited } => {
            assert_eq!(target, "server");
            assert!(waited >= Duration::from_millis(200));
        }
        other => panic!("expected RunnerSyncFailed, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(200));
    let seen = server.drain();
    assert!(seen.iter().filter(|s| matches!(s, Seen::Sync)).count() >= 2);
    assert!(!seen.iter().any(|s| matches!(s, Seen::GetTask { .. })));
    let fired = client.fired();
    assert!(!names(&fired).contains(&event_type::START_RUN));
    assert_eq!(
        run_events(&fired),
        [event_type::ABOUT_TO_END_RUN, event_type::END_RUN]
    );
}

#[actix::test]
async fn do_task_aux_runs_the_task_and_replies_with_its_result() {
    let net = Network::new();
    let mut server = FakeServer::start(&net, ServerState::default()).await;
    let client = Client::start(&net).await;
    let runner = ClientRunner::new(
        client.engine.clone(),
        router(&["train"], multiplier(4)),
        fast(),
    );
    let run = runner.spawn();
    server
        .wait_for(|s| matches!(s, Seen::GetTask { .. }).then_some(()))
        .await;

    let mut request = task("train", "p1", 5);
    request.set_header(header_key::TASK_NAME, "train");
    let reply = server.aux_to_client(reserved_topic::DO_TASK, request).await;
    assert_eq!(reply.return_code(), ReturnCode::OK);
    assert_eq!(dxo_x(&reply), Some(20));
    assert_eq!(header_str(&reply, header_key::TASK_NAME), Some("train"));
    assert_eq!(header_str(&reply, header_key::TASK_ID), Some("p1"));
    assert_eq!(
        reply.cookie("__task_id__").and_then(Value::as_str),
        Some("p1")
    );

    let mut unnamed = Shareable::new();
    unnamed.set_header(header_key::TASK_ID, "p2");
    let reply = server.aux_to_client(reserved_topic::DO_TASK, unnamed).await;
    assert_eq!(reply.return_code(), AppReturnCode::BadTaskData.into());

    server
        .aux_to_client(reserved_topic::END_RUN, Shareable::new())
        .await;
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.tasks_done, 1);
    assert_eq!(
        outcome.results_sent, 0,
        "a pushed task's result is the aux reply"
    );
}

#[actix::test]
async fn job_heartbeats_are_sent_while_the_run_lasts() {
    let net = Network::new();
    let mut server = FakeServer::start(&net, ServerState::default()).await;
    let client = Client::start(&net).await;
    let config = RunnerConfig {
        job_heartbeat_interval: Duration::from_millis(20),
        ..fast()
    };
    let runner = ClientRunner::new(client.engine.clone(), TaskRouter::new(), config);
    let control = runner.control();
    let run = runner.spawn();
    for _ in 0..3 {
        server
            .wait_for(|s| matches!(s, Seen::Heartbeat).then_some(()))
            .await;
    }
    control.end_run();
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
}

#[actix::test]
async fn a_second_runner_on_the_same_engine_is_refused() {
    let net = Network::new();
    let mut server = FakeServer::start(&net, ServerState::default()).await;
    let client = Client::start(&net).await;
    let first = ClientRunner::new(client.engine.clone(), TaskRouter::new(), fast());
    let control = first.control();
    let run = first.spawn();
    // The first runner registers its aux handlers before it syncs.
    server
        .wait_for(|s| matches!(s, Seen::Sync).then_some(()))
        .await;

    let second = ClientRunner::new(client.engine.clone(), TaskRouter::new(), fast());
    let err = within(second.run()).await.unwrap_err();
    assert_eq!(
        err,
        EngineError::DuplicateAuxHandler(reserved_topic::END_RUN.to_owned())
    );
    assert!(!control.is_stopped(), "the first runner is not disturbed");
    control.end_run();
    let outcome = within(run).await.unwrap().unwrap();
    assert_eq!(outcome.ended_by, RunEnd::EndRun);
}

// ------------------------------------------------------------------------------------------------
// The client job config
// ------------------------------------------------------------------------------------------------

/// A plain (non-executor) component with a text.
struct Note(String);
impl Component for Note {}

const CLIENT_CONFIG: &str = r#"{
    "format_version": 2,
    "executors": [
        {"tasks": ["train", "submit_model"],
         "executor": {"id": "trainer", "path": "test.Multiplier", "args": {"factor": 3}}},
        {"tasks": ["validate"],
         "executor": {"name": "Multiplier", "args": {"factor": -1}}}
    ],
    "components": [
        {"id": "note", "path": "test.Note", "args": {"text": "hello"}}
    ],
    "task_result_filters": [],
    "task_data_filters": []
}"#;

async fn engine_with_factories(net: &Network) -> EngineHandle {
    let engine = within(ClientEngine::builder(SITE, JOB).start(net))
        .await
        .unwrap();
    let multiplier_factory = executor_factory(|args: BuildArgs| {
        let factor = args
            .args
            .get("factor")
            .and_then(|v| v.as_i64())
            .ok_or("missing factor")?;
        Ok(multiplier(factor))
    });
    let note = factory(|args: BuildArgs| {
        let text = args
            .args
            .get("text")
            .and_then(|v| v.as_str())
            .ok_or("missing text")?;
        Ok(Note(text.to_owned()))
    });
    for (class, f) in [
        ("test.Multiplier", multiplier_factory.clone()),
        ("Multiplier", multiplier_factory),
        ("test.Note", note),
    ] {
        engine
            .send(RegisterComponentFactory {
                class: class.to_owned(),
                factory: f,
            })
            .await
            .unwrap()
            .unwrap();
    }
    engine
        .send(SetBuildAuthorizer {
            authorizer: Arc::new(|_, _| Ok(())),
        })
        .await
        .unwrap();
    engine
}

#[actix::test]
async fn client_job_config_from_json_builds_executors_through_factories_and_the_router_runs_them() {
    let net = Network::new();
    let state = ServerState {
        get_task: VecDeque::from([
            task("train", "t1", 2),
            task("validate", "v1", 2),
            task("submit_model", "s1", 1),
            end_run(),
        ]),
        ..ServerState::default()
    };
    let mut server = FakeServer::start(&net, state).await;
    let engine = engine_with_factories(&net).await;

    let config = ClientJobConfig::from_json(CLIENT_CONFIG).unwrap();
    assert_eq!(config.components.len(), 1);
    assert_eq!(config.executors.len(), 2);
    let router = within(config.build(&engine)).await.unwrap();
    assert_eq!(router.task_names(), ["submit_model", "train", "validate"]);
    let note = engine.get_component("note").await.unwrap().unwrap();
    assert_eq!(note.downcast::<Note>().unwrap().0, "hello");
    let trainer = engine.get_component("trainer").await.unwrap().unwrap();
    assert!(
        executor_of(&trainer).is_some(),
        "the executor with an id is a component"
    );

    let runner = ClientRunner::new(engine.clone(), router, fast());
    let outcome = within(runner.run()).await.unwrap();
    assert_eq!(outcome.results_sent, 3);
    let seen = server.drain();
    let xs: Vec<Option<i64>> = submissions(&seen).into_iter().map(dxo_x).collect();
    assert_eq!(xs, [Some(6), Some(-2), Some(3)]);
}

#[test]
fn client_job_config_refuses_bad_shapes_before_building_anything() {
    let with = |patch: &str| -> Result<ClientJobConfig, EngineError> {
        let mut v: serde_json::Value = serde_json::from_str(CLIENT_CONFIG).unwrap();
        let p: serde_json::Value = serde_json::from_str(patch).unwrap();
        for (k, val) in p.as_object().unwrap() {
            v[k] = val.clone();
        }
        ClientJobConfig::from_value(&v)
    };
    let exec = |tasks: &str| {
        format!(r#"{{"tasks": {tasks}, "executor": {{"path": "test.Multiplier", "args": {{}}}}}}"#)
    };

    assert!(matches!(
        with(&format!(r#"{{"executors": [{}, {}]}}"#, exec(r#"["a", "b"]"#), exec(r#"["b"]"#))),
        Err(EngineError::DuplicateTaskRoute(t)) if t == "b"
    ));
    assert!(matches!(
        with(r#"{"task_result_filters": [{"tasks": ["train"], "filters": []}]}"#),
        Err(EngineError::NotSupportedYet(m)) if m.contains("task_result_filters")
    ));
    assert!(matches!(
        with(r#"{"task_data_filters": [{}]}"#),
        Err(EngineError::NotSupportedYet(m)) if m.contains("task_data_filters")
    ));
    assert!(matches!(
        with(r#"{"format_version": 1}"#),
        Err(EngineError::NotSupportedYet(m)) if m.contains("format_version 1")
    ));
    assert!(matches!(
        with(&format!(r#"{{"executors": [{}]}}"#, exec("[]"))),
        Err(EngineError::BadJobConfig(m)) if m.contains("tasks")
    ));
    assert!(matches!(
        with(r#"{"executors": [{"tasks": ["a"]}]}"#),
        Err(EngineError::BadJobConfig(m)) if m.contains("executor")
    ));
    assert!(matches!(
        with(r#"{"executors": [{"tasks": ["a"], "executor": {"args": {}}}]}"#),
        Err(EngineError::BadJobConfig(m)) if m.contains("'path', 'class_path' or 'name'")
    ));
    assert!(matches!(
        with(r#"{"components": [{"path": "test.Note"}]}"#),
        Err(EngineError::BadJobConfig(m)) if m.contains("'id'")
    ));
    assert!(matches!(
        with(r#"{"components": [{"id": "trainer", "path": "test.Note"}]}"#),
        Err(EngineError::DuplicateComponent(id)) if id == "trainer"
    ));
    assert!(matches!(
        ClientJobConfig::from_json("{\"format_version\": 2,"),
        Err(EngineError::BadJobConfig(m)) if m.contains("not valid JSON")
    ));
    assert!(matches!(
        ClientJobConfig::from_json("{}"),
        Err(EngineError::BadJobConfig(m)) if m.contains("format_version")
    ));
    let minimal = ClientJobConfig::from_json(r#"{"format_version": 2}"#).unwrap();
    assert!(minimal.executors.is_empty() && minimal.components.is_empty());
}

#[actix::test]
async fn client_job_config_refuses_an_executor_entry_that_builds_a_plain_component() {
    let net = Network::new();
    let engine = engine_with_factories(&net).await;
    let config = ClientJobConfig::from_json(
        r#"{"format_version": 2,
            "executors": [{"tasks": ["train"],
                           "executor": {"path": "test.Note", "args": {"text": "x"}}}]}"#,
    )
    .unwrap();
    let err = within(config.build(&engine)).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::BadJobConfig(m) if m.contains("test.Note") && m.contains("not an executor")),
        "{err}"
    );
}

#[actix::test]
async fn client_job_config_needs_the_engines_factories() {
    let net = Network::new();
    let engine = within(ClientEngine::builder(SITE, JOB).start(&net))
        .await
        .unwrap();
    let config = ClientJobConfig::from_json(CLIENT_CONFIG).unwrap();
    assert_eq!(
        within(config.build(&engine)).await.unwrap_err(),
        EngineError::NoConfigurator
    );
}
